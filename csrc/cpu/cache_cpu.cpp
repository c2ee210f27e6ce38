// OpenMP CPU cache writes: fused RoPE + paged append (rope_and_cache) and KV compaction.
// The rope_and_cache body (cache_cpu_impl.inc) reuses the rotary kernel's helpers (exact
// angle reduction, vectorised rotations) and is compiled twice like it (clones.inc).
#pragma GCC optimize("no-trapping-math")

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "posattn/rope_math.h"
#include "cache_cpu.h"

namespace posattn {
namespace cpu {

#define POSATTN_CLONE_BODY "cache_cpu_impl.inc"
#include "clones.inc"
#undef POSATTN_CLONE_BODY

const char* rope_cache_forward(const CacheProblem& p, int dtype, int num_threads) {
  num_threads = omp_threads(num_threads);
#ifdef POSATTN_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) {
    avx2::cache_dispatch(p, dtype, num_threads);
    return "avx2";
  }
#endif
  generic::cache_dispatch(p, dtype, num_threads);
  return "generic";
}

void kv_compact_forward(const CompactProblem& p, int num_threads) {
  num_threads = omp_threads(num_threads);
  // a decode step moves a few tokens per request: a thread team costs more than that
  if (p.batch * p.n * p.heads * (p.k_row + p.v_row) < (int64_t(1) << 16)) num_threads = 1;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t L = p.seqlens64 ? static_cast<int64_t*>(p.seqlens)[b] : static_cast<int32_t*>(p.seqlens)[b];
    const int64_t cnt = p.counts[b];
    auto place = [&](int64_t l, int64_t& blk, int64_t& off) {
      blk = p.block_table ? int64_t(p.block_table[b * p.bt_sb + l / p.page]) : b;
      off = l % p.page;
    };
    // in ascending order: destination L + i <= source src[b, i], and no later source is a
    // destination written before it is read (sources ascend from L), so one pass is exact
    for (int64_t i = 0; i < cnt; ++i) {
      int64_t sb, so, db, dof;
      place(p.src[b * p.src_sb + i], sb, so);
      place(L + i, db, dof);
      for (int64_t h = 0; h < p.heads; ++h) {
        std::memmove(p.kc + db * p.kc_sb + dof * p.kc_sp + h * p.kc_sh,
                     p.kc + sb * p.kc_sb + so * p.kc_sp + h * p.kc_sh, size_t(p.k_row));
        std::memmove(p.vc + db * p.vc_sb + dof * p.vc_sp + h * p.vc_sh,
                     p.vc + sb * p.vc_sb + so * p.vc_sp + h * p.vc_sh, size_t(p.v_row));
      }
    }
    if (p.seqlens64) static_cast<int64_t*>(p.seqlens)[b] = L + cnt;
    else static_cast<int32_t*>(p.seqlens)[b] = int32_t(L + cnt);
  }
}

}  // namespace cpu
}  // namespace posattn
