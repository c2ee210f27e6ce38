// OpenMP CPU rotary kernel reading precomputed cos/sin tables. The body lives in
// rope_cos_sin_cpu_impl.inc and is compiled twice (clones.inc): for the baseline target and
// with AVX2+FMA+F16C (explicit 8-wide bodies), picked at run time, as rope_cpu.cpp does.
#include <stdexcept>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/rope_cos_sin_math.h"
#include "rope_cos_sin_cpu.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "rope_cos_sin_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int num_threads,
                          int64_t chunk) {
  num_threads = omp_threads(num_threads);
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) {
    avx2::cos_sin_dispatch(p, dtype, table_dtype, num_threads, chunk);
    return;
  }
#endif
  generic::cos_sin_dispatch(p, dtype, table_dtype, num_threads, chunk);
}

}  // namespace cpu
}  // namespace posattn
