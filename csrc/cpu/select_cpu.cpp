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

#include "omp_threads.h"

namespace {

// unsigned order = numeric order; -0.0 as +0.0; NaN 0 (below -inf); forced entries use 2^32-1.
// Branch-free on the bits so that the loop over a row vectorises.
inline uint32_t order_key_bits(uint32_t u) {
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  u = u == 0x80000000u ? 0u : u;                                   // -0.0 -> +0.0
  const uint32_t k = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return nan ? 0u : k;
}

// key[j] = order key of s[j] for j < L (s read as bits: no float compare in the loop)
void order_keys(const float* s, int64_t L, uint32_t* key) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(s);
#pragma omp simd
  for (int64_t j = 0; j < L; ++j) key[j] = order_key_bits(u[j]);
}

// hist[d] = how many of key[0, n) have digit d at bit shift. Scores cluster in a few
// exponent buckets, so one table would chain each increment on the last one to the same
// counter (store-to-load latency); four tables, summed at the end, break those chains.
void digit_hist(const uint32_t* key, int64_t n, int shift, int64_t* hist) {
  int32_t h[4][256] = {};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h[0][(key[i] >> shift) & 255u];
    ++h[1][(key[i + 1] >> shift) & 255u];
    ++h[2][(key[i + 2] >> shift) & 255u];
    ++h[3][(key[i + 3] >> shift) & 255u];
  }
  for (; i < n; ++i) ++h[0][(key[i] >> shift) & 255u];
  for (int d = 0; d < 256; ++d) hist[d] = int64_t(h[0][d]) + h[1][d] + h[2][d] + h[3][d];
}

void topk_row(const float* s, int64_t N, int64_t L, int64_t k, int64_t sinks, int64_t window, int32_t* out,
              std::vector<uint32_t>& key, std::vector<uint32_t>& cand) {
  L = std::clamp<int64_t>(L, 0, N);
  const int64_t m = std::min(k, L);
  order_keys(s, L, key.data());
  // the forced entries: the first sinks and the last window of the row
  std::fill(key.begin(), key.begin() + std::min(sinks, L), 0xFFFFFFFFu);
  std::fill(key.begin() + std::max<int64_t>(0, L - window), key.begin() + L, 0xFFFFFFFFu);
  uint32_t prefix = 0;   // the digits of the m-th largest key found so far
  int64_t need = m;      // how many of the entries matching prefix are still to take
  if (m > 0 && m < L) {
    // first digit over the whole row; then only the entries sharing the digits found so far
    // (compacted into cand), so the later passes touch a small fraction of the row
    int64_t hist[256] = {0}, nc = 0;   // nc: entries in cand
    digit_hist(key.data(), L, 24, hist);
    for (int shift = 24;; shift -= 8) {
      int64_t above = 0;
      int d = 255;
      for (; d > 0 && above + hist[d] < need; --d) above += hist[d];
      need -= above;
      prefix |= uint32_t(d) << shift;
      if (shift == 0) break;
      const uint32_t fixed = 0xFFFFFFFFu << shift;
      // branch-free compaction (store always, advance on a match): a data-dependent branch
      // here mispredicts on a good share of the entries
      const uint32_t* src = shift == 24 ? key.data() : cand.data();
      const int64_t ns = shift == 24 ? L : nc;
      uint32_t* dst = cand.data();
      int64_t w = 0;
      for (int64_t i = 0; i < ns; ++i) {
        const uint32_t c = src[i];
        dst[w] = c;
        w += (c & fixed) == prefix;
      }
      nc = w;
      digit_hist(dst, nc, shift - 8, hist);
    }
  }
  int64_t pos = 0;
  if (m == L) {   // every valid entry is chosen
    for (int64_t j = 0; j < L; ++j) out[pos++] = int32_t(j);
  } else if (m > 0) {
    // branch-free (about k / L of the entries are taken, at random places): write j, advance
    // when taken; ties to the lower index (the first `need` entries equal to the prefix)
    for (int64_t j = 0; j < L && pos < m; ++j) {
      const uint32_t c = key[j];
      const bool tie = c == prefix && need > 0;
      out[pos] = int32_t(j);
      pos += (c > prefix) | tie;
      need -= tie;
    }
  }
  for (; pos < k; ++pos) out[pos] = -1;
}

}  // namespace

void topk_forward(const float* scores, int64_t R, int64_t N, int64_t s_row, const int32_t* lengths, int64_t k,
                  int64_t sinks, int64_t window, int32_t* out, int num_threads) {
  const int nt = omp_threads(num_threads);
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint32_t> key(static_cast<size_t>(std::max<int64_t>(N, 1)));
    std::vector<uint32_t> cand(static_cast<size_t>(std::max<int64_t>(N, 1)));   // holds up to a row
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r)
      topk_row(scores + r * s_row, N, lengths[r], k, sinks, window, out + r * k, key, cand);
  }
}

}  // namespace cpu
}  // namespace posattn
