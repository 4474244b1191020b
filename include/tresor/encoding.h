// tresor/encoding.h — byte helpers and text encodings (hex, RFC 4648 base32) used in file formats.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/error.h"

namespace tresor {

using Bytes = std::vector<std::byte>;
using ByteSpan = std::span<const std::byte>;
using MutableByteSpan = std::span<std::byte>;

/// Views the characters of `s` as bytes (no copy; valid while `s` lives).
inline ByteSpan as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}
/// Copies `b` into a std::string (for printing or comparing text payloads).
inline std::string to_string(ByteSpan b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}
inline Bytes to_bytes(std::string_view s) {
  auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

/// Refuses JSON text holding a NUL byte before it reaches a parser: RFC 8259 allows U+0000 only
/// escaped inside strings, and nlohmann::json takes a raw NUL for the end of the input, so
/// `{"a":1}\0anything` would parse as `{"a":1}` (what follows unread, while a signature or hash
/// over the text covers it). kInvalidArgument "<what> is not valid JSON: a NUL byte at offset N".
[[nodiscard]] Result<void> json_text_without_nul(std::string_view text, std::string_view what);

/// Lower-case hex of `b`.
std::string to_hex(ByteSpan b);
/// Parses hex (either case, no separators); the error names `what` and the offending position.
Result<Bytes> from_hex(std::string_view hex, std::string_view what = "hex string");

/// RFC 4648 §5 base64url without padding (JOSE).
std::string base64url_encode(ByteSpan b);
/// Decodes base64url; padding and characters outside the URL-safe alphabet are rejected.
Result<Bytes> base64url_decode(std::string_view text, std::string_view what = "base64url string");
/// RFC 4648 §4 standard base64 with padding (the KBS nonce).
std::string base64_encode(ByteSpan b);
/// Decodes standard base64 with padding; other characters and a wrong length are rejected.
Result<Bytes> base64_decode(std::string_view text, std::string_view what = "base64 string");

/// RFC 4648 base32 without padding, lower-case ('a'..'z', '2'..'7').
std::string base32_encode(ByteSpan b);
/// Decodes base32 without padding, case-insensitive; rejects non-zero trailing bits.
Result<Bytes> base32_decode(std::string_view text, std::string_view what = "base32 string");

// Little- and big-endian integer access for the binary formats.
inline void store_le16(std::byte* p, uint16_t v) {
  p[0] = std::byte(v & 0xff);
  p[1] = std::byte(v >> 8);
}
inline void store_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte((v >> (8 * i)) & 0xff);
}
inline void store_be32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte((v >> (24 - 8 * i)) & 0xff);
}
inline uint32_t load_be32(const std::byte* p) {
  return (std::to_integer<uint32_t>(p[0]) << 24) | (std::to_integer<uint32_t>(p[1]) << 16) | (std::to_integer<uint32_t>(p[2]) << 8) |
         std::to_integer<uint32_t>(p[3]);
}
inline void store_be64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = std::byte((v >> (56 - 8 * i)) & 0xff);
}
inline uint64_t load_be64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}
inline uint16_t load_le16(const std::byte* p) {
  return static_cast<uint16_t>(std::to_integer<uint16_t>(p[0]) |
                               (std::to_integer<uint16_t>(p[1]) << 8));
}
inline uint32_t load_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | std::to_integer<uint32_t>(p[i]);
  return v;
}

/// Formats a byte count for people: "1.0 GiB", "512 B".
std::string format_size(uint64_t bytes);
/// Parses "1GiB", "64MiB", "4096", "1M" (binary multiples); the error names `what`.
Result<uint64_t> parse_size(std::string_view text, std::string_view what);

}  // namespace tresor
