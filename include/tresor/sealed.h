// tresor/sealed.h — the sealed stream format, version 1 (normative spec: docs/formats.md).
//
// A sealed file is a header followed by fixed-size chunks of AES-256-GCM ciphertext in the STREAM
// construction: chunk i is encrypted under nonce = prefix ‖ be32(i) ‖ last-flag, so truncation,
// reordering, extension and chunk swaps are all detected, and every chunk decrypts on its own at a
// computable offset. The header wraps a random per-file key to user recipients (X25519) and/or
// named dataset keys, and is authenticated by an HMAC keyed from the file key.
//
// Layers: parse_header/serialize_header are pure; SealWriter/SealReader stream through
// ByteSink/ByteSource with memory bounded by threads × 2 × chunk size; RandomAccessReader
// decrypts any chunk or byte range of a seekable source.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/identity.h"
#include "tresor/io.h"

namespace tresor::sealed {

// docs/formats.md §2 (header layout).
inline constexpr std::array<std::byte, 8> kMagic = {std::byte{0x89}, std::byte{'T'}, std::byte{'R'},
                                                    std::byte{'E'},  std::byte{'S'}, std::byte{'O'},
                                                    std::byte{'R'},  std::byte{'\n'}};
inline constexpr uint8_t kVersion = 1;
inline constexpr size_t kFixedHeaderSize = 28;
inline constexpr size_t kHeaderMacSize = 32;
inline constexpr size_t kMaxHeaderSize = 64 * 1024;
inline constexpr size_t kMaxStanzas = 512;
inline constexpr size_t kNoncePrefixSize = 7;
inline constexpr size_t kTagSize = crypto::kGcmTagSize;
inline constexpr size_t kFileKeySize = 32;
inline constexpr size_t kWrappedKeySize = kFileKeySize + crypto::kGcmTagSize;  // 48
inline constexpr size_t kDatasetSaltSize = 16;
inline constexpr uint32_t kDefaultChunkSize = 1u << 20;
inline constexpr uint32_t kMinChunkSize = 16;
inline constexpr uint32_t kMaxChunkSize = 64u << 20;
inline constexpr uint64_t kMaxChunks = uint64_t{1} << 32;  // the 32-bit chunk counter

enum class StanzaType : uint8_t { kX25519 = 1, kDatasetKey = 2 };

/// File key wrapped to a user's X25519 key (docs/formats.md §3.1).
struct X25519Stanza {
  std::array<std::byte, 32> ephemeral{};
  std::array<std::byte, kWrappedKeySize> wrapped{};
  bool operator==(const X25519Stanza&) const = default;
};
/// File key wrapped to a named 32-byte dataset key (docs/formats.md §3.2).
struct DatasetStanza {
  std::string dataset_id;
  std::array<std::byte, kDatasetSaltSize> salt{};
  std::array<std::byte, kWrappedKeySize> wrapped{};
  bool operator==(const DatasetStanza&) const = default;
};
/// A stanza type this version does not know: kept (it is covered by the MAC) and skipped.
struct UnknownStanza {
  uint8_t type = 0;
  Bytes body;
  bool operator==(const UnknownStanza&) const = default;
};
using Stanza = std::variant<X25519Stanza, DatasetStanza, UnknownStanza>;

struct Header {
  uint8_t version = kVersion;
  uint32_t chunk_size = kDefaultChunkSize;
  std::array<std::byte, kNoncePrefixSize> nonce_prefix{};
  std::vector<Stanza> stanzas;
  std::array<std::byte, kHeaderMacSize> mac{};

  /// Serialized size in bytes (fixed part + stanzas + MAC).
  size_t size() const;
  bool operator==(const Header&) const = default;
};

/// Reads the fixed part of a header (at least kFixedHeaderSize bytes) and returns the total
/// header length it declares. Checks magic, version, flags and length bounds. Pure.
[[nodiscard]] Result<size_t> header_length(ByteSpan prefix);
/// Parses a complete header from the start of `bytes` (which may continue with chunks). Pure;
/// stops at the first error, naming the field and offset. Does not check the MAC.
[[nodiscard]] Result<Header> parse_header(ByteSpan bytes);
/// Serializes `h` byte-exactly as parse_header read it (the MAC field as stored in `h`).
Bytes serialize_header(const Header& h);

/// File keys for exactly the files they open (docs/formats.md §11.1): each sealed file's own file key,
/// found by its header's MAC (random per file) and checked against that MAC before use, so that a
/// key opens its own file and no other. The agent hands a job these, not the dataset keys, when
/// the job reads its sealed inputs itself (`TRESOR_INPUTS=sealed`, docs/gpu-channel.md): the job
/// can open the files it was given and nothing else sealed under the same dataset key.
class FileKeys {
 public:
  inline static constexpr std::string_view kMagic = "tresor-file-keys-v1";
  /// Adds `file_key` for the file whose header MAC is `header_mac`; `name` is informational (the
  /// file's path under the data root; no line breaks). The same file again (another copy: the same
  /// MAC and key) is kept once; a different key under a MAC already present is refused.
  [[nodiscard]] Result<void> add(const std::array<std::byte, kHeaderMacSize>& header_mac, SecretBuffer file_key, std::string name);
  /// The key of the file with this header MAC, or nullptr.
  [[nodiscard]] const SecretBuffer* find(const std::array<std::byte, kHeaderMacSize>& header_mac) const;
  [[nodiscard]] size_t size() const { return entries_.size(); }
  /// The file text: the magic line, then one line per file: `<header MAC hex> <file key hex> <name>`.
  [[nodiscard]] SecretBuffer to_file_text() const;
  /// Parses that text; '#' lines and blank lines are ignored. Errors name `what` and the line.
  [[nodiscard]] static Result<FileKeys> parse(ByteSpan text, const std::string& what);
  /// Reads a file of them (a secret file: yours, mode 0600; at most 64 MiB).
  [[nodiscard]] static Result<FileKeys> load(const std::string& path);

 private:
  struct Entry {
    SecretBuffer key;
    std::string name;
  };
  std::map<std::array<std::byte, kHeaderMacSize>, Entry> entries_;  // by header MAC
};

/// Keys and identities that may open a file. A dataset key with an empty id is tried against
/// every dataset stanza (for a key file given without its dataset id). File keys are tried when
/// no stanza opens.
struct KeyRing {
  std::vector<const Identity*> identities;
  std::vector<const DatasetKey*> dataset_keys;
  std::vector<const FileKeys*> file_keys;
};

struct SealOptions {
  uint32_t chunk_size = kDefaultChunkSize;
  unsigned threads = 1;  // 0 = all cores
  std::vector<Recipient> recipients;
  std::vector<const DatasetKey*> datasets;
  /// Source of the file key, nonce prefix, salts and ephemeral keys. nullptr = the CSPRNG.
  crypto::RandomSource* rng = nullptr;
  /// Parallel paths only: called now and then, from one worker thread, with an estimate of the
  /// input bytes processed so far.
  std::function<void(uint64_t)> progress;
};

struct OpenOptions {
  unsigned threads = 1;           // 0 = all cores
  std::string name = "<stream>";  // named in every error message
  /// Parallel paths only: as SealOptions::progress.
  std::function<void(uint64_t)> progress;
};

/// Validates seal options (chunk size, at least one recipient or dataset key, header ≤ 64 KiB).
[[nodiscard]] Result<void> check_seal_options(const SealOptions& o);

/// Derived per-file keys (docs/formats.md §4). Exposed for test vectors and the GPU channel.
struct StreamKeys {
  SecretBuffer payload_key;  // AES-256-GCM key of the chunks
  SecretBuffer mac_key;      // HMAC-SHA-256 key of the header
};
[[nodiscard]] Result<StreamKeys> derive_stream_keys(ByteSpan file_key, ByteSpan nonce_prefix);

/// The 12-byte nonce of chunk `index` (prefix ‖ be32(index) ‖ last). index must be below 2^32
/// (the process aborts otherwise: a wrapped counter would reuse a nonce).
std::array<std::byte, crypto::kGcmNonceSize> chunk_nonce(const std::array<std::byte, kNoncePrefixSize>& prefix,
                                                         uint64_t index, bool last);

/// Builds a header for `o`, returning it (MAC filled in) with its serialized bytes and the
/// fresh file key.
struct NewHeader {
  Header header;
  Bytes bytes;
  SecretBuffer file_key;
};
[[nodiscard]] Result<NewHeader> make_header(const SealOptions& o);

/// Finds a stanza that `keys` can open, unwraps the file key and verifies the header MAC over
/// `header_bytes` (the serialized header). Errors: kNoMatchingKey, kHeaderAuth.
[[nodiscard]] Result<SecretBuffer> unlock(const Header& h, ByteSpan header_bytes, const KeyRing& keys,
                                          const std::string& name);

/// A sealed file's header read from the start of `source`, parsed and unlocked with `keys` (its MAC
/// verified): what every reader does before it touches a chunk. Errors name `name`: an empty or
/// truncated header, a malformed one, no matching key, an altered header.
struct UnlockedHeader {
  Header header;
  Bytes bytes;            // as serialized in the file
  SecretBuffer file_key;  // derive_stream_keys gives the payload key
};
[[nodiscard]] Result<UnlockedHeader> read_header(const RandomAccessSource& source, const KeyRing& keys, const std::string& name);

/// SealWriter seals a stream pushed into it. The caller's thread copies data in and sealed chunks
/// out while `threads` workers seal (none with one thread). Memory: about threads × 2 × chunk.
class SealWriter {
 public:
  /// Writes the header to `sink` at once. `sink` must outlive the writer.
  static Result<SealWriter> create(const SealOptions& options, ByteSink& sink);
  SealWriter(SealWriter&&) noexcept;
  SealWriter& operator=(SealWriter&&) noexcept;
  ~SealWriter();

  [[nodiscard]] Result<void> write(ByteSpan data);
  /// Reads `source` to its end straight into the writer's buffers (no intermediate copy).
  /// Does not finish the stream.
  [[nodiscard]] Result<void> write_from(ByteSource& source);
  /// Seals the final chunk. A stream that is not finished is not valid (readers report truncation).
  [[nodiscard]] Result<void> finish();
  uint64_t plaintext_bytes() const;
  const Header& header() const;

 private:
  struct Impl;
  explicit SealWriter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// SealReader opens a stream pulled from a ByteSource, releasing plaintext only chunk by chunk
/// after each chunk's tag verifies. It cannot know that later chunks are intact: callers that must
/// not act on partial data write to a temporary file and keep it only when read() reached the end
/// (the CLI does this).
class SealReader {
 public:
  /// Reads and authenticates the header. `source` must outlive the reader.
  static Result<SealReader> open(ByteSource& source, const KeyRing& keys, const OpenOptions& options);
  SealReader(SealReader&&) noexcept;
  SealReader& operator=(SealReader&&) noexcept;
  ~SealReader();

  const Header& header() const;
  /// Returns the next chunk's authenticated plaintext, valid until the next call; an empty span
  /// once the final chunk has been handed out.
  [[nodiscard]] Result<ByteSpan> next();
  /// Copies up to out.size() bytes of plaintext into `out`; 0 at the end of a complete stream.
  [[nodiscard]] Result<size_t> read(MutableByteSpan out);
  uint64_t plaintext_bytes() const;

 private:
  struct Impl;
  explicit SealReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// RandomAccessReader decrypts chunks and byte ranges of a seekable sealed source.
class RandomAccessReader {
 public:
  /// Reads the header, unlocks it, and checks the source's size has the shape of a v1 stream
  /// (kTruncated if it cannot). `source` must outlive the reader.
  static Result<RandomAccessReader> open(const RandomAccessSource& source, const KeyRing& keys,
                                         const OpenOptions& options);
  RandomAccessReader(RandomAccessReader&&) noexcept;
  RandomAccessReader& operator=(RandomAccessReader&&) noexcept;
  ~RandomAccessReader();

  const Header& header() const;
  uint64_t chunk_count() const;
  uint64_t plaintext_size() const;
  /// Byte offset of chunk i's ciphertext in the source.
  uint64_t chunk_offset(uint64_t i) const;
  /// Plaintext size of chunk i.
  size_t chunk_plaintext_size(uint64_t i) const;
  /// Decrypts chunk i into `out` (at least chunk_plaintext_size(i) bytes); returns its size.
  [[nodiscard]] Result<size_t> read_chunk(uint64_t i, MutableByteSpan out) const;
  /// Decrypts plaintext bytes [offset, offset + out.size()) using the reader's threads.
  /// On failure `out` is zeroed.
  [[nodiscard]] Result<void> read_range(uint64_t offset, MutableByteSpan out) const;
  /// Authenticates every chunk (in parallel) without releasing plaintext.
  [[nodiscard]] Result<void> verify_all() const;

 private:
  struct Impl;
  explicit RandomAccessReader(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Seals everything from `in` into `out`; returns the plaintext byte count.
[[nodiscard]] Result<uint64_t> seal_stream(ByteSource& in, ByteSink& out, const SealOptions& options);
/// Opens everything from `in` into `out`; returns the plaintext byte count.
[[nodiscard]] Result<uint64_t> open_stream(ByteSource& in, ByteSink& out, const KeyRing& keys,
                                           const OpenOptions& options);

/// Exact size of the sealed stream of `plaintext_size` bytes under `options` (header included).
[[nodiscard]] Result<uint64_t> sealed_size(uint64_t plaintext_size, const SealOptions& options);

/// The parallel path: seals `plaintext` straight into `out` (at least sealed_size() bytes) on
/// options.threads threads, each sealing a contiguous run of chunks with no intermediate copy.
/// Returns the number of bytes written.
[[nodiscard]] Result<size_t> seal_parallel(ByteSpan plaintext, MutableByteSpan out, const SealOptions& options);
/// The parallel path for opening: authenticates and decrypts `sealed` straight into `out` (at least
/// the plaintext size; kInvalidArgument names the size needed). Returns the plaintext size. On any
/// failure `out` is zeroed and the error names the lowest failing chunk.
[[nodiscard]] Result<size_t> open_parallel(ByteSpan sealed, MutableByteSpan out, const KeyRing& keys,
                                           const OpenOptions& options);

/// The parallel path between seekable files (or any random-access source and sink): each worker
/// reads, seals and writes its own run of chunks with pread/pwrite, using threads × 2 × chunk
/// bytes of memory. Returns the sealed size.
[[nodiscard]] Result<uint64_t> seal_parallel(const RandomAccessSource& in, const RandomAccessSink& out,
                                             const SealOptions& options);
/// Opens a seekable sealed source into a random-access sink in parallel. On failure the sink is
/// truncated to 0 bytes and the error names the lowest failing chunk. Returns the plaintext size.
[[nodiscard]] Result<uint64_t> open_parallel(const RandomAccessSource& in, const RandomAccessSink& out,
                                             const KeyRing& keys, const OpenOptions& options);

/// Seals a whole buffer (convenience for small data and tests).
[[nodiscard]] Result<Bytes> seal_buffer(ByteSpan plaintext, const SealOptions& options);
/// Opens a whole sealed buffer.
[[nodiscard]] Result<SecretBuffer> open_buffer(ByteSpan sealed, const KeyRing& keys, const OpenOptions& options);

}  // namespace tresor::sealed
