#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <stdexcept>
#include <string>
#include <vector>
#include "rope_args.h"
#include "cpu/rope_cpu.h"
#include "cpu/rope_cos_sin_cpu.h"
#include "posattn/rope_cos_sin_args.h"
#include "cpu/attention_cpu.h"
#include "cpu/cache_cpu.h"
#include "cache_args.h"
#include "cpu/decode_cpu.h"
#include "cpu/select_cpu.h"
#include "cpu/vq_cpu.h"
#include "cpu/rope_table.h"
#include "posattn/cuda_launch.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// A prepared launch: the problem of one call signature, built (and checked) once from the
// same integer lists as rope_forward / rope_cos_sin_forward. A call supplies only what
// changes between calls of that signature: data pointers, and the positions' (and tables')
// pointer and strides. posattn/kernels/cpu.py keeps one per plan (posattn/rope/ops.py).
void patch_tensor(posattn::RopeTensor& t, int64_t in, int64_t out, const char* name) {
  if (t.in == nullptr) return;  // absent in the prepared signature: the call's pointers are unused
  if (in == 0 || out == 0) throw std::invalid_argument(std::string(name) + ": null pointer");
  t.in = reinterpret_cast<const void*>(in);
  t.out = reinterpret_cast<void*>(out);
}

void patch_tensor(posattn::CosSinTensor& t, int64_t in, int64_t out, const char* name) {
  if (t.in == nullptr) return;
  if (in == 0 || out == 0) throw std::invalid_argument(std::string(name) + ": null pointer");
  t.in = reinterpret_cast<const void*>(in);
  t.out = reinterpret_cast<void*>(out);
}

struct RopeLaunch {
  posattn::RopeProblem p;
  int dtype;
  int64_t chunk;

  // src: what rope_forward takes as pos (ptr, dtype code, sa, sb, ss; the prepared dtype), or,
  // when prepared with explicit angles, as angles (ptr, rows, sb, ss, sh; the prepared rows)
  std::string run(int64_t q_in, int64_t q_out, int64_t k_in, int64_t k_out,
                  const std::vector<int64_t>& src, int num_threads) const {
    posattn::RopeProblem c = p;
    if (p.ang.ptr != nullptr) {
      if (src.size() != 5) throw std::invalid_argument("angles: expected 5 integers");
      if (src[1] != p.ang.rows) throw std::invalid_argument("angles: rows differ from the prepared ones");
      if (src[0] == 0) throw std::invalid_argument("angles: null pointer");
      c.ang.ptr = reinterpret_cast<const float*>(src[0]);
      c.ang.sb = src[2]; c.ang.ss = src[3]; c.ang.sh = src[4];
    } else {
      if (src.size() != 5) throw std::invalid_argument("pos: expected 5 integers");
      if (src[1] != p.pos.dtype) throw std::invalid_argument("pos: dtype differs from the prepared one");
      if (src[0] == 0) throw std::invalid_argument("pos: null pointer");
      c.pos.ptr = reinterpret_cast<const void*>(src[0]);
      c.pos.sa = src[2]; c.pos.sb = src[3]; c.pos.ss = src[4];
    }
    patch_tensor(c.q, q_in, q_out, "q");
    patch_tensor(c.k, k_in, k_out, "k");
    py::gil_scoped_release release;
    return std::string(posattn::cpu::rope_forward(c, dtype, num_threads, chunk));
  }

  // every token at one position `value` (rope_shift's scalar delta), with no positions tensor
  std::string run_const(int64_t q_in, int64_t q_out, int64_t k_in, int64_t k_out, double value,
                        int num_threads) const {
    if (p.ang.ptr != nullptr) throw std::invalid_argument("run_const: prepared with explicit angles");
    posattn::RopeProblem c = p;
    c.pos = posattn::RopePositions{&value, posattn::kPosFloat64, 0, 0, 0};
    patch_tensor(c.q, q_in, q_out, "q");
    patch_tensor(c.k, k_in, k_out, "k");
    py::gil_scoped_release release;
    return std::string(posattn::cpu::rope_forward(c, dtype, num_threads, chunk));
  }
};

struct CosSinLaunch {
  posattn::CosSinProblem p;
  int dtype, table_dtype;
  int64_t chunk;

  // tables as in cos_sin_problem_from (their row count must be the prepared one);
  // positions = (ptr, is_int64, sb, ss), or empty exactly when the prepared call had none
  void run(int64_t q_in, int64_t q_out, int64_t k_in, int64_t k_out, const std::vector<int64_t>& tables,
           const std::vector<int64_t>& positions, int num_threads) const {
    posattn::CosSinProblem c = posattn::cos_sin_problem_from({}, {}, tables, positions, p.batch, p.seqlen,
                                                             p.head_dim, p.rotary_dim, p.interleaved,
                                                             p.copy_tail, p.sign);
    if (c.table_rows != p.table_rows) throw std::invalid_argument("tables: rows differ from the prepared ones");
    if ((c.positions == nullptr) != (p.positions == nullptr) || c.pos_is_int64 != p.pos_is_int64)
      throw std::invalid_argument("positions: presence or dtype differs from the prepared call");
    for (const void* t : {c.cos1, c.sin1, c.cos2, c.sin2})
      if (t == nullptr) throw std::invalid_argument("tables: null pointer");
    c.q = p.q; c.k = p.k;
    patch_tensor(c.q, q_in, q_out, "q");
    patch_tensor(c.k, k_in, k_out, "k");
    py::gil_scoped_release release;
    posattn::cpu::rope_cos_sin_forward(c, dtype, table_dtype, num_threads, chunk);
  }
};

}  // namespace

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
  py::class_<RopeLaunch>(m, "RopeLaunch",
                         "rope_forward prepared for one call signature; call(q_in, q_out, k_in, k_out, src, num_threads)")
      .def(py::init([](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
                       const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
                       const std::vector<int64_t>& angles, double sign, int dtype, int64_t chunk) {
             return RopeLaunch{posattn::rope_problem_from(q, k, dims, pos, freqs, attention_scaling, angles, sign),
                               dtype, chunk};
           }),
           py::arg("q"), py::arg("k"), py::arg("dims"), py::arg("pos"), py::arg("freqs"),
           py::arg("attention_scaling"), py::arg("angles"), py::arg("sign"), py::arg("dtype"), py::arg("chunk"))
      .def("__call__", &RopeLaunch::run, py::arg("q_in"), py::arg("q_out"), py::arg("k_in"), py::arg("k_out"),
           py::arg("src"), py::arg("num_threads"))
      .def("run_const", &RopeLaunch::run_const, py::arg("q_in"), py::arg("q_out"), py::arg("k_in"),
           py::arg("k_out"), py::arg("value"), py::arg("num_threads"));
  py::class_<CosSinLaunch>(m, "CosSinLaunch",
                           "rope_cos_sin_forward prepared for one call signature; "
                           "call(q_in, q_out, k_in, k_out, tables, positions, num_threads)")
      .def(py::init([](const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                       const std::vector<int64_t>& tables, const std::vector<int64_t>& positions, int64_t batch,
                       int64_t seqlen, int64_t head_dim, int rotary_dim, bool interleaved, bool copy_tail,
                       double sign, int dtype, int table_dtype, int64_t chunk) {
             return CosSinLaunch{posattn::cos_sin_problem_from(q, k, tables, positions, batch, seqlen, head_dim,
                                                               rotary_dim, interleaved, copy_tail, sign),
                                 dtype, table_dtype, chunk};
           }),
           py::arg("q"), py::arg("k"), py::arg("tables"), py::arg("positions"), py::arg("batch"),
           py::arg("seqlen"), py::arg("head_dim"), py::arg("rotary_dim"), py::arg("interleaved"),
           py::arg("copy_tail"), py::arg("sign"), py::arg("dtype"), py::arg("table_dtype"), py::arg("chunk"))
      .def("__call__", &CosSinLaunch::run, py::arg("q_in"), py::arg("q_out"), py::arg("k_in"), py::arg("k_out"),
           py::arg("tables"), py::arg("positions"), py::arg("num_threads"));
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
         int qk_round, int64_t out, int64_t lse, int num_threads, int rope_rows) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, qk_round, rope_rows);
        py::gil_scoped_release release;
        posattn::cpu::attention_forward(p, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                        num_threads);
      });
  m.def(
      "attention_backward",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int rotary_dim, bool interleaved,
         int qk_round, int64_t dout, int64_t delta, int64_t lse, int64_t dq, int64_t dk, int64_t dv,
         int num_threads, int rope_rows) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, qk_round, rope_rows);
        py::gil_scoped_release release;
        posattn::cpu::attention_backward(p, reinterpret_cast<const float*>(dout), reinterpret_cast<const float*>(delta),
                                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(dq),
                                         reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv), num_threads);
      });
  // anchor attention with a relative-position map (posattn.position_maps; attn_set_map's map_ptrs)
  m.def(
      "attention_forward_map",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int rotary_dim, bool interleaved,
         int qk_round, int64_t out, int64_t lse, int num_threads, int rope_rows, int map_code, double map_window,
         const std::vector<int64_t>& map_ptrs) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, qk_round, rope_rows);
        posattn::cpu::attn_set_map(p, map_code, map_window, map_ptrs);
        py::gil_scoped_release release;
        posattn::cpu::attention_forward(p, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                        num_threads);
      });
  m.def(
      "attention_backward_map",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int rotary_dim, bool interleaved,
         int qk_round, int64_t dout, int64_t delta, int64_t lse, int64_t dq, int64_t dk, int64_t dv,
         int num_threads, int rope_rows, int map_code, double map_window, const std::vector<int64_t>& map_ptrs) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, rotary_dim, interleaved, qk_round, rope_rows);
        posattn::cpu::attn_set_map(p, map_code, map_window, map_ptrs);
        py::gil_scoped_release release;
        posattn::cpu::attention_backward(p, reinterpret_cast<const float*>(dout), reinterpret_cast<const float*>(delta),
                                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(dq),
                                         reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv), num_threads);
      });
  // anchor attention over a rectangle of the step (posattn.distributed ring blocks; attn_set_rect):
  // T queries, Tk keys at the global tokens q_index / k_index (int32 pointers)
  m.def(
      "attention_forward_rect",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int64_t out, int64_t lse,
         int num_threads, int64_t Tk, int64_t q_index, int64_t k_index, bool hide_anchor_keys) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, 0, false, 0, 1);
        posattn::cpu::attn_set_rect(p, Tk, q_index, k_index, hide_anchor_keys);
        py::gil_scoped_release release;
        posattn::cpu::attention_forward(p, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                        num_threads);
      });
  m.def(
      "attention_backward_rect",
      [](int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs, float scale,
         int num_anchors, bool causal, int window, int block_m, int block_n, int64_t dout, int64_t delta,
         int64_t lse, int64_t dq, int64_t dk, int64_t dv, int num_threads, int64_t Tk, int64_t q_index,
         int64_t k_index, bool hide_anchor_keys) {
        auto p = posattn::cpu::attn_problem_from(T, HQ, HK, D, ptrs, scale, num_anchors, causal, window, block_m,
                                                 block_n, 0, false, 0, 1);
        posattn::cpu::attn_set_rect(p, Tk, q_index, k_index, hide_anchor_keys);
        py::gil_scoped_release release;
        posattn::cpu::attention_backward(p, reinterpret_cast<const float*>(dout), reinterpret_cast<const float*>(delta),
                                         reinterpret_cast<const float*>(lse), reinterpret_cast<float*>(dq),
                                         reinterpret_cast<float*>(dk), reinterpret_cast<float*>(dv), num_threads);
      });
  m.def(
      "decode_forward",
      [](const std::vector<int64_t>& dims, const std::vector<int64_t>& ptrs, const std::vector<int64_t>& strides,
         bool causal, int64_t window, float scale, int dtype, int num_splits, int block_n, int num_threads) {
        auto p = posattn::cpu::decode_problem_from(dims, ptrs, strides, causal, window, scale, dtype);
        py::gil_scoped_release release;
        posattn::cpu::decode_forward(p, num_splits, block_n, num_threads);
      },
      py::arg("dims"), py::arg("ptrs"), py::arg("strides"), py::arg("causal"), py::arg("window"), py::arg("scale"),
      py::arg("dtype"), py::arg("num_splits"), py::arg("block_n"), py::arg("num_threads"));
  m.def(
      "decode_forward_rot",
      [](const std::vector<int64_t>& dims, const std::vector<int64_t>& ptrs, const std::vector<int64_t>& strides,
         bool causal, int64_t window, float scale, int dtype, int num_splits, int block_n, int num_threads,
         const std::vector<int64_t>& rot_ints, const std::vector<int64_t>& rot_ptrs) {
        auto p = posattn::cpu::decode_problem_from(dims, ptrs, strides, causal, window, scale, dtype);
        posattn::cpu::decode_rotary_from(p, rot_ints, rot_ptrs);
        py::gil_scoped_release release;
        posattn::cpu::decode_forward(p, num_splits, block_n, num_threads);
      },
      py::arg("dims"), py::arg("ptrs"), py::arg("strides"), py::arg("causal"), py::arg("window"), py::arg("scale"),
      py::arg("dtype"), py::arg("num_splits"), py::arg("block_n"), py::arg("num_threads"), py::arg("rot_ints"),
      py::arg("rot_ptrs"));
  m.def(
      "topk_forward",
      [](int64_t scores, int64_t R, int64_t N, int64_t s_row, int64_t lengths, int64_t k, int64_t sinks,
         int64_t window, int64_t out, int num_threads) {
        py::gil_scoped_release release;
        posattn::cpu::topk_forward(reinterpret_cast<const float*>(scores), R, N, s_row,
                                   reinterpret_cast<const int32_t*>(lengths), k, sinks, window,
                                   reinterpret_cast<int32_t*>(out), num_threads);
      },
      py::arg("scores"), py::arg("R"), py::arg("N"), py::arg("s_row"), py::arg("lengths"), py::arg("k"),
      py::arg("sinks"), py::arg("window"), py::arg("out"), py::arg("num_threads"));
  m.def(
      "scores_forward",
      [](const std::vector<int64_t>& dims, const std::vector<int64_t>& ptrs, const std::vector<int64_t>& strides,
         bool interleaved, int dtype, float scale, int64_t block_s, int num_threads) {
        if (dims.size() != 7 || ptrs.size() < 6 || ptrs.size() > 10 || strides.size() != 11)
          throw std::invalid_argument("scores: expected 7 dims, 6 to 10 pointers (then soft_vote's output, q_far, "
                                      "ktab_far, far; 0 for none), 11 strides");
        posattn::cpu::ScoresProblem p{};
        p.B = dims[0]; p.HQ = dims[1]; p.HK = dims[2]; p.D = dims[3]; p.PS = dims[4]; p.MB = dims[5]; p.R = dims[6];
        p.interleaved = interleaved; p.dtype = dtype; p.scale = scale;
        p.q = reinterpret_cast<const float*>(ptrs[0]); p.k_cache = reinterpret_cast<const void*>(ptrs[1]);
        p.block_table = reinterpret_cast<const int32_t*>(ptrs[2]);
        p.cache_seqlens = reinterpret_cast<const int32_t*>(ptrs[3]);
        p.ktab = reinterpret_cast<const float*>(ptrs[4]); p.out = reinterpret_cast<float*>(ptrs[5]);
        p.vote = ptrs.size() > 6 ? reinterpret_cast<float*>(ptrs[6]) : nullptr;
        p.q_far = ptrs.size() > 7 ? reinterpret_cast<const float*>(ptrs[7]) : nullptr;
        p.ktab_far = ptrs.size() > 8 ? reinterpret_cast<const float*>(ptrs[8]) : nullptr;
        p.far = ptrs.size() > 9 ? reinterpret_cast<const uint8_t*>(ptrs[9]) : nullptr;
        if ((p.q_far || p.ktab_far || p.far) && !(p.q_far && p.ktab_far && p.far && p.ktab))
          throw std::invalid_argument("scores: a position map needs q_far, ktab_far, far and ktab together");
        p.s_qb = strides[0]; p.s_qh = strides[1]; p.s_kb = strides[2]; p.s_kt = strides[3]; p.s_kh = strides[4];
        p.s_bt = strides[5]; p.s_tc = strides[6]; p.s_tb = strides[7]; p.s_tt = strides[8];
        p.s_ob = strides[9]; p.s_oh = strides[10];
        if (p.HK <= 0 || p.HQ % p.HK) throw std::invalid_argument("scores: HQ must be a multiple of HK");
        py::gil_scoped_release release;
        posattn::cpu::scores_forward(p, block_s, num_threads);
      },
      py::arg("dims"), py::arg("ptrs"), py::arg("strides"), py::arg("interleaved"), py::arg("dtype"),
      py::arg("scale"), py::arg("block_s"), py::arg("num_threads"));
  m.def(
      "page_scores_forward",
      [](int64_t q, int64_t kmin, int64_t kmax, int dtype, int64_t page_ids, int64_t cache_seqlens, int64_t out,
         int64_t B, int64_t HQ, int64_t HK, int64_t D, int64_t MP, int64_t page_size, int num_threads) {
        if (HK <= 0 || HQ % HK) throw std::invalid_argument("page_scores: HQ must be a multiple of HK");
        py::gil_scoped_release release;
        posattn::cpu::page_scores_forward(reinterpret_cast<const float*>(q), reinterpret_cast<const void*>(kmin),
                                          reinterpret_cast<const void*>(kmax), dtype,
                                          reinterpret_cast<const int32_t*>(page_ids),
                                          reinterpret_cast<const int32_t*>(cache_seqlens), reinterpret_cast<float*>(out),
                                          B, HQ, HK, D, MP, page_size, num_threads);
      });
  m.def(
      "rope_table",
      [](int64_t positions, int pos_dtype, int64_t T, int64_t inv_freq, int half, double attention_scaling,
         int64_t out, int num_threads) {
        if (T > 0 && half > 0 && (positions == 0 || inv_freq == 0 || out == 0))
          throw std::invalid_argument("rope_table: null pointer");
        if (pos_dtype < 0 || pos_dtype > 3) throw std::invalid_argument("rope_table: bad positions dtype code");
        py::gil_scoped_release release;
        posattn::cpu::rope_table(reinterpret_cast<const void*>(positions), pos_dtype, T,
                                 reinterpret_cast<const float*>(inv_freq), half, attention_scaling,
                                 reinterpret_cast<float*>(out), num_threads);
      },
      py::arg("positions"), py::arg("pos_dtype"), py::arg("T"), py::arg("inv_freq"), py::arg("half"),
      py::arg("attention_scaling"), py::arg("out"), py::arg("num_threads") = 0);
  // Exposed for tests of the shared header math.
  m.def("rope_angle", [](double pos, float inv_freq) { return posattn::rope_angle(pos, inv_freq); });
  m.def("rope_reduce", [](double pos, float inv_freq) { return posattn::rope_reduce(pos, inv_freq); });
  m.def("rope_sincos", [](double r) { double s, c; posattn::rope_sincos_poly(r, s, c); return py::make_tuple(s, c); });
  // The CUDA launchers' host-side planning (posattn/cuda_launch.h), for tests without a GPU.
  m.def(
      "cuda_pick_vec",
      [](int elem_bytes, int half, bool interleaved, int64_t batch, int64_t seqlen,
         const std::vector<std::vector<int64_t>>& views) {
        std::vector<posattn::VecView> vs;
        for (const auto& v : views) {
          if (v.size() != 9) throw std::invalid_argument("cuda_pick_vec: a view is 9 integers");
          vs.push_back(posattn::VecView{reinterpret_cast<const void*>(v[0]), reinterpret_cast<const void*>(v[1]),
                                        v[2], v[3], v[4], v[5], v[6], v[7], v[8]});
        }
        return posattn::pick_vec_width(elem_bytes, half, interleaved, batch, seqlen, vs.data(), int(vs.size()));
      },
      py::arg("elem_bytes"), py::arg("half"), py::arg("interleaved"), py::arg("batch"), py::arg("seqlen"),
      py::arg("views"));
  m.def(
      "cuda_cos_sin_plan",
      [](int64_t tokens, int64_t heads, int half, int acc_bytes, int pairs_per_chunk, int threads, int sm_count) {
        const auto pl = posattn::cos_sin_launch_plan(tokens, heads, half, acc_bytes, pairs_per_chunk, threads,
                                                     sm_count);
        py::dict d;
        d["threads"] = pl.threads; d["tpb"] = pl.tpb; d["hpb"] = pl.hpb; d["token_blocks"] = pl.token_blocks;
        d["grid_x"] = pl.grid_x; d["grid_y"] = pl.grid_y; d["smem"] = pl.smem; d["smem_attr"] = pl.smem_attr;
        return d;
      },
      py::arg("tokens"), py::arg("heads"), py::arg("half"), py::arg("acc_bytes"), py::arg("pairs_per_chunk"),
      py::arg("threads"), py::arg("sm_count"));
  m.def(
      "cuda_split_heads",
      [](int64_t tokens, int64_t heads, int64_t chunks_per_head, int threads, int64_t target) {
        const auto hs = posattn::split_heads(tokens, heads, chunks_per_head, threads, target);
        return py::make_tuple(hs.hpb, hs.threads);
      },
      py::arg("tokens"), py::arg("heads"), py::arg("chunks_per_head"), py::arg("threads"), py::arg("sm_count"));
  m.def(
      "cuda_cos_sin_item",
      [](int e, int per_tok, int cph, int ppc, int h0) {
        const auto it = posattn::cos_sin_item(e, per_tok, cph, ppc, h0);
        return py::make_tuple(it.t, it.h, it.i0);
      },
      py::arg("e"), py::arg("per_tok"), py::arg("cph"), py::arg("ppc"), py::arg("h0"));
  m.def("bf16_round", [](float f) { return posattn::to_float(posattn::bf16_from_float(f)); });
  m.def("fp16_round", [](float f) { return posattn::to_float(posattn::half_from_float(f)); });
  // rope_and_cache / kv_compact (posattn/kernels/cpu_cache.py packs the integers; csrc/cache_args.h reads them)
  m.def(
      "rope_cache_forward",
      [](const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& dims,
         const std::vector<int64_t>& pos, const std::vector<int64_t>& freqs, double attention_scaling,
         const std::vector<int64_t>& cache, int dtype, int num_threads) {
        auto c = posattn::cache_problem_from(q, k, dims, pos, freqs, attention_scaling, cache);
        py::gil_scoped_release release;
        return std::string(posattn::cpu::rope_cache_forward(c, dtype, num_threads));
      });
  m.def("kv_compact_forward", [](const std::vector<int64_t>& a, int num_threads) {
    auto p = posattn::compact_problem_from(a);
    py::gil_scoped_release release;
    posattn::cpu::kv_compact_forward(p, num_threads);
  });
  m.def("vq_assign_forward",
        [](int64_t keys, int dtype, int64_t T, int64_t HK, int64_t D, int64_t s_kt, int64_t s_kh, int64_t mc,
           int64_t cn, int64_t C, int64_t codes, int code_bytes, int num_threads) {
          if (code_bytes != 2 && code_bytes != 4) throw std::invalid_argument("vq_assign: code_bytes must be 2 or 4");
          if (dtype < 0 || dtype > 2) throw std::invalid_argument("vq_assign: bad keys dtype code");
          py::gil_scoped_release release;
          posattn::cpu::vq_assign_forward(reinterpret_cast<const void*>(keys), dtype, T, HK, D, s_kt, s_kh,
                                          reinterpret_cast<const float*>(mc), reinterpret_cast<const float*>(cn), C,
                                          reinterpret_cast<void*>(codes), code_bytes, num_threads);
        });
  m.def("vq_code_scores_forward",
        [](const std::vector<int64_t>& dims, const std::vector<int64_t>& ptrs, const std::vector<int64_t>& strides,
           int code_bytes, float scale, int64_t block_s, int num_threads) {
          if (dims.size() != 7 || ptrs.size() != 6 || strides.size() != 5)
            throw std::invalid_argument("vq_code_scores: expected 7 dims, 6 pointers, 5 strides");
          if (code_bytes != 2 && code_bytes != 4)
            throw std::invalid_argument("vq_code_scores: code_bytes must be 2 or 4");
          if (dims[2] <= 0 || dims[1] % dims[2])
            throw std::invalid_argument("vq_code_scores: HQ must be a multiple of HK");
          py::gil_scoped_release release;
          posattn::cpu::vq_code_scores_forward(
              reinterpret_cast<const float*>(ptrs[0]), reinterpret_cast<const float*>(ptrs[1]),
              reinterpret_cast<const void*>(ptrs[2]), code_bytes, strides[0], strides[1],
              reinterpret_cast<const int32_t*>(ptrs[3]), strides[2], reinterpret_cast<const int32_t*>(ptrs[4]),
              reinterpret_cast<float*>(ptrs[5]), strides[3], strides[4], dims[0], dims[1], dims[2], dims[3], dims[4],
              dims[5], dims[6], scale, block_s, num_threads);
        });
}
