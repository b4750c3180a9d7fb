"""``pplfast doctor``: is every backend on this machine giving the right numbers?

Run it after installing on a new machine (and first on a new GPU). It prints the machine, which
backends can run and, for those that cannot, why and how to fix it; then it runs every
available backend on small inputs of each dtype — logits and hidden paths, the options, the
special values (also under softcap and temperature), a row split over the vocabulary, a strided
view — against the float64 reference, one line per check, and times one medium shape per
backend. Exit code 0 when every check passes, 1 on any mismatch, 2
for a usage mistake.

Tolerances (the README's "Accuracy"): logits path, ``2e-6 * max(1, |logsumexp of the row|)``;
hidden path in float32 the same; in float16/bfloat16 no larger than the error of ``F.linear`` in
the input dtype followed by ``F.cross_entropy`` in float32, plus ``1e-3``. NaN must be NaN, an
infinity the same infinity, and no scored NLL below 0.

Checks are a table of (op, case): one :class:`Case` entry adds one check on every backend.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import _dispatch, _env, reference
from ._table import key_values, table
from .bench.environment import cpu_model, driver_version, package_version

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RTOL = 2e-6
INF, NAN = float("inf"), float("nan")


class DoctorError(Exception):
    """A usage mistake, reported in one line."""


@dataclass(frozen=True)
class Case:
    """One check: ``make(dtype, device, gen)`` returns the op's arguments and options."""

    op: str  # "token_nll" or "linear_token_nll"
    name: str
    make: Callable
    interpreter: bool = True  # small enough for Triton's interpreter


def _logits(n, v, gen, scale=3.0):
    return torch.randn(n, v, generator=gen, dtype=torch.float64) * scale


def _targets(n, v, gen):
    return torch.randint(0, v, (n,), generator=gen)


def _plain(dtype, dev, gen):
    x = _logits(6, 507, gen)
    return (x.to(dtype).to(dev), _targets(6, 507, gen).to(dev)), {}


def _options(dtype, dev, gen):
    x = _logits(2, 7, gen, scale=20.0).reshape(1, 2, 7)
    t = _targets(1, 7, gen).reshape(1, 1).expand(1, 2).clone()
    t[0, 0] = -100
    return (x.to(dtype).to(dev), t.to(dev)), dict(softcap=5.0, temperature=0.7, shift=True)


def _special(dtype, dev, gen, softcap=None, temperature=1.0):
    x = _logits(7, 129, gen)
    t = _targets(7, 129, gen)
    x[0, 3] = NAN                      # NaN in a row
    x[1, (int(t[1]) + 1) % 129] = INF  # +inf at a non-target entry: NLL +inf
    x[2, ::3] = -INF                   # -inf entries
    x[2, int(t[2])] = 0.5
    x[3] = -INF                        # all -inf: NaN
    x[4, int(t[4])] = -INF             # target at -inf: NLL +inf
    t[5] = -100                        # ignored
    x[6] *= 3000                       # extremes around ±1e4
    return (x.to(dtype).to(dev), t.to(dev)), dict(softcap=softcap, temperature=temperature)


def _split(dtype, dev, gen):
    v = 200_003 if not _env.interpreting() else 20_011
    x = _logits(2, v, gen)
    return (x.to(dtype).to(dev), _targets(2, v, gen).to(dev)), {}


def _strided(dtype, dev, gen):
    x = _logits(9, 1002, gen).to(dtype).to(dev)
    t = _targets(3, 501, gen).to(dev)
    return (x[::3, ::2], t), dict(temperature=1.5)


def _hidden(n, d, v, gen, dtype, dev, bias=False):
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(d))
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda z: None if z is None else z.to(dtype).to(dev)  # noqa: E731
    return cast(h), cast(w), b if b is None else cast(b)


def _linear_plain(dtype, dev, gen):
    h, w, _ = _hidden(9, 123, 507, gen, dtype, dev)
    return (h, w, _targets(9, 507, gen).to(dev)), {}


def _linear_options(dtype, dev, gen):
    h, w, b = _hidden(10, 64, 300, gen, dtype, dev, bias=True)
    t = _targets(10, 300, gen).reshape(2, 5).to(dev)
    t[0, 2] = -100
    return (h.reshape(2, 5, 64), w, t), dict(bias=b, softcap=4.0, temperature=0.8, shift=True)


def _linear_special(dtype, dev, gen, softcap=None, temperature=1.0):
    h, w, b = _hidden(5, 32, 257, gen, dtype, dev, bias=True)
    t = _targets(5, 257, gen).to(dev)
    b[int(t[0]) % 257 ^ 1] = INF  # +inf logit in every row, at one vocabulary entry
    h[1, 4] = NAN                 # NaN row
    t[2] = -100
    return (h, w, t), dict(bias=b, softcap=softcap, temperature=temperature)


# the special values again under softcap and temperature: the transform must not hide a NaN
# (a tanh maps NaN to +-1 when the NaN check comes after it)
_CAPPED = dict(softcap=30.0, temperature=0.7)

CASES: List[Case] = [
    Case("token_nll", "plain", _plain),
    Case("token_nll", "softcap+temperature+shift+ignored", _options),
    Case("token_nll", "special values", _special),
    Case("token_nll", "special values, softcap+temperature",
         functools.partial(_special, **_CAPPED)),
    Case("token_nll", "vocabulary split (few rows, long V)", _split),
    Case("token_nll", "strided view", _strided),
    Case("linear_token_nll", "plain", _linear_plain),
    Case("linear_token_nll", "bias+softcap+temperature+shift", _linear_options),
    Case("linear_token_nll", "special values", _linear_special),
    Case("linear_token_nll", "special values, softcap+temperature",
         functools.partial(_linear_special, **_CAPPED)),
]


def case_seed(case: Case, dtype_name: str) -> int:
    """The generator seed of one check: a stable hash of its names, the same in every process
    (Python's ``hash`` of a string changes per process), so a failure can be reproduced."""
    return zlib.crc32(f"{case.op}/{case.name}/{dtype_name}".encode())


def _reference_nll(case: Case, args, opts) -> torch.Tensor:
    if case.op == "token_nll":
        return reference.token_nll(*args, **opts)
    return reference.linear_token_nll(*args, **opts)


def _bound(case: Case, args, opts, want: torch.Tensor) -> torch.Tensor:
    """Allowed |error| per position."""
    softcap, temperature = opts.get("softcap"), opts.get("temperature", 1.0)
    if case.op == "token_nll":
        x = args[0]
        if opts.get("shift"):
            x = x[..., :-1, :]
        lse = reference._transform(x.double(), softcap, temperature).logsumexp(-1)
        return RTOL * lse.abs().clamp(min=1.0).nan_to_num(1.0, 1.0, 1.0)
    hidden, weight, targets = args
    bias = opts.get("bias")
    z64 = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    if opts.get("shift"):
        z64, targets = z64[..., :-1, :], targets[..., 1:]
    lse = reference._transform(z64, softcap, temperature).logsumexp(-1)
    bound = RTOL * lse.abs().clamp(min=1.0).nan_to_num(1.0, 1.0, 1.0)
    if hidden.dtype != torch.float32:
        # three-way rule: the same-dtype PyTorch path's own error, plus a margin
        zd = F.linear(hidden, weight, None if bias is None else bias).float()
        if opts.get("shift"):
            zd = zd[..., :-1, :]
        zd = reference._transform(zd.double(), softcap, temperature)
        scored = targets != -100
        safe = torch.where(scored, targets, 0)
        torch_nll = zd.logsumexp(-1) - zd.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        torch_err = (torch.where(scored, torch_nll, 0) - want).abs().nan_to_num(0.0, 0.0, 0.0)
        bound = bound.cpu() + torch_err.cpu() + 1e-3
    return bound.cpu()


def compare(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> Optional[str]:
    """None when ``got`` matches; else where and by how much it does not."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    flat_g, flat_w, flat_b = got.reshape(-1), want.reshape(-1), bound.reshape(-1).double()
    for i in range(flat_g.numel()):
        g, w = float(flat_g[i]), float(flat_w[i])
        where = f"position {i}: {g!r}, reference {w!r}"
        if math.isnan(w) != math.isnan(g):
            return where
        if math.isinf(w) and g != w:
            return where
        if math.isfinite(w) and not abs(g - w) <= float(flat_b[i]):
            return where + f" (|error| {abs(g - w):.3g} > {float(flat_b[i]):.3g})"
        if g < 0:
            return where + " (negative NLL)"
    return None


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
            _dispatch.module(name)  # the extension or triton itself, with how to install it
        except Exception as exc:
            problems.append(str(exc).splitlines()[0])
        if not problems:
            try:
                _dispatch.resolve(name, device if name != "cpu" else torch.device("cpu"))
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


def run_checks(backends: List[str], device: torch.device, cases=CASES) -> List[dict]:
    results = []
    for backend in backends:
        on = device if backend in ("triton", "cuda") else torch.device("cpu")
        if backend == "triton" and not on.type == "cuda":
            on = torch.device("cpu")  # the interpreter
        for case in cases:
            if backend == "triton" and on.type == "cpu" and not case.interpreter:
                continue
            for dname, dtype in DTYPES.items():
                if (backend == "triton" and on.type == "cpu" and dtype == torch.bfloat16
                        and case.op == "linear_token_nll"):
                    continue  # bf16 tl.dot is wrong in Triton's interpreter
                gen = torch.Generator().manual_seed(case_seed(case, dname))
                args, opts = case.make(dtype, on, gen)
                row = {"backend": backend, "op": case.op, "case": case.name, "dtype": dname,
                       "ok": False, "detail": ""}
                try:
                    fn = getattr(__import__("pplfast"), case.op)
                    got = fn(*args, backend=backend, **opts)
                    cpu_args = tuple(a.cpu() for a in args)
                    cpu_opts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                for k, v in opts.items()}
                    want = _reference_nll(case, cpu_args, cpu_opts)
                    problem = compare(got, want, _bound(case, cpu_args, cpu_opts, want))
                    row["ok"] = problem is None
                    row["detail"] = problem or ""
                except Exception as exc:
                    row["detail"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                results.append(row)
    return results


def time_backends(backends: List[str], device: torch.device) -> List[dict]:
    out = []
    for backend in backends:
        on = device if backend in ("triton", "cuda") else torch.device("cpu")
        if backend == "triton" and on.type != "cuda":
            continue  # the interpreter is not a speed
        n, v = (1024, 32000)
        x = torch.randn(n, v, device=on).to(torch.bfloat16)
        t = torch.randint(0, v, (n,), device=on)
        import pplfast

        pplfast.token_nll(x, t, backend=backend)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        reps = 5
        start = time.perf_counter()
        for _ in range(reps):
            pplfast.token_nll(x, t, backend=backend)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        ms = (time.perf_counter() - start) / reps * 1e3
        out.append({"backend": backend, "shape": f"{n}x{v}", "dtype": "bf16", "ms": ms,
                    "gbps": x.numel() * 2 / (ms * 1e-3) / 1e9})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("cpu", "triton", "cuda"), action="append",
                        help="check only this backend (repeatable; default: every available one)")
    parser.add_argument("--quick", action="store_true", help="skip the timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def _doctor(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    status = _backend_status(device.type)
    wanted = args.backend or [b for b, why in status.items() if why is None]
    for b in wanted:
        if status.get(b) is not None:
            raise DoctorError(f"--backend {b} cannot run here: {status[b]}")
    info = machine_info()
    results = run_checks(wanted, device)
    timings = [] if args.quick else time_backends(wanted, device)
    failed = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps({"machine": info, "backends": status, "checks": results,
                          "timings": timings, "ok": not failed}, indent=1))
        return 1 if failed else 0
    gpus = "; ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)"
                     for g in info["gpus"]) or "none"
    rows = [("cpu", f"{info['cpu']} ({', '.join(info['cpu_features']) or 'no AVX2'})"),
            ("gpus", gpus + (f", driver {info.get('driver')}" if info["gpus"] else "")),
            ("versions", f"pplfast {info['pplfast']}, torch {info['torch']} (CUDA "
                         f"{info['torch_cuda']}), triton {info['triton']}")]
    rows += [(f"backend {b}", "available" if why is None else f"unavailable: {why}")
             for b, why in status.items()]
    print(key_values(rows))
    print()
    body = [[r["backend"], r["op"], r["case"], r["dtype"],
             "ok" if r["ok"] else "FAILED " + r["detail"]] for r in results]
    print("\n".join(table(["backend", "op", "case", "dtype", "result"], body, left=5)))
    if timings:
        print()
        print("\n".join(table(["backend", "shape", "dtype", "ms", "GB/s"],
                              [[t["backend"], t["shape"], t["dtype"], f"{t['ms']:.2f}",
                                f"{t['gbps']:.1f}"] for t in timings], left=3)))
    print()
    print(f"{len(failed)} of {len(results)} checks FAILED" if failed
          else f"all {len(results)} checks ok")
    return 1 if failed else 0


def run(args) -> int:
    try:
        return _doctor(args)
    except DoctorError as exc:
        print(f"pplfast doctor: error: {exc}", file=sys.stderr)
        return 2
