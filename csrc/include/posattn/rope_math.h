// Rotary-embedding math shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// The kernels see the lowered tables of posattn/lowered.py (RopeTables),
// never a spec. For pair p (p < R/2, R = rotary_dim) of head h of a token:
//
//   axis  = pair_axis[p]                  (0 without multi-axis sections)
//   pos   = positions[axis, b, s]         (int32 / int64 / fp32 / fp64)
//   DPE:    pos = floor(pos / pair_pos_scale[p]) (+ pair_q_offset[p] for queries)
//   theta = pos * inv_freq[row(h), p]     row(h) = h / (H / rows): per-head tables
//   cos, sin = attention_scaling * cos(theta), sign * attention_scaling * sin(theta)
//   or, for explicit angles: theta = angles[b, s, row(h), p]
//
//   half-split (GPT-NeoX): x1 = x[p], x2 = x[p + R/2];  interleaved: x1 = x[2p], x2 = x[2p+1]
//   out1 = x1*cos - x2*sin ; out2 = x2*cos + x1*sin ; dims >= R pass through.
//
// sign = -1 rotates by -theta: the backward of the rotation (and the undo step of
// rope_shift).
//
// Angle accuracy: theta is reduced modulo 2*pi without ever forming a rounded
// fp32 (or even fp64) product. The position is split into a high part (a
// multiple of 4096, <= 19 significant bits below 2^31) and a low part (< 4096),
// so both partial products with the 24-bit inv_freq are exact in fp64; each is
// reduced with a three-part (Cody-Waite) 2*pi whose first part has 24 bits, so
// k * C1 is exact too. The reduced angle is within ~1e-15 rad of the exact one
// for integer positions below 2^31 (fp32 positions: exact in their own value).
// Nothing here needs an FMA instruction, and FMA contraction by the compiler
// only makes the steps more exact.
#pragma once
#include "posattn/common.h"

namespace posattn {

constexpr double kTwoPi = 6.283185307179586476925286766559;
constexpr double kInvTwoPi = 0.15915494309189533576888376337251;
// 2*pi = kTwoPiC1 + kTwoPiC2 (+ 1e-23): C1 has 24 significant bits.
constexpr double kTwoPiC1 = 6.2831854820251465;
constexpr double kTwoPiC2 = -1.748455600074497e-07;
// pi/2 as a double-double, for the quadrant reduction of the host sincos
constexpr double kPiOver2Hi = 1.5707963267948966;
constexpr double kPiOver2Lo = 6.123233995736766e-17;
constexpr double kTwoOverPi = 0.63661977236758134308;

// positions dtype codes (posattn/kernels/native.py POS_CODE)
enum PosType : int { kPosInt32 = 0, kPosInt64 = 1, kPosFloat32 = 2, kPosFloat64 = 3 };

POSATTN_HD double rope_floor(double x) {
#if defined(__CUDA_ARCH__)
  return ::floor(x);
#else
  return __builtin_floor(x);
#endif
}
POSATTN_HD double rope_rint(double x) {
#if defined(__CUDA_ARCH__)
  return ::rint(x);
#else
  return __builtin_rint(x);
#endif
}

// x - 2*pi*round(x / 2*pi), for an x that is itself exact (see the header comment).
POSATTN_HD double rope_reduce_exact(double x) {
  const double k = rope_rint(x * kInvTwoPi);
  return (x - k * kTwoPiC1) - k * kTwoPiC2;
}

// position * inv_freq reduced to [-pi, pi] (fp64; ~1e-15 rad from exact below 2^31).
POSATTN_HD double rope_reduce(double position, float inv_freq) {
  const double f = double(inv_freq);
  const double hi = rope_floor(position * (1.0 / 4096.0)) * 4096.0;  // exact
  const double lo = position - hi;                                   // exact, in [0, 4096)
  double r = rope_reduce_exact(hi * f) + rope_reduce_exact(lo * f);   // each product exact
  return r - rope_rint(r * kInvTwoPi) * kTwoPi;                       // |r| <= 2pi: k in {-1,0,1}
}

// The fp32 angle a GPU kernel feeds to sincosf (kept for tests and
// benchmarks/angle_accuracy.py).
POSATTN_HD float rope_angle(double position, float inv_freq) {
  return float(rope_reduce(position, inv_freq));
}

// sin and cos of r in [-pi, pi] in fp64, branch-free so that loops over pairs
// vectorise on the host: quadrant reduction by a double-double pi/2, then Taylor
// polynomials on [-pi/4, pi/4] (truncation error < 3e-14).
POSATTN_HD void rope_sincos_poly(double r, double& s, double& c) {
  const double j = rope_rint(r * kTwoOverPi);           // -2 .. 2
  const double t = (r - j * kPiOver2Hi) - j * kPiOver2Lo;
  const double t2 = t * t;
  const double ps = t * (1.0 + t2 * (-1.0 / 6 + t2 * (1.0 / 120 + t2 * (-1.0 / 5040 + t2 * (1.0 / 362880 +
                    t2 * (-1.0 / 39916800 + t2 * (1.0 / 6227020800.0)))))));
  const double pc = 1.0 + t2 * (-0.5 + t2 * (1.0 / 24 + t2 * (-1.0 / 720 + t2 * (1.0 / 40320 +
                    t2 * (-1.0 / 3628800 + t2 * (1.0 / 479001600.0 + t2 * (-1.0 / 87178291200.0)))))));
  const double q = j - 4.0 * rope_floor(j * 0.25);      // quadrant 0..3
  const bool swap = (q == 1.0) | (q == 3.0);
  const double sv = swap ? pc : ps;
  const double cv = swap ? ps : pc;
  s = (q >= 2.0) ? -sv : sv;
  c = ((q == 1.0) | (q == 2.0)) ? -cv : cv;
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

// One tensor viewed as [B, S, H, D], last dimension contiguous; strides in elements.
struct RopeTensor {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
  bool is_query;            // receives the DPE query offset
};

// positions viewed as [A, Bp, S]: sb == 0 when shared across the batch.
struct RopePositions {
  const void* ptr;
  int dtype;                // PosType
  int64_t sa, sb, ss;
};

// The lowered RopeTables (device pointers).
struct RopeFreqs {
  const float* inv_freq;    // [rows, R/2]
  int64_t rows;             // 1, or per-head rows (each divides the tensors' head counts)
  const int32_t* pair_axis; // [R/2] or nullptr
  const float* pair_pos_scale;  // [R/2] or nullptr (DPE)
  const float* pair_q_offset;   // [R/2] or nullptr (DPE, queries only)
  float attention_scaling;
};

// Explicit angles [Ba, S, rows, R/2] fp32 (apply_rope_angles); ptr == nullptr otherwise.
struct RopeAngles {
  const float* ptr;
  int64_t rows;
  int64_t sb, ss, sh;       // sb == 0 when shared across the batch
};

struct RopeProblem {
  RopeTensor q, k;          // a tensor with in == nullptr or heads == 0 is absent
  int64_t batch, seqlen, head_dim;
  int rotary_dim;
  bool interleaved;
  bool copy_tail;           // copy dims >= rotary_dim (out-of-place)
  float sign;               // +1 forward, -1 inverse rotation
  RopePositions pos;
  RopeFreqs f;
  RopeAngles ang;
};

POSATTN_HD double rope_load_position(const RopePositions& P, int64_t axis, int64_t b, int64_t s) {
  const int64_t off = axis * P.sa + b * P.sb + s * P.ss;
  switch (P.dtype) {
    case kPosInt32: return double(static_cast<const int32_t*>(P.ptr)[off]);
    case kPosInt64: return double(static_cast<const int64_t*>(P.ptr)[off]);
    case kPosFloat32: return double(static_cast<const float*>(P.ptr)[off]);
    default: return static_cast<const double*>(P.ptr)[off];
  }
}

// The (possibly DPE-transformed) position that pair p of a token reads.
POSATTN_HD double rope_pair_position(const RopeProblem& p, int pair, int64_t b, int64_t s, bool is_query) {
  const int64_t axis = p.f.pair_axis ? int64_t(p.f.pair_axis[pair]) : 0;
  double pos = rope_load_position(p.pos, axis, b, s);
  if (p.f.pair_pos_scale) {
    pos = rope_floor(pos / double(p.f.pair_pos_scale[pair]));
    if (is_query && p.f.pair_q_offset) pos += double(p.f.pair_q_offset[pair]);
  }
  return pos;
}

// Whether queries and keys see different angles (DPE query offset).
POSATTN_HD bool rope_q_differs(const RopeProblem& p) {
  return p.ang.ptr == nullptr && p.f.pair_pos_scale != nullptr && p.f.pair_q_offset != nullptr;
}

}  // namespace posattn
