"""Two models' logits compared in one pass: KL both ways, both NLLs, both argmaxes.

Algorithm. Program (row, split) reads vocabulary entries [split * chunk, ...) of the base row a and
the test row b together, in blocks of BLOCK_V, soft-capped (the temperature scales exponents,
never values: ``_common``). For each side it keeps the online log-sum-exp state of its own row,
a running maximum ``m`` and BLOCK_V lane sums ``s`` of ``exp((y - m) / T)``, and BLOCK_V lane sums

    A = Σ_v exp((a_v - m_p) / T) · (u_a - u_b) · H,    u = (y - m) / 2  (``_common.half_diff``),

(and the mirror for the test side), every difference taken relative to the two running maxima,
so nothing of the size of the logits is subtracted from another and none overflows (``u`` lies in
[-FLT_MAX, 0]). ``H = 2^-40 / T`` (at least the smallest normal float) keeps the lane sums in
range: a sum that overflows means a KL beyond the float range. When the maxima grow, ``s`` and
``A`` scale by ``exp((m - m') / T)`` and every difference moves by the shift of both maxima:
``A' = a (A + shift H s)``. Then, with ``A`` brought back to the logits' units,

    KL(p‖q) = Σ p_v (log p_v - log q_v) = A / (T s_p) - log s_p + log s_q.

Terms whose difference is not finite are left out of A: ``a_v = −inf`` is ``p_v = 0`` (term 0);
for ``b_v = −inf`` the lane maximum of ``a_v`` there is kept, and the KL is +inf when that entry
has ``p_v > 0`` (those terms also stay in ``s``: where they weigh anything, the KL is +inf
anyway). NaN is found on the loaded values (before the softcap's tanh, which would hide it) and
tracked as the index of the first NaN, which is also the row's argmax then (``torch.argmax``);
otherwise the argmax is the lowest index of the largest raw logit, tracked per block.

Each program writes its partial state (ten floats, four indices); the launcher merges the splits
of a row and finishes in float64 with PyTorch (a few element-wise operations on ``rows x splits``
numbers): rows < 2 x SM count are cut into several splits so that every SM has work.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LOG2E, NO_INDEX, capped, device_guard, half_diff, rescale, row_offset
from ._plan import compare_plan, resolve_sm_count
from .partials import check_v_offset, cross_scale, global_ids, target_field

_FLOATS, _INTS = 10, 4  # the split record (partials.py)


@triton.jit
def _argmax_update(x, idx, run_max, run_arg, first_nan):
    """Running (max, lowest index of it) of the raw logits, and the index of the first NaN."""
    is_nan = x != x
    first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, idx, NO_INDEX), axis=0))
    x = tl.where(is_nan, -float("inf"), x)
    block_max = tl.max(x, axis=0)
    block_arg = tl.min(tl.where(x == block_max, idx, NO_INDEX), axis=0)
    run_arg = tl.where(block_max > run_max, block_arg, run_arg)
    return tl.maximum(run_max, block_max), run_arg, first_nan


@triton.jit
def _rescale_side(sums, a_sums, row_max, new_max, shift, exp2_scale):
    """One side's lane sums moved to its new maximum: ``s' = a s``, ``A' = a A + s' shift``
    (``shift``: the move of the difference of the two maxima, in A's units; 0 while either
    maximum is -inf, where A holds no term)."""
    alpha = rescale(row_max, new_max, exp2_scale)
    sums = sums * alpha
    return sums, a_sums * alpha + sums * shift


@triton.jit
def _compare_kernel(
    base_ptr, test_ptr, targets_ptr, part_f_ptr, part_i_ptr,
    T, V, sb_b, sb_t, sb_v, st_b, st_t, st_v, chunk, n_split, ignore_index,
    softcap, inv_softcap, exp2_scale, a_scale,
    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    base_row = base_ptr + row_offset(row, T, sb_b, sb_t)
    test_row = test_ptr + row_offset(row, T, st_b, st_t)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    end = tl.where(scored, end, start)  # an ignored row loads nothing

    cols = tl.arange(0, BLOCK_V)
    max_p = -float("inf")
    max_q = -float("inf")
    s_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    a_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    s_q = tl.zeros([BLOCK_V], dtype=tl.float32)
    a_q = tl.zeros([BLOCK_V], dtype=tl.float32)
    # largest own value where the other row is -inf (p_v > 0 = q_v: the KL is +inf)
    at_p = tl.full([BLOCK_V], -float("inf"), dtype=tl.float32)
    at_q = tl.full([BLOCK_V], -float("inf"), dtype=tl.float32)
    raw_max_p = -float("inf")
    raw_max_q = -float("inf")
    arg_p = start
    arg_q = start
    nan_p = start * 0 + NO_INDEX
    nan_q = start * 0 + NO_INDEX
    for k in range(start, end, BLOCK_V):
        idx = k + cols
        mask = idx < end
        xa = tl.load(base_row + idx.to(tl.int64) * sb_v, mask=mask,
                     other=-float("inf")).to(tl.float32)
        xb = tl.load(test_row + idx.to(tl.int64) * st_v, mask=mask,
                     other=-float("inf")).to(tl.float32)
        raw_max_p, arg_p, nan_p = _argmax_update(xa, idx, raw_max_p, arg_p, nan_p)
        raw_max_q, arg_q, nan_q = _argmax_update(xb, idx, raw_max_q, arg_q, nan_q)
        za = capped(xa, mask, softcap, inv_softcap, HAS_SOFTCAP)
        zb = capped(xb, mask, softcap, inv_softcap, HAS_SOFTCAP)
        # NaN rows are decided from nan_p / nan_q; keep NaN out of the maxima
        za = tl.where(xa != xa, -float("inf"), za)
        zb = tl.where(xb != xb, -float("inf"), zb)
        at_p = tl.maximum(at_p, tl.where(zb == -float("inf"), za, -float("inf")))
        at_q = tl.maximum(at_q, tl.where(za == -float("inf"), zb, -float("inf")))
        new_p = tl.maximum(max_p, tl.max(za, axis=0))
        new_q = tl.maximum(max_q, tl.max(zb, axis=0))
        if (new_p != max_p) | (new_q != max_q):  # rare after the first blocks
            # the difference (u_a - u_b) of every term so far moves by half_diff(max_p, new_p)
            # - half_diff(max_q, new_q): finite once both maxima are (an -inf one holds no term)
            shift = half_diff(max_p, new_p) - half_diff(max_q, new_q)
            shift = tl.where(tl.abs(shift) < float("inf"), shift * a_scale, 0.0)
            s_p, a_p = _rescale_side(s_p, a_p, max_p, new_p, shift, exp2_scale)
            s_q, a_q = _rescale_side(s_q, a_q, max_q, new_q, -shift, exp2_scale)
            max_p = new_p
            max_q = new_q
        ua = half_diff(za, max_p)
        ub = half_diff(zb, max_q)
        ea = tl.exp2(ua * (2.0 * exp2_scale))
        eb = tl.exp2(ub * (2.0 * exp2_scale))
        d = ua - ub
        d = tl.where(tl.abs(d) < float("inf"), d * a_scale, 0.0)  # ±inf and NaN: no term
        s_p += ea
        a_p += ea * d
        s_q += eb
        a_q -= eb * d

    part = row.to(tl.int64) * n_split + split
    pf = part_f_ptr + part * 10
    tl.store(pf + 0, max_p)
    tl.store(pf + 1, tl.sum(s_p, axis=0))
    tl.store(pf + 2, tl.sum(a_p, axis=0))
    tl.store(pf + 3, tl.max(at_p, axis=0))
    tl.store(pf + 4, raw_max_p)
    tl.store(pf + 5, max_q)
    tl.store(pf + 6, tl.sum(s_q, axis=0))
    tl.store(pf + 7, tl.sum(a_q, axis=0))
    tl.store(pf + 8, tl.max(at_q, axis=0))
    tl.store(pf + 9, raw_max_q)
    pi = part_i_ptr + part * 4
    tl.store(pi + 0, arg_p.to(tl.int64))
    tl.store(pi + 1, nan_p.to(tl.int64))
    tl.store(pi + 2, arg_q.to(tl.int64))
    tl.store(pi + 3, nan_q.to(tl.int64))


def reduce_records(pf, pi, inv_temp, h):
    """Merge the records ``pf[:, k]`` (float64, the ten fields of a split record) and
    ``pi[:, k]`` (int64, four) of each row into one, in float64 (``kernels/partials.py``): the
    cross sums move to the merged maxima of both sides. Returns ``(floats (rows, 10) float64,
    ints (rows, 4) int64)``, the same layout."""
    maxima = pf[..., 0], pf[..., 5]
    merged = [m.max(dim=1).values for m in maxima]
    floats, ints = [], []
    for side in (0, 1):
        m, s, cross, lone, raw_max = (pf[..., 5 * side + k] for k in range(5))
        arg, first_nan = pi[..., 2 * side], pi[..., 2 * side + 1]
        top, other_top = merged[side].unsqueeze(1), merged[1 - side].unsqueeze(1)
        weight = torch.where(m == top, 1.0, torch.exp((m - top) * inv_temp))
        # each record's numerator is relative to its own two maxima: move it to the merged ones
        # (2 / h: to the logits' units)
        shift = (m - top) - (maxima[1 - side] - other_top)
        units = cross * (2.0 / h) + torch.where(s > 0, shift * s, 0.0)
        cross_total = torch.where(weight > 0, units * weight, 0.0).sum(1) * (h / 2.0)
        best = raw_max.max(dim=1).values
        floats += [merged[side], (s * weight).sum(1), cross_total, lone.max(dim=1).values, best]
        ints += [torch.where(raw_max == best.unsqueeze(1), arg, NO_INDEX.value).min(dim=1).values,
                 first_nan.min(dim=1).values]
    return torch.stack(floats, 1), torch.stack(ints, 1)


def _side(floats, ints, side, inv_temp, h):
    """One side of a merged record: ``(row max, log s, numerator / s in the logits' units,
    lone, argmax, has NaN)``."""
    m, s, cross, lone, _ = (floats[:, 5 * side + k] for k in range(5))
    arg, first_nan = ints[:, 2 * side], ints[:, 2 * side + 1]
    has_nan = first_nan != NO_INDEX.value
    return (m, torch.log(s), cross * (2.0 / h) / s, lone, torch.where(has_nan, first_nan, arg),
            has_nan)


def _kl(own, other, inv_temp):
    row_max, log_s, a_over_s, lone, _, nan = own
    row_max_o, log_s_o, _, _, _, nan_o = other
    kl = (a_over_s * inv_temp - log_s + log_s_o).clamp_min(0.0)
    # p_v > 0 (in float64) at an entry where the other row is -inf
    kl = torch.where(torch.exp((lone - row_max) * inv_temp - log_s) > 0, float("inf"), kl)
    undefined = nan | nan_o | ~torch.isfinite(row_max) | ~torch.isfinite(row_max_o)
    return torch.where(undefined, float("nan"), kl)


def _launch(base3, test3, targets, part_f, part_i, T, V, chunk, n_split, ignore_index, softcap,
            temperature, block, warps):
    has_softcap = softcap is not None
    _compare_kernel[(part_f.shape[0], n_split)](
        base3, test3, targets, part_f, part_i, T, V, *base3.stride(), *test3.stride(),
        chunk, n_split, ignore_index,
        float(softcap) if has_softcap else 1.0, 1.0 / float(softcap) if has_softcap else 1.0,
        LOG2E.value / float(temperature), cross_scale(temperature),
        HAS_SOFTCAP=has_softcap, BLOCK_V=block, num_warps=warps,
    )


def _records(base3, test3, targets, ignore_index, softcap, temperature, sm_count, num_splits,
             block_v):
    """The kernel's split records of every row merged into one per row, float64 / int64."""
    if base3.ndim != 3 or base3.shape != test3.shape:
        raise ValueError(f"base3 and test3 must be the same (B, T, V), got {tuple(base3.shape)} "
                         f"and {tuple(test3.shape)}")
    B, T, V = base3.shape
    rows = B * T
    device = base3.device
    if targets.shape != (rows,) or targets.dtype != torch.int64 or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous int64 tensor of shape ({rows},)")
    on_gpu = device.type == "cuda"
    sm_count = resolve_sm_count(sm_count, on_gpu, num_splits is not None)
    n_split, chunk, block, warps = compare_plan(rows, V, on_gpu=on_gpu,
                                                has_softcap=softcap is not None,
                                                sm_count=sm_count, num_splits=num_splits,
                                                block_v=block_v)
    part_f = torch.empty((rows, n_split, _FLOATS), dtype=torch.float32, device=device)
    part_i = torch.empty((rows, n_split, _INTS), dtype=torch.int64, device=device)
    if rows:
        with device_guard(base3):
            _launch(base3, test3, targets, part_f, part_i, T, V, chunk, n_split, ignore_index,
                    softcap, temperature, block, warps)
    return reduce_records(part_f.double(), part_i, 1.0 / float(temperature),
                          cross_scale(temperature))


def compare_forward(
    base3: torch.Tensor,
    test3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    *,
    sm_count: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
):
    """``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)`` of two ``(B, T, V)``
    logits tensors (any strides, each its own dtype), one pass over both.

    Equals ``pplfast.reference.compare`` (float64) cast to float32; ignored rows get 0 and -1 and
    are not read. ``sm_count``: streaming multiprocessors of the device (required for CUDA
    tensors unless ``num_splits`` is given); ``num_splits`` / ``block_v`` force the vocabulary
    split and block size (tests, tuning).
    """
    floats, ints = _records(base3, test3, targets, ignore_index, softcap, temperature, sm_count,
                            num_splits, block_v)
    B, T, V = base3.shape
    rows = B * T
    inv_temp = 1.0 / float(temperature)
    h = cross_scale(temperature)
    p = _side(floats, ints, 0, inv_temp, h)
    q = _side(floats, ints, 1, inv_temp, h)
    scored = targets != ignore_index
    safe = torch.where(scored, targets, 0).view(B, T, 1)
    fields = [_kl(p, q, inv_temp), _kl(q, p, inv_temp)]
    for side, logits in ((p, base3), (q, test3)):
        y = logits.gather(2, safe).reshape(rows).double()
        if softcap is not None:
            y = softcap * torch.tanh(y / softcap)
        nll = (side[0] - y) * inv_temp + side[1]  # (m - y_t) / T + log s, in float64
        nll = torch.where(nll < 0, 0.0, nll)  # rounding; NaN and inf kept
        fields.append(torch.where(side[5], float("nan"), nll))
    zero = torch.zeros((), dtype=torch.float64, device=base3.device)
    out = [torch.where(scored, f, zero).float() for f in fields]
    out += [torch.where(scored, side[4], -1) for side in (p, q)]
    return tuple(out)


def compare_slice_partials(
    base3: torch.Tensor,
    test3: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    v_offset: int,
    *,
    sm_count: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_v: Optional[int] = None,
):
    """The comparison records of a vocabulary slice of both models, not finished
    (``kernels/partials.py``).

    Args:
        base3, test3: ``(B, T, V_local)``, columns ``[v_offset, v_offset + V_local)`` of the
            vocabulary, as :func:`compare_forward`.
        targets: ``(B*T,)`` int64, contiguous, global ids or ``ignore_index``; a target outside
            the slice is not read.
        ignore_index, softcap, temperature, sm_count, num_splits, block_v: as
            :func:`compare_forward`.
        v_offset: global id of the slice's first column.

    Returns:
        ``(floats, ints)``: float32 ``(B*T, 12)`` (``partials.COMPARE_FLOAT_FIELDS``) and int64
        ``(B*T, 4)`` (``partials.COMPARE_INT_FIELDS``).
    """
    check_v_offset(v_offset)
    floats, ints = _records(base3, test3, targets, ignore_index, softcap, temperature, sm_count,
                            num_splits, block_v)
    targets_f = [target_field(x, targets, ignore_index, v_offset) for x in (base3, test3)]
    floats = torch.cat([floats.float(), torch.stack(targets_f, 1)], 1)
    return floats, global_ids(ints, v_offset)
