"""The CUDA backend where no GPU is needed: nvcc compiles csrc/cuda (warnings are errors), the
built module imports and plans launches, the backend explains itself when the module is missing,
and the hidden-states path of pplfast/_cuda.py runs the shared chunked loop of pplfast/_chunked.py
with its own logits launcher (the kernel swapped for the reference; the loop itself is tested in
test_linear_token_nll.py). Compile tests skip where there is no nvcc.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pplfast import _dispatch, reference

from helpers import LSE_RTOL, assert_nll_close, row_lse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")


def default_arch_flags():
    """setup.py's default architectures as its -gencode flags: SASS for each, PTX for the last."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        archs = re.search(r'^DEFAULT_CUDA_ARCHS = "([0-9;]+)"$', f.read(), re.M).group(1)
    codes = sorted(int(a) for a in archs.split(";"))
    return ([f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
            + [f"-gencode=arch=compute_{codes[-1]},code=compute_{codes[-1]}"])


# As setup.py (every default architecture, sm_75 included), plus warnings as errors: about 20 s.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC,-Wall,-Wextra",
              "-Werror", "all-warnings", *default_arch_flags()]


def cuda_lib_dir():
    root = os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))
    for base in (root, os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""),
                 "/usr/local/cuda"):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if base and os.path.isfile(os.path.join(base, sub, "libcudart_static.a")):
                return os.path.join(base, sub)
    pytest.fail("libcudart_static.a not found next to nvcc")


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@needs_nvcc
def test_cuda_sources_compile_link_and_import(tmp_path):
    """nvcc -Werror on the kernels, the binding and the launch plan with the host compiler
    (-Werror), a static-cudart link, then the fresh module imports (no GPU needed) and plans
    launches."""
    obj = tmp_path / "token_nll.o"
    run([NVCC, "-c", os.path.join(CUDA_SRC, "token_nll.cu"), "-o", str(obj), *NVCC_FLAGS],
        tmp_path)
    import pybind11

    cxx = os.environ.get("CXX", "c++")
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    module = tmp_path / f"_cuda_C{ext}"
    run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Werror",
         f"-I{CUDA_SRC}", f"-I{pybind11.get_include()}",
         f"-I{sysconfig.get_paths()['include']}", os.path.join(CUDA_SRC, "bindings.cpp"),
         os.path.join(CUDA_SRC, "plan.cpp"), str(obj), f"-L{cuda_lib_dir()}", "-lcudart_static",
         "-ldl", "-lrt", "-lpthread", "-o", str(module)], tmp_path)
    probe = textwrap.dedent("""
        import _cuda_C
        assert _cuda_C.runtime_version() >= 11000
        print(_cuda_C.plan(16384, 128256, 132))
    """)
    proc = run([sys.executable, "-c", probe], tmp_path)
    assert proc.stdout.strip() == "(512, 1, 128256, 0)"


@needs_nvcc
def test_a_compile_error_fails(tmp_path):
    """The harness above really fails on a CUDA error (and on a warning, with -Werror)."""
    for name, body in {"error": "__global__ void k(float* x) { x[0] = undefined_name; }",
                       "warning": "__global__ void k(float* x) { int unused; x[0] = 1.f; }"}.items():
        src = tmp_path / f"{name}.cu"
        src.write_text(body + "\n")
        proc = subprocess.run([NVCC, "-c", str(src), "-o", str(tmp_path / f"{name}.o"),
                               *NVCC_FLAGS], capture_output=True, text=True)
        assert proc.returncode != 0, f"nvcc accepted the {name} case"


@needs_nvcc
def test_installed_module_plans_every_kernel():
    """Where nvcc exists the install built pplfast._cuda_C; its launch plans, without a GPU."""
    from pplfast import _cuda_C

    sms = 132
    assert _cuda_C.plan(1024, 4096, sms) == (32, 1, 4096, 0)  # warp per row
    assert _cuda_C.plan(16384, 128256, sms) == (512, 1, 128256, 0)  # block per row
    assert _cuda_C.plan(4096, 8192, sms)[:2] == (256, 1)
    threads, splits, segment, workspace = _cuda_C.plan(4, 128256, sms)  # few rows: split
    assert threads == 512 and splits > 1
    assert segment % 64 == 0 and (splits - 1) * segment < 128256 <= splits * segment
    assert workspace == 2 * 4 * splits
    # overrides: segments never empty, never more than one per 64 elements
    assert _cuda_C.plan(3, 100, sms, 128, 50)[1] == 2
    assert _cuda_C.plan(3, 1, sms, 512, 7)[1] == 1
    with pytest.raises(ValueError, match="warp-per-row"):
        _cuda_C.plan(3, 100, sms, 32, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        _cuda_C.plan(3, 100, sms, 100, 0)


def test_missing_module_says_why(monkeypatch):
    import pplfast

    monkeypatch.setitem(sys.modules, "pplfast._cuda_C", None)  # import raises ImportError
    monkeypatch.delattr(pplfast, "_cuda_C", raising=False)
    monkeypatch.delitem(sys.modules, "pplfast._cuda", raising=False)
    monkeypatch.delattr(pplfast, "_cuda", raising=False)
    with pytest.raises(_dispatch.BackendUnavailableError, match="nvcc"):
        _dispatch.module("cuda")


def test_cuda_backend_needs_cuda_tensors():
    import pplfast

    with pytest.raises(_dispatch.BackendUnavailableError, match="CUDA tensors"):
        pplfast.token_nll(torch.randn(2, 5), torch.tensor([1, 2]), backend="cuda")


# ---- the hidden-states path, on CPU, with the kernel replaced by the reference ------------


@pytest.fixture
def cuda_module_on_cpu(monkeypatch):
    cuda = pytest.importorskip("pplfast._cuda", reason="pplfast._cuda_C was not built here")

    def reference_launch(out, logits3, targets, ignore_index, softcap, temperature, threads=0,
                         splits=0):
        nll = reference.token_nll(logits3.reshape(-1, logits3.shape[-1]), targets,
                                  ignore_index=ignore_index, softcap=softcap,
                                  temperature=temperature)
        out.copy_(nll)
        reference_launch.calls += 1

    reference_launch.calls = 0
    monkeypatch.setattr(cuda, "_launch", reference_launch)
    return cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ignore", [False, True], ids=["all-scored", "some-ignored"])
def test_chunked_linear_loop(cuda_module_on_cpu, dtype, ignore):
    """_cuda.linear_token_nll: the shared chunked loop (chunks, gathered scored rows, bias, the
    same-dtype fallback where the fp32-output GEMM is refused, as on CPU) reduced by _launch."""
    N, D, V = 63, 123, 507
    hidden = torch.randn(N, D).to(dtype)
    weight = (torch.randn(V, D) * D**-0.5).to(dtype)
    bias = (torch.randn(V) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,))
    if ignore:
        targets[::3] = -100
    options = {"softcap": 20.0, "temperature": 0.9}
    got = cuda_module_on_cpu.linear_token_nll(hidden, weight, bias, targets, -100,
                                              options["softcap"], options["temperature"],
                                              budget_mb=10 * V * 4 / 2**20)  # 10-row chunks
    want = reference.linear_token_nll(hidden, weight, targets, bias=bias, **options)
    z = F.linear(hidden.double(), weight.double(), bias.double())
    lse = row_lse(z, **options)
    if dtype == torch.float32:
        assert_nll_close(got, want, lse)
    else:  # bf16 logits, as F.linear gives them: PyTorch's own error bounds ours
        z16 = F.linear(hidden, weight, bias).double()
        same = reference.token_nll(z16, targets, **options)
        bound = (same - want).abs().max() * 1.5 + LSE_RTOL * lse.abs().clamp_min(1.0)
        assert_nll_close(got, want, atol=bound)
    if ignore:
        assert bool((got[::3] == 0).all())
    # one kernel launch per chunk: 10 float32 rows, or 20 bf16 rows after the refused fp32 GEMM
    step = 10 if dtype == torch.float32 else 20
    scored = N - N // 3 if ignore else N
    assert cuda_module_on_cpu._launch.calls == -(-scored // step)


def test_forced_fp32_logits_without_support_raises(cuda_module_on_cpu):
    hidden = torch.randn(4, 8).to(torch.bfloat16)
    weight = torch.randn(16, 8).to(torch.bfloat16)
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        cuda_module_on_cpu.linear_token_nll(hidden, weight, None, torch.zeros(4, dtype=torch.long),
                                            -100, None, 1.0, logits_dtype=torch.float32)
