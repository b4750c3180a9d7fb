"""Compare two models token by token: KL both ways, both NLLs, both argmaxes, in one pass.

``compare`` / ``linear_compare`` give a :class:`TokenComparison` per position; :class:`Comparison`
accumulates them over batches (and ranks) into llama.cpp's comparison statistics
(:class:`ComparisonResult`). README section "Comparing two models".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _dispatch, _validate
from .api import _prepare, _rows3


@dataclass(frozen=True)
class TokenComparison:
    """Per-position comparison of a base and a test model; every field has the leading shape of
    :func:`pplfast.token_nll`'s result. ``p = softmax(z_base)``, ``q = softmax(z_test)``.

    Fields (ignored positions: 0 for the float fields, -1 for the integer ones):
        kl: float32, ``KL(p‖q) = Σ_v p_v (log p_v − log q_v)`` in nats, ≥ 0.
        kl_reverse: float32, ``KL(q‖p)``.
        nll_base, nll_test: float32, as :func:`pplfast.token_nll` of each model.
        argmax_base, argmax_test: int64, index of the largest logit of each model (the lowest on
            ties, the first NaN where there is one, as ``torch.argmax``).
    """

    kl: torch.Tensor
    kl_reverse: torch.Tensor
    nll_base: torch.Tensor
    nll_test: torch.Tensor
    argmax_base: torch.Tensor
    argmax_test: torch.Tensor

    @property
    def delta_p(self) -> torch.Tensor:
        """``exp(−nll_test) − exp(−nll_base)``: the change in the target's probability."""
        return (torch.exp(-self.nll_test.double()) - torch.exp(-self.nll_base.double())).float()

    def reshape(self, *shape) -> "TokenComparison":
        return TokenComparison(*(getattr(self, f).reshape(*shape) for f in _FIELDS))


_FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


def _empty(lead, device) -> TokenComparison:
    zeros = [torch.zeros(lead, dtype=torch.float32, device=device) for _ in range(4)]
    ints = [torch.full(lead, -1, dtype=torch.int64, device=device) for _ in range(2)]
    return TokenComparison(*zeros, *ints)


def _same_shape(name_base, base, name_test, test, what="shape") -> None:
    if tuple(base.shape) != tuple(test.shape):
        raise ValueError(f"{name_base} has {what} {tuple(base.shape)} but {name_test} has "
                         f"{what} {tuple(test.shape)}: both models must give the same "
                         f"{'positions and vocabulary' if what == 'shape' else what}")


def compare(
    logits_base: torch.Tensor,
    logits_test: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> TokenComparison:
    """KL divergence both ways, both NLLs and both argmaxes, one pass over the two logit rows.

    Equals, in float64: ``lp = log_softmax(z_base)``, ``lq = log_softmax(z_test)``,
    ``kl = (lp.exp() * (lp - lq)).sum(-1)`` (terms with ``p_v = 0`` count 0),
    ``F.cross_entropy`` of each and ``argmax`` of each logits tensor, where ``z`` are the logits
    soft-capped (``softcap * tanh(z / softcap)``) when ``softcap`` is given, then divided by
    ``temperature`` (both models alike). No ``(..., V)`` temporary is built.

    Args:
        logits_base, logits_test: ``(..., V)`` float32, float16 or bfloat16 (each its own dtype
            and strides), the same shape.
        targets: ``(...)`` int64 or int32, shared by both, in ``[0, V)`` or ``ignore_index``.
        ignore_index, shift, softcap, temperature, backend: as in :func:`pplfast.token_nll`.

    Returns:
        :class:`TokenComparison` with the leading shape (``(..., T - 1)`` with ``shift``).
    """
    _validate.float_tensor("logits_base", logits_base)
    _validate.float_tensor("logits_test", logits_test)
    _same_shape("logits_base", logits_base, "logits_test", logits_test)
    logits_base, targets, backend, (ignore_index, softcap, temperature) = _prepare(
        "logits_base", logits_base, targets, ignore_index, shift, softcap, temperature, backend,
        "compare", logits_test=logits_test,
    )
    if shift:
        logits_test = logits_test[..., :-1, :]
    lead = targets.shape
    V = logits_base.shape[-1]
    _validate.target_range(targets, V, ignore_index)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        return _empty(lead, logits_base.device)
    with torch.no_grad():
        fields = _dispatch.module(backend).compare(
            _rows3(logits_base), _rows3(logits_test), flat_targets, ignore_index,
            None if softcap is None else float(softcap), float(temperature),
        )
    return TokenComparison(*(f.reshape(lead) for f in fields))


def linear_compare(
    hidden_base: torch.Tensor,
    weight_base: torch.Tensor,
    hidden_test: torch.Tensor,
    weight_test: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias_base: Optional[torch.Tensor] = None,
    bias_test: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> TokenComparison:
    """:func:`compare` of ``F.linear(hidden_base, weight_base, bias_base)`` and
    ``F.linear(hidden_test, weight_test, bias_test)``, never building either logits tensor.

    Args:
        hidden_base, hidden_test: ``(..., D_base)`` and ``(..., D_test)`` final hidden states
            (the widths may differ; the leading shapes must match).
        weight_base, weight_test: ``(V, D_base)`` and ``(V, D_test)`` output layers, each in its
            hidden states' dtype; the same ``V``.
        targets, bias_base, bias_test, ignore_index, shift, softcap, temperature, backend: as in
            :func:`compare` and :func:`pplfast.linear_token_nll`.

    Returns:
        :class:`TokenComparison`, as :func:`compare`.
    """
    for name, x in (("hidden_base", hidden_base), ("weight_base", weight_base),
                    ("hidden_test", hidden_test), ("weight_test", weight_test)):
        _validate.float_tensor(name, x)
    _same_shape("hidden_base", hidden_base.shape[:-1], "hidden_test", hidden_test.shape[:-1],
                what="leading shape")
    if weight_base.ndim == 2 and weight_test.ndim == 2 and weight_base.shape[0] != weight_test.shape[0]:
        raise ValueError(f"weight_base has shape {tuple(weight_base.shape)} but weight_test has "
                         f"shape {tuple(weight_test.shape)}: the two vocabularies must have the "
                         "same size")
    hidden_base, targets, backend, (ignore_index, softcap, temperature) = _prepare(
        "hidden_base", hidden_base, targets, ignore_index, shift, softcap, temperature, backend,
        "linear_compare", weight_base=weight_base, bias_base=bias_base, hidden_test=hidden_test,
        weight_test=weight_test, bias_test=bias_test,
    )
    if shift:
        hidden_test = hidden_test[..., :-1, :]
    _validate.linear_shapes(hidden_base, weight_base, bias_base)
    _validate.linear_shapes(hidden_test, weight_test, bias_test)
    lead = targets.shape
    V = weight_base.shape[0]
    _validate.target_range(targets, V, ignore_index)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    if flat_targets.numel() == 0 or V == 0:
        return _empty(lead, hidden_base.device)
    with torch.no_grad():
        launchers = _dispatch.module(backend)
        args = (None if softcap is None else float(softcap), float(temperature))
        if hidden_base.shape[-1] == 0 or hidden_test.shape[-1] == 0:
            # a zero-width model's logits are its bias (or zeros): compare through the logits path
            rows = flat_targets.numel()
            zb = _zero_width_logits(hidden_base, weight_base, bias_base, rows)
            zt = _zero_width_logits(hidden_test, weight_test, bias_test, rows)
            fields = launchers.compare(zb, zt, flat_targets, ignore_index, *args)
        else:
            fields = launchers.linear_compare(
                hidden_base.reshape(-1, hidden_base.shape[-1]), weight_base, bias_base,
                hidden_test.reshape(-1, hidden_test.shape[-1]), weight_test, bias_test,
                flat_targets, ignore_index, *args,
            )
    return TokenComparison(*(f.reshape(lead) for f in fields))


def _zero_width_logits(hidden, weight, bias, rows):
    if hidden.shape[-1] == 0:
        row = bias if bias is not None else weight.new_zeros(weight.shape[0])
        return row.expand(1, rows, weight.shape[0])
    z = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), weight.float(),
                                   None if bias is None else bias.float())
    return z.unsqueeze(0)
