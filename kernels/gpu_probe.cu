// CUDA runtime probe and the device self-test kernel. Every CUDA call is checked and reported
// through CudaStatus (no exceptions or exit() across this boundary, STYLE.md rule 21).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "cuda_util.cuh"
#include "cuda_shim.h"
#include "selftest.cuh"

namespace tresor::gpu::detail {
namespace {

__global__ void selftest_fill_kernel(uint32_t seed, uint32_t* d_out, uint32_t n) {
  // 64-bit index: near n = 2^32 a 32-bit i + stride would wrap and the loop never end.
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += uint64_t{gridDim.x} * blockDim.x) {
    d_out[i] = selftest_mix(seed, static_cast<uint32_t>(i));
  }
}

}  // namespace

CudaStatus cuda_device_count(int* count) {
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) cudaGetLastError();  // clear the sticky error for later callers
  return status("cudaGetDeviceCount", e);
}

CudaStatus cuda_device_properties(int device, char* name, size_t name_len, int* cc_major, int* cc_minor,
                                  uint64_t* memory_bytes) {
  cudaDeviceProp p{};
  cudaError_t e = cudaGetDeviceProperties(&p, device);
  if (e == cudaSuccess) {
    std::snprintf(name, name_len, "%s", p.name);
    *cc_major = p.major;
    *cc_minor = p.minor;
    *memory_bytes = static_cast<uint64_t>(p.totalGlobalMem);
  }
  return status("cudaGetDeviceProperties", e);
}

CudaStatus selftest_fill(int device, uint32_t seed, uint32_t* h_out, size_t n) {
  if (n == 0) return {};
  if (n > UINT32_MAX) return status("selftest_fill: more than 2^32 elements", cudaErrorInvalidValue);
  CurrentDevice current;
  CudaStatus selected = current.select(device);
  if (selected.code != 0) return selected;
  uint32_t* d_out = nullptr;
  cudaError_t e = cudaMalloc(&d_out, n * sizeof(uint32_t));
  if (e != cudaSuccess) return status("cudaMalloc", e);
  const unsigned blocks = static_cast<unsigned>(std::min<size_t>((n + 255) / 256, 65535));
  (void)cudaGetLastError();  // an earlier, unrelated failure must not be reported as this launch's
  selftest_fill_kernel<<<blocks, 256>>>(seed, d_out, static_cast<uint32_t>(n));
  e = cudaGetLastError();
  const char* what = "selftest_fill_kernel launch";
  if (e == cudaSuccess) {
    e = cudaMemcpy(h_out, d_out, n * sizeof(uint32_t), cudaMemcpyDeviceToHost);
    what = "cudaMemcpy (selftest_fill_kernel)";
  }
  cudaFree(d_out);
  return status(what, e);
}

}  // namespace tresor::gpu::detail
