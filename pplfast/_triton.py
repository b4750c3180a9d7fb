"""``backend="triton"``: every op of the Triton backend, end to end.

Imported only when the backend is asked for (``pplfast._dispatch``), so that ``import pplfast``
never imports triton. The kernels and their launchers (``pplfast.kernels``) read nothing from
the environment or the package: this module reads the switches (``pplfast._env``: autotuning,
TF32, the SM count) and passes them on, and decides which path runs.

Hidden-states op, paths:

- the fused kernel (``kernels/linear_token_nll.py``, logits never in memory) for float16 and
  bfloat16 inputs, and for float32 inputs when TF32 is asked for (``PPLFAST_ALLOW_TF32=1`` or
  ``torch.backends.cuda.matmul.allow_tf32``), on GPUs of CUDA capability >= 8.0 and under the
  interpreter;
- otherwise the chunked GEMM path: one GEMM per chunk of tokens into a reused buffer, reduced by
  the Triton logits kernel. Float32 without TF32 goes there on purpose: IEEE float32 products
  run on the FMA units either way, and there cuBLAS's SGEMM (the chunked path's GEMM) is tuned
  for them while Triton lowers ``tl.dot(..., input_precision="ieee")`` to a generic FMA loop,
  expected to reach a fraction of SGEMM's rate; the chunk buffer costs one extra read and write
  of float32 logits, small beside an FMA-bound GEMM. No GPU measurement has compared the two
  yet: change this rule when one says otherwise (``pplfast bench --path linear --dtypes fp32
  --backend triton`` on a GPU times this path as ``pplfast[triton]`` beside the fused kernel
  with IEEE products as ``pplfast[triton-fused-fp32]``).
  GPUs below capability 8.0 have no tensor-core path the fused kernel is tuned for.

``linear_token_stats`` follows the same rule (:func:`fused_supported`) with
``kernels/linear_token_stats.py``, the NLL kernel's tiling with the statistics folded per tile
(entropy, max log-probability, argmax, rank; the NLL as the NLL kernel computes it), for
``top_k=0``.
Top-k is not folded into that kernel (a sorted k-list per row, k <= 64, merged per tile and per
split, would crowd out the tile's registers): ``top_k > 0`` takes the chunked GEMM path with the
logits statistics kernel, which reads each chunk's logits once more for ``torch.topk``.

Scored rows are counted once per call (``pplfast._chunked._select_scored``, by
``pplfast._ops`` or, for the statistics, here) and handed to either path, to the fused launchers
with ``all_scored`` when every row is scored, so that no launcher counts again (a second host
sync).
"""
from __future__ import annotations

import functools

import torch

from . import _env
from ._chunked import (_Fp32OutGemmRefused, _chunk_logits, _select_scored,
                       chunked_linear_compare, chunked_linear_token_nll,
                       chunked_linear_token_stats, fp32_out_gemm_available, gpu_chunk_rows)
from ._vocab_merge import inside, lse_words
from .kernels import partials as _partials
from .kernels import compare as _compare_kernels
from .kernels import token_nll as _token_nll_kernels
from .kernels import token_stats as _token_stats_kernels
from .kernels.compare import compare_forward
from .kernels.linear_token_nll import linear_token_nll_forward
from .kernels.linear_token_stats import linear_token_stats_forward
from .kernels.token_nll import token_nll_forward
from .kernels.token_stats import token_stats_forward


def _sm_count(tensor: torch.Tensor):
    return _env.sm_count(tensor.device) if tensor.is_cuda else None


def token_nll(logits3, targets, ignore_index, softcap, temperature):
    return token_nll_forward(logits3, targets, ignore_index, softcap, temperature,
                             sm_count=_sm_count(logits3), autotune=_env.autotune())


def fused_supported(hidden2: torch.Tensor, allow_tf32: bool) -> bool:
    """Whether the fused hidden-states kernel runs for these inputs (see the module notes)."""
    if hidden2.dtype == torch.float32 and not allow_tf32:
        return False
    if hidden2.is_cuda:
        return torch.cuda.get_device_capability(hidden2.device)[0] >= 8
    return _env.interpreting()


def linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap, temperature, *,
                     scored=None):
    """``scored``: ``(rows, scored_targets)`` from :func:`pplfast._chunked._select_scored` when
    the caller has them (rows None: every row is scored); found here otherwise."""
    allow_tf32 = _env.allow_tf32()
    if scored is None:
        scored = _select_scored(targets, ignore_index)
    if not fused_supported(hidden2, allow_tf32):
        launcher = functools.partial(token_nll_forward, sm_count=_sm_count(hidden2),
                                     autotune=_env.autotune())
        return chunked_linear_token_nll(hidden2, weight, bias, targets, ignore_index, softcap,
                                        temperature, launcher=launcher, scored=scored)
    return linear_token_nll_forward(hidden2, weight, bias, targets, ignore_index, softcap,
                                    temperature, sm_count=_sm_count(hidden2),
                                    allow_tf32=allow_tf32, autotune=_env.autotune(),
                                    rows=scored[0], all_scored=scored[0] is None)


def token_stats(logits3, targets, ignore_index, softcap, temperature, top_k):
    return token_stats_forward(logits3, targets, ignore_index, softcap, temperature, top_k,
                               sm_count=_sm_count(logits3))


def linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap, temperature, top_k,
                       *, scored=None):
    """The fused statistics kernel for ``top_k=0`` where :func:`fused_supported`, the chunked
    GEMM path with the logits statistics kernel otherwise (module notes); ``scored`` as in
    :func:`linear_token_nll`."""
    allow_tf32 = _env.allow_tf32()
    if scored is None:
        scored = _select_scored(targets, ignore_index)
    if top_k == 0 and fused_supported(hidden2, allow_tf32):
        fields = linear_token_stats_forward(hidden2, weight, bias, targets, ignore_index, softcap,
                                            temperature, sm_count=_sm_count(hidden2),
                                            allow_tf32=allow_tf32, rows=scored[0],
                                            all_scored=scored[0] is None)
        return (*fields, None, None)
    launcher = functools.partial(token_stats_forward, sm_count=_sm_count(hidden2))
    return chunked_linear_token_stats(hidden2, weight, bias, targets, ignore_index, softcap,
                                      temperature, top_k, launcher=launcher, scored=scored)


def compare(logits3_base, logits3_test, targets, ignore_index, softcap, temperature):
    return compare_forward(logits3_base, logits3_test, targets, ignore_index, softcap,
                           temperature, sm_count=_sm_count(logits3_base))


def linear_compare(hidden2_base, weight_base, bias_base, hidden2_test, weight_test, bias_test,
                   targets, ignore_index, softcap, temperature, *, scored=None):
    """Chunked GEMMs into two reused float32 buffers feeding the logits kernel
    (``pplfast._chunked.chunked_linear_compare``); no fused two-GEMM kernel yet."""
    return chunked_linear_compare(hidden2_base, weight_base, bias_base, hidden2_test,
                                  weight_test, bias_test, targets, ignore_index, softcap,
                                  temperature, launcher=compare, scored=scored)


# Vocabulary slices: the records of a (B, T, V_local) slice whose first column is global id
# v_offset, not finished; layouts and merge rules in kernels/partials.py.

def token_nll_slice_partials(logits3, targets, ignore_index, softcap, temperature, v_offset):
    """float32 ``(B*T, 3)``: ``kernels.partials.NLL_FIELDS`` per row."""
    return _token_nll_kernels.token_nll_slice_partials(
        logits3, targets, ignore_index, softcap, temperature, v_offset,
        sm_count=_sm_count(logits3))


def token_stats_slice_partials(logits3, targets, ignore_index, softcap, temperature, v_offset,
                               top_k, target_logits=None):
    """``(floats (B*T, 5), ints (B*T, 3), top values, top ids)``:
    ``kernels.partials.STATS_FLOAT_FIELDS`` / ``STATS_INT_FIELDS`` per row, and the slice's
    ``top_k`` candidates (None when 0); ``target_logits``: every row's raw target logit, for the
    rank (see the launcher)."""
    return _token_stats_kernels.token_stats_slice_partials(
        logits3, targets, ignore_index, softcap, temperature, v_offset,
        target_logits=target_logits, top_k=top_k, sm_count=_sm_count(logits3))


def compare_slice_partials(logits3_base, logits3_test, targets, ignore_index, softcap,
                           temperature, v_offset):
    """``(floats (B*T, 12), ints (B*T, 4))``: ``kernels.partials.COMPARE_FLOAT_FIELDS`` /
    ``COMPARE_INT_FIELDS`` per row."""
    return _compare_kernels.compare_slice_partials(
        logits3_base, logits3_test, targets, ignore_index, softcap, temperature, v_offset,
        sm_count=_sm_count(logits3_base))


# ---- vocabulary slices (vocab-parallel: the partials of pplfast._vocab_merge) ----------------
#
# The slice records of kernels/partials.py, read into pplfast._vocab_merge's words: a NaN flag or
# index becomes a NaN maximum, a raw target logit the slice's target term, compare's scaled cross
# sums the plain ones (+inf where p > 0 next to a -inf of q: the ``lone`` value), raw top-k
# values soft-capped. Hidden states: the chunked GEMM loop of pplfast._chunked over the scored
# rows, each chunk's logits reduced by the logits slice launcher (chunks split rows only, so
# every record covers the whole slice).

_INF = float("inf")


def _capped(x: torch.Tensor, softcap):
    x = x.double()
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _no_index(ids: torch.Tensor, fill) -> torch.Tensor:
    return torch.where(ids == _partials.NO_INDEX, fill, ids)


def token_nll_slice(logits3, targets, v_offset, ignore_index, softcap, temperature):
    width = logits3.shape[-1]
    if width == 0:
        return _empty_words(targets, _NLL_FILLS)
    record = token_nll_slice_partials(logits3, targets, ignore_index, softcap, temperature,
                                      v_offset).double()
    m, s, x_t = record.unbind(1)
    m = torch.where(torch.isnan(s), float("nan"), m)  # a NaN reaches the record's sum
    return lse_words(m, s, _capped(x_t, softcap), inside(targets, v_offset, width), temperature)


def target_logits(logits3, targets, v_offset):
    return _partials.target_field(logits3, targets, _NEVER, v_offset)


def token_stats_slice(logits3, targets, v_offset, ignore_index, softcap, temperature, top_k,
                      target_x):
    width = logits3.shape[-1]
    if width == 0:
        return _empty_words(targets, _stats_fills(top_k), top_k)
    floats, ints, top_values, top_ids = token_stats_slice_partials(
        logits3, targets, ignore_index, softcap, temperature, v_offset, top_k,
        target_logits=target_x.float().contiguous())
    m, s, moment = floats.double().unbind(1)[:3]
    nan, argmax, rank = ints.unbind(1)
    m = torch.where(nan != 0, float("nan"), m)
    m, s, _ = lse_words(m, s, m, torch.zeros_like(nan, dtype=torch.bool), temperature)
    argmax = _no_index(argmax, v_offset)  # only NaN: the slice's first column
    if not top_k:
        top_values = torch.zeros(targets.shape[0], 0, device=targets.device)
        top_ids = torch.zeros(targets.shape[0], 0, dtype=torch.int64, device=targets.device)
    return (m, s, moment, argmax, rank.clamp_min(0), _capped(top_values, softcap), top_ids)


def compare_slice(logits3_base, logits3_test, targets, v_offset, ignore_index, softcap,
                  temperature):
    width = logits3_base.shape[-1]
    if width == 0:
        return _empty_words(targets, _COMPARE_FILLS)
    floats, ints = compare_slice_partials(logits3_base, logits3_test, targets, ignore_index,
                                          softcap, temperature, v_offset)
    f = floats.double()
    scale = 2.0 / (_partials.cross_scale(temperature) * temperature)
    held = inside(targets, v_offset, width)
    words, cross, maxima = [], [], []
    for side, x_t in ((0, f[:, 10]), (1, f[:, 11])):
        m, s, c, lone, raw = f[:, 5 * side : 5 * side + 5].unbind(1)
        argmax, first_nan = ints[:, 2 * side], ints[:, 2 * side + 1]
        nan = first_nan != _partials.NO_INDEX
        m = torch.where(nan, float("nan"), m)
        m, s, delta = lse_words(m, s, _capped(x_t, softcap), held, temperature)
        words += [m, s, delta]
        p_at_ninf = torch.exp((lone - m) / temperature) > 0
        cross.append(torch.where(p_at_ninf & torch.isfinite(m), _INF, c * scale))
        maxima += [torch.where(nan, float("nan"), raw),
                   _no_index(torch.where(nan, first_nan, argmax), v_offset)]
    return (*words, *cross, *maxima)


_NEVER = -(2**63)  # an ignore_index no target equals: the target fields of every row
_NLL_FILLS = (-_INF, 0.0, 0.0)
_COMPARE_FILLS = (-_INF, 0.0, 0.0, -_INF, 0.0, 0.0, 0.0, 0.0, -_INF, -1, -_INF, -1)


def _stats_fills(top_k: int):
    return (-_INF, 0.0, 0.0, -1, 0, -_INF, -1)


def _empty_words(targets, fills, top_k: int = 0) -> tuple:
    """The words of rows whose slice holds nothing (an empty slice, or rows not scored)."""
    n = targets.shape[0]
    out = []
    for i, fill in enumerate(fills):
        shape = (n, top_k) if len(fills) == 7 and i >= 5 else (n,)
        dtype = torch.int64 if isinstance(fill, int) else torch.float64
        out.append(torch.full(shape, fill, dtype=dtype, device=targets.device))
    return tuple(out)


def _linear_slices(models, targets, ignore_index, reduce, fills, top_k: int = 0):
    """``reduce(*chunk logits3, chunk targets, r0)`` (``r0``: the chunk's first scored row) over
    the chunked GEMM of each of ``models``
    (``(hidden2, weight, bias)``, in lockstep) on the scored rows, the words scattered back."""
    rows, scored = _select_scored(targets, ignore_index)
    n = scored.shape[0]
    V = models[0][1].shape[0]
    if n == 0 or V == 0:
        return _empty_words(targets, fills, top_k)
    budget = _env.budget_bytes(_env.GPU_CHUNK_MB, _env.DEFAULT_GPU_CHUNK_MB, None)
    step = gpu_chunk_rows(V, 4, budget)
    dtypes = [torch.float32 if fp32_out_gemm_available() else h.dtype for h, _, _ in models]
    while True:
        parts = []
        chunks = [_chunk_logits(h, w, b, rows, n, step, dt, refusable=dt != h.dtype)
                  for (h, w, b), dt in zip(models, dtypes)]
        try:
            for pieces in zip(*chunks):
                r0, m = pieces[0][1], pieces[0][2]
                parts.append(reduce(*(z.unsqueeze(0) for z, _, _ in pieces),
                                    scored[r0 : r0 + m], r0))
            break
        except _Fp32OutGemmRefused:  # no fp32-output GEMM here: logits in the input dtype
            dtypes = [h.dtype for h, _, _ in models]
    words = [torch.cat(w) for w in zip(*parts)]
    if rows is None:
        return tuple(words)
    blank = _empty_words(targets, fills, top_k)
    return tuple(full.index_copy_(0, rows, w.to(full.dtype)) for full, w in zip(blank, words))


def linear_token_nll_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                           temperature):
    return _linear_slices(
        [(hidden2, weight, bias)], targets, ignore_index,
        lambda z, t, _: token_nll_slice(z, t, v_offset, ignore_index, softcap, temperature),
        _NLL_FILLS)


def linear_target_logits(hidden2, weight, bias, targets, v_offset):
    """Each row's raw target logit where the target lies in the slice, else 0: one dot product
    per row (float32 accumulation), the rank's threshold."""
    held = inside(targets, v_offset, weight.shape[0])
    if weight.shape[0] == 0:
        return torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    local = torch.where(held, targets - v_offset, 0)
    z = (hidden2.float() * weight.index_select(0, local).float()).sum(-1)
    if bias is not None:
        z = z + bias.index_select(0, local).float()
    return torch.where(held, z, 0.0)


def linear_token_stats_slice(hidden2, weight, bias, targets, v_offset, ignore_index, softcap,
                             temperature, top_k, target_x):
    rows, _ = _select_scored(targets, ignore_index)
    own = target_x if rows is None else target_x.index_select(0, rows)
    return _linear_slices(
        [(hidden2, weight, bias)], targets, ignore_index,
        lambda z, t, r0: token_stats_slice(z, t, v_offset, ignore_index, softcap, temperature,
                                           top_k, own[r0 : r0 + t.shape[0]]),
        _stats_fills(top_k), top_k)


def linear_compare_slice(hidden2_base, weight_base, bias_base, hidden2_test, weight_test,
                         bias_test, targets, v_offset, ignore_index, softcap, temperature):
    return _linear_slices(
        [(hidden2_base, weight_base, bias_base), (hidden2_test, weight_test, bias_test)],
        targets, ignore_index,
        lambda zb, zt, t, _: compare_slice(zb, zt, t, v_offset, ignore_index, softcap,
                                           temperature),
        _COMPARE_FILLS)
