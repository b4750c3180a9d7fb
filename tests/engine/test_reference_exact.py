"""The float64 reference against exact arithmetic (mpmath at 50 digits) on rows that include the
top of the float32 range (3e38, FLT_MAX, -FLT_MAX; ``helpers.float32_extreme_rows``) and
ordinary ones, under softcap and temperature: an oracle that is wrong at the extremes lets the
kernels be wrong there too. ``logsumexp(z) - z[target]`` in float64 returned 0 for two tied
logits of 3e38 (log 2) and for 300 equal ones (log 300); the reference now works relative to the
row's maximum.

Every op is checked: token_nll, token_stats (entropy, max log-probability, top-k
log-probabilities), compare (both KLs, both NLLs), and the hidden-states forms on ``hidden = I``
and ``weight = logits.T`` (whose float64 logits are the rows exactly)."""
from __future__ import annotations

import pytest
import torch

from pplfast import reference

from helpers import extreme_option_params, extreme_scale, float32_extreme_rows

mpmath = pytest.importorskip("mpmath")
mp = mpmath.mp

RTOL = 1e-12  # float64 arithmetic relative to the maximum: a few ulps of the values' scale


def exact_rows(x, softcap, temperature):
    """Per row: mpmath log-probabilities of every entry (exact inputs, 50 digits)."""
    out = []
    with mp.workdps(50):
        t = mp.mpf(temperature)
        for row in x.double().tolist():
            y = [mp.mpf(v) for v in row]
            if softcap is not None:
                c = mp.mpf(softcap)
                y = [c * mp.tanh(v / c) for v in y]
            top = max(y)
            d = [(v - top) / t for v in y]
            log_sum = mp.log(mp.fsum(mp.exp(v) for v in d))
            out.append([v - log_sum for v in d])
    return out


def exact_stats(logp, targets):
    nll, entropy, max_logprob = [], [], []
    with mp.workdps(50):
        for lp, t in zip(logp, targets.tolist()):
            nll.append(-lp[t])
            entropy.append(-mp.fsum(mp.exp(v) * v for v in lp))
            max_logprob.append(max(lp))
    return [torch.tensor([float(v) for v in f], dtype=torch.float64)
            for f in (nll, entropy, max_logprob)]


def exact_kl(logp, logq):
    with mp.workdps(50):
        return torch.tensor([float(mp.fsum(mp.exp(a) * (a - b) for a, b in zip(p, q)))
                             for p, q in zip(logp, logq)], dtype=torch.float64)


def assert_exact(got, want, scale, what):
    """|got - want| <= RTOL * max(1, scale) elementwise; infinities equal (float32 rounding of
    a finite float64 beyond FLT_MAX is the caller's concern: the reference returns float64)."""
    got = got.double()
    bound = RTOL * scale.clamp_min(1.0)
    err = (got - want).abs()
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"{what}: rows {bad.nonzero().flatten().tolist()} got {got[bad].tolist()} "
        f"want {want[bad].tolist()}")


@pytest.mark.parametrize("V", [3, 37, 300])
@pytest.mark.parametrize("opts", extreme_option_params())
def test_reference_is_exact_at_the_float32_limits(V, opts):
    gen = torch.Generator().manual_seed(V)
    x, t = float32_extreme_rows(V, generator=gen)
    logp = exact_rows(x, **opts)
    nll, entropy, max_logprob = exact_stats(logp, t)

    got = reference.token_nll(x, t, **opts)
    assert_exact(got, nll, extreme_scale(x, nll, **opts), f"token_nll V={V} {opts}")
    top_k = 3
    stats = reference.token_stats(x, t, top_k=top_k, **opts)
    assert torch.equal(stats.nll, got)
    assert_exact(stats.entropy, entropy, extreme_scale(x, entropy, **opts), "entropy")
    assert_exact(stats.max_logprob, max_logprob, extreme_scale(x, max_logprob, **opts),
                 "max_logprob")
    want_top = torch.tensor([[float(v) for v in sorted(row, reverse=True)[:top_k]]
                             for row in logp], dtype=torch.float64)
    assert_exact(stats.top_k_logprobs, want_top, extreme_scale(x, want_top, **opts),
                 "top_k_logprobs")
    at_ids = torch.tensor([[float(row[i]) for i in ids] for row, ids in
                           zip(logp, stats.top_k_ids.tolist())], dtype=torch.float64)
    assert_exact(stats.top_k_logprobs, at_ids, extreme_scale(x, at_ids, **opts),
                 "top_k_logprobs at top_k_ids")

    # compare: each row against the next one (rows of different shapes and extremes) and
    # against itself (KL 0)
    other = x.roll(1, dims=0)
    logq = exact_rows(other, **opts)
    fields = reference.compare(x, other, t, **opts)
    kl, kl_rev = exact_kl(logp, logq), exact_kl(logq, logp)
    scale = torch.maximum(extreme_scale(x, kl, **opts), extreme_scale(other, kl, **opts))
    assert_exact(fields["kl"], kl, scale, "kl")
    scale = torch.maximum(extreme_scale(x, kl_rev, **opts), extreme_scale(other, kl_rev, **opts))
    assert_exact(fields["kl_reverse"], kl_rev, scale, "kl_reverse")
    assert torch.equal(fields["nll_base"], got)
    same = reference.compare(x, x, t, **opts)
    assert bool((same["kl"] == 0).all()) and bool((same["kl_reverse"] == 0).all())

    # the hidden-states forms: hidden = I, weight = x.T give these rows as float64 logits
    eye = torch.eye(x.shape[0])
    assert torch.equal(reference.linear_token_nll(eye, x.T, t, **opts), got)
    lstats = reference.linear_token_stats(eye, x.T, t, top_k=top_k, **opts)
    for name in ("nll", "entropy", "max_logprob", "top_k_logprobs"):
        assert torch.equal(getattr(lstats, name), getattr(stats, name)), name
    lfields = reference.linear_compare(eye, x.T, eye, other.T, t, **opts)
    for name in ("kl", "kl_reverse", "nll_base", "nll_test"):
        assert torch.equal(lfields[name], fields[name]), name


def test_the_issue_rows():
    """The two rows of the report, at the temperatures named there."""
    x = torch.tensor([[3e38, 3e38, -1.0]])
    t = torch.tensor([0])
    for temperature in (1.0, 0.5, 3.0):
        got = reference.token_nll(x, t, temperature=temperature)
        assert abs(got.item() - 0.6931471805599453) < 1e-15, (temperature, got)
        kl = reference.compare(x, x, t, temperature=temperature)["kl"]
        assert kl.item() == 0.0
    flat = torch.full((1, 300), 3e38)
    assert abs(reference.token_nll(flat, t).item() - 5.703782474656201) < 1e-14
