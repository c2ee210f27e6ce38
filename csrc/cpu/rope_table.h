#pragma once
#include <cstdint>

namespace posattn { namespace cpu {

// The cos/sin table of one call (posattn/rope/table.py), for fused attention and decode:
//   out[0, t, p] = float(a * cos(theta)), out[1, t, p] = float(a * sin(theta)),
//   theta = positions[t] * inv_freq[p] reduced exactly (rope_reduce), fp64 sin/cos
//   (rope_sincos_poly), a = attention_scaling: the values the CPU rotary kernel multiplies by.
// positions: [T] of PosType pos_dtype (contiguous); inv_freq: fp32 [half]; out: fp32 [2, T, half].
void rope_table(const void* positions, int pos_dtype, int64_t T, const float* inv_freq, int half,
                double attention_scaling, float* out, int num_threads);

} }
