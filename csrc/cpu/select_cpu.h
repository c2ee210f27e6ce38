#pragma once
#include <cstdint>

namespace posattn { namespace cpu {

// Top-k by radix select (posattn/kernels/reference/select.py is the contract): scores fp32 [R, N]
// (row stride s_row, last dim contiguous), lengths int32 [R] (clamped to [0, N]), out int32 [R, k]
// contiguous: per row the min(k, L) chosen indices in ascending order, then -1.
void topk_forward(const float* scores, int64_t R, int64_t N, int64_t s_row, const int32_t* lengths, int64_t k,
                  int64_t sinks, int64_t window, int32_t* out, int num_threads);

}  // namespace cpu
}  // namespace posattn

namespace posattn { namespace cpu {

// Token scores (posattn/kernels/reference/select_scores.py is the contract): q fp32 [B, HQ, D]
// (already rotated, strides s_qb, s_qh), k_cache [NB, PS, HK, D] of dtype (0 fp32, 1 fp16, 2 bf16)
// with strides s_kb, s_kt, s_kh, block_table int32 [B, MB] (row stride s_bt), cache_seqlens int32 [B],
// ktab fp32 (cos at ktab, sin at ktab + s_tc; entry (b, s, p) at b * s_tb + s * s_tt + p) or nullptr,
// out fp32 [B, HQ, S_max = MB * PS] with strides s_ob, s_oh. vote: nullptr, or fp32 [B, S_max]
// contiguous for soft_vote: then out is scratch, and vote[b, s] = sum_h softmax_s(out[b, h, :L])[s]
// for s < L = min(cache_seqlens[b], S_max), -inf after.
struct ScoresProblem {
  int64_t B, HQ, HK, D, PS, MB, R;
  bool interleaved;
  const float* q; int64_t s_qb, s_qh;
  const void* k_cache; int dtype; int64_t s_kb, s_kt, s_kh;
  const int32_t* block_table; int64_t s_bt;
  const int32_t* cache_seqlens;
  const float* ktab; int64_t s_tc, s_tb, s_tt;
  float* out; int64_t s_ob, s_oh;
  float* vote;
  // position maps: nullptr, or q_far fp32 (q's shape and strides), ktab_far (ktab's layout) and
  // far uint8 [B, S_max] contiguous: slot s of request b is scored with q_far and ktab_far where far[b, s]
  const float* q_far; const float* ktab_far; const uint8_t* far;
  float scale;
};

void scores_forward(const ScoresProblem& p, int64_t block_s, int num_threads);

}  // namespace cpu
}  // namespace posattn

namespace posattn { namespace cpu {

// Quest page scores (posattn/kernels/reference/select_pages.py is the contract): q fp32 [B, HQ, D]
// contiguous, kmin/kmax [NP, HK, D] contiguous of dtype (0 fp32, 1 fp16, 2 bf16), page_ids int32
// [B, MP] contiguous, cache_seqlens int32 [B], out fp32 [B, HQ, MP] contiguous.
void page_scores_forward(const float* q, const void* kmin, const void* kmax, int dtype, const int32_t* page_ids,
                         const int32_t* cache_seqlens, float* out, int64_t B, int64_t HQ, int64_t HK, int64_t D,
                         int64_t MP, int64_t page_size, int num_threads);

}  // namespace cpu
}  // namespace posattn
