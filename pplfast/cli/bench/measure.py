"""Measurement: the timer (the same for every implementation), read bandwidth, peak memory.

Timing: CPU, ``time.perf_counter`` around each call; GPU, CUDA events around each call with a
device synchronisation after every call, for every implementation alike, so that an
implementation's own host synchronisations (pplfast checks its targets' range once per call)
neither hide behind nor spill into the next call's work. Median of the reps, after warm-up calls.
:func:`time_interleaved` times several calls in turn, one call each per round, the same way.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from ..._memprobe import reset_peak, status_bytes
from .cases import make_inputs
from .options import AUTO_REPS, MiB
from .peers import _one_line, implementations


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
            # the same for every implementation: one call at a time, whatever syncs it makes
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


def time_interleaved(fns: List[Callable[[], object]], device: torch.device, warmup: int,
                     reps: Optional[int]) -> List[List[float]]:
    """Times in ms of ``reps`` rounds, each calling every function of ``fns`` once in turn (after
    ``warmup`` untimed rounds, at least one when reps is auto): per function, its list of times.
    A slow period of a shared machine then lands on every function alike, not on one's block."""
    def timed(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    first = None
    for _ in range(max(warmup, 1 if reps is None else 0)):
        first = [timed(fn) for fn in fns]
    if reps is None:
        reps = _auto_reps(device.type, sum(first) / 1e3)
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(reps):
        for k, fn in enumerate(fns):
            times[k].append(timed(fn))
    return times


def bandwidth_probe(device: torch.device, nbytes: int) -> Callable[[], object]:
    """The call :func:`read_bandwidth` times, for timing it among others: it reads (CPU) or
    copies (GPU) its ``nbytes`` buffer."""
    numel = max(1, nbytes // 4)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    if device.type == "cuda":
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    return lambda: src.sum()


def bandwidth_gbps(device: torch.device, nbytes: int, ms: float) -> float:
    """GB/s of the probe over ``nbytes`` in ``ms`` (a GPU copy counts bytes read + written)."""
    numel = max(1, nbytes // 4)
    return (2 if device.type == "cuda" else 1) * numel * 4 / (ms * 1e-3) / 1e9


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
        [sys.executable, "-c", "import sys, pplfast.cli.bench.measure as m; sys.exit(m._memory_worker())"],
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


