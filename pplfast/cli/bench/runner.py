"""One run of the plan: every case, timed and probed, into a JSON-ready record."""
from __future__ import annotations

import datetime
import functools
import gc
import statistics
import sys
from typing import Callable, Dict, List, Optional

import torch

from ... import api, comparison, stats

from .cases import linear_flops, logits_bytes, logits_elements, make_inputs
from .environment import environment
from .measure import (bandwidth_gbps, bandwidth_probe, cpu_peak_extra, cuda_peak_extra,
                      read_bandwidth, time_call, time_interleaved)
from .options import SCHEMA, BenchError, MiB, Plan
from .peers import _one_line, implementations

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
    for path in dict.fromkeys(p for p, _, _ in plan.cases):
        for dtype in dict.fromkeys(d for p, _, d in plan.cases if p == path):
            shape = (4, 16, 64) if path == "linear" else (4, 64)
            inputs = make_inputs(path, shape, dtype, plan.device, seed=1)
            try:
                if path == "stats":
                    stats.token_stats(*inputs, top_k=5, backend=plan.backend)
                elif path == "logits":
                    api.token_nll(*inputs, backend=plan.backend)
                elif path == "compare":
                    comparison.compare(*inputs, backend=plan.backend)
                else:
                    api.linear_token_nll(*inputs, backend=plan.backend)
            except Exception as exc:
                raise BenchError(f"pplfast ({path} path, {dtype}, backend={plan.backend!r}) cannot "
                                 f"run here: {_one_line(exc)}") from exc


@torch.no_grad()  # scoped: a caller's (or a test session's) grad mode is left as it was
def bench(plan: Plan, progress: bool = True,
          on_case: Optional[Callable[[Dict[str, object]], None]] = None) -> Dict[str, object]:
    """Run every case of ``plan``; returns the JSON-ready record (``"complete": True``).

    ``on_case`` gets the record so far (``"complete": False``) after each case, so that a run
    cut off by a time limit can keep the cases that finished.
    """
    _preflight(plan)
    started = datetime.datetime.now(datetime.timezone.utc)
    env = environment(plan.device)
    bandwidth = read_bandwidth(plan.device, plan.bandwidth_bytes)
    impl_sets = {path: implementations(path, plan.device, plan.backend) for path in {p for p, _, _ in plan.cases}}
    memory_method = None
    if plan.memory and plan.device.type == "cuda":
        memory_method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
                         "memory_allocated before the call")

    def record(complete: bool) -> Dict[str, object]:
        skipped = sorted({(name, why) for path in impl_sets for name, why in impl_sets[path][1]})
        return {
            "schema": SCHEMA,
            "timestamp": started.isoformat(timespec="seconds"),
            "command": plan.command,
            "complete": complete,
            **env,
            "settings": {"backend": plan.backend, "warmup": plan.warmup,
                         "reps": plan.reps if plan.reps is not None else "auto",
                         "interleave": plan.interleave,
                         "memory": plan.memory, "memory_method": memory_method,
                         "timer": "CUDA events" if plan.device.type == "cuda" else "time.perf_counter"},
            "bandwidth": bandwidth,
            "skipped": [{"impl": n, "reason": why} for n, why in skipped],
            "results": [row for case_rows in rows_by_case for row in case_rows],
        }

    probe = bandwidth_probe(plan.device, plan.bandwidth_bytes) if plan.interleave else None
    total = sum(len(impl_sets[p][0]) for p, _, _ in plan.cases)
    bar = _Progress(total * (2 if plan.memory and plan.device.type == "cpu" else 1), progress)
    rows_by_case: List[List[Dict[str, object]]] = []
    try:
        for path, shape, dtype in plan.cases:
            bar.case(f"{path} {'x'.join(map(str, shape))} {dtype}")
            impls = impl_sets[path][0]
            inputs = make_inputs(path, shape, dtype, plan.device)
            case_rows = []
            calls = []
            for impl in impls:
                args = inputs
                if impl.clobbers_input:
                    args = (inputs[0].clone(),) + tuple(inputs[1:])
                row = {"path": path, "shape": list(shape), "dtype": dtype, "impl": impl.name,
                       "label": impl.label, "role": impl.role, "one_tensor": impl.one_tensor,
                       "error": None, "ms": None,
                       "ms_all": None, "peak_extra_bytes": None}
                case_rows.append(row)
                calls.append(functools.partial(impl.fn, *args))
            read_gbps = bandwidth["gbps"]
            if plan.interleave:
                read_gbps = _time_rounds(plan, case_rows, calls, probe, bar)
            else:
                for row, call in zip(case_rows, calls):
                    try:
                        _record_times(row, time_call(call, plan.device, plan.warmup, plan.reps))
                    except Exception as exc:
                        row["error"] = _one_line(exc)
                    bar.step()
            if plan.memory and plan.device.type == "cuda":
                for row, call in zip(case_rows, calls):
                    if row["error"] is None:
                        try:
                            row["peak_extra_bytes"] = cuda_peak_extra(call, plan.device)
                        except Exception as exc:
                            row["error"] = _one_line(exc)
            del calls
            del inputs
            gc.collect()
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            _derive(case_rows, path, shape, dtype, read_gbps)
            rows_by_case.append(case_rows)
            if on_case is not None:
                on_case(record(complete=False))
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
    finally:
        bar.close()
    return record(complete=True)


def _record_times(row: Dict[str, object], times: List[float]) -> None:
    row["ms_all"] = [round(t, 4) for t in times]
    row["ms"] = statistics.median(times)


def _time_rounds(plan: Plan, case_rows: List[dict], calls: List[Callable[[], object]],
                 probe: Callable[[], object], bar: "_Progress") -> float:
    """Time a case's implementations in turn, with the read-bandwidth probe as one more call of
    every round; returns the probe's GB/s (median of its rounds). An implementation that fails on
    its first call is left out of the rounds."""
    live = []
    for row, call in zip(case_rows, calls):
        try:
            call()
            live.append((row, call))
        except Exception as exc:
            row["error"] = _one_line(exc)
    warmup = max(0, plan.warmup - 1)
    times = time_interleaved([call for _, call in live] + [probe], plan.device, warmup,
                             plan.reps)
    for (row, _), ts in zip(live, times):
        _record_times(row, ts)
        row["rounds"] = len(ts)
    bar.step(len(case_rows))
    return bandwidth_gbps(plan.device, plan.bandwidth_bytes, statistics.median(times[-1]))


def _derive(case_rows: List[dict], path: str, shape, dtype: str, read_gbps: float) -> None:
    """Ratios within one case: throughput, fraction of the floor, pplfast speed-up."""
    ref = next((r for r in case_rows if r["role"] == "pplfast" and r["ms"]), None)
    floor = next((r for r in case_rows if r["role"] == "floor" and r["ms"]), None)
    for r in case_rows:
        # compare reads two tensors, except a row that scores one of them (token_nll of one)
        share = 2 if r.get("one_tensor") else 1
        nbytes = logits_bytes(shape, dtype) * (2 if path == "compare" else 1) // share
        r["logits_bytes"] = nbytes
        r["read_gbps"] = read_gbps
        ms = r["ms"]
        if not ms:
            continue
        r["pplfast_speedup"] = ms / ref["ms"] if ref else None
        if path in ("logits", "stats", "compare"):
            r["gbps"] = nbytes / (ms * 1e-3) / 1e9
            r["gelems"] = logits_elements(path, shape) // share / (ms * 1e-3) / 1e9
            r["read_bw_fraction"] = r["gbps"] / read_gbps
            r["floor_ms"] = nbytes / (read_gbps * 1e9) * 1e3
        else:
            r["flops"] = linear_flops(shape)
            r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
            r["matmul_fraction"] = floor["ms"] / ms if floor else None

