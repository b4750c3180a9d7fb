"""Per-token statistics in one pass, declared: ``token_stats`` / ``linear_token_stats``.

Each function states its contract and hands the call to the front door (``pplfast._frontend``);
the numerics live in each backend's ``token_stats`` / ``linear_token_stats`` launcher (see
``pplfast._dispatch``). The result type is :class:`TokenStats`.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _frontend
from .vocab_parallel import VocabShard
from ._results import TokenStats
from ._validate import MAX_TOP_K
from ._validate import top_k as check_top_k  # top_k as an int in [0, min(V, 64)], or ValueError

__all__ = ["MAX_TOP_K", "TokenStats", "check_top_k", "linear_token_stats", "token_stats"]


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
    vocab_shard: Optional[VocabShard] = None,
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
        vocab_shard: as in :func:`pplfast.token_nll` (``logits`` holds the columns
            ``[start, stop)``; the statistics make two small collectives per call, the second
            after the target's logit is known).

    Returns:
        :class:`TokenStats` with the leading shape of ``token_nll``'s result.
    """
    return _frontend.token_stats(logits, targets, top_k=top_k, ignore_index=ignore_index,
                                 shift=shift, softcap=softcap, temperature=temperature,
                                 backend=backend,
                                 check_targets=check_targets, vocab_shard=vocab_shard)


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
    vocab_shard: Optional[VocabShard] = None,
) -> TokenStats:
    """:func:`token_stats` of ``F.linear(hidden, weight, bias)``, never building the logits.

    Args:
        hidden, weight, targets, bias, ignore_index, shift, softcap, temperature, backend,
            check_targets: as in :func:`pplfast.linear_token_nll`.
        top_k: as in :func:`token_stats`.
        vocab_shard: as in :func:`pplfast.linear_token_nll` (``weight`` and ``bias`` hold the
            vocabulary rows ``[start, stop)``).

    Returns:
        :class:`TokenStats`; ``nll`` is what ``linear_token_nll`` returns.
    """
    return _frontend.linear_token_stats(hidden, weight, targets, bias=bias, top_k=top_k,
                                        ignore_index=ignore_index, shift=shift,
                                        softcap=softcap, temperature=temperature,
                                        backend=backend,
                                        check_targets=check_targets, vocab_shard=vocab_shard)
