"""Compare two models token by token: KL both ways, both NLLs, both argmaxes, in one pass.

``compare`` / ``linear_compare`` give a :class:`TokenComparison` per position; :class:`Comparison`
accumulates them over batches (and ranks) into llama.cpp's comparison statistics
(:class:`ComparisonResult`). README section "Comparing two models".
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch, _validate
from ._results import ComparisonResult, TokenComparison
from .api import _prepare, _rows3
from .metric import safe_exp


def _empty(lead, device) -> TokenComparison:
    zeros = [torch.zeros(lead, dtype=torch.float32, device=device) for _ in range(4)]
    ints = [torch.full(lead, -1, dtype=torch.int64, device=device) for _ in range(2)]
    return TokenComparison(*zeros, *ints)


def _same_shape(name_base, base, name_test, test) -> None:
    if tuple(base.shape) != tuple(test.shape):
        raise ValueError(f"{name_base} has shape {tuple(base.shape)} but {name_test} has shape "
                         f"{tuple(test.shape)}: both models must give the same positions and "
                         "the same vocabulary size")


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

    Returns:
        :class:`TokenComparison` with the leading shape (``(..., T - 1)`` with ``shift``).
    """
    _validate.float_tensor("logits_base", logits_base)
    _validate.float_tensor("logits_test", logits_test)
    _same_shape("logits_base", logits_base, "logits_test", logits_test)
    backend, (ignore_index, softcap, temperature) = _prepare(
        "logits_base", logits_base, targets, ignore_index, shift, softcap, temperature,
        check_targets, backend, logits_test=logits_test,
    )
    if shift:
        logits_base, logits_test = logits_base[..., :-1, :], logits_test[..., :-1, :]
        targets = targets[..., 1:]
    lead = targets.shape
    V = logits_base.shape[-1]
    if check_targets:
        _validate.scored_targets(targets, V, ignore_index, check=True, count=False)
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
    check_targets: bool = True,
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

    Returns:
        :class:`TokenComparison`, as :func:`compare`.
    """
    for name, x in (("hidden_base", hidden_base), ("weight_base", weight_base),
                    ("hidden_test", hidden_test), ("weight_test", weight_test)):
        _validate.float_tensor(name, x)
    if tuple(hidden_base.shape[:-1]) != tuple(hidden_test.shape[:-1]):
        raise ValueError(f"hidden_base has shape {tuple(hidden_base.shape)} but hidden_test has "
                         f"shape {tuple(hidden_test.shape)}: the leading shapes (positions) must "
                         "match")
    if weight_base.ndim == 2 and weight_test.ndim == 2 and weight_base.shape[0] != weight_test.shape[0]:
        raise ValueError(f"weight_base has shape {tuple(weight_base.shape)} but weight_test has "
                         f"shape {tuple(weight_test.shape)}: the two vocabularies must have the "
                         "same size")
    backend, (ignore_index, softcap, temperature) = _prepare(
        "hidden_base", hidden_base, targets, ignore_index, shift, softcap, temperature,
        check_targets, backend, weight_base=weight_base, bias_base=bias_base,
        hidden_test=hidden_test, weight_test=weight_test, bias_test=bias_test,
    )
    _validate.linear_shapes(hidden_base, weight_base, bias_base)
    _validate.linear_shapes(hidden_test, weight_test, bias_test)
    if shift:
        hidden_base, hidden_test = hidden_base[..., :-1, :], hidden_test[..., :-1, :]
        targets = targets[..., 1:]
    lead = targets.shape
    V = weight_base.shape[0]
    if check_targets:
        _validate.scored_targets(targets, V, ignore_index, check=True, count=False)
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


# ---- corpus statistics: llama.cpp's KL-divergence report ---------------------------------------

_PERCENTILES_KL = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
_PERCENTILES_DP = (100.0, 99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1, 0.0)

# float64 sums of the state; Δp = exp(−nll_test) − exp(−nll_base)
(_N, _SUM_TEST, _SUM_TEST2, _SUM_BASE, _SUM_BASE2, _SUM_TEST_BASE, _SUM_KL, _SUM_KL2, _SUM_DP,
 _SUM_DP2, _SUM_DP4, _SAME_TOP) = range(12)
_STATE_SIZE = 12


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
    n = int(s[_N])
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


class Comparison:
    """Streaming comparison of a base and a test model over batches (and ranks).

    Example::

        metric = pplfast.Comparison()
        for batch in loader:
            metric.update(base(batch).logits, test(batch).logits, batch, shift=True)
        print(metric.compute().kl_mean)

    The state is twelve float64 sums plus, for the percentiles, the KL and Δp of every scored
    token kept as float32 on the host (8 bytes per token); ``merge`` and ``sync`` carry both.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> "Comparison":
        self._sums = torch.zeros(_STATE_SIZE, dtype=torch.float64)
        self._kl: list = []
        self._dp: list = []
        self._global = None  # (sums, kl, dp) over all ranks after sync()
        return self

    @property
    def num_tokens(self) -> int:
        sums = self._global[0] if self._global is not None else self._sums
        return int(sums[_N].item())

    def update(self, logits_base: torch.Tensor, logits_test: torch.Tensor,
               targets: torch.Tensor, **options) -> TokenComparison:
        """:func:`pplfast.compare` of a batch, added; returns its :class:`TokenComparison`."""
        result = compare(logits_base, logits_test, targets, **options)
        self.update_tokens(result, targets, ignore_index=options.get("ignore_index", -100),
                           shift=options.get("shift", False))
        return result

    def update_linear(self, hidden_base: torch.Tensor, weight_base: torch.Tensor,
                      hidden_test: torch.Tensor, weight_test: torch.Tensor,
                      targets: torch.Tensor, **options) -> TokenComparison:
        """:func:`pplfast.linear_compare` of a batch, added; returns its comparison."""
        result = linear_compare(hidden_base, weight_base, hidden_test, weight_test, targets,
                                **options)
        self.update_tokens(result, targets, ignore_index=options.get("ignore_index", -100),
                           shift=options.get("shift", False))
        return result

    def update_tokens(self, comparison: TokenComparison, targets: Optional[torch.Tensor] = None,
                      *, ignore_index: int = -100, shift: bool = False,
                      scored: Optional[torch.Tensor] = None) -> None:
        """Add a :class:`TokenComparison` computed elsewhere. The scored tokens are those whose
        target is not ``ignore_index`` (``targets`` as passed to ``compare``, with ``shift``), or
        the ``scored`` bool mask, or all of them."""
        if not isinstance(comparison, TokenComparison):
            raise TypeError(f"comparison must be a TokenComparison, got "
                            f"{type(comparison).__name__}")
        shape = tuple(comparison.kl.shape)
        if scored is None:
            if targets is None:
                scored = torch.ones(shape, dtype=torch.bool, device=comparison.kl.device)
            else:
                _validate.target_tensor(targets)
                if shift:
                    targets = targets[..., 1:]
                if tuple(targets.shape) != shape:
                    raise ValueError(f"targets has shape {tuple(targets.shape)} (after shift) but "
                                     f"the comparison has shape {shape}")
                scored = _validate.scored_mask(targets, ignore_index)
        elif scored.dtype != torch.bool or tuple(scored.shape) != shape:
            raise ValueError(f"scored must be a bool tensor of shape {shape}, got "
                             f"{scored.dtype} {tuple(scored.shape)}")
        scored = scored.to(comparison.kl.device)
        nll_t = comparison.nll_test[scored].double()
        nll_b = comparison.nll_base[scored].double()
        kl = comparison.kl[scored].double()
        dp = torch.exp(-nll_t) - torch.exp(-nll_b)
        same = (comparison.argmax_base[scored] == comparison.argmax_test[scored]).double()
        dp2 = dp * dp
        update = torch.stack([
            torch.tensor(float(kl.numel()), dtype=torch.float64, device=kl.device),
            nll_t.sum(), (nll_t * nll_t).sum(), nll_b.sum(), (nll_b * nll_b).sum(),
            (nll_t * nll_b).sum(), kl.sum(), (kl * kl).sum(), dp.sum(), dp2.sum(),
            (dp2 * dp2).sum(), same.sum(),
        ])
        self._sums = self._sums + update.cpu()
        self._kl.append(kl.float().cpu())
        self._dp.append(dp.float().cpu())
        self._global = None

    def _values(self):
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float32))
        return cat(self._kl), cat(self._dp)

    def merge(self, other: "Comparison") -> "Comparison":
        """Add another metric's local state (sums and per-token values); returns self."""
        if not isinstance(other, Comparison):
            raise TypeError(f"other must be a Comparison, got {type(other).__name__}")
        self._sums = self._sums + other._sums
        self._kl.extend(other._kl)
        self._dp.extend(other._dp)
        self._global = None
        return self

    def sync(self, group=None) -> "Comparison":
        """All-reduce the sums and all-gather the per-token KL and Δp over ``torch.distributed``
        (every rank must call it); ``compute()`` then reports all ranks until the next change."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        sums = self._sums.to(device, copy=True)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        kl, dp = self._values()
        local = torch.stack([kl, dp]).to(device)
        world = dist.get_world_size(group)
        length = torch.tensor([local.shape[1]], dtype=torch.int64, device=device)
        lengths = [torch.zeros_like(length) for _ in range(world)]
        dist.all_gather(lengths, length, group=group)
        longest = max(int(x) for x in lengths)
        padded = torch.zeros(2, longest, dtype=torch.float32, device=device)
        padded[:, : local.shape[1]] = local
        gathered = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        values = torch.cat([g[:, : int(k)] for g, k in zip(gathered, lengths)], dim=1).cpu()
        self._global = (sums.cpu(), values[0], values[1])
        return self

    def compute(self) -> ComparisonResult:
        """llama.cpp's statistics over everything added (after ``sync``: over all ranks).

        Raises:
            ValueError: no token has been scored.
        """
        sums, kl, dp = self._global if self._global is not None else (self._sums, *self._values())
        if sums[_N] <= 0:
            raise ValueError("Comparison.compute() called with no scored tokens: call update() "
                             "with at least one target that is not ignore_index first")
        return comparison_statistics(sums, kl, dp)
