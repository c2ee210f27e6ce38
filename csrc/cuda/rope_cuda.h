#pragma once
#include <cstdint>
#include <string>
#include "posattn/rope_math.h"
namespace posattn { namespace cuda {
int device_count();
int runtime_version();
int driver_version();              // cudaDriverGetVersion (0: no driver)
std::string device_problem_text(); // why no device is usable ("" when one is)
// Raises std::runtime_error when no CUDA device is available or the launch fails.
void rope_forward(const RopeProblem& p, int dtype, int threads, int64_t stream);
} }
