#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "rope_args.h"
#include "cuda/rope_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "posattn CUDA kernels (static cudart); raw device pointers and streams as integers";
  m.def("device_count", &posattn::cuda::device_count);
  m.def("runtime_version", &posattn::cuda::runtime_version);
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
}
