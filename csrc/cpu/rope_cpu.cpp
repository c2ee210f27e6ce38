// OpenMP CPU rotary kernel. One task per (batch, token): the token's cos/sin
// table is computed once and reused for every head of q and k.
#include <algorithm>
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/rope_math.h"
#include "rope_cpu.h"

namespace posattn {
namespace cpu {

template <typename T>
static void rope_forward_typed(const RopeProblem& p, int num_threads, int64_t chunk) {
  const int half = p.rotary_dim / 2;
  const int64_t ntok = p.batch * p.seqlen;
  if (chunk <= 0) chunk = 16;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> cs(static_cast<size_t>(2 * half) + 1);
    float* cos_p = cs.data();
    float* sin_p = cs.data() + half;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t tok = 0; tok < ntok; ++tok) {
      const int64_t b = tok / p.seqlen, s = tok % p.seqlen;
      const double pos = double(rope_load_position(p, b, s));
      for (int i = 0; i < half; ++i) {
        float a = rope_angle(pos, p.inv_freq[i]);
        cos_p[i] = std::cos(a);
        sin_p[i] = std::sin(a);
      }
      rope_token_heads<T>(p, p.q, b, s, cos_p, sin_p);
      if (p.k.in != nullptr) rope_token_heads<T>(p, p.k, b, s, cos_p, sin_p);
    }
  }
}

void rope_forward(const RopeProblem& p, int dtype, int num_threads, int64_t chunk) {
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
  switch (dtype) {
    case kFloat32: rope_forward_typed<float>(p, num_threads, chunk); break;
    case kFloat16: rope_forward_typed<half_t>(p, num_threads, chunk); break;
    case kBFloat16: rope_forward_typed<bf16_t>(p, num_threads, chunk); break;
    case kFloat64: rope_forward_typed<double>(p, num_threads, chunk); break;
    default: throw std::invalid_argument("posattn._C.rope_forward: unsupported dtype code");
  }
}

}  // namespace cpu
}  // namespace posattn
