// The AES-256-GCM chunk kernel (kernels/aesgcm.cuh has the algorithm and its phases), its launch
// on a stream, and the CUDA runtime calls the channel's device uses. One CUDA block of kThreads
// threads per chunk; every CUDA call is checked and reported through CudaStatus (no exceptions
// or exit() across this boundary).
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <cstring>

#include "cuda_util.cuh"
#include "aesgcm.cuh"
#include "cuda_shim.h"

namespace tresor::gpu::detail {
namespace {

using namespace tresor::gpu::aesgcm;

__global__ void __launch_bounds__(kThreads) aesgcm_chunk_kernel(const KeyData* kd, AesGcmRun run, const uint8_t* d_in, uint8_t* d_out,
                                                                 uint8_t* d_failed) {
  extern __shared__ uint32_t smem[];
  const uint64_t i = blockIdx.x;
  const bool last = i + 1 == run.chunks;
  const uint64_t c = run.chunk_size;
  ChunkArgs a{};
  a.in = d_in + i * (run.seal != 0 ? c : c + 16);
  a.out = d_out + i * (run.seal != 0 ? c + 16 : c);
  a.len = last ? run.last_len : c;
  for (int j = 0; j < 7; ++j) a.nonce[j] = run.prefix[j];
  store_be32(a.nonce + 7, static_cast<uint32_t>(run.first_index + i));
  a.nonce[11] = last && run.final_flag != 0 ? 1 : 0;
  a.seal = run.seal != 0;
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
    d_failed[i] = ok ? 0 : 1;
  }
  __syncthreads();
  if (*verdict == 0) phase3_zero(a, tid);
  // Shared memory outlives the block: the GHASH table of H^256 (from which H follows) must not
  // be left for the next kernel to find.
  __syncthreads();
  phase4_wipe(smem, tid);
}

cudaMemcpyKind kind_of(int k) {
  return k == kHostToDevice ? cudaMemcpyHostToDevice : k == kDeviceToHost ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
}

}  // namespace

CudaStatus aesgcm_enqueue(void* stream, const void* d_key, const AesGcmRun& run, const uint8_t* d_in, uint8_t* d_out, uint8_t* d_failed) {
  if (run.chunks == 0) return {};
  if (run.chunks > 0x7fffffffu) return status("aesgcm_enqueue: more than 2^31 - 1 chunks in one launch", cudaErrorInvalidValue);
  // The kernel cannot work in place (frames and plaintext have different strides).
  const uint64_t plain = (run.chunks - 1) * uint64_t{run.chunk_size} + run.last_len, framed = plain + 16 * run.chunks;
  const uint64_t in_bytes = run.seal != 0 ? plain : framed, out_bytes = run.seal != 0 ? framed : plain;
  const auto in_at = reinterpret_cast<uintptr_t>(d_in), out_at = reinterpret_cast<uintptr_t>(d_out);
  if (in_at < out_at + out_bytes && out_at < in_at + in_bytes) {
    return status("aesgcm_enqueue: input and output overlap", cudaErrorInvalidValue);
  }
  (void)cudaGetLastError();  // an earlier, unrelated failure must not be reported as this launch's
  aesgcm_chunk_kernel<<<static_cast<unsigned>(run.chunks), kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const KeyData*>(d_key), run, d_in, d_out, d_failed);
  return status("aesgcm_chunk_kernel launch", cudaGetLastError());
}

CudaStatus cuda_set_device(int device) { return status("cudaSetDevice", cudaSetDevice(device)); }
CudaStatus cuda_alloc(void** p, size_t n) { return status("cudaMalloc", cudaMalloc(p, n == 0 ? 1 : n)); }
CudaStatus cuda_free_wiped(void* p, size_t n) {
  if (p == nullptr) return {};
  const std::pair<void*, size_t> one{p, n};
  return cuda_free_wiped_all(&one, 1);
}
CudaStatus cuda_free_wiped_all(const std::pair<void*, size_t>* buffers, size_t count) {
  if (count == 0) return {};
  // Work still queued on other streams may write into the buffers: let it finish before the
  // wipes, one synchronisation for all. The wipes and frees are attempted even when that fails
  // (a broken context), and the first failure is reported.
  const cudaError_t s = cudaDeviceSynchronize();
  cudaError_t e = cudaSuccess;
  for (size_t i = 0; i < count; ++i) {
    const auto [p, n] = buffers[i];
    if (p == nullptr) continue;
    const cudaError_t m = cudaMemset(p, 0, n == 0 ? 1 : n);
    if (e == cudaSuccess) e = m;
  }
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  cudaError_t f = cudaSuccess;
  for (size_t i = 0; i < count; ++i) {
    if (buffers[i].first == nullptr) continue;
    const cudaError_t r = cudaFree(buffers[i].first);
    if (f == cudaSuccess) f = r;
  }
  if (e != cudaSuccess) return status("cudaMemset (wiping before cudaFree)", e);
  return status(s != cudaSuccess ? "cudaDeviceSynchronize (before wiping)" : "cudaFree", s != cudaSuccess ? s : f);
}
CudaStatus cuda_host_alloc(void** p, size_t n) { return status("cudaHostAlloc", cudaHostAlloc(p, n == 0 ? 1 : n, cudaHostAllocDefault)); }
CudaStatus cuda_host_free(void* p) { return p == nullptr ? CudaStatus{} : status("cudaFreeHost", cudaFreeHost(p)); }
CudaStatus cuda_stream_create(void** stream) {
  cudaStream_t s = nullptr;
  const cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  *stream = s;
  return status("cudaStreamCreateWithFlags", e);
}
CudaStatus cuda_stream_destroy(void* stream) { return status("cudaStreamDestroy", cudaStreamDestroy(static_cast<cudaStream_t>(stream))); }
CudaStatus cuda_copy_async(void* stream, void* dst, const void* src, size_t n, int kind) {
  if (n == 0) return {};
  return status("cudaMemcpyAsync", cudaMemcpyAsync(dst, src, n, kind_of(kind), static_cast<cudaStream_t>(stream)));
}
CudaStatus cuda_copy(void* dst, const void* src, size_t n, int kind) {
  if (n == 0) return {};
  cudaError_t e = cudaMemcpy(dst, src, n, kind_of(kind));
  // From pageable memory cudaMemcpy may return before the DMA has landed, and the channel's
  // non-blocking streams are not ordered after the default stream: wait for it.
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  return status("cudaMemcpy", e);
}
CudaStatus cuda_fill(void* p, int value, size_t n) {
  if (n == 0) return {};
  cudaError_t e = cudaMemset(p, value, n);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();  // ordered before the non-blocking streams' work
  return status("cudaMemset", e);
}
namespace {
// Whether the calling thread has a CUDA context current: the driver's cuCtxGetCurrent, reached
// through the runtime so that nothing links libcuda. A thread that has not used CUDA yet has
// none, and its "current device" is only the default 0 — selecting 0 to restore it would create
// a context on GPU 0 for nothing (cudaSetDevice initialises the device's primary context since
// CUDA 12). Unknown (no entry point) counts as yes: then the device is restored as recorded.
bool thread_has_context() {
  static const PFN_cuCtxGetCurrent_v4000 get = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return PFN_cuCtxGetCurrent_v4000{};
    }
    return reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(fn);
  }();
  if (get == nullptr) return true;
  CUcontext ctx = nullptr;
  return get(&ctx) == CUDA_SUCCESS && ctx != nullptr;
}
}  // namespace

CurrentDevice::~CurrentDevice() {
  if (previous_ >= 0) (void)cudaSetDevice(previous_);
}
CudaStatus CurrentDevice::select(int device) {
  if (previous_ == -1) {
    previous_ = -2;  // nothing to give back: the thread had no context
    if (thread_has_context()) {
      int current = 0;
      const cudaError_t e = cudaGetDevice(&current);
      if (e != cudaSuccess) return status("cudaGetDevice", e);
      previous_ = current;
    }
  }
  return status("cudaSetDevice", cudaSetDevice(device));
}
CudaStatus cuda_free_memory(size_t* free_bytes) {
  size_t total = 0;
  return status("cudaMemGetInfo", cudaMemGetInfo(free_bytes, &total));
}
CudaStatus cuda_device_sync() { return status("cudaDeviceSynchronize", cudaDeviceSynchronize()); }
CudaStatus cuda_stream_sync(void* stream) { return status("cudaStreamSynchronize", cudaStreamSynchronize(static_cast<cudaStream_t>(stream))); }

}  // namespace tresor::gpu::detail
