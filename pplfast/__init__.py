"""pplfast: fused per-token NLL and perplexity that never build the vocabulary-sized tensor."""
from ._dispatch import BACKENDS, BackendUnavailableError
from .api import linear_perplexity, linear_token_nll, perplexity, token_nll
from .comparison import ComparisonResult, TokenComparison, compare, linear_compare
from .metric import Comparison, Perplexity, PerplexityResult
from .stats import TokenStats, linear_token_stats, token_stats
from .vocab_parallel import VocabShard
from .models import (DocumentScore, ScoreResult, TextScores, Window, compare_models,
                     make_windows, score_model, score_texts)
from .corpus import CorpusScorer
from . import reference  # the float64 oracle, pplfast.reference
from ._version import __version__

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Comparison",
    "ComparisonResult",
    "CorpusScorer",
    "DocumentScore",
    "Perplexity",
    "PerplexityResult",
    "ScoreResult",
    "TextScores",
    "TokenComparison",
    "TokenStats",
    "VocabShard",
    "Window",
    "compare",
    "compare_models",
    "linear_compare",
    "linear_perplexity",
    "linear_token_nll",
    "linear_token_stats",
    "make_windows",
    "perplexity",
    "score_model",
    "score_texts",
    "token_nll",
    "token_stats",
]
