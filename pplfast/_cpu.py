"""``backend="cpu"``: both ops on the native kernels of ``pplfast._C`` (csrc/cpu), end to end.

Logits path: the kernel reads fp32/fp16/bf16 logits in place through their strides; this module
only allocates the output and passes pointers.

Hidden-states path: the vocabulary is cut into tiles and the (scored) tokens into chunks. Each
(chunk, tile) pair is one GEMM into a single reused float32 buffer, folded at once into a per-row
running state (max, sum of exp, target logit) by :func:`lse_update`; :func:`lse_finish` turns the
state into NLL. The loop runs tiles outside and chunks inside, so the weight (the large operand)
is read once and only the hidden states are re-read, once per tile. Tile sizes are chosen so that
every temporary (logits buffer, float32 copies of fp16/bf16 operand tiles, gathered rows) fits in
the budget (``PPLFAST_CPU_CHUNK_MB``, default 32 MiB); beyond that the extra memory is the O(N)
state (20 bytes per scored row) and the output.
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


def token_nll(logits3, targets, ignore_index, softcap, temperature) -> torch.Tensor:
    B, T, V = logits3.shape
    out = torch.empty(B * T, dtype=torch.float32)
    sB, sT, sV = logits3.stride()
    _C.token_nll(
        logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], B, T, V, sB, sT, sV,
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
        out.data_ptr(), _threads(),
    )
    return out


def new_state(rows: int):
    """Running state for :func:`lse_update`: (row_max=-inf, row_sum=0, target_logit=0): the
    maximum of the soft-capped logits y, the sum of exp((y - row_max) / temperature) and the
    soft-capped target logit."""
    return (
        torch.full((rows,), float("-inf"), dtype=torch.float32),
        torch.zeros(rows, dtype=torch.float64),
        torch.zeros(rows, dtype=torch.float64),
    )


def lse_update(logits2, targets, v_offset, ignore_index, softcap, temperature,
               row_max, row_sum, target_logit) -> None:
    """Fold a ``(n, Vc)`` slab of logits (vocabulary columns ``v_offset ...``) into the state."""
    n, Vc = logits2.shape
    for name, t, dtype in (("row_max", row_max, torch.float32), ("row_sum", row_sum, torch.float64),
                           ("target_logit", target_logit, torch.float64),
                           ("targets", targets, torch.int64)):
        if t.dtype != dtype or t.shape != (n,) or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU ({n},) {dtype} tensor")
    s_row, s_col = logits2.stride()
    _C.lse_update(
        logits2.data_ptr(), _DTYPE_CODE[logits2.dtype], n, Vc, s_row, s_col, int(v_offset),
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
        row_max.data_ptr(), row_sum.data_ptr(), target_logit.data_ptr(), _threads(),
    )


def lse_finish(row_max, row_sum, target_logit, targets, ignore_index,
               temperature) -> torch.Tensor:
    """NLL (float32) from the running state folded with ``temperature``:
    ``(row_max - target_logit) / temperature + log(row_sum)``; 0 where ``targets ==
    ignore_index``."""
    n = targets.shape[0]
    out = torch.empty(n, dtype=torch.float32)
    _C.lse_finish(row_max.data_ptr(), row_sum.data_ptr(), target_logit.data_ptr(),
                  targets.data_ptr(), ignore_index, n, temperature, out.data_ptr())
    return out


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
    row_max, row_sum, target_logit = new_state(n_scored)
    for logits, v0, r0, n in logit_tiles(hidden2, weight, bias, rows, n_scored, budget):
        lse_update(logits, targets[r0 : r0 + n], v0, ignore_index, softcap, temperature,
                   row_max[r0 : r0 + n], row_sum[r0 : r0 + n], target_logit[r0 : r0 + n])
    nll = lse_finish(row_max, row_sum, target_logit, targets, ignore_index, temperature)
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


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    B, T, V = logits3.shape
    out = _stats_outputs(B * T, top_k)
    sB, sT, sV = logits3.stride()
    _C.token_stats(
        logits3.data_ptr(), _DTYPE_CODE[logits3.dtype], B, T, V, sB, sT, sV,
        targets.data_ptr(), ignore_index, _softcap_arg(softcap), temperature, top_k,
        *(t.data_ptr() for t in out), _threads(),
    )
    return out


def _target_thresholds(hidden2, weight, bias, targets, rows, softcap, step):
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
    k = top_k
    state = (
        torch.full((n,), float("-inf")), torch.zeros(n, dtype=torch.float64),
        torch.zeros(n, dtype=torch.float64), torch.full((n,), float("-inf")),
        torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.float64), torch.full((n, k), float("-inf")),
        torch.full((n, k), -1, dtype=torch.int64),
    )
    budget = _env.budget_bytes(_env.CPU_CHUNK_MB, _env.DEFAULT_CPU_CHUNK_MB, budget_mb)
    if n:
        step = max(1, budget // max(1, 8 * hidden2.shape[1]))
        threshold = _target_thresholds(hidden2, weight, bias, scored_targets, rows, softcap,
                                       step)
        for logits, v0, r0, m in logit_tiles(hidden2, weight, bias, rows, n, budget):
            s_row, s_col = logits.stride()
            _C.stats_update(
                logits.data_ptr(), _C.FLOAT32, m, logits.shape[1], s_row, s_col, v0,
                scored_targets[r0:].data_ptr(), ignore_index, _softcap_arg(softcap), temperature,
                threshold[r0:].data_ptr(), k, *(s[r0:].data_ptr() for s in state), _threads(),
            )
    scored = _stats_outputs(n, k)
    row_max, row_sum, row_ent, _, amax_idx, rank, target_logit, top_vals, top_ids = state
    _C.stats_finish(
        row_max.data_ptr(), row_sum.data_ptr(), row_ent.data_ptr(), amax_idx.data_ptr(),
        rank.data_ptr(), target_logit.data_ptr(), scored_targets.data_ptr(), ignore_index, n, k,
        temperature, *(t.data_ptr() for t in scored[:5]), top_ids.data_ptr(),
        top_vals.data_ptr(),
    )
    scored = (*scored[:5], top_ids, top_vals)
    if rows is None:
        return scored
    fills = (0.0, 0.0, 0.0, -1, -1, -1, 0.0)
    for full, part, fill in zip(out, scored, fills):
        full.fill_(fill).index_copy_(0, rows, part)
    return out


# ---- two models at once: compare / linear_compare ----------------------------------------------

def compare_state(rows: int) -> torch.Tensor:
    """Fresh running state of :func:`compare_update`: ``(rows, _C.COMPARE_STATE)`` float64."""
    state = torch.empty((rows, _C.COMPARE_STATE), dtype=torch.float64)
    _C.compare_init(state.data_ptr(), rows)
    return state


def compare_update(base3, test3, targets, v_offset, ignore_index, softcap, temperature,
                   state) -> None:
    """Fold ``(B, T, Vc)`` slabs of both models' logits (vocabulary columns ``v_offset ...``)
    into ``state`` (rows ``B * T``); both tensors any strides and dtype."""
    B, T, Vc = base3.shape
    if test3.shape != base3.shape:
        raise ValueError(f"test slab {tuple(test3.shape)} differs from base {tuple(base3.shape)}")
    if (state.dtype != torch.float64 or state.shape != (B * T, _C.COMPARE_STATE)
            or not state.is_contiguous() or targets.shape != (B * T,)
            or targets.dtype != torch.int64 or not targets.is_contiguous()):
        raise ValueError(f"state must be a contiguous ({B * T}, {_C.COMPARE_STATE}) float64 "
                         f"tensor and targets a contiguous ({B * T},) int64 tensor")
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
