// Builds a CosSinProblem from the flat integer lists both bindings take (raw
// pointers as integers, so neither module links against torch).
#pragma once
#include <stdexcept>
#include <string>
#include <vector>
#include "posattn/rope_cos_sin_math.h"

namespace posattn {

// t = (in_ptr, out_ptr, heads, in_sb, in_ss, in_sh, out_sb, out_ss, out_sh), or empty
inline CosSinTensor cos_sin_tensor_from(const std::vector<int64_t>& t, const char* name) {
  if (t.empty()) return CosSinTensor{nullptr, nullptr, 0, 0, 0, 0, 0, 0, 0};
  if (t.size() != 9) throw std::invalid_argument(std::string(name) + ": expected 9 integers");
  return CosSinTensor{reinterpret_cast<const void*>(t[0]), reinterpret_cast<void*>(t[1]), t[2],
                      t[3], t[4], t[5], t[6], t[7], t[8]};
}

// tables = (cos1, sin1, cos2, sin2, cos_sb, cos_sn, cos_sp, sin_sb, sin_sn, sin_sp, rows)
// positions = (ptr, is_int64, pos_sb, pos_ss), or empty for the per-token form
inline CosSinProblem cos_sin_problem_from(const std::vector<int64_t>& q,
                                          const std::vector<int64_t>& k,
                                          const std::vector<int64_t>& tables,
                                          const std::vector<int64_t>& positions, int64_t batch,
                                          int64_t seqlen, int64_t head_dim, int rotary_dim,
                                          bool interleaved, bool copy_tail, double sign) {
  if (rotary_dim <= 0 || rotary_dim % 2 || rotary_dim > head_dim)
    throw std::invalid_argument("rotary_dim must be even and in (0, head_dim]");
  if (tables.size() != 11) throw std::invalid_argument("tables: expected 11 integers");
  if (!positions.empty() && positions.size() != 4)
    throw std::invalid_argument("positions: expected 4 integers or none");
  CosSinProblem p;
  p.q = cos_sin_tensor_from(q, "q");
  p.k = cos_sin_tensor_from(k, "k");
  p.batch = batch; p.seqlen = seqlen; p.head_dim = head_dim;
  p.rotary_dim = rotary_dim; p.interleaved = interleaved; p.copy_tail = copy_tail;
  p.sign = float(sign);
  p.cos1 = reinterpret_cast<const void*>(tables[0]);
  p.sin1 = reinterpret_cast<const void*>(tables[1]);
  p.cos2 = reinterpret_cast<const void*>(tables[2]);
  p.sin2 = reinterpret_cast<const void*>(tables[3]);
  p.cos_sb = tables[4]; p.cos_sn = tables[5]; p.cos_sp = tables[6];
  p.sin_sb = tables[7]; p.sin_sn = tables[8]; p.sin_sp = tables[9];
  p.table_rows = tables[10];
  if (positions.empty()) {
    p.positions = nullptr; p.pos_is_int64 = false; p.pos_sb = 0; p.pos_ss = 0;
  } else {
    p.positions = reinterpret_cast<const void*>(positions[0]);
    p.pos_is_int64 = positions[1] != 0; p.pos_sb = positions[2]; p.pos_ss = positions[3];
  }
  return p;
}

}  // namespace posattn
