"""The server's one adapter to pplfast's model-scoring internals.

Everything the server needs from a causal LM goes through this module: loading (pplfast's one
loader), the body and output layer (the head of :mod:`pplfast.hf`, probed against the model's
own logits), the window schedules of ``score_model``, and the fused ops that turn final hidden
states into NLL and statistics (:func:`pplfast.linear_token_stats`,
:func:`pplfast.linear_token_nll`, :func:`pplfast.linear_compare`). No ``(tokens, V)`` logits
tensor is ever built: a model whose body and output layer pplfast cannot use is refused at start.

At load, one more probe decides whether the model can score prefix trees
(:mod:`pplfast.serve.packing`): the body on ``[prefix, suffix_a, suffix_b]`` with explicit
position ids and a 4-D mask (boolean, else additive in the model's dtype) must give the hidden
states of ``prefix + suffix_a`` and ``prefix + suffix_b`` run alone. Where it does not (an
attention implementation without custom masks, positions taken from the mask), shared prefixes
are run once per sequence, as any other row.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..api import linear_token_nll
from ..comparison import TokenComparison, linear_compare
from ..models.head import context_length as _context_length
from ..models.head import last_hidden as _last_hidden
from ..models.head import llamacpp_bos as _llamacpp_bos
from ..models.head import model_device as _model_device
from ..models.head import model_head as _model_head
from ..models.head import prefix_id as _prefix_id
from ..models.head import text_config as _text_config
from ..models.head import vocab_size
from ..models.loading import ModelLoadError, first_line, load_model
from ..models.runner import schedules as _schedules
from ..models.text import Tokens, scored_text_counts, tokenize
from ..metric import Comparison
from ..stats import linear_token_stats
from .packing import Pass, pass_inputs, pass_reads, scatter_results

TREE_MIN_SHARED = 8  # shared tokens worth a tree row
TREE_MAX_ROW = 2048  # longest tree row: its 4-D mask is row² bytes (bool) or 4·row² (float32)
_STAT_FIELDS = ("nll", "entropy", "max_logprob", "argmax", "rank", "top_k_ids", "top_k_logprobs")
_COMPARE_FIELDS = ("kl", "kl_reverse", "nll_base", "nll_test", "argmax_base", "argmax_test")


@dataclass
class TreeSupport:
    """How a model takes prefix trees: the 4-D mask dtype, and the longest tree row."""

    mask_dtype: torch.dtype
    max_row: int


class ModelEngine:
    """One served causal LM: its tokenizer, head and limits, and the passes run on it.

    ``run`` and ``run_compare`` are called from the model's one scoring thread; the rest is
    read-only after construction but for the cache of token texts.
    """

    def __init__(self, name: str, model, tokenizer, *, backend: str = "auto",
                 trees: bool = True) -> None:
        self.name, self.model, self.tokenizer, self.backend = name, model, tokenizer, backend
        self.vocab_size = vocab_size(model)
        self.context = _context_length(model)
        self.device = _model_device(model)
        probe = torch.arange(3, 3 + 16) % max(1, self.vocab_size)
        with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.head = _model_head(model, probe)
        if self.head is None:
            why = "; ".join(str(w.message) for w in caught) or "no separate body and output layer"
            raise ModelLoadError(f"model {name!r}: pplfast cannot score it without building its "
                                 f"logits ({why}); the server only scores through the fused head")
        self.tree = _probe_trees(self.head.body, model, self.vocab_size) if trees else None
        self._use_cache = _accepts_use_cache(self.head.body)
        self._texts: Dict[int, str] = {}
        # one tokenizer call at a time: a fast tokenizer used from several threads can raise
        # "Already borrowed" when a call changes its truncation or padding state
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, name: str, path: str, *, device: torch.device, dtype: str = "auto",
             backend: str = "auto", trees: bool = True) -> "ModelEngine":
        model, tokenizer = load_model(path, device=device, dtype=dtype)
        return cls(name, model, tokenizer, backend=backend, trees=trees)

    # ------------------------------------------------------------------ tokens and text

    def token_texts(self, ids) -> List[str]:
        """Each token decoded on its own (cached per id)."""
        ids = [int(i) for i in ids]
        missing = sorted({i for i in ids if i not in self._texts})
        if missing:
            with self._tokenizer_lock:
                texts = self.tokenizer.batch_decode([[i] for i in missing])
            self._texts.update(zip(missing, texts))
        return [self._texts[i] for i in ids]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> List[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> Tokens:
        """``text``'s token ids and where each token ends in it (see pplfast.models.text)."""
        with self._tokenizer_lock:
            return tokenize(self.tokenizer, text, add_special_tokens=add_special_tokens)

    def scored_counts(self, text: str, ids: List[int], ends, scored: torch.Tensor) -> tuple:
        """``(bytes, words)`` of the part of ``text`` the scored tokens cover, as
        :func:`pplfast.score_texts` counts them."""
        tokens = Tokens(torch.tensor(ids, dtype=torch.long), ends)
        with self._tokenizer_lock:
            return scored_text_counts(text, tokens, scored, self.tokenizer)

    def decode(self, ids) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode([int(i) for i in ids])

    def special_token(self, name: str) -> Optional[str]:
        value = getattr(self.tokenizer, name, None)
        return value if isinstance(value, str) else None

    def prefix_token_id(self) -> int:
        """The token rolling windows predict the first token from (BOS, else EOS)."""
        return _prefix_id(self.model, self.tokenizer, None)

    def llamacpp_first_token(self) -> Optional[int]:
        return _llamacpp_bos(self.model, self.tokenizer, None)

    def schedule(self, length: int, *, window: Optional[int], stride: Optional[int],
                 mode: str) -> list:
        """``score_model``'s windows (``Window`` objects) for one document of ``length`` tokens
        (for ``rolling``, positions index ``[prefix] + tokens``); ValueError for bad options."""
        return _schedules([length], window, stride, mode, self.model)[0]

    @property
    def model_type(self) -> str:
        return str(getattr(_text_config(self.model), "model_type", "") or "")

    @property
    def transform(self):
        return self.head.softcap, self.head.temperature

    # ------------------------------------------------------------------ passes

    def hidden(self, p: Pass, reads_index: List[torch.Tensor]) -> List[torch.Tensor]:
        """The body over pass ``p``; the final hidden states of each flat index list, on the
        output layer's device and in its dtype."""
        inputs = pass_inputs(p, self.tree.mask_dtype if self.tree else None)
        kwargs = {"input_ids": inputs.ids.to(self.device)}
        mask = inputs.attention_mask
        if mask is not None and (mask.ndim == 4 or self.head.pad_mask):
            kwargs["attention_mask"] = mask.to(self.device)
        if inputs.position_ids is not None:
            kwargs["position_ids"] = inputs.position_ids.to(self.device)
        if self._use_cache:
            kwargs["use_cache"] = False
        hidden = _last_hidden(self.head.body(**kwargs))
        flat = hidden.reshape(-1, hidden.shape[-1])
        weight = self.head.weight
        return [flat[index.to(flat.device)].to(device=weight.device, dtype=weight.dtype)
                for index in reads_index]

    def _options(self) -> dict:
        head = self.head
        return dict(bias=head.bias, softcap=head.softcap, temperature=head.temperature,
                    backend=self.backend, check_targets=False)

    def run(self, p: Pass) -> None:
        """Score pass ``p``: fills ``result`` of each of its sequences (targets were checked
        against the vocabulary when the request was read)."""
        reads = pass_reads(p)
        weight = self.head.weight
        with torch.inference_mode():
            stats_rows, nll_rows = self.hidden(p, [reads.stats_index, reads.nll_index])
            stats = None
            if len(reads.stats_index):
                targets = reads.stats_targets.clamp(min=0).to(weight.device)
                out = linear_token_stats(stats_rows, weight, targets, top_k=reads.stats_top_k,
                                         **self._options())
                stats = {f: getattr(out, f).cpu() for f in _STAT_FIELDS
                         if getattr(out, f) is not None}
            nll = torch.zeros(0)
            if len(reads.nll_index):
                nll = linear_token_nll(nll_rows, weight, reads.nll_targets.to(weight.device),
                                       **self._options()).cpu()
        scatter_results(p, reads, stats, nll)


def run_compare(base: ModelEngine, test: ModelEngine, p: Pass) -> None:
    """Compare ``test`` with ``base`` over pass ``p`` (plain rows, every read a real target):
    fills each sequence's ``result`` with the :class:`pplfast.TokenComparison` fields."""
    reads = pass_reads(p)
    if len(reads.stats_index):
        raise ValueError("comparison passes read the NLL rows only")
    with torch.inference_mode():
        (rows_b,) = base.hidden(p, [reads.nll_index])
        (rows_t,) = test.hidden(p, [reads.nll_index])
        device = test.head.weight.device
        weight_b = base.head.weight.to(device)
        bias_b = None if base.head.bias is None else base.head.bias.to(device)
        tc = linear_compare(rows_b.to(device), weight_b, rows_t, test.head.weight,
                            reads.nll_targets.to(device), bias_base=bias_b,
                            bias_test=test.head.bias, softcap=test.head.softcap,
                            temperature=test.head.temperature, backend=test.backend,
                            check_targets=False)
    fields = {f: getattr(tc, f).cpu() for f in _COMPARE_FIELDS}
    for seq, (_, index) in zip(p.sequences, reads._inverse):
        seq.result = {f: v[index] for f, v in fields.items()}


def comparison_figures(parts: List[Dict[str, torch.Tensor]]) -> dict:
    """llama.cpp's comparison statistics (:class:`pplfast.Comparison`) over per-token parts
    (dicts of the :class:`pplfast.TokenComparison` fields of scored tokens)."""
    metric = Comparison()
    for part in parts:
        if len(part["kl"]):
            metric.update_tokens(TokenComparison(**{f: part[f] for f in _COMPARE_FIELDS}))
    if metric.num_tokens == 0:
        return {"num_tokens": 0}
    return metric.compute().as_dict()


def compare_problem(base: ModelEngine, test: ModelEngine) -> Optional[str]:
    """Why ``test`` cannot be compared with ``base`` in one pass, or None."""
    if base.vocab_size != test.vocab_size:
        return (f"the models' vocabularies differ ({base.vocab_size} and {test.vocab_size} "
                "tokens): compared models must share one vocabulary")
    if base.transform != test.transform:
        return (f"the models' final logit transforms differ (softcap, temperature: "
                f"{base.transform} and {test.transform})")
    return None


def _accepts_use_cache(module) -> bool:
    import inspect

    try:
        return "use_cache" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _probe_trees(body, model, V) -> Optional[TreeSupport]:
    """:class:`TreeSupport` where ``body`` scores a prefix tree exactly as the rows alone, else
    None (with a warning). Models with sliding-window attention take trees no longer than the
    window (a custom mask replaces the model's own)."""
    from .packing import Row, Sequence

    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, max(1, V), (n,), generator=g) for n in (TREE_MIN_SHARED + 2, 3, 5)]
    device, empty = _model_device(model), torch.zeros(0, dtype=torch.long)
    seqs = [Sequence(torch.cat([parts[0], s]), empty, empty) for s in parts[1:]]
    p = Pass([Row(seqs, len(parts[0]))])
    expected = []
    reason = "the model body rejects 4-D attention masks"
    kwargs = {"use_cache": False} if _accepts_use_cache(body) else {}
    with torch.inference_mode():
        try:
            for s in seqs:
                expected.append(_last_hidden(body(input_ids=s.ids[None].to(device), **kwargs))[0])
        except Exception as exc:
            reason = f"calling the body failed ({first_line(exc)})"
            expected = None
        dtype = next((t.dtype for t in body.parameters() if t.is_floating_point()), torch.float32)
        for mask_dtype in ((torch.bool, dtype) if expected else ()):
            inputs = pass_inputs(p, mask_dtype)
            try:
                out = _last_hidden(body(input_ids=inputs.ids.to(device),
                                        attention_mask=inputs.attention_mask.to(device),
                                        position_ids=inputs.position_ids.to(device), **kwargs))[0]
            except Exception as exc:
                reason = f"the body rejects a 4-D attention mask ({first_line(exc)})"
                continue
            got = [out[: len(seqs[0])], torch.cat([out[: len(parts[0])], out[len(seqs[0]):]])]
            rel = 1e-4 if dtype == torch.float32 else 2e-2
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, expected))
            bound = rel * max(1.0, max(float(b.float().abs().max()) for b in expected))
            if err <= bound:
                window = getattr(_text_config(model), "sliding_window", None)
                longest = TREE_MAX_ROW
                if isinstance(window, int) and window > 0:
                    longest = min(longest, window)
                return TreeSupport(mask_dtype, longest)
            reason = f"a prefix tree's hidden states differ from the rows alone by {err:.3g}"
    warnings.warn(f"pplfast serve: shared prefixes are run once per sequence on "
                  f"{type(model).__name__}: {reason}")
    return None
