// Certificate sources for SEV-SNP verification (see tresor/snp/certs.h for the references).
#include "tresor/snp/certs.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>

#include "tresor/crypto.h"
#include "tresor/io.h"

namespace tresor::snp {
namespace {

constexpr std::string_view kKds = "https://kdsintf.amd.com";

Result<std::string_view> kds_product(Product p) {
  if (p == Product::kSim) return fail(ErrorCode::kInvalidArgument, "the sim product has no AMD KDS");
  return product_name(p);
}

size_t hw_id_size(Product p) { return p == Product::kTurin ? 8 : 64; }

std::string tcb_name(const Tcb& t, Product p) {
  std::string s;
  for (uint8_t v : {t.bootloader, t.tee, t.snp, t.microcode}) {
    if (!s.empty()) s += '-';
    s += std::to_string(v);
  }
  if (p == Product::kTurin) {
    s += '-';
    s += std::to_string(t.fmc);
  }
  return s;
}

// GHCB stores GUIDs in the EFI (mixed-endian) byte order.
std::array<std::byte, 16> guid_bytes(std::string_view text) {
  std::string hex;
  for (char c : text) {
    if (c != '-') hex += c;
  }
  auto b = from_hex(hex);
  std::array<std::byte, 16> g{};
  if (b && b->size() == 16) std::memcpy(g.data(), b->data(), 16);
  return g;
}

std::string guid_text(const std::byte* p) {
  std::array<std::byte, 16> g;
  std::memcpy(g.data(), p, 16);
  const std::string h = to_hex(g);
  std::string out;
  for (size_t i = 0; i < h.size(); ++i) {
    if (i == 8 || i == 12 || i == 16 || i == 20) out += '-';
    out += h[i];
  }
  return out;
}

}  // namespace

Result<std::string> kds_vcek_url(Product p, ByteSpan hw_id, const Tcb& tcb) {
  auto prod = kds_product(p);
  if (!prod) return std::unexpected(prod.error());
  if (hw_id.size() != hw_id_size(p)) {
    return fail(ErrorCode::kInvalidArgument, std::string(*prod) + " hwID is " + std::to_string(hw_id_size(p)) +
                                                 " bytes, got " + std::to_string(hw_id.size()));
  }
  std::string url = std::string(kKds) + "/vcek/v1/" + std::string(*prod) + "/" + to_hex(hw_id) + "?";
  if (p == Product::kTurin) url += "fmcSPL=" + std::to_string(tcb.fmc) + "&";
  url += "blSPL=" + std::to_string(tcb.bootloader) + "&teeSPL=" + std::to_string(tcb.tee) +
         "&snpSPL=" + std::to_string(tcb.snp) + "&ucodeSPL=" + std::to_string(tcb.microcode);
  return url;
}

Result<std::string> kds_chain_url(Product p, bool vlek) {
  auto prod = kds_product(p);
  if (!prod) return std::unexpected(prod.error());
  return std::string(kKds) + (vlek ? "/vlek/v1/" : "/vcek/v1/") + std::string(*prod) + "/cert_chain";
}

Result<std::string> kds_crl_url(Product p, bool vlek) {
  auto prod = kds_product(p);
  if (!prod) return std::unexpected(prod.error());
  return std::string(kKds) + (vlek ? "/vlek/v1/" : "/vcek/v1/") + std::string(*prod) + "/crl";
}

Result<CertTable> parse_cert_table(ByteSpan t) {
  constexpr size_t kEntry = 24;  // GUID 16 ‖ offset u32 ‖ length u32
  CertTable out;
  size_t pos = 0;
  for (;; pos += kEntry) {
    if (t.size() - pos < kEntry) {
      return fail(ErrorCode::kMalformed, "certificate table has no all-zero terminating entry");
    }
    const std::byte* e = t.data() + pos;
    const uint32_t off = load_le32(e + 16), len = load_le32(e + 20);
    if (std::all_of(e, e + kEntry, [](std::byte b) { return b == std::byte{0}; })) break;
    if (len == 0 || off < pos + kEntry || off > t.size() || len > t.size() - off) {
      return fail(ErrorCode::kMalformed, "certificate table entry " + std::to_string(pos / kEntry) + " (" + guid_text(e) +
                                             ") points outside the table: offset " + std::to_string(off) + ", length " +
                                             std::to_string(len));
    }
    out.certs[guid_text(e)] = Bytes(t.begin() + off, t.begin() + off + len);
  }
  // Every certificate must start after the terminator.
  for (size_t i = 0; i < pos; i += kEntry) {
    if (load_le32(t.data() + i + 16) < pos + kEntry) {
      return fail(ErrorCode::kMalformed, "certificate table entry " + std::to_string(i / kEntry) + " overlaps the entries");
    }
  }
  return out;
}

Bytes serialize_cert_table(const CertTable& t) {
  const size_t header = (t.certs.size() + 1) * 24;
  Bytes out(header);
  size_t cursor = header, i = 0;
  for (const auto& [g, der] : t.certs) {
    const auto gb = guid_bytes(g);
    std::memcpy(out.data() + i * 24, gb.data(), 16);
    store_le32(out.data() + i * 24 + 16, static_cast<uint32_t>(cursor));
    store_le32(out.data() + i * 24 + 20, static_cast<uint32_t>(der.size()));
    out.insert(out.end(), der.begin(), der.end());
    cursor += der.size();
    ++i;
  }
  return out;
}

std::string DirectoryCache::path_for(Product p, ByteSpan hw_id, const Tcb& tcb) const {
  return dir_ + "/" + std::string(product_name(p)) + "/" + to_hex(hw_id) + "/" + tcb_name(tcb, p) + ".der";
}

Result<Bytes> DirectoryCache::endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) {
  if (vlek) return fail(ErrorCode::kUnavailable, "the directory cache holds VCEKs only; a VLEK comes with the report");
  const std::string path = path_for(p, hw_id, tcb);
  if (::access(path.c_str(), F_OK) != 0) {
    return fail(ErrorCode::kUnavailable, "no cached VCEK for this chip at TCB " + tcb_name(tcb, p) + " (" + path + ")");
  }
  auto text = read_small_file(path);
  if (!text) return std::unexpected(text.error());
  return to_bytes(*text);
}

Result<void> DirectoryCache::put(Product p, ByteSpan hw_id, const Tcb& tcb, ByteSpan der) {
  const std::string path = path_for(p, hw_id, tcb);
  TRESOR_TRY(make_private_dirs(path.substr(0, path.rfind('/'))));
  auto f = AtomicOutputFile::create(path, 0644, /*overwrite=*/false);
  if (!f) return std::unexpected(f.error());
  TRESOR_TRY(f->write(der));
  return f->commit();
}

Result<Bytes> TableSource::endorsement_cert(Product, ByteSpan, const Tcb&, bool vlek) {
  const std::string g(vlek ? kGuidVlek : kGuidVcek);
  auto it = table_.certs.find(g);
  if (it == table_.certs.end()) {
    return fail(ErrorCode::kUnavailable, std::string("the report's certificate table has no ") + (vlek ? "VLEK" : "VCEK"));
  }
  return it->second;
}

Result<Bytes> KdsSource::endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) {
  if (vlek) return fail(ErrorCode::kUnavailable, "AMD KDS cannot look up a VLEK by chip; it must come with the report");
  if (auto cached = cache_.endorsement_cert(p, hw_id, tcb, false)) return cached;
  auto url = kds_vcek_url(p, hw_id, tcb);
  if (!url) return std::unexpected(url.error());
  const std::time_t now = clock_.now();
  if (requested_ && now - last_request_ < min_interval_) {
    return fail(ErrorCode::kUnavailable, "AMD KDS rate limit: the next request is allowed in " +
                                             std::to_string(min_interval_ - (now - last_request_)) + " s (" + *url + ")");
  }
  requested_ = true;
  last_request_ = now;
  ++requests_;
  auto der = fetcher_.get(*url);
  if (!der) return std::unexpected(der.error());
  // Only what parses as an endorsement certificate of this chip and TCB is cached.
  auto ext = parse_endorsement_extensions(*der);
  if (!ext) return fail(ErrorCode::kMalformed, "KDS answer for " + *url + " is not a VCEK: " + ext.error().message);
  Tcb want = tcb;
  Tcb got = ext->tcb;
  if (p != Product::kTurin) want.fmc = got.fmc = 0;
  if (!crypto::ct_equal(ext->hw_id, hw_id) || !(got == want)) {
    return fail(ErrorCode::kAuth, "KDS answer for " + *url + " is a VCEK for another chip or TCB");
  }
  TRESOR_TRY(cache_.put(p, hw_id, tcb, *der));
  return der;
}

}  // namespace tresor::snp
