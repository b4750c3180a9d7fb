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


def _stats_fields(stats):
    floats = ("nll", "entropy", "max_logprob", "top_k_logprobs")
    return tuple(
        None if (value := getattr(stats, name)) is None
        else (value.float() if name in floats else value)
        for name in ("nll", "entropy", "max_logprob", "argmax", "rank", "top_k_ids",
                     "top_k_logprobs")
    )


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    V = logits3.shape[-1]
    return _stats_fields(reference.token_stats(
        logits3.reshape(-1, V), targets, top_k=top_k, ignore_index=ignore_index,
        softcap=softcap, temperature=temperature,
    ))


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k,
                       *, scored=None):
    del scored  # the oracle scores every row itself, ignored ones included
    return _stats_fields(reference.linear_token_stats(
        hidden2, weight, targets, bias=bias, top_k=top_k, ignore_index=ignore_index,
        softcap=softcap, temperature=temperature,
    ))


def _compare_tuple(fields: dict):
    return (fields["kl"].float(), fields["kl_reverse"].float(), fields["nll_base"].float(),
            fields["nll_test"].float(), fields["argmax_base"], fields["argmax_test"])


def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    V = logits3_base.shape[-1]
    return _compare_tuple(reference.compare(
        logits3_base.reshape(-1, V), logits3_test.reshape(-1, V), targets,
        ignore_index=ignore_index, softcap=softcap, temperature=temperature,
    ))


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature, *, scored=None):
    del scored  # the oracle scores every row itself, ignored ones included
    return _compare_tuple(reference.linear_compare(
        hidden2_base, weight_base, hidden2_test, weight_test, targets, bias_base=bias_base,
        bias_test=bias_test, ignore_index=ignore_index, softcap=softcap, temperature=temperature,
    ))
