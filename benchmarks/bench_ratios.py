"""The cost of the statistics and of the comparison relative to token_nll, on one machine.

The targets of ``token_stats`` and ``compare`` are ratios to ``token_nll`` on the same logits
(at most 1.5x for ``token_stats``, 2x with ``top_k=5``, 2.5x for ``compare`` of two tensors).
``pplfast bench`` times each implementation in its own block of repetitions, which a shared
machine's neighbours can slow down one block at a time. Here the calls are interleaved: each
round calls every implementation once, in turn, so a slow period hits all of them alike, and
the minimum and the median over the rounds are reported, with the ratios of both.

    python benchmarks/bench_ratios.py                      # 4096x128256, fp32 and bf16, CPU
    python benchmarks/bench_ratios.py --shape 2048x50257 --dtypes bf16 --rounds 9 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import pplfast

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape, dtype, device, rounds, backend):
    n, v = shape
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(n, v, generator=gen) * 3).to(dtype).to(device)
    test = (base.float() + 0.1 * torch.randn(n, v, generator=gen).to(device)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    calls = {
        "token_nll": lambda: pplfast.token_nll(base, targets, backend=backend),
        "token_stats": lambda: pplfast.token_stats(base, targets, backend=backend),
        "token_stats top_k=5": lambda: pplfast.token_stats(base, targets, top_k=5,
                                                           backend=backend),
        "compare": lambda: pplfast.compare(base, test, targets, backend=backend),
    }
    times = {name: [] for name in calls}
    for name, call in calls.items():  # warm-up
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        rows.append(dict(implementation=name, min_ms=min(ts) * 1e3,
                         median_ms=statistics.median(ts) * 1e3,
                         min_ratio=min(ts) / min(times["token_nll"]),
                         median_ratio=statistics.median(ts) / statistics.median(times["token_nll"]),
                         times_ms=[t * 1e3 for t in ts]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x128256", help="NxV (default %(default)s)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", metavar="FILE", help="also write the record as JSON")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    device = torch.device(args.device)
    record = dict(command=" ".join(["python", "benchmarks/bench_ratios.py", *sys.argv[1:]]),
                  machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  torch=torch.__version__, pplfast=pplfast.__version__, device=str(device),
                  shape=args.shape, rounds=args.rounds, results={})
    print(f"{args.shape} on {device}, {args.rounds} interleaved rounds; ratios to token_nll")
    print(f"{'dtype':5}  {'implementation':20} {'min ms':>9} {'median ms':>10} "
          f"{'min ratio':>10} {'median ratio':>13}")
    for name in args.dtypes.split(","):
        rows = measure(shape, DTYPES[name], device, args.rounds, args.backend)
        record["results"][name] = rows
        for r in rows:
            print(f"{name:5}  {r['implementation']:20} {r['min_ms']:9.1f} {r['median_ms']:10.1f} "
                  f"{r['min_ratio']:9.2f}x {r['median_ratio']:12.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
