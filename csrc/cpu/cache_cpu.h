#pragma once
#include "posattn/cache_problem.h"
namespace posattn { namespace cpu {
// Returns the instruction set used ("avx2" or "generic").
const char* rope_cache_forward(const CacheProblem& p, int dtype, int num_threads);
void kv_compact_forward(const CompactProblem& p, int num_threads);
} }
