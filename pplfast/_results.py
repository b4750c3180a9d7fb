"""Result types: plain dataclasses below every other module (the public functions, the backends,
the metrics and the float64 reference return them): ``TokenStats``, ``TokenComparison`` /
``ComparisonResult`` of the two-model comparison, and ``PerplexityResult``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TokenStats:
    """Statistics of each position's distribution ``p = softmax(z)`` (docs/ops.md, "Token statistics").

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
        return TokenComparison(*(getattr(self, f).reshape(*shape) for f in _COMPARISON_FIELDS))


_COMPARISON_FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


@dataclass(frozen=True)
class ComparisonResult:
    """llama.cpp's comparison statistics (``llama-perplexity --kl-divergence``) over the scored
    tokens; "test" is its Q model. Each ``<field>_stderr`` is the uncertainty llama.cpp prints
    after "±"; the percentile fields map the percentile (``99.9``, ``50.0``, ...) to the value
    (``delta_p_percentiles[100.0]`` is the maximum, ``[0.0]`` the minimum). docs/compare.md
    gives the formulas. ``token_comparison`` and ``scored`` are set by
    :func:`pplfast.compare_models` (aligned with its ``input_ids``), None from the metric.
    """

    num_tokens: int
    perplexity_base: float
    perplexity_base_stderr: float
    perplexity_test: float
    perplexity_test_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    ppl_ratio: float
    ppl_ratio_stderr: float
    nll_correlation: float
    kl_mean: float
    kl_mean_stderr: float
    kl_max: float
    kl_percentiles: dict
    kl_min: float
    top1_agreement: float
    top1_agreement_stderr: float
    delta_p_mean: float
    delta_p_mean_stderr: float
    delta_p_rms: float
    delta_p_rms_stderr: float
    delta_p_percentiles: dict
    token_comparison: Optional[TokenComparison] = None
    scored: Optional[torch.Tensor] = None

    def as_dict(self) -> dict:
        """The figures as plain Python numbers (no per-token tensors), e.g. for JSON."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__
                if f not in ("token_comparison", "scored")}


@dataclass(frozen=True)
class PerplexityResult:
    """Corpus figures. NLL in nats; ``*_stderr`` from the per-token NLL variance.

    ``perplexity_stderr`` is llama.cpp's ``PPL +/-``: ``perplexity * mean_nll_stderr`` with
    ``mean_nll_stderr = sqrt((E[nll^2] - E[nll]^2) / (num_tokens - 1))``. The byte and word
    figures are ratios of sums over all documents (lm-evaluation-harness): ``bits_per_byte =
    sum(nll) / num_bytes / ln 2``, ``byte_perplexity = exp(sum(nll) / num_bytes)``,
    ``word_perplexity = exp(sum(nll) / num_words)``; None unless every update gave the counts.
    ``mean_entropy`` (nats) and ``top1_accuracy`` (fraction of scored tokens whose argmax is the
    target) cover the tokens of the ``stats=True`` updates; None when there were none.
    """

    perplexity: float
    mean_nll: float
    num_tokens: int
    sum_nll: float
    bits_per_token: float
    mean_nll_stderr: float
    perplexity_stderr: float
    num_bytes: Optional[int] = None
    num_words: Optional[int] = None
    bits_per_byte: Optional[float] = None
    byte_perplexity: Optional[float] = None
    word_perplexity: Optional[float] = None
    mean_entropy: Optional[float] = None
    top1_accuracy: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)
