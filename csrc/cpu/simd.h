// The vector primitives the row kernels (rows.h) are written in, for three instruction sets:
// Scalar (one lane: any CPU), Avx2 (8 lanes: x86-64-v3, AVX2 + FMA + F16C) and Avx512 (16 lanes:
// AVX-512 F/BW/DQ/VL). Each translation unit that instantiates the kernels defines the ones its
// target supports (PPLFAST_SIMD_AVX2 / PPLFAST_SIMD_AVX512 before including this file), inside
// its own namespace, so that no function compiled for one target is shared with another.
//
// exp. exp2(t) = 2^t for t >= kExpClampLog2 (callers clamp first: clamp_exp2) as 2^n * p(f),
// n = round(t), f = t - n in [-1/2, 1/2], p the degree-5 minimax polynomial for 2^f on that range
// (relative error 1.2e-7 in exact arithmetic; Horner: 5 FMAs, no dependency on other elements,
// so the loop is bound by throughput, not latency). AVX-512 takes n = floor(t) instead, with
// f = t - n in [0, 1) from one vreduceps and the minimax polynomial of that range (Avx512::exp2),
// two instructions fewer per vector. Degree 4 would be 2.6e-6 at best, above the
// NLL's 2e-6 bound by itself; degree 6 (before) gained nothing the fp32 rounding of t leaves.
// Callers fold log2(e) and the temperature into the product that forms t (rows.h), so exp costs
// no multiply of its own. The clamp (-87.3 in natural units, ~1e-38, a normal float) maps -inf to
// ~1e-38 and keeps NaN (max(clamp, t) returns t when t is NaN): a NaN input gives a NaN sum, which
// is how the kernels without a softcap detect it. AVX-512's exp takes any finite t
// (kExpAnyExponent): compare's fast fold, which sees no infinity, runs it unclamped.
//
// Measured over every float d in [-87.3, 0] (tests/kernels/test_cpu_isa.py samples the range;
// benchmarks/results/cpu-2026-12-07.md has the exhaustive run), exp2(d * log2 e) against exp in
// double: relative error <= 2.4e-7 for |d| <= 1, 6.4e-7 for |d| <= 10, 3.9e-6 over the range
// (degree 6 before: 1.5e-7, 5.5e-7, 3.9e-6; AVX-512's floor form: 1.8e-7, 6.0e-7, 4.0e-6,
// cpu-2026-12-08.md); it grows with |d| because t is rounded to fp32
// (|d| log2(e) 2^-24 absolute), and terms with |d| > 20 are < 2e-9 of a sum that holds
// exp(0) ~ 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(PPLFAST_SIMD_AVX2) || defined(PPLFAST_SIMD_AVX512)
#include <immintrin.h>
#endif

#include "common.h"

#ifndef PPLFAST_ISA_NS
#error "simd.h is included by an isa_*.cpp translation unit that names its namespace"
#endif

namespace pplfast {
namespace cpu {
namespace PPLFAST_ISA_NS {

// minimax for 2^f on [-1/2, 1/2] with c0 fixed at the float 1 + 2^-23 (the float nearest the free
// fit's 1 + 7e-8; the others refit around it)
constexpr float kExpC0 = 1.0000001192092896f, kExpC1 = 0.6931474208831787f;
constexpr float kExpC2 = 0.24021920561790466f, kExpC3 = 0.05549710988998413f;
constexpr float kExpC4 = 0.009684677235782146f, kExpC5 = 0.001365022617392242f;

// AVX-512's exp2 reduces t by its floor (vreduceps), not to the nearest integer: minimax for 2^f on
// [0, 1) (relative error 7.7e-8 in exact arithmetic, 1.5e-7 evaluated in fp32 by Horner's FMAs),
// fitted for this range by Remez's exchange
constexpr float kExp01C0 = 0.9999999403953552f, kExp01C1 = 0.6931530237197876f;
constexpr float kExp01C2 = 0.24015381932258606f, kExp01C3 = 0.05582617223262787f;
constexpr float kExp01C4 = 0.008989127352833748f, kExp01C5 = 0.0018777841469272971f;

constexpr float kTanhSmall = 0.625f;
constexpr float kTanhP0 = -5.70498872745e-3f, kTanhP1 = 2.06390887954e-2f;
constexpr float kTanhP2 = -5.37397155531e-2f, kTanhP3 = 1.33314422036e-1f;
constexpr float kTanhP4 = -3.33332819422e-1f;

// ---- Scalar: one lane, the same operations in the same order as AVX2 (AVX-512: see exp2) ---

struct Scalar {
  using F = float;
  using Mask = bool;
  using Count = int64_t;
  static constexpr int W = 1;
  static constexpr const char* kName = "scalar";
  static constexpr bool kExpAnyExponent = false;  // exp2 needs t >= kExpClampLog2 (clamp_exp2)

  static F set1(float x) { return x; }
  static F zero() { return 0.0f; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  template <int DT>
  static F load_dt(const void* base, int64_t i) {
    return load_scalar(base, DT, i);
  }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F fmadd(F a, F b, F c) { return std::fma(a, b, c); }
  static F fnmadd(F a, F b, F c) { return std::fma(-a, b, c); }
  static F max(F a, F b) { return a > b ? a : b; }  // b where either is NaN, as maxps
  static F min(F a, F b) { return a < b ? a : b; }
  static F abs(F a) { return std::fabs(a); }
  static F copysign(F mag, F sign) { return std::copysign(mag, sign); }
  static Mask gt(F a, F b) { return a > b; }
  static Mask lt(F a, F b) { return a < b; }
  static Mask eq(F a, F b) { return a == b; }
  static Mask unord(F a) { return a != a; }
  static Mask mask_or(Mask a, Mask b) { return a || b; }
  static bool any(Mask m) { return m; }
  static uint32_t bits(Mask m) { return m ? 1u : 0u; }
  static F select(Mask m, F yes, F no) { return m ? yes : no; }
  static F and_mask(Mask m, F x) { return m ? x : 0.0f; }
  static Mask first_lanes(int k) { return k > 0; }
  static Count count_zero() { return 0; }
  static Count count_add(Count c, Mask m) { return c + (m ? 1 : 0); }
  static int64_t count_total(Count c) { return c; }
  static F exp2(F t) {
    const float n = std::nearbyint(t);
    const float f = t - n;
    float p = std::fma(kExpC5, f, kExpC4);
    p = std::fma(p, f, kExpC3);
    p = std::fma(p, f, kExpC2);
    p = std::fma(p, f, kExpC1);
    p = std::fma(p, f, kExpC0);
    if (n != n) return p;  // NaN
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float power;
    std::memcpy(&power, &bits, 4);
    return p * power;
  }
  static float hmax(F v) { return v; }
  static double hsum(F v) { return v; }
};

#ifdef PPLFAST_SIMD_AVX2
// ---- AVX2: 8 lanes ---------------------------------------------------------------------------

struct Avx2 {
  using F = __m256;
  using Mask = __m256;
  using Count = __m256i;
  static constexpr int W = 8;
  static constexpr const char* kName = "avx2";
  static constexpr bool kExpAnyExponent = false;

  static F set1(float x) { return _mm256_set1_ps(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  template <int DT>
  static F load_dt(const void* base, int64_t i) {
    if constexpr (DT == kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m128i h = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (DT == kFloat16) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static F copysign(F mag, F sign) {
    const __m256 s = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(s, mag), _mm256_and_ps(s, sign));
  }
  static Mask gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static Mask lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static Mask eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static Mask unord(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static Mask mask_or(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static uint32_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static F select(Mask m, F yes, F no) { return _mm256_blendv_ps(no, yes, m); }
  static F and_mask(Mask m, F x) { return _mm256_and_ps(m, x); }
  static Mask first_lanes(int k) {
    return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                         _mm256_set1_ps(static_cast<float>(k)), _CMP_LT_OQ);
  }
  static Count count_zero() { return _mm256_setzero_si256(); }
  static Count count_add(Count c, Mask m) { return _mm256_sub_epi32(c, _mm256_castps_si256(m)); }
  static int64_t count_total(Count c) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c);
    int64_t total = 0;
    for (int j = 0; j < 8; ++j) total += lanes[j];
    return total;
  }
  // 2^t (t >= kExpClampLog2 or NaN): n by the round-to-nearest of adding 1.5 * 2^23 (+127, the
  // exponent bias, in the same add), whose low bits are then the exponent field of 2^n.
  static F exp2(F t) {
    const __m256 magic = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
    const __m256 j = _mm256_add_ps(t, magic);
    const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(j, magic));
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), f, _mm256_set1_ps(kExpC4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC0));
    // a multiply, not an add to the exponent field: NaN stays NaN
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(j), 23)));
  }
  static float hmax(F v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static double hsum(F v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    const __m256d s = _mm256_add_pd(lo, hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
    return _mm_cvtsd_f64(t);
  }
};
#endif

#ifdef PPLFAST_SIMD_AVX512
// ---- AVX-512: 16 lanes -----------------------------------------------------------------------

struct Avx512 {
  using F = __m512;
  using Mask = __mmask16;
  using Count = __m512i;
  static constexpr int W = 16;
  static constexpr const char* kName = "avx512";
  // exp2 takes any finite t: vscalefps scales by any power of 2 (0 below 2^-149). A result
  // between 2^-149 and 2^-126 is a denormal, about 170 cycles per vector on this machine's CPU
  // (cpu-2026-12-08.md) unless the thread flushes denormals to zero (FlushToZero in rows.h);
  // with that, no clamp is needed, and every exponent below -126 gives 0.
  static constexpr bool kExpAnyExponent = true;

  static F set1(float x) { return _mm512_set1_ps(x); }
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  template <int DT>
  static F load_dt(const void* base, int64_t i) {
    if constexpr (DT == kFloat32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + i);
    } else {
      const __m256i h = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
      if constexpr (DT == kFloat16) return _mm512_cvtph_ps(h);
      // bf16: one vpermw moves half-word j to the high half of lane j and zeroes the low halves
      // (the mask keeps the odd words), where widening and shifting took two instructions
      alignas(64) static constexpr uint16_t kHigh[32] = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5,
                                                          5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10,
                                                          11, 11, 12, 12, 13, 13, 14, 14, 15, 15};
      return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
          0xAAAAAAAAu, _mm512_load_si512(kHigh), _mm512_castsi256_si512(h)));
    }
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static F copysign(F mag, F sign) {  // bitwise s ? sign : mag (truth table 0xac)
    const __m512i s = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(s, _mm512_castps_si512(mag),
                                                         _mm512_castps_si512(sign), 0xac));
  }
  static Mask gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static Mask lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static Mask eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static Mask unord(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static Mask mask_or(Mask a, Mask b) { return static_cast<Mask>(a | b); }
  static bool any(Mask m) { return m != 0; }
  static uint32_t bits(Mask m) { return m; }
  static F select(Mask m, F yes, F no) { return _mm512_mask_blend_ps(m, no, yes); }
  static F and_mask(Mask m, F x) { return _mm512_maskz_mov_ps(m, x); }
  static Mask first_lanes(int k) { return static_cast<Mask>((1u << k) - 1u); }
  static Count count_zero() { return _mm512_setzero_si512(); }
  static Count count_add(Count c, Mask m) {
    return _mm512_mask_sub_epi32(c, m, c, _mm512_set1_epi32(-1));
  }
  static int64_t count_total(Count c) { return _mm512_reduce_add_epi32(c); }
  // 2^t (any finite t, see kExpAnyExponent; NaN stays NaN) as 2^floor(t) p(f): vreduceps gives
  // f = t - floor(t) in [0, 1) exactly in one instruction, and vscalefps multiplies by
  // 2^floor(t) itself, so that neither the integer part nor a subtraction is formed (two
  // instructions fewer than rounding to nearest with vrndscaleps: pass B's exp step measured 14%
  // faster).
  static F exp2(F t) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExp01C5), f, _mm512_set1_ps(kExp01C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp01C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp01C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp01C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp01C0));
    return _mm512_scalef_ps(p, t);
  }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  static double hsum(F v) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
};
#endif

// ---- built on the primitives -----------------------------------------------------------------

// 2^max(t, clamp): the clamp first, in the order that keeps NaN.
template <class S>
inline typename S::F clamp_exp2(typename S::F t) {
  return S::max(S::set1(kExpClampLog2), t);
}

// tanh: Cephes' odd minimax polynomial below 0.625 (where the exp form would cancel), above it
// (1 - q) / (1 + q) with q = exp(-2|y|). NaN gives +-1 (the clamp of a NaN exponent is not
// reached: max(clamp, NaN) is NaN, q NaN, but the blend picks the small form's NaN or the big
// form's NaN alike): callers check NaN on the input, before this.
template <class S>
inline typename S::F tanh(typename S::F y) {
  using F = typename S::F;
  const F a = S::abs(y);
  const F z = S::mul(y, y);
  F p = S::fmadd(S::set1(kTanhP0), z, S::set1(kTanhP1));
  p = S::fmadd(p, z, S::set1(kTanhP2));
  p = S::fmadd(p, z, S::set1(kTanhP3));
  p = S::fmadd(p, z, S::set1(kTanhP4));
  const F small = S::fmadd(S::mul(y, z), p, y);
  const F q = S::exp2(clamp_exp2<S>(S::mul(a, S::set1(-2.0f * kLog2e))));
  const F one = S::set1(1.0f);
  const F big = S::copysign(S::div(S::sub(one, q), S::add(one, q)), y);
  return S::select(S::lt(a, S::set1(kTanhSmall)), small, big);
}

}  // namespace PPLFAST_ISA_NS
}  // namespace cpu
}  // namespace pplfast
