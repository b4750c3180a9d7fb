"""Two builds of the native CPU kernels side by side, in interleaved rounds (before/after records).

Each round calls, in turn: the read-bandwidth probe (``torch.sum`` over a float32 buffer), then
every op of every build on the same logits (``--before``: another build of ``pplfast._C``, e.g. of
an earlier commit, loaded from its file; the current build once per instruction set this CPU
runs, chosen through ``PPLFAST_CPU_ISA`` before each call). Medians over the rounds, G elements/s
(compare: both tensors), GB/s, the fraction of the probe's bandwidth, and each row's ratio to the
same op of the first build. An earlier build may have the earlier binding (``token_nll``,
``token_stats``, no state) of commit f7cb748.

    python benchmarks/bench_cpu_builds.py --before OLD/_C.cpython-311-x86_64-linux-gnu.so
    python benchmarks/bench_cpu_builds.py --shape 4096x128256 --dtypes fp32,bf16,fp16 --rounds 7
    python benchmarks/bench_cpu_builds.py --before OLD/_C.so --build a=A/_C.so --build b=B/_C.so \
        --isas avx2 --ops compare
    python benchmarks/bench_cpu_builds.py --before OLD/_C.so --threads 1 --shape 2048x128256

``--build LABEL=FILE`` (repeatable) replaces the installed build by other ones (candidates of one
change, each loaded from its file), all in the same rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time

import torch

from pplfast import _C

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_LOADS = itertools.count(1)


def load(path):
    """The extension built at ``path`` as a module of its own. Each load takes a new package
    name: under one name, a second build's module would be the first one again (the import
    system keeps extension modules by name), and every build would run the first one's code."""
    spec = importlib.util.spec_from_file_location(f"build{next(_LOADS)}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls_for(C, logits, test, targets, threads, softcap=0.0, temperature=1.0):
    """op name -> a call of that op on these logits through module C's binding (``softcap`` 0:
    none)."""
    cap, T = softcap, temperature
    N, V = logits.shape
    code = CODES[logits.dtype]
    p = lambda t: t.data_ptr()
    out = torch.empty(N)
    outs = [torch.empty(N), torch.empty(N), torch.empty(N), torch.empty(N, dtype=torch.int64),
            torch.empty(N, dtype=torch.int64), torch.empty(N, 0, dtype=torch.int64),
            torch.empty(N, 0)]
    cstate = torch.empty(N, C.COMPARE_STATE, dtype=torch.float64)
    couts = [torch.empty(N) for _ in range(4)] + [torch.empty(N, dtype=torch.int64)] * 2

    def compare():
        C.compare_init(p(cstate), N)
        C.compare_update(p(logits), code, 0, V, 1, p(test), code, 0, V, 1, N, N, V, 0,
                         p(targets), -100, cap, T, p(cstate), threads)
        C.compare_finish(p(cstate), p(targets), -100, N, T, *(p(t) for t in couts))

    if not hasattr(C, "nll_update"):  # the binding before the running-state convention
        return {
            "token_nll": lambda: C.token_nll(p(logits), code, 1, N, V, 0, V, 1, p(targets), -100,
                                             cap, T, p(out), threads),
            "token_stats": lambda: C.token_stats(p(logits), code, 1, N, V, 0, V, 1, p(targets),
                                                 -100, cap, T, 0, *(p(t) for t in outs),
                                                 threads),
            "compare": compare,
        }
    nstate = torch.empty(N, C.NLL_STATE, dtype=torch.float64)
    sstate = torch.empty(N, C.STATS_STATE, dtype=torch.float64)

    def nll():
        C.nll_init(p(nstate), N)
        C.nll_update(p(logits), code, 0, V, 1, N, N, V, 0, p(targets), -100, cap, T,
                     p(nstate), threads)
        C.nll_finish(p(nstate), p(targets), -100, N, T, p(out))

    def stats():
        C.stats_init(p(sstate), N, 0, 0)
        C.stats_update(p(logits), code, 0, V, 1, N, N, V, 0, p(targets), -100, cap, T, 0,
                       p(sstate), threads)
        C.stats_finish(p(sstate), p(targets), -100, N, 0, T, *(p(t) for t in outs))

    return {"token_nll": nll, "token_stats": stats, "compare": compare}


def with_isa(isa, fn):
    """fn, called with PPLFAST_CPU_ISA=isa; isa None: as the environment had it at the start
    (the other builds' calls set it in between)."""
    saved = os.environ.get("PPLFAST_CPU_ISA")

    def call():
        if isa is not None:
            os.environ["PPLFAST_CPU_ISA"] = isa
        elif saved is None:
            os.environ.pop("PPLFAST_CPU_ISA", None)
        else:
            os.environ["PPLFAST_CPU_ISA"] = saved
        fn()
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="another build of pplfast._C (its .so file)")
    parser.add_argument("--build", action="append", default=[], metavar="LABEL=FILE",
                        help="a build to time instead of the installed one (repeatable)")
    parser.add_argument("--isas", default=None,
                        help="instruction sets to run the builds on (default: all this CPU runs)")
    parser.add_argument("--shape", default="4096x128256", help="NxV (default %(default)s)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--ops", default="token_nll,token_stats,compare")
    parser.add_argument("--softcap", type=float, default=0.0, help="0: none (default)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every kernel and of the probe (default: torch's)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    N, V = (int(x) for x in args.shape.lower().split("x"))
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: {args.threads}; give 1 or more")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    ops = args.ops.split(",")
    builds = []
    if args.before:
        builds.append(("before", load(args.before), None))
    isas = ["avx2"] + (["avx512"] if _C.cpu_has_avx512() and _C.built_avx512() else [])
    if args.isas:
        isas = [isa for isa in args.isas.split(",") if isa in isas]
    afters = [("after", _C)]
    if args.build:
        afters = [(label, load(path)) for label, path in
                  (spec.split("=", 1) for spec in args.build)]
    builds += [(f"{label}[{isa}]", C, isa) for label, C in afters for isa in isas]
    probe = torch.ones(args.bandwidth_mib << 18)
    saved = os.environ.get("PPLFAST_CPU_ISA")
    # the command as recorded names each other build by its file name only (no local paths)
    argv = [a if not a.endswith(".so") else
            (a.split("=", 1)[0] + "=" if "=" in a else "") + os.path.basename(a)
            for a in (sys.argv[1:] if argv is None else argv)]
    record = {"command": " ".join(["python", "benchmarks/bench_cpu_builds.py", *argv]),
              "softcap": args.softcap, "temperature": args.temperature,
              "threads": threads, "torch": torch.__version__, "shape": args.shape,
              "rounds": args.rounds, "results": []}
    print(f"{args.shape}, {threads} threads, {args.rounds} interleaved rounds (medians); "
          "ratio: time of the first build's same op / this row's time")
    print(f"{'dtype':5} {'op':12} {'build':15} {'ms':>8} {'G elem/s':>9} {'GB/s':>6} "
          f"{'%read-BW':>8} {'speed-up':>8}")
    gen = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        logits = (torch.randn(N, V, generator=gen) * 2).to(dtype)
        test = (logits.float() + 0.3 * torch.randn(N, V, generator=gen)).to(dtype)
        targets = torch.randint(0, V, (N,), generator=gen)
        entries = [("probe", "", lambda: probe.sum())]
        for build, C, isa in builds:
            calls = calls_for(C, logits, test, targets, threads, args.softcap, args.temperature)
            for op in ops:
                fn = with_isa(isa, calls[op])
                entries.append((op, build, fn))
        times = {k: [] for k in range(len(entries))}
        for fn in (e[2] for e in entries):  # warm-up
            fn()
        for _ in range(args.rounds):
            for k, (_, _, fn) in enumerate(entries):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        read_gbps = probe.numel() * 4 / statistics.median(times[0]) / 1e9
        first = {}
        for k, (op, build, _) in enumerate(entries[1:], start=1):
            ms = statistics.median(times[k]) * 1e3
            elems = N * V * (2 if op == "compare" else 1)
            gbps = elems * logits.element_size() / (ms * 1e-3) / 1e9
            first.setdefault(op, ms)
            row = dict(dtype=name, op=op, build=build, ms=ms, gelems=elems / (ms * 1e-3) / 1e9,
                       gbps=gbps, read_gbps=read_gbps, read_bw_fraction=gbps / read_gbps,
                       speedup=first[op] / ms, ms_all=[t * 1e3 for t in times[k]])
            record["results"].append(row)
            print(f"{name:5} {op:12} {build:15} {ms:8.1f} {row['gelems']:9.2f} {gbps:6.1f} "
                  f"{100 * row['read_bw_fraction']:7.0f}% {row['speedup']:7.2f}x", flush=True)
        print(f"{name:5} read bandwidth (probe, same rounds): {read_gbps:.1f} GB/s", flush=True)
        del logits, test
    if saved is None:
        os.environ.pop("PPLFAST_CPU_ISA", None)
    else:
        os.environ["PPLFAST_CPU_ISA"] = saved
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
