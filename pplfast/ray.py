"""``pplfast.ray``: Ray Data integration at the path docs/corpus.md names; it lives in
:mod:`pplfast.corpus.ray_data`."""
from .corpus.ray_data import add_outlier_flags, check_model, read_corpus, score_dataset

__all__ = ["add_outlier_flags", "check_model", "read_corpus", "score_dataset"]
