// Native CPU kernels comparing two models' logits row by row (see compare.cpp for the algorithm).
#pragma once
#include <cstdint>

namespace pplfast {

// Running state of one row, kCompareState doubles (layout private to compare.cpp). A fresh state
// is made by compare_init; compare_update folds slabs of columns into it; compare_finish turns it
// into the per-row outputs.
constexpr int kCompareState = 20;

void compare_init(double* state, int64_t rows);

// Fold the columns [v_offset, v_offset + cols) of both models' rows into the state. Row r of each
// tensor starts at (r / time) * batch_stride + (r % time) * time_stride (elements; a 2-D slab
// passes time = rows and batch_stride = 0). Rows whose target is ignore_index are skipped.
void compare_update(const void* base, int base_dtype, int64_t base_batch_stride,
                    int64_t base_time_stride, int64_t base_col_stride, const void* test,
                    int test_dtype, int64_t test_batch_stride, int64_t test_time_stride,
                    int64_t test_col_stride, int64_t rows, int64_t time, int64_t cols,
                    int64_t v_offset, const int64_t* targets, int64_t ignore_index,
                    double softcap, double temperature, double* state, int nthreads);

// kl, kl_reverse, nll_base, nll_test (float32) and argmax_base, argmax_test (int64) of each row;
// 0 and -1 where ignored. `temperature` is the one the state was folded with.
void compare_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                    int64_t rows, double temperature, float* kl, float* kl_reverse,
                    float* nll_base, float* nll_test, int64_t* argmax_base,
                    int64_t* argmax_test);

}  // namespace pplfast
