// Token scores q . k over a (paged) KV cache on the CPU (OpenMP over request x KV head x slot
// block): each key row is read through the block table and widened to fp32 once, rotated by the
// per-call fp32 table when the cache holds pre-RoPE keys, and dotted with the GQA group's queries.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/common.h"
#include "select_cpu.h"

namespace posattn { namespace cpu {

namespace {

// q rows (G of them, stride s_qh) . kv [D], fp32. The AVX2/FMA body is picked at run time where
// the CPU has it (the module is built for the x86-64-v2 baseline).
void group_dots_generic(const float* q, int64_t G, int64_t s_qh, const float* kv, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = q + g * s_qh;
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += qh[d] * kv[d];
    out[g] = acc;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void group_dots_avx2(const float* q, int64_t G, int64_t s_qh, const float* kv,
                                                           int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = q + g * s_qh;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kv + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8), _mm256_loadu_ps(kv + d + 8), a1);
    }
    for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(kv + d), a0);
    a0 = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    float acc = _mm_cvtss_f32(s);
    for (; d < D; ++d) acc += qh[d] * kv[d];
    out[g] = acc;
  }
}
#endif

void group_dots(const float* q, int64_t G, int64_t s_qh, const float* kv, int64_t D, float* out) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return group_dots_avx2(q, G, s_qh, kv, D, out);
#endif
  group_dots_generic(q, G, s_qh, kv, D, out);
}

inline float widen1(const float* s, int64_t i) { return s[i]; }
inline float widen1(const half_t* s, int64_t i) { return to_float(s[i]); }
inline float widen1(const bf16_t* s, int64_t i) { return to_float(s[i]); }

template <typename T>
void scores_block(const ScoresProblem& p, int64_t b, int64_t s0, int64_t s1, std::vector<float>& k,
                  std::vector<float>& kr) {
  const int64_t D = p.D, G = p.HQ / p.HK, R = p.R, H2 = R / 2, S = p.MB * p.PS;
  const int64_t L = std::clamp<int64_t>(p.cache_seqlens[b], 0, S);
  const float ninf = -std::numeric_limits<float>::infinity();
  const T* kc = static_cast<const T*>(p.k_cache);
  // slot-major, heads inner: a slot's Hk rows are adjacent in the page, so the cache is read in order
  for (int64_t s = s0; s < s1; ++s)
  for (int64_t hk = 0; hk < p.HK; ++hk) {
    if (s >= L) {
      for (int64_t g = 0; g < G; ++g) p.out[b * p.s_ob + (hk * G + g) * p.s_oh + s] = ninf;
      continue;
    }
    const T* row = kc + int64_t(p.block_table[b * p.s_bt + s / p.PS]) * p.s_kb + (s % p.PS) * p.s_kt + hk * p.s_kh;
    for (int64_t d = 0; d < D; ++d) k[d] = widen1(row, d);
    const float* kv = k.data();
    if (p.ktab) {
      const float* c = p.ktab + b * p.s_tb + s * p.s_tt;
      const float* sn = c + p.s_tc;
      for (int64_t d = 0; d < D; ++d) {
        if (d >= R) { kr[d] = k[d]; continue; }
        int64_t pi, partner; float sign;
        if (p.interleaved) { pi = d / 2; partner = d ^ 1; sign = (d % 2 == 0) ? -1.f : 1.f; }
        else if (d < H2) { pi = d; partner = d + H2; sign = -1.f; }
        else { pi = d - H2; partner = d - H2; sign = 1.f; }
        kr[d] = k[d] * c[pi] + sign * k[partner] * sn[pi];
      }
      kv = kr.data();
    }
    float dots[256];   // G <= HQ; chunks of 256 heads
    for (int64_t g0 = 0; g0 < G; g0 += 256) {
      const int64_t ng = std::min<int64_t>(256, G - g0);
      group_dots(p.q + b * p.s_qb + (hk * G + g0) * p.s_qh, ng, p.s_qh, kv, D, dots);
      for (int64_t g = 0; g < ng; ++g) p.out[b * p.s_ob + (hk * G + g0 + g) * p.s_oh + s] = dots[g] * p.scale;
    }
  }
}

int thread_count(int n) {
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

}  // namespace

void scores_forward(const ScoresProblem& p, int64_t block_s, int num_threads) {
  const int64_t S = p.MB * p.PS;
  if (p.B == 0 || S == 0 || p.HQ == 0) return;
  block_s = std::max<int64_t>(1, block_s);
  const int64_t nblk = (S + block_s - 1) / block_s, tasks = p.B * nblk;
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    std::vector<float> k(static_cast<size_t>(p.D)), kr(static_cast<size_t>(p.D));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / nblk, s0 = (t % nblk) * block_s;
      const int64_t s1 = std::min(S, s0 + block_s);
      if (p.dtype == 1) scores_block<half_t>(p, b, s0, s1, k, kr);
      else if (p.dtype == 2) scores_block<bf16_t>(p, b, s0, s1, k, kr);
      else scores_block<float>(p, b, s0, s1, k, kr);
    }
  }
}

namespace {

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
#pragma omp parallel num_threads(thread_count(num_threads))
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
