"""token_stats / linear_token_stats (docs/ops.md "Token statistics") on every backend that runs
here, against the float64 oracle ``pplfast.reference.token_stats``.

Float fields: ``2e-6 * max(1, |logsumexp of the row|)``; on rows at the top of the float32 range
(``helpers.float32_extreme_rows``) ``2e-6 * max(1, |value|, |lse of the ordinary logits|)``
(``helpers.extreme_scale``), never the ~3e38 log-sum-exp. Integer fields exact except where the
float64 comparison is a tie within one ulp of the input dtype (``_tie_band``): there any of the
tied answers is right. Top-k ids may come in any order among ties, so they are checked by what
they point at: distinct, in range, each at least the k-th largest logit (up to the tie band), and
their log-probabilities equal to the reference's sorted ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pplfast
from pplfast import reference
from helpers import (ALL_BACKENDS, EXTREME_BIASES, NUMPY_FLOAT_WARNINGS, assert_nll_close,
                     backend_device, extreme_bias, extreme_option_params, extreme_scale,
                     float32_extreme_rows, on_backend, row_lse)

pytestmark = [
    *NUMPY_FLOAT_WARNINGS,
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOP_KS = [0, 1, 5, 64]
IGNORE = -100
FIELDS = ("nll", "entropy", "max_logprob", "argmax", "rank", "top_k_ids", "top_k_logprobs")


def _z64(logits, softcap, temperature):
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _logp64(logits, softcap, temperature):
    """float64 log-probabilities, formed relative to each row's maximum (``z - lse`` subtracts
    two numbers of 3e38 at the top of the float range)."""
    y = logits.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    m = y.max(-1, keepdim=True).values
    d = (y - torch.where(torch.isfinite(m), m, 0.0)) / temperature
    return d - d.logsumexp(-1, keepdim=True)


def _tie_band(z64, dtype):
    """Per-element width within which two transformed logits count as tied: one ulp of the
    input dtype at that magnitude (the kernels compare fp32 values transformed in fp32)."""
    eps = torch.finfo(dtype).eps
    band = 2 * eps * z64.abs()
    return torch.where(torch.isfinite(band), band, torch.zeros_like(band))


def check_stats(actual, logits, targets, *, dtype, top_k, softcap=None, temperature=1.0,
                ignore_index=IGNORE, band=None, extreme=False):
    """Compare a TokenStats of (..., V) ``logits`` (shift already applied) with the oracle.
    ``extreme``: float fields against the oracle rounded to float32, with the bound of
    ``helpers.extreme_scale``."""
    V = logits.shape[-1]
    expected = reference.token_stats(logits, targets, top_k=top_k, ignore_index=ignore_index,
                                     softcap=softcap, temperature=temperature)
    lse = row_lse(logits, softcap=softcap, temperature=temperature)

    def scale_of(want):  # per row (the leading shape), or per (row, k) of the flat top-k
        per_row = tuple(want.shape) == tuple(lse.shape)
        if not extreme:
            return lse if per_row else lse.reshape(-1, 1).expand(-1, top_k)
        return extreme_scale(logits if per_row else logits.reshape(-1, V), want,
                             softcap=softcap, temperature=temperature)

    def rounded(want):
        return want.float().double() if extreme else want
    lead = tuple(targets.shape)
    for name in FIELDS:
        value = getattr(actual, name)
        if name.startswith("top_k") and top_k == 0:
            assert value is None, name
            continue
        want = lead + ((top_k,) if name.startswith("top_k") else ())
        assert tuple(value.shape) == want, (name, tuple(value.shape), want)
        int_field = name in ("argmax", "rank", "top_k_ids")
        assert value.dtype == (torch.int64 if int_field else torch.float32), (name, value.dtype)
    for name in ("nll", "entropy", "max_logprob"):
        want = rounded(getattr(expected, name))
        assert_nll_close(getattr(actual, name), want, scale_of(want), what=name)

    z = _z64(logits, softcap, temperature).reshape(-1, V)
    t = targets.reshape(-1)
    scored = t != ignore_index
    ok_rows = scored & ~torch.isnan(z).any(-1)  # integer fields unspecified on NaN rows
    # float64, so that zt +- band stays float64 (a 0-d float64 plus a float32 vector is float32,
    # and -6e38 is -inf there)
    tie = _tie_band(z, dtype) if band is None else band.reshape(-1, V).double()
    argmax = actual.argmax.reshape(-1)
    rank = actual.rank.reshape(-1)
    assert bool((argmax[~scored] == -1).all()) and bool((rank[~scored] == -1).all())
    for r in ok_rows.nonzero().flatten().tolist():
        row, band_r = z[r], tie[r]
        a = int(argmax[r])
        assert 0 <= a < V and row[a] >= row.max() - band_r[a], (
            f"row {r}: argmax {a} holds {row[a].item()} but the max is {row.max().item()}")
        if row[a] == row.max():  # the lowest index among exact float64 ties
            assert a <= int(expected.argmax.reshape(-1)[r]) or row[:a].max() < row[a] - band_r[a]
        zt = row[int(t[r])]
        lo = int((row > zt + band_r).sum())
        hi = int((row > zt - band_r).sum())
        assert lo <= int(rank[r]) <= hi, f"row {r}: rank {int(rank[r])} outside [{lo}, {hi}]"
    if top_k:
        ids = actual.top_k_ids.reshape(-1, top_k)
        lp = actual.top_k_logprobs.reshape(-1, top_k)
        assert bool((ids[~scored] == -1).all()) and bool((lp[~scored] == 0).all())
        want_lp = rounded(expected.top_k_logprobs.reshape(-1, top_k))
        rows_ok = ok_rows.unsqueeze(-1).expand(-1, top_k)
        assert_nll_close(torch.where(rows_ok, lp, 0.0), torch.where(rows_ok, want_lp, 0.0),
                         scale_of(want_lp), what="top_k_logprobs (sorted values)")
        for r in ok_rows.nonzero().flatten().tolist():
            row_ids = ids[r]
            assert bool(((row_ids >= 0) & (row_ids < V)).all()), f"row {r}: ids {row_ids.tolist()}"
            assert len(set(row_ids.tolist())) == top_k, f"row {r}: repeated ids {row_ids.tolist()}"
            kth = torch.topk(z[r], top_k).values[-1]
            held = z[r][row_ids]
            assert bool((held >= kth - tie[r][row_ids]).all()), f"row {r}: ids below the k-th"
        # each id's log-probability is its own (range: checked apart)
        logp = _logp64(logits, softcap, temperature).reshape(-1, V)
        at_ids = rounded(logp.gather(1, ids.clamp(0, V - 1)))
        assert_nll_close(torch.where(rows_ok, lp, 0.0), torch.where(rows_ok, at_ids, 0.0),
                         scale_of(at_ids), what="top_k_logprobs at top_k_ids")
    else:
        assert actual.top_k_ids is None and actual.top_k_logprobs is None
    # NaN rows: NaN in the float fields (top-k log-probabilities included); the integer fields
    # are unspecified but in range: argmax in [0, V), rank in [0, V], top-k ids in [-1, V)
    nan_rows = scored & torch.isnan(z).any(-1)
    for name in ("nll", "entropy", "max_logprob"):
        assert bool(torch.isnan(getattr(actual, name).reshape(-1)[nan_rows]).all()), name
    bad = nan_rows & ~((argmax >= 0) & (argmax < V))
    assert not bool(bad.any()), f"NaN rows {bad.nonzero().flatten().tolist()}: argmax out of range"
    bad = nan_rows & ~((rank >= 0) & (rank <= V))
    assert not bool(bad.any()), f"NaN rows {bad.nonzero().flatten().tolist()}: rank out of range"
    if top_k:
        bad = nan_rows & ~((ids >= -1) & (ids < V)).all(-1)
        assert not bool(bad.any()), (
            f"NaN rows {bad.nonzero().flatten().tolist()}: top_k_ids out of range")
        bad = nan_rows & ~torch.isnan(lp).all(-1)
        assert not bool(bad.any()), (
            f"NaN rows {bad.nonzero().flatten().tolist()}: top_k_logprobs not all NaN")
    return expected


def _run(backend, logits, targets, **kw):
    return on_backend(pplfast.token_stats, backend, logits, targets, **kw)


def _targets(shape, V, ignored=()):
    t = torch.randint(0, V, shape)
    flat = t.view(-1)
    for i in ignored:
        flat[i] = IGNORE
    return t


# cpu runs the real sizes; the reference and the interpreter small ones
SIZES = {"cpu": [(1, 5), (507, 37), (50257, 9)], "reference": [(1, 5), (507, 37)],
         "triton": [(1, 5), (67, 13)], "cuda": [(1, 5), (507, 37), (50257, 9)]}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", TOP_KS)
def test_matches_oracle(backend, dtype, top_k):
    for V, N in SIZES[backend]:
        if top_k > V:
            continue
        logits = (torch.randn(N, V) * 4).to(dtype)
        targets = _targets((N,), V, ignored=(1,) if N > 1 else ())
        stats = _run(backend, logits, targets, top_k=top_k)
        check_stats(stats, logits, targets, dtype=dtype, top_k=top_k)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("softcap,temperature", [(None, 0.7), (15.0, 1.0), (30.0, 2.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_options(backend, softcap, temperature, dtype):
    V = 507 if backend != "triton" else 67
    logits = (torch.randn(4, 6, V) * 8).to(dtype)
    targets = _targets((4, 6), V, ignored=(2, 7))
    for top_k in (0, 5):
        stats = _run(backend, logits, targets, top_k=top_k, softcap=softcap,
                     temperature=temperature)
        check_stats(stats, logits, targets, dtype=dtype, top_k=top_k, softcap=softcap,
                    temperature=temperature)


def _special_rows(V, dtype):
    x = torch.randn(12, V) * 3
    x[0, V // 2] = float("nan")           # NaN row
    x[1, :] = float("-inf")               # all -inf
    x[2, 1::3] = float("-inf")            # -inf entries (target at 0 stays finite)
    x[3, 4] = float("inf")                # +inf, the target elsewhere
    x[4] = x[4] * 1e4                     # large magnitudes
    x[5, 0], x[5, 9] = 1e4, -1e4
    x[6, :] = 1.0                         # all tied
    x[7, 3] = x[7, 11] = x[7].max() + 1   # tied maximum: the lowest index wins
    x[9, :] = float("nan")                # all NaN
    t = torch.randint(0, V, (12,))
    t[2], t[3], t[8] = 0, 7, IGNORE
    t[10] = 5
    x[10, 5] = float("-inf")              # target at -inf: nll +inf
    return x.to(dtype), t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (20.0, 1.5)])
def test_special_values(backend, dtype, softcap, temperature):
    V = 507 if backend != "triton" else 67
    logits, targets = _special_rows(V, dtype)
    for top_k in (0, 5, 64):
        stats = _run(backend, logits, targets, top_k=top_k, softcap=softcap,
                     temperature=temperature)
        check_stats(stats, logits, targets, dtype=dtype, top_k=top_k, softcap=softcap,
                    temperature=temperature)
        if softcap is None:
            assert int(stats.argmax[7]) == 3
            assert int(stats.argmax[6]) == 0 and int(stats.rank[6]) == 0
            assert stats.nll[10].item() == float("inf")
            assert stats.entropy[2].isfinite() and stats.entropy[2] > 0  # -inf entries add 0
            assert torch.isnan(stats.nll[1]) and torch.isnan(stats.entropy[1])  # all -inf
        # (a softcap maps -inf to -softcap: finite entries, a uniform row 1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_and_shift(backend):
    V = 507 if backend != "triton" else 67
    base = torch.randn(3, 9, 2 * V)
    logits = base[..., ::2]  # vocabulary stride 2
    targets = _targets((3, 9), V, ignored=(4,))
    for top_k in (0, 3):
        stats = _run(backend, logits, targets, top_k=top_k, shift=True)
        assert stats.nll.shape == (3, 8)
        check_stats(stats, logits[:, :-1], targets[:, 1:], dtype=torch.float32, top_k=top_k)
        assert torch.equal(stats.nll, on_backend(pplfast.token_nll, backend, logits, targets,
                                                 shift=True))
    bf = base.bfloat16().transpose(0, 1)[:, :, :V]  # batch and time strides swapped
    t2 = _targets((9, 3), V)
    check_stats(_run(backend, bf, t2, top_k=5), bf, t2, dtype=torch.bfloat16, top_k=5)


def test_cpu_column_splits_few_rows():
    """One or two rows of a real vocabulary: the rows are cut into column ranges and merged."""
    for dtype in DTYPES:
        logits = (torch.randn(2, 128256) * 3).to(dtype)
        logits[1, 100_000] = logits[1].max() + 5  # the argmax and top-1 sit in a late range
        targets = torch.tensor([5, 100_000])
        for top_k in (0, 64):
            stats = pplfast.token_stats(logits, targets, top_k=top_k, backend="cpu")
            check_stats(stats, logits, targets, dtype=dtype, top_k=top_k)
            assert int(stats.argmax[1]) == 100_000 and int(stats.rank[1]) == 0


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_split_path(num_splits):
    from pplfast.kernels.token_stats import token_stats_forward

    V = 67
    logits, targets = _special_rows(V, torch.float32)
    for top_k in (0, 5):
        fields = token_stats_forward(logits.unsqueeze(0), targets, IGNORE, None, 1.0, top_k,
                                     num_splits=num_splits, block_v=16)
        stats = pplfast.TokenStats(*fields)
        check_stats(stats, logits, targets, dtype=torch.float32, top_k=top_k)


@pytest.mark.parametrize("all_scored", [False, True], ids=["ignored_rows", "all_scored"])
def test_triton_top_k_reads_the_scored_rows_once(monkeypatch, all_scored):
    """The top-k of the Triton statistics runs one torch.topk over the scored rows (in chunks of
    64 MiB, here one), never a Python loop over the batch, and never reads an ignored row: NaN
    there changes nothing."""
    import pplfast.kernels.token_stats as kernel

    B, T, V = 6, 3, 67
    logits = torch.randn(B, T, V) * 3
    targets = torch.randint(0, V, (B, T))
    if not all_scored:
        ignored = torch.zeros(B, T, dtype=torch.bool)
        ignored[1] = True
        ignored[4, 2] = True
        targets[ignored] = IGNORE
        logits[ignored] = float("nan")
    scored = int((targets != IGNORE).sum())
    calls, topk = [], torch.topk

    def spy(x, k, *args, **kwargs):
        calls.append(tuple(x.shape))
        assert not bool(torch.isnan(x).any()), "an ignored row was read"
        return topk(x, k, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    fields = kernel.token_stats_forward(logits, targets.reshape(-1), IGNORE, 20.0, 0.8, 5)
    monkeypatch.undo()
    assert calls == [(scored, V)], calls
    stats = pplfast.TokenStats(*(f.reshape(B, T, *f.shape[1:]) for f in fields))
    check_stats(stats, logits, targets, dtype=torch.float32, top_k=5, softcap=20.0,
                temperature=0.8)


def test_nll_is_token_nll_bit_for_bit_on_cpu():
    for dtype in DTYPES:
        logits = torch.randn(33, 50257).to(dtype)
        targets = _targets((33,), 50257, ignored=(3,))
        for opts in ({}, {"softcap": 30.0, "temperature": 0.8}):
            stats = pplfast.token_stats(logits, targets, top_k=5, backend="cpu", **opts)
            assert torch.equal(stats.nll, pplfast.token_nll(logits, targets, backend="cpu",
                                                             **opts))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_matches_oracle(backend, dtype):
    N, D, V = 29, 123, 507 if backend != "triton" else 67
    hidden = torch.randn(N, D).to(dtype)
    weight = (torch.randn(V, D) / D ** 0.5).to(dtype)
    bias = torch.randn(V).to(dtype)
    targets = _targets((N,), V, ignored=(0, 5))
    # the kernels' logits: an fp32 GEMM of the (exactly upcast) inputs; ties within its error
    exact = F.linear(hidden.float(), weight.float(), bias.float())
    for top_k in (0, 5):
        logits = exact
        if (backend == "triton" and backend_device(backend) == "cpu" and dtype != torch.float32
                and top_k):
            # top_k > 0 takes the chunked GPU path, here on CPU tensors where PyTorch has no
            # fp32-output GEMM: the logits are those of F.linear in the input dtype (top_k = 0
            # runs the fused kernel, whose tiles stay float32)
            logits = F.linear(hidden, weight, bias).float()
        band = 1e-5 * (logits.abs() + 1)
        for opts in ({}, {"softcap": 10.0, "temperature": 1.3}):
            stats = on_backend(pplfast.linear_token_stats, backend, hidden, weight, targets,
                               bias=bias, top_k=top_k, **opts)
            check_stats(stats, logits, targets, dtype=torch.float32, top_k=top_k, band=band,
                        **opts)
            if backend == "cpu":
                assert torch.equal(stats.nll, pplfast.linear_token_nll(
                    hidden, weight, targets, bias=bias, backend="cpu", **opts))


def test_linear_shift_and_zero_width():
    hidden = torch.randn(2, 7, 16)
    weight = torch.randn(50, 16)
    ids = torch.randint(0, 50, (2, 7))
    stats = pplfast.linear_token_stats(hidden, weight, ids, shift=True, top_k=2, backend="cpu")
    assert stats.nll.shape == (2, 6) and stats.top_k_ids.shape == (2, 6, 2)
    check_stats(stats, F.linear(hidden, weight)[:, :-1], ids[:, 1:], dtype=torch.float32,
                top_k=2, band=1e-5 * (F.linear(hidden, weight)[:, :-1].abs() + 1))
    bias = torch.randn(50)
    stats = pplfast.linear_token_stats(torch.randn(3, 0), torch.randn(50, 0), ids[0, :3],
                                       bias=bias, top_k=3, backend="cpu")
    assert torch.equal(stats.argmax, bias.argmax().expand(3))


def test_ignored_and_empty():
    logits = torch.randn(4, 10)
    targets = torch.full((4,), IGNORE)
    for backend in ("cpu", "reference"):
        stats = pplfast.token_stats(logits, targets, top_k=3, backend=backend)
        assert bool((stats.nll == 0).all()) and bool((stats.entropy == 0).all())
        assert bool((stats.argmax == -1).all()) and bool((stats.top_k_ids == -1).all())
        assert bool((stats.top_k_logprobs == 0).all())
        empty = pplfast.token_stats(torch.randn(0, 10), torch.zeros(0, dtype=torch.long),
                                    top_k=2, backend=backend)
        assert empty.nll.shape == (0,) and empty.top_k_ids.shape == (0, 2)
    zero_v = pplfast.token_stats(torch.randn(3, 0), torch.full((3,), IGNORE))
    assert zero_v.top_k_ids is None and bool((zero_v.rank == -1).all())


@pytest.mark.parametrize("top_k", [-1, 65, 11, 2.0, True, "3", None])
def test_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        pplfast.token_stats(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), top_k=top_k)
    with pytest.raises(ValueError, match="top_k"):
        pplfast.linear_token_stats(torch.randn(2, 4), torch.randn(10, 4),
                                   torch.zeros(2, dtype=torch.long), top_k=top_k)


def test_bad_inputs_as_token_nll():
    logits, targets = torch.randn(2, 10), torch.tensor([1, 10])
    with pytest.raises(ValueError, match=r"targets\[1\] = 10"):
        pplfast.token_stats(logits, targets)
    with pytest.raises(TypeError, match="float64"):
        pplfast.token_stats(logits.double(), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        pplfast.token_stats(logits, torch.tensor([1, 2]), temperature=0)
    with pytest.raises(ValueError, match="backend"):
        pplfast.token_stats(logits, torch.tensor([1, 2]), backend="gpu")
    with pytest.raises(ValueError, match="weight"):
        pplfast.linear_token_stats(torch.randn(2, 4), torch.randn(4, 10), torch.tensor([1, 2]))


def test_token_stats_is_frozen():
    stats = pplfast.token_stats(torch.randn(2, 10), torch.tensor([1, 2]))
    with pytest.raises(Exception):
        stats.nll = None


_MEMORY_CHILD = r"""
import json, sys, torch
import pplfast
from pplfast._memprobe import reset_peak, status_bytes

N, V, dtype, which = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
logits = torch.randn(N, V).to(dtype)
targets = torch.randint(0, V, (N,))

def control():  # what a user writes today
    logp = logits.float().log_softmax(-1)
    return (-(logp.exp() * logp).sum(-1), logp.max(-1), logp.topk(5, -1))

run = {
    "stats": lambda: pplfast.token_stats(logits, targets, top_k=5, backend="cpu").entropy,
    "stats64": lambda: pplfast.token_stats(logits, targets, top_k=64, backend="cpu").entropy,
    "control": lambda: control()[0],
}[which]
pplfast.token_stats(logits[:2], targets[:2], top_k=5, backend="cpu")  # load the extension first
reset_peak()
before = status_bytes("VmHWM")
out = run()
after = status_bytes("VmHWM")
print(json.dumps({"extra": after - before, "logits_bytes": logits.numel() * logits.element_size(),
                  "finite": bool(torch.isfinite(out).all())}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_token_stats_has_no_vocabulary_sized_temporary(dtype):
    from helpers import run_json_child

    N, V = 512, 128256
    for which in ("stats", "stats64"):
        ours = run_json_child(["-c", _MEMORY_CHILD, N, V, dtype, which])
        bound = 0.01 * ours["logits_bytes"]
        assert ours["finite"]
        assert ours["extra"] <= bound, f"{which}: extra peak {ours['extra']} B > 1% ({bound:.0f} B)"
    control = run_json_child(["-c", _MEMORY_CHILD, N, V, dtype, "control"])
    assert control["extra"] > bound, f"control stayed within the bound: {control}"


def test_bench_stats_path(capsys):
    import json

    from pplfast.cli import main

    rc = main(["bench", "--path", "stats", "--shapes", "8x300", "--dtypes", "fp32,bf16",
               "--reps", "1", "--warmup", "0", "--no-progress", "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    rows = record["results"]
    names = {r["impl"] for r in rows}
    assert names == {"pplfast_stats", "pplfast_stats_top5", "pplfast_token_nll", "torch_stats",
                     "torch_stats_top5"}
    assert all(r["error"] is None and r["ms"] > 0 and r["path"] == "stats" for r in rows)
    assert "statistics path: token_stats" in captured.err
    assert main(["bench", "--path", "stats", "--shapes", "8x16x300"]) == 2


# ---- the top of the float32 range (docs/ops.md "Special values") ---------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("V,dtype", [(37, torch.float32), (300, torch.float32),
                                     (37, torch.bfloat16)], ids=["V37-fp32", "V300-fp32",
                                                                 "V37-bf16"])
def test_float32_extremes(backend, opts, V, dtype):
    """[3e38, 3e38, -1] at temperature 0.5 gave NaN entropy, max log-probability and top-k
    log-probabilities on the CPU backend, and top-k log-probabilities of 0 (3e38 - lse, both
    rounded to 3e38) at every temperature."""
    logits, targets = float32_extreme_rows(V, dtype)
    for top_k in (0, 5):
        stats = _run(backend, logits, targets, top_k=top_k, **opts)
        check_stats(stats, logits, targets, dtype=dtype, top_k=top_k, extreme=True, **opts)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("case", EXTREME_BIASES)
def test_linear_float32_extremes(backend, opts, case):
    N, D, V = 6, 16, 37
    hidden = torch.randn(N, D)
    weight = torch.randn(V, D) * (2.0 / D**0.5)
    bias = extreme_bias(case, V)
    targets = torch.tensor([0, 1, 2, 3, V - 1, V - 2])
    logits = F.linear(hidden, weight, bias)  # the kernels' float32 logits
    for top_k in (0, 5):
        stats = on_backend(pplfast.linear_token_stats, backend, hidden, weight, targets,
                           bias=bias, top_k=top_k, **opts)
        check_stats(stats, logits, targets, dtype=torch.float32, top_k=top_k,
                    band=1e-5 * (logits.abs() + 1), extreme=True, **opts)


@pytest.mark.interpreter
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("case", EXTREME_BIASES)
def test_linear_float32_extremes_fused_triton(opts, case, monkeypatch):
    """The fused statistics kernel (top_k = 0): float32 with TF32 allowed under the interpreter
    (exact float32 dots there), bfloat16 on a GPU; a spy proves it ran."""
    from pplfast import _triton

    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused kernel needs CUDA capability >= 8.0")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if not torch.cuda.is_available():
        monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1")
    fused, calls = _triton.linear_token_stats_forward, []

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return fused(*args, **kwargs)

    monkeypatch.setattr(_triton, "linear_token_stats_forward", spy)
    N, D, V = 6, 16, 37
    hidden = torch.randn(N, D).to(dtype)
    weight = (torch.randn(V, D) * (2.0 / D**0.5)).to(dtype)
    bias = extreme_bias(case, V, dtype)
    targets = torch.tensor([0, 1, 2, 3, V - 1, V - 2])
    logits = F.linear(hidden.float(), weight.float(), bias.float())
    stats = on_backend(pplfast.linear_token_stats, "triton", hidden, weight, targets, bias=bias,
                       **opts)
    check_stats(stats, logits, targets, dtype=torch.float32, top_k=0,
                band=1e-5 * (logits.abs() + 1), extreme=True, **opts)
    assert calls == [dtype], f"fused kernel calls: {calls}"

