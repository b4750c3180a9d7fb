"""Fused Triton linear_token_nll kernel: under TRITON_INTERPRET=1 on CPU tensors (set by conftest
when there is no GPU) with tiny shapes and fp32/fp16 operands, compiled on a GPU otherwise."""
from __future__ import annotations

import pytest
import torch

import pplfast
from pplfast import _linear, reference
from helpers import LSE_RTOL, assert_nll_close, nvidia_backend, row_lse, run_compile_script

pytest.importorskip("triton")
from pplfast.kernels import linear_token_nll as kernel  # noqa: E402

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter: one small tile; on GPU the tuned configuration
CONFIG = (16, 32, 32, 1, 1) if DEVICE == "cpu" else None


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
    out = kernel.linear_token_nll_forward(hidden, weight, None, targets, -100, None, 1.0,
                                          config=CONFIG, splits=splits)
    check(out, hidden, weight, None, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "softcap,temperature", [(30.0, 1.0), (2.0, 0.6), (None, 1.7)], ids=["sc30", "sc2-t0.6", "t1.7"]
)
def test_fused_bias_softcap_temperature(dtype, softcap, temperature):
    hidden, weight, b, targets = make_inputs(21, 48, 200, dtype, bias=True)
    out = kernel.linear_token_nll_forward(hidden, weight, b, targets, -100, softcap, temperature,
                                          config=CONFIG, splits=2)
    check(out, hidden, weight, b, targets, softcap=softcap, temperature=temperature)


def test_fused_small_arguments_of_softcap_tanh():
    # logits far below the cap: tanh near 0, where 1 - exp(-2|x|) would lose digits
    hidden, weight, _, targets = make_inputs(16, 32, 64, torch.float32)
    out = kernel.linear_token_nll_forward(hidden, weight, None, targets, -100, 500.0, 1.0,
                                          config=CONFIG)
    check(out, hidden, weight, None, targets, softcap=500.0)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_fused_ignored_rows_nan_and_all_ignored():
    hidden, weight, _, targets = make_inputs(24, 32, 100, torch.float32)
    targets[5:11] = -100
    hidden[6] = float("nan")  # ignored: stays 0
    hidden[15] = float("nan")  # scored: NaN there only
    out = kernel.linear_token_nll_forward(hidden, weight, None, targets, -100, None, 1.0,
                                          config=CONFIG, splits=2)
    assert (out[5:11] == 0).all() and torch.isnan(out[15])
    keep = torch.ones(24, dtype=torch.bool, device=DEVICE)
    keep[15] = False
    check(out[keep], hidden[keep], weight, None, targets[keep])

    targets[:] = -100
    out = kernel.linear_token_nll_forward(hidden, weight, None, targets, -100, None, 1.0,
                                          config=CONFIG)
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
    out = kernel.linear_token_nll_forward(strided, weight, bias, targets, -100, None, 1.0,
                                          config=CONFIG, splits=2)
    check(out, hidden, weight, bias, targets)


def test_public_api_triton_backend_with_shift():
    hidden, weight, _, _ = make_inputs(2 * 13, 32, 150, torch.float32)
    hidden = hidden.view(2, 13, 32)
    ids = torch.randint(0, 150, (2, 13), device=DEVICE)
    nll = pplfast.linear_token_nll(hidden, weight, ids, shift=True, backend="triton")
    expected = reference.linear_token_nll(hidden, weight, ids, shift=True).cpu()
    z = hidden.double() @ weight.double().T
    assert_nll_close(nll, expected, row_lse(z.cpu(), shift=True))
    ppl = pplfast.linear_perplexity(hidden, weight, ids, shift=True, backend="triton")
    assert torch.allclose(ppl.double().cpu(), torch.exp(expected.mean()), rtol=1e-5)


def test_splits_and_configs():
    # H100 (132 SMs), 128x256 tiles: 8192 tokens are 64 blocks, so 17 vocabulary splits make
    # about 8 waves; a million tokens need none; 5 tokens split as far as the tiles allow
    assert kernel.choose_splits(8192, 131072, 128, 256, 132) == 17
    assert kernel.choose_splits(1 << 20, 131072, 128, 256, 132) == 1
    assert kernel.choose_splits(5, 1000, 128, 256, 132) == 4
    assert kernel.default_config(torch.device("cpu"), torch.float32) == (16, 32, 32, 1, 1)
    for (major, nbytes), (bn, bv, bd, warps, stages) in kernel._CONFIGS.items():
        # the pipelined operand tiles must fit in shared memory (A100 164 KiB, H100 228 KiB)
        assert (bn + bv) * bd * nbytes * stages <= (160 << 10)
        assert kernel._SPLIT_ALIGN % bv == 0
    for bn, bv, bd, warps, stages in kernel._AUTOTUNE_SPACE:
        assert kernel._SPLIT_ALIGN % bv == 0 and 64 % bd == 0


@pytest.mark.cuda
def test_fused_gpu_real_vocabulary_fp32():
    # fp16/bf16 on GPU: the three-way rule in test_linear_token_nll.py
    hidden, weight, b, targets = make_inputs(300, 256, 128256, torch.float32, bias=True,
                                             ignore_every=11)
    out = kernel.linear_token_nll_forward(hidden, weight, b, targets, -100, None, 1.0)
    check(out, hidden, weight, b, targets, rtol=4 * LSE_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_chunked_fallback_with_triton_logits_kernel(dtype, monkeypatch):
    # GPUs the fused kernel does not cover: chunked GEMM + the fused logits reduction
    monkeypatch.setattr(kernel, "fused_supported", lambda hidden2: False)
    hidden, weight, b, targets = make_inputs(30, 40, 257, dtype, bias=True, ignore_every=4)
    monkeypatch.setenv("PPLFAST_GPU_CHUNK_MB", str(7 * 257 * 2 / 2**20))  # 7 rows per chunk
    out = kernel.linear_token_nll_forward(hidden, weight, b, targets, -100, 4.0, 1.0)
    if dtype == torch.float32 or (DEVICE == "cuda" and _linear.fp32_out_gemm_available()):
        # float32 logits: float32 inputs, or fp16 through CUDA's fp32-output GEMM
        check(out, hidden, weight, b, targets, softcap=4.0)
    else:
        # the CPU refuses the fp32-output GEMM: logits in the input dtype, as F.linear gives them
        logits = torch.nn.functional.linear(hidden, weight, b).float()
        expected = reference.token_nll(logits, targets, softcap=4.0).cpu()
        assert_nll_close(out, expected, row_lse(logits.cpu(), softcap=4.0))


# Compiled-code check that needs no GPU: the interpreter runs a kernel as Python, so anything only
# the compiler rejects (a global that is not tl.constexpr, a dot shape, a shared-memory budget)
# passes every interpreter test. This builds the kernels for sm_90 (the fixed Hopper and Ampere
# configurations, all specialisations) in a process without TRITON_INTERPRET.
_COMPILE_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pplfast.kernels import linear_token_nll as k

def build(fn, sig, consts, div16, num_warps, num_stages):
    full = {a: "constexpr" if a in consts else sig[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    src = ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))

PTR16 = ["h_ptr", "w_ptr", "b_ptr", "rows_ptr", "part_max_ptr", "part_sum_ptr"]
INT16 = ["V", "D", "stride_hn", "stride_wv", "cols_per_split"]
for dtype, nbytes, prec in (("bf16", 2, "ieee"), ("fp16", 2, "ieee"), ("fp32", 4, "ieee"),
                            ("fp32", 4, "tf32")):
    for cfg in {k._CONFIGS[(9, nbytes)], k._CONFIGS[(8, nbytes)]}:
        bn, bv, bd, warps, stages = cfg
        for flags in ((False, False, False, True), (True, True, True, False)):
            rows, bias, cap, even = flags
            sig = dict(h_ptr="*" + dtype, w_ptr="*" + dtype, b_ptr="*" + dtype, rows_ptr="*i64",
                       part_max_ptr="*fp32", part_sum_ptr="*fp64", n_rows="i32", V="i32",
                       D="i32", stride_hn="i32", stride_wv="i32", cols_per_split="i32",
                       softcap="fp32", scale="fp32")
            consts = dict(stride_hd=1, stride_wd=1, HAS_ROWS=rows, HAS_BIAS=bias,
                          HAS_SOFTCAP=cap, EVEN_D=even, INPUT_PRECISION=prec, BLOCK_N=bn,
                          BLOCK_V=bv, BLOCK_D=bd)
            c = build(k._lse_partial_kernel, sig, consts, PTR16 + INT16, warps, stages)
            assert c.metadata.shared <= 227 * 1024, (cfg, c.metadata.shared)
            if dtype != "fp32" or prec == "tf32":
                assert "wgmma.mma_async" in c.asm["ptx"], ("no wgmma", dtype, prec, cfg)
            print("ok", dtype, prec, cfg, flags, c.metadata.shared)
sig = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", rows_ptr="*i64", targets_ptr="*i64",
           part_max_ptr="*fp32", part_sum_ptr="*fp64", out_ptr="*fp32", n_rows="i32", D="i32",
           stride_hn="i32", stride_wv="i32", splits="i32", softcap="fp32", scale="fp32")
for flags in ((False, False, False), (True, True, True)):
    consts = dict(stride_hd=1, stride_wd=1, HAS_ROWS=flags[0], HAS_BIAS=flags[1],
                  HAS_SOFTCAP=flags[2], BLOCK_M=32, BLOCK_D=64)
    build(k._finish_kernel, sig, consts, ["h_ptr", "w_ptr", "D", "stride_hn", "stride_wv"], 4, 3)
    print("ok finish", flags)
"""


@pytest.mark.skipif(not nvidia_backend(), reason="triton has no NVIDIA backend here")
def test_kernels_compile_for_sm90():
    stdout = run_compile_script(_COMPILE_SCRIPT)
    assert stdout.count("ok ") == 14, stdout
