"""Score Hugging Face causal LMs without building their logits: ``score_model``, ``score_texts``.

Only the hidden states of scored tokens reach the output layer, inside
:func:`pplfast.linear_token_nll` (or :func:`pplfast.linear_token_stats`), so no ``(tokens, V)``
tensor exists and the context-only positions of sliding windows cost no GEMM. A model whose head
pplfast cannot use (:func:`pplfast.models.head.model_head` gives None) is scored from its logits
through :func:`pplfast.token_nll` instead. The windows run through the one run loop,
:func:`pplfast.models.runner.run`; :class:`NllPass` is what each of its passes computes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from ..api import linear_token_nll, token_nll
from ..metric import Perplexity, PerplexityResult, safe_exp
from ..stats import TokenStats, check_top_k, linear_token_stats, token_stats
from . import runner
from .head import (PROBE, call_model, check_ids, last_hidden, model_device, model_head,
                   output_logits, vocab_size)
from .runner import IGNORE, Field
from .text import scored_text_counts, tokenize

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
    the UTF-8 bytes and words of the text they cover
    (:func:`pplfast.models.text.scored_text_counts`; the whole text's in rolling mode, where
    every token is scored).
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


def stat_fields(top_k: int) -> List[Field]:
    """The :class:`TokenStats` fields (but ``nll``) of a pass with ``top_k`` most probable tokens."""
    fields = [Field("entropy", torch.float32), Field("max_logprob", torch.float32),
              Field("argmax", torch.int64), Field("rank", torch.int64)]
    if top_k:
        fields += [Field("top_k_ids", torch.int64, (top_k,)),
                   Field("top_k_logprobs", torch.float32, (top_k,))]
    return fields


class NllPass:
    """One forward pass of one model: each position's NLL (``stats``: its :class:`TokenStats`
    too, ``top_k`` most probable tokens), through the head when there is one, else from the
    model's logits. The targets are checked on the CPU, so the ops skip their check."""

    def __init__(self, model, head, backend: str, *, stats: bool = False, top_k: int = 0):
        self.model, self.head, self.backend = model, head, backend
        self.stats, self.top_k = stats, top_k
        self.device = model_device(model)
        self.fields = [Field("nll", torch.float32)] + (stat_fields(top_k) if stats else [])

    def __call__(self, ids, mask, targets) -> Dict[str, torch.Tensor]:
        head, device = self.head, self.device
        cpu_targets = targets
        ids, attn = ids.to(device), None if mask is None else mask.to(device)
        if head is not None:
            runner.check_targets(cpu_targets, head.weight.shape[0])
            hidden = last_hidden(call_model(head.body, ids, attn if head.pad_mask else None))
            # with the model split over devices, the output layer may sit apart from the body;
            # context-only and padding positions are ignored rows, which cost no GEMM
            args = (hidden.to(device=head.weight.device, dtype=head.weight.dtype), head.weight,
                    targets.to(head.weight.device))
            options = dict(head.op_options(self.backend), check_targets=False)
            if self.stats:
                result = linear_token_stats(*args, top_k=self.top_k, **options)
            else:
                return {"nll": linear_token_nll(*args, **options)}
        else:
            logits = output_logits(call_model(self.model, ids, attn))
            runner.check_targets(cpu_targets, logits.shape[-1])
            options = dict(ignore_index=IGNORE, backend=self.backend, check_targets=False)
            targets = targets.to(logits.device)
            if self.stats:
                result = token_stats(logits, targets, top_k=self.top_k, **options)
            else:
                return {"nll": token_nll(logits, targets, **options)}
        return {f.name: getattr(result, f.name).reshape(*cpu_targets.shape, *f.tail)
                for f in self.fields}


class Scored(NamedTuple):
    """What :func:`score_documents` returns."""

    documents: List[Dict[str, torch.Tensor]]  # per document: "nll", "scored" and with stats the
    # TokenStats fields, aligned with its tokens
    num_windows: int  # the windows that ran, over all documents


def document_stats(values: Dict[str, torch.Tensor]) -> TokenStats:
    """The :class:`TokenStats` of one document of :func:`score_documents` (with ``stats``)."""
    return TokenStats(**{f.name: values.get(f.name) for f in dataclasses.fields(TokenStats)})


def score_documents(model, docs: Sequence[torch.Tensor], *, window=None, stride=None,
                    mode: str = "sliding", prefix_token_id=None, tokenizer=None,
                    batch_size: Optional[int] = 8, batch_tokens: Optional[int] = None,
                    backend: str = "auto", progress=False, head=PROBE, stats: bool = False,
                    top_k: int = 0) -> Scored:
    """Score token-id documents (no id check: the callers check the ids they take).

    ``head``: the :func:`pplfast.models.head.model_head` of ``model`` when the caller already has
    it (None: score from the logits); by default it is found and probed on the first window.
    ``batch_tokens``: pack the windows into passes of at most this many tokens
    (:func:`pplfast.models.runner.pack_jobs`; ``batch_size`` may then be None).
    """
    if batch_tokens is None or batch_size is not None:
        runner.check_batch_size(batch_size)
    plan = runner.plan(docs, window=window, stride=stride, mode=mode,
                       prefix_token_id=prefix_token_id, tokenizer=tokenizer, models=(model,))
    with runner.scoring_mode(model):
        if head is PROBE:
            probe_ids = plan.probe_ids()
            head = None if probe_ids is None else model_head(model, probe_ids)
        ran = runner.run(plan, NllPass(model, head, backend, stats=stats, top_k=top_k),
                         batch_size=batch_size, batch_tokens=batch_tokens, progress=progress)
    return Scored(ran.documents, ran.num_windows)


def check_stats_options(stats, top_k, model) -> None:
    if not isinstance(stats, bool):
        raise TypeError(f"stats must be a bool, got {stats!r}")
    if top_k and not stats:
        raise ValueError(f"top_k={top_k!r} needs stats=True")
    check_top_k(top_k, vocab_size(model) or 64)


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
    check_stats_options(stats, top_k, model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got {what}")
    if input_ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:  # nothing to score: empty outputs, as every pplfast function
        runner.check_batch_size(batch_size)
        return ScoreResult(perplexity=math.nan, mean_nll=math.nan, num_tokens=0,
                           perplexity_stderr=math.nan,
                           token_nll=torch.zeros(input_ids.shape, dtype=torch.float32),
                           scored=torch.zeros(input_ids.shape, dtype=torch.bool))
    check_ids("input_ids", input_ids, vocab_size(model))
    ids2, docs, spans = runner.documents(input_ids, attention_mask)
    per_doc = score_documents(
        model, docs, window=window, stride=stride, mode=mode, prefix_token_id=prefix_token_id,
        batch_size=batch_size, backend=backend, progress=progress, stats=stats, top_k=top_k,
    ).documents
    token_nll_out = torch.zeros(ids2.shape, dtype=torch.float32)
    scored_out = torch.zeros(ids2.shape, dtype=torch.bool)
    metric = Perplexity()
    stats_out = {f.name: f.blank(ids2.numel()) for f in stat_fields(top_k)} if stats else None
    for b, (values, (lo, hi)) in enumerate(zip(per_doc, spans)):
        nll, scored = values["nll"], values["scored"]
        token_nll_out[b, lo:hi] = nll
        scored_out[b, lo:hi] = scored
        if stats_out is None:
            metric.update_nll(nll, scored)
            continue
        metric.update_nll(nll, scored, stats=document_stats(values), targets=docs[b])
        row = slice(b * ids2.shape[1] + lo, b * ids2.shape[1] + hi)
        for name, out in stats_out.items():
            out[row] = values[name]
    summary = {}
    try:
        res = metric.compute()
        ppl, mean, n, err = res.perplexity, res.mean_nll, res.num_tokens, res.perplexity_stderr
        summary = dict(mean_entropy=res.mean_entropy, top1_accuracy=res.top1_accuracy)
    except ValueError:
        ppl, mean, n, err = math.nan, math.nan, 0, math.nan
    token_stats_out = None
    if stats_out is not None:
        stats_out["nll"] = token_nll_out.reshape(-1)
        token_stats_out = document_stats({name: v.reshape(*input_ids.shape, *v.shape[1:])
                                          for name, v in stats_out.items()})
    return ScoreResult(
        perplexity=ppl, mean_nll=mean, num_tokens=n, perplexity_stderr=err,
        token_nll=token_nll_out.reshape(input_ids.shape),
        scored=scored_out.reshape(input_ids.shape), stats=token_stats_out, **summary,
    )


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
        of the text those tokens cover (:func:`pplfast.models.text.scored_text_counts`): in
        rolling mode the whole text, as lm-evaluation-harness counts it; in the other modes the
        text of the unscored tokens (a window's first token, the first half of a llama.cpp
        chunk) is left out. ``num_windows``: the windows that ran.

    Raises:
        ValueError: no token of any document could be scored ("nothing to score: ...").
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    check_stats_options(stats, top_k, model)
    if add_special_tokens is None:
        add_special_tokens = mode != "rolling"
    tokens = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__}")
        tokens.append(tokenize(tokenizer, text, add_special_tokens=add_special_tokens,
                               ends=mode != "rolling"))
    V = vocab_size(model)
    for i, t in enumerate(tokens):
        check_ids(f"texts[{i}] token ids", t.ids, V)
    run = score_documents(
        model, [t.ids for t in tokens], window=window, stride=stride, mode=mode,
        prefix_token_id=prefix_token_id, tokenizer=tokenizer, batch_size=batch_size,
        backend=backend, progress=progress, stats=stats, top_k=top_k,
    )
    metric = Perplexity()
    documents = []
    for text, toks, values in zip(texts, tokens, run.documents):
        ids, nll, scored = toks.ids, values["nll"], values["scored"]
        num_bytes, num_words = scored_text_counts(text, toks, scored, tokenizer)
        doc_stats = document_stats(values) if stats else None
        metric.update_nll(nll, scored, num_bytes=num_bytes, num_words=num_words, stats=doc_stats,
                          targets=None if doc_stats is None else ids)
        n = int(scored.sum())
        total = float(nll.double().sum())
        mean = total / n if n else math.nan
        documents.append(DocumentScore(
            num_tokens=n, num_bytes=num_bytes, num_words=num_words, sum_nll=total, mean_nll=mean,
            perplexity=safe_exp(mean), token_ids=ids, token_nll=nll, scored=scored,
            stats=doc_stats,
        ))
    if metric.num_tokens == 0:
        raise ValueError(
            "nothing to score: no document has a token with context before it (a document needs "
            "at least 2 tokens, or mode='rolling', which predicts the first token from a prefix)"
        )
    return TextScores(documents=documents, corpus=metric.compute(), num_windows=run.num_windows)
