// tresor/gpu/aesgcm.h — AES-256-GCM over sealed-format chunks (docs/formats.md §5) with the
// GPU kernel's algorithm (kernels/aesgcm.cuh, docs/gpu-channel.md): on a CUDA device, or emulated
// on the CPU thread by thread (the kernel's reference, checked against OpenSSL on every run).
//
// A run is a sequence of consecutive chunks of one sealed stream: frames back to back, each
// chunk_size + 16 bytes but the last, which holds 0..chunk_size bytes of plaintext and its tag.
// Opening releases nothing of a run that fails: when any chunk's tag does not verify, all of the
// run's output is zeroed and kChunkAuth names the first failing chunk and how many failed.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::gpu {

namespace aesgcm {
struct KeyData;
}

/// What the kernels need for one payload key Kp: AES-256 round keys, H = AES(Kp, 0^128), its
/// powers H^1..H^257 and the 4-bit GHASH table of H^256. Secret; wiped when destroyed.
class ChunkKey {
 public:
  [[nodiscard]] static Result<ChunkKey> derive(std::span<const std::byte, 32> payload_key);
  /// From a sealed stream's file key and nonce prefix (its payload key, docs/formats.md §4).
  [[nodiscard]] static Result<ChunkKey> for_stream(ByteSpan file_key, const std::array<std::byte, 7>& nonce_prefix);
  ChunkKey(ChunkKey&&) noexcept;
  ChunkKey& operator=(ChunkKey&&) noexcept;
  ~ChunkKey();
  /// The bytes a device copy holds (aesgcm::KeyData).
  [[nodiscard]] ByteSpan bytes() const;
  [[nodiscard]] const aesgcm::KeyData& data() const { return *data_; }

 private:
  struct Wipe {
    void operator()(aesgcm::KeyData* p) const;
  };
  explicit ChunkKey(std::unique_ptr<aesgcm::KeyData, Wipe> d) : data_(std::move(d)) {}
  std::unique_ptr<aesgcm::KeyData, Wipe> data_;
};

struct ChunkRun {
  std::array<std::byte, 7> nonce_prefix{};
  uint32_t chunk_size = 1u << 20;  // plaintext bytes of a full chunk: a multiple of 16, 16..64 MiB
  uint32_t first_index = 0;        // the stream index of the run's first chunk
  bool ends_with_final = false;    // the run's last chunk is the stream's final chunk (flag 0x01)
};

/// The run's geometry: how many chunks `frames_bytes` of frames hold and their plaintext size.
/// kMalformed when the chunk size is not a multiple of 16 in 16..64 MiB, when there are no
/// frames, a last frame shorter than a tag, an empty non-final-run tail, or indices past 2^32.
struct RunShape {
  uint64_t chunks = 0;
  uint64_t plaintext_bytes = 0;
};
[[nodiscard]] Result<RunShape> run_shape(const ChunkRun& run, uint64_t frames_bytes);
/// The frames' size for `plaintext_bytes` sealed as one run (the inverse of run_shape).
[[nodiscard]] Result<uint64_t> frames_size(const ChunkRun& run, uint64_t plaintext_bytes);

/// The kernel's algorithm on the CPU, thread by thread (a test reference: not constant time, not
/// fast; the CPU data path is OpenSSL). `out` must be exactly the plaintext (open) or frames
/// (seal) size.
[[nodiscard]] Result<void> open_chunks_emulated(const ChunkKey& key, const ChunkRun& run, ByteSpan frames, MutableByteSpan out);
[[nodiscard]] Result<void> seal_chunks_emulated(const ChunkKey& key, const ChunkRun& run, ByteSpan plaintext, MutableByteSpan frames);

/// One launch's contract, emulated (what a Device runs in place of the kernel): `chunks` chunks
/// of `run` (the last holding `last_len` plaintext bytes) from `in` to `out` (frames → plaintext,
/// or plaintext → frames when sealing), one verdict byte per chunk into `failed` (1 = the tag did
/// not verify and that chunk's output was zeroed). `key` is the kernel's key data.
void run_chunks_emulated(const aesgcm::KeyData& key, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                         std::byte* out, std::byte* failed);

/// The kernel on CUDA device `device`, from and to host buffers (copied in and out; for tests and
/// benchmarks — the channel keeps data on the device). kUnavailable without CUDA or a device.
[[nodiscard]] Result<void> open_chunks_cuda(int device, const ChunkKey& key, const ChunkRun& run, ByteSpan frames, MutableByteSpan out);
[[nodiscard]] Result<void> seal_chunks_cuda(int device, const ChunkKey& key, const ChunkRun& run, ByteSpan plaintext, MutableByteSpan frames);

}  // namespace tresor::gpu
