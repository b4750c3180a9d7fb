"""Environment variables and device facts: the one place that reads them.

Every variable pplfast reads at run time is named here and, but for ``PPLFAST_CPU_ISA`` (which the
native CPU extension reads where it chooses its kernels), read here, at call time (never cached
at import), so that a test or a user can change it between calls. Kernels in
``pplfast.kernels`` read nothing themselves: their launchers take these values as arguments.

==========================  =====================================================================
``PPLFAST_BACKEND``         backend used when ``backend="auto"``
``PPLFAST_CPU_CHUNK_MB``    CPU hidden-states path: budget for all temporaries, MiB (default 32)
``PPLFAST_CPU_ISA``         CPU kernels: ``auto`` (default: AVX-512 where the CPU has it), ``avx512``
                            or the build's baseline (``avx2``); read by the native extension
                            itself on every call (csrc/cpu/dispatch.cpp)
``PPLFAST_GPU_CHUNK_MB``    GPU chunked hidden-states path: one chunk of logits, MiB (default 256)
``PPLFAST_ALLOW_TF32``      ``1``: fp32 hidden states may use TF32 products on GPU
``PPLFAST_AUTOTUNE``        ``1``: autotune the Triton kernels instead of fixed configurations
``TRITON_INTERPRET``        ``1``: Triton kernels run on CPU tensors in the interpreter (tests)
==========================  =====================================================================
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKEND = "PPLFAST_BACKEND"
CPU_CHUNK_MB = "PPLFAST_CPU_CHUNK_MB"
GPU_CHUNK_MB = "PPLFAST_GPU_CHUNK_MB"
ALLOW_TF32 = "PPLFAST_ALLOW_TF32"
AUTOTUNE = "PPLFAST_AUTOTUNE"
TRITON_INTERPRET = "TRITON_INTERPRET"

DEFAULT_CPU_CHUNK_MB = 32
DEFAULT_GPU_CHUNK_MB = 256


def flag(name: str) -> bool:
    """A boolean variable: set and not ``""`` / ``"0"``."""
    return os.environ.get(name, "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (on CPU tensors)."""
    return flag(TRITON_INTERPRET)


def backend_override() -> str:
    """The value of ``PPLFAST_BACKEND`` (``"auto"`` when unset or empty); not validated here."""
    return os.environ.get(BACKEND, "auto") or "auto"


def autotune() -> bool:
    return flag(AUTOTUNE)


def allow_tf32() -> bool:
    """TF32 for fp32 GEMMs on GPU: asked for by ``PPLFAST_ALLOW_TF32=1`` or PyTorch's switch."""
    return flag(ALLOW_TF32) or bool(torch.backends.cuda.matmul.allow_tf32)


def budget_bytes(env: str, default_mb: float, budget_mb: Optional[float] = None) -> int:
    """A memory budget in bytes: ``budget_mb`` if given, else the variable ``env``, else the default.

    A value that is not a positive number raises ValueError naming where it came from.
    """
    source = "budget_mb"
    if budget_mb is None:
        raw = os.environ.get(env, "")
        source = env if raw else "the default budget"
        try:
            budget_mb = float(raw) if raw else default_mb
        except ValueError:
            raise ValueError(f"{env} must be a number of MiB, got {raw!r}") from None
    if not budget_mb > 0:  # also catches NaN
        raise ValueError(f"{source} must be > 0 MiB, got {budget_mb!r}")
    return int(budget_mb * (1 << 20))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)
