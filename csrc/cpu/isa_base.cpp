// The row kernels compiled for the build's baseline: AVX2 + FMA + F16C where the compiler targets
// them (the default x86-64-v3 build), one lane per step otherwise.
#include "isa.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PPLFAST_SIMD_AVX2 1
#endif

#define PPLFAST_ISA_NS base
#include "simd.h"

namespace pplfast {
namespace cpu {
namespace base {
#ifdef PPLFAST_SIMD_AVX2
using S = Avx2;
#else
using S = Scalar;
#endif
}  // namespace base
}  // namespace cpu
}  // namespace pplfast

#include "rows.h"

namespace pplfast {
namespace cpu {

const RowKernels& base_kernels() { return base::table(); }

}  // namespace cpu
}  // namespace pplfast
