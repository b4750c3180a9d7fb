// Native CPU kernels comparing two models' logits, one pass over both rows of each position.
//
// For the base row a and the test row b (after softcap and temperature), each side keeps the
// online log-sum-exp state of its own row, (m_p, s_p = Σ e^{a-m_p}), and
//     A = Σ_v e^{a_v - m_p} (a_v - b_v),
// rescaled by e^{m_old - m_new} whenever the running maximum grows, exactly as s_p is. Then
//     KL(p‖q) = Σ p_v (log p_v - log q_v) = A / s_p - (m_p + ln s_p) + (m_q + ln s_q).
// The test side keeps the mirror state (m_q, s_q, B = Σ e^{b-m_q}(b - a)) for KL(q‖p). Both rows
// are read once, in blocks of kBlock elements converted to fp32 into two L1 buffers (fp16/bf16
// read in place); the block's exp sums run in fp32 lanes and are added to double running sums.
//
// Special values, as the float64 reference (README "Comparing two models"): a term with
// p_v = 0 (a_v = -inf) is 0; p_v > 0 where q_v = 0 (b_v = -inf) makes the KL +inf; NaN in either
// row (detected on the loaded values, before any tanh) makes the KL NaN; so does +inf in either
// row (its softmax is undefined) and a row that is all -inf. Terms whose a_v - b_v is not finite
// are masked out of A, and the largest own value where the other row is -inf is kept to decide
// at the end whether p_v > 0 there in float64 (e^{a_v - lse_p} > 0). The KL is clamped at 0.
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

// One row's (or column range's) state for one side: its own log-sum-exp state and A.
struct Side {
  float m = kNegInf;
  double s = 0.0, A = 0.0;
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

// Load n elements (from column `start`) of one row into z, transformed; NaN is detected on the
// loaded value, before the transform (tanh8 maps NaN to a finite value).
template <int DT, bool SOFTCAP, bool TEMPERATURE>
BlockInfo load_block(const void* base, int64_t stride, int64_t start, int64_t n,
                     const Transform& tf, float* z) {
  BlockInfo info;
  int64_t i = 0;
#ifdef PPLFAST_AVX2
  if (stride == 1) {
    __m256 vraw = _mm256_set1_ps(kNegInf), vz = vraw, vmin = _mm256_set1_ps(kPosInf);
    __m256 vnan = _mm256_setzero_ps();
    const __m256 vcap = _mm256_set1_ps(tf.softcap), vinv_cap = _mm256_set1_ps(tf.inv_softcap);
    const __m256 vinv_t = _mm256_set1_ps(tf.inv_temperature);
    for (; i + 8 <= n; i += 8) {
      __m256 x = load8<DT>(base, start + i);
      vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      if constexpr (SOFTCAP || TEMPERATURE) vraw = _mm256_max_ps(x, vraw);
      if constexpr (SOFTCAP) x = _mm256_mul_ps(vcap, tanh8(_mm256_mul_ps(x, vinv_cap)));
      if constexpr (TEMPERATURE) x = _mm256_mul_ps(x, vinv_t);
      vz = _mm256_max_ps(x, vz);
      vmin = _mm256_min_ps(x, vmin);
      _mm256_store_ps(z + i, x);
    }
    info.zmax = hmax8(vz);
    info.rawmax = (SOFTCAP || TEMPERATURE) ? hmax8(vraw) : info.zmax;  // untransformed: z = x
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

// Fold one block (own and other rows transformed, padded with -inf to a multiple of 8) into
// one side's (m, s, A).
inline void fold_side(Side& side, const float* own, const float* other, int64_t len,
                      float block_max) {
  if (block_max == kNegInf || side.m == kPosInf) return;
  const float m = std::max(side.m, block_max);
  if (m == kPosInf) {  // this side's KL is NaN; its sums no longer matter
    side.m = m;
    return;
  }
  double block_s, block_a;
#ifdef PPLFAST_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vposinf = _mm256_set1_ps(kPosInf);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, a0 = s0, a1 = s0;
  auto step = [&](int64_t i, __m256& s, __m256& a) {
    const __m256 x = _mm256_load_ps(own + i);
    const __m256 e = exp8_nonpos(_mm256_sub_ps(x, vm));
    const __m256 d = _mm256_sub_ps(x, _mm256_load_ps(other + i));
    // a_v - b_v not finite: p_v = 0 (term 0) or b_v = ±inf (decided at the end)
    const __m256 finite = _mm256_cmp_ps(_mm256_and_ps(d, vabs), vposinf, _CMP_LT_OQ);
    s = _mm256_add_ps(s, e);
    a = _mm256_add_ps(a, _mm256_and_ps(finite, _mm256_mul_ps(e, d)));
  };
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    step(i, s0, a0);
    step(i + 8, s1, a1);
  }
  for (; i < len; i += 8) step(i, s0, a0);
  block_s = hsum8_double(_mm256_add_ps(s0, s1));
  block_a = hsum8_double(_mm256_add_ps(a0, a1));
#else
  float ls[8] = {0, 0, 0, 0, 0, 0, 0, 0}, la[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i) {
    if (own[i] == kNegInf) continue;
    const float e = std::exp(own[i] - m), d = own[i] - other[i];
    ls[i & 7] += e;
    if (std::isfinite(d)) la[i & 7] += e * d;
  }
  block_s = block_a = 0;
  for (int k = 0; k < 8; ++k) {
    block_s += ls[k];
    block_a += la[k];
  }
#endif
  const double c = side.m == kNegInf ? 0.0 : std::exp(static_cast<double>(side.m) - m);
  side.s = side.s * c + block_s;
  side.A = side.A * c + block_a;
  side.m = m;
}

#ifdef PPLFAST_AVX2
// Both sides at once for a block without infinities or NaN (the common case): d = a - b is
// computed once, and no term needs a mask but those of the last partial vector (padded with
// -inf). B accumulates -Σ e^{b-m_q} d = Σ e^{b-m_q} (b - a).
//
// While the exps run, the next block's cache lines of both rows (`next_a`, `next_b`,
// `next_bytes` each) are prefetched, so that the memory reads overlap the arithmetic.
inline void fold_pair(Side& p, Side& q, const float* za, const float* zb, int64_t n,
                      float max_a, float max_b, const char* next_a, const char* next_b,
                      int64_t next_bytes) {
  const float mp = std::max(p.m, max_a), mq = std::max(q.m, max_b);
  const __m256 vmp = _mm256_set1_ps(mp), vmq = _mm256_set1_ps(mq);
  __m256 sp0 = _mm256_setzero_ps(), sp1 = sp0, ap0 = sp0, ap1 = sp0;
  __m256 sq0 = sp0, sq1 = sp0, aq0 = sp0, aq1 = sp0;
  auto step = [&](int64_t i, __m256& sp, __m256& ap, __m256& sq, __m256& aq) {
    const __m256 x = _mm256_load_ps(za + i), y = _mm256_load_ps(zb + i);
    const __m256 ea = exp8_nonpos(_mm256_sub_ps(x, vmp));
    const __m256 eb = exp8_nonpos(_mm256_sub_ps(y, vmq));
    const __m256 d = _mm256_sub_ps(x, y);
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
  if (full < n) {  // padding: -inf - -inf is NaN, masked out of A and B
    const __m256 x = _mm256_load_ps(za + i), y = _mm256_load_ps(zb + i);
    const __m256 ea = exp8_nonpos(_mm256_sub_ps(x, vmp));
    const __m256 eb = exp8_nonpos(_mm256_sub_ps(y, vmq));
    const __m256 d = _mm256_sub_ps(x, y);
    const __m256 real = _mm256_cmp_ps(d, d, _CMP_ORD_Q);
    sp0 = _mm256_add_ps(sp0, ea);
    sq0 = _mm256_add_ps(sq0, eb);
    ap0 = _mm256_add_ps(ap0, _mm256_and_ps(real, _mm256_mul_ps(ea, d)));
    aq0 = _mm256_sub_ps(aq0, _mm256_and_ps(real, _mm256_mul_ps(eb, d)));
  }
  const double cp = p.m == kNegInf ? 0.0 : std::exp(static_cast<double>(p.m) - mp);
  const double cq = q.m == kNegInf ? 0.0 : std::exp(static_cast<double>(q.m) - mq);
  p.s = p.s * cp + hsum8_double(_mm256_add_ps(sp0, sp1));
  p.A = p.A * cp + hsum8_double(_mm256_add_ps(ap0, ap1));
  q.s = q.s * cq + hsum8_double(_mm256_add_ps(sq0, sq1));
  q.A = q.A * cq + hsum8_double(_mm256_add_ps(aq0, aq1));
  p.m = mp;
  q.m = mq;
}
#endif

// Entries where one row is -inf (rare): remember the largest value of the other row there.
inline void record_infinities(Side& p, Side& q, const float* za, const float* zb, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = za[i], b = zb[i];
    if (b == kNegInf) p.own_at_other_ninf = std::max(p.own_at_other_ninf, a);
    if (a == kNegInf) q.own_at_other_ninf = std::max(q.own_at_other_ninf, b);
  }
}

// Merge the state of a later column range into `into`.
inline void merge_side(Side& into, const Side& later) {
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
  if (later.m == kNegInf || into.m == kPosInf) return;
  if (later.m == kPosInf || into.m == kNegInf) {
    into.m = later.m;
    into.s = later.s;
    into.A = later.A;
    return;
  }
  const float m = std::max(into.m, later.m);
  const double ci = std::exp(static_cast<double>(into.m) - m);
  const double cl = std::exp(static_cast<double>(later.m) - m);
  into.s = into.s * ci + later.s * cl;
  into.A = into.A * ci + later.A * cl;
  into.m = m;
}

template <int DA, int DB, bool SOFTCAP, bool TEMPERATURE>
void range_state(const void* a, int64_t a_stride, const void* b, int64_t b_stride, int64_t len,
                 int64_t col0, const Transform& tf, Side& p, Side& q) {
  alignas(32) float za[kBlock];
  alignas(32) float zb[kBlock];
  p.arg = q.arg = col0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    const BlockInfo ia = load_block<DA, SOFTCAP, TEMPERATURE>(a, a_stride, start, n, tf, za);
    const BlockInfo ib = load_block<DB, SOFTCAP, TEMPERATURE>(b, b_stride, start, n, tf, zb);
    int64_t padded = n;
    for (; padded % 8 != 0; ++padded) za[padded] = zb[padded] = kNegInf;
    track_argmax(p, ia, a, DA, a_stride, start, n, col0);
    track_argmax(q, ib, b, DB, b_stride, start, n, col0);
    const bool special = ia.inf() || ib.inf() || ia.nan || ib.nan;
#ifdef PPLFAST_AVX2
    // a - b cannot overflow: both rows' ranges are far inside the float range
    if (!special && p.m != kPosInf && q.m != kPosInf &&
        std::max({ia.zmax, ib.zmax, -ia.zmin, -ib.zmin}) < 1e37f) {
      const bool unit = a_stride == 1 && b_stride == 1;
      const int64_t next_n = unit ? std::min(kBlock, len - start - n) : 0;
      fold_pair(p, q, za, zb, n, ia.zmax, ib.zmax,
                static_cast<const char*>(a) + (start + n) * (DA == kFloat32 ? 4 : 2),
                static_cast<const char*>(b) + (start + n) * (DB == kFloat32 ? 4 : 2),
                next_n * (DA == kFloat32 || DB == kFloat32 ? 4 : 2));
      continue;
    }
#endif
    if (ia.inf() || ib.inf()) record_infinities(p, q, za, zb, n);
    fold_side(p, za, zb, padded, ia.zmax);
    fold_side(q, zb, za, padded, ib.zmax);
  }
}

using RangeFn = void (*)(const void*, int64_t, const void*, int64_t, int64_t, int64_t,
                         const Transform&, Side&, Side&);

template <int DA, int DB>
RangeFn pick_transform(const Transform& tf) {
  if (tf.has_softcap)
    return tf.has_temperature ? &range_state<DA, DB, true, true> : &range_state<DA, DB, true, false>;
  return tf.has_temperature ? &range_state<DA, DB, false, true> : &range_state<DA, DB, false, false>;
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
enum { kM, kS, kA, kRawMax, kArg, kNanFlag, kAtNinf, kTarget };

inline Side unpack(const double* st) {
  Side s;
  s.m = static_cast<float>(st[kM]);
  s.s = st[kS];
  s.A = st[kA];
  s.rawmax = static_cast<float>(st[kRawMax]);
  s.arg = static_cast<int64_t>(st[kArg]);
  s.nan = st[kNanFlag] != 0;
  s.own_at_other_ninf = static_cast<float>(st[kAtNinf]);
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
}

double side_kl(const Side& own, const Side& other) {
  if (own.nan || other.nan) return kNaN;
  if (!(own.m > kNegInf && own.m < kPosInf) || !(other.m > kNegInf && other.m < kPosInf))
    return kNaN;
  const double lse_own = own.m + std::log(own.s);
  if (std::exp(static_cast<double>(own.own_at_other_ninf) - lse_own) > 0) return HUGE_VAL;
  const double lse_other = other.m + std::log(other.s);
  return std::max(own.A / own.s - lse_own + lse_other, 0.0);
}

int64_t compare_splits(int64_t rows, int64_t cols, int nthreads) {
  if (rows >= nthreads) return 1;
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
  if (rows == 0 || cols == 0) return;
  const Transform tf = make_transform(softcap, temperature);
  const RangeFn range = pick(base_dtype, test_dtype, tf);
  auto offset = [&](int64_t r, int64_t bs, int64_t ts) { return (r / time) * bs + (r % time) * ts; };
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
    merge_side(sp, p);
    merge_side(sq, q);
    pack(sp, st);
    pack(sq, st + kSide);
    const int64_t t = targets[r];
    if (t >= v_offset && t < v_offset + cols) {
      // the streamed values' fp32 transform, so that target <= max holds exactly
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
      merge_side(p, parts[2 * (r * splits + piece)]);
      merge_side(q, parts[2 * (r * splits + piece) + 1]);
    }
    fold_row(r, p, q);
  }
}

void compare_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                    int64_t rows, float* kl, float* kl_reverse, float* nll_base, float* nll_test,
                    int64_t* argmax_base, int64_t* argmax_test) {
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      kl[r] = kl_reverse[r] = nll_base[r] = nll_test[r] = 0.0f;
      argmax_base[r] = argmax_test[r] = -1;
      continue;
    }
    const double* st = state + r * kCompareState;
    const Side p = unpack(st), q = unpack(st + kSide);
    kl[r] = static_cast<float>(side_kl(p, q));
    kl_reverse[r] = static_cast<float>(side_kl(q, p));
    nll_base[r] = finish_nll(p.m, p.s, p.nan, static_cast<float>(st[kTarget]));
    nll_test[r] = finish_nll(q.m, q.s, q.nan, static_cast<float>(st[kSide + kTarget]));
    argmax_base[r] = p.arg;
    argmax_test[r] = q.arg;
  }
}

}  // namespace pplfast
