"""An lm-evaluation-harness model, ``pplfast``, that never builds the ``(batch, T, V)`` logits.

Importing this module registers the model name ``pplfast`` with lm-evaluation-harness
(``pip install "pplfast[lm-eval]"``). It is lm-eval's Hugging Face model (``HFLM``, same
``model_args``: ``pretrained=``, ``dtype=``, ``device=``, ``batch_size=``, ...) with one method
replaced: ``_loglikelihood_tokens``, behind both ``loglikelihood`` (multiple choice, ...) and
``loglikelihood_rolling`` (perplexity tasks; lm-eval batches the rolling windows of all requests
together). Per request, the model body gives the final hidden states and only the continuation's
rows reach the output layer, inside :func:`pplfast.linear_token_nll`: the log-likelihood is the
float64 sum of float32 per-token log-probabilities, and ``is_greedy`` compares each continuation
token with the argmax of its row, found over vocabulary tiles (never a full row of logits per
token of a batch). ``generate_until`` is HFLM's own. Models whose body and output layer pplfast
cannot use (the probe of :mod:`pplfast.hf` fails, or a seq2seq model) fall back to HFLM's code,
with a warning.

Inputs are built exactly as HFLM builds them (left truncation to ``max_length + 1`` tokens, the
last one dropped, right padding, no attention mask), so results equal HFLM's within float32
rounding.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from ._optional import require
from .api import linear_token_nll
from .hf import _PROBE, _call, _last_hidden, _model_head

_lm_eval = require("lm_eval", extra="lm-eval", feature="pplfast.lm_eval")
require("lm_eval.models.huggingface", extra="lm-eval", feature="pplfast.lm_eval")
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

MODEL_NAME = "pplfast"
_ARGMAX_TILE = 8192  # vocabulary entries per tile of the greedy check


def continuation_argmax(hidden: torch.Tensor, head) -> torch.Tensor:
    """Index of the largest logit of each row of ``hidden @ weight.T + bias`` (lowest index on
    ties), over vocabulary tiles of :data:`_ARGMAX_TILE` entries. Softcap and temperature are
    monotonic, so they do not move the argmax. ``hidden``: ``(n, D)``; returns ``(n,)`` int64."""
    weight, bias = head.weight, head.bias
    best = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    h = hidden.float()
    for v0 in range(0, weight.shape[0], _ARGMAX_TILE):
        z = h @ weight[v0 : v0 + _ARGMAX_TILE].float().T
        if bias is not None:
            z += bias[v0 : v0 + _ARGMAX_TILE].float()
        value, arg = z.max(dim=-1)
        better = value > best  # strict: an earlier tile wins ties, as torch.argmax does
        best = torch.where(better, value, best)
        index = torch.where(better, arg + v0, index)
    return index


@register_model(MODEL_NAME)
class PplfastLM(HFLM):
    """lm-eval's ``HFLM`` with log-likelihoods from pplfast's hidden-states path."""

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pplfast_backend = backend
        self._head = _PROBE  # found and probed on the first request

    def _pplfast_head(self, tokens: Sequence[int]):
        if self._head is _PROBE:
            if self.backend != "causal":
                self._head = None
                warnings.warn("pplfast: seq2seq models are scored by lm-eval's own HFLM code")
            else:
                with torch.no_grad():
                    self._head = _model_head(self.model, torch.tensor(list(tokens)[:16]))
                if self._head is None:
                    warnings.warn("pplfast: this model's body and output layer cannot be used; "
                                  "scoring with lm-eval's own HFLM code")
        return self._head

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: Optional[int] = None) -> List[Tuple[float, bool]]:
        if not requests:
            return []
        first = requests[0]
        head = self._pplfast_head(first[1] + first[2])
        if head is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 1)
        batch_size = max(1, int(batch_size))
        # longest first, as HFLM orders them: similar lengths share a batch, little padding
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc="pplfast loglikelihood")
        for b in range(0, len(order), batch_size):
            chunk = [requests[i] for i in order[b : b + batch_size]]
            for i, answer in zip(order[b : b + batch_size], self._score_chunk(chunk, head)):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results

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
        targets = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, (inp, cont) in enumerate(zip(inputs, conts)):
            ids[row, : len(inp)] = torch.tensor(inp)
            # the last len(cont) outputs predict the continuation
            targets[row, len(inp) - len(cont) : len(inp)] = torch.tensor(cont)
        ids = ids.to(self.device)
        with torch.no_grad():
            # right padding and no mask, as HFLM: real tokens never attend to the pads after them
            hidden = _last_hidden(_call(head.body, ids, None))
            keep = (targets != -100).to(hidden.device)
            rows = hidden[keep].to(device=head.weight.device, dtype=head.weight.dtype)
            flat_targets = targets[keep.cpu()].to(head.weight.device)
            nll = linear_token_nll(rows, head.weight, flat_targets, bias=head.bias,
                                   softcap=head.softcap, temperature=head.temperature,
                                   backend=self.pplfast_backend)
            scoring = [r for r in range(len(chunk)) if chunk[r][0] is not None]
            greedy = None
            if scoring:  # rolling windows (no request string) never use is_greedy
                greedy = continuation_argmax(rows, head) == flat_targets
        nll = nll.double().cpu()
        greedy = None if greedy is None else greedy.cpu()
        answers, offset = [], 0
        for row, cont in enumerate(conts):
            n = len(cont)
            logprob = -float(nll[offset : offset + n].sum())
            is_greedy = bool(greedy[offset : offset + n].all()) if greedy is not None else False
            answers.append((logprob, is_greedy))
            offset += n
        return answers
