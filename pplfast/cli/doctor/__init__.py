"""``pplfast doctor``: is every backend on this machine giving the right numbers?

Run it after installing on a new machine (and first on a new GPU). It prints the machine, which
backends can run and, for those that cannot, why and how to fix it; then it runs every public op
(``token_nll``, ``linear_token_nll``, ``token_stats``, ``linear_token_stats``, ``compare``,
``linear_compare``) on every available backend, on small inputs of each dtype — the options
(softcap, temperature, shift, bias, ignored positions), the special values under each option,
the float32 extremes (rows ``[3e38, 3e38, -1]`` and 300 equal logits of 3e38, also under
temperature 0.5 and softcap), a row split over the vocabulary, a strided view — against the
float64 reference, every field with its bound (:mod:`pplfast.cli.doctor.checks`), one line per
check as it finishes; then it times one medium shape per backend. Exit code 0 when every check
passes, 1 on any mismatch, 2 for a usage mistake.

``--json`` writes JSON lines, each flushed as soon as it exists, so a run cut off by a time limit
keeps every check that finished: first ``{"kind": "machine", ...}``, then one
``{"kind": "check", ...}`` per check, ``{"kind": "timing", ...}`` per backend, and last
``{"kind": "summary", "ok": ..., ...}`` (absent when the run was cut off).

The checks are a table of (op, case) (:mod:`pplfast.cli.doctor.cases`): one entry adds one check
per dtype on every backend.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, Iterator, List, Optional

import torch

from ... import _env
from ...api import check_backend, linear_token_nll, resolve_backend, token_nll
from ...comparison import compare, linear_compare
from ...stats import linear_token_stats, token_stats
from .._common import cpu_model, driver_version, key_values, package_version
from .cases import CASES, LINEAR_OPS, LOGITS_OPS, Case, case_seed
from .checks import check

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = LOGITS_OPS + LINEAR_OPS
# the public op each check calls
OP_FUNCTIONS = {f.__name__: f for f in (token_nll, token_stats, compare, linear_token_nll,
                                        linear_token_stats, linear_compare)}

__all__ = ["CASES", "DTYPES", "OPS", "Case", "DoctorError", "add_arguments", "case_seed",
           "iter_checks", "machine_info", "run", "time_backends"]


class DoctorError(Exception):
    """A usage mistake, reported in one line."""


def _no_gpu() -> str:
    """Why this process has no CUDA device, and what to do about it."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build, so no tensor can live on "
                "a GPU: install a CUDA build of PyTorch on a machine with an NVIDIA GPU (pick a "
                "CUDA version in PyTorch's install instructions)")
    return (f"PyTorch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no GPU: check "
            "that an NVIDIA GPU and its driver are present (`nvidia-smi`) and that "
            "CUDA_VISIBLE_DEVICES does not hide it")


def _backend_status(device_kind: str) -> Dict[str, Optional[str]]:
    """Backend -> None when it can run on this machine's tensors, else why not and how to fix."""
    status: Dict[str, Optional[str]] = {}
    device = torch.device("cuda" if device_kind == "cuda" else "cpu")
    for name in ("cpu", "triton", "cuda"):
        problems = []
        if name != "cpu" and device.type != "cuda":
            if name == "cuda":
                problems.append(f"the CUDA kernels need a GPU: {_no_gpu()}")
            elif not _env.interpreting():
                problems.append(f"the Triton kernels need a GPU: {_no_gpu()}; or set "
                                f"{_env.TRITON_INTERPRET}=1 to run them on CPU tensors in "
                                "Triton's interpreter (slow, for testing)")
        try:
            check_backend(name)  # the extension or triton itself, with how to install it
        except Exception as exc:
            problems.append(str(exc).splitlines()[0])
        if not problems:
            try:
                resolve_backend(name, device if name != "cpu" else torch.device("cpu"))
            except Exception as exc:
                problems.append(str(exc).splitlines()[0])
        status[name] = "; ".join(problems) or None
    return status


def machine_info() -> Dict[str, object]:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info: Dict[str, object] = {
        "cpu": cpu_model(),
        "cpu_features": [f for f in ("avx2", "fma", "f16c", "avx512f") if f in flags],
        "torch": torch.__version__, "triton": package_version("triton"),
        "torch_cuda": torch.version.cuda, "pplfast": package_version("pplfast"),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["driver"] = driver_version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_gib": round(p.total_memory / (1 << 30), 1)})
    return info


def _skipped_here(backend: str, on: torch.device, case: Case, dtype: torch.dtype, opts) -> bool:
    """Checks that Triton's interpreter cannot run: the big cases, and bf16 ``tl.dot`` (wrong in
    the interpreter) in the fused hidden-states kernels (``linear_token_nll``, and
    ``linear_token_stats`` with ``top_k=0``)."""
    if backend != "triton" or on.type != "cpu":
        return False
    if not case.interpreter:
        return True
    fused = case.op == "linear_token_nll" or (case.op == "linear_token_stats"
                                              and not opts.get("top_k"))
    return dtype == torch.bfloat16 and fused


def iter_checks(backends: List[str], device: torch.device, cases=CASES,
                ops: Optional[List[str]] = None,
                dtypes: Optional[List[str]] = None) -> Iterator[dict]:
    """Run the checks one by one; yields one record per check as soon as it has run."""
    for backend in backends:
        on = device if backend in ("triton", "cuda") else torch.device("cpu")
        for case in cases:
            if ops and case.op not in ops:
                continue
            for dname, dtype in DTYPES.items():
                if dtypes and dname not in dtypes:
                    continue
                gen = torch.Generator().manual_seed(case_seed(case, dname))
                args, opts = case.make(dtype, on, gen)
                if _skipped_here(backend, on, case, dtype, opts):
                    continue
                row = {"backend": backend, "op": case.op, "case": case.name, "dtype": dname,
                       "ok": False, "detail": ""}
                start = time.perf_counter()
                try:
                    result = OP_FUNCTIONS[case.op](*args, backend=backend, **opts)
                    problem = check(case.op, args, opts, result,
                                    relative_to_max=case.relative_to_max)
                    row["ok"] = problem is None
                    row["detail"] = problem or ""
                except Exception as exc:
                    text = str(exc).strip().splitlines()
                    row["detail"] = f"{type(exc).__name__}: {text[0] if text else ''}"
                row["seconds"] = round(time.perf_counter() - start, 3)
                yield row


def time_backends(backends: List[str], device: torch.device) -> Iterator[dict]:
    for backend in backends:
        on = device if backend in ("triton", "cuda") else torch.device("cpu")
        if backend == "triton" and on.type != "cuda":
            continue  # the interpreter is not a speed
        n, v = (1024, 32000)
        x = torch.randn(n, v, device=on).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=on)
        token_nll(x, t, backend=backend)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        reps = 5
        start = time.perf_counter()
        for _ in range(reps):
            token_nll(x, t, backend=backend)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        ms = (time.perf_counter() - start) / reps * 1e3
        yield {"backend": backend, "shape": f"{n}x{v}", "dtype": "bf16", "ms": ms,
               "gbps": x.numel() * 2 / (ms * 1e-3) / 1e9}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("cpu", "triton", "cuda"), action="append",
                        help="check only this backend (repeatable; default: every available one)")
    parser.add_argument("--op", choices=OPS, action="append",
                        help="check only this op (repeatable; default: all six)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), action="append",
                        help="check only this input dtype (repeatable; default: all three)")
    parser.add_argument("--quick", action="store_true", help="skip the timing")
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines instead, one per check as it finishes")


# text output: fixed columns, so that each check prints as it finishes
_COLUMNS = ((7, "backend"), (18, "op"), (58, "case"), (5, "dtype"))


def _text_line(values) -> str:
    cells = [str(v).ljust(width) for (width, _), v in zip(_COLUMNS, values)]
    return "  ".join(cells + [str(values[-1])]).rstrip()


def _emit(line: str) -> None:
    print(line, flush=True)


def _doctor(args) -> int:
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = _backend_status(device.type)
    # on a GPU machine its backends first: a run cut off by a time limit has checked them
    available = [b for b in ("triton", "cuda", "cpu") if status[b] is None]
    if device.type != "cuda":
        available.sort(key=("cpu", "triton", "cuda").index)
    wanted = args.backend or available
    for b in wanted:
        if status.get(b) is not None:
            raise DoctorError(f"--backend {b} cannot run here: {status[b]}")
    info = machine_info()
    if args.json:
        _emit(json.dumps({"kind": "machine", "machine": info, "backends": status}))
    else:
        gpus = "; ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, "
                         f"{g['memory_gib']} GiB)" for g in info["gpus"]) or "none"
        rows = [("cpu", f"{info['cpu']} ({', '.join(info['cpu_features']) or 'no AVX2'})"),
                ("gpus", gpus + (f", driver {info.get('driver')}" if info["gpus"] else "")),
                ("versions", f"pplfast {info['pplfast']}, torch {info['torch']} (CUDA "
                             f"{info['torch_cuda']}), triton {info['triton']}")]
        rows += [(f"backend {b}", "available" if why is None else f"unavailable: {why}")
                 for b, why in status.items()]
        _emit(key_values(rows))
        _emit("")
        _emit(_text_line([title for _, title in _COLUMNS] + ["result"]))
    total = failed = 0
    for row in iter_checks(wanted, device, ops=args.op, dtypes=args.dtype):
        total += 1
        failed += not row["ok"]
        if args.json:
            _emit(json.dumps({"kind": "check", **row}))
        else:
            _emit(_text_line([row["backend"], row["op"], row["case"], row["dtype"],
                              "ok" if row["ok"] else "FAILED " + row["detail"]]))
    if not args.quick:
        if not args.json:
            _emit("")
        for t in time_backends(wanted, device):
            if args.json:
                _emit(json.dumps({"kind": "timing", **t}))
            else:
                _emit(f"{t['backend']:<7}  token_nll {t['shape']} {t['dtype']}: "
                      f"{t['ms']:.2f} ms, {t['gbps']:.1f} GB/s")
    seconds = round(time.perf_counter() - started, 1)
    if args.json:
        _emit(json.dumps({"kind": "summary", "ok": not failed, "checks": total,
                          "failed": failed, "seconds": seconds}))
    else:
        _emit("")
        _emit(f"{failed} of {total} checks FAILED" if failed
              else f"all {total} checks ok ({seconds} s)")
    return 1 if failed else 0


def run(args) -> int:
    try:
        return _doctor(args)
    except DoctorError as exc:
        print(f"pplfast doctor: error: {exc}", file=sys.stderr)
        return 2
