"""Every Triton kernel built for the real GPU targets, without a GPU, and read back from ``ptxas``.

The interpreter runs kernels as Python, so what only the compiler rejects (or compiles badly)
passes every interpreter test. Here each kernel is compiled without ``TRITON_INTERPRET`` for the
variants its launcher starts, and checked: no spilled register, the shared memory within the
target's, 16-byte vector loads where the logits kernel promises them, tensor cores for the
fused hidden-states kernels. One spec builder (``helpers.triton_spec``) reads each kernel's
signature, so a spec cannot drift from its kernel.

Targets: sm_80 (A100), sm_86 (A10, RTX 30), sm_89 (L4, L40, RTX 40), sm_90 (H100, H200).
"""
from __future__ import annotations

import pytest
import torch

from helpers import compile_triton, nvidia_backend, triton_spec

# compute capability (as an int) -> shared memory per block, KiB
SHARED_KIB = {80: 163, 86: 99, 89: 99, 90: 227}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _pointers(names, dtype="fp32"):
    return {name: dtype for name in names}


# ---- logits kernels ------------------------------------------------------------------------------

# global loads in the PTX: 16-byte vectors, and any load that is neither a 2- nor a 4-vector
_LOADS = {"v4": r"ld\.global[\w:.]*\.v4", "scalar": r"ld\.global(?![\w:.]*\.v[24])[\w:.]*\s"}
_NLL = "pplfast.kernels.token_nll"


def token_nll_specs():
    """Every variant for sm_90; elsewhere fp16 (as bf16) and the unaligned contiguous rows are
    left out. The merge kernel finishing, and writing a slice's records."""
    from pplfast.kernels._plan import LOGITS_CONFIG

    block2, block4, warps = LOGITS_CONFIG
    ptrs = ["logits_ptr", "targets_ptr", "out_ptr", "part_ptr"]
    specs = []
    for arch in SHARED_KIB:
        full = arch == 90
        for dtype, nbytes, block in (("bf16", 2, block2), ("fp16", 2, block2),
                                     ("fp32", 4, block4)):
            if dtype == "fp16" and not full:
                continue
            for contig, align in ((True, 16 // nbytes), (True, 1), (False, 1)):
                if contig and align == 1 and not full:
                    continue
                for split in (False, True):
                    for cap in (False, True):
                        consts = dict(HAS_SOFTCAP=cap, VOCAB_CONTIGUOUS=contig, SPLIT=split,
                                      ALIGN=align, BLOCK_V=block)
                        if contig:
                            consts["stride_v"] = 1
                        specs.append(triton_spec(
                            _NLL, "_token_nll_kernel", arch,
                            pointers=dict(_pointers(ptrs), logits_ptr=dtype, targets_ptr="i64"),
                            constexprs=consts, i64=["stride_b"], div16=ptrs, num_warps=warps,
                            count=_LOADS, tag=f"sm{arch} {dtype} contig={contig} align={align} "
                                              f"split={split} softcap={cap}"))
        for cap, finish in ((False, True), (True, True), (False, False)):
            specs.append(triton_spec(
                _NLL, "_merge_kernel", arch,
                pointers=dict(_pointers(ptrs), logits_ptr="bf16", targets_ptr="i64"),
                constexprs=dict(HAS_SOFTCAP=cap, FINISH=finish, BLOCK_S=8, stride_v=1),
                i64=["stride_b"], div16=ptrs, num_warps=1,
                tag=f"sm{arch} merge softcap={cap} finish={finish}"))
    return specs


def check_token_nll(spec, got):
    if spec["constexprs"].get("ALIGN", 1) > 1:
        # aligned contiguous rows stream as 16-byte vectors in the one-pass and the split kernel
        # alike, the tail block included: what stays scalar is the target logit, the target,
        # and the ALIGN-lane head and end of the row
        assert got["counts"]["v4"] > 0, ("no 16-byte loads", spec["tag"], got)
        assert got["counts"]["scalar"] <= 4, ("scalar loads in the row body", spec["tag"], got)


_STATS = "pplfast.kernels.token_stats"
_STATS_POINTERS = dict(targets_ptr="i64", target_logits_ptr="fp32", nll_ptr="fp32",
                       ent_ptr="fp32", mlp_ptr="fp32", amax_ptr="i64", rank_ptr="i64",
                       max_ptr="fp32", logs_ptr="fp32", part_f_ptr="fp32", part_i_ptr="i64")


def token_stats_specs():
    """Every dtype, split and softcap on sm_80 and sm_90 with the launcher's block and warps;
    a vocabulary slice's variant (the target logits given); the merge kernel both ways."""
    from pplfast.kernels._plan import STATS_CONFIG

    specs = []
    block2, block4, warps = STATS_CONFIG
    for arch in (80, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            block = block4 if dtype == "fp32" else block2
            for split in (False, True):
                for cap in (False, True):
                    specs.append(triton_spec(
                        _STATS, "_token_stats_kernel", arch,
                        pointers=dict(_STATS_POINTERS, logits_ptr=dtype),
                        constexprs=dict(HAS_SOFTCAP=cap, HAS_TARGET_LOGITS=False, SPLIT=split,
                                        BLOCK_V=block),
                        i64=["stride_b"], num_warps=warps,
                        tag=f"sm{arch} {dtype} split={split} softcap={cap}"))
        specs.append(triton_spec(
            _STATS, "_token_stats_kernel", arch, pointers=dict(_STATS_POINTERS, logits_ptr="bf16"),
            constexprs=dict(HAS_SOFTCAP=True, HAS_TARGET_LOGITS=True, SPLIT=True,
                            BLOCK_V=block2),
            i64=["stride_b"], num_warps=warps, tag=f"sm{arch} slice"))
        for finish in (True, False):
            merge_pointers = {k: v for k, v in _STATS_POINTERS.items() if k != "target_logits_ptr"}
            specs.append(triton_spec(
                _STATS, "_stats_merge_kernel", arch,
                pointers=dict(merge_pointers, logits_ptr="bf16"),
                constexprs=dict(HAS_SOFTCAP=True, FINISH=finish, BLOCK_S=8), i64=["stride_b"],
                num_warps=1, tag=f"sm{arch} merge finish={finish}"))
    return specs


def compare_specs():
    from pplfast.kernels._plan import COMPARE_CONFIG

    specs = []
    for arch in (80, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for cap in (False, True):
                block, warps = COMPARE_CONFIG[cap]
                specs.append(triton_spec(
                    "pplfast.kernels.compare", "_compare_kernel", arch,
                    pointers=dict(base_ptr=dtype, test_ptr=dtype, targets_ptr="i64",
                                  part_f_ptr="fp32", part_i_ptr="i64"),
                    constexprs=dict(HAS_SOFTCAP=cap, BLOCK_V=block),
                    i64=["sb_b", "sb_t", "st_b", "st_t", "ignore_index"],
                    div16=["base_ptr", "test_ptr", "targets_ptr"], num_warps=warps,
                    tag=f"sm{arch} {dtype} softcap={cap}"))
    return specs


# ---- fused hidden-states kernels -----------------------------------------------------------------

_TENSOR_CORES = {"wgmma": r"wgmma\.mma_async", "mma": r"\bmma\.sync"}
_HIDDEN = ["h_ptr", "w_ptr", "b_ptr"]
# (HAS_ROWS, HAS_BIAS, HAS_SOFTCAP, EVEN_D): none and all
_FUSED_FLAGS = ((False, False, False, True), (True, True, True, False))
# every specialisation the backend launches: fp16, bf16 and fp32 with TF32 (float32 without TF32
# takes the chunked path, see pplfast._triton)
_FUSED_PRECISIONS = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"))


def _fused_partial_specs(module, kernel, extra_pointers, extra_consts):
    import importlib

    config_for = importlib.import_module(module).config_for
    specs = []
    for arch in SHARED_KIB:
        for dtype, precision in _FUSED_PRECISIONS:
            for flags in _FUSED_FLAGS:
                rows, bias, cap, even = flags
                bn, bv, bd, warps, stages = config_for((arch // 10, arch % 10), DTYPES[dtype])
                pointers = dict(_pointers(_HIDDEN, dtype), rows_ptr="i64", **extra_pointers)
                specs.append(triton_spec(
                    module, kernel, arch, pointers=pointers,
                    constexprs=dict(stride_hd=1, stride_wd=1, HAS_ROWS=rows, HAS_BIAS=bias,
                                    HAS_SOFTCAP=cap, EVEN_D=even, INPUT_PRECISION=precision,
                                    BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, **extra_consts),
                    div16=[*pointers, "V", "D", "stride_hn", "stride_wv", "cols_per_split"],
                    num_warps=warps, num_stages=stages, count=_TENSOR_CORES,
                    tag=f"sm{arch} {dtype} {precision} {flags}"))
    return specs


_FLAGS_ALL = dict(HAS_ROWS=True, HAS_BIAS=True, HAS_SOFTCAP=True)


def linear_token_nll_specs():
    module = "pplfast.kernels.linear_token_nll"
    specs = _fused_partial_specs(module, "_lse_partial_kernel",
                                 dict(part_max_ptr="fp32", part_sum_ptr="fp64"), {})
    for arch in (80, 90):
        specs.append(triton_spec(
            module, "_finish_kernel", arch,
            pointers=dict(_pointers(_HIDDEN, "bf16"), rows_ptr="i64", targets_ptr="i64",
                          part_max_ptr="fp32", part_sum_ptr="fp64", out_ptr="fp32"),
            constexprs=dict(stride_hd=1, stride_wd=1, BLOCK_M=32, BLOCK_S=32, BLOCK_D=64,
                            **_FLAGS_ALL),
            div16=["h_ptr", "w_ptr", "D", "stride_hn", "stride_wv"], num_warps=4,
            tag=f"finish sm{arch}"))
    return specs


_PARTS = dict(part_max_ptr="fp32", part_sum_ptr="fp64", part_ent_ptr="fp64",
              part_best_ptr="fp32", part_arg_ptr="i32", part_rank_ptr="i32")


def linear_token_stats_specs():
    module = "pplfast.kernels.linear_token_stats"
    specs = _fused_partial_specs(module, "_stats_partial_kernel",
                                 dict(targets_ptr="i64", target_z_ptr="fp32", **_PARTS),
                                 dict(DOT_FP32=False))
    for arch in (80, 90):
        specs.append(triton_spec(
            module, "_target_kernel", arch,
            pointers=dict(_pointers(_HIDDEN, "bf16"), rows_ptr="i64", targets_ptr="i64",
                          target_z_ptr="fp32"),
            constexprs=dict(stride_hd=1, stride_wd=1, BLOCK_M=32, BLOCK_D=64, **_FLAGS_ALL),
            div16=["h_ptr", "w_ptr", "D", "stride_hn", "stride_wv"], num_warps=4,
            tag=f"target sm{arch}"))
        specs.append(triton_spec(
            module, "_stats_finish_kernel", arch,
            pointers=dict(rows_ptr="i64", target_z_ptr="fp32", **_PARTS, nll_ptr="fp32",
                          ent_ptr="fp32", mlp_ptr="fp32", argmax_ptr="i64", rank_ptr="i64"),
            constexprs=dict(HAS_ROWS=True, BLOCK_M=32, BLOCK_S=32), num_warps=4,
            tag=f"finish sm{arch}"))
    return specs


def check_fused(spec, got):
    if spec["count"]:  # the tile kernels: on tensor cores (wgmma on Hopper, mma.sync before)
        unit = "wgmma" if got["arch"] == 90 else "mma"
        assert got["counts"][unit] > 0, ("no tensor-core instruction", spec["tag"], got)


KERNELS = {
    "token_nll": (token_nll_specs, check_token_nll),
    "token_stats": (token_stats_specs, None),
    "compare": (compare_specs, None),
    "linear_token_nll": (linear_token_nll_specs, check_fused),
    "linear_token_stats": (linear_token_stats_specs, check_fused),
}


@pytest.mark.skipif(not nvidia_backend(), reason="triton has no NVIDIA backend here")
@pytest.mark.parametrize("kernels", list(KERNELS))
def test_kernels_compile_for_each_gpu_target(kernels):
    build, check = KERNELS[kernels]
    specs = build()
    for spec, got in zip(specs, compile_triton(specs)):
        tag = f"{spec['kernel']} {spec['tag']}"
        assert got["spill_stores"] == 0 and got["spill_loads"] == 0, (tag, got)
        assert got["registers"] <= 255, (tag, got)
        assert got["shared"] <= SHARED_KIB[got["arch"]] << 10, (tag, got)
        if check is not None:
            check(spec, got)


def test_a_spec_cannot_drift_from_its_kernel():
    """The spec builder refuses an argument the kernel lacks, an untyped pointer and a missing
    constexpr (the signature is the kernel's own, never a copy)."""
    good = dict(pointers=dict(_pointers(["logits_ptr", "targets_ptr", "out_ptr", "part_ptr"])),
                constexprs=dict(HAS_SOFTCAP=False, VOCAB_CONTIGUOUS=True, SPLIT=False, ALIGN=1,
                                BLOCK_V=1024), num_warps=4)
    spec = triton_spec(_NLL, "_token_nll_kernel", 90, **good)
    assert spec["signature"]["logits_ptr"] == "*fp32" and spec["signature"]["V"] == "i32"
    assert spec["signature"]["exp2_scale"] == "fp32"
    with pytest.raises(AssertionError, match="no argument"):
        triton_spec(_NLL, "_token_nll_kernel", 90, **dict(good, i64=["part_max_ptr"]))
    with pytest.raises(AssertionError, match="no element type"):
        triton_spec(_NLL, "_token_nll_kernel", 90,
                    **dict(good, pointers=_pointers(["logits_ptr", "targets_ptr", "out_ptr"])))
    with pytest.raises(AssertionError, match="no value for"):
        triton_spec(_NLL, "_token_nll_kernel", 90,
                    **dict(good, constexprs=dict(HAS_SOFTCAP=False, SPLIT=False, ALIGN=1,
                                                 BLOCK_V=1024)))
