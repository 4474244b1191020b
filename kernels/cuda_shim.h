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

// One chunk of an AES-GCM run for the kernel (kernels/aesgcm.cuh): where its input and output
// start in the run's buffers, its plaintext length and its nonce.
struct AesGcmChunk {
  uint64_t in_off = 0, out_off = 0, len = 0;
  uint8_t nonce[12] = {};
  uint8_t pad[4] = {};
};
// Opens (seal = false) or seals `n` chunks on `device` from host buffers: the key data (wiped on
// the device before it is freed), in and out copied over and back; failed[i] = 1 for a chunk
// whose tag did not verify (its output zeroed by the kernel).
CudaStatus aesgcm_run(int device, const void* key_data, size_t key_bytes, const uint8_t* h_in, size_t in_bytes, uint8_t* h_out,
                      size_t out_bytes, const AesGcmChunk* chunks, size_t n, bool seal, uint8_t* failed);

}  // namespace tresor::gpu::detail
