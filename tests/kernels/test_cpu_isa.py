"""The native CPU kernels' instruction sets: the dispatcher's decision, the exp every row kernel
uses (its error over the whole clamped range), the same answers from every instruction set this
CPU runs, and no AVX-512 instruction outside the AVX-512 kernels (the build stays x86-64-v3)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pplfast
from pplfast import _C, reference
from helpers import assert_nll_close, cpu_isas, row_lse

# every instruction set this machine can run (the AVX-512 kernels only where the CPU has them)
ISAS = cpu_isas()
BASELINE = ISAS[0]


@pytest.fixture
def isa(request, monkeypatch):
    monkeypatch.setenv("PPLFAST_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param
    return request.param


def test_dispatch_decision():
    """auto takes AVX-512 only where both the CPU and the build have it; a named instruction set
    is taken or refused with one line naming the variable and the reason, never replaced."""
    assert _C.isa_choice("", True, True) == "avx512"
    assert _C.isa_choice("auto", True, True) == "avx512"
    assert _C.isa_choice("auto", False, True) == BASELINE
    assert _C.isa_choice("", True, False) == BASELINE
    assert _C.isa_choice(BASELINE, True, True) == BASELINE
    assert _C.isa_choice("avx512", True, True) == "avx512"
    with pytest.raises(ValueError, match=r"PPLFAST_CPU_ISA=avx512: this CPU lacks AVX-512"):
        _C.isa_choice("avx512", False, True)
    with pytest.raises(ValueError, match=r"PPLFAST_CPU_ISA=avx512: this build has no AVX-512"):
        _C.isa_choice("avx512", True, False)
    with pytest.raises(ValueError, match=r"PPLFAST_CPU_ISA=sse9: choose auto, "):
        _C.isa_choice("sse9", True, True)


def test_env_variable_picks_the_kernels(monkeypatch):
    monkeypatch.delenv("PPLFAST_CPU_ISA", raising=False)
    assert _C.cpu_isa() == ISAS[-1]
    monkeypatch.setenv("PPLFAST_CPU_ISA", BASELINE)
    assert _C.cpu_isa() == BASELINE
    monkeypatch.setenv("PPLFAST_CPU_ISA", "bogus")
    logits, targets = torch.randn(3, 40), torch.randint(0, 40, (3,))
    with pytest.raises(ValueError, match="PPLFAST_CPU_ISA=bogus"):
        pplfast.token_nll(logits, targets, backend="cpu")


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_exp_error_over_the_clamped_range(isa):
    """exp(d) as the kernels form it, 2^(d log2 e) by the degree-5 polynomial, against exp in
    double over every 61st float in [-87.3, 0] (about 18 M values): the bounds of simd.h's
    comment, which the NLL's 2e-6 rests on (near the maximum, the terms that weigh)."""
    lo = np.float32(87.3).view(np.int32)
    d = -np.arange(0, lo + 1, 61, dtype=np.int32).view(np.float32)
    t = (d * np.float32(1.44269504088896341)).astype(np.float32)
    got = np.empty_like(t)
    _C.exp2_clamped(t.ctypes.data, got.ctypes.data, t.size)
    rel = np.abs(got.astype(np.float64) / np.exp(d.astype(np.float64)) - 1.0)
    a = np.abs(d)
    assert rel[a <= 1].max() <= 2.5e-7
    assert rel[a <= 10].max() <= 6.5e-7
    assert rel.max() <= 4.0e-6
    # the clamp: -inf and the bottom of the range give the smallest normal's order, NaN stays
    special = np.array([-np.inf, -200.0, np.nan, 0.0], dtype=np.float32)
    out = np.empty_like(special)
    _C.exp2_clamped(special.ctypes.data, out.ctypes.data, special.size)
    assert 1e-38 < out[0] == out[1] < 2e-38
    assert np.isnan(out[2]) and abs(out[3] - 1.0) < 2e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_every_op_on_every_isa(isa, dtype):
    """token_nll, token_stats and compare on each instruction set against the float64 reference,
    on rows whose lengths cut every vector width (tails), strided rows, and softcap x
    temperature."""
    V = 5003
    base = (torch.randn(6, V) * 3).to(dtype)
    test = (base.float() + 0.3 * torch.randn(6, V)).to(dtype)
    strided = torch.randn(6, 2 * V).to(dtype)[:, ::2]
    targets = torch.randint(0, V, (6,))
    targets[4] = -100
    for logits in (base, strided):
        for softcap, temperature in ((None, 1.0), (20.0, 0.7)):
            opts = dict(softcap=softcap, temperature=temperature)
            lse = row_lse(logits, **opts)
            got = pplfast.token_nll(logits, targets, backend="cpu", **opts)
            assert_nll_close(got, reference.token_nll(logits, targets, **opts), lse)
            stats = pplfast.token_stats(logits, targets, top_k=5, backend="cpu", **opts)
            want = reference.token_stats(logits, targets, top_k=5, **opts)
            assert_nll_close(stats.nll, want.nll, lse)
            assert_nll_close(stats.entropy, want.entropy, lse)
            assert torch.equal(stats.argmax, want.argmax) and torch.equal(stats.rank, want.rank)
            assert torch.equal(stats.top_k_ids, want.top_k_ids)
    opts = dict(softcap=20.0, temperature=0.7)
    got = pplfast.compare(base, test, targets, backend="cpu", **opts)
    want = reference.compare(base, test, targets, **opts)
    assert_nll_close(got.kl, want["kl"], row_lse(base, **opts))
    assert_nll_close(got.nll_test, want["nll_test"], row_lse(test, **opts))
    assert torch.equal(got.argmax_base, want["argmax_base"])


# instructions that exist only with AVX-512 (EVEX), whatever the register width
_AVX512_ONLY = re.compile(
    r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\{%k|\bv(scalef|rndscale|reduce|fixupimm|"
    r"getexp|getmant|ternlog|permt2|permi2|range|compress|expand|pmov[su]?[qd][bwd]|"
    r"cvt[tu]?\w*2u|pro[lr]v?[dq]|pabsq|pmullq|pmaxsq|pminsq|pmaxuq|pminuq|fpclass|dbpsadbw|"
    r"blendm|pblendm|pcmp\w*u?[bwdq]\s+.*%k|broadcast[fi]32x[248]|broadcast[fi]64x[24]|"
    r"extract[fi](32x[48]|64x[24])|insert[fi](32x[48]|64x[24])|shuf[fi](32x4|64x2))")


@pytest.mark.skipif(shutil.which("objdump") is None or not _C.built_avx512(),
                    reason="needs objdump and an x86-64 build with the AVX-512 kernels")
def test_no_avx512_instruction_outside_its_kernels():
    """A function compiled for AVX-512 that the linker shared with the baseline path (an inline
    helper or template merged across the two translation units) would fault on a CPU without
    AVX-512: every function of the extension holding an AVX-512 instruction must belong to the
    AVX-512 kernels (namespace pplfast::cpu::avx512), and they must exist."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__],
                          capture_output=True, text=True, check=True).stdout
    where, offenders, inside = None, set(), 0
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            where = head.group(1)
            continue
        if where is not None and _AVX512_ONLY.search(line):
            if "pplfast::cpu::avx512::" in where:
                inside += 1
            else:
                offenders.add(where)
    assert inside > 1000, "the AVX-512 kernels hold no AVX-512 instruction"
    assert not offenders, sorted(offenders)[:10]


def test_baseline_kernels_run_without_avx512():
    """The whole NLL, statistics and comparison path under valgrind, which does not emulate
    AVX-512: an AVX-512 instruction reached from the baseline kernels stops it (SIGILL)."""
    if shutil.which("valgrind") is None:
        pytest.skip("needs valgrind")
    code = ("import importlib.util, sys, numpy as np\n"
            "s = importlib.util.spec_from_file_location('probe._C', sys.argv[1])\n"
            "C = importlib.util.module_from_spec(s); s.loader.exec_module(C)\n"
            "assert C.cpu_isa() != 'avx512', C.cpu_isa()\n"
            "p = lambda a: a.ctypes.data\n"
            "x = np.random.default_rng(0).standard_normal((4, 3000)).astype(np.float32)\n"
            "t = np.array([1, 5, -100, 2999], dtype=np.int64)\n"
            "for softcap in (0.0, 30.0):\n"
            "    st = np.empty((4, C.NLL_STATE)); C.nll_init(p(st), 4)\n"
            "    C.nll_update(p(x), 0, 0, 3000, 1, 4, 4, 3000, 0, p(t), -100, softcap, 0.7, p(st), 1)\n"
            "    out = np.empty(4, np.float32); C.nll_finish(p(st), p(t), -100, 4, 0.7, p(out))\n"
            "    k = 3; ss = np.empty((4, C.STATS_STATE + 2 * k)); C.stats_init(p(ss), 4, k, 0)\n"
            "    C.stats_update(p(x), 0, 0, 3000, 1, 4, 4, 3000, 0, p(t), -100, softcap, 0.7, k,\n"
            "                   p(ss), 1)\n"
            "    cs = np.empty((4, C.COMPARE_STATE)); C.compare_init(p(cs), 4)\n"
            "    C.compare_update(p(x), 0, 0, 3000, 1, p(x), 0, 0, 3000, 1, 4, 4, 3000, 0, p(t),\n"
            "                     -100, softcap, 0.7, p(cs), 1)\n"
            "print('ran', C.cpu_isa())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PPLFAST_CPU_ISA", None)
    proc = subprocess.run(["valgrind", "--tool=none", sys.executable, "-c", code, _C.__file__],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and f"ran {BASELINE}" in proc.stdout, proc.stderr[-3000:]
