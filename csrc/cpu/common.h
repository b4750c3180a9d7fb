// Helpers shared by the native CPU kernels (token_nll.cpp, token_stats.cpp, compare.cpp): element
// loads of fp32/fp16/bf16, the softcap, the exponent relative to the row maximum, vectorised exp
// and tanh, the running (max, sum of exp) partial and its merge, the NLL from it, and the
// column-split rule.
//
// Units. The running maximum m is that of the soft-capped logits y (the temperature is not applied
// to the values): every exponent is d = (y - m) / temperature <= 0 (rel / rel8), and the NLL is
// (m - y_t) / temperature + log(sum exp(d)) with the first term in double. Dividing the values by
// the temperature first would overflow at the top of the float range (3e38 / 0.5 = +inf, then
// inf - inf = NaN) and subtract two huge rounded numbers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "token_nll.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PPLFAST_AVX2 1
#endif

namespace pplfast {
namespace cpu {

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

// exp_scaled(u, scale) = 2^max(u * scale, -87.3 log2(e)): exp_nonpos of an exponent d = u * unit
// given in other units (scale = log2(e) * unit), so that the temperature rides on the product the
// exp performs anyway. The clamp comes after the product: -inf (and NaN) map to it, ~1e-38, at
// every unit (a clamp of u at -87.3 / unit would pass -FLT_MAX for huge temperatures, where
// -inf would weigh e^{-FLT_MAX unit}). For d >= -87.3 the product is that of exp_nonpos (the
// rounding is monotone): exp_nonpos(d) = exp_scaled(d, log2(e)) bit for bit.
constexpr float kExpClampLog2 = kExpClamp * kLog2e;

inline float exp_scaled(float u, float scale) {
  const float p2 = u * scale;
  const float t = p2 > kExpClampLog2 ? p2 : kExpClampLog2;  // max_ps: the clamp where u is NaN
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
  float power;
  std::memcpy(&power, &bits, 4);
  return p * power;
}

inline float exp_nonpos(float d) { return exp_scaled(d, kLog2e); }

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

// exp_scaled's scale for exponents in some unit (d = u * unit), and the u below which exp_scaled
// clamps (for users of u itself; -FLT_MAX where -87.3 / unit passes the float range).
struct ExpUnit {
  float clamp, scale;
};

inline ExpUnit exp_unit(double unit) {
  const double clamp = std::max(static_cast<double>(kExpClamp) / unit,
                                -static_cast<double>(std::numeric_limits<float>::max()));
  return {static_cast<float>(clamp), static_cast<float>(kLog2e * unit)};
}

// The options of a call: the softcap (applied to the values, apply()) and the temperature (applied
// to the exponents, through rel's unit, and to the target term in double).
struct Transform {
  bool has_softcap;
  float softcap, inv_softcap;
  bool has_temperature;
  double inv_temperature;  // 1 / T, for the terms formed in double
  double rel_unit;         // d = rel * rel_unit: 2 / T with a temperature, else 1
  ExpUnit rel_exp;         // exp(d) = exp_scaled(rel, rel_exp.scale)
  ExpUnit diff_exp;        // the same for plain differences y - m (d = (y - m) / T)
  inline float apply(float x) const {
    if (has_softcap) x = softcap * tanh_fast(x * inv_softcap);
    return x;
  }
};

// The exponent d = (y - m) / T of an entry y <= m (m finite), in rel_unit units: with a
// temperature (y/2 - m/2), d = rel * 2/T: the halves are exact (fma rounds once) and their
// difference never overflows, where y - m overflows to -inf below -FLT_MAX while (y - m) / T is
// still finite for T > 1; without one, y - m (overflowing only below -FLT_MAX, where exp is 0
// too). The factor 2/T is applied by exp_scaled's own product (Transform::rel_exp), so that the
// temperature costs no operation per element.
template <bool TEMPERATURE>
inline float rel(float y, float m) {
  if constexpr (TEMPERATURE) return std::fma(y, 0.5f, -0.5f * m);
  return y - m;
}

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

// exp_scaled on 8 lanes (see exp_nonpos for the method and its measured error).
inline __m256 exp8_scaled(__m256 u, __m256 scale) {
  const __m256 t = _mm256_max_ps(_mm256_mul_ps(u, scale), _mm256_set1_ps(kExpClampLog2));
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

inline __m256 exp8_nonpos(__m256 d) { return exp8_scaled(d, _mm256_set1_ps(kLog2e)); }

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

// rel on 8 lanes: `ref` is m (without a temperature) or -m/2 (with one), made by rel8_ref.
template <bool TEMPERATURE>
inline __m256 rel8_ref(float m) {
  return _mm256_set1_ps(TEMPERATURE ? -0.5f * m : m);
}

template <bool TEMPERATURE>
inline __m256 rel8(__m256 y, __m256 ref) {
  if constexpr (TEMPERATURE) return _mm256_fmadd_ps(y, _mm256_set1_ps(0.5f), ref);
  return _mm256_sub_ps(y, ref);
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

// exp((from - to) / T) in double, the factor that moves a sum of exp(d) taken relative to the
// maximum `from` to the maximum `to` >= from (both finite): never overflows, and is 0 where the
// exponent passes the double range.
inline double rescale(float from, float to, double inv_temperature) {
  return from == to ? 1.0
                    : std::exp((static_cast<double>(from) - static_cast<double>(to)) *
                               inv_temperature);
}

// Running (max of y, sum of exp((y - max) / T)) of one row or row range; nan marks a NaN seen.
struct Partial {
  float max = kNegInf;
  double sum = 0.0;
  bool nan = false;
};

inline void merge(Partial& into, const Partial& p, double inv_temperature) {
  into.nan = into.nan || p.nan;
  if (p.max == kNegInf) return;  // nothing but -inf: adds exp(-inf) = 0
  if (into.max == kNegInf) {
    into.max = p.max;
    into.sum = p.sum;
    return;
  }
  const float m = std::max(into.max, p.max);
  if (m == kPosInf) {  // the row's lse is +inf; the sum no longer matters
    into.max = m;
    return;
  }
  into.sum = into.sum * rescale(into.max, m, inv_temperature) +
             p.sum * rescale(p.max, m, inv_temperature);
  into.max = m;
}

inline const void* element_ptr(const void* base, int dtype, int64_t offset) {
  const int64_t bytes = dtype == kFloat32 ? 4 : 2;
  return static_cast<const char*>(base) + offset * bytes;
}

// NLL = (max - target) / T + log(sum), from a row's (max of y, sum of exp((y - max) / T)) and its
// soft-capped target logit (one of the row's streamed values, so target <= max, and sum >= 1 since
// it holds exp(0) = 1 for the maximum). The first term is formed in double: max - target reaches
// 2 FLT_MAX, and its quotient by T > 1 may be finite. Special values as the reference computes
// lse - target: NaN seen -> NaN; max = +inf -> +inf, or NaN when the target is +inf too; an all
// -inf row -> -inf - -inf = NaN; a -inf target in a finite row -> +inf. The guard turns a rounding
// below zero into 0 and keeps NaN (NaN < 0 is false).
inline float finish_nll(float max, double sum, bool nan, float target, double inv_temperature) {
  if (nan || std::isnan(max) || std::isnan(target)) return std::numeric_limits<float>::quiet_NaN();
  double nll = (static_cast<double>(max) - static_cast<double>(target)) * inv_temperature;
  if (!std::isinf(max)) nll += std::log(sum);
  return nll < 0.0 ? 0.0f : static_cast<float>(nll);
}

inline Transform make_transform(double softcap, double temperature) {
  Transform tf;
  tf.has_softcap = softcap > 0;
  tf.softcap = static_cast<float>(softcap > 0 ? softcap : 1.0);
  tf.inv_softcap = static_cast<float>(softcap > 0 ? 1.0 / softcap : 1.0);
  tf.has_temperature = temperature != 1.0;
  tf.inv_temperature = 1.0 / temperature;
  tf.rel_unit = tf.has_temperature ? 2.0 / temperature : 1.0;
  tf.rel_exp = exp_unit(tf.rel_unit);
  tf.diff_exp = exp_unit(tf.inv_temperature);
  return tf;
}

// Column splits per row so that rows × splits keeps every thread busy on long rows (1 for no
// rows: nothing to split, and no division by zero).
inline int64_t column_splits(int64_t rows, int64_t cols, int nthreads) {
  if (rows <= 0 || rows >= nthreads) return 1;
  const int64_t want = (2 * nthreads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, cols / (4 * BLOCK)));
}

}  // namespace cpu
}  // namespace pplfast
