// tresor/rn.h — exactly rounded arithmetic (and bit casts) for code compiled both as CUDA device code (nvcc) and
// as host code (g++), so that a GPU kernel and its CPU reference or emulation produce the same
// bits. nvcc would otherwise contract a·b + c into one fused multiply-add (one rounding instead of
// two); the __d*_rn / __f*_rn intrinsics are never contracted (CUDA C++ Programming Guide,
// "Floating-Point Standard"). The host side targets x86-64's SSE2, which has no fused
// multiply-add to contract into. Plain C++ (no library types): .cu files may include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifndef TRESOR_HD
#if defined(__CUDACC__)
#define TRESOR_HD __host__ __device__
#else
#define TRESOR_HD
#endif
#endif

// A loop of constant trip count fully unrolled in device code, so that arrays it indexes stay in
// registers (an array indexed at run time goes to local memory: device memory that no wipe
// reaches). Nothing on the host.
#ifndef TRESOR_UNROLL
#if defined(__CUDA_ARCH__)
#define TRESOR_UNROLL _Pragma("unroll")
#else
#define TRESOR_UNROLL
#endif
#endif

namespace tresor::rn {

TRESOR_HD inline double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
TRESOR_HD inline double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
TRESOR_HD inline double dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
TRESOR_HD inline double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
TRESOR_HD inline double dsqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
TRESOR_HD inline float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// The bits of a double or float and back (no conversion).
TRESOR_HD inline uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}
TRESOR_HD inline double bits_double(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}
TRESOR_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
TRESOR_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

}  // namespace tresor::rn
