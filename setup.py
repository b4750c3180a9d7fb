"""Build the native extensions.

``pplfast._C``: the CPU kernels (C++17, OpenMP), bound with pybind11 over raw pointers and
strides so that the build never needs PyTorch. Set ``PPLFAST_CPU_ARCH`` to override the
``-march`` flag (default ``native``: the wheel is tuned for the machine that builds it).
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

cpu_arch = os.environ.get("PPLFAST_CPU_ARCH", "native")

ext_modules = [
    Pybind11Extension(
        "pplfast._C",
        sources=["csrc/bindings.cpp", "csrc/cpu/token_nll.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3", f"-march={cpu_arch}", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    ),
]

setup(
    packages=["pplfast", "pplfast.kernels"],
    package_dir={"pplfast": "pplfast", "pplfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
