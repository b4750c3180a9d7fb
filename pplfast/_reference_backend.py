"""``backend="reference"``: the float64 oracle behind the common launcher interface."""
from __future__ import annotations

import torch

from . import reference


def token_nll(logits3, targets, ignore_index, softcap, temperature) -> torch.Tensor:
    V = logits3.shape[-1]
    nll = reference.token_nll(
        logits3.reshape(-1, V), targets, ignore_index=ignore_index, softcap=softcap,
        temperature=temperature,
    )
    return nll.float()


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                     scored=None):
    # the oracle scores every row itself, ignored ones included; ``scored`` is not needed
    del scored
    nll = reference.linear_token_nll(
        hidden2, weight, targets, bias=bias, ignore_index=ignore_index, softcap=softcap,
        temperature=temperature,
    )
    return nll.float()
