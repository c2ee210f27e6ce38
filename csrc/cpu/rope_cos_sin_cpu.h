#pragma once
#include "posattn/rope_cos_sin_math.h"
namespace posattn { namespace cpu {
// dtype / table_dtype: codes of posattn::DType
void rope_cos_sin_forward(const CosSinProblem& p, int dtype, int table_dtype, int num_threads,
                          int64_t chunk);
} }
