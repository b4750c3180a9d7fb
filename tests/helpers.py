"""Shared test helpers: the tolerance table and one assert that says where and by how much."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

# README "Accuracy": per-token error <= LSE_RTOL * max(1, |logsumexp of the row|).
LSE_RTOL = 2e-6


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


def compile_triton(specs: list, *, extra_path: Optional[str] = None) -> list:
    """Compile Triton kernels for NVIDIA targets (no GPU needed) in a fresh process.

    Each spec is a dict: ``module`` and ``kernel`` (import path and name), ``signature`` (type of
    each runtime argument, e.g. ``"*bf16"``, ``"i32"``), ``constexprs``, ``div16`` (arguments
    known divisible by 16), ``arch`` (compute capability, e.g. 86), ``num_warps``,
    ``num_stages``, optional ``tag`` and ``count`` (name -> regex counted in the PTX). Returns one
    dict per spec: ``tag``, ``arch``, ``shared`` (bytes), ``registers``, ``spill_stores`` and
    ``spill_loads`` (bytes, from ``ptxas -v``) and ``counts``.
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


def save_trained_llama(root, *, context=64, steps=25, seed=0):
    """A tiny Llama and its tokenizer (from ``tests/test_hf.py``), trained ``steps`` Adam steps
    on that file's word corpus so that text off that corpus scores far worse; saved to ``root``.

    Returns ``(model, tokenizer)``, the model in eval mode.
    """
    import torch
    from test_hf import build_model, corpus, train_tokenizer

    tokenizer = train_tokenizer()
    model = build_model("llama", len(tokenizer), context=context, seed=seed)
    ids = torch.tensor(tokenizer(" ".join(corpus(400, seed=seed + 1)))["input_ids"])
    rows = ids[: len(ids) // context * context].view(-1, context)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, len(rows), (16,), generator=gen)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return model, tokenizer
