"""Fused per-token NLL from hidden states and the output layer; the logits never reach memory.

Algorithm. The scored rows (targets != ignore_index; ignored rows are dropped before launch and
cost nothing) are cut into blocks of BLOCK_N tokens and the vocabulary into tiles of BLOCK_V.
Program (i, s) owns token block i and the s-th contiguous range of vocabulary tiles: for each tile
it computes ``hidden_block @ weight_tile.T`` with ``tl.dot`` into a float32 accumulator (a loop
over D in steps of BLOCK_D), adds the bias, applies softcap, and folds the tile into a running
(max, sum of exp) per row with the online rules of ``_common`` (temperature folded into the
exponent), the sum kept in float64 so that the fold over hundreds of tiles adds no visible
rounding. The partial (max, sum) pairs go to a (splits, n) scratch. A second, small kernel merges
the splits of each row, a (BLOCK_M, BLOCK_S) tile of partials at a time, computes the target logit
as a float32 dot of ``hidden_i`` and ``weight[target_i]`` (blocked sum), and writes
``(max - z[target]) / temperature + log(sum)``, clamped at 0 (the true NLL is >= 0).

Splitting the vocabulary over programs keeps the GPU full when tokens are few (at most about
2 x SM count splits, so the merge reads few partials per row); when tokens are many the tiles of
one split are read by every token block at about the same time and stay in L2. All row,
vocabulary and partial offsets are 64-bit.

TF32 (``allow_tf32=True``, float32 inputs only). The tile products then run on TF32 tensor cores
(operands truncated to 10 mantissa bits, relative error < 2^-10 each) while the target logit is
an IEEE float32 dot, so the two differ by up to about 2^-9 * sum_d |h_d * w_{v,d}| per logit and
the NLL by up to 2^-8 * max_v sum_d |h_d * w_{v,d}| / temperature (IEEE float32: about
D * 2^-24 times that sum). Without the clamp a confident token would get NLL ~ -1e-3 * |z|.

The caller picks this kernel only on GPUs it covers (CUDA capability >= 8.0) and passes the
device facts and switches (SM count, TF32, autotuning) as arguments: nothing here reads the
environment or the rest of the package.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E, device_guard, exp2_shifted, merge, nll_from_lse, rescale
from ._plan import (FUSED_INTERPRETER_CONFIG, FUSED_SPLIT_ALIGN, choose_splits, finish_block,
                    launch_rows, split_columns)
from ._tiles import block_rows, logits_tile, target_logit


@triton.jit
def _lse_partial_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, part_max_ptr, part_sum_ptr,
    n_rows, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    cols_per_split, softcap, inv_softcap, exp2_scale,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(1)
    offs_n, row_ok, safe_n, rows = block_rows(rows_ptr, n_rows, tl.program_id(0), BLOCK_N,
                                              HAS_ROWS)
    h_rows = h_ptr + rows[:, None] * stride_hn

    # cols_per_split is a multiple of BLOCK_V, so tiles never straddle two splits
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        z, offs_v = logits_tile(h_rows, w_ptr, b_ptr, v0, V, D, stride_hd, stride_wv, stride_wd,
                                softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_D, False,
                                INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        tile_max = tl.max(z, 1)
        tile_sum = tl.sum(exp2_shifted(z, tile_max[:, None], exp2_scale), 1)
        row_max, row_sum = merge(row_max, row_sum, tile_max, tile_sum.to(tl.float64), exp2_scale)

    part = pid_s.to(tl.int64) * n_rows + offs_n
    tl.store(part_max_ptr + part, row_max, mask=row_ok)
    tl.store(part_sum_ptr + part, row_sum, mask=row_ok)


@triton.jit
def _finish_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    n_rows, D, stride_hn, stride_hd, stride_wv, stride_wd, splits,
    softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs, ok, safe, rows = block_rows(rows_ptr, n_rows, tl.program_id(0), BLOCK_M, HAS_ROWS)
    target = tl.load(targets_ptr + rows)

    # merge the split partials, a (BLOCK_M, BLOCK_S) tile of independent loads at a time
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float64)
    offs_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, splits, BLOCK_S):
        s_ok = (s0 + offs_s) < splits
        part = (s0 + offs_s).to(tl.int64)[None, :] * n_rows + safe[:, None]
        part_max = tl.load(part_max_ptr + part, mask=s_ok[None, :], other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part, mask=s_ok[None, :], other=0.0)
        tile_max = tl.max(part_max, 1)
        weight = rescale(part_max, tile_max[:, None], exp2_scale).to(tl.float64)
        tile_sum = tl.sum(part_sum * weight, 1)
        row_max, row_sum = merge(row_max, row_sum, tile_max, tile_sum, exp2_scale)

    dot = target_logit(h_ptr, w_ptr, b_ptr, rows, target, D, stride_hn, stride_hd, stride_wv,
                       stride_wd, softcap, inv_softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_M, BLOCK_D)
    nll = nll_from_lse(row_max, row_sum, dot, inv_temp)
    tl.store(out_ptr + rows, nll, mask=ok)


# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) per operand size in bytes. Shared memory
# for the pipelined operand tiles is (BLOCK_N + BLOCK_V) * BLOCK_D * bytes * (num_stages - 1).
_CONFIGS_BIG_SMEM = {2: (128, 256, 64, 8, 3), 4: (128, 128, 32, 8, 3)}  # sm_90/sm_100, 228 KiB
_CONFIGS_A100 = {2: (128, 128, 64, 8, 3), 4: (128, 128, 32, 8, 3)}      # sm_80, 164 KiB
# sm_86 / sm_89 / sm_120: about 100 KiB per SM. 8 warps hold the 128 x 128 float32 accumulator
# in 64 registers per thread; with 4 warps (128 per thread) ptxas spilled at 255 registers.
_CONFIGS_SMALL_SMEM = {2: (128, 128, 32, 8, 3), 4: (128, 128, 32, 8, 3)}

_AUTOTUNE_SPACE = [
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
]


def config_for(capability: Optional[tuple], dtype: torch.dtype) -> tuple:
    """The fixed configuration for a CUDA capability ``(major, minor)`` (None: the interpreter)."""
    if capability is None:
        return FUSED_INTERPRETER_CONFIG
    nbytes = 4 if dtype == torch.float32 else 2
    if capability[0] in (9, 10):
        return _CONFIGS_BIG_SMEM[nbytes]
    if capability == (8, 0):
        return _CONFIGS_A100[nbytes]
    return _CONFIGS_SMALL_SMEM[nbytes]


_autotuned = None


def _autotuned_kernel():
    global _autotuned
    if _autotuned is None:
        configs = [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bv, bd, w, s in _AUTOTUNE_SPACE
        ]
        _autotuned = triton.autotune(configs=configs, key=["V", "D", "cols_per_split"])(
            _lse_partial_kernel
        )
    return _autotuned


def linear_token_nll_forward(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                             *, sm_count: Optional[int] = None, allow_tf32: bool = False,
                             autotune: bool = False, rows: Optional[torch.Tensor] = None,
                             all_scored: bool = False, config: Optional[tuple] = None,
                             splits: Optional[int] = None) -> torch.Tensor:
    """Fused Triton launcher behind ``linear_token_nll(..., backend="triton")``.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16, any strides; weight: ``(V, D)`` same dtype;
            bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 contiguous, in ``[0, V)`` or ``== ignore_index``.
        ignore_index, softcap (None or > 0), temperature (> 0): as in ``token_nll``.
        sm_count: streaming multiprocessors of the device (CUDA tensors: required unless
            ``splits`` is given; CPU tensors under the interpreter: 1).
        allow_tf32: float32 inputs use TF32 tensor-core products (see the module notes).
        autotune: autotune the tile configuration per (V, D) instead of the fixed one.
        rows: int64 indices of the scored rows when the caller has them (None: found here,
            one host sync, unless ``all_scored``).
        all_scored: the caller knows that every row is scored (``rows`` is then None): no
            search, no sync.
        config: ``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)`` to override the fixed one.
        splits: number of vocabulary ranges per token block (default: chosen to fill the GPU).

    Returns:
        ``(N,)`` float32, equal to ``F.cross_entropy(z.double(), targets, reduction="none",
        ignore_index=ignore_index)`` with ``z = F.linear(hidden2, weight, bias)`` soft-capped and
        divided by temperature (clamped at 0 where rounding would leave it below).
    """
    N, D = hidden2.shape
    V = weight.shape[0]
    device = hidden2.device
    on_gpu = hidden2.is_cuda
    rows, n, sm_count = launch_rows(targets, ignore_index, rows, all_scored, sm_count, splits,
                                    on_gpu)
    out = torch.zeros(N, dtype=torch.float32, device=device)
    if n == 0 or V == 0:
        return out

    autotune = autotune and config is None and on_gpu
    capability = torch.cuda.get_device_capability(device) if on_gpu else None
    block_n, block_v, block_d, num_warps, num_stages = config or config_for(capability,
                                                                            hidden2.dtype)
    if splits is None:
        splits = choose_splits(n, V, block_n, block_v, sm_count)
    splits, cols_per_split = split_columns(V, splits, FUSED_SPLIT_ALIGN if autotune else block_v)
    part_max = torch.empty((splits, n), dtype=torch.float32, device=device)
    part_sum = torch.empty((splits, n), dtype=torch.float64, device=device)

    has_bias = bias is not None
    bias_arg = bias if has_bias else hidden2  # never read without HAS_BIAS
    rows_arg = rows if rows is not None else targets  # never read without HAS_ROWS
    cap = 1.0 if softcap is None else float(softcap)
    scalars = (cap, 1.0 / cap, LOG2E.value / float(temperature))
    precision = "tf32" if allow_tf32 and hidden2.dtype == torch.float32 else "ieee"
    common = dict(HAS_ROWS=rows is not None, HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None)
    args = (hidden2, weight, bias_arg, rows_arg, part_max, part_sum, n, V, D,
            hidden2.stride(0), hidden2.stride(1), weight.stride(0), weight.stride(1),
            cols_per_split, *scalars)
    with device_guard(hidden2):
        if autotune:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
            # every BLOCK_D in the search space divides 64
            _autotuned_kernel()[grid](*args, EVEN_D=D % 64 == 0, INPUT_PRECISION=precision,
                                      **common)
        else:
            _lse_partial_kernel[(triton.cdiv(n, block_n), splits)](
                *args, EVEN_D=D % block_d == 0, INPUT_PRECISION=precision,
                BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
                num_warps=num_warps, num_stages=num_stages, **common,
            )
        block_m = 32 if on_gpu else 16
        _finish_kernel[(triton.cdiv(n, block_m),)](
            hidden2, weight, bias_arg, rows_arg, targets, part_max, part_sum, out,
            n, D, hidden2.stride(0), hidden2.stride(1), weight.stride(0), weight.stride(1),
            splits, *scalars, 1.0 / float(temperature),
            BLOCK_M=block_m, BLOCK_S=finish_block(splits),
            BLOCK_D=64, num_warps=4, **common,
        )
    return out
