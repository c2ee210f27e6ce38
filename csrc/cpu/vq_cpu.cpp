// posattn.vq on the CPU (OpenMP): nearest-centroid assignment under the codebook's metric, and
// the far tokens' scores by centroid lookup (a C-entry table per query head, then one code read
// per cached slot). Contract: posattn/kernels/reference/vq.py.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "posattn/common.h"
#include "vq_cpu.h"

namespace posattn { namespace cpu {

#include "omp_threads.h"

namespace {

inline float widen(const float* s, int64_t i) { return s[i]; }
inline float widen(const half_t* s, int64_t i) { return to_float(s[i]); }
inline float widen(const bf16_t* s, int64_t i) { return to_float(s[i]); }

inline int64_t read_code(const void* codes, int code_bytes, int64_t off) {
  return code_bytes == 2 ? int64_t(static_cast<const int16_t*>(codes)[off])
                         : int64_t(static_cast<const int32_t*>(codes)[off]);
}

// 8 independent partial sums: the compiler vectorises them (a plain running sum would be one chain)
inline float dot(const float* a, const float* b, int64_t D) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  float r = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

template <typename T>
void assign_impl(const T* keys, int64_t T_, int64_t HK, int64_t D, int64_t s_kt, int64_t s_kh, const float* mc,
                 const float* cn, int64_t C, void* codes, int code_bytes, int nt) {
  const int64_t n = T_ * HK;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> k(D);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = i / HK, h = i % HK;
      const T* row = keys + t * s_kt + h * s_kh;
      for (int64_t d = 0; d < D; ++d) k[d] = widen(row, d);
      float best = std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float dist = cn[h * C + c] - 2.f * dot(k.data(), mc + (h * C + c) * D, D);
        if (dist < best) { best = dist; arg = c; }    // strict: ties keep the lower code
      }
      if (code_bytes == 2) static_cast<int16_t*>(codes)[i] = int16_t(arg);
      else static_cast<int32_t*>(codes)[i] = int32_t(arg);
    }
  }
}

}  // namespace

void vq_assign_forward(const void* keys, int dtype, int64_t T_, int64_t HK, int64_t D, int64_t s_kt, int64_t s_kh,
                       const float* mc, const float* cn, int64_t C, void* codes, int code_bytes, int num_threads) {
  if (T_ == 0 || HK == 0) return;
  const int nt = omp_threads(num_threads);
  if (dtype == kFloat32)
    assign_impl(static_cast<const float*>(keys), T_, HK, D, s_kt, s_kh, mc, cn, C, codes, code_bytes, nt);
  else if (dtype == kFloat16)
    assign_impl(static_cast<const half_t*>(keys), T_, HK, D, s_kt, s_kh, mc, cn, C, codes, code_bytes, nt);
  else
    assign_impl(static_cast<const bf16_t*>(keys), T_, HK, D, s_kt, s_kh, mc, cn, C, codes, code_bytes, nt);
}

void vq_code_scores_forward(const float* qf, const float* cent, const void* codes, int code_bytes, int64_t s_cb,
                            int64_t s_ct, const int32_t* block_table, int64_t s_bt, const int32_t* far_len, float* out,
                            int64_t s_ob, int64_t s_oh, int64_t B, int64_t HQ, int64_t HK, int64_t D, int64_t C,
                            int64_t PS, int64_t MB, float scale, int64_t block_s, int num_threads) {
  const int64_t S = MB * PS, G = HQ / HK;
  if (B == 0 || HQ == 0 || S == 0) return;
  const int nt = omp_threads(num_threads);
  // phase 1: the tables [B, HQ, C] (C x D products per query head)
  std::vector<float> tab(static_cast<size_t>(B * HQ * C));
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
  for (int64_t bh = 0; bh < B * HQ; ++bh)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t h = bh % HQ;
      tab[bh * C + c] = scale * dot(qf + bh * D, cent + ((h / G) * C + c) * D, D);
    }
  // phase 2: per (request, block of slots, KV head) the block's codes once, then each of the G
  // heads' rows written in order (a table row of C floats stays in L1; the writes stream)
  block_s = std::max<int64_t>(1, block_s);
  const int64_t nblk = (S + block_s - 1) / block_s;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(nt)
  {
    std::vector<int32_t> cbuf(static_cast<size_t>(block_s));
#pragma omp for schedule(static) collapse(2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t L = std::clamp<int64_t>(far_len[b], 0, S);
        const int64_t s0 = blk * block_s, s1 = std::min(S, s0 + block_s);
        const int64_t sv = std::clamp<int64_t>(L, s0, s1);          // slots [s0, sv) are scored
        for (int64_t hk = 0; hk < HK; ++hk) {
          for (int64_t s = s0; s < sv; ++s) {
            const int64_t page = block_table[b * s_bt + s / PS];
            const int64_t c = read_code(codes, code_bytes, page * s_cb + (s % PS) * s_ct + hk);
            cbuf[s - s0] = int32_t(std::clamp<int64_t>(c, 0, C - 1));
          }
          for (int64_t g = 0; g < G; ++g) {
            float* o = out + b * s_ob + (hk * G + g) * s_oh;
            const float* t = tab.data() + (b * HQ + hk * G + g) * C;
            for (int64_t s = s0; s < sv; ++s) o[s] = t[cbuf[s - s0]];
            for (int64_t s = sv; s < s1; ++s) o[s] = ninf;
          }
        }
      }
  }
}

}  // namespace cpu
}  // namespace posattn
