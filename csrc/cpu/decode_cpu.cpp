// Decode attention on the CPU (OpenMP): the decode engine's C++ backend. The kernel body is
// decode_cpu_impl.inc, compiled for the baseline target and for AVX2 (clones.inc).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/decode_math.h"
#include "decode_cpu.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "decode_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

void decode_forward(const DecodeProblem& p, int num_splits, int block_n, int num_threads) {
  const int nt = omp_threads(num_threads);
  if (p.T == 0) return;
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return avx2::decode_dispatch(p, num_splits, block_n, nt);
#endif
  generic::decode_dispatch(p, num_splits, block_n, nt);
}

}  // namespace cpu
}  // namespace posattn
