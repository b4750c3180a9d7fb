"""Every public op as a ``torch.library`` custom op (``torch.ops.pplfast.<op>``), registered in
Python above the pybind11 layer, each with a fake implementation.

``pplfast._frontend`` validates, lays out and resolves the backend at trace time, then calls one
of these ops; an op's body makes the run-time part of the call, written once here for all six:
the target-range check (when asked), the scored-row count that sizes the gather of the rows to
score (hidden-states ops; both in one host sync), the empty answers (no rows, no vocabulary, a
zero-width output layer), then the backend's launcher (``pplfast._dispatch``). Under
``torch.compile`` the ops are leaves of the graph: their fake implementations give each output's
shape, dtype and device without running anything, so an eval step compiles with
``fullgraph=True`` and runs the body as in eager mode.

Outputs are flat: ``(N,)`` per field, ``(N, top_k)`` for the top-k fields (``(N, 0)`` when
``top_k == 0``); float fields float32, integer fields int64; ignored rows 0 and -1.

Vocab-parallel calls (``pplfast.vocab_parallel``) are the same ops with ``shard = [start, stop,
vocab_size or -1]`` (the local tensors hold vocabulary ``[start, stop)``) and ``group`` (the
process group's name): the body runs the backend's slice launcher, one exchange and the merge
of ``pplfast._vocab_merge``; the target range is checked against ``vocab_size`` here when it is
known, else after the exchange.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _dispatch, _validate, _vocab_merge
from ._chunked import _select_scored

Tensor = torch.Tensor

# the fields of each op's result, in order: (is a float field, has a top-k axis)
_NLL = ((True, False),)
_STATS = ((True, False), (True, False), (True, False),  # nll, entropy, max_logprob
          (False, False), (False, False),  # argmax, rank
          (False, True), (True, True))  # top_k_ids, top_k_logprobs
_COMPARE = ((True, False),) * 4 + ((False, False),) * 2  # kl, kl_reverse, nll_base, nll_test,
# argmax_base, argmax_test


def _filled(like: Tensor, n: int, fields, top_k: int = 0, *, fake: bool = False) -> tuple:
    """Outputs for ``n`` rows of which none is scored: 0 (float fields) and -1 (integer fields);
    with ``fake``, uninitialised (the fake implementations: shapes, dtypes and device only)."""
    out = []
    for is_float, has_k in fields:
        shape = (n, top_k) if has_k else (n,)
        dtype = torch.float32 if is_float else torch.int64
        if fake:
            out.append(like.new_empty(shape, dtype=dtype))
        else:
            out.append(torch.full(shape, 0 if is_float else -1, dtype=dtype, device=like.device))
    return tuple(out)


def _prologue(targets: Tensor, V: int, ignore_index: int, check: bool, count: bool):
    """``(flat int64 targets, mask, scored count or None)``; one host sync when checking or
    counting."""
    mask, n_scored = _validate.scored_targets(targets, V, ignore_index, check=check, count=count)
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    return flat, mask.reshape(-1), n_scored


def _vocab_call(targets: Tensor, shard: List[int], group: str, ignore_index: int,
                softcap: Optional[float], temperature: float,
                check: bool) -> Optional[_vocab_merge.Call]:
    """The run-time prologue of a vocab-parallel call; None when there is no row (every rank of
    the group has the same rows, so none of them exchanges anything)."""
    V = shard[2]
    flat, mask, _ = _prologue(targets, max(V, 0), ignore_index, check and V >= 0, False)
    if flat.numel() == 0:
        return None
    return _vocab_merge.Call(targets, flat, mask, ignore_index, softcap, temperature, list(shard),
                             group, check)


def _slices(backend: str, name: str):
    """The backend module with the slice launcher ``name``."""
    module = _dispatch.module(backend, slices=True)
    if not hasattr(module, name):
        raise _dispatch.BackendUnavailableError(
            f'vocab-parallel scoring has no slice launcher {name} on backend="{backend}": use '
            'backend="cpu" or "reference" for CPU tensors, "triton" for CUDA tensors')
    return module


def _bias_rows(weight: Tensor, bias: Optional[Tensor], n: int) -> Tensor:
    """The ``(1, n, V)`` logits of a zero-width output layer: its bias (or zeros) in every row,
    through a stride-0 view."""
    row = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return row.expand(1, n, weight.shape[0])


# ---- token_nll / linear_token_nll --------------------------------------------------------------

@torch.library.custom_op("pplfast::token_nll", mutates_args=())
def token_nll(logits3: Tensor, targets: Tensor, ignore_index: int, softcap: Optional[float],
              temperature: float, backend: str, check_targets: bool,
              shard: Optional[List[int]] = None, group: str = "") -> Tensor:
    """float32 ``(targets.numel(),)`` NLL of the rows of ``logits3`` (B, T, V)."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(logits3, targets.numel(), _NLL)[0]
        launchers = _slices(backend, "token_nll_slice")
        return _vocab_merge.token_nll(call, lambda: launchers.token_nll_slice(
            logits3, call.flat, shard[0], ignore_index, softcap, temperature))
    V = logits3.shape[-1]
    flat, _, _ = _prologue(targets, V, ignore_index, check_targets, False)
    if flat.numel() == 0 or V == 0:
        return _filled(logits3, flat.numel(), _NLL)[0]
    return _dispatch.module(backend).token_nll(logits3, flat, ignore_index, softcap, temperature)


@token_nll.register_fake
def _(logits3, targets, ignore_index, softcap, temperature, backend, check_targets, shard=None,
      group=""):
    return _filled(logits3, targets.numel(), _NLL, fake=True)[0]


@torch.library.custom_op("pplfast::linear_token_nll", mutates_args=())
def linear_token_nll(hidden2: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     ignore_index: int, softcap: Optional[float], temperature: float,
                     backend: str, check_targets: bool, shard: Optional[List[int]] = None,
                     group: str = "") -> Tensor:
    """float32 ``(targets.numel(),)`` NLL of ``hidden2 @ weight.T + bias`` (hidden2: (N, D))."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(hidden2, targets.numel(), _NLL)[0]
        launchers = _slices(backend, "linear_token_nll_slice")
        return _vocab_merge.token_nll(call, lambda: launchers.linear_token_nll_slice(
            hidden2, weight, bias, call.flat, shard[0], ignore_index, softcap, temperature))
    V, D = weight.shape
    flat, mask, count = _prologue(targets, V, ignore_index, check_targets, D > 0)
    launchers = _dispatch.module(backend)
    if flat.numel() == 0 or V == 0:
        return _filled(hidden2, flat.numel(), _NLL)[0]
    if D == 0:
        return launchers.token_nll(_bias_rows(weight, bias, flat.numel()), flat, ignore_index,
                                   softcap, temperature)
    scored = _select_scored(flat, ignore_index, mask=mask, count=count)
    return launchers.linear_token_nll(hidden2, weight, bias, flat, ignore_index, softcap,
                                      temperature, scored=scored)


@linear_token_nll.register_fake
def _(hidden2, weight, bias, targets, ignore_index, softcap, temperature, backend, check_targets,
      shard=None, group=""):
    return _filled(hidden2, targets.numel(), _NLL, fake=True)[0]


# ---- token_stats / linear_token_stats ----------------------------------------------------------

_Stats = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _stats_tuple(fields, like: Tensor, top_k: int) -> tuple:
    """A launcher's seven fields, top-k ones as ``(N, 0)`` tensors when ``top_k == 0``."""
    fields = list(fields)
    n = fields[0].shape[0]
    if not top_k:
        fields[5] = like.new_empty((n, 0), dtype=torch.int64)
        fields[6] = like.new_empty((n, 0), dtype=torch.float32)
    return tuple(fields)


@torch.library.custom_op("pplfast::token_stats", mutates_args=())
def token_stats(logits3: Tensor, targets: Tensor, ignore_index: int, softcap: Optional[float],
                temperature: float, top_k: int, backend: str, check_targets: bool,
                shard: Optional[List[int]] = None, group: str = "") -> _Stats:
    """``TokenStats`` fields of the rows of ``logits3`` (B, T, V), flat."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(logits3, targets.numel(), _STATS, top_k)
        launchers = _slices(backend, "token_stats_slice")
        target_x = _vocab_merge.target_values(call, lambda: launchers.target_logits(
            logits3, call.flat, shard[0]))
        return _vocab_merge.token_stats(call, top_k, target_x, lambda: launchers.token_stats_slice(
            logits3, call.flat, shard[0], ignore_index, softcap, temperature, top_k, target_x))
    V = logits3.shape[-1]
    flat, _, _ = _prologue(targets, V, ignore_index, check_targets, False)
    if flat.numel() == 0 or V == 0:
        return _filled(logits3, flat.numel(), _STATS, top_k)
    fields = _dispatch.module(backend).token_stats(logits3, flat, ignore_index, softcap,
                                                   temperature, top_k)
    return _stats_tuple(fields, logits3, top_k)


@token_stats.register_fake
def _(logits3, targets, ignore_index, softcap, temperature, top_k, backend, check_targets,
      shard=None, group=""):
    return _filled(logits3, targets.numel(), _STATS, top_k, fake=True)


@torch.library.custom_op("pplfast::linear_token_stats", mutates_args=())
def linear_token_stats(hidden2: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       ignore_index: int, softcap: Optional[float], temperature: float,
                       top_k: int, backend: str, check_targets: bool,
                       shard: Optional[List[int]] = None, group: str = "") -> _Stats:
    """``TokenStats`` fields of ``hidden2 @ weight.T + bias``, flat."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(hidden2, targets.numel(), _STATS, top_k)
        launchers = _slices(backend, "linear_token_stats_slice")
        target_x = _vocab_merge.target_values(call, lambda: launchers.linear_target_logits(
            hidden2, weight, bias, call.flat, shard[0]))
        return _vocab_merge.token_stats(
            call, top_k, target_x, lambda: launchers.linear_token_stats_slice(
                hidden2, weight, bias, call.flat, shard[0], ignore_index, softcap, temperature,
                top_k, target_x))
    V, D = weight.shape
    flat, mask, count = _prologue(targets, V, ignore_index, check_targets, D > 0)
    launchers = _dispatch.module(backend)
    if flat.numel() == 0 or V == 0:
        return _filled(hidden2, flat.numel(), _STATS, top_k)
    if D == 0:
        fields = launchers.token_stats(_bias_rows(weight, bias, flat.numel()), flat,
                                       ignore_index, softcap, temperature, top_k)
    else:
        scored = _select_scored(flat, ignore_index, mask=mask, count=count)
        fields = launchers.linear_token_stats(hidden2, weight, bias, flat, ignore_index, softcap,
                                              temperature, top_k, scored=scored)
    return _stats_tuple(fields, hidden2, top_k)


@linear_token_stats.register_fake
def _(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k, backend,
      check_targets, shard=None, group=""):
    return _filled(hidden2, targets.numel(), _STATS, top_k, fake=True)


# ---- compare / linear_compare ------------------------------------------------------------------

_Compared = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("pplfast::compare", mutates_args=())
def compare(logits3_base: Tensor, logits3_test: Tensor, targets: Tensor, ignore_index: int,
            softcap: Optional[float], temperature: float, backend: str,
            check_targets: bool, shard: Optional[List[int]] = None,
            group: str = "") -> _Compared:
    """``TokenComparison`` fields of two models' rows (each (B, T, V)), flat."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(logits3_base, targets.numel(), _COMPARE)
        launchers = _slices(backend, "compare_slice")
        return _vocab_merge.compare(call, lambda: launchers.compare_slice(
            logits3_base, logits3_test, call.flat, shard[0], ignore_index, softcap, temperature))
    V = logits3_base.shape[-1]
    flat, _, _ = _prologue(targets, V, ignore_index, check_targets, False)
    if flat.numel() == 0 or V == 0:
        return _filled(logits3_base, flat.numel(), _COMPARE)
    return tuple(_dispatch.module(backend).compare(logits3_base, logits3_test, flat,
                                                   ignore_index, softcap, temperature))


@compare.register_fake
def _(logits3_base, logits3_test, targets, ignore_index, softcap, temperature, backend,
      check_targets, shard=None, group=""):
    return _filled(logits3_base, targets.numel(), _COMPARE, fake=True)


def _zero_width_logits(hidden2: Tensor, weight: Tensor, bias: Optional[Tensor], n: int):
    """The ``(1, n, V)`` logits of one model of a comparison in which a model has a zero-width
    output layer: that model's bias rows, the other's ``F.linear`` in float32 (this rare case
    builds the logits)."""
    if hidden2.shape[-1] == 0:
        return _bias_rows(weight, bias, n)
    z = torch.nn.functional.linear(hidden2.float(), weight.float(),
                                   None if bias is None else bias.float())
    return z.unsqueeze(0)


@torch.library.custom_op("pplfast::linear_compare", mutates_args=())
def linear_compare(hidden2_base: Tensor, weight_base: Tensor, bias_base: Optional[Tensor],
                   hidden2_test: Tensor, weight_test: Tensor, bias_test: Optional[Tensor],
                   targets: Tensor, ignore_index: int, softcap: Optional[float],
                   temperature: float, backend: str, check_targets: bool,
                   shard: Optional[List[int]] = None, group: str = "") -> _Compared:
    """``TokenComparison`` fields of both models' ``hidden2 @ weight.T + bias``, flat."""
    if shard is not None:
        call = _vocab_call(targets, shard, group, ignore_index, softcap, temperature,
                           check_targets)
        if call is None:
            return _filled(hidden2_base, targets.numel(), _COMPARE)
        launchers = _slices(backend, "linear_compare_slice")
        return _vocab_merge.compare(call, lambda: launchers.linear_compare_slice(
            hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
            call.flat, shard[0], ignore_index, softcap, temperature))
    V = weight_base.shape[0]
    zero_width = hidden2_base.shape[-1] == 0 or hidden2_test.shape[-1] == 0
    flat, mask, count = _prologue(targets, V, ignore_index, check_targets, not zero_width)
    launchers = _dispatch.module(backend)
    n = flat.numel()
    if n == 0 or V == 0:
        return _filled(hidden2_base, n, _COMPARE)
    if zero_width:
        fields = launchers.compare(_zero_width_logits(hidden2_base, weight_base, bias_base, n),
                                   _zero_width_logits(hidden2_test, weight_test, bias_test, n),
                                   flat, ignore_index, softcap, temperature)
    else:
        scored = _select_scored(flat, ignore_index, mask=mask, count=count)
        fields = launchers.linear_compare(hidden2_base, weight_base, bias_base, hidden2_test,
                                          weight_test, bias_test, flat, ignore_index, softcap,
                                          temperature, scored=scored)
    return tuple(fields)


@linear_compare.register_fake
def _(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test, targets,
      ignore_index, softcap, temperature, backend, check_targets, shard=None, group=""):
    return _filled(hidden2_base, targets.numel(), _COMPARE, fake=True)
