// Builds a RopeProblem from the flat integer arguments both bindings take
// (raw pointers as integers, so neither module links against torch). The
// Python side that packs them is posattn/kernels/native.py.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <stdexcept>
#include <string>
#include <vector>
#include "posattn/rope_math.h"

namespace posattn {

// t = (in_ptr, out_ptr, heads, in_sb, in_ss, in_sh, out_sb, out_ss, out_sh), or empty
inline RopeTensor rope_tensor_from(const std::vector<int64_t>& t, const char* name, bool is_query) {
  if (t.empty()) return RopeTensor{nullptr, nullptr, 0, 0, 0, 0, 0, 0, 0, is_query};
  if (t.size() != 9) throw std::invalid_argument(std::string(name) + ": expected 9 integers");
  return RopeTensor{reinterpret_cast<const void*>(t[0]), reinterpret_cast<void*>(t[1]), t[2],
                    t[3], t[4], t[5], t[6], t[7], t[8], is_query};
}

// dims = (batch, seqlen, head_dim, rotary_dim, interleaved, copy_tail)
// pos = (ptr, dtype code, sa, sb, ss) or empty (explicit angles)
// freqs = (inv_freq ptr, rows, pair_axis ptr|0, pair_pos_scale ptr|0, pair_q_offset ptr|0) or empty
// angles = (ptr, rows, sb, ss, sh) or empty
inline RopeProblem rope_problem_from(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                     const std::vector<int64_t>& dims,
                                     const std::vector<int64_t>& pos,
                                     const std::vector<int64_t>& freqs, double attention_scaling,
                                     const std::vector<int64_t>& angles, double sign) {
  if (dims.size() != 6) throw std::invalid_argument("dims: expected 6 integers");
  RopeProblem p{};
  p.q = rope_tensor_from(q, "q", true);
  p.k = rope_tensor_from(k, "k", false);
  p.batch = dims[0]; p.seqlen = dims[1]; p.head_dim = dims[2];
  p.rotary_dim = int(dims[3]); p.interleaved = dims[4] != 0; p.copy_tail = dims[5] != 0;
  if (p.rotary_dim <= 0 || p.rotary_dim % 2 || p.rotary_dim > p.head_dim)
    throw std::invalid_argument("rotary_dim must be even and in (0, head_dim]");
  p.sign = float(sign);
  if (!angles.empty()) {
    if (angles.size() != 5) throw std::invalid_argument("angles: expected 5 integers");
    p.ang = RopeAngles{reinterpret_cast<const float*>(angles[0]), angles[1], angles[2], angles[3], angles[4]};
    if (p.ang.rows <= 0) throw std::invalid_argument("angles: rows must be positive");
  } else {
    if (pos.size() != 5) throw std::invalid_argument("pos: expected 5 integers");
    if (freqs.size() != 5) throw std::invalid_argument("freqs: expected 5 integers");
    p.pos = RopePositions{reinterpret_cast<const void*>(pos[0]), int(pos[1]), pos[2], pos[3], pos[4]};
    if (p.pos.dtype < kPosInt32 || p.pos.dtype > kPosFloat64)
      throw std::invalid_argument("pos: unknown dtype code");
    p.f = RopeFreqs{reinterpret_cast<const float*>(freqs[0]), freqs[1],
                    reinterpret_cast<const int32_t*>(freqs[2]),
                    reinterpret_cast<const float*>(freqs[3]),
                    reinterpret_cast<const float*>(freqs[4]), float(attention_scaling)};
    if (p.f.rows <= 0) throw std::invalid_argument("freqs: rows must be positive");
  }
  const int64_t rows = p.ang.ptr ? p.ang.rows : p.f.rows;
  for (const RopeTensor* t : {&p.q, &p.k})
    if (t->in && t->heads > 0 && t->heads % rows != 0)
      throw std::invalid_argument("table rows must divide every tensor's head count");
  return p;
}

}  // namespace posattn
