#pragma once
#include "posattn/rope_math.h"
namespace posattn { namespace cpu {
// num_threads <= 0: OpenMP's default. Returns the instruction set used ("avx2" or "generic").
const char* rope_forward(const RopeProblem& p, int dtype, int num_threads);
} }
