"""Windows to padded forward passes: the one run loop of ``score_model``, ``score_texts``,
``compare_models`` and ``CorpusScorer``, for one model or two in lockstep.

A :class:`Plan` is built once per call from the documents (:func:`plan`): each document's window
schedule (:mod:`pplfast.models.windows`), its token stream (rolling mode puts the prefix token
first) and the token llama.cpp mode puts first in every chunk. :func:`run` groups the windows of
all documents into passes (:func:`pack_jobs`), builds each pass's right-padded inputs and targets
(:func:`window_inputs`), hands them to a *pass* and writes what the pass returns back into each
document, position by position. What a pass computes (the NLL, the statistics, the comparison of
two models) is the pass's business: an object with ``fields`` (the :class:`Field` s it returns)
that is called as ``pass_(ids, mask, targets)`` and returns one ``(rows, length, ...)`` tensor
per field. The windows counted are the windows that ran.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .._optional import require
from .head import check_ids, check_window, context_length, llamacpp_bos, prefix_id
from .windows import MODES, Window, make_windows

IGNORE = -100  # the targets of positions a pass does not score


class Field(NamedTuple):
    """One per-position output of a pass: its name, dtype and trailing shape (``(k,)`` for the
    top-k). Positions no window scores hold 0 (floats) or -1 (integers)."""

    name: str
    dtype: torch.dtype
    tail: tuple = ()

    def blank(self, n: int) -> torch.Tensor:
        fill = 0 if self.dtype.is_floating_point else -1
        return torch.full((n, *self.tail), fill, dtype=self.dtype)


class Plan(NamedTuple):
    """What runs: per document its token stream and window schedule."""

    streams: List[torch.Tensor]  # rolling mode: [prefix token] + the document's tokens
    schedules: List[List[Window]]
    first_token: Optional[int]  # put first in every window's input (llama.cpp's BOS), or None
    offset: int  # stream positions before the document's first token (1 in rolling mode)

    @property
    def jobs(self) -> List[tuple]:
        """``(document, window)`` of every window, in document order."""
        return [(i, w) for i, schedule in enumerate(self.schedules) for w in schedule]

    def probe_ids(self) -> Optional[torch.Tensor]:
        """The input ids of the first window (what a model's head is probed on), or None."""
        jobs = self.jobs
        if not jobs:
            return None
        doc, w = jobs[0]
        return self.streams[doc][w.start : w.start + w.input_length]


class Ran(NamedTuple):
    """What :func:`run` returns."""

    documents: List[Dict[str, torch.Tensor]]  # per document: each field and "scored", aligned
    # with its tokens
    num_windows: int  # the windows that ran, over all documents


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def check_targets(targets: torch.Tensor, vocab: int) -> None:
    """The targets of a pass (on the CPU, where they were built) lie in the vocabulary, so the
    ops can skip their own check and its device sync (``check_targets=False``)."""
    check_ids("targets", targets, vocab, ignore=IGNORE)


def documents(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """``(ids2, docs, spans)``: ``input_ids`` as ``(B, T)`` on the CPU, each row's document (the
    one contiguous run where ``attention_mask`` is 1) and its ``(lo, hi)`` span."""
    ids2 = input_ids.reshape(-1, input_ids.shape[-1]).cpu().long()
    if attention_mask is None:
        mask2 = torch.ones_like(ids2, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}"
            )
        mask2 = attention_mask.reshape(ids2.shape).cpu().bool()
    docs, spans = [], []
    for b in range(ids2.shape[0]):
        where = mask2[b].nonzero().flatten()
        lo = int(where[0]) if len(where) else 0
        hi = int(where[-1]) + 1 if len(where) else 0
        if hi - lo != len(where):
            raise ValueError(f"attention_mask row {b} is not one contiguous run of ones")
        docs.append(ids2[b, lo:hi])
        spans.append((lo, hi))
    return ids2, docs, spans


def schedules(lengths: Sequence[int], window, stride, mode: str, *models) -> List[List[Window]]:
    """The window schedule of each document (``lengths``: tokens per document); ``window`` None
    means the shortest context length of ``models``, which the window must suit."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if window is None:
        contexts = [c for c in map(context_length, models) if c]
        window = min(contexts) if contexts else None
    for model in models:
        check_window(window, model)
    return [make_windows(n, window=window, stride=stride, mode=mode) for n in lengths]


def plan(docs: Sequence[torch.Tensor], *, window, stride, mode: str, prefix_token_id, tokenizer,
         models: Sequence) -> Plan:
    """The plan of one call over ``docs`` (token ids, one tensor per document) for ``models``
    (the first one's config gives the prefix token)."""
    sched = schedules([len(d) for d in docs], window, stride, mode, *models)
    first_token = None
    if mode == "rolling":
        prefix = torch.tensor([prefix_id(models[0], tokenizer, prefix_token_id)], dtype=torch.long)
        streams = [torch.cat([prefix, d]) for d in docs]
    else:
        streams = list(docs)
        if mode == "llamacpp":
            first_token = llamacpp_bos(models[0], tokenizer, prefix_token_id)
    return Plan(streams, sched, first_token, 1 if mode == "rolling" else 0)


def pack_jobs(jobs, batch_size: Optional[int], batch_tokens: Optional[int]):
    """Group (document, window) jobs into forward passes.

    ``batch_tokens`` None: ``batch_size`` windows at a time, in order. Otherwise the windows are
    sorted by length (longest first) and packed so that a pass feeds at most ``batch_tokens``
    tokens, padding included (and at most ``batch_size`` windows when given); a window longer
    than ``batch_tokens`` runs alone.
    """
    if batch_tokens is None:
        return [jobs[b : b + batch_size] for b in range(0, len(jobs), batch_size)]
    batches, current = [], []
    for job in sorted(jobs, key=lambda j: -j[1].input_length):
        # sorted longest first: the first window of a pass sets its padded length
        full = current and ((len(current) + 1) * current[0][1].input_length > batch_tokens
                            or (batch_size is not None and len(current) == batch_size))
        if full:
            batches.append(current)
            current = []
        current.append(job)
    if current:
        batches.append(current)
    return batches


def window_inputs(streams, batch, first_token: Optional[int] = None):
    """``(ids, mask, targets)`` of one pass over ``batch`` (a list of (stream, window) jobs), on
    the CPU: right-padded ids, the attention mask (None when nothing is padded) and the targets,
    IGNORE where a position is not scored. ``first_token``: replaces the first input token of
    every window (llama.cpp mode); None keeps the stream's."""
    length = max(w.input_length for _, w in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    targets = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    for row, (doc, w) in enumerate(batch):
        n = w.input_length
        ids[row, :n] = streams[doc][w.start : w.stop - 1]
        if first_token is not None:
            ids[row, 0] = first_token
        mask[row, :n] = 1
        skip = w.score_start - w.start - 1  # outputs that only feed context
        targets[row, skip:n] = streams[doc][w.score_start : w.stop]
    # right padding: real tokens never attend to the pads after them, positions stay 0..n-1
    return ids, (mask if bool((mask == 0).any()) else None), targets


@contextlib.contextmanager
def scoring_mode(*models):
    """Evaluation mode (dropout would make scores random) and inference mode for the block; the
    models that were training are put back to training after it."""
    training = [m for m in models if getattr(m, "training", False)]
    for m in training:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m in training:
            m.train()


def progress_bar(total: int, enabled):
    if not enabled:
        return None
    tqdm = require("tqdm.auto", extra="progress", feature="progress=True").tqdm
    return tqdm(total=total, unit="window", desc="scoring", leave=False)


def run(plan_: Plan, pass_, *, batch_size: Optional[int], batch_tokens: Optional[int] = None,
        progress=False) -> Ran:
    """Run every window of ``plan_`` through ``pass_`` (see the module doc); per document, each
    of ``pass_.fields`` and the ``scored`` mask, aligned with the document's tokens."""
    fields: Sequence[Field] = pass_.fields
    out = []
    for stream in plan_.streams:
        values = {f.name: f.blank(len(stream)) for f in fields}
        values["scored"] = torch.zeros(len(stream), dtype=torch.bool)
        out.append(values)
    jobs = plan_.jobs
    ran = 0
    bar = progress_bar(len(jobs), progress) if jobs else None
    try:
        for batch in pack_jobs(jobs, batch_size, batch_tokens):
            ids, mask, targets = window_inputs(plan_.streams, batch, plan_.first_token)
            values = {name: v.cpu() for name, v in pass_(ids, mask, targets).items()}
            for row, (doc, w) in enumerate(batch):
                skip = w.score_start - w.start - 1
                for name, v in values.items():
                    out[doc][name][w.score_start : w.stop] = v[row, skip : w.input_length]
                out[doc]["scored"][w.score_start : w.stop] = True
            ran += len(batch)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()  # also on errors and Ctrl-C, so that messages start on a clean line
    return Ran([{name: v[plan_.offset :] for name, v in doc.items()} for doc in out], ran)
