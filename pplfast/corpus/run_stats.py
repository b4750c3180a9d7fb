"""Corpus figures of a ``pplfast score-corpus`` run from its score rows: ratio-of-sums totals,
the percentiles of document perplexity, and the robust z-score of each document's
log-perplexity (the outliers), set on every row by a second pass (:func:`write_flagged_rows`)."""
from __future__ import annotations

import heapq
import math
import os
from typing import Sequence

import numpy as np

from ..metric import safe_exp
from .io import iter_score_rows
from .scorer import SCORE_COLUMNS, STATS_COLUMNS
from .writer import atomic_output, dump_row, write_parquet

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
        """The summary object of ``pplfast score-corpus`` (docs/corpus.md, "Outputs")."""
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


class Outliers:
    """The outliers of a run as their rows go by: how many, and the :data:`NUM_EXTREME` most
    extreme ids."""

    def __init__(self) -> None:
        self.count = 0
        self._heap = []  # the largest |z| seen, with their ids

    def add(self, z: float, doc_id: str) -> None:
        self.count += 1
        item = (abs(z), doc_id)
        (heapq.heappush if len(self._heap) < NUM_EXTREME else heapq.heappushpop)(self._heap, item)

    def most_extreme(self) -> list:
        """Their ids, most extreme first."""
        return [doc_id for _, doc_id in sorted(self._heap, reverse=True)]


def write_flagged_rows(rows_path: str, output: str, columns: Sequence[str], outlier_z: float, *,
                       parquet: bool):
    """The second pass over a run's score rows (``rows_path``, JSON lines): the run's figures
    first, then every row again with its ``outlier`` flag (``|z| > outlier_z``; False where
    nothing was scored) written whole to ``output`` (JSON lines, or parquet with ``parquet``,
    when ``rows_path`` is removed after). Returns ``(RunStats, Outliers)``."""
    stats = RunStats()
    for row in iter_score_rows(rows_path):
        stats.add(row["num_tokens"], row["sum_nll"], row["num_bytes"])
    outliers = Outliers()

    def flagged_rows():
        for row in iter_score_rows(rows_path):
            z = float(stats.z_scores(row["num_tokens"], row["sum_nll"]))
            row["outlier"] = bool(abs(z) > outlier_z)  # NaN (nothing scored): False
            if row["outlier"]:
                outliers.add(z, row["id"])
            yield row

    if parquet:
        kinds = {name: ("int" if np.dtype(dtype).kind == "i" else "float")
                 for name, dtype in SCORE_COLUMNS + STATS_COLUMNS}
        schema = [("id", "str")] + [(c, kinds[c]) for c in columns] + [("outlier", "bool")]
        write_parquet(output, flagged_rows(), schema)
        os.unlink(rows_path)
    else:
        with atomic_output(output) as f:
            for row in flagged_rows():
                f.write(dump_row(row))
    return stats, outliers
