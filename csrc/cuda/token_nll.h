// Host interface of the CUDA token-NLL kernels (csrc/cuda/token_nll.cu).
//
// Plain types only (pointers as uintptr_t, sizes and strides as int64 elements, the stream as
// a handle), so that the pybind11 binding compiles without CUDA or PyTorch headers.
#pragma once

#include <cstdint>

#include "plan.h"

namespace pplfast_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// nll[r] = logsumexp(z_r) - z_r[target_r] for every row r = b * T + t of the (B, T, V) logits
// with element strides (sB, sT, sV); z = softcap * tanh(x / softcap) (if has_softcap), then
// / temperature. Rows whose target equals ignore_index get 0 and are not read. targets is a
// contiguous int64 (B * T,) array; out a contiguous float32 (B * T,) array. workspace must hold
// make_plan(...).workspace_floats floats (plan.h). Asynchronous on `stream`; throws on bad arguments and
// on launch errors.
void token_nll(uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB,
               int64_t sT, int64_t sV, uintptr_t targets, int64_t ignore_index, uintptr_t out,
               uintptr_t workspace, int64_t workspace_floats, bool has_softcap, double softcap,
               double temperature, int device, int sm_count, uintptr_t stream, int threads,
               int splits);

// CUDA runtime version the module was built against (e.g. 13000).
int runtime_version();

}  // namespace pplfast_cuda
