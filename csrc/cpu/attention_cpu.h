#pragma once
#include <cstdint>
#include <stdexcept>
#include <vector>
#include "posattn/attention_math.h"

namespace posattn { namespace cpu {

// Packed anchor attention over block visit lists (posattn.attention.masks.BlockLists).
// q: [T, HQ, D], k, v: [T, HK, D], fp32, contiguous.
struct AttnProblem {
  int64_t T, HQ, HK, D;
  const float* q; const float* k; const float* v;
  float scale;
  const int32_t* doc_start; const int32_t* row_start;    // [T]
  int num_anchors; bool causal; int window;               // window <= 0: none
  int block_m, block_n;
  const int32_t* q_offsets; const int32_t* q_kv_idx; const int32_t* q_kv_masked;   // query-major CSR
  const int32_t* k_offsets; const int32_t* k_q_idx; const int32_t* k_q_masked;     // key-major CSR
  // rotary: the call's tables (posattn/rope/table.py attention_tables) [rope_rows, T, R/2] each,
  // attention_scaling folded in, for q (rope_cos/sin) and k (rope_kcos/ksin, which may alias q's);
  // head h of a tensor with H heads reads row h / (H / rope_rows) (per-head frequencies).
  // rope_cos == nullptr: no rotary. The rotated q and k are rounded to the input dtype
  // (qk_round: 0 fp32, 1 fp16, 2 bf16), as apply_rope's output is, before the products.
  const float* rope_cos; const float* rope_sin;
  int rotary_dim; bool interleaved; int qk_round;
  const float* rope_kcos; const float* rope_ksin; int rope_rows;
  // relative-position map (posattn.position_maps; map_code 0: none). Pair (i, j) is "far" when
  // map_pos[i] - map_pos[j] >= map_window (fp64 positions; codes 1-3), or, VistaRoPE (code 4),
  // when !map_visual[i] && map_visual[j]; a far pair multiplies q and k rotated by the far
  // tables (far_qcos/far_qsin for q, far_kcos/far_ksin for k, laid out as rope_cos) instead.
  int map_code = 0; double map_window = 0.0;
  const double* map_pos = nullptr; const uint8_t* map_visual = nullptr;
  const float* far_qcos = nullptr; const float* far_qsin = nullptr;
  const float* far_kcos = nullptr; const float* far_ksin = nullptr;
  // rectangle (posattn.distributed's ring blocks, attn_set_rect): the T queries are the step's tokens
  // q_index[0..T), the Tk keys (k, v: [Tk, HK, D]) its tokens k_index[0..Tk) (int32, ascending);
  // doc_start / row_start then cover the whole step and are read at those global indices, so the
  // mask is the step's. hide_anchor_keys: a key that is an anchor of its own row is hidden (the
  // ring attends the anchors once, in its anchor block). q_index == nullptr: Tk = T, identity.
  int64_t Tk = -1;
  const int32_t* q_index = nullptr; const int32_t* k_index = nullptr;
  bool hide_anchor_keys = false;
};

inline int64_t kv_len(const AttnProblem& p) { return p.Tk < 0 ? p.T : p.Tk; }

// May query i see key j (local rows of q and k; global tokens through the rectangle's indices)?
inline bool attn_allowed(const AttnProblem& p, int64_t i, int64_t j) {
  if (p.q_index != nullptr) {
    i = p.q_index[i];
    j = p.k_index[j];
    if (p.hide_anchor_keys && j < int64_t(p.row_start[j]) + p.num_anchors) return false;
  }
  return anchor_allowed(i, j, p.doc_start[i], p.doc_start[j], p.row_start[i], p.num_anchors, p.causal, p.window);
}

// Makes ``p`` a rectangle: Tk keys, the global token indices of queries and keys (both non-null).
// The ring rotates q and k before its blocks, so the rectangle takes no rotary table or map.
inline void attn_set_rect(AttnProblem& p, int64_t Tk, int64_t q_index, int64_t k_index, bool hide_anchor_keys) {
  if (Tk < 0) throw std::invalid_argument("attention: the rectangle's key count Tk must be >= 0");
  if (!q_index || !k_index) throw std::invalid_argument("attention: a rectangle needs q_index and k_index");
  if (p.rope_cos != nullptr || p.map_code != 0)
    throw std::invalid_argument("attention: a rectangle takes rotated q and k (no rotary table or map)");
  p.Tk = Tk;
  p.q_index = reinterpret_cast<const int32_t*>(q_index);
  p.k_index = reinterpret_cast<const int32_t*>(k_index);
  p.hide_anchor_keys = hide_anchor_keys;
}

// Whether pair (i, j) takes the map's far rotation.
inline bool pair_is_far(const AttnProblem& p, int64_t i, int64_t j) {
  if (p.map_code == 0) return false;
  if (p.map_code == 4) return !p.map_visual[i] && p.map_visual[j];
  return p.map_pos[i] - p.map_pos[j] >= p.map_window;
}

// Sets the map of ``p``: map_ptrs = (far_qcos, far_qsin, far_kcos, far_ksin, map_pos fp64 [T],
// map_visual uint8 [T] or 0).
inline void attn_set_map(AttnProblem& p, int map_code, double map_window, const std::vector<int64_t>& map_ptrs) {
  if (map_code < 0 || map_code > 4) throw std::invalid_argument("attention: map_code must be in 0..4");
  if (map_code == 0) return;
  if (map_ptrs.size() != 6) throw std::invalid_argument("attention: a position map needs 6 pointers");
  if (p.rope_cos == nullptr) throw std::invalid_argument("attention: a position map needs rotary tables");
  for (int i = 0; i < 5; ++i)
    if (!map_ptrs[i]) throw std::invalid_argument("attention: a position map's tables and positions are required");
  if (map_code == 4 && !map_ptrs[5]) throw std::invalid_argument("attention: VistaRoPE needs the visual flags");
  auto f = [&](int i) { return reinterpret_cast<const float*>(map_ptrs[i]); };
  p.map_code = map_code;
  p.map_window = map_window;
  p.far_qcos = f(0); p.far_qsin = f(1); p.far_kcos = f(2); p.far_ksin = f(3);
  p.map_pos = reinterpret_cast<const double*>(map_ptrs[4]);
  p.map_visual = reinterpret_cast<const uint8_t*>(map_ptrs[5]);
}

// out: [T, HQ, D] fp32, lse: [HQ, T] fp32 (natural log).
void attention_forward(const AttnProblem& p, float* out, float* lse, int num_threads);
// dout: [T, HQ, D]; delta: [HQ, T] = rowsum(out * dout) - dlse; lse: [HQ, T].
void attention_backward(const AttnProblem& p, const float* dout, const float* delta, const float* lse,
                        float* dq, float* dk, float* dv, int num_threads);

// From the flat integers the binding takes: ptrs = (q, k, v, doc_start, row_start, q_offsets, q_kv_idx,
// q_kv_masked, k_offsets, k_q_idx, k_q_masked, rope_cos, rope_sin[, rope_kcos, rope_ksin]); 0 for an
// absent one (without the k tables, k reads q's).
inline AttnProblem attn_problem_from(int64_t T, int64_t HQ, int64_t HK, int64_t D, const std::vector<int64_t>& ptrs,
                                     float scale, int num_anchors, bool causal, int window, int block_m,
                                     int block_n, int rotary_dim, bool interleaved, int qk_round,
                                     int rope_rows = 1) {
  if (ptrs.size() != 13 && ptrs.size() != 15) throw std::invalid_argument("attention: expected 13 or 15 pointers");
  if (HK <= 0 || HQ % HK) throw std::invalid_argument("attention: HQ must be a multiple of HK");
  if (block_m <= 0 || block_n <= 0) throw std::invalid_argument("attention: block sizes must be positive");
  auto f = [&](int i) { return reinterpret_cast<const float*>(ptrs[i]); };
  auto n = [&](int i) { return reinterpret_cast<const int32_t*>(ptrs[i]); };
  AttnProblem p{T, HQ, HK, D, f(0), f(1), f(2), scale, n(3), n(4), num_anchors, causal, window, block_m, block_n,
                n(5), n(6), n(7), n(8), n(9), n(10), f(11), f(12), rotary_dim, interleaved, qk_round,
                ptrs.size() == 15 && ptrs[13] ? f(13) : f(11), ptrs.size() == 15 && ptrs[14] ? f(14) : f(12),
                rope_rows};
  if (p.rope_cos != nullptr && (rotary_dim <= 0 || rotary_dim % 2 || rotary_dim > D || p.rope_sin == nullptr))
    throw std::invalid_argument("attention: rotary_dim must be even and in (0, head_dim], with a sin table");
  if (qk_round < 0 || qk_round > 2) throw std::invalid_argument("attention: qk_round must be 0, 1 or 2");
  if (rope_rows < 1 || HQ % rope_rows || HK % rope_rows)
    throw std::invalid_argument("attention: rope_rows must divide both head counts");
  return p;
}

} }
