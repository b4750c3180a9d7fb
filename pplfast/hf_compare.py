"""Compare two Hugging Face causal LMs token by token, neither model's logits built.

Both models run on the same windows in lockstep (the schedule, batching and scored tokens of
:func:`pplfast.score_model`); the final hidden states of the scored positions of each go through
:func:`pplfast.linear_compare` with the two output layers, which reads both models' logit rows
together, one vocabulary tile at a time. A model without a separate body and output layer (or
whose probe fails), or two models whose final logit transforms differ, are compared from their
logits through :func:`pplfast.compare`, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .comparison import ComparisonResult, TokenComparison, compare, linear_compare
from .metric import Comparison
from .hf import (IGNORE, _call, _check_batch_size, _check_ids, _check_window, _context_length,
                 _llamacpp_bos, _logits, _model_device, _model_head, _pack_jobs, _prefix_id,
                 _progress_bar, _schedules, documents, scored_hidden, vocab_size, window_inputs)


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int64 or int32 tensor, got {what}")
    if input_ids.ndim not in (1, 2):
        raise ValueError(f"input_ids must be (T,) or (B, T), got shape {tuple(input_ids.shape)}")


def _check_vocabularies(base_model, test_model) -> None:
    vb, vt = vocab_size(base_model), vocab_size(test_model)
    if vb is not None and vt is not None and vb != vt:
        raise ValueError(f"base_model has a vocabulary of {vb} tokens but test_model has {vt}: "
                         "the two models must share one vocabulary (and tokenizer)")


def _window(window, base_model, test_model):
    contexts = [c for c in (_context_length(base_model), _context_length(test_model)) if c]
    if window is None and contexts:
        return min(contexts)
    return window


def compare_models(base_model, test_model, input_ids: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, *, window: Optional[int] = None,
                   stride: Optional[int] = None, mode: str = "sliding",
                   prefix_token_id: Optional[int] = None, batch_size: int = 8,
                   backend: str = "auto", progress=False) -> ComparisonResult:
    """Compare a test model with a base model on token ids: per-token KL both ways, NLLs and
    argmaxes, and llama.cpp's comparison statistics, without building either model's logits.

    Args:
        base_model, test_model: Hugging Face causal LMs sharing one vocabulary; each may sit on
            its own device (the comparison runs on the test model's output-layer device; the
            base model's output layer is copied there once when the devices differ).
        input_ids, attention_mask, window, stride, mode, prefix_token_id, batch_size, backend,
            progress: as in :func:`pplfast.score_model` (default window: the shorter context of
            the two models). With ``mode="llamacpp"``, ``prefix_token_id`` replaces the first
            input token of every chunk, as llama.cpp puts BOS there when its tokenizer adds one:
            pass the tokenizer's BOS id then (``pplfast compare`` does).

    Returns:
        :class:`ComparisonResult` with ``token_comparison`` (a :class:`TokenComparison` shaped
        like ``input_ids``) and ``scored``; exactly the tokens :func:`pplfast.score_model`
        scores are compared.

    Raises:
        ValueError: different vocabularies, bad ids or options, or nothing to score.
    """
    _check_input_ids(input_ids)
    _check_vocabularies(base_model, test_model)
    _check_batch_size(batch_size)
    if input_ids.numel():
        _check_ids("input_ids", input_ids, base_model)
    ids2, docs, spans = documents(input_ids, attention_mask)
    window = _window(window, base_model, test_model)
    lengths = [len(d) for d in docs]
    schedules = _schedules(lengths, window, stride, mode, base_model)
    _check_window(window, test_model)  # the same window must suit both models
    first_token = None
    if mode == "rolling":
        prefix = torch.tensor([_prefix_id(base_model, None, prefix_token_id)], dtype=torch.long)
        streams = [torch.cat([prefix, d]) for d in docs]
    else:
        streams = list(docs)
        if mode == "llamacpp":  # as score_model (no tokenizer): prefix_token_id first in every
            # chunk when given; the command line passes the tokenizer's BOS when it adds one
            first_token = _llamacpp_bos(base_model, None, prefix_token_id)
    modes = [(m, getattr(m, "training", False)) for m in (base_model, test_model)]
    for m, training in modes:
        if training:
            m.eval()  # dropout would make the comparison random
    try:
        with torch.inference_mode():
            per_stream = _compare_streams(base_model, test_model, streams, schedules, batch_size,
                                          backend, progress, first_token)
    finally:
        for m, training in modes:
            if training:
                m.train()
    offset = 1 if mode == "rolling" else 0
    fields = [torch.zeros(ids2.shape, dtype=torch.float32) for _ in range(4)]
    fields += [torch.full(ids2.shape, -1, dtype=torch.int64) for _ in range(2)]
    scored = torch.zeros(ids2.shape, dtype=torch.bool)
    for b, (values, (lo, hi)) in enumerate(zip(per_stream, spans)):
        for out, v in zip(fields + [scored], values):
            out[b, lo:hi] = v[offset:]
    tokens = TokenComparison(*(f.reshape(input_ids.shape) for f in fields))
    scored = scored.reshape(input_ids.shape)
    metric = Comparison()
    metric.update_tokens(tokens, scored=scored)
    if metric.num_tokens == 0:
        raise ValueError("nothing to compare: no token has context before it (a document needs "
                         "at least 2 tokens, or mode='rolling')")
    result = metric.compute()
    return ComparisonResult(**{**result.__dict__, "token_comparison": tokens, "scored": scored})


def _compare_streams(base_model, test_model, streams, schedules, batch_size, backend, progress,
                     first_token=None):
    """Per stream: kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test, scored."""
    per_stream = [[torch.zeros(len(s), dtype=torch.float32) for _ in range(4)]
                  + [torch.full((len(s),), -1, dtype=torch.int64) for _ in range(2)]
                  + [torch.zeros(len(s), dtype=torch.bool)] for s in streams]
    jobs = [(i, w) for i, sched in enumerate(schedules) for w in sched]
    if not jobs:
        return per_stream
    first_doc, first = jobs[0]
    probe_ids = streams[first_doc][first.start : first.start + first.input_length]
    base_head = _model_head(base_model, probe_ids)
    test_head = _model_head(test_model, probe_ids)
    linear = base_head is not None and test_head is not None
    if linear and (base_head.softcap, base_head.temperature) != (test_head.softcap,
                                                                 test_head.temperature):
        warnings.warn("pplfast: comparing from the models' logits: their final logit transforms "
                      f"differ (softcap, temperature: {(base_head.softcap, base_head.temperature)}"
                      f" vs {(test_head.softcap, test_head.temperature)})")
        linear = False
    base_device, test_device = _model_device(base_model), _model_device(test_model)
    if linear:
        device = test_head.weight.device
        # one copy of the base output layer where the models sit on different devices
        base_weight = base_head.weight.to(device)
        base_bias = None if base_head.bias is None else base_head.bias.to(device)
    bar = _progress_bar(len(jobs), progress)
    try:
        for batch in _pack_jobs(jobs, batch_size, None):
            ids, mask, targets = window_inputs(streams, batch, first_token)
            keep = targets != IGNORE
            if linear:
                rows_b = scored_hidden(base_head, ids.to(base_device),
                                       None if mask is None else mask.to(base_device), keep)
                rows_t = scored_hidden(test_head, ids.to(test_device),
                                       None if mask is None else mask.to(test_device), keep)
                tc = linear_compare(rows_b.to(device), base_weight, rows_t, test_head.weight,
                                    targets[keep].to(device), bias_base=base_bias,
                                    bias_test=test_head.bias, softcap=test_head.softcap,
                                    temperature=test_head.temperature, backend=backend)
                values = []
                for f in (tc.kl, tc.kl_reverse, tc.nll_base, tc.nll_test, tc.argmax_base,
                          tc.argmax_test):
                    full = torch.full(targets.shape, -1 if f.dtype == torch.int64 else 0,
                                      dtype=f.dtype)
                    full[keep] = f.cpu()
                    values.append(full)
            else:
                lb = _logits(_call(base_model, ids.to(base_device),
                                   None if mask is None else mask.to(base_device)))
                lt = _logits(_call(test_model, ids.to(test_device),
                                   None if mask is None else mask.to(test_device)))
                tc = compare(lb.to(lt.device), lt, targets.to(lt.device), ignore_index=IGNORE,
                             backend=backend)
                values = [f.cpu() for f in (tc.kl, tc.kl_reverse, tc.nll_base, tc.nll_test,
                                            tc.argmax_base, tc.argmax_test)]
            for row, (doc, w) in enumerate(batch):
                skip = w.score_start - w.start - 1
                for out, v in zip(per_stream[doc], values):
                    out[w.score_start : w.stop] = v[row, skip : w.input_length]
                per_stream[doc][6][w.score_start : w.stop] = True
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return per_stream
