"""Figures from sums: the one safe exp of a reported figure, and llama.cpp's statistics of a
comparison (its ``mean_and_uncertainty``, ``covariance`` and percentiles, in
``tools/perplexity/perplexity.cpp``) from the float64 sums that :class:`pplfast.Comparison`
keeps. Pure functions of Python numbers and host tensors, below the metrics that use them."""
from __future__ import annotations

import math

import numpy as np
import torch

from ._results import ComparisonResult


def safe_exp(x):
    """``exp(x)`` of a figure (perplexity from a mean NLL, ...): ``inf`` past exp's range instead
    of ``OverflowError`` (floats) or numpy's overflow warning (arrays). The package's one exp of
    a reported figure: a float gives a float, an array a float64 array."""
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore"):
            return np.exp(x.astype(np.float64, copy=False))
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


_PERCENTILES_KL = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
_PERCENTILES_DP = (100.0, 99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1, 0.0)

# the comparison's float64 sums (Comparison's state); Δp = exp(−nll_test) − exp(−nll_base)
(TOKENS, _SUM_TEST, _SUM_TEST2, _SUM_BASE, _SUM_BASE2, _SUM_TEST_BASE, _SUM_KL, _SUM_KL2,
 _SUM_DP, _SUM_DP2, _SUM_DP4, _SAME_TOP) = range(12)
COMPARISON_SUMS = 12


def mean_and_uncertainty(total: float, total_sq: float, count: int):
    """llama.cpp's ``mean_and_uncertainty``: the mean and ``sqrt(var / (count − 1))`` with
    ``var = E[x²] − E[x]²``; the uncertainty is 0 unless ``var > 0`` and ``count > 10``."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total_sq / count - mean * mean
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


def covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    """llama.cpp's ``covariance`` of two means: ``(E[ab] − E[a]E[b]) / (count − 1)``, 0 below 10."""
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


def percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """llama.cpp's percentile of sorted values: linear interpolation at ``fraction · (n − 1)``."""
    n = sorted_values.numel()
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (n - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * float(sorted_values[ip]) + p * float(sorted_values[min(ip + 1, n - 1)])


def _median(sorted_values: torch.Tensor) -> float:
    n = sorted_values.numel()
    if n % 2 == 0:
        return 0.5 * (float(sorted_values[n // 2]) + float(sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def _percentiles(sorted_values: torch.Tensor, which) -> dict:
    return {pc: (_median(sorted_values) if pc == 50.0 else percentile(sorted_values, pc / 100))
            for pc in which}


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def comparison_statistics(sums, kl_values: torch.Tensor, delta_p_values: torch.Tensor,
                          **extra) -> ComparisonResult:
    """:class:`ComparisonResult` from the float64 sums (``Comparison``'s state) and the
    per-token KL and Δp of the scored tokens."""
    s = [float(x) for x in sums]
    n = int(s[TOKENS])
    log_ppl_test = mean_and_uncertainty(s[_SUM_TEST], s[_SUM_TEST2], n)
    log_ppl_base = mean_and_uncertainty(s[_SUM_BASE], s[_SUM_BASE2], n)
    ppl_test, ppl_base = safe_exp(log_ppl_test[0]), safe_exp(log_ppl_base[0])
    cov = covariance(s[_SUM_TEST], s[_SUM_BASE], s[_SUM_TEST_BASE], n)
    ratio = log_ppl_test[0] - log_ppl_base[0]
    # llama.cpp takes the square root as is; rounding can make it -1e-17 for identical models
    ratio_unc = math.sqrt(max(log_ppl_test[1] ** 2 + log_ppl_base[1] ** 2 - 2.0 * cov, 0.0))
    kl = mean_and_uncertainty(s[_SUM_KL], s[_SUM_KL2], n)
    dp = mean_and_uncertainty(s[_SUM_DP], s[_SUM_DP2], n)
    mse = mean_and_uncertainty(s[_SUM_DP2], s[_SUM_DP4], n)
    rms = math.sqrt(max(mse[0], 0.0))
    rms_unc = 0.0 if mse[1] == 0 else _div(0.5, rms) * mse[1]
    top = s[_SAME_TOP] / n
    top_unc = math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else math.nan
    kl_sorted = torch.sort(kl_values.double()).values
    dp_sorted = torch.sort(delta_p_values.double()).values
    return ComparisonResult(
        num_tokens=n,
        perplexity_base=ppl_base, perplexity_base_stderr=ppl_base * log_ppl_base[1],
        perplexity_test=ppl_test, perplexity_test_stderr=ppl_test * log_ppl_test[1],
        ln_ppl_ratio=ratio, ln_ppl_ratio_stderr=ratio_unc,
        ppl_ratio=safe_exp(ratio), ppl_ratio_stderr=safe_exp(ratio) * ratio_unc,
        nll_correlation=_div(cov, log_ppl_test[1] * log_ppl_base[1]),
        kl_mean=kl[0], kl_mean_stderr=kl[1], kl_max=float(kl_sorted[-1]),
        kl_percentiles=_percentiles(kl_sorted, _PERCENTILES_KL), kl_min=float(kl_sorted[0]),
        top1_agreement=top, top1_agreement_stderr=top_unc,
        delta_p_mean=dp[0], delta_p_mean_stderr=dp[1], delta_p_rms=rms, delta_p_rms_stderr=rms_unc,
        delta_p_percentiles=_percentiles(dp_sorted, _PERCENTILES_DP), **extra,
    )
