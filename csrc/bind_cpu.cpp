#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include "rope_args.h"
#include "cpu/rope_cpu.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "posattn C++ CPU kernels (OpenMP); raw pointers passed as integers";
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def(
      "rope_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& angles, double sign, int dtype, int num_threads, int64_t chunk) {
        auto p = posattn::rope_problem_from(q, k, dims, pos, freqs, attention_scaling, angles, sign);
        py::gil_scoped_release release;
        return std::string(posattn::cpu::rope_forward(p, dtype, num_threads, chunk));
      },
      py::arg("q"), py::arg("k"), py::arg("dims"), py::arg("pos"), py::arg("freqs"),
      py::arg("attention_scaling"), py::arg("angles"), py::arg("sign"), py::arg("dtype"),
      py::arg("num_threads") = 0, py::arg("chunk") = 64);
  m.def("advise_hugepages", &posattn::cpu::advise_hugepages, py::arg("ptr"), py::arg("nbytes"),
        "madvise(MADV_HUGEPAGE) the 2 MiB-aligned interior of [ptr, ptr + nbytes); returns bytes advised");
  // Exposed for tests of the shared header math.
  m.def("rope_angle", [](double pos, float inv_freq) { return posattn::rope_angle(pos, inv_freq); });
  m.def("rope_reduce", [](double pos, float inv_freq) { return posattn::rope_reduce(pos, inv_freq); });
  m.def("rope_sincos", [](double r) { double s, c; posattn::rope_sincos_poly(r, s, c); return py::make_tuple(s, c); });
  m.def("bf16_round", [](float f) { return posattn::to_float(posattn::bf16_from_float(f)); });
  m.def("fp16_round", [](float f) { return posattn::to_float(posattn::half_from_float(f)); });
}
