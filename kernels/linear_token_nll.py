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

from ._common import LOG2E, capped, device_guard, exp2_shifted, merge, nll_from_lse, rescale


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
def target_logit(
    h_ptr, w_ptr, b_ptr, rows, target, D, stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, inv_softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Soft-capped ``z[target]`` of BLOCK_M rows (int64 ``rows``, ``target``): float32 products of
    ``hidden_row`` and ``weight[target]`` summed per block of D, plus the bias. The statistics
    kernel (``linear_token_stats.py``) takes its target logits from here too, so that both
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
_CONFIG_INTERPRETER = (16, 32, 32, 1, 1)

_AUTOTUNE_SPACE = [
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
]
# Every BLOCK_V in the search space divides this, so the split ranges do not depend on the
# configuration the autotuner picks.
_SPLIT_ALIGN = 256
# Partials merged per step by the finish kernel: splits <= 2 x SM count, a few steps at most.
_FINISH_BLOCK_S = 32


def config_for(capability: Optional[tuple], dtype: torch.dtype) -> tuple:
    """The fixed configuration for a CUDA capability ``(major, minor)`` (None: the interpreter)."""
    if capability is None:
        return _CONFIG_INTERPRETER
    nbytes = 4 if dtype == torch.float32 else 2
    if capability[0] in (9, 10):
        return _CONFIGS_BIG_SMEM[nbytes]
    if capability == (8, 0):
        return _CONFIGS_A100[nbytes]
    return _CONFIGS_SMALL_SMEM[nbytes]


def choose_splits(n_rows: int, V: int, block_n: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits so that about 8 waves of programs run (1 when tokens alone fill them),
    at most 2 x ``sm_count``."""
    token_blocks = triton.cdiv(n_rows, block_n)
    target = 8 * sm_count
    return max(1, min(triton.cdiv(V, block_v), triton.cdiv(target, token_blocks), 2 * sm_count))


def split_columns(V: int, splits: int, align: int) -> tuple:
    """``(splits, cols_per_split)``: ranges of whole ``align`` multiples, none empty."""
    cols = triton.cdiv(triton.cdiv(V, max(1, splits)), align) * align
    return triton.cdiv(V, cols), cols


def scored_rows(targets: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """int64 indices of the rows whose target is not ``ignore_index``, None when that is every
    row (one host sync: the launchers call it only when the caller did not say)."""
    scored = targets != ignore_index
    return None if bool(scored.all()) else scored.nonzero().squeeze(1)


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


def launch_rows(targets, ignore_index, rows, all_scored, sm_count, splits, on_gpu):
    """The fused launchers' common start: ``(rows, n, sm_count)``, the scored rows (None: all of
    them), their count, and the SM count (1 under the interpreter; CUDA tensors need it unless
    the caller fixes ``splits``)."""
    if sm_count is None:
        if on_gpu and splits is None:
            raise ValueError("sm_count is required for CUDA tensors (or pass splits)")
        sm_count = 1
    if all_scored and rows is not None:
        raise ValueError("pass either rows or all_scored=True, not both")
    if rows is None and not all_scored:
        rows = scored_rows(targets, ignore_index)
    return rows, targets.numel() if rows is None else rows.numel(), sm_count


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
    splits, cols_per_split = split_columns(V, splits, _SPLIT_ALIGN if autotune else block_v)
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
            BLOCK_M=block_m, BLOCK_S=min(_FINISH_BLOCK_S, max(2, triton.next_power_of_2(splits))),
            BLOCK_D=64, num_warps=4, **common,
        )
    return out
