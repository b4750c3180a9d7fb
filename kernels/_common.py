"""Math shared by the Triton kernels: constants, tanh, special-value rules, online log-sum-exp,
the statistics' entropy moment and finish, the argmax fold.

Every kernel keeps, per row, a running maximum ``m`` of the (soft-capped) logits ``y`` (the
temperature is never applied to the values) and a sum ``s = sum exp2((y - m) * exp2_scale)`` with
``exp2_scale = log2(e) / temperature``; the NLL is

    nll = (m - y[target]) / temperature + log(s)

which subtracts the two large terms before the small one is added, the first term in float64:
``m - y[target]`` reaches 2 FLT_MAX (logits at both ends of the float range), and its quotient by
a temperature above 1 may be finite. The exponent is formed as ``(y / 2 - m / 2) * (2 *
exp2_scale)`` (:func:`exp2_shifted`, :func:`half_diff`): the halves are exact and their difference
never overflows, where ``y - m`` would become -inf while ``(y - m) / temperature`` is finite.

Special values. The reference point of the exponentials is ``m`` clamped to the finite range
(:func:`finite_ref`), never ``m`` itself: -inf entries add exactly 0; a row of -inf keeps
``m = -inf``, ``s = 0`` and gives NaN, as the float64 reference; a +inf entry makes ``s = +inf``
(``exp2((inf - FLT_MAX) * c)``) and the NLL +inf without forming inf - inf, or NaN when the target
itself is +inf. A rescale factor is exactly 1 when the maximum did not change, also at +-inf,
where ``exp2(m_old - m_new)`` would be NaN. NaN reaches the sum of its own row through exp2
(whether a maximum keeps it, as numpy does under the interpreter, or drops it, as the GPU's max
does), and through it that row's NLL only.

Never negative. The true NLL is >= 0; rounding of the two large terms can leave a tiny negative
value for a confident token, which :func:`nll_from_lse` clamps to 0 (NaN and +inf pass).

Compiled Triton code may read no module global that is not a ``tl.constexpr``: the constants
below are, so kernels import them by name.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# "no index": above any vocabulary id (vocabularies are below 2^31; the kernels take V as int32)
NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def tanh(y):
    """tanh from exp (no libdevice: the interpreter has none).

    A fitted odd polynomial for |y| < 0.625, where ``1 - 2 / (exp(2|y|) + 1)`` would cancel, and
    that form beyond (absolute error ~1e-7 there, harmless relative to tanh once |y| >= 0.625).
    """
    a = tl.abs(y)
    y2 = y * y
    # minimax fit of (tanh(y)/y - 1)/y^2 on |y| < 0.625, relative error of tanh < 2e-10
    p = 0.0021434174850583076 * y2 - 0.008177938871085644
    p = p * y2 + 0.021700944751501083
    p = p * y2 - 0.05394681170582771
    p = p * y2 + 0.1333320587873459
    p = p * y2 - 0.3333333134651184
    small = y + y * (y2 * p)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(y < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of row ``row = b * T + t`` of a ``(B, T, V)`` tensor, in int64 (rows x V
    passes 2^31 on real batches)."""
    b = row // T
    t = row - b * T
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def capped(x, mask, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(x / softcap)`` when HAS_SOFTCAP (so +-inf become +-softcap, as in the
    reference), and -inf on masked-off lanes, which the cap would turn into -softcap."""
    if HAS_SOFTCAP:
        x = tl.where(mask, softcap * tanh(x * inv_softcap), -float("inf"))
    return x


@triton.jit
def finite_ref(m):
    """The reference point of ``exp2((x - ref) * c)``: ``m`` clamped to the finite range, so that
    -inf - ref and inf - ref never become NaN; equal to ``m`` whenever ``m`` is finite."""
    return tl.minimum(tl.maximum(m, -FLT_MAX), FLT_MAX)


@triton.jit
def half_diff(x, ref_max):
    """``(x - ref) / 2`` with ``ref = finite_ref(ref_max)``, as ``x / 2 - ref / 2``: exact halves,
    one rounding, and never an overflow (``x - ref`` overflows below -FLT_MAX); broadcasts."""
    return x * 0.5 - finite_ref(ref_max) * 0.5


@triton.jit
def exp2_shifted(x, ref_max, exp2_scale):
    """``exp2((x - ref) * exp2_scale)`` with ``ref = finite_ref(ref_max)`` (through
    :func:`half_diff`, so that a difference beyond -FLT_MAX still counts where the temperature
    brings it back into range); broadcasts."""
    return tl.exp2(half_diff(x, ref_max) * (2.0 * exp2_scale))


@triton.jit
def rescale(old_max, new_max, exp2_scale):
    """The factor that moves a sum taken relative to ``old_max`` to ``new_max`` (>= old_max):
    exactly 1 when the maximum is unchanged (also at -inf or +inf)."""
    return tl.where(new_max == old_max, 1.0, exp2_shifted(old_max, new_max, exp2_scale))


@triton.jit
def merge(max_a, sum_a, max_b, sum_b, exp2_scale):
    """Combine two (max, sum) pairs of the same rows, elementwise."""
    new_max = tl.maximum(max_a, max_b)
    scale_a = rescale(max_a, new_max, exp2_scale).to(sum_a.dtype)
    scale_b = rescale(max_b, new_max, exp2_scale).to(sum_b.dtype)
    return new_max, sum_a * scale_a + sum_b * scale_b


@triton.jit
def nll_from_lse(row_max, row_sum, target_logit, inv_temp):
    """``(m - y_t) / temperature + log(s)``, clamped at 0; NaN and +inf are kept. The first term
    in float64 (one per row): ``m - y_t`` may pass FLT_MAX where its quotient does not."""
    gap = (row_max.to(tl.float64) - target_logit.to(tl.float64)) * inv_temp
    nll = (gap + tl.log(row_sum.to(tl.float32)).to(tl.float64)).to(tl.float32)
    return tl.where(nll < 0.0, 0.0, nll)


@triton.jit
def rescale_moment(s, e, m_old, m_new, inv_temp):
    """``(s, e)`` relative to the maximum ``m_old`` moved to ``m_new >= m_old``, where
    ``s = sum exp(d)`` and ``e = sum exp(d) d`` (the entropy moment), ``d = (y - m) / T``:
    ``s' = a s``, ``e' = a (e + delta s)`` with ``delta = (m_old - m_new) / T`` (through
    :func:`half_diff`, never an overflow) and ``a = exp(delta)``; the identity when unchanged, 0
    from an empty state (``m_old = -inf``)."""
    delta = tl.where(m_old == m_new, 0.0, half_diff(m_old, m_new) * (2.0 * inv_temp))
    a = tl.where(m_old == m_new, 1.0, tl.exp2(delta * LOG2E))
    e = tl.where(a > 0, a * (e + delta * s), 0.0)
    return a * s, e


@triton.jit
def stats_finish(m, S, E, nan, target_y, scored, inv_temp):
    """``(nll, entropy, max log p, m, log S)`` of a row's merged state (``m`` NaN on a NaN row,
    for the top-k): ``nll`` by :func:`nll_from_lse`, ``entropy = log S - E / S`` (at least 0),
    ``max log p = -log S`` (at most 0); a NaN in the row (``nan``) makes all three NaN, an
    infinite ``m`` the entropy and max log p (inf - inf in the float64 reference)."""
    S = tl.where(scored, S, 1.0)
    log_s = tl.log(S)
    nll = tl.where(nan, float("nan"), nll_from_lse(m, S, target_y, inv_temp))
    bad = nan | (m == float("inf")) | (m == -float("inf"))
    entropy = tl.where(bad, float("nan"), tl.maximum(log_s - E / S, 0.0))
    max_logprob = tl.where(bad, float("nan"), tl.minimum(-log_s, 0.0))
    return nll, entropy, max_logprob, tl.where(nan, float("nan"), m), log_s


@triton.jit
def argmax_fold(best, best_idx, value, idx):
    """The running argmax ``(best, best_idx)`` after a block whose maximum ``value`` first sits
    at ``idx`` (``NO_INDEX``: the block has none): taken only when strictly larger, so that the
    lowest index wins ties when blocks come in column order; elementwise."""
    take = (idx != NO_INDEX) & ((best_idx == NO_INDEX) | (value > best))
    return tl.where(take, value, best), tl.where(take, idx, best_idx)


def device_guard(tensor: torch.Tensor):
    """Make the tensor's CUDA device current for a launch: Triton launches on the current device
    and its current stream, so tensors on another GPU (``cuda:1``) would be read from the wrong
    one. No-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
