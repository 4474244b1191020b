// File keys for exactly the files they open (include/tresor/sealed.h, docs/formats.md §11.1).
#include <algorithm>
#include <cstring>
#include <string_view>

#include "tresor/encoding.h"
#include "tresor/sealed.h"

namespace tresor::sealed {
namespace {

// Lower-case hex into `out` (2·in.size() characters).
void put_hex(ByteSpan in, std::byte* out) {
  static constexpr char kDigits[] = "0123456789abcdef";
  for (size_t i = 0; i < in.size(); ++i) {
    const auto v = static_cast<unsigned>(in[i]);
    out[2 * i] = static_cast<std::byte>(kDigits[v >> 4]);
    out[2 * i + 1] = static_cast<std::byte>(kDigits[v & 15]);
  }
}

// Exactly 2·out.size() hex digits into `out`; false on anything else.
bool get_hex(std::string_view text, MutableByteSpan out) {
  if (text.size() != 2 * out.size()) return false;
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < out.size(); ++i) {
    const int hi = digit(text[2 * i]), lo = digit(text[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    out[i] = static_cast<std::byte>(hi * 16 + lo);
  }
  return true;
}

}  // namespace

Result<void> FileKeys::add(const std::array<std::byte, kHeaderMacSize>& header_mac, SecretBuffer file_key, std::string name) {
  if (file_key.size() != kFileKeySize) return fail(ErrorCode::kInvalidArgument, "file keys: a file key of " + std::to_string(file_key.size()) + " bytes");
  if (name.find_first_of("\r\n") != std::string::npos) return fail(ErrorCode::kInvalidArgument, "file keys: a name with a line break");
  const auto at = entries_.find(header_mac);
  if (at != entries_.end()) {
    if (crypto::ct_equal(at->second.key.span(), file_key.span())) return {};  // the same file again (a copy)
    return fail(ErrorCode::kInvalidArgument, "file keys: " + name + " has the same header MAC as " + at->second.name + " but another key");
  }
  entries_.emplace(header_mac, Entry{std::move(file_key), std::move(name)});
  return {};
}

const SecretBuffer* FileKeys::find(const std::array<std::byte, kHeaderMacSize>& header_mac) const {
  const auto at = entries_.find(header_mac);
  return at != entries_.end() ? &at->second.key : nullptr;
}

SecretBuffer FileKeys::to_file_text() const {
  size_t n = kMagic.size() + 1;
  for (const auto& [mac, e] : entries_) n += 2 * kHeaderMacSize + 1 + 2 * e.key.size() + 1 + e.name.size() + 1;
  SecretBuffer out(n);
  std::byte* p = out.data();
  auto put = [&](std::string_view s) {
    std::memcpy(p, s.data(), s.size());
    p += s.size();
  };
  put(kMagic);
  put("\n");
  for (const auto& [mac, e] : entries_) {
    put_hex(mac, p);
    p += 2 * kHeaderMacSize;
    put(" ");
    put_hex(e.key.span(), p);
    p += 2 * e.key.size();
    put(" ");
    put(e.name);
    put("\n");
  }
  return out;
}

Result<FileKeys> FileKeys::parse(ByteSpan text, const std::string& what) {
  const std::string_view all(reinterpret_cast<const char*>(text.data()), text.size());
  FileKeys keys;
  bool magic = false;
  size_t line_no = 0;
  for (size_t at = 0; at < all.size();) {
    const size_t end = std::min(all.find('\n', at), all.size());
    std::string_view line = all.substr(at, end - at);
    at = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || line.front() == '#') continue;
    auto bad = [&](const std::string& why) { return fail(ErrorCode::kMalformed, what + ": line " + std::to_string(line_no) + ": " + why); };
    if (!magic) {
      if (line != kMagic) return bad("expected \"" + std::string(kMagic) + "\" (not a file keys file)");
      magic = true;
      continue;
    }
    const size_t s1 = line.find(' ');
    const size_t s2 = s1 == std::string_view::npos ? s1 : line.find(' ', s1 + 1);
    if (s2 == std::string_view::npos) return bad("want <header MAC hex> <file key hex> <name>");
    std::array<std::byte, kHeaderMacSize> mac{};
    SecretBuffer key(kFileKeySize);
    if (!get_hex(line.substr(0, s1), mac)) return bad("the header MAC is not " + std::to_string(2 * kHeaderMacSize) + " hex digits");
    if (!get_hex(line.substr(s1 + 1, s2 - s1 - 1), key.span())) return bad("the file key is not " + std::to_string(2 * kFileKeySize) + " hex digits");
    if (auto r = keys.add(mac, std::move(key), std::string(line.substr(s2 + 1))); !r) return bad(r.error().message);
  }
  if (!magic) return fail(ErrorCode::kMalformed, what + ": empty (no \"" + std::string(kMagic) + "\" line)");
  return keys;
}

Result<FileKeys> FileKeys::load(const std::string& path) {
  auto text = read_secret_file(path, size_t{64} << 20);
  if (!text) return std::unexpected(text.error());
  return parse(text->span(), path);
}

}  // namespace tresor::sealed
