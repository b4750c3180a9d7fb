"""Streaming perplexity: float64 sums that add up across batches, processes and documents.

The state is ten float64 sums, so ``merge`` is an addition and ``sync`` one ``all_reduce``:
sum of NLL, sum of squared NLL, scored tokens, bytes, words, and the tokens that came with byte
(word) counts, so a ratio over bytes is only reported when every token's bytes were counted; with
``stats=True`` updates, also the sum of entropies, the count of tokens whose argmax is the target,
and the tokens those two cover.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from . import _validate
from .api import linear_token_nll, token_nll
from .stats import linear_token_stats, token_stats

_STATE_SIZE = 10
_SUM_NLL, _SUM_SQ, _TOKENS, _BYTES, _WORDS, _TOKENS_W_BYTES, _TOKENS_W_WORDS = range(7)
_SUM_ENTROPY, _TOP1, _TOKENS_W_STATS = 7, 8, 9


@dataclass(frozen=True)
class PerplexityResult:
    """Corpus figures. NLL in nats; ``*_stderr`` from the per-token NLL variance.

    ``perplexity_stderr`` is llama.cpp's ``PPL +/-``: ``perplexity * mean_nll_stderr`` with
    ``mean_nll_stderr = sqrt((E[nll^2] - E[nll]^2) / (num_tokens - 1))``. The byte and word
    figures are ratios of sums over all documents (lm-evaluation-harness): ``bits_per_byte =
    sum(nll) / num_bytes / ln 2``, ``byte_perplexity = exp(sum(nll) / num_bytes)``,
    ``word_perplexity = exp(sum(nll) / num_words)``; None unless every update gave the counts.
    ``mean_entropy`` (nats) and ``top1_accuracy`` (fraction of scored tokens whose argmax is the
    target) cover the tokens of the ``stats=True`` updates; None when there were none.
    """

    perplexity: float
    mean_nll: float
    num_tokens: int
    sum_nll: float
    bits_per_token: float
    mean_nll_stderr: float
    perplexity_stderr: float
    num_bytes: Optional[int] = None
    num_words: Optional[int] = None
    bits_per_byte: Optional[float] = None
    byte_perplexity: Optional[float] = None
    word_perplexity: Optional[float] = None
    mean_entropy: Optional[float] = None
    top1_accuracy: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _count(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.sum().item()
    elif not isinstance(value, numbers.Real):
        try:
            value = sum(value)
        except TypeError:
            raise TypeError(f"{name} must be a count, a sequence of counts or a tensor, "
                            f"got {type(value).__name__}") from None
    if isinstance(value, bool) or value < 0 or value != int(value):
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    return int(value)


class Perplexity:
    """Accumulate per-token NLL over batches; ``compute()`` gives corpus perplexity and friends.

    Example::

        metric = pplfast.Perplexity()
        for batch in loader:
            logits = model(batch["input_ids"]).logits
            metric.update(logits, batch["input_ids"], shift=True)
        print(metric.compute().perplexity)

    Equivalent PyTorch: ``exp(cat(nll_per_batch).double().mean())`` over the scored tokens.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> "Perplexity":
        self._state = torch.zeros(_STATE_SIZE, dtype=torch.float64)
        self._global: Optional[torch.Tensor] = None  # the all-reduced state after sync()
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens scored so far (local to this process; after ``sync``, over all ranks)."""
        state = self._global if self._global is not None else self._state
        return int(state[_TOKENS].item())

    def update(self, logits: torch.Tensor, targets: torch.Tensor, *, num_bytes=None,
               num_words=None, stats: bool = False, **options):
        """Score a batch of logits and add it.

        Args:
            logits: ``(..., V)``; targets: ``(...)``; ``options`` as in :func:`pplfast.token_nll`
                (``ignore_index``, ``shift``, ``softcap``, ``temperature``, ``backend``).
            num_bytes, num_words: optional UTF-8 byte and word counts of the text these targets
                cover (an int, a sequence or a tensor of per-document counts, summed).
            stats: also collect the entropy and top-1 accuracy (one :func:`pplfast.token_stats`
                pass instead of ``token_nll``); ``compute()`` then reports ``mean_entropy`` and
                ``top1_accuracy``.

        Returns:
            The per-token NLL, float32, shaped like :func:`pplfast.token_nll`'s output; with
            ``stats=True`` the :class:`pplfast.TokenStats`.
        """
        if stats:
            result = token_stats(logits, targets, **options)
            self._add(result.nll, targets, options, num_bytes, num_words, result)
            return result
        nll = token_nll(logits, targets, **options)
        self._add(nll, targets, options, num_bytes, num_words)
        return nll

    def update_linear(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                      num_bytes=None, num_words=None, stats: bool = False, **options):
        """Like :meth:`update` from final hidden states ``(..., D)`` and the output layer
        ``weight`` ``(V, D)`` (``bias=`` among ``options``); see :func:`pplfast.linear_token_nll`
        (and :func:`pplfast.linear_token_stats` with ``stats=True``)."""
        if stats:
            result = linear_token_stats(hidden, weight, targets, **options)
            self._add(result.nll, targets, options, num_bytes, num_words, result)
            return result
        nll = linear_token_nll(hidden, weight, targets, **options)
        self._add(nll, targets, options, num_bytes, num_words)
        return nll

    def update_nll(self, nll: torch.Tensor, scored: Optional[torch.Tensor] = None, *,
                   num_bytes=None, num_words=None, stats=None, targets=None) -> None:
        """Add per-token NLL computed elsewhere; ``scored`` (bool, same shape) masks the tokens
        that count (default: all). Unscored entries are ignored whatever their value. ``stats``
        (a :class:`pplfast.TokenStats` aligned with ``nll``) and the ``targets`` it was computed
        for add the entropy and top-1 accuracy as ``update(..., stats=True)`` does."""
        if (stats is None) != (targets is None):
            raise ValueError("stats and targets go together: pass both or neither")
        if not isinstance(nll, torch.Tensor):
            raise TypeError(f"nll must be a floating-point tensor, got {type(nll).__name__}")
        if not nll.is_floating_point():
            raise TypeError(f"nll must be a floating-point tensor (per-token NLL in nats), got a "
                            f"{nll.dtype} tensor")
        if scored is None:
            scored = torch.ones(nll.shape, dtype=torch.bool, device=nll.device)
        elif scored.shape != nll.shape or scored.dtype != torch.bool:
            raise ValueError(
                f"scored must be a bool tensor of shape {tuple(nll.shape)}, got "
                f"{scored.dtype} {tuple(scored.shape)}"
            )
        self._accumulate(nll, scored, num_bytes, num_words, stats, targets)

    def _add(self, nll, targets, options, num_bytes, num_words, stats=None) -> None:
        if options.get("shift", False):
            targets = targets[..., 1:]
        scored = _validate.scored_mask(targets, options.get("ignore_index", -100))
        self._accumulate(nll, scored, num_bytes, num_words, stats, targets)

    def _accumulate(self, nll, scored, num_bytes, num_words, stats=None, targets=None) -> None:
        num_bytes = _count(num_bytes, "num_bytes")
        num_words = _count(num_words, "num_words")
        x = torch.where(scored, nll.double(), torch.zeros((), dtype=torch.float64, device=nll.device))
        tokens = scored.sum().double()
        zero = torch.zeros_like(tokens)
        # full_like fills on the device: no host-to-device copy (and no stream sync) per update
        update = torch.stack([
            x.sum(), (x * x).sum(), tokens,
            torch.full_like(tokens, num_bytes or 0), torch.full_like(tokens, num_words or 0),
            tokens if num_bytes is not None else zero,
            tokens if num_words is not None else zero,
            *self._stats_sums(stats, targets, scored, zero),
        ])
        # the state follows the device of the first update, so GPU updates never synchronise
        if self._state.device != nll.device and not bool(self._state.any()):
            self._state = self._state.to(nll.device)
        self._state = self._state + update.to(self._state.device)
        self._global = None

    @staticmethod
    def _stats_sums(stats, targets, scored, zero):
        if stats is None:
            return zero, zero, zero
        entropy = torch.where(scored, stats.entropy.double(), torch.zeros_like(zero))
        top1 = (scored & (stats.argmax == targets)).sum().double()
        return entropy.sum(), top1, scored.sum().double()

    def merge(self, other: "Perplexity") -> "Perplexity":
        """Add another metric's local sums into this one (e.g. from another shard); returns self."""
        if not isinstance(other, Perplexity):
            raise TypeError(f"other must be a Perplexity, got {type(other).__name__}")
        self._state = self._state + other._state.to(self._state.device)
        self._global = None
        return self

    def sync(self, group=None) -> "Perplexity":
        """All-reduce the float64 sums over ``torch.distributed`` (every rank must call it).

        ``compute()`` then reports the totals over all ranks until the next ``update``,
        ``merge`` or ``reset``; the local sums are kept, so calling ``sync`` twice is harmless.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync() needs an initialised torch.distributed process group")
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        total = self._state.to(device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        self._global = total
        return self

    def compute(self) -> PerplexityResult:
        """Corpus figures over everything added (after ``sync``: over all ranks).

        Raises:
            ValueError: no token has been scored.
        """
        state = (self._global if self._global is not None else self._state).cpu().tolist()
        n = state[_TOKENS]
        if n <= 0:
            raise ValueError(
                "Perplexity.compute() called with no scored tokens: call update() with at least "
                "one target that is not ignore_index first"
            )
        sum_nll = state[_SUM_NLL]
        mean = sum_nll / n
        if n > 1:
            var = max(state[_SUM_SQ] / n - mean * mean, 0.0)
            stderr = math.sqrt(var / (n - 1))
        else:
            stderr = math.nan
        ppl = safe_exp(mean)
        result = dict(
            perplexity=ppl, mean_nll=mean, num_tokens=int(n), sum_nll=sum_nll,
            bits_per_token=mean / math.log(2), mean_nll_stderr=stderr,
            perplexity_stderr=ppl * stderr,
        )
        if state[_TOKENS_W_BYTES] == n and state[_BYTES] > 0:
            nb = state[_BYTES]
            result.update(num_bytes=int(nb), bits_per_byte=sum_nll / nb / math.log(2),
                          byte_perplexity=safe_exp(sum_nll / nb))
        if state[_TOKENS_W_WORDS] == n and state[_WORDS] > 0:
            nw = state[_WORDS]
            result.update(num_words=int(nw), word_perplexity=safe_exp(sum_nll / nw))
        if state[_TOKENS_W_STATS] > 0:
            ns = state[_TOKENS_W_STATS]
            result.update(mean_entropy=state[_SUM_ENTROPY] / ns, top1_accuracy=state[_TOP1] / ns)
        return PerplexityResult(**result)


def safe_exp(x):
    """``exp(x)`` of a figure (perplexity from a mean NLL, ...): ``inf`` past exp's range instead
    of ``OverflowError`` (floats) or numpy's overflow warning (arrays). The package's one exp of
    a reported figure: a float gives a float, an array a float64 array."""
    if isinstance(x, np.ndarray):
        with np.errstate(over="ignore"):
            return np.exp(x.astype(np.float64, copy=False))
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
