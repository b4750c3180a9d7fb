// The row kernels of one instruction set, as a table of function pointers (isa_base.cpp,
// isa_avx512.cpp), and the dispatcher that picks a table per call (dispatch.cpp).
#pragma once
#include <cstdint>

#include "common.h"

namespace pplfast {
namespace cpu {

// Fold `len` elements of one row (element stride `stride`; the first is vocabulary column col0
// where it matters) into the partial.
using NllRowFn = void (*)(const void* base, int64_t len, int64_t stride, const Transform& tf,
                          NllPart& acc);
// threshold: the soft-capped target logit (the rank counts entries above it); target_col its
// column (the target itself is not counted where its threshold was computed apart).
using StatsRowFn = void (*)(const void* base, int64_t len, int64_t stride, int64_t col0,
                            const Transform& tf, float threshold, int64_t target_col,
                            StatsPart& acc);
using CompareRowFn = void (*)(const void* a, int64_t a_stride, const void* b, int64_t b_stride,
                              int64_t len, int64_t col0, const Transform& tf, Side& p, Side& q);

struct RowKernels {
  const char* name;
  // the one dtype x transform dispatcher, per family (rows.h's pick)
  NllRowFn (*nll)(int dtype, const Transform& tf);
  StatsRowFn (*stats)(int dtype, const Transform& tf, bool top_k);
  CompareRowFn (*compare)(int base_dtype, int test_dtype, const Transform& tf);
  // y of one raw logit by the rows' own vector code (a target compares equal to itself wherever
  // it is read, and never exceeds the row's maximum)
  float (*transform)(float raw, const Transform& tf);
  void (*exp2_clamped)(const float* t, float* out, int64_t n);
};

const RowKernels& base_kernels();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PPLFAST_BUILD_AVX512 1
const RowKernels& avx512_kernels();
#endif

// The table of the instruction set cpu_isa() names (throws as cpu_isa does).
const RowKernels& kernels();

}  // namespace cpu
}  // namespace pplfast
