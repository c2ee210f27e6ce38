// Rotary embedding from precomputed cos/sin tables, shared by the CPU (g++)
// and CUDA (nvcc) kernels.
//
// Tables are four [Bt, N, R/2] views with shared strides: cos1/sin1 rotate
// the first element of each pair, cos2/sin2 the second (cos2 == cos1 and
// sin2 == sin1 for the usual half tables; transformers' [.., R] tables give
// two distinct views, so any table is applied exactly as transformers does).
//   row = positions[b, s] (cache form) or s (per-token form)
//   o1 = x1*cos1 - x2*sin1 ;  o2 = x2*cos2 + x1*sin2   (sins times `sign`)
// The compute type A is CosSinAcc<T>: fp64 for fp64 q/k (the table entries,
// whatever their dtype, are widened exactly; nothing passes through fp32), fp32
// otherwise (fp64 tables are rounded to fp32 for fp32/16-bit q/k). The table
// entries are converted to A once per token; outputs are rounded once. A row
// outside [0, N) gives NaN in the rotated dims: the table is never read
// outside its bounds.
#pragma once
#include "posattn/common.h"
#if !defined(__CUDACC_RTC__)
#include <limits>
#endif

namespace posattn {

struct CosSinTensor {       // one of q / k, viewed [B, S, H, D], last dim contiguous
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
};

struct CosSinProblem {
  CosSinTensor q, k;        // k.in == nullptr when there is no key tensor
  int64_t batch, seqlen, head_dim;
  int rotary_dim;
  bool interleaved;
  bool copy_tail;           // copy dims >= rotary_dim (out-of-place)
  float sign;               // +1 forward, -1 for the transposed rotation (backward)
  // tables
  const void* cos1; const void* sin1; const void* cos2; const void* sin2;
  int64_t cos_sb, cos_sn, cos_sp;   // strides of the cos views (cos_sb == 0: shared by the batch)
  int64_t sin_sb, sin_sn, sin_sp;
  int64_t table_rows;               // N
  // positions (cache form) or nullptr (per-token form: row = s)
  const void* positions;
  bool pos_is_int64;
  int64_t pos_sb, pos_ss;           // pos_sb == 0 when shared across the batch
};

POSATTN_HD int64_t cos_sin_row(const CosSinProblem& p, int64_t b, int64_t s) {
  if (p.positions == nullptr) return s;
  const int64_t off = b * p.pos_sb + s * p.pos_ss;
  return p.pos_is_int64 ? static_cast<const int64_t*>(p.positions)[off]
                        : int64_t(static_cast<const int32_t*>(p.positions)[off]);
}

// compute type of q/k element type T: fp64 for fp64 inputs, fp32 otherwise
template <typename T> struct CosSinAcc { using type = float; };
template <> struct CosSinAcc<double> { using type = double; };

// a stored value in compute type A (fp32/16-bit -> fp64 is exact; fp64 -> fp32 rounds)
template <typename A, typename U> POSATTN_HD A acc_load(U v) { return A(to_float(v)); }
template <> POSATTN_HD double acc_load<double, double>(double v) { return v; }
template <> POSATTN_HD float acc_load<float, double>(double v) { return float(v); }
// a result in the output dtype T, rounded once (A is fp64 only when T is)
template <typename T> POSATTN_HD T acc_store(float v) { return from_float<T>(v); }
template <typename T> POSATTN_HD T acc_store(double v) { return T(v); }

#if defined(__CUDACC_RTC__)  // no <limits> under NVRTC: a quiet fp64 NaN, narrowed to A
template <typename A> POSATTN_HD A nan_of() { return A(__longlong_as_double(0x7ff8000000000000LL)); }
#else
template <typename A> POSATTN_HD A nan_of() { return std::numeric_limits<A>::quiet_NaN(); }
#endif

// Entry i of the four table rows of token (b, row), converted to the compute type A.
template <typename U, typename A>
POSATTN_HD void cos_sin_load(const CosSinProblem& p, int64_t b, int64_t row, int i, A& c1, A& s1,
                             A& c2, A& s2) {
  if (row < 0 || row >= p.table_rows) { c1 = s1 = c2 = s2 = nan_of<A>(); return; }
  const int64_t co = b * p.cos_sb + row * p.cos_sn + i * p.cos_sp;
  const int64_t so = b * p.sin_sb + row * p.sin_sn + i * p.sin_sp;
  const A sign = A(p.sign);  // +-1: exact in either type
  c1 = acc_load<A>(static_cast<const U*>(p.cos1)[co]);
  c2 = acc_load<A>(static_cast<const U*>(p.cos2)[co]);
  s1 = sign * acc_load<A>(static_cast<const U*>(p.sin1)[so]);
  s2 = sign * acc_load<A>(static_cast<const U*>(p.sin2)[so]);
}

// Work item e of a CUDA block (rope_cos_sin.cu): the block's tokens x its heads [h0, h0 + nh)
// x chunks of ppc pairs (cph = half / ppc chunks per head, per_tok = nh * cph).
struct CosSinItem {
  int t;    // token within the block
  int h;    // head, q's then k's, counted together
  int i0;   // first pair of the chunk
};
POSATTN_HD CosSinItem cos_sin_item(int e, int per_tok, int cph, int ppc, int h0) {
  const int t = e / per_tok;
  const int r = e - t * per_tok;
  const int hl = r / cph;
  return CosSinItem{t, h0 + hl, (r - hl * cph) * ppc};
}

POSATTN_HD void cos_sin_pair_index(int i, int rotary_dim, bool interleaved, int& i1, int& i2) {
  if (interleaved) { i1 = 2 * i; i2 = 2 * i + 1; }
  else { i1 = i; i2 = i + rotary_dim / 2; }
}

// Rotate one pair of one head given its four table entries (in the compute type A).
template <typename T, typename A>
POSATTN_HD void cos_sin_rotate_pair(const T* x, T* o, int i1, int i2, A c1, A s1, A c2, A s2) {
  const A x1 = acc_load<A>(x[i1]), x2 = acc_load<A>(x[i2]);
  o[i1] = acc_store<T>(x1 * c1 - x2 * s1);
  o[i2] = acc_store<T>(x2 * c2 + x1 * s2);
}

}  // namespace posattn
