"""Window schedules for scoring texts longer than a model's context: pure index arithmetic.

A schedule is a list of :class:`Window` over a *stream* of token positions. The model is fed
``stream[start : stop - 1]`` (at most ``window`` tokens); the output at stream position ``p``
predicts ``stream[p + 1]``; the targets at positions ``score_start .. stop - 1`` are scored.
Every schedule scores each of its targets exactly once.

- ``"sliding"`` (the Hugging Face perplexity guide): windows cover ``window`` tokens and start
  every ``stride`` tokens; each token is scored in the first window that holds it, which is the
  window giving it the longest left context. Token 0 has no context and is not scored.
- ``"rolling"`` (lm-evaluation-harness ``loglikelihood_rolling``): the stream is
  ``[prefix_token] + tokens``, so stream position ``p`` is token ``p - 1``. Windows predict
  disjoint runs of ``window`` tokens, every token exactly once, the first from the prefix; the
  last window is slid back to a full ``window`` of context.
- ``"chunks"``: disjoint chunks of ``window`` tokens, each scored on its own; the first token of
  every chunk is not scored.
- ``"llamacpp"`` (llama.cpp's ``llama-perplexity``): ``num_tokens // window`` disjoint chunks of
  ``window`` tokens (the tail dropped); in each, only the predictions of tokens
  ``window // 2 + 1 .. window - 1`` are scored, so every scored token has at least half a window
  of context. Fewer than ``2 * window`` tokens is an error, as there. (llama.cpp also replaces
  each chunk's first input token by BOS; that is the runner's job, :mod:`pplfast.models.runner`.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

MODES = ("sliding", "rolling", "chunks", "llamacpp")


@dataclass(frozen=True)
class Window:
    """Feed ``stream[start : stop - 1]``; score the targets at ``stream[score_start : stop]``."""

    start: int
    stop: int
    score_start: int

    @property
    def input_length(self) -> int:
        """Number of tokens fed to the model."""
        return self.stop - 1 - self.start

    @property
    def num_scored(self) -> int:
        return self.stop - self.score_start


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def sliding_windows(num_tokens: int, window: int, stride: int) -> List[Window]:
    """Windows of ``window`` tokens every ``stride`` tokens; tokens ``1 .. num_tokens - 1`` scored.

    Equals the Hugging Face guide's loop: for ``begin`` in ``range(0, num_tokens, stride)``,
    ``end = min(begin + window, num_tokens)``, score the tokens from the previous ``end`` (or 1)
    to ``end``; stop once ``end == num_tokens``. Needs ``1 <= stride < window`` so that no
    token falls on a window's first position unscored.
    """
    _check_int("num_tokens", num_tokens, 0)
    _check_int("window", window, 2)
    _check_int("stride", stride, 1)
    if stride >= window:
        raise ValueError(
            f"sliding windows need stride < window (got stride={stride}, window={window}): "
            "otherwise the first token of each window is never scored; use mode='chunks' "
            "for disjoint windows"
        )
    out: List[Window] = []
    prev_end = 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        if end > prev_end:
            out.append(Window(begin, end, prev_end))
            prev_end = end
        if end == num_tokens:
            break
    return out


def rolling_windows(num_tokens: int, window: int) -> List[Window]:
    """lm-evaluation-harness rolling windows over the stream ``[prefix] + tokens``.

    Equals ``get_rolling_token_windows(tokens, prefix, max_seq_len=window, context_len=1)``
    followed by ``make_disjoint_window``: all ``num_tokens`` tokens (stream positions
    ``1 .. num_tokens``) are scored once.
    """
    _check_int("num_tokens", num_tokens, 0)
    _check_int("window", window, 1)
    out: List[Window] = []
    if num_tokens == 0:
        return out
    first = min(window, num_tokens)
    out.append(Window(0, first + 1, 1))
    predicted = first
    while predicted < num_tokens:
        run = min(num_tokens - predicted, window)
        end = predicted + run  # in token coordinates; stream position end is token end - 1
        out.append(Window(end - window, end + 1, predicted + 1))
        predicted = end
    return out


def chunk_windows(num_tokens: int, window: int) -> List[Window]:
    """Disjoint chunks ``[k * window, (k + 1) * window)``, each scored without outside context."""
    _check_int("num_tokens", num_tokens, 0)
    _check_int("window", window, 1)
    return [
        Window(begin, min(begin + window, num_tokens), begin + 1)
        for begin in range(0, num_tokens, window)
        if min(begin + window, num_tokens) > begin + 1
    ]


def llamacpp_windows(num_tokens: int, window: int) -> List[Window]:
    """llama.cpp's perplexity schedule (``tools/perplexity/perplexity.cpp``, ``perplexity()``):
    chunk ``k`` covers tokens ``[k * window, (k + 1) * window)`` and scores the tokens from
    ``k * window + window // 2 + 1`` to the chunk's end."""
    _check_int("num_tokens", num_tokens, 0)
    _check_int("window", window, 4)
    if num_tokens < 2 * window:
        raise ValueError(
            f"mode='llamacpp' needs at least 2 * window = {2 * window} tokens, got {num_tokens} "
            "(as llama-perplexity: use a smaller window or more text)"
        )
    return [Window(k * window, (k + 1) * window, k * window + window // 2 + 1)
            for k in range(num_tokens // window)]


def make_windows(num_tokens: int, *, window: Optional[int] = None, stride: Optional[int] = None,
                 mode: str = "sliding") -> List[Window]:
    """The schedule for one document of ``num_tokens`` tokens.

    Args:
        num_tokens: document length in tokens.
        window: most tokens fed to the model at once; None means the whole document in one
            window (for ``"rolling"`` that is ``num_tokens``, for the others ``num_tokens``
            tokens covered).
        stride: ``"sliding"`` only: tokens between window starts; default ``window // 2``.
        mode: ``"sliding"``, ``"rolling"``, ``"chunks"`` or ``"llamacpp"`` (needs a window).

    Returns:
        A list of :class:`Window`. For ``"rolling"`` positions index ``[prefix] + tokens``; for
        the others they index the tokens.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_int("num_tokens", num_tokens, 0)
    if stride is not None and mode != "sliding":
        raise ValueError(f"stride applies to mode='sliding' only, got stride={stride} with mode={mode!r}")
    if window is None:
        if mode == "llamacpp":
            raise ValueError("mode='llamacpp' needs a window (llama.cpp's context size, -c)")
        if stride is not None:
            raise ValueError(f"stride needs a window: got stride={stride} with window=None "
                             "(the whole document in one window)")
        if mode == "rolling":
            return rolling_windows(num_tokens, max(num_tokens, 1))
        whole = max(num_tokens, 2)
        if mode == "sliding":
            return sliding_windows(num_tokens, whole, whole - 1)
        return chunk_windows(num_tokens, whole)
    if mode == "sliding":
        _check_int("window", window, 2)
        return sliding_windows(num_tokens, window, window // 2 if stride is None else stride)
    if mode == "rolling":
        return rolling_windows(num_tokens, window)
    if mode == "llamacpp":
        return llamacpp_windows(num_tokens, window)
    return chunk_windows(num_tokens, window)
