// CUDA rotary kernel (positions x RopeTables, or explicit angles; sign +-1).
//
// Block (x, y) handles token x and heads [y*hpb, (y+1)*hpb) of q then k (y > 0
// only for decode-size calls, fewer tokens than SMs: split_heads in
// posattn/cuda_launch.h). The token's cos/sin table ([rows, R/2], and a
// second one for keys when the DPE query offset makes them differ) is computed
// once into shared memory: exact fp64 range reduction (rope_math.h), then
// sincosf on the reduced fp32 angle in [-pi, pi]. The block's threads then sweep
// (head, chunk of VEC pairs) so that consecutive threads touch consecutive
// 16-byte vectors; VEC = 16 / sizeof(T) when every pointer and stride allows
// aligned vector access, else 1. Tables too large for shared memory are
// evaluated per element instead.
#include "posattn/rope_math.h"
#if !defined(__CUDACC_RTC__)  // NVRTC (posattn/kernels/cuda_jit.py) sees the kernels only
#include <cuda_runtime.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include "posattn/cuda_launch_kernels.h"
#include "cuda_check.cuh"
#include "rope_cuda.h"
#endif

namespace posattn {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec { T v[N]; };

// compute type: fp32, except fp64 for fp64 tensors
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A ldf(T v) { return A(to_float(v)); }
template <> __device__ __forceinline__ double ldf<double, double>(double v) { return v; }
template <typename T> __device__ __forceinline__ T sto(float v) { return from_float<T>(v); }
template <typename T> __device__ __forceinline__ T sto(double v) { return T(v); }

__device__ __forceinline__ void sincos_of(double r, float& s, float& c) { sincosf(float(r), &s, &c); }
__device__ __forceinline__ void sincos_of(double r, double& s, double& c) { sincos(r, &s, &c); }

// cos/sin (with attention_scaling and sign) of pair i, table row r, for queries or keys.
template <typename A>
__device__ __forceinline__ void pair_cos_sin(const RopeProblem& p, int64_t b, int64_t s, int r, int i,
                                             bool is_query, A& c, A& sn) {
  const int half = p.rotary_dim / 2;
  double a;
  A scale;
  if (p.ang.ptr) {
    a = rope_reduce_exact(double(p.ang.ptr[b * p.ang.sb + s * p.ang.ss + r * p.ang.sh + i]));
    scale = A(1);
  } else {
    a = rope_reduce(rope_pair_position(p, i, b, s, is_query), p.f.inv_freq[int64_t(r) * half + i]);
    scale = A(p.f.attention_scaling);
  }
  sincos_of(a, sn, c);
  c *= scale;
  sn *= scale * A(p.sign);
}

// SMEM_TABLE (compile time, so that the common path carries no inlined per-element
// angle code and stays lean in registers): the token's cos/sin table sits in shared memory.
template <typename T, int VEC, bool SMEM_TABLE>
__global__ void rope_kernel_bshd(RopeProblem p, int hpb) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int half = p.rotary_dim / 2;
  const int64_t rows = p.ang.ptr ? p.ang.rows : p.f.rows;
  const bool qdiff = rope_q_differs(p);
  const int64_t tab = rows * half;
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / p.seqlen, s = tok - (tok / p.seqlen) * p.seqlen;
  A* cq = smem;
  A* sq = smem + tab;
  A* ck = qdiff ? smem + 2 * tab : cq;
  A* sk = qdiff ? smem + 3 * tab : sq;
  if constexpr (SMEM_TABLE) {
    for (int64_t e = threadIdx.x; e < tab; e += blockDim.x) {
      const int r = int(e / half), i = int(e - int64_t(r) * half);
      pair_cos_sin(p, b, s, r, i, true, cq[e], sq[e]);
      if (qdiff) pair_cos_sin(p, b, s, r, i, false, ck[e], sk[e]);
    }
    __syncthreads();
  }
  const int64_t hq = p.q.in ? p.q.heads : 0;
  const int64_t hk = p.k.in ? p.k.heads : 0;
  const int64_t h0 = int64_t(blockIdx.y) * hpb;            // this block's heads: [h0, h0 + nh)
  const int64_t nh = min(int64_t(hpb), hq + hk - h0);
  // VEC pairs per chunk for half-split (x1 and x2 each one vector), VEC/2 for interleaved
  const int ppc = p.interleaved ? (VEC > 1 ? VEC / 2 : 1) : VEC;
  const int chunks = half / ppc;
  const int64_t total = nh * chunks;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    int64_t h = e / chunks;
    const int i0 = int(e - h * chunks) * ppc;
    h += h0;
    const bool is_q = h < hq;
    const RopeTensor& t = is_q ? p.q : p.k;
    if (!is_q) h -= hq;
    const int r = int(h / (t.heads / rows));
    const T* x = static_cast<const T*>(t.in) + b * t.in_sb + s * t.in_ss + h * t.in_sh;
    T* o = static_cast<T*>(t.out) + b * t.out_sb + s * t.out_ss + h * t.out_sh;
    const A* ct = is_q ? cq : ck;
    const A* st = is_q ? sq : sk;
    A c[VEC], sn[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j < ppc) {
        if constexpr (SMEM_TABLE) { c[j] = ct[r * half + i0 + j]; sn[j] = st[r * half + i0 + j]; }
        else pair_cos_sin(p, b, s, r, i0 + j, is_q, c[j], sn[j]);
      }
    }
    if (VEC > 1 && !p.interleaved) {
      Vec<T, VEC> v1 = *reinterpret_cast<const Vec<T, VEC>*>(x + i0);
      Vec<T, VEC> v2 = *reinterpret_cast<const Vec<T, VEC>*>(x + i0 + half);
      Vec<T, VEC> o1, o2;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A x1 = ldf<A>(v1.v[j]), x2 = ldf<A>(v2.v[j]);
        o1.v[j] = sto<T>(x1 * c[j] - x2 * sn[j]);
        o2.v[j] = sto<T>(x2 * c[j] + x1 * sn[j]);
      }
      *reinterpret_cast<Vec<T, VEC>*>(o + i0) = o1;
      *reinterpret_cast<Vec<T, VEC>*>(o + i0 + half) = o2;
    } else if (VEC > 1) {
      Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(x + 2 * i0);
      Vec<T, VEC> ov;
#pragma unroll
      for (int j = 0; j < VEC / 2; ++j) {
        const A x1 = ldf<A>(v.v[2 * j]), x2 = ldf<A>(v.v[2 * j + 1]);
        ov.v[2 * j] = sto<T>(x1 * c[j] - x2 * sn[j]);
        ov.v[2 * j + 1] = sto<T>(x2 * c[j] + x1 * sn[j]);
      }
      *reinterpret_cast<Vec<T, VEC>*>(o + 2 * i0) = ov;
    } else {
      int i1, i2;
      rope_pair_index(i0, p.rotary_dim, p.interleaved, i1, i2);
      const A x1 = ldf<A>(x[i1]), x2 = ldf<A>(x[i2]);
      o[i1] = sto<T>(x1 * c[0] - x2 * sn[0]);
      o[i2] = sto<T>(x2 * c[0] + x1 * sn[0]);
    }
  }
  if (p.copy_tail) {
    const int64_t tail = p.head_dim - p.rotary_dim;
    const int64_t ttotal = nh * tail;
    for (int64_t e = threadIdx.x; e < ttotal; e += blockDim.x) {
      int64_t h = e / tail;
      const int64_t d = p.rotary_dim + (e - h * tail);
      h += h0;
      const RopeTensor& t = h < hq ? p.q : p.k;
      if (h >= hq) h -= hq;
      static_cast<T*>(t.out)[b * t.out_sb + s * t.out_ss + h * t.out_sh + d] =
          static_cast<const T*>(t.in)[b * t.in_sb + s * t.in_ss + h * t.in_sh + d];
    }
  }
}

#if !defined(__CUDACC_RTC__)  // host launchers: nvcc only (NVRTC compiles the kernels above, posattn/kernels/cuda_jit.py)
int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
  return n;
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

// The launch (instantiation, grid, block, smem) is decided in posattn/cuda_launch_kernels.h,
// shared with the NVRTC provider.
template <typename T>
static void launch_typed(const RopeProblem& p, int dtype, int threads, cudaStream_t st) {
  const KernelLaunch L = rope_launch(p, dtype, threads, sm_count());
  const dim3 grid(static_cast<unsigned>(L.grid_x), static_cast<unsigned>(L.grid_y));
  const size_t smem = size_t(L.smem);
  if (!L.smem_table) {  // huge per-head tables: angles per element, unvectorised (rare)
    rope_kernel_bshd<T, 1, false><<<grid, L.threads, 0, st>>>(p, L.hpb);
    return;
  }
  switch (L.vec) {
    case 8: rope_kernel_bshd<T, 8, true><<<grid, L.threads, smem, st>>>(p, L.hpb); break;
    case 4: rope_kernel_bshd<T, 4, true><<<grid, L.threads, smem, st>>>(p, L.hpb); break;
    case 2: rope_kernel_bshd<T, 2, true><<<grid, L.threads, smem, st>>>(p, L.hpb); break;
    default: rope_kernel_bshd<T, 1, true><<<grid, L.threads, smem, st>>>(p, L.hpb); break;
  }
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) { cudaGetLastError(); return 0; }
  return v;
}

std::string device_problem_text() { return device_problem(); }

void rope_forward(const RopeProblem& p, int dtype, int threads, int64_t stream) {
  constexpr const char* kWhere = "posattn._cuda.rope_forward";
  check_device(kWhere);
  const int64_t ntok = p.batch * p.seqlen;
  if (ntok == 0) return;
  if (ntok > int64_t(0x7fffffff)) throw std::invalid_argument("posattn._cuda.rope_forward: too many tokens");
  if (threads <= 0) threads = 128;
  threads = std::min(threads, 1024);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  check_pending(kWhere);
  switch (dtype) {
    case kFloat32: launch_typed<float>(p, dtype, threads, st); break;
    case kFloat16: launch_typed<half_t>(p, dtype, threads, st); break;
    case kBFloat16: launch_typed<bf16_t>(p, dtype, threads, st); break;
    case kFloat64: launch_typed<double>(p, dtype, threads, st); break;
    default: throw std::invalid_argument("posattn._cuda.rope_forward: unsupported dtype code");
  }
  check_launch(kWhere);
}

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace posattn
