"""pplfast: fused per-token NLL and perplexity that never build the vocabulary-sized tensor."""
from ._dispatch import BACKENDS, BackendUnavailableError
from .api import linear_perplexity, linear_token_nll, perplexity, token_nll

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "linear_perplexity",
    "linear_token_nll",
    "perplexity",
    "token_nll",
]
