"""An lm-evaluation-harness model, ``pplfast``, that never builds the ``(batch, T, V)`` logits.

Importing this module registers the model name ``pplfast`` with lm-evaluation-harness
(``pip install "pplfast[lm-eval]"``, lm-eval 0.4.10 or later). It is lm-eval's Hugging Face
model (``HFLM``, same ``model_args``: ``pretrained=``, ``dtype=``, ``device=``, ``batch_size=``,
``backend=`` (its model type), ...) plus ``pplfast_backend=`` (pplfast's kernel backend, default
``auto``), with ``_loglikelihood_tokens`` replaced: it is behind both ``loglikelihood`` (multiple
choice, ...) and ``loglikelihood_rolling`` (perplexity tasks; lm-eval batches the rolling windows
of all requests together). Per request, the model body gives the final hidden states and only
the continuation's rows reach the output layer, inside one call of
:func:`pplfast.linear_token_stats` (``top_k=0``): the log-likelihood is the float64 sum of its
float32 per-token NLL (``linear_token_nll``'s numbers), and ``is_greedy`` compares each
continuation token with its ``argmax`` from the same pass. Rolling windows, which never use
``is_greedy``, go through :func:`pplfast.linear_token_nll`. ``generate_until`` is HFLM's own.
Models whose body and output layer pplfast cannot use (the probe of :mod:`pplfast.models.head`
fails, or a seq2seq model) fall back to HFLM's code, with a warning.

``batch_size=auto`` (and ``auto:N``) is sized as HFLM sizes it (accelerate's
``find_executable_batch_size``, from ``max_batch_size`` down on out-of-memory errors, again at
the start of each of N runs of the longest-first requests), but by trying pplfast's own pass (the
body and the output layer over every position of a full batch) instead of the ``(batch, T, V)``
logits and their log-softmax: the batch found is as large as pplfast's memory allows.

Inputs are built exactly as HFLM builds them (left truncation to ``max_length + 1`` tokens, the
last one dropped, right padding, no attention mask), so results equal HFLM's within float32
rounding.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .._optional import require
from ..api import BACKENDS, linear_token_nll
from ..stats import linear_token_stats
from .head import PROBE, model_head, scored_hidden
from .loading import ModelLoadError, first_line
from .runner import IGNORE

_lm_eval = require("lm_eval", extra="lm-eval", feature="the lm-eval model (pplfast.lm_eval)")
require("lm_eval.models.huggingface", extra="lm-eval", feature="the lm-eval model (pplfast.lm_eval)")
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

MODEL_NAME = "pplfast"
_HFLM_BACKENDS = ("default", "causal", "seq2seq")  # HFLM's own backend= (the model type)
_AUTO_PASSES = 2  # passes per size tried by batch_size=auto: a second one meets fragmentation
_log = logging.getLogger(__name__)


def check_backends(pplfast_backend="auto", backend="default") -> None:
    """ValueError naming the argument for a ``pplfast_backend=`` that is not pplfast's, or a
    pplfast backend given as HFLM's ``backend=`` (the model type)."""
    if pplfast_backend not in BACKENDS:
        raise ValueError(f"pplfast_backend must be one of {BACKENDS}, got {pplfast_backend!r}")
    if backend not in _HFLM_BACKENDS and backend in BACKENDS:
        raise ValueError(f"backend={backend!r}: backend= is lm-eval's model type "
                         f"{_HFLM_BACKENDS}; pplfast's kernel backend is "
                         f"pplfast_backend={backend}")


@register_model(MODEL_NAME)
class PplfastLM(HFLM):
    """lm-eval's ``HFLM`` with log-likelihoods from pplfast's hidden-states path.

    Args:
        pplfast_backend: pplfast's kernel backend (``auto``, ``cpu``, ``triton``, ``cuda``,
            ``reference``), passed to :func:`pplfast.linear_token_stats` /
            :func:`pplfast.linear_token_nll`.
        *args, **kwargs: HFLM's, unchanged (``backend=`` is HFLM's model type: ``default``,
            ``causal`` or ``seq2seq``).
    """

    def __init__(self, *args, pplfast_backend: str = "auto", **kwargs) -> None:
        check_backends(pplfast_backend, kwargs.get("backend", "default"))
        try:
            super().__init__(*args, **kwargs)
        except OSError as exc:  # no such model on the hub, the hub unreachable, ...
            pretrained = kwargs.get("pretrained", args[0] if args else None)
            raise ModelLoadError(f"cannot load model {str(pretrained)!r}: "
                                 f"{first_line(exc)}") from exc
        self.pplfast_backend = pplfast_backend
        self._head = PROBE  # found and probed on the first request
        self._auto_batch_sizes = {}  # batch_size=auto: input length -> rows per pass

    def _pplfast_head(self, tokens: Sequence[int]):
        if self._head is PROBE:
            if self.backend != "causal":
                self._head = None
                warnings.warn("pplfast: seq2seq models are scored by lm-eval's own HFLM code")
            else:
                with torch.no_grad():
                    self._head = model_head(self.model, torch.tensor(list(tokens)[:16]))
                if self._head is None:
                    warnings.warn("pplfast: this model's body and output layer cannot be used; "
                                  "scoring with lm-eval's own HFLM code")
        return self._head

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        if self.batch_size != "auto" or not requests:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        text = requests[0].args[0]
        head = self._pplfast_head([self.prefix_token_id, *self.tok_encode(text[:256])])
        if head is None:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        # HFLM would size its batch of full windows by their (batch, T, V) logits: size it by
        # pplfast's pass, for the length of those windows
        auto = self.batch_size_per_gpu
        self.batch_size_per_gpu = self._auto_batch_size(head, self.max_length)
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self.batch_size_per_gpu = auto

    def _input_length(self, request) -> int:
        _, context_enc, continuation_enc = request
        return len((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])

    def _auto_batch_size(self, head, length: int) -> int:
        """Most rows of ``length`` tokens one pass fits: accelerate's
        ``find_executable_batch_size`` from ``max_batch_size`` down, as HFLM, each size tried on
        pplfast's own pass (the body, then the output layer over every position)."""
        length = max(1, min(int(length), self.max_length))
        if length in self._auto_batch_sizes:
            return self._auto_batch_sizes[length]
        from accelerate import find_executable_batch_size

        @find_executable_batch_size(starting_batch_size=int(self.max_batch_size or 64))
        def fits(batch_size: int) -> int:
            ids = torch.ones((batch_size, length), dtype=torch.long)
            for _ in range(_AUTO_PASSES):
                self._score_positions(head, ids, ids, greedy=True)
            return batch_size

        try:
            size = fits()
        except RuntimeError as exc:
            if "No executable batch size found" not in str(exc):
                raise
            size = 1
        if self.world_size > 1 and torch.distributed.is_initialized():
            # every rank runs the same batches: the smallest size found wins
            smallest = torch.tensor([size], device=self.device)
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
            size = int(smallest)
        _log.info("pplfast: batch_size=auto: %d rows of %d tokens per pass", size, length)
        self._auto_batch_sizes[length] = size
        return size

    def _rows_per_pass(self, head, requests, order, pos, override_bs, runs) -> int:
        if override_bs:
            return int(override_bs)
        if self.batch_size != "auto":
            return max(1, int(self.batch_size))
        # auto:N, as HFLM: sized again at the start of each of N runs of the requests (longest
        # first, so the first request of a run is its longest)
        run = pos // max(1, int(len(order) / self.batch_schedule))
        if run not in runs:
            runs[run] = self._auto_batch_size(head, self._input_length(requests[order[pos]]))
        return runs[run]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> List[Tuple[float, bool]]:
        if not requests:
            return []
        first = requests[0]
        head = self._pplfast_head(first[1] + first[2])
        if head is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        # longest first, as HFLM orders them: similar lengths share a batch, little padding
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="pplfast loglikelihood")
        pos, runs = 0, {}
        while pos < len(order):
            batch = order[pos : pos + self._rows_per_pass(head, requests, order, pos,
                                                          override_bs, runs)]
            for i, answer in zip(batch, self._score_chunk([requests[i] for i in batch], head)):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
            pos += len(batch)
        bar.close()
        return results

    def _score_positions(self, head, ids: torch.Tensor, targets: torch.Tensor, greedy: bool):
        """One pass over right-padded ``ids`` (no attention mask, as HFLM): float32 NLL of the
        positions whose target is not ignored (row-major), and with ``greedy`` whether each
        target is its row's argmax (else None), both from one call of pplfast's op."""
        with torch.no_grad():
            keep = targets != IGNORE
            rows = scored_hidden(head, ids.to(self.device), None, keep)
            flat_targets = targets[keep].to(head.weight.device)
            options = head.op_options(self.pplfast_backend)
            if not greedy:
                return linear_token_nll(rows, head.weight, flat_targets, **options), None
            stats = linear_token_stats(rows, head.weight, flat_targets, top_k=0, **options)
            return stats.nll, stats.argmax == flat_targets

    def _score_chunk(self, chunk, head) -> List[Tuple[float, bool]]:
        inputs, conts = [], []
        for _, context_enc, continuation_enc in chunk:
            if not context_enc or not continuation_enc:
                raise ValueError("pplfast: a request has an empty context or continuation")
            # as HFLM: truncate from the left to max_length + 1 tokens, drop the last one
            inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
            conts.append(continuation_enc)
        length = max(len(x) for x in inputs)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
        for row, (inp, cont) in enumerate(zip(inputs, conts)):
            ids[row, : len(inp)] = torch.tensor(inp)
            # the last len(cont) outputs predict the continuation
            targets[row, len(inp) - len(cont) : len(inp)] = torch.tensor(cont)
        # rolling windows (no request string) never use is_greedy
        greedy_wanted = any(request[0] is not None for request in chunk)
        nll, greedy = self._score_positions(head, ids, targets, greedy_wanted)
        nll = nll.double().cpu()
        greedy = None if greedy is None else greedy.cpu()
        answers, offset = [], 0
        for cont in conts:
            n = len(cont)
            logprob = -float(nll[offset : offset + n].sum())
            is_greedy = bool(greedy[offset : offset + n].all()) if greedy is not None else False
            answers.append((logprob, is_greedy))
            offset += n
        return answers
