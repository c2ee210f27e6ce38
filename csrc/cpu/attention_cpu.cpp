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

static inline float dotf(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

static int threads_or_max(int n) {
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

// Rotate every head row of x [T, H, D] in place by sign * theta(token).
static void rotate_all(float* x, int64_t T, int64_t H, int64_t D, const AttnProblem& p, float sign, int nt) {
  const int half = p.rotary_dim / 2;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> cs(2 * size_t(half) + 1);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int i = 0; i < half; ++i) {
        float a = rope_angle(p.positions[t], p.inv_freq[i]);
        cs[i] = std::cos(a);
        cs[half + i] = std::sin(a);
      }
      for (int64_t h = 0; h < H; ++h)
        rope_rotate_row(x + (t * H + h) * D, cs.data(), cs.data() + half, p.rotary_dim, p.interleaved,
                        p.rope_scaling, sign);
    }
  }
}

// q and k as the kernels read them: rotated copies when rotary, else the inputs.
struct RotatedQK {
  std::vector<float> qbuf, kbuf;
  const float* q;
  const float* k;
  RotatedQK(const AttnProblem& p, int nt) {
    q = p.q;
    k = p.k;
    if (p.positions == nullptr) return;
    qbuf.assign(p.q, p.q + p.T * p.HQ * p.D);
    kbuf.assign(p.k, p.k + p.T * p.HK * p.D);
    rotate_all(qbuf.data(), p.T, p.HQ, p.D, p, 1.f, nt);
    rotate_all(kbuf.data(), p.T, p.HK, p.D, p, 1.f, nt);
    q = qbuf.data();
    k = kbuf.data();
  }
};

void attention_forward(const AttnProblem& p, float* out, float* lse, int num_threads) {
  const int nt = threads_or_max(num_threads);
  RotatedQK rq(p, nt);
  const int64_t T = p.T, D = p.D, HQ = p.HQ, HK = p.HK, group = HQ / HK;
  const int64_t nqb = (T + p.block_m - 1) / p.block_m;
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> acc(static_cast<size_t>(D));
    std::vector<float> s(static_cast<size_t>(p.block_n));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t qb = 0; qb < nqb; ++qb) {
      for (int64_t h = 0; h < HQ; ++h) {
        const int64_t hk = h / group;
        const int64_t m0 = qb * p.block_m, m1 = std::min<int64_t>(m0 + p.block_m, T);
        for (int64_t i = m0; i < m1; ++i) {
          const float* qi = rq.q + (i * HQ + h) * D;
          std::fill(acc.begin(), acc.end(), 0.f);
          float m = ninf, l = 0.f;
          for (int32_t e = p.q_offsets[qb]; e < p.q_offsets[qb + 1]; ++e) {
            const int64_t n0 = int64_t(p.q_kv_idx[e]) * p.block_n, n1 = std::min<int64_t>(n0 + p.block_n, T);
            const bool masked = p.q_kv_masked[e] != 0;
            float mx = ninf;
            for (int64_t j = n0; j < n1; ++j) {
              if (masked && !anchor_allowed(i, j, p.doc_start[i], p.doc_start[j], p.row_start[i], p.num_anchors,
                                            p.causal, p.window)) {
                s[j - n0] = ninf;
                continue;
              }
              s[j - n0] = p.scale * dotf(qi, rq.k + (j * HK + hk) * D, D);
              mx = std::max(mx, s[j - n0]);
            }
            if (mx == ninf) continue;
            const float m_new = std::max(m, mx);
            const float alpha = std::exp(m - m_new);   // 0 when m = -inf
            l *= alpha;
            for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
            for (int64_t j = n0; j < n1; ++j) {
              if (s[j - n0] == ninf) continue;
              const float pj = std::exp(s[j - n0] - m_new);
              l += pj;
              const float* vj = p.v + (j * HK + hk) * D;
              for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
            }
            m = m_new;
          }
          float* oi = out + (i * HQ + h) * D;
          const float inv = l > 0.f ? 1.f / l : 0.f;
          for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] * inv;
          lse[h * T + i] = l > 0.f ? m + std::log(l) : ninf;
        }
      }
    }
  }
}

void attention_backward(const AttnProblem& p, const float* dout, const float* delta, const float* lse,
                        float* dq, float* dk, float* dv, int num_threads) {
  const int nt = threads_or_max(num_threads);
  RotatedQK rq(p, nt);
  const int64_t T = p.T, D = p.D, HQ = p.HQ, HK = p.HK, group = HQ / HK;
  const int64_t nqb = (T + p.block_m - 1) / p.block_m, nkb = (T + p.block_n - 1) / p.block_n;
  // dq: one task per (query block, head), over the query-major list
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nt)
  for (int64_t qb = 0; qb < nqb; ++qb) {
    for (int64_t h = 0; h < HQ; ++h) {
      const int64_t hk = h / group;
      const int64_t m0 = qb * p.block_m, m1 = std::min<int64_t>(m0 + p.block_m, T);
      for (int64_t i = m0; i < m1; ++i) {
        const float* qi = rq.q + (i * HQ + h) * D;
        const float* doi = dout + (i * HQ + h) * D;
        float* dqi = dq + (i * HQ + h) * D;
        std::fill(dqi, dqi + D, 0.f);
        const float lse_i = lse[h * T + i], delta_i = delta[h * T + i];
        for (int32_t e = p.q_offsets[qb]; e < p.q_offsets[qb + 1]; ++e) {
          const int64_t n0 = int64_t(p.q_kv_idx[e]) * p.block_n, n1 = std::min<int64_t>(n0 + p.block_n, T);
          const bool masked = p.q_kv_masked[e] != 0;
          for (int64_t j = n0; j < n1; ++j) {
            if (masked && !anchor_allowed(i, j, p.doc_start[i], p.doc_start[j], p.row_start[i], p.num_anchors,
                                          p.causal, p.window))
              continue;
            const float* kj = rq.k + (j * HK + hk) * D;
            const float pij = std::exp(p.scale * dotf(qi, kj, D) - lse_i);
            const float ds = pij * (dotf(doi, p.v + (j * HK + hk) * D, D) - delta_i) * p.scale;
            for (int64_t d = 0; d < D; ++d) dqi[d] += ds * kj[d];
          }
        }
      }
    }
  }
  // dk, dv: one task per (key block, key head), over the key-major list and the head's group
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(nt)
  for (int64_t kb = 0; kb < nkb; ++kb) {
    for (int64_t hk = 0; hk < HK; ++hk) {
      const int64_t n0 = kb * p.block_n, n1 = std::min<int64_t>(n0 + p.block_n, T);
      for (int64_t j = n0; j < n1; ++j) {
        std::fill(dk + (j * HK + hk) * D, dk + (j * HK + hk + 1) * D, 0.f);
        std::fill(dv + (j * HK + hk) * D, dv + (j * HK + hk + 1) * D, 0.f);
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        for (int32_t e = p.k_offsets[kb]; e < p.k_offsets[kb + 1]; ++e) {
          const int64_t qb = p.k_q_idx[e];
          const bool masked = p.k_q_masked[e] != 0;
          const int64_t m0 = qb * p.block_m, m1 = std::min<int64_t>(m0 + p.block_m, T);
          for (int64_t i = m0; i < m1; ++i) {
            const float* qi = rq.q + (i * HQ + h) * D;
            const float* doi = dout + (i * HQ + h) * D;
            const float lse_i = lse[h * T + i], delta_i = delta[h * T + i];
            for (int64_t j = n0; j < n1; ++j) {
              if (masked && !anchor_allowed(i, j, p.doc_start[i], p.doc_start[j], p.row_start[i],
                                            p.num_anchors, p.causal, p.window))
                continue;
              const float* kj = rq.k + (j * HK + hk) * D;
              const float* vj = p.v + (j * HK + hk) * D;
              const float pij = std::exp(p.scale * dotf(qi, kj, D) - lse_i);
              const float ds = pij * (dotf(doi, vj, D) - delta_i) * p.scale;
              float* dkj = dk + (j * HK + hk) * D;
              float* dvj = dv + (j * HK + hk) * D;
              for (int64_t d = 0; d < D; ++d) {
                dvj[d] += pij * doi[d];
                dkj[d] += ds * qi[d];
              }
            }
          }
        }
      }
    }
  }
  if (p.positions != nullptr) {   // gradients w.r.t. the unrotated q, k: rotate back by -theta
    rotate_all(dq, T, HQ, D, p, -1.f, nt);
    rotate_all(dk, T, HK, D, p, -1.f, nt);
  }
}

}  // namespace cpu
}  // namespace posattn
