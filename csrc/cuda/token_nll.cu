// Per-token NLL over rows of logits, one pass, fp32 online logsumexp (fp32/fp16/bf16 in, fp32 out).
//
// Each row is read once. A thread keeps a running max m of the (soft-capped) logits z and sums
// 2^((z/2 - m/2) * c), c = 2 log2(e) / temperature, rescaling its sums when m grows; the exponent
// is an FMA and a product (rounded separately: the halves are exact, z/2 - m/2 is exact near the
// max, and the maximum's own term is exactly 1), the power one ex2. Halving first keeps the
// difference finite where z - m would overflow (down to -2 FLT_MAX) while (z - m) / temperature
// does not (temperature > 1). The state stays in the units of z, so no m * c is ever formed:
// maxima up to FLT_MAX work at every temperature (an m * c state overflowed to +inf above about
// 2.4e38 * temperature). Per-thread sums go into 8 independent accumulators (one per
// vector lane), then pairwise into one, then a warp butterfly and a block tree merge the (m, sum)
// pairs, so no fp32 sum runs sequentially over more than a few dozen terms.
//   - a warp per row for small V (8 rows per block);
//   - a block per row for large V; when rows are too few to fill the GPU each row is cut into
//     segments, each block writes a partial (m, sum) pair and a merge kernel finishes the row.
// Contiguous rows (sV == 1) are read with 16-byte streaming loads after a scalar head that
// reaches 16-byte alignment (row starts need not be aligned); other strides use scalar loads.
// The target logit is loaded once, by one thread, through the same transform as the streamed
// values, so it never exceeds m; the NLL is (m - z_t) / temperature + log(sum) with sum >= 1, two
// non-negative terms (no cancellation of two large rounded terms), the first formed in double
// (m - z_t reaches 2 FLT_MAX), clamped at 0 against rounding.
// Offsets are 64-bit throughout. Which kernel runs with how many threads and segments is the
// launch plan's choice (plan.cpp); the constants they share are in constants.h.
//
// Special values follow torch.logsumexp in float64: -inf entries add nothing; an all -inf row
// has lse = -inf (so NLL = NaN); a +inf entry makes lse = +inf; a NaN entry makes that row NaN.
// fmaxf drops NaN, so NaN is carried by the sums instead: a NaN term poisons its accumulator and
// every merge keeps it (0 * NaN = NaN), while infinite maxima use exponent base 0 so that no
// inf - inf ever creates a NaN that the input did not contain.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "constants.h"
#include "plan.h"
#include "token_nll.h"

namespace pplfast_cuda {
namespace {

struct Params {
  const void* logits;
  int64_t T, V, sB, sT, sV;
  const int64_t* targets;
  int64_t ignore_index;
  float* out;
  float* workspace;  // (rows * splits, 2) partial (m, sum) pairs
  int64_t rows;
  int64_t segment;
  int splits;
  float c;  // 2 log2(e) / temperature: the scale of halved exponents
  double inv_temperature;
  float softcap;
  float inv_softcap;
};

// ---- element access -------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 16 bytes -> 16 / sizeof(T) floats.
__device__ __forceinline__ void unpack(const uint4& v, float (&z)[4]) {
  z[0] = __uint_as_float(v.x);
  z[1] = __uint_as_float(v.y);
  z[2] = __uint_as_float(v.z);
  z[3] = __uint_as_float(v.w);
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&z)[8]);

template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& v, float (&z)[8]) {
  // bf16 is the top half of an fp32: widening is a shift or a mask, exactly.
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    z[2 * k] = __uint_as_float(w[k] << 16);
    z[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void unpack<__half>(const uint4& v, float (&z)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __half2 h;
    memcpy(&h, &w[k], sizeof(h));
    const float2 f = __half22float2(h);
    z[2 * k] = f.x;
    z[2 * k + 1] = f.y;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack_vec(const uint4& v, float (&z)[VEC]) {
  if constexpr (VEC == 4) {
    unpack(v, z);
  } else {
    unpack<T>(v, z);
  }
}

template <bool SOFTCAP>
__device__ __forceinline__ float transform(float x, const Params& p) {
  // tanhf (not the tanh.approx instruction) keeps the 2e-6 relative budget.
  if constexpr (SOFTCAP) return p.softcap * tanhf(x * p.inv_softcap);
  return x;
}

template <typename T>
__device__ __forceinline__ const T* row_pointer(const Params& p, int64_t row) {
  const int64_t b = row / p.T;
  const int64_t t = row - b * p.T;
  return static_cast<const T*>(p.logits) + (b * p.sB + t * p.sT);
}

// z[target], through the same transform as the streamed elements (so z_t <= m exactly); the
// temperature is applied in finish_nll.
template <typename T, bool SOFTCAP>
__device__ __forceinline__ float target_logit(const T* row, int64_t target, const Params& p) {
  return transform<SOFTCAP>(to_float(row[target * p.sV]), p);
}

// ---- online logsumexp state -----------------------------------------------------------------
//
// Sums are kept relative to `base`: sum_true = s * 2^(base * c / 2), with base = m where m is
// finite and 0 otherwise (m = -inf before any finite element, m = +inf once an +inf is seen).

struct Online {
  float m;              // running max of z
  float neg_half_base;  // -base / 2, base the exponent base of the sums
  float s[kAcc];
};

__device__ __forceinline__ void init(Online& st) {
  st.m = -INFINITY;
  st.neg_half_base = 0.f;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) st.s[i] = 0.f;
}

// Factor that re-expresses sums kept against max `from` against max `to` (from <= to). Where a
// max is infinite the sums carry only NaN-ness (they are 0 or NaN, or the lse is decided by the
// +inf), so 0 is used: NaN survives, and no inf - inf is ever formed.
// from/2 - to/2 never overflows; its product with c may round to -inf (maxima of opposite signs
// near FLT_MAX at a low temperature): the factor is then 0, as it should be.
__device__ __forceinline__ float rescale(float from, float to, float c) {
  if (from == to) return 1.f;
  if (from == -INFINITY || to == INFINITY) return 0.f;
  return exp2f(__fmul_rn(__fmaf_rn(from, 0.5f, -0.5f * to), c));
}

template <int N>
__device__ __forceinline__ void absorb(Online& st, const float (&z)[N], int slot, float c) {
  float vmax = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, z[k]);
  if (vmax > st.m) {  // false for NaN: NaN never becomes the max
    const float f = rescale(st.m, vmax, c);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) st.s[i] *= f;
    st.m = vmax;
    st.neg_half_base = isfinite(vmax) ? -0.5f * vmax : 0.f;
  }
  // z/2 - base/2 is rounded once, before the product (the _rn intrinsics are never contracted
  // further): the maximum's term is exactly 2^0 = 1.
#pragma unroll
  for (int k = 0; k < N; ++k) {
    st.s[(slot + k) % kAcc] += exp2f(__fmul_rn(__fmaf_rn(z[k], 0.5f, st.neg_half_base), c));
  }
}

__device__ __forceinline__ float collapse(const Online& st) {
  float s[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) s[i] = st.s[i];
#pragma unroll
  for (int width = kAcc / 2; width > 0; width /= 2) {
#pragma unroll
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  }
  return s[0];
}

// (m, s) <- (m, s) (+) (m2, s2). Commutative bit for bit (no FMA contraction of the two
// products), so butterfly lanes agree.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2, float c) {
  const float top = fmaxf(m, m2);
  s = __fadd_rn(__fmul_rn(s, rescale(m, top, c)), __fmul_rn(s2, rescale(m2, top, c)));
  m = top;
}

__device__ __forceinline__ void warp_merge(float& m, float& s, float c) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge(m, s, m2, s2, c);
  }
}

// Result valid in thread 0. Every thread of the block must call it.
__device__ __forceinline__ void block_merge(float& m, float& s, float c) {
  __shared__ float shared_m[kMaxThreads / kWarp];
  __shared__ float shared_s[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  warp_merge(m, s, c);
  if (warps == 1) return;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < warps ? shared_m[lane] : -INFINITY;
    s = lane < warps ? shared_s[lane] : 0.f;
    warp_merge(m, s, c);
  }
}

// NLL = lse - z_t / temperature = (m - z_t) / temperature + log(s), from the row's merged (m, s)
// and its transformed target z_t <= m; s >= 1 (the maximum's term is exactly 1). Special values
// as the reference's lse - target: NaN seen (s is NaN) -> NaN; m = +inf -> +inf, or NaN when z_t
// is +inf too; an all -inf row -> -inf - -inf = NaN; z_t = -inf in a finite row -> +inf. The
// clamp keeps NaN (NaN < 0 is false).
__device__ __forceinline__ float finish_nll(float m, float s, float z_t, const Params& p) {
  if (isnan(s)) return s;
  const float nll =
      isinf(m) ? m - z_t
               : static_cast<float>((static_cast<double>(m) - static_cast<double>(z_t)) *
                                        p.inv_temperature +
                                    static_cast<double>(log2f(s) * kLn2));
  return nll < 0.f ? 0.f : nll;
}

// ---- streaming over a row segment [begin, end) ------------------------------------------------

template <typename T, bool SOFTCAP, bool CONTIG>
__device__ __forceinline__ void segment_stats(Online& st, const T* row, int64_t begin, int64_t end,
                                              int lane, int lanes, const Params& p) {
  constexpr int VEC = 16 / sizeof(T);
  const float c = p.c;
  if constexpr (CONTIG) {
    const T* seg = row + begin;
    const int64_t n = end - begin;
    // Scalar head up to the first 16-byte boundary (fewer than VEC elements).
    int64_t head = static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(seg) & 15u)) & 15u) /
                                        sizeof(T));
    if (head > n) head = n;
    if (lane < head) {
      const float z[1] = {transform<SOFTCAP>(to_float(seg[lane]), p)};
      absorb(st, z, 0, c);
    }
    const uint4* vec = reinterpret_cast<const uint4*>(seg + head);
    const int64_t nvec = (n - head) / VEC;
    int64_t i = lane;
    for (; i + static_cast<int64_t>(kUnroll - 1) * lanes < nvec;
         i += static_cast<int64_t>(kUnroll) * lanes) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(vec + i + static_cast<int64_t>(u) * lanes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float z[VEC];
        unpack_vec<T, VEC>(v[u], z);
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[k] = transform<SOFTCAP>(z[k], p);
        absorb(st, z, (u * VEC) % kAcc, c);
      }
    }
    for (; i < nvec; i += lanes) {
      float z[VEC];
      unpack_vec<T, VEC>(__ldcs(vec + i), z);
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = transform<SOFTCAP>(z[k], p);
      absorb(st, z, 0, c);
    }
    const int64_t tail = head + nvec * VEC + lane;  // fewer than VEC elements remain
    if (tail < n) {
      const float z[1] = {transform<SOFTCAP>(to_float(seg[tail]), p)};
      absorb(st, z, 0, c);
    }
  } else {
    // Any element stride: each thread takes VEC consecutive elements per step, padding with
    // -inf (which adds nothing) past the end.
    const int64_t sV = p.sV;
    for (int64_t j = begin + static_cast<int64_t>(lane) * VEC; j < end;
         j += static_cast<int64_t>(lanes) * VEC) {
      float z[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[k] = j + k < end ? transform<SOFTCAP>(to_float(row[(j + k) * sV]), p) : -INFINITY;
      }
      absorb(st, z, 0, c);
    }
  }
}

// ---- kernels --------------------------------------------------------------------------------

// A warp per row, kWarpRowsPerBlock rows per block.
template <typename T, bool SOFTCAP, bool CONTIG>
__global__ void __launch_bounds__(kWarpRowsPerBlock * kWarp) warp_row_kernel(const Params p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
  if (row >= p.rows) return;  // whole warps leave; no block-wide sync below
  const int64_t target = p.targets[row];
  if (target == p.ignore_index) {
    if (lane == 0) p.out[row] = 0.f;
    return;
  }
  const T* x = row_pointer<T>(p, row);
  float target_z = 0.f;
  if (lane == 0) target_z = target_logit<T, SOFTCAP>(x, target, p);
  Online st;
  init(st);
  segment_stats<T, SOFTCAP, CONTIG>(st, x, 0, p.V, lane, kWarp, p);
  float m = st.m;
  float s = collapse(st);
  warp_merge(m, s, p.c);
  if (lane == 0) p.out[row] = finish_nll(m, s, target_z, p);
}

// A block per row segment: block b covers segment b % splits of row b / splits.
template <typename T, bool SOFTCAP, bool CONTIG>
__global__ void __launch_bounds__(kMaxThreads, 2) block_row_kernel(const Params p) {
  const int64_t block = blockIdx.x;
  const int64_t row = block / p.splits;
  const int64_t split = block - row * p.splits;
  const int64_t target = p.targets[row];  // same for the whole block: the exit is uniform
  if (target == p.ignore_index) {
    if (p.splits == 1 && threadIdx.x == 0) p.out[row] = 0.f;  // else the merge kernel writes it
    return;
  }
  const T* x = row_pointer<T>(p, row);
  float target_z = 0.f;
  if (p.splits == 1 && threadIdx.x == 0) target_z = target_logit<T, SOFTCAP>(x, target, p);
  const int64_t begin = split * p.segment;
  const int64_t end = begin + p.segment < p.V ? begin + p.segment : p.V;
  Online st;
  init(st);
  segment_stats<T, SOFTCAP, CONTIG>(st, x, begin, end, threadIdx.x, blockDim.x, p);
  float m = st.m;
  float s = collapse(st);
  block_merge(m, s, p.c);
  if (threadIdx.x == 0) {
    if (p.splits == 1) {
      p.out[row] = finish_nll(m, s, target_z, p);
    } else {
      p.workspace[2 * block] = m;
      p.workspace[2 * block + 1] = s;
    }
  }
}

// A warp per row merges the row's `splits` partial pairs (strided over lanes, then a butterfly).
template <typename T, bool SOFTCAP>
__global__ void __launch_bounds__(kWarpRowsPerBlock * kWarp) merge_splits_kernel(const Params p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
  if (row >= p.rows) return;
  const int64_t target = p.targets[row];
  if (target == p.ignore_index) {
    if (lane == 0) p.out[row] = 0.f;
    return;
  }
  float m = -INFINITY;
  float s = 0.f;
  const float* partial = p.workspace + 2 * row * p.splits;
  for (int k = lane; k < p.splits; k += kWarp) {
    merge(m, s, partial[2 * k], partial[2 * k + 1], p.c);
  }
  warp_merge(m, s, p.c);
  if (lane == 0) {
    const float target_z = target_logit<T, SOFTCAP>(row_pointer<T>(p, row), target, p);
    p.out[row] = finish_nll(m, s, target_z, p);
  }
}

// ---- host -----------------------------------------------------------------------------------

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("pplfast CUDA ") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

// Makes `device` current for the guard's lifetime and restores the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    else previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // best effort: destructors must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

template <typename T, bool SOFTCAP, bool CONTIG>
void launch(const Plan& plan, const Params& p, cudaStream_t stream) {
  if (plan.threads == kWarp) {
    const int64_t blocks = ceil_div(p.rows, kWarpRowsPerBlock);
    warp_row_kernel<T, SOFTCAP, CONTIG>
        <<<static_cast<unsigned>(blocks), kWarpRowsPerBlock * kWarp, 0, stream>>>(p);
    return;
  }
  const int64_t blocks = p.rows * plan.splits;
  block_row_kernel<T, SOFTCAP, CONTIG>
      <<<static_cast<unsigned>(blocks), static_cast<unsigned>(plan.threads), 0, stream>>>(p);
  if (plan.splits > 1) {
    check(cudaGetLastError(), "launch of the row-segment kernel");
    const int64_t merge_blocks = ceil_div(p.rows, kWarpRowsPerBlock);
    merge_splits_kernel<T, SOFTCAP>
        <<<static_cast<unsigned>(merge_blocks), kWarpRowsPerBlock * kWarp, 0, stream>>>(p);
  }
}

template <typename T>
void launch_typed(const Plan& plan, const Params& p, bool softcap, bool contig,
                  cudaStream_t stream) {
  if (softcap) {
    if (contig) launch<T, true, true>(plan, p, stream);
    else launch<T, true, false>(plan, p, stream);
  } else {
    if (contig) launch<T, false, true>(plan, p, stream);
    else launch<T, false, false>(plan, p, stream);
  }
}

}  // namespace

void token_nll(uintptr_t logits, int dtype, int64_t B, int64_t T, int64_t V, int64_t sB,
               int64_t sT, int64_t sV, uintptr_t targets, int64_t ignore_index, uintptr_t out,
               uintptr_t workspace, int64_t workspace_floats, bool has_softcap, double softcap,
               double temperature, int device, int sm_count, uintptr_t stream, int threads,
               int splits) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(dtype));
  }
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("need B >= 0, T >= 0 and V >= 1");
  if (!(temperature > 0.0) || !std::isfinite(temperature)) {
    throw std::invalid_argument("temperature must be finite and > 0");
  }
  if (has_softcap && (!(softcap > 0.0) || !std::isfinite(softcap))) {
    throw std::invalid_argument("softcap must be finite and > 0");
  }
  const int64_t rows = B * T;
  if (rows == 0) return;
  const size_t elem = dtype == kFloat32 ? 4 : 2;
  if (logits % elem != 0) throw std::invalid_argument("logits pointer is not element-aligned");
  const Plan plan = make_plan(rows, V, sm_count, threads, splits);
  if (plan.splits > 1 && (workspace == 0 || workspace_floats < plan.workspace_floats)) {
    throw std::invalid_argument("workspace too small: need " +
                                std::to_string(plan.workspace_floats) + " floats, got " +
                                std::to_string(workspace_floats));
  }
  const int64_t grid = plan.threads == kWarp ? ceil_div(rows, kWarpRowsPerBlock) : rows * plan.splits;
  if (grid > 0x7fffffffLL) throw std::invalid_argument("too many rows for one launch");

  Params p{};
  p.logits = reinterpret_cast<const void*>(logits);
  p.T = T;
  p.V = V;
  p.sB = sB;
  p.sT = sT;
  p.sV = sV;
  p.targets = reinterpret_cast<const int64_t*>(targets);
  p.ignore_index = ignore_index;
  p.out = reinterpret_cast<float*>(out);
  p.workspace = reinterpret_cast<float*>(workspace);
  p.rows = rows;
  p.segment = plan.segment;
  p.splits = plan.splits;
  p.inv_temperature = 1.0 / temperature;
  p.c = static_cast<float>(2.0 * kLog2e / temperature);  // 2 log2(e) / temperature
  p.softcap = has_softcap ? static_cast<float>(softcap) : 1.f;
  p.inv_softcap = has_softcap ? static_cast<float>(1.0 / softcap) : 1.f;

  // This module links its own (static) CUDA runtime. Both runtimes use the device's primary
  // context, so PyTorch's stream handle is valid here; but the current context is per thread and
  // shared, so a device switch made here would silently move PyTorch's current device too: switch
  // only when needed and switch back when done (also when a launch throws).
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool contig = sV == 1;
  switch (dtype) {
    case kFloat32: launch_typed<float>(plan, p, has_softcap, contig, s); break;
    case kFloat16: launch_typed<__half>(plan, p, has_softcap, contig, s); break;
    default: launch_typed<__nv_bfloat16>(plan, p, has_softcap, contig, s); break;
  }
  check(cudaGetLastError(), "kernel launch");
}

int runtime_version() {
  return CUDART_VERSION;
}

}  // namespace pplfast_cuda
