"""Fused per-token NLL from hidden states and the output layer; the logits never reach memory.

Algorithm. The scored rows (targets != ignore_index; ignored rows are dropped before launch and
cost nothing) are cut into blocks of BLOCK_N tokens and the vocabulary into tiles of BLOCK_V.
Program (i, s) owns token block i and the s-th contiguous range of vocabulary tiles: for each tile
it computes ``hidden_block @ weight_tile.T`` with ``tl.dot`` into a float32 accumulator (a loop
over D in steps of BLOCK_D), adds the bias, applies softcap and temperature, and folds the tile
into a running (max, sum of exp) per row — online logsumexp in base 2, the sum kept in float64 so
that the fold over hundreds of tiles adds no visible rounding. The partial (max, sum) pairs go to
a (splits, n) scratch. A second, small kernel merges the splits of each row and computes the
target logit as an exact float32 dot of ``hidden_i`` and ``weight[target_i]`` (blocked sum), so
the NLL is ``lse - z[target]`` with no gather from the tile loop.

Splitting the vocabulary over programs keeps the GPU full when tokens are few; when they are many
the tiles of one split are read by every token block at about the same time and stay in L2.
All row, vocabulary and partial offsets are 64-bit.

Environment (read at call time):

=========================  ======================================================================
``PPLFAST_ALLOW_TF32=1``   float32 inputs use TF32 tensor-core products (default: IEEE float32;
                           PyTorch's ``torch.backends.cuda.matmul.allow_tf32 = True`` asks for
                           TF32 too, as it does for the cuBLAS GEMMs of the chunked paths).
``PPLFAST_AUTOTUNE=1``     autotune the tile configuration per (V, D, dtype) instead of using
                           the configuration fixed per GPU family.
=========================  ======================================================================

GPUs the fused kernel does not cover (CUDA capability < 8.0) go to the chunked GEMM path of
``pplfast._linear``, which reduces each chunk of logits with the fused logits kernel. Its logits
buffer is float32 where PyTorch has an fp32-output GEMM for the inputs (fp16/bf16 logits then
are not rounded to the input dtype) and in the input dtype, as ``F.linear`` gives them, elsewhere.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels spell these constants as literals: compiled Triton code may read no global that is not
# a tl.constexpr (a plain float runs under the interpreter but is a NameError when compiled).

ENV_ALLOW_TF32 = "PPLFAST_ALLOW_TF32"
ENV_AUTOTUNE = "PPLFAST_AUTOTUNE"


@triton.jit
def _tanh(x):
    # tanh via exp2 (no libdevice); a short odd series near 0 where 1 - exp(-2|x|) would cancel
    ax = tl.abs(x)
    t = tl.exp2(-2.8853900817779268 * ax)  # -2 log2(e)
    far = (1.0 - t) / (1.0 + t)
    x2 = x * x
    near = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    r = tl.where(ax < 0.25, near, far)
    return tl.where(x < 0, -r, r)


@triton.jit
def _lse_partial_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, part_max_ptr, part_sum_ptr,
    n_rows, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
    cols_per_split, softcap, scale,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    # out-of-range lanes read a valid row (the last one) so the inner loop needs no row mask
    safe_n = tl.minimum(offs_n, n_rows - 1).to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + safe_n)
    else:
        rows = safe_n
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows[:, None] * stride_hn

    # cols_per_split is a multiple of BLOCK_V, so tiles never straddle two splits
    v_lo = pid_s * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float64)
    for v0 in range(v_lo, v_hi, BLOCK_V):
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
            acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)
            acc += bias[None, :]
        if HAS_SOFTCAP:
            acc = softcap * _tanh(acc / softcap)
        # base-2 logits: z * log2(e) / temperature
        z = tl.where(col_ok[None, :], acc * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, 1))
        # a row whose entries so far are all -inf keeps a finite shift (no inf - inf)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        tile_sum = tl.sum(tl.exp2(z - shift[:, None]), 1)
        row_sum = row_sum * tl.exp2(row_max - shift).to(tl.float64) + tile_sum.to(tl.float64)
        row_max = new_max

    part = pid_s.to(tl.int64) * n_rows + offs_n
    tl.store(part_max_ptr + part, row_max, mask=row_ok)
    tl.store(part_sum_ptr + part, row_sum, mask=row_ok)


@triton.jit
def _finish_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, targets_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    n_rows, D, stride_hn, stride_hd, stride_wv, stride_wd, splits, softcap, scale,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < n_rows
    safe = tl.minimum(offs, n_rows - 1).to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + safe)
    else:
        rows = safe
    target = tl.load(targets_ptr + rows)

    # merge the split partials: lse2 = M + log2(sum_s sum_s * 2^(m_s - M))
    big = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    part = safe
    for _ in range(0, splits):
        big = tl.maximum(big, tl.load(part_max_ptr + part))
        part += n_rows
    shift = tl.where(big == float("-inf"), 0.0, big)
    total = tl.zeros((BLOCK_M,), tl.float64)
    part = safe
    for _ in range(0, splits):
        m = tl.load(part_max_ptr + part)
        total += tl.load(part_sum_ptr + part) * tl.exp2(m - shift).to(tl.float64)
        part += n_rows
    lse2 = big + tl.log2(total.to(tl.float32))

    # target logit: float32 products of hidden_i and weight[target_i], summed per block of D
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
    if HAS_SOFTCAP:
        dot = softcap * _tanh(dot / softcap)
    nll = (lse2 - dot * scale) * 0.6931471805599453  # ln 2
    tl.store(out_ptr + rows, nll, mask=ok)


# (CUDA capability major, operand bytes) -> (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages).
# Shared memory per stage is (BLOCK_N + BLOCK_V) * BLOCK_D * bytes.
_CONFIGS = {
    (9, 2): (128, 256, 64, 8, 3),   # Hopper: 144 KiB of 228
    (9, 4): (128, 128, 32, 8, 3),   # Hopper, fp32 operands
    (10, 2): (128, 256, 64, 8, 3),  # Blackwell datacenter
    (10, 4): (128, 128, 32, 8, 3),
    (8, 2): (128, 128, 64, 8, 3),   # A100: 96 KiB of 164
    (8, 4): (128, 128, 32, 8, 3),
}
_CONFIG_SMALL_SMEM = (128, 128, 32, 4, 3)  # sm_86 / sm_89 / sm_120: about 100 KiB per SM
_CONFIG_INTERPRETER = (16, 32, 32, 1, 1)

_AUTOTUNE_SPACE = [
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3),
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_supported(hidden2: torch.Tensor) -> bool:
    """Whether the fused kernel runs on these tensors (else the chunked GEMM path is used)."""
    if hidden2.device.type != "cuda":
        return _interpreting()
    return torch.cuda.get_device_capability(hidden2.device)[0] >= 8


def default_config(device: torch.device, dtype: torch.dtype) -> tuple:
    if device.type != "cuda":
        return _CONFIG_INTERPRETER
    major, minor = torch.cuda.get_device_capability(device)
    nbytes = 4 if dtype == torch.float32 else 2
    if (major, minor) in ((8, 0), (9, 0), (10, 0)) or major in (9, 10):
        return _CONFIGS[(major, nbytes)]
    return _CONFIG_SMALL_SMEM


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(n_rows: int, V: int, block_n: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits so that about 8 waves of programs run (1 when tokens alone fill them)."""
    token_blocks = triton.cdiv(n_rows, block_n)
    target = 8 * sm_count
    return max(1, min(triton.cdiv(V, block_v), triton.cdiv(target, token_blocks), 1024))


# Every BLOCK_V in the search space divides this, so the split ranges do not depend on the
# configuration the autotuner picks.
_SPLIT_ALIGN = 256
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


def _input_precision(dtype: torch.dtype) -> str:
    asked = (os.environ.get(ENV_ALLOW_TF32, "0") not in ("", "0")
             or torch.backends.cuda.matmul.allow_tf32)
    if dtype == torch.float32 and asked:
        return "tf32"
    return "ieee"


def linear_token_nll_forward(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                             *, config: Optional[tuple] = None,
                             splits: Optional[int] = None) -> torch.Tensor:
    """Triton launcher behind ``linear_token_nll(..., backend="triton")``.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16, any strides; weight: ``(V, D)`` same dtype;
            bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 contiguous, in ``[0, V)`` or ``== ignore_index``.
        ignore_index, softcap (None or > 0), temperature (> 0): as in ``token_nll``.
        config: ``(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)`` to override the tuned one.
        splits: number of vocabulary ranges per token block (default: chosen to fill the GPU).

    Returns:
        ``(N,)`` float32, equal to ``F.cross_entropy(z.double(), targets, reduction="none",
        ignore_index=ignore_index)`` with ``z = F.linear(hidden2, weight, bias)`` soft-capped and
        divided by temperature.
    """
    from pplfast._linear import _scored_rows, chunked_linear_token_nll

    if not fused_supported(hidden2):
        return chunked_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap,
                                        temperature)
    N, D = hidden2.shape
    V = weight.shape[0]
    device = hidden2.device
    out = torch.zeros(N, dtype=torch.float32, device=device)
    rows = _scored_rows(targets, ignore_index)  # ignored rows get no tiles
    n = N if rows is None else rows.numel()
    if n == 0:
        return out

    autotune = config is None and device.type == "cuda" and (
        os.environ.get(ENV_AUTOTUNE, "0") not in ("", "0"))
    block_n, block_v, block_d, num_warps, num_stages = config or default_config(device, hidden2.dtype)
    if splits is None:
        splits = choose_splits(n, V, block_n, block_v, _sm_count(device))
    align = _SPLIT_ALIGN if autotune else block_v
    cols_per_split = triton.cdiv(triton.cdiv(V, max(1, splits)), align) * align
    splits = triton.cdiv(V, cols_per_split)
    part_max = torch.empty((splits, n), dtype=torch.float32, device=device)
    part_sum = torch.empty((splits, n), dtype=torch.float64, device=device)

    has_bias = bias is not None
    bias_arg = bias if has_bias else hidden2  # never read without HAS_BIAS
    rows_arg = rows if rows is not None else targets  # never read without HAS_ROWS
    cap = 1.0 if softcap is None else float(softcap)
    scale = LOG2E / float(temperature)
    precision = _input_precision(hidden2.dtype)
    common = dict(HAS_ROWS=rows is not None, HAS_BIAS=has_bias, HAS_SOFTCAP=softcap is not None)
    args = (hidden2, weight, bias_arg, rows_arg, part_max, part_sum, n, V, D,
            hidden2.stride(0), hidden2.stride(1), weight.stride(0), weight.stride(1),
            cols_per_split, cap, scale)
    if autotune:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        # every BLOCK_D in the search space divides 64
        _autotuned_kernel()[grid](*args, EVEN_D=D % 64 == 0, INPUT_PRECISION=precision, **common)
    else:
        _lse_partial_kernel[(triton.cdiv(n, block_n), splits)](
            *args, EVEN_D=D % block_d == 0, INPUT_PRECISION=precision,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages, **common,
        )

    block_m = 16 if device.type != "cuda" else 32
    _finish_kernel[(triton.cdiv(n, block_m),)](
        hidden2, weight, bias_arg, rows_arg, targets, part_max, part_sum, out,
        n, D, hidden2.stride(0), hidden2.stride(1), weight.stride(0), weight.stride(1),
        splits, cap, scale, BLOCK_M=block_m, BLOCK_D=64, num_warps=4, **common,
    )
    return out
