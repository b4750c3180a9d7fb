// The comparison family: two models' logits read together, one pass over both rows of each
// position, folded slab by slab into a running state (ops.h's convention).
//
// For the base row a and the test row b (after the softcap), each side keeps the online
// log-sum-exp state of its own row, (m_p = max a, s_p = sum e^{(a-m_p)/T}), and
//     A = sum_v e^{(a_v - m_p)/T} ((a_v - m_p) - (b_v - m_q)),
// over the terms where both entries are finite, with w = sum e^{(a_v - m_p)/T} over those terms.
// When the maxima grow to m_p', m_q', the exponentials scale by e^{(m_p - m_p')/T} (as s_p does)
// and every difference moves by (m_p - m_p') - (m_q - m_q'), so A' = e^{..}(A + shift w). Then
//     KL(p||q) = sum p_v (log p_v - log q_v) = A / (T s_p) - ln s_p + ln s_q,
// all relative to the two maxima: nothing of the size of the logits is ever subtracted from
// another, so rows near the top of the float range (3e38, at any temperature) come out as well
// as ordinary ones. The test side keeps the mirror state for KL(q||p). Both rows are read once,
// in blocks converted to fp32 and soft-capped into two L1 buffers (fp16/bf16 read in place).
//
// A block is folded one of three ways (rows.h):
//   - fast (the common case: no infinity or NaN, and every value and both maxima below
//     kValueBound, and below kFastBound * T, in magnitude): vector exps and sums, reduced in
//     double; no difference, and no lane sum of A's terms (each below 2 kValueBound), can
//     overflow there, and the exp's clamp (1e-38 for exponents below -87.3; AVX-512: 0, the
//     exp unclamped with denormals flushed to zero) changes a term by at most
//     1.2e-38 * 2 kFastBound. Without a softcap NaN is not tested per element: it makes
//     the block's sums NaN, and the block is folded again, masked;
//   - masked (infinities or NaN, finite values bounded as above): the same in fp32 lanes, with
//     -inf entries weighted exactly 0 and the terms of a non-finite difference left out of A;
//   - wide (a finite value beyond the bound): every term in double, one by one. Rare (logits
//     within a factor 1e-20 of the float range), and exact.
//
// Special values, as the float64 reference (README "Comparing two models"): a term with
// p_v = 0 (a_v = -inf) is 0; p_v > 0 where q_v = 0 (b_v = -inf) makes the KL +inf; NaN in either
// row (found on the loaded values, before any tanh) makes the KL NaN; so does +inf in either
// row (its softmax is undefined) and a row that is all -inf. The largest own value where the
// other row is -inf is kept to decide at the end whether p_v > 0 there in float64. The KL is
// clamped at 0.
//
// The argmax of each row is taken on the logits before the (monotone) transform: the lowest
// index of the largest value, or the first NaN, as torch.argmax.
#include "isa.h"

namespace pplfast {
using namespace cpu;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kMinSpan = 4096;

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

// KL(own||other) = A / (T s) - ln s + ln s_other (header comment), or +inf where own has p_v > 0
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

// One position's slab result for both sides.
struct Pair {
  Side p, q;
};

}  // namespace

static_assert(2 * kSide == kCompareState, "state layout");

void compare_init(double* state, int64_t rows) {
  const Side fresh;
  for (int64_t r = 0; r < rows; ++r) {
    double* st = state + r * kCompareState;
    for (int k = 0; k < kCompareState; ++k) st[k] = 0.0;
    pack(fresh, st);
    pack(fresh, st + kSide);
  }
}

void compare_update(const void* base, int base_dtype, int64_t base_batch_stride,
                    int64_t base_time_stride, int64_t base_col_stride, const void* test,
                    int test_dtype, int64_t test_batch_stride, int64_t test_time_stride,
                    int64_t test_col_stride, int64_t rows, int64_t time, int64_t cols,
                    int64_t v_offset, const int64_t* targets, int64_t ignore_index,
                    double softcap, double temperature, double* state, int nthreads) {
  if (rows <= 0 || time <= 0 || cols <= 0) return;
  const RowKernels& isa = kernels();
  const Transform tf = make_transform(softcap, temperature);
  const double inv_t = tf.inv_temperature;
  const CompareRowFn range = isa.compare(base_dtype, test_dtype, tf);
  const Rows a{base_batch_stride, base_time_stride, base_col_stride, time};
  const Rows b{test_batch_stride, test_time_stride, test_col_stride, time};
  split_rows<Pair>(
      rows, cols, nthreads, kMinSpan, targets, ignore_index,
      [&](int64_t r, int64_t c0, int64_t c1, Pair& part) {
        range(element_ptr(base, base_dtype, a.offset(r) + c0 * a.col_stride), a.col_stride,
              element_ptr(test, test_dtype, b.offset(r) + c0 * b.col_stride), b.col_stride,
              c1 - c0, v_offset + c0, tf, part.p, part.q);
      },
      [&](Pair& into, const Pair& later) { merge_pair(into.p, into.q, later.p, later.q, inv_t); },
      [&](int64_t r, const Pair& part) {
        double* st = state + r * kCompareState;
        Side sp = unpack(st), sq = unpack(st + kSide);
        merge_pair(sp, sq, part.p, part.q, inv_t);
        pack(sp, st);
        pack(sq, st + kSide);
        const int64_t t = targets[r];
        if (t >= v_offset && t < v_offset + cols) {
          // the rows' own transform, so that target <= max holds exactly
          const int64_t c = t - v_offset;
          st[kTarget] = isa.transform(
              load_scalar(base, base_dtype, a.offset(r) + c * a.col_stride), tf);
          st[kSide + kTarget] = isa.transform(
              load_scalar(test, test_dtype, b.offset(r) + c * b.col_stride), tf);
        }
      });
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
