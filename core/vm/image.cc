// The pure parts of a guest image (include/tresor/vm/image.h).
#include "tresor/vm/image.h"

#include <lzma.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <set>

#include "tresor/kbs/jose.h"

namespace tresor::vm {
namespace {

using json = nlohmann::json;

Error invalid_image(std::string m) { return Error{ErrorCode::kInvalidArgument, std::move(m)}; }
Error malformed(std::string m) { return Error{ErrorCode::kMalformed, std::move(m)}; }

size_t find(ByteSpan hay, std::initializer_list<uint8_t> needle) {
  const auto it = std::search(hay.begin(), hay.end(), needle.begin(), needle.end(),
                               [](std::byte a, uint8_t b) { return static_cast<uint8_t>(a) == b; });
  return it == hay.end() ? std::string::npos : static_cast<size_t>(it - hay.begin());
}

// newc header: magic "070701" and 13 fields of 8 hex digits (buffer-format.rst).
constexpr size_t kHeader = 110;
void put_hex8(std::string& out, uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08X", v);
  out.append(buf, 8);
}
void pad4(Bytes& out) {
  while (out.size() % 4 != 0) out.push_back(std::byte{0});
}
void append_entry(Bytes& out, uint32_t ino, uint32_t mode, uint32_t nlink, std::string_view name, ByteSpan data) {
  std::string h = "070701";
  put_hex8(h, ino);
  put_hex8(h, mode);
  put_hex8(h, 0);  // uid
  put_hex8(h, 0);  // gid
  put_hex8(h, nlink);
  put_hex8(h, 0);  // mtime: fixed, for reproducible archives
  put_hex8(h, static_cast<uint32_t>(data.size()));
  for (int i = 0; i < 4; ++i) put_hex8(h, 0);  // dev and rdev major/minor
  put_hex8(h, static_cast<uint32_t>(name.size() + 1));
  put_hex8(h, 0);  // check
  const auto hb = as_bytes(h);
  out.insert(out.end(), hb.begin(), hb.end());
  const auto nb = as_bytes(name);
  out.insert(out.end(), nb.begin(), nb.end());
  out.push_back(std::byte{0});
  pad4(out);
  out.insert(out.end(), data.begin(), data.end());
  pad4(out);
}

std::string module_name(std::string_view path) {
  std::string base(path.substr(path.rfind('/') == std::string_view::npos ? 0 : path.rfind('/') + 1));
  base = base.substr(0, base.find(".ko"));
  std::ranges::replace(base, '-', '_');
  return base;
}

}  // namespace

Result<Bytes> extract_vmlinux(ByteSpan bz) {
  const size_t at = find(bz, {0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00});
  if (at == std::string::npos) {
    if (find(bz, {0x28, 0xB5, 0x2F, 0xFD}) != std::string::npos) {
      return fail(ErrorCode::kUnsupportedVersion, "the kernel image holds no XZ stream (it looks zstd-compressed): Tresor "
                                                  "reads XZ-compressed kernels, as Debian builds them");
    }
    if (find(bz, {0x1F, 0x8B, 0x08}) != std::string::npos) {
      return fail(ErrorCode::kUnsupportedVersion, "the kernel image holds no XZ stream (it looks gzip-compressed): Tresor "
                                                  "reads XZ-compressed kernels, as Debian builds them");
    }
    return std::unexpected(malformed("the kernel image holds no compressed payload Tresor knows (no XZ stream header)"));
  }
  lzma_stream s = LZMA_STREAM_INIT;
  if (lzma_stream_decoder(&s, UINT64_MAX, 0) != LZMA_OK) return fail(ErrorCode::kIo, "lzma_stream_decoder failed");
  Bytes out(64u << 20);
  s.next_in = reinterpret_cast<const uint8_t*>(bz.data() + at);
  s.avail_in = bz.size() - at;
  size_t produced = 0;
  lzma_ret r = LZMA_OK;
  while (r == LZMA_OK) {
    if (produced == out.size()) out.resize(out.size() * 2);
    s.next_out = reinterpret_cast<uint8_t*>(out.data() + produced);
    s.avail_out = out.size() - produced;
    r = lzma_code(&s, LZMA_FINISH);
    produced = out.size() - s.avail_out;
  }
  lzma_end(&s);
  if (r != LZMA_STREAM_END) {
    return std::unexpected(malformed("the kernel's XZ stream at offset " + std::to_string(at) + " does not decode (liblzma error " +
                                     std::to_string(static_cast<int>(r)) + ")"));
  }
  out.resize(produced);
  if (out.size() < 4 || find(ByteSpan(out).first(4), {0x7F, 'E', 'L', 'F'}) != 0) {
    return std::unexpected(malformed("the kernel's XZ payload is not an ELF vmlinux"));
  }
  return out;
}

Result<Bytes> cpio_newc(std::vector<CpioEntry> entries) {
  std::ranges::sort(entries, {}, &CpioEntry::path);
  std::set<std::string> dirs;
  Bytes out;
  uint32_t ino = 1;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    if (e.path.empty() || e.path.starts_with('/') || e.path.ends_with('/') || ("/" + e.path + "/").find("/../") != std::string::npos ||
        ("/" + e.path + "/").find("/./") != std::string::npos) {
      return std::unexpected(invalid_image("initramfs entry '" + e.path + "': paths are relative, without '.', '..' or a trailing '/'"));
    }
    if (i > 0 && entries[i - 1].path == e.path) return std::unexpected(invalid_image("initramfs entry '" + e.path + "' is listed twice"));
    if (const size_t slash = e.path.rfind('/'); slash != std::string::npos && !dirs.contains(e.path.substr(0, slash))) {
      return std::unexpected(invalid_image("initramfs entry '" + e.path + "': its directory '" + e.path.substr(0, slash) + "' is not listed"));
    }
    const uint32_t type = e.mode & S_IFMT;
    if (type == S_IFDIR) {
      if (!e.data.empty()) return std::unexpected(invalid_image("initramfs directory '" + e.path + "' has contents"));
      dirs.insert(e.path);
    } else if (type != S_IFREG && type != S_IFLNK) {
      return std::unexpected(invalid_image("initramfs entry '" + e.path + "' is not a directory, file or symlink"));
    }
    append_entry(out, ino++, e.mode, type == S_IFDIR ? 2 : 1, e.path, e.data);
  }
  append_entry(out, 0, 0, 1, "TRAILER!!!", {});
  while (out.size() % 512 != 0) out.push_back(std::byte{0});
  return out;
}

Result<std::vector<CpioEntry>> parse_cpio_newc(ByteSpan a) {
  std::vector<CpioEntry> out;
  size_t pos = 0;
  for (;;) {
    if (a.size() - pos < kHeader) return std::unexpected(malformed("initramfs: truncated header at offset " + std::to_string(pos)));
    const std::string h(reinterpret_cast<const char*>(a.data() + pos), kHeader);
    if (!h.starts_with("070701")) return std::unexpected(malformed("initramfs: no newc magic at offset " + std::to_string(pos)));
    auto field = [&](int i) -> std::optional<uint32_t> {
      uint32_t v = 0;
      for (char c : h.substr(6 + static_cast<size_t>(i) * 8, 8)) {
        const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return std::nullopt;
        v = v * 16 + static_cast<uint32_t>(d);
      }
      return v;
    };
    const auto mode = field(1), size = field(6), namesize = field(11);
    if (!mode || !size || !namesize || *namesize == 0) return std::unexpected(malformed("initramfs: bad header fields at offset " + std::to_string(pos)));
    size_t p = pos + kHeader;
    if (a.size() - p < *namesize) return std::unexpected(malformed("initramfs: truncated name at offset " + std::to_string(pos)));
    std::string name(reinterpret_cast<const char*>(a.data() + p), *namesize - 1);
    p += *namesize;
    p = (p + 3) & ~size_t{3};
    if (name == "TRAILER!!!") break;
    if (p > a.size() || a.size() - p < *size) return std::unexpected(malformed("initramfs: entry '" + name + "' runs past the archive"));
    out.push_back(CpioEntry{name, *mode, Bytes(a.begin() + static_cast<std::ptrdiff_t>(p), a.begin() + static_cast<std::ptrdiff_t>(p + *size))});
    pos = (p + *size + 3) & ~size_t{3};
  }
  return out;
}

Result<std::vector<std::string>> module_load_order(std::string_view modules_dep, const std::vector<std::string>& wanted) {
  std::map<std::string, std::pair<std::string, std::vector<std::string>>> by_name;  // name -> (path, dep paths)
  size_t start = 0;
  while (start < modules_dep.size()) {
    size_t end = modules_dep.find('\n', start);
    if (end == std::string_view::npos) end = modules_dep.size();
    const std::string_view line = modules_dep.substr(start, end - start);
    start = end + 1;
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::vector<std::string> deps;
    std::string_view rest = line.substr(colon + 1);
    while (!rest.empty()) {
      const size_t b = rest.find_first_not_of(' ');
      if (b == std::string_view::npos) break;
      const size_t e = rest.find(' ', b);
      deps.emplace_back(rest.substr(b, e == std::string_view::npos ? std::string_view::npos : e - b));
      rest = e == std::string_view::npos ? std::string_view() : rest.substr(e);
    }
    const std::string path(line.substr(0, colon));
    by_name[module_name(path)] = {path, std::move(deps)};
  }
  std::vector<std::string> order;
  std::set<std::string> done;
  std::function<void(const std::string&)> visit = [&](const std::string& name) {
    if (done.contains(name)) return;
    done.insert(name);
    const auto& [path, deps] = by_name.at(name);
    for (const auto& d : deps) {
      if (by_name.contains(module_name(d))) visit(module_name(d));
    }
    order.push_back(path);
  };
  for (const auto& w : wanted) {
    std::string n = w;
    std::ranges::replace(n, '-', '_');
    if (!by_name.contains(n)) return std::unexpected(invalid_image("the kernel has no module '" + w + "' (not in modules.dep)"));
    visit(n);
  }
  return order;
}

std::string image_manifest_json(const ImageManifest& m) {
  json j = {{"name", m.name},
            {"kernel_release", m.kernel_release},
            {"cmdline", m.cmdline},
            {"kernel_sha256", m.kernel_sha256},
            {"vmlinux_sha256", m.vmlinux_sha256},
            {"initrd_sha256", m.initrd_sha256}};
  if (m.measurement) {
    j["snp"] = {{"firmware", m.firmware}, {"firmware_sha256", m.firmware_sha256}, {"vcpus", m.vcpus}, {"vcpu_type", m.vcpu_type},
                {"measurement", to_hex(*m.measurement)}};
  }
  return j.dump(2) + "\n";
}

Result<ImageManifest> parse_image_manifest(std::string_view text) {
  auto parsed = kbs::parse_strict_json(text, "image.json");
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  ImageManifest m;
  if (!j.is_object()) return std::unexpected(malformed("image.json must be an object"));
  static const std::set<std::string> kKeys = {"name", "kernel_release", "cmdline", "kernel_sha256", "vmlinux_sha256", "initrd_sha256", "snp"};
  for (const auto& [k, v] : j.items()) {
    if (!kKeys.contains(k)) return std::unexpected(malformed("image.json: unknown member \"" + k + "\""));
    if (k != "snp" && !v.is_string()) return std::unexpected(malformed("image.json: \"" + k + "\" must be a string"));
  }
  for (const char* k : {"name", "kernel_release", "cmdline", "kernel_sha256", "vmlinux_sha256", "initrd_sha256"}) {
    if (!j.contains(k)) return std::unexpected(malformed(std::string("image.json: \"") + k + "\" is missing"));
  }
  m.name = j["name"];
  m.kernel_release = j["kernel_release"];
  m.cmdline = j["cmdline"];
  m.kernel_sha256 = j["kernel_sha256"];
  m.vmlinux_sha256 = j["vmlinux_sha256"];
  m.initrd_sha256 = j["initrd_sha256"];
  if (j.contains("snp")) {
    const json& s = j["snp"];
    if (!s.is_object() || !s.contains("measurement") || !s["measurement"].is_string() || !s.contains("firmware") ||
        !s["firmware"].is_string() || !s.contains("vcpus") || !s["vcpus"].is_number_unsigned()) {
      return std::unexpected(malformed("image.json: \"snp\" needs firmware, firmware_sha256, vcpus, vcpu_type and measurement"));
    }
    auto meas = from_hex(s["measurement"].get<std::string>(), "image.json snp.measurement");
    if (!meas) return std::unexpected(meas.error());
    if (meas->size() != 48) return std::unexpected(malformed("image.json: snp.measurement must be 96 hex digits"));
    std::array<std::byte, 48> d{};
    std::copy(meas->begin(), meas->end(), d.begin());
    m.measurement = d;
    m.firmware = s["firmware"];
    m.firmware_sha256 = s.value("firmware_sha256", "");
    m.vcpus = s["vcpus"];
    m.vcpu_type = s.value("vcpu_type", "");
  }
  return m;
}

}  // namespace tresor::vm
