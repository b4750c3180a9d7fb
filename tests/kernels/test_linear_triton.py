"""Fused Triton linear_token_nll kernel: under TRITON_INTERPRET=1 on CPU tensors (set by conftest
when there is no GPU) with tiny shapes and fp32/fp16 operands, compiled on a GPU otherwise."""
from __future__ import annotations

import pytest
import torch

import pplfast
from pplfast import _chunked, reference
from helpers import LSE_RTOL, assert_nll_close, hidden_rows_past_2_pow_31, row_lse

pytest.importorskip("triton")
from pplfast import _triton  # noqa: E402
from pplfast.kernels import _plan  # noqa: E402
from pplfast.kernels import linear_token_nll as kernel  # noqa: E402

pytestmark = [
    pytest.mark.interpreter,
    # the interpreter evaluates exp2/products of +-inf with numpy, which warns where the GPU is silent
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One small tile (BLOCK_V = 32) on both, so that the split tests' small vocabularies really split
# into several ranges on a GPU too; the tuned configurations run in the GPU-only tests.
CONFIG = (16, 32, 32, 1, 1) if DEVICE == "cpu" else (32, 32, 32, 4, 2)
SM_COUNT = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else None


def fused(hidden, weight, bias, targets, softcap=None, temperature=1.0, **kw):
    """The fused launcher with the test configuration (and the SM count on a GPU)."""
    kw.setdefault("config", CONFIG)
    return kernel.linear_token_nll_forward(hidden, weight, bias, targets, -100, softcap,
                                           temperature, sm_count=SM_COUNT, **kw)


def make_inputs(N, D, V, dtype, *, bias=False, ignore_every=0):
    hidden = torch.randn(N, D).to(dtype)
    weight = (torch.randn(V, D) * (2.0 / D**0.5)).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,))
    if ignore_every:
        targets[::ignore_every] = -100
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(hidden), to(weight), to(b), to(targets)


def check(out, hidden, weight, bias, targets, *, softcap=None, temperature=1.0, rtol=LSE_RTOL):
    expected = reference.linear_token_nll(hidden, weight, targets, bias=bias, softcap=softcap,
                                          temperature=temperature).cpu()
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    assert_nll_close(out, expected, row_lse(z.cpu(), softcap=softcap, temperature=temperature),
                     rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "N,D,V,splits",
    [(37, 123, 507, None), (37, 64, 507, 3), (20, 40, 300, 1), (3, 32, 1, None)],
    ids=["N37-D123-V507", "N37-D64-V507-split3", "N20-D40-V300-split1", "N3-D32-V1"],
)
def test_fused_matches_reference(N, D, V, splits, dtype):
    hidden, weight, _, targets = make_inputs(N, D, V, dtype, ignore_every=6)
    out = fused(hidden, weight, None, targets, splits=splits)
    check(out, hidden, weight, None, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "softcap,temperature", [(30.0, 1.0), (2.0, 0.6), (None, 1.7)], ids=["sc30", "sc2-t0.6", "t1.7"]
)
def test_fused_bias_softcap_temperature(dtype, softcap, temperature):
    hidden, weight, b, targets = make_inputs(21, 48, 200, dtype, bias=True)
    out = fused(hidden, weight, b, targets, softcap, temperature, splits=2)
    check(out, hidden, weight, b, targets, softcap=softcap, temperature=temperature)


def test_fused_small_arguments_of_softcap_tanh():
    # logits far below the cap: tanh near 0, where 1 - exp(-2|x|) would lose digits
    hidden, weight, _, targets = make_inputs(16, 32, 64, torch.float32)
    out = fused(hidden, weight, None, targets, 500.0)
    check(out, hidden, weight, None, targets, softcap=500.0)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_fused_ignored_rows_nan_and_all_ignored():
    hidden, weight, _, targets = make_inputs(24, 32, 100, torch.float32)
    targets[5:11] = -100
    hidden[6] = float("nan")  # ignored: stays 0
    hidden[15] = float("nan")  # scored: NaN there only
    out = fused(hidden, weight, None, targets, splits=2)
    assert (out[5:11] == 0).all() and torch.isnan(out[15])
    keep = torch.ones(24, dtype=torch.bool, device=DEVICE)
    keep[15] = False
    check(out[keep], hidden[keep], weight, None, targets[keep])

    targets[:] = -100
    out = fused(hidden, weight, None, targets)
    assert out.dtype == torch.float32 and (out == 0).all()


def test_fused_large_magnitudes_and_strided_hidden():
    hidden, weight, _, targets = make_inputs(18, 64, 120, torch.float32)
    bias = torch.zeros(120, device=DEVICE)
    bias[::7] = 1e4
    bias[3] = -1e4
    targets[0] = 3
    wide = torch.randn(18, 96, device=DEVICE)
    wide[:, 16:80] = hidden
    strided = wide[:, 16:80]  # row stride 96
    out = fused(strided, weight, bias, targets, splits=2)
    check(out, hidden, weight, bias, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_api_triton_backend_with_shift(dtype):
    # float32 (no TF32) through the chunked path, float16 through the fused kernel
    hidden, weight, _, _ = make_inputs(2 * 13, 32, 150, dtype)
    hidden = hidden.view(2, 13, 32)
    ids = torch.randint(0, 150, (2, 13), device=DEVICE)
    nll = pplfast.linear_token_nll(hidden, weight, ids, shift=True, backend="triton")
    expected = reference.linear_token_nll(hidden, weight, ids, shift=True).cpu()
    z = hidden.double() @ weight.double().T
    assert_nll_close(nll, expected, row_lse(z.cpu(), shift=True))
    ppl = pplfast.linear_perplexity(hidden, weight, ids, shift=True, backend="triton")
    assert torch.allclose(ppl.double().cpu(), torch.exp(expected.mean()), rtol=1e-5)


# ---- special values and the sign of the NLL (white-box: the fused kernel itself) -------------


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_plus_inf_logit(dtype, splits):
    # a +inf logit in every row (through the bias): lse = +inf, so NLL = +inf, or NaN where the
    # target is that logit (inf - inf); a running max of +inf used as the exp shift gave NaN for
    # every row of the tile
    hidden, weight, b, _ = make_inputs(4, 32, 64, dtype, bias=True)
    b[3] = float("inf")
    targets = torch.tensor([1, 5, 3, 9], device=DEVICE)
    out = fused(hidden, weight, b, targets, splits=splits)
    expected = reference.linear_token_nll(hidden, weight, targets, bias=b)
    assert torch.equal(expected.isnan().cpu(), torch.tensor([False, False, True, False]))
    check(out, hidden, weight, b, targets)
    # with the cap +inf becomes +softcap: all finite again
    out = fused(hidden, weight, b, targets, 3.0, 0.5, splits=splits)
    check(out, hidden, weight, b, targets, softcap=3.0, temperature=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_minus_inf_and_nan_logits(dtype):
    hidden, weight, b, targets = make_inputs(6, 32, 64, dtype, bias=True)
    b[10:20] = -float("inf")  # -inf entries add nothing
    targets[1] = 12           # target at -inf: +inf
    hidden[4] = float("nan")  # NaN in row 4 only
    out = fused(hidden, weight, b, targets, splits=2)
    assert out[1].item() == float("inf") and torch.isnan(out[4])
    assert int(torch.isnan(out).sum()) == 1
    check(out, hidden, weight, b, targets)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_confident_tokens_never_negative(temperature):
    # target logits near 1e3-1e4 above the rest: the true NLL is ~0, and the tile's dot and the
    # finish kernel's blocked dot round the two large terms differently
    hidden, weight, _, targets = make_inputs(48, 64, 96, torch.float32)
    hidden = hidden * 40.0
    weight[targets] = hidden * (torch.rand(48, 1, device=DEVICE) * 4 + 1) / 64.0
    out = fused(hidden, weight, None, targets, temperature=temperature, splits=2)
    assert bool((out >= 0).all()), out.min()
    check(out, hidden, weight, None, targets, temperature=temperature)


def test_finish_merges_many_splits():
    # 40 vocabulary ranges: more than one tile of partials per row in the finish kernel
    hidden, weight, b, targets = make_inputs(5, 16, 40 * 32, torch.float32, bias=True)
    b[::97] = 8.0  # maxima in several ranges, so the merge rescales
    out = fused(hidden, weight, b, targets, splits=40)
    check(out, hidden, weight, b, targets)
    assert _plan.split_columns(40 * 32, 40, CONFIG[1]) == (40, 32)


def test_splits_and_configs():
    # H100 (132 SMs), 128x256 tiles: 8192 tokens are 64 blocks, so 17 vocabulary splits make
    # about 8 waves; a million tokens need none; 5 tokens split as far as the tiles allow, but
    # never past 2 x SM count
    assert _plan.choose_splits(8192, 131072, 128, 256, 132) == 17
    assert _plan.choose_splits(1 << 20, 131072, 128, 256, 132) == 1
    assert _plan.choose_splits(5, 1000, 128, 256, 132) == 4
    assert _plan.choose_splits(5, 262144, 128, 256, 132) == 264
    assert kernel.config_for(None, torch.float32) == (16, 32, 32, 1, 1)
    # the pipelined operand tiles fit in shared memory per block (sm_80 163 KiB, sm_86/89
    # 99 KiB, sm_90 227 KiB); the compile test checks what the compiler really allocates
    for capability, limit_kib in {(8, 0): 163, (8, 6): 99, (8, 9): 99, (9, 0): 227}.items():
        for dtype in (torch.float16, torch.float32):
            bn, bv, bd, warps, stages = kernel.config_for(capability, dtype)
            assert (bn + bv) * bd * (4 if dtype == torch.float32 else 2) * (stages - 1) <= (
                limit_kib << 10)
            assert _plan.FUSED_SPLIT_ALIGN % bv == 0
    for bn, bv, bd, warps, stages in kernel._AUTOTUNE_SPACE:
        assert _plan.FUSED_SPLIT_ALIGN % bv == 0 and 64 % bd == 0


@pytest.mark.cuda
def test_fused_tf32_confident_tokens_within_the_documented_bound():
    # TF32 tile products against an IEEE target dot: without the clamp confident tokens came out
    # near -1e-3 * |z|; the error stays within 2^-8 * max_v sum_d |h_d w_vd| (module notes)
    hidden, weight, _, targets = make_inputs(256, 512, 4000, torch.float32)
    hidden = hidden * 4.0
    weight[targets] = hidden / 64.0
    out = fused(hidden, weight, None, targets, config=None, allow_tf32=True)
    assert bool((out >= 0).all()), out.min()
    want = reference.linear_token_nll(hidden, weight, targets)
    bound = (hidden.double().abs() @ weight.double().abs().T).amax(1) * 2.0**-8
    assert_nll_close(out, want, atol=bound.cpu())


# ---- the backend's routing (pplfast._triton) -------------------------------------------------


@pytest.mark.parametrize("dtype,tf32,path", [
    (torch.float32, False, "chunked"), (torch.float32, True, "fused"),
    (torch.float16, False, "fused"), (torch.bfloat16, False, "fused"),
])
def test_backend_routing(dtype, tf32, path, monkeypatch):
    calls = []
    monkeypatch.setattr(_triton, "linear_token_nll_forward",
                        lambda *a, **kw: calls.append(("fused", kw["allow_tf32"])))
    monkeypatch.setattr(_triton, "chunked_linear_token_nll",
                        lambda *a, **kw: calls.append(("chunked", None)))
    monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1" if tf32 else "0")
    hidden = torch.zeros(3, 8, dtype=dtype, device=DEVICE)
    _triton.linear_token_nll(hidden, torch.zeros(5, 8, dtype=dtype, device=DEVICE), None,
                             torch.zeros(3, dtype=torch.long, device=DEVICE), -100, None, 1.0)
    assert calls == [(path, tf32 if path == "fused" else None)]


def test_launcher_trusts_the_callers_scored_rows(monkeypatch):
    # the scored rows are counted once per call (pplfast._ops); with every row scored the backend
    # says so, and the launcher must not search again (a second host sync on a GPU)
    calls = []
    find = _plan.scored_rows  # the fused launchers' shared row search
    monkeypatch.setattr(_plan, "scored_rows", lambda *a: calls.append(a) or find(*a))
    hidden, weight, _, targets = make_inputs(9, 32, 40, torch.float16)
    out = pplfast.linear_token_nll(hidden, weight, targets, backend="triton")
    assert calls == []
    check(out, hidden, weight, None, targets)
    # called without rows, the launcher finds them itself
    targets[2] = -100
    out = fused(hidden, weight, None, targets)
    assert len(calls) == 1 and out[2] == 0
    check(out, hidden, weight, None, targets)
    with pytest.raises(ValueError, match="all_scored"):
        fused(hidden, weight, None, targets, rows=torch.arange(3, device=DEVICE), all_scored=True)


@pytest.mark.cuda
def test_fused_gpu_real_vocabulary_fp32():
    # fp16/bf16 on GPU: the three-way rule in test_linear_token_nll.py
    hidden, weight, b, targets = make_inputs(300, 256, 128256, torch.float32, bias=True,
                                             ignore_every=11)
    out = fused(hidden, weight, b, targets, config=None)
    check(out, hidden, weight, b, targets, rtol=4 * LSE_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_chunked_fallback_with_triton_logits_kernel(dtype, monkeypatch):
    # GPUs the fused kernel does not cover: chunked GEMM + the fused logits reduction
    monkeypatch.setattr(_triton, "fused_supported", lambda hidden2, allow_tf32: False)
    hidden, weight, b, targets = make_inputs(30, 40, 257, dtype, bias=True, ignore_every=4)
    monkeypatch.setenv("PPLFAST_GPU_CHUNK_MB", str(7 * 257 * 2 / 2**20))  # 7 rows per chunk
    out = _triton.linear_token_nll(hidden, weight, b, targets, -100, 4.0, 1.0)
    if dtype == torch.float32 or (DEVICE == "cuda" and _chunked.fp32_out_gemm_available()):
        # float32 logits: float32 inputs, or fp16 through CUDA's fp32-output GEMM
        check(out, hidden, weight, b, targets, softcap=4.0)
    else:
        # the CPU refuses the fp32-output GEMM: logits in the input dtype, as F.linear gives them
        logits = torch.nn.functional.linear(hidden, weight, b).float()
        expected = reference.token_nll(logits, targets, softcap=4.0).cpu()
        assert_nll_close(out, expected, row_lse(logits.cpu(), softcap=4.0))


# ---- GPU only: devices and 64-bit offsets (twins of tests/kernels/test_cuda.py) ----------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_tensors_on_another_device(dtype, monkeypatch):
    # tensors on the last GPU while device 0 is current (one GPU: the guard is still taken)
    monkeypatch.setenv("PPLFAST_ALLOW_TF32", "1")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    hidden = torch.randn(70, 128, device=device).to(dtype)
    weight = (torch.randn(5003, 128, device=device) / 8).to(dtype)
    targets = torch.randint(0, 5003, (70,), device=device)
    with torch.cuda.device(0):
        got = pplfast.linear_token_nll(hidden, weight, targets, backend="triton")
        assert torch.cuda.current_device() == 0
    assert got.device == device
    want = reference.linear_token_nll(hidden, weight, targets)
    z = hidden.double() @ weight.double().T
    # TF32 / bf16 products: the bound of the module notes, 2^-8 * max_v sum_d |h_d w_vd|
    bound = (hidden.double().abs() @ weight.double().abs().T).amax(1) * 2.0**-8
    assert_nll_close(got, want, atol=bound.cpu() + LSE_RTOL * row_lse(z.cpu()).abs())


@pytest.mark.cuda
def test_gpu_rows_times_dim_past_2_pow_31():
    # hidden rows x D > 2^31 elements (4.3 GB in bf16): row offsets must be 64-bit
    hidden, weight, targets = hidden_rows_past_2_pow_31()
    N = hidden.shape[0]
    got = fused(hidden, weight, None, targets, config=None)
    for rows in (slice(N - 200, N), slice(0, 50)):
        want = reference.linear_token_nll(hidden[rows], weight, targets[rows])
        assert_nll_close(got[rows], want, row_lse((hidden[rows].double() @ weight.double().T)
                                                  .cpu()), rtol=4 * LSE_RTOL)
