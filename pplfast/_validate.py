"""Argument checks shared by every public function (docs/ops.md, "Bad input").

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong value or shape)
naming the argument and the offending value, before any kernel runs.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def float_tensor(name: str, x) -> None:
    tensor(name, x)
    if x.dtype == torch.float64:
        raise TypeError(
            f"{name} is float64: the kernels read float32, float16 or bfloat16 (pass "
            f"{name}.float(): the result is accurate to 2e-6 relative), or compute in float64 "
            "with pplfast.reference"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")


def target_tensor(x) -> None:
    tensor("targets", x)
    if x.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32, got {x.dtype}")


# softcap and temperature are applied in float32 as x * (1 / value): both the value and its
# reciprocal must be normal float32 numbers, else every logit becomes 0, inf or NaN
_F32_MIN_NORMAL = 1.1754943508222875e-38
_SCALE_RANGE = (_F32_MIN_NORMAL, 1.0 / _F32_MIN_NORMAL)
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def _scalar(name: str, value, kind):
    """A Python number from ``value``: Python and numpy scalars and 0-d tensors are accepted."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar / 0-d
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an int" if kind is Integral else "a real number"
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return int(value) if kind is Integral else float(value)


def _scale(name: str, value) -> float:
    value = _scalar(name, value, Real)
    lo, hi = _SCALE_RANGE
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo:.3g}, {hi:.3g}] (it and its reciprocal must be "
                         f"normal float32 numbers), got {value!r}")
    return value


def options(ignore_index, shift, softcap, temperature):
    """Check the keyword options; returns ``(ignore_index, softcap, temperature)`` as Python
    numbers (numpy scalars and 0-d tensors are accepted)."""
    ignore_index = _scalar("ignore_index", ignore_index, Integral)
    if not _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {shift!r}")
    temperature = _scale("temperature", temperature)
    if softcap is not None:
        softcap = _scale("softcap", softcap)
    return ignore_index, softcap, temperature


def same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    named = [(name, t) for name, t in tensors.items() if t is not None]
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {named[0][0]} is on {device}: "
                "all tensors must be on one device"
            )
    return device


def leading_shape(name: str, x: torch.Tensor, targets: torch.Tensor, shift: bool) -> None:
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but {name} has shape {tuple(x.shape)}: "
            f"targets must have the leading shape {tuple(x.shape[:-1])}"
        )
    if shift and x.ndim < 2:
        raise ValueError(
            f"shift=True needs a sequence axis: {name} must be (..., T, width), "
            f"got shape {tuple(x.shape)}"
        )


def linear_shapes(hidden, weight, bias, suffix: str = "") -> None:
    """``hidden`` (..., D), ``weight`` (V, D) of the same dtype and ``bias`` (V,) or None;
    ``suffix`` names the model in the messages (``weight_base``, ...)."""
    w, h, b = "weight" + suffix, "hidden" + suffix, "bias" + suffix
    if weight.ndim != 2:
        raise ValueError(f"{w} must be 2-D (V, D), got shape {tuple(weight.shape)}")
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        hint = ""
        if weight.shape[0] == D:
            hint = " (it looks transposed: pass the nn.Linear / lm_head layout (V, D))"
        raise ValueError(
            f"{w} has shape {tuple(weight.shape)} but {h} has width D={D}: "
            f"{w} must be (V, {D}){hint}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w} dtype {weight.dtype} differs from {h} dtype {hidden.dtype}")
    if bias is not None:
        float_tensor(b, bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{b} has shape {tuple(bias.shape)} but {w} has V={weight.shape[0]} rows: "
                f"{b} must be ({weight.shape[0]},)"
            )


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two models' logits: the same positions and the same vocabulary."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape "
                         f"{tuple(b.shape)}: both models must give the same positions and "
                         "the same vocabulary size")


def same_lead(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two models' hidden states: the same positions (their widths may differ)."""
    if tuple(a.shape[:-1]) != tuple(b.shape[:-1]):
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape "
                         f"{tuple(b.shape)}: the leading shapes (positions) must match")


def same_vocabulary(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Two output layers: the same number of rows (the vocabulary size)."""
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape "
                         f"{tuple(b.shape)}: the two vocabularies must have the same size")


MAX_TOP_K = 64


def top_k(value, V: int) -> int:
    """``top_k`` as an int in ``[0, min(V, 64)]``, else ValueError naming it and its value."""
    bound = min(V, MAX_TOP_K)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= bound:
        raise ValueError(f"top_k must be an int in [0, {bound}] (min(V, {MAX_TOP_K}) with "
                         f"V={V}), got {value!r}")
    return int(value)


def scored_mask(targets: torch.Tensor, ignore_index) -> torch.Tensor:
    """The positions that are scored: ``targets != ignore_index``, compared in the value of
    ``ignore_index`` and not in the targets' dtype.

    The one place every op, ``perplexity`` and the metrics decide it. Comparing an int32 tensor
    with a Python int wraps the int to 32 bits (``2**40`` would ignore the targets equal to 0,
    ``2**32 + 7`` those equal to 7); an index that the dtype cannot hold equals no target, so
    every position is scored, as the same targets in int64 give.
    """
    ignore_index = _scalar("ignore_index", ignore_index, Integral)
    info = torch.iinfo(targets.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
    return targets != ignore_index


def scored_targets(targets: torch.Tensor, V: int, ignore_index: int, *, check: bool,
                   count: bool) -> tuple[torch.Tensor, Optional[int]]:
    """``(mask, n_scored)``: the mask :func:`scored_mask` and, with ``count``, its number of
    True elements (else None).

    With ``check``, every target must be ``ignore_index`` or lie in ``[0, V)``; the first one that
    is not raises ValueError naming its index and value. Checking and counting share one host
    sync; with neither there is none.
    """
    mask = scored_mask(targets, ignore_index)
    if targets.numel() == 0:
        return mask, 0
    if not check:
        return mask, int(mask.sum()) if count else None
    bad = mask & ((targets < 0) | (targets >= V))
    # one scalar read: the scored count, or -1 when some target is out of range
    n_scored = int(torch.where(bad.any(), -1, mask.sum() if count else 0))
    if n_scored < 0:
        flat = bad.reshape(-1).nonzero()[0, 0].item()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(targets.shape)))
        value = int(targets.reshape(-1)[flat])
        raise ValueError(
            f"targets{list(index)} = {value} is outside [0, {V}) and is not "
            f"ignore_index={ignore_index}"
        )
    return mask, n_scored if count else None
