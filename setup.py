"""Build the native extensions.

``pplfast._C``: the CPU kernels (C++17, OpenMP), bound with pybind11 over raw pointers and
strides so that the build never needs PyTorch. On x86-64 the default is ``-march=x86-64-v3``
(AVX2, FMA, F16C; any x86 CPU since 2013-2015), so a build runs on every such host it is copied
to; ``PPLFAST_CPU_ARCH=native`` tunes it for the building machine only (it may then die with
SIGILL on an older host), and any other value is passed to ``-march``. Elsewhere the compiler's
default target is used unless ``PPLFAST_CPU_ARCH`` is set. On x86-64 the row kernels are also
compiled for AVX-512 (one translation unit, under a target pragma) and chosen at run time on
CPUs that have it (``PPLFAST_CPU_ISA`` overrides the choice).

``pplfast._cuda_C``: the CUDA kernels (csrc/cuda), built only where ``nvcc`` is found
(``CUDA_HOME`` / ``CUDA_PATH``, else ``nvcc`` on ``PATH``); elsewhere the install still succeeds
and ``backend="cuda"`` says why it cannot run. The ``.cu`` files are compiled by nvcc into
objects and linked into a plain pybind11 module with the CUDA runtime linked statically, so
neither PyTorch nor its CUDA headers are needed to build, and no matching libcudart is needed at
run time, but the driver must support the toolkit's CUDA version (see the README). When torch
is importable at build time and was built with an older CUDA than ``nvcc``'s, one line says so.
``PPLFAST_CUDA_ARCHS`` lists the SASS targets (default ``"75;80;90"``: sm_75 for T4, sm_80 for
every compute capability 8.x GPU, sm_90 for H100/H200); PTX for the highest one is embedded too,
compiled by the driver for newer GPUs. ``PPLFAST_NO_CUDA=1`` skips the module.
"""
import importlib.util
import os
import platform
import re
import shutil
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

DEFAULT_CUDA_ARCHS = "75;80;90"


def cpu_arch_flags():
    arch = os.environ.get("PPLFAST_CPU_ARCH", "")
    if not arch and platform.machine().lower() in ("x86_64", "amd64"):
        arch = "x86-64-v3"
    return [f"-march={arch}"] if arch else []


CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu/dispatch.cpp",
    "csrc/cpu/isa_base.cpp",
    "csrc/cpu/isa_avx512.cpp",
    "csrc/cpu/token_nll.cpp",
    "csrc/cpu/token_stats.cpp",
    "csrc/cpu/compare.cpp",
]
CPU_HEADERS = ["csrc/cpu/ops.h", "csrc/cpu/common.h", "csrc/cpu/isa.h", "csrc/cpu/simd.h",
               "csrc/cpu/rows.h"]

ext_modules = [
    Pybind11Extension(
        "pplfast._C",
        sources=CPU_SOURCES,
        depends=CPU_HEADERS,
        include_dirs=["csrc"],
        cxx_std=17,
        # -ffp-contract=off: every ISA's kernels round the same operations the same way (no FMA
        # the compiler chose for one and not another). isa_avx512.cpp enables AVX-512 for its own
        # functions only (a target pragma), so the build's baseline stays -march's.
        extra_compile_args=["-O3", *cpu_arch_flags(), "-fopenmp", "-fno-math-errno",
                            "-ffp-contract=off"],
        extra_link_args=["-fopenmp"],
    ),
]


def find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc and include/cuda_runtime.h, or None."""

    def is_root(root):
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_root(root):
        return root
    # nvcc on PATH may be a wrapper script outside the toolkit; try the conventional root
    return "/usr/local/cuda" if is_root("/usr/local/cuda") else None


def cuda_lib_dir(cuda_home):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        if os.path.isfile(os.path.join(cuda_home, sub, "libcudart_static.a")):
            return os.path.join(cuda_home, sub)
    raise RuntimeError(f"libcudart_static.a not found under the CUDA toolkit at {cuda_home}")


def nvcc_arch_flags(archs):
    """SASS for each arch plus PTX for the highest, e.g. "80;90" -> sm_80, sm_90, compute_90."""
    codes = sorted({int(a.strip().replace(".", "")) for a in archs.replace(",", ";").split(";")
                    if a.strip()})
    if not codes:
        raise RuntimeError(f"PPLFAST_CUDA_ARCHS lists no architecture: {archs!r}")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
    flags.append(f"-gencode=arch=compute_{codes[-1]},code=compute_{codes[-1]}")
    return flags


def nvcc_cuda_version(nvcc):
    """(major, minor) of the toolkit behind ``nvcc``, from ``nvcc --version``; None if unknown."""
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def warn_if_nvcc_newer_than_torch(nvcc):
    """One printed line when the installed torch was built with an older CUDA than ``nvcc``'s:
    the module then needs a newer driver than torch does. Silent when torch is not importable
    (pip's isolated build) or is a CPU build."""
    if importlib.util.find_spec("torch") is None:
        return
    try:
        import torch
    except Exception:  # a broken torch install is not this build's business
        return
    torch_cuda = getattr(torch.version, "cuda", None)
    found = re.match(r"(\d+)\.(\d+)", torch_cuda or "")
    ours = nvcc_cuda_version(nvcc)
    if found is None or ours is None:
        return
    theirs = (int(found.group(1)), int(found.group(2)))
    if ours > theirs:
        print(f"pplfast: warning: nvcc is CUDA {ours[0]}.{ours[1]} but torch was built with CUDA "
              f"{torch_cuda}: pplfast._cuda_C will need a driver for CUDA {ours[0]}.{ours[1]} "
              f"(see the README), newer than torch needs; set CUDA_HOME to a CUDA "
              f"{theirs[0]}.x toolkit to match torch", flush=True)


# No --use_fast_math: the kernels pick their fast intrinsics (exp2f, fmaf) explicitly and rely on
# IEEE inf/NaN and exact division elsewhere. (tests/test_cuda_build.py compiles with these flags
# plus -Werror.)
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC"]


class BuildExt(build_ext):
    """pybind11's build_ext, compiling an extension's ``cuda_sources`` with nvcc first."""

    def build_extension(self, ext):
        cuda_sources = getattr(ext, "cuda_sources", None)
        if cuda_sources:
            nvcc = os.path.join(ext.cuda_home, "bin", "nvcc")
            out_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(out_dir, exist_ok=True)
            objects = []
            flags = [*NVCC_FLAGS, *nvcc_arch_flags(ext.cuda_archs)]
            for source in cuda_sources:
                obj = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".o")
                inputs = [source, *ext.depends]
                stamp = obj + ".flags"
                fresh = (os.path.exists(obj) and os.path.exists(stamp)
                         and open(stamp).read() == " ".join(flags)
                         and all(os.path.getmtime(obj) >= os.path.getmtime(f) for f in inputs))
                if not fresh or self.force:
                    cmd = [nvcc, "-c", source, "-o", obj, *flags]
                    print(" ".join(cmd), flush=True)
                    subprocess.check_call(cmd)
                    with open(stamp, "w") as f:
                        f.write(" ".join(flags))
                objects.append(obj)
            ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extension(ext)


cuda_home = None if os.environ.get("PPLFAST_NO_CUDA", "0") not in ("", "0") else find_cuda_home()
if cuda_home is None:
    print("pplfast: nvcc not found (set CUDA_HOME or put nvcc on PATH): building without the "
          'CUDA extension pplfast._cuda_C; backend="cuda" will be unavailable', flush=True)
else:
    lib_dir = cuda_lib_dir(cuda_home)
    warn_if_nvcc_newer_than_torch(os.path.join(cuda_home, "bin", "nvcc"))
    cuda_ext = Pybind11Extension(
        "pplfast._cuda_C",
        # the launch plan is plain C++: the host compiler builds it with the binding
        sources=["csrc/cuda/bindings.cpp", "csrc/cuda/plan.cpp"],
        depends=["csrc/cuda/token_nll.h", "csrc/cuda/token_nll.cu", "csrc/cuda/plan.h",
                 "csrc/cuda/constants.h"],
        include_dirs=["csrc/cuda"],
        cxx_std=17,
        extra_compile_args=["-O2"],
        library_dirs=[lib_dir],
        # static runtime: no libcudart.so of a matching version is needed when importing
        libraries=["cudart_static", "dl", "rt", "pthread"],
    )
    cuda_ext.cuda_sources = ["csrc/cuda/token_nll.cu"]
    cuda_ext.cuda_home = cuda_home
    cuda_ext.cuda_archs = os.environ.get("PPLFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    ext_modules.append(cuda_ext)

setup(
    # the package, its subpackages (the wings: models, corpus, serve, cli, ...) and the kernels
    packages=["pplfast", *(f"pplfast.{p}" for p in find_packages("pplfast")), "pplfast.kernels"],
    package_dir={"pplfast": "pplfast", "pplfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
