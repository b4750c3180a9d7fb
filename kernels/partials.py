"""Split-vocabulary partials: what a range of a row's vocabulary reduces to, and how ranges merge.

The logits kernels (``token_nll``, ``token_stats``, ``compare``) reduce a row to a few numbers
per vocabulary range, a *record*, and records of disjoint ranges of the same row merge exactly.
Two things use them:

- in-kernel splits: when rows are few, program (row, chunk) writes the *split record* of its
  chunk to ``part[row, chunk, :]``, and the op's finish merges a row's chunks and finishes it
  (``token_nll._merge_kernel``, ``token_stats._stats_merge_kernel``, ``compare.reduce_records``);
- vocabulary slices: the ``*_slice_partials`` launchers take a ``(B, T, V_local)`` slice whose
  first column is global vocabulary id ``v_offset`` and return one *slice record* per row, the
  split record followed by the target fields, WITHOUT finishing it; whoever holds the other
  slices (other ranks) merges the records with the rules below and finishes.

Conventions, every op. ``x`` are the logits as given, ``y = softcap * tanh(x / softcap)`` (or
``x`` without a softcap) and ``T`` the temperature. Maxima and target logits stay in the units of
``y`` (or ``x``); only exponents are divided by ``T``. Sums are relative to the record's own
maximum ``m`` of ``y``: ``s = sum exp((y - m) / T)``; an empty record (an ignored row, or a range
of -inf only) has ``m = -inf`` and ``s = 0``. Targets are global ids; the ``target`` field of a
slice record is the raw logit ``x[target]`` as float32 where the target lies in the slice and 0
elsewhere (and on ignored rows), so the slices' target fields add up to the row's target logit
exactly. Index fields are global ids (int64), ``NO_INDEX`` where a record holds none. A record
is a float32 row of the fields named below, in that order, and for the statistics and the
comparison an int64 row of their integer fields.

Merging records ``k`` of one row, in float64 (two maxima differ by up to 2 FLT_MAX)::

    M = max_k m_k,   w_k = 1 if m_k == M else exp((m_k - M) / T),   S = sum_k w_k s_k

(``w_k = 1`` also when both are -inf or +inf: never ``inf - inf``). A NaN logit reaches the
``sum`` of its record (and, for the statistics and the comparison, a flag or index of its own),
a +inf logit makes ``m = s = +inf``.

token_nll (:func:`token_nll.token_nll_slice_partials`): float32 ``(rows, 3)``, :data:`NLL_FIELDS`
``(max, sum, target)``; the split record is ``(max, sum)``. Finish:
``nll = (M - y_t) / T + log S`` clamped at 0 (NaN and +inf kept), ``y_t`` the soft-capped sum of
the target fields; ignored rows 0. Merged this way a NaN anywhere gives NaN, +inf gives +inf (NaN
when the target is +inf), a row of -inf NaN, and a target at -inf +inf, as on one device.

token_stats (:func:`token_stats.token_stats_slice_partials`): float32 ``(rows, 5)``,
:data:`STATS_FLOAT_FIELDS` ``(max, sum, moment, best, target)`` and int64 ``(rows, 3)``,
:data:`STATS_INT_FIELDS` ``(nan, argmax, rank)``; the split record drops ``target``.
``moment = sum exp(d) d`` with ``d = (y - m) / T``; ``best`` the largest ``y`` and ``argmax`` the
lowest id holding it (``NO_INDEX`` when the range holds only NaN); ``nan`` 1 when the range holds
a NaN; ``rank`` the count of entries whose ``y`` is strictly above the target's, -1 on ignored
rows and where the target's logit was not known (outside the slice and not passed in as
``target_logits``). Merge: with ``delta_k = (m_k - M) / T``,
``E = sum_k w_k (moment_k + delta_k s_k)`` (terms with ``w_k = 0`` add 0), ``nan`` any, ``rank``
the sum, ``argmax`` the lowest id among the records of the largest ``best``. Finish:
``entropy = log S - E / S`` (at least 0), ``max_logprob = -log S`` (at most 0), the NLL as above;
NaN in the row: all three NaN; ``M = +-inf``: entropy and max log-probability NaN. Top-k
(``top_k > 0``): the slice's k largest raw logits, float32 ``(rows, k)`` in descending order, and
their global ids, int64 ``(rows, k)`` (-inf and -1 past the slice's width and on ignored rows);
the row's top-k are the k largest of all slices' candidates (ties in any order), their
log-probabilities ``(cap(x) - M) / T - log S``.

compare (:func:`compare.compare_slice_partials`): float32 ``(rows, 12)``,
:data:`COMPARE_FLOAT_FIELDS`, for the base row ``a`` (side p) then the test row ``b`` (side q):
``max`` and ``sum`` of its own ``y``; ``cross``, the KL's numerator
``sum exp((y_a - m_p) / T) ((y_a - m_p) - (y_b - m_q)) * H / 2`` relative to BOTH maxima of the
record and scaled by ``H =`` :func:`cross_scale` ``(T)`` (in range wherever the KL is), the test
side's mirror with ``a`` and ``b`` swapped; ``lone``, the largest own ``y`` where the other row
is -inf (-inf if none); ``raw_max``, the largest raw logit (NaN left out); then
``target_base, target_test``. int64 ``(rows, 4)``, :data:`COMPARE_INT_FIELDS`: per side the
lowest id of ``raw_max`` and the id of the first NaN (``NO_INDEX`` if none). The split record
drops the two targets. Merge per side, ``M_p, M_q`` the merged maxima of the two sides:
``shift_k = (m_p,k - M_p) - (m_q,k - M_q)``, each record's numerator moved to both merged maxima
``cross_k * 2 / H + shift_k s_k`` (0 where ``s_k = 0``) and weighted by ``w_k``; ``lone`` and
``raw_max`` the maximum, ``argmax`` as for the statistics, the first NaN the minimum. Finish:
``KL(p||q) = C_p / (T S_p) - log S_p + log S_q`` (``C_p`` the merged numerator) clamped at 0,
+inf where ``exp((lone_p - M_p) / T) / S_p > 0``, NaN where either row holds a NaN or a merged
maximum is not finite; the NLLs as for token_nll; the argmax the first NaN where there is one.
"""
from __future__ import annotations

import torch

from ._common import NO_INDEX as _NO_INDEX

NO_INDEX = _NO_INDEX.value  # "no index": above any vocabulary id (vocabularies are below 2^31)

NLL_FIELDS = ("max", "sum", "target")
STATS_FLOAT_FIELDS = ("max", "sum", "moment", "best", "target")
STATS_INT_FIELDS = ("nan", "argmax", "rank")
COMPARE_FLOAT_FIELDS = ("max_base", "sum_base", "cross_base", "lone_base", "raw_max_base",
                        "max_test", "sum_test", "cross_test", "lone_test", "raw_max_test",
                        "target_base", "target_test")
COMPARE_INT_FIELDS = ("argmax_base", "first_nan_base", "argmax_test", "first_nan_test")


def cross_scale(temperature: float) -> float:
    """``H`` of the comparison records, ``2^-40 / temperature`` as a float32, never below the
    smallest normal float32: it keeps the numerator's lane sums in range wherever the KL is."""
    return float(torch.tensor(max(2.0**-40 / float(temperature), 2.0**-126),
                              dtype=torch.float32))


def check_v_offset(v_offset) -> None:
    """The slice launchers' own argument: the global id of the slice's first column."""
    if isinstance(v_offset, bool) or not isinstance(v_offset, int) or v_offset < 0:
        raise ValueError(f"v_offset must be an int >= 0, got {v_offset!r}")


def target_field(logits3: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                 v_offset: int) -> torch.Tensor:
    """float32 ``(B*T,)``: the raw logit ``logits3[b, t, target - v_offset]`` where the global
    ``target`` lies in the slice (and is not ``ignore_index``), 0 elsewhere; reads nothing
    outside the slice."""
    B, T, V = logits3.shape
    local = targets - v_offset
    inside = (targets != ignore_index) & (local >= 0) & (local < V)
    if V == 0:
        return torch.zeros(B * T, dtype=torch.float32, device=logits3.device)
    safe = torch.where(inside, local, 0).view(B, T, 1)
    x = logits3.gather(2, safe).reshape(B * T).float()
    return torch.where(inside, x, 0.0)


def global_ids(ids: torch.Tensor, v_offset: int) -> torch.Tensor:
    """Slice-local indices moved to global ids; ``NO_INDEX`` stays."""
    return torch.where(ids == NO_INDEX, ids, ids + v_offset)
