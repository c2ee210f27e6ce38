#pragma once
#include <cstdint>
#include "posattn/rope_math.h"
namespace posattn { namespace cuda {
int device_count();
int runtime_version();
// Raises std::runtime_error when no CUDA device is available or the launch fails.
void rope_forward(const RopeProblem& p, int dtype, int threads, int64_t stream);
} }
