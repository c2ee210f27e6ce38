// CUDA rotary kernel reading precomputed cos/sin tables. A block handles
// `tpb` consecutive tokens: their table rows are converted to fp32 once into
// shared memory, then the block's threads sweep the (token, head, pair) grid
// so that consecutive threads touch consecutive elements of a head.
#include <cuda_runtime.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include "posattn/rope_cos_sin_math.h"
#include "rope_cos_sin.h"

namespace posattn {
namespace cuda {

template <typename T, typename U>
__global__ void rope_cos_sin_kernel_bshd(CosSinProblem p, int tpb) {
  // shared: [tpb][c1 | s1 | c2 | s2][half] fp32 tables, then [tpb] batch and [tpb] token indices
  extern __shared__ float smem[];
  const int half = p.rotary_dim / 2;
  int64_t* sm_b = reinterpret_cast<int64_t*>(smem + size_t(tpb) * 4 * half);
  int64_t* sm_s = sm_b + tpb;
  const int64_t ntok = p.batch * p.seqlen;
  const int64_t tok0 = int64_t(blockIdx.x) * tpb;
  const int ntb = int(min(int64_t(tpb), ntok - tok0));
  // the only 64-bit divisions: once per (token, pair) of the tables, never per element of q/k
  for (int e = threadIdx.x; e < ntb * half; e += blockDim.x) {
    const int t = e / half, i = e - t * half;
    const int64_t tok = tok0 + t;
    const int64_t b = tok / p.seqlen, s = tok - b * p.seqlen;
    if (i == 0) { sm_b[t] = b; sm_s[t] = s; }
    const int64_t row = cos_sin_row(p, b, s);
    float* sm = smem + size_t(t) * 4 * half;
    cos_sin_load<U>(p, b, row, i, sm[i], sm[half + i], sm[2 * half + i], sm[3 * half + i]);
  }
  __syncthreads();
  const int kh = p.k.in ? int(p.k.heads) : 0;
  const int qh = int(p.q.heads);
  const int per_tok = (qh + kh) * half;  // < 2^31: heads * pairs of one token
  for (int e = threadIdx.x; e < ntb * per_tok; e += blockDim.x) {
    const int t = e / per_tok;
    const int r = e - t * per_tok;
    int h = r / half;
    const int i = r - h * half;
    const int64_t b = sm_b[t], s = sm_s[t];
    const CosSinTensor& ten = h < qh ? p.q : p.k;
    if (h >= qh) h -= qh;
    const T* x = static_cast<const T*>(ten.in) + b * ten.in_sb + s * ten.in_ss + h * ten.in_sh;
    T* o = static_cast<T*>(ten.out) + b * ten.out_sb + s * ten.out_ss + h * ten.out_sh;
    const float* sm = smem + size_t(t) * 4 * half;
    int i1, i2;
    cos_sin_pair_index(i, p.rotary_dim, p.interleaved, i1, i2);
    cos_sin_rotate_pair<T>(x, o, i1, i2, sm[i], sm[half + i], sm[2 * half + i], sm[3 * half + i]);
  }
  if (p.copy_tail) {
    const int tail = int(p.head_dim - p.rotary_dim);
    const int per_tok_tail = (qh + kh) * tail;
    for (int e = threadIdx.x; e < ntb * per_tok_tail; e += blockDim.x) {
      const int t = e / per_tok_tail;
      const int r = e - t * per_tok_tail;
      int h = r / tail;
      const int64_t d = p.rotary_dim + (r - h * tail);
      const int64_t b = sm_b[t], s = sm_s[t];
      const CosSinTensor& ten = h < qh ? p.q : p.k;
      if (h >= qh) h -= qh;
      static_cast<T*>(ten.out)[b * ten.out_sb + s * ten.out_ss + h * ten.out_sh + d] =
          static_cast<const T*>(ten.in)[b * ten.in_sb + s * ten.in_ss + h * ten.in_sh + d];
    }
  }
}

static void check_device() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();
    throw std::runtime_error(
        std::string("posattn._cuda: no CUDA device is available (cudaGetDeviceCount: ") +
        (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")");
  }
}

template <typename T>
static void launch_table(const CosSinProblem& p, int table_dtype, dim3 grid, int threads,
                         size_t smem, cudaStream_t st, int tpb) {
  switch (table_dtype) {
    case kFloat32: rope_cos_sin_kernel_bshd<T, float><<<grid, threads, smem, st>>>(p, tpb); break;
    case kFloat16: rope_cos_sin_kernel_bshd<T, half_t><<<grid, threads, smem, st>>>(p, tpb); break;
    case kBFloat16: rope_cos_sin_kernel_bshd<T, bf16_t><<<grid, threads, smem, st>>>(p, tpb); break;
    case kFloat64: rope_cos_sin_kernel_bshd<T, double><<<grid, threads, smem, st>>>(p, tpb); break;
    default: throw std::invalid_argument("posattn._cuda.rope_cos_sin_forward: unsupported table dtype code");
  }
}

void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int threads,
                          int64_t stream) {
  check_device();
  const int64_t ntok = p.batch * p.seqlen;
  if (ntok == 0) return;
  if (threads <= 0) threads = 256;
  const int half = p.rotary_dim / 2;
  const int64_t per_tok = (p.q.heads + (p.k.in ? p.k.heads : 0)) * int64_t(half);
  // enough tokens per block to keep every thread busy when heads * pairs is small
  // (shared memory kept under 32 KiB: 4 fp32 rows of `half` entries per token)
  const int64_t max_tpb = std::max<int64_t>(1, 32768 / (16 * std::max(half, 1)));
  int tpb = int(std::max<int64_t>(1, std::min<int64_t>(max_tpb, threads / std::max<int64_t>(per_tok, 1))));
  const size_t smem = sizeof(float) * size_t(4 * half) * size_t(tpb) + 2 * sizeof(int64_t) * size_t(tpb);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  dim3 grid(static_cast<unsigned>((ntok + tpb - 1) / tpb));
  switch (dtype) {
    case kFloat32: launch_table<float>(p, table_dtype, grid, threads, smem, st, tpb); break;
    case kFloat16: launch_table<half_t>(p, table_dtype, grid, threads, smem, st, tpb); break;
    case kBFloat16: launch_table<bf16_t>(p, table_dtype, grid, threads, smem, st, tpb); break;
    case kFloat64: launch_table<double>(p, table_dtype, grid, threads, smem, st, tpb); break;
    default: throw std::invalid_argument("posattn._cuda.rope_cos_sin_forward: unsupported dtype code");
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("posattn._cuda.rope_cos_sin_forward launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace posattn
