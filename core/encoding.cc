#include "tresor/encoding.h"

#include <cctype>
#include <cstdio>
#include <cstring>
#include <limits>

namespace tresor {

std::string_view error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid-argument";
    case ErrorCode::kIo: return "io";
    case ErrorCode::kExists: return "exists";
    case ErrorCode::kCrypto: return "crypto";
    case ErrorCode::kNotSealed: return "not-sealed";
    case ErrorCode::kUnsupportedVersion: return "unsupported-version";
    case ErrorCode::kMalformed: return "malformed";
    case ErrorCode::kHeaderAuth: return "header-auth";
    case ErrorCode::kNoMatchingKey: return "no-matching-key";
    case ErrorCode::kTruncated: return "truncated";
    case ErrorCode::kTrailingData: return "trailing-data";
    case ErrorCode::kChunkReordered: return "chunk-reordered";
    case ErrorCode::kChunkAuth: return "chunk-auth";
    case ErrorCode::kAuth: return "auth";
    case ErrorCode::kPermission: return "permission";
    case ErrorCode::kUnavailable: return "unavailable";
    case ErrorCode::kPolicy: return "policy-denied";
  }
  return "unknown";
}

Result<void> json_text_without_nul(std::string_view text, std::string_view what) {
  if (const size_t at = text.find('\0'); at != std::string_view::npos) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " is not valid JSON: a NUL byte at offset " + std::to_string(at));
  }
  return {};
}

std::string to_hex(ByteSpan b) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(b.size() * 2);
  for (std::byte x : b) {
    const auto v = std::to_integer<unsigned>(x);
    out.push_back(kDigits[v >> 4]);
    out.push_back(kDigits[v & 15]);
  }
  return out;
}

namespace {
int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

Result<Bytes> from_hex(std::string_view hex, std::string_view what) {
  if (hex.size() % 2 != 0) {
    return fail(ErrorCode::kInvalidArgument,
                std::string(what) + " has an odd number of hex digits (" + std::to_string(hex.size()) + ")");
  }
  Bytes out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = hex_value(hex[2 * i]);
    const int lo = hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return fail(ErrorCode::kInvalidArgument, std::string(what) + " has a non-hex character at position " +
                                                   std::to_string(hi < 0 ? 2 * i : 2 * i + 1));
    }
    out[i] = std::byte(static_cast<unsigned char>(hi << 4 | lo));
  }
  return out;
}

namespace {
constexpr char kB64Url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
constexpr char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string b64(ByteSpan b, const char* alphabet, bool pad) {
  std::string out;
  out.reserve((b.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= b.size(); i += 3) {
    const uint32_t n = (std::to_integer<uint32_t>(b[i]) << 16) | (std::to_integer<uint32_t>(b[i + 1]) << 8) |
                       std::to_integer<uint32_t>(b[i + 2]);
    for (int k = 3; k >= 0; --k) out.push_back(alphabet[(n >> (6 * k)) & 63]);
  }
  const size_t rest = b.size() - i;
  if (rest > 0) {
    uint32_t n = std::to_integer<uint32_t>(b[i]) << 16;
    if (rest == 2) n |= std::to_integer<uint32_t>(b[i + 1]) << 8;
    out.push_back(alphabet[(n >> 18) & 63]);
    out.push_back(alphabet[(n >> 12) & 63]);
    if (rest == 2) out.push_back(alphabet[(n >> 6) & 63]);
    if (pad) out.append(rest == 1 ? "==" : "=");
  }
  return out;
}
}  // namespace

std::string base64url_encode(ByteSpan b) { return b64(b, kB64Url, false); }
std::string base64_encode(ByteSpan b) { return b64(b, kB64, true); }

namespace {
// Decodes base64 text of `alphabet`; `padded`: the length must be a multiple of 4 with up to two
// '=' at the end (RFC 4648 §4); otherwise no '=' at all (§5 as JOSE uses it).
Result<Bytes> unb64(std::string_view text, const char* alphabet, bool padded, std::string_view what) {
  if (padded) {
    if (text.size() % 4 != 0) {
      return fail(ErrorCode::kInvalidArgument, std::string(what) + " has a length of " + std::to_string(text.size()) +
                                                   ", not a multiple of 4 (padded base64)");
    }
    size_t pad = 0;
    while (pad < 2 && pad < text.size() && text[text.size() - 1 - pad] == '=') ++pad;
    text.remove_suffix(pad);
  }
  if (text.size() % 4 == 1) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " has an impossible length " + std::to_string(text.size()));
  }
  Bytes out;
  out.reserve(text.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char* p = std::strchr(alphabet, text[i]);
    if (text[i] == '\0' || p == nullptr) {
      return fail(ErrorCode::kInvalidArgument, std::string(what) + " has a character outside " +
                                                   (padded ? "base64" : "base64url") + " at position " + std::to_string(i));
    }
    acc = (acc << 6) | static_cast<uint32_t>(p - alphabet);
    bits += 6;
    if (bits >= 8) {
      out.push_back(std::byte((acc >> (bits - 8)) & 0xff));
      bits -= 8;
    }
  }
  if ((acc & ((1u << bits) - 1)) != 0) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " has non-zero padding bits");
  }
  return out;
}
}  // namespace

Result<Bytes> base64url_decode(std::string_view text, std::string_view what) { return unb64(text, kB64Url, false, what); }
Result<Bytes> base64_decode(std::string_view text, std::string_view what) { return unb64(text, kB64, true, what); }

namespace {
constexpr char kBase32[] = "abcdefghijklmnopqrstuvwxyz234567";
}

std::string base32_encode(ByteSpan b) {
  std::string out;
  out.reserve((b.size() * 8 + 4) / 5);
  uint32_t acc = 0;
  int bits = 0;
  for (std::byte x : b) {
    acc = (acc << 8) | std::to_integer<uint32_t>(x);
    bits += 8;
    while (bits >= 5) {
      out.push_back(kBase32[(acc >> (bits - 5)) & 31]);
      bits -= 5;
    }
  }
  if (bits > 0) out.push_back(kBase32[(acc << (5 - bits)) & 31]);
  return out;
}

Result<Bytes> base32_decode(std::string_view text, std::string_view what) {
  Bytes out;
  out.reserve(text.size() * 5 / 8);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
    int v = -1;
    if (c >= 'a' && c <= 'z') v = c - 'a';
    if (c >= '2' && c <= '7') v = c - '2' + 26;
    if (v < 0) {
      return fail(ErrorCode::kInvalidArgument,
                  std::string(what) + " has an invalid character '" + std::string(1, text[i]) +
                      "' at position " + std::to_string(i));
    }
    acc = (acc << 5) | static_cast<uint32_t>(v);
    bits += 5;
    if (bits >= 8) {
      out.push_back(std::byte((acc >> (bits - 8)) & 0xff));
      bits -= 8;
    }
  }
  if (bits >= 5 || (acc & ((1u << bits) - 1)) != 0) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " has a bad length or non-zero padding bits");
  }
  return out;
}

std::string format_size(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[u]);
  }
  return buf;
}

Result<uint64_t> parse_size(std::string_view text, std::string_view what) {
  size_t i = 0;
  uint64_t v = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (v > (std::numeric_limits<uint64_t>::max() - d) / 10) {
      return fail(ErrorCode::kInvalidArgument, std::string(what) + " '" + std::string(text) + "' is too large");
    }
    v = v * 10 + d;
    ++i;
  }
  if (i == 0) {
    return fail(ErrorCode::kInvalidArgument,
                std::string(what) + " '" + std::string(text) + "' is not a size (examples: 4096, 64KiB, 1MiB, 1GiB)");
  }
  std::string unit(text.substr(i));
  for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int shift = -1;
  if (unit.empty() || unit == "b") shift = 0;
  if (unit == "k" || unit == "kib" || unit == "kb") shift = 10;
  if (unit == "m" || unit == "mib" || unit == "mb") shift = 20;
  if (unit == "g" || unit == "gib" || unit == "gb") shift = 30;
  if (shift < 0) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " has unknown unit '" + std::string(text.substr(i)) +
                                                 "' (use B, KiB, MiB or GiB)");
  }
  if (shift > 0 && v > (std::numeric_limits<uint64_t>::max() >> shift)) {
    return fail(ErrorCode::kInvalidArgument, std::string(what) + " '" + std::string(text) + "' is too large");
  }
  return v << shift;
}

}  // namespace tresor
