#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "rope_args.h"
#include "cuda/rope_cuda.h"
#include "cuda/rope_cos_sin.h"
#include "posattn/rope_cos_sin_args.h"
#include "cache_args.h"
#include "cuda/cache_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "posattn CUDA kernels (static cudart); raw device pointers and streams as integers";
#ifdef POSATTN_CUDA_ARCHS
  m.attr("archs") = POSATTN_CUDA_ARCHS;  // real code compiled in, e.g. "80,90a" (setup.py)
#endif
  m.def("device_count", &posattn::cuda::device_count);
  m.def("runtime_version", &posattn::cuda::runtime_version);
  m.def("driver_version", &posattn::cuda::driver_version,
        "the CUDA version the installed driver supports, as cudaDriverGetVersion (0: no driver)");
  m.def("device_problem", &posattn::cuda::device_problem_text,
        "why no CUDA device is usable (a driver older than the runtime says both versions); '' when one is");
  m.def(
      "rope_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& angles, double sign, int dtype, int threads, int64_t stream) {
        auto p = posattn::rope_problem_from(q, k, dims, pos, freqs, attention_scaling, angles, sign);
        py::gil_scoped_release release;
        posattn::cuda::rope_forward(p, dtype, threads, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("dims"), py::arg("pos"), py::arg("freqs"),
      py::arg("attention_scaling"), py::arg("angles"), py::arg("sign"), py::arg("dtype"),
      py::arg("threads") = 128, py::arg("stream") = 0);
  m.def(
      "rope_cos_sin_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k,
         const std::vector<int64_t>& tables, const std::vector<int64_t>& positions, int64_t batch,
         int64_t seqlen, int64_t head_dim, int rotary_dim, bool interleaved, bool copy_tail,
         double sign, int dtype, int table_dtype, int threads, int64_t stream) {
        auto p = posattn::cos_sin_problem_from(q, k, tables, positions, batch, seqlen, head_dim,
                                               rotary_dim, interleaved, copy_tail, sign);
        py::gil_scoped_release release;
        posattn::cuda::rope_cos_sin_forward(p, dtype, table_dtype, threads, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("tables"), py::arg("positions"), py::arg("batch"),
      py::arg("seqlen"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("interleaved"),
      py::arg("copy_tail"), py::arg("sign"), py::arg("dtype"), py::arg("table_dtype"),
      py::arg("threads") = 256, py::arg("stream") = 0);
  // rope_and_cache / kv_compact (posattn/kernels/cuda_cache.py; not verified on a GPU: backend="cuda" by name only)
  m.def(
      "rope_cache_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& cache, int dtype, int threads, int64_t stream) {
        auto c = posattn::cache_problem_from(q, k, dims, pos, freqs, attention_scaling, cache);
        py::gil_scoped_release release;
        posattn::cuda::rope_cache_forward(c, dtype, threads, stream);
      });
  m.def("kv_compact_forward", [](const std::vector<int64_t>& a, int threads, int64_t stream) {
    auto p = posattn::compact_problem_from(a);
    py::gil_scoped_release release;
    posattn::cuda::kv_compact_forward(p, threads, stream);
  });
}
