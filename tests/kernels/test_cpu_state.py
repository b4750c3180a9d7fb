"""The native CPU kernels' one convention for running state (csrc/cpu/ops.h): for the NLL, the
statistics and the comparison alike, a (rows, width) float64 state folded slab by slab at a
vocabulary offset gives what one pass over the whole row gives; and the exponents' fold (one
FMA, y s - R(m s), corrected in double) loses nothing at large offsets or where the fold gives
way to the halves near the top of the float range."""
from __future__ import annotations

import pytest
import torch

import pplfast
from pplfast import _C, _cpu, reference
from helpers import assert_nll_close, row_lse

CUTS = [0, 1, 17, 2048, 2049, 4100, 4101, 5003]  # slabs of 1, 16, 2031, 1, ... columns


def slabs(logits):
    for c0, c1 in zip(CUTS, CUTS[1:]):
        yield c0, logits[None, :, c0:c1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (7.0, 0.6)], ids=["plain", "capT"])
def test_slabs_equal_one_pass(dtype, softcap, temperature):
    V = CUTS[-1]
    logits = (torch.randn(9, V) * 3).to(dtype)
    logits[1, 3000] = float("nan")
    logits[2, :2049] = float("-inf")       # the first slabs of a row hold nothing
    logits[3, 4100] = 60.0                 # the maximum arrives in a one-column slab
    targets = torch.randint(0, V, (9,))
    targets[3], targets[4], targets[5] = 4100, -100, 0
    opts = (-100, softcap, temperature)

    state = _cpu.nll_state(9)
    for c0, slab in slabs(logits):
        _cpu.nll_update(slab, targets, c0, *opts, state)
    one = _cpu.token_nll(logits[None], targets, *opts)
    assert torch.equal(_cpu.nll_finish(state, targets, -100, temperature).isnan(), one.isnan())
    assert_nll_close(_cpu.nll_finish(state, targets, -100, temperature), one,
                     row_lse(logits, softcap=softcap, temperature=temperature))

    k = 4
    y = logits.double()  # the thresholds computed apart, as the hidden-states path does
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    threshold = y.gather(1, targets.clamp(min=0)[:, None])[:, 0].float().contiguous()
    state = _cpu.stats_state(9, k, threshold)
    for c0, slab in slabs(logits):
        _cpu.stats_update(slab, targets, c0, *opts, k, state)
    got = _cpu.stats_finish(state, targets, -100, temperature, k)
    one = _cpu.token_stats(logits[None], targets, *opts, k)
    lse = row_lse(logits, softcap=softcap, temperature=temperature)
    for field in range(3):  # nll, entropy, max log p
        assert_nll_close(got[field], one[field], lse)
    assert torch.equal(got[3], one[3])  # argmax
    assert torch.equal(got[5], one[5])  # top-k ids
    assert_nll_close(got[6], one[6], lse[:, None].expand(-1, k))
    if softcap is None:  # a float64 softcap can order the target differently from the kernel's
        assert torch.equal(got[4], one[4])

    test = (logits.float() + 0.5 * torch.randn(9, V)).to(dtype)
    state = _cpu.compare_state(9)
    for c0, c1 in zip(CUTS, CUTS[1:]):
        _cpu.compare_update(logits[None, :, c0:c1], test[None, :, c0:c1], targets, c0, *opts,
                            state)
    got = _cpu.compare_finish(state, targets, -100, temperature)
    one = _cpu.compare(logits[None], test[None], targets, *opts)
    for a, b in zip(got[:4], one[:4]):
        assert_nll_close(a, b, lse)
    assert torch.equal(got[4], one[4]) and torch.equal(got[5], one[5])


def test_state_widths_and_fresh_states():
    assert _cpu.nll_state(2).shape == (2, _C.NLL_STATE)
    assert _cpu.stats_state(2, 3).shape == (2, _C.STATS_STATE + 6)
    assert _cpu.compare_state(2).shape == (2, _C.COMPARE_STATE)
    targets = torch.tensor([0, -100])
    # a row of nothing but -inf: NaN (-inf - -inf, as the reference); an ignored row: 0
    state = _cpu.nll_state(2)
    _cpu.nll_update(torch.full((1, 2, 5), float("-inf")), targets, 0, -100, None, 1.0, state)
    out = _cpu.nll_finish(state, targets, -100, 1.0)
    assert out[0].isnan() and out[1] == 0
    with pytest.raises(ValueError, match=r"state must be a contiguous \(2, 3\) float64"):
        _cpu.nll_update(torch.randn(1, 2, 5), targets, 0, -100, None, 1.0, _cpu.nll_state(3))
    with pytest.raises(ValueError, match=r"thresholds must be a contiguous \(2,\) float32"):
        _cpu.stats_state(2, 1, torch.zeros(2, dtype=torch.float64))


def test_column_split_rows_merge_in_order():
    """Fewer rows than threads: each row is cut into column ranges scanned in parallel and merged
    in column order (ties of the argmax and the top-k go to the lower column)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        V = 70001
        logits = torch.randn(1, V)
        logits[0, [100, 40000, 69000]] = 9.0  # three tied maxima, in different ranges
        targets = torch.tensor([40000])
        st = pplfast.token_stats(logits, targets, top_k=3, backend="cpu")
        assert st.argmax.tolist() == [100] and st.top_k_ids.tolist() == [[100, 40000, 69000]]
        assert st.rank.tolist() == [0]
        assert_nll_close(pplfast.token_nll(logits, targets, backend="cpu"),
                         reference.token_nll(logits, targets), row_lse(logits))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_large_offsets_lose_nothing(temperature):
    """Logits shifted by 1e4 and -3e4, where the float rounding of m s alone would move the NLL
    by up to ~3e-4: the NLL and entropy within 2e-6 of the float64 reference on the same inputs
    at the scale of the unshifted row (its lse relative to its maximum), not of the offset; and
    rows whose blocks' maxima pass 2^23 / s (4e6, 6e6, 3e30 with 2e29 before), where the fold
    gives way to the plain differences (the halves with a temperature)."""
    V = 6000
    x = torch.randn(8, V, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (8,))
    for offset in (1e4, -3e4):
        logits = (x + offset).float()
        scale = row_lse(logits, temperature=temperature) - logits.double().max(-1).values / temperature
        got = pplfast.token_stats(logits, targets, temperature=temperature, backend="cpu")
        want = reference.token_stats(logits, targets, temperature=temperature)
        assert_nll_close(got.nll, want.nll, scale)
        assert_nll_close(got.entropy, want.entropy, scale, what="entropy")
        assert_nll_close(pplfast.token_nll(logits, targets, temperature=temperature,
                                           backend="cpu"), want.nll, scale)
    big = torch.randn(2, V) * 3
    big[0, :2048] += 4e6
    big[0, 2048:] += 6e6
    big[1, :2048] = 2e29
    big[1, 2048:] = 3e30
    big[1, 5000] = 3e30 + 2e24
    t = torch.tensor([100, 5000])
    want = reference.token_stats(big, t, temperature=temperature)
    scale = row_lse(big, temperature=temperature) - big.double().max(-1).values / temperature
    scale = torch.maximum(scale, want.nll.abs())  # row 0's NLL is 2e6: its float32 rounding
    got = pplfast.token_stats(big, t, temperature=temperature, backend="cpu")
    assert_nll_close(got.nll, want.nll, scale)
    assert_nll_close(got.entropy, want.entropy, scale, what="entropy")
    assert_nll_close(pplfast.token_nll(big, t, temperature=temperature, backend="cpu"),
                     want.nll, scale)
