"""The Triton launchers' vocabulary-slice records (``kernels/partials.py``), in one process: a
vocabulary cut into 2 or 3 uneven slices, each slice's records computed by its launcher with the
slice's first global id, merged here in float64 by the rules the layout documents, and
finished, give what the single-pass launcher gives on the whole vocabulary, special values
included (NaN in one slice, +inf in one slice, a slice of -inf only, the target in such a slice,
ties for the argmax across slices, ignored rows holding NaN, rows at the float32 limits), and the
float64 reference within the usual bound.

The merges below are written from the layout's documentation, not from the kernels' code: they
are what a caller holding the slices on several ranks writes.
"""
from __future__ import annotations

import pytest
import torch

from helpers import NUMPY_FLOAT_WARNINGS, assert_nll_close, extreme_scale, float32_extreme_rows
from pplfast import reference

pytest.importorskip("triton")
from pplfast.kernels import partials  # noqa: E402
from pplfast.kernels.compare import compare_forward, compare_slice_partials  # noqa: E402
from pplfast.kernels.token_nll import token_nll_forward, token_nll_slice_partials  # noqa: E402
from pplfast.kernels.token_stats import (token_stats_forward,  # noqa: E402
                                         token_stats_slice_partials)

pytestmark = [
    pytest.mark.interpreter,
    *NUMPY_FLOAT_WARNINGS,
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SM_COUNT = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else None
IGNORE = -100
V = 101
# uneven slices, one of them narrower than a block; (slice bounds, num_splits per slice): the
# slices are themselves cut into chunks by the launcher (None: its own plan)
CUTS = {"two": ([0, 64, V], [None, 3]), "three": ([0, 37, 40, V], [2, None, 1])}
OPTIONS = [dict(softcap=None, temperature=1.0), dict(softcap=None, temperature=0.5),
           dict(softcap=30.0, temperature=3.0), dict(softcap=None, temperature=5e37)]
OPTION_IDS = ["plain", "t0.5", "cap30-t3", "t5e37"]


def special_rows(dtype=torch.float32):
    """``(logits (12, V), targets (12,))``: every row crosses the cuts 37, 40 and 64."""
    x = torch.randn(12, V) * 3
    t = torch.randint(0, V, (12,))
    x[1, 50] = float("nan")                      # NaN in one slice only
    x[2, 38], t[2] = float("inf"), 5             # +inf in one slice, the target elsewhere
    x[3, 40:64] = -float("inf")                  # a slice of -inf only (and part of another)
    x[4, :37], t[4] = -float("inf"), 10          # the target in a slice of -inf only
    x[5], t[5] = float("nan"), IGNORE            # an ignored row is never read
    x[6, 20] = x[6, 70] = x[6].max() + 2.0       # tied maxima in two slices: the lowest id
    t[6] = 3
    x[7, 39], t[7] = float("inf"), 39            # +inf at the target: NaN
    x[8] = -float("inf")                         # a row of -inf only: NaN
    x[9, 80] = 40.0                              # one logit far above the others
    x[10, 0], t[10] = 5.0, 0                     # the target at the vocabulary's first id
    x[11, V - 1], t[11] = 5.0, V - 1             # ... and at its last
    return x.to(dtype), t


def extreme_rows(dtype=torch.float32):
    x, t = float32_extreme_rows(V, dtype)
    return x, t


ROWS = {"special": special_rows, "extremes": extreme_rows}


def _slices(x, cuts):
    bounds, splits = cuts
    return [(a, x[..., a:b], n) for a, b, n in zip(bounds, bounds[1:], splits)]


def _to(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _capped(x, softcap):
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _merge_sums(m, s, temperature):
    """``(M, S, w)`` of records with maxima ``m`` and sums ``s`` (rows, k), float64."""
    M = m.max(1).values
    w = torch.where(m == M[:, None], 1.0, torch.exp((m - M[:, None]) / temperature))
    return M, (w * s).sum(1), w


def _nll(M, S, target_y, temperature):
    nll = (M - target_y) / temperature + torch.log(S)
    return torch.where(nll < 0, 0.0, nll)


def _first_of_best(best, ids):
    """The lowest id among the records holding the largest ``best``; NO_INDEX records left out."""
    found = ids != partials.NO_INDEX
    top = torch.where(found, best, -float("inf")).max(1).values
    return torch.where(found & (best == top[:, None]), ids, partials.NO_INDEX).min(1).values


def _check_float(actual, expected, x, what, *, single=None, **opts):
    """Within 2e-6 * max(1, |value|, |lse of the row's ordinary logits|) of the float64
    oracle rounded to float32; non-finite values equal to the single-pass launcher's."""
    expected = expected.reshape(-1).double().float().double()
    scale = extreme_scale(x.reshape(-1, x.shape[-1]), expected, **opts)
    assert_nll_close(actual, expected, scale, what=what)
    if single is not None:
        a, s = actual.cpu(), single.cpu()
        same = ((torch.isnan(a) == torch.isnan(s)) & (torch.isinf(a) == torch.isinf(s))
                & (~torch.isinf(a) | (a == s)))
        assert bool(same.all()), f"{what}: {a} vs single pass {s}"


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("cuts", list(CUTS))
def test_token_nll_slices_merge_to_the_single_pass(cuts, rows, opts):
    x, t = _to(*ROWS[rows]())
    T = opts["temperature"]
    records = [token_nll_slice_partials(part.unsqueeze(0), t, IGNORE, opts["softcap"], T,
                                        offset, sm_count=SM_COUNT, num_splits=n)
               for offset, part, n in _slices(x, CUTS[cuts])]
    assert all(r.shape == (12 if rows == "special" else 9, 3) and r.dtype == torch.float32
               for r in records)
    R = torch.stack(records, 1).double().cpu()
    field = partials.NLL_FIELDS.index
    M, S, _ = _merge_sums(R[..., field("max")], R[..., field("sum")], T)
    target_y = _capped(R[..., field("target")].sum(1), opts["softcap"])
    scored = t.cpu() != IGNORE
    nll = torch.where(scored, _nll(M, S, target_y, T), 0.0).float()

    single = token_nll_forward(x.unsqueeze(0), t, IGNORE, opts["softcap"], T, sm_count=SM_COUNT)
    _check_float(nll, reference.token_nll(x.cpu(), t.cpu(), ignore_index=IGNORE, **opts), x.cpu(),
                 "nll", single=single, **opts)


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("cuts", list(CUTS))
def test_token_stats_slices_merge_to_the_single_pass(cuts, rows, opts):
    x, t = _to(*ROWS[rows]())
    T, cap, k = opts["temperature"], opts["softcap"], 5
    slices = _slices(x, CUTS[cuts])
    # the rank needs every row's target logit on every slice: the slices' target fields, summed
    # (one small all-reduce across ranks)
    target_logits = sum(partials.target_field(part.unsqueeze(0), t, IGNORE, offset)
                        for offset, part, _ in slices)
    outs = [token_stats_slice_partials(part.unsqueeze(0), t, IGNORE, cap, T, offset,
                                       target_logits=target_logits, top_k=k, sm_count=SM_COUNT,
                                       num_splits=n) for offset, part, n in slices]
    F = torch.stack([o[0] for o in outs], 1).double().cpu()
    I = torch.stack([o[1] for o in outs], 1).cpu()
    f, i = partials.STATS_FLOAT_FIELDS.index, partials.STATS_INT_FIELDS.index
    m, s, e = F[..., f("max")], F[..., f("sum")], F[..., f("moment")]
    M, S, w = _merge_sums(m, s, T)
    delta = torch.where(m == M[:, None], 0.0, (m - M[:, None]) / T)
    E = torch.where(w > 0, w * (e + delta * s), 0.0).sum(1)
    nan = I[..., i("nan")].amax(1) > 0
    target_y = _capped(F[..., f("target")].sum(1), cap)
    assert torch.equal(F[..., f("target")].sum(1).float(), target_logits.cpu())
    log_s = torch.log(S)
    bad = nan | ~torch.isfinite(M)
    nll = torch.where(nan, float("nan"), _nll(M, S, target_y, T))
    entropy = torch.where(bad, float("nan"), (log_s - E / S).clamp_min(0.0))
    max_logprob = torch.where(bad, float("nan"), (-log_s).clamp_max(0.0))
    argmax = _first_of_best(F[..., f("best")], I[..., i("argmax")])
    rank = I[..., i("rank")].sum(1)
    # top-k: the k largest of all slices' candidates
    values = torch.cat([o[2] for o in outs], 1).cpu()
    ids = torch.cat([o[3] for o in outs], 1).cpu()
    top_values, pick = values.topk(k, dim=1)
    top_ids = ids.gather(1, pick)
    top_lp = (_capped(top_values.double(), cap) - M[:, None]) / T - log_s[:, None]

    scored = t.cpu() != IGNORE
    single = token_stats_forward(x.unsqueeze(0), t, IGNORE, cap, T, k, sm_count=SM_COUNT)
    single = [v.cpu() for v in single]
    want = reference.token_stats(x.cpu(), t.cpu(), ignore_index=IGNORE, top_k=k, **opts)
    for name, value, one in (("nll", nll, single[0]), ("entropy", entropy, single[1]),
                             ("max_logprob", max_logprob, single[2])):
        value = torch.where(scored, value, 0.0).float()
        _check_float(value, getattr(want, name), x.cpu(), name, single=one, **opts)
    # the integer fields are the single pass's, exactly, wherever they are defined (no NaN)
    ok = scored & ~torch.isnan(x.cpu()).any(-1)
    assert torch.equal(argmax[ok], single[3][ok]), (argmax, single[3])
    assert torch.equal(rank[ok], single[4][ok]), (rank, single[4])
    assert bool((I[~scored][..., i("rank")] == -1).all())
    # top-k: the same values (ids may differ among ties), their log-probabilities
    assert torch.equal(top_values[ok], x.cpu().float().gather(1, single[5].clamp_min(0))[ok])
    assert torch.equal(x.cpu().float().gather(1, top_ids.clamp_min(0))[ok], top_values[ok])
    lp = torch.where(ok[:, None], top_lp, 0.0).float()
    want_lp = torch.where(ok[:, None], want.top_k_logprobs.double(), 0.0)
    scale = extreme_scale(x.cpu(), want_lp.float().double(), **opts)
    assert_nll_close(lp, want_lp.float().double(), scale, what="top_k_logprobs")
    assert bool((ids[~scored] == -1).all())


@pytest.mark.parametrize("cuts", list(CUTS))
def test_token_stats_rank_without_target_logits(cuts):
    """Without ``target_logits`` a slice counts the rank only where it holds the target."""
    x, t = _to(*special_rows())
    for offset, part, n in _slices(x, CUTS[cuts]):
        _, ints, _, _ = token_stats_slice_partials(part.unsqueeze(0), t, IGNORE, None, 1.0, offset,
                                                   sm_count=SM_COUNT, num_splits=n)
        inside = (t >= offset) & (t < offset + part.shape[-1])
        rank = ints[:, partials.STATS_INT_FIELDS.index("rank")]
        assert bool((rank[~inside] == -1).all()) and bool((rank[inside] >= 0).all())


def _merge_compare_side(F, I, side, M, T, h):
    """One side's merged (S, numerator in the logits' units, lone, argmax with NaN, has NaN)."""
    f = partials.COMPARE_FLOAT_FIELDS.index
    name = ("base", "test")[side]
    other = ("base", "test")[1 - side]
    m, s = F[..., f(f"max_{name}")], F[..., f(f"sum_{name}")]
    w = torch.where(m == M[side][:, None], 1.0, torch.exp((m - M[side][:, None]) / T))
    shift = (m - M[side][:, None]) - (F[..., f(f"max_{other}")] - M[1 - side][:, None])
    units = F[..., f(f"cross_{name}")] * (2.0 / h) + torch.where(s > 0, shift * s, 0.0)
    S = (w * s).sum(1)
    C = torch.where(w > 0, w * units, 0.0).sum(1)
    lone = F[..., f(f"lone_{name}")].max(1).values
    ints = partials.COMPARE_INT_FIELDS.index
    first_nan = I[..., ints(f"first_nan_{name}")].min(1).values
    argmax = _first_of_best(F[..., f(f"raw_max_{name}")], I[..., ints(f"argmax_{name}")])
    has_nan = first_nan != partials.NO_INDEX
    return S, C, lone, torch.where(has_nan, first_nan, argmax), has_nan


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("cuts", list(CUTS))
def test_compare_slices_merge_to_the_single_pass(cuts, rows, opts):
    base, t = ROWS[rows]()
    # the test model: the ordinary logits moved, the special ones kept, and its rows rolled by
    # one for a third of them (special values facing ordinary logits)
    test = torch.where(torch.isfinite(base) & (base.abs() < 1e30),
                       base + 0.5 * torch.randn(base.shape), base)
    test[::3] = test[::3].roll(1, dims=0)
    base, test, t = _to(base, test, t)
    T, cap = opts["temperature"], opts["softcap"]
    h = partials.cross_scale(T)
    outs = [compare_slice_partials(pb.unsqueeze(0), pt.unsqueeze(0), t, IGNORE, cap, T, offset,
                                   sm_count=SM_COUNT, num_splits=n)
            for (offset, pb, n), (_, pt, _) in zip(_slices(base, CUTS[cuts]),
                                                   _slices(test, CUTS[cuts]))]
    F = torch.stack([o[0] for o in outs], 1).double().cpu()
    I = torch.stack([o[1] for o in outs], 1).cpu()
    f = partials.COMPARE_FLOAT_FIELDS.index
    M = [F[..., f("max_base")].max(1).values, F[..., f("max_test")].max(1).values]
    sides = [_merge_compare_side(F, I, side, M, T, h) for side in (0, 1)]
    fields = {}
    for side, name in ((0, "kl"), (1, "kl_reverse")):
        S, C, lone, _, nan = sides[side]
        S_o, nan_o = sides[1 - side][0], sides[1 - side][4]
        kl = (C / (T * S) - torch.log(S) + torch.log(S_o)).clamp_min(0.0)
        kl = torch.where(torch.exp((lone - M[side]) / T) / S > 0, float("inf"), kl)
        undefined = nan | nan_o | ~torch.isfinite(M[0]) | ~torch.isfinite(M[1])
        fields[name] = torch.where(undefined, float("nan"), kl)
    for side, name in ((0, "base"), (1, "test")):
        S, _, _, argmax, nan = sides[side]
        target_y = _capped(F[..., f(f"target_{name}")].sum(1), cap)
        fields[f"nll_{name}"] = torch.where(nan, float("nan"), _nll(M[side], S, target_y, T))
        fields[f"argmax_{name}"] = argmax

    scored = t.cpu() != IGNORE
    single = compare_forward(base.unsqueeze(0), test.unsqueeze(0), t, IGNORE, cap, T,
                             sm_count=SM_COUNT)
    single = dict(zip(("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base",
                       "argmax_test"), (v.cpu() for v in single)))
    want = reference.compare(base.cpu(), test.cpu(), t.cpu(), ignore_index=IGNORE, **opts)
    for name, rows_of in (("kl", (base, test)), ("kl_reverse", (base, test)),
                          ("nll_base", (base,)), ("nll_test", (test,))):
        value = torch.where(scored, fields[name], 0.0).float()
        expected = want[name].double().float().double()
        scale = torch.stack([extreme_scale(r.cpu(), expected, **opts) for r in rows_of])
        assert_nll_close(value, expected, scale.max(0).values, what=name)
        a, s = value, single[name]
        assert torch.equal(torch.isnan(a), torch.isnan(s)), (name, a, s)
        assert torch.equal(a[torch.isinf(a)], s[torch.isinf(a)]), (name, a, s)
    for name in ("argmax_base", "argmax_test"):
        value = torch.where(scored, fields[name], -1)
        assert torch.equal(value, single[name]), (name, value, single[name])
        assert torch.equal(value, want[name]), (name, value, want[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_slices(dtype):
    """float16 / bfloat16 slices: the target fields are the logits widened exactly."""
    x, t = _to(*special_rows(dtype))
    for offset, part, n in _slices(x, CUTS["three"]):
        rec = token_nll_slice_partials(part.unsqueeze(0), t, IGNORE, None, 1.0, offset,
                                       sm_count=SM_COUNT, num_splits=n)
        inside = (t >= offset) & (t < offset + part.shape[-1])
        want = torch.where(inside, x.float()[torch.arange(12, device=DEVICE),
                                             t.clamp(0, V - 1)], 0.0)
        assert torch.equal(rec[:, partials.NLL_FIELDS.index("target")], want)


def test_empty_slice_and_bad_offset():
    x, t = _to(*special_rows())
    empty = x[:, :0].unsqueeze(0)
    rec = token_nll_slice_partials(empty, t, IGNORE, None, 1.0, 7, sm_count=SM_COUNT)
    assert torch.equal(rec.cpu(), torch.tensor([[-float("inf"), 0.0, 0.0]]).expand(12, 3))
    floats, ints, _, _ = token_stats_slice_partials(empty, t, IGNORE, None, 1.0, 7,
                                                    sm_count=SM_COUNT)
    assert bool((floats[:, 0] == -float("inf")).all()) and bool((floats[:, 1:3] == 0).all())
    assert bool((ints[:, 1] == partials.NO_INDEX).all())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="v_offset"):
            token_nll_slice_partials(x.unsqueeze(0), t, IGNORE, None, 1.0, bad,
                                     sm_count=SM_COUNT)
    with pytest.raises(ValueError, match="target_logits"):
        token_stats_slice_partials(x.unsqueeze(0), t, IGNORE, None, 1.0, 0,
                                   target_logits=torch.zeros(12, dtype=torch.float64,
                                                             device=DEVICE),
                                   sm_count=SM_COUNT)


def test_the_triton_backend_hands_the_slices_over():
    """``pplfast._triton``'s slice launchers: the kernels' launchers with the device's SM count."""
    from pplfast import _triton

    x, t = _to(*special_rows())
    base, test = x[:, 37:64].unsqueeze(0), x[:, 37:64].flip(-1).unsqueeze(0)
    same = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(
        _triton.token_nll_slice_partials(base, t, IGNORE, None, 0.5, 37),
        token_nll_slice_partials(base, t, IGNORE, None, 0.5, 37, sm_count=SM_COUNT), **same)
    torch.testing.assert_close(
        _triton.token_stats_slice_partials(base, t, IGNORE, 30.0, 1.0, 37, 3),
        token_stats_slice_partials(base, t, IGNORE, 30.0, 1.0, 37, top_k=3, sm_count=SM_COUNT),
        **same)
    torch.testing.assert_close(
        _triton.compare_slice_partials(base, test, t, IGNORE, None, 2.0, 37),
        compare_slice_partials(base, test, t, IGNORE, None, 2.0, 37, sm_count=SM_COUNT), **same)
