// Host interface of the CUDA token-NLL kernels (csrc/cuda/token_nll.cu).
//
// Plain types only (pointers as uintptr_t, sizes and strides as int64 elements, the stream as
// a handle), so that the pybind11 binding compiles without CUDA or PyTorch headers.
#pragma once

#include <cstdint>

namespace pplfast_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How a (rows, V) problem is laid out on the GPU.
struct Plan {
  int threads;               // threads per row segment: 32 = a warp per row, else a block per segment
  int splits;                // segments per row; > 1 means partial (max, sum) pairs plus a merge kernel
  int64_t segment;           // elements per segment (the last one may be shorter)
  int64_t workspace_floats;  // float32 workspace the launch needs (0 when splits == 1)
};

// Pure function of its arguments (no CUDA calls), so the launch choice is testable anywhere.
// threads / splits > 0 override the heuristics (for tests and tuning).
Plan make_plan(int64_t rows, int64_t V, int sm_count, int threads, int splits);

// nll[r] = logsumexp(z_r) - z_r[target_r] for every row r = b * T + t of the (B, T, V) logits
// with element strides (sB, sT, sV); z = softcap * tanh(x / softcap) (if has_softcap), then
// / temperature. Rows whose target equals ignore_index get 0 and are not read. targets is a
// contiguous int64 (B * T,) array; out a contiguous float32 (B * T,) array. workspace must hold
// make_plan(...).workspace_floats floats. Asynchronous on `stream`; throws on bad arguments and
// on launch errors.
void token_nll(uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB,
               int64_t sT, int64_t sV, uintptr_t targets, int64_t ignore_index, uintptr_t out,
               uintptr_t workspace, int64_t workspace_floats, bool has_softcap, double softcap,
               double temperature, int device, int sm_count, uintptr_t stream, int threads,
               int splits);

// CUDA runtime version the module was built against (e.g. 13000).
int runtime_version();

}  // namespace pplfast_cuda
