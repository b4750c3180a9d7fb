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


def _stats_outputs(n: int, top_k: int):
    """(nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs), NaN / garbage filled
    so that an element the kernel does not write shows."""
    return (torch.full((n,), float("nan")), torch.full((n,), float("nan")),
            torch.full((n,), float("nan")), torch.full((n,), -7, dtype=torch.int64),
            torch.full((n,), -7, dtype=torch.int64), torch.full((n, top_k), -7, dtype=torch.int64),
            torch.full((n, top_k), float("nan")))


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    B, T, V = logits3.shape
    out = _stats_outputs(B * T, top_k)
    sB, sT, sV = logits3.stride()
    _C.token_stats(
        logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], B, T, V, sB, sT, sV,
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature, top_k,
        *(t.data_ptr() for t in out), _threads(),
    )
    return out


def _target_thresholds(hidden2, weight, bias, targets, rows, softcap, temperature, step):
    """Each scored row's transformed target logit (float32), the rank's threshold: one dot
    product per row in float32, as the tiles' GEMM computes it, transformed in float64."""
    out = torch.empty(targets.shape[0], dtype=torch.float32)
    for r0 in range(0, targets.shape[0], step):
        t = targets[r0 : r0 + step]
        h = hidden2[r0 : r0 + step] if rows is None else hidden2.index_select(0, rows[r0 : r0 + step])
        z = (h.float() * weight.index_select(0, t).float()).sum(-1)
        if bias is not None:
            z = z + bias.index_select(0, t).float()
        z = z.double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out[r0 : r0 + step] = z / temperature
    return out


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k,
                       *, budget_mb: Optional[float] = None):
    """Statistics of ``F.linear(hidden2, weight, bias)`` through the CPU tile loop of the
    hidden-states NLL (``pplfast._linear.cpu_logit_tiles``), folded into a running state by the
    native ``stats_update``; the state is O(N · top_k), never N × V."""
    from ._linear import (DEFAULT_CPU_CHUNK_MB, ENV_CPU_CHUNK_MB, _budget_bytes, _select_scored,
                          cpu_logit_tiles)

    N = hidden2.shape[0]
    out = _stats_outputs(N, top_k)
    rows, scored_targets = _select_scored(targets, ignore_index)
    n = scored_targets.shape[0]
    k = top_k
    state = (
        torch.full((n,), float("-inf")), torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64), torch.full((n,), float("-inf")),
        torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.float64), torch.full((n, k), float("-inf")),
        torch.full((n, k), -1, dtype=torch.int64),
    )
    budget = _budget_bytes(ENV_CPU_CHUNK_MB, DEFAULT_CPU_CHUNK_MB, budget_mb)
    if n:
        step = max(1, budget // max(1, 8 * hidden2.shape[1]))
        threshold = _target_thresholds(hidden2, weight, bias, scored_targets, rows, softcap,
                                       temperature, step)
        for logits, v0, r0, m in cpu_logit_tiles(hidden2, weight, bias, rows, n, budget):
            s_row, s_col = logits.stride()
            _C.stats_update(
                logits.data_ptr(), _C.FLOAT32, m, logits.shape[1], s_row, s_col, v0,
                scored_targets[r0:].data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
                threshold[r0:].data_ptr(), k, *(s[r0:].data_ptr() for s in state), _threads(),
            )
    scored = _stats_outputs(n, k)
    row_max, row_sum, row_ent, _, amax_idx, rank, target_logit, top_vals, top_ids = state
    _C.stats_finish(
        row_max.data_ptr(), row_sum.data_ptr(), row_ent.data_ptr(), amax_idx.data_ptr(),
        rank.data_ptr(), target_logit.data_ptr(), scored_targets.data_ptr(), ignore_index, n, k,
        *(t.data_ptr() for t in scored[:5]), top_ids.data_ptr(), top_vals.data_ptr(),
    )
    scored = (*scored[:5], top_ids, top_vals)
    if rows is None:
        return scored
    fills = (0.0, 0.0, 0.0, -1, -1, -1, 0.0)
    for full, part, fill in zip(out, scored, fills):
        full.fill_(fill).index_copy_(0, rows, part)
    return out
