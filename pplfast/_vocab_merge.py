"""Vocab-parallel ops: each rank's slice partials, one all-gather, one float64 merge.

Every rank of the vocabulary group runs, for its rows and its slice ``[start, stop)`` of the
vocabulary, its backend's *slice launcher* (``<op>_slice`` in the backend module: a few numbers
per row, never finished), packs them into one flat float32 buffer, and all-gathers it
(:func:`exchange`); every rank then merges the ``P`` partials of each row in float64
(:func:`merge_lse` and friends) and finishes the op's fields, identically. Nothing of the size of
the vocabulary crosses a rank, and nothing of the size of the slice is allocated here.

Partial layout (per row, float32 words; integer words carry int32 bit patterns). ``y`` are the
soft-capped logits as float32 (what the kernels compute), ``m`` the slice's maximum of ``y``
(NaN when the slice holds a NaN), ``r = m`` where finite and 0 elsewhere (the slice's reference
point), ``u = (y - r) / T``; entries with ``exp(u) = 0`` (``-inf`` logits) add 0 to every sum.
Sums that can pass float32's range (the entropy moment, the KL cross terms: their terms reach
``6.8e38 / T`` at the top of the float range) travel as means over the slice's own weights, in
half logit units (``mean * T / 2``, at most ``FLT_MAX`` in size), 0 where ``s = 0``:

==========  ======================================================================  =========
op          words                                                                   bytes/row
==========  ======================================================================  =========
NLL         ``m``, ``s = sum exp(u)``, ``delta = (r - y_target) / T`` (0 where the    12
            target lies in another slice)
TARGET      the raw target logit (0 where it lies elsewhere): the rank threshold        4
STATS       ``m``, ``s``, ``e = sum exp(u) u`` (as a mean), argmax id, rank count       20 + 8k
            (``y > y_target`` in the slice), then ``k`` top values ``y`` and their ``k`` ids (global;
            padding ``-inf`` / -1 where the slice is narrower than ``k``)
COMPARE     per model: ``m``, ``s``, ``delta``; ``A = sum exp(u_p) (u_p - u_q)``,      48
            ``B = sum exp(u_q) (u_q - u_p)`` (both as means); per model the raw logits' maximum and its
            id (compare's argmax is of the raw logits)
==========  ======================================================================  =========

Each buffer starts with a header of five int32 words: the slice's ``start`` and ``stop``, the
``vocab_size`` the rank was given (-1 if none), a checksum of the targets and the op's code; the
merge checks that the slices tile ``[0, V)`` (and add up to every ``vocab_size`` given), that
every rank ran the same op on the same targets, and (when the caller could not know ``V``) the
target range: the same checks on the same data, so every rank raises the same error. ``token_nll``, ``linear_token_nll`` and ``compare`` make one
collective per call; ``token_stats`` makes two (TARGET first: a rank's count of ``y > y_target``
needs the target's logit, which one rank holds).

Merge (float64), with ``M = max_r m_r``, ``R = M`` where finite else 0, ``c_r = (r_r - R) / T``,
``S = sum_r exp(c_r) s_r``: ``nll = log S - c_o + delta_o`` (``o`` the target's slice), entropy
``log S - sum_r exp(c_r) (e_r + c_r s_r) / S``, max log-probability ``(M - R) / T - log S``, KL
``sum_r exp(c_r) (A_r + s_r (c_r - c'_r)) / S - log S + log S'``: the float64 reference's
formulas (``pplfast.reference``: every row relative to its maximum), so NaN, +-inf, all--inf
slices, -inf targets and ties come out as the reference gives them on the whole vocabulary.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from . import _validate
from .vocab_parallel import process_group

Tensor = torch.Tensor

HEADER = 5  # start, stop, vocab_size (-1: not given), targets checksum, op code
NLL, TARGET, STATS, COMPARE = 1, 2, 3, 4
_KIND = {NLL: "token_nll", TARGET: "token_stats", STATS: "token_stats", COMPARE: "compare"}
# what each word of a row holds: "f" a float32, "i" an int32
NLL_WORDS = "fff"
TARGET_WORDS = "f"
COMPARE_WORDS = "ffffff" + "ff" + "fifi"


def stats_words(top_k: int) -> str:
    return "fffii" + "f" * top_k + "i" * top_k


def bytes_per_row(op: str, top_k: int = 0) -> int:
    """Bytes each rank sends per row in one call of ``op`` ("token_nll", "token_stats",
    "compare"), headers aside (docs/vocab_parallel.md)."""
    words = {"token_nll": len(NLL_WORDS), "compare": len(COMPARE_WORDS),
             "token_stats": len(TARGET_WORDS) + len(stats_words(top_k))}[op]
    return 4 * words


# ---- packing and the collective ----------------------------------------------------------------

def lse_words(m: Tensor, s: Tensor, y_target: Tensor, inside: Tensor,
              temperature: float) -> tuple:
    """``(m, s, delta)`` of a slice, for slice launchers whose running state holds the maximum
    ``m`` of ``y`` (NaN where the slice holds a NaN), ``s = sum exp((y - m) / T)`` where ``m`` is
    finite and the target's ``y``: ``s`` moved to this layout's reference point (+inf for a +inf
    maximum, 0 for an empty slice) and ``delta = (r - y_target) / T`` where the target lies in
    the slice (``inside``), else 0."""
    m, s, y_target = m.double(), s.double(), y_target.double()
    r = torch.where(torch.isfinite(m), m, 0.0)
    s = torch.where(m == float("inf"), float("inf"), torch.where(m == float("-inf"), 0.0, s))
    return m, s, torch.where(inside, (r - y_target) / temperature, 0.0)


def inside(targets: Tensor, v_offset: int, width: int) -> Tensor:
    """Whether each (global) target lies in the slice ``[v_offset, v_offset + width)``."""
    local = targets - v_offset
    return (local >= 0) & (local < width)


def _as_mean(total: Tensor, s: Tensor, temperature: float) -> Tensor:
    """A slice's sum of ``exp(u) * x`` as its mean over the weights ``exp(u)``, times ``T / 2``
    (the units it travels in: module notes); 0 where the slice weighs nothing."""
    s = s.double()
    return torch.where(s > 0, total.double() / s, 0.0) * (temperature / 2)


def _from_mean(mean: Tensor, s: Tensor, temperature: float) -> Tensor:
    return mean * s * (2 / temperature)


def _checksum(targets: Tensor) -> Tensor:
    """A 31-bit checksum of the flat int64 targets, on their device (no host read)."""
    n = targets.numel()
    weights = torch.arange(n, device=targets.device, dtype=torch.int64) % 65521 + 1
    return ((targets % 2147483647) * weights).sum() % 2147483647


def pack(fields: Sequence[Tensor], words: str, bounds: List[int], targets: Tensor,
         code: int) -> Tensor:
    """One flat float32 buffer: the header, then each row's words (``fields`` in the order of
    ``words``; a ``(n, k)`` field fills ``k`` words)."""
    n = targets.numel()
    device = targets.device
    buf = torch.zeros(HEADER + n * len(words), dtype=torch.float32, device=device)
    start, stop, size = bounds
    header = torch.stack([torch.tensor(start, device=device), torch.tensor(stop, device=device),
                          torch.tensor(size, device=device), _checksum(targets),
                          torch.tensor(code, device=device)])
    buf[:HEADER].view(torch.int32).copy_(header.to(torch.int32))
    body = buf[HEADER:].view(n, len(words))
    col = 0
    for f in fields:
        width = 1 if f.ndim == 1 else f.shape[1]
        if width == 0:  # top-k fields with top_k = 0
            continue
        f = f.reshape(n, width)
        if words[col] == "i":
            body.view(torch.int32)[:, col : col + width].copy_(f.to(torch.int32))
        else:
            body[:, col : col + width].copy_(f.to(torch.float32))
        col += width
    if col != len(words):
        raise AssertionError(f"a slice launcher returned {col} words per row, {len(words)} expected")
    return buf


def _all_gather(out: Tensor, buf: Tensor, group) -> None:
    """The one collective of a call: every rank's ``buf`` into the rows of ``out``."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, buf, group=group)


def _collective_device(group, device: torch.device) -> torch.device:
    import torch.distributed as dist

    if device.type == "cuda" and "nccl" in str(dist.get_backend(group)):
        return device
    return torch.device("cpu")


class Layout(NamedTuple):
    """The slices of the group, read from the headers: the ranks of the non-empty slices in
    vocabulary order, their starts and stops, and ``V``."""

    order: List[int]
    starts: List[int]
    stops: List[int]
    vocab_size: int


def _describe(spans) -> str:
    return ", ".join(f"[{a}, {b}) on rank {r}" for a, b, r in spans)


def layout(headers: List[List[int]]) -> Layout:
    """Check the headers of one gather (the same checks, with the same outcome, on every rank)
    and return the slices in vocabulary order."""
    codes = sorted({h[4] for h in headers})
    if len(codes) > 1:
        raise RuntimeError(f"the ranks of the vocabulary group made different calls (codes "
                           f"{codes}): every rank must call the same op with the same options")
    if len({h[3] for h in headers}) > 1:
        raise ValueError("targets differ across the ranks of the vocabulary group: every rank "
                         "must pass the same targets (and ignore_index) for its rows")
    spans = sorted((h[0], h[1], rank) for rank, h in enumerate(headers))
    pos = 0
    for start, stop, _ in spans:
        if start != pos:
            what = f"overlap at {start}" if start < pos else f"leave [{pos}, {start}) uncovered"
            raise ValueError(f"vocab_shard: the slices of the group's ranks ({_describe(spans)}) "
                             f"{what}: they must tile [0, V)")
        pos = stop
    for size in sorted({h[2] for h in headers if h[2] >= 0}):
        if size != pos:
            raise ValueError(f"vocab_shard: the slices of the group's ranks cover [0, {pos}) but "
                             f"vocab_size is {size}")
    kept = [(a, b, r) for a, b, r in spans if b > a]
    return Layout([r for _, _, r in kept], [a for a, _, _ in kept], [b for _, b, _ in kept], pos)


def exchange(fields: Sequence[Tensor], words: str, bounds: List[int], group: str,
             targets: Tensor, code: int):
    """Pack this rank's partials, all-gather them over ``group`` (one collective) and check the
    headers; returns ``(layout, columns)``, ``columns[j]`` the ``(P', n)`` float64 (or int64 for
    "i" words) values of word ``j`` of the non-empty slices in vocabulary order."""
    import torch.distributed as dist

    buf = pack(fields, words, bounds, targets, code)
    pg = process_group(group)
    world = dist.get_world_size(pg)
    device = _collective_device(pg, buf.device)
    out = torch.empty((world, buf.numel()), dtype=torch.float32, device=device)
    _all_gather(out, buf.to(device).view(1, -1), pg)
    out = out.to(targets.device)
    lay = layout(out[:, :HEADER].view(torch.int32).tolist())
    n = targets.numel()
    body = out[lay.order, HEADER:].view(len(lay.order), n, len(words))
    columns = []
    for j, w in enumerate(words):
        if w == "i":
            columns.append(body.view(torch.int32)[:, :, j].to(torch.int64))
        else:
            columns.append(body[:, :, j].double())
    return lay, columns


# ---- the merge (float64, every backend) --------------------------------------------------------

class Lse(NamedTuple):
    """The merged log-sum-exp of the rows: ``M`` (max), ``R`` (reference point), ``c`` and
    ``w = exp(c)`` per slice, ``S`` and ``log S``."""

    M: Tensor
    R: Tensor
    c: Tensor
    w: Tensor
    S: Tensor
    log_S: Tensor


def merge_lse(m: Tensor, s: Tensor, temperature: float) -> Lse:
    """``m``, ``s``: ``(P', n)`` float64 slice maxima and sums (relative to each slice's
    reference point ``r``)."""
    M = m.amax(0)  # NaN in any slice: NaN
    R = torch.where(torch.isfinite(M), M, 0.0)
    r = torch.where(torch.isfinite(m), m, 0.0)
    c = (r - R) / temperature
    w = torch.exp(c)
    S = torch.where(s == 0, 0.0, w * s).sum(0)  # an all -inf slice adds 0, whatever w is
    S = torch.where(torch.isnan(M), float("nan"), S)  # a slice's NaN is in its m, not its s
    return Lse(M, R, c, w, S, torch.log(S))


def _owner(targets: Tensor, lay: Layout) -> Tensor:
    """Index (in the layout's order) of the slice holding each target (clamped for ignored or
    out-of-range targets, which are masked or refused)."""
    stops = torch.tensor(lay.stops, dtype=torch.int64, device=targets.device)
    index = torch.searchsorted(stops, targets, right=True)
    return index.clamp(0, len(lay.stops) - 1)


def _pick(column: Tensor, owner: Tensor) -> Tensor:
    return column.gather(0, owner.unsqueeze(0)).squeeze(0)


def _argmax(values: Tensor, ids: Tensor) -> Tensor:
    """The global id of the largest value over the slices (NaN counts as the largest; ties go
    to the first slice in vocabulary order, so the lowest id wins, as on one device)."""
    return _pick(ids, values.argmax(0))


def _scored(fields: Sequence[Tensor], mask: Tensor) -> tuple:
    """Float fields float32 (0 where not scored), integer fields int64 (-1 where not scored)."""
    out = []
    for f in fields:
        keep = mask if f.ndim == 1 else mask.unsqueeze(-1)
        if f.dtype.is_floating_point:
            out.append(torch.where(keep, f, 0.0).float())
        else:
            out.append(torch.where(keep, f, -1))
    return tuple(out)


def _check_targets(targets: Tensor, mask: Tensor, lay: Layout, ignore_index: int,
                   check: bool, bounds: List[int]) -> None:
    """The target range, checked here when the caller could not know ``V`` (no vocab_size)."""
    if check and bounds[2] < 0:
        _validate.scored_targets(targets, lay.vocab_size, ignore_index, check=True, count=False)


def _nll(lse: Lse, delta_owner: Tensor, c_owner: Tensor) -> Tensor:
    return (lse.log_S - c_owner + delta_owner).clamp_min(0.0)


class Call(NamedTuple):
    """What every vocab-parallel op body passes here."""

    targets: Tensor  # as the caller passed them (for the range check's message)
    flat: Tensor  # (n,) int64
    mask: Tensor  # (n,) bool, scored rows
    ignore_index: int
    softcap: Optional[float]
    temperature: float
    bounds: List[int]  # [start, stop, vocab_size or -1]
    group: str
    check: bool  # the caller asked for the target-range check


def token_nll(call: Call, produce: Callable) -> Tensor:
    """``produce()``: this rank's ``(m, s, delta)``. Returns the NLL, flat."""
    m, s, delta = produce()
    lay, (M, S, D) = exchange((m, s, delta), NLL_WORDS, call.bounds, call.group, call.flat, NLL)
    _check_targets(call.targets, call.mask, lay, call.ignore_index, call.check, call.bounds)
    if not lay.order:
        return torch.zeros(call.flat.numel(), dtype=torch.float32, device=call.flat.device)
    lse = merge_lse(M, S, call.temperature)
    owner = _owner(call.flat, lay)
    return _scored((_nll(lse, _pick(D, owner), _pick(lse.c, owner)),), call.mask)[0]


def target_values(call: Call, produce: Callable) -> Tensor:
    """The TARGET exchange of ``token_stats``: each row's raw target logit (float32, before the
    softcap), from the rank whose slice holds it; every slice launcher soft-caps it as it
    soft-caps its own logits, so that its rank compares like with like."""
    values = produce()
    lay, (Y,) = exchange((values,), TARGET_WORDS, call.bounds, call.group, call.flat, TARGET)
    _check_targets(call.targets, call.mask, lay, call.ignore_index, call.check, call.bounds)
    if not lay.order:
        return torch.zeros(call.flat.numel(), dtype=torch.float32, device=call.flat.device)
    return _pick(Y, _owner(call.flat, lay)).float()


def token_stats(call: Call, top_k: int, target_x: Tensor, produce: Callable) -> tuple:
    """``produce()``: this rank's ``(m, s, e, argmax, rank, top_values, top_ids)``; ``target_x``
    (raw target logits) from :func:`target_values`. Returns the seven ``TokenStats`` fields,
    flat."""
    m, s, e, *rest = produce()
    parts = (m, s, _as_mean(e, s, call.temperature), *rest)
    words = stats_words(top_k)
    lay, cols = exchange(parts, words, call.bounds, call.group, call.flat, STATS + 16 * top_k)
    n = call.flat.numel()
    if top_k > lay.vocab_size:
        raise ValueError(f"top_k must be an int in [0, {min(lay.vocab_size, 64)}] (min(V, 64) "
                         f"with V={lay.vocab_size}), got {top_k}")
    if not lay.order:
        zeros = torch.zeros(n, dtype=torch.float64, device=call.flat.device)
        ints = torch.zeros(n, dtype=torch.int64, device=call.flat.device)
        blank = torch.zeros(n, top_k, device=call.flat.device)
        return _scored((zeros, zeros, zeros, ints, ints, blank.long(), blank.double()), call.mask)
    M_, S_, E, ids, counts = cols[:5]
    E = _from_mean(E, S_, call.temperature)
    lse = merge_lse(M_, S_, call.temperature)
    T = call.temperature
    y_t = target_x.double()
    if call.softcap is not None:
        y_t = call.softcap * torch.tanh(y_t / call.softcap)
    nll = (lse.log_S - (y_t - lse.R) / T).clamp_min(0.0)
    moment = torch.where((S_ == 0) | (lse.w == 0), 0.0, lse.w * (E + lse.c * S_)).sum(0)
    entropy = lse.log_S - moment / lse.S
    defined = torch.isfinite(lse.M)
    entropy = torch.where(defined, entropy, float("nan")).clamp_min(0.0)
    max_logprob = ((lse.M - lse.R) / T - lse.log_S).clamp_max(0.0)
    argmax = _argmax(M_, ids)
    rank = counts.sum(0)
    top_ids = torch.zeros(n, top_k, dtype=torch.int64, device=call.flat.device)
    top_lp = torch.zeros(n, top_k, dtype=torch.float64, device=call.flat.device)
    if top_k:
        values = torch.stack(cols[5 : 5 + top_k], -1)  # (P', n, k)
        cand = torch.stack(cols[5 + top_k :], -1)
        values = values.permute(1, 0, 2).reshape(n, -1)
        cand = cand.permute(1, 0, 2).reshape(n, -1)
        # lowest id first among equal values, padding (-1) last; then by value, stably
        by_id = torch.where(cand < 0, torch.iinfo(torch.int64).max, cand).argsort(dim=-1, stable=True)
        values, cand = values.gather(-1, by_id), cand.gather(-1, by_id)
        by_value = values.argsort(dim=-1, descending=True, stable=True)[:, :top_k]
        top_ids = cand.gather(-1, by_value)
        top_lp = (values.gather(-1, by_value) - lse.R.unsqueeze(-1)) / T - lse.log_S.unsqueeze(-1)
    return _scored((nll, entropy, max_logprob, argmax, rank, top_ids, top_lp), call.mask)


def compare(call: Call, produce: Callable) -> tuple:
    """``produce()``: this rank's twelve COMPARE words per row (module doc). Returns
    ``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)``, flat."""
    mp, sp, dp, mq, sq, dq, A, B, *rest = produce()
    T = call.temperature
    parts = (mp, sp, dp, mq, sq, dq, _as_mean(A, sp, T), _as_mean(B, sq, T), *rest)
    lay, cols = exchange(parts, COMPARE_WORDS, call.bounds, call.group, call.flat, COMPARE)
    _check_targets(call.targets, call.mask, lay, call.ignore_index, call.check, call.bounds)
    n = call.flat.numel()
    if not lay.order:
        zeros = torch.zeros(n, dtype=torch.float64, device=call.flat.device)
        ints = torch.zeros(n, dtype=torch.int64, device=call.flat.device)
        return _scored((zeros,) * 4 + (ints,) * 2, call.mask)
    mp, sp, dp, mq, sq, dq, A, B, raw_p, id_p, raw_q, id_q = cols
    A, B = _from_mean(A, sp, T), _from_mean(B, sq, T)
    p, q = merge_lse(mp, sp, call.temperature), merge_lse(mq, sq, call.temperature)
    owner = _owner(call.flat, lay)
    nll_p = _nll(p, _pick(dp, owner), _pick(p.c, owner))
    nll_q = _nll(q, _pick(dq, owner), _pick(q.c, owner))
    undefined = ~torch.isfinite(p.M) | ~torch.isfinite(q.M)

    def kl(a: Lse, b: Lse, cross: Tensor, s: Tensor) -> Tensor:
        # terms of slices whose p is 0 (all -inf, or exp(c) below float64's range) add 0
        term = torch.where((s == 0) | (a.w == 0), 0.0, a.w * (cross + s * (a.c - b.c))).sum(0)
        value = term / a.S - a.log_S + b.log_S
        return torch.where(undefined, float("nan"), value).clamp_min(0.0)

    return _scored((kl(p, q, A, sp), kl(q, p, B, sq), nll_p, nll_q, _argmax(raw_p, id_p),
                    _argmax(raw_q, id_q)), call.mask)
