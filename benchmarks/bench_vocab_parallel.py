"""Vocab-parallel token_nll against gathering the logits, on CPU with gloo (issue 20's targets).

Each of ``--ranks`` processes (torch.multiprocessing spawn, gloo, one thread each) holds the
logits ``[N, V/P]`` of its slice of the vocabulary and the same global targets. Timed side by
side, in interleaved rounds after a warm-up (every rank starts each call after a barrier; a
call's time is the slowest rank's; the medians over the rounds are reported):

- ``vocab-parallel``: ``pplfast.token_nll(local, targets, vocab_shard=VocabShard.from_vocab(V))``;
- ``gather-then-score``: ``all_gather`` of the local logits into preallocated buffers, the full
  ``[N, V]`` assembled (``torch.cat(..., out=)``, preallocated) and ``pplfast.token_nll`` on it,
  on every rank (baseline (a));
- ``megatron-style``: Megatron's ``vocab_parallel_cross_entropy`` (the slice upcast to float32,
  its max, target logit and sum of exp each all-reduced: three all-reduces); informative;
- ``single-process half``: ``pplfast.token_nll`` on the local slice alone, no collective
  (targets taken modulo the slice's width), and ``bare all_gather``: the collective a
  vocab-parallel call makes, alone (``all_gather`` of a float32 buffer of the same size as the
  call's partials); their sum is baseline (b).

Bytes: one more call of each implementation with torch.distributed's collectives wrapped; what
is counted is the payload each rank hands to each collective (its input tensor's bytes:
``all_gather*``'s local tensor, ``all_reduce``'s tensor), per call and per row. The wire traffic
of a ring algorithm is ``(P - 1)`` times that for an all-gather and ``2 (P - 1) / P`` times for an
all-reduce (the same at P = 2). The same first call of each gives its peak extra resident memory
on a rank (``VmHWM`` over the call, reset before it; the gather's buffers are first touched there).

Targets: bytes per row per rank for the NLL <= 64; vocab-parallel >= 5x faster than
gather-then-score; vocab-parallel <= 1.3x (single-process half + bare all_gather).

    python benchmarks/bench_vocab_parallel.py                  # 4096x128256 bf16, 2 ranks, 7 rounds
    python benchmarks/bench_vocab_parallel.py --quick --json out.json      # 64x1000, 2 rounds
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("vocab-parallel", "gather-then-score", "megatron-style", "single-process half",
         "bare all_gather")
TARGET_BYTES, TARGET_GATHER, TARGET_FLOOR = 64, 5.0, 1.3
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather",
               "scatter", "reduce", "all_to_all_single", "all_gather_object",
               "broadcast_object_list")


@contextlib.contextmanager
def counting_collectives():
    """Every torch.distributed collective called inside, as ``(name, bytes of this rank's input
    tensor)`` (for ``all_gather*`` the local tensor, the second positional argument)."""
    calls = []
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name in ("all_gather_single", "all_gather_into_tensor", "all_gather"):
                sent = tensors[-1] if tensors else None  # all_gather(list, tensor): the tensor
            else:
                sent = tensors[0] if tensors else None
            calls.append((name, 0 if sent is None else sent.numel() * sent.element_size()))
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def megatron_style_nll(local: torch.Tensor, targets: torch.Tensor, start: int, stop: int,
                       group=None) -> torch.Tensor:
    """Megatron-LM's ``vocab_parallel_cross_entropy`` (forward): the slice upcast to float32, the
    row maximum all-reduced (MAX), the target's logit all-reduced (SUM, 0 on the other ranks),
    the sum of exp all-reduced (SUM)."""
    x = local.float()
    row_max = x.amax(-1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    x.sub_(row_max.unsqueeze(-1))
    outside = (targets < start) | (targets >= stop)
    local_t = (targets - start).masked_fill(outside, 0)
    predicted = x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
    sum_exp = x.exp_().sum(-1)
    dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    return torch.log(sum_exp) - predicted


def _local_logits(n: int, width: int, dtype, seed: int) -> torch.Tensor:
    """This rank's ``[n, width]`` logits (N(0, 9)), made in row blocks (no float32 copy)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, width, dtype=dtype)
    step = max(1, (64 << 20) // max(1, 4 * width))
    for i in range(0, n, step):
        out[i:i + step] = (torch.randn(min(step, n - i), width, generator=gen) * 3).to(dtype)
    return out


def _rank(rank, world, port, opts, out_path):
    import pplfast
    from pplfast import _memprobe, _vocab_merge

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(opts["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    n, v = opts["shape"]
    dtype = DTYPES[opts["dtype"]]
    backend = opts["backend"]
    shard = pplfast.VocabShard.from_vocab(v)
    width = shard.size
    local = _local_logits(n, width, dtype, 1000 + rank)
    targets = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(7))
    half_targets = targets % width
    parts = [torch.empty_like(local) for _ in range(world)]
    full = torch.empty(n, v, dtype=dtype)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    words = len(_vocab_merge.NLL_WORDS)
    partial = torch.zeros(_vocab_merge.HEADER + n * words, dtype=torch.float32)
    gathered = torch.empty(world, partial.numel(), dtype=torch.float32)

    def vocab_parallel():
        return pplfast.token_nll(local, targets, vocab_shard=shard, backend=backend)

    def gather_then_score():
        dist.all_gather(parts, local)
        torch.cat(parts, dim=-1, out=full)
        return pplfast.token_nll(full, targets, backend=backend)

    def megatron():
        return megatron_style_nll(local, targets, shard.start, shard.stop)

    def half():
        return pplfast.token_nll(local, half_targets, backend=backend)

    def bare_gather():
        gather(gathered, partial.view(1, -1))

    calls = {"vocab-parallel": vocab_parallel, "gather-then-score": gather_then_score,
             "megatron-style": megatron, "single-process half": half,
             "bare all_gather": bare_gather}
    if not opts["megatron"]:
        del calls["megatron-style"]

    # bytes, peak memory and agreement: one counted call of each implementation that scores,
    # after a call of the others (the first call of an op loads its code); the gather's buffers
    # are first touched in its counted call: they count as its memory
    for name, call in calls.items():
        if name != "gather-then-score":
            dist.barrier()
            call()
    sent, agree, peak = {}, {}, {}
    results = {}
    for name in ("vocab-parallel", "gather-then-score", "megatron-style"):
        if name not in calls:
            continue
        dist.barrier()
        reset = _memprobe.reset_peak()
        before = _memprobe.status_bytes("VmRSS")
        with counting_collectives() as counted:
            results[name] = calls[name]()
        peak[name] = (_memprobe.status_bytes("VmHWM") - before) if reset else None
        sent[name] = dict(collectives=[c for c, _ in counted], bytes=sum(b for _, b in counted))
    reference = results["gather-then-score"].double()
    for name, got in results.items():
        agree[name] = float((got.double() - reference).abs().max())

    times = {name: [] for name in calls}
    for _ in range(opts["warmup"]):
        for call in calls.values():
            dist.barrier()
            call()
    for _ in range(opts["rounds"]):
        for name, call in calls.items():
            dist.barrier()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    everyone = [None] * world
    dist.all_gather_object(everyone, dict(times=times, sent=sent, agree=agree,
                                             peak=peak))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(ranks=everyone, width=width, partial_bytes=partial.numel() * 4,
                           header_bytes=_vocab_merge.HEADER * 4,
                           backend=__import__("pplfast.api", fromlist=["x"]).resolve_backend(
                               backend, local.device)), f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> dict:
    info = dict(processor=platform.processor() or platform.machine(), cpus=os.cpu_count())
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Core(s) per socket", "Socket(s)"):
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def summarise(raw: dict, opts: dict) -> dict:
    """Per implementation: each round's time (the slowest rank's), min and median; bytes per
    call and per row; the ratios and the targets."""
    world = len(raw["ranks"])
    n = opts["shape"][0]
    names = list(raw["ranks"][0]["times"])
    rounds = {name: [max(r["times"][name][i] for r in raw["ranks"])
                     for i in range(opts["rounds"])] for name in names}
    rows = {}
    for name in names:
        ts = rounds[name]
        row = dict(median_ms=statistics.median(ts) * 1e3, min_ms=min(ts) * 1e3,
                   rounds_ms=[t * 1e3 for t in ts])
        sent = raw["ranks"][0]["sent"].get(name)
        if sent is not None:
            row.update(collectives=sent["collectives"], bytes_per_call=sent["bytes"],
                       bytes_per_row=sent["bytes"] / n,
                       max_abs_diff_vs_gather=max(r["agree"][name] for r in raw["ranks"]))
            peaks = [r["peak"][name] for r in raw["ranks"]]
            row["peak_extra_mib"] = (None if None in peaks else max(peaks) / 2**20)
        rows[name] = row
    rows["bare all_gather"].update(bytes_per_call=raw["partial_bytes"],
                                   bytes_per_row=raw["partial_bytes"] / n)
    med = {name: statistics.median(rounds[name]) for name in names}
    floor = [a + b for a, b in zip(rounds["single-process half"], rounds["bare all_gather"])]
    vp = rows["vocab-parallel"]
    header = raw["header_bytes"]
    gather_speedup = med["gather-then-score"] / med["vocab-parallel"]
    floor_ratio = med["vocab-parallel"] / statistics.median(floor)
    ratios = {
        "gather-then-score / vocab-parallel": gather_speedup,
        "vocab-parallel / (single-process half + bare all_gather)": floor_ratio,
        "per-round gather-then-score / vocab-parallel": [
            g / p for g, p in zip(rounds["gather-then-score"], rounds["vocab-parallel"])],
        "per-round vocab-parallel / (single-process half + bare all_gather)": [
            p / f for p, f in zip(rounds["vocab-parallel"], floor)],
        "single-process half + bare all_gather median_ms": statistics.median(floor) * 1e3,
    }
    if "megatron-style" in med:
        ratios["megatron-style / vocab-parallel"] = med["megatron-style"] / med["vocab-parallel"]
    bytes_vp = vp["bytes_per_row"]
    targets = {
        "nll bytes per row per rank <= 64": dict(value=bytes_vp, met=bytes_vp <= TARGET_BYTES),
        "gather-then-score / vocab-parallel >= 5": dict(value=gather_speedup,
                                                        met=gather_speedup >= TARGET_GATHER),
        "vocab-parallel / (half + all_gather) <= 1.3": dict(value=floor_ratio,
                                                             met=floor_ratio <= TARGET_FLOOR),
    }
    bytes_table = {
        "vocab-parallel": dict(measured=bytes_vp, without_header=(vp["bytes_per_call"] - header *
                                                                  len(vp["collectives"])) / n,
                               header_bytes_per_call=header),
        "megatron-style": dict(expected=12, measured=rows.get("megatron-style", {}).get(
            "bytes_per_row")),
        "gather-then-score": dict(expected=raw["width"] * DTYPES[opts["dtype"]].itemsize,
                                  measured=rows["gather-then-score"]["bytes_per_row"]),
    }
    return dict(world=world, slice_width=raw["width"], backend=raw["backend"], rows=rows,
                ratios=ratios, bytes_per_row=bytes_table, targets=targets)


def run(opts: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(opts["threads"])  # the ranks' OpenMP, read at start
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        torch.multiprocessing.spawn(_rank, args=(opts["ranks"], _free_port(), opts, out),
                                    nprocs=opts["ranks"])
        with open(out) as f:
            raw = json.load(f)
    return summarise(raw, opts)


def _shape(text: str):
    try:
        n, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be NxV (e.g. 4096x128256), got {text!r}")
    if n < 1 or v < 1:
        raise argparse.ArgumentTypeError(f"--shape must have N, V >= 1, got {text!r}")
    return n, v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=_shape, default=None,
                        help="NxV of the whole logits (default 4096x128256; --quick: 64x1000)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 7; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / OpenMP threads per rank (default 1)")
    parser.add_argument("--backend", default="auto", help="pplfast backend (default auto)")
    parser.add_argument("--no-megatron", dest="megatron", action="store_false",
                        help="leave out the Megatron-style baseline")
    parser.add_argument("--quick", action="store_true", help="a small shape and 2 rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the record as JSON")
    args = parser.parse_args(argv)
    shape = args.shape or ((64, 1000) if args.quick else (4096, 128256))
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    if rounds < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"--rounds must be >= 1, --warmup >= 0 and --threads >= 1 (got "
                     f"{rounds}, {args.warmup}, {args.threads})")
    if args.ranks < 2 or shape[1] % args.ranks:
        parser.error(f"--ranks must be >= 2 and divide V (got --ranks {args.ranks}, "
                     f"V = {shape[1]})")
    opts = dict(shape=list(shape), dtype=args.dtype, rounds=rounds, warmup=args.warmup,
                ranks=args.ranks, threads=args.threads, backend=args.backend,
                megatron=args.megatron)
    import pplfast

    started = time.time()
    summary = run(opts)
    record = dict(command=" ".join(["python", "benchmarks/bench_vocab_parallel.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
                  machine=_machine(), torch=torch.__version__, pplfast=pplfast.__version__,
                  python=platform.python_version(), settings=opts,
                  wall_s=round(time.time() - started, 1), **summary)
    n, v = shape
    print(f"{n}x{v} {args.dtype} over {args.ranks} gloo ranks ({v // args.ranks} each), "
          f"{args.threads} thread(s) per rank, backend {summary['backend']}, {rounds} rounds")
    print(f"{'implementation':22} {'median ms':>10} {'min ms':>9} {'bytes/row/rank':>15} "
          f"{'peak extra MiB':>15}")
    for name, row in summary["rows"].items():
        b, m = row.get("bytes_per_row"), row.get("peak_extra_mib")
        print(f"{name:22} {row['median_ms']:10.1f} {row['min_ms']:9.1f} "
              f"{'' if b is None else f'{b:.3f}':>15} {'' if m is None else f'{m:.1f}':>15}")
    for name, value in summary["ratios"].items():
        if not isinstance(value, list) and not name.endswith("_ms"):
            print(f"{name}: {value:.2f}x")
    for name, t in summary["targets"].items():
        print(f"target {name}: {t['value']:.3f} -> {'met' if t['met'] else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
