// Token scores q . k over a (paged) KV cache on the CPU (OpenMP over request x KV head x slot
// block): each key row is read through the block table and widened to fp32 once, rotated by the
// per-call fp32 table when the cache holds pre-RoPE keys, and dotted with the GQA group's queries.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/common.h"
#include "select_cpu.h"

namespace posattn { namespace cpu {

namespace {

// q rows (G of them, stride s_qh) . kv [D]: eight independent partial sums so that the compiler
// vectorizes without reassociating (an AVX2 clone is picked at load time where the CPU has it)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void group_dots(const float* q, int64_t G, int64_t s_qh, const float* kv, int64_t D, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qh = q + g * s_qh;
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int l = 0; l < 8; ++l) a[l] += qh[d + l] * kv[d + l];
    float acc = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (; d < D; ++d) acc += qh[d] * kv[d];
    out[g] = acc;
  }
}

inline float widen1(const float* s, int64_t i) { return s[i]; }
inline float widen1(const half_t* s, int64_t i) { return to_float(s[i]); }
inline float widen1(const bf16_t* s, int64_t i) { return to_float(s[i]); }

template <typename T>
void scores_block(const ScoresProblem& p, int64_t b, int64_t hk, int64_t s0, int64_t s1, std::vector<float>& k,
                  std::vector<float>& kr) {
  const int64_t D = p.D, G = p.HQ / p.HK, R = p.R, H2 = R / 2, S = p.MB * p.PS;
  const int64_t L = std::clamp<int64_t>(p.cache_seqlens[b], 0, S);
  const float ninf = -std::numeric_limits<float>::infinity();
  const T* kc = static_cast<const T*>(p.k_cache);
  for (int64_t s = s0; s < s1; ++s) {
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
  const int64_t nblk = (S + block_s - 1) / block_s, tasks = p.B * p.HK * nblk;
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    std::vector<float> k(static_cast<size_t>(p.D)), kr(static_cast<size_t>(p.D));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / (p.HK * nblk), hk = (t / nblk) % p.HK, s0 = (t % nblk) * block_s;
      const int64_t s1 = std::min(S, s0 + block_s);
      if (p.dtype == 1) scores_block<half_t>(p, b, hk, s0, s1, k, kr);
      else if (p.dtype == 2) scores_block<bf16_t>(p, b, hk, s0, s1, k, kr);
      else scores_block<float>(p, b, hk, s0, s1, k, kr);
    }
  }
}

namespace {

template <typename T>
void page_scores_task(const float* q, const T* kmin, const T* kmax, const int32_t* page_ids, int64_t L, float* out,
                      int64_t b, int64_t hk, int64_t HQ, int64_t HK, int64_t D, int64_t MP, int64_t PS) {
  const int64_t G = HQ / HK;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < MP; ++p) {
    const bool valid = p * PS < L;
    const int64_t page = valid ? page_ids[b * MP + p] : 0;
    const T* mn = kmin + (page * HK + hk) * D;
    const T* mx = kmax + (page * HK + hk) * D;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g;
      float acc = 0.f;
      if (valid) {
        const float* qh = q + (b * HQ + h) * D;
        for (int64_t d = 0; d < D; ++d) acc += std::max(qh[d] * widen1(mn, d), qh[d] * widen1(mx, d));
      }
      out[(b * HQ + h) * MP + p] = valid ? acc : ninf;
    }
  }
}

}  // namespace

void page_scores_forward(const float* q, const void* kmin, const void* kmax, int dtype, const int32_t* page_ids,
                         const int32_t* cache_seqlens, float* out, int64_t B, int64_t HQ, int64_t HK, int64_t D,
                         int64_t MP, int64_t page_size, int num_threads) {
#pragma omp parallel for num_threads(thread_count(num_threads)) schedule(static)
  for (int64_t t = 0; t < B * HK; ++t) {
    const int64_t b = t / HK, hk = t % HK, L = cache_seqlens[b];
    if (dtype == 1)
      page_scores_task(q, static_cast<const half_t*>(kmin), static_cast<const half_t*>(kmax), page_ids, L, out, b, hk,
                       HQ, HK, D, MP, page_size);
    else if (dtype == 2)
      page_scores_task(q, static_cast<const bf16_t*>(kmin), static_cast<const bf16_t*>(kmax), page_ids, L, out, b,
                       hk, HQ, HK, D, MP, page_size);
    else
      page_scores_task(q, static_cast<const float*>(kmin), static_cast<const float*>(kmax), page_ids, L, out, b, hk,
                       HQ, HK, D, MP, page_size);
  }
}

}  // namespace cpu
}  // namespace posattn
