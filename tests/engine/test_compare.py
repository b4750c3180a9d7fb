"""compare / linear_compare against the float64 oracle on every backend that runs here, special
values (logits at the top of the float32 range among them, with the bound of
``helpers.extreme_scale``), bad inputs; the Comparison metric and its statistics against an
implementation written here from llama.cpp's definitions; merge and gloo sync; CPU memory with a
live control."""
import math
import os
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

import pplfast
from pplfast import reference
from helpers import (ALL_BACKENDS, EXTREME_BIASES, LSE_RTOL, ORDINARY_BOUND, assert_nll_close,
                     backend_device, cpu_isas, extreme_bias, extreme_option_params, extreme_scale,
                     float32_extreme_rows, on_backend, row_lse, run_json_child)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


def lse_both(a, b, **opts):
    return torch.maximum(row_lse(a, **opts).abs(), row_lse(b, **opts).abs())


def assert_comparison_close(got, expected, lse_base, lse_test, what=""):
    """KL within LSE_RTOL * max(1, |lse_p|, |lse_q|); NLLs as token_nll; argmaxes exact."""
    assert isinstance(got, pplfast.TokenComparison)
    scale = torch.maximum(lse_base.abs(), lse_test.abs())
    assert_nll_close(got.kl, expected["kl"], scale, what=f"{what} kl")
    assert_nll_close(got.kl_reverse, expected["kl_reverse"], scale, what=f"{what} kl_reverse")
    assert_nll_close(got.nll_base, expected["nll_base"], lse_base, what=f"{what} nll_base")
    assert_nll_close(got.nll_test, expected["nll_test"], lse_test, what=f"{what} nll_test")
    for name in ("argmax_base", "argmax_test"):
        value = getattr(got, name)
        assert value.dtype == torch.int64 and value.shape == expected[name].shape
        bad = (value.cpu() != expected[name].cpu()).nonzero()
        assert bad.numel() == 0, f"{what} {name}: differs at {bad[:5].tolist()}"
    kl = got.kl[~torch.isnan(got.kl)]
    assert bool((kl >= 0).all()), f"{what}: negative KL"


def pair(shape, dtype, spread=0.5, scale=3.0):
    a = torch.randn(shape) * scale
    b = a + torch.randn(shape) * spread
    return a.to(dtype), b.to(dtype)


def targets_for(lead, V, ignore_every=5):
    t = torch.randint(0, V, lead)
    t.view(-1)[::ignore_every] = -100
    return t


SHAPES = [(2, 3, 507), (1, 1, 1), (1, 63, 37), (5, 1000)]
OPTIONS = [{}, {"softcap": 4.0}, {"temperature": 0.7}, {"softcap": 30.0, "temperature": 2.0},
           {"shift": True}]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items())
                         or "plain")
def test_compare_matches_float64(backend, dtype, shape, opts):
    if opts.get("shift") and len(shape) < 2:
        pytest.skip("shift needs a sequence axis")
    a, b = pair(shape, dtype)
    t = targets_for(shape[:-1], shape[-1])
    got = on_backend(pplfast.compare, backend, a, b, t, **opts)
    expected = reference.compare(a, b, t, **opts)
    lse_opts = {k: v for k, v in opts.items()}
    assert_comparison_close(got, expected, row_lse(a, **lse_opts), row_lse(b, **lse_opts),
                            what=f"{backend} {dtype} {shape} {opts}")
    lead = t[..., 1:].shape if opts.get("shift") else t.shape
    assert got.kl.shape == lead
    scored = (t[..., 1:] if opts.get("shift") else t) != -100
    assert bool((got.kl[~scored] == 0).all()) and bool((got.argmax_base[~scored] == -1).all())


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_cpu_long_rows_and_vocabulary_splits(rows):
    # few rows: the CPU kernel also splits each row into column ranges and merges the states
    a, b = pair((rows, 50257), torch.bfloat16, scale=4.0)
    t = torch.randint(0, 50257, (rows,))
    got = pplfast.compare(a, b, t, backend="cpu")
    assert_comparison_close(got, reference.compare(a, b, t), row_lse(a), row_lse(b))


@pytest.mark.parametrize("splits,block", [(1, 16), (3, 16), (4, 32)])
def test_triton_split_paths(splits, block):
    from pplfast.kernels.compare import compare_forward

    a, b = pair((6, 301), torch.float16)
    t = targets_for((6,), 301, ignore_every=4)
    fields = compare_forward(a.unsqueeze(0), b.unsqueeze(0), t, -100, None, 1.0,
                             num_splits=splits, block_v=block)
    got = pplfast.TokenComparison(*fields)
    assert_comparison_close(got, reference.compare(a, b, t), row_lse(a), row_lse(b))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_mixed_dtypes_and_strides(backend):
    a = (torch.randn(3, 800, 8) * 3)[:, ::2, 1].contiguous()  # (3, 400), then made strided:
    base = torch.randn(400, 3).T.to(torch.bfloat16)  # vocabulary stride 3
    test = (base.float() + 0.3 * torch.randn(3, 400)).contiguous()
    t = torch.randint(0, 400, (3,))
    got = on_backend(pplfast.compare, backend, base, test, t)
    assert_comparison_close(got, reference.compare(base, test, t), row_lse(base), row_lse(test))
    del a


def special_rows(V=37):
    inf, nan = float("inf"), float("nan")
    edits = {
        "plain": (None, None),
        "a_ninf": (lambda a: a[:5].fill_(-inf), None),
        "b_ninf": (None, lambda b: b[:5].fill_(-inf)),
        "both_ninf": (lambda a: a[:5].fill_(-inf), lambda b: b[:5].fill_(-inf)),
        "a_all_ninf": (lambda a: a.fill_(-inf), None),
        "b_all_ninf": (None, lambda b: b.fill_(-inf)),
        "a_pinf": (lambda a: a.__setitem__(3, inf), None),
        "b_pinf": (None, lambda b: b.__setitem__(3, inf)),
        "a_ninf_b_pinf": (lambda a: a.__setitem__(3, -inf), lambda b: b.__setitem__(3, inf)),
        "a_nan": (lambda a: a.__setitem__(7, nan), None),
        "b_nan": (None, lambda b: b.__setitem__(7, nan)),
        "big": (lambda a: a.mul_(1e4), lambda b: b.mul_(1e4)),
        "far_apart": (None, lambda b: b.sub_(2e4)),
        "ties": (lambda a: a.__setitem__(slice(10, 14), 50.0), lambda b: b.__setitem__(slice(2, 4), 50.0)),
    }
    a, b = torch.randn(len(edits), V), torch.randn(len(edits), V)
    for i, (ea, eb) in enumerate(edits.values()):
        if ea:
            ea(a[i])
        if eb:
            eb(b[i])
    t = torch.randint(0, V, (len(edits),))
    t[1] = 0  # a target whose base logit is -inf
    return list(edits), a, b, t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opts", [{}, {"softcap": 5.0}, {"temperature": 0.5}],
                         ids=["plain", "softcap", "temperature"])
def test_special_values(backend, dtype, opts):
    names, a, b, t = special_rows()
    a, b = a.to(dtype), b.to(dtype)
    got = on_backend(pplfast.compare, backend, a, b, t, **opts)
    expected = reference.compare(a, b, t, **opts)
    assert_comparison_close(got, expected, row_lse(a, **opts), row_lse(b, **opts),
                            what=f"{backend} {opts}")
    # the rules, spelled out (docs/compare.md)
    kl = dict(zip(names, got.kl.tolist()))
    assert kl["a_ninf"] >= 0 and math.isfinite(kl["a_ninf"])
    assert math.isnan(kl["a_nan"]) and math.isnan(kl["b_nan"])
    if "softcap" not in opts:  # the cap maps ±inf to ±softcap
        assert kl["b_ninf"] == math.inf and math.isnan(kl["b_all_ninf"])
        assert math.isnan(kl["a_pinf"]) and math.isnan(kl["b_pinf"])
    assert got.argmax_base[names.index("a_nan")] == 7
    assert got.argmax_base[names.index("ties")] == 10 and got.argmax_test[names.index("ties")] == 2


# ---- the top of the float32 range (docs/ops.md "Special values") ---------------------------------

def assert_extreme_comparison(got, expected, base, test, opts, what):
    """Float fields against the oracle rounded to float32 (beyond FLT_MAX: +inf), within
    2e-6 * max(1, |value|, |lse of either row's ordinary logits|) (``helpers.extreme_scale``);
    argmaxes exact; no negative KL."""
    so = dict(softcap=opts.get("softcap"), temperature=opts.get("temperature", 1.0))
    for name, rows in (("kl", (base, test)), ("kl_reverse", (base, test)),
                       ("nll_base", (base,)), ("nll_test", (test,))):
        want = expected[name].float().double()
        scale = torch.stack([extreme_scale(r, want, **so) for r in rows]).max(0).values
        assert_nll_close(getattr(got, name), want, scale, what=f"{what} {name}")
    for name in ("argmax_base", "argmax_test"):
        assert torch.equal(getattr(got, name).cpu(), expected[name]), f"{what} {name}"
    kl = torch.cat([got.kl, got.kl_reverse])
    assert bool((kl[~torch.isnan(kl)] >= 0).all()), f"{what}: negative KL"


def extreme_pair(V, pairing):
    """``(base, test, targets)``: ``helpers.float32_extreme_rows`` against themselves (KL 0),
    against themselves with the ordinary logits moved (the extremes shared), or against the
    next row (extremes facing ordinary logits or other extremes: KLs of 0, log V, ~1e38 / T or
    +inf)."""
    base, t = float32_extreme_rows(V)
    if pairing == "self":
        test = base.clone()
    elif pairing == "perturbed":
        test = torch.where(base.abs() < ORDINARY_BOUND, base + 0.5 * torch.randn(base.shape),
                           base)
    else:
        test = base.roll(1, dims=0)
    return base, test, t


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("V,pairing", [(37, "self"), (300, "perturbed"), (37, "rolled"),
                                       (300, "rolled")], ids=lambda p: str(p))
def test_float32_extremes(backend, opts, V, pairing):
    """[3e38, 3e38, -1] against itself at temperature 0.5 gave a NaN KL on the CPU backend (its
    KL is 0)."""
    base, test, t = extreme_pair(V, pairing)
    got = on_backend(pplfast.compare, backend, base, test, t, **opts)
    expected = reference.compare(base, test, t, **opts)
    assert_extreme_comparison(got, expected, base, test, opts, f"{backend} {pairing} {opts}")
    if pairing == "self":
        assert bool((got.kl.abs() <= 2e-6 * float(V)).all()), got.kl


def block_special_rows(V, dtype, generator):
    """``(base, test, targets)`` of rows several CPU blocks long (2048 columns each), with special
    values in some blocks only, so that the kernel's fold changes along a row (fast, masked or
    exact, by each block's content): -inf or NaN in one middle block, every block masked to -inf
    but a few entries (top-k sampling; the same mask on both sides, and different masks), values
    far below the maximum on one side only (the exact fold) or at the same columns on both,
    -1e19 (within the fast fold at T = 1, beyond it at small temperatures) and -1e36, and values
    95 below the maximum (their exps below the smallest normal float)."""
    inf = float("inf")
    a = torch.randn(12, V, generator=generator) * 2
    b = a + 0.5 * torch.randn(12, V, generator=generator)
    keep = lambda: torch.rand(V, generator=generator) < 0.01
    a[1, 2100:2110] = -inf
    b[2, 4500] = -inf
    m = keep()
    a[3, ~m], b[3, ~m] = -inf, -inf
    a[4, ~m], b[4, ~keep() & ~m] = -inf, -inf
    a[5, 4400] = float("nan")
    b[6, 2500] = -1e30
    a[7, 100:140], b[7, 100:140] = -1e30, -1e30
    a[8, 3000] = -1e25
    b[9, 5000] = -1e19
    a[10, -1], b[10, -1] = -inf, -inf  # in the last, partial block
    b[11, 3333] = -1e36  # q = 0 there: a fast fold's clamped term 1e-38 * 1e36 would show
    a[0, 2048:2300] = a[0].max() - 95.0  # exps of 2^-137: denormal, or 0 where flushed
    t = torch.randint(0, V, (12,), generator=generator)
    return a.to(dtype), b.to(dtype), t


@pytest.mark.parametrize("opts", [dict(softcap=None, temperature=1.0),
                                  dict(softcap=None, temperature=0.05),
                                  dict(softcap=20.0, temperature=0.7)],
                         ids=["plain", "T0.05", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("isa", cpu_isas())
def test_cpu_blocks_change_path_along_a_row(isa, dtype, opts, monkeypatch):
    """Every instruction set, against the float64 oracle, with the maxima and the fast fold's
    exponent setup carried from block to block (it is made again only when a maximum grows)."""
    monkeypatch.setenv("PPLFAST_CPU_ISA", isa)
    base, test, t = block_special_rows(3 * 2048 + 501, dtype, torch.Generator().manual_seed(5))
    got = pplfast.compare(base, test, t, backend="cpu", **opts)
    expected = reference.compare(base, test, t, **opts)
    assert_extreme_comparison(got, expected, base, test, opts, f"{isa} {dtype} {opts}")
    if dtype is not torch.float16 and opts == dict(softcap=None, temperature=1.0):  # fp16: no 1e19
        kl, rev = got.kl.tolist(), got.kl_reverse.tolist()
        assert math.isinf(rev[1]) and math.isinf(kl[2]) and math.isinf(rev[4])
        assert math.isnan(kl[5]) and kl[6] > 1e20 and rev[8] > 1e16 and kl[9] > 1e12


@pytest.mark.parametrize("isa", cpu_isas())
def test_cpu_compare_leaves_denormals_alone(isa, monkeypatch):
    """The AVX-512 compare flushes denormal results to zero in its threads while it runs, and
    puts the floating-point state back: a denormal still comes out of ordinary arithmetic after
    it in this thread, which runs part of the work (OpenMP's first thread)."""
    monkeypatch.setenv("PPLFAST_CPU_ISA", isa)
    a, b = torch.randn(8, 5000), torch.randn(8, 5000)
    pplfast.compare(a, b, torch.zeros(8, dtype=torch.long), backend="cpu")
    tiny = 1e-300
    assert tiny * 1e-10 > 0.0  # 1e-310, a denormal double: 0 under flush-to-zero
    x = torch.full((4096,), 1e-30)
    assert bool(((x * 1e-10) > 0).all())  # 1e-40, a denormal float, through torch's kernels


@pytest.mark.parametrize("opts", extreme_option_params())
def test_triton_split_paths_float32_extremes(opts):
    """Vocabulary splits of one row with different maxima (an extreme in one split, ordinary
    logits in another), merged by the launcher in float64."""
    from pplfast.kernels.compare import compare_forward

    for pairing in ("perturbed", "rolled"):
        base, test, t = extreme_pair(96, pairing)
        fields = compare_forward(base.unsqueeze(0), test.unsqueeze(0), t, -100, opts["softcap"],
                                 opts["temperature"], num_splits=3, block_v=16)
        got = pplfast.TokenComparison(*fields)
        expected = reference.compare(base, test, t, **opts)
        assert_extreme_comparison(got, expected, base, test, opts, f"splits {pairing} {opts}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("case", EXTREME_BIASES)
def test_linear_float32_extremes(backend, opts, case):
    """Biases carrying the extremes: the test model's weights moved, its bias the next case of
    the list (the same extremes on both sides are the logits path's "perturbed" pairing)."""
    N, D, V = 6, 16, 37
    hb = torch.randn(N, D)
    wb = torch.randn(V, D) * (2.0 / D**0.5)
    ht = hb + 0.1 * torch.randn(N, D)
    wt = wb + 0.05 * torch.randn(V, D)
    t = torch.tensor([0, 1, 2, 3, V - 1, V - 2])
    bb = extreme_bias(case, V)
    following = EXTREME_BIASES[(EXTREME_BIASES.index(case) + 1) % len(EXTREME_BIASES)]
    bt = extreme_bias(following, V)
    got = on_backend(pplfast.linear_compare, backend, hb, wb, ht, wt, t, bias_base=bb,
                     bias_test=bt, **opts)
    expected = reference.linear_compare(hb, wb, ht, wt, t, bias_base=bb, bias_test=bt, **opts)
    zb = torch.nn.functional.linear(hb, wb, bb)  # the kernels' float32 logits
    zt = torch.nn.functional.linear(ht, wt, bt)
    assert_extreme_comparison(got, expected, zb, zt, opts, f"{backend} {case} {opts}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_linear_compare(backend, dtype):
    N, D, V = 63, 123, 507
    hb = torch.randn(2, N, D).to(dtype)
    ht = (hb.float() + 0.1 * torch.randn(2, N, D)).to(dtype)
    wb = (torch.randn(V, D) / 8).to(dtype)
    wt = (wb.float() + 0.02 * torch.randn(V, D)).to(dtype)
    bb = torch.randn(V).to(dtype)
    t = targets_for((2, N), V)
    opts = dict(bias_base=bb, softcap=4.0, shift=True)
    got = on_backend(pplfast.linear_compare, backend, hb, wb, ht, wt, t, **opts)
    expected = reference.linear_compare(hb, wb, ht, wt, t, **opts)
    zb = torch.nn.functional.linear(hb.double(), wb.double(), bb.double())
    zt = torch.nn.functional.linear(ht.double(), wt.double())
    lse_b, lse_t = row_lse(zb, softcap=4.0, shift=True), row_lse(zt, softcap=4.0, shift=True)
    if dtype == torch.float32 or backend == "reference" or backend == "cpu":
        # float32 GEMMs of exactly representable operands: the logits are fp32-accurate
        scale = torch.maximum(lse_b.abs(), lse_t.abs())
        for name, lse in (("kl", scale), ("kl_reverse", scale), ("nll_base", lse_b),
                          ("nll_test", lse_t)):
            # fp32 products summed over D add ~D * 6e-8 of the logits' magnitude
            assert_nll_close(getattr(got, name), expected[name], lse, rtol=20 * LSE_RTOL,
                             what=f"{backend} {dtype} {name}")
    else:
        # the triton path on CPU tensors gets logits from F.linear in the input dtype: the
        # same-dtype PyTorch path, whose own error bounds ours
        ref_b = torch.nn.functional.linear(hb, wb, bb).float()
        ref_t = torch.nn.functional.linear(ht, wt).float()
        torch_way = reference.compare(ref_b, ref_t, t, softcap=4.0, shift=True)
        scale = torch.maximum(lse_b.abs(), lse_t.abs()).clamp_min(1.0)
        for name in ("kl", "kl_reverse", "nll_base", "nll_test"):
            theirs = (torch_way[name] - expected[name]).abs()
            assert_nll_close(getattr(got, name), expected[name], atol=theirs + LSE_RTOL * scale,
                             what=f"{backend} {dtype} {name}")
    scored = t[:, 1:] != -100
    top2 = zb[:, :-1].topk(2).values
    if backend == "triton" and backend_device(backend) == "cpu" and dtype != torch.float32:
        # the interpreter: the argmax of the logits F.linear gives in the input dtype
        assert torch.equal(got.argmax_base[scored], ref_b[:, :-1].argmax(-1)[scored])
    else:
        # rows whose top two logits are apart by more than the GEMM's rounding (on a GPU a
        # low-precision GEMM may round its output to the input dtype)
        exact = dtype == torch.float32 or backend in ("reference", "cpu")
        margin = 1e-3 if exact else 2 ** -7 * (top2[..., 0].abs() + 1)
        close = ((top2[..., 0] - top2[..., 1]).abs() > margin) & scored
        assert bool((got.argmax_base[close] == expected["argmax_base"][close]).all())
    assert bool((got.argmax_base[t[:, 1:] == -100] == -1).all())


def test_linear_compare_cpu_small_budget_and_ignored():
    from pplfast._cpu import linear_compare as cpu_linear_compare

    N, D, V = 50, 16, 300
    hb, ht = torch.randn(N, D), torch.randn(N, 24)  # the two widths may differ
    wb, wt = torch.randn(V, D) / 4, torch.randn(V, 24) / 4
    t = targets_for((N,), V, ignore_every=3)
    fields = cpu_linear_compare(hb, wb, None, ht, wt, None, t, -100, None, 1.0, budget_mb=0.01)
    got = pplfast.TokenComparison(*fields)
    expected = reference.linear_compare(hb, wb, ht, wt, t)
    lse_b, lse_t = row_lse(hb.double() @ wb.double().T), row_lse(ht.double() @ wt.double().T)
    assert_comparison_close(got, expected, lse_b, lse_t)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_model_against_itself_is_zero(backend):
    a = torch.randn(3, 17, 211) * 5
    t = torch.randint(0, 211, (3, 17))
    got = on_backend(pplfast.compare, backend, a, a, t)
    assert float(got.kl.abs().max()) <= 2e-6 * float(row_lse(a).abs().max())
    assert torch.equal(got.argmax_base, got.argmax_test) and torch.equal(got.nll_base, got.nll_test)


def test_empty_and_all_ignored():
    got = pplfast.compare(torch.randn(0, 5), torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
    assert got.kl.shape == (0,) and got.argmax_base.dtype == torch.int64
    t = torch.full((4,), -100)
    got = pplfast.compare(torch.randn(4, 9), torch.randn(4, 9), t, backend="cpu")
    assert bool((got.kl == 0).all()) and bool((got.argmax_test == -1).all())


def test_bad_inputs():
    a, b, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match=r"logits_base has shape \(2, 5, 11\) but logits_test has "
                                         r"shape \(2, 5, 12\)"):
        pplfast.compare(a, torch.randn(2, 5, 12), t)
    with pytest.raises(TypeError, match="logits_test is float64"):
        pplfast.compare(a, b.double(), t)
    with pytest.raises(TypeError, match="logits_base must be a torch.Tensor"):
        pplfast.compare(a.tolist(), b, t)
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 11 is outside \[0, 11\)"):
        bad = t.clone()
        bad[1, 2] = 11
        pplfast.compare(a, b, bad)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        pplfast.compare(a, b, t, temperature=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        pplfast.compare(a, b, t, backend="gpu")
    with pytest.raises(ValueError, match="targets has shape"):
        pplfast.compare(a, b, t[:, :3])
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"weight_base has shape \(11, 8\) but weight_test has "
                                         r"shape \(12, 8\)"):
        pplfast.linear_compare(h, w, h, torch.randn(12, 8), t[0])
    with pytest.raises(ValueError, match="hidden_base has shape"):
        pplfast.linear_compare(h, w, h[:4], w, t[0])
    with pytest.raises(ValueError, match=r"weight_test must be \(V, 8\)"):
        pplfast.linear_compare(h, w, h, torch.randn(11, 7), t[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_check_targets(backend):
    a, b, t = torch.randn(2, 6, 13), torch.randn(2, 6, 13), torch.randint(0, 13, (2, 6))
    t[0, 3] = -100
    for shift in (False, True):
        checked = pplfast.compare(a, b, t, shift=shift, backend=backend)
        unchecked = pplfast.compare(a, b, t, shift=shift, backend=backend, check_targets=False)
        for name in ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test"):
            assert torch.equal(getattr(checked, name), getattr(unchecked, name))
    hb, wb = torch.randn(2, 6, 8), torch.randn(13, 8)
    ht, wt = torch.randn(2, 6, 5), torch.randn(13, 5)  # the widths may differ
    checked = pplfast.linear_compare(hb, wb, ht, wt, t, shift=True, backend=backend)
    unchecked = pplfast.linear_compare(hb, wb, ht, wt, t, shift=True, backend=backend,
                                       check_targets=False)
    assert checked.kl.shape == (2, 5) and torch.equal(checked.kl, unchecked.kl)
    with pytest.raises(TypeError, match="check_targets must be a bool"):
        pplfast.compare(a, b, t, check_targets=1)
    with pytest.raises(TypeError, match="check_targets must be a bool"):
        pplfast.linear_compare(hb, wb, ht, wt, t, check_targets="yes")


# ---- statistics: an independent implementation from llama.cpp's definitions ---------------------

def llama_cpp_statistics(kl, nll_base, nll_test, same_top):
    """kl_divergence() of llama.cpp's tools/perplexity/perplexity.cpp, written out in plain
    Python over lists (nll = the Q model's NLL, as there)."""
    n = len(kl)
    sums = dict(nll=0.0, nll2=0.0, base=0.0, base2=0.0, nll_base=0.0, kld=0.0, kld2=0.0,
                dp=0.0, dp2=0.0, dp4=0.0)
    dps = []
    for k, b, q in zip(kl, nll_base, nll_test):
        sums["nll"] += q
        sums["nll2"] += q * q
        sums["base"] += b
        sums["base2"] += b * b
        sums["nll_base"] += q * b
        sums["kld"] += k
        sums["kld2"] += k * k
        dp = math.exp(-q) - math.exp(-b)
        dps.append(dp)
        sums["dp"] += dp
        sums["dp2"] += dp * dp
        sums["dp4"] += dp ** 4

    def mean_unc(s, s2):
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    cov = 0.0 if n < 10 else (sums["nll_base"] / n - sums["nll"] / n * sums["base"] / n) / (n - 1)
    lq, lb = mean_unc(sums["nll"], sums["nll2"]), mean_unc(sums["base"], sums["base2"])
    ratio_unc = math.sqrt(lq[1] ** 2 + lb[1] ** 2 - 2 * cov)
    kld = mean_unc(sums["kld"], sums["kld2"])
    mse = mean_unc(sums["dp2"], sums["dp4"])
    top = sum(same_top) / n

    def pct(values, fraction):
        values = sorted(values)
        if fraction <= 0:
            return values[0]
        if fraction >= 1:
            return values[-1]
        p = fraction * (len(values) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]

    def median(values):
        v = sorted(values)
        return 0.5 * (v[len(v) // 2] + v[len(v) // 2 - 1]) if len(v) % 2 == 0 else v[len(v) // 2]

    return dict(
        perplexity_test=math.exp(lq[0]), perplexity_test_stderr=math.exp(lq[0]) * lq[1],
        perplexity_base=math.exp(lb[0]), perplexity_base_stderr=math.exp(lb[0]) * lb[1],
        nll_correlation=cov / (lq[1] * lb[1]), ln_ppl_ratio=lq[0] - lb[0],
        ln_ppl_ratio_stderr=ratio_unc, ppl_ratio=math.exp(lq[0] - lb[0]),
        ppl_ratio_stderr=math.exp(lq[0] - lb[0]) * ratio_unc,
        kl_mean=kld[0], kl_mean_stderr=kld[1], kl_max=max(kl), kl_min=min(kl),
        kl_percentiles={pc: median(kl) if pc == 50.0 else pct(kl, pc / 100)
                        for pc in (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)},
        delta_p_mean=mean_unc(sums["dp"], sums["dp2"])[0],
        delta_p_mean_stderr=mean_unc(sums["dp"], sums["dp2"])[1],
        delta_p_rms=math.sqrt(mse[0]), delta_p_rms_stderr=0.5 / math.sqrt(mse[0]) * mse[1],
        delta_p_percentiles={
            pc: (max(dps) if pc == 100.0 else min(dps) if pc == 0.0 else
                 median(dps) if pc == 50.0 else pct(dps, pc / 100))
            for pc in (100.0, 99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1, 0.0)},
        top1_agreement=top, top1_agreement_stderr=math.sqrt(top * (1 - top) / (n - 1)),
        num_tokens=n,
    )


def make_batches(count, V=301):
    batches = []
    for i in range(count):
        a, b = pair((2, 40 + 7 * i, V), torch.float32, spread=0.8)
        batches.append((a, b, targets_for((2, 40 + 7 * i), V, ignore_every=6)))
    return batches


def test_statistics_match_llama_cpp_definitions():
    metric = pplfast.Comparison()
    kl, nb, nt, same = [], [], [], []
    for a, b, t in make_batches(4):
        tc = metric.update(a, b, t, backend="cpu")
        s = t != -100
        kl += tc.kl[s].double().tolist()
        nb += tc.nll_base[s].double().tolist()
        nt += tc.nll_test[s].double().tolist()
        same += (tc.argmax_base[s] == tc.argmax_test[s]).tolist()
    got = metric.compute()
    expected = llama_cpp_statistics(kl, nb, nt, same)
    assert 0 < got.top1_agreement < 1 and got.num_tokens == len(kl) > 300
    for key, value in expected.items():
        actual = getattr(got, key)
        if isinstance(value, dict):
            assert set(actual) == set(value), key
            for pc in value:
                # per-token values are kept as float32 for the percentiles
                assert actual[pc] == pytest.approx(value[pc], rel=1e-6, abs=1e-9), (key, pc)
        else:
            assert actual == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_statistics_few_tokens_follow_llama_cpp():
    # below 11 tokens llama.cpp reports no uncertainty; below 10 no covariance
    metric = pplfast.Comparison()
    a, b = pair((6, 50), torch.float32)
    metric.update(a, b, torch.randint(0, 50, (6,)))
    got = metric.compute()
    assert got.kl_mean_stderr == 0.0 and got.perplexity_base_stderr == 0.0
    assert got.ln_ppl_ratio_stderr == 0.0 and math.isnan(got.nll_correlation)
    with pytest.raises(ValueError, match="no scored tokens"):
        pplfast.Comparison().compute()


def test_merge_equals_one_metric():
    batches = make_batches(5)
    single, parts = pplfast.Comparison(), [pplfast.Comparison(), pplfast.Comparison()]
    for i, (a, b, t) in enumerate(batches):
        single.update(a, b, t)
        parts[i % 2].update(a, b, t)
    merged = parts[0].merge(parts[1]).compute().as_dict()
    expected = single.compute().as_dict()
    for key, value in expected.items():
        if isinstance(value, dict):
            for pc in value:
                assert merged[key][pc] == pytest.approx(value[pc], rel=1e-12, abs=1e-15), key
        else:
            assert merged[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_update_linear_and_update_tokens():
    hb, ht = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    wb, wt = torch.randn(100, 16) / 4, torch.randn(100, 16) / 4
    t = targets_for((2, 30), 100)
    m1, m2 = pplfast.Comparison(), pplfast.Comparison()
    tc = m1.update_linear(hb, wb, ht, wt, t, shift=True)
    m2.update_tokens(tc, t, shift=True)
    assert m1.compute().as_dict() == m2.compute().as_dict()
    assert m1.num_tokens == int((t[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="targets has shape"):
        m2.update_tokens(tc, t)


def _sync_worker(rank, world, init_file, out_dir, batches):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metric = pplfast.Comparison()
        for i, (a, b, t) in enumerate(batches):
            if i % world == rank:
                metric.update(a, b, t)
        local = metric.num_tokens
        metric.sync()
        torch.save({"synced": metric.compute().as_dict(), "local": local},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_over_two_gloo_processes(tmp_path):
    batches = make_batches(5)
    single = pplfast.Comparison()
    for a, b, t in batches:
        single.update(a, b, t)
    expected = single.compute().as_dict()
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path), batches), nprocs=2)
    locals_ = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        locals_.append(got["local"])
        for key, value in expected.items():
            if isinstance(value, dict):
                for pc in value:  # the gathered values come in rank order, the same multiset
                    assert got["synced"][key][pc] == pytest.approx(value[pc], rel=1e-12), key
            else:
                assert got["synced"][key] == pytest.approx(value, rel=1e-12), key
    assert 0 < locals_[0] < expected["num_tokens"] and sum(locals_) == expected["num_tokens"]


# ---- memory: no vocabulary-sized temporary on the CPU --------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F
    import pplfast
    from pplfast._memprobe import reset_peak, status_bytes

    N, V, dtype, which = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4]
    a = torch.randn(N, V).to(dtype)
    b = torch.randn(N, V).to(dtype)
    t = torch.randint(0, V, (N,))

    def control():
        lp, lq = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
        return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)

    run = {"pplfast": lambda: pplfast.compare(a, b, t, backend="cpu").kl, "control": control}[which]
    pplfast.compare(a[:2], b[:2], t[:2], backend="cpu")  # load the extension first
    reset_peak()
    before = status_bytes("VmHWM")
    out = run()
    after = status_bytes("VmHWM")
    print(json.dumps({"extra": after - before, "logits_bytes": a.numel() * a.element_size(),
                      "finite": bool(torch.isfinite(out).all())}))
    """
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_has_no_vocabulary_sized_temporary(dtype):
    N, V = 256, 128256
    ours = run_json_child(["-c", CHILD, N, V, dtype, "pplfast"])
    bound = 0.01 * ours["logits_bytes"]
    assert ours["finite"]
    assert ours["extra"] <= bound, f"extra peak {ours['extra']} B > 1% of logits ({bound:.0f} B)"
    control = run_json_child(["-c", CHILD, N, V, dtype, "control"])
    assert control["extra"] > bound, f"control stayed within the bound: {control}"


# ---- pplfast bench --path compare ---------------------------------------------------------------

def test_bench_compare_path(capsys):
    import json

    from pplfast import cli

    rc = cli.main(["bench", "--path", "compare", "--shapes", "32x700", "--dtypes", "fp32,bf16",
                   "--backend", "cpu", "--no-progress", "--bandwidth-mib", "8", "--reps", "2",
                   "--warmup", "1", "--json", "-"])
    out, table = capsys.readouterr()
    assert rc == 0, table
    rows = [r for r in json.loads(out)["results"] if r["path"] == "compare"]
    assert {r["impl"] for r in rows} == {"pplfast", "torch_kl", "token_nll_one"}
    for r in rows:
        assert r["error"] is None and r["ms"] > 0, r
        tensors = 1 if r["impl"] == "token_nll_one" else 2  # token_nll reads one of the two
        assert r["logits_bytes"] == tensors * 32 * 700 * (4 if r["dtype"] == "fp32" else 2)
        assert r["gelems"] == pytest.approx(tensors * 32 * 700 / (r["ms"] * 1e-3) / 1e9)
        assert r["peak_extra_bytes"] is not None
    assert "compare path" in table and "log_softmax+kl_div+argmax" in table
    assert cli.main(["bench", "--path", "compare", "--shapes", "4x8x16"]) == 2
    assert "--path compare takes NxV shapes" in capsys.readouterr().err
