// Constants of the CUDA token-NLL kernels (token_nll.cu) and of their launch plan (plan.cpp),
// defined once. Plain C++: the plan compiles without CUDA headers.
#pragma once

#include <cstdint>

namespace pplfast_cuda {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr int kWarpRowsPerBlock = 8;      // warp-per-row kernel: 256-thread blocks
constexpr int kUnroll = 4;                // 16-byte loads in flight per thread
constexpr int kAcc = 8;                   // independent partial sums per thread
constexpr int64_t kWarpMaxV = 4096;       // rows up to this width: a warp per row
constexpr int64_t kMinSegment = 4096;     // smallest row segment worth a block of its own
constexpr int64_t kSegmentAlign = 64;     // segments are whole multiples of this many elements
constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.693147180559945309f;

}  // namespace pplfast_cuda
