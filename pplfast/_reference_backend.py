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


# ---- vocabulary slices (vocab-parallel; the layout is pplfast._vocab_merge's) ---------------
#
# Each launcher reduces a slice of the vocabulary (columns ``v_offset ...`` of the whole one) to
# its unfinished per-row partials, in float64 over float32 values, as every backend forms them:
# the logits as float32 (the float64 GEMM rounded, on the hidden-states path), soft-capped and
# rounded to float32 (so that a slice's maximum is exactly one of its entries and the rank's
# threshold, soft-capped from the raw target logit, equals the target's own value), chunk by
# chunk as the oracle does.

_NINF = float("-inf")


def _y32(z: torch.Tensor, softcap) -> torch.Tensor:
    """The soft-capped logits (``z``: float64 holding float32 values) as the float32 values the
    partials are formed on."""
    return reference._capped(z, softcap).float().double()


def _point(y: torch.Tensor):
    """``(m, r)``: each row's maximum (NaN where the row holds one; -inf for no column) and its
    reference point (``m`` where finite, else 0)."""
    if y.shape[-1] == 0:
        m = torch.full(y.shape[:1], _NINF, dtype=torch.float64, device=y.device)
    else:
        m = y.amax(-1)
    return m, torch.where(torch.isfinite(m), m, 0.0)


def _target_column(y: torch.Tensor, targets: torch.Tensor, v_offset: int):
    """``(inside, y_target)``: whether each row's target lies in the slice, and its value there
    (0 elsewhere)."""
    local = targets - v_offset
    inside = (local >= 0) & (local < y.shape[-1])
    if y.shape[-1] == 0:
        return inside, torch.zeros(y.shape[:1], dtype=y.dtype, device=y.device)
    value = y.gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1)
    return inside, torch.where(inside, value, 0.0)


def _nll_partials(y, targets, v_offset, temperature):
    m, r = _point(y)
    s = torch.exp((y - r.unsqueeze(-1)) / temperature).sum(-1)
    inside, y_t = _target_column(y, targets, v_offset)
    return m, s, torch.where(inside, (r - y_t) / temperature, 0.0)


def _stats_partials(y, targets, v_offset, temperature, top_k, threshold):
    n, width = y.shape
    m, r = _point(y)
    u = (y - r.unsqueeze(-1)) / temperature
    eu = torch.exp(u)
    moment = torch.where(eu == 0, 0.0, eu * u).sum(-1)  # -inf entries add 0
    if width:
        argmax = y.argmax(-1) + v_offset
    else:
        argmax = torch.full((n,), -1, dtype=torch.int64, device=y.device)
    rank = (y > threshold.unsqueeze(-1)).sum(-1)
    values = torch.full((n, top_k), _NINF, dtype=torch.float64, device=y.device)
    ids = torch.full((n, top_k), -1, dtype=torch.int64, device=y.device)
    kept = min(top_k, width)
    if kept:
        top = torch.topk(y, kept, dim=-1)
        values[:, :kept], ids[:, :kept] = top.values, top.indices + v_offset
    return m, eu.sum(-1), moment, argmax, rank, values, ids


def _compare_partials(yp, yq, raw_p, raw_q, targets, v_offset, temperature):
    out = []
    for y in (yp, yq):
        m, r = _point(y)
        inside, y_t = _target_column(y, targets, v_offset)
        out.append((m, r, (y - r.unsqueeze(-1)) / temperature,
                    torch.where(inside, (r - y_t) / temperature, 0.0)))
    (mp, _, up, dp), (mq, _, uq, dq) = out
    ep, eq = torch.exp(up), torch.exp(uq)
    cross_p = torch.where(ep == 0, 0.0, ep * (up - uq)).sum(-1)  # p_v = 0 adds 0
    cross_q = torch.where(eq == 0, 0.0, eq * (uq - up)).sum(-1)
    maxima = []
    for raw in (raw_p, raw_q):
        raw_max, _ = _point(raw)
        if raw.shape[-1]:
            maxima += [raw_max, raw.argmax(-1) + v_offset]
        else:
            maxima += [raw_max, torch.full_like(targets, -1)]
    return (mp, ep.sum(-1), dp, mq, eq.sum(-1), dq, cross_p, cross_q, *maxima)


def _by_chunks(n: int, width: int, rows, partials) -> tuple:
    """``partials(*rows(start, stop), start, stop)`` over chunks of rows, concatenated."""
    step = reference._rows_per_chunk(3 * max(width, 1))
    parts = []
    for a in range(0, n, step):
        b = min(a + step, n)
        parts.append(partials(*rows(a, b), a, b))
    return tuple(torch.cat(f) for f in zip(*parts))


def _logit_rows(logits3, softcap):
    flat = logits3.reshape(logits3.shape[0] * logits3.shape[1], logits3.shape[-1])
    return lambda a, b: (_y32(flat[a:b].double(), softcap),)


def _linear_z(hidden2, w64, b64, a, b):
    """Rows ``a ... b`` of the logits, the float64 GEMM rounded to float32 (held in float64)."""
    z = hidden2[a:b].double() @ w64.T
    if b64 is not None:
        z = z + b64
    return z.float().double()


def _linear_rows(hidden2, weight, bias, softcap, raw=False):
    w64 = weight.double()
    b64 = None if bias is None else bias.double()

    def rows(a, b):
        z = _linear_z(hidden2, w64, b64, a, b)
        return (_y32(z, softcap), z) if raw else (_y32(z, softcap),)

    return rows


def token_nll_slice(logits3, targets, v_offset, ignore_index, softcap, temperature):
    return _by_chunks(targets.numel(), logits3.shape[-1], _logit_rows(logits3, softcap),
                      lambda y, a, b: _nll_partials(y, targets[a:b], v_offset, temperature))


def linear_token_nll_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                           temperature):
    return _by_chunks(targets.numel(), weight.shape[0],
                      _linear_rows(hidden2, weight, bias, softcap),
                      lambda y, a, b: _nll_partials(y, targets[a:b], v_offset, temperature))


def target_logits(logits3, targets, v_offset):
    """Each row's raw target logit where the target lies in the slice, else 0 (float32)."""
    x = _by_chunks(targets.numel(), logits3.shape[-1], _logit_rows(logits3, None),
                   lambda x, a, b: _target_column(x, targets[a:b], v_offset)[1:])[0]
    return x.float()


def linear_target_logits(hidden2, weight, bias, targets, v_offset):
    local = targets - v_offset
    inside = (local >= 0) & (local < weight.shape[0])
    safe = torch.where(inside, local, 0)
    if weight.shape[0] == 0:
        return torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    z = (hidden2.double() * weight.index_select(0, safe).double()).sum(-1)
    if bias is not None:
        z = z + bias.index_select(0, safe).double()
    return torch.where(inside, z, 0.0).float()


def token_stats_slice(logits3, targets, v_offset, ignore_index, softcap, temperature, top_k,
                      target_x):
    """``target_x``: every row's raw target logit (the rank's threshold, soft-capped here)."""
    threshold = _y32(target_x.double(), softcap)
    return _by_chunks(targets.numel(), logits3.shape[-1], _logit_rows(logits3, softcap),
                      lambda y, a, b: _stats_partials(y, targets[a:b], v_offset, temperature,
                                                      top_k, threshold[a:b]))


def linear_token_stats_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                             temperature, top_k, target_x):
    threshold = _y32(target_x.double(), softcap)
    return _by_chunks(targets.numel(), weight.shape[0],
                      _linear_rows(hidden2, weight, bias, softcap),
                      lambda y, a, b: _stats_partials(y, targets[a:b], v_offset, temperature,
                                                      top_k, threshold[a:b]))


def compare_slice(logits3_base, logits3_test, targets, v_offset, ignore_index, softcap,
                  temperature):
    B, T, width = logits3_base.shape
    base = logits3_base.reshape(B * T, width)
    test = logits3_test.reshape(B * T, width)

    def rows(a, b):
        zp, zq = base[a:b].double(), test[a:b].double()
        return _y32(zp, softcap), _y32(zq, softcap), zp, zq

    return _by_chunks(targets.numel(), width, rows,
                      lambda yp, yq, zp, zq, a, b: _compare_partials(
                          yp, yq, zp, zq, targets[a:b], v_offset, temperature))


def linear_compare_slice(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                         bias_test, targets, v_offset, ignore_index, softcap, temperature):
    base = _linear_rows(hidden2_base, weight_base, bias_base, softcap, raw=True)
    test = _linear_rows(hidden2_test, weight_test, bias_test, softcap, raw=True)

    def rows(a, b):
        (yp, zp), (yq, zq) = base(a, b), test(a, b)
        return yp, yq, zp, zq

    return _by_chunks(targets.numel(), weight_base.shape[0], rows,
                      lambda yp, yq, zp, zq, a, b: _compare_partials(
                          yp, yq, zp, zq, targets[a:b], v_offset, temperature))
