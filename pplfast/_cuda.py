"""``backend="cuda"``: launchers for the CUDA kernels of ``csrc/cuda`` (module ``pplfast._cuda_C``).

The compiled module takes raw pointers, sizes, element strides and a stream handle; this file is
the torch side: output and workspace allocation, ``data_ptr()`` and the current stream.

Hidden-states path: :func:`pplfast._chunked.chunked_linear_token_nll` with the logits kernel of
this module as its launcher (chunked cuBLAS GEMMs into one reused float32 buffer; the
fp32-output GEMM is explained in that module's docstring).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _cuda_C, _env
from ._chunked import (Scored, chunked_linear_compare, chunked_linear_token_nll,
                       chunked_linear_token_stats)

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def plan(rows: int, V: int, device: torch.device, *, threads: int = 0, splits: int = 0):
    """Launch choice ``(threads, splits, segment, workspace_floats)`` for ``rows`` rows of width V.

    ``threads == 32`` is a warp per row; ``splits > 1`` cuts each row into segments of
    ``segment`` elements merged by a second kernel. ``threads`` / ``splits`` > 0 override.
    """
    return _cuda_C.plan(rows, V, _env.sm_count(device), threads, splits)


def _launch(out: torch.Tensor, logits3: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            softcap: Optional[float], temperature: float, threads: int = 0,
            splits: int = 0) -> None:
    """Write the NLL of every row of ``logits3`` (B, T, V) into the contiguous float32 ``out``."""
    B, T, V = logits3.shape
    device = logits3.device
    if device.type != "cuda":
        raise ValueError(f"the CUDA kernels need CUDA tensors, got logits on {device}")
    if logits3.dtype not in _DTYPE_CODE:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits3.dtype}")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != B * T:
        raise ValueError("out must be a contiguous float32 tensor with one element per row")
    if B * T == 0:
        return
    targets = targets.to(device=device, dtype=torch.int64).contiguous()
    sm_count = _env.sm_count(device)
    _, _, _, workspace_floats = _cuda_C.plan(B * T, V, sm_count, threads, splits)
    workspace = (torch.empty(workspace_floats, dtype=torch.float32, device=device)
                 if workspace_floats else None)
    sB, sT, sV = logits3.stride()
    # Kernels run on PyTorch's current stream of the tensors' device, so that they are ordered
    # with the producer of the logits and with any later use of `out` and of the workspace (whose
    # memory the caching allocator may hand out again once it is freed here).
    stream = torch.cuda.current_stream(device).cuda_stream
    # The module's own (static) CUDA runtime and PyTorch's share the device's primary context and
    # the thread's current context, so the stream handle is valid in both. Making the tensors'
    # device current through PyTorch first means the module's cudaSetDevice changes nothing, and
    # PyTorch's notion of the current device is restored on exit.
    with torch.cuda.device(device):
        _cuda_C.token_nll(
            logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], B, T, V, sB, sT, sV,
            targets.data_ptr(), int(ignore_index), out.data_ptr(),
            0 if workspace is None else workspace.data_ptr(), workspace_floats,
            softcap is not None, 0.0 if softcap is None else float(softcap), float(temperature),
            device.index, sm_count, stream, threads, splits,
        )


def token_nll(logits3, targets, ignore_index, softcap, temperature, *, threads: int = 0,
              splits: int = 0) -> torch.Tensor:
    """Per-token NLL of the (B, T, V) logits, any strides and dtype, as float32 (B * T,).

    Equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
    with ``z = softcap * tanh(logits / softcap) / temperature`` (no cap when ``softcap`` is None).
    ``threads`` / ``splits`` > 0 override the launch heuristics (see :func:`plan`).
    """
    B, T, _ = logits3.shape
    out = torch.empty(B * T, dtype=torch.float32, device=logits3.device)
    _launch(out, logits3, targets, ignore_index, softcap, temperature, threads, splits)
    return out


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                     budget_mb: Optional[float] = None,
                     logits_dtype: Optional[torch.dtype] = None,
                     scored: Optional[Scored] = None) -> torch.Tensor:
    """Per-token NLL of ``hidden2 @ weight.T + bias``, chunked, as float32 (N,).

    :func:`pplfast._chunked.chunked_linear_token_nll` with :func:`token_nll` reducing each chunk.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16 CUDA tensor, any strides.
        weight: ``(V, D)`` same dtype; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index, softcap, temperature: as in :func:`token_nll`.
        budget_mb: MiB for one chunk of logits (default ``PPLFAST_GPU_CHUNK_MB`` or 256).
        logits_dtype: dtype of the logits buffer; default float32 (see ``pplfast._chunked``),
            the input dtype where no fp32-output GEMM exists.
        scored: ``pplfast._chunked._select_scored`` of ``targets``, when the caller has it.

    Returns:
        ``(N,)`` float32, equal to ``token_nll(F.linear(hidden2, weight, bias), targets, ...)``
        computed in float64 (up to the GEMM's rounding).
    """
    return chunked_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap,
                                    temperature, launcher=token_nll, budget_mb=budget_mb,
                                    logits_dtype=logits_dtype, scored=scored)


# token_stats on CUDA tensors runs the Triton statistics kernel (pplfast.kernels.token_stats):
# there is no CUDA C++ statistics kernel yet, and no GPU measurement has said that one would be
# faster. The hidden path is the chunked GEMM loop of the NLL with that kernel as its launcher.
# (triton is imported only when the statistics are asked for: the CUDA backend runs without it)
def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    from .kernels.token_stats import token_stats_forward

    return token_stats_forward(logits3, targets, ignore_index, softcap, temperature, top_k,
                               sm_count=_env.sm_count(logits3.device))


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k,
                       *, scored: Optional[Scored] = None):
    from .kernels.token_stats import token_stats_forward

    launcher = functools.partial(token_stats_forward, sm_count=_env.sm_count(hidden2.device))
    return chunked_linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap,
                                      temperature, top_k, launcher=launcher, scored=scored)


# compare / linear_compare have no CUDA C++ kernel yet: on CUDA tensors they run the Triton
# kernel of pplfast.kernels.compare, and the hidden path is the chunked GEMM loop with that kernel
# as its launcher (triton is imported only when a comparison is asked for, as for the statistics).
def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    from .kernels.compare import compare_forward

    return compare_forward(logits3_base, logits3_test, targets, ignore_index, softcap,
                           temperature, sm_count=_env.sm_count(logits3_base.device))


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature, *,
                   scored: Optional[Scored] = None):
    return chunked_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test,
                                  weight_test, bias_test, targets, ignore_index, softcap,
                                  temperature, launcher=compare, scored=scored)
