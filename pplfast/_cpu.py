"""``backend="cpu"``: launchers for the native kernels in ``pplfast._C`` (csrc/cpu).

The kernels read fp32/fp16/bf16 logits in place through their strides; this module only checks
layouts, allocates outputs and passes pointers.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C

_DTYPE_CODE = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _softcap_arg(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else float(softcap)


def token_nll(logits3, targets, ignore_index, softcap, temperature) -> torch.Tensor:
    B, T, V = logits3.shape
    out = torch.empty(B * T, dtype=torch.float32)
    sB, sT, sV = logits3.stride()
    _C.token_nll(
        logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], B, T, V, sB, sT, sV,
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
        out.data_ptr(), _threads(),
    )
    return out


def new_state(rows: int):
    """Running state for :func:`lse_update`: (row_max=-inf, row_sum=0, target_logit=0)."""
    return (
        torch.full((rows,), float("-inf"), dtype=torch.float32),
        torch.zeros(rows, dtype=torch.float64),
        torch.zeros(rows, dtype=torch.float64),
    )


def lse_update(logits2, targets, v_offset, ignore_index, softcap, temperature,
               row_max, row_sum, target_logit) -> None:
    """Fold a ``(n, Vc)`` slab of logits (vocabulary columns ``v_offset ...``) into the state."""
    n, Vc = logits2.shape
    for name, t, dtype in (("row_max", row_max, torch.float32), ("row_sum", row_sum, torch.float64),
                           ("target_logit", target_logit, torch.float64),
                           ("targets", targets, torch.int64)):
        if t.dtype != dtype or t.shape != (n,) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU ({n},) {dtype} tensor")
    s_row, s_col = logits2.stride()
    _C.lse_update(
        logits2.data_ptr(), _DTYPE_CODE[logits2.dtype], n, Vc, s_row, s_col, int(v_offset),
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
        row_max.data_ptr(), row_sum.data_ptr(), target_logit.data_ptr(), _threads(),
    )


def lse_finish(row_max, row_sum, target_logit, targets, ignore_index) -> torch.Tensor:
    """NLL (float32) from the running state; 0 where ``targets == ignore_index``."""
    n = targets.shape[0]
    out = torch.empty(n, dtype=torch.float32)
    _C.lse_finish(row_max.data_ptr(), row_sum.data_ptr(), target_logit.data_ptr(),
                  targets.data_ptr(), ignore_index, n, out.data_ptr())
    return out


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature):
    from ._linear import cpu_linear_token_nll

    return cpu_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature)
