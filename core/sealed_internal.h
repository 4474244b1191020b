// Internals shared by the sealed-format readers and writers (docs/formats.md §5–§6). Private to
// core/: nothing here is API.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/io.h"
#include "tresor/sealed.h"

namespace tresor::sealed::detail {

inline size_t frame_size(uint32_t chunk_size) { return size_t{chunk_size} + kTagSize; }

/// Serialized header size for `o` (stanza sizes only; no randomness, no keys).
size_t header_size(const SealOptions& o);

/// One AES-GCM context per worker: contexts are not thread-safe.
Result<std::vector<crypto::AesGcm>> make_ciphers(ByteSpan key, unsigned n);

/// Shape of a sealed stream of known total size (docs/formats.md §5).
struct Shape {
  uint64_t chunks = 0;
  size_t last_frame = 0;
  uint64_t plaintext = 0;
};

/// Computes the shape of a body of `body` bytes. `final_at(i)` tells whether whole frame i
/// authenticates as the final chunk; it settles a body that ends 1..15 bytes past a whole frame
/// (a truncated tag, or bytes appended after a full final chunk).
Result<Shape> shape_of(uint64_t body, uint32_t chunk_size, const std::string& name,
                       const std::function<bool(uint64_t)>& final_at);

/// True when `frame` is a valid final chunk at `index`. Wipes the trial plaintext.
bool authenticates_as_final(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t index);

/// Explains why `frame` (at `position`, opened with last = `tried_last`) failed its tag check:
/// truncated, trailing-data, chunk-reordered or chunk-auth (docs/formats.md §6). Releases no
/// plaintext; looks at most 65536 chunk indices either side of `position`, up to `max_index`.
Error diagnose_chunk(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t position, bool tried_last,
                     bool more_follows, uint64_t max_index, const std::string& name, uint64_t frame_offset);

/// A header that has been parsed, unlocked and MAC-checked, with the payload key.
struct Opened {
  Header header;
  Bytes header_bytes;
  SecretBuffer payload_key;
};

/// Parses, unlocks and verifies `header_bytes`.
Result<Opened> finish_open(Bytes header_bytes, const KeyRing& keys, const std::string& name);
/// Reads a header from the start of `src`, then as finish_open.
Result<Opened> read_header_stream(ByteSource& src, const KeyRing& keys, const std::string& name);

}  // namespace tresor::sealed::detail
