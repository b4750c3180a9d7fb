"""Per-token statistics from logits: NLL, entropy, max log-probability, argmax and target rank in
one pass over each row (fp32 online logsumexp, as ``token_nll.py``), and the top-k beside it.

Algorithm. Row r is read in blocks of BLOCK_V entries, y = capped(x) (the temperature scales the
exponents, never the values: ``_common``). The program keeps a running maximum ``m`` of y
(scalar) and two vectors of BLOCK_V partial sums relative to it, with ``d = (y - m) / T``:
``s = sum exp(d)`` and ``e = sum exp(d) d``; when ``m`` grows to ``m'`` both are rescaled
(``e' = a (e + delta s)``, ``s' = a s``, ``delta = (m - m') / T``, ``a = exp(delta)``). Then

    nll = (m - y_t) / T + log S,   entropy = log S - E / S,   max log p = -log S,

the first term of the NLL in float64 (it reaches 2 FLT_MAX / T), nothing else larger than log V.

The target logit is loaded (and soft-capped by the same code) before the pass; each block adds
the count of its entries strictly above it (the rank) and its first index holding the block
maximum replaces the running argmax when strictly larger (lowest index on ties). NaN is detected
on the raw values (before tanh, which would map it to a finite number) and makes nll, entropy and
max log p NaN; -inf entries add 0 to both sums (``exp(-inf) * -inf`` is masked to 0); a +inf
entry gives entropy and max log p NaN (inf - inf), as the float64 reference.

Programs. One per row when rows >= 2 x SM count; otherwise one per (row, vocabulary chunk), each
writing a partial (max, S, E, nan, argmax value and index, rank) that ``_stats_merge_kernel``
combines in chunk order.

Top-k (``top_k > 0``): softcap and temperature are increasing functions, so the top-k ids of the
raw logits are those of z; they come from ``torch.topk`` over chunks of the scored rows of the
input (a second pass; ignored rows are never read), and their log-probabilities,
``(y - m) / T - log S``, from the kernel's ``m`` and ``log S`` in float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, NO_INDEX, argmax_fold, capped, device_guard, half_diff,
                      rescale_moment, row_offset, stats_finish)
from ._plan import STATS_CONFIG, merge_block, plan, resolve_sm_count
from .partials import check_v_offset, global_ids, target_field


@triton.jit
def _store_finished(row, scored, m, S, E, any_nan, target_y, amax_idx, rank, inv_temp,
                    nll_ptr, ent_ptr, mlp_ptr, max_ptr, logs_ptr, amax_ptr, rank_ptr):
    """Finish a row's merged state (``stats_finish``) and write its statistics; an ignored row
    gets 0 and -1 (its maximum and log-sum still go to ``max_ptr`` / ``logs_ptr`` for the top-k)."""
    nll, entropy, max_logprob, m, log_s = stats_finish(m, S, E, any_nan, target_y, scored,
                                                      inv_temp)
    tl.store(nll_ptr + row, tl.where(scored, nll, 0.0))
    tl.store(ent_ptr + row, tl.where(scored, entropy, 0.0))
    tl.store(mlp_ptr + row, tl.where(scored, max_logprob, 0.0))
    tl.store(max_ptr + row, m)
    tl.store(logs_ptr + row, log_s)
    tl.store(amax_ptr + row, tl.where(scored, tl.where(amax_idx == NO_INDEX, 0, amax_idx), -1))
    tl.store(rank_ptr + row, tl.where(scored, rank, -1))


@triton.jit
def _token_stats_kernel(
    logits_ptr, targets_ptr, target_logits_ptr, nll_ptr, ent_ptr, mlp_ptr, amax_ptr, rank_ptr,
    max_ptr, logs_ptr, part_f_ptr, part_i_ptr,
    T, V, stride_b, stride_t, stride_v, chunk, n_split, ignore_index,
    softcap, inv_softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, HAS_TARGET_LOGITS: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    row_ptr = logits_ptr + row_offset(row, T, stride_b, stride_t)
    if SPLIT:
        start = tl.program_id(1) * chunk
        end = tl.minimum(start + chunk, V)
    else:
        start = 0
        end = V
    end = tl.where(scored, end, start)  # an ignored row loads nothing

    if HAS_TARGET_LOGITS:  # a vocabulary slice: the target may lie in another one
        tx = tl.load(target_logits_ptr + row)
    else:
        tx = tl.load(row_ptr + target * stride_v, mask=scored, other=0.0).to(tl.float32)
    target_y = capped(tx, True, softcap, inv_softcap, HAS_SOFTCAP)

    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    e = tl.zeros([BLOCK_V], dtype=tl.float32)
    nan = tl.zeros([BLOCK_V], dtype=tl.int32)
    above = tl.zeros([BLOCK_V], dtype=tl.int32)
    amax = -float("inf")
    amax_idx = tl.full([], NO_INDEX, tl.int64)
    for c0 in range(start, end, BLOCK_V):
        idx = c0 + cols
        mask = idx < end
        x = tl.load(row_ptr + idx.to(tl.int64) * stride_v, mask=mask, other=-float("inf"))
        x = x.to(tl.float32)
        nan = nan | (x != x).to(tl.int32)
        y = capped(x, mask, softcap, inv_softcap, HAS_SOFTCAP)
        above += (y > target_y).to(tl.int32)
        block_max = tl.max(y, axis=0)
        first = tl.min(tl.where((y == block_max) & mask, idx.to(tl.int64), NO_INDEX), axis=0)
        amax, amax_idx = argmax_fold(amax, amax_idx, block_max, first)
        new_m = tl.maximum(m, block_max)
        s, e = rescale_moment(s, e, m, new_m, inv_temp)
        d = half_diff(y, new_m) * (2.0 * inv_temp)
        p = tl.exp2(d * LOG2E)
        s += p
        e += tl.where(p > 0, p * d, 0.0)
        m = new_m
    S = tl.sum(s, axis=0)
    E = tl.sum(e, axis=0)
    any_nan = tl.max(nan, axis=0) > 0
    rank = tl.sum(above, axis=0).to(tl.int64)
    if SPLIT:  # the split record: kernels/partials.py
        part = row.to(tl.int64) * n_split + tl.program_id(1)
        tl.store(part_f_ptr + part * 4, m)
        tl.store(part_f_ptr + part * 4 + 1, S)
        tl.store(part_f_ptr + part * 4 + 2, E)
        tl.store(part_f_ptr + part * 4 + 3, amax)
        tl.store(part_i_ptr + part * 3, any_nan.to(tl.int64))
        tl.store(part_i_ptr + part * 3 + 1, amax_idx)
        tl.store(part_i_ptr + part * 3 + 2, rank)
    else:
        _store_finished(row, scored, m, S, E, any_nan, target_y, amax_idx, rank, inv_temp,
                        nll_ptr, ent_ptr, mlp_ptr, max_ptr, logs_ptr, amax_ptr, rank_ptr)


@triton.jit
def _stats_merge_kernel(
    logits_ptr, targets_ptr, nll_ptr, ent_ptr, mlp_ptr, amax_ptr, rank_ptr, max_ptr, logs_ptr,
    part_f_ptr, part_i_ptr, T, stride_b, stride_t, stride_v, n_split, ignore_index,
    softcap, inv_softcap, inv_temp,
    HAS_SOFTCAP: tl.constexpr, FINISH: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the split records of a row: FINISH writes its statistics, otherwise its record
    into columns 0-3 of the ``(rows, 5)`` float and all of the ``(rows, 3)`` integer slice
    records (``max_ptr`` and ``amax_ptr``; ``kernels/partials.py``)."""
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    live = splits < n_split
    part = row.to(tl.int64) * n_split + splits
    pm = tl.load(part_f_ptr + part * 4, mask=live, other=-float("inf"))
    ps = tl.load(part_f_ptr + part * 4 + 1, mask=live, other=0.0)
    pe = tl.load(part_f_ptr + part * 4 + 2, mask=live, other=0.0)
    pa = tl.load(part_f_ptr + part * 4 + 3, mask=live, other=-float("inf"))
    pn = tl.load(part_i_ptr + part * 3, mask=live, other=0)
    pi = tl.load(part_i_ptr + part * 3 + 1, mask=live, other=NO_INDEX)
    pr = tl.load(part_i_ptr + part * 3 + 2, mask=live, other=0)
    m = tl.max(pm, axis=0)
    ps, pe = rescale_moment(ps, pe, pm, m, inv_temp)
    S = tl.sum(ps, axis=0)
    E = tl.sum(pe, axis=0)
    any_nan = tl.max(pn, axis=0) > 0
    rank = tl.sum(pr, axis=0)
    # argmax: the largest value, then the lowest index holding it (chunks are in column order)
    best = tl.max(tl.where(pi != NO_INDEX, pa, -float("inf")), axis=0)
    amax_idx = tl.min(tl.where((pi != NO_INDEX) & (pa == best), pi, NO_INDEX), axis=0)
    if FINISH:
        target = tl.load(targets_ptr + row)
        scored = target != ignore_index
        row_ptr = logits_ptr + row_offset(row, T, stride_b, stride_t)
        tx = tl.load(row_ptr + target * stride_v, mask=scored, other=0.0).to(tl.float32)
        target_y = capped(tx, True, softcap, inv_softcap, HAS_SOFTCAP)
        _store_finished(row, scored, m, S, E, any_nan, target_y, amax_idx, rank, inv_temp,
                        nll_ptr, ent_ptr, mlp_ptr, max_ptr, logs_ptr, amax_ptr, rank_ptr)
    else:
        rec_f = max_ptr + row.to(tl.int64) * 5
        tl.store(rec_f, m)
        tl.store(rec_f + 1, S)
        tl.store(rec_f + 2, E)
        tl.store(rec_f + 3, best)
        rec_i = amax_ptr + row.to(tl.int64) * 3
        tl.store(rec_i, any_nan.to(tl.int64))
        tl.store(rec_i + 1, amax_idx)
        tl.store(rec_i + 2, rank)


def _top_k(logits3, targets, ignore_index, top_k):
    """The ``top_k`` largest raw logits of the scored rows (float32, descending) and their
    indices (int64), by ``torch.topk`` over chunks of those rows; ignored rows are never read and
    get -inf and -1, as do the columns past V when ``top_k > V``.

    All rows scored and the (B, T) axes mergeable into one: topk reads row chunks of the input in
    place; otherwise each chunk of scored rows is gathered first (at most 64 MiB of float32).
    """
    B, T, V = logits3.shape
    rows = B * T
    device = logits3.device
    ids = torch.full((rows, top_k), -1, dtype=torch.int64, device=device)
    values = torch.full((rows, top_k), -float("inf"), dtype=torch.float32, device=device)
    k = min(top_k, V)
    scored = targets != ignore_index
    count = int(scored.sum())  # one host sync: sizes the selection
    if count == 0 or k == 0:
        return values, ids
    flat = None
    if count == rows:
        try:
            flat = logits3.view(rows, V)
        except RuntimeError:  # batch and time strides do not merge: gather instead
            flat = None
    selected = None if flat is not None else scored.nonzero().squeeze(1)
    step = max(1, (64 << 20) // max(1, V * 4))
    for r0 in range(0, count, step):
        if selected is None:
            chunk = torch.arange(r0, min(r0 + step, count), device=device)
            block = flat[r0 : r0 + step]
        else:
            chunk = selected[r0 : r0 + step]
            block = logits3[chunk // T, chunk % T]  # (n, V): only the scored rows are read
        top_values, top = torch.topk(block, k, dim=-1)
        ids[chunk, :k] = top
        values[chunk, :k] = top_values.float()
    return values, ids


def _check(logits3, targets):
    if logits3.ndim != 3:
        raise ValueError(f"logits3 must be (B, T, V), got shape {tuple(logits3.shape)}")
    rows = logits3.shape[0] * logits3.shape[1]
    if targets.shape != (rows,) or targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 tensor of shape ({rows},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")


def _launch(logits3, targets, target_logits, outs, n_split, chunk, block, num_warps,
            ignore_index, softcap, temperature, *, finish: bool):
    """The row kernel over ``(rows, n_split)`` programs, then (``n_split > 1`` or not
    ``finish``) the merge kernel. ``outs``: ``(nll, entropy, max_logprob, argmax, rank, row_max,
    log_sum, part_f, part_i)``; without ``finish`` the records go to ``row_max`` (floats) and
    ``argmax`` (integers)."""
    B, T, V = logits3.shape
    split = n_split > 1 or not finish
    has_softcap = softcap is not None
    cap = dict(softcap=float(softcap) if has_softcap else 1.0,
               inv_softcap=1.0 / float(softcap) if has_softcap else 1.0,
               inv_temp=1.0 / float(temperature))
    stride_b, stride_t, stride_v = logits3.stride()
    has_target_logits = target_logits is not None
    _token_stats_kernel[(B * T, n_split)](
        logits3, targets, target_logits if has_target_logits else targets, *outs, T, V, stride_b,
        stride_t, stride_v, chunk, n_split, ignore_index, **cap, HAS_SOFTCAP=has_softcap,
        HAS_TARGET_LOGITS=has_target_logits, SPLIT=split, BLOCK_V=block, num_warps=num_warps,
    )
    if split:
        _stats_merge_kernel[(B * T,)](
            logits3, targets, *outs, T, stride_b, stride_t, stride_v, n_split, ignore_index,
            **cap, HAS_SOFTCAP=has_softcap, FINISH=finish,
            BLOCK_S=merge_block(n_split), num_warps=1,
        )


def token_stats_forward(
    logits3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    top_k: int = 0,
    *,
    sm_count: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
):
    """Statistics of ``(B, T, V)`` logits: ``(nll, entropy, max_logprob, argmax, rank, top_ids,
    top_logprobs)``, shapes ``(B*T,)`` and ``(B*T, top_k)`` (None when ``top_k == 0``).

    Definitions as ``pplfast.token_stats``; the launch plan (one pass per row, or vocabulary
    chunks merged when rows < 2 x ``sm_count``) is ``token_nll_forward``'s with its own blocks
    (``_plan.STATS_CONFIG``), and ``sm_count``, ``num_splits``, ``block_v`` mean what they mean
    there.
    """
    _check(logits3, targets)
    B, T, V = logits3.shape
    rows = B * T
    device = logits3.device
    f32 = dict(dtype=torch.float32, device=device)
    nll, entropy, max_logprob, row_max, log_sum = (torch.empty(rows, **f32) for _ in range(5))
    argmax = torch.empty(rows, dtype=torch.int64, device=device)
    rank = torch.empty(rows, dtype=torch.int64, device=device)
    on_gpu = logits3.is_cuda
    sm_count = resolve_sm_count(sm_count, on_gpu, num_splits is not None)
    if rows and V:
        n_split, chunk, block, num_warps = plan(rows, V, on_gpu=on_gpu, dtype=logits3.dtype,
                                                sm_count=sm_count, num_splits=num_splits,
                                                block_v=block_v, config=STATS_CONFIG)
        part_f = torch.empty((rows, n_split, 4) if n_split > 1 else 1, **f32)
        part_i = torch.empty((rows, n_split, 3) if n_split > 1 else 1, dtype=torch.int64,
                             device=device)
        outs = (nll, entropy, max_logprob, argmax, rank, row_max, log_sum, part_f, part_i)
        with device_guard(logits3):
            _launch(logits3, targets, None, outs, n_split, chunk, block, num_warps, ignore_index,
                    softcap, temperature, finish=True)
    if not top_k:
        return nll, entropy, max_logprob, argmax, rank, None, None
    values, ids = _top_k(logits3, targets, ignore_index, top_k)
    # log-probabilities (y - m) / T - log S in float64, from the kernel's m and log S
    y = values.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    logprobs = (y - row_max.double().unsqueeze(-1)) / temperature - log_sum.double().unsqueeze(-1)
    logprobs = torch.where(ids >= 0, logprobs, 0.0).float()
    return nll, entropy, max_logprob, argmax, rank, ids, logprobs


def token_stats_slice_partials(
    logits3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    v_offset: int,
    *,
    target_logits: Optional[torch.Tensor] = None,
    top_k: int = 0,
    sm_count: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
):
    """The token_stats records of a vocabulary slice, not finished (``kernels/partials.py``).

    Args:
        logits3: ``(B, T, V_local)``, columns ``[v_offset, v_offset + V_local)`` of the
            vocabulary; dtypes and strides as :func:`token_stats_forward`.
        targets: ``(B*T,)`` int64, contiguous, global ids or ``ignore_index``; a target outside
            the slice is not read.
        ignore_index, softcap, temperature, sm_count, num_splits, block_v: as
            :func:`token_stats_forward`.
        v_offset: global id of the slice's first column.
        target_logits: float32 ``(B*T,)``, every row's raw target logit (the sum of all slices'
            ``target`` fields, or :func:`kernels.partials.target_field` summed over the slices),
            so that the rank counts the entries above the target on every slice; without it the
            rank is -1 where the target lies outside the slice.
        top_k: how many candidates per row (0: none).

    Returns:
        ``(floats, ints, top_values, top_ids)``: float32 ``(B*T, 5)``
        (``partials.STATS_FLOAT_FIELDS``), int64 ``(B*T, 3)`` (``partials.STATS_INT_FIELDS``),
        and for ``top_k > 0`` float32 and int64 ``(B*T, top_k)`` (None otherwise).
    """
    _check(logits3, targets)
    check_v_offset(v_offset)
    B, T, V = logits3.shape
    rows = B * T
    device = logits3.device
    if target_logits is not None and (target_logits.shape != (rows,)
                                      or target_logits.dtype != torch.float32
                                      or target_logits.device != device
                                      or not target_logits.is_contiguous()):
        raise ValueError(f"target_logits must be a contiguous float32 tensor of shape ({rows},) "
                         f"on {device}, got {target_logits.dtype} {tuple(target_logits.shape)} "
                         f"on {target_logits.device}")
    on_gpu = logits3.is_cuda
    sm_count = resolve_sm_count(sm_count, on_gpu, num_splits is not None)
    target = target_field(logits3, targets, ignore_index, v_offset)
    local = targets - v_offset
    known = (targets != ignore_index) & (
        ((local >= 0) & (local < V)) if target_logits is None else True)
    floats = torch.empty((rows, 5), dtype=torch.float32, device=device)
    ints = torch.empty((rows, 3), dtype=torch.int64, device=device)
    # the empty record (V_local = 0), overwritten by the kernels otherwise
    floats[:, :4] = torch.tensor([-float("inf"), 0.0, 0.0, -float("inf")])
    ints[:] = torch.tensor([0, NO_INDEX.value, 0])
    if rows and V:
        n_split, chunk, block, num_warps = plan(rows, V, on_gpu=on_gpu, dtype=logits3.dtype,
                                                sm_count=sm_count, num_splits=num_splits,
                                                block_v=block_v, config=STATS_CONFIG)
        part_f = torch.empty((rows, n_split, 4), dtype=torch.float32, device=device)
        part_i = torch.empty((rows, n_split, 3), dtype=torch.int64, device=device)
        unused = floats  # the finished fields: not written without finish
        outs = (unused, unused, unused, ints, unused, floats, unused, part_f, part_i)
        with device_guard(logits3):
            _launch(logits3, targets, target if target_logits is None else target_logits, outs,
                    n_split, chunk, block, num_warps, ignore_index, softcap, temperature,
                    finish=False)
    floats[:, 4] = target
    ints[:, 1] = global_ids(ints[:, 1], v_offset)
    ints[:, 2] = torch.where(known, ints[:, 2], -1)
    if not top_k:
        return floats, ints, None, None
    values, ids = _top_k(logits3, targets, ignore_index, top_k)
    return floats, ints, values, torch.where(ids >= 0, ids + v_offset, -1)
