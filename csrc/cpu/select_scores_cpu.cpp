// Token scores and Quest page scores on the CPU (OpenMP). The token-scores body is
// select_scores_cpu_impl.inc, compiled for the baseline target and for AVX2 (clones.inc).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/common.h"
#include "select_cpu.h"

namespace posattn { namespace cpu {

#define POSATTN_CLONE_BODY "select_scores_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

void scores_forward(const ScoresProblem& p, int64_t block_s, int num_threads) {
  if (p.B == 0 || p.MB * p.PS == 0 || p.HQ == 0) return;
  block_s = std::max<int64_t>(1, block_s);
  const int nt = omp_threads(num_threads);
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) return avx2::scores_run(p, block_s, nt);
#endif
  generic::scores_run(p, block_s, nt);
}

namespace {

inline float widen1(const float* s, int64_t i) { return s[i]; }
inline float widen1(const half_t* s, int64_t i) { return to_float(s[i]); }
inline float widen1(const bf16_t* s, int64_t i) { return to_float(s[i]); }

// sum_d max(q_d * mn_d, q_d * mx_d) for G query rows (stride s_qh), fp32; AVX2 body at run time
void group_bounds_generic(const float* q, int64_t G, int64_t s_qh, const float* mn, const float* mx, int64_t D,
                          float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = q + g * s_qh;
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += std::max(qh[d] * mn[d], qh[d] * mx[d]);
    out[g] = acc;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void group_bounds_avx2(const float* q, int64_t G, int64_t s_qh, const float* mn,
                                                             const float* mx, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = q + g * s_qh;
    __m256 a = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qh + d);
      a = _mm256_add_ps(a, _mm256_max_ps(_mm256_mul_ps(qv, _mm256_loadu_ps(mn + d)),
                                         _mm256_mul_ps(qv, _mm256_loadu_ps(mx + d))));
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    float acc = _mm_cvtss_f32(s);
    for (; d < D; ++d) acc += std::max(qh[d] * mn[d], qh[d] * mx[d]);
    out[g] = acc;
  }
}
#endif

void group_bounds(const float* q, int64_t G, int64_t s_qh, const float* mn, const float* mx, int64_t D, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return group_bounds_avx2(q, G, s_qh, mn, mx, D, out);
#endif
  group_bounds_generic(q, G, s_qh, mn, mx, D, out);
}

// one (request, page block): every KV head of each page (adjacent rows of the summary)
template <typename T>
void page_scores_task(const float* q, const T* kmin, const T* kmax, const int32_t* page_ids, int64_t L, float* out,
                      int64_t b, int64_t p0, int64_t p1, int64_t HQ, int64_t HK, int64_t D, int64_t MP, int64_t PS,
                      std::vector<float>& buf) {
  const int64_t G = HQ / HK;
  const float ninf = -std::numeric_limits<float>::infinity();
  float* mn = buf.data();
  float* mx = mn + D;
  float vals[256];
  for (int64_t p = p0; p < p1; ++p) {
    const bool valid = p * PS < L;
    for (int64_t hk = 0; hk < HK; ++hk) {
      if (!valid) {
        for (int64_t g = 0; g < G; ++g) out[(b * HQ + hk * G + g) * MP + p] = ninf;
        continue;
      }
      const int64_t page = page_ids[b * MP + p];
      const T* a = kmin + (page * HK + hk) * D;
      const T* c = kmax + (page * HK + hk) * D;
      for (int64_t d = 0; d < D; ++d) { mn[d] = widen1(a, d); mx[d] = widen1(c, d); }
      for (int64_t g0 = 0; g0 < G; g0 += 256) {
        const int64_t ng = std::min<int64_t>(256, G - g0);
        group_bounds(q + (b * HQ + hk * G + g0) * D, ng, D, mn, mx, D, vals);
        for (int64_t g = 0; g < ng; ++g) out[(b * HQ + hk * G + g0 + g) * MP + p] = vals[g];
      }
    }
  }
}

}  // namespace

void page_scores_forward(const float* q, const void* kmin, const void* kmax, int dtype, const int32_t* page_ids,
                         const int32_t* cache_seqlens, float* out, int64_t B, int64_t HQ, int64_t HK, int64_t D,
                         int64_t MP, int64_t page_size, int num_threads) {
  const int64_t blk = 64, nblk = (MP + blk - 1) / blk;
#pragma omp parallel num_threads(omp_threads(num_threads))
  {
    std::vector<float> buf(static_cast<size_t>(2 * D));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < B * nblk; ++t) {
      const int64_t b = t / nblk, p0 = (t % nblk) * blk, p1 = std::min(MP, p0 + blk), L = cache_seqlens[b];
      if (dtype == 1)
        page_scores_task(q, static_cast<const half_t*>(kmin), static_cast<const half_t*>(kmax), page_ids, L, out, b,
                         p0, p1, HQ, HK, D, MP, page_size, buf);
      else if (dtype == 2)
        page_scores_task(q, static_cast<const bf16_t*>(kmin), static_cast<const bf16_t*>(kmax), page_ids, L, out, b,
                         p0, p1, HQ, HK, D, MP, page_size, buf);
      else
        page_scores_task(q, static_cast<const float*>(kmin), static_cast<const float*>(kmax), page_ids, L, out, b,
                         p0, p1, HQ, HK, D, MP, page_size, buf);
    }
  }
}

}  // namespace cpu
}  // namespace posattn
