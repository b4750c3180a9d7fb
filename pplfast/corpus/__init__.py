"""Corpus scoring: :class:`CorpusScorer`, the figures of a run, and the one reader and writer.

- :mod:`~pplfast.corpus.scorer`: :class:`CorpusScorer`, per-document sums over batches of text;
- :mod:`~pplfast.corpus.run_stats`: :class:`RunStats` and :func:`robust_z`, the figures and
  outliers of a run;
- :mod:`~pplfast.corpus.io`: the one document reader (every command reads the same files the
  same way), :mod:`~pplfast.corpus.formats` its readers per kind of file,
  :mod:`~pplfast.corpus.ids` the id index;
- :mod:`~pplfast.corpus.writer`: the one atomic writer, the row appender, output checks and locks;
- :mod:`~pplfast.corpus.ray_data`: Ray Data (``pplfast.ray``), imported on its own.
"""
from ..models.loading import ModelLoadError
from .run_stats import RunStats, robust_z
from .scorer import SCORE_COLUMNS, STATS_COLUMNS, CorpusScorer

__all__ = ["SCORE_COLUMNS", "STATS_COLUMNS", "CorpusScorer", "ModelLoadError", "RunStats",
           "robust_z"]
