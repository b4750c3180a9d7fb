// The row kernels of the three op families, written once over the vector primitives of simd.h and
// compiled once per instruction set (isa_base.cpp, isa_avx512.cpp include this file inside their
// own namespace, with `S` naming their primitives).
//
// A row (or column range) is read once, in blocks of kBlock elements, in two passes per block:
//   A. load (fp16/bf16 converted in registers), soft-cap, fold into the block maximum (four
//      independent max chains) and, for the statistics, count the entries above the target's
//      value and flag top-k candidates; the values go to an L1 buffer, except for contiguous fp32
//      rows without a softcap, whose second pass reads the source again (still in L1). The loop
//      over a contiguous row's full vectors has no branch; the last partial vector is gathered
//      and padded apart;
//   B. with m the running maximum, t = y * s - R(m s) (s = log2(e) / T, R the float rounding; one
//      FMA per element), exp2 of t clamped, summed in kAcc independent fp32 accumulators (the lane
//      sums of one block, at most kBlock / W terms each, are the only fp32 sums), reduced in
//      double and multiplied by 2^(R(m s) - m s), computed exactly in double once per maximum.
//      The statistics also sum e * t for the entropy. While it computes, pass B prefetches the
//      row's next block (prefetch), so that memory is never idle.
// When the maximum grows, the running double sums are rescaled (common.h). Without a softcap,
// NaN is not tested per element: a NaN makes its block's sum NaN (simd.h's clamp keeps it), and
// only blocks the sum cannot see (all -inf, or after a +inf maximum) are scanned for it. With a
// softcap NaN is tested on the loaded value, before tanh (which maps it to +-1).
//
// compare reads both rows' blocks (into two buffers, or in place for contiguous fp32 without a
// softcap), then folds them fast (no infinity or NaN, bounded values), masked (infinities or NaN)
// or wide (every term in double); see compare.cpp for the algorithm and the special values.
#include <cstdint>

#include "isa.h"

namespace pplfast {
namespace cpu {
namespace PPLFAST_ISA_NS {

using F = S::F;
constexpr int W = S::W;
// Elements per block of a row (compare: of each row, two fp32 buffers of 8 KB in L1). compare
// took 1024 before: 2048 spreads a block's fixed costs (four lane sums in double, two maxima,
// the rescale) over twice the work, 6% less time on one core; 4096 measured no faster.
constexpr int64_t kBlock = 2048;
// Independent accumulators of pass B: two keep the adds' latency off the path of a loop step of
// 15 or more instructions, and leave AVX2's 16 registers to the exp's constants (four spilled
// accumulators to the stack, two instructions per step each).
constexpr int kAcc = 2;

template <int DT>
constexpr int64_t kBytes = DT == kFloat32 ? 4 : 2;

// ---- software prefetch --------------------------------------------------------------------------

// Pass A's loads are the only reads from memory, and pass B computes from L1 for longer than they
// take: left alone, memory idles during pass B (the hardware prefetcher follows the loads and
// stops with them; compare ran at 0.7-0.8x of the kernels before this layout, which prefetched,
// out of cache). Pass B therefore requests the row's next block: at its element i, the lines of
// element i of the next block (`ahead`). Past a row's end this requests the start of the next row
// of a contiguous tensor, which the same thread scans next; a prefetch never faults. A strided
// row has no next block to request: `ahead` is then the block's own buffer (in L1), so that the
// loop carries no branch for it.
template <int DT, int ELEMS>
inline void prefetch(const char* ahead, int64_t i) {
  constexpr int64_t bytes = ELEMS * kBytes<DT>;
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(ahead + i * kBytes<DT> + k, 0, 3);
}

// The bytes of element start + next of a row (its next block), or `own` for a strided row.
template <int DT>
inline const char* ahead_of(const void* base, int64_t stride, int64_t start, int64_t next,
                            const float* own) {
  return stride == 1 ? static_cast<const char*>(base) + (start + next) * kBytes<DT>
                     : reinterpret_cast<const char*>(own);
}

// ---- pass A -------------------------------------------------------------------------------------

// Up to two pieces of a block's values (y, padded to a multiple of W with -inf): the source
// itself for its full vectors (contiguous fp32 without a softcap) and a buffer for the rest.
struct Pieces {
  const float* p0 = nullptr;
  int64_t n0 = 0;  // multiple of W
  const float* p1 = nullptr;
  int64_t n1 = 0;  // multiple of W
  float at(int64_t i) const { return i < n0 ? p0[i] : p1[i - n0]; }
};

struct BlockScan {
  float max = kNegInf;
  bool nan = false;  // with a softcap only
  int64_t count = 0;
  bool candidates = false;
};

// The last n_left (< W, >= 1) elements of a row from element i on, one lane each; the lanes past
// them are 0 here and -inf once transformed (pad). Strided rows load every vector this way.
template <int DT>
inline F gather(const void* base, int64_t stride, int64_t i, int64_t n_left) {
  alignas(64) float raw[W];
  for (int j = 0; j < W; ++j) raw[j] = j < n_left ? load_scalar(base, DT, (i + j) * stride) : 0.0f;
  return S::load(raw);
}

inline F pad(F x, int64_t n_left) {
  return n_left >= W ? x : S::select(S::first_lanes(static_cast<int>(n_left)), x, S::set1(kNegInf));
}

template <bool SOFTCAP>
inline F soft_cap(F x, const Transform& tf) {
  if constexpr (SOFTCAP) return S::mul(S::set1(tf.softcap), tanh<S>(S::mul(x, S::set1(tf.inv_softcap))));
  return x;
}

// Pass A over elements [start, start + n) of a row: the block maximum of y (and the statistics'
// count and candidates), the values in `pieces`.
template <int DT, bool SOFTCAP, bool RANK, bool TOPK>
inline BlockScan scan_block(const void* base, int64_t stride, int64_t start, int64_t n,
                            const Transform& tf, float threshold, float kth, float* buf,
                            Pieces& pieces) {
  BlockScan out;
  F m0 = S::set1(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  auto nan = S::unord(S::zero());  // all false
  auto cand = nan;
  auto count = S::count_zero();
  const F vthr = S::set1(threshold), vkth = S::set1(kth);
  auto fold = [&](F x, F& m) {
    m = S::max(x, m);
    if constexpr (RANK) count = S::count_add(count, S::gt(x, vthr));
    if constexpr (TOPK) cand = S::mask_or(cand, S::gt(x, vkth));
  };
  // a loaded vector: NaN flagged before the softcap, transformed, folded, buffered at dst
  auto put = [&](F x, float* dst, F& m) {
    if constexpr (SOFTCAP) nan = S::mask_or(nan, S::unord(x));
    x = soft_cap<SOFTCAP>(x, tf);
    fold(x, m);
    S::store(dst, x);
  };
  const int64_t full = n / W * W;
  int64_t i = 0;
  float* tail = buf;  // where the last partial vector goes
  if (DT == kFloat32 && !SOFTCAP && stride == 1) {
    const float* src = static_cast<const float*>(base) + start;
    for (; i + 4 * W <= full; i += 4 * W) {
      fold(S::load(src + i), m0);
      fold(S::load(src + i + W), m1);
      fold(S::load(src + i + 2 * W), m2);
      fold(S::load(src + i + 3 * W), m3);
    }
    for (; i < full; i += W) fold(S::load(src + i), m0);
    pieces.p0 = src;
    pieces.n0 = full;
    pieces.p1 = buf;
    pieces.n1 = full < n ? W : 0;
  } else {
    if (stride == 1) {
      for (; i + 4 * W <= full; i += 4 * W) {
        put(S::template load_dt<DT>(base, start + i), buf + i, m0);
        put(S::template load_dt<DT>(base, start + i + W), buf + i + W, m1);
        put(S::template load_dt<DT>(base, start + i + 2 * W), buf + i + 2 * W, m2);
        put(S::template load_dt<DT>(base, start + i + 3 * W), buf + i + 3 * W, m3);
      }
      for (; i < full; i += W) put(S::template load_dt<DT>(base, start + i), buf + i, m0);
    } else {
      for (; i < full; i += W) put(gather<DT>(base, stride, start + i, W), buf + i, m0);
    }
    tail = buf + full;
    pieces.p0 = buf;
    pieces.n0 = full < n ? full + W : full;
  }
  if (full < n) {
    F x = gather<DT>(base, stride, start + full, n - full);
    if constexpr (SOFTCAP) nan = S::mask_or(nan, S::unord(x));
    x = pad(soft_cap<SOFTCAP>(x, tf), n - full);
    fold(x, m1);
    S::store(tail, x);
  }
  out.max = S::hmax(S::max(S::max(m0, m1), S::max(m2, m3)));
  out.nan = S::any(nan);
  out.candidates = S::any(cand);
  out.count = S::count_total(count);
  return out;
}

// NaN among elements [start, start + n) of a row (the blocks pass B does not see).
template <int DT>
inline bool has_nan(const void* base, int64_t stride, int64_t start, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(load_scalar(base, DT, (start + i) * stride))) return true;
  return false;
}

// The first i < n with z[i] == v, or -1 (z holds a multiple of W values, n of them real).
inline int64_t first_equal(const float* z, int64_t n, float v) {
  const F vv = S::set1(v);
  for (int64_t i = 0; i < n; i += W) {
    const uint32_t hit = S::bits(S::eq(S::load(z + i), vv));
    if (hit) {
      const int64_t at = i + __builtin_ctz(hit);
      return at < n ? at : -1;
    }
  }
  return -1;
}

// The first of elements [start, start + n) of a row equal to v, as an offset from start, or -1.
template <int DT>
inline int64_t first_equal_in_row(const void* base, int64_t stride, int64_t start, int64_t n,
                                  float v) {
  int64_t i = 0;
  if (stride == 1) {
    const F vv = S::set1(v);
    for (; i + W <= n; i += W) {
      const uint32_t hit = S::bits(S::eq(S::template load_dt<DT>(base, start + i), vv));
      if (hit) return i + __builtin_ctz(hit);
    }
  }
  for (; i < n; ++i)
    if (load_scalar(base, DT, (start + i) * stride) == v) return i;
  return -1;
}

// ---- pass B -------------------------------------------------------------------------------------

// The fold needs R(m s) within 1/2 of m s: the near-maximum exponents are t = y s - R(m s) ~ -eps,
// and a rounding of m s by more than that would push them out of the exp's range.
inline bool fold_fits(double ms) { return std::fabs(ms) < 0x1p23; }

// How exponents are formed relative to the running maximum m (see Transform in common.h).
struct ExpSetup {
  float m = std::numeric_limits<float>::quiet_NaN();  // the maximum this was made for
  bool fold = true;
  float a = 0, b = 0, c = 1;  // fold: t = y a + b; else t = (y a + b) c
  double eps = 0;             // R(m s) - m s: the sums are 2^-eps too small
  double corr = 1;            // 2^eps
  double nat = 1;             // natural units (y - m) / T per unit of t
};

inline ExpSetup exp_setup(float m, const Transform& tf) {
  ExpSetup e;
  e.m = m;
  const double ms = static_cast<double>(m) * static_cast<double>(tf.fold_scale);  // exact
  if (fold_fits(ms)) {
    const float r = m * tf.fold_scale;
    e.a = tf.fold_scale;
    e.b = -r;
    e.eps = static_cast<double>(r) - ms;
    e.corr = std::exp2(e.eps);
    e.nat = 1.0 / (static_cast<double>(tf.fold_scale) * tf.temperature);
  } else {
    const float half = tf.has_temperature ? 0.5f : 1.0f;
    e.fold = false;
    e.a = half;
    e.b = -half * m;  // exact
    e.c = tf.rel_scale;
    e.nat = tf.rel_unit / static_cast<double>(tf.rel_scale);
  }
  return e;
}

struct Sums {
  double sum = 0, ent = 0;  // sum of 2^t and of 2^t t over clamped t, as computed
};

// Pass B over n values (a multiple of W) at z, prefetching from `ahead` (see prefetch).
template <bool FOLD, bool ENT, int DT>
inline void sum_exps(const float* z, int64_t n, const ExpSetup& e, Sums& out, const char* ahead) {
  const F va = S::set1(e.a), vb = S::set1(e.b), vc = S::set1(e.c);
  F s[kAcc], h[kAcc];
  for (int k = 0; k < kAcc; ++k) s[k] = h[k] = S::zero();
  auto step = [&](int64_t j, F& s, F& h) {
    F t = S::fmadd(S::load(z + j), va, vb);
    if constexpr (!FOLD) t = S::mul(t, vc);
    t = clamp_exp2<S>(t);
    const F x = S::exp2(t);
    s = S::add(s, x);
    if constexpr (ENT) h = S::fmadd(x, t, h);
  };
  int64_t i = 0;
  for (; i + kAcc * W <= n; i += kAcc * W) {
    prefetch<DT, kAcc * W>(ahead, i);
    for (int k = 0; k < kAcc; ++k) step(i + k * W, s[k], h[k]);
  }
  for (; i < n; i += W) step(i, s[0], h[0]);
  for (int k = 1; k < kAcc; ++k) {
    s[0] = S::add(s[0], s[k]);
    h[0] = S::add(h[0], h[k]);
  }
  out.sum += S::hsum(s[0]);
  if constexpr (ENT) out.ent += S::hsum(h[0]);
}

template <bool ENT, int DT>
inline Sums block_sums(const Pieces& pieces, const ExpSetup& e, const char* ahead) {
  Sums s;
  if (e.fold) {
    sum_exps<true, ENT, DT>(pieces.p0, pieces.n0, e, s, ahead);
    if (pieces.n1) sum_exps<true, ENT, DT>(pieces.p1, pieces.n1, e, s, ahead);
  } else {
    sum_exps<false, ENT, DT>(pieces.p0, pieces.n0, e, s, ahead);
    if (pieces.n1) sum_exps<false, ENT, DT>(pieces.p1, pieces.n1, e, s, ahead);
  }
  return s;
}

// ---- NLL ----------------------------------------------------------------------------------------

template <int DT, bool SOFTCAP>
void nll_row(const void* base, int64_t len, int64_t stride, const Transform& tf, NllPart& acc) {
  alignas(64) float buf[kBlock];
  ExpSetup e;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    Pieces pieces;
    const BlockScan b =
        scan_block<DT, SOFTCAP, false, false>(base, stride, start, n, tf, 0, 0, buf, pieces);
    acc.nan = acc.nan || b.nan;
    const float m = std::max(acc.max, b.max);
    if (b.max == kNegInf || m == kPosInf) {  // nothing to add; the row's lse is +inf
      acc.max = m;
      if (!SOFTCAP && !acc.nan) acc.nan = has_nan<DT>(base, stride, start, n);
      continue;
    }
    if (m != acc.max) {
      acc.sum = acc.max == kNegInf ? 0.0 : acc.sum * rescale(acc.max, m, tf.inv_temperature);
      acc.max = m;
    }
    if (!(e.m == m)) e = exp_setup(m, tf);
    acc.sum += e.corr * block_sums<false, DT>(pieces, e, ahead_of<DT>(base, stride, start, n, buf)).sum;
  }
  acc.nan = acc.nan || std::isnan(acc.sum);
}

// ---- statistics ---------------------------------------------------------------------------------

template <int DT, bool SOFTCAP, bool TOPK>
void stats_row(const void* base, int64_t len, int64_t stride, int64_t col0, const Transform& tf,
               float threshold, int64_t target_col, StatsPart& acc) {
  alignas(64) float buf[kBlock];
  ExpSetup e;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    const float kth = TOPK ? acc.top.kth() : kNegInf;
    Pieces pieces;
    const BlockScan b = scan_block<DT, SOFTCAP, true, TOPK>(base, stride, start, n, tf,
                                                            threshold, kth, buf, pieces);
    const int64_t first = col0 + start;
    int64_t count = b.count;
    if (target_col >= first && target_col < first + n && pieces.at(target_col - first) > threshold)
      --count;  // the target itself (its threshold was computed apart, in the hidden path)
    acc.rank += count;
    acc.nan = acc.nan || b.nan;
    if (acc.amax_idx < 0 || b.max > acc.amax) {
      // the first entry holding the block's maximum (none: every entry NaN)
      int64_t at = first_equal(pieces.p0, std::min(n, pieces.n0), b.max);
      if (at < 0 && n > pieces.n0) {
        at = first_equal(pieces.p1, n - pieces.n0, b.max);
        if (at >= 0) at += pieces.n0;
      }
      if (at >= 0) {
        acc.amax = b.max;
        acc.amax_idx = first + at;
      }
    }
    if constexpr (TOPK) {
      if (b.candidates || !acc.top.full()) {
        TopK& top = acc.top;
        int64_t i = 0;
        for (; i < n && !top.full(); ++i) top.insert(pieces.at(i), first + i);
        for (; i < n && i % W != 0; ++i) top.insert(pieces.at(i), first + i);
        for (; i + W <= n; i += W) {
          const float* z = i < pieces.n0 ? pieces.p0 + i : pieces.p1 + (i - pieces.n0);
          uint32_t mask = S::bits(S::gt(S::load(z), S::set1(top.vals[top.k - 1])));
          while (mask) {
            const int j = __builtin_ctz(mask);
            top.insert(z[j], first + i + j);
            mask &= mask - 1;
          }
        }
        for (; i < n; ++i) top.insert(pieces.at(i), first + i);
      }
    }
    const float m = std::max(acc.max, b.max);
    if (b.max == kNegInf || m == kPosInf) {
      acc.max = m;
      if (!SOFTCAP && !acc.nan) acc.nan = has_nan<DT>(base, stride, start, n);
      continue;
    }
    if (m != acc.max) {
      if (acc.max == kNegInf) {
        acc.sum = acc.ent = 0.0;
      } else {
        const double a = (static_cast<double>(acc.max) - m) * tf.inv_temperature;
        const double sa = std::exp(a);
        acc.ent = sa * (acc.ent + a * acc.sum);
        acc.sum = sa * acc.sum;
      }
      acc.max = m;
    }
    if (!(e.m == m)) e = exp_setup(m, tf);
    const Sums s = block_sums<true, DT>(pieces, e, ahead_of<DT>(base, stride, start, n, buf));
    // 2^t undercounts by 2^-eps and t by eps (ExpSetup); the entropy moment in natural units
    acc.sum += e.corr * s.sum;
    acc.ent += e.nat * e.corr * (s.ent + e.eps * s.sum);
  }
  acc.nan = acc.nan || std::isnan(acc.sum) || std::isnan(acc.ent);
}

// ---- comparison ---------------------------------------------------------------------------------

struct BlockInfo {
  float rawmax = kNegInf, zmax = kNegInf, zmin = kPosInf;
  bool nan = false;  // known with a softcap; else found where needed (see compare_range)
  bool inf() const { return zmax == kPosInf || zmin == kNegInf; }
};

// Pass A of one row's block for compare: n elements from column `start`, soft-capped. `z` is
// pointed at the values: the source itself where that needs no copy (contiguous fp32 without a
// softcap, n a multiple of W), else `buf`, padded with -inf to a multiple of W.
template <int DT, bool SOFTCAP>
inline BlockInfo load_block(const void* base, int64_t stride, int64_t start, int64_t n,
                            const Transform& tf, float* buf, const float*& z) {
  BlockInfo info;
  // four independent chains each for the maximum and the minimum (as scan_block): with two, their
  // latency bounded the loop (AVX2 compare 1.13x faster in bf16 with four)
  F vraw = S::set1(kNegInf), vmax[4], vmin[4];
  for (int k = 0; k < 4; ++k) {
    vmax[k] = vraw;
    vmin[k] = S::set1(kPosInf);
  }
  auto nan = S::unord(S::zero());
  const int64_t full = n / W * W;
  int64_t i = 0;
  if (DT == kFloat32 && !SOFTCAP && stride == 1 && full == n) {
    const float* src = static_cast<const float*>(base) + start;
    auto fold = [&](int64_t j, int k) {
      const F x = S::load(src + j);
      vmax[k] = S::max(x, vmax[k]);
      vmin[k] = S::min(x, vmin[k]);
    };
    for (; i + 4 * W <= n; i += 4 * W)
      for (int k = 0; k < 4; ++k) fold(i + k * W, k);
    for (; i < n; i += W) fold(i, 0);
    z = src;
  } else {
    auto put = [&](F x, int64_t j, int k) {
      if constexpr (SOFTCAP) {
        nan = S::mask_or(nan, S::unord(x));
        vraw = S::max(x, vraw);
        x = soft_cap<true>(x, tf);
      }
      vmin[k] = S::min(x, vmin[k]);
      vmax[k] = S::max(x, vmax[k]);
      S::store(buf + j, x);
    };
    if (stride == 1) {
      for (; i + 4 * W <= full; i += 4 * W)
        for (int k = 0; k < 4; ++k)
          put(S::template load_dt<DT>(base, start + i + k * W), i + k * W, k);
      for (; i < full; i += W) put(S::template load_dt<DT>(base, start + i), i, 0);
    } else {
      for (; i < full; i += W) put(gather<DT>(base, stride, start + i, W), i, 0);
    }
    if (full < n) {
      const auto real = S::first_lanes(static_cast<int>(n - full));
      F x = gather<DT>(base, stride, start + full, n - full);
      if constexpr (SOFTCAP) {
        nan = S::mask_or(nan, S::unord(x));
        vraw = S::max(pad(x, n - full), vraw);
        x = soft_cap<true>(x, tf);
      }
      vmin[0] = S::min(S::select(real, x, S::set1(kPosInf)), vmin[0]);
      x = S::select(real, x, S::set1(kNegInf));
      vmax[0] = S::max(x, vmax[0]);
      S::store(buf + full, x);
    }
    z = buf;
  }
  info.zmax = S::hmax(S::max(S::max(vmax[0], vmax[1]), S::max(vmax[2], vmax[3])));
  info.rawmax = SOFTCAP ? S::hmax(vraw) : info.zmax;  // untransformed: z = x
  info.zmin = -S::hmax(
      S::sub(S::zero(), S::min(S::min(vmin[0], vmin[1]), S::min(vmin[2], vmin[3]))));
  info.nan = S::any(nan);
  return info;
}

// Running argmax (or first NaN) of the raw row, from one block's summary and values z (the raw
// values themselves without a softcap); `col0` is the column of the range's first element in the
// full vocabulary.
template <int DT, bool SOFTCAP>
inline void track_argmax(Side& side, const BlockInfo& info, const float* z, const void* base,
                         int64_t stride, int64_t start, int64_t n, int64_t col0) {
  if (side.nan) return;
  if (info.nan) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(load_scalar(base, DT, (start + i) * stride))) {
        side.nan = true;
        side.arg = col0 + start + i;
        return;
      }
    }
  }
  if (info.rawmax > side.rawmax) {
    const int64_t at = SOFTCAP ? first_equal_in_row<DT>(base, stride, start, n, info.rawmax)
                               : first_equal(z, n, info.rawmax);
    if (at >= 0) {
      side.rawmax = info.rawmax;
      side.arg = col0 + start + at;
    }
  }
}

// The fast fold's exp: AVX-512's unclamped (in compare_range's FlushToZero), others clamped.
inline F fold_exp2(F t) {
  if constexpr (S::kExpAnyExponent) {
    return S::exp2(t);
  } else {
    return S::exp2(clamp_exp2<S>(t));
  }
}

// Both sides at once for a block without infinities and with bounded values (the common case;
// a NaN shows as a NaN sum and the caller folds the block again, masked). Exponents by the fold
// (t = y s - R(m s)); A's differences are those of the t's, (y_a - m_p) s - (y_b - m_q) s, moved
// back to natural units and corrected for both roundings R in double. The padding lanes of the
// last partial vector weigh 0. One set of accumulators: a step is over 30 instructions, longer
// than an add's latency, and AVX2's registers hold the constants of two exps besides. AVX-512's
// exps run unclamped, in compare_range's FlushToZero: an exponent below -126 gives 0 where the
// clamp gives 1e-38, and a term left out is below 1.2e-38 * 2 kFastBound, the clamp's own
// bound (two instructions fewer per step).
template <int DA, int DB>
inline BlockSums fold_fast(const float* za, const float* zb, int64_t n, const ExpSetup& ep,
                           const ExpSetup& eq, const Transform& tf, const char* ahead_a,
                           const char* ahead_b) {
  const F scale = S::set1(tf.fold_scale), bp = S::set1(ep.b), bq = S::set1(eq.b);
  F sp = S::zero(), ap = sp, sq = sp, aq = sp;
  auto step = [&](int64_t i) {
    const F ta = S::fmadd(S::load(za + i), scale, bp);
    const F tb = S::fmadd(S::load(zb + i), scale, bq);
    const F ea = fold_exp2(ta);
    const F eb = fold_exp2(tb);
    const F d = S::sub(ta, tb);
    sp = S::add(sp, ea);
    ap = S::fmadd(ea, d, ap);
    sq = S::add(sq, eb);
    aq = S::fnmadd(eb, d, aq);
  };
  const int64_t full = n / W * W;
  int64_t i = 0;
  for (; i + 2 * W <= full; i += 2 * W) {
    prefetch<DA, 2 * W>(ahead_a, i);
    prefetch<DB, 2 * W>(ahead_b, i);
    step(i);
    step(i + W);
  }
  for (; i < full; i += W) step(i);
  if (full < n) {
    const auto real = S::first_lanes(static_cast<int>(n - full));
    const F ta = S::fmadd(S::load(za + i), scale, bp);
    const F tb = S::fmadd(S::load(zb + i), scale, bq);
    const F ea = S::and_mask(real, fold_exp2(ta));
    const F eb = S::and_mask(real, fold_exp2(tb));
    const F d = S::and_mask(real, S::sub(ta, tb));
    sp = S::add(sp, ea);
    sq = S::add(sq, eb);
    ap = S::fmadd(ea, d, ap);
    aq = S::fnmadd(eb, d, aq);
  }
  const double dsp = S::hsum(sp), dap = S::hsum(ap), dsq = S::hsum(sq), daq = S::hsum(aq);
  const double shift = ep.eps - eq.eps, per_t = 1.0 / static_cast<double>(tf.fold_scale);
  BlockSums out;
  out.sp = out.wp = ep.corr * dsp;
  out.sq = out.wq = eq.corr * dsq;
  out.ap = ep.corr * (dap + shift * dsp) * per_t;
  out.aq = eq.corr * (daq - shift * dsq) * per_t;
  return out;
}

// A block with infinities or NaN and bounded finite values (padded with -inf to a multiple of
// W): -inf and NaN entries weigh exactly 0, terms whose difference is not finite stay out of A
// and w. A side whose maximum is +inf adds nothing (its sums no longer matter), nor does A
// when either maximum is +inf.
template <int DA, int DB>
inline BlockSums fold_masked(const float* za, const float* zb, int64_t len, float mp, float mq,
                             const Transform& tf, const char* ahead_a, const char* ahead_b) {
  const bool live_p = mp != kPosInf, live_q = mq != kPosInf, live_a = live_p && live_q;
  const F vmp = S::set1(live_p ? mp : 0.0f), vmq = S::set1(live_q ? mq : 0.0f);
  const F scale = S::set1(tf.fold_scale);
  const F vninf = S::set1(kNegInf), vposinf = S::set1(kPosInf);
  F sp = S::zero(), ap = sp, wp = sp, sq = sp, aq = sp, wq = sp;
  for (int64_t i = 0; i < len; i += W) {
    prefetch<DA, W>(ahead_a, i);
    prefetch<DB, W>(ahead_b, i);
    const F x = S::load(za + i), y = S::load(zb + i);
    const F ua = S::sub(x, vmp), ub = S::sub(y, vmq);
    // weight 0 for -inf and NaN entries (the comparison is false for both)
    const F ea = S::and_mask(S::gt(x, vninf), S::exp2(clamp_exp2<S>(S::mul(ua, scale))));
    const F eb = S::and_mask(S::gt(y, vninf), S::exp2(clamp_exp2<S>(S::mul(ub, scale))));
    const F d = S::sub(ua, ub);
    const auto in_a = S::lt(S::abs(d), vposinf);
    sp = S::add(sp, ea);
    sq = S::add(sq, eb);
    const F ea_in = S::and_mask(in_a, ea), eb_in = S::and_mask(in_a, eb);
    const F d_in = S::and_mask(in_a, d);
    wp = S::add(wp, ea_in);
    wq = S::add(wq, eb_in);
    ap = S::fmadd(ea_in, d_in, ap);
    aq = S::fnmadd(eb_in, d_in, aq);
  }
  BlockSums out;
  if (live_p) out.sp = S::hsum(sp);
  if (live_q) out.sq = S::hsum(sq);
  if (live_a) {
    out.ap = S::hsum(ap);
    out.wp = S::hsum(wp);
    out.aq = S::hsum(aq);
    out.wq = S::hsum(wq);
  }
  return out;
}

// Every term in double (the wide fold): exact for any finite values; -inf and NaN entries weigh
// 0.
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

// The fast and masked folds need every |y| below kValueBound and every |y| / T below kFastBound:
// no difference, and no W-lane sum of A's terms (each below 2 kValueBound), can overflow, and
// the exp's clamp (1e-38 for exponents below -87.3) adds at most 1e-38 * 2 kFastBound per term.
constexpr double kValueBound = 1e36;
constexpr double kFastBound = 1e20;

inline bool within(float x, double inv_t) {
  const double a = std::fabs(static_cast<double>(x));
  return a < kValueBound && a * inv_t < kFastBound;
}

inline bool has_nan_sum(const BlockSums& b) {
  return std::isnan(b.sp) || std::isnan(b.sq) || std::isnan(b.ap) || std::isnan(b.aq);
}

// Denormal results flushed to zero in this thread while it lives (MXCSR's FTZ bit, put back
// after), where AVX-512's exp runs unclamped (S::kExpAnyExponent); elsewhere nothing.
struct FlushToZero {
#ifdef PPLFAST_SIMD_AVX512
  const unsigned saved = _mm_getcsr();
  FlushToZero() { _mm_setcsr(saved | _MM_FLUSH_ZERO_ON); }
  ~FlushToZero() { _mm_setcsr(saved); }
#endif
};

template <int DA, int DB, bool SOFTCAP>
void compare_range(const void* a, int64_t a_stride, const void* b, int64_t b_stride, int64_t len,
                   int64_t col0, const Transform& tf, Side& p, Side& q) {
  // the fast fold's terms below 2^-126 are 0 (every fold and rescale here is indifferent to
  // that: such a term is below 1.2e-38 of a sum that holds 1)
  [[maybe_unused]] const FlushToZero ftz;
  alignas(64) float bufa[kBlock];
  alignas(64) float bufb[kBlock];
  const double inv_t = tf.inv_temperature;
  ExpSetup ep, eq;  // the fast fold's, made again only when a maximum grows
  p.arg = q.arg = col0;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    const float *za, *zb;
    BlockInfo ia = load_block<DA, SOFTCAP>(a, a_stride, start, n, tf, bufa, za);
    BlockInfo ib = load_block<DB, SOFTCAP>(b, b_stride, start, n, tf, bufb, zb);
    const int64_t padded = (n + W - 1) / W * W;
    auto find_nan = [&] {  // without a softcap NaN is found only where it matters
      if (!SOFTCAP) {
        ia.nan = has_nan<DA>(a, a_stride, start, n);
        ib.nan = has_nan<DB>(b, b_stride, start, n);
      }
    };
    const float mp = std::max(p.m, ia.zmax), mq = std::max(q.m, ib.zmax);
    rescale_pair(p, q, mp, mq, inv_t);
    const bool inf = ia.inf() || ib.inf();
    if (inf) record_infinities(p, q, za, zb, n);
    // maxima of +-inf (an all -inf block, +inf entries) are decided apart, never differenced
    const bool maxima_within = (mp == kNegInf || mp == kPosInf || within(mp, inv_t)) &&
                               (mq == kNegInf || mq == kPosInf || within(mq, inv_t));
    const char* pa = ahead_of<DA>(a, a_stride, start, n, bufa);
    const char* pb = ahead_of<DB>(b, b_stride, start, n, bufb);
    BlockSums sums;
    if (inf) find_nan();
    const bool special = inf || ia.nan || ib.nan;
    const bool values_within =
        special ? within(std::max(finite_absmax(za, n), finite_absmax(zb, n)), inv_t)
                : within(std::max({ia.zmax, ib.zmax, -ia.zmin, -ib.zmin}), inv_t);
    if (!(maxima_within && values_within)) {
      if (!inf) find_nan();
      sums = fold_wide(za, zb, n, mp, mq, inv_t);
    } else if (special || !fold_fits(static_cast<double>(mp) * tf.fold_scale) ||
               !fold_fits(static_cast<double>(mq) * tf.fold_scale)) {
      sums = fold_masked<DA, DB>(za, zb, padded, mp, mq, tf, pa, pb);
    } else {
      if (!(ep.m == mp)) ep = exp_setup(mp, tf);  // both fold here (fold_fits above)
      if (!(eq.m == mq)) eq = exp_setup(mq, tf);
      sums = fold_fast<DA, DB>(za, zb, n, ep, eq, tf, pa, pb);
      if (!SOFTCAP && has_nan_sum(sums)) {
        find_nan();
        sums = fold_masked<DA, DB>(za, zb, padded, mp, mq, tf, pa, pb);
      }
    }
    track_argmax<DA, SOFTCAP>(p, ia, za, a, a_stride, start, n, col0);
    track_argmax<DB, SOFTCAP>(q, ib, zb, b, b_stride, start, n, col0);
    add(p, q, sums);
  }
}

// ---- the one dtype x transform dispatcher -------------------------------------------------------

template <typename Fn>
auto with_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: return fn(std::integral_constant<int, kFloat32>{});
    case kFloat16: return fn(std::integral_constant<int, kFloat16>{});
    default: return fn(std::integral_constant<int, kBFloat16>{});
  }
}

template <typename Fn>
auto with_flag(bool flag, Fn&& fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

inline NllRowFn pick_nll(int dtype, const Transform& tf) {
  return with_dtype(dtype, [&](auto dt) {
    return with_flag(tf.has_softcap, [&](auto cap) -> NllRowFn {
      return &nll_row<decltype(dt)::value, decltype(cap)::value>;
    });
  });
}

inline StatsRowFn pick_stats(int dtype, const Transform& tf, bool top_k) {
  return with_dtype(dtype, [&](auto dt) {
    return with_flag(tf.has_softcap, [&](auto cap) {
      return with_flag(top_k, [&](auto topk) -> StatsRowFn {
        return &stats_row<decltype(dt)::value, decltype(cap)::value, decltype(topk)::value>;
      });
    });
  });
}

// (the temperature is a constant of the exponents: no variant of its own)
inline CompareRowFn pick_compare(int base_dtype, int test_dtype, const Transform& tf) {
  return with_dtype(base_dtype, [&](auto da) {
    return with_dtype(test_dtype, [&](auto db) {
      return with_flag(tf.has_softcap, [&](auto cap) -> CompareRowFn {
        return &compare_range<decltype(da)::value, decltype(db)::value, decltype(cap)::value>;
      });
    });
  });
}

inline float transform_one(float raw, const Transform& tf) {
  if (!tf.has_softcap) return raw;
  alignas(64) float lanes[W];
  S::store(lanes, soft_cap<true>(S::set1(raw), tf));
  return lanes[0];
}

inline void exp2_clamped_n(const float* t, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(out + i, S::exp2(clamp_exp2<S>(S::load(t + i))));
  for (; i < n; ++i) {
    alignas(64) float lanes[W];
    S::store(lanes, S::exp2(clamp_exp2<S>(S::set1(t[i]))));
    out[i] = lanes[0];
  }
}

inline const RowKernels& table() {
  static const RowKernels kernels{S::kName, &pick_nll, &pick_stats, &pick_compare,
                                  &transform_one, &exp2_clamped_n};
  return kernels;
}

}  // namespace PPLFAST_ISA_NS
}  // namespace cpu
}  // namespace pplfast
