"""``backend="cpu"``'s vocabulary slices (vocab-parallel scoring): the partials of
``pplfast._vocab_merge`` for one rank's slice of the vocabulary.

A slice's partials are the running states of ``pplfast._cpu``, read column by column once the
slice is folded (one update for logits, one per tile for hidden states, at the slice's vocabulary
offset). This module restates the columns of the states (csrc/cpu/token_nll.cpp, token_stats.cpp
and compare.cpp) it reads; tests/engine/test_vocab_parallel.py checks every field it gives
against the float64 reference, so a change of a state's layout shows there.
"""
from __future__ import annotations

import torch

from . import _C, _env
from ._chunked import _select_scored
from ._cpu import (compare_state, compare_update, fold_linear_compare, fold_linear_nll,
                   fold_linear_stats, nll_state, nll_update, stats_state, stats_update,
                   target_thresholds)
from ._vocab_merge import inside, lse_words


_NLL_MAX, _NLL_SUM, _NLL_TARGET = 0, 1, 2
_STATS_MAX, _STATS_SUM, _STATS_ENT, _STATS_AMAX_IDX, _STATS_RANK = 0, 1, 2, 4, 5
_SIDE = _C.COMPARE_STATE // 2  # base side, then test side
_CMP_M, _CMP_S, _CMP_A, _CMP_RAWMAX, _CMP_ARG, _CMP_NAN, _CMP_AT_NINF, _CMP_TARGET = range(8)
_INF = float("inf")


def _transformed(x: torch.Tensor, softcap) -> torch.Tensor:
    """float32 values ``x`` (n,) soft-capped by the kernels' own transform (float64 out): what
    their rows compare a target's value as, folded as a one-column slab."""
    n = x.shape[0]
    state = nll_state(n)
    nll_update(x.float().contiguous().view(n, 1, 1), torch.zeros(n, dtype=torch.int64), 0, -1,
               softcap, 1.0, state)
    return state[:, _NLL_TARGET]


def _scattered(fields, rows, n: int, fills) -> tuple:
    """Per-row fields of the scored rows into ``n`` rows, ``fills`` in the others (partials of a
    row with nothing folded: the merge masks those rows)."""
    if rows is None:
        return tuple(fields)
    out = []
    for f, fill in zip(fields, fills):
        full = torch.full((n, *f.shape[1:]), fill, dtype=f.dtype)
        out.append(full.index_copy_(0, rows, f))
    return tuple(out)


def _budget() -> int:
    return _env.budget_bytes(_env.CPU_CHUNK_MB, _env.DEFAULT_CPU_CHUNK_MB, None)


_NLL_FILLS = (-_INF, 0.0, 0.0)


def token_nll_slice(logits3, targets, v_offset, ignore_index, softcap, temperature):
    B, T, width = logits3.shape
    state = nll_state(B * T)
    nll_update(logits3, targets, v_offset, ignore_index, softcap, temperature, state)
    return lse_words(state[:, _NLL_MAX], state[:, _NLL_SUM], state[:, _NLL_TARGET],
                     inside(targets, v_offset, width), temperature)


def linear_token_nll_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                           temperature):
    rows, scored = _select_scored(targets, ignore_index)
    n = scored.shape[0]
    state = nll_state(n)
    fold_linear_nll(hidden2, weight, bias, rows, scored, v_offset, ignore_index, softcap,
                    temperature, _budget(), state)
    words = lse_words(state[:, _NLL_MAX], state[:, _NLL_SUM], state[:, _NLL_TARGET],
                      inside(scored, v_offset, weight.shape[0]), temperature)
    return _scattered(words, rows, targets.shape[0], _NLL_FILLS)


def target_logits(logits3, targets, v_offset):
    """Each row's raw target logit where the target lies in the slice, else 0 (float32): the
    target entries gathered, nothing else read."""
    B, T, width = logits3.shape
    n = B * T
    held = inside(targets, v_offset, width)
    if width == 0 or n == 0:
        return torch.zeros(n, dtype=torch.float32)
    index = torch.arange(n)
    values = logits3[index // T, index % T, torch.where(held, targets - v_offset, 0)]
    return torch.where(held, values.float(), 0.0)


def linear_target_logits(hidden2, weight, bias, targets, v_offset):
    """As :func:`target_logits` for ``F.linear``: one float32 dot product per row, as the
    thresholds of :func:`linear_token_stats`."""
    held = inside(targets, v_offset, weight.shape[0])
    if weight.shape[0] == 0 or targets.numel() == 0:
        return torch.zeros(targets.shape[0], dtype=torch.float32)
    local = torch.where(held, targets - v_offset, 0)
    values = target_thresholds(hidden2, weight, bias, local, None, None, _budget())
    return torch.where(held, values, 0.0)


def _stats_words(state, targets, v_offset, width, temperature, top_k):
    m = state[:, _STATS_MAX]
    m, s, _ = lse_words(m, state[:, _STATS_SUM], m, torch.zeros_like(targets, dtype=torch.bool),
                        temperature)
    argmax = state[:, _STATS_AMAX_IDX].long()
    if width:  # nothing above -inf: the slice's first column (the lowest index of the tie)
        argmax = torch.where(argmax < 0, v_offset, argmax)
    top = _C.STATS_STATE
    return (m, s, state[:, _STATS_ENT], argmax, state[:, _STATS_RANK].long(),
            state[:, top : top + top_k], state[:, top + top_k : top + 2 * top_k].long())


def _stats_fills(top_k: int):
    return (-_INF, 0.0, 0.0, -1, 0, -_INF, -1)


def token_stats_slice(logits3, targets, v_offset, ignore_index, softcap, temperature, top_k,
                      target_x):
    """``target_x``: every row's raw target logit; the rank's threshold is its transform."""
    B, T, width = logits3.shape
    state = stats_state(B * T, top_k, _transformed(target_x, softcap).float())
    stats_update(logits3, targets, v_offset, ignore_index, softcap, temperature, top_k, state)
    return _stats_words(state, targets, v_offset, width, temperature, top_k)


def linear_token_stats_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                             temperature, top_k, target_x):
    rows, scored = _select_scored(targets, ignore_index)
    n = scored.shape[0]
    own = target_x if rows is None else target_x.index_select(0, rows)
    state = stats_state(n, top_k, _transformed(own, softcap).float())
    fold_linear_stats(hidden2, weight, bias, rows, scored, v_offset, ignore_index, softcap,
                      temperature, top_k, _budget(), state)
    words = _stats_words(state, scored, v_offset, weight.shape[0], temperature, top_k)
    return _scattered(words, rows, targets.shape[0], _stats_fills(top_k))


def _compare_words(state, targets, v_offset, width, temperature):
    held = inside(targets, v_offset, width)
    words, cross, maxima = [], [], []
    for side in (state[:, :_SIDE], state[:, _SIDE:]):
        m = torch.where(side[:, _CMP_NAN] != 0, float("nan"), side[:, _CMP_M])
        m, s, delta = lse_words(m, side[:, _CMP_S], side[:, _CMP_TARGET], held, temperature)
        words += [m, s, delta]
        # the state's A leaves out the terms where the other row is -inf; where such a term has
        # p_v > 0 it is +inf
        p_at_ninf = torch.exp((side[:, _CMP_AT_NINF] - m) / temperature) > 0
        cross.append(torch.where(p_at_ninf & torch.isfinite(m), _INF,
                                 side[:, _CMP_A] / temperature))
        raw = torch.where(side[:, _CMP_NAN] != 0, float("nan"), side[:, _CMP_RAWMAX])
        arg = side[:, _CMP_ARG].long()
        if width:
            arg = torch.where(raw == -_INF, v_offset, arg)
        maxima += [raw, arg]
    return (*words, *cross, *maxima)


_COMPARE_FILLS = (-_INF, 0.0, 0.0, -_INF, 0.0, 0.0, 0.0, 0.0, -_INF, -1, -_INF, -1)


def compare_slice(logits3_base, logits3_test, targets, v_offset, ignore_index, softcap,
                  temperature):
    B, T, width = logits3_base.shape
    state = compare_state(B * T)
    compare_update(logits3_base, logits3_test, targets, v_offset, ignore_index, softcap,
                   temperature, state)
    return _compare_words(state, targets, v_offset, width, temperature)


def linear_compare_slice(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                         bias_test, targets, v_offset, ignore_index, softcap, temperature):
    V = weight_base.shape[0]
    rows, scored = _select_scored(targets, ignore_index)
    state = compare_state(scored.shape[0])
    fold_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                        bias_test, rows, scored, v_offset, ignore_index, softcap, temperature,
                        _budget(), state)
    words = _compare_words(state, scored, v_offset, V, temperature)
    return _scattered(words, rows, targets.shape[0], _COMPARE_FILLS)
