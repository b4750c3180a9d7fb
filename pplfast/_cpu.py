"""``backend="cpu"``: both ops on the native kernels of ``pplfast._C`` (csrc/cpu), end to end.

Every op family (NLL, statistics, comparison) has the same three calls over a running state this
module owns, a ``(rows, width)`` float64 tensor whose layout belongs to the kernels:
``*_state`` makes it fresh, ``*_update`` folds one slab of vocabulary columns (any strides, at a
vocabulary offset) into it, ``*_finish`` turns it into the outputs.

Logits path: one update over the whole vocabulary; the kernel reads fp32/fp16/bf16 logits in
place through their strides.

Hidden-states path: the vocabulary is cut into tiles and the (scored) tokens into chunks. Each
(chunk, tile) pair is one GEMM into a single reused float32 buffer, folded at once into the
running state by the family's update; its finish turns the state into the outputs. The loop runs
tiles outside and chunks inside, so the weight (the large operand)
is read once and only the hidden states are re-read, once per tile. Tile sizes are chosen so that
every temporary (logits buffer, float32 copies of fp16/bf16 operand tiles, gathered rows) fits in
the budget (``PPLFAST_CPU_CHUNK_MB``, default 32 MiB); beyond that the extra memory is the O(N)
state (24 bytes per scored row for the NLL) and the output.

The tile loop itself (tile sizes, the generator of logit tiles) is ``pplfast._cpu_tiles``; the
``fold_linear_*`` functions fold its tiles into a family's state at a vocabulary offset, for the
ops here and for a vocabulary slice's partials (vocab-parallel scoring, ``pplfast._cpu_slices``).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C, _env
from ._chunked import Scored, _scatter_compare, _scatter_scored, _select_scored
from ._cpu_tiles import cpu_tile_sizes, logit_tiles, target_thresholds

_DTYPE_CODE = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _softcap_arg(softcap: Optional[float]) -> float:
    return 0.0 if softcap is None else float(softcap)


def _new_state(rows: int, width: int) -> torch.Tensor:
    return torch.empty((rows, width), dtype=torch.float64)


def _check_slab(logits3, targets, state, width: int) -> int:
    """Rows of a ``(B, T, Vc)`` slab, after checking that ``targets`` and ``state`` fit it."""
    B, T, _ = logits3.shape
    rows = B * T
    if (state.dtype != torch.float64 or state.shape != (rows, width)
            or not state.is_contiguous() or targets.shape != (rows,)
            or targets.dtype != torch.int64 or not targets.is_contiguous()):
        raise ValueError(f"state must be a contiguous ({rows}, {width}) float64 tensor and "
                         f"targets a contiguous ({rows},) int64 tensor")
    return rows


def _slab_args(logits3):
    """Pointer, dtype code, (batch, time, column) strides, rows, time, columns of a slab."""
    B, T, Vc = logits3.shape
    return (logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], *logits3.stride(), B * T, T, Vc)


# ---- NLL -------------------------------------------------------------------------------------------

def nll_state(rows: int) -> torch.Tensor:
    """Fresh running state of :func:`nll_update`: ``(rows, _C.NLL_STATE)`` float64 (the maximum
    of the soft-capped logits y, the sum of exp((y - max) / temperature), the target's y)."""
    state = _new_state(rows, _C.NLL_STATE)
    _C.nll_init(state.data_ptr(), rows)
    return state


def nll_update(logits3, targets, v_offset, ignore_index, softcap, temperature, state) -> None:
    """Fold a ``(B, T, Vc)`` slab of logits (vocabulary columns ``v_offset ...``, any strides)
    into ``state`` (rows ``B * T``)."""
    rows = _check_slab(logits3, targets, state, _C.NLL_STATE)
    if rows == 0 or logits3.shape[-1] == 0:
        return
    _C.nll_update(*_slab_args(logits3), int(v_offset), targets.data_ptr(), ignore_index,
                  _softcap_arg(softcap), temperature, state.data_ptr(), _threads())


def nll_finish(state, targets, ignore_index, temperature) -> torch.Tensor:
    """NLL (float32) from the state folded with ``temperature``:
    ``(max - target) / temperature + log(sum)``; 0 where ``targets == ignore_index``."""
    n = targets.shape[0]
    out = torch.empty(n, dtype=torch.float32)
    _C.nll_finish(state.data_ptr(), targets.data_ptr(), ignore_index, n, temperature,
                  out.data_ptr())
    return out


def token_nll(logits3, targets, ignore_index, softcap, temperature) -> torch.Tensor:
    B, T, _ = logits3.shape
    state = nll_state(B * T)
    nll_update(logits3, targets, 0, ignore_index, softcap, temperature, state)
    return nll_finish(state, targets, ignore_index, temperature)


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                     budget_mb: Optional[float] = None,
                     scored: Optional[Scored] = None) -> torch.Tensor:
    """Per-token NLL of ``hidden2 @ weight.T + bias`` by the tiled loop of the module docstring.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16, any row stride.
        weight: ``(V, D)``, same dtype; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 contiguous, in ``[0, V)`` or ``== ignore_index``.
        ignore_index, softcap (None or > 0), temperature (> 0): as in ``token_nll``.
        budget_mb: MiB for temporaries; default ``PPLFAST_CPU_CHUNK_MB`` or 32.
        scored: ``pplfast._chunked._select_scored`` of ``targets``, when the caller has it.

    Returns:
        ``(N,)`` float32 NLL, equal to
        ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
        with ``z = (F.linear(hidden2, weight, bias))`` soft-capped and divided by temperature.
    """
    budget = _env.budget_bytes(_env.CPU_CHUNK_MB, _env.DEFAULT_CPU_CHUNK_MB, budget_mb)
    N = hidden2.shape[0]
    out = torch.zeros(N, dtype=torch.float32)
    rows, targets = scored if scored is not None else _select_scored(targets, ignore_index)
    if targets.numel() == 0:
        return out
    state = nll_state(targets.shape[0])
    fold_linear_nll(hidden2, weight, bias, rows, targets, 0, ignore_index, softcap, temperature,
                    budget, state)
    nll = nll_finish(state, targets, ignore_index, temperature)
    return _scatter_scored(out, rows, nll)


def fold_linear_nll(hidden2, weight, bias, rows, targets, v_offset, ignore_index, softcap,
                    temperature, budget, state) -> None:
    """Fold ``F.linear``'s logits of the scored rows (``rows``, None: all; ``targets`` theirs)
    into the NLL ``state``, tile by tile (:func:`logit_tiles`), the weight's first row being
    vocabulary id ``v_offset``; nothing without a scored row."""
    if not targets.shape[0]:
        return
    for logits, v0, r0, n in logit_tiles(hidden2, weight, bias, rows, targets.shape[0], budget):
        nll_update(logits.unsqueeze(0), targets[r0 : r0 + n], v_offset + v0, ignore_index,
                   softcap, temperature, state[r0 : r0 + n])


def _stats_outputs(n: int, top_k: int):
    """(nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs), NaN / garbage filled
    so that an element the kernel does not write shows."""
    return (torch.full((n,), float("nan")), torch.full((n,), float("nan")),
            torch.full((n,), float("nan")), torch.full((n,), -7, dtype=torch.int64),
            torch.full((n,), -7, dtype=torch.int64), torch.full((n, top_k), -7, dtype=torch.int64),
            torch.full((n, top_k), float("nan")))


def stats_state(rows: int, top_k: int, thresholds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fresh running state of :func:`stats_update`: ``(rows, _C.STATS_STATE + 2 top_k)`` float64.

    ``thresholds``: each row's soft-capped target logit (float32, contiguous), the rank's
    threshold, when computed apart (the hidden-states path); None takes it from the slab that holds
    the target, which must then be the first slab folded into the row (the logits path)."""
    state = _new_state(rows, _C.STATS_STATE + 2 * top_k)
    if thresholds is not None and (thresholds.dtype != torch.float32 or thresholds.shape != (rows,)
                                   or not thresholds.is_contiguous()):
        raise ValueError(f"thresholds must be a contiguous ({rows},) float32 tensor")
    _C.stats_init(state.data_ptr(), rows, top_k, 0 if thresholds is None else thresholds.data_ptr())
    return state


def stats_update(logits3, targets, v_offset, ignore_index, softcap, temperature, top_k,
                 state) -> None:
    """Fold a ``(B, T, Vc)`` slab of logits (vocabulary columns ``v_offset ...``, any strides)
    into ``state`` (rows ``B * T``)."""
    rows = _check_slab(logits3, targets, state, _C.STATS_STATE + 2 * top_k)
    if rows == 0 or logits3.shape[-1] == 0:
        return
    _C.stats_update(*_slab_args(logits3), int(v_offset), targets.data_ptr(), ignore_index,
                    _softcap_arg(softcap), temperature, top_k, state.data_ptr(), _threads())


def stats_finish(state, targets, ignore_index, temperature, top_k):
    """``(nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs)`` from the state folded
    with ``temperature``; ignored rows: 0 and -1."""
    n = targets.shape[0]
    out = _stats_outputs(n, top_k)
    _C.stats_finish(state.data_ptr(), targets.data_ptr(), ignore_index, n, top_k, temperature,
                    *(t.data_ptr() for t in out))
    return out


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    B, T, _ = logits3.shape
    state = stats_state(B * T, top_k)
    stats_update(logits3, targets, 0, ignore_index, softcap, temperature, top_k, state)
    return stats_finish(state, targets, ignore_index, temperature, top_k)


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k,
                       *, budget_mb: Optional[float] = None, scored: Optional[Scored] = None):
    """Statistics of ``F.linear(hidden2, weight, bias)`` through the CPU tile loop of the
    hidden-states NLL (:func:`logit_tiles`), folded into a running state by the
    native ``stats_update``; the state is O(N · top_k), never N × V. ``scored``: as in
    :func:`linear_token_nll`."""
    N = hidden2.shape[0]
    out = _stats_outputs(N, top_k)
    rows, scored_targets = scored if scored is not None else _select_scored(targets, ignore_index)
    n = scored_targets.shape[0]
    budget = _env.budget_bytes(_env.CPU_CHUNK_MB, _env.DEFAULT_CPU_CHUNK_MB, budget_mb)
    threshold = None
    if n:
        threshold = target_thresholds(hidden2, weight, bias, scored_targets, rows, softcap,
                                       budget)
    state = stats_state(n, top_k, threshold)
    fold_linear_stats(hidden2, weight, bias, rows, scored_targets, 0, ignore_index, softcap,
                      temperature, top_k, budget, state)
    fields = stats_finish(state, scored_targets, ignore_index, temperature, top_k)
    if rows is None:
        return fields
    fills = (0.0, 0.0, 0.0, -1, -1, -1, 0.0)
    for full, part, fill in zip(out, fields, fills):
        full.fill_(fill).index_copy_(0, rows, part)
    return out


def fold_linear_stats(hidden2, weight, bias, rows, targets, v_offset, ignore_index, softcap,
                      temperature, top_k, budget, state) -> None:
    """As :func:`fold_linear_nll`, into the statistics' ``state``."""
    if not targets.shape[0]:
        return
    for logits, v0, r0, n in logit_tiles(hidden2, weight, bias, rows, targets.shape[0], budget):
        stats_update(logits.unsqueeze(0), targets[r0 : r0 + n], v_offset + v0, ignore_index,
                     softcap, temperature, top_k, state[r0 : r0 + n])


# ---- two models at once: compare / linear_compare ----------------------------------------------

def compare_state(rows: int) -> torch.Tensor:
    """Fresh running state of :func:`compare_update`: ``(rows, _C.COMPARE_STATE)`` float64."""
    state = _new_state(rows, _C.COMPARE_STATE)
    _C.compare_init(state.data_ptr(), rows)
    return state


def compare_update(base3, test3, targets, v_offset, ignore_index, softcap, temperature,
                   state) -> None:
    """Fold ``(B, T, Vc)`` slabs of both models' logits (vocabulary columns ``v_offset ...``)
    into ``state`` (rows ``B * T``); both tensors any strides and dtype."""
    B, T, Vc = base3.shape
    if test3.shape != base3.shape:
        raise ValueError(f"test slab {tuple(test3.shape)} differs from base {tuple(base3.shape)}")
    _check_slab(base3, targets, state, _C.COMPARE_STATE)
    if B * T == 0 or Vc == 0:
        return
    _C.compare_update(
        base3.data_ptr(), _DTYPE_CODE[base3.dtype], *base3.stride(),
        test3.data_ptr(), _DTYPE_CODE[test3.dtype], *test3.stride(),
        B * T, T, Vc, int(v_offset), targets.data_ptr(), ignore_index, _softcap_arg(softcap),
        temperature, state.data_ptr(), _threads(),
    )


def compare_finish(state, targets, ignore_index, temperature):
    """``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)`` from the state folded
    with ``temperature``."""
    n = targets.shape[0]
    floats = [torch.empty(n, dtype=torch.float32) for _ in range(4)]
    ints = [torch.empty(n, dtype=torch.int64) for _ in range(2)]
    _C.compare_finish(state.data_ptr(), targets.data_ptr(), ignore_index, n, temperature,
                      *(t.data_ptr() for t in floats), *(t.data_ptr() for t in ints))
    return (*floats, *ints)


def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    B, T, _ = logits3_base.shape
    state = compare_state(B * T)
    compare_update(logits3_base, logits3_test, targets, 0, ignore_index, softcap, temperature,
                   state)
    return compare_finish(state, targets, ignore_index, temperature)


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature, *,
                   budget_mb: Optional[float] = None, scored: Optional[Scored] = None):
    """:func:`compare` of ``F.linear`` of each model through the tile loop of the hidden-states
    ops (:func:`logit_tiles`), one loop per model run in lockstep (the same tile sizes, chosen
    for the wider model within half the budget each): two GEMMs per tile into two reused float32
    buffers, folded together into the two-row running state of :func:`compare_update`.

    ``scored``: as in :func:`linear_token_nll`. Returns ``(kl, kl_reverse, nll_base, nll_test,
    argmax_base, argmax_test)``, each ``(N,)``.
    """
    budget = _env.budget_bytes(_env.CPU_CHUNK_MB, _env.DEFAULT_CPU_CHUNK_MB, budget_mb)
    N = hidden2_base.shape[0]
    rows, scored_targets = scored if scored is not None else _select_scored(targets, ignore_index)
    state = compare_state(scored_targets.shape[0])
    fold_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                        bias_test, rows, scored_targets, 0, ignore_index, softcap, temperature,
                        budget, state)
    fields = compare_finish(state, scored_targets, ignore_index, temperature)
    return _scatter_compare(fields, rows, N)


def fold_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                        bias_test, rows, targets, v_offset, ignore_index, softcap, temperature,
                        budget, state) -> None:
    """As :func:`fold_linear_nll` for two models in lockstep, into the comparison's ``state``:
    the same tile sizes for both, chosen for the wider model within half the budget each."""
    n = targets.shape[0]
    if not n:
        return
    hiddens = (hidden2_base, hidden2_test)
    D = max(h.shape[1] for h in hiddens)
    upcast = any(h.dtype != torch.float32 for h in hiddens)
    gather_bytes = 0 if rows is None else max(h.element_size() for h in hiddens)
    tile = cpu_tile_sizes(n, weight_base.shape[0], D, upcast=upcast, gather_bytes=gather_bytes,
                          budget=budget // 2)
    base_tiles = logit_tiles(hidden2_base, weight_base, bias_base, rows, n, budget, tile=tile)
    test_tiles = logit_tiles(hidden2_test, weight_test, bias_test, rows, n, budget, tile=tile)
    for (zb, v0, r0, m), (zt, _, _, _) in zip(base_tiles, test_tiles):
        compare_update(zb.unsqueeze(0), zt.unsqueeze(0), targets[r0 : r0 + m], v_offset + v0,
                       ignore_index, softcap, temperature, state[r0 : r0 + m])
