// pybind11 module pplfast._cuda_C: the CUDA kernels of token_nll.cu over plain pointers, sizes,
// strides and a stream handle. No CUDA or PyTorch headers: the torch side (allocation,
// data_ptr(), the current stream) lives in pplfast/_cuda.py.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "token_nll.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda_C, m) {
  m.doc() = "pplfast CUDA kernels (per-token NLL over logits rows), bound over raw pointers";

  m.def(
      "plan",
      [](int64_t rows, int64_t V, int sm_count, int threads, int splits) {
        const pplfast_cuda::Plan p = pplfast_cuda::make_plan(rows, V, sm_count, threads, splits);
        return py::make_tuple(p.threads, p.splits, p.segment, p.workspace_floats);
      },
      py::arg("rows"), py::arg("V"), py::arg("sm_count"), py::arg("threads") = 0,
      py::arg("splits") = 0,
      "Launch choice for (rows, V) on a GPU with sm_count SMs: (threads, splits, segment, "
      "workspace_floats). threads == 32 is a warp per row; splits > 1 cuts rows into segments "
      "merged by a second kernel. threads / splits > 0 override the heuristics.");

  m.def("token_nll", &pplfast_cuda::token_nll, py::arg("logits"), py::arg("dtype"), py::arg("B"),
        py::arg("T"), py::arg("V"), py::arg("sB"), py::arg("sT"), py::arg("sV"),
        py::arg("targets"), py::arg("ignore_index"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("has_softcap"), py::arg("softcap"),
        py::arg("temperature"), py::arg("device"), py::arg("sm_count"), py::arg("stream"),
        py::arg("threads") = 0, py::arg("splits") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Launch the per-token NLL kernels on `stream` (asynchronous). Pointers are device "
        "addresses; sizes and strides are in elements; dtype 0/1/2 = float32/float16/bfloat16.");

  m.def("runtime_version", &pplfast_cuda::runtime_version,
        "CUDA runtime version the module was built against (e.g. 13000).");
}
