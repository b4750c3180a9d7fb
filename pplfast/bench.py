"""``pplfast bench``: time pplfast against its peers on this machine and print one table.

Method (DESIGN.md, "Performance"): every figure is measured side by side in one run and reported
as a ratio to a baseline from the same run, with the machine, versions, command and timestamp.

- Logits path: ``pplfast.token_nll`` vs ``F.cross_entropy(reduction="none")`` and
  ``-F.log_softmax(logits, -1).gather(-1, targets[:, None])`` (and Liger's cross entropy on GPU,
  when installed). Effective GB/s = bytes of logits / time; the fraction is taken of the
  machine's read bandwidth measured in the same run (CPU: ``torch.sum`` over a large float32
  buffer; GPU: a device-to-device copy, counting bytes read + written).
- Hidden-states path (``--path linear``): ``pplfast.linear_token_nll`` vs ``F.linear`` +
  ``F.cross_entropy``, ``F.linear_cross_entropy`` with chunking options (PyTorch >= 2.13) and, on
  GPU, Cut Cross-Entropy and Liger's fused linear cross entropy (forward only). TFLOP/s =
  2*N*D*V / time, next to the rate of a plain ``hidden @ weight.T`` of the same shape.
- Statistics path (``--path stats``): ``pplfast.token_stats`` with ``top_k`` 0 and 5, next to
  ``pplfast.token_nll``, vs the PyTorch expression a user writes today: ``log_softmax`` in
  float32, then entropy ``-(p * logp).sum(-1)``, ``max``/``argmax``, the target's rank
  ``(logp > logp[target]).sum(-1)`` and (for the top-k row) ``topk(5)``. Columns as the logits
  path; the speed-up is taken over ``token_stats(top_k=0)``.
- Timing: CPU, ``time.perf_counter`` around each call; GPU, CUDA events. Median of the reps,
  after warm-up calls.
- Peak extra memory: GPU, ``torch.cuda.max_memory_allocated`` minus the allocation before the
  call (peak stats reset first). CPU, the growth of the resident set's high-water mark
  (``VmHWM`` in ``/proc/self/status``) over one call, in a separate process: the mark is reset
  to the current resident size through ``/proc/self/clear_refs`` before each call, and glibc is
  told to return freed blocks to the system at once, so that no call reuses memory another freed.
  Where the mark cannot be reset, each call gets a fresh process of its own.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._dispatch import BACKENDS
from ._memprobe import reset_peak, status_bytes

SCHEMA = "pplfast-bench/1"

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PATHS = ("logits", "linear", "all", "stats")
DEVICES = ("cpu", "cuda")

DEFAULT_LOGITS_SHAPES = ((4096, 32000), (4096, 50257), (4096, 128256))
DEFAULT_LOGITS_DTYPES = ("fp32", "bf16")
DEFAULT_LINEAR_SHAPES = {"cpu": ((4096, 1024, 128256),), "cuda": ((8192, 4096, 131072),)}
DEFAULT_LINEAR_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# auto reps: enough calls to fill this many seconds, within [min, max]
AUTO_REPS = {"cpu": (0.5, 3, 25), "cuda": (0.2, 10, 100)}
DEFAULT_BW_MIB = {"cpu": 1024, "cuda": 2048}

MiB = 1 << 20


class BenchError(ValueError):
    """A bad option: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Columns: ms = median time of one call; GB/s = logits bytes / time; %read-BW = that over\n"
        "the read bandwidth measured in the same run; TFLOP/s = 2*N*D*V / time; %matmul = the\n"
        "rate of a plain hidden @ weight.T of the same shape over this row's time; pplfast\n"
        "speed-up = this row's time / pplfast's time; peak extra MiB = memory the call adds at\n"
        "its peak (inputs excluded, output included).\n"
        "Defaults finish in about a minute on a 2-core CPU (logits path). The hidden path on CPU\n"
        "runs for many minutes (about a TFLOP per call at the default shape): pass smaller\n"
        "--shapes, or --reps 1 --warmup 0, for a quick look."
    )
    parser.add_argument(
        "--path", default="logits", metavar="{logits,linear,all,stats}",
        help="logits: token_nll on materialised logits (default); linear: linear_token_nll on "
        "hidden states and the output layer; all: both; stats: token_stats (top_k 0 and 5) "
        "against the PyTorch log_softmax expression, on NxV shapes",
    )
    parser.add_argument(
        "--shapes", default=None, metavar="NxV,...",
        help="comma-separated shapes: NxV (rows x vocabulary) for the logits path, NxDxV "
        "(rows x hidden width x vocabulary) for the linear path; with --path all each shape "
        "goes to the path its form names. Defaults: 4096x32000,4096x50257,4096x128256; linear "
        "4096x1024x128256 on CPU, 8192x4096x131072 on GPU",
    )
    parser.add_argument(
        "--dtypes", default=None, metavar="fp32,bf16",
        help="comma-separated input dtypes among fp32, bf16, fp16. Defaults: fp32,bf16 for "
        "logits; fp32 (CPU) or bf16 (GPU) for linear",
    )
    parser.add_argument(
        "--backend", default="auto", metavar="{auto,cpu,triton,cuda,reference}",
        help="pplfast backend to time (default auto); the baselines are unaffected",
    )
    parser.add_argument(
        "--device", default=None, metavar="{cpu,cuda}",
        help="where the tensors live (default: cuda when a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--reps", default=None, type=int, metavar="N",
        help="timed calls per implementation and case; the median is reported (default: "
        "enough to fill 0.5 s on CPU / 0.2 s on GPU, at least 3 / 10)",
    )
    parser.add_argument(
        "--warmup", default=None, type=int, metavar="N",
        help="untimed calls before timing (default 1 on CPU, 3 on GPU)",
    )
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="FILE",
        help="also write the results as JSON to FILE; '-' (or no FILE) writes JSON to stdout "
        "and the table to stderr",
    )
    parser.add_argument(
        "--no-memory", action="store_true",
        help="skip the peak-memory probes (on CPU they run in a separate process)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar / progress lines on stderr",
    )
    parser.add_argument(
        "--bandwidth-mib", default=None, type=int, metavar="MIB",
        help="size of the buffer read to measure bandwidth (default 1024 on CPU, 2048 on GPU)",
    )


def parse_shapes(text: str) -> List[Tuple[int, ...]]:
    """``"4096x32000,8x16x100"`` -> ``[(4096, 32000), (8, 16, 100)]``; BenchError when malformed."""
    shapes = []
    for item in text.split(","):
        item = item.strip()
        parts = item.lower().replace("×", "x").split("x")
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            dims = ()
        if len(dims) not in (2, 3) or any(d <= 0 for d in dims):
            raise BenchError(
                f"bad shape {item!r} in --shapes: expected NxV (e.g. 4096x32000) or NxDxV "
                "(e.g. 4096x1024x128256) with positive integers"
            )
        shapes.append(dims)
    return shapes


def parse_dtypes(text: str) -> List[str]:
    names = []
    for item in text.split(","):
        key = item.strip().lower()
        if key not in DTYPES:
            raise BenchError(f"unknown dtype {item.strip()!r} in --dtypes: choose from fp32, bf16, fp16")
        name = DTYPE_NAMES[DTYPES[key]]
        if name not in names:
            names.append(name)
    return names


@dataclass
class Plan:
    device: torch.device
    backend: str
    cases: List[Tuple[str, Tuple[int, ...], str]]  # (path, shape, dtype)
    warmup: int
    reps: Optional[int]
    memory: bool
    bandwidth_bytes: int
    command: str


def make_plan(args) -> Plan:
    if args.path not in PATHS:
        raise BenchError(f"unknown --path {args.path!r}: choose from {', '.join(PATHS)}")
    if args.backend not in BACKENDS:
        raise BenchError(f"unknown --backend {args.backend!r}: choose from {', '.join(BACKENDS)}")
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name not in DEVICES:
        raise BenchError(f"unknown --device {device_name!r}: choose from cpu, cuda")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is visible to torch here")
    for flag, value, low in (("--reps", args.reps, 1), ("--warmup", args.warmup, 0),
                             ("--bandwidth-mib", args.bandwidth_mib, 1)):
        if value is not None and value < low:
            raise BenchError(f"{flag} must be >= {low}, got {value}")
    kind = device_name
    paths = ("logits", "linear") if args.path == "all" else (args.path,)
    shapes = parse_shapes(args.shapes) if args.shapes is not None else None
    if shapes is not None:
        if args.path in ("logits", "stats") and any(len(s) != 2 for s in shapes):
            raise BenchError(f"--path {args.path} takes NxV shapes; NxDxV shapes need --path "
                             "linear or all")
        if args.path == "linear" and any(len(s) != 3 for s in shapes):
            raise BenchError("--path linear takes NxDxV shapes (rows x hidden width x vocabulary)")
    dtypes = parse_dtypes(args.dtypes) if args.dtypes is not None else None
    cases = []
    for path in paths:
        logits_like = path in ("logits", "stats")
        rank = 2 if logits_like else 3
        if shapes is None:
            path_shapes = DEFAULT_LOGITS_SHAPES if logits_like else DEFAULT_LINEAR_SHAPES[kind]
        else:
            path_shapes = [s for s in shapes if len(s) == rank]
        if dtypes is None:
            path_dtypes = DEFAULT_LOGITS_DTYPES if logits_like else DEFAULT_LINEAR_DTYPES[kind]
        else:
            path_dtypes = dtypes
        for shape in path_shapes:
            for dtype in path_dtypes:
                cases.append((path, tuple(shape), dtype))
    if not cases:
        raise BenchError("nothing to run: no shape matches the chosen --path")
    warmup = DEFAULT_WARMUP[kind] if args.warmup is None else args.warmup
    bw_mib = DEFAULT_BW_MIB[kind] if args.bandwidth_mib is None else args.bandwidth_mib
    shapes_text = ",".join(sorted({"x".join(map(str, s)) for _, s, _ in cases},
                                  key=lambda t: [int(v) for v in t.split("x")]))
    dtypes_text = ",".join(dict.fromkeys(d for _, _, d in cases))
    words = ["pplfast", "bench", "--path", args.path, "--shapes", shapes_text, "--dtypes",
             dtypes_text, "--backend", args.backend, "--device", device_name]
    if args.reps is not None:
        words += ["--reps", str(args.reps)]
    if args.warmup is not None:
        words += ["--warmup", str(args.warmup)]
    if args.no_memory:
        words.append("--no-memory")
    if args.bandwidth_mib is not None:
        words += ["--bandwidth-mib", str(args.bandwidth_mib)]
    return Plan(torch.device(device_name), args.backend, cases, warmup, args.reps,
                not args.no_memory, bw_mib * MiB, shlex.join(words))


# ----------------------------------------------------------------------------- inputs


def _random(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator,
            scale: float = 1.0) -> torch.Tensor:
    """Standard-normal-like values, cheap to make for multi-GiB tensors on CPU.

    ``torch.randn`` runs near 40 M values/s on one CPU core (12 s for 4096 x 128256), so large
    CPU tensors tile a block of 64 random rows and shift each row by its own random offset: every
    row differs, and the kernels timed here do the same work whatever the values.
    """
    rows, width = int(math.prod(shape[:-1])), shape[-1]
    if device.type == "cuda" or rows * width <= (4 << 20) or rows <= 64:
        out = torch.randn(rows, width, generator=generator) if device.type == "cpu" else \
            torch.randn(rows, width, device=device)
        return (out * scale).to(dtype).reshape(shape)
    block = torch.randn(64, width, generator=generator).mul_(scale).to(dtype)
    reps = -(-rows // 64)
    out = block.repeat(reps, 1)[:rows]
    shift = torch.randn(rows, 1, generator=generator).mul_(0.5 * scale).to(dtype)
    out.add_(shift)
    return out.reshape(shape)


def make_inputs(path: str, shape: Sequence[int], dtype: str, device: torch.device, seed: int = 0):
    """Inputs of one case: ``(logits, targets)`` or ``(hidden, weight, targets)``."""
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    if path in ("logits", "stats"):
        N, V = shape
        targets = torch.randint(0, V, (N,), generator=gen).to(device)
        return _random((N, V), torch_dtype, device, gen, scale=2.0), targets
    N, D, V = shape
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    hidden = _random((N, D), torch_dtype, device, gen)
    weight = _random((V, D), torch_dtype, device, gen, scale=2.0 / math.sqrt(D))
    return hidden, weight, targets


def logits_bytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of the ``(N, V)`` logits of a case (built by the unfused peers on the hidden path)."""
    N, V = shape[0], shape[-1]
    return N * V * DTYPES[dtype].itemsize


def linear_flops(shape: Sequence[int]) -> int:
    N, D, V = shape
    return 2 * N * D * V


# ----------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str  # stable key (JSON, memory worker)
    label: str  # table text
    role: str  # "pplfast", "baseline" or "floor"
    fn: Callable[..., torch.Tensor]
    clobbers_input: bool = False  # writes into its first input: gets its own copy


def _first(out):
    """Some peers return (loss, extra) or an output object; keep the loss tensor."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "loss", out)


def implementations(path: str, device: torch.device, backend: str):
    """``(impls, skipped)``: the implementations timed for ``path`` here, and why others are not."""
    import pplfast

    impls: List[Impl] = []
    skipped: List[Tuple[str, str]] = []
    try:
        from pplfast import _dispatch

        op = {"logits": "token_nll", "stats": "token_stats"}.get(path, "linear_token_nll")
        resolved = _dispatch.resolve(backend, device, op)
    except Exception:  # the preflight call reports the real error
        resolved = backend
    label = f"pplfast[{resolved}]"
    if path == "stats":
        return _stats_implementations(label, backend), skipped
    if path == "logits":
        impls.append(Impl("pplfast", label, "pplfast",
                          lambda x, t: pplfast.token_nll(x, t, backend=backend)))
        impls.append(Impl("cross_entropy", "F.cross_entropy", "baseline",
                          lambda x, t: F.cross_entropy(x, t, reduction="none")))
        impls.append(Impl("log_softmax_gather", "log_softmax+gather", "baseline",
                          lambda x, t: F.log_softmax(x, dim=-1).gather(-1, t[:, None]).squeeze(-1).neg()))
        if device.type == "cuda":
            try:
                from liger_kernel.transformers.functional import liger_cross_entropy
            except Exception as exc:  # optional peer
                skipped.append(("liger_cross_entropy", f"liger-kernel not importable ({_one_line(exc)})"))
            else:
                # Liger's forward may write the gradient into the logits it is given
                impls.append(Impl("liger_cross_entropy", "Liger cross_entropy", "baseline",
                                  lambda x, t: _first(liger_cross_entropy(x, t, reduction="none")),
                                  clobbers_input=True))
        else:
            skipped.append(("liger_cross_entropy", "GPU only"))
        return impls, skipped

    impls.append(Impl("pplfast", label, "pplfast",
                      lambda h, w, t: pplfast.linear_token_nll(h, w, t, backend=backend)))
    impls.append(Impl("linear_cross_entropy_unfused", "F.linear+F.cross_entropy", "baseline",
                      lambda h, w, t: F.cross_entropy(F.linear(h, w), t, reduction="none")))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls.append(Impl("torch_linear_cross_entropy", "F.linear_cross_entropy[chunked]", "baseline",
                          lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction="none", options=options)))
    else:
        skipped.append(("torch_linear_cross_entropy",
                        f"torch {torch.__version__} has no F.linear_cross_entropy (needs >= 2.13)"))
    if device.type == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
        except Exception as exc:
            skipped.append(("cut_cross_entropy", f"cut-cross-entropy not importable ({_one_line(exc)})"))
        else:
            impls.append(Impl("cut_cross_entropy", "Cut Cross-Entropy", "baseline",
                              lambda h, w, t: _first(cce_linear_cross_entropy(h, w, t, impl="cce", reduction="none"))))
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except Exception as exc:
            skipped.append(("liger_fused_linear_cross_entropy", f"liger-kernel not importable ({_one_line(exc)})"))
        else:
            impls.append(Impl("liger_fused_linear_cross_entropy", "Liger fused linear CE", "baseline",
                              lambda h, w, t: _first(liger_fused_linear_cross_entropy(h, w, t, reduction="none"))))
    else:
        skipped.append(("cut_cross_entropy", "GPU only"))
        skipped.append(("liger_fused_linear_cross_entropy", "GPU only"))
    impls.append(Impl("matmul", "matmul hidden@weight.T", "floor", lambda h, w, t: h @ w.T))
    return impls, skipped


def _torch_stats(x, t, top_k=0):
    """The statistics as a user computes them today: the whole (N, V) log-softmax in float32."""
    logp = F.log_softmax(x.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    max_logprob, argmax = logp.max(-1)
    rank = (logp > logp.gather(-1, t[:, None])).sum(-1)
    top = logp.topk(top_k, dim=-1) if top_k else None
    return entropy, max_logprob, argmax, rank, top


def _stats_implementations(label: str, backend: str) -> List[Impl]:
    import pplfast

    return [
        Impl("pplfast_stats", f"{label} token_stats", "pplfast",
             lambda x, t: pplfast.token_stats(x, t, backend=backend).entropy),
        Impl("pplfast_stats_top5", f"{label} token_stats top_k=5", "pplfast",
             lambda x, t: pplfast.token_stats(x, t, top_k=5, backend=backend).entropy),
        Impl("pplfast_token_nll", f"{label} token_nll", "baseline",
             lambda x, t: pplfast.token_nll(x, t, backend=backend)),
        Impl("torch_stats", "log_softmax+stats", "baseline", lambda x, t: _torch_stats(x, t)[0]),
        Impl("torch_stats_top5", "log_softmax+stats+topk(5)", "baseline",
             lambda x, t: _torch_stats(x, t, 5)[0]),
    ]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- timing


def _auto_reps(kind: str, first_s: float) -> int:
    budget, low, high = AUTO_REPS[kind]
    return int(min(high, max(low, math.ceil(budget / max(first_s, 1e-9)))))


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, reps: Optional[int]) -> List[float]:
    """Times of ``reps`` calls in ms, after ``warmup`` untimed calls (at least one when reps is auto)."""
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        if reps is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            reps = _auto_reps("cuda", start.elapsed_time(end) / 1e3)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    first = None
    for _ in range(max(warmup, 1 if reps is None else 0)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    if reps is None:
        reps = _auto_reps("cpu", first)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def read_bandwidth(device: torch.device, nbytes: int) -> Dict[str, object]:
    """Read bandwidth of this device in GB/s (1e9 bytes/s), with the method used."""
    numel = max(1, nbytes // 4)
    if device.type == "cuda":
        src = torch.ones(numel, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        ms = time_call(lambda: dst.copy_(src), device, warmup=2, reps=10)
        med = statistics.median(ms)
        gbps = 2 * numel * 4 / (med * 1e-3) / 1e9
        method = (f"device-to-device copy of a {numel * 4 / MiB:.0f} MiB float32 buffer, median of "
                  f"{len(ms)}, bytes read + written")
    else:
        buf = torch.ones(numel, dtype=torch.float32)
        ms = time_call(lambda: buf.sum(), device, warmup=1, reps=5)
        med = statistics.median(ms)
        gbps = numel * 4 / (med * 1e-3) / 1e9
        method = f"torch.sum over a {numel * 4 / MiB:.0f} MiB float32 buffer, median of {len(ms)}"
    return {"gbps": gbps, "ms": med, "bytes": numel * 4, "method": method}


# ----------------------------------------------------------------------------- memory


def cuda_peak_extra(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes the call adds to the CUDA allocator's peak over what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    # glibc keeps freed blocks below a (dynamic, up to 32 MiB) threshold for reuse; a call that
    # reused another's freed memory would not raise the high-water mark. Map every block of
    # 64 KiB or more on its own and trim the heap at once, so each call's memory is new memory.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    return env


def _run_worker(jobs: List[dict], on_line: Callable[[dict], None]) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, pplfast.bench as b; sys.exit(b._memory_worker())"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_worker_env(),
    )
    proc.stdin.write(json.dumps(jobs))
    proc.stdin.close()
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            on_line(json.loads(line))
    err = proc.stderr.read()
    rc = proc.wait()
    if rc not in (0, 3):
        tail = err.strip().splitlines()
        on_line({"worker_error": tail[-1] if tail else f"memory probe exited with status {rc}"})
    return rc


def cpu_peak_extra(cases: List[dict], on_result: Callable[[int, str, dict], None]) -> None:
    """Peak extra memory of each (case, implementation) in a separate process.

    ``cases``: dicts with ``path``, ``shape``, ``dtype``, ``backend``, ``impls`` (names).
    ``on_result(case_index, impl_name, {"bytes": int | None, "error": str | None, ...})``.
    """
    done = set()
    fresh_needed = []

    def handle(msg, case_index=None):
        if "no_reset" in msg:
            fresh_needed.append(msg["no_reset"])
            return
        if "worker_error" in msg:
            for k, case in enumerate(cases):
                for name in case["impls"]:
                    if (k, name) not in done:
                        done.add((k, name))
                        on_result(k, name, {"bytes": None, "error": msg["worker_error"]})
            return
        k = msg["case"] if case_index is None else case_index
        done.add((k, msg["impl"]))
        on_result(k, msg["impl"], msg)

    jobs = [dict(case, reset=True) for case in cases]
    _run_worker(jobs, handle)
    if not fresh_needed:
        return
    # no resettable high-water mark: one fresh process per call
    for k, case in enumerate(cases):
        for name in case["impls"]:
            job = dict(case, impls=[name], reset=False)
            _run_worker([job], lambda msg, k=k: handle(msg, k))


def _memory_worker() -> int:
    """Subprocess entry: read jobs (JSON) on stdin, print one JSON line per measured call."""
    torch.set_grad_enabled(False)
    jobs = json.load(sys.stdin)
    device = torch.device("cpu")
    if jobs and jobs[0].get("reset", True) and not reset_peak():
        print(json.dumps({"no_reset": "/proc/self/clear_refs is not writable"}), flush=True)
        return 3
    for k, job in enumerate(jobs):
        path, shape, dtype = job["path"], tuple(job["shape"]), job["dtype"]
        impls = {impl.name: impl for impl in implementations(path, device, job["backend"])[0]}
        # one-time costs (thread pools, lazy imports) are not the call's memory
        tiny_shape = (2,) + tuple(shape[1:-1]) + (min(shape[-1], 64),)
        tiny = make_inputs(path, tiny_shape, dtype, device, seed=1)
        for name in job["impls"]:
            try:
                impls[name].fn(*tiny)
            except Exception:
                pass
        inputs = make_inputs(path, shape, dtype, device)
        for name in job["impls"]:
            impl = impls[name]
            args = inputs
            if impl.clobbers_input:
                args = (inputs[0].clone(),) + tuple(inputs[1:])
            gc.collect()
            if job.get("reset", True):
                reset_peak()
            rss0 = status_bytes("VmRSS")
            hwm0 = status_bytes("VmHWM")
            result = {"case": k, "impl": name, "bytes": None, "error": None}
            try:
                out = impl.fn(*args)
                result["bytes"] = max(0, status_bytes("VmHWM") - rss0)
                if hwm0 > rss0 + MiB:
                    result["note"] = "upper bound: the mark was above the resident size before the call"
                del out
            except Exception as exc:
                result["error"] = _one_line(exc)
            del args
            gc.collect()
            result["retained_bytes"] = max(0, status_bytes("VmRSS") - rss0)
            print(json.dumps(result), flush=True)
        del inputs, tiny
        gc.collect()
    return 0


# ----------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, object]:
    import pplfast

    machine = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gib=props.total_memory / (1 << 30),
                       driver=_driver_version(), cuda_runtime=torch.version.cuda)
    versions = {
        "pplfast": pplfast.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
    }
    return {"machine": machine, "versions": versions}


# ----------------------------------------------------------------------------- run


class _Progress:
    """tqdm when installed (optional extra), otherwise one line per case on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="call", leave=False,
                                dynamic_ncols=True)

    def case(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(f"pplfast bench: {text}", file=sys.stderr, flush=True)

    def step(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _preflight(plan: Plan) -> None:
    """Run pplfast once on a tiny input so that an unusable backend fails with its own message."""
    import pplfast

    for path in dict.fromkeys(p for p, _, _ in plan.cases):
        for dtype in dict.fromkeys(d for p, _, d in plan.cases if p == path):
            shape = (4, 64) if path in ("logits", "stats") else (4, 16, 64)
            inputs = make_inputs(path, shape, dtype, plan.device, seed=1)
            try:
                if path == "stats":
                    pplfast.token_stats(*inputs, top_k=5, backend=plan.backend)
                elif path == "logits":
                    pplfast.token_nll(*inputs, backend=plan.backend)
                else:
                    pplfast.linear_token_nll(*inputs, backend=plan.backend)
            except Exception as exc:
                raise BenchError(f"pplfast ({path} path, {dtype}, backend={plan.backend!r}) cannot "
                                 f"run here: {_one_line(exc)}") from exc


def bench(plan: Plan, progress: bool = True) -> Dict[str, object]:
    """Run every case of ``plan``; returns the JSON-ready record."""
    torch.set_grad_enabled(False)
    _preflight(plan)
    started = datetime.datetime.now(datetime.timezone.utc)
    env = environment(plan.device)
    bandwidth = read_bandwidth(plan.device, plan.bandwidth_bytes)
    impl_sets = {path: implementations(path, plan.device, plan.backend) for path in {p for p, _, _ in plan.cases}}
    total = sum(len(impl_sets[p][0]) for p, _, _ in plan.cases)
    bar = _Progress(total * (2 if plan.memory and plan.device.type == "cpu" else 1), progress)
    rows_by_case: List[List[Dict[str, object]]] = []
    try:
        for path, shape, dtype in plan.cases:
            bar.case(f"{path} {'x'.join(map(str, shape))} {dtype}")
            impls = impl_sets[path][0]
            inputs = make_inputs(path, shape, dtype, plan.device)
            case_rows = []
            for impl in impls:
                args = inputs
                if impl.clobbers_input:
                    args = (inputs[0].clone(),) + tuple(inputs[1:])
                row = {"path": path, "shape": list(shape), "dtype": dtype, "impl": impl.name,
                       "label": impl.label, "role": impl.role, "error": None, "ms": None,
                       "ms_all": None, "peak_extra_bytes": None}
                try:
                    times = time_call(lambda: impl.fn(*args), plan.device, plan.warmup, plan.reps)
                    row["ms_all"] = [round(t, 4) for t in times]
                    row["ms"] = statistics.median(times)
                    if plan.memory and plan.device.type == "cuda":
                        row["peak_extra_bytes"] = cuda_peak_extra(lambda: impl.fn(*args), plan.device)
                except Exception as exc:
                    row["error"] = _one_line(exc)
                del args
                case_rows.append(row)
                bar.step()
            del inputs
            gc.collect()
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            _derive(case_rows, path, shape, dtype, bandwidth["gbps"])
            rows_by_case.append(case_rows)
        memory_method = None
        if plan.memory and plan.device.type == "cpu":
            bar.case("peak memory (separate process)")
            index = {}  # (case number, impl name) -> its row
            cases = []
            for (path, shape, dtype), case_rows in zip(plan.cases, rows_by_case):
                timed = [r for r in case_rows if r["error"] is None]
                index.update(((len(cases), r["impl"]), r) for r in timed)
                cases.append({"path": path, "shape": list(shape), "dtype": dtype,
                              "backend": plan.backend, "impls": [r["impl"] for r in timed]})

            def on_result(k, name, msg):
                row = index.get((k, name))
                if row is not None:
                    row["peak_extra_bytes"] = msg.get("bytes")
                    if msg.get("error"):
                        row["memory_error"] = msg["error"]
                    if msg.get("note"):
                        row["memory_note"] = msg["note"]
                    if msg.get("retained_bytes", 0) > 64 * MiB:
                        row["memory_note"] = (f"{msg['retained_bytes'] / MiB:.0f} MiB stayed resident "
                                              "after the call; later figures may be low")
                bar.step()

            cpu_peak_extra(cases, on_result)
            memory_method = ("VmHWM growth over one call in a separate process (mark reset through "
                             "/proc/self/clear_refs before each call; glibc returns freed blocks at once)")
        elif plan.memory:
            memory_method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the call"
    finally:
        bar.close()
    skipped = sorted({(name, why) for path in impl_sets for name, why in impl_sets[path][1]})
    return {
        "schema": SCHEMA,
        "timestamp": started.isoformat(timespec="seconds"),
        "command": plan.command,
        **env,
        "settings": {"backend": plan.backend, "warmup": plan.warmup,
                     "reps": plan.reps if plan.reps is not None else "auto",
                     "memory": plan.memory, "memory_method": memory_method,
                     "timer": "CUDA events" if plan.device.type == "cuda" else "time.perf_counter"},
        "bandwidth": bandwidth,
        "skipped": [{"impl": n, "reason": why} for n, why in skipped],
        "results": [row for case_rows in rows_by_case for row in case_rows],
    }


def _derive(case_rows: List[dict], path: str, shape, dtype: str, read_gbps: float) -> None:
    """Ratios within one case: throughput, fraction of the floor, pplfast speed-up."""
    ref = next((r for r in case_rows if r["role"] == "pplfast" and r["ms"]), None)
    floor = next((r for r in case_rows if r["role"] == "floor" and r["ms"]), None)
    nbytes = logits_bytes(shape, dtype)
    for r in case_rows:
        r["logits_bytes"] = nbytes
        ms = r["ms"]
        if not ms:
            continue
        r["pplfast_speedup"] = ms / ref["ms"] if ref else None
        if path in ("logits", "stats"):
            r["gbps"] = nbytes / (ms * 1e-3) / 1e9
            r["read_bw_fraction"] = r["gbps"] / read_gbps
            r["floor_ms"] = nbytes / (read_gbps * 1e9) * 1e3
        else:
            r["flops"] = linear_flops(shape)
            r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
            r["matmul_fraction"] = floor["ms"] / ms if floor else None


# ----------------------------------------------------------------------------- output


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render(record: Dict[str, object]) -> str:
    m, v, bw = record["machine"], record["versions"], record["bandwidth"]
    s = record["settings"]
    lines = [
        f"pplfast bench  {record['timestamp']}",
        f"command:   {record['command']}",
        f"machine:   {m['cpu']}, {m['cpu_count']} logical cores ({m['torch_threads']} torch threads), "
        + (f"{m['memory_gib']:.1f} GiB RAM, " if m.get("memory_gib") else "") + f"{m['os']}",
    ]
    if m["device"] == "cuda":
        lines.append(f"gpu:       {m['gpu']} ({m['gpu_memory_gib']:.0f} GiB), driver {m.get('driver') or 'unknown'}, "
                     f"CUDA runtime {m.get('cuda_runtime')}")
    lines.append("versions:  " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    lines.append(f"timing:    {s['timer']}, median of {s['reps']} reps after {s['warmup']} warm-up call(s)")
    what = "copy" if m["device"] == "cuda" else "read"
    lines.append(f"{what} bandwidth: {bw['gbps']:.1f} GB/s ({bw['method']})")
    if s["memory"]:
        lines.append(f"peak memory: {s['memory_method']}")
    for path in ("logits", "linear", "stats"):
        rows = [r for r in record["results"] if r["path"] == path]
        if not rows:
            continue
        lines.append("")
        if path in ("logits", "stats"):
            lines.append("logits path: token_nll(logits (N, V), targets (N,))" if path == "logits"
                         else "statistics path: token_stats(logits (N, V), targets (N,)); "
                         "speed-up over token_stats(top_k=0)")
            head = ["shape NxV", "dtype", "implementation", "ms", "GB/s", "%read-BW",
                    "pplfast speed-up", "peak extra MiB"]
        else:
            lines.append("hidden path: linear_token_nll(hidden (N, D), weight (V, D), targets (N,))")
            head = ["shape NxDxV", "dtype", "implementation", "ms", "TFLOP/s", "%matmul",
                    "pplfast speed-up", "peak extra MiB"]
        table = [head]
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            if r["error"]:
                table.append([shape, r["dtype"], r["label"], "error: " + r["error"], "", "", "", ""])
                continue
            mem = r["peak_extra_bytes"]
            mem_text = _fmt(None if mem is None else mem / MiB, ".1f",
                            "error" if r.get("memory_error") else "-")
            if r.get("memory_note"):
                mem_text += "*"
            if path in ("logits", "stats"):
                rate = [_fmt(r.get("gbps"), ".1f"), _fmt(100 * r["read_bw_fraction"], ".0f") + "%"]
            else:
                frac = r.get("matmul_fraction")
                rate = [_fmt(r.get("tflops"), ".3f" if r["tflops"] < 10 else ".1f"),
                        _fmt(None if frac is None else 100 * frac, ".0f") + ("%" if frac is not None else "")]
            table.append([shape, r["dtype"], r["label"], _fmt(r["ms"], ".2f"), *rate,
                          _fmt(r.get("pplfast_speedup"), ".2f") + ("x" if r.get("pplfast_speedup") else ""),
                          mem_text])
        widths = [max(len(str(row[i])) for row in table if len(row) > i and not str(row[3]).startswith("error"))
                  for i in range(len(head))]
        for i, row in enumerate(table):
            if str(row[3]).startswith("error"):
                lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                                        row[2].ljust(widths[2]), row[3]]))
                continue
            cells = [str(c).ljust(widths[j]) if j < 3 else str(c).rjust(widths[j]) for j, c in enumerate(row)]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
    notes = [r for r in record["results"] if r.get("memory_note") or r.get("memory_error")]
    for r in notes:
        lines.append(f"* {r['label']} {'x'.join(map(str, r['shape']))} {r['dtype']}: "
                     f"{r.get('memory_error') or r.get('memory_note')}")
    if record["skipped"]:
        lines.append("not timed: " + "; ".join(f"{s['impl']} ({s['reason']})" for s in record["skipped"]))
    return "\n".join(lines)


def run(args) -> int:
    json_file = None
    try:
        plan = make_plan(args)
        if args.json not in (None, "-"):
            try:  # opened now: an unwritable path fails before minutes of timing, not after
                json_file = open(args.json, "w")
            except OSError as exc:
                raise BenchError(f"cannot write --json {args.json!r}: {exc.strerror}") from None
        record = bench(plan, progress=not args.no_progress)
    except BenchError as exc:
        if json_file is not None:
            json_file.close()
        print(f"pplfast bench: error: {exc}", file=sys.stderr)
        return 2
    text = render(record)
    if args.json == "-":
        print(text, file=sys.stderr)
        json.dump(record, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text)
        if json_file is not None:
            with json_file:
                json.dump(record, json_file, indent=1)
                json_file.write("\n")
    return 0
