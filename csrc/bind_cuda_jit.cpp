// posattn._cuda_jit_host: the host side of the NVRTC provider, built with the C++ compiler
// (no CUDA toolkit). For each kernel it builds the problem struct from the same integer
// lists as posattn._cuda (rope_args.h, cache_args.h, rope_cos_sin_args.h) and decides the
// launch with the same functions as the nvcc launchers (posattn/cuda_launch_kernels.h);
// it returns the launch and the kernel's by-value arguments as bytes (x86-64 host and
// device share the struct layout), for posattn/kernels/cuda_jit_launch.py to launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cstring>
#include "rope_args.h"
#include "cache_args.h"
#include "posattn/rope_cos_sin_args.h"
#include "posattn/cuda_launch_kernels.h"

namespace py = pybind11;

template <typename T>
static py::bytes as_bytes(const T& v) {
  return py::bytes(reinterpret_cast<const char*>(&v), sizeof(T));
}

static py::dict launch_dict(const posattn::KernelLaunch& L) {
  py::dict d;
  d["vec"] = L.vec; d["smem_table"] = L.smem_table; d["threads"] = L.threads;
  d["grid_x"] = L.grid_x; d["grid_y"] = L.grid_y; d["smem"] = L.smem; d["smem_attr"] = L.smem_attr;
  d["hpb"] = L.hpb; d["tpb"] = L.tpb; d["token_blocks"] = L.token_blocks;
  return d;
}

PYBIND11_MODULE(_cuda_jit_host, m) {
  m.doc() = "host-side launch decisions and argument packing of the CUDA kernels, for the NVRTC provider";
  m.def(
      "rope_launch",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& angles, double sign, int dtype, int threads, int sm_count) {
        const auto p = posattn::rope_problem_from(q, k, dims, pos, freqs, attention_scaling, angles, sign);
        const auto L = posattn::rope_launch(p, dtype, threads, sm_count);
        py::dict d = launch_dict(L);
        d["args"] = py::make_tuple(as_bytes(p), as_bytes(int(L.hpb)));
        return d;
      },
      py::arg("q"), py::arg("k"), py::arg("dims"), py::arg("pos"), py::arg("freqs"),
      py::arg("attention_scaling"), py::arg("angles"), py::arg("sign"), py::arg("dtype"), py::arg("threads"),
      py::arg("sm_count"));
  m.def(
      "cos_sin_launch",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& tables,
         const std::vector<int64_t>& positions, int64_t batch, int64_t seqlen, int64_t head_dim, int rotary_dim,
         bool interleaved, bool copy_tail, double sign, int dtype, int threads, int sm_count) {
        const auto p = posattn::cos_sin_problem_from(q, k, tables, positions, batch, seqlen, head_dim, rotary_dim,
                                                     interleaved, copy_tail, sign);
        const auto L = posattn::cos_sin_launch(p, dtype, threads, sm_count);
        py::dict d = launch_dict(L);
        d["args"] = py::make_tuple(as_bytes(p), as_bytes(int(L.tpb)), as_bytes(int(L.hpb)),
                                   as_bytes(int64_t(L.token_blocks)));
        return d;
      },
      py::arg("q"), py::arg("k"), py::arg("tables"), py::arg("positions"), py::arg("batch"), py::arg("seqlen"),
      py::arg("head_dim"), py::arg("rotary_dim"), py::arg("interleaved"), py::arg("copy_tail"), py::arg("sign"),
      py::arg("dtype"), py::arg("threads"), py::arg("sm_count"));
  m.def(
      "rope_cache_launch",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& cache, int dtype, int threads) {
        const auto c = posattn::cache_problem_from(q, k, dims, pos, freqs, attention_scaling, cache);
        const auto L = posattn::rope_cache_launch(c, dtype, threads);
        py::dict d = launch_dict(L);
        d["args"] = py::make_tuple(as_bytes(c));
        return d;
      });
  m.def("kv_compact_launch", [](const std::vector<int64_t>& a, int threads) {
    const auto p = posattn::compact_problem_from(a);
    const auto L = posattn::kv_compact_launch(p, threads);
    py::dict d = launch_dict(L);
    d["args"] = py::make_tuple(as_bytes(p));
    return d;
  });
}
