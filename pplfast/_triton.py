"""``backend="triton"``: launchers live beside their kernels in ``pplfast.kernels``.

Imported only when the backend is asked for, so that ``import pplfast`` never imports triton.
"""
from __future__ import annotations


def token_nll(logits3, targets, ignore_index, softcap, temperature):
    from .kernels.token_nll import token_nll_forward

    return token_nll_forward(logits3, targets, ignore_index, softcap, temperature)


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature):
    from .kernels.linear_token_nll import linear_token_nll_forward

    return linear_token_nll_forward(
        hidden2, weight, bias, targets, ignore_index, softcap, temperature
    )


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    from .kernels.token_stats import token_stats_forward

    return token_stats_forward(logits3, targets, ignore_index, softcap, temperature, top_k)


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k):
    from ._linear import chunked_linear_token_stats
    from .kernels.token_stats import token_stats_forward

    return chunked_linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap,
                                      temperature, top_k, launcher=token_stats_forward)
