// OpenMP CPU rotary kernel reading precomputed cos/sin tables. One task per
// (batch, token): the token's four table rows are converted to fp32 once into
// a small buffer and reused for every head of q and k.
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/rope_cos_sin_math.h"
#include "rope_cos_sin_cpu.h"

namespace posattn {
namespace cpu {

template <typename T>
static void cos_sin_heads(const CosSinProblem& p, const CosSinTensor& t, int64_t b, int64_t s,
                          const float* c1, const float* s1, const float* c2, const float* s2) {
  const int half = p.rotary_dim / 2;
  for (int64_t h = 0; h < t.heads; ++h) {
    const T* x = static_cast<const T*>(t.in) + b * t.in_sb + s * t.in_ss + h * t.in_sh;
    T* o = static_cast<T*>(t.out) + b * t.out_sb + s * t.out_ss + h * t.out_sh;
    if (p.interleaved) {
      for (int i = 0; i < half; ++i) cos_sin_rotate_pair<T>(x, o, 2 * i, 2 * i + 1, c1[i], s1[i], c2[i], s2[i]);
    } else {
      for (int i = 0; i < half; ++i) cos_sin_rotate_pair<T>(x, o, i, i + half, c1[i], s1[i], c2[i], s2[i]);
    }
    if (p.copy_tail)
      for (int64_t d = p.rotary_dim; d < p.head_dim; ++d) o[d] = x[d];
  }
}

template <typename T, typename U>
static void forward_typed(const CosSinProblem& p, int num_threads, int64_t chunk) {
  const int half = p.rotary_dim / 2;
  const int64_t ntok = p.batch * p.seqlen;
  if (chunk <= 0) chunk = 16;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> buf(static_cast<size_t>(4 * half) + 1);
    float* c1 = buf.data();
    float* s1 = c1 + half;
    float* c2 = s1 + half;
    float* s2 = c2 + half;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t tok = 0; tok < ntok; ++tok) {
      const int64_t b = tok / p.seqlen, s = tok % p.seqlen;
      const int64_t row = cos_sin_row(p, b, s);
      for (int i = 0; i < half; ++i) cos_sin_load<U>(p, b, row, i, c1[i], s1[i], c2[i], s2[i]);
      cos_sin_heads<T>(p, p.q, b, s, c1, s1, c2, s2);
      if (p.k.in != nullptr) cos_sin_heads<T>(p, p.k, b, s, c1, s1, c2, s2);
    }
  }
}

template <typename T>
static void dispatch_table(const CosSinProblem& p, int table_dtype, int nt, int64_t chunk) {
  switch (table_dtype) {
    case kFloat32: forward_typed<T, float>(p, nt, chunk); break;
    case kFloat16: forward_typed<T, half_t>(p, nt, chunk); break;
    case kBFloat16: forward_typed<T, bf16_t>(p, nt, chunk); break;
    case kFloat64: forward_typed<T, double>(p, nt, chunk); break;
    default: throw std::invalid_argument("posattn._C.rope_cos_sin_forward: unsupported table dtype code");
  }
}

void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int num_threads,
                          int64_t chunk) {
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#else
  num_threads = 1;
#endif
  switch (dtype) {
    case kFloat32: dispatch_table<float>(p, table_dtype, num_threads, chunk); break;
    case kFloat16: dispatch_table<half_t>(p, table_dtype, num_threads, chunk); break;
    case kBFloat16: dispatch_table<bf16_t>(p, table_dtype, num_threads, chunk); break;
    case kFloat64: dispatch_table<double>(p, table_dtype, num_threads, chunk); break;
    default: throw std::invalid_argument("posattn._C.rope_cos_sin_forward: unsupported dtype code");
  }
}

}  // namespace cpu
}  // namespace posattn
