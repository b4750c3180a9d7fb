"""linear_token_nll / linear_perplexity: CPU path (and GPU when present) against the float64
reference, torch's linear_cross_entropy and a tiny Hugging Face causal LM; bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pplfast
from pplfast import _chunked, _cpu, _env, reference
from helpers import LSE_RTOL, assert_nll_close, row_lse

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(N, D, V, dtype, device="cpu", *, bias=False, lead=None, ignore_every=0):
    """Hidden states and weight scaled so the logits have unit-order spread, like a trained head."""
    hidden = torch.randn(*(lead or (N,)), D, device=device).to(dtype)
    weight = (torch.randn(V, D, device=device) * (2.0 / D**0.5)).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    targets = torch.randint(0, V, hidden.shape[:-1], device=device)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return hidden, weight, b, targets


def exact_logits(hidden, weight, bias):
    z = hidden.double() @ weight.double().T
    return z if bias is None else z + bias.double()


def check_against_reference(out, hidden, weight, bias, targets, *, softcap=None, temperature=1.0,
                            shift=False, rtol=LSE_RTOL):
    expected = reference.linear_token_nll(hidden, weight, targets, bias=bias, softcap=softcap,
                                          temperature=temperature, shift=shift)
    lse = row_lse(exact_logits(hidden, weight, bias), softcap=softcap, temperature=temperature,
                  shift=shift)
    assert_nll_close(out, expected, lse, rtol=rtol)


SHAPES = [
    pytest.param(63, 123, 507, id="N63-D123-V507"),
    pytest.param(17, 64, 50257, id="N17-D64-V50257"),
    pytest.param(1, 8, 1, id="N1-D8-V1"),
    pytest.param(300, 32, 4099, id="N300-D32-V4099"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,V", SHAPES)
def test_cpu_matches_reference(N, D, V, dtype):
    # the CPU path multiplies fp16/bf16 operands in float32 (exact products), so every dtype
    # meets the logits-path bound against the float64 reference of the same inputs
    hidden, weight, _, targets = make_inputs(N, D, V, dtype, ignore_every=7)
    out = pplfast.linear_token_nll(hidden, weight, targets, backend="cpu")
    check_against_reference(out, hidden, weight, None, targets)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "softcap,temperature,bias",
    [(None, 1.0, True), (30.0, 1.0, False), (2.0, 0.6, True), (None, 1.7, False)],
    ids=["bias", "softcap30", "softcap2-t0.6-bias", "t1.7"],
)
def test_cpu_options(dtype, softcap, temperature, bias):
    hidden, weight, b, targets = make_inputs(45, 123, 507, dtype, bias=bias)
    out = pplfast.linear_token_nll(hidden, weight, targets, bias=b, softcap=softcap,
                                   temperature=temperature, backend="cpu")
    check_against_reference(out, hidden, weight, b, targets, softcap=softcap,
                            temperature=temperature)


def test_cpu_fp32_bias_on_half_inputs():
    hidden, weight, _, targets = make_inputs(20, 40, 507, torch.bfloat16)
    bias = torch.randn(507)
    out = pplfast.linear_token_nll(hidden, weight, targets, bias=bias, backend="cpu")
    check_against_reference(out, hidden, weight, bias, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_shift_batched_and_perplexity(dtype):
    hidden, weight, _, ids = make_inputs(0, 123, 507, dtype, lead=(3, 21))
    ids[1, 15:] = -100  # padding
    out = pplfast.linear_token_nll(hidden, weight, ids, shift=True, backend="cpu")
    assert out.shape == (3, 20)
    check_against_reference(out, hidden, weight, None, ids, shift=True)
    ppl = pplfast.linear_perplexity(hidden, weight, ids, shift=True, backend="cpu")
    expected = reference.linear_token_nll(hidden, weight, ids, shift=True)
    count = (ids[:, 1:] != -100).sum()
    assert torch.allclose(ppl.double(), torch.exp(expected.sum() / count), rtol=1e-5)


def test_cpu_ignored_and_all_ignored_rows():
    hidden, weight, _, targets = make_inputs(30, 64, 507, torch.float32)
    targets[3:9] = -100
    hidden[4] = float("nan")  # an ignored row's NaN must not leak
    hidden[12] = float("nan")  # a scored row's NaN gives NaN there only
    out = pplfast.linear_token_nll(hidden, weight, targets, backend="cpu")
    assert (out[3:9] == 0).all()
    assert torch.isnan(out[12])
    keep = torch.ones(30, dtype=torch.bool)
    keep[12] = False
    check_against_reference(out[keep], hidden[keep], weight, None, targets[keep])

    targets[:] = -100
    out = pplfast.linear_token_nll(hidden, weight, targets, backend="cpu")
    assert out.dtype == torch.float32 and (out == 0).all()
    assert torch.isnan(pplfast.linear_perplexity(hidden, weight, targets, backend="cpu"))


def test_cpu_empty_and_custom_ignore_index():
    hidden, weight, _, _ = make_inputs(0, 16, 50, torch.float32)
    out = pplfast.linear_token_nll(hidden, weight, torch.zeros(0, dtype=torch.long), backend="cpu")
    assert out.shape == (0,) and out.dtype == torch.float32
    hidden, weight, _, targets = make_inputs(10, 16, 50, torch.float32)
    targets[::3] = 7
    out = pplfast.linear_token_nll(hidden, weight, targets.int(), ignore_index=7, backend="cpu")
    expected = reference.linear_token_nll(hidden, weight, targets, ignore_index=7)
    assert (out[::3] == 0).all()
    assert_nll_close(out, expected, row_lse(exact_logits(hidden, weight, None)))


def test_cpu_large_magnitudes():
    hidden, weight, _, targets = make_inputs(16, 32, 507, torch.float32)
    bias = torch.zeros(507)
    bias[::11] = 1e4
    bias[5] = -1e4
    targets[0] = 5  # target logit far below the max
    out = pplfast.linear_token_nll(hidden, weight, targets, bias=bias, backend="cpu")
    check_against_reference(out, hidden, weight, bias, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("budget_kib", [6, 40, 300])
def test_cpu_tiny_budgets_tile_tokens_and_vocabulary(dtype, budget_kib, monkeypatch):
    monkeypatch.setenv(_env.CPU_CHUNK_MB, str(budget_kib / 1024))
    hidden, weight, b, targets = make_inputs(70, 40, 2053, dtype, bias=True, ignore_every=4)
    rows, cols = _cpu.cpu_tile_sizes(70, 2053, 40, upcast=dtype != torch.float32,
                                     gather_bytes=hidden.element_size(),
                                     budget=budget_kib << 10)
    assert rows < 70 or cols < 2053
    out = pplfast.linear_token_nll(hidden, weight, targets, bias=b, softcap=5.0, backend="cpu")
    check_against_reference(out, hidden, weight, b, targets, softcap=5.0)


@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("N,V,D", [(4096, 128256, 1024), (7, 507, 123), (100000, 256000, 8192)])
def test_cpu_tile_sizes_fit_budget(N, V, D, upcast):
    for budget in (1 << 20, 32 << 20, 256 << 20):
        rows, cols = _cpu.cpu_tile_sizes(N, V, D, upcast=upcast, gather_bytes=2, budget=budget)
        assert 1 <= rows <= N and 1 <= cols <= V
        cost = 4 * rows * cols + (4 * (rows + cols) * D if upcast else 0) + 2 * rows * D
        assert cost <= budget, (rows, cols, cost, budget)


def test_bad_budget_env(monkeypatch):
    monkeypatch.setenv(_env.CPU_CHUNK_MB, "lots")
    hidden, weight, _, targets = make_inputs(4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="PPLFAST_CPU_CHUNK_MB"):
        pplfast.linear_token_nll(hidden, weight, targets, backend="cpu")
    monkeypatch.setenv(_env.CPU_CHUNK_MB, "-1")
    with pytest.raises(ValueError, match="PPLFAST_CPU_CHUNK_MB must be > 0 MiB, got -1.0"):
        pplfast.linear_token_nll(hidden, weight, targets, backend="cpu")
    with pytest.raises(ValueError, match="budget_mb must be > 0 MiB, got 0"):
        _cpu.linear_token_nll(hidden, weight, None, targets, -100, None, 1.0, budget_mb=0)


# ---- the chunked GPU path (_chunked.chunked_linear_token_nll), on CPU tensors ----------------
# It is device-agnostic: here the logits launcher is the native CPU one or the float64
# reference. The CPU refuses torch.mm(..., out_dtype=torch.float32), so fp16/bf16 take the
# input-dtype fallback unless a test stands in an fp32-output GEMM.


def recording(launcher, calls):
    """``launcher`` that also records (logits dtype, rows) of every chunk it reduces."""

    def launch(logits3, targets, ignore_index, softcap, temperature):
        calls.append((logits3.dtype, logits3.shape[1]))
        return launcher(logits3, targets, ignore_index, softcap, temperature)

    return launch


def reference_launcher(logits3, targets, ignore_index, softcap, temperature):
    return reference.token_nll(logits3.reshape(-1, logits3.shape[-1]), targets,
                               ignore_index=ignore_index, softcap=softcap,
                               temperature=temperature).float()


@pytest.fixture
def fp32_out_mm(monkeypatch):
    """An fp32-output ``torch.mm`` on CPU (as CUDA has): float32 products and sums of the
    fp16/bf16 operands. ``refuse`` lists the calls (0-based, counting out_dtype calls only) that
    raise as a PyTorch without it does."""
    real_mm = torch.mm
    state = {"calls": 0, "refuse": set()}

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        call = state["calls"]
        state["calls"] += 1
        if call in state["refuse"]:
            raise NotImplementedError("no fp32-output GEMM here")
        return real_mm(a.to(out_dtype), b.to(out_dtype), out=out)

    monkeypatch.setattr(torch, "mm", mm)
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_gpu_fallback_path_on_cpu_tensors(dtype):
    # a bf16 fp32-output GEMM is refused on the first chunk: the buffer falls back to bf16
    calls = []
    hidden, weight, b, targets = make_inputs(50, 123, 507, dtype, bias=True, ignore_every=6)
    out = _chunked.chunked_linear_token_nll(hidden, weight, b, targets, -100, 3.0, 0.8,
                                            launcher=recording(_cpu.token_nll, calls),
                                            budget_mb=9 * 507 * 2 / 2**20)
    assert {dt for dt, _ in calls} == {dtype}
    # 9 of 50 rows ignored; a bf16 buffer holds 9 rows, a float32 one 4
    assert [n for _, n in calls] == ([9] * 4 + [5] if dtype == torch.bfloat16 else [4] * 10 + [1])
    if dtype == torch.float32:
        check_against_reference(out, hidden, weight, b, targets, softcap=3.0, temperature=0.8)
    else:
        # logits rounded to the input dtype, exactly as F.linear does in that dtype
        logits = F.linear(hidden, weight, b).float()
        expected = reference.token_nll(logits, targets, softcap=3.0, temperature=0.8)
        assert_nll_close(out, expected, row_lse(logits, softcap=3.0, temperature=0.8))
    assert bool((out[::6] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ignore", [False, True], ids=["all-scored", "some-ignored"])
def test_chunked_gpu_path_fp32_logits(fp32_out_mm, dtype, ignore):
    # with an fp32-output GEMM, fp16/bf16 inputs keep float32 logits (bias added in float32):
    # the logits-path bound against float64 holds, as for float32 inputs
    calls = []
    N, D, V = 63, 123, 507
    hidden, weight, b, targets = make_inputs(N, D, V, dtype, bias=True,
                                             ignore_every=3 if ignore else 0)
    out = _chunked.chunked_linear_token_nll(hidden, weight, b, targets, -100, 20.0, 0.9,
                                            launcher=recording(reference_launcher, calls),
                                            budget_mb=10 * V * 4 / 2**20)  # 10 float32 rows
    scored = N - (N + 2) // 3 if ignore else N
    assert [dt for dt, _ in calls] == [torch.float32] * len(calls)
    assert [n for _, n in calls] == [10] * (scored // 10) + [scored % 10]
    check_against_reference(out, hidden, weight, b, targets, softcap=20.0, temperature=0.9)
    if ignore:
        assert bool((out[::3] == 0).all())


def test_chunked_gpu_path_fp32_refused_after_first_chunk_raises(fp32_out_mm):
    # only a refusal of the first fp32-output GEMM means "not available for these tensors"
    fp32_out_mm["refuse"] = {1}
    hidden, weight, _, targets = make_inputs(20, 16, 64, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="no fp32-output GEMM"):
        _chunked.chunked_linear_token_nll(hidden, weight, None, targets, -100, None, 1.0,
                                          launcher=reference_launcher,
                                          budget_mb=8 * 64 * 4 / 2**20)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, None], ids=str)
def test_chunked_gpu_path_logits_dtype(fp32_out_mm, monkeypatch, logits_dtype):
    # an explicit logits_dtype is used as given; without one and without any fp32-output GEMM
    # in this PyTorch, the input dtype is used at once (no refused call first)
    if logits_dtype is None:
        monkeypatch.setattr(_chunked, "fp32_out_gemm_available", lambda: False)
    calls = []
    hidden, weight, b, targets = make_inputs(30, 32, 100, torch.bfloat16, bias=True)
    out = _chunked.chunked_linear_token_nll(hidden, weight, b, targets, -100, None, 1.0,
                                            launcher=recording(reference_launcher, calls),
                                            logits_dtype=logits_dtype)
    want = logits_dtype or torch.bfloat16
    assert [dt for dt, _ in calls] == [want]
    assert fp32_out_mm["calls"] == (1 if want == torch.float32 else 0)
    if want == torch.float32:
        check_against_reference(out, hidden, weight, b, targets)
    else:
        logits = F.linear(hidden, weight, b).float()
        expected = reference.token_nll(logits, targets)
        assert_nll_close(out, expected, row_lse(logits))


def test_chunked_gpu_path_forced_fp32_logits_without_support_raises():
    hidden = torch.randn(4, 8).to(torch.bfloat16)
    weight = torch.randn(16, 8).to(torch.bfloat16)
    with pytest.raises(NotImplementedError):
        _chunked.chunked_linear_token_nll(hidden, weight, None, torch.zeros(4, dtype=torch.long),
                                          -100, None, 1.0, launcher=reference_launcher,
                                          logits_dtype=torch.float32)


def test_chunked_gpu_path_all_ignored_and_empty():
    calls = []
    launcher = recording(reference_launcher, calls)
    hidden, weight, _, _ = make_inputs(5, 8, 16, torch.float32)
    targets = torch.full((5,), -100)
    out = _chunked.chunked_linear_token_nll(hidden, weight, None, targets, -100, None, 1.0,
                                            launcher=launcher)
    assert out.dtype == torch.float32 and bool((out == 0).all()) and out.shape == (5,)
    out = _chunked.chunked_linear_token_nll(hidden[:0], weight, None, targets[:0], -100, None, 1.0,
                                            launcher=launcher)
    assert out.shape == (0,) and calls == []


@pytest.mark.parametrize("V,element,budget_rows,rows",
                         [(507, 4, 10, 10), (507, 4, 127, 127), (507, 4, 300, 256),
                          (1000, 2, 1000, 896), (50, 4, 0, 1)])
def test_gpu_chunk_rows_whole_gemm_tiles(V, element, budget_rows, rows):
    # chunks of 128 rows or more are cut to whole 128-row GEMM tiles; at least one row
    assert _chunked.gpu_chunk_rows(V, element, budget_rows * V * element + V - 1) == rows


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs PyTorch >= 2.13")
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked"])
def test_matches_torch_linear_cross_entropy(chunked):
    hidden, weight, b, targets = make_inputs(96, 64, 4099, torch.float32, bias=True,
                                             ignore_every=5)
    kwargs = dict(linear_bias=b, reduction="none", ignore_index=-100)
    if chunked:
        kwargs["options"] = torch.nn.LinearCrossEntropyOptions()
    theirs = F.linear_cross_entropy(hidden, weight, targets, **kwargs)
    ours = pplfast.linear_token_nll(hidden, weight, targets, bias=b)
    lse = row_lse(exact_logits(hidden, weight, b))
    # both are float32 computations of the same float64 value: allow twice the per-side bound
    assert_nll_close(ours, theirs.double(), lse, rtol=2 * LSE_RTOL)
    check_against_reference(ours, hidden, weight, b, targets)
    mean = F.linear_cross_entropy(hidden, weight, targets, linear_bias=b)
    scored = targets != -100
    assert torch.allclose(ours[scored].double().mean(), mean.double(), rtol=1e-5)


def test_matches_hugging_face_causal_lm_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=507, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # random init gives near-uniform predictions; spread the head so the test sees real losses
        model.lm_head.weight.mul_(20.0)
        ids = torch.randint(0, 507, (2, 33))
        labels = ids.clone()
        labels[1, 25:] = -100
        hf_loss = model(ids, labels=labels).loss
        hidden = model.model(ids).last_hidden_state
        weight = model.lm_head.weight
        nll = pplfast.linear_token_nll(hidden, weight, labels, shift=True)
        ppl = pplfast.linear_perplexity(hidden, weight, labels, shift=True)
    assert nll.shape == (2, 32) and (nll[1, 24:] == 0).all()
    mean = nll.double().sum() / (labels[:, 1:] != -100).sum()
    assert hf_loss.item() > 1.0
    assert abs(mean.item() - hf_loss.item()) <= 2e-6 * max(1.0, hf_loss.item()) + 1e-6
    assert torch.allclose(ppl.double(), torch.exp(mean), rtol=1e-6)
    check_against_reference(nll, hidden, weight, None, labels, shift=True)


# --- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs(backend):
    hidden, weight, b, targets = make_inputs(8, 16, 50, torch.float32, bias=True)
    call = lambda *a, **k: pplfast.linear_token_nll(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="width D=16"):
        call(hidden, weight[:, :15], targets)
    with pytest.raises(ValueError, match="transposed"):
        call(hidden, weight.T.contiguous(), targets)
    with pytest.raises(ValueError, match="bias has shape"):
        call(hidden, weight, targets, bias=b[:49])
    with pytest.raises(ValueError, match=r"targets\[3\] = 50 is outside \[0, 50\)"):
        bad = targets.clone()
        bad[3] = 50
        call(hidden, weight, bad)
    with pytest.raises(ValueError, match="= -1 is outside"):
        bad = targets.clone()
        bad[0] = -1
        call(hidden, weight, bad)
    with pytest.raises(TypeError, match="weight dtype"):
        call(hidden, weight.half(), targets)
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        call(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        call(hidden, weight[0], targets)
    with pytest.raises(ValueError, match="temperature"):
        call(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        call(hidden, weight, targets, softcap=-1.0)


# --- GPU: CCE's three-way rule ----------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,V", [(252, 123, 507), (1000, 256, 50257), (63, 4096, 128256)],
                         ids=["N252-D123-V507", "N1000-D256-V50257", "N63-D4096-V128256"])
def test_gpu_three_way_rule(N, D, V, dtype, backend):
    """Kernel error vs the float64 truth is at most the same-dtype PyTorch path's error
    (F.linear in the input dtype, then F.cross_entropy in float32) plus the logits-path bound."""
    hidden, weight, b, targets = make_inputs(N, D, V, dtype, "cuda", bias=True, ignore_every=9)
    out = pplfast.linear_token_nll(hidden, weight, targets, bias=b, softcap=30.0, backend=backend)
    expected = reference.linear_token_nll(hidden, weight, targets, bias=b, softcap=30.0).cpu()
    logits = F.linear(hidden, weight, b).float()
    torch_path = F.cross_entropy(30.0 * torch.tanh(logits / 30.0), targets, reduction="none")
    lse = row_lse(exact_logits(hidden, weight, b).cpu(), softcap=30.0)
    torch_err = (torch_path.double().cpu() - expected).abs()
    assert_nll_close(out, expected, atol=torch_err + LSE_RTOL * lse.abs().clamp_min(1.0))
    if dtype == torch.float32:  # IEEE fp32 products by default: the strict bound
        assert_nll_close(out, expected, lse, rtol=4 * LSE_RTOL)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_cpu_nll_finish_special_states(temperature):
    """nll_finish from hand-made running states: (max - target) / temperature + log(sum), the
    reference's special values (NaN, +-inf), never below 0, 0 for ignored rows. The first term
    is formed in double: at 3e38 - (-3e38) a float32 difference is +inf, while its third is
    2e38."""
    from pplfast import _cpu

    inf, nan, t = float("inf"), float("nan"), temperature
    #            max,   sum,  target, expected NLL
    cases = [(5.0, 1.0, 5.0, 0.0),            # the target is the maximum, alone
             (5.0, 2.0, 5.0, 0.6931471805599453),
             (1e4, 1.5, 1e4 - 3.0, 3.0 / t + 0.4054651081081644),
             (3e38, 2.0, 3e38, 0.6931471805599453),  # tied maxima near the float32 limit
             (3e38, 1.0, -3e38, 6e38 / t),     # float32: +inf at t = 1, 2e38 at t = 3
             (3.0, 2.0, -inf, inf),            # target logit -inf in a finite row
             (inf, 0.0, 7.0, inf),             # +inf elsewhere in the row
             (inf, nan, inf, nan),             # +inf at the target: inf - inf
             (-inf, 0.0, -inf, nan),           # all -inf row
             (nan, 1.0, 2.0, nan),             # NaN seen in the row
             (2.0, 1.0, 0.0, 2.0 / t),
             (9.0, 1.0, 3.0, 0.0)]             # ignored (target index set below)
    n = len(cases)
    # the state's layout (max, sum, target): kept by the kernels, written here by hand
    state = torch.tensor([c[:3] for c in cases], dtype=torch.float64)
    assert state.shape[1] == _cpu._C.NLL_STATE
    targets = torch.zeros(n, dtype=torch.int64)
    targets[-1] = -100
    got = _cpu.nll_finish(state, targets, -100, temperature)
    want = torch.tensor([c[3] for c in cases], dtype=torch.float64).float().double()
    # the bound scales with the NLL itself, never with the logits' size (3e38)
    assert_nll_close(got, want, want.nan_to_num(0.0, 0.0, 0.0))
    assert not bool((got < 0).any())
