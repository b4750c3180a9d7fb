"""Ray Data integration (``pip install "pplfast[ray]"``): score a ``ray.data.Dataset`` of documents.

:func:`score_dataset` maps :class:`pplfast.CorpusScorer` over a dataset with an actor pool: each
actor loads the model once (on its GPU when ``num_gpus=1``) and scores batches of documents,
which come back with the score columns appended. ``pplfast score-corpus --ray`` builds on it.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ._optional import require
from .corpus import CorpusScorer, robust_z


def _ray():
    return require("ray", extra="ray", feature="pplfast.ray")


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
    return ds.map_batches(
        _ScorerActor, fn_constructor_args=(scorer,),
        compute=ray.data.ActorPoolStrategy(size=concurrency),  # a fixed pool: each loads once
        num_gpus=num_gpus or None, batch_size=batch_size, batch_format="numpy",
    )


def read_corpus(files: Sequence[str], *, text_field: str, id_field: Optional[str] = None):
    """A dataset of ``text_field`` and the documents' ids, from the files of
    :func:`pplfast.corpus_io.expand_inputs`.

    With ``id_field``: JSON-lines (``.gz`` too) and parquet files read by Ray Data's
    ``read_json`` / ``read_parquet``, ids from that column (as strings). Without: pplfast's own
    reader runs in Ray tasks, one file per task, read from start to end, so the ids are the
    single-process run's ``<file>:<line>`` (``<file>:<row>`` for parquet, ``<file>`` for
    ``.txt``), in an ``id`` column, however Ray then splits the rows into blocks. Ray's
    readers cannot give these ids: a row does not carry its line in the file (blank lines are
    skipped, and a file's rows may be split over blocks that reach later stages in any order).
    Files are opened by absolute path, so on a cluster every worker must see them at the same
    path (a shared file system).
    """
    ray = _ray()
    if id_field:
        if any(f.lower().endswith(".txt") for f in files):
            raise ValueError("with id_field, Ray's readers read .jsonl, .jsonl.gz and .parquet "
                             "files, not .txt files (leave id_field out to read them)")
        json_files = [f for f in files if not f.lower().endswith(".parquet")]
        parquet_files = [f for f in files if f.lower().endswith(".parquet")]
        parts = []
        if json_files:
            parts.append(ray.data.read_json(json_files, lines=True).select_columns([text_field, id_field]))
        if parquet_files:
            parts.append(ray.data.read_parquet(parquet_files).select_columns([text_field, id_field]))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        return ds.map_batches(_ids_as_strings, fn_kwargs={"id_field": id_field}, batch_format="numpy")
    if text_field == "id":
        raise ValueError("text_field 'id' is the name of the id column: pass id_field")
    items = [{"path": os.path.abspath(f), "name": f} for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return ds.map_batches(_read_files, fn_kwargs={"text_field": text_field}, batch_size=1,
                          batch_format="numpy")


_READ_BATCH = 1024  # documents handed to Ray at a time (it gathers them into blocks)


def _read_files(batch, text_field):
    """Ray task: the documents of the files in ``batch``, a bounded batch at a time."""
    from .corpus_io import iter_documents

    paths, names = [str(p) for p in batch["path"]], [str(n) for n in batch["name"]]
    ids, texts = [], []
    for doc in iter_documents(paths, text_field=text_field, names=names):
        ids.append(doc.id)
        texts.append(doc.text)
        if len(ids) >= _READ_BATCH:
            yield {"id": np.array(ids, dtype=object), text_field: np.array(texts, dtype=object)}
            ids, texts = [], []
    if ids:
        yield {"id": np.array(ids, dtype=object), text_field: np.array(texts, dtype=object)}


def _ids_as_strings(batch, id_field):
    batch[id_field] = np.array([str(v) for v in batch[id_field]], dtype=object)
    return batch


def add_outlier_flags(ds, stats, outlier_z: float):
    """``ds`` with an ``outlier`` column: |robust z| of the log-perplexity above ``outlier_z``."""

    median, sd = stats.center()  # two numbers travel to the workers, not the run's array
    return ds.map_batches(_flag_outliers, fn_kwargs={"median": median, "sd": sd, "outlier_z": outlier_z},
                          batch_format="numpy")


def _flag_outliers(batch, median, sd, outlier_z):
    z = np.abs(robust_z(batch["num_tokens"], batch["sum_nll"], median, sd))
    batch["outlier"] = np.nan_to_num(z, nan=0.0) > outlier_z
    return batch
