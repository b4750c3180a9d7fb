"""Argument checks shared by every public function (DESIGN.md, "Bad input").

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong value or shape)
naming the argument and the offending value, before any kernel runs.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def float_tensor(name: str, x) -> None:
    tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")


def target_tensor(x) -> None:
    tensor("targets", x)
    if x.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32, got {x.dtype}")


def options(ignore_index, shift, softcap, temperature) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {shift!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, Real):
            raise TypeError(f"softcap must be None or a real number, got {softcap!r}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be finite and > 0, got {softcap!r}")


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


def linear_shapes(hidden, weight, bias) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        hint = ""
        if weight.shape[0] == D:
            hint = " (it looks transposed: pass the nn.Linear / lm_head layout (V, D))"
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden has width D={D}: "
            f"weight must be (V, {D}){hint}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias has shape {tuple(bias.shape)} but weight has V={weight.shape[0]} rows: "
                f"bias must be ({weight.shape[0]},)"
            )


def target_range(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every target must be ``ignore_index`` or lie in ``[0, V)``; one reduction, one sync."""
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        flat = bad.reshape(-1).nonzero()[0, 0].item()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(targets.shape)))
        value = int(targets.reshape(-1)[flat])
        raise ValueError(
            f"targets{list(index)} = {value} is outside [0, {V}) and is not "
            f"ignore_index={ignore_index}"
        )
