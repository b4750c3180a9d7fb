// What the native CPU kernels share and what does not depend on the instruction set: element loads
// of fp32/fp16/bf16 (scalar), the options of a call (Transform), the running partials of each op
// family and their exact merges, the NLL from a (max, sum) pair, and the one row/column-split loop
// (split_rows) every *_update runs. The vector row kernels are in rows.h (one copy per instruction
// set, isa_*.cpp); this header is compiled with the build's baseline flags in every translation
// unit.
//
// Units. The running maximum m is that of the soft-capped logits y (the temperature is not applied
// to the values): every exponent is d = (y - m) / T <= 0 and the NLL is (m - y_t) / T +
// log(sum exp(d)) with the first term in double. Dividing the values by the temperature first
// would overflow at the top of the float range (3e38 / 0.5 = +inf, then inf - inf = NaN) and
// subtract two huge rounded numbers.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "ops.h"

namespace pplfast {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;
// Exponents below -87.3 (natural units; ~1e-38, the smallest normal float's order) are clamped
// there: kExpClampLog2 in log2 units.
constexpr float kExpClamp = -87.3f;
constexpr float kExpClampLog2 = kExpClamp * kLog2e;

// ---- scalar element access -------------------------------------------------------------------

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float fp16_to_float(uint16_t h) {
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
}

inline float load_scalar(const void* base, int dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base)[index];
    case kFloat16: return fp16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
}

inline const void* element_ptr(const void* base, int dtype, int64_t offset) {
  const int64_t bytes = dtype == kFloat32 ? 4 : 2;
  return static_cast<const char*>(base) + offset * bytes;
}

// Row r of a (batch, time) layout: its first element's offset.
struct Rows {
  int64_t batch_stride, time_stride, col_stride, time;
  int64_t offset(int64_t r) const { return (r / time) * batch_stride + (r % time) * time_stride; }
};

// ---- the options of a call --------------------------------------------------------------------

// The softcap (applied to the values, by the row kernels' vector tanh) and the temperature
// (applied to the exponents). Exponents are formed in log2 units, t = (y - m) * log2(e) / T,
// by one FMA per element, y * fold_scale - m * fold_scale (the log2(e) fold: no subtraction and
// no multiply of its own), where m * fold_scale is rounded to float once per block maximum and the
// rounding error is put back in double (rows.h). Where |m * fold_scale| >= 2^23 (|m| >= 5.8e6 at
// T = 1), that rounding could pass 1/2 and the exponents are formed as before the fold: halves
// y/2 - m/2 (exact, never overflowing) with a temperature, times rel_scale = 2 log2(e) / T;
// y - m without one, times log2(e).
struct Transform {
  bool has_softcap;
  float softcap, inv_softcap;
  bool has_temperature;
  double temperature, inv_temperature;
  float fold_scale;  // log2(e) / T
  float rel_scale;   // log2(e) * rel_unit
  double rel_unit;   // 2 / T with a temperature, else 1: d = rel * rel_unit
};

inline Transform make_transform(double softcap, double temperature) {
  Transform tf;
  tf.has_softcap = softcap > 0;
  tf.softcap = static_cast<float>(softcap > 0 ? softcap : 1.0);
  tf.inv_softcap = static_cast<float>(softcap > 0 ? 1.0 / softcap : 1.0);
  tf.has_temperature = temperature != 1.0;
  tf.temperature = temperature;
  tf.inv_temperature = 1.0 / temperature;
  tf.fold_scale = static_cast<float>(static_cast<double>(kLog2e) / temperature);
  tf.rel_unit = tf.has_temperature ? 2.0 / temperature : 1.0;
  tf.rel_scale = static_cast<float>(kLog2e * tf.rel_unit);
  return tf;
}

// exp((from - to) / T) in double, the factor that moves a sum of exp(d) taken relative to the
// maximum `from` to the maximum `to` >= from (both finite): never overflows, and is 0 where the
// exponent passes the double range.
inline double rescale(float from, float to, double inv_temperature) {
  return from == to ? 1.0
                    : std::exp((static_cast<double>(from) - static_cast<double>(to)) *
                               inv_temperature);
}

// ---- NLL ------------------------------------------------------------------------------------------

// Running (max of y, sum of exp((y - max) / T)) of one row or column range; nan marks a NaN seen.
struct NllPart {
  float max = kNegInf;
  double sum = 0.0;
  bool nan = false;
};

inline void merge(NllPart& into, const NllPart& p, double inv_temperature) {
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

// NLL = (max - target) / T + log(sum), from a row's (max of y, sum of exp((y - max) / T)) and its
// soft-capped target logit (one of the row's streamed values, so target <= max, and sum ~ >= 1
// since it holds exp(0) for the maximum). The first term is formed in double: max - target
// reaches 2 FLT_MAX, and its quotient by T > 1 may be finite. Special values as the reference
// computes lse - target: NaN seen -> NaN; max = +inf -> +inf, or NaN when the target is +inf too;
// an all -inf row -> -inf - -inf = NaN; a -inf target in a finite row -> +inf. The guard turns a
// rounding below zero into 0 and keeps NaN (NaN < 0 is false).
inline float finish_nll(float max, double sum, bool nan, float target, double inv_temperature) {
  if (nan || std::isnan(max) || std::isnan(target)) return std::numeric_limits<float>::quiet_NaN();
  double nll = (static_cast<double>(max) - static_cast<double>(target)) * inv_temperature;
  if (!std::isinf(max)) nll += std::log(sum);
  return nll < 0.0 ? 0.0f : static_cast<float>(nll);
}

// ---- statistics -----------------------------------------------------------------------------------

// Sorted (descending value, then ascending id) list of at most k entries; id -1 marks an empty
// slot at the end.
struct TopK {
  float vals[kMaxTopK];
  int64_t ids[kMaxTopK];
  int64_t k = 0;
  void reset(int64_t size) {
    k = size;
    for (int64_t j = 0; j < k; ++j) {
      vals[j] = kNegInf;
      ids[j] = -1;
    }
  }
  bool full() const { return ids[k - 1] >= 0; }
  float kth() const { return full() ? vals[k - 1] : kNegInf; }
  // Callers insert in increasing id order, so an equal value goes after the ones already held.
  void insert(float v, int64_t id) {
    if (v != v) return;  // NaN never enters
    if (full() && !(v > vals[k - 1])) return;
    int64_t pos = k - 1;
    while (pos > 0 && (ids[pos - 1] < 0 || vals[pos - 1] < v)) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = v;
    ids[pos] = id;
  }
};

// Running statistics of one row or column range: token_nll's (max, sum) pair, the entropy moment
// ent = sum exp(d) d (natural units, relative to max), the argmax of y (lowest index of the
// largest value), the count of entries above the target's value, and the top-k values of y.
struct StatsPart {
  float max = kNegInf;
  double sum = 0.0;
  double ent = 0.0;
  bool nan = false;
  float amax = kNegInf;
  int64_t amax_idx = -1;  // -1: nothing seen yet
  int64_t rank = 0;
  TopK top;
};

// Merge the statistics of a later column range `p` into `into`. When the max grows from m to m',
// with a = (m - m') / T: sum' = e^a sum, ent' = e^a (ent + a sum).
inline void merge(StatsPart& into, const StatsPart& p, double inv_temperature) {
  into.nan = into.nan || p.nan;
  into.rank += p.rank;
  if (p.amax_idx >= 0 && (into.amax_idx < 0 || p.amax > into.amax)) {
    into.amax = p.amax;
    into.amax_idx = p.amax_idx;
  }
  for (int64_t j = 0; j < into.top.k && j < p.top.k && p.top.ids[j] >= 0; ++j)
    into.top.insert(p.top.vals[j], p.top.ids[j]);
  if (p.max == kNegInf) return;
  if (into.max == kNegInf) {
    into.max = p.max;
    into.sum = p.sum;
    into.ent = p.ent;
    return;
  }
  const float m = std::max(into.max, p.max);
  if (m == kPosInf) {
    into.max = m;
    return;
  }
  const double da = (static_cast<double>(into.max) - m) * inv_temperature;
  const double db = (static_cast<double>(p.max) - m) * inv_temperature;
  const double sa = std::exp(da), sb = std::exp(db);
  into.ent = sa * (into.ent + da * into.sum) + sb * (p.ent + db * p.sum);
  into.sum = sa * into.sum + sb * p.sum;
  into.max = m;
}

// ---- comparison -----------------------------------------------------------------------------------

// One row's (or column range's) state for one side of compare (see compare.cpp for A and w).
struct Side {
  float m = kNegInf;  // running max of the soft-capped row
  double s = 0.0;     // sum e^{(y - m)/T}
  double A = 0.0;     // sum e^{(y - m)/T} ((y - m) - (other - m_other)), both entries finite
  double w = 0.0;     // sum e^{(y - m)/T} over the terms of A
  float rawmax = kNegInf;
  int64_t arg = 0;  // argmax so far (first NaN once nan is set)
  bool nan = false;
  float own_at_other_ninf = kNegInf;  // largest own value where the other row is -inf
};

// Block sums relative to the current maxima, added after rescale_pair.
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

// Move both sides' sums to the maxima mp, mq (>= their own): s and w scale by e^{(m - m')/T},
// A by the same factor after adding shift * w. A +inf maximum leaves the sums as they are (that
// side's NLL is +inf and both KLs are NaN, whatever they hold); -inf (no value yet) has empty
// sums.
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

// ---- the one row/column-split loop ------------------------------------------------------------

// Column splits per row so that rows x splits keeps every thread busy on long rows, each piece at
// least min_span columns (1 for no rows: nothing to split, and no division by zero).
inline int64_t column_splits(int64_t rows, int64_t cols, int nthreads, int64_t min_span) {
  if (rows <= 0 || rows >= nthreads) return 1;
  const int64_t want = (2 * nthreads + rows - 1) / rows;
  return std::max<int64_t>(1, std::min(want, cols / min_span));
}

// Fold columns [0, cols) of every scored row (targets[r] != ignore_index) into the caller's state,
// one pass over the logits. Rows are shared among the threads; when rows are fewer than threads,
// each row is also cut into column ranges, scanned in parallel and merged in column order.
//   scan(r, c0, c1, part): fold columns [c0, c1) of row r into a fresh Part (part is
//       default-constructed; scan prepares what it needs);
//   merge(into, later): the exact merge of a later column range;
//   fold(r, part): the row's slab result into the state.
template <typename Part, typename Scan, typename Merge, typename Fold>
void split_rows(int64_t rows, int64_t cols, int nthreads, int64_t min_span,
                const int64_t* targets, int64_t ignore_index, Scan&& scan, Merge&& merge_later,
                Fold&& fold) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t splits = column_splits(rows, cols, nthreads, min_span);
  if (splits == 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r] == ignore_index) continue;
      Part part;
      scan(r, int64_t{0}, cols, part);
      fold(r, part);
    }
    return;
  }
  const int64_t span = (cols + splits - 1) / splits;
  std::vector<Part> parts(static_cast<size_t>(rows * splits));
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t task = 0; task < rows * splits; ++task) {
    const int64_t r = task / splits, piece = task % splits;
    const int64_t c0 = piece * span, c1 = std::min(cols, c0 + span);
    if (targets[r] == ignore_index || c0 >= c1) continue;
    scan(r, c0, c1, parts[task]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) continue;
    Part& acc = parts[r * splits];
    for (int64_t piece = 1; piece < splits && piece * span < cols; ++piece)
      merge_later(acc, parts[r * splits + piece]);
    fold(r, acc);
  }
}

}  // namespace cpu
}  // namespace pplfast
