"""The inputs of each case: random tensors of a shape and dtype, and their sizes."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .options import DTYPES


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
    """Inputs of one case: ``(logits, targets)``, ``(logits_base, logits_test, targets)`` or
    ``(hidden, weight, targets)``."""
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    if path == "compare":
        N, V = shape
        targets = torch.randint(0, V, (N,), generator=gen).to(device)
        base = _random((N, V), torch_dtype, device, gen, scale=2.0)
        return base, _random((N, V), torch_dtype, device, gen, scale=2.0), targets
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


def logits_elements(path: str, shape: Sequence[int]) -> int:
    """Logits a case reads: ``N * V``, twice for ``compare`` (both tensors)."""
    return shape[0] * shape[-1] * (2 if path == "compare" else 1)


def linear_flops(shape: Sequence[int]) -> int:
    N, D, V = shape
    return 2 * N * D * V

