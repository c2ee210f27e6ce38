// Shared by the CPU (g++) and CUDA (nvcc) builds: nothing here may depend on
// torch or on either runtime. POSATTN_HD marks functions usable on both sides.
#pragma once
#if defined(__CUDACC_RTC__)
// NVRTC (posattn/kernels/cuda_jit.py): neither the C++ library nor the CUDA headers are on
// its path (a GPU machine with CuPy need not have a toolkit), so the fixed-width types are
// spelled here and the 16-bit conversions below use the PTX cvt instructions directly.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#define POSATTN_HD __device__ __forceinline__
#else
#include <cstdint>
#include <cmath>
#include <cstring>
#endif

#if defined(__CUDACC_RTC__)
#elif defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define POSATTN_HD __host__ __device__ __forceinline__
#else
#define POSATTN_HD inline
#endif

namespace posattn {

// dtype codes shared with posattn/kernels/native.py (DTYPE_CODE)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Storage types for 16-bit floats: plain bit containers so that the header
// does not need cuda_fp16.h on the host side.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

POSATTN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}
POSATTN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}

// bf16 -> fp32 is exact; fp32 -> bf16 rounds to nearest even (NaN kept quiet).
POSATTN_HD float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
POSATTN_HD bf16_t bf16_from_float(float f) {
#if defined(__CUDACC_RTC__)
  bf16_t o;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o.bits) : "f"(f));
  return o;
#elif defined(__CUDA_ARCH__)
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#endif
  uint32_t u = float_to_bits(f);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = uint16_t((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = uint16_t(u >> 16);
  return r;
}

// IEEE binary16 <-> fp32, round to nearest even, subnormals and inf/NaN handled.
POSATTN_HD float to_float(half_t v) {
#if defined(__CUDACC_RTC__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#elif defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#endif
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24
    float f = float(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
POSATTN_HD half_t half_from_float(float f) {
#if defined(__CUDACC_RTC__)
  half_t o;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(o.bits) : "f"(f));
  return o;
#elif defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#endif
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  half_t r;
  if (a > 0x7f800000u) { r.bits = uint16_t(sign | 0x7e00u); return r; }      // NaN
  if (a >= 0x477ff000u) { r.bits = uint16_t(sign | 0x7c00u); return r; }     // overflow -> inf
  if (a < 0x38800000u) {                                                     // subnormal or zero
    // scale so that the half subnormal unit (2^-24) becomes 1, round to nearest even
    float af = bits_to_float(a) * 16777216.0f;
    float rf = af;  // exact integer part below 1024 after rounding
    uint32_t m = uint32_t(rf);
    float frac = rf - float(m);
    if (frac > 0.5f || (frac == 0.5f && (m & 1u))) m += 1u;
    r.bits = uint16_t(sign | m);
    return r;
  }
  uint32_t mant_round = a + 0xfffu + ((a >> 13) & 1u);
  r.bits = uint16_t(sign | (((mant_round - (112u << 23)) >> 13) & 0x7fffu));
  return r;
}

POSATTN_HD float to_float(float v) { return v; }
// rounds: fp64 math must not come through here (rope_cos_sin_math.h's acc_load keeps fp64)
POSATTN_HD float to_float(double v) { return float(v); }

template <typename T> struct FromFloat;
template <> struct FromFloat<float> { POSATTN_HD static float conv(float f) { return f; } };
template <> struct FromFloat<double> { POSATTN_HD static double conv(float f) { return f; } };
template <> struct FromFloat<half_t> { POSATTN_HD static half_t conv(float f) { return half_from_float(f); } };
template <> struct FromFloat<bf16_t> { POSATTN_HD static bf16_t conv(float f) { return bf16_from_float(f); } };

template <typename T> POSATTN_HD T from_float(float f) { return FromFloat<T>::conv(f); }

}  // namespace posattn
