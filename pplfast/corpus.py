"""``CorpusScorer``: per-document perplexity sums over batches of text, the unit engines map over.

A scorer is a picklable callable: ``scorer(batch) -> batch`` on a dict of columns (lists or
numpy arrays, the format of Ray Data's ``map_batches(batch_format="numpy")``). The model is
loaded lazily, in the process that first scores, from a directory or hub id; a scorer built
around an already loaded model pickles its ``name_or_path`` and reloads from it. Inside a batch
the documents' windows are sorted by length and packed into forward passes of at most
``batch_tokens`` tokens (:func:`pplfast.hf._score_documents`), and the columns come back in the
input order. Sums, not means: any grouping of rows aggregates exactly as a ratio of sums.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from . import _models
from ._dispatch import BACKENDS
from ._models import ModelLoadError, load_tokenizer  # noqa: F401  (ModelLoadError: part of this module's API)
from .metric import safe_exp
from .windows import MODES

DTYPES = ("auto", "float32", "bfloat16", "float16")

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


def resolve_device(device):
    """``device`` as a ``torch.device``; None means cuda when available, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device, got {device!r}: {exc}") from None


def load_model(name_or_path, *, device=None, dtype="auto", tokenizer=True):
    """Load a causal LM (and its tokenizer) with transformers, in eval mode on ``device``
    (None: cuda when available, else cpu).

    ``dtype="auto"``: the checkpoint's dtype on GPU, float32 on CPU. Raises
    :class:`ModelLoadError` (one line) when the model cannot be loaded or moved.
    """
    return _models.load_model(name_or_path, device=resolve_device(device), dtype=dtype,
                              tokenizer=tokenizer)


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
    :func:`pplfast.hf.scored_text_counts`: in rolling mode the whole text, counted as
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
        if not (dtype in DTYPES or isinstance(dtype, torch.dtype)):
            raise ValueError(f"dtype must be one of {DTYPES} or a torch.dtype, got {dtype!r}")
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

        from .hf import (_context_length, _score_documents, count_words, scored_text_counts,
                         tokenize)

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
        if docs:
            if not self._head_ready:
                from .hf import _model_head

                longest = max(docs, key=len)
                with torch.inference_mode():
                    self._head = _model_head(model, longest)
                self._head_ready = True
            window = self.window if self.window is not None else _context_length(model)
            doc_stats = [] if self.stats else None
            per_doc = _score_documents(
                model, docs, window=window, stride=self.stride, mode=self.mode,
                prefix_token_id=None, tokenizer=tokenizer, batch_size=None, backend=self.backend,
                progress=False, batch_tokens=self.batch_tokens, head=self._head,
                stats=doc_stats,
            ).documents
            for k, (i, (nll, scored)) in enumerate(zip(where, per_doc)):
                x = nll.double()[scored]
                cols["num_bytes"][i], cols["num_words"][i] = scored_text_counts(
                    texts[i], tokens[k], scored, tokenizer)
                cols["num_tokens"][i] = int(scored.sum())
                cols["sum_nll"][i] = float(x.sum())
                cols["sum_nll_sq"][i] = float((x * x).sum())
                if doc_stats is not None:
                    st = doc_stats[k]
                    cols["sum_entropy"][i] = float(st.entropy.double()[scored].sum())
                    cols["top1_hits"][i] = int((st.argmax == docs[k])[scored].sum())
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


# ---------------------------------------------------------------- run figures and outliers

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)
MAD_TO_SD = 1.4826  # a normal distribution's standard deviation is 1.4826 MAD
NUM_EXTREME = 10


def _percentiles(values):
    """``np.percentile(values, PERCENTILES)`` (linear interpolation) where ``values`` may hold
    ``inf`` (a perplexity past float64): an order statistic stays itself beside an infinite
    neighbour and a position between two infinities is inf, where numpy's interpolation gives
    NaN for ``inf - inf`` and ``inf * 0``."""
    v = np.sort(values)
    k = np.asarray(PERCENTILES, dtype=np.float64) / 100 * (len(v) - 1)
    lo = np.floor(k).astype(np.int64)
    a, b, t = v[lo], v[np.ceil(k).astype(np.int64)], k - lo
    with np.errstate(invalid="ignore"):
        between = np.percentile(values, PERCENTILES)
    return np.where((t == 0) | (a == b), a, np.where(np.isinf(b), b, between))


def robust_z(num_tokens, sum_nll, median: float, sd: float):
    """``(sum_nll / num_tokens - median) / sd`` per document, NaN where nothing was scored; with
    ``sd == 0`` a document off the median gets an infinite z."""
    num_tokens, sum_nll = np.asarray(num_tokens), np.asarray(sum_nll, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = sum_nll / num_tokens - median
        z = np.where(diff == 0, 0.0, diff / sd) if sd == 0 else diff / sd
    return np.where(num_tokens > 0, z, np.nan)


class RunStats:
    """Corpus figures of a run, from its score rows: ratio-of-sums totals, the percentiles of
    document perplexity, and the robust z-score of each document's log-perplexity.

    Memory: 8 bytes per scored document (its mean NLL, for the median and percentiles).
    """

    def __init__(self) -> None:
        from array import array

        self.num_documents = 0
        self.num_tokens = 0
        self.sum_nll = 0.0
        self.num_bytes = 0  # of documents with at least one scored token
        self._mean_nll = array("d")
        self._center = None

    def add(self, num_tokens, sum_nll, num_bytes) -> None:
        self.num_documents += 1
        if num_tokens > 0 and math.isfinite(sum_nll):
            self.num_tokens += int(num_tokens)
            self.sum_nll += float(sum_nll)
            self.num_bytes += int(num_bytes)
            self._mean_nll.append(sum_nll / num_tokens)
        self._center = None

    def add_arrays(self, num_tokens, sum_nll, num_bytes) -> None:
        num_tokens, sum_nll = np.asarray(num_tokens), np.asarray(sum_nll, dtype=np.float64)
        ok = (num_tokens > 0) & np.isfinite(sum_nll)
        self.num_documents += len(num_tokens)
        self.num_tokens += int(num_tokens[ok].sum())
        self.sum_nll += float(sum_nll[ok].sum())
        self.num_bytes += int(np.asarray(num_bytes)[ok].sum())
        self._mean_nll.extend((sum_nll[ok] / num_tokens[ok]).tolist())
        self._center = None

    def center(self):
        """(median, robust standard deviation) of the documents' mean NLL (log-perplexity)."""
        if self._center is None:
            x = np.frombuffer(self._mean_nll, dtype=np.float64) if len(self._mean_nll) else np.zeros(0)
            if len(x) == 0:
                self._center = (math.nan, math.nan)
            else:
                median = float(np.median(x))
                self._center = (median, MAD_TO_SD * float(np.median(np.abs(x - median))))
        return self._center

    def z_scores(self, num_tokens, sum_nll):
        """Robust z of each document's log-perplexity: see :func:`robust_z`."""
        return robust_z(num_tokens, sum_nll, *self.center())

    def summary(self, *, num_outliers: int, outliers, seconds: float, documents: int,
                tokens: int) -> dict:
        """The summary object of ``pplfast score-corpus`` (see the README)."""
        x = np.frombuffer(self._mean_nll, dtype=np.float64) if len(self._mean_nll) else np.zeros(0)
        percentiles = ({str(p): float(v) for p, v in zip(PERCENTILES, _percentiles(safe_exp(x)))}
                       if len(x) else {str(p): None for p in PERCENTILES})
        mean = self.sum_nll / self.num_tokens if self.num_tokens else math.nan
        rate = (lambda n: n / seconds if seconds > 0 else None)
        return {
            "num_documents": self.num_documents,
            "num_scored_documents": len(x),
            "num_tokens": self.num_tokens,
            "perplexity": safe_exp(mean) if self.num_tokens else None,
            "bits_per_byte": (self.sum_nll / self.num_bytes / math.log(2)) if self.num_bytes else None,
            "documents_per_second": rate(documents),
            "tokens_per_second": rate(tokens),
            "perplexity_percentiles": percentiles,
            "num_outliers": int(num_outliers),
            "outliers": list(outliers),
            "documents_this_run": documents,
            "seconds": seconds,
        }
