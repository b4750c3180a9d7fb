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


def compare_state(rows: int) -> torch.Tensor:
    """Fresh running state of :func:`compare_update`: ``(rows, _C.COMPARE_STATE)`` float64."""
    state = torch.empty((rows, _C.COMPARE_STATE), dtype=torch.float64)
    _C.compare_init(state.data_ptr(), rows)
    return state


def compare_update(base3, test3, targets, v_offset, ignore_index, softcap, temperature,
                   state) -> None:
    """Fold ``(B, T, Vc)`` slabs of both models' logits (vocabulary columns ``v_offset ...``)
    into ``state`` (rows ``B * T``); both tensors any strides and dtype."""
    B, T, Vc = base3.shape
    if test3.shape != base3.shape:
        raise ValueError(f"test slab {tuple(test3.shape)} differs from base {tuple(base3.shape)}")
    if (state.dtype != torch.float64 or state.shape != (B * T, _C.COMPARE_STATE)
            or not state.is_contiguous() or targets.shape != (B * T,)
            or targets.dtype != torch.int64 or not targets.is_contiguous()):
        raise ValueError(f"state must be a contiguous ({B * T}, {_C.COMPARE_STATE}) float64 "
                         f"tensor and targets a contiguous ({B * T},) int64 tensor")
    if B * T == 0 or Vc == 0:
        return
    _C.compare_update(
        base3.data_ptr(), _DTYPE_CODE[base3.dtype], *base3.stride(),
        test3.data_ptr(), _DTYPE_CODE[test3.dtype], *test3.stride(),
        B * T, T, Vc, int(v_offset), targets.data_ptr(), ignore_index, _softcap_arg(softcap),
        temperature, state.data_ptr(), _threads(),
    )


def compare_finish(state, targets, ignore_index):
    """``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)`` from the state."""
    n = targets.shape[0]
    floats = [torch.empty(n, dtype=torch.float32) for _ in range(4)]
    ints = [torch.empty(n, dtype=torch.int64) for _ in range(2)]
    _C.compare_finish(state.data_ptr(), targets.data_ptr(), ignore_index, n,
                      *(t.data_ptr() for t in floats), *(t.data_ptr() for t in ints))
    return (*floats, *ints)


def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    B, T, _ = logits3_base.shape
    state = compare_state(B * T)
    compare_update(logits3_base, logits3_test, targets, 0, ignore_index, softcap, temperature,
                   state)
    return compare_finish(state, targets, ignore_index)


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature):
    from ._linear import cpu_linear_compare

    return cpu_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                              bias_test, targets, ignore_index, softcap, temperature)
