"""Per-token NLL from logits: one pass over each row, fp32 online logsumexp.

Algorithm. Row r of the (B, T, V) logits is read once, in blocks of BLOCK_V vocabulary entries.
Each block updates a running maximum ``m`` (a scalar) and a vector ``s`` of BLOCK_V partial sums of
``exp((z - m) / temperature)``; when the maximum grows, ``s`` is rescaled by
``exp((m_old - m_new) / temperature)``. The vector is reduced with one tree sum at the end, so no
long sequential fp32 sum ever forms. The target logit is one extra scalar load, and

    nll = (m - z[target]) / temperature + log(sum(s))

which subtracts the two large terms before the small one is added. Ignored rows load nothing.

Programs. With enough rows (>= 2 x SM count) each program owns one whole row and writes its NLL.
With fewer rows the vocabulary is also split into ``n_split`` chunks, one program per (row, chunk):
each writes a partial (max, sum) pair, and ``_merge_kernel`` combines the pairs of a row with the
same rescaling rule, gathers the target logit and writes the NLL.

Non-finite input. The reference point of the exponentials is ``m`` clamped to the finite range, so
-inf entries add exactly 0, a row of -inf gives ``m = -inf`` and NaN (as the float64 reference),
and +inf entries give ``s = +inf`` and NLL +inf without inf - inf. NaN enters ``s`` through exp
and reaches the NLL of its row only.

Soft-capping uses a tanh built from exp (no libdevice, which the interpreter lacks): a fitted odd
polynomial for |y| < 0.625, where ``1 - 2 / (exp(2y) + 1)`` would cancel, and that form beyond.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

ENV_AUTOTUNE = "PPLFAST_AUTOTUNE"

_LOG2E = 1.4426950408889634

# Vocabulary split (rows < 2 x SM count): aim for this many programs per SM in all. Under the
# interpreter a small fixed SM count makes small test shapes take the split path too.
_SPLIT_PROGRAMS_PER_SM = 4
_INTERPRETER_SM_COUNT = 4


@triton.jit
def _tanh(y):
    a = tl.abs(y)
    y2 = y * y
    # minimax fit of (tanh(y)/y - 1)/y^2 on |y| < 0.625, relative error of tanh < 2e-10
    p = 0.0021434174850583076 * y2 - 0.008177938871085644
    p = p * y2 + 0.021700944751501083
    p = p * y2 - 0.05394681170582771
    p = p * y2 + 0.1333320587873459
    p = p * y2 - 0.3333333134651184
    small = y + y * (y2 * p)
    # 2/(e+1) has an absolute error of ~1e-7: harmless relative to tanh once |y| >= 0.625
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(y < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _capped(x, mask, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        # masked lanes hold -inf, which the cap would turn into -softcap: keep them at -inf
        x = tl.where(mask, softcap * _tanh(x * inv_softcap), -float("inf"))
    return x


@triton.jit
def _finite(m):
    # the reference point of exp2((x - ref) * scale): finite, so -inf - ref and inf - ref never
    # become NaN; equal to m whenever m is finite
    return tl.minimum(tl.maximum(m, -3.4028234663852886e38), 3.4028234663852886e38)


@triton.jit
def _row_nll(
    row_ptr, target, scored, row_max, row_sum, stride_v,
    softcap, inv_softcap, inv_temp, HAS_SOFTCAP: tl.constexpr,
):
    target_logit = tl.load(row_ptr + target * stride_v, mask=scored, other=0.0).to(tl.float32)
    target_logit = _capped(target_logit, True, softcap, inv_softcap, HAS_SOFTCAP)
    # an ignored row has row_sum = 0: keep log() away from it
    nll = (row_max - target_logit) * inv_temp + tl.log(tl.where(scored, row_sum, 1.0))
    return tl.where(scored, nll, 0.0)


@triton.jit
def _online_update(x, row_max, sums, exp2_scale):
    new_max = tl.maximum(row_max, tl.max(x, axis=0))
    ref = _finite(new_max)
    # alpha = 1 when the maximum is unchanged (also at -inf or +inf, where exp2 would give NaN)
    alpha = tl.where(new_max == row_max, 1.0, tl.exp2((row_max - ref) * exp2_scale))
    sums = sums * alpha + tl.exp2((x - ref) * exp2_scale)
    return new_max, sums


@triton.jit
def _combine(max_a, sum_a, max_b, sum_b, exp2_scale):
    # merge two (max, sum of exp2((x - max) * scale)) pairs; same guards as _online_update
    new_max = tl.maximum(max_a, max_b)
    ref = _finite(new_max)
    scale_a = tl.where(max_a == new_max, 1.0, tl.exp2((max_a - ref) * exp2_scale))
    scale_b = tl.where(max_b == new_max, 1.0, tl.exp2((max_b - ref) * exp2_scale))
    return new_max, sum_a * scale_a + sum_b * scale_b


@triton.jit
def _token_nll_kernel(
    logits_ptr, targets_ptr, out_ptr, part_max_ptr, part_sum_ptr,
    T, V, stride_b, stride_t, stride_v, chunk, n_split, ignore_index,
    softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, SPLIT: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    b = row // T
    t = row - b * T
    # int64 row offsets: rows x V passes 2^31 on real batches
    row_off = b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t
    if SPLIT:
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, V)
    else:
        start = 0
        end = V
    end = tl.where(scored, end, start)  # an ignored row loads nothing

    # entries before the first 16-byte boundary (rows of an odd V start anywhere) are peeled off,
    # so that the unmasked blocks below compile to vector loads
    peel_max = -float("inf")
    peel_sum = 0.0
    first = start
    if ALIGN > 1:
        head = (ALIGN - (row_off + start) % ALIGN) % ALIGN
        head = tl.minimum(head, end - start).to(tl.int32)
        peel = tl.arange(0, ALIGN)
        px = tl.load(logits_ptr + row_off + start + peel, mask=peel < head,
                     other=-float("inf")).to(tl.float32)
        px = _capped(px, peel < head, softcap, inv_softcap, HAS_SOFTCAP)
        peel_max = tl.max(px, axis=0)
        peel_sum = tl.sum(tl.exp2((px - _finite(peel_max)) * exp2_scale), axis=0)
        first = start + head
        base = tl.multiple_of(row_off + first, ALIGN)
    else:
        base = row_off + first

    row_max = -float("inf")
    sums = tl.zeros([BLOCK_V], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_V)
    n_full = (end - first) // BLOCK_V
    # block i + 1 is loaded before block i is reduced, so a program keeps two blocks of loads in
    # flight across the reductions' barriers (the compiler pipelines no loads that feed no dot);
    # the masks compare block-aligned numbers, so they stay uniform over vectors of 16 bytes
    if VOCAB_CONTIGUOUS:
        ptrs = logits_ptr + base + cols
    else:
        ptrs = logits_ptr + row_off + (first + cols).to(tl.int64) * stride_v
    n_full_cols = n_full * BLOCK_V
    x_next = tl.load(ptrs, mask=cols < n_full_cols, other=0.0)
    for i in range(0, n_full):
        x = x_next.to(tl.float32)
        if VOCAB_CONTIGUOUS:
            ptrs = logits_ptr + base + (i + 1) * BLOCK_V + cols
        else:
            ptrs = logits_ptr + row_off + (first + (i + 1) * BLOCK_V + cols).to(tl.int64) * stride_v
        x_next = tl.load(ptrs, mask=(i + 1) * BLOCK_V + cols < n_full_cols, other=0.0)
        x = _capped(x, True, softcap, inv_softcap, HAS_SOFTCAP)
        row_max, sums = _online_update(x, row_max, sums, exp2_scale)
    tail = n_full * BLOCK_V + cols
    if VOCAB_CONTIGUOUS:
        ptrs = logits_ptr + base + tail
    else:
        ptrs = logits_ptr + row_off + (first + tail).to(tl.int64) * stride_v
    tail_mask = tail < end - first
    x = tl.load(ptrs, mask=tail_mask, other=-float("inf")).to(tl.float32)
    x = _capped(x, tail_mask, softcap, inv_softcap, HAS_SOFTCAP)
    row_max, sums = _online_update(x, row_max, sums, exp2_scale)
    row_max, row_sum = _combine(row_max, tl.sum(sums, axis=0), peel_max, peel_sum, exp2_scale)

    if SPLIT:
        part = row.to(tl.int64) * n_split + tl.program_id(1)
        tl.store(part_max_ptr + part, row_max)
        tl.store(part_sum_ptr + part, row_sum)
    else:
        nll = _row_nll(logits_ptr + row_off, target, scored, row_max, row_sum, stride_v,
                       softcap, inv_softcap, inv_temp, HAS_SOFTCAP)
        tl.store(out_ptr + row, nll)


@triton.jit
def _merge_kernel(
    logits_ptr, targets_ptr, out_ptr, part_max_ptr, part_sum_ptr,
    T, stride_b, stride_t, stride_v, n_split, ignore_index,
    softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_SOFTCAP: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    b = row // T
    t = row - b * T
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t

    splits = tl.arange(0, BLOCK_S)
    mask = splits < n_split
    part = row.to(tl.int64) * n_split + splits
    part_max = tl.load(part_max_ptr + part, mask=mask, other=-float("inf"))
    part_sum = tl.load(part_sum_ptr + part, mask=mask, other=0.0)
    row_max = tl.max(part_max, axis=0)
    ref = _finite(row_max)
    weight = tl.where(part_max == row_max, 1.0, tl.exp2((part_max - ref) * exp2_scale))
    row_sum = tl.sum(part_sum * weight, axis=0)

    nll = _row_nll(row_ptr, target, scored, row_max, row_sum, stride_v,
                   softcap, inv_softcap, inv_temp, HAS_SOFTCAP)
    tl.store(out_ptr + row, nll)


# Fixed launch configurations per GPU family (compute capability major), for the one-pass path:
# (BLOCK_V for 2-byte logits, BLOCK_V for 4-byte logits, num_warps). 16 entries per thread: the
# sm_90 build needs 62 (bf16) / 45 (fp32) registers, so 4-5 programs share an SM and, with the
# prefetch, keep 64-80 KiB of loads in flight. Larger blocks double the registers and halve that.
_CONFIGS = {
    9: (4096, 2048, 8),   # Hopper
    10: (4096, 2048, 8),  # Blackwell
    8: (4096, 2048, 8),   # Ampere / Ada
}
_DEFAULT_CONFIG = (4096, 2048, 8)
# The interpreter runs each program as numpy calls: blocks small enough for tiny test shapes.
_INTERPRETER_CONFIG = (1024, 1024, 4)
# Split path: chunks of at least MIN_CHUNK entries, each a multiple of ALIGN entries so that every
# chunk starts on the same 16-byte phase as its row (the peel then costs one small load per chunk).
_SPLIT_MIN_CHUNK, _SPLIT_ALIGN = 2048, 256
_INTERPRETER_SPLIT_MIN_CHUNK, _INTERPRETER_SPLIT_ALIGN = 64, 16


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _launch_config(device: torch.device, dtype: torch.dtype):
    if device.type != "cuda":
        block2, block4, warps = _INTERPRETER_CONFIG
        sms = _INTERPRETER_SM_COUNT
        min_chunk, align = _INTERPRETER_SPLIT_MIN_CHUNK, _INTERPRETER_SPLIT_ALIGN
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        block2, block4, warps = _CONFIGS.get(_capability(index), _DEFAULT_CONFIG)
        sms = _sm_count(index)
        min_chunk, align = _SPLIT_MIN_CHUNK, _SPLIT_ALIGN
    block_v = block4 if dtype == torch.float32 else block2
    return block_v, warps, sms, min_chunk, align


def _autotune_configs():
    return [
        triton.Config({"BLOCK_V": block_v}, num_warps=warps)
        for block_v in (2048, 4096, 8192, 16384)
        for warps in (4, 8, 16, 32)
        if block_v // (32 * warps) >= 2
    ]


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    return triton.autotune(
        configs=_autotune_configs(), key=["V", "HAS_SOFTCAP", "VOCAB_CONTIGUOUS", "SPLIT", "ALIGN"]
    )(_token_nll_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def token_nll_forward(
    logits3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    *,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Per-token NLL of ``(B, T, V)`` logits with the Triton kernels.

    Equals ``F.cross_entropy(z.double().reshape(-1, V), targets, reduction="none",
    ignore_index=ignore_index).float()`` with ``z = softcap * tanh(logits3 / softcap)`` (when
    ``softcap`` is given) divided by ``temperature``; the logits are read in place, never copied.

    Args:
        logits3: ``(B, T, V)`` float32, float16 or bfloat16, any strides (CUDA tensor, or CPU
            tensor under ``TRITON_INTERPRET=1``).
        targets: ``(B*T,)`` int64, contiguous, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: rows with this target get 0 and their logits are not read.
        softcap: positive float or None.
        temperature: positive float.
        num_splits: force the number of vocabulary chunks per row (``1`` forces the one-pass
            kernel; more forces the split + merge kernels, reduced if needed so that no chunk is
            empty). ``None`` chooses: split only when rows < 2 x SM count. For tests and tuning.
        block_v: force the vocabulary block size (a power of two). For tests and tuning.

    Returns:
        float32 tensor ``(B*T,)``.
    """
    if logits3.ndim != 3:
        raise ValueError(f"logits3 must be (B, T, V), got shape {tuple(logits3.shape)}")
    B, T, V = logits3.shape
    rows = B * T
    if targets.shape != (rows,) or targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(
            f"targets must be a contiguous int64 tensor of shape ({rows},), got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if targets.device != logits3.device:
        raise ValueError(f"targets is on {targets.device} but logits3 is on {logits3.device}")
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    out = torch.empty(rows, dtype=torch.float32, device=logits3.device)
    if rows == 0:
        return out
    if V == 0:
        return out.zero_()

    config_block, num_warps, sms, min_chunk, align = _launch_config(logits3.device, logits3.dtype)
    if num_splits is None:
        n_split = 1
        if rows < 2 * sms:
            n_split = max(1, min(_cdiv(V, min_chunk), _cdiv(_SPLIT_PROGRAMS_PER_SM * sms, rows)))
    else:
        n_split = num_splits
    chunk = V
    if n_split > 1:
        chunk = _cdiv(_cdiv(V, n_split), align) * align
        n_split = _cdiv(V, chunk)
    split = n_split > 1

    has_softcap = softcap is not None
    scalars = dict(
        softcap=float(softcap) if has_softcap else 1.0,
        inv_softcap=1.0 / float(softcap) if has_softcap else 1.0,
        exp2_scale=_LOG2E / float(temperature),
        inv_temp=1.0 / float(temperature),
    )
    stride_b, stride_t, stride_v = logits3.stride()
    # 16-byte vector loads need a contiguous vocabulary and an aligned base (rows are peeled)
    aligned = stride_v == 1 and logits3.data_ptr() % 16 == 0
    align_elems = 16 // logits3.element_size() if aligned else 1
    if split:
        part_max = torch.empty((rows, n_split), dtype=torch.float32, device=logits3.device)
        part_sum = torch.empty((rows, n_split), dtype=torch.float32, device=logits3.device)
    else:
        part_max = part_sum = out  # unused by the one-pass kernel
    common = dict(
        T=T, V=V, stride_b=stride_b, stride_t=stride_t, stride_v=stride_v, chunk=chunk,
        n_split=n_split, ignore_index=ignore_index, **scalars,
        HAS_SOFTCAP=has_softcap, VOCAB_CONTIGUOUS=stride_v == 1, SPLIT=split, ALIGN=align_elems,
    )
    grid = (rows, n_split)
    autotune = (
        logits3.is_cuda and block_v is None and os.environ.get(ENV_AUTOTUNE, "0") not in ("", "0")
    )
    if autotune:
        _autotuned_kernel()[grid](logits3, targets, out, part_max, part_sum, **common)
    else:
        block = block_v if block_v is not None else config_block
        # a chunk smaller than the block would leave most lanes masked
        block = min(block, triton.next_power_of_2(chunk))
        warps = max(1, min(num_warps, block // 256)) if logits3.is_cuda else num_warps
        _token_nll_kernel[grid](
            logits3, targets, out, part_max, part_sum, **common, BLOCK_V=block,
            num_warps=warps,
        )
    if split:
        _merge_kernel[(rows,)](
            logits3, targets, out, part_max, part_sum,
            T, stride_b, stride_t, stride_v, n_split, ignore_index,
            scalars["softcap"], scalars["inv_softcap"], scalars["exp2_scale"],
            scalars["inv_temp"],
            HAS_SOFTCAP=has_softcap, BLOCK_S=max(triton.next_power_of_2(n_split), 2),
            num_warps=1,
        )
    return out
