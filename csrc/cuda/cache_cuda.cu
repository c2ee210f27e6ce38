// CUDA cache writes: fused RoPE + paged append (rope_and_cache) and KV compaction.
//
// NOT VERIFIED ON A GPU: written and compiled without one. posattn/decode registers these
// kernels as the "cuda" backend used only when asked for by name (backend="cuda"); the tests
// (tests/decode/test_cache_ops*.py) run them against the fp64 oracle wherever a GPU is.
//
// rope_and_cache: one block per new token. The token's cos/sin table ([rows, R/2], and a
// second one for keys when the DPE query offset makes them differ) goes to shared memory
// (exact fp64 range reduction of rope_math.h, then sincosf of the reduced angle, as the
// rotary kernel); the block's threads then sweep (head, pair) of q into qo and, when the
// token's slot is >= 0, of k into the cache (or copy k as is), then v.
//
// kv_compact: one block per request; token i of the accepted path is copied (all heads, k
// and v) from logical slot src[b, i] to cache_seqlens[b] + i, one token after the other with
// a barrier between tokens: every destination is at or below its source and no later source
// is an earlier destination, so this order is exact when the ranges overlap. The block
// then advances cache_seqlens[b] (one block per request: no other block reads it).
#include "posattn/cache_problem.h"
#if !defined(__CUDACC_RTC__)  // NVRTC (posattn/kernels/cuda_jit.py) sees the kernels only
#include <cuda_runtime.h>
#include "posattn/cuda_launch_kernels.h"
#include <stdexcept>
#include <string>
#include "cache_cuda.h"
#endif

namespace posattn {
namespace cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A ldf(T v) { return A(to_float(v)); }
template <> __device__ __forceinline__ float ldf<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double ldf<double, double>(double v) { return v; }
template <typename T> __device__ __forceinline__ T sto(float v) { return from_float<T>(v); }
template <> __device__ __forceinline__ float sto<float>(float v) { return v; }
template <typename T> __device__ __forceinline__ T sto(double v) { return T(v); }

__device__ __forceinline__ void sincos_of(double r, float& s, float& c) { sincosf(float(r), &s, &c); }
__device__ __forceinline__ void sincos_of(double r, double& s, double& c) { sincos(r, &s, &c); }

template <typename T>
__global__ void rope_cache_kernel(CacheProblem c) {
  using A = typename Acc<T>::type;
  const RopeProblem& p = c.r;
  const int64_t t = blockIdx.x;
  const int half = p.rotary_dim / 2;
  const int64_t rows = p.f.rows;
  const int64_t tab = rows * half;
  const bool qdiff = rope_q_differs(p);
  const bool has_q = p.q.in != nullptr && p.q.heads > 0;
  const int64_t slot = c.slots[t];
  const bool write = slot >= 0;
  extern __shared__ unsigned char smem_raw[];
  A* cq = reinterpret_cast<A*>(smem_raw);
  A* sq = cq + tab;
  A* ck = qdiff ? sq + tab : cq;
  A* sk = qdiff ? ck + tab : sq;
  const A scale = A(p.f.attention_scaling);
  for (int64_t i = threadIdx.x; i < tab; i += blockDim.x) {
    const int pr = int(i % half);
    A s, co;
    sincos_of(rope_reduce(rope_pair_position(p, pr, 0, t, true), p.f.inv_freq[i]), s, co);
    cq[i] = co * scale;
    sq[i] = s * scale;
    if (qdiff) {
      sincos_of(rope_reduce(rope_pair_position(p, pr, 0, t, false), p.f.inv_freq[i]), s, co);
      ck[i] = co * scale;
      sk[i] = s * scale;
    }
  }
  __syncthreads();
  const int D = int(p.head_dim), R = p.rotary_dim, tail = D - R;
  auto rotate = [&](const T* x, T* o, const A* cs, const A* sn, int pr) {
    int i1, i2;
    rope_pair_index(pr, R, p.interleaved, i1, i2);
    const A x1 = ldf<A>(x[i1]), x2 = ldf<A>(x[i2]);
    o[i1] = sto<T>(x1 * cs[pr] - x2 * sn[pr]);
    o[i2] = sto<T>(x2 * cs[pr] + x1 * sn[pr]);
  };
  if (has_q) {
    const int64_t hq = p.q.heads, per_row = hq / rows;
    for (int64_t i = threadIdx.x; i < hq * half; i += blockDim.x) {
      const int64_t h = i / half;
      const int pr = int(i - h * half);
      const int64_t off = (h / per_row) * half;
      rotate(static_cast<const T*>(p.q.in) + t * p.q.in_ss + h * p.q.in_sh,
             static_cast<T*>(p.q.out) + t * p.q.out_ss + h * p.q.out_sh, cq + off, sq + off, pr);
    }
    for (int64_t i = threadIdx.x; i < hq * tail; i += blockDim.x) {
      const int64_t h = i / tail, d = R + (i - h * tail);
      static_cast<T*>(p.q.out)[t * p.q.out_ss + h * p.q.out_sh + d] =
          static_cast<const T*>(p.q.in)[t * p.q.in_ss + h * p.q.in_sh + d];
    }
  }
  if (!write) return;
  const int64_t blk = slot / c.page, pos = slot - blk * c.page;
  const int64_t hk = p.k.heads, per_row = hk / rows;
  const T* kin = static_cast<const T*>(p.k.in) + t * p.k.in_ss;
  T* kout = static_cast<T*>(c.kc) + blk * c.kc_sb + pos * c.kc_sp;
  if (c.rotate_k) {
    for (int64_t i = threadIdx.x; i < hk * half; i += blockDim.x) {
      const int64_t h = i / half;
      const int pr = int(i - h * half);
      const int64_t off = (h / per_row) * half;
      rotate(kin + h * p.k.in_sh, kout + h * c.kc_sh, ck + off, sk + off, pr);
    }
    for (int64_t i = threadIdx.x; i < hk * tail; i += blockDim.x) {
      const int64_t h = i / tail, d = R + (i - h * tail);
      kout[h * c.kc_sh + d] = kin[h * p.k.in_sh + d];
    }
  } else {
    for (int64_t i = threadIdx.x; i < hk * D; i += blockDim.x) {
      const int64_t h = i / D, d = i - h * D;
      kout[h * c.kc_sh + d] = kin[h * p.k.in_sh + d];
    }
  }
  const T* vin = static_cast<const T*>(c.v) + t * c.v_st;
  T* vout = static_cast<T*>(c.vc) + blk * c.vc_sb + pos * c.vc_sp;
  for (int64_t i = threadIdx.x; i < hk * c.dv; i += blockDim.x) {
    const int64_t h = i / c.dv, d = i - h * c.dv;
    vout[h * c.vc_sh + d] = vin[h * c.v_sh + d];
  }
}

// W: the word copied per thread (the row bytes are a multiple of sizeof(W), pointers aligned)
template <typename W>
__global__ void kv_compact_kernel(CompactProblem p) {
  const int64_t b = blockIdx.x;
  const int64_t L = p.seqlens64 ? static_cast<const int64_t*>(p.seqlens)[b]
                                : int64_t(static_cast<const int32_t*>(p.seqlens)[b]);
  const int64_t n = p.counts[b];
  const int64_t kw = p.k_row / int64_t(sizeof(W)), vw = p.v_row / int64_t(sizeof(W));
  auto place = [&](int64_t l, int64_t& blk, int64_t& off) {
    blk = p.block_table ? int64_t(p.block_table[b * p.bt_sb + l / p.page]) : b;
    off = l % p.page;
  };
  for (int64_t i = 0; i < n; ++i) {
    int64_t sb, so, db, dof;
    place(p.src[b * p.src_sb + i], sb, so);
    place(L + i, db, dof);
    for (int64_t e = threadIdx.x; e < p.heads * kw; e += blockDim.x) {
      const int64_t h = e / kw, w = e - h * kw;
      const W x = reinterpret_cast<const W*>(p.kc + sb * p.kc_sb + so * p.kc_sp + h * p.kc_sh)[w];
      reinterpret_cast<W*>(p.kc + db * p.kc_sb + dof * p.kc_sp + h * p.kc_sh)[w] = x;
    }
    for (int64_t e = threadIdx.x; e < p.heads * vw; e += blockDim.x) {
      const int64_t h = e / vw, w = e - h * vw;
      const W x = reinterpret_cast<const W*>(p.vc + sb * p.vc_sb + so * p.vc_sp + h * p.vc_sh)[w];
      reinterpret_cast<W*>(p.vc + db * p.vc_sb + dof * p.vc_sp + h * p.vc_sh)[w] = x;
    }
    // token i + 1's destination may be an earlier token's source: every read of tokens <= i
    // happens before any write of token i + 1 (within a token, a thread reads then writes its own words)
    __syncthreads();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (p.seqlens64) static_cast<int64_t*>(p.seqlens)[b] = L + n;
    else static_cast<int32_t*>(p.seqlens)[b] = int32_t(L + n);
  }
}

#if !defined(__CUDACC_RTC__)  // host launchers: nvcc only (NVRTC compiles the kernels above, posattn/kernels/cuda_jit.py)
void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("posattn._cuda.") + what + " launch failed: " + cudaGetErrorString(err));
}

void check_device() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();
    throw std::runtime_error("posattn._cuda: no CUDA device is available");
  }
}

// The launches are decided in posattn/cuda_launch_kernels.h, shared with the NVRTC provider.
template <typename T>
void launch_cache(const CacheProblem& p, int dtype, int threads, cudaStream_t st) {
  const KernelLaunch L = rope_cache_launch(p, dtype, threads);
  if (L.smem_attr) throw std::invalid_argument("posattn._cuda.rope_cache_forward: cos/sin table too large");
  rope_cache_kernel<T><<<dim3(unsigned(L.grid_x)), L.threads, size_t(L.smem), st>>>(p);
}

#endif  // !__CUDACC_RTC__
}  // namespace

#if !defined(__CUDACC_RTC__)
void rope_cache_forward(const CacheProblem& p, int dtype, int threads, int64_t stream) {
  check_device();
  if (p.r.seqlen == 0) return;
  if (p.r.seqlen > int64_t(0x7fffffff)) throw std::invalid_argument("posattn._cuda.rope_cache_forward: too many tokens");
  if (threads <= 0) threads = 128;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_cache<float>(p, dtype, threads, st); break;
    case kFloat16: launch_cache<half_t>(p, dtype, threads, st); break;
    case kBFloat16: launch_cache<bf16_t>(p, dtype, threads, st); break;
    case kFloat64: launch_cache<double>(p, dtype, threads, st); break;
    default: throw std::invalid_argument("posattn._cuda.rope_cache_forward: unsupported dtype code");
  }
  check_launch("rope_cache_forward");
}

void kv_compact_forward(const CompactProblem& p, int threads, int64_t stream) {
  check_device();
  if (p.batch == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const KernelLaunch L = kv_compact_launch(p, threads);
  const dim3 grid(unsigned(L.grid_x));
  if (L.vec == 16) kv_compact_kernel<uint4><<<grid, L.threads, 0, st>>>(p);
  else if (L.vec == 4) kv_compact_kernel<uint32_t><<<grid, L.threads, 0, st>>>(p);
  else kv_compact_kernel<uint16_t><<<grid, L.threads, 0, st>>>(p);
  check_launch("kv_compact_forward");
}

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace posattn
