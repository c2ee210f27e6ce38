#pragma once
#include "posattn/rope_math.h"
namespace posattn { namespace cpu {
// num_threads <= 0: OpenMP's default; block_tokens: tokens per statically scheduled block
// (<= 0: 64). Returns the instruction set used ("avx2" or "generic").
const char* rope_forward(const RopeProblem& p, int dtype, int num_threads, int64_t block_tokens);
// Ask for transparent huge pages on the 2 MiB-aligned interior of a buffer about to be
// written for the first time (a fresh output): one fault per 2 MiB instead of per 4 KiB.
// Returns the bytes advised (0 where unsupported).
int64_t advise_hugepages(int64_t ptr, int64_t nbytes);
} }
