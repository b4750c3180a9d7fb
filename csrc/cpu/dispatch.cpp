// The instruction-set dispatcher: which table of row kernels (isa.h) a call runs.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "isa.h"

namespace pplfast {

bool built_avx512() {
#ifdef PPLFAST_BUILD_AVX512
  return true;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef PPLFAST_BUILD_AVX512
  // libgcc's checks include the operating system's support for the AVX-512 register state
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

const char* isa_choice(const char* request, bool cpu_avx512, bool build_avx512) {
  const char* baseline = cpu::base_kernels().name;
  const std::string want = request == nullptr ? "" : request;
  if (want.empty() || want == "auto") return cpu_avx512 && build_avx512 ? "avx512" : baseline;
  if (want == baseline) return baseline;
  if (want == "avx512") {
    if (!build_avx512)
      throw std::invalid_argument("PPLFAST_CPU_ISA=avx512: this build has no AVX-512 kernels "
                                  "(x86-64 with GCC or Clang only)");
    if (!cpu_avx512)
      throw std::invalid_argument("PPLFAST_CPU_ISA=avx512: this CPU lacks AVX-512 F/BW/DQ/VL");
    return "avx512";
  }
  throw std::invalid_argument("PPLFAST_CPU_ISA=" + want + ": choose auto, " + baseline +
                              (build_avx512 ? " or avx512" : ""));
}

const char* cpu_isa() {
  return isa_choice(std::getenv("PPLFAST_CPU_ISA"), cpu_has_avx512(), built_avx512());
}

namespace cpu {

const RowKernels& kernels() {
  const char* name = cpu_isa();
#ifdef PPLFAST_BUILD_AVX512
  if (std::strcmp(name, "avx512") == 0) return avx512_kernels();
#endif
  return base_kernels();
}

}  // namespace cpu

void exp2_clamped(const float* t, float* out, int64_t n) { cpu::kernels().exp2_clamped(t, out, n); }

}  // namespace pplfast
