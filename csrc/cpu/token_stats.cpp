// The statistics family: NLL, entropy, max log-probability, argmax, target rank and top-k in one
// pass over each row, folded slab by slab into a running state (ops.h's convention).
//
// The row kernel (rows.h) is token_nll's, extended with:
//   - the entropy moment ent = sum exp(d) d (d = (y - m) / T), rescaled with the running max:
//     when the max grows from m to m', with a = (m - m') / T, ent' = e^a (ent + a sum). Then
//     H = -sum p log p = log(sum) - ent / sum and max log p = -log(sum);
//   - the running argmax: a block whose max beats the running one is searched for the first index
//     holding it (lowest index on ties, as torch.argmax);
//   - the rank: every value is compared with the target's while the block is loaded (the
//     temperature is monotone: the soft-capped values order the entries). The target's value is
//     the row's threshold, given to stats_init (the hidden-states path computes it apart) or read
//     from the slab through the rows' own transform;
//   - a sorted top-k list of soft-capped values (k <= 64): an element enters only when it beats the
//     k-th value, which after the first blocks is rare. Their log-probabilities are
//     (y - m) / T - log(sum), formed in double at the end.
// A separate kernel from token_nll, so that the NLL alone never pays for the statistics.
//
// Special values: NaN makes nll, entropy and max log p NaN; -inf entries add exp(-inf) = 0 to both
// sums (the exponent is clamped at -87.3 before the product, so 0 * -inf never occurs); a +inf
// entry makes the log-sum-exp +inf, entropy and max log p NaN (inf - inf), as the float64
// reference.
//
// State per row (kStatsState + 2 top_k doubles): max (NaN once a NaN was seen), sum, ent, the
// argmax's value and index (-1: none yet), rank, the target logit, the threshold and whether it is
// set, then the top-k values and ids (-1 empty).
#include "isa.h"

namespace pplfast {
using namespace cpu;

namespace {
enum { kMax, kSum, kEnt, kAmax, kAmaxIdx, kRank, kTarget, kThreshold, kThresholdSet };
constexpr int64_t kMinSpan = 8192;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline int64_t width(int64_t top_k) { return kStatsState + 2 * top_k; }

StatsPart unpack(const double* st, int64_t k) {
  StatsPart s;
  s.max = static_cast<float>(st[kMax]);
  s.nan = std::isnan(st[kMax]);
  s.sum = st[kSum];
  s.ent = st[kEnt];
  s.amax = static_cast<float>(st[kAmax]);
  s.amax_idx = static_cast<int64_t>(st[kAmaxIdx]);
  s.rank = static_cast<int64_t>(st[kRank]);
  s.top.k = k;
  for (int64_t j = 0; j < k; ++j) {
    s.top.vals[j] = static_cast<float>(st[kStatsState + j]);
    s.top.ids[j] = static_cast<int64_t>(st[kStatsState + k + j]);
  }
  return s;
}

void pack(const StatsPart& s, double* st) {
  st[kMax] = s.nan ? kNaN : static_cast<double>(s.max);
  st[kSum] = s.sum;
  st[kEnt] = s.ent;
  st[kAmax] = s.amax;
  st[kAmaxIdx] = static_cast<double>(s.amax_idx);
  st[kRank] = static_cast<double>(s.rank);
  for (int64_t j = 0; j < s.top.k; ++j) {
    st[kStatsState + j] = s.top.vals[j];
    st[kStatsState + s.top.k + j] = static_cast<double>(s.top.ids[j]);
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
}  // namespace

static_assert(kThresholdSet + 1 == kStatsState, "state layout");

void stats_init(double* state, int64_t rows, int64_t top_k, const float* thresholds) {
  StatsPart fresh;
  fresh.top.reset(top_k);
  for (int64_t r = 0; r < rows; ++r) {
    double* st = state + r * width(top_k);
    pack(fresh, st);
    st[kTarget] = 0.0;
    st[kThreshold] = thresholds != nullptr ? thresholds[r] : kNaN;
    st[kThresholdSet] = thresholds != nullptr ? 1.0 : 0.0;
  }
}

void stats_update(const void* logits, int dtype, int64_t batch_stride, int64_t time_stride,
                  int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
                  const int64_t* targets, int64_t ignore_index, double softcap,
                  double temperature, int64_t top_k, double* state, int nthreads) {
  if (rows <= 0 || time <= 0 || cols <= 0) return;
  const RowKernels& isa = kernels();
  const Transform tf = make_transform(softcap, temperature);
  const StatsRowFn row = isa.stats(dtype, tf, top_k > 0);
  const Rows layout{batch_stride, time_stride, col_stride, time};
  const int64_t k = top_k;
  auto in_slab = [&](int64_t t) { return t >= v_offset && t < v_offset + cols; };
  auto target_value = [&](int64_t r) {
    const int64_t t = targets[r];
    return isa.transform(
        load_scalar(logits, dtype, layout.offset(r) + (t - v_offset) * col_stride), tf);
  };
  split_rows<StatsPart>(
      rows, cols, nthreads, kMinSpan, targets, ignore_index,
      [&](int64_t r, int64_t c0, int64_t c1, StatsPart& part) {
        // a row that saw a NaN goes on: its sums stay NaN, its argmax, rank and top-k are those
        // of one pass over the whole row
        part.top.reset(k);
        const double* st = state + r * width(k);
        const int64_t t = targets[r];
        const float threshold = st[kThresholdSet] != 0 ? static_cast<float>(st[kThreshold])
                                : in_slab(t)          ? target_value(r)
                                                      : std::numeric_limits<float>::quiet_NaN();
        row(element_ptr(logits, dtype, layout.offset(r) + c0 * col_stride), c1 - c0, col_stride,
            v_offset + c0, tf, threshold, t, part);
      },
      [&](StatsPart& into, const StatsPart& later) { merge(into, later, tf.inv_temperature); },
      [&](int64_t r, const StatsPart& part) {
        double* st = state + r * width(k);
        StatsPart acc = unpack(st, k);
        merge(acc, part, tf.inv_temperature);
        pack(acc, st);
        const int64_t t = targets[r];
        if (in_slab(t)) {
          st[kTarget] = target_value(r);
          if (st[kThresholdSet] == 0) {
            st[kThreshold] = st[kTarget];
            st[kThresholdSet] = 1.0;
          }
        }
      });
}

void stats_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                  int64_t rows, int64_t top_k, double temperature, float* nll, float* entropy,
                  float* max_logprob, int64_t* argmax, int64_t* rank, int64_t* top_ids,
                  float* top_logprobs) {
  const double inv_t = 1.0 / temperature;
  const int64_t k = top_k;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      write_ignored(r, k, nll, entropy, max_logprob, argmax, rank, top_ids, top_logprobs);
      continue;
    }
    const double* st = state + r * width(k);
    const StatsPart s = unpack(st, k);
    // +inf max: -inf for finite entries, NaN for the +inf ones; all -inf: NaN; NaN seen: NaN
    const double top = s.nan ? kNaN : static_cast<double>(s.max);
    const double log_sum = std::isfinite(s.max) ? std::log(s.sum) : 0.0;
    nll[r] = finish_nll(s.max, s.sum, s.nan, static_cast<float>(st[kTarget]), inv_t);
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
    for (int64_t j = 0; j < k; ++j) {
      top_ids[r * k + j] = s.top.ids[j];
      top_logprobs[r * k + j] = static_cast<float>(
          (static_cast<double>(s.top.vals[j]) - top) * inv_t - log_sum);
    }
  }
}

}  // namespace pplfast
