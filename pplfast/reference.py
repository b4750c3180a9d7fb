"""Float64 PyTorch implementations of every op: the oracle for the tests and ``backend="reference"``.

Each function equals ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=...)``
with ``z`` the (soft-capped, temperature-scaled) logits, and returns float64. Rows are processed in
chunks, so the float64 copies of the logits stay within a few tens of MiB whatever the number of
rows; ``linear_token_nll`` also holds a float64 copy of the whole weight (V x D x 8 bytes: 4 GiB
for a 128k x 4096 output layer), since the oracle favours plainness over memory.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._results import TokenStats

_CHUNK_BYTES = 64 << 20


def _transform(z: torch.Tensor, softcap: Optional[float], temperature: float) -> torch.Tensor:
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    return z


def _nll_rows(z: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """z: (n, V) float64, targets: (n,) int64 -> (n,) float64 NLL, 0 where ignored."""
    scored = targets != ignore_index
    safe = torch.where(scored, targets, torch.zeros_like(targets))
    if z.shape[-1] == 0:
        return torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    lse = torch.logsumexp(z, dim=-1)
    target_logit = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, lse - target_logit, torch.zeros_like(lse))


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
        z = _transform(flat[start : start + step].double(), softcap, temperature)
        out[start : start + step] = _nll_rows(z, flat_targets[start : start + step], ignore_index)
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
        z = _transform(z, softcap, temperature)
        out[start : start + step] = _nll_rows(z, flat_targets[start : start + step], ignore_index)
    return out.reshape(lead)


def _stats_rows(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, top_k: int) -> dict:
    """Statistics of float64 rows ``z`` (n, V) (see :func:`token_stats`)."""
    n, V = z.shape
    scored = targets != ignore_index
    if V == 0:  # only ignored rows can exist (top_k is then 0)
        z = torch.zeros(n, 1, dtype=z.dtype, device=z.device)
    safe = torch.where(scored, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(z, dim=-1)
    target_logit = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = (lse - target_logit).clamp_min(0.0)  # NaN stays NaN
    logp = z - lse.unsqueeze(-1)
    terms = torch.where(z == float("-inf"), torch.zeros_like(z), logp.exp() * logp)  # 0·log 0 = 0
    entropy = torch.where(torch.isfinite(lse), -terms.sum(-1), torch.full_like(lse, float("nan")))
    max_logprob = (z.max(-1).values - lse).clamp_max(0.0)
    argmax = z.argmax(-1)
    rank = (z > target_logit.unsqueeze(-1)).sum(-1)
    out = {"nll": nll, "entropy": entropy.clamp_min(0.0), "max_logprob": max_logprob,
           "argmax": argmax, "rank": rank}
    if top_k:
        values, ids = torch.topk(z, top_k, dim=-1)
        out["top_k_ids"], out["top_k_logprobs"] = ids, values - lse.unsqueeze(-1)
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
        z = _transform(flat[start : start + step].double(), softcap, temperature)
        parts.append(_stats_rows(z, flat_targets[start : start + step], ignore_index, top_k))
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
        z = _transform(z, softcap, temperature)
        parts.append(_stats_rows(z, flat_targets[start : start + step], ignore_index, top_k))
    return _stats_result(parts, lead, top_k)


# ---- compare: two models' rows read together (README "Comparing two models") ------------------

def _compare_rows(zp: torch.Tensor, zq: torch.Tensor, raw_p: torch.Tensor, raw_q: torch.Tensor,
                  targets: torch.Tensor, ignore_index: int):
    """float64 (kl, kl_reverse, nll_base, nll_test) and int64 (argmax_base, argmax_test) of rows.

    ``zp``/``zq`` are the transformed float64 rows, ``raw_p``/``raw_q`` the logits before the
    (monotone) transform, whose argmax is reported. Ignored rows get 0 and -1.
    """
    scored = targets != ignore_index
    n = zp.shape[0]
    lp = torch.log_softmax(zp, dim=-1)
    lq = torch.log_softmax(zq, dim=-1)
    p, q = lp.exp(), lq.exp()
    # p_v = 0 contributes 0 (even where q_v = 0); p_v > 0 = q_v gives +inf; NaN stays NaN
    kl = torch.where(p == 0, 0.0, p * (lp - lq)).sum(-1).clamp_min(0.0)
    kl_rev = torch.where(q == 0, 0.0, q * (lq - lp)).sum(-1).clamp_min(0.0)
    # +inf in either row: its softmax is undefined, both KLs are NaN
    undefined = torch.isposinf(zp).any(-1) | torch.isposinf(zq).any(-1)
    kl = torch.where(undefined, float("nan"), kl)
    kl_rev = torch.where(undefined, float("nan"), kl_rev)
    zero = torch.zeros(n, dtype=torch.float64, device=zp.device)
    minus_one = torch.full((n,), -1, dtype=torch.int64, device=zp.device)
    out = [torch.where(scored, x, zero) for x in
           (kl, kl_rev, _nll_rows(zp, targets, ignore_index), _nll_rows(zq, targets, ignore_index))]
    out += [torch.where(scored, torch.argmax(x, dim=-1), minus_one) for x in (raw_p, raw_q)]
    return out


_COMPARE_FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


def _compare_chunks(rows, targets, ignore_index, lead, n, device, step):
    """Run ``rows(start, stop) -> (zp, zq, raw_p, raw_q)`` chunk by chunk; dict of the fields."""
    out = {name: torch.empty(n, dtype=torch.float64 if i < 4 else torch.int64, device=device)
           for i, name in enumerate(_COMPARE_FIELDS)}
    for start in range(0, n, step):
        zp, zq, raw_p, raw_q = rows(start, start + step)
        for name, value in zip(_COMPARE_FIELDS, _compare_rows(
                zp, zq, raw_p, raw_q, targets[start : start + step], ignore_index)):
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
        return _transform(a, softcap, temperature), _transform(b, softcap, temperature), a, b

    return _compare_chunks(rows, flat_targets, ignore_index, lead, base.shape[0], logits_base.device,
                           _rows_per_chunk(3 * V))


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
        return _transform(a, softcap, temperature), _transform(b, softcap, temperature), a, b

    return _compare_chunks(rows, flat_targets, ignore_index, lead, hb.shape[0], hidden_base.device,
                           _rows_per_chunk(3 * V))
