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


def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    from .kernels.compare import compare_forward

    return compare_forward(logits3_base, logits3_test, targets, ignore_index, softcap,
                           temperature)


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature):
    from ._linear import chunked_linear_compare

    return chunked_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test,
                                  weight_test, bias_test, targets, ignore_index, softcap,
                                  temperature, launcher=compare)
