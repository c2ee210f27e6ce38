// Top-k selection on the CPU (OpenMP over rows): radix select over 32-bit order keys, four 8-bit
// digit passes over the entries that share the digits found so far, then one pass that writes the
// chosen indices in ascending order. No sort. Same keys as posattn/kernels/triton/select_topk.py.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "select_cpu.h"

namespace posattn { namespace cpu {

namespace {

int thread_count(int n) {   // n, or OpenMP's default when n <= 0 (1 without OpenMP)
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  (void)n;
  return 1;
#endif
}

// unsigned order = numeric order; -0.0 as +0.0; NaN 0 (below -inf); forced entries use 2^32-1
inline uint32_t order_key(float x) {
  if (std::isnan(x)) return 0u;
  if (x == 0.f) x = 0.f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

void topk_row(const float* s, int64_t N, int64_t L, int64_t k, int64_t sinks, int64_t window, int32_t* out,
              std::vector<uint32_t>& key, std::vector<uint32_t>& cand) {
  L = std::clamp<int64_t>(L, 0, N);
  const int64_t m = std::min(k, L);
  for (int64_t j = 0; j < L; ++j)
    key[j] = (j < sinks || j >= L - window) ? 0xFFFFFFFFu : order_key(s[j]);
  uint32_t prefix = 0;   // the digits of the m-th largest key found so far
  int64_t need = m;      // how many of the entries matching prefix are still to take
  if (m > 0 && m < L) {
    // first digit over the whole row; then only the entries sharing the digits found so far
    // (compacted into cand), so the later passes touch a small fraction of the row
    int64_t hist[256] = {0};
    for (int64_t j = 0; j < L; ++j) ++hist[key[j] >> 24];
    for (int shift = 24;; shift -= 8) {
      int64_t above = 0;
      int d = 255;
      for (; d > 0 && above + hist[d] < need; --d) above += hist[d];
      need -= above;
      prefix |= uint32_t(d) << shift;
      if (shift == 0) break;
      const uint32_t fixed = 0xFFFFFFFFu << shift;
      if (shift == 24) {
        cand.clear();
        for (int64_t j = 0; j < L; ++j)
          if ((key[j] & fixed) == prefix) cand.push_back(key[j]);
      } else {
        size_t w = 0;
        for (size_t i = 0; i < cand.size(); ++i)
          if ((cand[i] & fixed) == prefix) cand[w++] = cand[i];
        cand.resize(w);
      }
      std::fill(hist, hist + 256, 0);
      for (uint32_t c : cand) ++hist[(c >> (shift - 8)) & 255u];
    }
  }
  int64_t pos = 0;
  if (m == L) {   // every valid entry is chosen
    for (int64_t j = 0; j < L; ++j) out[pos++] = int32_t(j);
  } else if (m > 0) {
    for (int64_t j = 0; j < L && pos < m; ++j) {
      if (key[j] > prefix) {
        out[pos++] = int32_t(j);
      } else if (key[j] == prefix && need > 0) {   // ties to the lower index
        out[pos++] = int32_t(j);
        --need;
      }
    }
  }
  for (; pos < k; ++pos) out[pos] = -1;
}

}  // namespace

void topk_forward(const float* scores, int64_t R, int64_t N, int64_t s_row, const int32_t* lengths, int64_t k,
                  int64_t sinks, int64_t window, int32_t* out, int num_threads) {
  const int nt = thread_count(num_threads);
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint32_t> key(static_cast<size_t>(std::max<int64_t>(N, 1))), cand;
    cand.reserve(static_cast<size_t>(std::max<int64_t>(N, 1)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r)
      topk_row(scores + r * s_row, N, lengths[r], k, sinks, window, out + r * k, key, cand);
  }
}

}  // namespace cpu
}  // namespace posattn
