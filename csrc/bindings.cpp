// pybind11 module pplfast._C: the CPU kernels over raw pointers, sizes and strides, so that the
// build needs no PyTorch headers. pplfast/_cpu.py passes tensor.data_ptr() and friends; the GIL is
// released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/compare.h"
#include "cpu/token_nll.h"
#include "cpu/token_stats.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pplfast native CPU kernels";
  m.attr("FLOAT32") = static_cast<int>(pplfast::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(pplfast::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(pplfast::kBFloat16);

  m.def(
      "token_nll",
      [](std::uintptr_t logits, int dtype, int64_t batch, int64_t time, int64_t cols,
         int64_t batch_stride, int64_t time_stride, int64_t col_stride, std::uintptr_t targets,
         int64_t ignore_index, double softcap, double temperature, std::uintptr_t out,
         int nthreads) {
        py::gil_scoped_release release;
        pplfast::token_nll(ptr<const void>(logits), dtype, batch, time, cols, batch_stride,
                           time_stride, col_stride, ptr<const int64_t>(targets), ignore_index,
                           softcap, temperature, ptr<float>(out), nthreads);
      },
      "Per-token NLL of a strided (batch, time, cols) logits tensor into out (float32).");

  m.def(
      "lse_update",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t v_offset, std::uintptr_t targets, int64_t ignore_index,
         double softcap, double temperature, std::uintptr_t row_max, std::uintptr_t row_sum,
         std::uintptr_t target_logit, int nthreads) {
        py::gil_scoped_release release;
        pplfast::lse_update(ptr<const void>(logits), dtype, rows, cols, row_stride, col_stride,
                            v_offset, ptr<const int64_t>(targets), ignore_index, softcap,
                            temperature, ptr<float>(row_max), ptr<double>(row_sum),
                            ptr<double>(target_logit), nthreads);
      },
      "Fold a (rows, cols) slab of logits into running (max, sum-exp, target logit) state.");

  m.def(
      "lse_finish",
      [](std::uintptr_t row_max, std::uintptr_t row_sum, std::uintptr_t target_logit,
         std::uintptr_t targets, int64_t ignore_index, int64_t rows, double temperature,
         std::uintptr_t out) {
        py::gil_scoped_release release;
        pplfast::lse_finish(ptr<const float>(row_max), ptr<const double>(row_sum),
                            ptr<const double>(target_logit), ptr<const int64_t>(targets),
                            ignore_index, rows, temperature, ptr<float>(out));
      },
      "NLL from the running state: (row_max - target_logit) / temperature + log(row_sum), "
      "clamped at 0.");

  m.def(
      "token_stats",
      [](std::uintptr_t logits, int dtype, int64_t batch, int64_t time, int64_t cols,
         int64_t batch_stride, int64_t time_stride, int64_t col_stride, std::uintptr_t targets,
         int64_t ignore_index, double softcap, double temperature, int64_t top_k,
         std::uintptr_t nll, std::uintptr_t entropy, std::uintptr_t max_logprob,
         std::uintptr_t argmax, std::uintptr_t rank, std::uintptr_t top_ids,
         std::uintptr_t top_logprobs, int nthreads) {
        py::gil_scoped_release release;
        pplfast::token_stats(ptr<const void>(logits), dtype, batch, time, cols, batch_stride,
                             time_stride, col_stride, ptr<const int64_t>(targets), ignore_index,
                             softcap, temperature, top_k, ptr<float>(nll), ptr<float>(entropy),
                             ptr<float>(max_logprob), ptr<int64_t>(argmax), ptr<int64_t>(rank),
                             ptr<int64_t>(top_ids), ptr<float>(top_logprobs), nthreads);
      },
      "Per-token statistics (nll, entropy, max log p, argmax, rank, top-k) of strided logits.");

  m.def(
      "stats_update",
      [](std::uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
         int64_t col_stride, int64_t v_offset, std::uintptr_t targets, int64_t ignore_index,
         double softcap, double temperature, std::uintptr_t threshold, int64_t top_k,
         std::uintptr_t row_max, std::uintptr_t row_sum, std::uintptr_t row_ent,
         std::uintptr_t amax_val, std::uintptr_t amax_idx, std::uintptr_t rank,
         std::uintptr_t target_logit, std::uintptr_t top_vals, std::uintptr_t top_ids,
         int nthreads) {
        py::gil_scoped_release release;
        pplfast::stats_update(ptr<const void>(logits), dtype, rows, cols, row_stride, col_stride,
                              v_offset, ptr<const int64_t>(targets), ignore_index, softcap,
                              temperature, ptr<const float>(threshold), top_k,
                              ptr<float>(row_max), ptr<double>(row_sum), ptr<double>(row_ent),
                              ptr<float>(amax_val), ptr<int64_t>(amax_idx), ptr<int64_t>(rank),
                              ptr<double>(target_logit), ptr<float>(top_vals),
                              ptr<int64_t>(top_ids), nthreads);
      },
      "Fold a (rows, cols) slab of logits into the running per-row statistics state.");

  m.def(
      "stats_finish",
      [](std::uintptr_t row_max, std::uintptr_t row_sum, std::uintptr_t row_ent,
         std::uintptr_t amax_idx, std::uintptr_t rank, std::uintptr_t target_logit,
         std::uintptr_t targets, int64_t ignore_index, int64_t rows, int64_t top_k,
         double temperature, std::uintptr_t nll, std::uintptr_t entropy,
         std::uintptr_t max_logprob, std::uintptr_t argmax, std::uintptr_t rank_out,
         std::uintptr_t top_ids, std::uintptr_t top_vals) {
        py::gil_scoped_release release;
        pplfast::stats_finish(ptr<const float>(row_max), ptr<const double>(row_sum),
                              ptr<const double>(row_ent), ptr<const int64_t>(amax_idx),
                              ptr<const int64_t>(rank), ptr<const double>(target_logit),
                              ptr<const int64_t>(targets), ignore_index, rows, top_k, temperature,
                              ptr<float>(nll), ptr<float>(entropy), ptr<float>(max_logprob),
                              ptr<int64_t>(argmax), ptr<int64_t>(rank_out), ptr<int64_t>(top_ids),
                              ptr<float>(top_vals));
      },
      "Statistics from the running state; top_vals become log-probabilities in place.");

  m.attr("COMPARE_STATE") = pplfast::kCompareState;
  m.def(
      "compare_init",
      [](std::uintptr_t state, int64_t rows) {
        pplfast::compare_init(ptr<double>(state), rows);
      },
      "Fresh compare state: (rows, COMPARE_STATE) float64.");
  m.def(
      "compare_update",
      [](std::uintptr_t base, int base_dtype, int64_t base_batch_stride, int64_t base_time_stride,
         int64_t base_col_stride, std::uintptr_t test, int test_dtype, int64_t test_batch_stride,
         int64_t test_time_stride, int64_t test_col_stride, int64_t rows, int64_t time,
         int64_t cols, int64_t v_offset, std::uintptr_t targets, int64_t ignore_index,
         double softcap, double temperature, std::uintptr_t state, int nthreads) {
        py::gil_scoped_release release;
        pplfast::compare_update(ptr<const void>(base), base_dtype, base_batch_stride,
                                base_time_stride, base_col_stride, ptr<const void>(test),
                                test_dtype, test_batch_stride, test_time_stride, test_col_stride,
                                rows, time, cols, v_offset, ptr<const int64_t>(targets),
                                ignore_index, softcap, temperature, ptr<double>(state), nthreads);
      },
      "Fold columns [v_offset, v_offset + cols) of both models' rows into the compare state.");
  m.def(
      "compare_finish",
      [](std::uintptr_t state, std::uintptr_t targets, int64_t ignore_index, int64_t rows,
         double temperature, std::uintptr_t kl, std::uintptr_t kl_reverse,
         std::uintptr_t nll_base, std::uintptr_t nll_test, std::uintptr_t argmax_base,
         std::uintptr_t argmax_test) {
        py::gil_scoped_release release;
        pplfast::compare_finish(ptr<const double>(state), ptr<const int64_t>(targets),
                                ignore_index, rows, temperature, ptr<float>(kl),
                                ptr<float>(kl_reverse),
                                ptr<float>(nll_base), ptr<float>(nll_test),
                                ptr<int64_t>(argmax_base), ptr<int64_t>(argmax_test));
      },
      "KL both ways, both NLLs and both argmaxes from the compare state.");
}
