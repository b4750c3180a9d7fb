"""Compare two Hugging Face causal LMs token by token, neither model's logits built.

Both models run on the same windows in lockstep (the plan, batching and scored tokens of
:func:`pplfast.score_model`, through the one run loop :func:`pplfast.models.runner.run`); the
final hidden states of the scored positions of each go through :func:`pplfast.linear_compare`
with the two output layers, which reads both models' logit rows together, one vocabulary tile at
a time (:class:`ComparePass`). A model without a separate body and output layer (or whose probe
fails), or two models whose final logit transforms differ, are compared from their logits
through :func:`pplfast.compare`, with a warning.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch

from ..comparison import ComparisonResult, TokenComparison, compare, linear_compare
from ..metric import Comparison
from . import runner
from .head import (call_model, check_ids, model_device, model_head, output_logits,
                   scored_hidden, vocab_size)
from .runner import IGNORE, Field

COMPARISON_FIELDS = (Field("kl", torch.float32), Field("kl_reverse", torch.float32),
                     Field("nll_base", torch.float32), Field("nll_test", torch.float32),
                     Field("argmax_base", torch.int64), Field("argmax_test", torch.int64))


class ComparePass:
    """One forward pass of both models over the same inputs: each position's
    :class:`TokenComparison` fields. Through both heads when both can be used and share one
    final transform, else from both models' logits."""

    fields = COMPARISON_FIELDS

    def __init__(self, base_model, test_model, base_head, test_head, backend: str):
        self.models = (base_model, test_model)
        self.devices = (model_device(base_model), model_device(test_model))
        self.backend = backend
        linear = base_head is not None and test_head is not None
        if linear and (base_head.softcap, base_head.temperature) != (test_head.softcap,
                                                                     test_head.temperature):
            warnings.warn("pplfast: comparing from the models' logits: their final logit "
                          "transforms differ (softcap, temperature: "
                          f"{(base_head.softcap, base_head.temperature)} vs "
                          f"{(test_head.softcap, test_head.temperature)})")
            linear = False
        self.heads = (base_head, test_head) if linear else None
        if linear:
            device = test_head.weight.device
            # one copy of the base output layer where the models sit on different devices
            self.base_weight = base_head.weight.to(device)
            self.base_bias = None if base_head.bias is None else base_head.bias.to(device)

    def _inputs(self, ids, mask, which: int):
        device = self.devices[which]
        return ids.to(device), None if mask is None else mask.to(device)

    def __call__(self, ids, mask, targets) -> Dict[str, torch.Tensor]:
        if self.heads is None:
            base, test = (output_logits(call_model(m, *self._inputs(ids, mask, i)))
                          for i, m in enumerate(self.models))
            tc = compare(base.to(test.device), test, targets.to(test.device),
                         ignore_index=IGNORE, backend=self.backend)
            return {f.name: getattr(tc, f.name) for f in self.fields}
        base_head, test_head = self.heads
        keep = targets != IGNORE
        rows_b = scored_hidden(base_head, *self._inputs(ids, mask, 0), keep)
        rows_t = scored_hidden(test_head, *self._inputs(ids, mask, 1), keep)
        device = test_head.weight.device
        tc = linear_compare(rows_b.to(device), self.base_weight, rows_t, test_head.weight,
                            targets[keep].to(device), bias_base=self.base_bias,
                            bias_test=test_head.bias, softcap=test_head.softcap,
                            temperature=test_head.temperature, backend=self.backend)
        out = {}
        for f in self.fields:  # the scored rows back into the pass's (rows, length) layout
            full = f.blank(targets.numel()).reshape(targets.shape)
            full[keep] = getattr(tc, f.name).cpu()
            out[f.name] = full
        return out


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
    runner.check_batch_size(batch_size)
    if input_ids.numel():
        check_ids("input_ids", input_ids, vocab_size(base_model))
    ids2, docs, spans = runner.documents(input_ids, attention_mask)
    # with mode="llamacpp" and no tokenizer: prefix_token_id first in every chunk when given;
    # the command line passes the tokenizer's BOS when it adds one
    plan = runner.plan(docs, window=window, stride=stride, mode=mode,
                       prefix_token_id=prefix_token_id, tokenizer=None,
                       models=(base_model, test_model))
    with runner.scoring_mode(base_model, test_model):
        probe_ids = plan.probe_ids()
        heads = (None, None) if probe_ids is None else (model_head(base_model, probe_ids),
                                                        model_head(test_model, probe_ids))
        ran = runner.run(plan, ComparePass(base_model, test_model, *heads, backend),
                         batch_size=batch_size, progress=progress)
    fields = {f.name: f.blank(ids2.numel()).reshape(ids2.shape) for f in COMPARISON_FIELDS}
    scored = torch.zeros(ids2.shape, dtype=torch.bool)
    for b, (values, (lo, hi)) in enumerate(zip(ran.documents, spans)):
        for name, out in fields.items():
            out[b, lo:hi] = values[name]
        scored[b, lo:hi] = values["scored"]
    tokens = TokenComparison(**{name: f.reshape(input_ids.shape) for name, f in fields.items()})
    scored = scored.reshape(input_ids.shape)
    metric = Comparison()
    metric.update_tokens(tokens, scored=scored)
    if metric.num_tokens == 0:
        raise ValueError("nothing to compare: no token has context before it (a document needs "
                         "at least 2 tokens, or mode='rolling')")
    result = metric.compute()
    return ComparisonResult(**{**result.__dict__, "token_comparison": tokens, "scored": scored})
