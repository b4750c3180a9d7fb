// pybind11 module pplfast._C: the CPU kernels over raw pointers, sizes and strides, so that the
// build needs no PyTorch headers. pplfast/_cpu.py passes tensor.data_ptr() and friends; the GIL is
// released while a kernel runs.
//
// Every op family has the same three calls over a running state the caller owns (a (rows, width)
// float64 buffer; cpu/ops.h): *_init, *_update (one slab of columns at v_offset), *_finish.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/ops.h"

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
  m.attr("NLL_STATE") = pplfast::kNllState;
  m.attr("STATS_STATE") = pplfast::kStatsState;
  m.attr("COMPARE_STATE") = pplfast::kCompareState;
  m.attr("MAX_TOP_K") = pplfast::kMaxTopK;

  // ---- NLL
  m.def(
      "nll_init",
      [](std::uintptr_t state, int64_t rows) { pplfast::nll_init(ptr<double>(state), rows); },
      "Fresh NLL state: (rows, NLL_STATE) float64.");
  m.def(
      "nll_update",
      [](std::uintptr_t logits, int dtype, int64_t batch_stride, int64_t time_stride,
         int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
         std::uintptr_t targets, int64_t ignore_index, double softcap, double temperature,
         std::uintptr_t state, int nthreads) {
        py::gil_scoped_release release;
        pplfast::nll_update(ptr<const void>(logits), dtype, batch_stride, time_stride,
                            col_stride, rows, time, cols, v_offset, ptr<const int64_t>(targets),
                            ignore_index, softcap, temperature, ptr<double>(state), nthreads);
      },
      "Fold columns [v_offset, v_offset + cols) of every row's logits into the NLL state.");
  m.def(
      "nll_finish",
      [](std::uintptr_t state, std::uintptr_t targets, int64_t ignore_index, int64_t rows,
         double temperature, std::uintptr_t out) {
        py::gil_scoped_release release;
        pplfast::nll_finish(ptr<const double>(state), ptr<const int64_t>(targets), ignore_index,
                            rows, temperature, ptr<float>(out));
      },
      "Per-token NLL (float32) from the state: (max - target) / T + log(sum), clamped at 0.");

  // ---- statistics
  m.def(
      "stats_init",
      [](std::uintptr_t state, int64_t rows, int64_t top_k, std::uintptr_t thresholds) {
        pplfast::stats_init(ptr<double>(state), rows, top_k, ptr<const float>(thresholds));
      },
      "Fresh statistics state: (rows, STATS_STATE + 2 top_k) float64; thresholds: each row's "
      "soft-capped target logit (float32), or 0 to read it from the slab holding the target.");
  m.def(
      "stats_update",
      [](std::uintptr_t logits, int dtype, int64_t batch_stride, int64_t time_stride,
         int64_t col_stride, int64_t rows, int64_t time, int64_t cols, int64_t v_offset,
         std::uintptr_t targets, int64_t ignore_index, double softcap, double temperature,
         int64_t top_k, std::uintptr_t state, int nthreads) {
        py::gil_scoped_release release;
        pplfast::stats_update(ptr<const void>(logits), dtype, batch_stride, time_stride,
                              col_stride, rows, time, cols, v_offset,
                              ptr<const int64_t>(targets), ignore_index, softcap, temperature,
                              top_k, ptr<double>(state), nthreads);
      },
      "Fold columns [v_offset, v_offset + cols) of every row's logits into the statistics state.");
  m.def(
      "stats_finish",
      [](std::uintptr_t state, std::uintptr_t targets, int64_t ignore_index, int64_t rows,
         int64_t top_k, double temperature, std::uintptr_t nll, std::uintptr_t entropy,
         std::uintptr_t max_logprob, std::uintptr_t argmax, std::uintptr_t rank,
         std::uintptr_t top_ids, std::uintptr_t top_logprobs) {
        py::gil_scoped_release release;
        pplfast::stats_finish(ptr<const double>(state), ptr<const int64_t>(targets),
                              ignore_index, rows, top_k, temperature, ptr<float>(nll),
                              ptr<float>(entropy), ptr<float>(max_logprob),
                              ptr<int64_t>(argmax), ptr<int64_t>(rank), ptr<int64_t>(top_ids),
                              ptr<float>(top_logprobs));
      },
      "nll, entropy, max log p, argmax, rank and top-k (ids, log-probabilities) from the state.");

  // ---- comparison
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
                                ptr<float>(kl_reverse), ptr<float>(nll_base),
                                ptr<float>(nll_test), ptr<int64_t>(argmax_base),
                                ptr<int64_t>(argmax_test));
      },
      "KL both ways, both NLLs and both argmaxes from the compare state.");

  // ---- instruction set (std::invalid_argument becomes ValueError)
  m.def("cpu_isa", &pplfast::cpu_isa,
        "The row kernels' instruction set for the next call: the best this CPU runs, or the one "
        "PPLFAST_CPU_ISA names.");
  m.def(
      "isa_choice",
      [](const std::string& request, bool cpu_has_avx512, bool built_avx512) {
        return std::string(pplfast::isa_choice(request.c_str(), cpu_has_avx512, built_avx512));
      },
      "The dispatcher's decision for a PPLFAST_CPU_ISA value and a CPU's and build's "
      "capabilities.");
  m.def("cpu_has_avx512", &pplfast::cpu_has_avx512, "Whether this CPU runs AVX-512 F/BW/DQ/VL.");
  m.def("built_avx512", &pplfast::built_avx512, "Whether this build has AVX-512 kernels.");
  m.def(
      "exp2_clamped",
      [](std::uintptr_t t, std::uintptr_t out, int64_t n) {
        py::gil_scoped_release release;
        pplfast::exp2_clamped(ptr<const float>(t), ptr<float>(out), n);
      },
      "out[i] = 2^max(t[i], -87.3 log2 e) by the row kernels' exp (float32), for tests.");
}
