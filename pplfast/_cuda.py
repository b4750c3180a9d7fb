"""``backend="cuda"``: launchers for the CUDA kernels of ``csrc/cuda`` (module ``pplfast._cuda_C``).

The compiled module takes raw pointers, sizes, element strides and a stream handle; this file is
the torch side: output and workspace allocation, ``data_ptr()`` and the current stream.

Hidden-states path: ``pplfast._linear.chunked_linear_token_nll`` with the logits kernel of this
module as its launcher. The scored tokens are cut into chunks; each chunk's logits come from one
cuBLAS GEMM (through PyTorch) into a single reused buffer and are reduced at once by the logits
kernel, so the extra memory is one chunk (``PPLFAST_GPU_CHUNK_MB``, default 256 MiB) plus O(N),
never N x V. The buffer is float32:

- float32 inputs: an fp32 GEMM (IEEE products unless the caller enabled TF32 through
  ``torch.backends.cuda.matmul.allow_tf32``);
- float16 / bfloat16 inputs: ``torch.mm(h, w.T, out_dtype=torch.float32)``, cuBLAS with fp32
  accumulation *and* fp32 output. The same-dtype PyTorch path (``F.linear``) accumulates in fp32
  too but then rounds every logit to 8 (bf16) or 11 (fp16) bits; skipping that rounding makes
  this path strictly more accurate, for twice the buffer bytes per logit. A bias is added in
  float32. Where PyTorch has no ``out_dtype`` GEMM for these tensors, the buffer falls back to
  the input dtype: then the logits are exactly those of ``F.linear``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _cuda_C
from ._linear import chunked_linear_token_nll

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(rows: int, V: int, device: torch.device, *, threads: int = 0, splits: int = 0):
    """Launch choice ``(threads, splits, segment, workspace_floats)`` for ``rows`` rows of width V.

    ``threads == 32`` is a warp per row; ``splits > 1`` cuts each row into segments of
    ``segment`` elements merged by a second kernel. ``threads`` / ``splits`` > 0 override.
    """
    return _cuda_C.plan(rows, V, _sm_count(device.index), threads, splits)


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
    sm_count = _sm_count(device.index)
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
                     logits_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Per-token NLL of ``hidden2 @ weight.T + bias``, chunked, as float32 (N,).

    :func:`pplfast._linear.chunked_linear_token_nll` with :func:`token_nll` reducing each chunk.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16 CUDA tensor, any strides.
        weight: ``(V, D)`` same dtype; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index, softcap, temperature: as in :func:`token_nll`.
        budget_mb: MiB for one chunk of logits (default ``PPLFAST_GPU_CHUNK_MB`` or 256).
        logits_dtype: dtype of the logits buffer; default float32 (see the module docstring),
            the input dtype where no fp32-output GEMM exists.

    Returns:
        ``(N,)`` float32, equal to ``token_nll(F.linear(hidden2, weight, bias), targets, ...)``
        computed in float64 (up to the GEMM's rounding).
    """
    return chunked_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap,
                                    temperature, launcher=token_nll, budget_mb=budget_mb,
                                    logits_dtype=logits_dtype)


# compare / linear_compare have no CUDA C++ kernel yet: on CUDA tensors they run the Triton
# kernel of pplfast.kernels.compare (and its chunked-GEMM hidden path), which needs triton.
def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    from . import _triton

    return _triton.compare(logits3_base, logits3_test, targets, ignore_index, softcap,
                           temperature)


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature):
    from . import _triton

    return _triton.linear_compare(hidden2_base, weight_base, bias_base, hidden2_test,
                                  weight_test, bias_test, targets, ignore_index, softcap,
                                  temperature)
