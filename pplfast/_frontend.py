"""The front door every public op goes through, written once.

``token_nll``, ``linear_token_nll``, ``token_stats``, ``linear_token_stats``, ``compare`` and
``linear_compare`` (and the perplexities built on the first two) all run the same six steps:

1. unwrap DTensor inputs and validate the arguments (``pplfast._validate``: a ``TypeError`` /
   ``ValueError`` naming the argument and its value, before any kernel runs); a vocabulary
   slice (``vocab_shard=``, or a DTensor sharded on the vocabulary: ``pplfast.vocab_parallel``)
   goes with the call to the op as its bounds and group;
2. lay the inputs out without copies: logits as ``(B, T, V)`` views (:func:`rows3`; a
   ``shift=True`` slice keeps a (batch, time) stride pair), hidden states as ``(N, D)`` views
   (:func:`hidden_rows`; ``shift=True`` on ``(B, T, D)`` passes the whole tensor with the last
   position of each sequence ignored, so nothing is copied and that position costs no GEMM),
   one model or two;
3. resolve the backend (``pplfast._dispatch``);
4. call the registered custom op (``pplfast._ops``) whose body makes the one target-range
   check and the one scored-row count (one host sync at most) and runs the backend's launcher;
   empty inputs and a zero vocabulary are answered there, once;
5. build the result type with the caller's leading shape.

Everything here runs at trace time under ``torch.compile``: shapes, dtypes, devices and Python
options only, nothing that reads tensor data.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch

from . import _dispatch, _ops, _validate  # noqa: F401  (_ops registers torch.ops.pplfast.*)
from . import vocab_parallel
from ._results import TokenComparison, TokenStats


class Options(NamedTuple):
    """The checked keyword options of one call."""

    ignore_index: int
    shift: bool
    softcap: Optional[float]
    temperature: float
    backend: str  # the concrete backend, once resolved
    check_targets: bool
    shard: Optional[vocab_parallel.VocabShard] = None  # this rank's vocabulary slice, if split

    @property
    def vocab(self) -> tuple:
        """``(shard, group)`` arguments of the custom ops (``(None, "")`` on one process)."""
        return vocab_parallel.op_args(self.shard)


def _merge_free(x: torch.Tensor, dims: int) -> bool:
    """Whether the first ``dims`` dimensions of ``x`` merge into one by a view (no copy)."""
    sizes, strides = x.shape[:dims], x.stride()[:dims]
    if any(size == 0 for size in sizes):
        return True
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def rows3(x: torch.Tensor) -> torch.Tensor:
    """``(..., W)`` as ``(B, T, W)``, a view whenever the strides allow it.

    Slices such as ``logits[:, :-1]`` (the ``shift=True`` case) cannot be flattened to one row
    stride but keep a (batch, time) stride pair, which every kernel takes.
    """
    W = x.shape[-1]
    lead = x.shape[:-1]
    if len(lead) == 0:
        return x.reshape(1, 1, W)
    if len(lead) == 1:
        return x.unsqueeze(0)
    shape = (math.prod(lead[:-1]), lead[-1], W)  # no -1: it is ambiguous for empty tensors
    return x.view(shape) if _merge_free(x, len(lead) - 1) else x.reshape(shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # a view where the strides allow


def hidden_rows(hiddens: Sequence[torch.Tensor], targets: torch.Tensor, ignore_index: int,
                shift: bool):
    """``(rows, targets, crop)``: each hidden-states tensor as ``(N, D)`` rows (the same rows
    for every model) and the targets of those rows; ``crop`` when the last position of every
    sequence is a padding row (target ``ignore_index``) to drop from the output.

    With ``shift``, ``hidden[..., :-1, :]`` is one ``(N, D)`` view only for one sequence (or
    strides that happen to allow it); otherwise the whole tensor goes as rows, with the targets
    shifted and each sequence's last position given ``ignore_index``: no copy, and the padding
    rows cost no GEMM (ignored rows are dropped by row index).
    """
    if not shift:
        return [_rows(h) for h in hiddens], targets, False
    sliced = [h[..., :-1, :] for h in hiddens]
    shifted = targets[..., 1:]
    whole_free = all(_merge_free(h, h.ndim - 1) for h in hiddens)
    if all(_merge_free(s, s.ndim - 1) for s in sliced) or not whole_free:
        return [_rows(s) for s in sliced], shifted, False  # views in the first case
    padding = torch.full((*shifted.shape[:-1], 1), ignore_index, dtype=torch.int64,
                         device=targets.device)
    return [_rows(h) for h in hiddens], torch.cat([shifted.to(torch.int64), padding], -1), True


def options(ignore_index, shift, softcap, temperature, check_targets) -> Options:
    """The keyword options checked (Python numbers from numpy scalars and 0-d tensors too); the
    backend is resolved later, once the device is known."""
    ignore_index, softcap, temperature = _validate.options(ignore_index, shift, softcap,
                                                           temperature)
    if not isinstance(check_targets, bool):
        raise TypeError(f"check_targets must be a bool, got {check_targets!r}")
    return Options(ignore_index, shift, softcap, temperature, "", check_targets)


def _shaped(fields: Sequence[torch.Tensor], lead, crop: bool) -> list:
    """Flat ``(N, ...)`` op outputs reshaped to ``lead + (...)``, the padding position of each
    sequence dropped when ``crop``."""
    out = []
    for f in fields:
        x = f.reshape(*lead, *f.shape[1:])
        if crop:
            x = x.narrow(len(lead) - 1, 0, lead[-1] - 1).contiguous()
        out.append(x)
    return out


# ---- the logits ops ----------------------------------------------------------------------------

def _vocab_size(V: int, shard) -> int:
    """The vocabulary size the top-k bound and the range check use: ``V`` of the local tensors,
    the whole vocabulary's when it is split and known, else the top-k limit (checked after the
    exchange)."""
    if shard is None:
        return V
    return shard.vocab_size if shard.vocab_size is not None else _validate.MAX_TOP_K


def _logits_call(names: Sequence[str], logits: Sequence[torch.Tensor], targets, *, ignore_index,
                 shift, softcap, temperature, backend, check_targets, vocab_shard=None):
    logits, targets, _, shard = vocab_parallel.unwrap("logits", names, logits, targets,
                                                      vocab_shard=vocab_shard)
    for name, x in zip(names, logits):
        _validate.float_tensor(name, x)
    for name, x in zip(names[1:], logits[1:]):
        _validate.same_shape(names[0], logits[0], name, x)
    _validate.target_tensor(targets)
    opts = options(ignore_index, shift, softcap, temperature, check_targets)
    _validate.leading_shape(names[0], logits[0], targets, shift)
    device = _validate.same_device(**dict(zip(names, logits)), targets=targets)
    if shard is not None:
        vocab_parallel.check_local_width(names[0], logits[0].shape[-1], shard)
    opts = opts._replace(backend=_dispatch.resolve(backend, device), shard=shard)
    if shift:
        logits = [x[..., :-1, :] for x in logits]
        targets = targets[..., 1:]
    return [rows3(x) for x in logits], targets, opts


def token_nll(logits, targets, **kw) -> torch.Tensor:
    (logits3,), targets, o = _logits_call(("logits",), (logits,), targets, **kw)
    with torch.no_grad():  # scoring is forward-only; parameters with requires_grad are welcome
        nll = torch.ops.pplfast.token_nll(logits3, targets, o.ignore_index, o.softcap,
                                          o.temperature, o.backend, o.check_targets, *o.vocab)
    return nll.view(targets.shape)


def token_stats(logits, targets, *, top_k, **kw) -> TokenStats:
    (logits3,), targets, o = _logits_call(("logits",), (logits,), targets, **kw)
    top_k = _validate.top_k(top_k, _vocab_size(logits3.shape[-1], o.shard))
    with torch.no_grad():
        fields = torch.ops.pplfast.token_stats(logits3, targets, o.ignore_index, o.softcap,
                                               o.temperature, top_k, o.backend, o.check_targets,
                                               *o.vocab)
    return stats_result(_shaped(fields, targets.shape, False), top_k)


def compare(logits_base, logits_test, targets, **kw) -> TokenComparison:
    (base3, test3), targets, o = _logits_call(("logits_base", "logits_test"),
                                              (logits_base, logits_test), targets, **kw)
    with torch.no_grad():
        fields = torch.ops.pplfast.compare(base3, test3, targets, o.ignore_index, o.softcap,
                                           o.temperature, o.backend, o.check_targets, *o.vocab)
    return TokenComparison(*_shaped(fields, targets.shape, False))


# ---- the hidden-states ops ---------------------------------------------------------------------

def _linear_call(models: Sequence[tuple], targets, *, ignore_index, shift, softcap, temperature,
                 backend, check_targets, vocab_shard=None):
    """``models``: ``(suffix, hidden, weight, bias)`` per model (suffix "" for one model)."""
    names = [n for suffix, *_ in models for n in ("hidden" + suffix, "weight" + suffix)]
    tensors = [t for _, hidden, weight, _ in models for t in (hidden, weight)]
    tensors, targets, biases, shard = vocab_parallel.unwrap(
        "linear", names, tensors, targets, [m[3] for m in models], vocab_shard=vocab_shard)
    models = [(m[0], tensors[2 * i], tensors[2 * i + 1], biases[i]) for i, m in enumerate(models)]
    named = {}
    for suffix, hidden, weight, bias in models:
        _validate.float_tensor("hidden" + suffix, hidden)
        _validate.float_tensor("weight" + suffix, weight)
        named.update({"hidden" + suffix: hidden, "weight" + suffix: weight,
                      "bias" + suffix: bias})
    (s0, h0, w0, _), others = models[0], models[1:]
    for suffix, hidden, weight, _ in others:
        _validate.same_lead(f"hidden{s0}", h0, f"hidden{suffix}", hidden)
        _validate.same_vocabulary(f"weight{s0}", w0, f"weight{suffix}", weight)
    _validate.target_tensor(targets)
    opts = options(ignore_index, shift, softcap, temperature, check_targets)
    _validate.leading_shape("hidden" + s0, h0, targets, shift)
    device = _validate.same_device(**named, targets=targets)
    opts = opts._replace(backend=_dispatch.resolve(backend, device))
    for suffix, hidden, weight, bias in models:
        _validate.linear_shapes(hidden, weight, bias, suffix)
        if shard is not None:
            vocab_parallel.check_local_width("weight" + suffix, weight.shape[0], shard)
    opts = opts._replace(shard=shard)
    hiddens, targets, crop = hidden_rows([m[1] for m in models], targets, opts.ignore_index,
                                         shift)
    return hiddens, targets, crop, opts, [(m[2], m[3]) for m in models]


def linear_token_nll(hidden, weight, targets, *, bias=None, **kw) -> torch.Tensor:
    (hidden2,), targets, crop, o, ((weight, bias),) = _linear_call(
        (("", hidden, weight, bias),), targets, **kw)
    with torch.no_grad():
        nll = torch.ops.pplfast.linear_token_nll(hidden2, weight, bias, targets, o.ignore_index,
                                                 o.softcap, o.temperature, o.backend,
                                                 o.check_targets, *o.vocab)
    return _shaped((nll,), targets.shape, crop)[0]


def linear_token_stats(hidden, weight, targets, *, bias=None, top_k, **kw) -> TokenStats:
    (hidden2,), targets, crop, o, ((weight, bias),) = _linear_call(
        (("", hidden, weight, bias),), targets, **kw)
    top_k = _validate.top_k(top_k, _vocab_size(weight.shape[0], o.shard))
    with torch.no_grad():
        fields = torch.ops.pplfast.linear_token_stats(
            hidden2, weight, bias, targets, o.ignore_index, o.softcap, o.temperature, top_k,
            o.backend, o.check_targets, *o.vocab)
    return stats_result(_shaped(fields, targets.shape, crop), top_k)


def linear_compare(hidden_base, weight_base, hidden_test, weight_test, targets, *,
                   bias_base=None, bias_test=None, **kw) -> TokenComparison:
    (hb, ht), targets, crop, o, ((weight_base, bias_base), (weight_test, bias_test)) = \
        _linear_call((("_base", hidden_base, weight_base, bias_base),
                      ("_test", hidden_test, weight_test, bias_test)), targets, **kw)
    with torch.no_grad():
        fields = torch.ops.pplfast.linear_compare(
            hb, weight_base, bias_base, ht, weight_test, bias_test, targets, o.ignore_index,
            o.softcap, o.temperature, o.backend, o.check_targets, *o.vocab)
    return TokenComparison(*_shaped(fields, targets.shape, crop))


def stats_result(fields: Sequence[torch.Tensor], top_k: int) -> TokenStats:
    nll, entropy, max_logprob, argmax, rank, top_ids, top_lp = fields
    if not top_k:
        top_ids = top_lp = None
    return TokenStats(nll, entropy, max_logprob, argmax, rank, top_ids, top_lp)


def perplexity(nll: torch.Tensor, targets: torch.Tensor, ignore_index: int,
               shift: bool) -> torch.Tensor:
    """``exp(sum(nll) / count(scored))``, summed in float64; NaN when nothing is scored."""
    targets = vocab_parallel.local(targets)
    if shift:
        targets = targets[..., 1:]
    count = _validate.scored_mask(targets, ignore_index).sum()
    return torch.exp(nll.double().sum() / count).float()
