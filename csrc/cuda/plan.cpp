// Launch plan of the CUDA token-NLL kernels (see plan.h).
#include "plan.h"

#include <stdexcept>
#include <string>

#include "constants.h"

namespace pplfast_cuda {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Plan make_plan(int64_t rows, int64_t V, int sm_count, int threads, int splits) {
  if (rows < 0 || V < 1) throw std::invalid_argument("make_plan: need rows >= 0 and V >= 1");
  if (threads < 0 || threads > kMaxThreads || threads % kWarp != 0) {
    throw std::invalid_argument("threads must be 0 (auto) or a multiple of 32 up to 512, got " +
                                std::to_string(threads));
  }
  if (splits < 0) throw std::invalid_argument("splits must be >= 0, got " + std::to_string(splits));
  Plan plan{};
  plan.threads = threads != 0 ? threads : (V <= kWarpMaxV ? kWarp : (V >= 32768 ? 512 : 256));
  if (plan.threads == kWarp) {
    if (splits > 1) throw std::invalid_argument("the warp-per-row kernel does not split rows");
    plan.splits = 1;
  } else if (splits != 0) {
    plan.splits = splits;
  } else {
    // Blocks resident at once (about 1024 threads per SM at <= 64 registers per thread): fewer
    // rows than that leave SMs idle, so cut rows into segments of at least kMinSegment.
    const int64_t resident = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) *
                             (1024 / plan.threads > 0 ? 1024 / plan.threads : 1);
    int64_t want = rows >= resident || rows == 0 ? 1 : ceil_div(resident, rows);
    const int64_t most = ceil_div(V, kMinSegment);
    if (want > most) want = most;
    plan.splits = static_cast<int>(want < 1 ? 1 : want);
  }
  const int64_t max_splits = ceil_div(V, kSegmentAlign);
  if (plan.splits > max_splits) plan.splits = static_cast<int>(max_splits);
  plan.segment = ceil_div(ceil_div(V, plan.splits), kSegmentAlign) * kSegmentAlign;
  plan.splits = static_cast<int>(ceil_div(V, plan.segment));  // no empty segment
  plan.workspace_floats = plan.splits > 1 ? 2 * rows * plan.splits : 0;
  return plan;
}

}  // namespace pplfast_cuda
