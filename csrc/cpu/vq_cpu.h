#pragma once
#include <cstdint>

namespace posattn { namespace cpu {

// Nearest centroid under a codebook's metric (posattn/kernels/reference/vq.py is the contract):
// keys [T, HK, D] of dtype (0 fp32, 1 fp16, 2 bf16) with strides s_kt, s_kh (last dim contiguous),
// metric_centroids fp32 [HK, C, D] and centroid_norms fp32 [HK, C] contiguous, codes [T, HK]
// contiguous, int16 (code_bytes 2) or int32 (code_bytes 4): argmin_c norms - 2 k . mc, ties low.
void vq_assign_forward(const void* keys, int dtype, int64_t T, int64_t HK, int64_t D, int64_t s_kt, int64_t s_kh,
                       const float* metric_centroids, const float* centroid_norms, int64_t C, void* codes,
                       int code_bytes, int num_threads);

// Centroid-lookup scores: qf fp32 [B, HQ, D] contiguous, centroids fp32 [HK, C, D] contiguous,
// codes [NB, PS, HK] int16/int32 with strides s_cb, s_ct (last dim contiguous), block_table int32
// [B, MB] (row stride s_bt), far_len int32 [B], out fp32 [B, HQ, MB * PS] with strides s_ob, s_oh.
void vq_code_scores_forward(const float* qf, const float* centroids, const void* codes, int code_bytes,
                            int64_t s_cb, int64_t s_ct, const int32_t* block_table, int64_t s_bt,
                            const int32_t* far_len, float* out, int64_t s_ob, int64_t s_oh, int64_t B, int64_t HQ,
                            int64_t HK, int64_t D, int64_t C, int64_t PS, int64_t MB, float scale, int64_t block_s,
                            int num_threads);

}  // namespace cpu
}  // namespace posattn
