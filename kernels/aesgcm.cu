// The AES-256-GCM chunk kernel (kernels/aesgcm.cuh has the algorithm and its phases) and its
// launch from host buffers. One CUDA block of kThreads threads per chunk; every CUDA call is
// checked and reported through CudaStatus (no exceptions or exit() across this boundary).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "aesgcm.cuh"
#include "cuda_shim.h"

namespace tresor::gpu::detail {
namespace {

using namespace tresor::gpu::aesgcm;

CudaStatus status(const char* what, cudaError_t e) {
  CudaStatus s;
  s.code = static_cast<int>(e);
  if (e != cudaSuccess) std::snprintf(s.message, sizeof s.message, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return s;
}

__global__ void __launch_bounds__(kThreads) aesgcm_chunk_kernel(const KeyData* kd, const uint8_t* d_in, uint8_t* d_out,
                                                                 const AesGcmChunk* d_chunks, bool seal, uint8_t* d_failed) {
  extern __shared__ uint32_t smem[];
  const AesGcmChunk& c = d_chunks[blockIdx.x];
  ChunkArgs a{};
  a.in = d_in + c.in_off;
  a.out = d_out + c.out_off;
  a.len = c.len;
  for (int i = 0; i < 12; ++i) a.nonce[i] = c.nonce[i];
  a.seal = seal;
  const int tid = static_cast<int>(threadIdx.x);
  phase0_fill(smem, *kd, tid);
  __syncthreads();
  Gf share = phase1_thread(smem, *kd, a, tid);
  // Tree reduction: XOR across the warp, then across the warps.
  for (int o = kLanes / 2; o > 0; o >>= 1) {
    share.hi ^= __shfl_xor_sync(0xffffffffu, share.hi, o);
    share.lo ^= __shfl_xor_sync(0xffffffffu, share.lo, o);
  }
  uint32_t* red = smem + kSmemReduce;
  if (tid % kLanes == 0) {
    const int w = tid / kLanes;
    red[4 * w] = static_cast<uint32_t>(share.hi >> 32);
    red[4 * w + 1] = static_cast<uint32_t>(share.hi);
    red[4 * w + 2] = static_cast<uint32_t>(share.lo >> 32);
    red[4 * w + 3] = static_cast<uint32_t>(share.lo);
  }
  __syncthreads();
  uint32_t* verdict = red + 4 * (kThreads / kLanes);
  if (tid == 0) {
    Gf sum{};
    for (int w = 0; w < kThreads / kLanes; ++w) {
      sum = gf_xor(sum, Gf{(uint64_t{red[4 * w]} << 32) | red[4 * w + 1], (uint64_t{red[4 * w + 2]} << 32) | red[4 * w + 3]});
    }
    const bool ok = phase2_tag(smem, *kd, a, sum);
    *verdict = ok ? 1u : 0u;
    d_failed[blockIdx.x] = ok ? 0 : 1;
  }
  __syncthreads();
  if (*verdict == 0) phase3_zero(a, tid);
}

}  // namespace

CudaStatus aesgcm_run(int device, const void* key_data, size_t key_bytes, const uint8_t* h_in, size_t in_bytes, uint8_t* h_out,
                      size_t out_bytes, const AesGcmChunk* chunks, size_t n, bool seal, uint8_t* failed) {
  if (n == 0) return {};
  if (key_bytes != sizeof(KeyData)) return status("aesgcm_run: key data of the wrong size", cudaErrorInvalidValue);
  if (n > 0x7fffffffu) return status("aesgcm_run: more than 2^31 - 1 chunks in one launch", cudaErrorInvalidValue);
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return status("cudaSetDevice", e);
  KeyData* d_kd = nullptr;
  uint8_t *d_in = nullptr, *d_out = nullptr, *d_failed = nullptr;
  AesGcmChunk* d_chunks = nullptr;
  const char* what = "cudaMalloc";
  // Every step runs only while the previous succeeded; the clean-up below runs in every case.
  e = cudaMalloc(&d_kd, sizeof(KeyData));
  if (e == cudaSuccess) e = cudaMalloc(&d_in, in_bytes == 0 ? 1 : in_bytes);
  if (e == cudaSuccess) e = cudaMalloc(&d_out, out_bytes == 0 ? 1 : out_bytes);
  if (e == cudaSuccess) e = cudaMalloc(&d_chunks, n * sizeof(AesGcmChunk));
  if (e == cudaSuccess) e = cudaMalloc(&d_failed, n);
  if (e == cudaSuccess) {
    what = "cudaMemcpy (to the device)";
    e = cudaMemcpy(d_kd, key_data, sizeof(KeyData), cudaMemcpyHostToDevice);
    if (e == cudaSuccess && in_bytes > 0) e = cudaMemcpy(d_in, h_in, in_bytes, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(d_chunks, chunks, n * sizeof(AesGcmChunk), cudaMemcpyHostToDevice);
  }
  if (e == cudaSuccess) {
    what = "aesgcm_chunk_kernel launch";
    aesgcm_chunk_kernel<<<static_cast<unsigned>(n), kThreads, kSmemBytes>>>(d_kd, d_in, d_out, d_chunks, seal, d_failed);
    e = cudaPeekAtLastError();
  }
  if (e == cudaSuccess) {
    what = "cudaMemcpy (from the device, aesgcm_chunk_kernel)";
    e = cudaMemcpy(failed, d_failed, n, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess && out_bytes > 0) e = cudaMemcpy(h_out, d_out, out_bytes, cudaMemcpyDeviceToHost);
  }
  const CudaStatus result = status(what, e);
  // The key data and the plaintext do not outlive the call in device memory.
  if (d_kd != nullptr) cudaMemset(d_kd, 0, sizeof(KeyData));
  if (!seal && d_out != nullptr) cudaMemset(d_out, 0, out_bytes == 0 ? 1 : out_bytes);
  if (seal && d_in != nullptr) cudaMemset(d_in, 0, in_bytes == 0 ? 1 : in_bytes);
  cudaDeviceSynchronize();
  for (void* p : {static_cast<void*>(d_kd), static_cast<void*>(d_in), static_cast<void*>(d_out), static_cast<void*>(d_chunks),
                  static_cast<void*>(d_failed)}) {
    if (p != nullptr) cudaFree(p);
  }
  return result;
}

}  // namespace tresor::gpu::detail
