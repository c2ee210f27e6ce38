// CUDA rotary kernel reading precomputed cos/sin tables.
//
// Block (x, y) handles `tpb` consecutive tokens and heads [y*hpb, (y+1)*hpb) of
// q then k (the plan: posattn/cuda_launch.h, cos_sin_launch_plan). The block's
// tokens' table rows are converted once into shared memory in the compute type
// (fp32, or fp64 for fp64 q/k), then its threads sweep (token, head, chunk of
// VEC elements) so that consecutive threads touch consecutive 16-byte vectors;
// VEC = 16 / sizeof(T) when every pointer and stride allows aligned vector
// access (pick_vec_width), else narrower. Token blocks beyond gridDim.x (more
// than 2^31 - 1) are looped over.
#include "posattn/rope_cos_sin_math.h"
#if !defined(__CUDACC_RTC__)  // NVRTC (posattn/kernels/cuda_jit.py) sees the kernels only
#include <cuda_runtime.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include "posattn/cuda_launch_kernels.h"
#include "cuda_check.cuh"
#include "rope_cos_sin.h"
#endif

namespace posattn {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) CsVec { T v[N]; };

template <typename T, typename U, int VEC>
__global__ void rope_cos_sin_kernel(CosSinProblem p, int tpb, int hpb, int64_t token_blocks) {
  using A = typename CosSinAcc<T>::type;
  // shared: [tpb][c1 | s1 | c2 | s2][half] tables in A, then [tpb] batch and [tpb] token indices
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int half = p.rotary_dim / 2;
  int64_t* sm_b = reinterpret_cast<int64_t*>(smem + size_t(tpb) * 4 * half);
  int64_t* sm_s = sm_b + tpb;
  const int64_t ntok = p.batch * p.seqlen;
  const int qh = int(p.q.heads);
  const int kh = p.k.in ? int(p.k.heads) : 0;
  const int h0 = int(blockIdx.y) * hpb;
  const int nh = min(hpb, qh + kh - h0);
  const int ppc = p.interleaved ? (VEC > 1 ? VEC / 2 : 1) : VEC;  // pairs per chunk
  const int cph = half / ppc;                        // chunks per head (ppc divides half)
  const int per_tok = nh * cph;                      // < 2^31: this block's heads x chunks of one token
  for (int64_t blk = blockIdx.x; blk < token_blocks; blk += gridDim.x) {
    const int64_t tok0 = blk * tpb;
    const int ntb = int(min(int64_t(tpb), ntok - tok0));
    // the only 64-bit divisions: once per (token, pair) of the tables, never per element of q/k
    for (int e = threadIdx.x; e < ntb * half; e += blockDim.x) {
      const int t = e / half, i = e - t * half;
      const int64_t tok = tok0 + t;
      const int64_t b = tok / p.seqlen, s = tok - b * p.seqlen;
      if (i == 0) { sm_b[t] = b; sm_s[t] = s; }
      const int64_t row = cos_sin_row(p, b, s);
      A* sm = smem + size_t(t) * 4 * half;
      cos_sin_load<U, A>(p, b, row, i, sm[i], sm[half + i], sm[2 * half + i], sm[3 * half + i]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < ntb * per_tok; e += blockDim.x) {
      const CosSinItem it = cos_sin_item(e, per_tok, cph, ppc, h0);
      const int t = it.t, i0 = it.i0;
      int h = it.h;
      const int64_t b = sm_b[t], s = sm_s[t];
      const CosSinTensor& ten = h < qh ? p.q : p.k;
      if (h >= qh) h -= qh;
      const T* x = static_cast<const T*>(ten.in) + b * ten.in_sb + s * ten.in_ss + h * ten.in_sh;
      T* o = static_cast<T*>(ten.out) + b * ten.out_sb + s * ten.out_ss + h * ten.out_sh;
      const A* c1 = smem + size_t(t) * 4 * half;
      const A* s1 = c1 + half;
      const A* c2 = s1 + half;
      const A* s2 = c2 + half;
      if constexpr (VEC > 1) {
        if (!p.interleaved) {  // VEC pairs: x1 = x[i0 .. i0+VEC), x2 = x[half+i0 ..)
          const CsVec<T, VEC> v1 = *reinterpret_cast<const CsVec<T, VEC>*>(x + i0);
          const CsVec<T, VEC> v2 = *reinterpret_cast<const CsVec<T, VEC>*>(x + i0 + half);
          CsVec<T, VEC> o1, o2;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const A x1 = acc_load<A>(v1.v[j]), x2 = acc_load<A>(v2.v[j]);
            o1.v[j] = acc_store<T>(x1 * c1[i0 + j] - x2 * s1[i0 + j]);
            o2.v[j] = acc_store<T>(x2 * c2[i0 + j] + x1 * s2[i0 + j]);
          }
          *reinterpret_cast<CsVec<T, VEC>*>(o + i0) = o1;
          *reinterpret_cast<CsVec<T, VEC>*>(o + i0 + half) = o2;
        } else {  // VEC/2 pairs (2i, 2i+1) in one vector
          const CsVec<T, VEC> v = *reinterpret_cast<const CsVec<T, VEC>*>(x + 2 * i0);
          CsVec<T, VEC> ov;
#pragma unroll
          for (int j = 0; j < VEC / 2; ++j) {
            const A x1 = acc_load<A>(v.v[2 * j]), x2 = acc_load<A>(v.v[2 * j + 1]);
            ov.v[2 * j] = acc_store<T>(x1 * c1[i0 + j] - x2 * s1[i0 + j]);
            ov.v[2 * j + 1] = acc_store<T>(x2 * c2[i0 + j] + x1 * s2[i0 + j]);
          }
          *reinterpret_cast<CsVec<T, VEC>*>(o + 2 * i0) = ov;
        }
      } else {
        int i1, i2;
        cos_sin_pair_index(i0, p.rotary_dim, p.interleaved, i1, i2);
        cos_sin_rotate_pair<T, A>(x, o, i1, i2, c1[i0], s1[i0], c2[i0], s2[i0]);
      }
    }
    if (p.copy_tail) {
      const int tail = int(p.head_dim - p.rotary_dim);
      const int per_tok_tail = nh * tail;
      for (int e = threadIdx.x; e < ntb * per_tok_tail; e += blockDim.x) {
        const int t = e / per_tok_tail;
        const int r = e - t * per_tok_tail;
        int h = r / tail;
        const int64_t d = p.rotary_dim + (r - h * tail);
        h += h0;
        const int64_t b = sm_b[t], s = sm_s[t];
        const CosSinTensor& ten = h < qh ? p.q : p.k;
        if (h >= qh) h -= qh;
        static_cast<T*>(ten.out)[b * ten.out_sb + s * ten.out_ss + h * ten.out_sh + d] =
            static_cast<const T*>(ten.in)[b * ten.in_sb + s * ten.in_ss + h * ten.in_sh + d];
      }
    }
    __syncthreads();  // the next token block overwrites the shared tables
  }
}

#if !defined(__CUDACC_RTC__)  // host launchers: nvcc only (NVRTC compiles the kernels above, posattn/kernels/cuda_jit.py)
constexpr const char* kWhere = "posattn._cuda.rope_cos_sin_forward";

template <typename T, typename U, int VEC>
static void launch_vec(const CosSinProblem& p, const KernelLaunch& L, cudaStream_t st) {
  auto kernel = rope_cos_sin_kernel<T, U, VEC>;
  if (L.smem_attr) allow_smem(kernel, L.smem, kWhere);
  const dim3 grid(static_cast<unsigned>(L.grid_x), static_cast<unsigned>(L.grid_y));
  kernel<<<grid, L.threads, size_t(L.smem), st>>>(p, L.tpb, L.hpb, L.token_blocks);
}

// The launch (vector width, plan) is decided in posattn/cuda_launch_kernels.h, shared with
// the NVRTC provider.
template <typename T, typename U>
static void launch_typed(const CosSinProblem& p, int dtype, int threads, cudaStream_t st) {
  const KernelLaunch L = cos_sin_launch(p, dtype, threads, sm_count());
  switch (L.vec) {
    case 8: if constexpr (sizeof(T) <= 2) { launch_vec<T, U, 8>(p, L, st); return; } break;
    case 4: if constexpr (sizeof(T) <= 4) { launch_vec<T, U, 4>(p, L, st); return; } break;
    case 2: launch_vec<T, U, 2>(p, L, st); return;
    default: break;
  }
  launch_vec<T, U, 1>(p, L, st);
}

template <typename T>
static void launch_table(const CosSinProblem& p, int dtype, int table_dtype, int threads, cudaStream_t st) {
  switch (table_dtype) {
    case kFloat32: launch_typed<T, float>(p, dtype, threads, st); break;
    case kFloat16: launch_typed<T, half_t>(p, dtype, threads, st); break;
    case kBFloat16: launch_typed<T, bf16_t>(p, dtype, threads, st); break;
    case kFloat64: launch_typed<T, double>(p, dtype, threads, st); break;
    default: throw std::invalid_argument("posattn._cuda.rope_cos_sin_forward: unsupported table dtype code");
  }
}

void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int threads,
                          int64_t stream) {
  check_device(kWhere);
  const int64_t ntok = p.batch * p.seqlen;
  if (ntok == 0) return;
  auto st = reinterpret_cast<cudaStream_t>(stream);
  check_pending(kWhere);
  switch (dtype) {
    case kFloat32: launch_table<float>(p, dtype, table_dtype, threads, st); break;
    case kFloat16: launch_table<half_t>(p, dtype, table_dtype, threads, st); break;
    case kBFloat16: launch_table<bf16_t>(p, dtype, table_dtype, threads, st); break;
    case kFloat64: launch_table<double>(p, dtype, table_dtype, threads, st); break;
    default: throw std::invalid_argument("posattn._cuda.rope_cos_sin_forward: unsupported dtype code");
  }
  check_launch(kWhere);
}

#endif  // !__CUDACC_RTC__

}  // namespace cuda
}  // namespace posattn
