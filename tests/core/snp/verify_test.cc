// SEV-SNP verification against AMD's real chain: the AMD-signed Milan report verifies with its
// VCEK under the pinned roots at a time inside the VCEK's validity, and every broken link is
// rejected with its reason: another product's ASK in the chain, a time outside validity, a
// flipped signature bit, a changed field, hwID ≠ CHIP_ID, certificate TCB ≠ REPORTED_TCB, a
// masked CHIP_ID, the wrong key kind, and a certificate that AMD did not issue.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ctime>
#include <fstream>
#include <functional>

#include "support/test_support.h"
#include "tresor/snp/verify.h"

namespace tresor {
namespace {

using testing::shared_testdata;

using testing::read_file;


std::time_t utc(int y, int mo, int d) {
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mo - 1;
  tm.tm_mday = d;
  return timegm(&tm);
}

struct Milan {
  Bytes report = read_file(shared_testdata("snp/milan-v2-virtee/report.bin"));
  Bytes vcek = read_file(shared_testdata("snp/milan-v2-virtee/vcek.der"));
  std::string chain = to_string(read_file(shared_testdata("snp/milan-v2-virtee/cert_chain.pem")));
  nlohmann::json want = nlohmann::json::parse(std::ifstream(shared_testdata("snp/milan-v2-virtee/expected.json")));

  snp::VerifyInputs inputs(ByteSpan r) const {
    snp::VerifyInputs in;
    in.report = r;
    in.endorsement_cert = vcek;
    in.at = utc(2025, 6, 1);
    return in;
  }
};

TEST(SnpVerify, RealMilanReportVerifiesUnderPinnedRoots) {
  Milan m;
  auto v = snp::verify_report(m.inputs(m.report));
  ASSERT_TRUE(v) << v.error().message;
  EXPECT_EQ(v->product, snp::Product::kMilan);
  EXPECT_FALSE(v->vlek);
  EXPECT_EQ(v->reported_tcb, (snp::Tcb{.fmc = 0, .bootloader = 3, .tee = 0, .snp = 8, .microcode = 115}));
  EXPECT_EQ(v->endorsement.product_name, "Milan-B0");
  EXPECT_EQ(to_hex(v->endorsement.hw_id), to_hex(v->report.chip_id));
  // With the KDS cert_chain given as well (it must be AMD's own certificates).
  snp::VerifyInputs in = m.inputs(m.report);
  in.chain_pem = m.chain;
  auto with_chain = snp::verify_report(in);
  EXPECT_TRUE(with_chain) << with_chain.error().message;
  // PEM input for the VCEK works too.
  const std::string pem = "-----BEGIN CERTIFICATE-----\n" + [&] {
    // base64 of the DER, 64 columns
    static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string b64;
    size_t i = 0;
    for (; i + 2 < m.vcek.size(); i += 3) {
      const uint32_t n = (std::to_integer<uint32_t>(m.vcek[i]) << 16) | (std::to_integer<uint32_t>(m.vcek[i + 1]) << 8) |
                         std::to_integer<uint32_t>(m.vcek[i + 2]);
      for (int k = 3; k >= 0; --k) b64 += t[(n >> (6 * k)) & 63];
    }
    if (i < m.vcek.size()) {
      uint32_t n = std::to_integer<uint32_t>(m.vcek[i]) << 16;
      if (i + 1 < m.vcek.size()) n |= std::to_integer<uint32_t>(m.vcek[i + 1]) << 8;
      b64 += t[(n >> 18) & 63];
      b64 += t[(n >> 12) & 63];
      b64 += i + 1 < m.vcek.size() ? t[(n >> 6) & 63] : '=';
      b64 += '=';
    }
    std::string lines;
    for (size_t k = 0; k < b64.size(); k += 64) lines += b64.substr(k, 64) + "\n";
    return lines;
  }() + "-----END CERTIFICATE-----\n";
  in = m.inputs(m.report);
  const Bytes pem_bytes = to_bytes(pem);
  in.endorsement_cert = pem_bytes;
  EXPECT_TRUE(snp::verify_report(in));
}

TEST(SnpVerify, EndorsementExtensionsMatchIndependentDecoding) {
  Milan m;
  auto e = snp::parse_endorsement_extensions(m.vcek);
  ASSERT_TRUE(e) << e.error().message;
  const auto& w = m.want["endorsement_cert"]["amd_extensions"];
  EXPECT_EQ(e->struct_version, w["structVersion"].get<uint32_t>());
  EXPECT_EQ(e->product_name, w["productName"].get<std::string>());
  EXPECT_EQ(e->tcb.bootloader, w["blSPL"].get<int>());
  EXPECT_EQ(e->tcb.tee, w["teeSPL"].get<int>());
  EXPECT_EQ(e->tcb.snp, w["snpSPL"].get<int>());
  EXPECT_EQ(e->tcb.microcode, w["ucodeSPL"].get<int>());
  EXPECT_EQ(e->spl_4_7[0], w["spl4"].get<int>());
  EXPECT_FALSE(e->has_fmc);
  EXPECT_EQ("raw:" + to_hex(e->hw_id), w["hwID"].get<std::string>());
  EXPECT_TRUE(e->csp_id.empty());
}

struct Case {
  std::string name;
  std::function<void(Bytes& report, snp::VerifyInputs& in, std::string& chain)> mutate;
  ErrorCode want;
  std::string want_text;
};

TEST(SnpVerify, EveryBrokenLinkIsRejectedWithItsReason) {
  Milan m;
  const std::string genoa = to_string(read_file(shared_testdata("snp/amd/genoa_ask_ark_asvk.pem")));
  const std::vector<Case> cases = {
      {"another product's ASK in the chain", [&](Bytes&, snp::VerifyInputs&, std::string& c) { c = genoa; },
       ErrorCode::kAuth, "not AMD's pinned"},
      {"before the VCEK is valid", [](Bytes&, snp::VerifyInputs& in, std::string&) { in.at = utc(2023, 1, 1); },
       ErrorCode::kAuth, "not valid until"},
      {"after the VCEK expired", [](Bytes&, snp::VerifyInputs& in, std::string&) { in.at = utc(2031, 1, 1); },
       ErrorCode::kAuth, "expired"},
      {"signature R bit flipped", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x2A0] ^= std::byte{1}; },
       ErrorCode::kAuth, "signature does not verify"},
      {"measurement changed", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x90] ^= std::byte{0x80}; },
       ErrorCode::kAuth, "signature does not verify"},
      {"report data changed", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x50] ^= std::byte{1}; },
       ErrorCode::kAuth, "signature does not verify"},
      {"CHIP_ID changed (hwID mismatch)", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x1A0] ^= std::byte{1}; },
       ErrorCode::kAuth, "hwID"},
      {"REPORTED_TCB snp lowered", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x186] = std::byte{7}; },
       ErrorCode::kAuth, "does not equal REPORTED_TCB"},
      {"CHIP_ID masked", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x48] = std::byte{2}; },
       ErrorCode::kAuth, "MASK_CHIP_KEY"},
      {"report says VLEK", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x48] = std::byte{1 << 2}; },
       ErrorCode::kAuth, "says VLEK"},
      {"report unsigned", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x48] = std::byte{7 << 2}; },
       ErrorCode::kAuth, "not signed"},
      {"malformed report", [](Bytes& r, snp::VerifyInputs&, std::string&) { r[0x4C] = std::byte{1}; },
       ErrorCode::kMalformed, "reserved"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Bytes report = m.report;
    std::string chain = m.chain;
    snp::VerifyInputs in = m.inputs(report);
    c.mutate(report, in, chain);
    in.report = report;
    in.chain_pem = chain;
    auto v = snp::verify_report(in);
    ASSERT_FALSE(v) << "accepted: " << c.name;
    EXPECT_EQ(v.error().code, c.want) << v.error().message;
    EXPECT_NE(v.error().message.find(c.want_text), std::string::npos) << v.error().message;
  }
}

TEST(SnpVerify, EveryFieldOfTheReportIsCovered) {
  // One byte changed in each field of Table 23 (signed bytes 0x000–0x29F, then R and S): the
  // report must be refused every time — by the parser, a binding check or the signature.
  Milan m;
  const std::vector<std::pair<const char*, size_t>> fields = {
      {"VERSION", 0x000}, {"GUEST_SVN", 0x004}, {"POLICY", 0x008}, {"FAMILY_ID", 0x010}, {"IMAGE_ID", 0x020},
      {"VMPL", 0x030}, {"SIGNATURE_ALGO", 0x034}, {"CURRENT_TCB", 0x038}, {"PLATFORM_INFO", 0x040},
      {"key information", 0x048}, {"reserved 0x04C", 0x04C}, {"REPORT_DATA", 0x050}, {"MEASUREMENT", 0x090},
      {"HOST_DATA", 0x0C0}, {"ID_KEY_DIGEST", 0x0E0}, {"AUTHOR_KEY_DIGEST", 0x110}, {"REPORT_ID", 0x140},
      {"REPORT_ID_MA", 0x160}, {"REPORTED_TCB", 0x180}, {"CPUID / reserved", 0x188}, {"reserved 0x18B", 0x18B},
      {"CHIP_ID", 0x1A0}, {"COMMITTED_TCB", 0x1E0}, {"CURRENT_BUILD", 0x1E8}, {"CURRENT_MINOR", 0x1E9},
      {"CURRENT_MAJOR", 0x1EA}, {"reserved 0x1EB", 0x1EB}, {"COMMITTED_BUILD", 0x1EC}, {"COMMITTED_MINOR", 0x1ED},
      {"COMMITTED_MAJOR", 0x1EE}, {"reserved 0x1EF", 0x1EF}, {"LAUNCH_TCB", 0x1F0}, {"mitigation vectors", 0x1F8},
      {"reserved 0x208", 0x208}, {"SIGNATURE R", 0x2A0}, {"SIGNATURE S", 0x2E8}, {"SIGNATURE reserved", 0x330},
  };
  for (const auto& [name, off] : fields) {
    SCOPED_TRACE(name);
    Bytes r = m.report;
    r[off] ^= std::byte{0x04};
    auto v = snp::verify_report(m.inputs(r));
    ASSERT_FALSE(v) << "a change in " << name << " went unnoticed";
    EXPECT_TRUE(v.error().code == ErrorCode::kAuth || v.error().code == ErrorCode::kMalformed ||
                v.error().code == ErrorCode::kUnsupportedVersion)
        << v.error().message;
  }
}

TEST(SnpVerify, ACertificateAmdDidNotIssueIsRejected) {
  // A look-alike VCEK with the same extensions (product, TCB, hwID) made with a key of our own.
  Milan m;
  testing::TempDir dir;
  const std::string hw = "DER:" + m.want["chip_id"].get<std::string>();
  auto r = testing::run_command(
      {"/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1", "-nodes",
       "-keyout", dir.file("k.pem"), "-out", dir.file("fake.pem"), "-days", "3650", "-subj", "/CN=SEV-VCEK",
       "-addext", "1.3.6.1.4.1.3704.1.1=ASN1:INTEGER:0", "-addext", "1.3.6.1.4.1.3704.1.2=ASN1:IA5STRING:Milan-B0",
       "-addext", "1.3.6.1.4.1.3704.1.3.1=ASN1:INTEGER:3", "-addext", "1.3.6.1.4.1.3704.1.3.2=ASN1:INTEGER:0",
       "-addext", "1.3.6.1.4.1.3704.1.3.3=ASN1:INTEGER:8", "-addext", "1.3.6.1.4.1.3704.1.3.8=ASN1:INTEGER:115",
       "-addext", "1.3.6.1.4.1.3704.1.4=" + hw});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Bytes fake = read_file(dir.file("fake.pem"));
  auto ext = snp::parse_endorsement_extensions(fake);
  ASSERT_TRUE(ext) << ext.error().message;
  EXPECT_EQ(ext->product_name, "Milan-B0");
  snp::VerifyInputs in = m.inputs(m.report);
  in.endorsement_cert = fake;
  in.at = std::time(nullptr);
  auto v = snp::verify_report(in);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.error().code, ErrorCode::kAuth);
  EXPECT_NE(v.error().message.find("SEV-VCEK"), std::string::npos) << v.error().message;
}

TEST(SnpVerify, PinnedRootsAreAmdsAndChainUp) {
  ASSERT_TRUE(snp::check_pinned_roots()) << snp::check_pinned_roots().error().message;
  // The pinned fingerprints are those recorded in ../shared/testdata/snp/PROVENANCE.md.
  const std::string provenance = to_string(read_file(shared_testdata("snp/PROVENANCE.md")));
  auto colon_hex = [](const std::string& hex) {
    std::string out;
    for (size_t i = 0; i < hex.size(); i += 2) {
      if (i) out += ':';
      for (char c : hex.substr(i, 2)) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    }
    return out;
  };
  const auto roots = snp::pinned_roots();
  ASSERT_EQ(roots.size(), 3u);
  for (const auto& r : roots) {
    SCOPED_TRACE(std::string(snp::product_name(r.product)));
    for (const auto* fp : {&r.ark_sha256, &r.ask_sha256, &r.asvk_sha256}) {
      EXPECT_NE(provenance.find(colon_hex(*fp)), std::string::npos) << *fp << " is not in PROVENANCE.md";
    }
  }
}

TEST(SnpVerify, CachedVerifierSkipsOnlyTheChain) {
  Milan m;
  snp::CachedVerifier cv;
  EXPECT_EQ(cv.cached_chains(), 0u);
  for (int i = 0; i < 3; ++i) {
    auto v = cv.verify(m.inputs(m.report));
    ASSERT_TRUE(v) << v.error().message;
    EXPECT_EQ(v->product, snp::Product::kMilan);
  }
  EXPECT_EQ(cv.cached_chains(), 1u);
  // A cached chain does not excuse the report: every report check still runs.
  Bytes bad = m.report;
  bad[0x2A0] ^= std::byte{1};
  auto sig = cv.verify(m.inputs(bad));
  ASSERT_FALSE(sig);
  EXPECT_NE(sig.error().message.find("signature does not verify"), std::string::npos);
  Bytes other_chip = m.report;
  other_chip[0x1A0] ^= std::byte{1};
  EXPECT_FALSE(cv.verify(m.inputs(other_chip)));
  // Nor the time: outside the chain's validity the full check runs again and says why.
  snp::VerifyInputs late = m.inputs(m.report);
  late.at = utc(2031, 1, 1);
  auto expired = cv.verify(late);
  ASSERT_FALSE(expired);
  EXPECT_NE(expired.error().message.find("expired"), std::string::npos) << expired.error().message;
  // A different chain argument is a different cache entry, and a wrong one still fails.
  snp::VerifyInputs wrong = m.inputs(m.report);
  wrong.chain_pem = to_string(read_file(shared_testdata("snp/amd/genoa_ask_ark_asvk.pem")));
  EXPECT_FALSE(cv.verify(wrong));
  EXPECT_EQ(cv.cached_chains(), 1u);
}

TEST(SnpVerify, ProductNames) {
  EXPECT_EQ(*snp::product_from_name("Milan-B0"), snp::Product::kMilan);
  EXPECT_EQ(*snp::product_from_name("Genoa"), snp::Product::kGenoa);
  EXPECT_EQ(*snp::product_from_name("Turin-C1"), snp::Product::kTurin);
  EXPECT_FALSE(snp::product_from_name("Rome-B0"));
  EXPECT_EQ(snp::tcb_layout(snp::Product::kTurin), snp::TcbLayout::kTurin);
  EXPECT_EQ(snp::tcb_layout(snp::Product::kGenoa), snp::TcbLayout::kMilanGenoa);
}

}  // namespace
}  // namespace tresor
