// Native CPU kernels for per-token statistics (see token_stats.cpp for the algorithm).
#pragma once
#include <cstdint>

namespace pplfast {

// For every row of a (batch, time, cols) strided logits tensor (softcap and temperature as in
// token_nll): nll, entropy -sum p log p, max log p, argmax (lowest index on ties), rank (entries
// strictly above the target's logit) and, when top_k > 0, the top_k ids and log-probabilities
// (row-major (rows, top_k)). Ignored rows: floats 0, integers -1.
void token_stats(const void* logits, int dtype, int64_t batch, int64_t time, int64_t cols,
                 int64_t batch_stride, int64_t time_stride, int64_t col_stride,
                 const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
                 int64_t top_k, float* nll, float* entropy, float* max_logprob, int64_t* argmax,
                 int64_t* rank, int64_t* top_ids, float* top_logprobs, int nthreads);

// Running per-row state of the statistics over vocabulary tiles (the hidden-states path): fold a
// (rows, cols) slab whose first column is vocabulary index v_offset. `threshold` is each row's
// soft-capped target logit, known before the pass (the rank counts entries above it). row_max (of
// the soft-capped logits y) is NaN once a NaN was seen; row_sum = sum exp((y - row_max) / T) and
// row_ent its entropy moment; top_vals/top_ids (rows, top_k) hold the soft-capped top logits,
// ids -1 empty.
void stats_update(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride, int64_t v_offset, const int64_t* targets,
                  int64_t ignore_index, double softcap, double temperature, const float* threshold,
                  int64_t top_k, float* row_max, double* row_sum, double* row_ent,
                  float* amax_val, int64_t* amax_idx, int64_t* rank, double* target_logit,
                  float* top_vals, int64_t* top_ids, int nthreads);

// Outputs of token_stats from the running state; top_vals become log-probabilities in place.
void stats_finish(const float* row_max, const double* row_sum, const double* row_ent,
                  const int64_t* amax_idx, const int64_t* rank, const double* target_logit,
                  const int64_t* targets, int64_t ignore_index, int64_t rows, int64_t top_k,
                  double temperature, float* nll, float* entropy, float* max_logprob,
                  int64_t* argmax, int64_t* rank_out, int64_t* top_ids, float* top_vals);

}  // namespace pplfast
