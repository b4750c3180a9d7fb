"""Per-token statistics in one pass: ``token_stats`` / ``linear_token_stats`` and ``TokenStats``.

Validation and layouts as in :mod:`pplfast.api`; the numerics live in each backend's
``token_stats`` / ``linear_token_stats`` launcher (see ``pplfast._dispatch``).
"""
from __future__ import annotations

import math
from numbers import Integral
from typing import Optional

import torch

from . import _dispatch, _validate
from ._results import TokenStats
from .api import _prepare, _rows3

MAX_TOP_K = 64


def check_top_k(top_k, V: int) -> int:
    """``top_k`` as an int in ``[0, min(V, 64)]``, else ValueError naming it and its value."""
    bound = min(V, MAX_TOP_K)
    if isinstance(top_k, torch.Tensor) and top_k.ndim == 0 and not top_k.is_floating_point():
        top_k = top_k.item()
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 0 <= top_k <= bound:
        raise ValueError(f"top_k must be an int in [0, {bound}] (min(V, {MAX_TOP_K}) with "
                         f"V={V}), got {top_k!r}")
    return int(top_k)


def _result(fields, lead, top_k: int) -> TokenStats:
    nll, entropy, max_logprob, argmax, rank, top_ids, top_lp = fields
    k = (top_k,)
    return TokenStats(
        nll.reshape(lead), entropy.reshape(lead), max_logprob.reshape(lead),
        argmax.reshape(lead), rank.reshape(lead),
        None if not top_k else top_ids.reshape(*lead, *k),
        None if not top_k else top_lp.reshape(*lead, *k),
    )


def _nothing_scored(lead, top_k: int, device) -> TokenStats:
    """Every position ignored (or none at all): floats 0, integers -1."""
    n = math.prod(lead)

    def zeros(*shape):
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def minus_one(*shape):
        return torch.full(shape, -1, dtype=torch.int64, device=device)

    fields = (zeros(n), zeros(n), zeros(n), minus_one(n), minus_one(n), minus_one(n, top_k),
              zeros(n, top_k))
    return _result(fields, lead, top_k)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    top_k: int = 0,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
) -> TokenStats:
    """Per-token NLL, entropy, max log-probability, argmax, target rank and top-k, in one pass.

    With ``z`` the (soft-capped, temperature-scaled) logits and ``logp = z.double().log_softmax(-1)``
    this equals, at scored positions: ``nll = -logp[target]``, ``entropy = -(logp.exp() * logp)
    .sum(-1)`` (``-inf`` entries add 0), ``max_logprob = logp.max(-1)``, ``argmax = z.argmax(-1)``,
    ``rank = (z > z[target]).sum(-1)``, ``torch.topk(logp, top_k)``; no ``(..., V)`` temporary is
    built.

    Args:
        logits, targets, ignore_index, shift, softcap, temperature, backend, check_targets: as
            in :func:`pplfast.token_nll`.
        top_k: number of most probable tokens to return per position, in ``[0, min(V, 64)]``.

    Returns:
        :class:`TokenStats` with the leading shape of ``token_nll``'s result.
    """
    backend, (ignore_index, softcap, temperature) = _prepare(
        "logits", logits, targets, ignore_index, shift, softcap, temperature, check_targets,
        backend,
    )
    if shift:
        logits, targets = logits[..., :-1, :], targets[..., 1:]
    V = logits.shape[-1]
    top_k = check_top_k(top_k, V)
    lead = targets.shape
    if check_targets:
        _validate.scored_targets(targets, V, ignore_index, check=True, count=False)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        return _nothing_scored(lead, top_k, logits.device)
    with torch.no_grad():
        fields = _dispatch.module(backend).token_stats(
            _rows3(logits), flat_targets, ignore_index, softcap, float(temperature), top_k
        )
    return _result(fields, lead, top_k)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    top_k: int = 0,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    check_targets: bool = True,
) -> TokenStats:
    """:func:`token_stats` of ``F.linear(hidden, weight, bias)``, never building the logits.

    Args:
        hidden, weight, targets, bias, ignore_index, shift, softcap, temperature, backend,
            check_targets: as in :func:`pplfast.linear_token_nll`.
        top_k: as in :func:`token_stats`.

    Returns:
        :class:`TokenStats`; ``nll`` is what ``linear_token_nll`` returns.
    """
    _validate.float_tensor("weight", weight)
    backend, (ignore_index, softcap, temperature) = _prepare(
        "hidden", hidden, targets, ignore_index, shift, softcap, temperature, check_targets,
        backend, weight=weight, bias=bias,
    )
    _validate.linear_shapes(hidden, weight, bias)
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    V, D = weight.shape
    top_k = check_top_k(top_k, V)
    lead = targets.shape
    if check_targets:
        _validate.scored_targets(targets, V, ignore_index, check=True, count=False)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        return _nothing_scored(lead, top_k, hidden.device)
    launchers = _dispatch.module(backend)
    with torch.no_grad():
        if D == 0:
            # every row's logits are the bias (or zeros): one row through a stride-0 view
            row = bias if bias is not None else weight.new_zeros(V)
            fields = launchers.token_stats(
                row.expand(1, flat_targets.numel(), V), flat_targets, ignore_index, softcap,
                float(temperature), top_k,
            )
        else:
            fields = launchers.linear_token_stats(
                hidden.reshape(-1, D), weight, bias, flat_targets, ignore_index, softcap,
                float(temperature), top_k,
            )
    return _result(fields, lead, top_k)
