"""Chunked hidden-states paths: per-token NLL of ``hidden @ weight.T + bias`` within a memory budget.

CPU (``backend="cpu"``): the vocabulary is cut into tiles and the (scored) tokens into chunks.
Each (chunk, tile) pair is one GEMM into a single reused float32 buffer, folded at once into a
per-row running state (max, sum of exp, target logit) by the native kernel
``pplfast._cpu.lse_update``; ``lse_finish`` turns the state into NLL. The loop runs tiles outside
and chunks inside, so the weight (the large operand) is read once and only the hidden states are
re-read, once per tile. Tile sizes are chosen so that every temporary (logits buffer, float32
copies of fp16/bf16 operand tiles, gathered rows) fits in the budget; beyond that the extra
memory is the O(N) state (20 bytes per scored row) and the output.

GPU chunked path (``chunked_linear_token_nll``): the hidden-states path of ``backend="cuda"``
and the fallback of ``backend="triton"`` on GPUs the fused kernel does not cover. Token chunks,
one GEMM per chunk into a reused buffer, reduced by a logits launcher (the CUDA backend's
``token_nll`` or ``pplfast.kernels.token_nll.token_nll_forward``). The buffer is float32 where
PyTorch has an fp32-output GEMM for the inputs (``torch.mm(..., out_dtype=torch.float32)``, on
CUDA), so fp16/bf16 logits are not rounded to the input dtype; elsewhere it is in the input
dtype, as ``F.linear`` gives the logits. Extra memory is the fixed chunk buffer plus O(N).

Environment (read at call time):

==========================  =======================================================================
``PPLFAST_CPU_CHUNK_MB``    CPU path: budget in MiB for all temporaries (default 32).
``PPLFAST_GPU_CHUNK_MB``    GPU path: budget in MiB for one chunk of logits (default 256).
==========================  =======================================================================
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

ENV_CPU_CHUNK_MB = "PPLFAST_CPU_CHUNK_MB"
ENV_GPU_CHUNK_MB = "PPLFAST_GPU_CHUNK_MB"
DEFAULT_CPU_CHUNK_MB = 32
DEFAULT_GPU_CHUNK_MB = 256

# Preferred CPU tile: 2048 tokens x 2048 vocabulary entries (a 16 MiB float32 buffer). Smaller
# tiles cost x86 BLAS 10-30% of its rate (operand packing per call); this one runs at or above
# the rate of one full-size GEMM and its buffer still sits in a server L3 for the reduction pass.
_CPU_ROWS = 2048
_CPU_COLS = 2048
_MIN_COLS = 16


def _budget_bytes(env: str, default_mb: float, budget_mb: Optional[float]) -> int:
    source = "budget_mb"
    if budget_mb is None:
        raw = os.environ.get(env, "")
        source = env if raw else "the default budget"
        try:
            budget_mb = float(raw) if raw else default_mb
        except ValueError:
            raise ValueError(f"{env} must be a number of MiB, got {raw!r}") from None
    if not budget_mb > 0:  # also catches NaN
        raise ValueError(f"{source} must be > 0 MiB, got {budget_mb!r}")
    return int(budget_mb * (1 << 20))


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


def cpu_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                         *, budget_mb: Optional[float] = None) -> torch.Tensor:
    """CPU launcher behind ``linear_token_nll(..., backend="cpu")``.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16, any row stride.
        weight: ``(V, D)``, same dtype; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 contiguous, in ``[0, V)`` or ``== ignore_index``.
        ignore_index, softcap (None or > 0), temperature (> 0): as in ``token_nll``.
        budget_mb: MiB for temporaries; default ``PPLFAST_CPU_CHUNK_MB`` or 32.

    Returns:
        ``(N,)`` float32 NLL, equal to
        ``F.cross_entropy(z.double(), targets, reduction="none", ignore_index=ignore_index)``
        with ``z = (F.linear(hidden2, weight, bias))`` soft-capped and divided by temperature.
    """
    from . import _cpu

    return chunked_cpu(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                       update=_cpu.lse_update, finish=_cpu.lse_finish,
                       budget=_budget_bytes(ENV_CPU_CHUNK_MB, DEFAULT_CPU_CHUNK_MB, budget_mb))


def _scored_rows(targets: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows to score, or None when every row is scored (no gather needed)."""
    scored = targets != ignore_index
    if bool(scored.all()):
        return None
    return scored.nonzero().squeeze(1)


def _select_scored(targets: torch.Tensor, ignore_index: int):
    """``(rows, scored_targets)``: :func:`_scored_rows` and the targets of those rows.

    Ignored rows cost no GEMM; the caller returns zeros when ``scored_targets`` is empty and
    scatters the NLL of the scored rows back with :func:`_scatter_scored`.
    """
    rows = _scored_rows(targets, ignore_index)
    return rows, (targets if rows is None else targets.index_select(0, rows))


def _scatter_scored(out: torch.Tensor, rows: Optional[torch.Tensor],
                    nll: torch.Tensor) -> torch.Tensor:
    if rows is None:
        return nll
    return out.index_copy_(0, rows, nll)


def chunked_cpu(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                update: Callable, finish: Callable, budget: int) -> torch.Tensor:
    """Tiled GEMM + running-state reduction; ``update``/``finish`` follow ``_cpu.lse_update``."""
    N, D = hidden2.shape
    V = weight.shape[0]
    out = torch.zeros(N, dtype=torch.float32)
    rows, targets = _select_scored(targets, ignore_index)
    if targets.numel() == 0:
        return out
    n_scored = targets.shape[0]
    upcast = hidden2.dtype != torch.float32
    gather_bytes = 0 if rows is None else hidden2.element_size()
    n_max, c_max = cpu_tile_sizes(n_scored, V, D, upcast=upcast, gather_bytes=gather_bytes,
                                  budget=budget)

    logits_buf = torch.empty(n_max * c_max, dtype=torch.float32)
    if upcast:
        # fp16/bf16 products are exact in float32; a float32 GEMM then leaves only the
        # accumulation error, well below that of rounding the logits to fp16/bf16
        weight_buf = torch.empty(c_max * D, dtype=torch.float32)
        hidden_buf = torch.empty(n_max * D, dtype=torch.float32)
    fused_bias = bias is not None and bias.dtype == torch.float32
    row_max = torch.full((n_scored,), float("-inf"), dtype=torch.float32)
    row_sum = torch.zeros(n_scored, dtype=torch.float64)
    target_logit = torch.zeros(n_scored, dtype=torch.float64)

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
                h_tile = hidden2.index_select(0, rows[r0 : r0 + n])
            if upcast:
                h_tile = hidden_buf[: n * D].view(n, D).copy_(h_tile)
            logits = logits_buf[: n * c].view(n, c)
            if fused_bias:
                torch.addmm(b_tile, h_tile, w_tile.T, out=logits)
            else:
                torch.matmul(h_tile, w_tile.T, out=logits)
                if b_tile is not None:
                    logits.add_(b_tile)
            update(logits, targets[r0 : r0 + n], v0, ignore_index, softcap, temperature,
                   row_max[r0 : r0 + n], row_sum[r0 : r0 + n], target_logit[r0 : r0 + n])
            del h_tile

    nll = finish(row_max, row_sum, target_logit, targets, ignore_index)
    return _scatter_scored(out, rows, nll)


def fp32_out_gemm_available() -> bool:
    """Whether this PyTorch has ``torch.mm(..., out_dtype=...)`` at all (on CUDA, in practice:
    other devices refuse it at run time, which the chunked path handles)."""
    return hasattr(torch.ops.aten.mm, "dtype_out")


def gpu_chunk_rows(V: int, element_size: int, budget: int) -> int:
    """Token rows per chunk of ``V``-wide logits of ``element_size`` bytes within ``budget``."""
    step = max(1, budget // max(1, V * element_size))
    if step >= 128:
        step -= step % 128  # whole GEMM tiles
    return step


class _Fp32OutGemmRefused(Exception):
    """The first fp16/bf16 -> float32 GEMM was refused for these tensors."""


def chunked_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                             *, launcher: Optional[Callable] = None,
                             budget_mb: Optional[float] = None,
                             logits_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Chunked GEMM + fused logits reduction, for any device and dtype (the GPU hidden path).

    The scored rows are cut into chunks (whole multiples of 128 rows where the budget allows);
    each chunk's logits come from one GEMM into a single reused buffer and its NLL from
    ``launcher``, which follows the ``token_nll`` launcher interface of ``pplfast._dispatch``
    (default: the Triton ``pplfast.kernels.token_nll.token_nll_forward``). The buffer is float32
    by default: float32 inputs get an fp32 GEMM; float16/bfloat16 inputs get
    ``torch.mm(h, w.T, out_dtype=torch.float32)`` (fp32 accumulation *and* output, so no logit is
    rounded to 8 or 11 bits as ``F.linear`` in that dtype rounds them) with the bias added in
    float32. Where PyTorch refuses that GEMM for these tensors (no ``out_dtype`` overload, or a
    device without it, such as the CPU), the first chunk's refusal switches the buffer to the
    input dtype: then the logits are exactly those of ``F.linear``. Extra memory is the chunk
    buffer plus O(N), never N x V.

    Args/Returns: as :func:`cpu_linear_token_nll`, plus

        launcher: ``launcher(logits3, targets, ignore_index, softcap, temperature) -> (B*T,)``
            float32 NLL.
        budget_mb: MiB for one chunk of logits (default ``PPLFAST_GPU_CHUNK_MB`` or 256).
        logits_dtype: dtype of the logits buffer, overriding the choice above; a float32 buffer
            for fp16/bf16 inputs then raises where PyTorch refuses the fp32-output GEMM.
    """
    if launcher is None:
        from .kernels.token_nll import token_nll_forward as launcher
    budget = _budget_bytes(ENV_GPU_CHUNK_MB, DEFAULT_GPU_CHUNK_MB, budget_mb)
    N = hidden2.shape[0]
    out = torch.zeros(N, dtype=torch.float32, device=hidden2.device)
    rows, targets = _select_scored(targets, ignore_index)
    if targets.numel() == 0:
        return out
    args = (hidden2, weight, bias, targets, rows, ignore_index, softcap, temperature, launcher,
            budget)
    if logits_dtype is not None:
        nll = _chunk_loop(*args, logits_dtype)
    elif hidden2.dtype == torch.float32 or not fp32_out_gemm_available():
        nll = _chunk_loop(*args, hidden2.dtype)
    else:
        try:
            nll = _chunk_loop(*args, torch.float32, refusable=True)
        except _Fp32OutGemmRefused:
            nll = _chunk_loop(*args, hidden2.dtype)
    return _scatter_scored(out, rows, nll)


def _chunk_loop(hidden2, weight, bias, targets, rows, ignore_index, softcap, temperature,
                launcher, budget: int, logits_dtype: torch.dtype, *,
                refusable: bool = False) -> torch.Tensor:
    """NLL of the scored rows (``rows``, None for all; ``targets`` already gathered)."""
    V = weight.shape[0]
    device = hidden2.device
    n_scored = targets.shape[0]
    element = torch.empty((), dtype=logits_dtype).element_size()
    step = gpu_chunk_rows(V, element, budget)
    mixed = logits_dtype != hidden2.dtype
    buf = torch.empty(min(step, n_scored) * V, dtype=logits_dtype, device=device)
    b = None if bias is None else bias.to(logits_dtype)
    wt = weight.t()
    nll = torch.empty(n_scored, dtype=torch.float32, device=device)
    for r0 in range(0, n_scored, step):
        n = min(step, n_scored - r0)
        h = hidden2[r0 : r0 + n] if rows is None else hidden2.index_select(0, rows[r0 : r0 + n])
        z = buf[: n * V].view(n, V)
        if mixed:
            try:
                torch.mm(h, wt, out_dtype=logits_dtype, out=z)
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                if refusable and r0 == 0:
                    raise _Fp32OutGemmRefused() from exc
                raise
            if b is not None:
                z.add_(b)
        elif b is None:
            torch.mm(h, wt, out=z)
        else:
            torch.addmm(b, h, wt, out=z)
        nll[r0 : r0 + n] = launcher(z.unsqueeze(0), targets[r0 : r0 + n], ignore_index, softcap,
                                    temperature)
    return nll


# ---- two models at once: linear_compare ---------------------------------------------------------

def cpu_linear_compare(hidden_base, weight_base, bias_base, hidden_test, weight_test, bias_test,
                       targets, ignore_index, softcap, temperature, *,
                       budget_mb: Optional[float] = None):
    """CPU launcher behind ``linear_compare(..., backend="cpu")``: the tile loop of
    :func:`chunked_cpu` with two GEMMs per tile (one per model) into two reused float32 buffers,
    folded together into the two-row running state of ``pplfast._cpu.compare_update``.

    Returns ``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)``, each ``(N,)``.
    """
    from . import _cpu

    budget = _budget_bytes(ENV_CPU_CHUNK_MB, DEFAULT_CPU_CHUNK_MB, budget_mb)
    N = hidden_base.shape[0]
    V = weight_base.shape[0]
    rows, targets_s = _select_scored(targets, ignore_index)
    n_scored = targets_s.shape[0]
    models = [(hidden_base, weight_base, bias_base), (hidden_test, weight_test, bias_test)]
    D = max(h.shape[1] for h, _, _ in models)
    upcast = any(h.dtype != torch.float32 for h, _, _ in models)
    gather = 0 if rows is None else max(h.element_size() for h, _, _ in models)
    # two models share the budget: size one model's tile within half of it
    n_max, c_max = cpu_tile_sizes(max(n_scored, 1), V, D, upcast=upcast, gather_bytes=gather,
                                  budget=budget // 2)
    state = _cpu.compare_state(n_scored)
    bufs = []
    for h, w, _ in models:
        d = h.shape[1]
        up = h.dtype != torch.float32
        bufs.append((torch.empty(n_max * c_max, dtype=torch.float32),
                     torch.empty(c_max * d, dtype=torch.float32) if up else None,
                     torch.empty(n_max * d, dtype=torch.float32) if up else None))

    def tile_logits(k, v0, c, r0, n, w_tile):
        h, w, b = models[k]
        logits_buf, _, hidden_buf = bufs[k]
        d = h.shape[1]
        h_tile = h[r0 : r0 + n] if rows is None else h.index_select(0, rows[r0 : r0 + n])
        if hidden_buf is not None:
            h_tile = hidden_buf[: n * d].view(n, d).copy_(h_tile)
        z = logits_buf[: n * c].view(n, c)
        torch.matmul(h_tile, w_tile.T, out=z)
        if b is not None:
            z.add_(b[v0 : v0 + c])
        return z

    for v0 in range(0, V if n_scored else 0, c_max):
        c = min(c_max, V - v0)
        w_tiles = []
        for (h, w, _), (_, weight_buf, _) in zip(models, bufs):
            d = h.shape[1]
            w_tile = w[v0 : v0 + c]
            if weight_buf is not None:
                w_tile = weight_buf[: c * d].view(c, d).copy_(w_tile)
            w_tiles.append(w_tile)
        for r0 in range(0, n_scored, n_max):
            n = min(n_max, n_scored - r0)
            zb = tile_logits(0, v0, c, r0, n, w_tiles[0])
            zt = tile_logits(1, v0, c, r0, n, w_tiles[1])
            _cpu.compare_update(zb.unsqueeze(0), zt.unsqueeze(0), targets_s[r0 : r0 + n], v0,
                                ignore_index, softcap, temperature, state[r0 : r0 + n])
    fields = _cpu.compare_finish(state, targets_s, ignore_index)
    return _scatter_compare(fields, rows, N, torch.device("cpu"))


def _scatter_compare(fields, rows, N, device):
    if rows is None:
        return fields
    out = []
    for f in fields:
        fill = -1 if f.dtype == torch.int64 else 0
        full = torch.full((N,), fill, dtype=f.dtype, device=device)
        out.append(full.index_copy_(0, rows, f))
    return tuple(out)


def chunked_linear_compare(hidden_base, weight_base, bias_base, hidden_test, weight_test,
                           bias_test, targets, ignore_index, softcap, temperature, *,
                           launcher: Callable, budget_mb: Optional[float] = None):
    """The GPU hidden path of ``linear_compare``: chunks of scored rows, two GEMMs per chunk into
    two reused float32 buffers (``torch.mm(..., out_dtype=torch.float32)`` for fp16/bf16 where
    PyTorch has it, else the input dtype, as :func:`chunked_linear_token_nll`), reduced by the
    logits launcher ``launcher(base3, test3, targets, ignore_index, softcap, temperature)``.
    Extra memory: two chunks of logits (``PPLFAST_GPU_CHUNK_MB`` each) plus O(N)."""
    budget = _budget_bytes(ENV_GPU_CHUNK_MB, DEFAULT_GPU_CHUNK_MB, budget_mb)
    device = hidden_base.device
    N = hidden_base.shape[0]
    V = weight_base.shape[0]
    rows, targets_s = _select_scored(targets, ignore_index)
    n_scored = targets_s.shape[0]
    step = gpu_chunk_rows(V, 4, budget)
    models = [(hidden_base, weight_base, bias_base), (hidden_test, weight_test, bias_test)]
    bufs, dtypes = [], []
    for h, _, _ in models:
        dt = torch.float32 if (h.dtype == torch.float32 or fp32_out_gemm_available()) else h.dtype
        dtypes.append(dt)
        bufs.append(torch.empty(min(step, max(n_scored, 1)) * V, dtype=dt, device=device))
    outs = [torch.empty(n_scored, dtype=torch.float32, device=device) for _ in range(4)]
    outs += [torch.empty(n_scored, dtype=torch.int64, device=device) for _ in range(2)]

    def chunk_logits(k, r0, n):
        h, w, b = models[k]
        z = bufs[k][: n * V].view(n, V)
        x = h[r0 : r0 + n] if rows is None else h.index_select(0, rows[r0 : r0 + n])
        if z.dtype != h.dtype:
            try:
                torch.mm(x, w.t(), out_dtype=z.dtype, out=z)
            except (RuntimeError, TypeError, NotImplementedError):
                # no fp32-output GEMM for these tensors: exactly the logits of F.linear, upcast
                return z.copy_(torch.nn.functional.linear(x, w, b))
        else:
            torch.mm(x, w.t(), out=z)
        if b is not None:
            z.add_(b.to(z.dtype))
        return z

    for r0 in range(0, n_scored, step):
        n = min(step, n_scored - r0)
        zb, zt = chunk_logits(0, r0, n), chunk_logits(1, r0, n)
        for out, f in zip(outs, launcher(zb.unsqueeze(0), zt.unsqueeze(0),
                                         targets_s[r0 : r0 + n], ignore_index, softcap,
                                         temperature)):
            out[r0 : r0 + n] = f
    return _scatter_compare(outs, rows, N, device)
