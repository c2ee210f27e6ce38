// Anchor-attention mask and rotary helpers shared by the CPU (and a future CUDA) kernel.
//
// allowed(i, j) = ((doc(i) == doc(j) and in_window(i, j))
//                  or row_start(i) <= j < row_start(i) + num_anchors)
//                 and (j <= i when causal)
// in_window(i, j) = i - j < window (causal), |i - j| < window (non-causal); window <= 0: none.
// doc(i) is identified by the first token of i's document (doc_start[i]).
#pragma once
#include "posattn/rope_math.h"

namespace posattn {

POSATTN_HD bool anchor_allowed(int64_t i, int64_t j, int32_t doc_i, int32_t doc_j, int32_t row_i,
                               int num_anchors, bool causal, int window) {
  if (causal && j > i) return false;
  if (j >= row_i && j < int64_t(row_i) + num_anchors) return true;
  if (doc_i != doc_j) return false;
  if (window > 0) {
    int64_t d = i - j;
    if (d >= window || -d >= window) return false;
  }
  return true;
}

// Rotate one head row x[D] in place by theta (sign = +1) or -theta (sign = -1); cos_p/sin_p
// hold the token's table row (attention_scaling folded in, as the rotary kernels apply it):
//   o1 = x1 c - x2 s, o2 = x2 c + x1 s     (sign = -1: s negated, the transpose)
// round: 0 keeps fp32, 1 / 2 round the rotary dims to fp16 / bf16 (what apply_rope stores).
POSATTN_HD float round_to(float v, int round) {
  if (round == 1) return to_float(half_from_float(v));
  if (round == 2) return to_float(bf16_from_float(v));
  return v;
}

POSATTN_HD void rope_rotate_row(float* x, const float* cos_p, const float* sin_p, int rotary_dim,
                                bool interleaved, float sign, int round) {
  for (int p = 0; p < rotary_dim / 2; ++p) {
    int i1, i2;
    rope_pair_index(p, rotary_dim, interleaved, i1, i2);
    float o1, o2;
    rope_rotate(x[i1], x[i2], cos_p[p], sign * sin_p[p], o1, o2);
    x[i1] = round_to(o1, round);
    x[i2] = round_to(o2, round);
  }
}

}  // namespace posattn
