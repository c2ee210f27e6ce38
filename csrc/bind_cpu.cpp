#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <string>
#include "rope_args.h"
#include "cpu/rope_cpu.h"
#include "cpu/rope_cos_sin_cpu.h"
#include "posattn/rope_cos_sin_args.h"
#include "cpu/attention_cpu.h"
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
  m.def(
      "rope_cos_sin_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k,
         const std::vector<int64_t>& tables, const std::vector<int64_t>& positions, int64_t batch,
         int64_t seqlen, int64_t head_dim, int rotary_dim, bool interleaved, bool copy_tail,
         double sign, int dtype, int table_dtype, int num_threads, int64_t chunk) {
        auto p = posattn::cos_sin_problem_from(q, k, tables, positions, batch, seqlen, head_dim,
                                               rotary_dim, interleaved, copy_tail, sign);
        py::gil_scoped_release release;
        posattn::cpu::rope_cos_sin_forward(p, dtype, table_dtype, num_threads, chunk);
      },
      py::arg("q"), py::arg("k"), py::arg("tables"), py::arg("positions"), py::arg("batch"),
      py::arg("seqlen"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("interleaved"),
      py::arg("copy_tail"), py::arg("sign"), py::arg("dtype"), py::arg("table_dtype"),
      py::arg("num_threads") = 0, py::arg("chunk") = 16);
  m.def(
      "attention_forward",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int rotary_dim, bool interleaved,
         float rope_scaling, int64_t out, int64_t lse, int num_threads) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, rope_scaling);
        py::gil_scoped_release release;
        posattn::cpu::attention_forward(p, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                        num_threads);
      });
  m.def(
      "attention_backward",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int rotary_dim, bool interleaved,
         float rope_scaling, int64_t dout, int64_t delta, int64_t lse, int64_t dq, int64_t dk, int64_t dv,
         int num_threads) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, rope_scaling);
        py::gil_scoped_release release;
        posattn::cpu::attention_backward(p, reinterpret_cast<const float*>(dout), reinterpret_cast<const float*>(delta),
                                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(dq),
                                         reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv), num_threads);
      });
  // Exposed for tests of the shared header math.
  m.def("rope_angle", [](double pos, float inv_freq) { return posattn::rope_angle(pos, inv_freq); });
  m.def("rope_reduce", [](double pos, float inv_freq) { return posattn::rope_reduce(pos, inv_freq); });
  m.def("rope_sincos", [](double r) { double s, c; posattn::rope_sincos_poly(r, s, c); return py::make_tuple(s, c); });
  m.def("bf16_round", [](float f) { return posattn::to_float(posattn::bf16_from_float(f)); });
  m.def("fp16_round", [](float f) { return posattn::to_float(posattn::half_from_float(f)); });
}
