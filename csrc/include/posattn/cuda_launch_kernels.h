// The complete launch decision of every csrc/cuda kernel -- which template instantiation,
// grid, block, dynamic shared memory and the extra kernel arguments -- in plain C++ (no
// CUDA headers). The nvcc launchers (csrc/cuda/*.cu) and the NVRTC provider (through
// csrc/bind_cuda_jit.cpp -> posattn/kernels/cuda_jit_launch.py) both call these, so the
// two providers cannot compute different launches for one problem.
#pragma once
#include <algorithm>
#include <cstdint>
#include "posattn/cuda_launch.h"
#include "posattn/rope_math.h"
#include "posattn/rope_cos_sin_math.h"
#include "posattn/cache_problem.h"

namespace posattn {

struct KernelLaunch {
  int vec = 1;              // vector width in elements (template argument); kv_compact: word bytes
  bool smem_table = true;   // rope_kernel_bshd: cos/sin table in shared memory (template argument)
  int threads = 0;          // block size
  int64_t grid_x = 1, grid_y = 1;
  int64_t smem = 0;         // dynamic shared memory bytes
  bool smem_attr = false;   // smem above 48 KiB: raise the kernel's limit before launching
  int hpb = 0, tpb = 0;     // kernel arguments: heads / tokens per block
  int64_t token_blocks = 0; // kernel argument of rope_cos_sin_kernel
};

inline int dtype_bytes(int dtype) {
  return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
}
inline int acc_bytes_of(int dtype) { return dtype == kFloat64 ? 8 : 4; }

template <typename Tensor>
inline VecView vec_view_of(const Tensor& t) {
  return VecView{t.in, t.out, t.in ? t.heads : 0, t.in_sb, t.in_ss, t.in_sh, t.out_sb, t.out_ss, t.out_sh};
}

constexpr int64_t kRopeTableSmemBytes = 32 * 1024;  // rope: larger cos/sin tables are computed per element

// rope_kernel_bshd (csrc/cuda/rope_cuda.cu): block (token, head group). The token's
// cos/sin table sits in shared memory when it fits (then vectorised as pointers and strides
// allow), else angles are computed per element, unvectorised. A token's heads are split over
// blocks only when there are fewer tokens than SMs (decode): every block computes the
// token's whole table, so splitting prefill would repeat that work.
inline KernelLaunch rope_launch(const RopeProblem& p, int dtype, int threads, int sm_count) {
  KernelLaunch L;
  if (threads <= 0) threads = 128;
  threads = std::min(threads, 1024);
  const int64_t ntok = p.batch * p.seqlen;
  const int64_t rows = p.ang.ptr ? p.ang.rows : p.f.rows;
  const int half = p.rotary_dim / 2;
  const int64_t tab = rows * half;
  const int64_t bytes = tab * (rope_q_differs(p) ? 4 : 2) * int64_t(acc_bytes_of(dtype));
  L.smem_table = bytes <= kRopeTableSmemBytes;
  L.smem = L.smem_table ? bytes : 0;
  if (L.smem_table) {
    const VecView views[2] = {vec_view_of(p.q), vec_view_of(p.k)};
    L.vec = pick_vec_width(dtype_bytes(dtype), half, p.interleaved, p.batch, p.seqlen, views, 2);
  }
  const int ppc = p.interleaved ? (L.vec > 1 ? L.vec / 2 : 1) : L.vec;
  const int64_t heads = (p.q.in ? p.q.heads : 0) + (p.k.in ? p.k.heads : 0);
  int64_t hpb = std::max<int64_t>(heads, 1);
  const int sms = std::max(sm_count, 1);
  if (ntok < sms) {
    const HeadSplit hs = split_heads(ntok, heads, std::max(half / ppc, 1), threads, sms);
    hpb = hs.hpb;
    threads = hs.threads;
  }
  L.threads = threads;
  L.hpb = int(hpb);
  L.grid_x = ntok;
  L.grid_y = (heads + hpb - 1) / hpb;
  return L;
}

// rope_cos_sin_kernel (csrc/cuda/rope_cos_sin.cu): the plan of cos_sin_launch_plan.
inline KernelLaunch cos_sin_launch(const CosSinProblem& p, int dtype, int threads, int sm_count) {
  KernelLaunch L;
  const VecView views[2] = {vec_view_of(p.q), vec_view_of(p.k)};
  const int half = p.rotary_dim / 2;
  L.vec = pick_vec_width(dtype_bytes(dtype), half, p.interleaved, p.batch, p.seqlen, views, 2);
  const int ppc = p.interleaved ? (L.vec > 1 ? L.vec / 2 : 1) : L.vec;
  const int64_t heads = p.q.heads + (p.k.in ? p.k.heads : 0);
  const CosSinLaunchPlan pl = cos_sin_launch_plan(p.batch * p.seqlen, heads, half, acc_bytes_of(dtype), ppc,
                                                  threads, sm_count);
  L.threads = pl.threads;
  L.tpb = pl.tpb;
  L.hpb = pl.hpb;
  L.token_blocks = pl.token_blocks;
  L.grid_x = pl.grid_x;
  L.grid_y = pl.grid_y;
  L.smem = pl.smem;
  L.smem_attr = pl.smem_attr;
  return L;
}

constexpr int64_t kCacheTableSmemBytes = 48 * 1024;  // rope_cache_kernel refuses larger tables

// rope_cache_kernel (csrc/cuda/cache_cuda.cu): one block per new token; smem > the limit
// is refused by the launcher (L.smem_attr set as the signal).
inline KernelLaunch rope_cache_launch(const CacheProblem& c, int dtype, int threads) {
  KernelLaunch L;
  L.threads = threads <= 0 ? 128 : threads;
  const int64_t tab = c.r.f.rows * (c.r.rotary_dim / 2);
  L.smem = tab * (rope_q_differs(c.r) ? 4 : 2) * int64_t(acc_bytes_of(dtype));
  L.smem_attr = L.smem > kCacheTableSmemBytes;
  L.grid_x = c.r.seqlen;
  return L;
}

inline bool compact_aligned_to(const CompactProblem& p, int64_t w) {
  auto ok = [w](int64_t x) { return x % w == 0; };
  return ok(int64_t(reinterpret_cast<uintptr_t>(p.kc))) && ok(int64_t(reinterpret_cast<uintptr_t>(p.vc))) &&
         ok(p.kc_sb) && ok(p.kc_sp) && ok(p.kc_sh) && ok(p.vc_sb) && ok(p.vc_sp) && ok(p.vc_sh) && ok(p.k_row) &&
         ok(p.v_row);
}

// kv_compact_kernel: one block per request; the copied word (vec, in bytes: 16 = uint4,
// 4 = uint32_t, 2 = uint16_t) is the widest every pointer, stride and row allows.
inline KernelLaunch kv_compact_launch(const CompactProblem& p, int threads) {
  KernelLaunch L;
  L.threads = threads <= 0 ? 128 : threads;
  L.grid_x = p.batch;
  L.vec = compact_aligned_to(p, 16) ? 16 : compact_aligned_to(p, 4) ? 4 : 2;
  return L;
}

}  // namespace posattn
