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
from ._chunked import (_select_scored, chunked_linear_compare, chunked_linear_token_nll,
                       chunked_linear_token_stats)
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
