// tresor/gpu/channel.h — the secure channel between sealed files and device memory
// (docs/gpu-channel.md): ciphertext travels as it is, through pinned staging buffers that hold
// nothing else, into device memory, where the AES-GCM kernel (tresor/gpu/aesgcm.h) checks and
// decrypts it; results go back the reverse way, sealed by the kernel. Plaintext exists only in
// device memory.
//
// The device sits behind an interface (STYLE.md rule 6) with three implementations; devices may
// be shared (several channels, on several threads, at once):
//  - cuda_device(i): a CUDA GPU — pinned staging, one stream per staging slot, copies and kernels
//    overlapping across slots;
//  - cpu_device(): no GPU — "device memory" is host memory and chunks are opened with OpenSSL
//    (the data path of machines without a GPU, and the benchmarks' CPU baseline);
//  - emulated_device(): host memory and the kernel's CPU emulation, recording what crossed the
//    staging buffers (the tests' view of what a host could see).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/gpu/aesgcm.h"
#include "tresor/sealed.h"

namespace tresor::gpu {

/// A device's view of memory: device memory (device_alloc) or pinned host memory (staging).
struct Mem {
  std::byte* p = nullptr;
  size_t n = 0;
};

class ChannelDevice {
 public:
  virtual ~ChannelDevice() = default;
  /// "cuda:0 NVIDIA H200", "cpu (OpenSSL)", "emulated GPU (kernel on the CPU)".
  virtual std::string name() const = 0;
  /// True when device memory is ordinary host memory (the CPU and emulated devices).
  virtual bool host_memory() const = 0;
  /// What runs the work: a CUDA GPU, or host memory with OpenSSL (cpu_device) or with the
  /// kernel's emulation (emulated_device). Users that have CPU code for all three (the CT
  /// pipeline) run the CPU reference on kCpu and the kernels' emulation on kEmulated.
  enum class Kind { kCuda, kCpu, kEmulated };
  virtual Kind kind() const = 0;
  /// cuda_device(i)'s i; -1 on the host devices.
  virtual int ordinal() const { return -1; }
  virtual Result<Mem> device_alloc(size_t n) = 0;
  /// Zeroes, then frees.
  virtual void device_free(Mem m) = 0;
  virtual Result<Mem> staging_alloc(size_t n) = 0;
  virtual void staging_free(Mem m) = 0;
  /// The payload key's kernel data in device memory, for run_chunks; device_free wipes it. One
  /// per transfer, so that several channels can share a device.
  virtual Result<Mem> load_key(const ChunkKey& key) = 0;
  /// Streams: work on one stream runs in order; streams run concurrently. 0..streams()-1.
  virtual int streams() const = 0;
  virtual Result<void> copy_to_device(int stream, std::byte* dev, const std::byte* staging, size_t n) = 0;
  virtual Result<void> copy_to_host(int stream, std::byte* staging, const std::byte* dev, size_t n) = 0;
  /// Device to device (the benchmarks' memcpy baseline).
  virtual Result<void> copy_on_device(int stream, std::byte* dst, const std::byte* src, size_t n) = 0;
  /// Opens (seal = false: frames → plaintext) or seals (plaintext → frames) the run in device
  /// memory; per-chunk verdicts (1 = tag failed, output zeroed) into `failed` (device memory,
  /// one byte per chunk).
  virtual Result<void> run_chunks(int stream, const std::byte* key, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal,
                                  const std::byte* in, std::byte* out, std::byte* failed) = 0;
  /// Waits for everything queued on `stream`; the first error of its work.
  virtual Result<void> synchronize(int stream) = 0;
  /// Waits for all work on the device, also work queued outside the channel's streams.
  virtual Result<void> synchronize_all() = 0;
  /// ChannelDevice memory to the caller (for the job, and for tests): a synchronous copy.
  virtual Result<void> read_device(MutableByteSpan to, const std::byte* dev) = 0;
  virtual Result<void> write_device(std::byte* dev, ByteSpan from) = 0;
  /// n bytes of device memory set to `value`, complete on return.
  virtual Result<void> fill_device(std::byte* dev, std::byte value, size_t n) = 0;
};

[[nodiscard]] std::unique_ptr<ChannelDevice> cpu_device(unsigned threads = 0);
/// `on_staging` sees every staging buffer's bytes as they cross (tests assert they are ciphertext).
[[nodiscard]] std::unique_ptr<ChannelDevice> emulated_device(std::function<void(ByteSpan)> on_staging = {});
/// kUnavailable with the reason when this build has no CUDA or the device cannot be used.
[[nodiscard]] Result<std::unique_ptr<ChannelDevice>> cuda_device(int index);

/// The run of a whole sealed stream with this header: its prefix and chunk size, from chunk 0,
/// ending with the final chunk.
[[nodiscard]] ChunkRun whole_stream(const sealed::Header& header);

/// Decrypted data in device memory. Wiped and freed when destroyed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(ChannelDevice* device, Mem mem, size_t offset, size_t size) : device_(device), mem_(mem), offset_(offset), size_(size) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  ~DeviceBuffer();
  /// The data's first byte in device memory, and its size.
  [[nodiscard]] std::byte* data() const { return mem_.p + offset_; }
  [[nodiscard]] size_t size() const { return size_; }
  /// A copy to host memory (tests; a job reads device memory directly).
  [[nodiscard]] Result<Bytes> to_host() const;

 private:
  ChannelDevice* device_ = nullptr;
  Mem mem_{};
  size_t offset_ = 0, size_ = 0;
};

struct ChannelOptions {
  unsigned batch_chunks = 64;  // chunks per staging slot (one copy, one launch of that many blocks)
  unsigned depth = 3;          // staging slots: 2 = double, 3 = triple buffering
  // A slot's bytes at most (pinned host memory, in an SNP guest shared bounce memory, and the same
  // again on the device, per slot): large chunks take fewer per slot, at least one. With 64 MiB
  // chunks the default batch would pin 4 GiB a slot.
  size_t max_slot_bytes = size_t{256} << 20;
};

/// What the last transfer did (for benchmarks and tests).
struct TransferStats {
  uint64_t chunks = 0, batches = 0, staged_bytes = 0;
  unsigned max_in_flight = 0;  // slots in use at once
};

class SecureChannel {
 public:
  SecureChannel(ChannelDevice& device, ChannelOptions options = {});
  /// Plaintext bytes [offset, offset + length) of the sealed file at `path` (all of it when
  /// `length` is empty) into device memory. The file's header is authenticated with `keys` first;
  /// every chunk the range touches is checked by its tag before the call returns. On any failure
  /// nothing is returned and the device memory used is wiped; the error names the file and the
  /// first failing chunk.
  [[nodiscard]] Result<DeviceBuffer> upload(const std::string& path, const sealed::KeyRing& keys, uint64_t offset = 0,
                                            std::optional<uint64_t> length = std::nullopt);
  /// `data` (device memory) sealed into a new file at `path` (mode 0644, never partial: it has a
  /// name only once complete) to `options`' recipients and dataset keys. All work on the device
  /// is waited for first, so `data` may come from kernels still queued on any stream. An existing
  /// file at `path` is refused unless `overwrite` (then it is replaced whole, once complete).
  [[nodiscard]] Result<void> download(const std::byte* data, size_t size, const std::string& path, const sealed::SealOptions& options,
                                      bool overwrite = false);
  [[nodiscard]] const TransferStats& last() const { return stats_; }

 private:
  ChannelDevice& device_;
  // Chunks per slot for frames of chunk_size: batch_chunks, fewer where max_slot_bytes says so.
  [[nodiscard]] uint64_t batch_for(uint64_t chunk_size) const;
  ChannelOptions options_;
  TransferStats stats_;
};

}  // namespace tresor::gpu
