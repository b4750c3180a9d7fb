"""The native endpoints: ``POST /v1/score`` (per-document figures of ``score_texts`` /
``score_model``, windows included) and ``POST /v1/compare`` (per-document ``compare_models``
figures of two served models, and llama.cpp's statistics over the request).

Documents come as text or token ids (``input``: a string, a list of strings, a list of ids or a
list of lists); the window options are ``score_model``'s (``window``, default the model's
context, ``stride``, ``mode``: ``sliding``, ``rolling``, ``chunks``, ``llamacpp``), so a
document longer than the context is scored in windows. Text is tokenized as ``score_texts``
does (special tokens added except in ``rolling`` mode, whose prefix token plays BOS). Numbers
that are not finite are written as null.
"""
from __future__ import annotations

import math
import re
from typing import Any, List, Optional

import torch
from pydantic import BaseModel, ConfigDict

from ..metric import safe_exp
from .errors import bad_request
from .packing import Sequence
from .wire import Prompt, check_range, check_token_budget, number, read_prompts

MAX_TOP_K = 64
_INT_FIELDS = ("argmax", "rank", "top_k_ids", "argmax_base", "argmax_test")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    input: Any = None
    window: Optional[int] = None
    stride: Optional[int] = None
    mode: str = "sliding"
    add_special_tokens: Optional[bool] = None
    per_token: bool = False
    stats: bool = False
    top_k: int = 0


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None  # the test model
    base: Optional[str] = None
    input: Any = None
    window: Optional[int] = None
    stride: Optional[int] = None
    mode: str = "sliding"
    add_special_tokens: Optional[bool] = None
    per_token: bool = False


class Document:
    """One document: its tokens, text, windows and their sequences."""

    def __init__(self, prompt: Prompt, stream: List[int], offset: int, windows, seqs) -> None:
        self.prompt, self.stream, self.offset = prompt, stream, offset
        self.windows, self.sequences = windows, seqs

    def fields(self, names, top_k: int = 0) -> dict:
        """Per token of the document: each result field (0 / -1 where unscored) and ``scored``."""
        n = len(self.stream)
        out = {}
        for name in names:
            integer = name in _INT_FIELDS
            shape = (n, top_k) if name.startswith("top_k") else (n,)
            out[name] = torch.full(shape, -1 if integer else 0.0,
                                   dtype=torch.int64 if integer else torch.float32)
        scored = torch.zeros(n, dtype=torch.bool)
        for w, seq in zip(self.windows, self.sequences):
            for name in names:
                out[name][w.score_start : w.stop] = seq.result[name]
            scored[w.score_start : w.stop] = True
        out = {k: v[self.offset:] for k, v in out.items()}
        out["scored"] = scored[self.offset:]
        return out

    def num_bytes(self, engine, scored: torch.Tensor) -> int:
        """UTF-8 bytes of the text the scored tokens cover (the denominator of bits per byte,
        as :func:`pplfast.score_texts` counts it)."""
        return engine.scored_counts(self.prompt.text, self.prompt.ids, self.prompt.ends,
                                    scored)[0]


def _schedule_error(exc: ValueError) -> Exception:
    text = str(exc)
    found = re.search(r"\b(stride|mode|window|prefix_token_id)\b", text)
    param = found.group(1) if found else "window"
    return bad_request(text, "model" if param == "prefix_token_id" else param)


def documents(req, engine, max_request_tokens: int, *, stats: bool = False, top_k: int = 0
              ) -> List[Document]:
    if req.input is None:
        raise bad_request("input is required", "input")
    check_range("window", req.window, 2, None)
    check_range("stride", req.stride, 1, None)
    add = req.add_special_tokens if req.add_special_tokens is not None else req.mode != "rolling"
    prompts = read_prompts(req.input, "input", engine, add_special_tokens=add)
    check_token_budget(prompts, max_request_tokens, "input")
    docs = []
    for p in prompts:
        if p.text is None:
            p.text = engine.decode(p.ids)  # bytes per token count the decoded text
        try:
            windows = engine.schedule(len(p.ids), window=req.window, stride=req.stride,
                                      mode=req.mode)
            prefix = [engine.prefix_token_id()] if req.mode == "rolling" and windows else []
        except ValueError as exc:
            raise _schedule_error(exc) from None
        first = engine.llamacpp_first_token() if req.mode == "llamacpp" else None
        stream = prefix + p.ids
        seqs = []
        for w in windows:
            fed = torch.tensor(stream[w.start : w.stop - 1], dtype=torch.long)
            if first is not None:
                fed[0] = first
            skip = w.score_start - w.start - 1
            seqs.append(Sequence(fed, torch.arange(skip, w.input_length),
                                 torch.tensor(stream[w.score_start : w.stop], dtype=torch.long),
                                 stats=stats, top_k=top_k))
        docs.append(Document(p, stream, len(prefix), windows, seqs))
    return docs


def parse_score(req: ScoreRequest, engine, max_request_tokens: int) -> List[Document]:
    check_range("top_k", req.top_k, 0, min(MAX_TOP_K, engine.vocab_size))
    if req.top_k and not req.stats:
        raise bad_request(f"top_k={req.top_k} needs stats=true", "top_k")
    return documents(req, engine, max_request_tokens, stats=req.stats, top_k=req.top_k)


def _summary(sum_nll: float, n: int, num_bytes: int) -> dict:
    mean = sum_nll / n if n else math.nan
    return {"num_tokens": n, "num_bytes": num_bytes, "sum_nll": number(sum_nll),
            "mean_nll": number(mean), "perplexity": number(safe_exp(mean)),
            "bits_per_byte": number(sum_nll / (math.log(2) * num_bytes) if num_bytes and n
                                    else math.nan)}


def _listed(t: torch.Tensor, scored: torch.Tensor):
    values = t.tolist()
    if t.is_floating_point():
        mask = scored.tolist()
        if t.ndim == 1:
            return [number(v) if s else None for v, s in zip(values, mask)]
        return [[number(x) for x in v] if s else None for v, s in zip(values, mask)]
    return values


def score_response(req: ScoreRequest, engine, docs: List[Document]) -> dict:
    names = ["nll"] + (["entropy", "max_logprob", "argmax", "rank"] if req.stats else []) + (
        ["top_k_ids", "top_k_logprobs"] if req.top_k else [])
    data, total_tokens = [], 0
    for i, doc in enumerate(docs):
        f = doc.fields(names, req.top_k)
        scored = f["scored"]
        n = int(scored.sum())
        entry = {"index": i, **_summary(float(f["nll"][scored].double().sum()), n,
                                        doc.num_bytes(engine, scored))}
        if req.stats:
            targets = torch.tensor(doc.prompt.ids, dtype=torch.long)
            entry["mean_entropy"] = number(float(f["entropy"][scored].double().mean())
                                           if n else math.nan)
            entry["top1_accuracy"] = number(float((f["argmax"] == targets)[scored].double()
                                                  .mean()) if n else math.nan)
        if req.per_token or req.stats:
            entry["tokens"] = {"token_ids": doc.prompt.ids, "scored": scored.tolist(),
                               **{k: _listed(f[k], scored) for k in names}}
        total_tokens += len(doc.prompt.ids)
        data.append(entry)
    return {"object": "list", "model": engine.name, "data": data,
            "usage": {"prompt_tokens": total_tokens,
                      "windows": sum(len(d.windows) for d in docs)}}


def compare_response(req: CompareRequest, base, test, docs: List[Document], figures) -> dict:
    """``figures(parts)``: llama.cpp's statistics of a list of per-token comparison dicts."""
    names = ["kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test"]
    data, parts = [], []
    for i, doc in enumerate(docs):
        f = doc.fields(names)
        scored = f["scored"]
        part = {k: f[k][scored] for k in names}
        parts.append(part)
        entry = {"index": i, "num_bytes": doc.num_bytes(test, scored),
                 **_clean(figures([part]))}
        if req.per_token:
            entry["tokens"] = {"token_ids": doc.prompt.ids, "scored": scored.tolist(),
                               **{k: _listed(f[k], scored) for k in names}}
        data.append(entry)
    return {"object": "list", "model": test.name, "base": base.name, "data": data,
            "summary": _clean(figures(parts)),
            "usage": {"prompt_tokens": sum(len(d.prompt.ids) for d in docs),
                      "windows": sum(len(d.windows) for d in docs)}}


def _clean(value):
    if isinstance(value, float):
        return number(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
