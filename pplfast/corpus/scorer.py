"""``CorpusScorer``: per-document perplexity sums over batches of text, the unit engines map over.

A scorer is a picklable callable: ``scorer(batch) -> batch`` on a dict of columns (lists or
numpy arrays, the format of Ray Data's ``map_batches(batch_format="numpy")``). The model is
loaded lazily, in the process that first scores, from a directory or hub id; a scorer built
around an already loaded model pickles its ``name_or_path`` and reloads from it. Inside a batch
the documents' windows are sorted by length and packed into forward passes of at most
``batch_tokens`` tokens (:func:`pplfast.models.score.score_documents`), and the columns come back
in the input order. Sums, not means: any grouping of rows aggregates exactly as a ratio of sums.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from ..api import BACKENDS
from ..metric import safe_exp
from ..models.head import check_ids, context_length, model_head, vocab_size
from ..models.loading import check_dtype, load_model, load_tokenizer
from ..models.score import score_documents
from ..models.text import count_words, scored_text_counts, tokenize
from ..models.windows import MODES

# the columns a scorer adds, in order, with their numpy dtypes
SCORE_COLUMNS = (
    ("num_tokens", np.int64), ("sum_nll", np.float64), ("sum_nll_sq", np.float64),
    ("num_bytes", np.int64), ("num_words", np.int64), ("perplexity", np.float64),
    ("bits_per_byte", np.float64),
)
STATS_COLUMNS = (("sum_entropy", np.float64), ("top1_hits", np.int64))


def _positive_int(name, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value



class CorpusScorer:
    """Score batches of documents: per-document sums of NLL, tokens, bytes and words.

    Args:
        model: a loaded causal LM (``torch.nn.Module``), or a local directory / hub id, loaded
            on first use in the process that scores (with its tokenizer when ``tokenizer`` is
            None).
        tokenizer: a Hugging Face tokenizer, or a directory / hub id; default: the model's.
        window, stride, mode: the window schedule of long documents, as in
            :func:`pplfast.score_model` (``window`` defaults to the model's context length).
        batch_tokens: most tokens fed per forward pass, padding included; windows are sorted by
            length and packed (a window longer than this runs alone).
        text_field: the column holding the documents.
        stats: also ``sum_entropy`` and ``top1_hits`` (needs ``pplfast.token_stats``).
        device, dtype: where and in which dtype a model given by name is loaded (``dtype="auto"``:
            the checkpoint's on GPU, float32 on CPU); ignored for a loaded model.
        backend: passed to :func:`pplfast.linear_token_nll` / :func:`pplfast.token_nll`.

    ``scorer(batch)`` takes a dict of equal-length columns holding ``text_field`` (strings;
    None counts as empty) and returns a new dict: the same columns plus, per document,
    ``num_tokens`` (scored tokens), ``sum_nll`` (nats, float64), ``sum_nll_sq``, ``num_bytes``
    and ``num_words`` (the UTF-8 bytes and the words of the text the scored tokens cover, see
    :func:`pplfast.models.text.scored_text_counts`: in rolling mode the whole text, counted as
    lm-evaluation-harness counts it, ``len(re.split(r"\\s+", text))`` words),
    ``perplexity`` (``exp(sum_nll / num_tokens)``) and ``bits_per_byte``
    (``sum_nll / num_bytes / ln 2``), as numpy arrays. Empty or whitespace-only documents, and
    documents with no scored token, get ``num_tokens = 0`` and NaN perplexity.
    """

    def __init__(self, model, tokenizer=None, *, window: Optional[int] = None,
                 stride: Optional[int] = None, mode: str = "sliding", batch_tokens: int = 16384,
                 text_field: str = "text", stats: bool = False, device=None, dtype="auto",
                 backend: str = "auto"):
        import torch

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.window = _positive_int("window", window, allow_none=True)
        self.stride = _positive_int("stride", stride, allow_none=True)
        if self.stride is not None and mode != "sliding":
            raise ValueError(f"stride applies to mode='sliding' only, got stride={stride} with mode={mode!r}")
        self.batch_tokens = _positive_int("batch_tokens", batch_tokens)
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_dtype(dtype)
        if isinstance(model, torch.nn.Module):
            self._model, self._source = model, getattr(model, "name_or_path", "") or ""
        elif isinstance(model, (str, os.PathLike)):
            self._model, self._source = None, os.fspath(model)
        else:
            raise TypeError(f"model must be a torch.nn.Module, a directory or a hub id, got "
                            f"{type(model).__name__}")
        if tokenizer is not None and isinstance(tokenizer, os.PathLike):
            tokenizer = os.fspath(tokenizer)
        if tokenizer is None and self._model is not None and not self._source:
            raise ValueError("a loaded model without name_or_path needs tokenizer=")
        self._tokenizer = tokenizer
        self.mode, self.text_field, self.stats = mode, text_field, bool(stats)
        self.device, self.dtype, self.backend = device, dtype, backend
        self._head = None
        self._head_ready = False

    # -- pickling: a loaded model never travels; the worker reloads it from its name_or_path --
    def __getstate__(self):
        state = dict(self.__dict__)
        if state["_model"] is not None:
            if not state["_source"]:
                raise TypeError("cannot pickle a CorpusScorer over a model with no name_or_path: "
                                "pass the model's directory instead of the loaded model")
            if state["dtype"] == "auto":  # reload in the dtype the model was used in
                state["dtype"] = next(state["_model"].parameters()).dtype
        state["_model"], state["_head"], state["_head_ready"] = None, None, False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def model(self):
        """The causal LM, loaded on first access when the scorer was given a name."""
        if self._model is None:
            model, tok = load_model(self._source, device=self.device, dtype=self.dtype,
                                    tokenizer=self._tokenizer is None)
            self._model = model
            if tok is not None:
                self._tokenizer = tok
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.model  # loads the model's own tokenizer with it
            if self._tokenizer is None:  # a loaded model given without one
                self._tokenizer = load_tokenizer(self._source)
        elif isinstance(self._tokenizer, str):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def __call__(self, batch):
        if not isinstance(batch, dict):
            raise TypeError(f"batch must be a dict of columns, got {type(batch).__name__}")
        if self.text_field not in batch:
            raise ValueError(f"batch has no column {self.text_field!r} (columns: {sorted(batch)})")
        texts = batch[self.text_field]
        n = len(texts)
        for name, column in batch.items():
            if len(column) != n:
                raise ValueError(f"column {name!r} has {len(column)} rows, {self.text_field!r} has {n}")
        scores = self.score_texts([_as_text(t, i) for i, t in enumerate(texts)])
        out = dict(batch)
        out.update(scores)
        return out

    def score_texts(self, texts):
        """The score columns (dict of numpy arrays, see the class doc) of a list of strings."""
        import torch

        model, tokenizer = self.model, self.tokenizer
        n = len(texts)
        columns = SCORE_COLUMNS + (STATS_COLUMNS if self.stats else ())
        cols = {name: np.zeros(n, dtype=dtype) for name, dtype in columns}
        add_special = self.mode != "rolling"
        tokens, where = [], []
        for i, text in enumerate(texts):
            if text.strip():
                tokens.append(tokenize(tokenizer, text, add_special_tokens=add_special,
                                       ends=self.mode != "rolling"))
                where.append(i)
            else:  # not scored: lm-evaluation-harness's counts of the whole text
                cols["num_bytes"][i] = len(text.encode("utf-8"))
                cols["num_words"][i] = count_words(text)
        docs = [t.ids for t in tokens]
        vocab = vocab_size(model)
        for i, ids in zip(where, docs):  # a tokenizer larger than the model: said before any pass
            check_ids(f"document {i} token ids", ids, vocab)
        if docs:
            if not self._head_ready:
                longest = max(docs, key=len)
                with torch.inference_mode():
                    self._head = model_head(model, longest)
                self._head_ready = True
            window = self.window if self.window is not None else context_length(model)
            per_doc = score_documents(
                model, docs, window=window, stride=self.stride, mode=self.mode,
                tokenizer=tokenizer, batch_size=None, batch_tokens=self.batch_tokens,
                backend=self.backend, head=self._head, stats=self.stats,
            ).documents
            for k, (i, values) in enumerate(zip(where, per_doc)):
                nll, scored = values["nll"], values["scored"]
                x = nll.double()[scored]
                cols["num_bytes"][i], cols["num_words"][i] = scored_text_counts(
                    texts[i], tokens[k], scored, tokenizer)
                cols["num_tokens"][i] = int(scored.sum())
                cols["sum_nll"][i] = float(x.sum())
                cols["sum_nll_sq"][i] = float((x * x).sum())
                if self.stats:
                    cols["sum_entropy"][i] = float(values["entropy"].double()[scored].sum())
                    cols["top1_hits"][i] = int((values["argmax"] == docs[k])[scored].sum())
        tokens = cols["num_tokens"]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            mean = np.where(tokens > 0, cols["sum_nll"] / np.maximum(tokens, 1), np.nan)
            cols["perplexity"] = safe_exp(mean)
            bpb = cols["sum_nll"] / cols["num_bytes"] / math.log(2)
            cols["bits_per_byte"] = np.where((tokens > 0) & (cols["num_bytes"] > 0), bpb, np.nan)
        return cols


def _as_text(value, row):
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"document {row} is bytes that are not UTF-8") from None
    if not isinstance(value, str):
        raise TypeError(f"document {row} must be a string, got {type(value).__name__}")
    return value
