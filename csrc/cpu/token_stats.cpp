// Native CPU kernels: per-token statistics (NLL, entropy, max log-probability, argmax, target
// rank, top-k) in one pass over each row of logits.
//
// The pass is token_nll's (blocks of BLOCK elements loaded, soft-capped into an L1 buffer y,
// folded into a running max m of y and a double running sum of exp(d), d = (y - m) / T), extended
// with:
//   - the entropy sum ent = sum exp(d) * d, rescaled with the running max: when the max grows
//     from m to m', with a = (m - m') / T, ent' = e^a (ent + a sum). Then
//     H = -sum p log p = log(sum) - ent / sum and max log p = -log(sum);
//   - the running argmax: a block whose max beats the running one is searched for the first
//     index holding it (lowest index on ties, as torch.argmax);
//   - the rank: the target logit is read (and soft-capped by the same vector code) first, then
//     every element is compared with it while the block is loaded (the temperature is monotone:
//     the soft-capped values order the entries);
//   - a sorted top-k list of soft-capped values per row (k <= 64, in L1): an element enters only
//     when it beats the k-th value, which after the first blocks is rare. Their log-probabilities
//     are (y - m) / T - log(sum), formed in double at the end.
// Rows are shared among OpenMP threads; with fewer rows than threads each row is cut into column
// ranges whose partial statistics are merged in column order. A separate kernel from token_nll,
// so that the NLL alone never pays for the statistics.
//
// Special values: NaN is detected on the raw input (before tanh, which would map it to a finite
// value) and makes nll, entropy and max log p NaN; -inf entries add exp(-inf) = 0 to both sums
// (the exponent d is clamped at -87.3 before the product, so 0 * -inf never occurs);
// a +inf entry makes the log-sum-exp +inf, entropy and max log p NaN (inf - inf), as the float64
// reference.
#include "token_stats.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace pplfast {
namespace {

using namespace cpu;

constexpr float kExpFloor = -87.3f;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Stats {
  float max = kNegInf;  // of the soft-capped logits y
  double sum = 0.0;     // sum exp(d), d = (y - max) / T
  double ent = 0.0;     // sum exp(d) * d
  bool nan = false;
  float amax = kNegInf;
  int64_t amax_idx = -1;  // -1: nothing seen yet
  int64_t rank = 0;
};

// Sorted (descending value, then ascending id) list of at most k entries; id -1 marks an empty
// slot at the end.
struct TopK {
  float* vals;
  int64_t* ids;
  int64_t k;
  inline bool full() const { return ids[k - 1] >= 0; }
  inline void reset() {
    for (int64_t j = 0; j < k; ++j) {
      vals[j] = kNegInf;
      ids[j] = -1;
    }
  }
  // Callers insert in increasing id order, so an equal value goes after the ones already held.
  inline void insert(float v, int64_t id) {
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

// Merge the statistics of a later column range `p` into `into`.
inline void merge(Stats& into, const Stats& p, double inv_temperature) {
  into.nan = into.nan || p.nan;
  into.rank += p.rank;
  if (p.amax_idx >= 0 && (into.amax_idx < 0 || p.amax > into.amax)) {
    into.amax = p.amax;
    into.amax_idx = p.amax_idx;
  }
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

#ifdef PPLFAST_AVX2
template <bool SOFTCAP>
inline __m256 transform8(__m256 x, const Transform& tf) {
  if constexpr (SOFTCAP)
    x = _mm256_mul_ps(_mm256_set1_ps(tf.softcap),
                      tanh8(_mm256_mul_ps(x, _mm256_set1_ps(tf.inv_softcap))));
  return x;
}
#endif

// The soft-capped value of one raw logit, by the same code as the row pass (so that the
// target compares equal to itself wherever it is read).
template <bool SOFTCAP>
inline float transform_one(float raw, const Transform& tf) {
#ifdef PPLFAST_AVX2
  return _mm256_cvtss_f32(transform8<SOFTCAP>(_mm256_set1_ps(raw), tf));
#else
  return tf.apply(raw);
#endif
}

// Fold one soft-capped block (padded with -inf to a multiple of 8) into the sums, prefetching
// the next block's cache lines (`next`, `next_bytes`) meanwhile, as token_nll's fold_block does.
template <bool TEMPERATURE>
inline void fold_sums(Stats& acc, const float* z, int64_t len, float block_max,
                      const Transform& tf, const char* next, int64_t next_bytes) {
  if (block_max == kNegInf) return;
  const float m = std::max(acc.max, block_max);
  if (m == kPosInf) {
    acc.max = m;
    return;
  }
  double block_sum, block_ent;
#ifdef PPLFAST_AVX2
  // exponents u in rel's unit (common.h); the entropy moment takes them clamped where exp clamps
  // and in natural units (d = u * rel_unit, off the exp's dependency chain), where
  // |exp(d) d| <= 1/e: no lane sum can overflow at any temperature
  const __m256 ref = rel8_ref<TEMPERATURE>(m), floor = _mm256_set1_ps(tf.rel_exp.clamp);
  const __m256 scale = _mm256_set1_ps(tf.rel_exp.scale);
  const __m256 unit = _mm256_set1_ps(static_cast<float>(tf.rel_unit));
  auto natural = [&](__m256 u) {
    u = _mm256_max_ps(u, floor);
    if constexpr (TEMPERATURE) return _mm256_mul_ps(u, unit);
    return u;
  };
  // four accumulators and the tail into the first, as token_nll's fold_block: the sum of
  // exponentials, hence the NLL, comes out bit for bit the same
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
  int64_t i = 0;
  int64_t prefetched = 0;
  auto step = [&](int64_t j, __m256& s, __m256& t) {
    const __m256 u = rel8<TEMPERATURE>(_mm256_load_ps(z + j), ref);
    const __m256 e = exp8_scaled(u, scale);
    s = _mm256_add_ps(s, e);
    t = _mm256_fmadd_ps(e, natural(u), t);
  };
  for (; i + 32 <= len; i += 32) {
    for (int k = 0; k < 2 && prefetched < next_bytes; ++k, prefetched += 64)
      _mm_prefetch(next + prefetched, _MM_HINT_T0);
    step(i, s0, t0);
    step(i + 8, s1, t1);
    step(i + 16, s2, t2);
    step(i + 24, s3, t3);
  }
  for (; i < len; i += 8) step(i, s0, t0);
  block_sum = hsum8_double(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  block_ent = hsum8_double(_mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3)));
#else
  (void)next;
  (void)next_bytes;
  float ls[8] = {0, 0, 0, 0, 0, 0, 0, 0}, lt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < len; ++i) {
    const float d = std::max(rel<TEMPERATURE>(z[i], m) * static_cast<float>(tf.rel_unit),
                             kExpFloor);
    const float e = std::exp(d);
    ls[i & 7] += e;
    lt[i & 7] += e * d;
  }
  block_sum = block_ent = 0;
  for (int j = 0; j < 8; ++j) {
    block_sum += ls[j];
    block_ent += lt[j];
  }
#endif
  if (acc.max == kNegInf) {
    acc.sum = block_sum;
    acc.ent = block_ent;
  } else {
    const double da = (static_cast<double>(acc.max) - m) * tf.inv_temperature;
    const double sa = std::exp(da);
    acc.ent = sa * (acc.ent + da * acc.sum) + block_ent;
    acc.sum = sa * acc.sum + block_sum;
  }
  acc.max = m;
}

inline void topk_block(TopK& top, const float* z, int64_t n, int64_t id0) {
  int64_t i = 0;
  while (i < n && !top.full()) {
    top.insert(z[i], id0 + i);
    ++i;
  }
#ifdef PPLFAST_AVX2
  for (; i < n && i % 8 != 0; ++i) top.insert(z[i], id0 + i);
  for (; i + 8 <= n; i += 8) {
    int mask = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_load_ps(z + i), _mm256_set1_ps(top.vals[top.k - 1]), _CMP_GT_OQ));
    while (mask) {
      const int j = __builtin_ctz(mask);
      top.insert(z[i + j], id0 + i + j);
      mask &= mask - 1;
    }
  }
#endif
  for (; i < n; ++i) top.insert(z[i], id0 + i);
}

// One pass over `len` elements (element stride `stride`) whose first is vocabulary column
// `col0`; `threshold` is the soft-capped target logit and `target_col` its column.
// With TOPK, the load loop also flags elements above the k-th value held when the block starts;
// the block is searched for top-k entries only when one is flagged (rare after the first blocks).
template <int DT, bool SOFTCAP, bool TEMPERATURE, bool TOPK>
void row_stats_t(const void* base, int64_t len, int64_t stride, int64_t col0, const Transform& tf,
                 float threshold, int64_t target_col, Stats& acc, TopK* top) {
  alignas(32) float z[BLOCK];
  for (int64_t start = 0; start < len; start += BLOCK) {
    const int64_t n = std::min(BLOCK, len - start);
    float block_max = kNegInf;
    bool nan = false;
    bool candidates = false;
    const float kth = TOPK && top->full() ? top->vals[top->k - 1] : kNegInf;
    int64_t count = 0;
    int64_t padded = (n + 7) / 8 * 8;
#ifdef PPLFAST_AVX2
    {
      __m256 vmax = _mm256_set1_ps(kNegInf), vnan = _mm256_setzero_ps();
      __m256i vcount = _mm256_setzero_si256();
      __m256 vcand = _mm256_setzero_ps();
      const __m256 vthr = _mm256_set1_ps(threshold), vkth = _mm256_set1_ps(kth);
      const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t i = 0; i < n; i += 8) {
        __m256 x;
        if (stride == 1 && i + 8 <= n) {
          x = load8<DT>(base, start + i);
        } else {
          alignas(32) float raw[8];
          for (int j = 0; j < 8; ++j)
            raw[j] = i + j < n ? load_scalar(base, DT, (start + i + j) * stride) : 0.0f;
          x = _mm256_load_ps(raw);
        }
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // before tanh
        x = transform8<SOFTCAP>(x, tf);
        if (i + 8 > n) {
          const __m256 live = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n - i)),
                                            _CMP_LT_OQ);
          x = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, live);
        }
        vmax = _mm256_max_ps(x, vmax);
        if constexpr (TOPK) vcand = _mm256_or_ps(vcand, _mm256_cmp_ps(x, vkth, _CMP_GT_OQ));
        vcount = _mm256_sub_epi32(vcount,
                                  _mm256_castps_si256(_mm256_cmp_ps(x, vthr, _CMP_GT_OQ)));
        _mm256_store_ps(z + i, x);
      }
      block_max = hmax8(vmax);
      nan = _mm256_movemask_ps(vnan) != 0;
      candidates = _mm256_movemask_ps(vcand) != 0;
      alignas(32) int32_t counts[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(counts), vcount);
      for (int j = 0; j < 8; ++j) count += counts[j];
    }
#else
    for (int64_t i = 0; i < n; ++i) {
      const float raw = load_scalar(base, DT, (start + i) * stride);
      nan = nan || raw != raw;
      const float x = tf.apply(raw);
      block_max = x > block_max ? x : block_max;
      count += x > threshold;
      candidates = candidates || x > kth;
      z[i] = x;
    }
    for (int64_t i = n; i < padded; ++i) z[i] = kNegInf;
#endif
    const int64_t first = col0 + start;
    if (target_col >= first && target_col < first + n && z[target_col - first] > threshold)
      --count;  // the target itself (its threshold was computed apart, in the hidden path)
    acc.rank += count;
    acc.nan = acc.nan || nan;
    if (acc.amax_idx < 0 || block_max > acc.amax) {
      for (int64_t i = 0; i < n; ++i) {
        if (z[i] == block_max) {
          acc.amax = block_max;
          acc.amax_idx = first + i;
          break;
        }
      }
    }
    constexpr int64_t kBytes = DT == kFloat32 ? 4 : 2;
    const int64_t next_n = stride == 1 ? std::min(BLOCK, len - start - n) : 0;
    fold_sums<TEMPERATURE>(acc, z, padded, block_max, tf,
                           static_cast<const char*>(base) + (start + n) * kBytes, next_n * kBytes);
    if constexpr (TOPK) {
      if (candidates || !top->full()) topk_block(*top, z, n, first);
    }
  }
}

struct RowArgs {
  int64_t len, stride, col0, target_col;
  float threshold;
};

template <int DT, bool SOFTCAP, bool TEMPERATURE>
struct Kernel {
  static void row(const void* base, const RowArgs& a, const Transform& tf, Stats& acc, TopK* top) {
    if (top != nullptr)
      row_stats_t<DT, SOFTCAP, TEMPERATURE, true>(base, a.len, a.stride, a.col0, tf, a.threshold,
                                                  a.target_col, acc, top);
    else
      row_stats_t<DT, SOFTCAP, TEMPERATURE, false>(base, a.len, a.stride, a.col0, tf,
                                                   a.threshold, a.target_col, acc, top);
  }
  static float transform(float raw, const Transform& tf) {
    return transform_one<SOFTCAP>(raw, tf);
  }
};

// Calls f.template operator()<Kernel<...>>() for the dtype and active transforms.
template <typename F>
void dispatch(int dtype, const Transform& tf, F&& f) {
  auto by_tf = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    if (tf.has_softcap) {
      if (tf.has_temperature) f(Kernel<DT, true, true>{});
      else f(Kernel<DT, true, false>{});
    } else {
      if (tf.has_temperature) f(Kernel<DT, false, true>{});
      else f(Kernel<DT, false, false>{});
    }
  };
  switch (dtype) {
    case kFloat32: by_tf(std::integral_constant<int, kFloat32>{}); break;
    case kFloat16: by_tf(std::integral_constant<int, kFloat16>{}); break;
    default: by_tf(std::integral_constant<int, kBFloat16>{}); break;
  }
}

inline void write_ignored(int64_t r, int64_t k, float* nll, float* entropy, float* max_logprob,
                          int64_t* argmax, int64_t* rank, int64_t* top_ids, float* top_lp) {
  nll[r] = 0.0f;
  entropy[r] = 0.0f;
  max_logprob[r] = 0.0f;
  argmax[r] = -1;
  rank[r] = -1;
  for (int64_t j = 0; j < k; ++j) {
    top_ids[r * k + j] = -1;
    top_lp[r * k + j] = 0.0f;
  }
}

// Final values of one scored row; `top_lp` holds the soft-capped top logits y on entry, and
// leaves with (y - max) / T - log(sum), formed in double (y - max reaches -2 FLT_MAX). The NLL is
// token_nll's finish_nll of the same (max, sum, target): the same bits.
inline void finish_row(int64_t r, const Stats& s, float target_logit, int64_t k,
                       double inv_temperature, float* nll, float* entropy, float* max_logprob,
                       int64_t* argmax, int64_t* rank, float* top_lp) {
  // +inf max: -inf for finite entries, NaN for the +inf ones; all -inf: NaN; NaN seen: NaN
  const double top = s.nan ? kNaN : static_cast<double>(s.max);
  const double log_sum = std::isfinite(s.max) ? std::log(s.sum) : 0.0;
  nll[r] = finish_nll(s.max, s.sum, s.nan, target_logit, inv_temperature);
  if (s.nan || !std::isfinite(s.max)) {
    entropy[r] = static_cast<float>(kNaN);
    max_logprob[r] = static_cast<float>(kNaN);
  } else {
    const double h = std::log(s.sum) - s.ent / s.sum;
    entropy[r] = static_cast<float>(h < 0 ? 0.0 : h);
    max_logprob[r] = static_cast<float>(std::min(0.0, -std::log(s.sum)));
  }
  argmax[r] = s.amax_idx < 0 ? 0 : s.amax_idx;
  rank[r] = s.rank;
  for (int64_t j = 0; j < k; ++j)
    top_lp[r * k + j] = static_cast<float>(
        (static_cast<double>(top_lp[r * k + j]) - top) * inv_temperature - log_sum);
}

}  // namespace

void token_stats(const void* logits, int dtype, int64_t batch, int64_t time, int64_t cols,
                 int64_t batch_stride, int64_t time_stride, int64_t col_stride,
                 const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
                 int64_t top_k, float* nll, float* entropy, float* max_logprob, int64_t* argmax,
                 int64_t* rank, int64_t* top_ids, float* top_logprobs, int nthreads) {
  const int64_t rows = batch * time, k = top_k;
  if (rows <= 0) return;
  const Transform tf = make_transform(softcap, temperature);
  auto row_offset = [&](int64_t r) { return (r / time) * batch_stride + (r % time) * time_stride; };
  const int64_t splits = column_splits(rows, cols, nthreads);
  dispatch(dtype, tf, [&](auto kernel) {
    using K = decltype(kernel);
    auto threshold = [&](int64_t r) {
      return K::transform(load_scalar(logits, dtype, row_offset(r) + targets[r] * col_stride), tf);
    };
    auto target32 = [&](int64_t r) {  // as token_nll forms its target
      return tf.apply(load_scalar(logits, dtype, row_offset(r) + targets[r] * col_stride));
    };
    const double inv_t = tf.inv_temperature;
    if (splits == 1) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
      for (int64_t r = 0; r < rows; ++r) {
        if (targets[r] == ignore_index) {
          write_ignored(r, k, nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs);
          continue;
        }
        Stats acc;
        TopK top{top_logprobs + r * k, top_ids + r * k, k};
        if (k > 0) top.reset();
        const RowArgs a{cols, col_stride, 0, targets[r], threshold(r)};
        K::row(element_ptr(logits, dtype, row_offset(r)), a, tf, acc, k > 0 ? &top : nullptr);
        finish_row(r, acc, target32(r), k, inv_t, nll, entropy, max_logprob, argmax, rank,
                   top_logprobs);
      }
      return;
    }
    const int64_t span = (cols + splits - 1) / splits;
    std::vector<Stats> parts(static_cast<size_t>(rows * splits));
    std::vector<float> part_vals(static_cast<size_t>(rows * splits * k));
    std::vector<int64_t> part_ids(static_cast<size_t>(rows * splits * k));
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t task = 0; task < rows * splits; ++task) {
      const int64_t r = task / splits, piece = task % splits;
      TopK top{part_vals.data() + task * k, part_ids.data() + task * k, k};
      if (k > 0) top.reset();
      if (targets[r] == ignore_index) continue;
      const int64_t c0 = piece * span, c1 = std::min(cols, c0 + span);
      if (c0 >= c1) continue;
      const RowArgs a{c1 - c0, col_stride, c0, targets[r], threshold(r)};
      K::row(element_ptr(logits, dtype, row_offset(r) + c0 * col_stride), a, tf, parts[task],
             k > 0 ? &top : nullptr);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (targets[r] == ignore_index) {
        write_ignored(r, k, nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs);
        continue;
      }
      Stats acc;
      TopK top{top_logprobs + r * k, top_ids + r * k, k};
      if (k > 0) top.reset();
      for (int64_t piece = 0; piece < splits; ++piece) {
        const int64_t task = r * splits + piece;
        merge(acc, parts[task], inv_t);
        for (int64_t j = 0; j < k && part_ids[task * k + j] >= 0; ++j)
          top.insert(part_vals[task * k + j], part_ids[task * k + j]);
      }
      finish_row(r, acc, target32(r), k, inv_t, nll, entropy, max_logprob, argmax, rank,
                 top_logprobs);
    }
  });
}

void stats_update(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride, int64_t v_offset, const int64_t* targets,
                  int64_t ignore_index, double softcap, double temperature, const float* threshold,
                  int64_t top_k, float* row_max, double* row_sum, double* row_ent,
                  float* amax_val, int64_t* amax_idx, int64_t* rank, double* target_logit,
                  float* top_vals, int64_t* top_ids, int nthreads) {
  if (rows <= 0) return;
  const int64_t k = top_k;
  const Transform tf = make_transform(softcap, temperature);
  dispatch(dtype, tf, [&](auto kernel) {
    using K = decltype(kernel);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = targets[r];
      if (t == ignore_index || std::isnan(row_max[r])) continue;  // NaN once: NaN for good
      Stats acc;
      acc.max = row_max[r];
      acc.sum = row_sum[r];
      acc.ent = row_ent[r];
      acc.amax = amax_val[r];
      acc.amax_idx = amax_idx[r];
      acc.rank = rank[r];
      Stats tile;
      TopK top{top_vals + r * k, top_ids + r * k, k};
      const RowArgs a{cols, col_stride, v_offset, t, threshold[r]};
      K::row(element_ptr(logits, dtype, r * row_stride), a, tf, tile, k > 0 ? &top : nullptr);
      merge(acc, tile, tf.inv_temperature);
      row_max[r] = acc.nan ? std::numeric_limits<float>::quiet_NaN() : acc.max;
      row_sum[r] = acc.sum;
      row_ent[r] = acc.ent;
      amax_val[r] = acc.amax;
      amax_idx[r] = acc.amax_idx;
      rank[r] = acc.rank;
      if (t >= v_offset && t < v_offset + cols) {
        target_logit[r] =
            tf.apply(load_scalar(logits, dtype, r * row_stride + (t - v_offset) * col_stride));
      }
    }
  });
}

void stats_finish(const float* row_max, const double* row_sum, const double* row_ent,
                  const int64_t* amax_idx, const int64_t* rank, const double* target_logit,
                  const int64_t* targets, int64_t ignore_index, int64_t rows, int64_t top_k,
                  double temperature, float* nll, float* entropy, float* max_logprob,
                  int64_t* argmax, int64_t* rank_out, int64_t* top_ids, float* top_vals) {
  const double inv_temperature = 1.0 / temperature;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      write_ignored(r, top_k, nll, entropy, max_logprob, argmax, rank_out, top_ids, top_vals);
      continue;
    }
    Stats s;
    s.nan = std::isnan(row_max[r]);
    s.max = row_max[r];
    s.sum = row_sum[r];
    s.ent = row_ent[r];
    s.amax_idx = amax_idx[r];
    s.rank = rank[r];
    finish_row(r, s, static_cast<float>(target_logit[r]), top_k, inv_temperature, nll, entropy,
               max_logprob, argmax, rank_out, top_vals);
  }
}

}  // namespace pplfast
