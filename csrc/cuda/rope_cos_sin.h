#pragma once
#include <cstdint>
#include "posattn/rope_cos_sin_math.h"
namespace posattn { namespace cuda {
void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int threads,
                          int64_t stream);
} }
