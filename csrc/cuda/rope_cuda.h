#pragma once
#include <cstdint>
#include "posattn/rope_math.h"
namespace posattn { namespace cuda {
int device_count();
int runtime_version();
void rope_forward(const RopeProblem& p, int dtype, int threads, int64_t stream);
} }
