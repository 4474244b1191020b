// Plain declarations between the CUDA translation units (compiled by nvcc as C++20) and the
// C++23 host library. Nothing here throws or uses std::expected; statuses carry CUDA's own error
// name and text, and gpu_probe.cc turns them into tresor::Error values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace tresor::gpu::detail {

struct CudaStatus {
  int code = 0;            // cudaError_t value; 0 = success
  char message[256] = {};  // "what: cudaErrorX (text)" when code != 0
};

CudaStatus cuda_device_count(int* count);
CudaStatus cuda_device_properties(int device, char* name, size_t name_len, int* cc_major, int* cc_minor,
                                  uint64_t* memory_bytes);
CudaStatus selftest_fill(int device, uint32_t seed, uint32_t* h_out, size_t n);

// A run of consecutive chunks for the AES-GCM kernel (kernels/aesgcm.cuh): chunk i of the run
// has stream index first_index + i, plaintext length chunk_size (last_len for the last), input
// and output at i·(chunk_size [+ 16]); the final flag goes on the last chunk when final_flag.
struct AesGcmRun {
  uint8_t prefix[7] = {};
  uint8_t final_flag = 0;
  uint32_t chunk_size = 0;
  uint32_t first_index = 0;
  uint64_t chunks = 0;
  uint64_t last_len = 0;
  uint8_t seal = 0;
  uint8_t pad[7] = {};
};
// Queues the kernel on `stream` (a cudaStream_t; nullptr = the default stream) over device
// memory: the key data, the run's input and output, one verdict byte per chunk (1 = tag failed).
CudaStatus aesgcm_enqueue(void* stream, const void* d_key, const AesGcmRun& run, const uint8_t* d_in, uint8_t* d_out, uint8_t* d_failed);

// The CUDA runtime calls of the channel's device (kernels/channel_cuda.cc), each checked.
CudaStatus cuda_set_device(int device);
CudaStatus cuda_alloc(void** p, size_t n);
CudaStatus cuda_free_wiped(void* p, size_t n);  // zeroed first: device memory holds plaintext and keys
// The same for many (pointer, bytes) pairs, as their owners keep them: two device syncs in all.
CudaStatus cuda_free_wiped_all(const std::pair<void*, size_t>* buffers, size_t count);
CudaStatus cuda_host_alloc(void** p, size_t n);  // pinned
CudaStatus cuda_host_free(void* p);
CudaStatus cuda_stream_create(void** stream);
CudaStatus cuda_stream_destroy(void* stream);
enum CopyKind { kHostToDevice = 1, kDeviceToHost = 2, kDeviceToDevice = 3 };
CudaStatus cuda_copy_async(void* stream, void* dst, const void* src, size_t n, int kind);
CudaStatus cuda_copy(void* dst, const void* src, size_t n, int kind);  // complete on return, ordered before later work
CudaStatus cuda_stream_sync(void* stream);
CudaStatus cuda_device_sync();  // every stream of the current device
CudaStatus cuda_fill(void* p, int value, size_t n);  // cudaMemset, complete on return
CudaStatus cuda_free_memory(size_t* free_bytes);  // cudaMemGetInfo's free bytes on the current device

// Makes a device current for a scope and gives the calling thread its previous current device
// back when the scope ends. The current device is per host thread, and a job's own code on that
// thread relies on it: a library call that left another device current would send the job's next
// cudaMalloc or default-stream launch to the wrong GPU.
class CurrentDevice {
 public:
  CurrentDevice() = default;
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;
  ~CurrentDevice();
  CudaStatus select(int device);  // the first call records the device to restore

 private:
  int previous_ = -1;  // -1: not recorded yet; -2: the thread had no context, nothing to restore
};

}  // namespace tresor::gpu::detail
