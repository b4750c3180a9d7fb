// Native CPU kernels: per-row log-sum-exp and target gather in one pass over the logits.
//
// Each row of logits is read once, in blocks of BLOCK elements. A block is loaded, converted to
// fp32 (fp16/bf16 are read in place, never copied whole) and soft-capped into a small buffer y that
// stays in L1; its maximum folds into the row's running maximum m, and the block's sum of
// exp((y - m) / T) (common.h's rel: the temperature scales the exponent, never the values) is
// accumulated in 32 fp32 lanes (4 AVX2 accumulators), reduced in double and added to the row's
// running sum, rescaled when the maximum grows. The running sum is a double: the only fp32 sums
// are the 64-term lane sums inside one block.
//
// Work is split over OpenMP threads by rows; when rows are fewer than threads each row is also
// split into column ranges whose partial (max, sum) pairs are merged afterwards.
//
// NaN anywhere in a row makes that row's result NaN: it is tracked explicitly, on the loaded value
// before any transform (max_ps drops NaN, and the softcap's tanh would map it to +-1). +inf makes
// the row's log-sum-exp +inf; an all -inf row gives -inf, as torch.logsumexp does.
//
// The target logit goes through the very same fp32 softcap as the streamed values (the scalar
// functions below mirror the AVX2 ones operation for operation), so it never exceeds the row's
// maximum, and the NLL is formed as (max - target) / T + log(sum) with sum >= 1, the first term in
// double (common.h's finish_nll): no two large rounded terms cancel, the logits may reach the top
// of the float range at any temperature, and the result is >= 0 up to rounding, which the final
// guard clamps.
#include "token_nll.h"

#include "common.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace pplfast {
namespace {

using namespace cpu;

// Fold one block (already soft-capped, padded with -inf to a multiple of 8) into `acc`. While the
// exps are computed, the next block's cache lines (`next`, `next_bytes`) are prefetched, so that
// the memory reads of one block overlap the arithmetic of the previous one.
template <bool TEMPERATURE>
inline void fold_block(Partial& acc, const float* z, int64_t len, float block_max,
                       const Transform& tf, const char* next, int64_t next_bytes) {
  if (block_max == kNegInf) return;
  const float m = std::max(acc.max, block_max);
  if (m == kPosInf) {  // the row's lse is +inf; the sum no longer matters
    acc.max = m;
    return;
  }
  double block_sum;
#ifdef PPLFAST_AVX2
  const __m256 ref = rel8_ref<TEMPERATURE>(m);
  const __m256 scale = _mm256_set1_ps(tf.rel_exp.scale);
  auto term = [&](int64_t j) {
    return exp8_scaled(rel8<TEMPERATURE>(_mm256_loadu_ps(z + j), ref), scale);
  };
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  int64_t prefetched = 0;
  for (; i + 32 <= len; i += 32) {
    for (int k = 0; k < 2 && prefetched < next_bytes; ++k, prefetched += 64)
      _mm_prefetch(next + prefetched, _MM_HINT_T0);
    s0 = _mm256_add_ps(s0, term(i));
    s1 = _mm256_add_ps(s1, term(i + 8));
    s2 = _mm256_add_ps(s2, term(i + 16));
    s3 = _mm256_add_ps(s3, term(i + 24));
  }
  for (; i < len; i += 8) s0 = _mm256_add_ps(s0, term(i));
  block_sum = hsum8_double(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#else
  (void)next;
  (void)next_bytes;
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i)
    lanes[i & 7] += std::exp(rel<TEMPERATURE>(z[i], m) * static_cast<float>(tf.rel_unit));
  block_sum = 0;
  for (float l : lanes) block_sum += l;
#endif
  acc.sum = (acc.max == kNegInf ? 0.0 : acc.sum * rescale(acc.max, m, tf.inv_temperature)) +
            block_sum;
  acc.max = m;
}

// One pass over `len` elements starting at `base` (element stride `stride`), specialised on the
// dtype and on which transforms are active so that the inner loops carry no branches.
template <int DT, bool SOFTCAP, bool TEMPERATURE>
Partial row_partial_t(const void* base, int64_t len, int64_t stride, const Transform& tf) {
  constexpr int dtype = DT;
  constexpr int64_t kBytes = DT == kFloat32 ? 4 : 2;
  alignas(32) float z[BLOCK];
  Partial acc;
  for (int64_t start = 0; start < len; start += BLOCK) {
    const int64_t n = std::min(BLOCK, len - start);
    float block_max = kNegInf;
    bool nan = false;
    int64_t i = 0;
#ifdef PPLFAST_AVX2
    if (stride == 1) {
      __m256 vmax = _mm256_set1_ps(kNegInf);
      __m256 vnan = _mm256_setzero_ps();
      const __m256 vcap = _mm256_set1_ps(tf.softcap), vinv_cap = _mm256_set1_ps(tf.inv_softcap);
      for (; i + 8 <= n; i += 8) {
        __m256 x = load8<DT>(base, start + i);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // before the softcap
        if constexpr (SOFTCAP) x = _mm256_mul_ps(vcap, tanh8(_mm256_mul_ps(x, vinv_cap)));
        vmax = _mm256_max_ps(x, vmax);  // returns vmax where x is NaN
        _mm256_store_ps(z + i, x);
      }
      block_max = hmax8(vmax);
      nan = _mm256_movemask_ps(vnan) != 0;
    }
#endif
    for (; i < n; ++i) {
      const float raw = load_scalar(base, dtype, (start + i) * stride);
      nan = nan || std::isnan(raw);  // before the softcap, which maps NaN to +-1
      const float x = tf.apply(raw);
      block_max = x > block_max ? x : block_max;
      z[i] = x;
    }
    int64_t padded = n;
    for (; padded % 8 != 0; ++padded) z[padded] = kNegInf;
    acc.nan = acc.nan || nan;
    const int64_t next_n = stride == 1 ? std::min(BLOCK, len - start - n) : 0;
    fold_block<TEMPERATURE>(acc, z, padded, block_max, tf,
                            static_cast<const char*>(base) + (start + n) * kBytes,
                            next_n * kBytes);
  }
  return acc;
}

template <int DT>
Partial row_partial_dt(const void* base, int64_t len, int64_t stride, const Transform& tf) {
  if (tf.has_softcap) {
    return tf.has_temperature ? row_partial_t<DT, true, true>(base, len, stride, tf)
                              : row_partial_t<DT, true, false>(base, len, stride, tf);
  }
  return tf.has_temperature ? row_partial_t<DT, false, true>(base, len, stride, tf)
                            : row_partial_t<DT, false, false>(base, len, stride, tf);
}

Partial row_partial(const void* base, int dtype, int64_t len, int64_t stride,
                    const Transform& tf) {
  switch (dtype) {
    case kFloat32: return row_partial_dt<kFloat32>(base, len, stride, tf);
    case kFloat16: return row_partial_dt<kFloat16>(base, len, stride, tf);
    default: return row_partial_dt<kBFloat16>(base, len, stride, tf);
  }
}

// (max, sum) of every scored row (targets[r] != ignore_index; other rows stay empty), one pass over
// the logits: rows are shared among the threads, and when rows are fewer than threads each row is
// also cut into column ranges whose partials are merged. `row_offset(r)` is the element offset of
// row r.
template <typename RowOffset>
std::vector<Partial> scored_row_partials(const void* logits, int dtype, int64_t rows, int64_t cols,
                                         int64_t col_stride, RowOffset row_offset,
                                         const int64_t* targets, int64_t ignore_index,
                                         const Transform& tf, int nthreads) {
  std::vector<Partial> per_row(static_cast<size_t>(rows > 0 ? rows : 0));
  if (rows <= 0) return per_row;
  const int64_t splits = column_splits(rows, cols, nthreads);
  if (splits == 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r] == ignore_index) continue;
      per_row[r] = row_partial(element_ptr(logits, dtype, row_offset(r)), dtype, cols,
                               col_stride, tf);
    }
    return per_row;
  }
  const int64_t span = (cols + splits - 1) / splits;
  std::vector<Partial> parts(static_cast<size_t>(rows * splits));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t task = 0; task < rows * splits; ++task) {
    const int64_t r = task / splits, piece = task % splits;
    if (targets[r] == ignore_index) continue;
    const int64_t c0 = piece * span, c1 = std::min(cols, c0 + span);
    if (c0 >= c1) continue;
    parts[task] = row_partial(element_ptr(logits, dtype, row_offset(r) + c0 * col_stride), dtype,
                              c1 - c0, col_stride, tf);
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t piece = 0; piece < splits; ++piece)
      merge(per_row[r], parts[r * splits + piece], tf.inv_temperature);
  return per_row;
}

}  // namespace

void lse_update(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride, int64_t v_offset, const int64_t* targets,
                int64_t ignore_index, double softcap, double temperature, float* row_max,
                double* row_sum, double* target_logit, int nthreads) {
  if (rows <= 0) return;
  const Transform tf = make_transform(softcap, temperature);
  const std::vector<Partial> slab = scored_row_partials(
      logits, dtype, rows, cols, col_stride, [&](int64_t r) { return r * row_stride; }, targets,
      ignore_index, tf, nthreads);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = targets[r];
    if (t == ignore_index) continue;
    Partial acc;
    acc.max = row_max[r];
    acc.sum = row_sum[r];
    acc.nan = std::isnan(acc.max);
    if (acc.nan) continue;  // already NaN: stays NaN
    merge(acc, slab[r], tf.inv_temperature);
    row_max[r] = acc.nan ? std::numeric_limits<float>::quiet_NaN() : acc.max;
    row_sum[r] = acc.sum;
    if (t >= v_offset && t < v_offset + cols) {
      // the streamed values' fp32 softcap, so that target <= max holds exactly
      target_logit[r] =
          tf.apply(load_scalar(logits, dtype, r * row_stride + (t - v_offset) * col_stride));
    }
  }
}

void lse_finish(const float* row_max, const double* row_sum, const double* target_logit,
                const int64_t* targets, int64_t ignore_index, int64_t rows, double temperature,
                float* out) {
  const double inv_temperature = 1.0 / temperature;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      out[r] = 0.0f;
      continue;
    }
    const float m = row_max[r];
    out[r] = finish_nll(m, row_sum[r], std::isnan(m), static_cast<float>(target_logit[r]),
                        inv_temperature);
  }
}

void token_nll(const void* logits, int dtype, int64_t batch, int64_t time, int64_t cols,
               int64_t batch_stride, int64_t time_stride, int64_t col_stride,
               const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
               float* out, int nthreads) {
  const int64_t rows = batch * time;
  if (rows <= 0) return;
  auto row_offset = [&](int64_t r) { return (r / time) * batch_stride + (r % time) * time_stride; };
  const Transform tf = make_transform(softcap, temperature);
  const std::vector<Partial> per_row = scored_row_partials(
      logits, dtype, rows, cols, col_stride, row_offset, targets, ignore_index, tf, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = targets[r];
    if (t == ignore_index) {
      out[r] = 0.0f;
      continue;
    }
    const Partial& p = per_row[r];
    const float target = tf.apply(load_scalar(logits, dtype, row_offset(r) + t * col_stride));
    out[r] = finish_nll(p.max, p.sum, p.nan, target, tf.inv_temperature);
  }
}

}  // namespace pplfast
