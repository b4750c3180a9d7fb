"""Fused per-token statistics from hidden states and the output layer: NLL, entropy, max
log-probability, argmax and target rank (``linear_token_stats`` with ``top_k=0``); the logits
never reach memory.

Algorithm. The tiling is that of ``linear_token_nll.py`` (``_tiles.logits_tile``): the scored rows
(ignored rows are dropped before launch) are cut into blocks of BLOCK_N tokens and the
vocabulary into tiles of BLOCK_V, grouped into ``splits`` contiguous ranges; program (i, s)
computes each tile of its range with ``tl.dot`` into float32, adds the bias, applies softcap, and
folds the tile into a running state per row:

- ``(m, s)``, the maximum and the float64 sum of ``exp((z - m) / T)``: folded exactly as the NLL
  kernel folds them (``_common.merge``), so the NLL is that kernel's, bit for bit, for the same
  tiles and splits;
- ``e``, the float64 entropy moment ``sum exp(d) d``, ``d = (z - m) / T`` (``z - m`` halved
  first, ``_common.half_diff``, so that no difference overflows): each tile's relative to its own
  maximum, moved to the running one with ``_common.rescale_moment``
  (``e' = a (e + (m - m') / T s)``); at the end ``entropy = log s - e / s`` and
  ``max log p = -log s`` (``_common.stats_finish``, also its special-value rules). ``m`` and the
  target logit stay in the units of the logits: the temperature never scales them;
- the argmax: each tile's maximum and the lowest column holding it replace the running pair only
  when strictly larger, so the lowest index wins ties between tiles;
- the rank: the count of columns v != target with ``z_v > z_target``.

The target logit is known before the tile loop: a first small kernel computes it per row as the
NLL kernel's finish kernel does (``_tiles.target_logit``: float32 products of
``hidden_i`` and ``weight[target_i]`` summed per block of D, bias, softcap) and stores it; the
NLL and the rank both use that value. Ties. The target's own column is left out of the count: its
tile value (a ``tl.dot`` product) and the stored value are summed in different orders, and the
target would count itself wherever the first rounds above the second. Another column within that
rounding difference of the target logit (IEEE float32 products: about D x 2^-24 x
sum_d |h_d w_vd|) is a tie, where either count is right (docs/ops.md, "Token statistics"); the argmax
compares tile values only, all rounded alike, so exact ties go to the lowest index. With TF32
products (float32 inputs, TF32 asked for) the band is TF32's (``linear_token_nll.py``), wider
than one float32 ulp: argmax and rank are exact only outside it.

Each program writes its partial state per row to (splits, n) scratch; a finish kernel merges the
splits of a row in column order, a (BLOCK_M, BLOCK_S) tile of partials at a time (argmax: the
largest value, then the lowest index holding it), and writes the fields at the row's position.
Ignored rows are never read and keep 0 (float fields) and -1 (integer fields).

Special values (``_common``): NaN reaches the row's sum, where it is detected (``s != s``): nll,
entropy and max log p are NaN, argmax and rank stay in range. -inf entries add 0 to ``s`` and
``e``; a +inf logit gives m = +inf, so entropy and max log p are NaN (inf - inf) as in the
float64 reference and the NLL is +inf (NaN where the target is +inf); an all -inf row is NaN.

Top-k is not folded here: ``pplfast._triton`` sends ``top_k > 0`` to the chunked GEMM path.
Fixed configurations (``config_for``; no autotuning); nothing here reads the environment or the
rest of the package.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, NO_INDEX, argmax_fold, device_guard, exp2_shifted, half_diff, merge,
                      nll_from_lse, rescale, rescale_moment, stats_finish)
from ._plan import FUSED_INTERPRETER_CONFIG, choose_splits, finish_block, launch_rows, split_columns
from ._tiles import block_rows, logits_tile, target_logit


@triton.jit
def _fold(row_max, row_sum, row_ent, blk_max, blk_sum, blk_ent, exp2_scale, inv_temp):
    """Merge a block's (max, sum, entropy moment) into the running state, elementwise: the sum
    by ``_common.merge`` (the NLL kernel's), the moment by ``_common.rescale_moment``."""
    new_max, new_sum = merge(row_max, row_sum, blk_max, blk_sum, exp2_scale)
    _, ent_a = rescale_moment(row_sum, row_ent, row_max, new_max, inv_temp)
    _, ent_b = rescale_moment(blk_sum, blk_ent, blk_max, new_max, inv_temp)
    return new_max, new_sum, ent_a + ent_b


@triton.jit
def _target_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, target_z_ptr,
    n_rows, D, stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_softcap,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs, ok, safe, rows = block_rows(rows_ptr, n_rows, tl.program_id(0), BLOCK_M, HAS_ROWS)
    target = tl.load(targets_ptr + rows)
    z = target_logit(h_ptr, w_ptr, b_ptr, rows, target, D, stride_hn, stride_hd, stride_wv,
                     stride_wd, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_D)
    tl.store(target_z_ptr + offs, z, mask=ok)


@triton.jit
def _stats_partial_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, target_z_ptr,
    part_max_ptr, part_sum_ptr, part_ent_ptr, part_best_ptr, part_arg_ptr, part_rank_ptr,
    n_rows, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    cols_per_split, softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(1)
    offs_n, row_ok, safe_n, rows = block_rows(rows_ptr, n_rows, tl.program_id(0), BLOCK_N,
                                              HAS_ROWS)
    target = tl.load(targets_ptr + rows).to(tl.int32)
    target_z = tl.load(target_z_ptr + safe_n)
    h_rows = h_ptr + rows[:, None] * stride_hn

    # cols_per_split is a multiple of BLOCK_V, so tiles never straddle two splits
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float64)
    row_ent = tl.zeros((BLOCK_N,), tl.float64)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_arg = tl.full((BLOCK_N,), NO_INDEX, tl.int32)
    above = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        z, offs_v = logits_tile(h_rows, w_ptr, b_ptr, v0, V, D, stride_hd, stride_wv, stride_wd,
                                softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_D, DOT_FP32,
                                INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        tile_max = tl.max(z, 1)
        p = exp2_shifted(z, tile_max[:, None], exp2_scale)
        tile_sum = tl.sum(p, 1)
        # entropy moment relative to the tile's maximum, in halves (times 2 / T once per row);
        # exp(-inf) * -inf and underflowed terms add 0
        rel = half_diff(z, tile_max[:, None])
        tile_ent = tl.sum(tl.where(p > 0, p * rel, 0.0), 1) * (2.0 * inv_temp)
        row_max, row_sum, row_ent = _fold(row_max, row_sum, row_ent, tile_max,
                                          tile_sum.to(tl.float64), tile_ent.to(tl.float64),
                                          exp2_scale, inv_temp)
        # the lowest column holding the maximum (masked columns hold -inf too: never them).
        # Not tl.max(..., return_indices=True): the interpreter's argmax raises on a NaN row.
        at_max = (z == tile_max[:, None]) & (offs_v < V)[None, :]
        first = tl.min(tl.where(at_max, offs_v[None, :], NO_INDEX), 1)
        best, best_arg = argmax_fold(best, best_arg, tile_max, first)
        higher = (z > target_z[:, None]) & (offs_v[None, :] != target[:, None])
        above += tl.sum(higher.to(tl.int32), 1)

    part = pid_s.to(tl.int64) * n_rows + offs_n
    tl.store(part_max_ptr + part, row_max, mask=row_ok)
    tl.store(part_sum_ptr + part, row_sum, mask=row_ok)
    tl.store(part_ent_ptr + part, row_ent, mask=row_ok)
    tl.store(part_best_ptr + part, best, mask=row_ok)
    tl.store(part_arg_ptr + part, best_arg, mask=row_ok)
    tl.store(part_rank_ptr + part, above, mask=row_ok)


@triton.jit
def _stats_finish_kernel(
    rows_ptr, target_z_ptr,
    part_max_ptr, part_sum_ptr, part_ent_ptr, part_best_ptr, part_arg_ptr, part_rank_ptr,
    nll_ptr, ent_ptr, mlp_ptr, argmax_ptr, rank_ptr,
    n_rows, splits, exp2_scale, inv_temp,
    HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    offs, ok, safe, rows = block_rows(rows_ptr, n_rows, tl.program_id(0), BLOCK_M, HAS_ROWS)

    # merge the split partials in column order, a (BLOCK_M, BLOCK_S) tile at a time; (max, sum)
    # exactly as the NLL kernel's finish
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float64)
    row_ent = tl.zeros((BLOCK_M,), tl.float64)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_arg = tl.full((BLOCK_M,), NO_INDEX, tl.int32)
    rank = tl.zeros((BLOCK_M,), tl.int32)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, splits, BLOCK_S):
        s_ok = ((s0 + offs_s) < splits)[None, :]
        part = (s0 + offs_s).to(tl.int64)[None, :] * n_rows + safe[:, None]
        part_max = tl.load(part_max_ptr + part, mask=s_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part, mask=s_ok, other=0.0)
        part_ent = tl.load(part_ent_ptr + part, mask=s_ok, other=0.0)
        part_best = tl.load(part_best_ptr + part, mask=s_ok, other=float("-inf"))
        part_arg = tl.load(part_arg_ptr + part, mask=s_ok, other=NO_INDEX)
        rank += tl.sum(tl.load(part_rank_ptr + part, mask=s_ok, other=0), 1)

        blk_max = tl.max(part_max, 1)
        weight = rescale(part_max, blk_max[:, None], exp2_scale).to(tl.float64)
        blk_sum = tl.sum(part_sum * weight, 1)
        _, part_ent = rescale_moment(part_sum, part_ent, part_max, blk_max[:, None], inv_temp)
        blk_ent = tl.sum(part_ent, 1)
        row_max, row_sum, row_ent = _fold(row_max, row_sum, row_ent, blk_max, blk_sum, blk_ent,
                                          exp2_scale, inv_temp)

        found = part_arg != NO_INDEX
        blk_best = tl.max(tl.where(found, part_best, float("-inf")), 1)
        blk_arg = tl.min(tl.where(found & (part_best == blk_best[:, None]), part_arg, NO_INDEX),
                         1)
        best, best_arg = argmax_fold(best, best_arg, blk_best, blk_arg)

    target_z = tl.load(target_z_ptr + safe)
    nll = nll_from_lse(row_max, row_sum, target_z, inv_temp)
    nan = row_sum != row_sum
    _, entropy, max_logprob, _, _ = stats_finish(row_max, row_sum.to(tl.float32),
                                                 row_ent.to(tl.float32), nan, target_z, ok,
                                                 inv_temp)
    tl.store(nll_ptr + rows, nll, mask=ok)
    tl.store(ent_ptr + rows, entropy, mask=ok)
    tl.store(mlp_ptr + rows, max_logprob, mask=ok)
    # a NaN row may have found no maximum: any index in range will do there
    tl.store(argmax_ptr + rows, tl.where(best_arg == NO_INDEX, 0, best_arg).to(tl.int64),
             mask=ok)
    tl.store(rank_ptr + rows, rank.to(tl.int64), mask=ok)


# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) per operand size in bytes, every GPU of
# capability >= 8.0. The NLL kernel's 128 x 128 / 128 x 256 tiles leave too few registers for
# the statistics' extra reductions (ptxas spilled at 255 registers on sm_80 / sm_86, and sat at
# 253-255 on sm_90): 64 columns per tile keep each thread near 180 registers everywhere (the
# compile test). Untuned: no GPU measurement has compared configurations yet.
_CONFIGS = {2: (128, 64, 64, 8, 3), 4: (128, 64, 32, 8, 3)}


def config_for(capability: Optional[tuple], dtype: torch.dtype) -> tuple:
    """The fixed configuration for a CUDA capability ``(major, minor)`` (None: the interpreter)."""
    if capability is None:
        return FUSED_INTERPRETER_CONFIG
    return _CONFIGS[4 if dtype == torch.float32 else 2]


def linear_token_stats_forward(hidden2, weight, bias, targets, ignore_index, softcap,
                               temperature, *, sm_count: Optional[int] = None,
                               allow_tf32: bool = False, rows: Optional[torch.Tensor] = None,
                               all_scored: bool = False, config: Optional[tuple] = None,
                               splits: Optional[int] = None) -> tuple:
    """Fused Triton launcher behind ``linear_token_stats(..., top_k=0, backend="triton")``.

    Args:
        hidden2, weight, bias, targets, ignore_index, softcap, temperature, sm_count, allow_tf32,
            rows, all_scored, config, splits: as in
            :func:`pplfast.kernels.linear_token_nll.linear_token_nll_forward` (``config``
            defaults to this module's :func:`config_for`; no autotuning).

    Returns:
        ``(nll, entropy, max_logprob, argmax, rank)``, each ``(N,)``, float32 for the first three
        and int64 for the others: the fields of ``pplfast.TokenStats`` of
        ``z = F.linear(hidden2, weight, bias)`` soft-capped and divided by temperature; ``nll``
        is what ``linear_token_nll_forward`` returns with the same ``config`` and ``splits``.
        Ignored rows: 0 and -1.
    """
    N, D = hidden2.shape
    V = weight.shape[0]
    device = hidden2.device
    on_gpu = hidden2.is_cuda
    rows, n, sm_count = launch_rows(targets, ignore_index, rows, all_scored, sm_count, splits,
                                    on_gpu)
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    fields = (torch.zeros(N, **f32), torch.zeros(N, **f32), torch.zeros(N, **f32),
              torch.full((N,), -1, **i64), torch.full((N,), -1, **i64))
    if n == 0 or V == 0:
        return fields

    capability = torch.cuda.get_device_capability(device) if on_gpu else None
    block_n, block_v, block_d, num_warps, num_stages = config or config_for(capability,
                                                                            hidden2.dtype)
    if splits is None:
        splits = choose_splits(n, V, block_n, block_v, sm_count)
    splits, cols_per_split = split_columns(V, splits, block_v)
    target_z = torch.empty(n, **f32)
    part_max, part_best = (torch.empty((splits, n), **f32) for _ in range(2))
    part_sum, part_ent = (torch.empty((splits, n), dtype=torch.float64, device=device)
                          for _ in range(2))
    part_arg, part_rank = (torch.empty((splits, n), dtype=torch.int32, device=device)
                           for _ in range(2))
    parts = (part_max, part_sum, part_ent, part_best, part_arg, part_rank)

    has_bias = bias is not None
    bias_arg = bias if has_bias else hidden2  # never read without HAS_BIAS
    rows_arg = rows if rows is not None else targets  # never read without HAS_ROWS
    cap = 1.0 if softcap is None else float(softcap)
    inv_temp = 1.0 / float(temperature)
    exp2_scale = LOG2E.value / float(temperature)
    precision = "tf32" if allow_tf32 and hidden2.dtype == torch.float32 else "ieee"
    flags = dict(HAS_ROWS=rows is not None, HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None)
    strides = (hidden2.stride(0), hidden2.stride(1), weight.stride(0), weight.stride(1))
    # the target logits as linear_token_nll's finish kernel computes them (same blocks, warps)
    block_m = 32 if on_gpu else 16
    with device_guard(hidden2):
        _target_kernel[(triton.cdiv(n, block_m),)](
            hidden2, weight, bias_arg, rows_arg, targets, target_z, n, D, *strides, cap,
            1.0 / cap, BLOCK_M=block_m, BLOCK_D=64, num_warps=4, **flags,
        )
        _stats_partial_kernel[(triton.cdiv(n, block_n), splits)](
            hidden2, weight, bias_arg, rows_arg, targets, target_z, *parts, n, V, D, *strides,
            cols_per_split, cap, 1.0 / cap, exp2_scale, inv_temp,
            EVEN_D=D % block_d == 0, DOT_FP32=not on_gpu and hidden2.dtype == torch.bfloat16,
            INPUT_PRECISION=precision, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages, **flags,
        )
        _stats_finish_kernel[(triton.cdiv(n, block_m),)](
            rows_arg, target_z, *parts, *fields, n, splits, exp2_scale, inv_temp,
            HAS_ROWS=rows is not None, BLOCK_M=block_m,
            BLOCK_S=finish_block(splits), num_warps=4,
        )
    return fields
