// Sealed format v1: what every reader and writer shares — the stream's shape, failure
// diagnosis (docs/formats.md §6), and opening a header.
#include <algorithm>
#include <cstring>

#include "sealed_internal.h"

namespace tresor::sealed::detail {

// One AES-GCM context per worker slot: contexts are not thread-safe.
Result<std::vector<crypto::AesGcm>> make_ciphers(ByteSpan key, unsigned n) {
  std::vector<crypto::AesGcm> v;
  v.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    auto g = crypto::AesGcm::create(key);
    if (!g) return std::unexpected(g.error());
    v.push_back(std::move(*g));
  }
  return v;
}

// `final_at(i)` tells whether whole frame i authenticates as the final chunk. It settles a body
// that ends 1..15 bytes past a whole frame: a truncated tag, or bytes appended after a full
// final chunk (the streaming reader calls the latter trailing data; so must every reader).
Result<Shape> shape_of(uint64_t body, uint32_t chunk_size, const std::string& name,
                       const std::function<bool(uint64_t)>& final_at) {
  const uint64_t fs = frame_size(chunk_size);
  if (body == 0) return fail(ErrorCode::kTruncated, name + ": the stream ends right after its header, with no chunks");
  const uint64_t rem = body % fs;
  if (rem > 0 && rem < kTagSize) {
    const uint64_t whole = body / fs;
    if (whole > 0 && final_at(whole - 1)) {
      return fail(ErrorCode::kTrailingData, name + ": chunk " + std::to_string(whole - 1) +
                                                " is the stream's final chunk, but " + std::to_string(rem) +
                                                " more bytes follow it: bytes were appended");
    }
    return fail(ErrorCode::kTruncated, name + ": the last chunk has " + std::to_string(rem) +
                                           " bytes, less than its 16-byte tag: the stream is truncated");
  }
  Shape s;
  s.chunks = body / fs + (rem > 0 ? 1 : 0);
  if (s.chunks > kMaxChunks) return fail(ErrorCode::kMalformed, name + ": more than 2^32 chunks");
  s.last_frame = static_cast<size_t>(rem > 0 ? rem : fs);
  s.plaintext = (s.chunks - 1) * chunk_size + (s.last_frame - kTagSize);
  return s;
}

// Explains why a chunk failed its tag check (docs/formats.md §6). GCM's tag for ciphertext C under
// nonce N is GHASH(C) xor E(J0(N)), and only the second term depends on the nonce; so one pass
// recovers GHASH(C) and every other (index, last) pair costs one AES block. This tells apart a
// chunk that belongs to this stream at another position (reordered), a final chunk followed by
// data (extension), a non-final chunk at the end (truncation), and anything else (altered, or
// from another stream). No plaintext is released.
// True when `frame` is a valid final chunk at `index`. Wipes the trial plaintext.
bool authenticates_as_final(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t index) {
  if (frame.size() < kTagSize || index >= kMaxChunks) return false;
  SecretBuffer scratch(frame.size() - kTagSize);
  return aes.open(chunk_nonce(h.nonce_prefix, index, true), {}, frame, scratch.span()).has_value();
}

Error diagnose_chunk(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t position, bool tried_last,
                     bool more_follows, uint64_t max_index, const std::string& name, uint64_t frame_offset) {
  const std::string where = name + ": chunk " + std::to_string(position) + " (bytes " + std::to_string(frame_offset) +
                            ".." + std::to_string(frame_offset + frame.size()) + ")";
  if (frame.size() < kTagSize) {
    return {ErrorCode::kTruncated, where + " has " + std::to_string(frame.size()) +
                                       " bytes, less than its 16-byte tag: the stream is truncated"};
  }
  const ByteSpan ct = frame.first(frame.size() - kTagSize);
  const ByteSpan tag = frame.subspan(frame.size() - kTagSize);
  const std::string auth_msg = where + " failed authentication: it was altered, or comes from another stream";

  auto j0 = [&](uint64_t index, bool last) {
    std::array<std::byte, 16> b{};
    const auto n = chunk_nonce(h.nonce_prefix, index, last);
    std::memcpy(b.data(), n.data(), n.size());
    b[15] = std::byte{1};  // J0 = IV ‖ 0^31 ‖ 1 for 96-bit IVs (NIST SP 800-38D §7.1 step 2)
    return b;
  };
  auto t0 = aes.tag_of_ciphertext(chunk_nonce(h.nonce_prefix, position, tried_last), ct);
  auto e0 = j0(position, tried_last);
  if (!t0 || !aes.encrypt_blocks(e0)) return {ErrorCode::kChunkAuth, auth_msg};
  std::array<std::byte, 16> ghash;
  for (size_t i = 0; i < 16; ++i) ghash[i] = (*t0)[i] ^ e0[i];

  // Candidates: every (index, last) with index within kWindow of the position (and at most
  // max_index): about 2^18 AES blocks at most, so a hostile file cannot make diagnosis slow.
  constexpr uint64_t kWindow = 65536;
  const uint64_t first = position > kWindow ? position - kWindow : 0;
  const uint64_t limit = std::min<uint64_t>({max_index, position + kWindow, kMaxChunks - 1});
  constexpr uint64_t kBatch = 4096;
  for (uint64_t start = first; start <= limit; start += kBatch) {
    const uint64_t count = std::min<uint64_t>(kBatch, limit - start + 1);
    Bytes blocks(2 * count * 16);
    for (uint64_t k = 0; k < count; ++k) {
      for (int last = 0; last < 2; ++last) {
        auto b = j0(start + k, last != 0);
        std::memcpy(blocks.data() + (2 * k + static_cast<uint64_t>(last)) * 16, b.data(), 16);
      }
    }
    if (!aes.encrypt_blocks(blocks)) return {ErrorCode::kChunkAuth, auth_msg};
    for (uint64_t k = 0; k < count; ++k) {
      for (int last = 0; last < 2; ++last) {
        const std::byte* e = blocks.data() + (2 * k + static_cast<uint64_t>(last)) * 16;
        std::array<std::byte, 16> cand;
        for (size_t i = 0; i < 16; ++i) cand[i] = ghash[i] ^ e[i];
        if (!crypto::ct_equal(cand, tag)) continue;
        const uint64_t index = start + k;
        const bool is_last = last != 0;
        if (index == position && is_last == tried_last) continue;  // cannot happen; be safe
        if (index == position && is_last && more_follows) {
          return {ErrorCode::kTrailingData,
                  where + " is the stream's final chunk, but more data follows it: bytes were appended"};
        }
        if (index == position && !is_last && !more_follows) {
          return {ErrorCode::kTruncated, where + " is not the final chunk, but the stream ends after it: truncated"};
        }
        return {ErrorCode::kChunkReordered, where + " is chunk " + std::to_string(index) +
                                                (is_last ? " (final)" : "") +
                                                " of this stream: chunks were reordered or duplicated"};
      }
    }
  }
  return {ErrorCode::kChunkAuth, auth_msg};
}

Result<Opened> finish_open(Bytes header_bytes, const KeyRing& keys, const std::string& name) {
  auto h = parse_header(header_bytes);
  if (!h) return fail(h.error().code, name + ": " + h.error().message);
  auto file_key = unlock(*h, header_bytes, keys, name);
  if (!file_key) return std::unexpected(file_key.error());
  auto sk = derive_stream_keys(file_key->span(), h->nonce_prefix);
  if (!sk) return std::unexpected(sk.error());
  return Opened{std::move(*h), std::move(header_bytes), std::move(sk->payload_key)};
}

Result<Opened> read_header_stream(ByteSource& src, const KeyRing& keys, const std::string& name) {
  Bytes fixed(kFixedHeaderSize);
  auto n = read_full(src, fixed);
  if (!n) return std::unexpected(n.error());
  fixed.resize(*n);
  if (*n == 0) return fail(ErrorCode::kTruncated, name + ": empty input, not a sealed file");
  auto len = header_length(fixed);
  if (!len) return fail(len.error().code, name + ": " + len.error().message);
  Bytes all(*len);
  std::memcpy(all.data(), fixed.data(), fixed.size());
  auto m = read_full(src, MutableByteSpan(all).subspan(fixed.size()));
  if (!m) return std::unexpected(m.error());
  if (fixed.size() + *m < *len) {
    return fail(ErrorCode::kTruncated, name + ": sealed header truncated at byte " + std::to_string(fixed.size() + *m) +
                                           " of " + std::to_string(*len));
  }
  return finish_open(std::move(all), keys, name);
}

}  // namespace tresor::sealed::detail
