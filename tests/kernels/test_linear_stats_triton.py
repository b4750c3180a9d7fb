"""Fused Triton linear_token_stats kernel (``kernels/linear_token_stats.py``) and the Triton
backend's statistics paths: under TRITON_INTERPRET=1 on CPU tensors (set by conftest when there
is no GPU) with small shapes and fp32/fp16/bf16 operands (bf16 tiles are upcast exactly under
the interpreter, whose bf16 ``tl.dot`` is wrong), compiled on a GPU otherwise; against the
float64 oracle ``pplfast.reference.linear_token_stats``.

Float fields: ``2e-6 * max(1, |logsumexp of the row|)``. Integer fields exact, except where
another entry lies within the rounding of the float32 products of the row's float64 logit
(``_tie_band``); the target never counts itself in its rank. The tie tests use small integers,
whose products and sums are exact in float32 in any order, so that there every tie is exact.
"""
from __future__ import annotations

import pytest
import torch

import pplfast
from pplfast import _chunked, reference
from helpers import (LSE_RTOL, NUMPY_FLOAT_WARNINGS, assert_nll_close, hidden_rows_past_2_pow_31,
                     row_lse)

pytest.importorskip("triton")
from pplfast import _triton  # noqa: E402
from pplfast.kernels import _plan  # noqa: E402
from pplfast.kernels import linear_token_nll as nll_kernel  # noqa: E402
from pplfast.kernels import linear_token_stats as kernel  # noqa: E402
from pplfast.kernels.token_stats import token_stats_forward  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    *NUMPY_FLOAT_WARNINGS,
    pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# one small tile (BLOCK_V = 32) on both, so that small vocabularies split into several ranges
CONFIG = (16, 32, 32, 1, 1) if DEVICE == "cpu" else (32, 32, 32, 4, 2)
SM_COUNT = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else None
IGNORE = -100
FLOAT_FIELDS = ("nll", "entropy", "max_logprob")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fused(hidden, weight, bias, targets, softcap=None, temperature=1.0, **kw):
    """The fused launcher with the test configuration (and the SM count on a GPU)."""
    kw.setdefault("config", CONFIG)
    return kernel.linear_token_stats_forward(hidden, weight, bias, targets, IGNORE, softcap,
                                             temperature, sm_count=SM_COUNT, **kw)


def make_inputs(N, D, V, dtype, *, bias=False, ignore_every=0, scale=2.0):
    hidden = torch.randn(N, D).to(dtype)
    weight = (torch.randn(V, D) * (scale / D**0.5)).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return _dev(hidden), _dev(weight), _dev(b), _dev(targets)


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _logits64(hidden, weight, bias):
    z = hidden.double().cpu() @ weight.double().cpu().T
    return z if bias is None else z + bias.double().cpu()


def _tie_band(hidden, weight, bias, softcap, temperature):
    """Per-entry width within which two transformed logits count as tied: the float32 rounding
    of a dot product (either path, any order: 2 x D x 2^-24 x sum_d |h_d w_vd| each) plus the
    bias addition. Softcap and temperature do not widen it (|d tanh| <= 1, T divides both)."""
    D = hidden.shape[1]
    mag = hidden.double().abs().cpu() @ weight.double().abs().cpu().T
    if bias is not None:
        mag = mag + bias.double().abs().cpu()
    band = 4 * max(D, 1) * 2.0**-24 * mag / temperature
    return torch.where(torch.isfinite(band), band, torch.zeros_like(band))


def check(fields, hidden, weight, bias, targets, *, softcap=None, temperature=1.0, exact=False):
    """``fields`` (the launcher's 5-tuple or a TokenStats) of ``(N, D)`` hidden states against
    the float64 oracle.

    ``exact``: integer inputs (every logit exact in float32), so argmax and rank must equal the
    oracle's exactly, ties included."""
    if isinstance(fields, pplfast.TokenStats):  # flattened to the rows of ``hidden``
        fields = tuple(getattr(fields, name).reshape(-1)
                       for name in (*FLOAT_FIELDS, "argmax", "rank"))
    nll, entropy, max_logprob, argmax, rank = (f.cpu() for f in fields)
    h, w, b, t = (None if x is None else x.cpu() for x in (hidden, weight, bias, targets))
    want = reference.linear_token_stats(h, w, t, bias=b, softcap=softcap, temperature=temperature)
    z = _logits64(h, w, b)
    lse = row_lse(z, softcap=softcap, temperature=temperature)
    for name, got in zip(FLOAT_FIELDS, (nll, entropy, max_logprob)):
        assert_nll_close(got, getattr(want, name), lse, what=name)
    for name, got in (("argmax", argmax), ("rank", rank)):
        assert got.dtype == torch.int64 and got.shape == t.shape, (name, got.dtype, got.shape)

    V = w.shape[0]
    zt = reference._transform(z, softcap, temperature)
    scored = t != IGNORE
    assert bool((argmax[~scored] == -1).all()) and bool((rank[~scored] == -1).all())
    nan_rows = scored & torch.isnan(zt).any(-1)
    for name in FLOAT_FIELDS:  # NaN rows: NaN floats, integers in range
        got = {"nll": nll, "entropy": entropy, "max_logprob": max_logprob}[name]
        assert bool(torch.isnan(got[nan_rows]).all()), name
    assert bool(((argmax[nan_rows] >= 0) & (argmax[nan_rows] < V)).all())
    assert bool(((rank[nan_rows] >= 0) & (rank[nan_rows] < V)).all())
    ok = scored & ~nan_rows
    if exact:
        assert torch.equal(argmax[ok], want.argmax[ok]), (argmax[ok], want.argmax[ok])
        assert torch.equal(rank[ok], want.rank[ok]), (rank[ok], want.rank[ok])
        return want
    band = _tie_band(h, w, b, softcap, temperature)
    for r in ok.nonzero().flatten().tolist():
        row, width = zt[r], band[r]
        a = int(argmax[r])
        top = row.max()
        # (the lowest index among exact ties: the integer tests, where every tie is exact)
        assert 0 <= a < V and row[a] >= top - width[a], (
            f"row {r}: argmax {a} holds {row[a].item()} but the max is {top.item()}")
        target = int(t[r])
        others = torch.arange(V) != target
        lo = int((row > row[target] + width).sum())
        hi = int(((row > row[target] - width) & others).sum())  # never the target itself
        assert lo <= int(rank[r]) <= hi, f"row {r}: rank {int(rank[r])} outside [{lo}, {hi}]"
    return want


# ---- the fused kernel against the oracle -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "N,D,V,splits",
    [(37, 123, 507, None), (20, 64, 300, 3), (9, 40, 1, None)],
    ids=["N37-D123-V507", "N20-D64-V300-split3", "N9-D40-V1"],
)
def test_fused_matches_reference(N, D, V, splits, dtype):
    hidden, weight, _, targets = make_inputs(N, D, V, dtype, ignore_every=6)
    fields = fused(hidden, weight, None, targets, splits=splits, allow_tf32=True)
    check(fields, hidden, weight, None, targets)
    if dtype != torch.bfloat16 or DEVICE == "cuda":
        # the NLL is the NLL kernel's, bit for bit, for the same tiles and splits (the NLL kernel
        # has no bf16 upcast for the interpreter)
        nll = nll_kernel.linear_token_nll_forward(hidden, weight, None, targets, IGNORE, None,
                                                  1.0, sm_count=SM_COUNT, config=CONFIG,
                                                  splits=splits, allow_tf32=True)
        assert torch.equal(fields[0], nll)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "softcap,temperature", [(30.0, 1.0), (2.0, 0.6), (None, 1.7)], ids=["sc30", "sc2-t0.6", "t1.7"]
)
def test_fused_bias_softcap_temperature_strided(dtype, softcap, temperature):
    hidden, weight, b, targets = make_inputs(21, 48, 200, dtype, bias=True, ignore_every=5,
                                             scale=6.0)
    wide = torch.randn(21, 80, device=DEVICE).to(dtype)
    wide[:, 16:64] = hidden
    strided = wide[:, 16:64]  # row stride 80
    fields = fused(strided, weight, b, targets, softcap, temperature, splits=2)
    check(fields, hidden, weight, b, targets, softcap=softcap, temperature=temperature)


def test_fused_large_magnitudes():
    # logits of +-1e4 through the bias: the running max moves by 1e4 between tiles
    hidden, weight, _, targets = make_inputs(18, 64, 160, torch.float32)
    bias = torch.zeros(160, device=DEVICE)
    bias[::37] = 1e4
    bias[100] = -1e4
    targets[0], targets[1] = 100, 37
    for temperature in (1.0, 0.8):
        fields = fused(hidden, weight, bias, targets, temperature=temperature, splits=3)
        check(fields, hidden, weight, bias, targets, temperature=temperature)


# ---- ignored rows and special values ---------------------------------------------------------


def test_fused_ignored_rows_nan_and_all_ignored():
    hidden, weight, _, targets = make_inputs(24, 32, 100, torch.float32)
    targets[5:11] = IGNORE
    hidden[6] = float("nan")   # ignored: never read, stays 0 / -1
    hidden[15] = float("nan")  # scored: NaN there only
    fields = fused(hidden, weight, None, targets, splits=2)
    assert all(bool((f[5:11] == 0).all()) for f in fields[:3])
    assert all(bool((f[5:11] == -1).all()) for f in fields[3:])
    assert all(bool(torch.isnan(f[15])) for f in fields[:3])
    assert int(sum(torch.isnan(f).sum() for f in fields[:3])) == 3
    check(fields, hidden, weight, None, targets)

    weight[70] = float("nan")  # NaN in the weight: every scored row has a NaN logit
    fields = fused(hidden, weight, None, targets, splits=3)
    check(fields, hidden, weight, None, targets)
    assert bool(torch.isnan(fields[1][targets != IGNORE]).all())

    targets[:] = IGNORE
    nll, entropy, max_logprob, argmax, rank = fused(hidden, weight, None, targets)
    assert nll.dtype == entropy.dtype == max_logprob.dtype == torch.float32
    assert bool((nll == 0).all() & (entropy == 0).all() & (max_logprob == 0).all())
    assert argmax.dtype == rank.dtype == torch.int64
    assert bool((argmax == -1).all() & (rank == -1).all())


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_plus_and_minus_inf_bias(dtype, splits):
    hidden, weight, b, _ = make_inputs(6, 32, 90, dtype, bias=True)
    b[50] = float("inf")        # rows 0-2: +inf logit; entropy and max log p NaN, NLL +inf
    targets = torch.tensor([1, 50, 70, 3, 12, 80], device=DEVICE)  # row 1: the +inf target, NaN
    fields = fused(hidden, weight, b, targets, splits=splits)
    want = check(fields, hidden, weight, b, targets)
    assert want.nll[0] == float("inf") and torch.isnan(want.nll[1])
    assert int(fields[3][0]) == 50 and int(fields[3][2]) == 50
    # with the cap +inf becomes +softcap: all finite again
    fields = fused(hidden, weight, b, targets, 3.0, 0.5, splits=splits)
    check(fields, hidden, weight, b, targets, softcap=3.0, temperature=0.5)

    b[50] = 0.0
    b[10:20] = -float("inf")    # -inf entries add 0 to the entropy; row 4's target is one of them
    b[64:] = -float("inf")      # a whole range of the last split, for splits=3
    fields = fused(hidden, weight, b, targets, splits=splits)
    want = check(fields, hidden, weight, b, targets)
    assert want.nll[4] == float("inf") and bool(torch.isfinite(fields[1]).all())
    assert int(fields[4][4]) == 90 - 10 - 26  # every finite entry is above -inf

    b[:] = -float("inf")        # all -inf rows: NaN, as token_nll
    fields = fused(hidden, weight, b, targets, splits=splits)
    check(fields, hidden, weight, b, targets)
    assert bool(torch.isnan(fields[0]).all() & torch.isnan(fields[1]).all())
    assert bool((fields[3] == 0).all())  # the lowest index, as torch.argmax


# ---- argmax and rank ties: exact integer logits ----------------------------------------------


def _integer_problem(logits):
    """hidden = [I | 0] so that ``z = hidden @ weight.T`` is exactly the integer ``logits``
    (the weight's extra columns, multiplied by 0, make D uneven)."""
    N, V = logits.shape
    hidden = torch.zeros(N, N + 3)
    hidden[:, :N] = torch.eye(N)
    weight = torch.randint(-2, 3, (V, N + 3)).float()
    weight[:, :N] = logits.T.float()
    return hidden, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("V,splits", [(250, 4), (40 * 32 + 7, 41)], ids=["V250-split4",
                                                                           "V1287-split41"])
def test_argmax_and_rank_ties_across_tiles_and_splits(dtype, V, splits):
    # BLOCK_V = 32: with 4 splits the ranges are 64 wide (two tiles each); with 41 the finish
    # kernel merges more than one block of 32 partials per row
    logits = torch.randint(-6, 6, (10, V))
    tied = [(5, 7), (33, 60), (40, 70), (50, 130), (10, 200), (3, V - 1),
            (6 * 32 + 1, 38 * 32 + 5), (0, 31, 32)]
    for r, cols in enumerate(tied):
        logits[r, [c % V for c in cols]] = 9
    logits[8] = 2            # all tied: argmax 0, rank 0
    logits[9, 17] = 11       # strict maximum
    hidden, weight = _integer_problem(logits)
    targets = torch.randint(0, V, (10,))
    targets[0] = 7           # tied with column 5 for the maximum: rank 0
    targets[3] = V - 1
    targets[4] = int((logits[4] == 0).nonzero()[0])  # value 0: the rank counts greater only
    targets[9] = 17
    hidden, weight, targets = _dev(hidden.to(dtype)), _dev(weight.to(dtype)), _dev(targets)
    fields = fused(hidden, weight, None, targets, splits=splits)
    want = check(fields, hidden, weight, None, targets, exact=True)
    assert want.argmax.tolist()[:8] == [min(c % V for c in cols) for cols in tied]
    assert int(fields[4][0]) == 0 and int(fields[3][8]) == 0 and int(fields[4][8]) == 0
    assert int(fields[4][4]) == int((logits[4] > 0).sum())
    # with a bias, temperature and ignored rows (ties kept: the same operations on equal values)
    bias = torch.randint(-3, 4, (V,)).float()
    bias[[5, 7]] = 0
    targets[2] = IGNORE
    fields = fused(hidden, weight, _dev(bias.to(dtype)), targets, None, 0.7, splits=splits)
    check(fields, hidden, weight, _dev(bias.to(dtype)), targets, temperature=0.7, exact=True)


def test_rank_of_the_top_token_is_zero():
    # the target's own tile product and the target logit (a separately summed dot) round
    # differently; the target must not count itself. Every target is the row's clear maximum.
    hidden, weight, _, _ = make_inputs(40, 123, 300, torch.float32, scale=4.0)
    z = _logits64(hidden, weight, None)
    top2 = z.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    targets = torch.where(clear, z.argmax(-1), IGNORE)
    assert int(clear.sum()) >= 35
    fields = fused(hidden, weight, None, _dev(targets), splits=2)
    assert torch.equal(fields[4].cpu(), torch.where(clear, 0, -1))
    assert torch.equal(fields[3].cpu(), targets)


# ---- the Triton backend: routing, public API, scored rows ------------------------------------


@pytest.mark.parametrize("dtype,tf32,top_k,path", [
    (torch.float32, False, 0, "chunked"), (torch.float32, True, 0, "fused"),
    (torch.float16, False, 0, "fused"), (torch.bfloat16, False, 0, "fused"),
    (torch.float16, False, 3, "chunked"), (torch.float32, True, 1, "chunked"),
])
def test_backend_routing(dtype, tf32, top_k, path, monkeypatch):
    calls = []
    monkeypatch.setattr(_triton, "linear_token_stats_forward",
                        lambda *a, **kw: calls.append(("fused", kw["allow_tf32"])) or (None,) * 5)
    monkeypatch.setattr(_triton, "chunked_linear_token_stats",
                        lambda *a, **kw: calls.append(("chunked", None)))
    monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1" if tf32 else "0")
    hidden = torch.zeros(3, 8, dtype=dtype, device=DEVICE)
    _triton.linear_token_stats(hidden, torch.zeros(5, 8, dtype=dtype, device=DEVICE), None,
                               torch.zeros(3, dtype=torch.long, device=DEVICE), IGNORE, None, 1.0,
                               top_k)
    assert calls == [(path, tf32 if path == "fused" else None)]


class _Spy:
    """Wraps a function of ``pplfast._triton`` and records each call's row count."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        self.real = getattr(_triton, name)
        monkeypatch.setattr(_triton, name, self)

    def __call__(self, *args, **kwargs):
        self.calls.append(args[0].shape[0])
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_api_top_k_0_fused_and_5_chunked(dtype, monkeypatch):
    monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1")  # float32 too takes the fused kernel
    fused_spy = _Spy(monkeypatch, "linear_token_stats_forward")
    chunked_spy = _Spy(monkeypatch, "chunked_linear_token_stats")
    hidden, weight, b, _ = make_inputs(2 * 13, 40, 150, dtype, bias=True)
    hidden = hidden.view(2, 13, 40)
    ids = torch.randint(0, 150, (2, 13), device=DEVICE)
    ids[0, 4] = IGNORE
    opts = dict(bias=b, shift=True, softcap=8.0, temperature=1.3, backend="triton")
    stats = pplfast.linear_token_stats(hidden, weight, ids, **opts)
    # shift=True hands the launcher all 2 x 13 rows (no copy), each sequence's last one ignored
    assert fused_spy.calls == [26] and chunked_spy.calls == []
    assert stats.nll.shape == (2, 12) and stats.top_k_ids is None and stats.top_k_logprobs is None
    h, t = hidden[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)
    check(stats, h, weight, b, t, softcap=8.0, temperature=1.3)
    nll = pplfast.linear_token_nll(hidden, weight, ids, **opts)
    if DEVICE == "cpu":  # the same tiles and splits: the NLL kernel's NLL, bit for bit
        assert torch.equal(stats.nll, nll)
    else:
        assert_nll_close(stats.nll, nll, row_lse(_logits64(h, weight, b), softcap=8.0,
                                                 temperature=1.3).view(2, 12))

    top = pplfast.linear_token_stats(hidden, weight, ids, top_k=5, **opts)
    assert fused_spy.calls == [26] and chunked_spy.calls == [26]
    assert top.top_k_ids.shape == (2, 12, 5) and top.top_k_logprobs.dtype == torch.float32
    want = reference.linear_token_stats(hidden.cpu(), weight.cpu(), ids.cpu(), bias=b.cpu(),
                                        top_k=5, shift=True, softcap=8.0, temperature=1.3)
    ignored = (ids[:, 1:] == IGNORE).cpu()
    assert bool((top.top_k_ids.cpu()[ignored] == -1).all())
    assert bool((top.top_k_logprobs.cpu()[ignored] == 0).all())
    logits = _logits64(h, weight, b)
    if dtype != torch.float32 and DEVICE == "cpu":
        # the chunked path on CPU tensors, where PyTorch has no fp32-output GEMM: the logits are
        # those of F.linear in the input dtype
        logits = torch.nn.functional.linear(h, weight, b).double()
        want = reference.token_stats(logits, t.cpu(), top_k=5, softcap=8.0, temperature=1.3)
    lse = row_lse(logits, softcap=8.0, temperature=1.3)
    assert_nll_close(top.top_k_logprobs.reshape(-1, 5).cpu(), want.top_k_logprobs.reshape(-1, 5),
                     lse.unsqueeze(-1).expand(-1, 5), what="top_k_logprobs")
    for name in FLOAT_FIELDS:
        assert_nll_close(getattr(top, name).reshape(-1).cpu(), getattr(want, name).reshape(-1),
                         lse, what=name)


def test_launcher_trusts_the_callers_scored_rows(monkeypatch):
    # the backend counts the scored rows once; with every row scored it says so, and the
    # launcher must not search again (a second host sync on a GPU)
    calls = []
    find = _plan.scored_rows  # the fused launchers' shared row search
    monkeypatch.setattr(_plan, "scored_rows", lambda *a: calls.append(a) or find(*a))
    hidden, weight, _, targets = make_inputs(9, 32, 40, torch.float16)
    stats = pplfast.linear_token_stats(hidden, weight, targets, backend="triton")
    assert calls == []
    check(stats, hidden, weight, None, targets)
    targets[2] = IGNORE
    fields = fused(hidden, weight, None, targets)  # called without rows: found here
    assert len(calls) == 1 and int(fields[3][2]) == -1
    check(fields, hidden, weight, None, targets)
    with pytest.raises(ValueError, match="all_scored"):
        fused(hidden, weight, None, targets, rows=torch.arange(3, device=DEVICE), all_scored=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_chunked_path_skips_ignored_rows(dtype, monkeypatch):
    # GPUs the fused kernel does not cover, and top_k > 0: the ignored rows cost no GEMM and are
    # never handed to the logits kernel; they come back as 0 / -1
    monkeypatch.setattr(_triton, "fused_supported", lambda hidden2, allow_tf32: False)
    monkeypatch.setenv("PPLFAST_GPU_CHUNK_MB", str(5 * 67 * 4 / 2**20))  # 5 rows per chunk
    hidden, weight, b, targets = make_inputs(18, 40, 67, dtype, bias=True, ignore_every=4)
    hidden[8] = float("nan")  # an ignored row (8 % 4 == 0): never read
    seen = []

    def launcher(logits3, t, *args, **kwargs):
        seen.append(logits3.shape[1])
        assert bool((t != IGNORE).all())
        return token_stats_forward(logits3, t, *args, **kwargs)

    monkeypatch.setattr(_triton, "token_stats_forward", launcher)
    for top_k in (0, 4):
        seen.clear()
        out = _triton.linear_token_stats(hidden, weight, b, targets, IGNORE, 4.0, 1.0, top_k)
        scored = (targets != IGNORE).cpu()
        assert sum(seen) == int(scored.sum()) and len(seen) > 1
        nll, entropy, max_logprob, argmax, rank, ids, logprobs = (
            None if f is None else f.cpu() for f in out)
        assert bool((nll[~scored] == 0).all() & (entropy[~scored] == 0).all())
        assert bool((argmax[~scored] == -1).all() & (rank[~scored] == -1).all())
        assert not bool(torch.isnan(nll).any())
        if top_k:
            assert ids.shape == (18, 4) and bool((ids[~scored] == -1).all())
            assert bool((logprobs[~scored] == 0).all())
        else:
            assert ids is None and logprobs is None
        if dtype == torch.float32 or (DEVICE == "cuda" and _chunked.fp32_out_gemm_available()):
            check(out[:5], hidden, weight, b, targets, softcap=4.0)
        else:
            # the CPU refuses the fp32-output GEMM: logits in the input dtype, as F.linear
            logits = torch.nn.functional.linear(hidden, weight, b).float()
            want = reference.token_stats(logits.cpu(), targets.cpu(), softcap=4.0)
            lse = row_lse(logits.cpu(), softcap=4.0)
            for name, got in zip(FLOAT_FIELDS, (nll, entropy, max_logprob)):
                assert_nll_close(got, getattr(want, name), lse, what=name)

    targets[:] = IGNORE
    seen.clear()
    out = _triton.linear_token_stats(hidden, weight, b, targets, IGNORE, None, 1.0, 2)
    assert seen == [] and bool((out[0] == 0).all()) and bool((out[5] == -1).all())


# ---- GPU only: devices and a real vocabulary -------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tensors_on_another_device_real_vocabulary(dtype, monkeypatch):
    # tensors on the last GPU while device 0 is current (one GPU: the guard is still taken)
    monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    hidden = torch.randn(70, 256, device=device).to(dtype)
    weight = (torch.randn(50257, 256, device=device) / 8).to(dtype)
    targets = torch.randint(0, 50257, (70,), device=device)
    targets[::9] = IGNORE
    with torch.cuda.device(0):
        got = pplfast.linear_token_stats(hidden, weight, targets, backend="triton")
        assert torch.cuda.current_device() == 0
    assert got.nll.device == device
    want = reference.linear_token_stats(hidden, weight, targets)
    z = _logits64(hidden, weight, None)
    # TF32 / bf16 products: the bound of linear_token_nll.py, 2^-8 * max_v sum_d |h_d w_vd|
    bound = (hidden.double().abs() @ weight.double().abs().T).amax(1).cpu() * 2.0**-8
    for name in FLOAT_FIELDS:
        assert_nll_close(getattr(got, name), getattr(want, name),
                         atol=bound + LSE_RTOL * row_lse(z).abs(), what=name)
    scored = (targets != IGNORE).cpu()
    assert float((got.argmax.cpu() == want.argmax)[scored].double().mean()) > 0.9


@pytest.mark.cuda
def test_gpu_rows_times_dim_past_2_pow_31():
    # hidden rows x D > 2^31 elements (4.3 GB in bf16): row offsets must be 64-bit
    hidden, weight, targets = hidden_rows_past_2_pow_31()
    N = hidden.shape[0]
    got = fused(hidden, weight, None, targets, config=None)
    for rows in (slice(N - 200, N), slice(0, 50)):
        want = reference.linear_token_stats(hidden[rows], weight, targets[rows])
        lse = row_lse(_logits64(hidden[rows], weight, None))
        for i, name in enumerate(FLOAT_FIELDS):
            assert_nll_close(got[i][rows], getattr(want, name), lse, rtol=4 * LSE_RTOL,
                             what=name)
    assert bool((got[3][50 : N - 200] == -1).all())
