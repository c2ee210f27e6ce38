// OpenMP CPU rotary kernel (forward, inverse, explicit angles). The body lives
// in rope_cpu_impl.inc and is compiled twice: for the baseline x86-64-v2 target
// and with AVX2+FMA+F16C, picked at run time, so one wheel runs everywhere and
// is vectorised 8-wide where the CPU allows.
#include <cstring>
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/rope_math.h"
#include "rope_cpu.h"

namespace posattn {
namespace cpu {

namespace generic {
#include "rope_cpu_impl.inc"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define POSATTN_HAVE_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "rope_cpu_impl.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

const char* rope_forward(const RopeProblem& p, int dtype, int num_threads) {
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    avx2::rope_dispatch(p, dtype, num_threads);
    return "avx2";
  }
#endif
  generic::rope_dispatch(p, dtype, num_threads);
  return "generic";
}

}  // namespace cpu
}  // namespace posattn
