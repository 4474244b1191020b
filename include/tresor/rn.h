// tresor/rn.h — exactly rounded arithmetic for code compiled both as CUDA device code (nvcc) and
// as host code (g++), so that a GPU kernel and its CPU reference or emulation produce the same
// bits. nvcc would otherwise contract a·b + c into one fused multiply-add (one rounding instead of
// two); the __d*_rn / __f*_rn intrinsics are never contracted (CUDA C++ Programming Guide,
// "Floating-Point Standard"). The host side targets x86-64's SSE2, which has no fused
// multiply-add to contract into. Plain C++ (no library types): .cu files may include it.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef TRESOR_HD
#if defined(__CUDACC__)
#define TRESOR_HD __host__ __device__
#else
#define TRESOR_HD
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

}  // namespace tresor::rn
