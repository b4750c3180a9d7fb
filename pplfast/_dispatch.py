"""Backend resolution: the one place that decides which implementation runs.

Every backend module exposes the same two launchers, called with validated, normalised inputs:

    token_nll(logits3, targets, ignore_index, softcap, temperature) -> float32 (B*T,)
        logits3: (B, T, V) view of the caller's logits, any strides, dtype kept
        targets: (B*T,) int64, contiguous, each in [0, V) or == ignore_index
    linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                     scored=None) -> float32 (N,)
        hidden2: (N, D), weight: (V, D), bias: (V,) or None, targets as above
        scored: (rows, targets of those rows) from pplfast._chunked._select_scored, counted by
            the caller in the same host sync as the target-range check; rows is None when every
            row is scored. None: the launcher selects them itself.

Resolution happens once per public call, in Python, before the custom op runs (pplfast._ops);
the op's body calls :func:`module`.
"""
from __future__ import annotations

import importlib

import torch

from . import _env

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on this machine or on these tensors."""


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    return "cpu"


def resolve(backend: str, device: torch.device) -> str:
    """Return the concrete backend name for tensors on ``device``, or raise why it cannot run."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "meta":
        raise ValueError("the tensors are on the meta device and hold no data: pplfast scores "
                         "real CPU or CUDA tensors (load the model's weights first)")
    if backend == "auto" and device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(
            f"no pplfast kernel runs on {device.type} tensors: move them with .cpu() or .cuda(), "
            'or pass backend="reference" (float64 PyTorch, slow)'
        )
    if backend == "auto":
        backend = _env.backend_override()
        if backend not in BACKENDS:
            raise ValueError(f"{_env.BACKEND} must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = _auto(device)
    if backend == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(
            f'backend="cpu" needs CPU tensors, got tensors on {device}; '
            'use backend="auto" or move the tensors with .cpu()'
        )
    if backend == "triton" and device.type != "cuda" and not _env.interpreting():
        raise BackendUnavailableError(
            f'backend="triton" needs CUDA tensors, got tensors on {device} '
            "(set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors "
            "in the interpreter, for testing)"
        )
    if backend == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(
            f'backend="cuda" needs CUDA tensors, got tensors on {device}'
        )
    return backend


def module(backend: str, *, slices: bool = False):
    """Import the launcher module of a concrete backend, with an actionable error; ``slices``:
    the module of its vocabulary-slice launchers (vocab-parallel scoring; the cuda backend's
    are the Triton kernels', as its statistics and comparison are)."""
    name = {
        "reference": "pplfast._reference_backend",
        "cpu": "pplfast._cpu_slices" if slices else "pplfast._cpu",
        "triton": "pplfast._triton",
        "cuda": "pplfast._triton" if slices else "pplfast._cuda",
    }[backend]
    if slices and backend == "cuda":
        backend = "triton"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        hint = {
            "cpu": "the native extension pplfast._C is missing: reinstall with "
            "`pip install -e .` (needs a C++17 compiler with OpenMP)",
            "triton": "install triton (>= 3.6): `pip install triton`",
            "cuda": "the CUDA extension pplfast._cuda_C is missing: reinstall on a machine "
            "where nvcc is on PATH (or CUDA_HOME is set)",
            "reference": "",
        }[backend]
        raise BackendUnavailableError(f'backend="{backend}" cannot run here: {exc}. {hint}') from exc
