#pragma once
#include <cstdint>
#include "posattn/cache_problem.h"
namespace posattn { namespace cuda {
// Raise std::runtime_error when no CUDA device is available or the launch fails.
void rope_cache_forward(const CacheProblem& p, int dtype, int threads, int64_t stream);
void kv_compact_forward(const CompactProblem& p, int threads, int64_t stream);
} }
