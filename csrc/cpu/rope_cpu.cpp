// OpenMP CPU rotary kernel (forward, inverse, explicit angles). The body lives
// in rope_cpu_impl.inc and is compiled twice: for the baseline x86-64-v2 target
// and with AVX2+FMA+F16C, picked at run time, so one wheel runs everywhere and
// is vectorised 8-wide where the CPU allows.
// The kernels never look at floating-point exception flags. Without this, GCC
// neither vectorises floor() nor if-converts the branch-free selects of the
// angle/sincos loops (evaluating both arms "might trap"); results are unchanged.
// (before every include, so that the header functions inline into the kernels)
#pragma GCC optimize("no-trapping-math")

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/rope_math.h"
#include "rope_cpu.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "rope_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

const char* rope_forward(const RopeProblem& p, int dtype, int num_threads, int64_t block_tokens) {
  if (block_tokens <= 0) block_tokens = 64;
  num_threads = omp_threads(num_threads);
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) {
    avx2::rope_dispatch(p, dtype, num_threads, block_tokens);
    return "avx2";
  }
#endif
  generic::rope_dispatch(p, dtype, num_threads, block_tokens);
  return "generic";
}

int64_t advise_hugepages(int64_t ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t huge = int64_t(1) << 21;
  const int64_t a = (ptr + huge - 1) & ~(huge - 1);
  const int64_t e = (ptr + nbytes) & ~(huge - 1);
  if (e <= a) return 0;
  return madvise(reinterpret_cast<void*>(a), size_t(e - a), MADV_HUGEPAGE) == 0 ? e - a : 0;
#else
  (void)ptr; (void)nbytes;
  return 0;
#endif
}

}  // namespace cpu
}  // namespace posattn
