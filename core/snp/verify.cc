// SEV-SNP report verification: AMD chain, endorsement key binding, report signature.
// References in tresor/snp/verify.h: SNP ABI spec 56860 (Table 23, Chapter 10) and AMD VCEK/KDS
// spec 57230 (Table 8 extensions, §2 chain).
#include "tresor/snp/verify.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "amd_roots.h"
#include "tresor/crypto.h"

namespace tresor::snp {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct CrlFree {
  void operator()(X509_CRL* c) const { X509_CRL_free(c); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using CrlPtr = std::unique_ptr<X509_CRL, CrlFree>;

std::unexpected<Error> auth_fail(std::string msg) { return fail(ErrorCode::kAuth, std::move(msg)); }

bool looks_like_pem(ByteSpan b) {
  static constexpr std::string_view kBegin = "-----BEGIN";
  const std::string_view s(reinterpret_cast<const char*>(b.data()), b.size());
  return s.find(kBegin) != std::string_view::npos;
}

// Reads every PEM certificate in `pem`, in order.
Result<std::vector<X509Ptr>> read_pem_certs(std::string_view pem, std::string_view what) {
  std::vector<X509Ptr> out;
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  if (bio == nullptr) return fail(ErrorCode::kCrypto, "BIO_new_mem_buf");
  while (X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) out.emplace_back(x);
  BIO_free(bio);
  ERR_clear_error();  // the loop ends on "no start line"
  if (out.empty()) return fail(ErrorCode::kMalformed, std::string(what) + " holds no PEM certificate");
  return out;
}

Result<X509Ptr> read_cert(ByteSpan bytes, std::string_view what) {
  if (looks_like_pem(bytes)) {
    auto certs = read_pem_certs(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), what);
    if (!certs) return std::unexpected(certs.error());
    if (certs->size() != 1) {
      return fail(ErrorCode::kMalformed, std::string(what) + " holds " + std::to_string(certs->size()) +
                                             " certificates, want exactly one");
    }
    return std::move(certs->front());
  }
  const unsigned char* p = reinterpret_cast<const unsigned char*>(bytes.data());
  X509* x = d2i_X509(nullptr, &p, static_cast<long>(bytes.size()));
  if (x == nullptr || p != reinterpret_cast<const unsigned char*>(bytes.data()) + bytes.size()) {
    X509_free(x);
    ERR_clear_error();
    return fail(ErrorCode::kMalformed, std::string(what) + " is neither a DER nor a PEM X.509 certificate");
  }
  return X509Ptr(x);
}

Result<Bytes> der_of(X509* x) {
  unsigned char* der = nullptr;
  const int len = i2d_X509(x, &der);
  if (len <= 0) return fail(ErrorCode::kCrypto, "i2d_X509");
  Bytes out(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + len);
  OPENSSL_free(der);
  return out;
}

std::string subject_cn(X509* x) {
  char buf[256] = {};
  X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, sizeof buf);
  return buf[0] ? buf : "(no CN)";
}

std::string time_text(const ASN1_TIME* t) {
  BIO* bio = BIO_new(BIO_s_mem());
  ASN1_TIME_print(bio, t);
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  std::string s(data, static_cast<size_t>(len));
  BIO_free(bio);
  return s;
}

std::string time_text(std::time_t at) {
  char buf[32];
  std::tm tm{};
  gmtime_r(&at, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

Result<void> check_validity(X509* x, std::time_t at, std::string_view role) {
  std::time_t t = at;
  const ASN1_TIME* nb = X509_get0_notBefore(x);
  const ASN1_TIME* na = X509_get0_notAfter(x);
  if (X509_cmp_time(nb, &t) > 0) {
    return auth_fail(std::string(role) + " " + subject_cn(x) + " is not valid until " + time_text(nb) +
                     "; verification time is " + time_text(at));
  }
  if (X509_cmp_time(na, &t) < 0) {
    return auth_fail(std::string(role) + " " + subject_cn(x) + " expired " + time_text(na) +
                     "; verification time is " + time_text(at));
  }
  return {};
}

// AMD signs its certificates with RSASSA-PSS (57230 §2); X509_verify checks the PSS parameters
// carried in the certificate's signature algorithm.
Result<void> check_signed_by(X509* cert, X509* issuer, std::string_view role, std::string_view issuer_role) {
  if (X509_get_signature_nid(cert) != NID_rsassaPss) {
    return auth_fail(std::string(role) + " " + subject_cn(cert) + " is not signed with RSASSA-PSS");
  }
  if (X509_check_issued(issuer, cert) != X509_V_OK) {
    return auth_fail(std::string(role) + " " + subject_cn(cert) + " was not issued by " + std::string(issuer_role) +
                     " " + subject_cn(issuer));
  }
  EVP_PKEY* key = X509_get0_pubkey(issuer);
  if (key == nullptr || X509_verify(cert, key) != 1) {
    ERR_clear_error();
    return auth_fail(std::string(role) + " " + subject_cn(cert) + " signature does not verify with " +
                     std::string(issuer_role) + " " + subject_cn(issuer));
  }
  return {};
}

struct Roots {
  X509Ptr ark;
  X509Ptr ask;   // ASK or ASVK, whichever signs the endorsement key
};

Result<X509Ptr> load_pinned(const detail::PinnedCert& c, std::string_view role, Product p) {
  auto certs = read_pem_certs(c.pem, role);
  if (!certs || certs->size() != 1) return fail(ErrorCode::kCrypto, "pinned " + std::string(role) + " is unreadable");
  auto der = der_of(certs->front().get());
  if (!der) return std::unexpected(der.error());
  auto fp = crypto::sha256(*der);
  if (!fp || to_hex(*fp) != c.sha256_hex) {
    return fail(ErrorCode::kCrypto, "pinned " + std::string(role) + " of " + std::string(product_name(p)) +
                                        " does not match its pinned fingerprint");
  }
  return std::move(certs->front());
}

Result<std::pair<Roots, X509Ptr>> pinned_roots(Product p, bool vlek) {
  for (const auto& r : detail::pinned_root_table()) {
    if (r.product != p) continue;
    auto ark = load_pinned(r.ark, "ARK", p);
    if (!ark) return std::unexpected(ark.error());
    auto signer = load_pinned(vlek ? r.asvk : r.ask, vlek ? "ASVK" : "ASK", p);
    if (!signer) return std::unexpected(signer.error());
    auto other = load_pinned(vlek ? r.ask : r.asvk, vlek ? "ASK" : "ASVK", p);
    if (!other) return std::unexpected(other.error());
    return std::pair<Roots, X509Ptr>{Roots{std::move(*ark), std::move(*signer)}, std::move(*other)};
  }
  return fail(ErrorCode::kCrypto, "no pinned roots for " + std::string(product_name(p)));
}

Result<int64_t> ext_integer(ASN1_OCTET_STRING* data, std::string_view name) {
  const unsigned char* p = ASN1_STRING_get0_data(data);
  ASN1_INTEGER* i = d2i_ASN1_INTEGER(nullptr, &p, ASN1_STRING_length(data));
  int64_t v = -1;
  const bool ok = i != nullptr && ASN1_INTEGER_get_int64(&v, i) == 1;
  ASN1_INTEGER_free(i);
  if (!ok || v < 0 || v > 255) {
    ERR_clear_error();
    return fail(ErrorCode::kMalformed, "certificate extension " + std::string(name) + " is not an INTEGER 0..255");
  }
  return v;
}

Result<std::string> ext_ia5(ASN1_OCTET_STRING* data, std::string_view name) {
  const unsigned char* p = ASN1_STRING_get0_data(data);
  ASN1_IA5STRING* s = d2i_ASN1_IA5STRING(nullptr, &p, ASN1_STRING_length(data));
  if (s == nullptr) {
    ERR_clear_error();
    return fail(ErrorCode::kMalformed, "certificate extension " + std::string(name) + " is not an IA5String");
  }
  std::string out(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), static_cast<size_t>(ASN1_STRING_length(s)));
  ASN1_IA5STRING_free(s);
  return out;
}

Result<EndorsementExtensions> extensions_of(X509* x) {
  EndorsementExtensions e;
  bool seen_version = false, seen_product = false, seen_bl = false, seen_tee = false, seen_snp = false,
       seen_ucode = false;
  const int n = X509_get_ext_count(x);
  for (int i = 0; i < n; ++i) {
    X509_EXTENSION* ext = X509_get_ext(x, i);
    char oid[80] = {};
    OBJ_obj2txt(oid, sizeof oid, X509_EXTENSION_get_object(ext), 1);
    const std::string_view o(oid);
    constexpr std::string_view kArc = "1.3.6.1.4.1.3704.1.";
    if (!o.starts_with(kArc)) continue;
    const std::string_view leaf = o.substr(kArc.size());
    ASN1_OCTET_STRING* data = X509_EXTENSION_get_data(ext);
    auto spl = [&](uint8_t& dst, bool& seen, std::string_view name) -> Result<void> {
      auto v = ext_integer(data, name);
      if (!v) return std::unexpected(v.error());
      dst = static_cast<uint8_t>(*v);
      seen = true;
      return {};
    };
    if (leaf == "1") {
      auto v = ext_integer(data, "structVersion");
      if (!v) return std::unexpected(v.error());
      e.struct_version = static_cast<uint32_t>(*v);
      seen_version = true;
    } else if (leaf == "2") {
      auto s = ext_ia5(data, "productName");
      if (!s) return std::unexpected(s.error());
      e.product_name = *s;
      seen_product = true;
    } else if (leaf == "3.1") {
      TRESOR_TRY(spl(e.tcb.bootloader, seen_bl, "blSPL"));
    } else if (leaf == "3.2") {
      TRESOR_TRY(spl(e.tcb.tee, seen_tee, "teeSPL"));
    } else if (leaf == "3.3") {
      TRESOR_TRY(spl(e.tcb.snp, seen_snp, "snpSPL"));
    } else if (leaf == "3.4" || leaf == "3.5" || leaf == "3.6" || leaf == "3.7") {
      bool ignored = false;
      TRESOR_TRY(spl(e.spl_4_7[static_cast<size_t>(leaf[2] - '4')], ignored, "spl_" + std::string(1, leaf[2])));
    } else if (leaf == "3.8") {
      TRESOR_TRY(spl(e.tcb.microcode, seen_ucode, "ucodeSPL"));
    } else if (leaf == "3.9") {
      TRESOR_TRY(spl(e.tcb.fmc, e.has_fmc, "fmcSPL"));
    } else if (leaf == "4") {
      // hwID: the raw CHIP_ID bytes as the extension value (57230 Table 8).
      const unsigned char* p = ASN1_STRING_get0_data(data);
      e.hw_id.assign(reinterpret_cast<const std::byte*>(p), reinterpret_cast<const std::byte*>(p) + ASN1_STRING_length(data));
    } else if (leaf == "5") {
      auto s = ext_ia5(data, "cspID");
      if (!s) return std::unexpected(s.error());
      e.csp_id = *s;
    }
  }
  const std::pair<bool, const char*> required[] = {{seen_version, "structVersion (.1)"}, {seen_product, "productName (.2)"},
                                                   {seen_bl, "blSPL (.3.1)"},         {seen_tee, "teeSPL (.3.2)"},
                                                   {seen_snp, "snpSPL (.3.3)"},       {seen_ucode, "ucodeSPL (.3.8)"}};
  for (const auto& [seen, name] : required) {
    if (!seen) return fail(ErrorCode::kMalformed, std::string("certificate lacks the AMD extension ") + name);
  }
  return e;
}

std::string tcb_pair(const Tcb& a, const Tcb& b, TcbLayout l) {
  return "certificate " + tcb_string(a, l) + ", report " + tcb_string(b, l);
}

}  // namespace

std::string_view product_name(Product p) {
  switch (p) {
    case Product::kMilan: return "Milan";
    case Product::kGenoa: return "Genoa";
    case Product::kTurin: return "Turin";
    case Product::kSim: return "Sim";
  }
  return "unknown";
}

Result<Product> product_from_name(std::string_view name) {
  const std::string_view base = name.substr(0, name.find('-'));
  if (base == "Milan") return Product::kMilan;
  if (base == "Genoa") return Product::kGenoa;
  if (base == "Turin") return Product::kTurin;
  if (name == "Sim") return Product::kSim;
  return fail(ErrorCode::kAuth, "productName '" + std::string(name) + "' is not a known SEV-SNP product (Milan, Genoa, Turin)");
}

TcbLayout tcb_layout(Product p) { return p == Product::kTurin ? TcbLayout::kTurin : TcbLayout::kMilanGenoa; }

std::vector<PinnedRootInfo> pinned_roots() {
  std::vector<PinnedRootInfo> out;
  for (const auto& r : detail::pinned_root_table()) {
    out.push_back({r.product, r.ark.pem, r.ask.pem, r.asvk.pem, r.ark.sha256_hex, r.ask.sha256_hex, r.asvk.sha256_hex});
  }
  return out;
}

Result<void> check_pinned_roots() {
  for (const auto& r : detail::pinned_root_table()) {
    auto ark = load_pinned(r.ark, "ARK", r.product);
    auto ask = load_pinned(r.ask, "ASK", r.product);
    auto asvk = load_pinned(r.asvk, "ASVK", r.product);
    if (!ark) return std::unexpected(ark.error());
    if (!ask) return std::unexpected(ask.error());
    if (!asvk) return std::unexpected(asvk.error());
    TRESOR_TRY(check_signed_by(ark->get(), ark->get(), "ARK", "itself"));
    TRESOR_TRY(check_signed_by(ask->get(), ark->get(), "ASK", "ARK"));
    TRESOR_TRY(check_signed_by(asvk->get(), ark->get(), "ASVK", "ARK"));
  }
  return {};
}

Result<EndorsementExtensions> parse_endorsement_extensions(ByteSpan der) {
  auto x = read_cert(der, "endorsement certificate");
  if (!x) return std::unexpected(x.error());
  return extensions_of(x->get());
}

namespace {

std::time_t to_time(const ASN1_TIME* t) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return timegm(&tm);
}

}  // namespace

// The endorsement key after its chain has verified: what the report checks need, and the window
// in which every certificate of the chain is valid.
struct VerifiedKey {
  X509Ptr cert;
  EndorsementExtensions ext;
  Product product = Product::kMilan;
  bool vlek = false;
  std::time_t valid_from = 0;   // latest notBefore of ARK, ASK/ASVK, endorsement key
  std::time_t valid_until = 0;  // earliest notAfter
  bool sim = false;
};

namespace {

// Chain checks (57230 §2): the endorsement certificate of the kind `vlek` says, issued under the
// pinned roots of its product, optional chain and CRL checks. Validity is checked by the caller.
Result<VerifiedKey> verify_chain(const VerifyInputs& in, bool vlek) {
  const char* key_role = vlek ? "VLEK" : "VCEK";
  auto cert = read_cert(in.endorsement_cert, key_role);
  if (!cert) return std::unexpected(cert.error());
  auto ext = extensions_of(cert->get());
  if (!ext) return std::unexpected(ext.error());
  auto product = product_from_name(ext->product_name);
  if (!product) return std::unexpected(product.error());
  if (vlek != !ext->csp_id.empty() || vlek == !ext->hw_id.empty()) {
    return auth_fail(std::string("SNP report SIGNING_KEY says ") + key_role + ", but the certificate " +
                     (ext->csp_id.empty() ? "has no cspID (a VCEK)" : "has a cspID (a VLEK)"));
  }
  // The chain: pinned ARK (self-signed) → pinned ASK/ASVK → endorsement key; for the sim
  // product, the ARK and ASK of the explicit trust entry instead (never pinned, never implied).
  Result<std::pair<Roots, X509Ptr>> roots = fail(ErrorCode::kAuth, "");
  if (*product == Product::kSim) {
    if (in.sim_trust == nullptr) {
      return auth_fail(std::string(key_role) + " is from the sim secure processor (productName \"Sim\"): a test root that "
                       "is trusted only through an explicit sim trust entry");
    }
    auto ark = read_pem_certs(in.sim_trust->ark_pem, "sim ARK");
    auto ask = read_pem_certs(in.sim_trust->ask_pem, "sim ASK");
    if (!ark) return std::unexpected(ark.error());
    if (!ask) return std::unexpected(ask.error());
    auto ask_again = read_pem_certs(in.sim_trust->ask_pem, "sim ASK");
    roots = std::pair<Roots, X509Ptr>{Roots{std::move(ark->front()), std::move(ask->front())}, std::move(ask_again->front())};
  } else {
    roots = pinned_roots(*product, vlek);
  }
  if (!roots) return std::unexpected(roots.error());
  X509* ark = roots->first.ark.get();
  X509* ask = roots->first.ask.get();
  const char* ask_role = vlek ? "ASVK" : "ASK";
  if (in.chain_pem) {
    auto given = read_pem_certs(*in.chain_pem, "certificate chain");
    if (!given) return std::unexpected(given.error());
    auto ad = der_of(ark), sd = der_of(ask), od = der_of(roots->second.get());
    if (!ad || !sd || !od) return fail(ErrorCode::kCrypto, "i2d_X509");
    for (const auto& g : *given) {
      auto gd = der_of(g.get());
      if (!gd) return std::unexpected(gd.error());
      if (*gd != *ad && *gd != *sd && *gd != *od) {
        return auth_fail("certificate chain holds " + subject_cn(g.get()) + ", which is not AMD's pinned ARK, ASK or ASVK for " +
                         std::string(product_name(*product)));
      }
    }
  }
  TRESOR_TRY(check_signed_by(ark, ark, "ARK", "itself"));
  TRESOR_TRY(check_signed_by(ask, ark, ask_role, "ARK"));
  TRESOR_TRY(check_signed_by(cert->get(), ask, key_role, ask_role));

  std::time_t crl_next_update = 0;  // a cached chain is good only while its CRL is current
  if (in.crl) {
    X509_CRL* crl = nullptr;
    if (looks_like_pem(*in.crl)) {
      BIO* bio = BIO_new_mem_buf(in.crl->data(), static_cast<int>(in.crl->size()));
      crl = PEM_read_bio_X509_CRL(bio, nullptr, nullptr, nullptr);
      BIO_free(bio);
    } else {
      const unsigned char* p = reinterpret_cast<const unsigned char*>(in.crl->data());
      crl = d2i_X509_CRL(nullptr, &p, static_cast<long>(in.crl->size()));
    }
    CrlPtr c(crl);
    if (!c) {
      ERR_clear_error();
      return fail(ErrorCode::kMalformed, "CRL is neither DER nor PEM");
    }
    if (X509_CRL_verify(c.get(), X509_get0_pubkey(ark)) != 1) {
      ERR_clear_error();
      return auth_fail("CRL is not signed by the ARK of " + std::string(product_name(*product)));
    }
    // The ARK's CRL lists the certificates the ARK issued: the ASK and ASVK (a serial number
    // means something only under its issuer, so the endorsement key is not looked up here).
    std::time_t at = in.at;
    if (X509_cmp_time(X509_CRL_get0_lastUpdate(c.get()), &at) > 0) {
      return auth_fail("CRL was issued after the verification time (" + time_text(X509_CRL_get0_lastUpdate(c.get())) + ")");
    }
    if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(c.get()); next != nullptr && X509_cmp_time(next, &at) < 0) {
      return auth_fail("CRL is stale: its next update was due " + time_text(next) + "; fetch a current one");
    }
    if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(c.get()); next != nullptr) crl_next_update = to_time(next);
    X509_REVOKED* revoked = nullptr;
    if (X509_CRL_get0_by_serial(c.get(), &revoked, X509_get0_serialNumber(ask)) == 1) {
      return auth_fail(std::string(ask_role) + " " + subject_cn(ask) + " is revoked by the ARK's CRL");
    }
  }
  // The endorsement key must be ECDSA P-384 (Chapter 10).
  EVP_PKEY* key = X509_get0_pubkey(cert->get());
  char group[32] = {};
  if (key == nullptr || EVP_PKEY_get_base_id(key) != EVP_PKEY_EC ||
      EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, nullptr) != 1 ||
      std::string_view(group) != "secp384r1") {
    ERR_clear_error();
    return auth_fail(std::string(key_role) + " key is not an ECDSA P-384 key");
  }
  VerifiedKey vk;
  // 57230 Table 8: spl_4 … spl_7 are reserved and zero.
  for (size_t i = 0; i < ext->spl_4_7.size(); ++i) {
    if (ext->spl_4_7[i] != 0) {
      return auth_fail(std::string(key_role) + " reserved SPL 1.3.6.1.4.1.3704.1.3." + std::to_string(i + 4) + " is " +
                       std::to_string(ext->spl_4_7[i]) + ", must be 0");
    }
  }
  vk.valid_from = std::max({to_time(X509_get0_notBefore(ark)), to_time(X509_get0_notBefore(ask)),
                            to_time(X509_get0_notBefore(cert->get()))});
  vk.valid_until = std::min({to_time(X509_get0_notAfter(ark)), to_time(X509_get0_notAfter(ask)),
                             to_time(X509_get0_notAfter(cert->get()))});
  if (crl_next_update != 0) vk.valid_until = std::min(vk.valid_until, crl_next_update);
  // Exact messages for validity come from the certificates themselves.
  TRESOR_TRY(check_validity(ark, in.at, "ARK"));
  TRESOR_TRY(check_validity(ask, in.at, ask_role));
  TRESOR_TRY(check_validity(cert->get(), in.at, key_role));
  vk.cert = std::move(*cert);
  vk.ext = std::move(*ext);
  vk.product = *product;
  vk.vlek = vlek;
  vk.sim = *product == Product::kSim;
  return vk;
}

// Report checks against a verified endorsement key: product/CPUID, hwID = CHIP_ID, certificate
// TCB = REPORTED_TCB, and the signature over 0x000–0x29F (56860 Table 23).
Result<VerifiedReport> verify_with_key(const Report& report, ByteSpan report_bytes, const VerifiedKey& vk) {
  const char* key_role = vk.vlek ? "VLEK" : "VCEK";
  const TcbLayout layout = tcb_layout(vk.product);
  if (report.version >= 3) {
    auto cpuid_layout = layout_from_cpuid(report);
    if (!cpuid_layout) return std::unexpected(cpuid_layout.error());
    if (*cpuid_layout != layout) {
      return auth_fail("SNP report CPUID_FAM_ID 0x" + to_hex(ByteSpan(reinterpret_cast<const std::byte*>(&report.cpuid_fam_id), 1)) +
                       " does not match the " + std::string(key_role) + "'s product " + vk.ext.product_name);
    }
  }
  if (!vk.vlek) {
    const size_t id_len = layout == TcbLayout::kTurin ? 8 : 64;
    if (report.mask_chip_key) return auth_fail("SNP report MASK_CHIP_KEY is set: CHIP_ID is masked and cannot be bound to the VCEK");
    const ByteSpan chip(report.chip_id);
    const bool rest_zero =
        std::all_of(chip.begin() + static_cast<long>(id_len), chip.end(), [](std::byte b) { return b == std::byte{0}; });
    if (vk.ext.hw_id.size() != id_len || !crypto::ct_equal(vk.ext.hw_id, chip.first(id_len)) || !rest_zero) {
      return auth_fail("VCEK hwID " + to_hex(vk.ext.hw_id) + " does not equal the report's CHIP_ID " + to_hex(chip));
    }
  }
  auto reported = decode_tcb(report.reported_tcb, layout, "REPORTED_TCB");
  if (!reported) return std::unexpected(reported.error());
  Tcb cert_tcb = vk.ext.tcb;
  if (layout != TcbLayout::kTurin) cert_tcb.fmc = 0;
  if (layout == TcbLayout::kTurin && !vk.ext.has_fmc) return auth_fail("Turin VCEK lacks fmcSPL (.3.9)");
  if (!(cert_tcb == *reported)) {
    return auth_fail(std::string(key_role) + " TCB does not equal REPORTED_TCB: " + tcb_pair(cert_tcb, *reported, layout));
  }
  auto der = signature_der(report);
  if (!der) return std::unexpected(der.error());
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = ctx != nullptr &&
                  EVP_DigestVerifyInit(ctx, nullptr, EVP_sha384(), nullptr, X509_get0_pubkey(vk.cert.get())) == 1 &&
                  EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(der->data()), der->size(),
                                   reinterpret_cast<const unsigned char*>(report_bytes.data()), kSignedSize) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) {
    ERR_clear_error();
    return auth_fail("SNP report signature does not verify with the " + std::string(key_role) + " " + subject_cn(vk.cert.get()));
  }
  return VerifiedReport{report, vk.product, layout, *reported, vk.vlek, vk.ext, vk.sim};
}

Result<Report> parse_signed(ByteSpan bytes) {
  auto report = parse_report(bytes);
  if (!report) return std::unexpected(report.error());
  if (report->signing_key == SigningKey::kNone) return auth_fail("SNP report SIGNING_KEY is 7: the report is not signed");
  return report;
}

}  // namespace

Result<VerifiedReport> verify_report(const VerifyInputs& in) {
  auto report = parse_signed(in.report);
  if (!report) return std::unexpected(report.error());
  auto vk = verify_chain(in, report->signing_key == SigningKey::kVlek);
  if (!vk) return std::unexpected(vk.error());
  return verify_with_key(*report, in.report, *vk);
}

namespace {
constexpr size_t kMaxCachedChains = 4096;
}  // namespace

CachedVerifier::CachedVerifier() = default;
CachedVerifier::~CachedVerifier() = default;

size_t CachedVerifier::cached_chains() const {
  std::lock_guard lock(mu_);
  return cache_.size();
}

Result<VerifiedReport> CachedVerifier::verify(const VerifyInputs& in) {
  auto report = parse_signed(in.report);
  if (!report) return std::unexpected(report.error());
  const bool vlek = report->signing_key == SigningKey::kVlek;
  // The cache key covers everything the chain checks read except the time.
  Bytes id = to_bytes(vlek ? "vlek|" : "vcek|");
  id.insert(id.end(), in.endorsement_cert.begin(), in.endorsement_cert.end());
  if (in.chain_pem) {
    id.push_back(std::byte{'|'});
    const ByteSpan c = as_bytes(*in.chain_pem);
    id.insert(id.end(), c.begin(), c.end());
  }
  if (in.sim_trust != nullptr) {
    id.push_back(std::byte{'$'});
    const ByteSpan a = as_bytes(in.sim_trust->ark_pem), k = as_bytes(in.sim_trust->ask_pem);
    id.insert(id.end(), a.begin(), a.end());
    id.insert(id.end(), k.begin(), k.end());
  }
  if (in.crl) {
    id.push_back(std::byte{'#'});
    id.insert(id.end(), in.crl->begin(), in.crl->end());
  }
  auto digest = crypto::sha256(id);
  if (!digest) return std::unexpected(digest.error());
  const std::string key = to_hex(*digest);
  std::shared_ptr<const VerifiedKey> vk;
  {
    std::lock_guard lock(mu_);
    if (auto it = cache_.find(key); it != cache_.end()) vk = it->second;
  }
  if (vk && (in.at < vk->valid_from || in.at > vk->valid_until)) vk.reset();  // re-check: exact message
  if (!vk) {
    auto fresh = verify_chain(in, vlek);
    if (!fresh) return std::unexpected(fresh.error());
    auto shared = std::make_shared<const VerifiedKey>(std::move(*fresh));
    std::lock_guard lock(mu_);
    // Bounded: a verifier serving many machines starts over rather than grow without limit.
    if (cache_.size() >= kMaxCachedChains) cache_.clear();
    cache_[key] = shared;
    vk = shared;
  }
  return verify_with_key(*report, in.report, *vk);
}

}  // namespace tresor::snp
