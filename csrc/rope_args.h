// Builds a RopeProblem from the flat integer arguments both bindings take
// (raw pointers as integers, so neither module links against torch).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <stdexcept>
#include <vector>
#include "posattn/rope_math.h"

namespace posattn {

// t = (in_ptr, out_ptr, heads, in_sb, in_ss, in_sh, out_sb, out_ss, out_sh)
inline RopeTensor rope_tensor_from(const std::vector<int64_t>& t, const char* name) {
  if (t.empty()) return RopeTensor{nullptr, nullptr, 0, 0, 0, 0, 0, 0, 0};
  if (t.size() != 9) throw std::invalid_argument(std::string(name) + ": expected 9 integers");
  return RopeTensor{reinterpret_cast<const void*>(t[0]), reinterpret_cast<void*>(t[1]), t[2],
                    t[3], t[4], t[5], t[6], t[7], t[8]};
}

inline RopeProblem rope_problem_from(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                     int64_t batch, int64_t seqlen, int64_t head_dim,
                                     int64_t positions, bool pos_is_int64, int64_t pos_sb,
                                     int64_t pos_ss, int64_t inv_freq, int rotary_dim,
                                     bool interleaved, bool copy_tail) {
  if (rotary_dim <= 0 || rotary_dim % 2 || rotary_dim > head_dim)
    throw std::invalid_argument("rotary_dim must be even and in (0, head_dim]");
  RopeProblem p;
  p.q = rope_tensor_from(q, "q");
  p.k = rope_tensor_from(k, "k");
  p.batch = batch; p.seqlen = seqlen; p.head_dim = head_dim;
  p.positions = reinterpret_cast<const void*>(positions);
  p.pos_is_int64 = pos_is_int64; p.pos_sb = pos_sb; p.pos_ss = pos_ss;
  p.inv_freq = reinterpret_cast<const float*>(inv_freq);
  p.rotary_dim = rotary_dim; p.interleaved = interleaved; p.copy_tail = copy_tail;
  return p;
}

}  // namespace posattn
