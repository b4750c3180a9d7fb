"""Public functions: validate, normalise layouts, dispatch. No numerics live here."""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, _validate


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
    try:
        return x.view(-1, lead[-1], W)
    except RuntimeError:
        return x.reshape(-1, lead[-1], W)


def _prepare(name, x, targets, ignore_index, shift, softcap, temperature, backend, op, **others):
    _validate.float_tensor(name, x)
    _validate.target_tensor(targets)
    ignore_index, softcap, temperature = _validate.options(ignore_index, shift, softcap,
                                                           temperature)
    _validate.leading_shape(name, x, targets, shift)
    device = _validate.same_device(**{name: x, "targets": targets}, **others)
    resolved = _dispatch.resolve(backend, device, op)
    if shift:
        x, targets = x[..., :-1, :], targets[..., 1:]
    return x, targets, resolved, (ignore_index, softcap, temperature)


def token_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-token negative log-likelihood, in one pass over the logits.

    Equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
    cast to float32, where ``z = logits``, soft-capped (``softcap * tanh(z / softcap)``) when
    ``softcap`` is given, then divided by ``temperature``. No ``(..., V)`` temporary is built.

    Args:
        logits: ``(..., V)`` float32, float16 or bfloat16, any strides.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        ignore_index: positions with this target get NLL 0.
        shift: position ``t`` predicts ``targets[..., t + 1]`` (pass ``input_ids``); the
            output then has shape ``(..., T - 1)``.
        softcap: cap applied as ``softcap * tanh(z / softcap)`` (Gemma 2 style), or None.
        temperature: divide the (capped) logits by this, > 0.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).
    """
    logits, targets, backend, (ignore_index, softcap, temperature) = _prepare(
        "logits", logits, targets, ignore_index, shift, softcap, temperature, backend, "token_nll"
    )
    lead = targets.shape
    V = logits.shape[-1]
    _validate.target_range(targets, V, ignore_index)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        # no rows, or every target is ignore_index (the range check allows nothing else at V=0)
        return torch.zeros(lead, dtype=torch.float32, device=logits.device)
    with torch.no_grad():  # scoring is forward-only; also accepts parameters with requires_grad
        nll = _dispatch.module(backend).token_nll(
            _rows3(logits), flat_targets, ignore_index,
            None if softcap is None else float(softcap), float(temperature),
        )
    return nll.reshape(lead)


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
) -> torch.Tensor:
    """Per-token NLL of the output layer applied to hidden states, never building the logits.

    Equals ``token_nll(F.linear(hidden, weight, bias), targets, ...)`` computed in float64.

    Args:
        hidden: ``(..., D)`` float32, float16 or bfloat16 final hidden states.
        weight: ``(V, D)`` output-layer weight (the ``nn.Linear`` / ``lm_head`` layout), same
            dtype as ``hidden``.
        targets: ``(...)`` int64 or int32, each in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``(V,)`` output-layer bias.
        ignore_index, shift, softcap, temperature, backend: as in :func:`token_nll`.

    Returns:
        float32 tensor of shape ``(...)`` (or ``(..., T - 1)`` with ``shift``).
    """
    _validate.float_tensor("weight", weight)  # before _prepare reads its device
    hidden, targets, backend, (ignore_index, softcap, temperature) = _prepare(
        "hidden", hidden, targets, ignore_index, shift, softcap, temperature, backend,
        "linear_token_nll", weight=weight, bias=bias,
    )
    _validate.linear_shapes(hidden, weight, bias)
    lead = targets.shape
    V, D = weight.shape
    _validate.target_range(targets, V, ignore_index)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        return torch.zeros(lead, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        if D == 0:
            # every row's logits are the bias (or zeros): score one row through a stride-0 view
            row = bias if bias is not None else weight.new_zeros(V)
            nll = _dispatch.module(backend).token_nll(
                row.expand(1, flat_targets.numel(), V), flat_targets, ignore_index,
                None if softcap is None else float(softcap), float(temperature),
            )
            return nll.reshape(lead)
        nll = _dispatch.module(backend).linear_token_nll(
            hidden.reshape(-1, D), weight, bias, flat_targets, ignore_index,
            None if softcap is None else float(softcap), float(temperature),
        )
    return nll.reshape(lead)


def _perplexity(nll: torch.Tensor, targets: torch.Tensor, ignore_index: int, shift: bool):
    if shift:
        targets = targets[..., 1:]
    count = (targets != ignore_index).sum()
    return torch.exp(nll.double().sum() / count).float()


def perplexity(logits: torch.Tensor, targets: torch.Tensor, **options) -> torch.Tensor:
    """``exp(sum(nll) / count(scored))`` of :func:`token_nll`; 0-dim float32, NaN if nothing is scored.

    Takes the same keyword options as :func:`token_nll`; the sum is taken in float64.
    """
    nll = token_nll(logits, targets, **options)
    return _perplexity(nll, targets, options.get("ignore_index", -100), options.get("shift", False))


def linear_perplexity(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **options
) -> torch.Tensor:
    """Perplexity from hidden states and the output layer; see :func:`linear_token_nll`."""
    nll = linear_token_nll(hidden, weight, targets, **options)
    return _perplexity(nll, targets, options.get("ignore_index", -100), options.get("shift", False))
