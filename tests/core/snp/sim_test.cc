// The sim secure processor: its roots and VCEK have AMD's layout, its reports of versions 2, 3
// and 5 are byte-exact and verify through the same verifier — but only with the explicit sim
// trust entry, and flagged as sim; a policy must name the "Sim" product to accept them.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <ctime>
#include <filesystem>

#include "support/test_support.h"
#include "tresor/snp/sim.h"
#include "tresor/snp/validate.h"

namespace tresor {
namespace {

using testing::FailsWith;

class SnpSim : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir;
    auto r = snp::sim::init(root());  // RSA-4096, as AMD's roots
    ASSERT_TRUE(r) << r.error().message;
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string root() { return dir_->file("sim"); }
  static testing::TempDir* dir_;
};
testing::TempDir* SnpSim::dir_ = nullptr;

snp::sim::ReportParams params(uint32_t version) {
  snp::sim::ReportParams p;
  p.version = version;
  for (size_t i = 0; i < p.measurement.size(); ++i) p.measurement[i] = std::byte(static_cast<uint8_t>(0xA0 + i));
  p.report_data[0] = std::byte{0x11};
  p.host_data[31] = std::byte{0x22};
  return p;
}

TEST_F(SnpSim, InitWritesAmdShapedCertificatesAndRefusesToReplaceThem) {
  for (const char* f : {"ark.pem", "ask.pem", "vcek.pem", "ark.key", "ask.key", "vcek.key", "sim.json"}) {
    EXPECT_TRUE(std::filesystem::exists(root() + "/" + f)) << f;
  }
  EXPECT_EQ(std::filesystem::status(root() + "/vcek.key").permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  auto ext = snp::parse_endorsement_extensions(testing::read_file(root() + "/vcek.pem"));
  ASSERT_TRUE(ext) << ext.error().message;
  EXPECT_EQ(ext->product_name, "Sim");
  EXPECT_EQ(ext->tcb, (snp::Tcb{.fmc = 0, .bootloader = 3, .tee = 0, .snp = 8, .microcode = 115}));
  EXPECT_EQ(ext->hw_id.size(), 64u);
  EXPECT_TRUE(FailsWith(snp::sim::init(root()), ErrorCode::kExists));
}

TEST_F(SnpSim, ReportsOfEveryVersionVerifyOnlyWithTheSimTrustEntry) {
  auto sp = snp::sim::SecureProcessor::load(root());
  ASSERT_TRUE(sp) << sp.error().message;
  auto trust = snp::sim::load_trust(root());
  ASSERT_TRUE(trust);
  for (uint32_t v : {2u, 3u, 5u}) {
    SCOPED_TRACE(v);
    auto report = sp->sign_report(params(v));
    ASSERT_TRUE(report) << report.error().message;
    auto parsed = snp::parse_report(*report);
    ASSERT_TRUE(parsed) << parsed.error().message;
    EXPECT_EQ(parsed->version, v);
    EXPECT_EQ(parsed->measurement, params(v).measurement);
    EXPECT_EQ(parsed->host_data, params(v).host_data);
    EXPECT_TRUE(std::equal(parsed->chip_id.begin(), parsed->chip_id.end(), sp->chip_id().begin()));

    snp::VerifyInputs in;
    in.report = *report;
    const Bytes vcek = to_bytes(sp->vcek_pem());
    in.endorsement_cert = vcek;
    in.at = std::time(nullptr);
    auto untrusted = snp::verify_report(in);
    ASSERT_TRUE(FailsWith(untrusted, ErrorCode::kAuth));
    EXPECT_NE(untrusted.error().message.find("sim secure processor"), std::string::npos) << untrusted.error().message;

    in.sim_trust = &*trust;
    auto v_ok = snp::verify_report(in);
    ASSERT_TRUE(v_ok) << v_ok.error().message;
    EXPECT_TRUE(v_ok->sim);
    EXPECT_EQ(v_ok->product, snp::Product::kSim);

    // One flipped bit of REPORT_DATA breaks the signature.
    auto tampered = *report;
    tampered[0x50] ^= std::byte{1};
    in.report = tampered;
    EXPECT_TRUE(FailsWith(snp::verify_report(in), ErrorCode::kAuth));
  }
}

TEST_F(SnpSim, AnotherSimRootDoesNotVerifyThisOnesReports) {
  testing::TempDir other;
  snp::sim::InitOptions o;
  o.rsa_bits = 2048;  // a second root only needs to differ
  ASSERT_TRUE(snp::sim::init(other.file("sim"), o));
  auto sp = snp::sim::SecureProcessor::load(root());
  ASSERT_TRUE(sp);
  auto report = sp->sign_report(params(5));
  ASSERT_TRUE(report);
  auto wrong = snp::sim::load_trust(other.file("sim"));
  ASSERT_TRUE(wrong);
  snp::VerifyInputs in;
  in.report = *report;
  const Bytes vcek = to_bytes(sp->vcek_pem());
  in.endorsement_cert = vcek;
  in.at = std::time(nullptr);
  in.sim_trust = &*wrong;
  EXPECT_TRUE(FailsWith(snp::verify_report(in), ErrorCode::kAuth));
}

TEST_F(SnpSim, APolicyMustNameTheSimProduct) {
  auto sp = snp::sim::SecureProcessor::load(root());
  ASSERT_TRUE(sp);
  auto trust = snp::sim::load_trust(root());
  auto report = sp->sign_report(params(5));
  ASSERT_TRUE(report && trust);
  snp::VerifyInputs in;
  in.report = *report;
  const Bytes vcek = to_bytes(sp->vcek_pem());
  in.endorsement_cert = vcek;
  in.at = std::time(nullptr);
  in.sim_trust = &*trust;
  auto v = snp::verify_report(in);
  ASSERT_TRUE(v);
  const std::string m = to_hex(params(5).measurement);
  const std::string base = R"({"measurements": [")" + m + R"("], "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}, "allow_smt": true)";
  auto hardware_only = snp::parse_policy(base + "}");
  ASSERT_TRUE(hardware_only);
  auto denied = snp::validate(*v, &*hardware_only);
  ASSERT_TRUE(FailsWith(denied, ErrorCode::kPolicy));
  EXPECT_NE(denied.error().message.find("product is Sim"), std::string::npos) << denied.error().message;
  auto with_sim = snp::parse_policy(base + R"(, "products": ["Sim"]})");
  ASSERT_TRUE(with_sim) << with_sim.error().message;
  auto ok = snp::validate(*v, &*with_sim);
  EXPECT_TRUE(ok) << ok.error().message;
}

// A CRL issued by the sim ARK (the same code path as AMD's: signed by the product's ARK).
Bytes make_crl(const std::string& root_dir, bool revoke_ask, long next_update_offset, bool sign_with_ask = false) {
  auto load_key = [](const std::string& path) {
    const Bytes k = testing::read_file(path);
    BIO* bio = BIO_new_mem_buf(k.data(), static_cast<int>(k.size()));
    EVP_PKEY* key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    return key;
  };
  auto load_cert = [](const std::string& path) {
    const Bytes c = testing::read_file(path);
    BIO* bio = BIO_new_mem_buf(c.data(), static_cast<int>(c.size()));
    X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    return x;
  };
  EVP_PKEY* key = load_key(root_dir + (sign_with_ask ? "/ask.key" : "/ark.key"));
  X509* ark = load_cert(root_dir + "/ark.pem");
  X509* ask = load_cert(root_dir + "/ask.pem");
  X509_CRL* crl = X509_CRL_new();
  X509_CRL_set_version(crl, 1);
  X509_CRL_set_issuer_name(crl, X509_get_subject_name(ark));
  ASN1_TIME* last = X509_gmtime_adj(nullptr, -3600);
  ASN1_TIME* next = X509_gmtime_adj(nullptr, next_update_offset);
  X509_CRL_set1_lastUpdate(crl, last);
  X509_CRL_set1_nextUpdate(crl, next);
  if (revoke_ask) {
    X509_REVOKED* r = X509_REVOKED_new();
    X509_REVOKED_set_serialNumber(r, X509_get_serialNumber(ask));
    X509_REVOKED_set_revocationDate(r, last);
    X509_CRL_add0_revoked(crl, r);
  }
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  EVP_PKEY_CTX* pctx = nullptr;
  EVP_DigestSignInit(md, &pctx, EVP_sha384(), nullptr, key);
  EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING);
  X509_CRL_sign_ctx(crl, md);
  unsigned char* der = nullptr;
  const int len = i2d_X509_CRL(crl, &der);
  Bytes out(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + len);
  OPENSSL_free(der);
  EVP_MD_CTX_free(md);
  ASN1_TIME_free(last);
  ASN1_TIME_free(next);
  X509_CRL_free(crl);
  X509_free(ark);
  X509_free(ask);
  EVP_PKEY_free(key);
  return out;
}

TEST_F(SnpSim, CrlOfTheArkIsChecked) {
  auto sp = snp::sim::SecureProcessor::load(root());
  auto trust = snp::sim::load_trust(root());
  ASSERT_TRUE(sp && trust);
  auto report = sp->sign_report(params(5));
  ASSERT_TRUE(report);
  const Bytes vcek = to_bytes(sp->vcek_pem());
  auto verify_with = [&](Bytes crl) {
    snp::VerifyInputs in;
    in.report = *report;
    in.endorsement_cert = vcek;
    in.at = std::time(nullptr);
    in.sim_trust = &*trust;
    in.crl = std::move(crl);
    return snp::verify_report(in);
  };
  auto clean = verify_with(make_crl(root(), false, 86400));
  EXPECT_TRUE(clean) << clean.error().message;
  const std::pair<Bytes, std::string> bad[] = {
      {make_crl(root(), true, 86400), "revoked"},
      {make_crl(root(), false, -60), "stale"},
      {make_crl(root(), false, 86400, /*sign_with_ask=*/true), "not signed by the ARK"},
      {to_bytes("not a CRL"), "neither DER nor PEM"},
  };
  for (const auto& [crl, want] : bad) {
    SCOPED_TRACE(want);
    auto r = verify_with(crl);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
  }
  // A cached chain is only as good as its CRL: past the CRL's next update, the full check runs
  // again and finds the CRL stale.
  snp::CachedVerifier cv;
  snp::VerifyInputs in;
  in.report = *report;
  in.endorsement_cert = vcek;
  in.at = std::time(nullptr);
  in.sim_trust = &*trust;
  in.crl = make_crl(root(), false, 600);
  ASSERT_TRUE(cv.verify(in));
  ASSERT_TRUE(cv.verify(in));
  in.at += 1200;
  auto stale = cv.verify(in);
  ASSERT_FALSE(stale);
  EXPECT_NE(stale.error().message.find("stale"), std::string::npos) << stale.error().message;
}

}  // namespace
}  // namespace tresor
