// The decode engine's "which keys" program, shared by the CPU kernel (and a future CUDA one).
//
// Query i (0-based among its request's n new tokens) of a request with L cached tokens sits at
// logical slot L + i; it sees logical slot j when
//   j < L + n and (j < L or new_ok(i, j - L)) and (window <= 0 or |L + i - j| < window)
//   new_ok = bit (j - L) of the query's tree-mask row (tree_row != nullptr),
//            j - L <= i (causal), or true.
// A slot maps to memory through the block table: page block_table[j / page_size], offset
// j % page_size (a contiguous cache is one page of S_cap slots per request).
#pragma once
#include <cstdint>
#include "posattn/common.h"

namespace posattn {

POSATTN_HD bool decode_visible(int64_t i, int64_t j, int64_t L, int64_t n, const int32_t* tree_row, bool causal,
                               int64_t window) {
  if (j >= L + n) return false;
  if (window > 0) {
    const int64_t d = L + i - j;
    if (d >= window || -d >= window) return false;
  }
  if (j < L) return true;
  const int64_t jj = j - L;
  if (tree_row != nullptr) return ((static_cast<uint32_t>(tree_row[jj >> 5]) >> (jj & 31)) & 1u) != 0;
  return !causal || jj <= i;
}

// One past the last slot any of queries [i0, i1) can see, and the first one (window), for
// skipping whole key blocks.
POSATTN_HD int64_t decode_hi(int64_t i1, int64_t L, int64_t n, bool tree, bool causal) {
  return (causal && !tree) ? L + i1 : L + n;
}
POSATTN_HD int64_t decode_lo(int64_t i0, int64_t L, int64_t window) {
  if (window <= 0) return 0;
  const int64_t lo = L + i0 - window + 1;
  return lo > 0 ? lo : 0;
}

}  // namespace posattn
