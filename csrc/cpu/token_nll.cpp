// The NLL family: per-row log-sum-exp and target logit, folded slab by slab into a running state
// (ops.h's convention), finished into NLL.
//
// State per row (kNllState doubles): the maximum of the soft-capped logits y seen so far (NaN
// once a NaN was seen: NaN for good), the sum of exp((y - max) / T), and the soft-capped target
// logit, recorded by the slab that holds the target through the row kernels' own transform, so
// that it never exceeds the row's maximum. The row kernel (rows.h) reads each logit once; the NLL
// is (max - target) / T + log(sum), the first term in double (common.h's finish_nll): no two large
// rounded terms cancel, logits may reach the top of the float range at any temperature, and the
// result is >= 0 up to rounding, which the final guard clamps.
#include "isa.h"

namespace pplfast {
using namespace cpu;

namespace {
enum { kMax, kSum, kTarget };
constexpr int64_t kMinSpan = 8192;  // columns per piece when rows are cut (4 row-kernel blocks)
}  // namespace

static_assert(kTarget + 1 == kNllState, "state layout");

void nll_init(double* state, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    double* st = state + r * kNllState;
    st[kMax] = kNegInf;
    st[kSum] = 0.0;
    st[kTarget] = 0.0;
  }
}

void nll_update(const void* logits, int dtype, int64_t batch_stride, int64_t time_stride,
                int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
                const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
                double* state, int nthreads) {
  if (rows <= 0 || time <= 0 || cols <= 0) return;
  const RowKernels& isa = kernels();
  const Transform tf = make_transform(softcap, temperature);
  const NllRowFn row = isa.nll(dtype, tf);
  const Rows layout{batch_stride, time_stride, col_stride, time};
  split_rows<NllPart>(
      rows, cols, nthreads, kMinSpan, targets, ignore_index,
      [&](int64_t r, int64_t c0, int64_t c1, NllPart& part) {
        if (std::isnan(state[r * kNllState + kMax])) return;  // NaN for good
        row(element_ptr(logits, dtype, layout.offset(r) + c0 * col_stride), c1 - c0, col_stride,
            tf, part);
      },
      [&](NllPart& into, const NllPart& later) { merge(into, later, tf.inv_temperature); },
      [&](int64_t r, const NllPart& part) {
        double* st = state + r * kNllState;
        NllPart acc;
        acc.max = static_cast<float>(st[kMax]);
        acc.sum = st[kSum];
        if (std::isnan(acc.max)) return;
        merge(acc, part, tf.inv_temperature);
        st[kMax] = acc.nan ? std::numeric_limits<double>::quiet_NaN() : acc.max;
        st[kSum] = acc.sum;
        const int64_t t = targets[r];
        if (t >= v_offset && t < v_offset + cols)
          st[kTarget] = isa.transform(
              load_scalar(logits, dtype, layout.offset(r) + (t - v_offset) * col_stride), tf);
      });
}

void nll_finish(const double* state, const int64_t* targets, int64_t ignore_index, int64_t rows,
                double temperature, float* out) {
  const double inv_temperature = 1.0 / temperature;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] == ignore_index) {
      out[r] = 0.0f;
      continue;
    }
    const double* st = state + r * kNllState;
    const float m = static_cast<float>(st[kMax]);
    out[r] = finish_nll(m, st[kSum], std::isnan(m), static_cast<float>(st[kTarget]),
                        inv_temperature);
  }
}

}  // namespace pplfast
