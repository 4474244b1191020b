// The sim secure processor: test roots and VCEK with AMD's certificate layout, and byte-exact
// signed SNP reports (SNP ABI spec 56860 Table 23; VCEK extensions per 57230 Table 8).
#include "tresor/snp/sim.h"

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <cstring>
#include <functional>
#include <memory>

#include "tresor/crypto.h"
#include "tresor/io.h"

namespace tresor::snp::sim {
namespace {

struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using X509Ptr = std::unique_ptr<X509, X509Free>;

std::unexpected<Error> ossl(const std::string& what) {
  return fail(ErrorCode::kCrypto, "sim: " + what + ": " + crypto::openssl_error_string());
}

Result<PkeyPtr> rsa_key(int bits) {
  EVP_PKEY* p = EVP_RSA_gen(static_cast<unsigned>(bits));
  if (p == nullptr) return ossl("RSA key generation");
  return PkeyPtr(p);
}

Result<PkeyPtr> p384_key() {
  EVP_PKEY* p = EVP_EC_gen("secp384r1");
  if (p == nullptr) return ossl("P-384 key generation");
  return PkeyPtr(p);
}

// DER of an INTEGER 0..255 and of an IA5String, the encodings of AMD's extension values.
Bytes der_integer(uint8_t v) {
  if (v < 0x80) return {std::byte{0x02}, std::byte{0x01}, std::byte{v}};
  return {std::byte{0x02}, std::byte{0x02}, std::byte{0x00}, std::byte{v}};
}
Bytes der_ia5(std::string_view s) {
  Bytes out{std::byte{0x16}, std::byte(static_cast<uint8_t>(s.size()))};
  for (char c : s) out.push_back(std::byte(static_cast<uint8_t>(c)));
  return out;
}

Result<void> add_raw_ext(X509* x, const char* oid, ByteSpan value) {
  ASN1_OBJECT* obj = OBJ_txt2obj(oid, 1);
  ASN1_OCTET_STRING* data = ASN1_OCTET_STRING_new();
  const bool ok = obj != nullptr && data != nullptr &&
                  ASN1_OCTET_STRING_set(data, reinterpret_cast<const unsigned char*>(value.data()), static_cast<int>(value.size())) == 1;
  X509_EXTENSION* ext = ok ? X509_EXTENSION_create_by_OBJ(nullptr, obj, 0, data) : nullptr;
  const bool added = ext != nullptr && X509_add_ext(x, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  ASN1_OCTET_STRING_free(data);
  ASN1_OBJECT_free(obj);
  if (!added) return ossl(std::string("extension ") + oid);
  return {};
}

Result<void> add_conf_ext(X509* x, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer != nullptr ? issuer : x, x, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  const bool ok = ext != nullptr && X509_add_ext(x, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  if (!ok) return ossl(std::string("extension ") + value);
  return {};
}

// A certificate for `key`, issued by `issuer` (self-signed when null) and signed with
// RSASSA-PSS/SHA-384, salt 48, as AMD signs its own (57230 §2).
Result<X509Ptr> make_cert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key, int days, bool ca,
                          const std::function<Result<void>(X509*)>& extra) {
  X509Ptr x(X509_new());
  if (!x) return ossl("X509_new");
  BIGNUM* serial = BN_new();
  const bool serial_ok = serial != nullptr && BN_rand(serial, 64, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) == 1 &&
                         BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x.get())) != nullptr;
  BN_free(serial);
  if (!serial_ok) return ossl("serial number");
  X509_NAME* name = X509_NAME_new();
  X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("Tresor sim secure processor"), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  const bool ok = X509_set_version(x.get(), 2) == 1 && X509_set_subject_name(x.get(), name) == 1 &&
                  X509_set_issuer_name(x.get(), issuer != nullptr ? X509_get_subject_name(issuer) : name) == 1 &&
                  X509_gmtime_adj(X509_getm_notBefore(x.get()), -3600) != nullptr &&
                  X509_gmtime_adj(X509_getm_notAfter(x.get()), 86400L * days) != nullptr &&
                  X509_set_pubkey(x.get(), key) == 1;
  X509_NAME_free(name);
  if (!ok) return ossl("certificate fields");
  if (ca) {
    TRESOR_TRY(add_conf_ext(x.get(), issuer, NID_basic_constraints, "critical,CA:TRUE"));
    TRESOR_TRY(add_conf_ext(x.get(), issuer, NID_key_usage, "critical,keyCertSign,cRLSign"));
  }
  if (extra) TRESOR_TRY(extra(x.get()));
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  EVP_PKEY_CTX* pctx = nullptr;
  const bool signed_ok = md != nullptr && EVP_DigestSignInit(md, &pctx, EVP_sha384(), nullptr, issuer_key) == 1 &&
                         EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) == 1 &&
                         EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, 48) == 1 &&
                         EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha384()) == 1 && X509_sign_ctx(x.get(), md) > 0;
  EVP_MD_CTX_free(md);
  if (!signed_ok) return ossl("signing " + cn);
  return x;
}

Result<std::string> pem_of(X509* x) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (bio == nullptr || PEM_write_bio_X509(bio, x) != 1) {
    BIO_free(bio);
    return ossl("PEM_write_bio_X509");
  }
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  std::string out(data, static_cast<size_t>(len));
  BIO_free(bio);
  return out;
}

Result<SecretBuffer> key_pem(EVP_PKEY* k) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (bio == nullptr || PEM_write_bio_PrivateKey(bio, k, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    BIO_free(bio);
    return ossl("PEM_write_bio_PrivateKey");
  }
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  SecretBuffer out = SecretBuffer::copy_of(ByteSpan(reinterpret_cast<const std::byte*>(data), static_cast<size_t>(len)));
  OPENSSL_cleanse(data, static_cast<size_t>(len));
  BIO_free(bio);
  return out;
}

Result<void> write_new(const std::string& path, ByteSpan data, unsigned mode) {
  auto f = AtomicOutputFile::create(path, mode, /*overwrite=*/false);
  if (!f) return std::unexpected(f.error());
  TRESOR_TRY(f->write(data));
  return f->commit();
}

std::string path_in(const std::string& dir, const char* name) { return dir + "/" + name; }

}  // namespace

Result<void> init(const std::string& dir, const InitOptions& o) {
  TRESOR_TRY(make_private_dirs(dir));
  for (const char* f : {"ark.pem", "ask.pem", "vcek.pem", "ark.key", "ask.key", "vcek.key", "sim.json"}) {
    if (::access(path_in(dir, f).c_str(), F_OK) == 0) {
      return fail(ErrorCode::kExists, path_in(dir, f) + " already exists; refusing to replace a sim root");
    }
  }
  auto ark_key = rsa_key(o.rsa_bits);
  if (!ark_key) return std::unexpected(ark_key.error());
  auto ask_key = rsa_key(o.rsa_bits);
  if (!ask_key) return std::unexpected(ask_key.error());
  auto vcek_key = p384_key();
  if (!vcek_key) return std::unexpected(vcek_key.error());
  std::array<std::byte, 64> chip_id;
  TRESOR_TRY(crypto::random_bytes(chip_id));

  auto ark = make_cert(ark_key->get(), "ARK-Sim", nullptr, ark_key->get(), o.validity_days, true, {});
  if (!ark) return std::unexpected(ark.error());
  auto ask = make_cert(ask_key->get(), "SEV-Sim", ark->get(), ark_key->get(), o.validity_days, true, {});
  if (!ask) return std::unexpected(ask.error());
  auto vcek = make_cert(vcek_key->get(), "SEV-VCEK", ask->get(), ask_key->get(), o.validity_days, false, [&](X509* x) -> Result<void> {
    // 57230 Table 8: structVersion, productName, the SPLs, hwID.
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.1", der_integer(0)));
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.2", der_ia5(kProductName)));
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.3.1", der_integer(o.tcb.bootloader)));
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.3.2", der_integer(o.tcb.tee)));
    for (const char* spl : {"1.3.6.1.4.1.3704.1.3.4", "1.3.6.1.4.1.3704.1.3.5", "1.3.6.1.4.1.3704.1.3.6", "1.3.6.1.4.1.3704.1.3.7"}) {
      TRESOR_TRY(add_raw_ext(x, spl, der_integer(0)));
    }
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.3.3", der_integer(o.tcb.snp)));
    TRESOR_TRY(add_raw_ext(x, "1.3.6.1.4.1.3704.1.3.8", der_integer(o.tcb.microcode)));
    return add_raw_ext(x, "1.3.6.1.4.1.3704.1.4", chip_id);
  });
  if (!vcek) return std::unexpected(vcek.error());

  const std::pair<X509*, const char*> certs[] = {{ark->get(), "ark.pem"}, {ask->get(), "ask.pem"}, {vcek->get(), "vcek.pem"}};
  for (const auto& [c, name] : certs) {
    auto pem = pem_of(c);
    if (!pem) return std::unexpected(pem.error());
    TRESOR_TRY(write_new(path_in(dir, name), as_bytes(*pem), 0644));
  }
  const std::pair<EVP_PKEY*, const char*> keys[] = {{ark_key->get(), "ark.key"}, {ask_key->get(), "ask.key"}, {vcek_key->get(), "vcek.key"}};
  for (const auto& [k, name] : keys) {
    auto pem = key_pem(k);
    if (!pem) return std::unexpected(pem.error());
    TRESOR_TRY(write_new(path_in(dir, name), pem->span(), 0600));
  }
  nlohmann::json j;
  j["product"] = kProductName;
  j["chip_id"] = to_hex(chip_id);
  j["tcb"] = {{"bootloader", o.tcb.bootloader}, {"tee", o.tcb.tee}, {"snp", o.tcb.snp}, {"microcode", o.tcb.microcode}};
  j["warning"] = "test root: a report signed here proves nothing about hardware";
  return write_new(path_in(dir, "sim.json"), as_bytes(j.dump(2) + "\n"), 0644);
}

Result<SimTrust> load_trust(const std::string& dir) {
  auto ark = read_small_file(path_in(dir, "ark.pem"));
  if (!ark) return std::unexpected(ark.error());
  auto ask = read_small_file(path_in(dir, "ask.pem"));
  if (!ask) return std::unexpected(ask.error());
  return SimTrust{*ark, *ask};
}

struct SecureProcessor::Impl {
  PkeyPtr vcek_key;
  std::string vcek_pem;
  std::array<std::byte, 64> chip_id{};
  Tcb tcb;
};

SecureProcessor::SecureProcessor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SecureProcessor::SecureProcessor(SecureProcessor&&) noexcept = default;
SecureProcessor& SecureProcessor::operator=(SecureProcessor&&) noexcept = default;
SecureProcessor::~SecureProcessor() = default;

Result<SecureProcessor> SecureProcessor::load(const std::string& dir) {
  auto key_text = read_secret_file(path_in(dir, "vcek.key"));
  if (!key_text) return std::unexpected(key_text.error());
  BIO* bio = BIO_new_mem_buf(key_text->data(), static_cast<int>(key_text->size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (key == nullptr) return ossl(path_in(dir, "vcek.key") + " is not a PEM private key");
  auto impl = std::make_unique<Impl>();
  impl->vcek_key.reset(key);
  auto pem = read_small_file(path_in(dir, "vcek.pem"));
  if (!pem) return std::unexpected(pem.error());
  impl->vcek_pem = *pem;
  auto ext = parse_endorsement_extensions(as_bytes(*pem));
  if (!ext) return std::unexpected(ext.error());
  if (ext->product_name != kProductName || ext->hw_id.size() != 64) {
    return fail(ErrorCode::kMalformed, path_in(dir, "vcek.pem") + " is not a sim VCEK");
  }
  std::memcpy(impl->chip_id.data(), ext->hw_id.data(), 64);
  impl->tcb = ext->tcb;
  return SecureProcessor(std::move(impl));
}

const std::string& SecureProcessor::vcek_pem() const { return impl_->vcek_pem; }
ByteSpan SecureProcessor::chip_id() const { return impl_->chip_id; }

Result<std::array<std::byte, kReportSize>> SecureProcessor::sign_report(const ReportParams& p) const {
  if (p.version != 2 && p.version != 3 && p.version != 5) {
    return fail(ErrorCode::kInvalidArgument, "sim reports are of version 2, 3 or 5, not " + std::to_string(p.version));
  }
  if (auto pol = decode_policy(p.policy); !pol) return std::unexpected(pol.error());
  Report r;
  r.version = p.version;
  r.policy = p.policy;
  r.family_id = p.family_id;
  r.image_id = p.image_id;
  r.vmpl = p.vmpl;
  r.signature_algo = kSigAlgoEcdsaP384Sha384;
  const uint64_t tcb = encode_tcb(p.tcb.value_or(impl_->tcb), TcbLayout::kMilanGenoa);
  r.current_tcb = r.reported_tcb = r.committed_tcb = r.launch_tcb = tcb;
  r.platform_info = 1;  // SMT_EN
  r.signing_key = SigningKey::kVcek;
  r.report_data = p.report_data;
  r.measurement = p.measurement;
  r.host_data = p.host_data;
  TRESOR_TRY(crypto::random_bytes(r.report_id));
  r.report_id_ma.fill(std::byte{0xFF});
  if (p.version >= 3) {
    r.cpuid_fam_id = 0x19;  // the Milan/Genoa TCB layout
    r.cpuid_mod_id = 0x01;
    r.cpuid_step = 0x01;
  }
  r.chip_id = impl_->chip_id;
  r.current_major = r.committed_major = 1;
  r.current_minor = r.committed_minor = 55;
  r.current_build = r.committed_build = 1;
  auto bytes = serialize_report(r);
  // ECDSA P-384 over bytes 0x000–0x29F; R and S stored as 72-byte little-endian (Table 24).
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  size_t len = 0;
  bool ok = md != nullptr && EVP_DigestSignInit(md, nullptr, EVP_sha384(), nullptr, impl_->vcek_key.get()) == 1 &&
            EVP_DigestSign(md, nullptr, &len, reinterpret_cast<const unsigned char*>(bytes.data()), kSignedSize) == 1;
  Bytes der(len);
  ok = ok && EVP_DigestSign(md, reinterpret_cast<unsigned char*>(der.data()), &len,
                            reinterpret_cast<const unsigned char*>(bytes.data()), kSignedSize) == 1;
  EVP_MD_CTX_free(md);
  if (!ok) return ossl("signing the report");
  der.resize(len);
  auto raw = crypto::ecdsa_der_to_raw(der, 48);
  if (!raw) return std::unexpected(raw.error());
  for (size_t i = 0; i < 48; ++i) {
    r.signature_r[i] = (*raw)[47 - i];
    r.signature_s[i] = (*raw)[95 - i];
  }
  return serialize_report(r);
}

}  // namespace tresor::snp::sim
