"""Score Hugging Face causal LMs without building their logits.

The model body (``model.base_model``) gives the final hidden states; the output layer
(``model.get_output_embeddings()``) is applied inside :func:`pplfast.linear_token_nll`, so no
``(tokens, V)`` tensor exists. Only the hidden states of scored tokens reach the output layer,
which also skips the context-only positions of sliding windows.

How each model's last step maps onto ``linear_token_nll``'s ``softcap`` then ``temperature``:

- ``final_logit_softcapping`` (Gemma 2/3 and others): ``softcap``.
- Cohere family ``logits * logit_scale``: ``temperature = 1 / logit_scale``.
- Granite family and MiniCPM3 divide by ``logits_scaling``: ``temperature = logits_scaling``.
- HyperCLOVA X multiplies by ``logits_scaling``: ``temperature = 1 / logits_scaling``.

Before scoring, one short probe compares the model's own logits on a few tokens with this
mapping; a model that does not match (an unknown final transform), has no separate body or no
output layer is scored from its logits through :func:`pplfast.token_nll` instead.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _validate
from ._optional import require
from .api import linear_token_nll, token_nll
from .metric import Perplexity, PerplexityResult, safe_exp
from .stats import TokenStats, linear_token_stats, token_stats
from .windows import MODES, Window, make_windows

IGNORE = -100
_PROBE_TOKENS = 16


@dataclass
class ScoreResult:
    """Output of :func:`score_model`.

    ``token_nll[b, t]`` is the NLL (nats, float32) of token ``t`` of row ``b`` given the context
    its window gave it; ``scored`` marks the tokens that were scored (0 elsewhere).
    """

    perplexity: float
    mean_nll: float
    num_tokens: int
    perplexity_stderr: float
    token_nll: torch.Tensor
    scored: torch.Tensor
    stats: Optional[TokenStats] = None  # with stats=True: aligned like token_nll
    mean_entropy: Optional[float] = None
    top1_accuracy: Optional[float] = None


@dataclass
class DocumentScore:
    """One document of :func:`score_texts`: its tokens, their NLL and its own figures.

    ``num_tokens``, ``num_bytes`` and ``num_words`` count what was scored: the scored tokens and
    the UTF-8 bytes and words of the text they cover (:func:`scored_text_counts`; the whole
    text's in rolling mode, where every token is scored).
    """

    num_tokens: int
    num_bytes: int
    num_words: int
    sum_nll: float
    mean_nll: float
    perplexity: float
    token_ids: torch.Tensor
    token_nll: torch.Tensor
    scored: torch.Tensor
    stats: Optional[TokenStats] = None  # with stats=True: aligned like token_nll


@dataclass
class TextScores:
    """Output of :func:`score_texts`: per-document scores and the corpus figures."""

    documents: List[DocumentScore]
    corpus: PerplexityResult
    num_windows: int = 0


@dataclass
class _Head:
    body: torch.nn.Module
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    temperature: float
    pad_mask: bool = True  # right-padded batches pass their attention mask to the body


def _text_config(model):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def logit_transform(model):
    """``(softcap, temperature)`` that reproduce ``model``'s final logit transform (see module doc)."""
    config = _text_config(model)
    if config is None:
        return None, 1.0
    model_type = str(getattr(config, "model_type", "") or "")
    softcap = getattr(config, "final_logit_softcapping", None)
    temperature = 1.0
    logit_scale = getattr(config, "logit_scale", None)
    if model_type.startswith("cohere") and logit_scale:
        temperature = 1.0 / float(logit_scale)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        if model_type.startswith("granite") or model_type == "minicpm3":
            temperature = float(scaling)
        elif model_type.startswith("hyperclovax"):
            temperature = 1.0 / float(scaling)
    return (float(softcap) if softcap else None), temperature


def _accepts(module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _call(module, ids, mask):
    kwargs = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if _accepts(module, "use_cache"):
        kwargs["use_cache"] = False
    return module(**kwargs)


def _last_hidden(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _find_head(model) -> Optional[_Head]:
    """The body and output layer of a causal LM, or None where the model does not expose them."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        get_decoder = getattr(model, "get_decoder", None)
        try:
            body = get_decoder() if callable(get_decoder) else None
        except Exception:  # transformers raises for models without a findable decoder
            body = None
    if body is None or body is model or not isinstance(body, torch.nn.Module):
        return None
    bias = getattr(head, "bias", None)
    softcap, temperature = logit_transform(model)
    return _Head(body, weight, bias if isinstance(bias, torch.Tensor) else None, softcap, temperature)


def _head_logits(head: _Head, hidden: torch.Tensor) -> torch.Tensor:
    # the GEMM runs in the weight's own dtype, as the model's does: a float32 copy of the whole
    # output layer would cost 2 GB for Llama-3-8B; only the few probe rows' logits are upcast
    z = F.linear(hidden.to(device=head.weight.device, dtype=head.weight.dtype), head.weight,
                 head.bias).float()
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z / head.temperature


def _probe(model, head: _Head, ids: torch.Tensor) -> Optional[str]:
    """Compare the model's logits with body + output layer on ``ids``; None if they agree."""
    try:
        theirs = _logits(_call(model, ids, None)).float()
        ours = _head_logits(head, _last_hidden(_call(head.body, ids, None)))
    except Exception as exc:  # an unusual body signature: the logits path still works
        return f"calling the model body failed ({type(exc).__name__}: {exc})"
    if theirs.shape != ours.shape:
        return f"body + output layer give shape {tuple(ours.shape)}, the model {tuple(theirs.shape)}"
    # fp32 matmuls in another order differ by ~1e-6 relative; half precision rounds the logits
    rel = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    bound = rel * max(1.0, float(theirs.abs().max()))
    err = float((ours - theirs).abs().max())
    if not err <= bound:
        return f"logits differ by {err:.3g} (bound {bound:.3g}): an output transform pplfast does not know"
    return None


def _needs_pad_mask(body, ids: torch.Tensor) -> bool:
    """Whether right-padded batches must pass their attention mask to ``body``.

    In a causal body the real tokens of a right-padded row never attend to the pads after them
    and keep positions 0..n-1, so their outputs are those of the row alone, with or without the
    mask; without one, attention runs its unmasked causal kernel (twice as fast on CPU for a
    padded batch, and the one flash attention takes). Checked on ``ids`` (one row): its first
    half alone against the whole row with the second half replaced by padding, unmasked. A body
    where they differ (attention beyond the causal mask, positions from the mask) keeps it.
    """
    n = ids.shape[-1] // 2
    if n < 2:
        return True
    padded = ids.clone()
    padded[..., n:] = 0
    try:
        with torch.no_grad():
            alone = _last_hidden(_call(body, ids[..., :n], None))
            unmasked = _last_hidden(_call(body, padded, None))[..., :n, :]
    except Exception:
        return True
    rel = 1e-4 if alone.dtype == torch.float32 else 2e-2  # as _probe: kernels sum in other orders
    bound = rel * max(1.0, float(alone.float().abs().max()))
    return not float((unmasked.float() - alone.float()).abs().max()) <= bound


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def vocab_size(model) -> Optional[int]:
    """Rows of the model's output layer (else ``config.vocab_size``), or None if unknown."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    value = getattr(_text_config(model), "vocab_size", None)
    return value if isinstance(value, int) else None


def _check_ids(name: str, ids: torch.Tensor, model) -> None:
    """Every id of ``ids`` lies in the model's vocabulary; else ValueError naming the first
    offending position in ``ids``' own indexing."""
    V = vocab_size(model)
    if V is None or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= V)
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(ids.shape))]
        raise ValueError(f"{name}{index} = {int(ids.reshape(-1)[flat])} is outside the model's "
                         f"vocabulary [0, {V})")


def _context_length(model) -> Optional[int]:
    config = _text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _prefix_id(model, tokenizer, prefix_token_id) -> int:
    if prefix_token_id is not None:
        V = vocab_size(model)
        if isinstance(prefix_token_id, bool) or not isinstance(prefix_token_id, int) or (
                prefix_token_id < 0 or (V is not None and prefix_token_id >= V)):
            raise ValueError(f"prefix_token_id must be a token id in [0, {V}), "
                             f"got {prefix_token_id!r}")
        return int(prefix_token_id)
    for source in (tokenizer, _text_config(model)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    raise ValueError(
        "mode='rolling' predicts the first token from a prefix token: pass prefix_token_id "
        "(the model config has neither bos_token_id nor eos_token_id)"
    )


def _progress_bar(total: int, enabled):
    if not enabled:
        return None
    tqdm = require("tqdm.auto", extra="progress", feature="progress=True").tqdm
    return tqdm(total=total, unit="window", desc="scoring", leave=False)


_PROBE = object()  # _score_streams' default head: find the model's output layer and probe it


def _model_head(model, probe_ids: torch.Tensor) -> Optional[_Head]:
    """The body and output layer to score ``model`` with, checked on ``probe_ids`` (a few token
    ids); None (with a warning) when the model must be scored from its logits."""
    head = _find_head(model)
    if head is not None:
        ids = probe_ids[:_PROBE_TOKENS].unsqueeze(0).to(_model_device(model))
        why = _probe(model, head, ids)
        if why is not None:
            warnings.warn(f"pplfast: scoring {type(model).__name__} from its logits: {why}")
            return None
        head.pad_mask = _needs_pad_mask(head.body, ids)
    return head


def _pack_jobs(jobs, batch_size: Optional[int], batch_tokens: Optional[int]):
    """Group (stream, window) jobs into forward passes.

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


def _empty_stats(n: int, top_k: int) -> TokenStats:
    """Per-token statistics of ``n`` unscored positions (floats 0, integers -1)."""
    lead, k = (n,), (n, top_k)
    return TokenStats(torch.zeros(lead), torch.zeros(lead), torch.zeros(lead),
                      torch.full(lead, -1, dtype=torch.long), torch.full(lead, -1, dtype=torch.long),
                      torch.full(k, -1, dtype=torch.long) if top_k else None,
                      torch.zeros(k) if top_k else None)


_STAT_FIELDS = ("entropy", "max_logprob", "argmax", "rank", "top_k_ids", "top_k_logprobs")


def _score_streams(model, streams: Sequence[torch.Tensor], schedules: Sequence[List[Window]],
                   batch_size: Optional[int], backend: str, progress, *,
                   batch_tokens: Optional[int] = None, head=_PROBE,
                   first_token: Optional[int] = None, stats=None,
                   top_k: int = 0) -> List[torch.Tensor]:
    """Run every window of every stream; per stream: float32 NLL (0 where unscored), scored mask.

    Windows are grouped by :func:`_pack_jobs`. ``head``: the :func:`_model_head` of ``model``
    when the caller already has it (None: score from the logits). ``first_token``: replaces the
    first input token of every window (llama.cpp puts BOS there); None keeps the stream's.
    With ``stats`` (a list), one :class:`TokenStats` per stream is appended to it.
    """
    device = _model_device(model)
    out = [torch.zeros(len(s), dtype=torch.float32) for s in streams]
    scored = [torch.zeros(len(s), dtype=torch.bool) for s in streams]
    if stats is not None:
        stats.extend(_empty_stats(len(s), top_k) for s in streams)
    jobs = [(i, w) for i, sched in enumerate(schedules) for w in sched]
    if not jobs:
        return list(zip(out, scored))
    if head is _PROBE:
        first_doc, first = jobs[0]
        head = _model_head(model, streams[first_doc][first.start : first.start + first.input_length])
    bar = _progress_bar(len(jobs), progress)
    try:
        _run_windows(model, head, streams, jobs, batch_size, batch_tokens, backend, device, out,
                     scored, bar, first_token, stats, top_k)
    finally:
        if bar is not None:
            bar.close()  # also on errors and Ctrl-C, so that messages start on a clean line
    return list(zip(out, scored))


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


def scored_hidden(head: _Head, ids, mask, keep) -> torch.Tensor:
    """Final hidden states of the positions ``keep`` marks, on the output layer's device and in
    its dtype (with the model split over devices, the output layer may sit apart from the body)."""
    hidden = _last_hidden(_call(head.body, ids, mask if head.pad_mask else None))
    return hidden[keep.to(hidden.device)].to(device=head.weight.device, dtype=head.weight.dtype)


def _run_windows(model, head, streams, jobs, batch_size, batch_tokens, backend, device, out,
                 scored, bar, first_token=None, stats=None, top_k=0):
    for batch in _pack_jobs(jobs, batch_size, batch_tokens):
        ids, mask, targets = window_inputs(streams, batch, first_token)
        cpu_targets = targets
        ids, targets = ids.to(device), targets.to(device)
        attn = None if mask is None else mask.to(device)
        # the targets are range-checked here, on the CPU where they were built, so the calls
        # below skip the check and its device sync (check_targets=False)
        if head is not None:
            _validate.scored_targets(cpu_targets, head.weight.shape[0], IGNORE, check=True,
                                     count=False)
            hidden = _last_hidden(_call(head.body, ids, attn if head.pad_mask else None))
            # with the model split over devices, the output layer may sit apart from the body;
            # context-only and padding positions are ignored rows, which cost no GEMM
            head_args = (hidden.to(device=head.weight.device, dtype=head.weight.dtype),
                         head.weight, targets.to(head.weight.device))
            head_kw = dict(bias=head.bias, softcap=head.softcap, temperature=head.temperature,
                           backend=backend)
            if stats is not None:
                window_stats = linear_token_stats(*head_args, top_k=top_k, check_targets=False,
                                                  **head_kw)
                nll = window_stats.nll.cpu()
            else:
                nll = linear_token_nll(*head_args, check_targets=False, **head_kw).cpu()
        else:
            logits = _logits(_call(model, ids, attn))
            _validate.scored_targets(cpu_targets, logits.shape[-1], IGNORE, check=True,
                                     count=False)
            if stats is not None:
                window_stats = token_stats(logits, targets.to(logits.device), ignore_index=IGNORE,
                                           top_k=top_k, backend=backend, check_targets=False)
                nll = window_stats.nll.cpu()
            else:
                nll = token_nll(logits, targets.to(logits.device), ignore_index=IGNORE,
                                backend=backend, check_targets=False).cpu()
        for row, (doc, w) in enumerate(batch):
            skip = w.score_start - w.start - 1
            out[doc][w.score_start : w.stop] = nll[row, skip : w.input_length]
            scored[doc][w.score_start : w.stop] = True
            for name in _STAT_FIELDS if stats is not None else ():
                value = getattr(window_stats, name)
                if value is not None:
                    tail = value.shape[-1:] if name.startswith("top_k") else ()
                    value = value.reshape(*targets.shape, *tail)
                    getattr(stats[doc], name)[w.score_start : w.stop] = value[
                        row, skip : w.input_length].cpu()
        if bar is not None:
            bar.update(len(batch))


def _check_window(window, model) -> None:
    context = _context_length(model)
    if context is not None and isinstance(window, int) and window > context:
        raise ValueError(f"window={window} is longer than the model's context length {context} "
                         f"(positions past it were never trained): pass window <= {context}")


def _schedules(lengths, window, stride, mode, model):
    """The window schedule of each document (``lengths``: tokens per document); ``window`` None
    means the model's context length. Built once per call: what runs is what is counted."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if window is None:
        window = _context_length(model)
    _check_window(window, model)
    return [make_windows(n, window=window, stride=stride, mode=mode) for n in lengths]


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _llamacpp_bos(model, tokenizer, prefix_token_id) -> Optional[int]:
    """The token llama.cpp puts first in every chunk: BOS when the tokenizer adds one (checked by
    tokenizing a word), ``prefix_token_id`` when given (the way for :func:`score_model`, which has
    no tokenizer), else None (chunks keep their own first token)."""
    if prefix_token_id is not None:
        return _prefix_id(model, tokenizer, prefix_token_id)
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or not isinstance(bos, int):
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if len(ids) and ids[0] == bos else None


class _Scored(NamedTuple):
    documents: List[tuple]  # per document: (float32 NLL, scored mask), aligned with its tokens
    num_windows: int  # forward-pass windows run, over all documents


def _score_documents(model, docs: Sequence[torch.Tensor], *, window, stride, mode, prefix_token_id,
                     tokenizer, batch_size, backend, progress, batch_tokens=None, head=_PROBE,
                     stats=None, top_k=0) -> "_Scored":
    """Per document: float32 NLL aligned with its tokens (0 where unscored) and the scored mask;
    and the number of windows that ran.

    ``batch_tokens`` and ``head``: see :func:`_score_streams` (``batch_size`` may then be None).
    With ``stats`` (a list), each document's :class:`TokenStats`, aligned the same way, is
    appended to it.
    """
    if batch_tokens is None or batch_size is not None:
        _check_batch_size(batch_size)
    schedules = _schedules([len(d) for d in docs], window, stride, mode, model)
    first_token = None
    if mode == "rolling":
        prefix = torch.tensor([_prefix_id(model, tokenizer, prefix_token_id)], dtype=torch.long)
        streams = [torch.cat([prefix, d]) for d in docs]
    else:
        streams = list(docs)
        if mode == "llamacpp":
            first_token = _llamacpp_bos(model, tokenizer, prefix_token_id)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout would make scores random
    try:
        with torch.inference_mode():
            stream_stats = None if stats is None else []
            stream_nll = _score_streams(model, streams, schedules, batch_size, backend, progress,
                                        batch_tokens=batch_tokens, head=head,
                                        first_token=first_token, stats=stream_stats, top_k=top_k)
    finally:
        if was_training:
            model.train()
    offset = 1 if mode == "rolling" else 0
    for st in stream_stats or ():
        stats.append(TokenStats(*(None if v is None else v[offset:] for v in
                                  (getattr(st, f) for f in ("nll",) + _STAT_FIELDS))))
    return _Scored([(nll[offset:], scored[offset:]) for nll, scored in stream_nll],
                   sum(len(s) for s in schedules))


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


def score_model(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                window: Optional[int] = None, stride: Optional[int] = None, mode: str = "sliding",
                prefix_token_id: Optional[int] = None, batch_size: int = 8, backend: str = "auto",
                progress=False, stats: bool = False, top_k: int = 0) -> ScoreResult:
    """Perplexity of a causal LM on token ids, without building its logits.

    Each row is one document: the tokens where ``attention_mask`` is 1 (one contiguous run, left
    or right padded). Documents longer than ``window`` are split by the window schedule
    (:mod:`pplfast.windows`); windows of all rows are batched ``batch_size`` at a time.

    Args:
        model: a Hugging Face causal LM (or any module returning ``.logits``).
        input_ids: ``(T,)`` or ``(B, T)`` integer token ids.
        attention_mask: same shape, 1 for real tokens; default all ones.
        window: most tokens fed to the model at once; default the model's context length.
        stride: tokens between window starts for ``mode="sliding"``; default ``window // 2``.
        mode: ``"sliding"`` (first token unscored), ``"rolling"`` (every token scored, the first
            from ``prefix_token_id``, default the model's BOS or EOS id), ``"chunks"`` or
            ``"llamacpp"`` (llama.cpp's perplexity schedule; each chunk's first input token is
            replaced by ``prefix_token_id`` when given, as llama.cpp puts BOS there).
        batch_size: windows per forward pass.
        backend: passed to :func:`pplfast.linear_token_nll` / :func:`pplfast.token_nll`.
        progress: show a progress bar over windows (needs tqdm).
        stats: also compute each token's :class:`TokenStats` (:func:`pplfast.token_stats`, same
            pass) and the summary ``mean_entropy`` / ``top1_accuracy``.
        top_k: with ``stats``, the most probable tokens kept per position, in ``[0, 64]``.

    Returns:
        :class:`ScoreResult`; ``token_nll`` and ``scored`` have ``input_ids``' shape (``stats``
        too: its field at ``[b, t]`` describes the prediction of token ``t``). For one window,
        ``mean_nll`` equals ``model(ids, labels=ids).loss``.
    """
    _check_stats_options(stats, top_k, model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got {what}")
    if input_ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:  # nothing to score: empty outputs, as every pplfast function
        _check_batch_size(batch_size)
        return ScoreResult(perplexity=math.nan, mean_nll=math.nan, num_tokens=0,
                           perplexity_stderr=math.nan,
                           token_nll=torch.zeros(input_ids.shape, dtype=torch.float32),
                           scored=torch.zeros(input_ids.shape, dtype=torch.bool))
    _check_ids("input_ids", input_ids, model)
    ids2, docs, spans = documents(input_ids, attention_mask)
    doc_stats = [] if stats else None
    per_doc = _score_documents(
        model, docs, window=window, stride=stride, mode=mode, prefix_token_id=prefix_token_id,
        tokenizer=None, batch_size=batch_size, backend=backend, progress=progress,
        stats=doc_stats, top_k=top_k,
    ).documents
    token_nll_out = torch.zeros(ids2.shape, dtype=torch.float32)
    scored_out = torch.zeros(ids2.shape, dtype=torch.bool)
    metric = Perplexity()
    stats_out = None if doc_stats is None else _empty_stats(ids2.numel(), top_k)
    for b, ((nll, scored), (lo, hi)) in enumerate(zip(per_doc, spans)):
        token_nll_out[b, lo:hi] = nll
        scored_out[b, lo:hi] = scored
        if doc_stats is None:
            metric.update_nll(nll, scored)
            continue
        metric.update_nll(nll, scored, stats=doc_stats[b], targets=docs[b])
        row = slice(b * ids2.shape[1] + lo, b * ids2.shape[1] + hi)
        for name in _STAT_FIELDS:
            if getattr(stats_out, name) is not None:
                getattr(stats_out, name)[row] = getattr(doc_stats[b], name)
    summary = {}
    try:
        res = metric.compute()
        ppl, mean, n, err = res.perplexity, res.mean_nll, res.num_tokens, res.perplexity_stderr
        summary = dict(mean_entropy=res.mean_entropy, top1_accuracy=res.top1_accuracy)
    except ValueError:
        ppl, mean, n, err = math.nan, math.nan, 0, math.nan
    return ScoreResult(
        perplexity=ppl, mean_nll=mean, num_tokens=n, perplexity_stderr=err,
        token_nll=token_nll_out.reshape(input_ids.shape),
        scored=scored_out.reshape(input_ids.shape),
        stats=None if stats_out is None else _reshape_stats(
            stats_out, token_nll_out.reshape(-1), input_ids.shape),
        **summary,
    )


def _check_stats_options(stats, top_k, model) -> None:
    from .stats import check_top_k

    if not isinstance(stats, bool):
        raise TypeError(f"stats must be a bool, got {stats!r}")
    if top_k and not stats:
        raise ValueError(f"top_k={top_k!r} needs stats=True")
    check_top_k(top_k, vocab_size(model) or 64)


def _reshape_stats(st: TokenStats, nll: torch.Tensor, shape) -> TokenStats:
    fields = [nll] + [getattr(st, f) for f in _STAT_FIELDS]
    return TokenStats(*(None if v is None else v.reshape(*shape, *v.shape[1:]) for v in fields))


_WHITESPACE = re.compile(r"\s+")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity: ``len(re.split(r"\\s+", text))``."""
    return len(_WHITESPACE.split(text))


class Tokens(NamedTuple):
    """A text's token ids and, where the tokenizer gives offsets, where each token ends in it."""

    ids: torch.Tensor  # int64
    ends: Optional[torch.Tensor]  # int64 character positions; None without an offset mapping


def tokenize(tokenizer, text: str, *, add_special_tokens: bool, ends: bool = True) -> Tokens:
    """``text``'s token ids, with each token's end from a fast tokenizer's offset mapping
    (``ends=False``: without, where every token will be scored and the offsets, which slow
    tokenizing down, are not needed)."""
    if ends and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        token_ends = torch.tensor([end for _, end in enc["offset_mapping"]], dtype=torch.long)
    else:
        enc, token_ends = tokenizer(text, add_special_tokens=add_special_tokens), None
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long).reshape(-1)
    return Tokens(ids, None if token_ends is None else token_ends.reshape(-1))


def _decoded_ends(tokenizer, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Token ends for a tokenizer without offsets: each run of tokens scored alike is decoded
    alone and its last token ends where the decoded lengths add up to (the others cover
    nothing). Exact where decoding a run gives back its text (byte-level BPE); elsewhere a run
    edge may move by the character a decoder drops or adds (SentencePiece's leading space)."""
    ends = torch.empty(len(ids), dtype=torch.long)
    flags = scored.tolist()
    pos = start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or flags[i] != flags[start]:
            pos += len(tokenizer.decode(ids[start:i].tolist(), skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False))
            ends[start:i] = pos
            ends[start : i - 1] = ends[start - 1] if start else 0
            start = i
    return ends


def scored_text_counts(text: str, tokens: Tokens, scored: torch.Tensor,
                       tokenizer=None) -> tuple:
    """``(bytes, words)`` of the part of ``text`` that the scored tokens cover: the denominators
    of bits per byte and word perplexity, which must cover the text whose NLL was summed.

    The text is cut into one piece per token: token ``i`` covers the characters from the end of
    token ``i - 1`` (0 for the first) to its own end, the last token up to the end of the text,
    so the pieces tile the text and a token carries the whitespace before it. Bytes are the
    UTF-8 bytes of the scored pieces; a word (lm-evaluation-harness's, ``re.split(r"\\s+",
    text)``: it starts at 0 and after each whitespace run) counts with the piece where it
    starts. Counts over any split of the tokens add up to the whole text's; with every token
    scored (rolling mode) they are lm-evaluation-harness's, ``len(text.encode())`` and
    :func:`count_words`. ``tokens.ends`` None (no offset mapping): the ends come from decoding
    each run of tokens scored alike with ``tokenizer`` (see :func:`_decoded_ends`).
    """
    if bool(scored.all()):  # also a text without tokens: lm-evaluation-harness's counts
        return len(text.encode("utf-8")), count_words(text)
    if not bool(scored.any()):
        return 0, 0
    ends = tokens.ends if tokens.ends is not None else _decoded_ends(tokenizer, tokens.ids, scored)
    n = len(text)
    hi = torch.cummax(ends.clamp(0, n), 0).values.tolist()
    hi[-1] = n
    # runs of tokens scored alike: [first, stop) for each change of the flag
    edges = [0] + (torch.nonzero(scored[1:] != scored[:-1]).flatten() + 1).tolist() + [len(hi)]
    num_bytes = num_words = 0
    for first, stop in zip(edges[:-1], edges[1:]):
        if not bool(scored[first]):
            continue
        lo = hi[first - 1] if first else 0
        piece = text[lo : hi[stop - 1]]
        num_bytes += len(piece.encode("utf-8"))
        # str.split's whitespace is re's \s: each part starts a word, but for one running on
        # from before the piece; 0 starts an empty word before leading whitespace, and the end
        # of the text one after trailing whitespace (the last token's)
        num_words += len(piece.split())
        if piece[:1] and not piece[0].isspace() and lo > 0 and not text[lo - 1].isspace():
            num_words -= 1
        num_words += lo == 0 and text[:1].isspace()
        num_words += stop == len(hi) and text[-1:].isspace()
    return num_bytes, num_words


def score_texts(model, tokenizer, texts: Sequence[str], *, window: Optional[int] = None,
                stride: Optional[int] = None, mode: str = "sliding",
                prefix_token_id: Optional[int] = None, add_special_tokens: Optional[bool] = None,
                batch_size: int = 8, backend: str = "auto", progress=False, stats: bool = False,
                top_k: int = 0) -> TextScores:
    """Tokenize and score documents; per-document and corpus figures, bytes and words included.

    Args:
        model, window, stride, mode, prefix_token_id, batch_size, backend, progress, stats,
            top_k: as in :func:`score_model` (each document then carries its ``stats`` and the
            corpus figures ``mean_entropy`` / ``top1_accuracy``).
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text)["input_ids"]``; a
            fast one's offset mapping tells which text each scored token covers, else its
            ``decode``).
        texts: the documents.
        add_special_tokens: passed to the tokenizer; default False for ``mode="rolling"`` (the
            prefix token plays BOS, as in lm-evaluation-harness), True otherwise.

    Returns:
        :class:`TextScores`. ``corpus.bits_per_byte`` and ``corpus.word_perplexity`` are ratios
        of sums over documents: the NLL of the scored tokens over the UTF-8 bytes and the words
        of the text those tokens cover (:func:`scored_text_counts`): in rolling mode the whole
        text, as lm-evaluation-harness counts it; in the other modes the text of the unscored
        tokens (a window's first token, the first half of a llama.cpp chunk) is left out.

    Raises:
        ValueError: no token of any document could be scored ("nothing to score: ...").
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    _check_stats_options(stats, top_k, model)
    if add_special_tokens is None:
        add_special_tokens = mode != "rolling"
    tokens = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__}")
        tokens.append(tokenize(tokenizer, text, add_special_tokens=add_special_tokens,
                               ends=mode != "rolling"))
    docs = [t.ids for t in tokens]
    for i, ids in enumerate(docs):
        _check_ids(f"texts[{i}] token ids", ids, model)
    doc_stats = [] if stats else None
    run = _score_documents(
        model, docs, window=window, stride=stride, mode=mode, prefix_token_id=prefix_token_id,
        tokenizer=tokenizer, batch_size=batch_size, backend=backend, progress=progress,
        stats=doc_stats, top_k=top_k,
    )
    metric = Perplexity()
    documents = []
    for i, (text, toks, (nll, scored)) in enumerate(zip(texts, tokens, run.documents)):
        ids = toks.ids
        num_bytes, num_words = scored_text_counts(text, toks, scored, tokenizer)
        doc_st = None if doc_stats is None else doc_stats[i]
        metric.update_nll(nll, scored, num_bytes=num_bytes, num_words=num_words, stats=doc_st,
                          targets=None if doc_st is None else ids)
        n = int(scored.sum())
        total = float(nll.double().sum())
        mean = total / n if n else math.nan
        documents.append(DocumentScore(
            num_tokens=n, num_bytes=num_bytes, num_words=num_words, sum_nll=total, mean_nll=mean,
            perplexity=safe_exp(mean), token_ids=ids, token_nll=nll, scored=scored,
            stats=None if doc_st is None else TokenStats(
                nll, *(getattr(doc_st, f) for f in _STAT_FIELDS)),
        ))
    if metric.num_tokens == 0:
        raise ValueError(
            "nothing to score: no document has a token with context before it (a document needs "
            "at least 2 tokens, or mode='rolling', which predicts the first token from a prefix)"
        )
    return TextScores(documents=documents, corpus=metric.compute(), num_windows=run.num_windows)
