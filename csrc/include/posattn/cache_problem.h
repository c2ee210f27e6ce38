// The cache-write problems both the CPU (csrc/cpu/cache_cpu*) and CUDA (csrc/cuda/cache_cuda*)
// kernels take; csrc/cache_args.h builds them from the bindings' integer lists.
#pragma once
#include "posattn/rope_math.h"
namespace posattn {

// rope_and_cache: the rotary part is a RopeProblem over [1, T, H, D] (q: in -> out; k: in,
// its out unused), the cache part says where token t's rotated k and its v go.
struct CacheProblem {
  RopeProblem r;
  bool rotate_k;
  const void* v; int64_t v_st, v_sh, dv;      // v [T, Hk, Dv]
  void* kc; int64_t kc_sb, kc_sp, kc_sh;      // k_cache [blocks, page, Hk, D] (any strides)
  void* vc; int64_t vc_sb, vc_sp, vc_sh;      // v_cache [blocks, page, Hk, Dv]
  const int64_t* slots;                       // [T]: block * page + offset, -1 skips
  int64_t page;
};

// kv_compact over byte rows: request b moves tokens src[b, i] -> seqlens[b] + i, i < counts[b]
struct CompactProblem {
  char* kc; int64_t kc_sb, kc_sp, kc_sh;      // byte strides
  char* vc; int64_t vc_sb, vc_sp, vc_sh;
  int64_t k_row, v_row;                       // bytes of one head's row
  int64_t heads, page, batch, n;
  void* seqlens; bool seqlens64;              // int32 or int64 [B], advanced in place
  const int64_t* src; int64_t src_sb;         // [B, n]
  const int64_t* counts;                      // [B]
  const int32_t* block_table; int64_t bt_sb;  // [B, max_blocks] or nullptr (contiguous [B, S_cap])
};

}  // namespace posattn
