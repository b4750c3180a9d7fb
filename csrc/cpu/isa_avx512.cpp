// The row kernels compiled for AVX-512 (F, BW, DQ, VL), on x86-64 only. The build's flags stay
// the baseline's (x86-64-v3): only the functions defined between the target pragmas below use
// AVX-512, every header of other code is included before them, and the kernels live in their
// own namespace (simd.h explains why), so nothing outside avx512_kernels() ever runs an AVX-512
// instruction; the dispatcher (dispatch.cpp) calls it only on a CPU that has them.
#include "isa.h"

#ifdef PPLFAST_BUILD_AVX512
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
// GCC 12 warns inside its own avx512fintrin.h (the undefined first operand of some intrinsics)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define PPLFAST_SIMD_AVX512 1
#define PPLFAST_ISA_NS avx512
#include "simd.h"

namespace pplfast {
namespace cpu {
namespace avx512 {
using S = Avx512;
}  // namespace avx512
}  // namespace cpu
}  // namespace pplfast

#include "rows.h"

namespace pplfast {
namespace cpu {

const RowKernels& avx512_kernels() { return avx512::table(); }

}  // namespace cpu
}  // namespace pplfast

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
