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

A vocabulary slice's partials (vocab-parallel scoring) are read from these states by
``pplfast._cpu_slices``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C, _env
from ._chunked import Scored, _scatter_compare, _scatter_scored, _select_scored

_DTYPE_CODE = {torch.float32: _C.FLOAT32, torch.float16: _C.FLOAT16, torch.bfloat16: _C.BFLOAT16}

# Preferred tile: 2048 tokens x 2048 vocabulary entries (a 16 MiB float32 buffer). Smaller tiles
# cost x86 BLAS 10-30% of its rate (operand packing per call); this one runs at or above the rate
# of one full-size GEMM and its buffer still sits in a server L3 for the reduction pass.
_CPU_ROWS = 2048
_CPU_COLS = 2048
_MIN_COLS = 16


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


def cpu_tile_sizes(rows: int, V: int, D: int, *, upcast: bool, gather_bytes: int,
                   budget: int) -> tuple[int, int]:
    """(token rows, vocabulary columns) of one CPU tile whose temporaries fit in ``budget`` bytes.

    Temporaries per tile: the float32 logits buffer (rows x cols); with ``upcast`` (fp16/bf16
    inputs) float32 copies of the weight tile (cols x D) and hidden chunk (rows x D); with
    ``gather_bytes`` > 0 (some rows ignored) the gathered hidden chunk, rows x D x gather_bytes.
    """

    def cost(n: int, c: int) -> int:
        extra = 4 * (n + c) * D if upcast else 0
        return 4 * n * c + extra + gather_bytes * n * D

    n, c = max(1, min(rows, _CPU_ROWS)), max(1, min(V, _CPU_COLS))
    while cost(n, c) > budget:
        # halve the longer side; keep a few columns per tile so the GEMM is not a GEMV
        if (c >= n or n == 1) and c > _MIN_COLS:
            c = (c + 1) // 2
        elif n > 1:
            n = (n + 1) // 2
        else:
            break  # one row x a few columns: the least any tile can use
    return n, c


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
    n_scored = targets.shape[0]
    state = nll_state(n_scored)
    for logits, v0, r0, n in logit_tiles(hidden2, weight, bias, rows, n_scored, budget):
        nll_update(logits.unsqueeze(0), targets[r0 : r0 + n], v0, ignore_index, softcap,
                   temperature, state[r0 : r0 + n])
    nll = nll_finish(state, targets, ignore_index, temperature)
    return _scatter_scored(out, rows, nll)


def logit_tiles(hidden2, weight, bias, rows: Optional[torch.Tensor], n_scored: int, budget: int,
                *, tile: Optional[tuple[int, int]] = None):
    """The tile loop of the hidden-states ops, as a generator of ``(logits, v0, r0, n)``.

    ``logits`` is the ``(n, c)`` float32 block of vocabulary columns ``v0 ...`` for scored rows
    ``r0 ... r0 + n`` (``rows``: their indices in ``hidden2``, None for all), in one reused buffer
    that the caller folds before asking for the next tile. Vocabulary tiles run outside, so the
    weight (the large operand) is read once and each row sees its columns in increasing order.
    ``tile``: the (rows, columns) of a tile, fixed by the caller (two models' loops in lockstep);
    by default :func:`cpu_tile_sizes` within ``budget``.
    """
    D = hidden2.shape[1]
    V = weight.shape[0]
    upcast = hidden2.dtype != torch.float32
    gather_bytes = 0 if rows is None else hidden2.element_size()
    if tile is not None:
        n_max, c_max = tile
    else:
        n_max, c_max = cpu_tile_sizes(n_scored, V, D, upcast=upcast, gather_bytes=gather_bytes,
                                      budget=budget)

    logits_buf = torch.empty(n_max * c_max, dtype=torch.float32)
    if rows is not None:
        # gathered rows go to one reused buffer: a fresh tensor per tile lets the allocator's
        # heap grow past the budget
        gather_buf = torch.empty(n_max * D, dtype=hidden2.dtype)
    if upcast:
        # fp16/bf16 products are exact in float32; a float32 GEMM then leaves only the
        # accumulation error, well below that of rounding the logits to fp16/bf16
        weight_buf = torch.empty(c_max * D, dtype=torch.float32)
        hidden_buf = torch.empty(n_max * D, dtype=torch.float32)
    fused_bias = bias is not None and bias.dtype == torch.float32

    for v0 in range(0, V, c_max):
        c = min(c_max, V - v0)
        w_tile = weight[v0 : v0 + c]
        if upcast:
            w_tile = weight_buf[: c * D].view(c, D).copy_(w_tile)
        b_tile = None if bias is None else bias[v0 : v0 + c]
        for r0 in range(0, n_scored, n_max):
            n = min(n_max, n_scored - r0)
            if rows is None:
                h_tile = hidden2[r0 : r0 + n]
            else:
                h_tile = torch.index_select(hidden2, 0, rows[r0 : r0 + n],
                                            out=gather_buf[: n * D].view(n, D))
            if upcast:
                h_tile = hidden_buf[: n * D].view(n, D).copy_(h_tile)
            logits = logits_buf[: n * c].view(n, c)
            if fused_bias:
                torch.addmm(b_tile, h_tile, w_tile.T, out=logits)
            else:
                torch.matmul(h_tile, w_tile.T, out=logits)
                if b_tile is not None:
                    logits.add_(b_tile)
            yield logits, v0, r0, n


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


def target_thresholds(hidden2, weight, bias, targets, rows, softcap, step):
    """Each scored row's soft-capped target logit (float32), the rank's threshold: one dot
    product per row in float32, as the tiles' GEMM computes it, soft-capped in float64 (the
    temperature, increasing, orders nothing differently)."""
    out = torch.empty(targets.shape[0], dtype=torch.float32)
    for r0 in range(0, targets.shape[0], step):
        t = targets[r0 : r0 + step]
        h = hidden2[r0 : r0 + step] if rows is None else hidden2.index_select(0, rows[r0 : r0 + step])
        z = (h.float() * weight.index_select(0, t).float()).sum(-1)
        if bias is not None:
            z = z + bias.index_select(0, t).float()
        z = z.double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        out[r0 : r0 + step] = z
    return out


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
        step = max(1, budget // max(1, 8 * hidden2.shape[1]))
        threshold = target_thresholds(hidden2, weight, bias, scored_targets, rows, softcap,
                                       step)
    state = stats_state(n, top_k, threshold)
    if n:
        for logits, v0, r0, m in logit_tiles(hidden2, weight, bias, rows, n, budget):
            stats_update(logits.unsqueeze(0), scored_targets[r0 : r0 + m], v0, ignore_index,
                         softcap, temperature, top_k, state[r0 : r0 + m])
    fields = stats_finish(state, scored_targets, ignore_index, temperature, top_k)
    if rows is None:
        return fields
    fills = (0.0, 0.0, 0.0, -1, -1, -1, 0.0)
    for full, part, fill in zip(out, fields, fills):
        full.fill_(fill).index_copy_(0, rows, part)
    return out


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
    V = weight_base.shape[0]
    rows, scored_targets = scored if scored is not None else _select_scored(targets, ignore_index)
    n_scored = scored_targets.shape[0]
    state = compare_state(n_scored)
    if n_scored:
        hiddens = (hidden2_base, hidden2_test)
        D = max(h.shape[1] for h in hiddens)
        upcast = any(h.dtype != torch.float32 for h in hiddens)
        gather_bytes = 0 if rows is None else max(h.element_size() for h in hiddens)
        # the two models share the budget: one model's tile within half of it
        tile = cpu_tile_sizes(n_scored, V, D, upcast=upcast, gather_bytes=gather_bytes,
                              budget=budget // 2)
        base_tiles = logit_tiles(hidden2_base, weight_base, bias_base, rows, n_scored, budget,
                                 tile=tile)
        test_tiles = logit_tiles(hidden2_test, weight_test, bias_test, rows, n_scored, budget,
                                 tile=tile)
        for (zb, v0, r0, n), (zt, _, _, _) in zip(base_tiles, test_tiles):
            compare_update(zb.unsqueeze(0), zt.unsqueeze(0), scored_targets[r0 : r0 + n], v0,
                           ignore_index, softcap, temperature, state[r0 : r0 + n])
    fields = compare_finish(state, scored_targets, ignore_index, temperature)
    return _scatter_compare(fields, rows, N)
