// The per-call cos/sin table [2, T, R/2] (see rope_table.h).
// As in rope_cpu.cpp (same compiler options, so the same arithmetic): no trapping math lets
// GCC vectorise floor() and the branch-free selects of the angle/sincos loops.
#pragma GCC optimize("no-trapping-math")

#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/rope_math.h"
#include "rope_table.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "rope_table_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

void rope_table(const void* positions, int pos_dtype, int64_t T, const float* inv_freq, int half,
                double attention_scaling, float* out, int num_threads) {
  const int nt = omp_threads(num_threads);
  // the rotary kernels hold attention_scaling as fp32 (RopeFreqs): the same factor here
  attention_scaling = double(float(attention_scaling));
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return avx2::table_impl(positions, pos_dtype, T, inv_freq, half, attention_scaling, out, nt);
#endif
  generic::table_impl(positions, pos_dtype, T, inv_freq, half, attention_scaling, out, nt);
}

}  // namespace cpu
}  // namespace posattn
