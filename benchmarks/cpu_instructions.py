"""Instructions per logit of the native CPU row kernels, counted by callgrind.

Wall-clock figures on a shared machine move by tens of percent between runs; the instruction count
of a kernel does not depend on the neighbours. Each case runs in its own process under
``valgrind --tool=callgrind --collect-atstart=no --toggle-collect=<entry point>`` with one thread,
calling the kernel ``--calls`` times on ``--shape`` logits; the count is divided by the calls and
the elements read (rows x V; for ``compare``, x 2: both tensors).

Valgrind runs the x86-64-v3 (AVX2) kernels: it does not emulate AVX-512, and the extension's
dispatcher sees a CPU without it.

    python benchmarks/cpu_instructions.py                          # the built pplfast._C
    python benchmarks/cpu_instructions.py --so OLD/_C.so --json before.json

``--so`` loads another build of ``pplfast._C`` (e.g. of an earlier commit), whose entry points
may be those of the earlier binding (``token_nll``, ``token_stats``, ``compare_update``), for a
before/after record.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

CASES = (
    # name, op, dtype, softcap, temperature, top_k
    ("token_nll fp32", "nll", "fp32", 0.0, 1.0, 0),
    ("token_nll bf16", "nll", "bf16", 0.0, 1.0, 0),
    ("token_nll fp16", "nll", "fp16", 0.0, 1.0, 0),
    ("token_nll fp32 T=0.7", "nll", "fp32", 0.0, 0.7, 0),
    ("token_nll fp32 softcap 30", "nll", "fp32", 30.0, 1.0, 0),
    ("token_nll bf16 softcap 30", "nll", "bf16", 30.0, 1.0, 0),
    ("token_stats fp32", "stats", "fp32", 0.0, 1.0, 0),
    ("token_stats bf16", "stats", "bf16", 0.0, 1.0, 0),
    ("token_stats fp32 top_k=5", "stats", "fp32", 0.0, 1.0, 5),
    ("compare fp32", "compare", "fp32", 0.0, 1.0, 0),
    ("compare bf16", "compare", "bf16", 0.0, 1.0, 0),
)

# The child: no torch (its import under valgrind takes minutes); numpy buffers, raw pointers.
CHILD = r"""
import importlib.util, sys
import numpy as np
so, op, dtype, softcap, temperature, top_k, rows, V, calls = sys.argv[1:]
softcap, temperature = float(softcap), float(temperature)
top_k, rows, V, calls = int(top_k), int(rows), int(V), int(calls)
spec = importlib.util.spec_from_file_location("probe._C", so)
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
rng = np.random.default_rng(0)
def logits():
    x = (rng.standard_normal((rows, V), dtype=np.float32) * 2).astype(np.float32)
    if dtype == "fp32":
        return x, C.FLOAT32
    if dtype == "fp16":
        return x.astype(np.float16), C.FLOAT16
    return (x.view(np.uint32) >> 16).astype(np.uint16), C.BFLOAT16
a, code = logits()
b, _ = logits()
targets = rng.integers(0, V, rows).astype(np.int64)
p = lambda arr: arr.ctypes.data
f32 = lambda *shape: np.full(shape, np.nan, dtype=np.float32)
i64 = lambda *shape: np.full(shape, -7, dtype=np.int64)
new = hasattr(C, "nll_update")
for _ in range(calls):
    if op == "nll" and new:
        st = np.empty((rows, C.NLL_STATE)); C.nll_init(p(st), rows)
        C.nll_update(p(a), code, 0, V, 1, rows, rows, V, 0, p(targets), -100, softcap,
                     temperature, p(st), 1)
        out = f32(rows); C.nll_finish(p(st), p(targets), -100, rows, temperature, p(out))
    elif op == "nll":
        out = f32(rows)
        C.token_nll(p(a), code, 1, rows, V, 0, V, 1, p(targets), -100, softcap, temperature,
                    p(out), 1)
    elif op == "stats" and new:
        st = np.empty((rows, C.STATS_STATE + 2 * top_k)); C.stats_init(p(st), rows, top_k, 0)
        C.stats_update(p(a), code, 0, V, 1, rows, rows, V, 0, p(targets), -100, softcap,
                       temperature, top_k, p(st), 1)
    elif op == "stats":
        outs = [f32(rows), f32(rows), f32(rows), i64(rows), i64(rows), i64(rows, top_k),
                f32(rows, top_k)]
        C.token_stats(p(a), code, 1, rows, V, 0, V, 1, p(targets), -100, softcap, temperature,
                      top_k, *(p(o) for o in outs), 1)
    else:
        st = np.empty((rows, C.COMPARE_STATE)); C.compare_init(p(st), rows)
        C.compare_update(p(a), code, 0, V, 1, p(b), code, 0, V, 1, rows, rows, V, 0,
                         p(targets), -100, softcap, temperature, p(st), 1)
"""

# callgrind --toggle-collect pattern of the kernel's entry point, per binding. The closing ")"
# keeps out the functions named after it (its lambdas "...) const", its OpenMP regions
# "...) [clone ._omp_fn.0]"), whose entry would toggle the collection off again.
ENTRY = {
    ("nll", True): "pplfast::nll_update(*)", ("nll", False): "pplfast::token_nll(*)",
    ("stats", True): "pplfast::stats_update(*)", ("stats", False): "pplfast::token_stats(*)",
    ("compare", True): "pplfast::compare_update(*)",
    ("compare", False): "pplfast::compare_update(*)",
}


def has_new_binding(so: str) -> bool:
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('probe._C', "
            "sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(hasattr(m, 'nll_update'))")
    return subprocess.run([sys.executable, "-c", code, so], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def count(so: str, new: bool, case, rows: int, V: int, calls: int) -> int:
    name, op, dtype, softcap, temperature, top_k = case
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               f"--toggle-collect={ENTRY[(op, new)]}", f"--callgrind-out-file={out}",
               sys.executable, "-c", CHILD, so, op, dtype, str(softcap), str(temperature),
               str(top_k), str(rows), str(V), str(calls)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise RuntimeError(f"{name}: valgrind exited {run.returncode}: {run.stderr[-2000:]}")
        with open(out) as f:
            text = f.read()
    found = re.search(r"^summary:\s+(\d+)", text, re.M) or re.search(r"^totals:\s+(\d+)", text,
                                                                      re.M)
    return int(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", default=None, help="the _C extension to load (default: the one "
                        "pplfast imports)")
    parser.add_argument("--shape", default="256x32000", help="rows x V (default %(default)s)")
    parser.add_argument("--calls", type=int, default=2, help="calls per case (default 2)")
    parser.add_argument("--cases", default=None, help="comma list of case names (default all)")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    args = parser.parse_args(argv)
    so = args.so
    if so is None:
        import importlib.util
        so = importlib.util.find_spec("pplfast._C").origin
    rows, V = (int(x) for x in args.shape.lower().split("x"))
    wanted = None if args.cases is None else {c.strip() for c in args.cases.split(",")}
    new = has_new_binding(so)
    print(f"{so} ({'state' if new else 'earlier'} binding), {rows}x{V}, {args.calls} calls, "
          "one thread")
    print(f"{'case':28} {'instructions':>14} {'per element':>12}")
    record = {"so": os.path.basename(so),  # the file name only: no local paths in a record
              "shape": args.shape, "calls": args.calls, "results": {}}
    for case in CASES:
        if wanted is not None and case[0] not in wanted:
            continue
        total = count(so, new, case, rows, V, args.calls)
        elements = rows * V * args.calls * (2 if case[1] == "compare" else 1)
        record["results"][case[0]] = {"instructions": total, "per_element": total / elements}
        print(f"{case[0]:28} {total:14,d} {total / elements:12.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
