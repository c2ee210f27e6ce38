#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace posattn { namespace cpu {

// The lowered decode problem (posattn/kernels/reference/decode.py), on host memory.
// q [T, HQ, D] and out [T, HQ, D] with the given token/head strides (last dim contiguous);
// k_cache, v_cache [num_blocks, page_size, HK, D] with the given strides; block_table int32
// [B, max_blocks] (row stride s_bt); cache_seqlens int32 [B]; cu_seqlens_q int32 [B+1];
// tree_mask int32 [T, W] (row stride s_tm) or nullptr; lse fp32 [T, HQ].
// dtype: 0 fp32, 1 fp16, 2 bf16 (q, caches and out share it).
struct DecodeProblem {
  int64_t T, B, HQ, HK, D, page_size, max_blocks;
  const void* q; int64_t s_qt, s_qh;
  const void* k_cache; int64_t s_kb, s_kt, s_kh;
  const void* v_cache; int64_t s_vb, s_vt, s_vh;
  const int32_t* block_table; int64_t s_bt;
  const int32_t* cache_seqlens; const int32_t* cu_seqlens_q;
  const int32_t* tree_mask; int64_t s_tm;
  bool causal; int64_t window; float scale; int dtype;
  void* out; int64_t s_ot, s_oh; float* lse;
  // sparse decode: int32 [B, idx_heads, budget] cached slots per head (idx_heads = HK or HQ), or nullptr
  const int32_t* kv_indices; int64_t s_ib, s_ih, budget, idx_heads;
  // in-kernel rotation (posattn/decode/rotary.py's DecodeRotary), all nullptr when none:
  // qn/qf fp32 [T, HQ, D] q rotated at its near / far positions (strides s_nt, s_nh);
  // kt/ktf fp32 tables [2, rows, S, R/2] (cos at +0, sin at +s_tc; row stride s_tb, 0 for one
  // row; slot stride s_tt) rotating the cached pre-RoPE keys near / far (kt nullptr: keys as stored);
  // map_code (posattn/position_maps.py: 1..3 distance maps, 4 VistaRoPE) with map_window, qpos fp64 [T],
  // kpos fp64 [rows, S] (row stride s_kpb), visual uint8 [B, S] (row stride s_vis)
  const float* qn = nullptr; const float* qf = nullptr; int64_t s_nt = 0, s_nh = 0;
  const float* kt = nullptr; const float* ktf = nullptr; int64_t s_tc = 0, s_tb = 0, s_tt = 0, rot_dim = 0;
  bool interleaved = false; int map_code = 0; int64_t map_window = 0;
  const double* qpos = nullptr; const double* kpos = nullptr; int64_t s_kpb = 0;
  const uint8_t* visual = nullptr; int64_t s_vis = 0;
  int64_t s_fc = 0, s_fb = 0, s_ft = 0;   // ktf's strides (0 for its one row / one slot: ReRoPE, VistaRoPE)
};

// num_splits <= 0: one split unless there are fewer (request, KV head) tasks than 2 * threads.
void decode_forward(const DecodeProblem& p, int num_splits, int block_n, int num_threads);

// From the flat integers the binding takes (see posattn/kernels/cpu_decode.py for the order).
inline DecodeProblem decode_problem_from(const std::vector<int64_t>& dims, const std::vector<int64_t>& ptrs,
                                         const std::vector<int64_t>& strides, bool causal, int64_t window,
                                         float scale, int dtype) {
  if (dims.size() != 9 || ptrs.size() != 10 || strides.size() != 14)
    throw std::invalid_argument("decode: expected 9 dims, 10 pointers, 14 strides");
  DecodeProblem p{};
  p.T = dims[0]; p.B = dims[1]; p.HQ = dims[2]; p.HK = dims[3]; p.D = dims[4]; p.page_size = dims[5];
  p.max_blocks = dims[6]; p.budget = dims[7]; p.idx_heads = dims[8];
  if (p.HK <= 0 || p.HQ % p.HK) throw std::invalid_argument("decode: HQ must be a multiple of HK");
  if (p.page_size <= 0 || p.max_blocks <= 0) throw std::invalid_argument("decode: empty cache geometry");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("decode: dtype code must be 0, 1 or 2");
  p.q = reinterpret_cast<const void*>(ptrs[0]);
  p.k_cache = reinterpret_cast<const void*>(ptrs[1]);
  p.v_cache = reinterpret_cast<const void*>(ptrs[2]);
  p.block_table = reinterpret_cast<const int32_t*>(ptrs[3]);
  p.cache_seqlens = reinterpret_cast<const int32_t*>(ptrs[4]);
  p.cu_seqlens_q = reinterpret_cast<const int32_t*>(ptrs[5]);
  p.tree_mask = reinterpret_cast<const int32_t*>(ptrs[6]);
  p.out = reinterpret_cast<void*>(ptrs[7]);
  p.lse = reinterpret_cast<float*>(ptrs[8]);
  p.kv_indices = reinterpret_cast<const int32_t*>(ptrs[9]);
  if (p.kv_indices != nullptr && p.idx_heads != p.HK && p.idx_heads != p.HQ)
    throw std::invalid_argument("decode: kv_indices must have HK or HQ heads");
  p.s_qt = strides[0]; p.s_qh = strides[1];
  p.s_kb = strides[2]; p.s_kt = strides[3]; p.s_kh = strides[4];
  p.s_vb = strides[5]; p.s_vt = strides[6]; p.s_vh = strides[7];
  p.s_bt = strides[8]; p.s_tm = strides[9]; p.s_ot = strides[10]; p.s_oh = strides[11];
  p.s_ib = strides[12]; p.s_ih = strides[13];
  p.causal = causal; p.window = window; p.scale = scale; p.dtype = dtype;
  return p;
}

// The rotation fields from the binding's integers: ints [s_nt, s_nh, s_tc, s_tb, s_tt, rot_dim,
// interleaved, map_code, map_window, s_kpb, s_vis, s_fc, s_fb, s_ft], ptrs [qn, qf, kt, ktf, qpos, kpos, visual].
inline void decode_rotary_from(DecodeProblem& p, const std::vector<int64_t>& ints, const std::vector<int64_t>& ptrs) {
  if (ints.size() != 14 || ptrs.size() != 7) throw std::invalid_argument("decode: expected 14 rotary ints, 7 pointers");
  p.s_nt = ints[0]; p.s_nh = ints[1]; p.s_tc = ints[2]; p.s_tb = ints[3]; p.s_tt = ints[4]; p.rot_dim = ints[5];
  p.interleaved = ints[6] != 0; p.map_code = int(ints[7]); p.map_window = ints[8]; p.s_kpb = ints[9]; p.s_vis = ints[10];
  p.s_fc = ints[11]; p.s_fb = ints[12]; p.s_ft = ints[13];
  p.qn = reinterpret_cast<const float*>(ptrs[0]); p.qf = reinterpret_cast<const float*>(ptrs[1]);
  p.kt = reinterpret_cast<const float*>(ptrs[2]); p.ktf = reinterpret_cast<const float*>(ptrs[3]);
  p.qpos = reinterpret_cast<const double*>(ptrs[4]); p.kpos = reinterpret_cast<const double*>(ptrs[5]);
  p.visual = reinterpret_cast<const uint8_t*>(ptrs[6]);
  if (p.qn == nullptr) throw std::invalid_argument("decode: rotation needs the rotated q");
  if (p.rot_dim < 2 || p.rot_dim > p.D || p.rot_dim % 2) throw std::invalid_argument("decode: bad rotary_dim");
  if (p.map_code != 0 && (p.qf == nullptr || p.kt == nullptr || p.ktf == nullptr ||
                          (p.map_code == 4 ? p.visual == nullptr : (p.qpos == nullptr || p.kpos == nullptr))))
    throw std::invalid_argument("decode: a position map needs qf, both key tables and its positions or flags");
}

} }
