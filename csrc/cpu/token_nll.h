// Native CPU kernels for per-token NLL (see token_nll.cpp for the algorithm).
#pragma once
#include <cstdint>

namespace pplfast {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// out[r] = logsumexp(z_r) - z_r[targets[r]] (0 where targets[r] == ignore_index) for the rows of a
// (batch, time, cols) strided tensor; z = x, softcap * tanh(x / softcap) if softcap > 0, then
// divided by temperature. Offsets are in elements.
void token_nll(const void* logits, int dtype, int64_t batch, int64_t time, int64_t cols,
               int64_t batch_stride, int64_t time_stride, int64_t col_stride,
               const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
               float* out, int nthreads);

// Fold a (rows, cols) slab of logits whose first column is vocabulary index v_offset into the
// running per-row state (row_max = max of the soft-capped logits y, row_sum = sum exp((y - row_max)
// / temperature)), and record the soft-capped target logit when the target falls inside the slab.
// Ignored rows are left untouched.
void lse_update(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                int64_t col_stride, int64_t v_offset, const int64_t* targets,
                int64_t ignore_index, double softcap, double temperature, float* row_max,
                double* row_sum, double* target_logit, int nthreads);

// out[r] = (row_max - target_logit) / temperature + log(row_sum), never below 0, and 0 where
// ignored; NaN and +-inf as the reference.
void lse_finish(const float* row_max, const double* row_sum, const double* target_logit,
                const int64_t* targets, int64_t ignore_index, int64_t rows, double temperature,
                float* out);

}  // namespace pplfast
