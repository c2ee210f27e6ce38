// CUDA rotary kernel: one block per (batch, token). The token's cos/sin table
// is computed once into shared memory (fp64 range reduction, fp32 sincos) and
// reused by every head of q and k; the block's threads then sweep the
// (head, pair) grid so that consecutive threads touch consecutive elements.
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>
#include "posattn/rope_math.h"
#include "rope_cuda.h"

namespace posattn {
namespace cuda {

template <typename T>
__global__ void rope_forward_kernel_bshd(RopeProblem p) {
  extern __shared__ float smem[];
  const int half = p.rotary_dim / 2;
  float* cos_p = smem;
  float* sin_p = smem + half;
  const int64_t tok = blockIdx.x;
  const int64_t b = tok / p.seqlen, s = tok % p.seqlen;
  const double pos = double(rope_load_position(p, b, s));
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    float sn, cs;
    sincosf(rope_angle(pos, p.inv_freq[i]), &sn, &cs);
    cos_p[i] = cs;
    sin_p[i] = sn;
  }
  __syncthreads();
  const int64_t kh = p.k.in ? p.k.heads : 0;
  const int64_t total = (p.q.heads + kh) * half;
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    int64_t h = e / half;
    const int i = int(e - h * half);
    const RopeTensor& t = h < p.q.heads ? p.q : p.k;
    if (h >= p.q.heads) h -= p.q.heads;
    const T* x = static_cast<const T*>(t.in) + b * t.in_sb + s * t.in_ss + h * t.in_sh;
    T* o = static_cast<T*>(t.out) + b * t.out_sb + s * t.out_ss + h * t.out_sh;
    int i1, i2;
    rope_pair_index(i, p.rotary_dim, p.interleaved, i1, i2);
    float o1, o2;
    rope_rotate(to_float(x[i1]), to_float(x[i2]), cos_p[i], sin_p[i], o1, o2);
    o[i1] = from_float<T>(o1);
    o[i2] = from_float<T>(o2);
  }
  if (p.copy_tail) {
    const int64_t tail = p.head_dim - p.rotary_dim;
    const int64_t ttotal = (p.q.heads + kh) * tail;
    for (int64_t e = threadIdx.x; e < ttotal; e += blockDim.x) {
      int64_t h = e / tail;
      const int64_t d = p.rotary_dim + (e - h * tail);
      const RopeTensor& t = h < p.q.heads ? p.q : p.k;
      if (h >= p.q.heads) h -= p.q.heads;
      static_cast<T*>(t.out)[b * t.out_sb + s * t.out_ss + h * t.out_sh + d] =
          static_cast<const T*>(t.in)[b * t.in_sb + s * t.in_ss + h * t.in_sh + d];
    }
  }
}

static void check_device() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky-free error state
    throw std::runtime_error(
        std::string("posattn._cuda: no CUDA device is available (cudaGetDeviceCount: ") +
        (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")");
  }
}

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

void rope_forward(const RopeProblem& p, int dtype, int threads, int64_t stream) {
  check_device();
  const int64_t ntok = p.batch * p.seqlen;
  if (ntok == 0) return;
  if (threads <= 0) threads = 256;
  const size_t smem = sizeof(float) * size_t(p.rotary_dim);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  dim3 grid(static_cast<unsigned>(ntok));
  switch (dtype) {
    case kFloat32: rope_forward_kernel_bshd<float><<<grid, threads, smem, st>>>(p); break;
    case kFloat16: rope_forward_kernel_bshd<half_t><<<grid, threads, smem, st>>>(p); break;
    case kBFloat16: rope_forward_kernel_bshd<bf16_t><<<grid, threads, smem, st>>>(p); break;
    case kFloat64: rope_forward_kernel_bshd<double><<<grid, threads, smem, st>>>(p); break;
    default: throw std::invalid_argument("posattn._cuda.rope_forward: unsupported dtype code");
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("posattn._cuda.rope_forward launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace posattn
