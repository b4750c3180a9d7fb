"""Per-token NLL from logits: one pass over each row, fp32 online logsumexp.

Algorithm. Row r of the (B, T, V) logits is read once, in blocks of BLOCK_V vocabulary entries.
Each block updates a running maximum ``m`` (a scalar) and a vector ``s`` of BLOCK_V partial sums of
``exp((z - m) / temperature)``; when the maximum grows, ``s`` is rescaled by
``exp((m_old - m_new) / temperature)``. The vector is reduced with one tree sum at the end, so no
long sequential fp32 sum ever forms. The target logit is one extra scalar load, and

    nll = (m - z[target]) / temperature + log(sum(s))

which subtracts the two large terms before the small one is added (the first term in float64,
``_common.nll_from_lse``: logits near the top of the float range give differences beyond it).
``m`` and ``z`` stay in the units of the logits at every temperature. Ignored rows load nothing.

Programs (``_plan.plan``). With enough rows (>= 2 x SM count) each program owns one whole row and
writes its NLL. With fewer rows the vocabulary is also split into ``n_split`` chunks, one program
per (row, chunk): each writes its chunk's (max, sum) record (``partials.py``), and
``_merge_kernel`` combines the records of a row with the same rescaling rule, gathers the target
logit and writes the NLL (or, for a vocabulary slice, the row's record).

Loads. With a contiguous, 16-byte aligned tensor the entries before the first 16-byte boundary
of a row or chunk (rows of an odd V start anywhere) and those after its last one, fewer than
ALIGN = 16 / element size each, are loaded apart, so that everything between, the last partial
block included, compiles to 16-byte vector loads. Split chunks are whole numbers of blocks.

The launcher takes the SM count and the autotuning switch as arguments: nothing here reads the
environment or imports the rest of the package.

Special values, the online update and merge, soft-capping (tanh from exp) and the clamp that
keeps the NLL >= 0 are the shared rules of ``_common``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, capped, device_guard, exp2_shifted, merge, nll_from_lse, rescale,
                      row_offset)
from ._plan import merge_block, plan, resolve_sm_count
from .partials import check_v_offset, target_field


@triton.jit
def _row_nll(
    row_ptr, target, scored, row_max, row_sum, stride_v,
    softcap, inv_softcap, inv_temp, HAS_SOFTCAP: tl.constexpr,
):
    target_logit = tl.load(row_ptr + target * stride_v, mask=scored, other=0.0).to(tl.float32)
    target_logit = capped(target_logit, True, softcap, inv_softcap, HAS_SOFTCAP)
    # an ignored row has row_sum = 0: keep log() away from it
    nll = nll_from_lse(row_max, tl.where(scored, row_sum, 1.0), target_logit, inv_temp)
    return tl.where(scored, nll, 0.0)


@triton.jit
def _online_update(x, row_max, sums, exp2_scale):
    new_max = tl.maximum(row_max, tl.max(x, axis=0))
    sums = sums * rescale(row_max, new_max, exp2_scale) + exp2_shifted(x, new_max, exp2_scale)
    return new_max, sums


@triton.jit
def _token_nll_kernel(
    logits_ptr, targets_ptr, out_ptr, part_ptr,
    T, V, stride_b, stride_t, stride_v, chunk, n_split, ignore_index,
    softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_SOFTCAP: tl.constexpr, VOCAB_CONTIGUOUS: tl.constexpr, SPLIT: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    row_off = row_offset(row, T, stride_b, stride_t)
    if SPLIT:
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, V)
    else:
        start = 0
        end = V
    end = tl.where(scored, end, start)  # an ignored row loads nothing

    # entries before the first 16-byte boundary (rows of an odd V start anywhere) and after the
    # last one are loaded apart, ALIGN lanes each, so that everything between compiles to vector
    # loads: full blocks unmasked, the tail block under a mask that is uniform per 16 bytes
    edge_max = -float("inf")
    edge_sum = 0.0
    first = start
    if ALIGN > 1:
        head = (ALIGN - (row_off + start) % ALIGN) % ALIGN
        head = tl.minimum(head, end - start).to(tl.int32)
        lanes = tl.arange(0, ALIGN)
        hx = tl.load(logits_ptr + row_off + start + lanes, mask=lanes < head,
                     other=-float("inf")).to(tl.float32)
        hx = capped(hx, lanes < head, softcap, inv_softcap, HAS_SOFTCAP)
        first = start + head
        base = tl.multiple_of(row_off + first, ALIGN)
        n_body = tl.multiple_of((end - first) // ALIGN * ALIGN, ALIGN)
        last = n_body + lanes
        lx = tl.load(logits_ptr + base + last, mask=last < end - first,
                     other=-float("inf")).to(tl.float32)
        lx = capped(lx, last < end - first, softcap, inv_softcap, HAS_SOFTCAP)
        edge_max = tl.maximum(tl.max(hx, axis=0), tl.max(lx, axis=0))
        edge_sum = (tl.sum(exp2_shifted(hx, edge_max, exp2_scale), axis=0)
                    + tl.sum(exp2_shifted(lx, edge_max, exp2_scale), axis=0))
    else:
        base = row_off + first
        n_body = end - first

    row_max = -float("inf")
    sums = tl.zeros([BLOCK_V], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_V)
    n_full = n_body // BLOCK_V
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
        x = capped(x, True, softcap, inv_softcap, HAS_SOFTCAP)
        row_max, sums = _online_update(x, row_max, sums, exp2_scale)
    # the tail block: fewer than BLOCK_V entries, a multiple of ALIGN of them
    tail = n_full * BLOCK_V + cols
    if VOCAB_CONTIGUOUS:
        ptrs = logits_ptr + base + tail
    else:
        ptrs = logits_ptr + row_off + (first + tail).to(tl.int64) * stride_v
    tail_mask = tail < n_body
    x = tl.load(ptrs, mask=tail_mask, other=-float("inf")).to(tl.float32)
    x = capped(x, tail_mask, softcap, inv_softcap, HAS_SOFTCAP)
    row_max, sums = _online_update(x, row_max, sums, exp2_scale)
    row_max, row_sum = merge(row_max, tl.sum(sums, axis=0), edge_max, edge_sum, exp2_scale)

    if SPLIT:  # the split record (max, sum): kernels/partials.py
        part = (row.to(tl.int64) * n_split + tl.program_id(1)) * 2
        tl.store(part_ptr + part, row_max)
        tl.store(part_ptr + part + 1, row_sum)
    else:
        nll = _row_nll(logits_ptr + row_off, target, scored, row_max, row_sum, stride_v,
                       softcap, inv_softcap, inv_temp, HAS_SOFTCAP)
        tl.store(out_ptr + row, nll)


@triton.jit
def _merge_kernel(
    logits_ptr, targets_ptr, out_ptr, part_ptr,
    T, stride_b, stride_t, stride_v, n_split, ignore_index,
    softcap, inv_softcap, exp2_scale, inv_temp,
    HAS_SOFTCAP: tl.constexpr, FINISH: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the split records of a row: FINISH writes its NLL, otherwise its (max, sum) into
    columns 0 and 1 of the ``(rows, 3)`` slice records (``kernels/partials.py``)."""
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    mask = splits < n_split
    part = (row.to(tl.int64) * n_split + splits) * 2
    part_max = tl.load(part_ptr + part, mask=mask, other=-float("inf"))
    part_sum = tl.load(part_ptr + part + 1, mask=mask, other=0.0)
    row_max = tl.max(part_max, axis=0)
    row_sum = tl.sum(part_sum * rescale(part_max, row_max, exp2_scale), axis=0)

    if FINISH:
        target = tl.load(targets_ptr + row)
        scored = target != ignore_index
        row_ptr = logits_ptr + row_offset(row, T, stride_b, stride_t)
        nll = _row_nll(row_ptr, target, scored, row_max, row_sum, stride_v,
                       softcap, inv_softcap, inv_temp, HAS_SOFTCAP)
        tl.store(out_ptr + row, nll)
    else:
        tl.store(out_ptr + row.to(tl.int64) * 3, row_max)
        tl.store(out_ptr + row.to(tl.int64) * 3 + 1, row_sum)


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


def _scalars(softcap: Optional[float], temperature: float) -> dict:
    has_softcap = softcap is not None
    return dict(
        softcap=float(softcap) if has_softcap else 1.0,
        inv_softcap=1.0 / float(softcap) if has_softcap else 1.0,
        exp2_scale=LOG2E.value / float(temperature),
        inv_temp=1.0 / float(temperature),
    )


def _launch_rows(logits3, targets, out, part, n_split, chunk, block, num_warps, ignore_index,
                 softcap, temperature, *, split: bool, autotune: bool = False):
    """The row kernel over ``(rows, n_split)`` programs: NLLs into ``out`` (one pass), or split
    records into ``part`` (``split``)."""
    B, T, V = logits3.shape
    stride_b, stride_t, stride_v = logits3.stride()
    # 16-byte vector loads need a contiguous vocabulary and an aligned base (rows are peeled)
    aligned = stride_v == 1 and logits3.data_ptr() % 16 == 0
    common = dict(
        T=T, V=V, stride_b=stride_b, stride_t=stride_t, stride_v=stride_v, chunk=chunk,
        n_split=n_split, ignore_index=ignore_index, **_scalars(softcap, temperature),
        HAS_SOFTCAP=softcap is not None, VOCAB_CONTIGUOUS=stride_v == 1, SPLIT=split,
        ALIGN=16 // logits3.element_size() if aligned else 1,
    )
    grid = (B * T, n_split)
    if autotune:
        _autotuned_kernel()[grid](logits3, targets, out, part, **common)
    else:
        _token_nll_kernel[grid](logits3, targets, out, part, **common, BLOCK_V=block,
                                num_warps=num_warps)


def _launch_merge(logits3, targets, out, part, n_split, ignore_index, softcap, temperature, *,
                  finish: bool):
    scalars = _scalars(softcap, temperature)
    stride_b, stride_t, stride_v = logits3.stride()
    _merge_kernel[(part.shape[0],)](
        logits3, targets, out, part, logits3.shape[1], stride_b, stride_t, stride_v, n_split,
        ignore_index, scalars["softcap"], scalars["inv_softcap"], scalars["exp2_scale"],
        scalars["inv_temp"], HAS_SOFTCAP=softcap is not None, FINISH=finish,
        BLOCK_S=merge_block(n_split), num_warps=1,
    )


def _check(logits3: torch.Tensor, targets: torch.Tensor, num_splits, block_v) -> None:
    if logits3.ndim != 3:
        raise ValueError(f"logits3 must be (B, T, V), got shape {tuple(logits3.shape)}")
    rows = logits3.shape[0] * logits3.shape[1]
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


def token_nll_forward(
    logits3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    *,
    sm_count: Optional[int] = None,
    autotune: bool = False,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Per-token NLL of ``(B, T, V)`` logits with the Triton kernels.

    Equals ``F.cross_entropy(z.double().reshape(-1, V), targets, reduction="none",
    ignore_index=ignore_index).float()`` with ``z = softcap * tanh(logits3 / softcap)`` (when
    ``softcap`` is given) divided by ``temperature``; the logits are read in place, never copied.
    The caller makes the tensors' device current (``torch.cuda.device``).

    Args:
        logits3: ``(B, T, V)`` float32, float16 or bfloat16, any strides (CUDA tensor, or CPU
            tensor under ``TRITON_INTERPRET=1``).
        targets: ``(B*T,)`` int64, contiguous, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: rows with this target get 0 and their logits are not read.
        softcap: positive float or None.
        temperature: positive float.
        sm_count: streaming multiprocessors of the device; required for CUDA tensors unless
            ``num_splits`` is given (CPU tensors: a fixed small count, so tests split too).
        autotune: autotune BLOCK_V and num_warps per (V, variant) instead of the fixed
            configuration (CUDA only; ignored when ``block_v`` is given).
        num_splits: force the number of vocabulary chunks per row (``1`` forces the one-pass
            kernel; more forces the split + merge kernels, reduced if needed so that no chunk is
            empty). ``None`` chooses: split only when rows < 2 x SM count. For tests and tuning.
        block_v: force the vocabulary block size (a power of two). For tests and tuning.

    Returns:
        float32 tensor ``(B*T,)``.
    """
    _check(logits3, targets, num_splits, block_v)
    B, T, V = logits3.shape
    rows = B * T
    on_gpu = logits3.is_cuda
    sm_count = resolve_sm_count(sm_count, on_gpu, num_splits is not None)
    out = torch.empty(rows, dtype=torch.float32, device=logits3.device)
    if rows == 0:
        return out
    if V == 0:
        return out.zero_()

    n_split, chunk, block, num_warps = plan(rows, V, on_gpu=on_gpu, dtype=logits3.dtype,
                                            sm_count=sm_count, num_splits=num_splits,
                                            block_v=block_v)
    split = n_split > 1
    part = (torch.empty((rows, n_split, 2), dtype=torch.float32, device=logits3.device)
            if split else out)  # the one-pass kernel writes no record
    with device_guard(logits3):
        _launch_rows(logits3, targets, out, part, n_split, chunk, block, num_warps, ignore_index,
                     softcap, temperature, split=split,
                     autotune=autotune and on_gpu and block_v is None)
        if split:
            _launch_merge(logits3, targets, out, part, n_split, ignore_index, softcap,
                          temperature, finish=True)
    return out


def token_nll_slice_partials(
    logits3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    v_offset: int,
    *,
    sm_count: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """The token_nll records of a vocabulary slice, not finished (``kernels/partials.py``).

    Args:
        logits3: ``(B, T, V_local)``, columns ``[v_offset, v_offset + V_local)`` of the
            vocabulary; dtypes and strides as :func:`token_nll_forward`.
        targets: ``(B*T,)`` int64, contiguous, global ids or ``ignore_index``; a target outside
            the slice adds nothing and is not read.
        ignore_index, softcap, temperature, sm_count, num_splits, block_v: as
            :func:`token_nll_forward` (the slice is cut into chunks the same way).
        v_offset: global id of the slice's first column.

    Returns:
        float32 ``(B*T, 3)``: ``partials.NLL_FIELDS`` ``(max, sum, target)`` per row.
    """
    _check(logits3, targets, num_splits, block_v)
    check_v_offset(v_offset)
    B, T, V = logits3.shape
    rows = B * T
    on_gpu = logits3.is_cuda
    sm_count = resolve_sm_count(sm_count, on_gpu, num_splits is not None)
    out = torch.empty((rows, 3), dtype=torch.float32, device=logits3.device)
    out[:, 0] = -float("inf")
    out[:, 1] = 0.0
    out[:, 2] = target_field(logits3, targets, ignore_index, v_offset)
    if rows == 0 or V == 0:
        return out
    n_split, chunk, block, num_warps = plan(rows, V, on_gpu=on_gpu, dtype=logits3.dtype,
                                            sm_count=sm_count, num_splits=num_splits,
                                            block_v=block_v)
    part = torch.empty((rows, n_split, 2), dtype=torch.float32, device=logits3.device)
    with device_guard(logits3):
        _launch_rows(logits3, targets, out, part, n_split, chunk, block, num_warps, ignore_index,
                     softcap, temperature, split=True)
        _launch_merge(logits3, targets, out, part, n_split, ignore_index, softcap, temperature,
                      finish=False)
    return out
