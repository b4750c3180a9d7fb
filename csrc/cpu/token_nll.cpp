// Native CPU kernels: per-row log-sum-exp and target gather in one pass over the logits.
//
// Each row of logits is read once, in blocks of BLOCK elements. A block is loaded, converted to
// fp32 (fp16/bf16 are read in place, never copied whole) and transformed (softcap, temperature)
// into a small buffer that stays in L1; its maximum folds into the row's running maximum, and the
// block's sum of exp(z - max) is accumulated in 32 fp32 lanes (4 AVX2 accumulators), reduced in
// double and added to the row's running sum, rescaled when the maximum grows. The running sum is
// a double: the only fp32 sums are the 64-term lane sums inside one block.
//
// Work is split over OpenMP threads by rows; when rows are fewer than threads each row is also
// split into column ranges whose partial (max, sum) pairs are merged afterwards.
//
// NaN anywhere in a row makes that row's result NaN: it is tracked explicitly, on the loaded value
// before any transform (max_ps drops NaN, and the softcap's tanh would map it to +-1). +inf makes
// the row's log-sum-exp +inf; an all -inf row gives -inf, as torch.logsumexp does.
//
// The target logit goes through the very same fp32 transform as the streamed values (the scalar
// functions below mirror the AVX2 ones operation for operation), so it never exceeds the row's
// maximum, and the NLL is formed as (max - target) + log(sum) with sum >= 1: no two large rounded
// terms cancel, and the result is >= 0 up to rounding, which the final guard clamps.
#include "token_nll.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PPLFAST_AVX2 1
#endif

namespace pplfast {
namespace {

constexpr int64_t BLOCK = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// ---- scalar element access -------------------------------------------------------------------

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float fp16_to_float(uint16_t h) {
#ifdef PPLFAST_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      bits = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float load_scalar(const void* base, int dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base)[index];
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

// exp(d) for d <= 0, as 2^t with t = d·log2(e) = n + f, |f| <= 1/2: a degree-6 polynomial for
// 2^f evaluated in Estrin form, whose dependency chain is 4 FMAs deep instead of Horner's 6 (the
// vector loop is bound by this latency, not by throughput). Measured against exp in double over
// every float in [-87.3, 0]: relative error <= 1.5e-7 for |d| <= 1, 5.5e-7 for |d| <= 10 and
// 3.9e-6 over the whole range; it grows with |d| because t is rounded to fp32 (|d|·log2(e)·2^-24
// absolute). Terms with |d| > 20 are < 2e-9 of a sum that holds exp(0) = 1, so the log-sum-exp
// keeps the accuracy of the near-maximum terms. Inputs below -87.3 (and NaN) are clamped, giving
// ~1e-38 instead of 0: harmless for the same reason.
//
// The scalar form performs the same fp32 operations in the same order as exp8_nonpos below (fma
// for each FMA, round-half-even for _mm256_round_ps): both give the same bits.
constexpr float kExpClamp = -87.3f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExpC0 = 0.6931471824645996f, kExpC1 = 0.24022647738456726f;
constexpr float kExpC2 = 0.055503323674201965f, kExpC3 = 0.00961843691766262f;
constexpr float kExpC4 = 0.0013398875016719103f, kExpC5 = 0.00015353361959569156f;

inline float exp_nonpos(float d) {
  const float t = (d > kExpClamp ? d : kExpClamp) * kLog2e;  // max_ps: the clamp where d is NaN
  const float n = std::nearbyint(t);
  const float f = t - n;
  const float f2 = f * f;
  const float f4 = f2 * f2;
  const float a = std::fma(kExpC1, f, kExpC0);
  const float b = std::fma(kExpC3, f, kExpC2);
  const float c = std::fma(kExpC5, f, kExpC4);
  const float q = std::fma(f4, c, std::fma(f2, b, a));
  const float p = std::fma(f, q, 1.0f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// tanh: Cephes' odd minimax polynomial below 0.625 (where the exp form would cancel), above it
// (1 - q) / (1 + q) with q = exp(-2|y|) (= 1 - 2 / (exp(2|y|) + 1), kept in exp_nonpos's domain).
// The same operations as tanh8. NaN gives +-1 (the exp clamp): callers check NaN before this.
constexpr float kTanhSmall = 0.625f;
constexpr float kTanhP0 = -5.70498872745e-3f, kTanhP1 = 2.06390887954e-2f;
constexpr float kTanhP2 = -5.37397155531e-2f, kTanhP3 = 1.33314422036e-1f;
constexpr float kTanhP4 = -3.33332819422e-1f;

inline float tanh_fast(float y) {
  const float a = std::fabs(y);
  if (a < kTanhSmall) {
    const float z = y * y;
    float p = std::fma(kTanhP0, z, kTanhP1);
    p = std::fma(p, z, kTanhP2);
    p = std::fma(p, z, kTanhP3);
    p = std::fma(p, z, kTanhP4);
    return std::fma(y * z, p, y);
  }
  const float q = exp_nonpos(a * -2.0f);
  return std::copysign((1.0f - q) / (1.0f + q), y);
}

struct Transform {
  bool has_softcap;
  float softcap, inv_softcap, inv_temperature;
  bool has_temperature;
  inline float apply(float x) const {
    if (has_softcap) x = softcap * tanh_fast(x * inv_softcap);
    if (has_temperature) x *= inv_temperature;
    return x;
  }
};

#ifdef PPLFAST_AVX2
// ---- AVX2 helpers ------------------------------------------------------------------------------

template <int DT>
inline __m256 load8(const void* base, int64_t index) {
  if constexpr (DT == kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + index);
  } else {
    const __m128i h = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + index));
    if constexpr (DT == kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// exp_nonpos on 8 lanes (see there for the method and its measured error).
inline __m256 exp8_nonpos(__m256 d) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(d, _mm256_set1_ps(kExpClamp)),
                                 _mm256_set1_ps(kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  const __m256 f2 = _mm256_mul_ps(f, f);
  const __m256 f4 = _mm256_mul_ps(f2, f2);
  const __m256 a = _mm256_fmadd_ps(_mm256_set1_ps(kExpC1), f, _mm256_set1_ps(kExpC0));
  const __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(kExpC3), f, _mm256_set1_ps(kExpC2));
  const __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), f, _mm256_set1_ps(kExpC4));
  const __m256 q = _mm256_fmadd_ps(f4, c, _mm256_fmadd_ps(f2, b, a));
  const __m256 p = _mm256_fmadd_ps(f, q, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// tanh_fast on 8 lanes. NaN lanes come out as +-1 (a < 0.625 is false and the exp clamps NaN):
// callers check NaN on the input, before this transform.
inline __m256 tanh8(__m256 y) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_andnot_ps(sign_mask, y);
  const __m256 z = _mm256_mul_ps(y, y);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kTanhP0), z, _mm256_set1_ps(kTanhP1));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP2));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP3));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP4));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(y, z), p, y);
  const __m256 q = exp8_nonpos(_mm256_mul_ps(a, _mm256_set1_ps(-2.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 big = _mm256_div_ps(_mm256_sub_ps(one, q), _mm256_add_ps(one, q));
  const __m256 big_signed = _mm256_or_ps(big, _mm256_and_ps(sign_mask, y));
  const __m256 use_small = _mm256_cmp_ps(a, _mm256_set1_ps(kTanhSmall), _CMP_LT_OQ);
  return _mm256_blendv_ps(big_signed, small, use_small);
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline double hsum8_double(__m256 v) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  const __m256d s = _mm256_add_pd(lo, hi);
  __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
  return _mm_cvtsd_f64(t);
}
#endif

// Running (max, sum of exp(z - max)) of one row or row range; nan marks a NaN seen.
struct Partial {
  float max = kNegInf;
  double sum = 0.0;
  bool nan = false;
};

inline void merge(Partial& into, const Partial& p) {
  into.nan = into.nan || p.nan;
  if (p.max == kNegInf) return;  // nothing but -inf: adds exp(-inf) = 0
  if (into.max == kNegInf) {
    into.max = p.max;
    into.sum = p.sum;
    return;
  }
  const float m = std::max(into.max, p.max);
  into.sum = into.sum * std::exp(static_cast<double>(into.max) - m) +
             p.sum * std::exp(static_cast<double>(p.max) - m);
  into.max = m;
}

// Fold one block (already transformed, padded with -inf to a multiple of 8) into `acc`. While the
// exps are computed, the next block's cache lines (`next`, `next_bytes`) are prefetched, so that
// the memory reads of one block overlap the arithmetic of the previous one.
inline void fold_block(Partial& acc, const float* z, int64_t len, float block_max,
                       const char* next, int64_t next_bytes) {
  if (block_max == kNegInf) return;
  const float m = std::max(acc.max, block_max);
  if (m == kPosInf) {  // the row's lse is +inf; the sum no longer matters
    acc.max = m;
    return;
  }
  double block_sum;
#ifdef PPLFAST_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  int64_t prefetched = 0;
  for (; i + 32 <= len; i += 32) {
    for (int k = 0; k < 2 && prefetched < next_bytes; ++k, prefetched += 64)
      _mm_prefetch(next + prefetched, _MM_HINT_T0);
    s0 = _mm256_add_ps(s0, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm)));
    s1 = _mm256_add_ps(s1, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i + 8), vm)));
    s2 = _mm256_add_ps(s2, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i + 16), vm)));
    s3 = _mm256_add_ps(s3, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i + 24), vm)));
  }
  for (; i < len; i += 8)
    s0 = _mm256_add_ps(s0, exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(z + i), vm)));
  block_sum = hsum8_double(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
#else
  (void)next;
  (void)next_bytes;
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i) lanes[i & 7] += std::exp(z[i] - m);
  block_sum = 0;
  for (float l : lanes) block_sum += l;
#endif
  acc.sum = (acc.max == kNegInf ? 0.0 : acc.sum * std::exp(static_cast<double>(acc.max) - m)) +
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
      const __m256 vinv_t = _mm256_set1_ps(tf.inv_temperature);
      for (; i + 8 <= n; i += 8) {
        __m256 x = load8<DT>(base, start + i);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // before the softcap
        if constexpr (SOFTCAP) x = _mm256_mul_ps(vcap, tanh8(_mm256_mul_ps(x, vinv_cap)));
        if constexpr (TEMPERATURE) x = _mm256_mul_ps(x, vinv_t);
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
    fold_block(acc, z, padded, block_max,
               static_cast<const char*>(base) + (start + n) * kBytes, next_n * kBytes);
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

inline const void* element_ptr(const void* base, int dtype, int64_t offset) {
  const int64_t bytes = dtype == kFloat32 ? 4 : 2;
  return static_cast<const char*>(base) + offset * bytes;
}

// NLL = log-sum-exp - target = (max - target) + log(sum), from a row's (max, sum of exp(z - max))
// and its transformed target logit (one of the row's streamed values, so target <= max, and
// sum >= 1 since it holds exp(0) = 1 for the maximum). Special values as the reference computes
// lse - target: NaN seen -> NaN; max = +inf -> +inf, or NaN when the target is +inf too; an all
// -inf row -> -inf - -inf = NaN; a -inf target in a finite row -> +inf. The guard turns a rounding
// below zero into 0 and keeps NaN (NaN < 0 is false).
inline float finish_nll(float max, double sum, bool nan, float target) {
  if (nan || std::isnan(max) || std::isnan(target)) return std::numeric_limits<float>::quiet_NaN();
  double nll = static_cast<double>(max) - static_cast<double>(target);
  if (!std::isinf(max)) nll += std::log(sum);
  return nll < 0.0 ? 0.0f : static_cast<float>(nll);
}

Transform make_transform(double softcap, double temperature) {
  Transform tf;
  tf.has_softcap = softcap > 0;
  tf.softcap = static_cast<float>(softcap > 0 ? softcap : 1.0);
  tf.inv_softcap = static_cast<float>(softcap > 0 ? 1.0 / softcap : 1.0);
  tf.has_temperature = temperature != 1.0;
  tf.inv_temperature = static_cast<float>(1.0 / temperature);
  return tf;
}

// Column splits per row so that rows × splits keeps every thread busy on long rows.
int64_t column_splits(int64_t rows, int64_t cols, int nthreads) {
  if (rows >= nthreads) return 1;
  const int64_t want = (2 * nthreads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, cols / (4 * BLOCK)));
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
  std::vector<Partial> per_row(static_cast<size_t>(rows));
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
    for (int64_t piece = 0; piece < splits; ++piece) merge(per_row[r], parts[r * splits + piece]);
  return per_row;
}

}  // namespace

void lse_update(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride, int64_t v_offset, const int64_t* targets,
                int64_t ignore_index, double softcap, double temperature, float* row_max,
                double* row_sum, double* target_logit, int nthreads) {
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
    merge(acc, slab[r]);
    row_max[r] = acc.nan ? std::numeric_limits<float>::quiet_NaN() : acc.max;
    row_sum[r] = acc.sum;
    if (t >= v_offset && t < v_offset + cols) {
      // the streamed values' fp32 transform, so that target <= max holds exactly
      target_logit[r] =
          tf.apply(load_scalar(logits, dtype, r * row_stride + (t - v_offset) * col_stride));
    }
  }
}

void lse_finish(const float* row_max, const double* row_sum, const double* target_logit,
                const int64_t* targets, int64_t ignore_index, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      out[r] = 0.0f;
      continue;
    }
    const float m = row_max[r];
    out[r] = finish_nll(m, row_sum[r], std::isnan(m), static_cast<float>(target_logit[r]));
  }
}

void token_nll(const void* logits, int dtype, int64_t batch, int64_t time, int64_t cols,
               int64_t batch_stride, int64_t time_stride, int64_t col_stride,
               const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
               float* out, int nthreads) {
  const int64_t rows = batch * time;
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
    out[r] = finish_nll(p.max, p.sum, p.nan, target);
  }
}

}  // namespace pplfast
