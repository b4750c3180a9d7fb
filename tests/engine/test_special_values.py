"""The special-value matrix (docs/ops.md "Special values"): NaN, +-inf, all -inf rows, -inf targets,
ignored rows and +-1e4 extremes, on every backend, both paths (logits through ``token_nll``,
hidden states through ``linear_token_nll``), under every option combination (softcap, temperature,
shift, bias), against the float64 reference: NaN where it is NaN, the same infinities, finite
values within docs/ops.md's accuracy bound, and no scored NLL below 0. Then confident tokens (one
logit far above the rest) over dtypes x options: the NLL is ~0 and never negative. Then logits at
the top of the float32 range (3e38, FLT_MAX; ``helpers.float32_extreme_rows``) under softcap and
temperatures 0.5, 3 and 5e37, with a bound that scales with the NLL, never with the
log-sum-exp (``helpers.extreme_scale``); the statistics and comparison ops have theirs in
``test_token_stats.py`` and ``test_compare.py``, the reference its exact check in
``test_reference_exact.py``.

Shapes are tiny (V = 37: AVX2 blocks plus a scalar tail; 300 in a few cases) so that the Triton
cases stay fast under the interpreter.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pplfast
from pplfast import reference

from helpers import (ALL_BACKENDS, EXTREME_BIASES, assert_nll_close, backend_device, extreme_bias,
                     extreme_option_params, extreme_scale, float32_extreme_rows, row_lse)

HAS_CUDA = torch.cuda.is_available()
INF, NAN = float("inf"), float("nan")
T, V, D = 5, 37, 16

def option_sets(with_bias):
    keys = ["softcap", "temperature", "shift"] + (["bias"] if with_bias else [])
    values = [(None, 30.0), (1.0, 0.7), (False, True)] + ([(False, True)] if with_bias else [])
    for combo in itertools.product(*values):
        opts = dict(zip(keys, combo))
        name = (f"cap{opts['softcap'] or 0:g}-t{opts['temperature']:g}"
                f"{'-shift' if opts['shift'] else ''}{'-bias' if opts.get('bias') else ''}")
        yield pytest.param(opts, id=name)


LOGIT_OPTIONS = list(option_sets(False))
HIDDEN_OPTIONS = list(option_sets(True))


class Rows:
    """A (1, T, width) input whose scored row r reads position r and predicts target index
    r + shift; `target(r)` / `set_target(r, j)` address that target."""

    def __init__(self, targets, shift):
        self.targets, self.shift = targets, int(shift)

    def target(self, r):
        return int(self.targets[0, r + self.shift])

    def set_target(self, r, j):
        self.targets[0, r + self.shift] = j


def fresh_targets():
    # targets in the upper half of the vocabulary; the special columns below sit in the lower half
    return torch.randint(V // 2, V, (1, T))


def check(got, want, lse, scored, what):
    """docs/ops.md "Accuracy": |error| <= 2e-6 * max(1, |lse|, |NLL|). The |NLL| term matters only
    where the target logit lies far below the row's maximum (-1e4 here): the NLL is then much
    larger than the lse and a float32 output alone rounds it by up to 6e-8 * |NLL|."""
    scale = torch.maximum(lse.abs(), torch.where(torch.isfinite(want), want.abs(), 0.0))
    assert_nll_close(got.cpu(), want, scale, what=what)
    neg = got.cpu()[scored] < 0
    assert not bool(neg.any()), f"{what}: negative NLL {got.cpu()[scored][neg].tolist()}"


# ---- logits path --------------------------------------------------------------------------

LOGIT_CASES = ["nan", "pinf", "pinf_target", "ninf", "all_ninf", "ninf_target", "ignored",
               "extremes", "mixed_V300"]


def logit_case(case, shift):
    """(logits (1, T, V'), targets (1, T), ignore_index) with the case's special values."""
    width = 300 if case == "mixed_V300" else V
    x = torch.randn(1, T, width) * 3
    rows = Rows(fresh_targets(), shift)
    if case == "nan":
        x[0, 1, 3] = NAN
    elif case == "pinf":
        x[0, 1, 3] = INF
    elif case == "pinf_target":
        x[0, 1, rows.target(1)] = INF
    elif case == "ninf":
        x[0, 1, : V // 2 : 2] = -INF
        x[0, 2, 0] = -INF
    elif case == "all_ninf":
        x[0, 1] = -INF
    elif case == "ninf_target":
        x[0, 1, rows.target(1)] = -INF
    elif case == "ignored":
        rows.set_target(1, -100)
        x[0, 1] = NAN  # an ignored row is not read: 0 whatever it holds
        rows.set_target(3, -100)
    elif case == "extremes":
        x[0, 1, 2], x[0, 1, 5] = 1e4, -1e4
        x[0, 2, rows.target(2)] = 1e4
        x[0, 3, rows.target(3)] = -1e4
        x[0, 0] = torch.where(torch.arange(V) % 2 == 0, 1e4, -1e4)
    elif case == "mixed_V300":  # several cases in one long row set: vector blocks and a tail
        x[0, 3, 250] = NAN
        x[0, 1, 7] = INF
        x[0, 2, rows.target(2)] = -INF
        x[0, 3, ::3] = -INF
        x[0, 0, 299] = 1e4
    return x, rows.targets, -100


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", LOGIT_OPTIONS)
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logits_path(backend, opts, case):
    x, targets, ignore = logit_case(case, opts["shift"])
    kw = dict(softcap=opts["softcap"], temperature=opts["temperature"], shift=opts["shift"],
              ignore_index=ignore)
    dev = backend_device(backend)
    got = pplfast.token_nll(x.to(dev), targets.to(dev), backend=backend, **kw)
    want = reference.token_nll(x, targets, **kw)
    lse = row_lse(x, softcap=opts["softcap"], temperature=opts["temperature"], shift=opts["shift"])
    scored = (targets[:, 1:] if opts["shift"] else targets) != ignore
    check(got, want, lse, scored, f"token_nll[{backend}, {case}, {kw}]")


# ---- hidden-states path -------------------------------------------------------------------
#
# A special value reaches logit column j through the bias (bias[j] = value) where the options have
# one, else through the weight (weight[j] = 0 except weight[j, 0] = value, with hidden[..., 0] = 1,
# so that z[:, j] = value exactly); or through one hidden row.

HIDDEN_CASES = ["nan_col", "nan_hidden", "pinf_col", "pinf_target_col", "ninf_cols",
                "all_ninf", "ninf_target_col", "ignored", "extremes"]


def hidden_case(case, via, shift, with_bias):
    hidden = torch.randn(1, T, D)
    hidden[..., 0] = 1.0
    weight = torch.randn(V, D) * (2.0 / D**0.5)
    weight[:, 0] = 0.0  # column 0 of the hidden states only carries injected values
    bias = torch.randn(V) if with_bias else None
    rows = Rows(fresh_targets(), shift)

    def column(j, value):
        if via == "bias":
            bias[j] = value
        else:
            weight[j] = 0.0
            weight[j, 0] = value

    if case == "nan_col":
        column(3, NAN)
    elif case == "nan_hidden":
        hidden[0, 1, 5] = NAN
    elif case == "pinf_col":
        column(3, INF)
    elif case == "pinf_target_col":
        j = rows.target(1)
        column(j, INF)  # row 1: inf - inf = NaN; the others: +inf
        for r in range(T - rows.shift):
            if r != 1 and rows.target(r) == j:
                rows.set_target(r, V - 1 if j != V - 1 else V - 2)
    elif case == "ninf_cols":
        for j in range(0, V // 2, 3):
            column(j, -INF)
    elif case == "all_ninf":
        for j in range(V):
            column(j, -INF)
    elif case == "ninf_target_col":
        column(rows.target(2), -INF)
    elif case == "ignored":
        rows.set_target(1, -100)
        hidden[0, 1] = NAN
        rows.set_target(3, -100)
    elif case == "extremes":
        column(2, 1e4)
        column(5, -1e4)
        column(rows.target(2), 1e4)
    return hidden, weight, bias, rows.targets, -100


def hidden_params():
    """(options, case, via) for every option set and case: columns through the bias where the
    options have one, through the weight where they have none."""
    out = []
    for opt_param in HIDDEN_OPTIONS:
        (opts,) = opt_param.values
        for case in HIDDEN_CASES:
            if case in ("nan_hidden", "ignored"):
                via = "hidden"
            else:
                via = "bias" if opts["bias"] else "weight"
            out.append(pytest.param(opts, case, via, id=f"{opt_param.id}-{case}-via_{via}"))
    return out


def run_hidden_case(backend, opts, case, via, dtype=torch.float32):
    hidden, weight, bias, targets, ignore = hidden_case(case, via, opts["shift"], opts["bias"])
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    kw = dict(softcap=opts["softcap"], temperature=opts["temperature"], shift=opts["shift"],
              ignore_index=ignore)
    dev = backend_device(backend)
    got = pplfast.linear_token_nll(hidden.to(dev), weight.to(dev), targets.to(dev),
                                   bias=None if bias is None else bias.to(dev), backend=backend,
                                   **kw)
    # the reference on the same (rounded) inputs
    want = reference.linear_token_nll(hidden, weight, targets, bias=bias, **kw)
    z = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    lse = row_lse(z, softcap=opts["softcap"], temperature=opts["temperature"], shift=opts["shift"])
    scored = (targets[:, 1:] if opts["shift"] else targets) != ignore
    check(got, want, lse, scored,
          f"linear_token_nll[{backend}, {dtype}, {case} via {via}, {kw}]")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts,case,via", hidden_params())
def test_hidden_path(backend, opts, case, via):
    run_hidden_case(backend, opts, case, via)


def spy_fused_nll(monkeypatch) -> list:
    """The dtypes of the hidden states each call of the fused Triton NLL kernel received."""
    from pplfast import _triton

    fused = _triton.linear_token_nll_forward
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return fused(*args, **kwargs)

    monkeypatch.setattr(_triton, "linear_token_nll_forward", spy)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("opts,case,via", hidden_params())
def test_hidden_path_fused_triton(opts, case, via, monkeypatch):
    """The same matrix through the fused Triton kernel. backend="triton" sends float32 hidden
    states without TF32 to the chunked path (what ``test_hidden_path`` exercises), so these run
    in float16, which always takes the fused kernel: products exact in float32, only the
    accumulation rounds, so the bound is the same. A spy proves the fused kernel ran."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused kernel needs CUDA capability >= 8.0")
    calls = spy_fused_nll(monkeypatch)
    run_hidden_case("triton", opts, case, via, dtype=torch.float16)
    assert calls == [torch.float16], f"fused kernel calls: {calls}"


# ---- confident tokens: the NLL is ~0 and never negative -----------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIDENT_OPTIONS = [
    pytest.param(dict(softcap=None, temperature=1.0), id="plain"),
    pytest.param(dict(softcap=None, temperature=0.7), id="t0.7"),
    pytest.param(dict(softcap=None, temperature=1.3), id="t1.3"),
    pytest.param(dict(softcap=30.0, temperature=1.0), id="cap30"),
    pytest.param(dict(softcap=30.0, temperature=0.7), id="cap30-t0.7"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", CONFIDENT_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
def test_confident_tokens_never_negative_logits(backend, opts, dtype, shift):
    width = 64
    x = torch.randn(1, T, width)
    targets = torch.randint(0, width, (1, T))
    lead = targets[:, 1:] if shift else targets
    # the target logit far above the rest, at magnitudes where rounding is coarse; the last
    # scored row lies far below zero (-50 over a row around -100)
    tops = [40.0, 100.0, 1e4, 1e3, -50.0]
    rows = T - int(shift)
    for r in range(rows):
        if r == rows - 1:
            x[0, r] -= 100.0
        x[0, r, lead[0, r]] = tops[r] if r < rows - 1 else -50.0
    x = x.to(dtype)
    dev = backend_device(backend)
    got = pplfast.token_nll(x.to(dev), targets.to(dev), backend=backend, shift=shift, **opts)
    want = reference.token_nll(x, targets, shift=shift, **opts)
    lse = row_lse(x, shift=shift, **opts)
    check(got, want, lse, torch.ones_like(want, dtype=torch.bool),
          f"token_nll[{backend}, {dtype}, {opts}, shift={shift}]")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", CONFIDENT_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_confident_tokens_never_negative_hidden(backend, opts, dtype, with_bias):
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 tl.dot is wrong in Triton's interpreter (docs/architecture.md \"Tests\")")
    N = 8
    hidden = torch.randn(N, D)
    hidden[:, 0] = 1.0
    weight = torch.randn(V, D) * (2.0 / D**0.5)
    weight[:, 0] = 0.0
    targets = torch.full((N,), 7)
    bias = torch.randn(V) if with_bias else None
    if with_bias:
        bias[7] = 48.0
    else:
        weight[7, 0] = 48.0  # exact in every dtype: z[:, 7] = 48 + O(1)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    dev = backend_device(backend)
    got = pplfast.linear_token_nll(hidden.to(dev), weight.to(dev), targets.to(dev),
                                   bias=None if bias is None else bias.to(dev), backend=backend,
                                   **opts).cpu()
    assert not bool((got < 0).any()), f"negative NLL {got.tolist()}"
    want = reference.linear_token_nll(hidden, weight, targets, bias=bias, **opts)
    # the reference on the same (rounded) inputs, within the documented per-token bound
    # 2e-6 * max(1, |lse|): the true NLL is ~e^-40, but the log-sum-exp (~48) and the target
    # logit may come from two fp32 dot products summed in different orders (the fused kernel)
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    lse = reference._transform(z, opts.get("softcap"), opts.get("temperature", 1.0)).logsumexp(-1)
    assert_nll_close(got, want, lse,
                     what=f"linear_token_nll[{backend}, {dtype}, {opts}]")


# ---- logits near FLT_MAX ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logits_near_float_max(backend, temperature):
    """Rows of logits around 2.5e38, finite NLL (about log V). A kernel that keeps its running
    max as max * log2(e) (the CUDA kernel did) overflows to +inf there and returns +inf; one that
    divides the logits by the temperature first overflows below temperature 1 (inf - inf = NaN).
    The state must stay in the logits' own units."""
    x = torch.full((1, 3, V), 2.5e38)
    x[0, 0, 5] = 3.0e38
    x[0, 1, ::2] = 1.0e38
    x[0, 2, 7] = -3.0e38
    targets = torch.tensor([[5, 1, 4]])
    dev = backend_device(backend)
    got = pplfast.token_nll(x.to(dev), targets.to(dev), backend=backend, temperature=temperature)
    want = reference.token_nll(x, targets, temperature=temperature)
    assert bool(torch.isfinite(want).all())
    check_extreme(got, want, x, dict(softcap=None, temperature=temperature),
                  f"token_nll[{backend}, near FLT_MAX, t={temperature}]")


# ---- the top of the float32 range -----------------------------------------------------------

EXTREME_SHAPES = [pytest.param(3, torch.float32, id="V3-fp32"),
                  pytest.param(300, torch.float32, id="V300-fp32"),
                  pytest.param(37, torch.bfloat16, id="V37-bf16")]


def extreme_logits(V, dtype, shift):
    """``helpers.float32_extreme_rows`` as a (1, rows, V) batch; with ``shift`` one more
    (ordinary) position, and the targets moved one place on."""
    x, t = float32_extreme_rows(V, dtype)
    if not shift:
        return x.unsqueeze(0), t.unsqueeze(0)
    x = torch.cat([x, torch.randn(1, V).to(dtype)])
    t = torch.cat([torch.zeros(1, dtype=t.dtype), t])
    return x.unsqueeze(0), t.unsqueeze(0)


def check_extreme(got, want, rows, opts, what):
    """``got`` (float32) against the float64 ``want`` rounded to float32 (a value beyond FLT_MAX
    is +inf there), within the bound of ``helpers.extreme_scale``; never negative."""
    want = want.float().double()
    scale = extreme_scale(rows, want, softcap=opts["softcap"], temperature=opts["temperature"])
    assert_nll_close(got.cpu(), want, scale, what=what)
    assert not bool((got.cpu() < 0).any()), f"{what}: negative NLL {got.cpu().tolist()}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params(shift_too=True))
@pytest.mark.parametrize("V,dtype", EXTREME_SHAPES)
def test_logits_path_float32_extremes(backend, opts, V, dtype):
    """[3e38, 3e38, -1] at temperature 0.5 gave NaN on the CPU backend (3e38 / 0.5 = +inf, then
    inf - inf), and the reference 0 at every temperature; the true NLL is log 2."""
    shift = opts.get("shift", False)
    x, targets = extreme_logits(V, dtype, shift)
    dev = backend_device(backend)
    got = pplfast.token_nll(x.to(dev), targets.to(dev), backend=backend, **opts)
    want = reference.token_nll(x, targets, **opts)
    check_extreme(got, want, x[:, :-1] if shift else x, opts,
                  f"token_nll[{backend}, {dtype}, V={V}, {opts}]")
    if not shift and opts["softcap"] is None and opts["temperature"] <= 3:
        assert abs(got[0, 0].item() - 0.6931472) < 1e-6, got[0, 0]  # two tied maxima alone


def extreme_hidden(case, shift, dtype=torch.float32):
    """(hidden (1, 6[+1], D), weight (V, D), bias (V,), targets) whose logits carry the case's
    extremes through the bias (``helpers.extreme_bias``)."""
    rows = 6 + int(shift)
    hidden = torch.randn(1, rows, D)
    weight = torch.randn(V, D) * (2.0 / D**0.5)
    targets = torch.tensor([[0, 1, 2, 3, V - 1, V - 2, 5][:rows]])
    return hidden.to(dtype), weight.to(dtype), extreme_bias(case, V, dtype), targets


def run_hidden_extreme(backend, opts, case, dtype=torch.float32):
    shift = opts.get("shift", False)
    hidden, weight, bias, targets = extreme_hidden(case, shift, dtype)
    dev = backend_device(backend)
    got = pplfast.linear_token_nll(hidden.to(dev), weight.to(dev), targets.to(dev),
                                   bias=bias.to(dev), backend=backend, **opts)
    want = reference.linear_token_nll(hidden, weight, targets, bias=bias, **opts)
    z = F.linear(hidden.double(), weight.double(), bias.double())
    check_extreme(got, want, z[:, :-1] if shift else z, opts,
                  f"linear_token_nll[{backend}, {dtype}, {case}, {opts}]")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opts", extreme_option_params(shift_too=True))
@pytest.mark.parametrize("case", EXTREME_BIASES)
def test_hidden_path_float32_extremes(backend, opts, case):
    run_hidden_extreme(backend, opts, case)


@pytest.mark.interpreter
@pytest.mark.parametrize("opts", extreme_option_params())
@pytest.mark.parametrize("case", EXTREME_BIASES)
def test_hidden_path_float32_extremes_fused_triton(opts, case, monkeypatch):
    """The same through the fused Triton kernel (float32 hidden states take the chunked path
    unless TF32 is allowed): float32 with TF32 allowed under the interpreter, whose dots are
    exact float32; bfloat16 on a GPU (TF32 products would widen the error of the ordinary
    logits). A spy proves the fused kernel ran."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fused kernel needs CUDA capability >= 8.0")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    if not HAS_CUDA:
        monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1")
    calls = spy_fused_nll(monkeypatch)
    run_hidden_extreme("triton", opts, case, dtype=dtype)
    assert calls == [dtype], f"fused kernel calls: {calls}"

