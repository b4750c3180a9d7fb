"""What ``pplfast doctor`` calls right: one op's result against the float64 reference
(``pplfast.reference``), field by field, with docs/ops.md's bounds ("Accuracy").

- NLL fields (``nll``, ``nll_base``, ``nll_test``): ``2e-6 * max(1, |logsumexp of the row|,
  |NLL|)`` ("Accuracy"); ``entropy``, ``max_logprob`` and the top-k log-probabilities
  ``2e-6 * max(1, |logsumexp|)``; ``kl`` and ``kl_reverse`` ``2e-6 * max(1, |lse_p|, |lse_q|)``.
- Hidden states in float16/bfloat16: each bound plus the error of the same-dtype PyTorch path
  (``F.linear`` in the input dtype, then the float64 op on its logits) plus ``1e-3``.
- Rows near the top of the range (the float32 extremes): the same bounds taken on the row shifted
  by its maximum, which changes no output: ``|logsumexp - max|`` in place of ``|logsumexp|``
  (else a bound of 2e-6 * 3e38 would accept any finite number), and the value itself.
- NaN must be NaN, an infinity the same infinity (the reference rounded to float32: a value past
  float32's range is +inf there), no NLL or KL below 0, ignored positions 0 and -1.
- Integer fields: ``argmax`` holds the row's largest logit (the lowest index among exact ties)
  and ``rank`` counts the entries above the target, each up to a tie band of one ulp of the
  input dtype (logits path) or of the GEMM's rounding (hidden path); top-k ids distinct, in range
  and at least the k-th largest logit, their log-probabilities their own; ``compare``'s argmaxes
  exactly the reference's on the logits path (the first NaN on a NaN row). On a row holding NaN
  the statistics' integer fields need only be in range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ... import reference

RTOL = 2e-6
THREE_WAY_MARGIN = 1e-3
NLL_FIELDS = ("nll", "nll_base", "nll_test")
NONNEGATIVE = NLL_FIELDS + ("kl", "kl_reverse")
INT_FIELDS = ("argmax", "rank", "top_k_ids", "argmax_base", "argmax_test")


@dataclass
class Rows:
    """One model's logit rows as the op scores them, float64, flattened to ``(n, V)``."""

    z: torch.Tensor  # after softcap and temperature
    raw: torch.Tensor  # before them (compare reports the argmax of these)
    band: torch.Tensor  # per element: values closer than this to each other count as tied
    raw_band: torch.Tensor
    scale: torch.Tensor  # (n,) the bound's max(1, |lse|) (or |lse - max|)


def fields(result) -> Dict[str, torch.Tensor]:
    """A result (tensor, TokenStats, TokenComparison or the reference's dict) as a dict."""
    if isinstance(result, torch.Tensor):
        return {"nll": result}
    if isinstance(result, dict):
        return dict(result)
    return {k: v for k, v in vars(result).items() if v is not None}


def _cpu(args, opts):
    return (tuple(a.cpu() for a in args),
            {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()})


def _transform(z, opts):
    return reference._transform(z, opts.get("softcap"), opts.get("temperature", 1.0))


def _finite0(x):
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _shifted_lse(z):
    """``logsumexp(z) - max(z)`` per row, computed on the shifted row (no cancellation near the
    top of the range, where ``logsumexp(z) - max(z)`` in float64 rounds to 0)."""
    top = z.amax(-1, keepdim=True)
    return (z - top).logsumexp(-1)


def _scale(z, relative):
    value = _shifted_lse(z).abs() if relative else z.logsumexp(-1).abs()
    return torch.nan_to_num(value, nan=1.0, posinf=1.0, neginf=1.0).clamp(min=1.0)


def _logits_rows(x, opts, relative, exact_ties=False) -> Rows:
    if opts.get("shift"):
        x = x[..., :-1, :]
    raw = x.double().reshape(-1, x.shape[-1])
    z = _transform(raw, opts)
    eps = 0.0 if exact_ties else torch.finfo(x.dtype).eps
    band = _finite0(2 * eps * z.abs())
    return Rows(z, raw, band, torch.zeros_like(raw), _scale(z, relative))


def _linear_rows(h, w, b, opts, relative) -> Rows:
    if opts.get("shift"):
        h = h[..., :-1, :]
    h2 = h.reshape(-1, h.shape[-1])
    raw = h2.double() @ w.double().T + (0 if b is None else b.double())
    z = _transform(raw, opts)
    # an fp32 GEMM's rounding; in fp16/bf16 also that of F.linear in the input dtype
    raw_band = _finite0(1e-5 * (raw.abs() + 1))
    band = _finite0(1e-5 * (z.abs() + 1))
    if h.dtype != torch.float32:
        same = F.linear(h2, w, b).double()
        raw_band = raw_band + _finite0(2 * (same - raw).abs())
        band = band + _finite0(2 * (_transform(same, opts) - z).abs())
    return Rows(z, raw, band, raw_band, _scale(z, relative))


def _targets(t, opts):
    return (t[..., 1:] if opts.get("shift") else t).reshape(-1).long()


def _same_dtype_path(op, args, opts):
    """The fields of the same-dtype PyTorch path (F.linear in the input dtype, then the float64
    op on those logits): the three-way rule's second opinion, for fp16/bf16 hidden states."""
    rest = {k: v for k, v in opts.items() if not k.startswith("bias")}
    if op == "linear_compare":
        hb, wb, ht, wt, t = args
        zb = F.linear(hb, wb, opts.get("bias_base")).float()
        zt = F.linear(ht, wt, opts.get("bias_test")).float()
        return fields(reference.compare(zb, zt, t, **rest))
    h, w, t = args
    z = F.linear(h, w, opts.get("bias")).float()
    fn = reference.token_stats if op == "linear_token_stats" else reference.token_nll
    return fields(fn(z, t, **rest))


def _first_bad(g, w, bound, name, nonnegative, ignored) -> Optional[str]:
    """The first position where ``g`` (got, float32) is not ``w`` (float64 reference)."""
    w32 = w.float().double()  # what float32 can hold: a value past its range is inf there
    nan_w, nan_g = torch.isnan(w), torch.isnan(g)
    err = (g - w).abs()
    bad = nan_w != nan_g
    bad |= ~nan_w & torch.isinf(w32) & (g != w32)
    bad |= ~nan_w & ~torch.isinf(w32) & ~(err <= bound)
    if nonnegative:
        bad |= ~nan_g & (g < 0)
    bad |= ignored & (g != 0)
    if not bool(bad.any()):
        return None
    i = int(bad.nonzero()[0, 0])
    text = f"{name} at position {i}: {float(g[i])!r}, reference {float(w[i])!r}"
    if math.isfinite(float(w32[i])) and not math.isnan(float(g[i])):
        text += f" (|error| {float(err[i]):.3g}, bound {float(bound[i]):.3g})"
    if nonnegative and float(g[i]) < 0:
        text += " (negative)"
    return text


def _check_stats_ints(got, want, rows: Rows, t, scored, top_k, *, linear: bool,
                      three_way: bool, relative: bool) -> Optional[str]:
    z, V = rows.z, rows.z.shape[-1]
    argmax, rank = got["argmax"].reshape(-1), got["rank"].reshape(-1)
    for name, value in (("argmax", argmax), ("rank", rank)):
        if bool((value[~scored] != -1).any()):
            return f"{name} at an ignored position is not -1"
    nan_rows = torch.isnan(z).any(-1)
    for r in (scored & nan_rows).nonzero().flatten().tolist():
        if not (0 <= int(argmax[r]) < V and 0 <= int(rank[r]) <= V):
            return f"argmax / rank out of range at position {r} (a NaN row)"
    want_argmax = want["argmax"].reshape(-1)
    for r in (scored & ~nan_rows).nonzero().flatten().tolist():
        row, band = z[r], rows.band[r]
        a, top = int(argmax[r]), int(row.argmax())
        if not 0 <= a < V:
            return f"argmax at position {r}: {a}, outside [0, {V})"
        if not row[a] >= row[top] - band[a] - band[top]:
            return (f"argmax at position {r}: {a} holds {float(row[a])!r} but the row's largest "
                    f"is {float(row.max())!r} (reference {int(want_argmax[r])})")
        if row[a] == row.max() and a > int(want_argmax[r]) and not (
                row[:a].max() < row[a] - band[a]):
            return f"argmax at position {r}: {a}, not the lowest of the tied maxima " \
                   f"({int(want_argmax[r])})"
        zt, band_t = row[int(t[r])], band[int(t[r])]
        lo, hi = int((row > zt + band + band_t).sum()), int((row > zt - band - band_t).sum())
        if not lo <= int(rank[r]) <= hi:
            return f"rank at position {r}: {int(rank[r])}, outside [{lo}, {hi}]"
    if not top_k:
        return None
    ids = got["top_k_ids"].reshape(-1, top_k)
    lp = got["top_k_logprobs"].reshape(-1, top_k).double()
    if bool((ids[~scored] != -1).any()):
        return "top_k_ids at an ignored position are not -1"
    top, shifted_lse, lse = z.amax(-1), _shifted_lse(z), z.logsumexp(-1)
    for r in scored.nonzero().flatten().tolist():
        row_ids = ids[r]
        if nan_rows[r]:
            if not bool(((row_ids >= -1) & (row_ids < V)).all()):
                return f"top_k_ids at position {r} out of range (a NaN row): {row_ids.tolist()}"
            continue
        if not bool(((row_ids >= 0) & (row_ids < V)).all()) or len(set(row_ids.tolist())) < top_k:
            return f"top_k_ids at position {r}: {row_ids.tolist()} (out of range or repeated)"
        kth = int(torch.topk(z[r], top_k).indices[-1])
        if not bool((z[r][row_ids] >= z[r][kth] - rows.band[r][row_ids] - rows.band[r][kth]).all()):
            return f"top_k_ids at position {r}: {row_ids.tolist()} holds a logit below the k-th"
        # each id's log-probability is its own: z[id] - lse (on the hidden path up to the
        # GEMM's rounding of z[id], which the tie band holds)
        own = ((z[r][row_ids] - top[r]) - shifted_lse[r] if math.isfinite(float(top[r]))
               else z[r][row_ids] - lse[r])
        scale = rows.scale[r].expand(top_k)
        if relative:
            scale = torch.maximum(scale, _finite0(own.abs()))
        bound = RTOL * scale
        if linear:
            bound = bound + rows.band[r][row_ids] + (THREE_WAY_MARGIN if three_way else 0.0)
        problem = _first_bad(lp[r], own, bound, f"top_k_logprobs at position {r} "
                             "against its ids", False, torch.zeros(top_k, dtype=torch.bool))
        if problem:
            return problem
    return None


def _check_compare_ints(got, want, base: Rows, test: Rows, scored, linear) -> Optional[str]:
    for name, rows in (("argmax_base", base), ("argmax_test", test)):
        value, ref = got[name].reshape(-1), want[name].reshape(-1)
        if bool((value[~scored] != -1).any()):
            return f"{name} at an ignored position is not -1"
        for r in scored.nonzero().flatten().tolist():
            a, row = int(value[r]), rows.raw[r]
            if a == int(ref[r]):
                continue
            if not linear or bool(torch.isnan(row).any()) or not 0 <= a < row.numel():
                return f"{name} at position {r}: {a}, reference {int(ref[r])}"
            top = int(row.argmax())
            if not row[a] >= row[top] - rows.raw_band[r][a] - rows.raw_band[r][top]:
                return (f"{name} at position {r}: {a} holds {float(row[a])!r} but the row's "
                        f"largest is {float(row.max())!r} (reference {int(ref[r])})")
    return None


def check(op: str, args, opts, result, *, relative_to_max: bool = False) -> Optional[str]:
    """None when ``result`` (of ``pplfast.<op>(*args, **opts)``) passes; else where and by how
    much it does not, in one line."""
    args, opts = _cpu(args, opts)
    want = fields(getattr(reference, op)(*args, **opts))
    got = {k: v.detach().cpu() for k, v in fields(result).items()}
    linear = op.startswith("linear_")
    rest = {k: v for k, v in opts.items() if k in ("softcap", "temperature", "shift")}
    if op.endswith("compare"):
        if linear:
            hb, wb, ht, wt, t = args
            rows = [_linear_rows(hb, wb, opts.get("bias_base"), rest, relative_to_max),
                    _linear_rows(ht, wt, opts.get("bias_test"), rest, relative_to_max)]
        else:
            xb, xt, t = args
            rows = [_logits_rows(xb, rest, relative_to_max, exact_ties=True),
                    _logits_rows(xt, rest, relative_to_max, exact_ties=True)]
        scale = torch.maximum(rows[0].scale, rows[1].scale)
    else:
        t = args[-1]
        rows = [_linear_rows(args[0], args[1], opts.get("bias"), rest, relative_to_max) if linear
                else _logits_rows(args[0], rest, relative_to_max)]
        scale = rows[0].scale
    targets = _targets(t, opts)
    scored = targets != -100
    missing = set(want) - set(got)
    if missing or set(got) - set(want):
        return f"fields {sorted(got)}, expected {sorted(want)}"
    for name in want:
        g, w = got[name], want[name]
        int_field = name in INT_FIELDS
        want_dtype = torch.int64 if int_field else torch.float32
        if g.dtype != want_dtype or tuple(g.shape) != tuple(w.shape):
            return (f"{name}: {g.dtype} of shape {tuple(g.shape)}, expected {want_dtype} of "
                    f"shape {tuple(w.shape)}")
    three_way = linear and args[0].dtype != torch.float32
    same = _same_dtype_path(op, args, opts) if three_way else {}
    for name in want:
        if name in INT_FIELDS:
            continue
        w = want[name].reshape(len(targets), -1).double()
        g = got[name].reshape(len(targets), -1).double()
        k = w.shape[1]
        row_scale = scale.unsqueeze(-1).expand(-1, k)
        if name in NLL_FIELDS or relative_to_max:
            row_scale = torch.maximum(row_scale, _finite0(w.abs()))
        bound = RTOL * row_scale
        if three_way:
            s = same[name].reshape(len(targets), -1).double()
            bound = bound + _finite0((s - w).abs()) + THREE_WAY_MARGIN
        ignored = (~scored).unsqueeze(-1).expand(-1, k)
        problem = _first_bad(g.reshape(-1), w.reshape(-1), bound.reshape(-1), name,
                             name in NONNEGATIVE, ignored.reshape(-1))
        if problem:
            return problem
    if op.endswith("compare"):
        return _check_compare_ints(got, want, rows[0], rows[1], scored, linear)
    if op.endswith("token_stats"):
        top_k = got["top_k_ids"].shape[-1] if "top_k_ids" in got else 0
        return _check_stats_ints(got, want, rows[0], targets, scored, top_k, linear=linear,
                                 three_way=three_way, relative=relative_to_max)
    return None
