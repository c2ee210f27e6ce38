// 8-wide loads and rounding stores of fp32 / fp16 / bf16 for the AVX2+F16C kernel clones
// (rope_cpu.cpp, rope_cos_sin_cpu.cpp). Include only inside a
// `#pragma GCC target("avx2,fma,f16c")` region, within that clone's namespace, after
// <immintrin.h> and posattn/common.h. Loads widen exactly; stores round to nearest even
// (F16C for fp16; for bf16 the integer form of posattn::bf16_from_float, NaN kept quiet).
#pragma once

static inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
static inline void st8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline __m256 ld8(const half_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline void st8(half_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline __m256 ld8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline void st8(bf16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
  const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);                 // 8 x u32, each <= 0xffff
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // lanes' halves together
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

