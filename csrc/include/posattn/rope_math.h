// Rotary-embedding math shared by the CPU and CUDA kernels.
//
// For pair p of a head (p < rotary_dim/2) and a token at position t:
//   theta = t * inv_freq[p], reduced modulo 2*pi in fp64 before sin/cos so
//   that the angle stays accurate (error ~1e-7 rad) up to t = 2^31; plain fp32
//   products err by up to 0.03 rad around t = 1e6.
//   half-split (GPT-NeoX): x1 = x[p], x2 = x[p + rotary_dim/2]
//   interleaved (GPT-J):   x1 = x[2p], x2 = x[2p + 1]
//   out1 = x1*cos - x2*sin ; out2 = x2*cos + x1*sin
// Dimensions >= rotary_dim are passed through unchanged.
#pragma once
#include "posattn/common.h"

namespace posattn {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kInvTwoPi = 0.15915494309189533576888376337251;

// Angle position*inv_freq reduced to [0, 2pi), returned in fp32.
POSATTN_HD float rope_angle(double position, float inv_freq) {
  double a = position * double(inv_freq);
  a -= floor(a * kInvTwoPi) * kTwoPi;
  return float(a);
}

// Index of the two elements of pair p.
POSATTN_HD void rope_pair_index(int p, int rotary_dim, bool interleaved, int& i1, int& i2) {
  if (interleaved) { i1 = 2 * p; i2 = 2 * p + 1; }
  else { i1 = p; i2 = p + rotary_dim / 2; }
}

POSATTN_HD void rope_rotate(float x1, float x2, float c, float s, float& o1, float& o2) {
  o1 = x1 * c - x2 * s;
  o2 = x2 * c + x1 * s;
}

// Problem description passed by value to both kernels. Tensors are viewed as
// [B, S, H, D] with the last dimension contiguous; strides are in elements.
struct RopeTensor {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
};

struct RopeProblem {
  RopeTensor q, k;          // k.in == nullptr when there is no key tensor
  int64_t batch, seqlen, head_dim;
  const void* positions;    // [Bp, S] int32/int64
  bool pos_is_int64;
  int64_t pos_sb, pos_ss;   // pos_sb == 0 when positions are shared across the batch
  const float* inv_freq;    // [rotary_dim/2]
  int rotary_dim;
  bool interleaved;
  bool copy_tail;           // copy dims >= rotary_dim (out-of-place)
};

POSATTN_HD int64_t rope_load_position(const RopeProblem& p, int64_t b, int64_t s) {
  int64_t off = b * p.pos_sb + s * p.pos_ss;
  return p.pos_is_int64 ? static_cast<const int64_t*>(p.positions)[off]
                        : int64_t(static_cast<const int32_t*>(p.positions)[off]);
}

// Rotate the heads of one tensor at one token, given the token's cos/sin.
template <typename T>
POSATTN_HD void rope_token_heads(const RopeProblem& p, const RopeTensor& t, int64_t b, int64_t s,
                                 const float* cos_p, const float* sin_p) {
  const int half = p.rotary_dim / 2;
  for (int64_t h = 0; h < t.heads; ++h) {
    const T* x = static_cast<const T*>(t.in) + b * t.in_sb + s * t.in_ss + h * t.in_sh;
    T* o = static_cast<T*>(t.out) + b * t.out_sb + s * t.out_ss + h * t.out_sh;
    if (p.interleaved) {
      for (int i = 0; i < half; ++i) {
        float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
        float o1, o2;
        rope_rotate(x1, x2, cos_p[i], sin_p[i], o1, o2);
        o[2 * i] = from_float<T>(o1);
        o[2 * i + 1] = from_float<T>(o2);
      }
    } else {
      for (int i = 0; i < half; ++i) {
        float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
        float o1, o2;
        rope_rotate(x1, x2, cos_p[i], sin_p[i], o1, o2);
        o[i] = from_float<T>(o1);
        o[i + half] = from_float<T>(o2);
      }
    }
    if (p.copy_tail)
      for (int64_t d = p.rotary_dim; d < p.head_dim; ++d) o[d] = x[d];
  }
}

}  // namespace posattn
