"""Two models token by token, declared: ``compare`` / ``linear_compare`` give KL both ways,
both NLLs and both argmaxes per position (:class:`TokenComparison`) in one pass.

Each function states its contract and hands the call to the front door (``pplfast._frontend``).
:class:`pplfast.Comparison` (``pplfast.metric``) accumulates the results over batches and ranks
into llama.cpp's comparison statistics (:class:`ComparisonResult`); docs/compare.md.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _frontend
from .vocab_parallel import VocabShard
from ._results import ComparisonResult, TokenComparison

__all__ = ["ComparisonResult", "TokenComparison", "compare", "linear_compare"]


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
    check_targets: bool = True,
    vocab_shard: Optional[VocabShard] = None,
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
        ignore_index, shift, softcap, temperature, backend, check_targets: as in
            :func:`pplfast.token_nll`.
        vocab_shard: as in :func:`pplfast.token_nll`: both logits tensors hold the columns
            ``[start, stop)`` (or are ``DTensor`` s sharded alike); one collective per call.

    Returns:
        :class:`TokenComparison` with the leading shape (``(..., T - 1)`` with ``shift``).
    """
    return _frontend.compare(logits_base, logits_test, targets, ignore_index=ignore_index,
                             shift=shift, softcap=softcap, temperature=temperature,
                             backend=backend, check_targets=check_targets, vocab_shard=vocab_shard)


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
    check_targets: bool = True,
    vocab_shard: Optional[VocabShard] = None,
) -> TokenComparison:
    """:func:`compare` of ``F.linear(hidden_base, weight_base, bias_base)`` and
    ``F.linear(hidden_test, weight_test, bias_test)``, never building either logits tensor.

    Args:
        hidden_base, hidden_test: ``(..., D_base)`` and ``(..., D_test)`` final hidden states
            (the widths may differ; the leading shapes must match).
        weight_base, weight_test: ``(V, D_base)`` and ``(V, D_test)`` output layers, each in its
            hidden states' dtype; the same ``V``.
        targets, bias_base, bias_test, ignore_index, shift, softcap, temperature, backend,
            check_targets: as in :func:`compare` and :func:`pplfast.linear_token_nll`.
        vocab_shard: as in :func:`pplfast.linear_token_nll`: both weights and biases hold the
            vocabulary rows ``[start, stop)`` (or are ``DTensor`` s sharded alike).

    Returns:
        :class:`TokenComparison`, as :func:`compare`.
    """
    return _frontend.linear_compare(hidden_base, weight_base, hidden_test, weight_test, targets,
                                    bias_base=bias_base, bias_test=bias_test,
                                    ignore_index=ignore_index, shift=shift, softcap=softcap,
                                    temperature=temperature, backend=backend,
                                    check_targets=check_targets, vocab_shard=vocab_shard)
