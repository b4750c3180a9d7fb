"""Streaming metrics: :class:`Perplexity` and :class:`Comparison`, float64 sums that add up
across batches, processes and documents.

``Perplexity``'s state is ten float64 sums, so ``merge`` is an addition and ``sync`` one
``all_reduce``: sum of NLL, sum of squared NLL, scored tokens, bytes, words, and the tokens that
came with byte (word) counts, so a ratio over bytes is only reported when every token's bytes
were counted; with ``stats=True`` updates, also the sum of entropies, the count of tokens whose
argmax is the target, and the tokens those two cover. ``Comparison``'s state is twelve float64
sums plus, for the percentiles, each scored token's KL and Δp.

Updates read no tensor data on the host (no ``.item()``, no boolean-mask indexing), so an eval
step that calls ``Perplexity.update`` or ``Comparison.update`` compiles with
``torch.compile(fullgraph=True)``. :func:`safe_exp` is the package's one exp of a reported
figure.

Tensor parallel x data parallel: with the vocabulary split (``vocab_shard=`` or a
vocabulary-sharded DTensor in the updates), every rank of a vocabulary group scores the same rows
and holds the same sums. ``sync(group)`` counts each row once: of the ranks of ``group`` that
share a vocabulary group, only the first (lowest global rank) adds its sums and per-token values;
the others add zeros. So ``sync()`` over the whole world and ``sync(dp_group)`` (one rank per
vocabulary group) give the same totals (:func:`counts_here`; docs/vocab_parallel.md).
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional

import torch

from . import _validate
from ._metric_sums import comparison_sums, perplexity_sums
from ._metric_sync import all_gather_rows, all_reduce_sums, counts_here, noted_group
from ._results import ComparisonResult, PerplexityResult, TokenComparison
from ._summary import COMPARISON_SUMS, TOKENS, comparison_statistics, safe_exp
from .api import linear_token_nll, token_nll
from .comparison import compare, linear_compare
from .stats import linear_token_stats, token_stats
from .vocab_parallel import local, vocab_group

__all__ = ["Comparison", "ComparisonResult", "Perplexity", "PerplexityResult", "safe_exp"]

_STATE_SIZE = 10
_SUM_NLL, _SUM_SQ, _TOKENS, _BYTES, _WORDS, _TOKENS_W_BYTES, _TOKENS_W_WORDS = range(7)
_SUM_ENTROPY, _TOP1, _TOKENS_W_STATS = 7, 8, 9


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
        self._placed = False  # the state moves to the device of the first update
        self._global: Optional[torch.Tensor] = None  # the all-reduced state after sync()
        self._vocab_group = None  # the process group the updates split the vocabulary over
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
        self._vocab_group = noted_group(self._vocab_group,
                                   vocab_group(logits, options.get("vocab_shard"), -1))
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
        self._vocab_group = noted_group(self._vocab_group,
                                   vocab_group(weight, options.get("vocab_shard"), 0))
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
        targets = local(targets)
        if options.get("shift", False):
            targets = targets[..., 1:]
        scored = _validate.scored_mask(targets, options.get("ignore_index", -100))
        self._accumulate(nll, scored, num_bytes, num_words, stats, targets)

    def _accumulate(self, nll, scored, num_bytes, num_words, stats=None, targets=None) -> None:
        num_bytes = _count(num_bytes, "num_bytes")
        num_words = _count(num_words, "num_words")
        if stats is None:
            sums = perplexity_sums(nll, scored, None, None, None)
        else:
            sums = perplexity_sums(nll, scored, stats.entropy, stats.argmax, targets)
        tokens = sums[2]
        zero = torch.zeros_like(tokens)
        # full_like fills on the device: no host-to-device copy (and no stream sync) per update
        update = torch.stack([
            sums[0], sums[1], tokens,
            torch.full_like(tokens, num_bytes or 0), torch.full_like(tokens, num_words or 0),
            tokens if num_bytes is not None else zero,
            tokens if num_words is not None else zero,
            sums[3], sums[4], sums[5],
        ])
        # the state follows the device of the first update, so GPU updates never synchronise
        if not self._placed:
            self._state, self._placed = self._state.to(nll.device), True
        self._state = self._state + update.to(self._state.device)
        self._global = None

    def merge(self, other: "Perplexity") -> "Perplexity":
        """Add another metric's local sums into this one (e.g. from another shard); returns self."""
        if not isinstance(other, Perplexity):
            raise TypeError(f"other must be a Perplexity, got {type(other).__name__}")
        self._placed = True
        self._state = self._state + other._state.to(self._state.device)
        self._global = None
        self._vocab_group = noted_group(self._vocab_group, other._vocab_group)
        return self

    def sync(self, group=None, *, vocab_group=None) -> "Perplexity":
        """All-reduce the float64 sums over ``torch.distributed`` (every rank must call it).

        ``compute()`` then reports the totals over all ranks until the next ``update``,
        ``merge`` or ``reset``; the local sums are kept, so calling ``sync`` twice is harmless.
        With the vocabulary split across ranks (the updates' ``vocab_shard`` or DTensor, or
        ``vocab_group`` here), each row counts once: see the module notes.
        """
        state = self._state
        if not counts_here(group, self._vocab_group if vocab_group is None else vocab_group):
            state = torch.zeros_like(state)
        self._global = all_reduce_sums(state, group)
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


class Comparison:
    """Streaming comparison of a base and a test model over batches (and ranks).

    Example::

        metric = pplfast.Comparison()
        for batch in loader:
            metric.update(base(batch).logits, test(batch).logits, batch, shift=True)
        print(metric.compute().kl_mean)

    The state is twelve float64 sums plus, for the percentiles, every token's KL and Δp as
    float32 on the host with its scored mask (9 bytes per token; the unscored ones are dropped
    when the values are read); ``merge`` and ``sync`` carry both.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> "Comparison":
        self._sums = torch.zeros(COMPARISON_SUMS, dtype=torch.float64)
        self._tokens: List[tuple] = []  # (kl, delta_p, scored), flat, per update
        self._global = None  # (sums, kl, dp) over all ranks after sync()
        self._vocab_group = None  # the process group the updates split the vocabulary over
        return self

    @property
    def num_tokens(self) -> int:
        sums = self._global[0] if self._global is not None else self._sums
        return int(sums[TOKENS].item())

    def update(self, logits_base: torch.Tensor, logits_test: torch.Tensor,
               targets: torch.Tensor, **options) -> TokenComparison:
        """:func:`pplfast.compare` of a batch, added; returns its :class:`TokenComparison`."""
        self._vocab_group = noted_group(self._vocab_group,
                                   vocab_group(logits_base, options.get("vocab_shard"), -1))
        result = compare(logits_base, logits_test, targets, **options)
        self.update_tokens(result, targets, ignore_index=options.get("ignore_index", -100),
                           shift=options.get("shift", False))
        return result

    def update_linear(self, hidden_base: torch.Tensor, weight_base: torch.Tensor,
                      hidden_test: torch.Tensor, weight_test: torch.Tensor,
                      targets: torch.Tensor, **options) -> TokenComparison:
        """:func:`pplfast.linear_compare` of a batch, added; returns its comparison."""
        self._vocab_group = noted_group(self._vocab_group,
                                   vocab_group(weight_base, options.get("vocab_shard"), 0))
        result = linear_compare(hidden_base, weight_base, hidden_test, weight_test, targets,
                                **options)
        self.update_tokens(result, targets, ignore_index=options.get("ignore_index", -100),
                           shift=options.get("shift", False))
        return result

    def update_tokens(self, comparison: TokenComparison, targets: Optional[torch.Tensor] = None,
                      *, ignore_index: int = -100, shift: bool = False,
                      scored: Optional[torch.Tensor] = None) -> None:
        """Add a :class:`TokenComparison` computed elsewhere. The scored tokens are those whose
        target is not ``ignore_index`` (``targets`` as passed to ``compare``, with ``shift``), or
        the ``scored`` bool mask, or all of them."""
        if not isinstance(comparison, TokenComparison):
            raise TypeError(f"comparison must be a TokenComparison, got "
                            f"{type(comparison).__name__}")
        shape = tuple(comparison.kl.shape)
        if scored is None:
            if targets is None:
                scored = torch.ones(shape, dtype=torch.bool, device=comparison.kl.device)
            else:
                targets = local(targets)
                _validate.target_tensor(targets)
                if shift:
                    targets = targets[..., 1:]
                if tuple(targets.shape) != shape:
                    raise ValueError(f"targets has shape {tuple(targets.shape)} (after shift) but "
                                     f"the comparison has shape {shape}")
                scored = _validate.scored_mask(targets, ignore_index)
        elif scored.dtype != torch.bool or tuple(scored.shape) != shape:
            raise ValueError(f"scored must be a bool tensor of shape {shape}, got "
                             f"{scored.dtype} {tuple(scored.shape)}")
        scored = scored.to(comparison.kl.device).reshape(-1)
        update, kl, dp = comparison_sums(
            comparison.nll_test.reshape(-1), comparison.nll_base.reshape(-1),
            comparison.kl.reshape(-1), comparison.argmax_base.reshape(-1),
            comparison.argmax_test.reshape(-1), scored)
        self._sums = self._sums + update.cpu()
        self._tokens.append((kl.cpu(), dp.cpu(), scored.cpu()))
        self._global = None

    def _values(self):
        """``(2, n)`` float32: the KL and Δp of the scored tokens added here."""
        if not self._tokens:
            return torch.zeros(2, 0, dtype=torch.float32)
        kl, dp, scored = (torch.cat(x) for x in zip(*self._tokens))
        return torch.stack([kl[scored], dp[scored]])

    def merge(self, other: "Comparison") -> "Comparison":
        """Add another metric's local state (sums and per-token values); returns self."""
        if not isinstance(other, Comparison):
            raise TypeError(f"other must be a Comparison, got {type(other).__name__}")
        self._sums = self._sums + other._sums
        self._tokens.extend(other._tokens)
        self._global = None
        self._vocab_group = noted_group(self._vocab_group, other._vocab_group)
        return self

    def sync(self, group=None, *, vocab_group=None) -> "Comparison":
        """All-reduce the sums and all-gather the per-token KL and Δp over ``torch.distributed``
        (every rank must call it); ``compute()`` then reports all ranks until the next change.
        With the vocabulary split across ranks, each row counts once (module notes)."""
        sums, values = self._sums, self._values()
        if not counts_here(group, self._vocab_group if vocab_group is None else vocab_group):
            sums, values = torch.zeros_like(sums), values[:, :0]
        sums = all_reduce_sums(sums, group)
        values = all_gather_rows(values, group)
        self._global = (sums, values[0], values[1])
        return self

    def compute(self) -> ComparisonResult:
        """llama.cpp's statistics over everything added (after ``sync``: over all ranks).

        Raises:
            ValueError: no token has been scored.
        """
        if self._global is not None:
            sums, kl, dp = self._global
        else:
            sums, (kl, dp) = self._sums, self._values()
        if sums[TOKENS] <= 0:
            raise ValueError("Comparison.compute() called with no scored tokens: call update() "
                             "with at least one target that is not ignore_index first")
        return comparison_statistics(sums, kl, dp)
