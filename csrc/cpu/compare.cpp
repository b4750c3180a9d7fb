// Native CPU kernels comparing two models' logits, one pass over both rows of each position.
//
// For the base row a and the test row b (after the softcap), each side keeps the online
// log-sum-exp state of its own row, (m_p = max a, s_p = Σ e^{(a-m_p)/T}), and
//     A = Σ_v e^{(a_v - m_p)/T} · ((a_v - m_p) - (b_v - m_q)),
// over the terms where both entries are finite, with w = Σ e^{(a_v - m_p)/T} over those terms.
// When the maxima grow to m_p', m_q', the exponentials scale by e^{(m_p - m_p')/T} (as s_p does)
// and every difference moves by (m_p - m_p') - (m_q - m_q'), so A' = e^{..}(A + shift w). Then
//     KL(p‖q) = Σ p_v (log p_v - log q_v) = A / (T s_p) - ln s_p + ln s_q,
// all relative to the two maxima: nothing of the size of the logits is ever subtracted from
// another, so rows near the top of the float range (3e38, at any temperature) come out as well
// as ordinary ones. The test side keeps the mirror state for KL(q‖p). Both rows are read once,
// in blocks of kBlock elements converted to fp32 and soft-capped into two L1 buffers (fp16/bf16
// read in place).
//
// A block is folded one of three ways:
//   - fast (the common case: no infinity or NaN, and every value and both maxima below
//     kValueBound, and below kFastBound * T, in magnitude): 8-lane fp32 exps and sums, reduced in
//     double; no difference, and no 64-term lane sum of A's terms (each below 2 kValueBound),
//     can overflow there, and the exp's clamp (1e-38 for exponents below -87.3) adds at most
//     1e-38 * 2 kFastBound per term;
//   - masked (infinities or NaN, finite values bounded as above): the same in fp32 lanes, with
//     -inf entries weighted exactly 0 and the terms of a non-finite difference left out of A;
//   - wide (a finite value beyond the bound): every term in double, one by one. Rare (logits
//     within a factor 1e-20 of the float range), and exact.
//
// Special values, as the float64 reference (README "Comparing two models"): a term with
// p_v = 0 (a_v = -inf) is 0; p_v > 0 where q_v = 0 (b_v = -inf) makes the KL +inf; NaN in either
// row (detected on the loaded values, before any tanh) makes the KL NaN; so does +inf in either
// row (its softmax is undefined) and a row that is all -inf. The largest own value where the
// other row is -inf is kept to decide at the end whether p_v > 0 there in float64. The KL is
// clamped at 0.
//
// The argmax of each row is taken on the logits before the (monotone) transform: the lowest
// index of the largest value, or the first NaN, as torch.argmax.
//
// Work is split over OpenMP threads by rows; when rows are fewer than threads each row is also
// cut into column ranges whose states are merged in column order afterwards. The hidden-states
// path folds vocabulary slabs into the same state (compare_update with a v_offset).
#include "compare.h"

#include <omp.h>

#include <vector>

#include "common.h"

namespace pplfast {
using namespace cpu;

namespace {

constexpr int64_t kBlock = 1024;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// The fast and masked folds need every |y| below kValueBound and every |y| / T below kFastBound
// (see the header comment).
constexpr double kValueBound = 1e36;
constexpr double kFastBound = 1e20;

// One row's (or column range's) state for one side.
struct Side {
  float m = kNegInf;  // running max of the soft-capped row
  double s = 0.0;     // Σ e^{(y - m)/T}
  double A = 0.0;     // Σ e^{(y - m)/T} ((y - m) - (other - m_other)), both entries finite
  double w = 0.0;     // Σ e^{(y - m)/T} over the terms of A
  float rawmax = kNegInf;
  int64_t arg = 0;  // argmax so far (first NaN once nan is set)
  bool nan = false;
  float own_at_other_ninf = kNegInf;  // largest own value where the other row is -inf
};

struct BlockInfo {
  float rawmax = kNegInf, zmax = kNegInf, zmin = kPosInf;
  bool nan = false;
  bool inf() const { return zmax == kPosInf || zmin == kNegInf; }
};

// Load n elements (from column `start`) of one row into z, soft-capped; NaN is detected on the
// loaded value, before the transform (tanh8 maps NaN to a finite value).
template <int DT, bool SOFTCAP>
BlockInfo load_block(const void* base, int64_t stride, int64_t start, int64_t n,
                     const Transform& tf, float* z) {
  BlockInfo info;
  int64_t i = 0;
#ifdef PPLFAST_AVX2
  if (stride == 1) {
    __m256 vraw = _mm256_set1_ps(kNegInf), vz = vraw, vmin = _mm256_set1_ps(kPosInf);
    __m256 vnan = _mm256_setzero_ps();
    const __m256 vcap = _mm256_set1_ps(tf.softcap), vinv_cap = _mm256_set1_ps(tf.inv_softcap);
    for (; i + 8 <= n; i += 8) {
      __m256 x = load8<DT>(base, start + i);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      if constexpr (SOFTCAP) {
        vraw = _mm256_max_ps(x, vraw);
        x = _mm256_mul_ps(vcap, tanh8(_mm256_mul_ps(x, vinv_cap)));
      }
      vz = _mm256_max_ps(x, vz);
      vmin = _mm256_min_ps(x, vmin);
      _mm256_store_ps(z + i, x);
    }
    info.zmax = hmax8(vz);
    info.rawmax = SOFTCAP ? hmax8(vraw) : info.zmax;  // untransformed: z = x
    info.zmin = -hmax8(_mm256_sub_ps(_mm256_setzero_ps(), vmin));
    info.nan = _mm256_movemask_ps(vnan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float raw = load_scalar(base, DT, (start + i) * stride);
    info.nan = info.nan || std::isnan(raw);
    info.rawmax = raw > info.rawmax ? raw : info.rawmax;
    const float x = tf.apply(raw);
    info.zmax = x > info.zmax ? x : info.zmax;
    info.zmin = x < info.zmin ? x : info.zmin;
    z[i] = x;
  }
  return info;
}

// Running argmax (or first NaN) of the raw row, from one block's summary; `col0` is the column
// of the range's first element in the full vocabulary.
inline void track_argmax(Side& side, const BlockInfo& info, const void* base, int dtype,
                         int64_t stride, int64_t start, int64_t n, int64_t col0) {
  if (side.nan) return;
  if (info.nan) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(load_scalar(base, dtype, (start + i) * stride))) {
        side.nan = true;
        side.arg = col0 + start + i;
        return;
      }
    }
  }
  if (info.rawmax > side.rawmax) {
    for (int64_t i = 0; i < n; ++i) {
      if (load_scalar(base, dtype, (start + i) * stride) == info.rawmax) {
        side.rawmax = info.rawmax;
        side.arg = col0 + start + i;
        return;
      }
    }
  }
}

// Move both sides' sums to the maxima mp, mq (>= their own): s and w scale by e^{(m - m')/T},
// A by the same factor after adding shift * w (header comment). A +inf maximum leaves the sums
// as they are (that side's NLL is +inf and both KLs are NaN, whatever they hold); -inf (no
// value yet) has empty sums.
inline void rescale_pair(Side& p, Side& q, float mp, float mq, double inv_t) {
  auto factor = [&](const Side& side, float m_new) {
    if (side.m == m_new || side.m == kNegInf || m_new == kPosInf) return 1.0;
    return rescale(side.m, m_new, inv_t);
  };
  const double ap = factor(p, mp), aq = factor(q, mq);
  if ((p.w > 0 || q.w > 0) && mp != kPosInf && mq != kPosInf) {
    // terms exist only where both maxima were finite
    const double shift = (static_cast<double>(p.m) - mp) - (static_cast<double>(q.m) - mq);
    p.A = ap > 0 ? ap * (p.A + shift * p.w) : 0.0;
    q.A = aq > 0 ? aq * (q.A - shift * q.w) : 0.0;
  }
  p.s *= ap;
  p.w *= ap;
  q.s *= aq;
  q.w *= aq;
  p.m = mp;
  q.m = mq;
}

// Block sums relative to the new maxima, added after rescale_pair.
struct BlockSums {
  double sp = 0, ap = 0, wp = 0, sq = 0, aq = 0, wq = 0;
};

inline void add(Side& p, Side& q, const BlockSums& b) {
  p.s += b.sp;
  p.A += b.ap;
  p.w += b.wp;
  q.s += b.sq;
  q.A += b.aq;
  q.w += b.wq;
}

#ifdef PPLFAST_AVX2
// Both sides at once for a block without infinities or NaN and with bounded values (the common
// case): u_a, u_b and their difference are computed once, and every term is in A (w = s), but
// those of the last partial vector's padding (-inf), weighted 0. The exponents are u = y - m
// (bounded, exact near the maximum); the temperature rides on the exp's own product
// (Transform::diff_exp).
//
// While the exps run, the next block's cache lines of both rows (`next_a`, `next_b`,
// `next_bytes` each) are prefetched, so that the memory reads overlap the arithmetic.
BlockSums fold_fast(const float* za, const float* zb, int64_t n, float mp, float mq,
                    const Transform& tf, const char* next_a, const char* next_b,
                    int64_t next_bytes) {
  const __m256 vmp = _mm256_set1_ps(mp), vmq = _mm256_set1_ps(mq);
  const __m256 scale = _mm256_set1_ps(tf.diff_exp.scale);
  __m256 sp0 = _mm256_setzero_ps(), sp1 = sp0, ap0 = sp0, ap1 = sp0;
  __m256 sq0 = sp0, sq1 = sp0, aq0 = sp0, aq1 = sp0;
  auto step = [&](int64_t i, __m256& sp, __m256& ap, __m256& sq, __m256& aq) {
    const __m256 ua = _mm256_sub_ps(_mm256_load_ps(za + i), vmp);
    const __m256 ub = _mm256_sub_ps(_mm256_load_ps(zb + i), vmq);
    const __m256 ea = exp8_scaled(ua, scale);
    const __m256 eb = exp8_scaled(ub, scale);
    const __m256 d = _mm256_sub_ps(ua, ub);
    sp = _mm256_add_ps(sp, ea);
    ap = _mm256_fmadd_ps(ea, d, ap);
    sq = _mm256_add_ps(sq, eb);
    aq = _mm256_fnmadd_ps(eb, d, aq);
  };
  const int64_t full = n & ~int64_t(7);
  int64_t i = 0, prefetched = 0;
  for (; i + 16 <= full; i += 16) {
    if (prefetched < next_bytes) {
      _mm_prefetch(next_a + prefetched, _MM_HINT_T0);
      _mm_prefetch(next_b + prefetched, _MM_HINT_T0);
      prefetched += 64;
    }
    step(i, sp0, ap0, sq0, aq0);
    step(i + 8, sp1, ap1, sq1, aq1);
  }
  for (; i < full; i += 8) step(i, sp0, ap0, sq0, aq0);
  if (full < n) {  // the padding lanes (-inf in both rows) weigh 0
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 real = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n - full)),
                                      _CMP_LT_OQ);
    const __m256 ua = _mm256_sub_ps(_mm256_load_ps(za + i), vmp);
    const __m256 ub = _mm256_sub_ps(_mm256_load_ps(zb + i), vmq);
    const __m256 ea = _mm256_and_ps(real, exp8_scaled(ua, scale));
    const __m256 eb = _mm256_and_ps(real, exp8_scaled(ub, scale));
    const __m256 d = _mm256_and_ps(real, _mm256_sub_ps(ua, ub));
    sp0 = _mm256_add_ps(sp0, ea);
    sq0 = _mm256_add_ps(sq0, eb);
    ap0 = _mm256_fmadd_ps(ea, d, ap0);
    aq0 = _mm256_fnmadd_ps(eb, d, aq0);
  }
  BlockSums out;
  out.sp = out.wp = hsum8_double(_mm256_add_ps(sp0, sp1));
  out.ap = hsum8_double(_mm256_add_ps(ap0, ap1));
  out.sq = out.wq = hsum8_double(_mm256_add_ps(sq0, sq1));
  out.aq = hsum8_double(_mm256_add_ps(aq0, aq1));
  return out;
}

// A block with infinities or NaN and bounded finite values (padded with -inf to a multiple of
// 8): -inf and NaN entries weigh exactly 0, terms whose difference is not finite stay out of A
// and w. A side whose maximum is +inf adds nothing (its sums no longer matter), nor does A
// when either maximum is +inf.
BlockSums fold_masked(const float* za, const float* zb, int64_t len, float mp, float mq,
                      const Transform& tf) {
  const bool live_p = mp != kPosInf, live_q = mq != kPosInf, live_a = live_p && live_q;
  const __m256 vmp = _mm256_set1_ps(live_p ? mp : 0.0f), vmq = _mm256_set1_ps(live_q ? mq : 0.0f);
  const __m256 scale = _mm256_set1_ps(tf.diff_exp.scale);
  const __m256 vninf = _mm256_set1_ps(kNegInf);
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vposinf = _mm256_set1_ps(kPosInf);
  __m256 sp = _mm256_setzero_ps(), ap = sp, wp = sp, sq = sp, aq = sp, wq = sp;
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 x = _mm256_load_ps(za + i), y = _mm256_load_ps(zb + i);
    const __m256 ua = _mm256_sub_ps(x, vmp), ub = _mm256_sub_ps(y, vmq);
    // weight 0 for -inf and NaN entries (the comparison is false for both)
    const __m256 ea = _mm256_and_ps(_mm256_cmp_ps(x, vninf, _CMP_GT_OQ),
                                    exp8_scaled(ua, scale));
    const __m256 eb = _mm256_and_ps(_mm256_cmp_ps(y, vninf, _CMP_GT_OQ),
                                    exp8_scaled(ub, scale));
    const __m256 d = _mm256_sub_ps(ua, ub);
    const __m256 in_a = _mm256_cmp_ps(_mm256_and_ps(d, vabs), vposinf, _CMP_LT_OQ);
    sp = _mm256_add_ps(sp, ea);
    sq = _mm256_add_ps(sq, eb);
    const __m256 ea_in = _mm256_and_ps(in_a, ea), eb_in = _mm256_and_ps(in_a, eb);
    const __m256 d_in = _mm256_and_ps(in_a, d);
    wp = _mm256_add_ps(wp, ea_in);
    wq = _mm256_add_ps(wq, eb_in);
    ap = _mm256_fmadd_ps(ea_in, d_in, ap);
    aq = _mm256_fnmadd_ps(eb_in, d_in, aq);
  }
  BlockSums out;
  if (live_p) out.sp = hsum8_double(sp);
  if (live_q) out.sq = hsum8_double(sq);
  if (live_a) {
    out.ap = hsum8_double(ap);
    out.wp = hsum8_double(wp);
    out.aq = hsum8_double(aq);
    out.wq = hsum8_double(wq);
  }
  return out;
}
#endif

// Every term in double (the wide fold, and the masked one without AVX2): exact for any finite
// values; -inf and NaN entries weigh 0.
inline BlockSums fold_wide(const float* za, const float* zb, int64_t n, float mp, float mq,
                           double inv_t) {
  const bool live_p = mp != kPosInf, live_q = mq != kPosInf;
  BlockSums out;
  for (int64_t i = 0; i < n; ++i) {
    const double a = za[i], b = zb[i];
    const bool fa = a > kNegInf && a < kPosInf, fb = b > kNegInf && b < kPosInf;  // not NaN
    const double ua = a - mp, ub = b - mq;
    const double ea = live_p && fa ? std::exp(ua * inv_t) : 0.0;
    const double eb = live_q && fb ? std::exp(ub * inv_t) : 0.0;
    out.sp += ea;
    out.sq += eb;
    if (live_p && live_q && fa && fb) {
      out.ap += ea * (ua - ub);
      out.wp += ea;
      out.aq += eb * (ub - ua);
      out.wq += eb;
    }
  }
  return out;
}

// Entries where one row is -inf (rare): remember the largest value of the other row there.
inline void record_infinities(Side& p, Side& q, const float* za, const float* zb, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = za[i], b = zb[i];
    if (b == kNegInf) p.own_at_other_ninf = std::max(p.own_at_other_ninf, a);
    if (a == kNegInf) q.own_at_other_ninf = std::max(q.own_at_other_ninf, b);
  }
}

// Largest |value| among the finite entries (NaN and infinities skipped).
inline float finite_absmax(const float* z, int64_t n) {
  float top = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(z[i]);
    if (a < kPosInf && a > top) top = a;
  }
  return top;
}

inline bool within(float x, double inv_t) {
  const double a = std::fabs(static_cast<double>(x));
  return a < kValueBound && a * inv_t < kFastBound;
}

// Merge the state of a later column range (lp, lq) into (p, q).
inline void merge_pair(Side& p, Side& q, Side lp, Side lq, double inv_t) {
  auto flags = [](Side& into, const Side& later) {
    if (later.nan) {
      if (!into.nan) {
        into.nan = true;
        into.arg = later.arg;
      }
    } else if (!into.nan && later.rawmax > into.rawmax) {
      into.rawmax = later.rawmax;
      into.arg = later.arg;
    }
    into.own_at_other_ninf = std::max(into.own_at_other_ninf, later.own_at_other_ninf);
  };
  flags(p, lp);
  flags(q, lq);
  const float mp = std::max(p.m, lp.m), mq = std::max(q.m, lq.m);
  rescale_pair(p, q, mp, mq, inv_t);
  rescale_pair(lp, lq, mp, mq, inv_t);
  BlockSums later;
  later.sp = lp.s, later.ap = lp.A, later.wp = lp.w;
  later.sq = lq.s, later.aq = lq.A, later.wq = lq.w;
  add(p, q, later);
}

template <int DA, int DB, bool SOFTCAP>
void range_state(const void* a, int64_t a_stride, const void* b, int64_t b_stride, int64_t len,
                 int64_t col0, const Transform& tf, Side& p, Side& q) {
  alignas(32) float za[kBlock];
  alignas(32) float zb[kBlock];
  const double inv_t = tf.inv_temperature;
  p.arg = q.arg = col0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    const BlockInfo ia = load_block<DA, SOFTCAP>(a, a_stride, start, n, tf, za);
    const BlockInfo ib = load_block<DB, SOFTCAP>(b, b_stride, start, n, tf, zb);
    int64_t padded = n;
    for (; padded % 8 != 0; ++padded) za[padded] = zb[padded] = kNegInf;
    track_argmax(p, ia, a, DA, a_stride, start, n, col0);
    track_argmax(q, ib, b, DB, b_stride, start, n, col0);
    const float mp = std::max(p.m, ia.zmax), mq = std::max(q.m, ib.zmax);
    rescale_pair(p, q, mp, mq, inv_t);
    const bool special = ia.inf() || ib.inf() || ia.nan || ib.nan;
    if (ia.inf() || ib.inf()) record_infinities(p, q, za, zb, n);
    // maxima of +-inf (an all -inf block, +inf entries) are decided apart, never differenced
    const bool maxima_within = (mp == kNegInf || mp == kPosInf || within(mp, inv_t)) &&
                               (mq == kNegInf || mq == kPosInf || within(mq, inv_t));
    const bool values_within =
        special ? within(std::max(finite_absmax(za, n), finite_absmax(zb, n)), inv_t)
                : within(std::max({ia.zmax, ib.zmax, -ia.zmin, -ib.zmin}), inv_t);
    if (!(maxima_within && values_within)) {
      add(p, q, fold_wide(za, zb, n, mp, mq, inv_t));
      continue;
    }
#ifdef PPLFAST_AVX2
    if (special) {
      add(p, q, fold_masked(za, zb, padded, mp, mq, tf));
      continue;
    }
    const bool unit = a_stride == 1 && b_stride == 1;
    const int64_t next_n = unit ? std::min(kBlock, len - start - n) : 0;
    add(p, q, fold_fast(za, zb, n, mp, mq, tf,
                        static_cast<const char*>(a) + (start + n) * (DA == kFloat32 ? 4 : 2),
                        static_cast<const char*>(b) + (start + n) * (DB == kFloat32 ? 4 : 2),
                        next_n * (DA == kFloat32 || DB == kFloat32 ? 4 : 2)));
#else
    add(p, q, fold_wide(za, zb, n, mp, mq, inv_t));
#endif
  }
}

using RangeFn = void (*)(const void*, int64_t, const void*, int64_t, int64_t, int64_t,
                         const Transform&, Side&, Side&);

// (the temperature is a constant of the exp, Transform::diff_exp: no variant of its own)
template <int DA, int DB>
RangeFn pick_transform(const Transform& tf) {
  return tf.has_softcap ? &range_state<DA, DB, true> : &range_state<DA, DB, false>;
}

template <int DA>
RangeFn pick_test(int db, const Transform& tf) {
  switch (db) {
    case kFloat32: return pick_transform<DA, kFloat32>(tf);
    case kFloat16: return pick_transform<DA, kFloat16>(tf);
    default: return pick_transform<DA, kBFloat16>(tf);
  }
}

RangeFn pick(int da, int db, const Transform& tf) {
  switch (da) {
    case kFloat32: return pick_test<kFloat32>(db, tf);
    case kFloat16: return pick_test<kFloat16>(db, tf);
    default: return pick_test<kBFloat16>(db, tf);
  }
}

// ---- the packed per-row state: two sides of 10 doubles -----------------------------------------

constexpr int kSide = 10;
enum { kM, kS, kA, kRawMax, kArg, kNanFlag, kAtNinf, kTarget, kW };

inline Side unpack(const double* st) {
  Side s;
  s.m = static_cast<float>(st[kM]);
  s.s = st[kS];
  s.A = st[kA];
  s.rawmax = static_cast<float>(st[kRawMax]);
  s.arg = static_cast<int64_t>(st[kArg]);
  s.nan = st[kNanFlag] != 0;
  s.own_at_other_ninf = static_cast<float>(st[kAtNinf]);
  s.w = st[kW];
  return s;
}

inline void pack(const Side& s, double* st) {
  st[kM] = s.m;
  st[kS] = s.s;
  st[kA] = s.A;
  st[kRawMax] = s.rawmax;
  st[kArg] = static_cast<double>(s.arg);
  st[kNanFlag] = s.nan ? 1.0 : 0.0;
  st[kAtNinf] = s.own_at_other_ninf;
  st[kW] = s.w;
}

// KL(own‖other) = A / (T s) - ln s + ln s_other (header comment), or +inf where own has p_v > 0
// (in float64) at an entry where other is -inf.
double side_kl(const Side& own, const Side& other, double inv_t) {
  if (own.nan || other.nan) return kNaN;
  if (!(own.m > kNegInf && own.m < kPosInf) || !(other.m > kNegInf && other.m < kPosInf))
    return kNaN;
  const double log_s = std::log(own.s), log_s_other = std::log(other.s);
  const double at_ninf = (static_cast<double>(own.own_at_other_ninf) - own.m) * inv_t - log_s;
  if (std::exp(at_ninf) > 0) return HUGE_VAL;
  return std::max(own.A * inv_t / own.s - log_s + log_s_other, 0.0);
}

int64_t compare_splits(int64_t rows, int64_t cols, int nthreads) {
  if (rows <= 0 || rows >= nthreads) return 1;
  const int64_t want = (2 * nthreads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, cols / (4 * kBlock)));
}

}  // namespace

static_assert(2 * kSide == kCompareState, "state layout");

void compare_init(double* state, int64_t rows) {
  const Side fresh;
  for (int64_t r = 0; r < rows; ++r) {
    pack(fresh, state + r * kCompareState);
    pack(fresh, state + r * kCompareState + kSide);
    state[r * kCompareState + kTarget] = state[r * kCompareState + kSide + kTarget] = 0.0;
    for (int k = kTarget + 1; k < kSide; ++k)
      state[r * kCompareState + k] = state[r * kCompareState + kSide + k] = 0.0;
  }
}

void compare_update(const void* base, int base_dtype, int64_t base_batch_stride,
                    int64_t base_time_stride, int64_t base_col_stride, const void* test,
                    int test_dtype, int64_t test_batch_stride, int64_t test_time_stride,
                    int64_t test_col_stride, int64_t rows, int64_t time, int64_t cols,
                    int64_t v_offset, const int64_t* targets, int64_t ignore_index,
                    double softcap, double temperature, double* state, int nthreads) {
  if (rows <= 0 || time <= 0 || cols <= 0) return;
  const Transform tf = make_transform(softcap, temperature);
  const double inv_t = tf.inv_temperature;
  const RangeFn range = pick(base_dtype, test_dtype, tf);
  auto offset = [&](int64_t r, int64_t bs, int64_t ts) {
    return (r / time) * bs + (r % time) * ts;
  };
  auto range_at = [&](int64_t r, int64_t c0, int64_t c1, Side& p, Side& q) {
    range(element_ptr(base, base_dtype,
                      offset(r, base_batch_stride, base_time_stride) + c0 * base_col_stride),
          base_col_stride,
          element_ptr(test, test_dtype,
                      offset(r, test_batch_stride, test_time_stride) + c0 * test_col_stride),
          test_col_stride, c1 - c0, v_offset + c0, tf, p, q);
  };
  // fold the slab's (p, q) into row r's state, and record the targets that fall in the slab
  auto fold_row = [&](int64_t r, const Side& p, const Side& q) {
    double* st = state + r * kCompareState;
    Side sp = unpack(st), sq = unpack(st + kSide);
    merge_pair(sp, sq, p, q, inv_t);
    pack(sp, st);
    pack(sq, st + kSide);
    const int64_t t = targets[r];
    if (t >= v_offset && t < v_offset + cols) {
      // the streamed values' fp32 softcap, so that target <= max holds exactly
      const int64_t c = t - v_offset;
      st[kTarget] = tf.apply(load_scalar(
          base, base_dtype, offset(r, base_batch_stride, base_time_stride) + c * base_col_stride));
      st[kSide + kTarget] = tf.apply(load_scalar(
          test, test_dtype, offset(r, test_batch_stride, test_time_stride) + c * test_col_stride));
    }
  };
  const int64_t splits = compare_splits(rows, cols, nthreads);
  if (splits == 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r] == ignore_index) continue;
      Side p, q;
      range_at(r, 0, cols, p, q);
      fold_row(r, p, q);
    }
    return;
  }
  const int64_t span = (cols + splits - 1) / splits;
  std::vector<Side> parts(static_cast<size_t>(2 * rows * splits));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t task = 0; task < rows * splits; ++task) {
    const int64_t r = task / splits, piece = task % splits;
    if (targets[r] == ignore_index) continue;
    const int64_t c0 = piece * span, c1 = std::min(cols, c0 + span);
    if (c0 >= c1) continue;
    range_at(r, c0, c1, parts[2 * task], parts[2 * task + 1]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    Side p = parts[2 * r * splits], q = parts[2 * r * splits + 1];
    for (int64_t piece = 1; piece < splits; ++piece) {
      if (piece * span >= cols) break;
      merge_pair(p, q, parts[2 * (r * splits + piece)], parts[2 * (r * splits + piece) + 1],
                 inv_t);
    }
    fold_row(r, p, q);
  }
}

void compare_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                    int64_t rows, double temperature, float* kl, float* kl_reverse,
                    float* nll_base, float* nll_test, int64_t* argmax_base,
                    int64_t* argmax_test) {
  const double inv_t = 1.0 / temperature;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      kl[r] = kl_reverse[r] = nll_base[r] = nll_test[r] = 0.0f;
      argmax_base[r] = argmax_test[r] = -1;
      continue;
    }
    const double* st = state + r * kCompareState;
    const Side p = unpack(st), q = unpack(st + kSide);
    kl[r] = static_cast<float>(side_kl(p, q, inv_t));
    kl_reverse[r] = static_cast<float>(side_kl(q, p, inv_t));
    nll_base[r] = finish_nll(p.m, p.s, p.nan, static_cast<float>(st[kTarget]), inv_t);
    nll_test[r] = finish_nll(q.m, q.s, q.nan, static_cast<float>(st[kSide + kTarget]), inv_t);
    argmax_base[r] = p.arg;
    argmax_test[r] = q.arg;
  }
}

}  // namespace pplfast
