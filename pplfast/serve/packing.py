"""Sequences to forward passes: shared prefixes packed as prefix trees, passes under a token budget.

A :class:`Sequence` is what one prompt or one window asks of the model: the token ids fed to it,
the output positions read, and the token each of those positions predicts. Everything here is
index arithmetic on CPU tensors; :mod:`pplfast.serve.engine` runs the passes.

Shared prefixes (several continuations of one context, as in every multiple-choice task) are
scored once, exactly: sequences that share a prefix of at least ``min_shared`` tokens become one
*tree row* ``[prefix, suffix_1, suffix_2, ...]``. Each suffix token gets the position id it has in
its own sequence (``len(prefix) + offset``) and a 4-D attention mask lets it see the prefix and
the earlier tokens of its own suffix only, so its hidden state is the one its sequence alone
would give (within float32 rounding; :meth:`pplfast.serve.engine.ModelEngine` probes each model
for this at start and turns trees off where it does not hold). Which sequences share a row is
chosen by a small dynamic programme over the sequences sorted by their tokens: it maximises the
tokens saved, ``(members - 1) * len(prefix)`` per row. Rows are then sorted by length (longest
first) and packed into passes of at most ``max_tokens`` tokens, padding included, as
``score_model`` packs windows; a row longer than the budget runs alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence as Seq

import torch

NO_TARGET = -1  # a read position with nothing to score: argmax and top-k only (the next token)
MAX_MEMBERS = 64  # sequences in one tree row at most (bounds the grouping search)


@dataclass(eq=False)
class Sequence:
    """One model input and what to read from it.

    ``ids``: int64 ``(n,)``, the tokens fed (positions ``0 .. n-1``). ``positions``: int64
    ``(m,)``, the outputs read; ``targets``: int64 ``(m,)``, the token each predicts, or
    :data:`NO_TARGET`. ``stats``: entropy, max log-probability, argmax and rank wanted besides
    the NLL; ``top_k``: most probable tokens wanted per read position (implies ``stats``).
    After the run, ``result`` maps field names (``nll``, and with stats ``entropy``,
    ``max_logprob``, ``argmax``, ``rank``, ``top_k_ids``, ``top_k_logprobs``) to tensors whose
    first dimension follows ``positions``.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    stats: bool = False
    top_k: int = 0
    result: Optional[Dict[str, torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class Row:
    """One row of a pass: ``prefix`` tokens then each member's suffix (a plain row: one member,
    the whole sequence as its prefix)."""

    members: List[Sequence]
    prefix: int  # tokens shared by every member

    @property
    def length(self) -> int:
        return self.prefix + sum(len(s) - self.prefix for s in self.members)

    @property
    def is_tree(self) -> bool:
        return len(self.members) > 1


@dataclass
class Pass:
    """One forward pass: right-padded rows and the reads of their members."""

    rows: List[Row]
    width: int = field(init=False)

    def __post_init__(self) -> None:
        self.width = max(r.length for r in self.rows)

    @property
    def tokens(self) -> int:
        """Tokens fed, padding included."""
        return self.width * len(self.rows)

    @property
    def sequences(self) -> List[Sequence]:
        return [s for r in self.rows for s in r.members]

    def keeping(self, keep) -> Optional["Pass"]:
        """This pass without the sequences for which ``keep(seq)`` is false (a tree row keeps its
        prefix: still shared by the members left); None when nothing is left."""
        rows = [Row(kept, r.prefix if len(kept) > 1 else len(kept[0])) for r in self.rows
                for kept in [[s for s in r.members if keep(s)]] if kept]
        return Pass(rows) if rows else None


def _lcp(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


def group_rows(seqs: Seq[Sequence], *, min_shared: int, max_row: int) -> List[Row]:
    """Rows for ``seqs``: runs of sequences (sorted by their tokens) that share at least
    ``min_shared`` leading tokens become tree rows of at most ``max_row`` tokens, chosen to save
    the most tokens; every other sequence is a plain row. ``min_shared=0`` turns trees off."""
    if not min_shared or len(seqs) < 2:
        return [Row([s], len(s)) for s in seqs]
    order = sorted(seqs, key=lambda s: s.ids.tolist())
    n = len(order)
    # adjacent common prefixes; a row's prefix must leave each member one token of its own
    # or be its whole sequence (a member equal to the prefix reads prefix positions only)
    lcp = [_lcp(order[i].ids, order[i + 1].ids) for i in range(n - 1)]
    best = [0] * (n + 1)  # best[j]: tokens saved by the best grouping of order[:j]
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start[j] = best[j - 1], j - 1  # order[j-1] alone
        prefix, total = len(order[j - 1]), len(order[j - 1])
        for i in range(j - 2, max(-1, j - 1 - MAX_MEMBERS), -1):  # rows order[i:j]
            prefix = min(prefix, lcp[i])
            total += len(order[i])
            if prefix < min_shared:
                break
            members = j - i
            if prefix + (total - members * prefix) > max_row:
                break
            saved = best[i] + (members - 1) * prefix
            if saved > best[j]:
                best[j], start[j] = saved, i
    rows: List[Row] = []
    j = n
    while j > 0:
        i = start[j]
        members = order[i:j]
        prefix = min((lcp[k] for k in range(i, j - 1)), default=len(members[0]))
        rows.append(Row(members, prefix if len(members) > 1 else len(members[0])))
        j = i
    rows.reverse()
    return rows


def plan_passes(seqs: Seq[Sequence], *, max_tokens: int, min_shared: int = 0,
                max_row: int = 0) -> List[Pass]:
    """Passes for ``seqs``: rows from :func:`group_rows`, longest first, each pass at most
    ``max_tokens`` tokens padding included (a longer row runs alone)."""
    rows = group_rows(seqs, min_shared=min_shared, max_row=max_row)
    passes, current = [], []
    for row in sorted(rows, key=lambda r: -r.length):
        if current and (len(current) + 1) * current[0].length > max_tokens:
            passes.append(Pass(current))
            current = []
        current.append(row)
    if current:
        passes.append(Pass(current))
    return passes


def row_positions(row: Row, member: int) -> torch.Tensor:
    """Where each token of ``row.members[member]`` sits in the row."""
    seq = row.members[member]
    pos = torch.arange(len(seq))
    if row.is_tree:
        offset = row.prefix + sum(len(s) - row.prefix for s in row.members[:member])
        pos[row.prefix:] += offset - row.prefix
    return pos


@dataclass
class PassInputs:
    """Tensors of one pass (CPU): ``ids`` ``(B, T)``; ``attention_mask``: None (nothing padded),
    ``(B, T)`` (padding) or ``(B, 1, T, T)`` (tree rows; True or 0.0 where a query may attend);
    ``position_ids`` ``(B, T)`` with tree rows, else None."""

    ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]


def pass_inputs(p: Pass, mask_dtype: Optional[torch.dtype] = None) -> PassInputs:
    """The model inputs of ``p``. ``mask_dtype`` (needed when ``p`` has a tree row): ``torch.bool``
    for a boolean 4-D mask, a float dtype for an additive one (0 / the dtype's minimum)."""
    B, T = len(p.rows), p.width
    ids = torch.zeros(B, T, dtype=torch.long)
    lengths = torch.tensor([r.length for r in p.rows])
    trees = any(r.is_tree for r in p.rows)
    segment = torch.full((B, T), -1, dtype=torch.long)  # -1 padding, 0 prefix, k suffix k
    positions = torch.arange(T).repeat(B, 1)
    for b, row in enumerate(p.rows):
        for k, seq in enumerate(row.members):
            where = row_positions(row, k)
            ids[b, where] = seq.ids
            positions[b, where] = torch.arange(len(seq))
            if row.is_tree:
                segment[b, where[row.prefix:]] = k + 1
        segment[b, : row.prefix] = 0
        if not row.is_tree:
            segment[b, : row.length] = 0
    if not trees:
        padded = bool((lengths < T).any())
        mask = (torch.arange(T) < lengths[:, None]).long() if padded else None
        return PassInputs(ids, mask, None)
    if mask_dtype is None:
        raise ValueError("a pass with tree rows needs mask_dtype")
    q = torch.arange(T)
    causal = q[None, :] <= q[:, None]  # (query, key)
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (seg_q >= 0) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allowed |= torch.eye(T, dtype=torch.bool)  # padding queries see themselves (no NaN rows)
    allowed = allowed[:, None]
    if mask_dtype == torch.bool:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=mask_dtype)
        mask.masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return PassInputs(ids, mask, positions)


@dataclass
class Reads:
    """The outputs a pass must compute: flat indices into its ``(B * T)`` hidden states and the
    target of each, split into rows that need statistics and rows that need the NLL only, each
    without duplicates (tree members share their prefix reads). ``stats_top_k``: top-k computed
    for the statistics rows."""

    stats_index: torch.Tensor
    stats_targets: torch.Tensor
    nll_index: torch.Tensor
    nll_targets: torch.Tensor
    stats_top_k: int
    _inverse: list  # per sequence: ("stats" | "nll", index into that group's rows)


def pass_reads(p: Pass) -> Reads:
    keys: Dict[bool, list] = {True: [], False: []}
    per_seq = []
    for b, row in enumerate(p.rows):
        for k, seq in enumerate(row.members):
            flat = b * p.width + row_positions(row, k)[seq.positions]
            stats = seq.stats or seq.top_k > 0
            keys[stats].append(torch.stack([flat, seq.targets], 1))
            per_seq.append((seq, stats, len(keys[stats]) - 1))
    unique = {}
    for stats, parts in keys.items():
        if parts:
            cat = torch.cat(parts)
            uniq, inverse = torch.unique(cat, dim=0, return_inverse=True)
            sizes = [len(x) for x in parts]
            unique[stats] = (uniq, list(torch.split(inverse, sizes)))
        else:
            unique[stats] = (torch.zeros(0, 2, dtype=torch.long), [])
    inverse = [(stats, unique[stats][1][i]) for _, stats, i in per_seq]
    top_k = max((s.top_k for s in p.sequences), default=0)
    return Reads(unique[True][0][:, 0], unique[True][0][:, 1], unique[False][0][:, 0],
                 unique[False][0][:, 1], top_k, inverse)


def scatter_results(p: Pass, reads: Reads, stats: Optional[Dict[str, torch.Tensor]],
                    nll: torch.Tensor) -> None:
    """Fill each sequence's ``result`` from the pass's statistics rows (a dict of fields, each
    following ``reads.stats_index``) and NLL rows (following ``reads.nll_index``)."""
    for seq, (is_stats, index) in zip(p.sequences, reads._inverse):
        if is_stats:
            result = {name: value[index] for name, value in stats.items()}
            for name in ("top_k_ids", "top_k_logprobs"):
                if name in result:
                    result[name] = result[name][:, : seq.top_k]
        else:
            result = {"nll": nll[index]}
        no_target = seq.targets == NO_TARGET
        if bool(no_target.any()):  # a position read for its argmax only: no NLL, no rank
            result["nll"] = result["nll"].masked_fill(no_target, float("nan"))
            if "rank" in result:
                result["rank"] = result["rank"].masked_fill(no_target, -1)
        seq.result = result
