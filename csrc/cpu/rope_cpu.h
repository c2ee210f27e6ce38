#pragma once
#include "posattn/rope_math.h"
namespace posattn { namespace cpu {
void rope_forward(const RopeProblem& p, int dtype, int num_threads, int64_t chunk);
} }
