// Plain declarations between the CUDA translation units (compiled by nvcc as C++20) and the
// C++23 host library. Nothing here throws or uses std::expected; statuses carry CUDA's own error
// name and text, and gpu_probe.cc turns them into tresor::Error values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tresor::gpu::detail {

struct CudaStatus {
  int code = 0;            // cudaError_t value; 0 = success
  char message[256] = {};  // "what: cudaErrorX (text)" when code != 0
};

CudaStatus cuda_device_count(int* count);
CudaStatus cuda_device_properties(int device, char* name, size_t name_len, int* cc_major, int* cc_minor,
                                  uint64_t* memory_bytes);
CudaStatus selftest_fill(int device, uint32_t seed, uint32_t* h_out, size_t n);

}  // namespace tresor::gpu::detail
