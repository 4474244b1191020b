// A self-signed TLS certificate for first set-up, tests and benchmarks (server.h).
#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "tresor/broker/config.h"
#include "tresor/broker/server.h"
#include "tresor/broker/store.h"
#include "tresor/crypto.h"

namespace tresor::broker {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
};
struct FileClose {
  void operator()(FILE* f) const { std::fclose(f); }
};

bool is_ip(const std::string& s) {
  unsigned char buf[16];
  return inet_pton(AF_INET, s.c_str(), buf) == 1 || inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

}  // namespace

Result<void> write_self_signed_certificate(const std::string& cert_path, const std::string& key_path,
                                           const std::vector<std::string>& names, int days) {
  if (names.empty()) return fail(ErrorCode::kInvalidArgument, "a certificate needs at least one host name or address");
  std::unique_ptr<EVP_PKEY, PkeyFree> key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  std::unique_ptr<X509, X509Free> x(X509_new());
  if (!key || !x) return fail(ErrorCode::kCrypto, "certificate: " + crypto::openssl_error_string());
  std::array<unsigned char, 16> serial{};
  if (auto r = crypto::system_random().fill(std::as_writable_bytes(std::span(serial))); !r) return std::unexpected(r.error());
  serial[0] &= 0x7f;
  BIGNUM* bn = BN_bin2bn(serial.data(), static_cast<int>(serial.size()), nullptr);
  const bool ok_serial = bn != nullptr && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x.get())) != nullptr;
  BN_free(bn);
  std::string san;
  for (const auto& n : names) {
    if (!san.empty()) san.push_back(',');
    san.append(is_ip(n) ? "IP:" : "DNS:");
    san.append(n);
  }
  X509_NAME* subject = X509_get_subject_name(x.get());
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, x.get(), x.get(), nullptr, nullptr, 0);
  X509_EXTENSION* ext = nullptr;
  const bool ok = ok_serial && X509_set_version(x.get(), 2) == 1 && X509_gmtime_adj(X509_getm_notBefore(x.get()), -300) != nullptr &&
                  X509_gmtime_adj(X509_getm_notAfter(x.get()), static_cast<long>(days) * 86400) != nullptr &&
                  X509_set_pubkey(x.get(), key.get()) == 1 &&
                  X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(names[0].c_str()), -1, -1,
                                             0) == 1 &&
                  X509_set_issuer_name(x.get(), subject) == 1 &&
                  (ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_subject_alt_name, san.c_str())) != nullptr &&
                  X509_add_ext(x.get(), ext, -1) == 1 && X509_sign(x.get(), key.get(), EVP_sha256()) > 0;
  X509_EXTENSION_free(ext);
  if (!ok) return fail(ErrorCode::kCrypto, "certificate: " + crypto::openssl_error_string());

  const mode_t old = ::umask(077);
  std::unique_ptr<FILE, FileClose> kf(std::fopen(key_path.c_str(), "wx"));
  ::umask(old);
  if (!kf) return fail(ErrorCode::kIo, "cannot create " + key_path + " (it must not exist)");
  if (PEM_write_PrivateKey(kf.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    return fail(ErrorCode::kIo, "cannot write " + key_path);
  }
  std::unique_ptr<FILE, FileClose> cf(std::fopen(cert_path.c_str(), "wx"));
  if (!cf) return fail(ErrorCode::kIo, "cannot create " + cert_path + " (it must not exist)");
  if (PEM_write_X509(cf.get(), x.get()) != 1) return fail(ErrorCode::kIo, "cannot write " + cert_path);
  if (std::fflush(cf.get()) != 0 || std::fflush(kf.get()) != 0) return fail(ErrorCode::kIo, "cannot write the certificate files");
  return {};
}

}  // namespace tresor::broker

namespace tresor::broker {

Result<void> init_directory(const std::string& dir, const std::string& address, uint16_t port, const std::string& sim_trust_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_empty(dir, ec)) return fail(ErrorCode::kExists, dir + " exists and is not empty");
  fs::create_directories(dir, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create " + dir + ": " + ec.message());
  fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace, ec);
  std::array<std::byte, kMasterKeySize> master{};
  TRESOR_TRY(crypto::system_random().fill(master));
  const std::string key_path = dir + "/master.key";
  const mode_t old = ::umask(077);
  std::unique_ptr<FILE, FileClose> mk(std::fopen(key_path.c_str(), "wx"));
  ::umask(old);
  if (!mk) return fail(ErrorCode::kIo, "cannot create " + key_path);
  const bool written = std::fwrite(master.data(), 1, master.size(), mk.get()) == master.size() && std::fflush(mk.get()) == 0;
  OPENSSL_cleanse(master.data(), master.size());
  if (!written) return fail(ErrorCode::kIo, "cannot write " + key_path);
  TRESOR_TRY(write_self_signed_certificate(dir + "/tls.crt", dir + "/tls.key", {address}, 365));
  std::string sim;
  if (!sim_trust_dir.empty()) {
    sim = "sim_trust = \"" + fs::absolute(sim_trust_dir).string() + "\"  # sim evidence is NOT confidential hardware\n";
  }
  const std::string toml =
      "# tresor-broker configuration (docs/broker.md §7), written by tresor-broker --init.\n"
      "[listen]\naddress = \"" + address + "\"\nport = " + std::to_string(port) +
      "\n\n[tls]\ncertificate = \"tls.crt\"\nprivate_key = \"tls.key\"\n\n[store]\npath = \"broker.db\"\nmaster_key = \"master.key\"\n\n"
      "[attestation]\n" + sim + "\n[admin]\nsocket = \"admin.sock\"\n";
  std::unique_ptr<FILE, FileClose> cf(std::fopen((dir + "/broker.toml").c_str(), "wx"));
  if (!cf || std::fwrite(toml.data(), 1, toml.size(), cf.get()) != toml.size() || std::fflush(cf.get()) != 0) {
    return fail(ErrorCode::kIo, "cannot write " + dir + "/broker.toml");
  }
  return {};
}

}  // namespace tresor::broker
