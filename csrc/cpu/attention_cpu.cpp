// Anchor attention on the CPU: blocked online softmax over the same block visit lists the
// Triton engine walks (query-major for the forward and dq, key-major for dk and dv).
//
//   s_ij = scale * q_i . k_j (rotated q, k when rotary); p_ij = exp(s_ij - lse_i)
//   forward: online softmax per query row over its listed key blocks
//   backward: ds_ij = p_ij (do_i . v_j - delta_i); dq_i = scale sum_j ds_ij k_j;
//             dk_j = scale sum_i ds_ij q_i; dv_j = sum_i p_ij do_i; dq, dk rotated back by -theta
// Blocks whose list flag is 0 are allowed everywhere and skip the mask test.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/attention_math.h"
#include "attention_cpu.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "attention_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

void attention_forward(const AttnProblem& p, float* out, float* lse, int num_threads) {
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return avx2::forward_impl(p, out, lse, num_threads);
#endif
  generic::forward_impl(p, out, lse, num_threads);
}

void attention_backward(const AttnProblem& p, const float* dout, const float* delta, const float* lse,
                        float* dq, float* dk, float* dv, int num_threads) {
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return avx2::backward_impl(p, dout, delta, lse, dq, dk, dv, num_threads);
#endif
  generic::backward_impl(p, dout, delta, lse, dq, dk, dv, num_threads);
}

}  // namespace cpu
}  // namespace posattn
