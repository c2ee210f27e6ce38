// Builds the cache-write problems from the flat integer lists both bindings take (raw
// pointers as integers). The Python side that packs them: posattn/kernels/cpu_cache.py and
// posattn/kernels/cuda_cache.py.
#pragma once
#include <stdexcept>
#include <vector>
#include "rope_args.h"
#include "posattn/cache_problem.h"

namespace posattn {

// q, k, dims, pos, freqs: as rope_problem_from; cache = (rotate_k, v ptr, v_st, v_sh, dv, k_cache ptr,
// kc_sb, kc_sp, kc_sh, v_cache ptr, vc_sb, vc_sp, vc_sh, slots ptr, page)
inline CacheProblem cache_problem_from(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                       const std::vector<int64_t>& dims, const std::vector<int64_t>& pos,
                                       const std::vector<int64_t>& freqs, double attention_scaling,
                                       const std::vector<int64_t>& cache) {
  if (cache.size() != 15) throw std::invalid_argument("cache: expected 15 integers");
  CacheProblem c{};
  c.r = rope_problem_from(q, k, dims, pos, freqs, attention_scaling, {}, 1.0);
  c.rotate_k = cache[0] != 0;
  c.v = reinterpret_cast<const void*>(cache[1]); c.v_st = cache[2]; c.v_sh = cache[3]; c.dv = cache[4];
  c.kc = reinterpret_cast<void*>(cache[5]); c.kc_sb = cache[6]; c.kc_sp = cache[7]; c.kc_sh = cache[8];
  c.vc = reinterpret_cast<void*>(cache[9]); c.vc_sb = cache[10]; c.vc_sp = cache[11]; c.vc_sh = cache[12];
  c.slots = reinterpret_cast<const int64_t*>(cache[13]); c.page = cache[14];
  if (c.page <= 0) throw std::invalid_argument("cache: page size must be positive");
  return c;
}

// a = (kc, kc_sb, kc_sp, kc_sh, vc, vc_sb, vc_sp, vc_sh, k_row, v_row, heads, page, batch, n,
//      seqlens, seqlens64, src, src_sb, counts, block_table|0, bt_sb): strides and rows in bytes
inline CompactProblem compact_problem_from(const std::vector<int64_t>& a) {
  if (a.size() != 21) throw std::invalid_argument("kv_compact: expected 21 integers");
  return CompactProblem{reinterpret_cast<char*>(a[0]), a[1], a[2], a[3],
                        reinterpret_cast<char*>(a[4]), a[5], a[6], a[7], a[8], a[9], a[10],
                        a[11], a[12], a[13], reinterpret_cast<void*>(a[14]), a[15] != 0,
                        reinterpret_cast<const int64_t*>(a[16]), a[17],
                        reinterpret_cast<const int64_t*>(a[18]),
                        reinterpret_cast<const int32_t*>(a[19]), a[20]};
}

}  // namespace posattn
