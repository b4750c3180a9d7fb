"""Result types of the per-token ops: plain dataclasses of tensors, below every other module
(the public functions, the backends and the float64 reference all return them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TokenStats:
    """Statistics of each position's distribution ``p = softmax(z)`` (README, "Token statistics").

    Every field has the leading shape ``L`` of :func:`pplfast.token_nll` for the same call. At
    ignored positions float fields are 0 and integer fields -1.

    Attributes:
        nll: float32 ``L``, what ``token_nll`` returns.
        entropy: float32 ``L``, ``-sum_v p_v log p_v`` in nats.
        max_logprob: float32 ``L``, ``max_v log p_v`` (confidence ``exp(max_logprob)``).
        argmax: int64 ``L``, index of the largest logit, the lowest on ties.
        rank: int64 ``L``, entries whose logit is strictly greater than the target's.
        top_k_ids: int64 ``L + (top_k,)`` by decreasing probability, or None when ``top_k=0``.
        top_k_logprobs: float32 ``L + (top_k,)``, their log-probabilities, or None.
    """

    nll: torch.Tensor
    entropy: torch.Tensor
    max_logprob: torch.Tensor
    argmax: torch.Tensor
    rank: torch.Tensor
    top_k_ids: Optional[torch.Tensor] = None
    top_k_logprobs: Optional[torch.Tensor] = None
