// Host-side launch planning of the CUDA rotary kernels, in plain C++ (no CUDA
// headers) so that the CPU module binds it and tests check it without a GPU
// (tests/kernels/test_cuda_launch_plan.py, through posattn._C).
//
//  * pick_vec_width: the widest vector access every pointer and stride allows;
//    strides of size-1 dimensions are never used to address and are ignored.
//  * cos_sin_launch_plan: tokens per block, heads per block, grid and shared
//    memory of csrc/cuda/rope_cos_sin.cu.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace posattn {

// One of q / k for vector-width planning ([B, S, H, D] view, last dim contiguous).
struct VecView {
  const void* in;
  const void* out;
  int64_t heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
};

inline bool vec_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % uintptr_t(bytes) == 0;
}

// The widest vector (in elements of `elem_bytes`, at most 16 bytes) such that every
// vector access of the rotation is aligned: pointers, the strides of every dimension of
// size > 1 (a size-1 dimension's index is always 0, so its stride never moves a pointer),
// and the offset of the second half (half-split) are multiples of it. Interleaved pairs
// need at least 2 elements (one pair) per vector, else 1 (scalar).
inline int pick_vec_width(int elem_bytes, int half, bool interleaved, int64_t batch, int64_t seqlen,
                          const VecView* views, int nviews) {
  auto ok = [&](int v) {
    if (v < 2) return true;
    const int64_t bytes = int64_t(v) * elem_bytes;
    if (interleaved ? (half % (v / 2) != 0) : (half % v != 0)) return false;
    for (int n = 0; n < nviews; ++n) {
      const VecView& t = views[n];
      if (t.in == nullptr || t.heads == 0) continue;
      if (!vec_aligned(t.in, bytes) || !vec_aligned(t.out, bytes)) return false;
      const int64_t dims[3] = {batch, seqlen, t.heads};
      const int64_t ins[3] = {t.in_sb, t.in_ss, t.in_sh};
      const int64_t outs[3] = {t.out_sb, t.out_ss, t.out_sh};
      for (int d = 0; d < 3; ++d) {
        if (dims[d] <= 1) continue;
        if (ins[d] % v || outs[d] % v) return false;
      }
    }
    return true;
  };
  int vec = std::max(1, 16 / std::max(1, elem_bytes));
  while (vec > 1 && !ok(vec)) vec /= 2;
  if (interleaved && vec < 2) vec = 1;
  return vec;
}

constexpr int64_t kCosSinTableBudget = 32 * 1024;      // shared bytes of cached table rows per block
constexpr int64_t kDefaultSmemPerBlock = 48 * 1024;    // above this a kernel needs cudaFuncSetAttribute
constexpr int64_t kMaxGridX = 0x7fffffff;              // gridDim.x limit; the kernel loops past it
constexpr int64_t kMaxGridY = 65535;

struct HeadSplit {
  int64_t hpb;   // heads per block
  int threads;   // block size: the requested one, or less when a block has less work
};

// One token per block: how many of its heads (chunks_per_head chunks each) a block takes.
// About `threads` chunks per block, heads spread evenly over the groups; fewer heads per
// block when the grid (tokens x groups) would have fewer blocks than `target` (the SM
// count), so that decode-size calls (a few tokens, many heads) fill the GPU.
inline HeadSplit split_heads(int64_t tokens, int64_t heads, int64_t chunks_per_head, int threads,
                             int64_t target) {
  if (threads <= 0) threads = 256;
  heads = std::max<int64_t>(heads, 1);
  const int64_t cph = std::max<int64_t>(chunks_per_head, 1);
  const int64_t groups0 = (heads * cph + threads - 1) / threads;
  int64_t hpb = (heads + groups0 - 1) / groups0;
  const int64_t groups = (heads + hpb - 1) / hpb;
  if (tokens * groups < target) hpb = std::max<int64_t>(1, std::min(hpb, (tokens * heads) / target));
  hpb = std::max(hpb, (heads + kMaxGridY - 1) / kMaxGridY);
  const int64_t work = hpb * cph;  // chunks of one block
  if (work < threads) threads = int(std::max<int64_t>(32, (work + 31) / 32 * 32));
  return HeadSplit{hpb, threads};
}

struct CosSinLaunchPlan {
  int threads;           // threads per block
  int tpb;               // tokens per block
  int hpb;               // heads per block (q's then k's heads, counted together)
  int64_t token_blocks;  // ceil(tokens / tpb): the kernel's loop bound over blockIdx.x
  int64_t grid_x;        // min(token_blocks, kMaxGridX)
  int64_t grid_y;        // ceil(heads / hpb)
  int64_t smem;          // dynamic shared memory bytes
  bool smem_attr;        // smem > 48 KiB: the launcher must raise the kernel's limit first
};

// tokens = B*S; heads = Hq + Hk; half = R/2; acc_bytes = sizeof(compute type) (4 or 8);
// pairs_per_chunk: pairs one thread rotates per step (the vector width in pairs);
// threads: the requested block size (config "threads", <= 0: 256); sm_count: the device's
// multiprocessors (<= 0: unknown, taken as 1).
//
// A block caches the table rows of its tokens in shared memory (fp32, or fp64 for fp64
// q/k), at most kCosSinTableBudget bytes of them. Enough tokens go to a block to keep its
// threads busy when one token has little work; but never so many that the grid has fewer
// blocks than multiprocessors, and a token whose heads make more work than one block
// (decode: few tokens, many heads) is split over blocks by heads, so a decode step of
// 8 tokens does not run on 8 CTAs.
inline CosSinLaunchPlan cos_sin_launch_plan(int64_t tokens, int64_t heads, int half, int acc_bytes,
                                            int pairs_per_chunk, int threads, int sm_count) {
  CosSinLaunchPlan pl{};
  if (threads <= 0) threads = 256;
  threads = std::min(threads, 1024);
  half = std::max(half, 1);
  heads = std::max<int64_t>(heads, 1);
  tokens = std::max<int64_t>(tokens, 1);
  const int64_t target = std::max(sm_count, 1);
  const int64_t cph = std::max<int64_t>(1, half / std::max(pairs_per_chunk, 1));  // chunks per head
  const int64_t per_tok = heads * cph;
  const int64_t row_bytes = int64_t(4) * half * acc_bytes + 2 * int64_t(sizeof(int64_t));
  const int64_t max_tpb = std::max<int64_t>(1, kCosSinTableBudget / row_bytes);
  int64_t tpb = std::max<int64_t>(1, std::min({max_tpb, threads / per_tok, tokens}));
  // keep at least `target` token blocks while there are that many tokens
  tpb = std::max<int64_t>(1, std::min(tpb, tokens / target));
  int64_t hpb = heads;
  if (tpb == 1) {
    const HeadSplit hs = split_heads(tokens, heads, cph, threads, target);
    hpb = hs.hpb;
    threads = hs.threads;
  }
  pl.threads = threads;
  pl.tpb = int(tpb);
  pl.hpb = int(hpb);
  pl.token_blocks = (tokens + tpb - 1) / tpb;
  pl.grid_x = std::min(pl.token_blocks, kMaxGridX);
  pl.grid_y = (heads + hpb - 1) / hpb;
  pl.smem = tpb * row_bytes;
  pl.smem_attr = pl.smem > kDefaultSmemPerBlock;
  return pl;
}

}  // namespace posattn
