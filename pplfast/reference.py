"""Float64 PyTorch implementations of every op: the oracle for the tests and ``backend="reference"``.

Each function equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=...)``
with ``z`` the (soft-capped, temperature-scaled) logits, and returns float64. Rows are processed in
chunks, so the float64 copies of the logits stay within a few tens of MiB whatever the number of
rows; ``linear_token_nll`` also holds a float64 copy of the whole weight (V x D x 8 bytes: 4 GiB
for a 128k x 4096 output layer), since the oracle favours plainness over memory.

Every quantity is formed relative to the row's maximum ``m`` of the soft-capped logits ``y``:
``d = (y - m) / temperature`` lies in ``[-inf, 0]`` and ``log p = d - log(sum(exp(d)))``, so
``nll = log(sum(exp(d))) - d[target]``. ``logsumexp(z) - z[target]`` would subtract two numbers
of the size of the logits: near the top of the float range (|z| ~ 1e38) float64 rounds the small
log-sum term away and the difference to 0. Where ``m`` is not finite (a +inf entry, an all -inf
row, NaN) the reference point is 0 instead, so that the special values come out as
``logsumexp(z) - z[target]`` gives them (docs/ops.md, "Special values").
"""
from __future__ import annotations

from typing import Optional

import torch

from ._results import TokenStats

_CHUNK_BYTES = 64 << 20


def _transform(z: torch.Tensor, softcap: Optional[float], temperature: float) -> torch.Tensor:
    """``z`` soft-capped, then divided by ``temperature``: the function's ``z`` in absolute units
    (what ``logsumexp`` of the definition reads; the ops themselves use :func:`_relative`)."""
    z = _capped(z, softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def _capped(z: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _relative(y: torch.Tensor, temperature: float) -> torch.Tensor:
    """``d = (y - m) / temperature`` per row of float64 ``y`` (n, V), ``m`` the row's maximum where
    it is finite and 0 where it is not (+inf entry, all -inf, NaN): d <= 0 on finite rows."""
    if y.shape[-1] == 0:
        return y
    m = y.max(dim=-1, keepdim=True).values
    ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (y - ref) / temperature


def _nll_rows(d: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """d: (n, V) float64 from :func:`_relative`, targets: (n,) int64 -> (n,) float64 NLL, 0 where
    ignored."""
    scored = targets != ignore_index
    safe = torch.where(scored, targets, torch.zeros_like(targets))
    if d.shape[-1] == 0:
        return torch.zeros(d.shape[0], dtype=torch.float64, device=d.device)
    lse = torch.logsumexp(d, dim=-1)
    target = d.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, lse - target, torch.zeros_like(lse))


def _shifted(x: torch.Tensor, targets: torch.Tensor, shift: bool):
    if shift:
        return x[..., :-1, :], targets[..., 1:]
    return x, targets


def _rows_per_chunk(width: int) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(width, 1)))


def token_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token NLL of ``logits`` (..., V) at ``targets`` (...), in float64."""
    logits, targets = _shifted(logits, targets, shift)
    lead = targets.shape
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat_targets = targets.reshape(-1).long()
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)
    step = _rows_per_chunk(V)
    for start in range(0, flat.shape[0], step):
        d = _relative(_capped(flat[start : start + step].double(), softcap), temperature)
        out[start : start + step] = _nll_rows(d, flat_targets[start : start + step], ignore_index)
    return out.reshape(lead)


def linear_token_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token NLL of ``hidden @ weight.T + bias`` at ``targets``, in float64."""
    hidden, targets = _shifted(hidden, targets, shift)
    lead = targets.shape
    D = hidden.shape[-1]
    V = weight.shape[0]
    flat = hidden.reshape(-1, D)
    flat_targets = targets.reshape(-1).long()
    weight64 = weight.double()
    bias64 = bias.double() if bias is not None else None
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=hidden.device)
    step = _rows_per_chunk(V)
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].double() @ weight64.T
        if bias64 is not None:
            z = z + bias64
        d = _relative(_capped(z, softcap), temperature)
        out[start : start + step] = _nll_rows(d, flat_targets[start : start + step], ignore_index)
    return out.reshape(lead)


def _stats_rows(y: torch.Tensor, targets: torch.Tensor, ignore_index: int, top_k: int,
                temperature: float) -> dict:
    """Statistics of the soft-capped float64 rows ``y`` (n, V) (see :func:`token_stats`), from
    ``d = (y - max) / temperature`` (:func:`_relative`): ``log p = d - log(sum(exp(d)))``."""
    n, V = y.shape
    scored = targets != ignore_index
    if V == 0:  # only ignored rows can exist (top_k is then 0)
        y = torch.zeros(n, 1, dtype=y.dtype, device=y.device)
    safe = torch.where(scored, targets, torch.zeros_like(targets))
    d = _relative(y, temperature)
    log_sum = torch.logsumexp(d, dim=-1)  # the row's log-sum-exp relative to its maximum
    target_y = y.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    target_d = d.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = (log_sum - target_d).clamp_min(0.0)  # NaN stays NaN
    logp = d - log_sum.unsqueeze(-1)
    terms = torch.where(d == float("-inf"), torch.zeros_like(d), logp.exp() * logp)  # 0·log 0 = 0
    # a +inf entry, an all -inf row or NaN: the distribution is undefined
    defined = torch.isfinite(y.max(-1).values)
    entropy = torch.where(defined, -terms.sum(-1), torch.full_like(log_sum, float("nan")))
    max_logprob = (d.max(-1).values - log_sum).clamp_max(0.0)
    argmax = y.argmax(-1)
    rank = (y > target_y.unsqueeze(-1)).sum(-1)
    out = {"nll": nll, "entropy": entropy.clamp_min(0.0), "max_logprob": max_logprob,
           "argmax": argmax, "rank": rank}
    if top_k:
        ids = torch.topk(y, top_k, dim=-1).indices
        out["top_k_ids"], out["top_k_logprobs"] = ids, logp.gather(-1, ids)
    zero = scored.unsqueeze(-1) if top_k else None
    for name, value in out.items():
        fill = -1 if value.dtype == torch.int64 else 0.0
        mask = zero if value.ndim == 2 else scored
        out[name] = torch.where(mask, value, torch.full_like(value, fill))
    return out


def _stats_result(parts: list, lead, top_k: int):
    fields = {}
    for name in ("nll", "entropy", "max_logprob", "argmax", "rank", "top_k_ids", "top_k_logprobs"):
        if name.startswith("top_k") and not top_k:
            fields[name] = None
            continue
        value = torch.cat([p[name] for p in parts]) if parts else None
        shape = tuple(lead) + ((top_k,) if name.startswith("top_k") else ())
        if value is None:
            dtype = torch.int64 if name in ("argmax", "rank", "top_k_ids") else torch.float64
            value = torch.empty(shape, dtype=dtype)
        fields[name] = value.reshape(shape)
    return TokenStats(**fields)


def token_stats(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    top_k: int = 0,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
):
    """Per-token statistics of ``logits`` (..., V) at ``targets`` (...), in float64.

    Returns a ``pplfast.TokenStats`` whose float fields are float64 (the oracle's precision);
    the definitions are those of ``pplfast.token_stats``.
    """
    logits, targets = _shifted(logits, targets, shift)
    lead = targets.shape
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat_targets = targets.reshape(-1).long()
    parts = []
    step = _rows_per_chunk(V)
    for start in range(0, flat.shape[0], step):
        y = _capped(flat[start : start + step].double(), softcap)
        parts.append(_stats_rows(y, flat_targets[start : start + step], ignore_index, top_k,
                                 temperature))
    return _stats_result(parts, lead, top_k)


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
):
    """Per-token statistics of ``hidden @ weight.T + bias`` at ``targets``, in float64."""
    hidden, targets = _shifted(hidden, targets, shift)
    lead = targets.shape
    D = hidden.shape[-1]
    V = weight.shape[0]
    flat = hidden.reshape(-1, D)
    flat_targets = targets.reshape(-1).long()
    weight64 = weight.double()
    bias64 = bias.double() if bias is not None else None
    parts = []
    step = _rows_per_chunk(V)
    for start in range(0, flat.shape[0], step):
        z = flat[start : start + step].double() @ weight64.T
        if bias64 is not None:
            z = z + bias64
        parts.append(_stats_rows(_capped(z, softcap), flat_targets[start : start + step],
                                 ignore_index, top_k, temperature))
    return _stats_result(parts, lead, top_k)


# ---- compare: two models' rows read together (docs/compare.md) ------------------

def _compare_rows(yp: torch.Tensor, yq: torch.Tensor, raw_p: torch.Tensor, raw_q: torch.Tensor,
                  targets: torch.Tensor, ignore_index: int, temperature: float):
    """float64 (kl, kl_reverse, nll_base, nll_test) and int64 (argmax_base, argmax_test) of rows.

    ``yp``/``yq`` are the soft-capped float64 rows, ``raw_p``/``raw_q`` the logits before the
    (monotone) transform, whose argmax is reported. Ignored rows get 0 and -1.
    """
    scored = targets != ignore_index
    n = yp.shape[0]
    dp, dq = _relative(yp, temperature), _relative(yq, temperature)
    lp = dp - torch.logsumexp(dp, dim=-1, keepdim=True)
    lq = dq - torch.logsumexp(dq, dim=-1, keepdim=True)
    p, q = lp.exp(), lq.exp()
    # p_v = 0 contributes 0 (even where q_v = 0); p_v > 0 = q_v gives +inf; NaN stays NaN
    kl = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1).clamp_min(0.0)
    kl_rev = torch.where(q == 0, 0.0, q * (lq - lp)).sum(-1).clamp_min(0.0)
    # +inf in either row: its softmax is undefined, both KLs are NaN
    undefined = torch.isposinf(yp).any(-1) | torch.isposinf(yq).any(-1)
    kl = torch.where(undefined, float("nan"), kl)
    kl_rev = torch.where(undefined, float("nan"), kl_rev)
    zero = torch.zeros(n, dtype=torch.float64, device=yp.device)
    minus_one = torch.full((n,), -1, dtype=torch.int64, device=yp.device)
    out = [torch.where(scored, x, zero) for x in
           (kl, kl_rev, _nll_rows(dp, targets, ignore_index), _nll_rows(dq, targets, ignore_index))]
    out += [torch.where(scored, torch.argmax(x, dim=-1), minus_one) for x in (raw_p, raw_q)]
    return out


_COMPARE_FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


def _compare_chunks(rows, targets, ignore_index, temperature, lead, n, device, step):
    """Run ``rows(start, stop) -> (yp, yq, raw_p, raw_q)`` (soft-capped and raw float64 rows)
    chunk by chunk; dict of the fields."""
    out = {name: torch.empty(n, dtype=torch.float64 if i < 4 else torch.int64, device=device)
           for i, name in enumerate(_COMPARE_FIELDS)}
    for start in range(0, n, step):
        yp, yq, raw_p, raw_q = rows(start, start + step)
        for name, value in zip(_COMPARE_FIELDS, _compare_rows(
                yp, yq, raw_p, raw_q, targets[start : start + step], ignore_index, temperature)):
            out[name][start : start + step] = value
    return {name: value.reshape(lead) for name, value in out.items()}


def compare(
    logits_base: torch.Tensor,
    logits_test: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> dict:
    """float64 oracle of :func:`pplfast.compare`: a dict of the ``TokenComparison`` fields.

    ``kl = Σ_v p_v (log p_v − log q_v)`` with ``p``, ``q`` the softmax of the transformed base and
    test logits (terms with ``p_v = 0`` are 0; +inf in either row gives NaN), clamped at 0;
    ``kl_reverse`` the mirror;
    ``nll_*`` as :func:`token_nll`; ``argmax_*`` of the logits (lowest index on ties, the first
    NaN where there is one, as ``torch.argmax``). Ignored positions: 0 and -1.
    """
    logits_base, _ = _shifted(logits_base, targets, shift)
    logits_test, targets = _shifted(logits_test, targets, shift)
    lead = targets.shape
    V = logits_base.shape[-1]
    base, test = logits_base.reshape(-1, V), logits_test.reshape(-1, V)
    flat_targets = targets.reshape(-1).long()

    def rows(start, stop):
        a, b = base[start:stop].double(), test[start:stop].double()
        return _capped(a, softcap), _capped(b, softcap), a, b

    return _compare_chunks(rows, flat_targets, ignore_index, temperature, lead, base.shape[0],
                           logits_base.device, _rows_per_chunk(3 * V))


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
) -> dict:
    """float64 oracle of :func:`pplfast.linear_compare`: :func:`compare` of the two models' logits
    ``hidden @ weight.T + bias``, computed in float64 chunk by chunk."""
    hidden_base, _ = _shifted(hidden_base, targets, shift)
    hidden_test, targets = _shifted(hidden_test, targets, shift)
    lead = targets.shape
    V = weight_base.shape[0]
    hb = hidden_base.reshape(-1, hidden_base.shape[-1])
    ht = hidden_test.reshape(-1, hidden_test.shape[-1])
    wb, wt = weight_base.double(), weight_test.double()
    bb = None if bias_base is None else bias_base.double()
    bt = None if bias_test is None else bias_test.double()
    flat_targets = targets.reshape(-1).long()

    def rows(start, stop):
        a = hb[start:stop].double() @ wb.T
        b = ht[start:stop].double() @ wt.T
        if bb is not None:
            a = a + bb
        if bt is not None:
            b = b + bt
        return _capped(a, softcap), _capped(b, softcap), a, b

    return _compare_chunks(rows, flat_targets, ignore_index, temperature, lead, hb.shape[0],
                           hidden_base.device, _rows_per_chunk(3 * V))
