// Launcher-side checks shared by the CUDA kernels of posattn._cuda: a device is
// usable (or why not, with the driver's and the runtime's versions when the
// driver is too old), no earlier error is pending before a launch (so that it is
// not reported as this launch's), and per-device attributes cached.
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace posattn {
namespace cuda {

inline std::string cuda_version_text(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// Why no device can be used ("" when one can).
inline std::string device_problem() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess && n > 0) return "";
  cudaGetLastError();  // clear the (non-sticky) error state
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  if (drv == 0) return "no CUDA device is available: no CUDA driver is installed (cudaDriverGetVersion: 0)";
  // a newer runtime of the same major version runs on an older driver (minor version
  // compatibility); a newer major, or the runtime's own verdict, means the driver is too old
  if (err == cudaErrorInsufficientDriver || drv / 1000 < rt / 1000)
    return "the CUDA driver supports CUDA " + cuda_version_text(drv) + " but posattn._cuda was built with CUDA " +
           cuda_version_text(rt) + " (runtime " + std::to_string(rt) + ", driver " + std::to_string(drv) +
           "): update the driver, or rebuild with a toolkit the driver supports";
  return std::string("no CUDA device is available (cudaGetDeviceCount: ") +
         (err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)) + ")";
}

inline void check_device(const char* where) {
  const std::string why = device_problem();
  if (!why.empty()) throw std::runtime_error(std::string(where) + ": " + why);
}

// An error left by an earlier operation (a previous kernel's fault, an earlier failed
// launch) is raised here, named as such, instead of as this launch's failure.
inline void check_pending(const char* where) {
  const cudaError_t prior = cudaGetLastError();
  if (prior != cudaSuccess)
    throw std::runtime_error(std::string(where) + ": a CUDA error from an earlier operation is pending (not "
                             "raised by this launch): " + cudaGetErrorString(prior));
}

inline void check_launch(const char* where) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(where) + " launch failed: " + cudaGetErrorString(err));
}

// Multiprocessors of the current device, cached per device.
inline int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return 1; }
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) { cudaGetLastError(); n = 1; }
    cached[dev] = n > 0 ? n : 1;
  }
  return cached[dev];
}

// Allow `bytes` of dynamic shared memory for `kernel` (needed above 48 KiB).
template <typename K>
inline void allow_smem(K kernel, int64_t bytes, const char* where) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string(where) + ": " + std::to_string(bytes) +
                             " bytes of shared memory per block are not available: " + cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace posattn
