// The native CPU kernels' interface (bound by csrc/bindings.cpp): three op families, one
// convention for running state.
//
// Each family keeps a row's running state in `state`, a (rows, width) float64 buffer the caller
// owns: *_init makes it fresh, *_update folds one slab of columns [v_offset, v_offset + cols) of
// every row into it, *_finish turns it into the outputs. Slabs of one row come in increasing
// column order (argmax ties and top-k order go to the lower column); a call over the whole
// vocabulary is one slab at v_offset 0. The width is NLL_STATE, STATS_STATE + 2 top_k or
// COMPARE_STATE; the layout is private to the family's .cpp, so partial states can be merged
// only by these functions.
//
// Slabs: row r of a slab starts at element (r / time) * batch_stride + (r % time) * time_stride
// and its columns are col_stride apart (a (rows, cols) matrix passes time = rows and
// batch_stride = 0). Logits are float32, float16 or bfloat16 (DType), read in place. Rows whose
// target is ignore_index are left as they are and finish as ignored. Transform: y =
// softcap * tanh(x / softcap) when softcap > 0, then exponents (y - max) / temperature.
#pragma once
#include <cstdint>

namespace pplfast {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kNllState = 3;
constexpr int kStatsState = 9;  // + 2 * top_k
constexpr int kCompareState = 20;
constexpr int kMaxTopK = 64;

// ---- NLL: out[r] = logsumexp(z_r) - z_r[targets[r]], 0 where ignored -------------------------
void nll_init(double* state, int64_t rows);
void nll_update(const void* logits, int dtype, int64_t batch_stride, int64_t time_stride,
                int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
                const int64_t* targets, int64_t ignore_index, double softcap, double temperature,
                double* state, int nthreads);
void nll_finish(const double* state, const int64_t* targets, int64_t ignore_index, int64_t rows,
                double temperature, float* out);

// ---- statistics: nll, entropy, max log p, argmax, rank, top-k ---------------------------------
// thresholds: each row's soft-capped target logit (the rank counts the entries above it), or
// nullptr: then each row takes it from the slab that holds its target, which must be the first
// slab folded into that row (the logits path folds the whole row as one slab).
void stats_init(double* state, int64_t rows, int64_t top_k, const float* thresholds);
void stats_update(const void* logits, int dtype, int64_t batch_stride, int64_t time_stride,
                  int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
                  const int64_t* targets, int64_t ignore_index, double softcap,
                  double temperature, int64_t top_k, double* state, int nthreads);
// Ignored rows: floats 0, integers -1; top_ids / top_logprobs are (rows, top_k) row-major.
void stats_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                  int64_t rows, int64_t top_k, double temperature, float* nll, float* entropy,
                  float* max_logprob, int64_t* argmax, int64_t* rank, int64_t* top_ids,
                  float* top_logprobs);

// ---- comparison of two models' rows: KL both ways, both NLLs and argmaxes ----------------------
void compare_init(double* state, int64_t rows);
void compare_update(const void* base, int base_dtype, int64_t base_batch_stride,
                    int64_t base_time_stride, int64_t base_col_stride, const void* test,
                    int test_dtype, int64_t test_batch_stride, int64_t test_time_stride,
                    int64_t test_col_stride, int64_t rows, int64_t time, int64_t cols,
                    int64_t v_offset, const int64_t* targets, int64_t ignore_index,
                    double softcap, double temperature, double* state, int nthreads);
void compare_finish(const double* state, const int64_t* targets, int64_t ignore_index,
                    int64_t rows, double temperature, float* kl, float* kl_reverse,
                    float* nll_base, float* nll_test, int64_t* argmax_base,
                    int64_t* argmax_test);

// ---- instruction set ----------------------------------------------------------------------------
// The row kernels exist for the build's baseline ("avx2" on x86-64-v3, else "scalar") and, on
// x86-64, "avx512" (AVX-512 F/BW/DQ/VL), chosen per call: the best this CPU runs, unless
// PPLFAST_CPU_ISA names one ("auto", "avx512", the baseline's name). Throws std::invalid_argument
// for an unknown name or one this CPU or build cannot run.
const char* cpu_isa();
// The decision itself, for a request and the CPU's and build's capabilities (tests).
const char* isa_choice(const char* request, bool cpu_has_avx512, bool built_avx512);
bool cpu_has_avx512();
bool built_avx512();
// clamp_exp2 of the chosen ISA on n exponents (in log2 units): out[i] = 2^max(t[i], -87.3 log2 e).
void exp2_clamped(const float* t, float* out, int64_t n);

}  // namespace pplfast
