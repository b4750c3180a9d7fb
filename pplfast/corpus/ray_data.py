"""Ray Data integration (``pip install "pplfast[ray]"``; ``pplfast.ray`` names this module too):
score a ``ray.data.Dataset`` of documents.

:func:`score_dataset` maps :class:`pplfast.CorpusScorer` over a dataset with an actor pool: each
actor loads the model once (on its GPU when ``num_gpus=1``) and scores batches of documents,
which come back with the score columns appended; the model is checked in the driver first
(:func:`check_model`). :func:`read_corpus` reads files with pplfast's own reader in Ray tasks.
``pplfast score-corpus --ray`` builds on both.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from .._optional import require
from ..models import loading
from ..models.loading import ModelLoadError, check_model_dir, first_line
from .formats import Document, ReadError
from .io import RecordCheck, iter_records
from .run_stats import robust_z
from .scorer import CorpusScorer


def _ray():
    return require("ray", extra="ray", feature="Ray Data scoring (pplfast.ray)")


class _ScorerActor:
    """The callable class Ray Data runs in each actor: the model loads once, in ``__init__``."""

    def __init__(self, scorer: CorpusScorer):
        self.scorer = scorer
        scorer.model
        scorer.tokenizer

    def __call__(self, batch):
        return self.scorer(batch)


def score_dataset(ds, model, *, concurrency: int = 1, num_gpus: float = 0, batch_size: int = 256,
                  **scorer_options):
    """Score every document of a Ray dataset; lazy, like every Ray Data transform.

    Args:
        ds: a ``ray.data.Dataset`` with a string column ``text_field`` (default ``"text"``).
        model: a local directory or hub id (loaded in each actor), or a loaded model with a
            ``name_or_path`` to reload it from.
        concurrency: number of scoring actors.
        num_gpus: GPUs per actor (``1``: each actor scores on its own GPU).
        batch_size: documents per call of the scorer; its windows are packed into forward
            passes of at most ``batch_tokens`` tokens.
        **scorer_options: :class:`pplfast.CorpusScorer` options (``window``, ``stride``,
            ``mode``, ``batch_tokens``, ``text_field``, ``stats``, ``dtype``, ``backend``, ...).

    Returns:
        A ``ray.data.Dataset``: the input columns plus the score columns of
        :class:`pplfast.CorpusScorer`, one row per document.

    Raises:
        ModelLoadError: at once, in the driver, for a model the actors could not load (see
            :func:`check_model`), with the single-process run's one line.
    """
    ray = _ray()
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or not num_gpus >= 0:
        raise ValueError(f"num_gpus must be a number >= 0, got {num_gpus!r}")
    if num_gpus > 0 and scorer_options.get("device") is None:
        scorer_options["device"] = "cuda"
    scorer = CorpusScorer(model, **scorer_options)  # options checked here, in the driver
    source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", "")
    tokenizer = scorer_options.get("tokenizer")
    by_name = tokenizer is None or isinstance(tokenizer, (str, os.PathLike))
    if source:  # the actors load the model from it
        check_model(source, tokenizer=tokenizer if by_name else None, load_tokenizer=by_name)
    return ds.map_batches(
        _ScorerActor, fn_constructor_args=(scorer,),
        compute=ray.data.ActorPoolStrategy(size=concurrency),  # a fixed pool: each loads once
        num_gpus=num_gpus or None, batch_size=batch_size, batch_format="numpy",
    )


_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
            "pytorch_model.bin")


def check_model(model, *, tokenizer=None, load_tokenizer: bool = True) -> None:
    """:class:`pplfast.models.ModelLoadError` now, in the driver, for a model that every actor
    would fail to load, with the line the single-process run gives (the same loader's checks):
    a missing directory or one without ``config.json``, a config or tokenizer transformers
    cannot read, no weights file, safetensors files whose header is damaged. The weights
    themselves are not loaded here (a local directory's safetensors headers are read, the data
    is not); a failure only the full load finds still ends the run in one line."""
    name = os.fspath(model)
    check_model_dir(name)
    if load_tokenizer:
        loading.load_tokenizer(os.fspath(tokenizer) if tokenizer is not None else name)
    transformers = require("transformers", extra="hf", feature="loading a model by name")

    def failed(exc):
        return ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}")

    try:
        transformers.AutoConfig.from_pretrained(name)
    except Exception as exc:  # OSError, ValueError, ...: as the loader reports them
        raise failed(exc) from None
    if not os.path.isdir(name):
        return  # a hub id: its files are the actors' to fetch
    present = [w for w in _WEIGHTS if os.path.isfile(os.path.join(name, w))]
    if not present:
        # transformers finds no weights file before it reads any tensor: its own line, at once
        loading.load_model(name, device="cpu", tokenizer=False)
        return
    if present[0].startswith("model.safetensors"):
        safetensors = require("safetensors", extra="hf", feature="loading a model by name")
        files = [present[0]]
        try:
            if present[0].endswith(".index.json"):
                with open(os.path.join(name, present[0]), encoding="utf-8") as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            for file in files:
                with safetensors.safe_open(os.path.join(name, file), framework="pt"):
                    pass  # the header is parsed, no tensor is read
        except Exception as exc:
            raise failed(exc) from None


def read_corpus(files: Sequence[str], *, text_field: str = "text", id_field: Optional[str] = None,
                fmt: str = "auto", on_error: str = "fail",
                on_skip: Optional[Callable[[ReadError], None]] = None, id_column: str = "id"):
    """A dataset of ``text_field`` and the documents' ids (column ``id_column``), from the files
    of :func:`pplfast.corpus.io.expand_inputs`, read by pplfast's own reader in Ray tasks (one
    file per task, from start to end): the single-process run's documents, ids (``id_field``'s
    value, or ``<file>:<n>``), rules and errors, however Ray then splits the rows into blocks.

    The corpus is checked first, in the driver, as the single-process run checks it: one pass
    of the reader in Ray tasks yields each record's id or error (no text), consumed in file
    order; a repeated id or a record that cannot be read raises
    :class:`pplfast.corpus.io.CorpusIOError` with the single-process line (``on_error="fail"``),
    or is skipped and handed to ``on_skip`` (``"skip"``). The dataset returned is lazy and
    reads the files again, leaving those records out. Files are opened by absolute path, so on
    a cluster every worker must see them at the same path (a shared file system).
    """
    ray = _ray()
    if text_field == id_column:
        raise ValueError(f"text_field {text_field!r} is the name of the id column: pass another "
                         "id_column")
    check = RecordCheck(on_error, on_skip)  # checks the arguments too
    items = [{"path": os.path.abspath(f), "name": f} for f in files]
    options = {"text_field": text_field, "id_field": id_field, "fmt": fmt}
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the driver sees the records in file order
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        listing = ds.map_batches(_list_records, fn_kwargs=options, batch_size=1, batch_format="numpy")
        dropped = []  # repeated ids' records, left out of the dataset (the errors are anyway)
        for batch in listing.iter_batches(batch_format="numpy", batch_size=4096):
            for item in _records_of(batch):
                if check.check(item) is None and isinstance(item, Document):
                    dropped.append(item.where)
    finally:
        ctx.execution_options.preserve_order = preserve
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_read_files, fn_kwargs={**options, "dropped": dropped,
                                                  "id_column": id_column},
                          batch_size=1, batch_format="numpy")


_READ_BATCH = 1024  # records handed to Ray at a time (it gathers them into blocks)


def _records(batch, text_field, id_field, fmt):
    paths, names = [str(p) for p in batch["path"]], [str(n) for n in batch["name"]]
    return iter_records(paths, text_field=text_field, id_field=id_field, fmt=fmt, names=names)


def _list_records(batch, text_field, id_field, fmt):
    """Ray task: each record of the files in ``batch`` as its id or its error, no text (columns
    of one type each: Ray's blocks turn a column of None and numbers into floats)."""
    columns = {"error": [], "id": [], "file": [], "line": [], "reason": [], "message": [],
               "rest_unread": []}
    types = {"error": bool, "line": np.int64, "rest_unread": bool}

    def out():
        return {k: np.array(v, dtype=types.get(k, object)) for k, v in columns.items()}

    for item in _records(batch, text_field, id_field, fmt):
        error = isinstance(item, ReadError)
        columns["error"].append(error)
        columns["id"].append("" if error else item.id)
        columns["file"].append(item.file)
        columns["line"].append(-1 if item.line is None else item.line)
        columns["reason"].append(item.reason if error else "")
        columns["message"].append(item.message if error else "")
        columns["rest_unread"].append(error and item.rest_unread)
        if len(columns["id"]) >= _READ_BATCH:
            yield out()
            columns = {k: [] for k in columns}
    if columns["id"]:
        yield out()


def _records_of(batch):
    for i in range(len(batch["file"])):
        line = int(batch["line"][i])
        line = None if line < 0 else line
        file = str(batch["file"][i])
        if batch["error"][i]:
            yield ReadError(file, line, str(batch["reason"][i]), str(batch["message"][i]),
                            bool(batch["rest_unread"][i]))
        else:
            yield Document(str(batch["id"][i]), "", file, line, None)


def _read_files(batch, text_field, id_field, fmt, dropped, id_column):
    """Ray task: the documents of the files in ``batch``, a bounded batch at a time, without the
    records the driver's check left out."""
    dropped = set(dropped)
    ids, texts = [], []
    for item in _records(batch, text_field, id_field, fmt):
        if isinstance(item, ReadError) or item.where in dropped:
            continue
        ids.append(item.id)
        texts.append(item.text)
        if len(ids) >= _READ_BATCH:
            yield {id_column: np.array(ids, dtype=object), text_field: np.array(texts, dtype=object)}
            ids, texts = [], []
    if ids:
        yield {id_column: np.array(ids, dtype=object), text_field: np.array(texts, dtype=object)}


def add_outlier_flags(ds, stats, outlier_z: float):
    """``ds`` with an ``outlier`` column: |robust z| of the log-perplexity above ``outlier_z``."""

    median, sd = stats.center()  # two numbers travel to the workers, not the run's array
    return ds.map_batches(_flag_outliers, fn_kwargs={"median": median, "sd": sd, "outlier_z": outlier_z},
                          batch_format="numpy")


def _flag_outliers(batch, median, sd, outlier_z):
    z = np.abs(robust_z(batch["num_tokens"], batch["sum_nll"], median, sd))
    batch["outlier"] = np.nan_to_num(z, nan=0.0) > outlier_z
    return batch
