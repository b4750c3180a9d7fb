// Launch plan of the CUDA token-NLL kernels (plan.cpp): how a (rows, V) problem is laid out on
// the GPU. Plain C++ (no CUDA calls, no CUDA headers), so the choice is testable anywhere and
// the binding can expose it.
#pragma once

#include <cstdint>

namespace pplfast_cuda {

struct Plan {
  int threads;               // threads per row segment: 32 = a warp per row, else a block each
  int splits;                // segments per row; > 1: partial (max, sum) pairs and a merge kernel
  int64_t segment;           // elements per segment (the last one may be shorter)
  int64_t workspace_floats;  // float32 workspace the launch needs (0 when splits == 1)
};

// A warp per row for rows up to kWarpMaxV wide, else a block per row (256 threads, 512 from
// 32768); when rows are too few to fill the GPU (fewer than its resident blocks), each row is cut
// into segments of at least kMinSegment elements. threads / splits > 0 override the heuristics
// (for tests and tuning); throws std::invalid_argument on values no kernel takes.
Plan make_plan(int64_t rows, int64_t V, int sm_count, int threads, int splits);

int64_t ceil_div(int64_t a, int64_t b);

}  // namespace pplfast_cuda
