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
