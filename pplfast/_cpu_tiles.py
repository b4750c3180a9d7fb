"""``backend="cpu"``'s tile loop of the hidden-states ops: the tile sizes within a memory
budget, the generator of float32 logit tiles (one GEMM per tile into one reused buffer), and the
target logits that the rank compares against. Plain PyTorch: ``pplfast._cpu`` folds the tiles into
the native kernels' running states.
"""
from __future__ import annotations

from typing import Optional

import torch

# Preferred tile: 2048 tokens x 2048 vocabulary entries (a 16 MiB float32 buffer). Smaller tiles
# cost x86 BLAS 10-30% of its rate (operand packing per call); this one runs at or above the rate
# of one full-size GEMM and its buffer still sits in a server L3 for the reduction pass.
_CPU_ROWS = 2048
_CPU_COLS = 2048
_MIN_COLS = 16


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


def target_thresholds(hidden2, weight, bias, targets, rows, softcap, budget):
    """Each scored row's soft-capped target logit (float32), the rank's threshold: one dot
    product per row in float32, as the tiles' GEMM computes it, soft-capped in float64 (the
    temperature, increasing, orders nothing differently); rows in steps whose float64 products
    fit ``budget`` bytes."""
    step = max(1, budget // max(1, 8 * hidden2.shape[1]))
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
