"""Public functions: validate, normalise layouts, resolve the backend, call the op. No numerics
live here.

The layouts handed to the ops never copy the caller's tensors where strides allow: logits go as a
``(B, T, V)`` view (``shift=True`` slices ``logits[..., :-1, :]`` keep a (batch, time) stride
pair), hidden states as an ``(N, D)`` view. ``shift=True`` on ``(B, T, D)`` hidden states with
B > 1 cannot be one ``(N, D)`` view of ``hidden[:, :-1]``: the whole ``hidden`` goes as
``(B * T, D)`` with the last position of each sequence given ``ignore_index``, so that position
costs no GEMM (ignored rows are dropped by row index) and nothing is copied.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch, _ops, _validate


def _merge_free(x: torch.Tensor, dims: int) -> bool:
    """Whether the first ``dims`` dimensions of ``x`` merge into one by a view (no copy)."""
    sizes, strides = x.shape[:dims], x.stride()[:dims]
    if any(size == 0 for size in sizes):
        return True
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """View ``(..., W)`` as ``(B, T, W)`` without copying whenever the strides allow it.

    Slices such as ``logits[:, :-1]`` (the ``shift=True`` case) cannot be flattened to one row
    stride but keep a (batch, time) stride pair, which every kernel takes.
    """
    W = x.shape[-1]
    lead = x.shape[:-1]
    if len(lead) == 0:
        return x.reshape(1, 1, W)
    if len(lead) == 1:
        return x.unsqueeze(0)
    shape = (math.prod(lead[:-1]), lead[-1], W)  # no -1: it is ambiguous for empty tensors
    return x.view(shape) if _merge_free(x, len(lead) - 1) else x.reshape(shape)


def _rows2(hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int, shift: bool):
    """``(hidden2, targets, crop)``: hidden as ``(N, D)`` and the targets of its rows; ``crop``
    when the last position of every sequence is a padding row to drop from the output."""
    def rows(x):
        return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # a view where strides allow

    if not shift:
        return rows(hidden), targets, False
    sliced, shifted = hidden[..., :-1, :], targets[..., 1:]
    if _merge_free(sliced, sliced.ndim - 1) or not _merge_free(hidden, hidden.ndim - 1):
        return rows(sliced), shifted, False  # a view in the first case
    shifted = shifted.to(torch.int64)
    padding = shifted.new_full((*shifted.shape[:-1], 1), ignore_index)
    return rows(hidden), torch.cat([shifted, padding], dim=-1), True


def _prepare(name, x, targets, ignore_index, shift, softcap, temperature, check_targets, backend,
             **others):
    _validate.float_tensor(name, x)
    _validate.target_tensor(targets)
    ignore_index, softcap, temperature = _validate.options(ignore_index, shift, softcap,
                                                           temperature)
    if not isinstance(check_targets, bool):
        raise TypeError(f"check_targets must be a bool, got {check_targets!r}")
    _validate.leading_shape(name, x, targets, shift)
    device = _validate.same_device(**{name: x, "targets": targets}, **others)
    resolved = _dispatch.resolve(backend, device)
    return resolved, (ignore_index, softcap, temperature)


def token_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """Per-token negative log-likelihood, in one pass over the logits.

    Equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
    cast to float32, where ``z = logits``, soft-capped (``softcap * tanh(z / softcap)``) when
    ``softcap`` is given, then divided by ``temperature``. No ``(..., V)`` temporary is built.

    Args:
        logits: ``(..., V)`` float32, float16 or bfloat16, any strides.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: positions with this target get NLL 0. Compared as an integer, not in
            the targets' dtype: a value that dtype cannot hold (``2**40`` with int32 targets)
            equals no target, and every position is scored.
        shift: position ``t`` predicts ``targets[..., t + 1]`` (pass ``input_ids``); the
            output then has shape ``(..., T - 1)``.
        softcap: cap applied as ``softcap * tanh(z / softcap)`` (Gemma 2 style), or None.
        temperature: divide the (capped) logits by this, > 0.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        check_targets: check that every target is ``ignore_index`` or in ``[0, V)`` (one host
            sync per call); pass False only for targets already validated, since an
            out-of-range target is then an out-of-bounds read.

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).

    The work runs in the custom op ``torch.ops.pplfast.token_nll``. Under ``torch.compile``
    (``fullgraph=True`` works) validation and backend choice run at trace time and the op is one
    node of the graph; the target-range check runs inside the op at run time, as in eager mode.
    """
    backend, (ignore_index, softcap, temperature) = _prepare(
        "logits", logits, targets, ignore_index, shift, softcap, temperature, check_targets,
        backend,
    )
    if shift:
        logits, targets = logits[..., :-1, :], targets[..., 1:]
    with torch.no_grad():  # scoring is forward-only; also accepts parameters with requires_grad
        nll = _ops.token_nll(_rows3(logits), targets, ignore_index, softcap, temperature, backend,
                             check_targets)
    return nll.view(targets.shape)


def linear_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """Per-token NLL of the output layer applied to hidden states, never building the logits.

    Equals ``token_nll(F.linear(hidden, weight, bias), targets, ...)`` computed in float64.

    Args:
        hidden: ``(..., D)`` float32, float16 or bfloat16 final hidden states.
        weight: ``(V, D)`` output-layer weight (the ``nn.Linear`` / ``lm_head`` layout), same
            dtype as ``hidden``.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``(V,)`` output-layer bias.
        ignore_index, shift, softcap, temperature, backend, check_targets: as in
            :func:`token_nll`; the op is ``torch.ops.pplfast.linear_token_nll``.

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).
    """
    _validate.float_tensor("weight", weight)  # before _prepare reads its device
    backend, (ignore_index, softcap, temperature) = _prepare(
        "hidden", hidden, targets, ignore_index, shift, softcap, temperature, check_targets,
        backend, weight=weight, bias=bias,
    )
    _validate.linear_shapes(hidden, weight, bias)
    hidden2, targets, crop = _rows2(hidden, targets, ignore_index, shift)
    with torch.no_grad():
        nll = _ops.linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap,
                                    temperature, backend, check_targets)
    nll = nll.view(targets.shape)
    return nll[..., :-1].contiguous() if crop else nll


def _perplexity(nll: torch.Tensor, targets: torch.Tensor, ignore_index: int, shift: bool):
    if shift:
        targets = targets[..., 1:]
    count = _validate.scored_mask(targets, ignore_index).sum()
    return torch.exp(nll.double().sum() / count).float()


def perplexity(logits: torch.Tensor, targets: torch.Tensor, **options) -> torch.Tensor:
    """``exp(sum(nll) / count(scored))`` of :func:`token_nll`; 0-dim float32, NaN if nothing is scored.

    Takes the same keyword options as :func:`token_nll` (``check_targets`` included); the sum is
    taken in float64.
    """
    nll = token_nll(logits, targets, **options)
    return _perplexity(nll, targets, options.get("ignore_index", -100), options.get("shift", False))


def linear_perplexity(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **options
) -> torch.Tensor:
    """Perplexity from hidden states and the output layer; see :func:`linear_token_nll`."""
    nll = linear_token_nll(hidden, weight, targets, **options)
    return _perplexity(nll, targets, options.get("ignore_index", -100), options.get("shift", False))
