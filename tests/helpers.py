"""Shared test helpers: the tolerance table and one assert that says where and by how much."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

# docs/ops.md "Accuracy": per-token error <= LSE_RTOL * max(1, |logsumexp of the row|).
LSE_RTOL = 2e-6


def cpu_isas() -> list:
    """The native CPU kernels' instruction sets this machine runs: the build's baseline ("avx2" on
    x86-64, else "scalar"), then "avx512" where both the CPU and the build have it."""
    import platform

    from pplfast import _C

    baseline = "avx2" if platform.machine().lower() in ("x86_64", "amd64") else "scalar"
    return [baseline] + (["avx512"] if _C.cpu_has_avx512() and _C.built_avx512() else [])


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend, id = its name: "triton" carries the ``interpreter`` mark
    (it runs under TRITON_INTERPRET=1 where there is no GPU), "cuda" the ``cuda`` mark (skipped
    where there is no GPU). Op tests parametrize ``backend`` over one of the lists below."""
    marks = {"triton": pytest.mark.interpreter, "cuda": pytest.mark.cuda}
    return [pytest.param(name, id=name, marks=marks.get(name, ())) for name in names]


# every backend, the float64 reference included
ALL_BACKENDS = backend_params("reference", "cpu", "triton", "cuda")
# the kernel backends only (tests whose expectation is the reference itself)
KERNEL_BACKENDS = backend_params("cpu", "triton", "cuda")


def backend_device(backend: str) -> str:
    """Where a backend's tests put their tensors: "cuda" for the CUDA backend, and for Triton
    where a GPU exists (elsewhere Triton runs on CPU tensors in its interpreter)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _to(x, device):
    import dataclasses

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _to(getattr(x, f.name), device)
                                         for f in dataclasses.fields(x)})
    if isinstance(x, tuple):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def on_backend(fn, backend: str, *args, **kwargs):
    """``fn(*args, backend=backend, **kwargs)`` with every tensor argument on the backend's device
    (:func:`backend_device`) and the result's tensors brought back to the CPU."""
    device = backend_device(backend)
    out = fn(*_to(args, device), backend=backend, **_to(kwargs, device))
    return _to(out, "cpu")


def row_lse(logits, *, softcap=None, temperature=1.0, shift=False) -> torch.Tensor:
    """float64 logsumexp of each (transformed) row, shaped like the NLL output."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    if shift:
        z = z[..., :-1, :]
    if z.shape[-1] == 0:
        return torch.zeros(z.shape[:-1], dtype=torch.float64)
    return torch.logsumexp(z, dim=-1)


# ---- logits at the top of the float32 range ------------------------------------------------
#
# docs/ops.md "Accuracy": near the top of the float range the log-sum-exp is ~3e38, and a bound of
# 2e-6 * |lse| would accept any answer. Every backend works relative to the row's maximum, so
# the error of a value is that of float32 arithmetic on numbers of its own size and of the
# logits that carry weight beside the maximum: the bound's scale is max(|value|, |lse of the
# row's logits of ordinary size|), where the extremes (|logit| >= ORDINARY_BOUND) never count
# (:func:`extreme_scale`). With a softcap every logit is of ordinary size and the scale is the
# usual |lse|.

ORDINARY_BOUND = 1e30
EXTREME = 3e38

# (softcap, temperature): the temperatures that overflow a division of the logits (0.5), turn a
# float32-overflowing difference back into a finite NLL (3.0), and bring differences of 6e38
# down to a few units, where the sum's terms must not overflow either (5e37)
EXTREME_OPTIONS = [(None, 1.0), (None, 0.5), (None, 3.0), (None, 5e37), (30.0, 1.0),
                   (30.0, 0.5), (30.0, 3.0)]


def extreme_option_params(shift_too: bool = False) -> list:
    """``pytest.param(dict(softcap=, temperature=[, shift=]))`` per :data:`EXTREME_OPTIONS`
    entry, and with ``shift_too`` two shifted ones."""
    sets = [dict(softcap=c, temperature=t) for c, t in EXTREME_OPTIONS]
    if shift_too:
        sets += [dict(softcap=None, temperature=0.5, shift=True),
                 dict(softcap=30.0, temperature=3.0, shift=True)]
    return [pytest.param(o, id=f"cap{o['softcap'] or 0:g}-t{o['temperature']:g}"
                         f"{'-shift' if o.get('shift') else ''}") for o in sets]


def float32_extreme_rows(V: int, dtype: torch.dtype = torch.float32,
                         generator: Optional[torch.Generator] = None):
    """``(logits (9, V) dtype, targets (9,))`` (V >= 3): rows at the top of the float range.

    0: two tied maxima of 3e38, the target one of them (``[3e38, 3e38, -1]`` at V = 3): log 2;
    1: every logit 3e38 (300 of them at V = 300): log V;
    2: 3e38 and the target at -3e38: 6e38 / T, finite in float32 only for T > 1.77;
    3: every logit -3e38: log V;
    4: every other logit -3e38, the rest (the target among them) ordinary;
    5: the dtype's largest finite value twice and its negative at the target;
    6: one 3e38, the target ordinary: (3e38 - y_t) / T;
    7: ordinary logits and the target at minus the largest value;
    8: one 3e38 at the target and -3e38 everywhere else: log(1 + (V - 1) e^{-6e38 / T}), which
       only a sum whose terms do not overflow gets right at T = 5e37.
    The other logits are ordinary (about 3 in size); the targets of rows 0 and 8 are column 0.
    """
    top = torch.finfo(dtype).max
    x = torch.randn(9, V, generator=generator) * 3
    t = torch.randint(0, V, (9,), generator=generator)
    x[0, :2] = EXTREME
    t[0] = 0
    x[1] = EXTREME
    x[2, 0], x[2, 1], t[2] = EXTREME, -EXTREME, 1
    x[3] = -EXTREME
    x[4, ::2], t[4] = -EXTREME, 1
    x[5, 0] = x[5, 2] = top
    x[5, 1], t[5] = -top, 1
    x[6, 0], t[6] = EXTREME, V - 1
    x[7, 1], t[7] = -top, 1
    x[8] = -EXTREME
    x[8, 0], t[8] = EXTREME, 0
    return x.to(dtype), t


EXTREME_BIASES = ["tied_max", "max_min", "all_max", "all_min", "half_min", "limits",
                  "one_max_rest_min"]


def extreme_bias(case: str, V: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (V,) bias that carries one of :data:`EXTREME_BIASES` into every row of the logits
    (ordinary products added to 3e38 round back to 3e38, in float32 and float64 alike): two tied
    maxima of 3e38 (columns 0, 1); 3e38 and -3e38; all 3e38; all -3e38; every other -3e38; the
    dtype's largest finite value at 0 and 2 and its negative at 1; one 3e38 among -3e38."""
    top = torch.finfo(dtype).max
    bias = torch.randn(V)
    if case == "tied_max":
        bias[:2] = EXTREME
    elif case == "max_min":
        bias[0], bias[1] = EXTREME, -EXTREME
    elif case == "all_max":
        bias[:] = EXTREME
    elif case == "all_min":
        bias[:] = -EXTREME
    elif case == "half_min":
        bias[::2] = -EXTREME
    elif case == "limits":
        bias[0] = bias[2] = top
        bias[1] = -top
    elif case == "one_max_rest_min":
        bias[:] = -EXTREME
        bias[0] = EXTREME
    else:
        raise ValueError(case)
    return bias.to(dtype)


def extreme_scale(logits: torch.Tensor, value: torch.Tensor, *, softcap=None,
                  temperature: float = 1.0) -> torch.Tensor:
    """The tolerance scale of the module notes for ``value`` (the leading shape of ``logits``,
    or that plus one trailing axis, as top-k log-probabilities): max(|value|, |logsumexp of the
    row's soft-capped logits below ORDINARY_BOUND, divided by the temperature|), non-finite parts
    counted as 0."""
    y = logits.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = torch.where(y.abs() < ORDINARY_BOUND, y / temperature, float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    lse = torch.where(torch.isfinite(lse), lse.abs(), 0.0)
    v = value.detach().cpu().double()
    if v.ndim > lse.ndim:
        lse = lse.unsqueeze(-1)
    return torch.maximum(lse, torch.where(torch.isfinite(v), v.abs(), 0.0))


def assert_nll_close(actual: torch.Tensor, expected: torch.Tensor, lse: Optional[torch.Tensor] = None,
                     *, rtol: float = LSE_RTOL, atol: Optional[torch.Tensor] = None, what: str = "nll"):
    """Elementwise |actual - expected| <= rtol * max(1, |lse|) (or ``atol``, a per-element bound).

    Non-finite expected values (inf, nan) must be matched exactly; on failure the message gives
    the count of bad elements, the worst index, both values and the bound there.
    """
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}, expected float32"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    if atol is None:
        scale = torch.ones_like(e) if lse is None else lse.detach().cpu().double().abs().clamp_min(1.0)
        scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
        bound = rtol * scale
    else:
        bound = atol.detach().cpu().double().expand_as(e)
    finite = torch.isfinite(e)
    same_nonfinite = (torch.isnan(e) & torch.isnan(a)) | (~torch.isnan(e) & (a == e))
    err = torch.where(finite, (a - e).abs(), torch.where(same_nonfinite, 0.0, float("inf")))
    err = torch.where(torch.isnan(err), float("inf"), err)
    bad = err > bound
    if bool(bad.any()):
        ratio = torch.where(bad, err / bound, torch.zeros_like(err))
        worst = int(ratio.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape)) if e.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements out of tolerance; worst at {list(idx)}: "
            f"actual={a.reshape(-1)[worst].item()!r} expected={e.reshape(-1)[worst].item()!r} "
            f"|err|={err.reshape(-1)[worst].item():.3e} bound={bound.reshape(-1)[worst].item():.3e}; "
            f"max |err| over finite={err[finite].max().item() if bool(finite.any()) else 0.0:.3e}"
        )


def run_json_child(args, *, env=None, timeout: float = 300):
    """Run ``python *args`` in a fresh process (memory tests measure there) and return the JSON
    of its last stdout line; a failed child fails the test with the tail of its stderr."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nvidia_backend() -> bool:
    """Whether this triton can compile for NVIDIA GPUs (no GPU needed to compile)."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


# Child process of compile_triton: builds each kernel for its target without TRITON_INTERPRET
# (the interpreter runs kernels as Python, so what only the compiler rejects passes every
# interpreter test) and reports the figures of `ptxas -v` for that target.
_COMPILE_CHILD = r"""
import importlib, json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

for spec in json.loads(sys.stdin.read()):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    consts = spec["constexprs"]
    full = {a: "constexpr" if a in consts else spec["signature"][a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in spec["div16"]}
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    arch = spec["arch"]
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=spec["num_warps"],
                                           num_stages=spec.get("num_stages", 3)))
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(tmp + "/k.ptx", "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             "--gpu-name=" + sm_arch_from_capability(arch), tmp + "/k.ptx", "-o", tmp + "/k.o"],
            capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    print(json.dumps(dict(
        tag=spec.get("tag"), arch=arch, shared=compiled.metadata.shared,
        registers=int(re.search(r"Used (\d+) registers", log).group(1)),
        spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        counts={name: len(re.findall(pattern, ptx)) for name, pattern in spec.get("count", {}).items()},
    )), flush=True)
"""


def hidden_rows_past_2_pow_31(D: int = 4096, V: int = 1000):
    """A GPU case whose hidden states hold more than 2^31 elements (4.3 GB in bf16), so that
    row offsets must be 64-bit: ``(hidden (N, D) bf16, weight (V, D) bf16, targets (N,))`` with
    the last 200 and the first 50 rows scored (the others ignored, -100). Skips when the GPU has
    too little free memory."""
    N = (1 << 31) // D + 256
    free, _ = torch.cuda.mem_get_info()
    if free < N * D * 2 * 1.2:
        pytest.skip(f"needs {N * D * 2 * 1.2 / 2**30:.1f} GiB free on the GPU")
    hidden = torch.empty(N, D, dtype=torch.bfloat16, device="cuda")
    for r0 in range(0, N, 4096):
        hidden[r0 : r0 + 4096].copy_(torch.randn(min(4096, N - r0), D, device="cuda"))
    weight = (torch.randn(V, D, device="cuda") / 64).to(torch.bfloat16)
    targets = torch.full((N,), -100, device="cuda")
    targets[N - 200 :] = torch.randint(0, V, (200,), device="cuda")
    targets[:50] = torch.randint(0, V, (50,), device="cuda")
    return hidden, weight, targets


def logits_past_2_pow_31(V: int = 128256, generator=None):
    """GPU bf16 logits ``(N, V)`` with N x V > 2^31 elements (4.3 GB) and targets ``(N,)``, whose
    far rows are marked so that reading the wrong place cannot pass: row -1's target 7 holds
    40.0, row -2 is all -inf but its target 5 (1.0). Skips when the GPU has too little free
    memory."""
    N = (1 << 31) // V + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * N * V * 2:
        pytest.skip(f"needs {2 * N * V * 2 / 2**30:.1f} GiB free on the GPU")
    logits = torch.empty(N, V, dtype=torch.bfloat16, device="cuda")
    for r0 in range(0, N, 2048):  # in chunks, to keep the float32 temporaries small
        chunk = logits[r0 : r0 + 2048]
        chunk.copy_(torch.randn(chunk.shape, device="cuda", generator=generator) * 3)
    logits[-1, 7] = 40.0
    logits[-2, :] = float("-inf")
    logits[-2, 5] = 1.0
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[-1], targets[-2] = 7, 5
    assert N * V > 2**31
    return logits, targets


# Triton's interpreter evaluates exp2 and products of +-inf with numpy, which warns where the GPU
# is silent: the marks that silence those warnings in a module of interpreted kernels
NUMPY_FLOAT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


# the float scalars of the kernels' signatures (every other scalar is an integer)
FLOAT_SCALARS = frozenset({"softcap", "inv_softcap", "exp2_scale", "inv_temp", "a_scale"})


def triton_spec(module: str, kernel: str, arch: int, *, pointers: dict, constexprs: dict,
                num_warps: int, num_stages: int = 3, i64=(), div16=(), count=None,
                tag=None) -> dict:
    """One build of ``module.kernel`` for :func:`compile_triton`, its signature read from the
    kernel: each pointer argument (``*_ptr``) gets the element type ``pointers`` gives it
    (``"bf16"``, ``"fp32"``, ``"i64"``, ...), the names of :data:`FLOAT_SCALARS` are ``fp32``,
    every other runtime argument ``i32`` (``i64`` when named in ``i64``); ``constexprs`` must
    give every ``tl.constexpr`` parameter and may fix runtime ones (a stride of 1). A name the
    kernel lacks, an untyped pointer or a missing constexpr fails here, so that a spec cannot
    drift from the kernel it builds. ``div16``: arguments known divisible by 16; ``count``: name
    -> regex counted in the PTX; ``arch``: compute capability (e.g. 86)."""
    import importlib
    import inspect

    fn = getattr(importlib.import_module(module), kernel)
    names = list(fn.arg_names)
    declared = {n for n, p in inspect.signature(fn.fn).parameters.items()
                if "constexpr" in str(p.annotation)}
    unknown = (set(pointers) | set(constexprs) | set(i64) | set(div16)) - set(names)
    assert not unknown, f"{kernel} has no argument {sorted(unknown)}"
    missing = sorted(declared - set(constexprs))
    assert not missing, f"{kernel}: no value for {missing}"
    signature = {}
    for name in names:
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            assert name in pointers, f"{kernel}: no element type for {name}"
            signature[name] = "*" + pointers[name]
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in i64 else "i32"
    return dict(module=module, kernel=kernel, arch=arch, signature=signature,
                constexprs=dict(constexprs), div16=list(div16), num_warps=num_warps,
                num_stages=num_stages, count=dict(count or {}), tag=tag)


def compile_triton(specs: list, *, extra_path: Optional[str] = None) -> list:
    """Compile Triton kernels for NVIDIA targets (no GPU needed) in a fresh process.

    Each spec is a dict, built by :func:`triton_spec`: ``module`` and ``kernel`` (import path and
    name), ``signature`` (type of each runtime argument, e.g. ``"*bf16"``, ``"i32"``),
    ``constexprs``, ``div16`` (arguments known divisible by 16), ``arch`` (compute capability,
    e.g. 86), ``num_warps``, ``num_stages``, optional ``tag`` and ``count`` (name -> regex counted
    in the PTX). Returns one dict per spec: ``tag``, ``arch``, ``shared`` (bytes), ``registers``,
    ``spill_stores`` and ``spill_loads`` (bytes, from ``ptxas -v``) and ``counts``.
    """
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_CHILD], input=json.dumps(specs),
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(specs), proc.stdout[-2000:]
    return results

