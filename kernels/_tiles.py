"""Tiles of the fused hidden-states kernels (``linear_token_nll``, ``linear_token_stats``): a
program's block of scored rows, a tile of logits computed from hidden states and the output
layer, and the target logits, computed the same way by every kernel that needs them so that all
report the same NLL.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import capped


@triton.jit
def block_rows(rows_ptr, n_rows, pid, BLOCK: tl.constexpr, HAS_ROWS: tl.constexpr):
    """Lanes ``offs`` of program ``pid``'s block of scored rows (``ok``: ``offs < n_rows``),
    ``safe``: past-the-end lanes clamped to the last row, so that loops over them need no row
    mask, and the rows they read: ``rows_ptr[safe]``, or ``safe`` when every row is scored."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    safe = tl.minimum(offs, n_rows - 1).to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + safe)
    else:
        rows = safe
    return offs, offs < n_rows, safe, rows


@triton.jit
def logits_tile(
    h_rows, w_ptr, b_ptr, v0, V, D, stride_hd, stride_wv, stride_wd, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``(z, offs_v)``: the soft-capped float32 logits of BLOCK_N rows (``h_rows``, their row
    pointers) and the BLOCK_V columns from ``v0``, -inf past V, and those columns' indices.

    ``tl.dot`` over D in steps of BLOCK_D. DOT_FP32 converts the operand tiles to float32 first
    (exact): Triton's interpreter multiplies bfloat16 tiles wrongly, so the statistics launcher
    sets it for bfloat16 CPU tensors; on a GPU it stays off and the tensor cores read the input
    dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    w_rows = w_ptr + tl.minimum(offs_v, V - 1).to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + offs_d).to(tl.int64)
        if EVEN_D:
            h = tl.load(h_rows + d[None, :] * stride_hd)
            w = tl.load(w_rows + d[None, :] * stride_wd)
        else:
            d_ok = (d0 + offs_d) < D
            h = tl.load(h_rows + d[None, :] * stride_hd, mask=d_ok[None, :], other=0.0)
            w = tl.load(w_rows + d[None, :] * stride_wd, mask=d_ok[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    z = capped(acc, col_ok[None, :], softcap, inv_softcap, HAS_SOFTCAP)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    return z, offs_v


@triton.jit
def target_logit(
    h_ptr, w_ptr, b_ptr, rows, target, D, stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, inv_softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Soft-capped ``z[target]`` of BLOCK_M rows (int64 ``rows``, ``target``): float32 products of
    ``hidden_row`` and ``weight[target]`` summed per block of D, plus the bias: the NLL
    kernel's finish and the statistics kernel take their target logits from here, so that both
    report the same NLL."""
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_rows = w_ptr + target[:, None] * stride_wv
    dot = tl.zeros((BLOCK_M,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        d = (d0 + offs_d).to(tl.int64)
        h = tl.load(h_rows + d[None, :] * stride_hd, mask=d_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + d[None, :] * stride_wd, mask=d_ok[None, :], other=0.0).to(tl.float32)
        dot += tl.sum(h * w, 1)
    if HAS_BIAS:
        dot += tl.load(b_ptr + target).to(tl.float32)
    return capped(dot, True, softcap, inv_softcap, HAS_SOFTCAP)
