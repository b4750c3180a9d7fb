"""Ray Data integration (``pip install "pplfast[ray]"``): score a ``ray.data.Dataset`` of documents.

:func:`score_dataset` maps :class:`pplfast.CorpusScorer` over a dataset with an actor pool: each
actor loads the model once (on its GPU when ``num_gpus=1``) and scores batches of documents,
which come back with the score columns appended. ``pplfast score-corpus --ray`` builds on it.
"""
from __future__ import annotations

from typing import Sequence

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
    _ray()
    for name, value in (("concurrency", concurrency), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or not num_gpus >= 0:
        raise ValueError(f"num_gpus must be a number >= 0, got {num_gpus!r}")
    if num_gpus > 0 and scorer_options.get("device") is None:
        scorer_options["device"] = "cuda"
    scorer = CorpusScorer(model, **scorer_options)  # options checked here, in the driver
    return ds.map_batches(
        _ScorerActor, fn_constructor_args=(scorer,), concurrency=concurrency,
        num_gpus=num_gpus or None, batch_size=batch_size, batch_format="numpy",
    )


def read_corpus(files: Sequence[str], *, text_field: str, id_field: str):
    """A dataset of ``text_field`` and ``id_field`` from JSON-lines (``.gz`` too) and parquet files."""
    ray = _ray()
    json_files = [f for f in files if not f.lower().endswith(".parquet")]
    parquet_files = [f for f in files if f.lower().endswith(".parquet")]
    parts = []
    if json_files:
        parts.append(ray.data.read_json(json_files, lines=True).select_columns([text_field, id_field]))
    if parquet_files:
        parts.append(ray.data.read_parquet(parquet_files).select_columns([text_field, id_field]))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(_ids_as_strings, fn_kwargs={"id_field": id_field}, batch_format="numpy")


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
