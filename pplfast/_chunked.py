"""The chunked GEMM hidden-states path shared by the GPU backends, and the scored-row helpers.

Per-token NLL of ``hidden @ weight.T + bias`` within a memory budget: the scored tokens are cut
into chunks; each chunk's logits come from one GEMM into a single reused buffer and are reduced
at once by a logits launcher (the ``token_nll`` launcher of the calling backend), so the extra
memory is one chunk (``PPLFAST_GPU_CHUNK_MB``, default 256 MiB) plus O(N), never N x V. It is the
hidden-states path of ``backend="cuda"`` and the fallback of ``backend="triton"`` on GPUs the
fused kernel does not cover.

The fp32-output GEMM (the one place this is explained; the backends point here). The logits
buffer is float32 by default:

- float32 inputs: an fp32 GEMM (IEEE products unless the caller enabled TF32 through
  ``torch.backends.cuda.matmul.allow_tf32``);
- float16 / bfloat16 inputs: ``torch.mm(h, w.T, out_dtype=torch.float32)``, cuBLAS with fp32
  accumulation *and* fp32 output. The same-dtype PyTorch path (``F.linear``) accumulates in fp32
  too but then rounds every logit to 8 (bf16) or 11 (fp16) bits; skipping that rounding makes
  this path strictly more accurate, for twice the buffer bytes per logit. A bias is added in
  float32. Where PyTorch refuses that GEMM for these tensors (no ``out_dtype`` overload, or a
  device without it, such as the CPU), the first chunk's refusal switches the buffer to the
  input dtype: then the logits are exactly those of ``F.linear``.

Scored rows. Rows whose target is ``ignore_index`` cost no GEMM: the caller (``pplfast._ops``)
counts the scored rows once per call, in the same host sync as the target-range check, and
hands the launchers ``scored = (rows, targets of those rows)`` from :func:`_select_scored`;
``rows`` is None when every row is scored. Launchers called directly compute it themselves.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from . import _env

Scored = Tuple[Optional[torch.Tensor], torch.Tensor]


def _select_scored(targets: torch.Tensor, ignore_index: int, *,
                   mask: Optional[torch.Tensor] = None, count: Optional[int] = None) -> Scored:
    """``(rows, scored_targets)``: indices of the rows to score (None when every row is scored)
    and the targets of those rows.

    ``mask`` (``targets != ignore_index``) and ``count`` (its number of True elements) are reused
    when the caller has them; without ``count`` this makes one host sync (the count sizes the
    gather). Ignored rows cost no GEMM: the caller returns zeros when ``scored_targets`` is empty
    and scatters the NLL of the scored rows back with :func:`_scatter_scored`.
    """
    if mask is None:
        mask = targets != ignore_index
    if count is None:
        count = int(mask.sum())
    if count == targets.numel():
        return None, targets
    try:  # nonzero_static knows its size, so it needs no second sync
        rows = torch.nonzero_static(mask, size=count).squeeze(1)
    except NotImplementedError:  # older PyTorch builds have it on the CPU only
        rows = mask.nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


def _scatter_scored(out: torch.Tensor, rows: Optional[torch.Tensor],
                    nll: torch.Tensor) -> torch.Tensor:
    if rows is None:
        return nll
    return out.index_copy_(0, rows, nll)


def _scatter_fields(fields, rows: Optional[torch.Tensor], N: int) -> tuple:
    """Per-row fields of the scored rows (``(n, ...)`` tensors, or None) scattered into
    ``(N, ...)`` tensors: 0 (float) and -1 (int64) at the ignored rows; None stays None."""
    if rows is None:
        return tuple(fields)
    out = []
    for f in fields:
        if f is None:
            out.append(None)
            continue
        fill = -1 if f.dtype == torch.int64 else 0
        full = torch.full((N, *f.shape[1:]), fill, dtype=f.dtype, device=f.device)
        out.append(full.index_copy_(0, rows, f))
    return tuple(out)


def _scatter_compare(fields, rows: Optional[torch.Tensor], N: int):
    """The six comparison fields of the scored rows scattered into ``(N,)`` tensors: 0 (float)
    and -1 (int64) at the ignored rows."""
    return _scatter_fields(fields, rows, N)


def fp32_out_gemm_available() -> bool:
    """Whether this PyTorch has ``torch.mm(..., out_dtype=...)`` at all (on CUDA, in practice:
    other devices refuse it at run time, which the chunk loop handles)."""
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
                             *, launcher: Callable, budget_mb: Optional[float] = None,
                             logits_dtype: Optional[torch.dtype] = None,
                             scored: Optional[Scored] = None) -> torch.Tensor:
    """Chunked GEMM + fused logits reduction, for any device and dtype (the GPU hidden path).

    The scored rows are cut into chunks (whole multiples of 128 rows where the budget allows);
    each chunk's logits come from one GEMM into a single reused buffer (float32 by default, see
    the module docstring) and its NLL from ``launcher``. Extra memory is the chunk buffer plus
    O(N), never N x V.

    Args:
        hidden2: ``(N, D)`` float32/float16/bfloat16, any row stride.
        weight: ``(V, D)``, same dtype; bias: ``(V,)`` or None.
        targets: ``(N,)`` int64 contiguous, in ``[0, V)`` or ``== ignore_index``.
        ignore_index, softcap (None or > 0), temperature (> 0): as in ``token_nll``.
        launcher: ``launcher(logits3, targets, ignore_index, softcap, temperature) -> (B*T,)``
            float32 NLL, the ``token_nll`` launcher interface of ``pplfast._dispatch``.
        budget_mb: MiB for one chunk of logits (default ``PPLFAST_GPU_CHUNK_MB`` or 256).
        logits_dtype: dtype of the logits buffer, overriding the default; a float32 buffer for
            fp16/bf16 inputs then raises where PyTorch refuses the fp32-output GEMM.
        scored: :func:`_select_scored` of ``targets``, when the caller has it.

    Returns:
        ``(N,)`` float32, equal to ``token_nll(F.linear(hidden2, weight, bias), targets, ...)``
        computed in float64 (up to the GEMM's rounding); 0 where the target is ignored.
    """
    budget = _env.budget_bytes(_env.GPU_CHUNK_MB, _env.DEFAULT_GPU_CHUNK_MB, budget_mb)
    N = hidden2.shape[0]
    out = torch.zeros(N, dtype=torch.float32, device=hidden2.device)
    rows, targets = scored if scored is not None else _select_scored(targets, ignore_index)
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
    nll = torch.empty(n_scored, dtype=torch.float32, device=device)
    for z, r0, n in _chunk_logits(hidden2, weight, bias, rows, n_scored, step, logits_dtype,
                                  refusable=refusable):
        nll[r0 : r0 + n] = launcher(z.unsqueeze(0), targets[r0 : r0 + n], ignore_index, softcap,
                                    temperature)
    return nll


def _chunk_logits(hidden2, weight, bias, rows, n_scored: int, step: int,
                  logits_dtype: torch.dtype, *, refusable: bool = False):
    """The chunk loop of :func:`_chunk_loop`, as a generator of ``(logits, r0, n)``: the
    ``(n, V)`` logits of scored rows ``r0 ... r0 + n`` (``rows``: their indices in ``hidden2``,
    None for all) in ``logits_dtype``, in one reused buffer that the caller reduces before asking
    for the next chunk. With ``refusable``, a refused fp32-output GEMM on the first chunk raises
    :class:`_Fp32OutGemmRefused` (the caller starts again in the input dtype)."""
    V = weight.shape[0]
    device = hidden2.device
    mixed = logits_dtype != hidden2.dtype
    buf = torch.empty(min(step, n_scored) * V, dtype=logits_dtype, device=device)
    b = None if bias is None else bias.to(logits_dtype)
    wt = weight.t()
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
        yield z, r0, n


def chunked_linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature,
                               top_k, *, launcher: Callable, budget_mb: Optional[float] = None,
                               scored: Optional[Scored] = None):
    """Statistics of ``F.linear(hidden2, weight, bias)`` on the GPU chunked path: the chunk loop
    of :func:`_chunk_loop` over the scored rows (ignored rows cost no GEMM), each chunk's logits
    from one GEMM into a reused buffer (float32 where PyTorch has the fp32-output GEMM, see the
    module docstring) reduced by ``launcher``, the ``token_stats`` launcher interface
    ``launcher(logits3, targets, ignore_index, softcap, temperature, top_k)``. ``scored``: as in
    :func:`chunked_linear_token_nll`. Extra memory: one chunk plus O(N · top_k).

    Returns ``(nll, entropy, max_logprob, argmax, rank, top_k_ids, top_k_logprobs)``, ``(N,)``
    and ``(N, top_k)`` (None when ``top_k == 0``); ignored rows 0 (float) and -1 (int64).
    """
    budget = _env.budget_bytes(_env.GPU_CHUNK_MB, _env.DEFAULT_GPU_CHUNK_MB, budget_mb)
    device = hidden2.device
    N = hidden2.shape[0]
    V = weight.shape[0]
    rows, targets = scored if scored is not None else _select_scored(targets, ignore_index)
    n_scored = targets.shape[0]
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    k = (top_k,) if top_k else None
    outs = [torch.empty(n_scored, **f32) for _ in range(3)]
    outs += [torch.empty(n_scored, **i64) for _ in range(2)]
    outs += [None, None] if k is None else [torch.empty((n_scored, *k), **i64),
                                            torch.empty((n_scored, *k), **f32)]
    fp32_out = hidden2.dtype == torch.float32 or fp32_out_gemm_available()
    dtype = torch.float32 if fp32_out else hidden2.dtype
    while n_scored:
        step = gpu_chunk_rows(V, torch.empty((), dtype=dtype).element_size(), budget)
        chunks = _chunk_logits(hidden2, weight, bias, rows, n_scored, step, dtype,
                               refusable=dtype != hidden2.dtype)
        try:
            for z, r0, n in chunks:
                fields = launcher(z.unsqueeze(0), targets[r0 : r0 + n], ignore_index, softcap,
                                  temperature, top_k)
                for out, f in zip(outs, fields):
                    if out is not None:
                        out[r0 : r0 + n] = f
            break
        except _Fp32OutGemmRefused:
            # no fp32-output GEMM for these tensors: logits in the input dtype, as F.linear
            dtype = hidden2.dtype
    return _scatter_fields(outs, rows, N)


def chunked_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                           bias_test, targets, ignore_index, softcap, temperature, *,
                           launcher: Callable, budget_mb: Optional[float] = None,
                           scored: Optional[Scored] = None):
    """The GPU hidden path of ``linear_compare``: the chunk loop of :func:`_chunk_loop` for each
    model in lockstep (the same rows per chunk), two GEMMs per chunk into two reused buffers
    (float32 where PyTorch has the fp32-output GEMM, see the module docstring), reduced by the
    logits launcher ``launcher(base3, test3, targets, ignore_index, softcap, temperature)``.
    Extra memory: two chunks of logits (``PPLFAST_GPU_CHUNK_MB`` each) plus O(N).

    Returns ``(kl, kl_reverse, nll_base, nll_test, argmax_base, argmax_test)``, each ``(N,)``.
    """
    budget = _env.budget_bytes(_env.GPU_CHUNK_MB, _env.DEFAULT_GPU_CHUNK_MB, budget_mb)
    device = hidden2_base.device
    N = hidden2_base.shape[0]
    V = weight_base.shape[0]
    rows, targets = scored if scored is not None else _select_scored(targets, ignore_index)
    n_scored = targets.shape[0]
    step = gpu_chunk_rows(V, 4, budget)
    models = ((hidden2_base, weight_base, bias_base), (hidden2_test, weight_test, bias_test))
    fp32_out = fp32_out_gemm_available()
    dtypes = [torch.float32 if fp32_out else h.dtype for h, _, _ in models]
    outs = [torch.empty(n_scored, dtype=torch.float32, device=device) for _ in range(4)]
    outs += [torch.empty(n_scored, dtype=torch.int64, device=device) for _ in range(2)]
    while True:
        chunks = [_chunk_logits(h, w, b, rows, n_scored, step, dt, refusable=dt != h.dtype)
                  for (h, w, b), dt in zip(models, dtypes)]
        try:
            for (zb, r0, n), (zt, _, _) in zip(*chunks):
                fields = launcher(zb.unsqueeze(0), zt.unsqueeze(0), targets[r0 : r0 + n],
                                  ignore_index, softcap, temperature)
                for out, f in zip(outs, fields):
                    out[r0 : r0 + n] = f
            break
        except _Fp32OutGemmRefused:
            # no fp32-output GEMM for these tensors: logits in each model's input dtype,
            # exactly those of F.linear
            dtypes = [h.dtype for h, _, _ in models]
    return _scatter_compare(outs, rows, N)
