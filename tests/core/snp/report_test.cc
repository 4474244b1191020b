// SEV-SNP report ABI (SNP firmware ABI spec 56860, Table 23): the real AMD-signed Milan report
// from ../shared/testdata/snp parses to exactly the values in its expected.json (decoded
// independently of this code), serializes back byte for byte, and its signature converts to a
// DER signature that the VCEK's key verifies; every reserved field, reserved bit and version rule
// rejects a mutated report, naming the field.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <fstream>
#include <functional>

#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/snp/report.h"

namespace tresor {
namespace {

using testing::shared_testdata;

using testing::FailsWith;
using testing::read_file;


struct RealReport {
  Bytes bytes = read_file(shared_testdata("snp/milan-v2-virtee/report.bin"));
  nlohmann::json want = nlohmann::json::parse(std::ifstream(shared_testdata("snp/milan-v2-virtee/expected.json")));
};

uint64_t hex_u64(const std::string& s) { return std::stoull(s, nullptr, 16); }

TEST(SnpReport, RealMilanReportMatchesIndependentDecoding) {
  RealReport rr;
  ASSERT_EQ(rr.bytes.size(), rr.want["report_size"].get<size_t>());
  EXPECT_EQ(to_hex(*crypto::sha256(rr.bytes)), rr.want["report_sha256"].get<std::string>());
  auto r = snp::parse_report(rr.bytes);
  ASSERT_TRUE(r) << r.error().message;
  const auto& w = rr.want;
  EXPECT_EQ(r->version, w["version"].get<uint32_t>());
  EXPECT_EQ(r->guest_svn, w["guest_svn"].get<uint32_t>());
  EXPECT_EQ(r->policy, hex_u64(w["policy"]));
  auto pol = snp::decode_policy(r->policy);
  ASSERT_TRUE(pol);
  const auto& pd = w["policy_decoded"];
  EXPECT_EQ(pol->abi_minor, pd["abi_minor"].get<int>());
  EXPECT_EQ(pol->abi_major, pd["abi_major"].get<int>());
  EXPECT_EQ(pol->smt, pd["smt"].get<int>() != 0);
  EXPECT_EQ(pol->migrate_ma, pd["migrate_ma"].get<int>() != 0);
  EXPECT_EQ(pol->debug, pd["debug"].get<int>() != 0);
  EXPECT_EQ(pol->single_socket, pd["single_socket"].get<int>() != 0);
  EXPECT_EQ(pol->cxl_allow, pd["cxl_allow"].get<int>() != 0);
  EXPECT_EQ(pol->mem_aes_256_xts, pd["mem_aes_256_xts"].get<int>() != 0);
  EXPECT_EQ(pol->rapl_dis, pd["rapl_dis"].get<int>() != 0);
  EXPECT_EQ(pol->ciphertext_hiding, pd["ciphertext_hiding"].get<int>() != 0);
  EXPECT_EQ(pol->page_swap_disable, pd["page_swap_disable"].get<int>() != 0);
  EXPECT_EQ(to_hex(r->family_id), w["family_id"].get<std::string>());
  EXPECT_EQ(to_hex(r->image_id), w["image_id"].get<std::string>());
  EXPECT_EQ(r->vmpl, w["vmpl"].get<uint32_t>());
  EXPECT_EQ(r->signature_algo, w["signature_algo"].get<uint32_t>());
  EXPECT_EQ(r->platform_info, hex_u64(w["platform_info"]));
  EXPECT_EQ(r->author_key_en, w["key_info"]["author_key_en"].get<int>() != 0);
  EXPECT_EQ(r->mask_chip_key, w["key_info"]["mask_chip_key"].get<int>() != 0);
  EXPECT_EQ(static_cast<int>(r->signing_key), w["key_info"]["signing_key"].get<int>());
  EXPECT_EQ(to_hex(r->report_data), w["report_data"].get<std::string>());
  EXPECT_EQ(to_hex(r->measurement), w["measurement"].get<std::string>());
  EXPECT_EQ(to_hex(r->host_data), w["host_data"].get<std::string>());
  EXPECT_EQ(to_hex(r->id_key_digest), w["id_key_digest"].get<std::string>());
  EXPECT_EQ(to_hex(r->author_key_digest), w["author_key_digest"].get<std::string>());
  EXPECT_EQ(to_hex(r->report_id), w["report_id"].get<std::string>());
  EXPECT_EQ(to_hex(r->report_id_ma), w["report_id_ma"].get<std::string>());
  EXPECT_EQ(to_hex(r->chip_id), w["chip_id"].get<std::string>());
  const std::pair<uint64_t, const char*> tcbs[] = {{r->current_tcb, "current_tcb"},
                                                   {r->reported_tcb, "reported_tcb"},
                                                   {r->committed_tcb, "committed_tcb"},
                                                   {r->launch_tcb, "launch_tcb"}};
  for (const auto& [raw, name] : tcbs) {
    SCOPED_TRACE(name);
    EXPECT_EQ(raw, hex_u64(w[name]["raw"]));
    auto t = snp::decode_tcb(raw, snp::TcbLayout::kMilanGenoa, name);
    ASSERT_TRUE(t) << t.error().message;
    EXPECT_EQ(t->bootloader, w[name]["bootloader"].get<int>());
    EXPECT_EQ(t->tee, w[name]["tee"].get<int>());
    EXPECT_EQ(t->snp, w[name]["snp"].get<int>());
    EXPECT_EQ(t->microcode, w[name]["microcode"].get<int>());
  }
  auto version = [](int a, int b, int c) { return std::to_string(a) + "." + std::to_string(b) + "." + std::to_string(c); };
  EXPECT_EQ(version(r->current_major, r->current_minor, r->current_build), w["current_version"].get<std::string>());
  EXPECT_EQ(version(r->committed_major, r->committed_minor, r->committed_build), w["committed_version"].get<std::string>());
  // Signature components: 72-byte little-endian in the report, big-endian in expected.json.
  Bytes r_be(r->signature_r.rbegin() + 24, r->signature_r.rend());
  Bytes s_be(r->signature_s.rbegin() + 24, r->signature_s.rend());
  EXPECT_EQ("0x" + to_hex(r_be), w["signature_r_be"].get<std::string>());
  EXPECT_EQ("0x" + to_hex(s_be), w["signature_s_be"].get<std::string>());
  // A version 2 report has no CPUID fields: the product must come from elsewhere.
  EXPECT_TRUE(FailsWith(snp::layout_from_cpuid(*r), ErrorCode::kUnavailable));
}

TEST(SnpReport, SerializesBackByteForByte) {
  RealReport rr;
  auto r = snp::parse_report(rr.bytes);
  ASSERT_TRUE(r);
  const auto out = snp::serialize_report(*r);
  EXPECT_EQ(to_hex(out), to_hex(rr.bytes));
}

TEST(SnpReport, SignatureVerifiesWithTheVcekKey) {
  RealReport rr;
  auto r = snp::parse_report(rr.bytes);
  ASSERT_TRUE(r);
  auto der = snp::signature_der(*r);
  ASSERT_TRUE(der) << der.error().message;
  const Bytes vcek = read_file(shared_testdata("snp/milan-v2-virtee/vcek.der"));
  const unsigned char* p = reinterpret_cast<const unsigned char*>(vcek.data());
  X509* cert = d2i_X509(nullptr, &p, static_cast<long>(vcek.size()));
  ASSERT_NE(cert, nullptr);
  EVP_PKEY* key = X509_get0_pubkey(cert);
  auto verify = [&](ByteSpan msg, ByteSpan sig) {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    const bool ok = EVP_DigestVerifyInit(ctx, nullptr, EVP_sha384(), nullptr, key) == 1 &&
                    EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                                     reinterpret_cast<const unsigned char*>(msg.data()), msg.size()) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
  };
  EXPECT_TRUE(verify(ByteSpan(rr.bytes).first(snp::kSignedSize), *der));
  Bytes flipped = rr.bytes;
  flipped[0x90] ^= std::byte{1};  // one bit of MEASUREMENT
  EXPECT_FALSE(verify(ByteSpan(flipped).first(snp::kSignedSize), *der));
  X509_free(cert);
}

struct Mutation {
  std::string name;
  std::function<void(Bytes&)> mutate;
  ErrorCode want;
  std::string want_text;
};

void set32(Bytes& b, size_t off, uint32_t v) { store_le32(b.data() + off, v); }

TEST(SnpReport, MutationsAreRejectedNamingTheField) {
  RealReport rr;
  const std::vector<Mutation> cases = {
      {"version 1", [](Bytes& b) { set32(b, 0, 1); }, ErrorCode::kUnsupportedVersion, "VERSION"},
      {"version 4", [](Bytes& b) { set32(b, 0, 4); }, ErrorCode::kUnsupportedVersion, "reads 2, 3 and 5"},
      {"version 6", [](Bytes& b) { set32(b, 0, 6); }, ErrorCode::kUnsupportedVersion, "VERSION"},
      {"policy bit 17 cleared", [](Bytes& b) { b[0x0A] &= std::byte{0xFD}; }, ErrorCode::kMalformed, "bit 17 must be one"},
      {"policy reserved bit 40", [](Bytes& b) { b[0x0D] |= std::byte{1}; }, ErrorCode::kMalformed, "63:26"},
      {"signature algo 2", [](Bytes& b) { set32(b, 0x34, 2); }, ErrorCode::kMalformed, "SIGNATURE_ALGO"},
      {"platform info bit 9", [](Bytes& b) { b[0x41] |= std::byte{2}; }, ErrorCode::kMalformed, "PLATFORM_INFO"},
      {"signing key 3", [](Bytes& b) { b[0x48] = std::byte{3 << 2}; }, ErrorCode::kMalformed, "SIGNING_KEY"},
      {"key info reserved bit 5", [](Bytes& b) { b[0x48] = std::byte{0x20}; }, ErrorCode::kMalformed, "31:5"},
      {"reserved 0x04C", [](Bytes& b) { b[0x4D] = std::byte{1}; }, ErrorCode::kMalformed, "0x04D"},
      {"CPUID in a version 2 report", [](Bytes& b) { b[0x188] = std::byte{0x19}; }, ErrorCode::kMalformed, "CPUID"},
      {"reserved 0x190", [](Bytes& b) { b[0x190] = std::byte{1}; }, ErrorCode::kMalformed, "0x190"},
      {"reserved 0x1EB", [](Bytes& b) { b[0x1EB] = std::byte{1}; }, ErrorCode::kMalformed, "0x1EB"},
      {"reserved 0x1EF", [](Bytes& b) { b[0x1EF] = std::byte{1}; }, ErrorCode::kMalformed, "0x1EF"},
      {"mitigation vector in a version 2 report", [](Bytes& b) { b[0x1F8] = std::byte{1}; }, ErrorCode::kMalformed,
       "mitigation"},
      {"reserved 0x29F", [](Bytes& b) { b[0x29F] = std::byte{1}; }, ErrorCode::kMalformed, "0x29F"},
      {"signature reserved 0x400", [](Bytes& b) { b[0x400] = std::byte{1}; }, ErrorCode::kMalformed, "SIGNATURE reserved"},
      {"one byte short", [](Bytes& b) { b.pop_back(); }, ErrorCode::kMalformed, "1183 bytes"},
      {"one byte long", [](Bytes& b) { b.push_back(std::byte{0}); }, ErrorCode::kMalformed, "1185 bytes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Bytes b = rr.bytes;
    c.mutate(b);
    auto r = snp::parse_report(b);
    ASSERT_FALSE(r) << "accepted: " << c.name;
    EXPECT_EQ(r.error().code, c.want) << r.error().message;
    EXPECT_NE(r.error().message.find(c.want_text), std::string::npos) << r.error().message;
  }
  EXPECT_TRUE(snp::parse_report(rr.bytes));  // the twin
}

snp::Report full_report(uint32_t version) {
  snp::Report r;
  r.version = version;
  r.guest_svn = 7;
  r.policy = snp::encode_policy({.abi_minor = 55, .abi_major = 1, .smt = true, .single_socket = true});
  for (size_t i = 0; i < r.family_id.size(); ++i) r.family_id[i] = std::byte(static_cast<uint8_t>(i + 1));
  r.vmpl = 1;
  r.signature_algo = snp::kSigAlgoEcdsaP384Sha384;
  r.current_tcb = 0x1a0000000b0c0d0eull;
  r.platform_info = 0x25;
  r.author_key_en = true;
  r.signing_key = snp::SigningKey::kVlek;
  r.report_data[63] = std::byte{0x99};
  r.measurement[0] = std::byte{0x42};
  r.host_data[31] = std::byte{0x17};
  r.reported_tcb = 0x1a0000000b0c0d0eull;
  if (version >= 3) {
    r.cpuid_fam_id = 0x1A;
    r.cpuid_mod_id = 0x02;
    r.cpuid_step = 0x01;
  }
  r.chip_id[0] = std::byte{0xAB};
  r.current_major = 1;
  r.current_minor = 57;
  r.current_build = 3;
  r.committed_major = 1;
  r.committed_minor = 55;
  r.committed_build = 9;
  r.launch_tcb = 0x1a0000000b0c0d0eull;
  if (version >= 5) {
    r.launch_mit_vector = 0x3;
    r.current_mit_vector = 0x7;
  }
  r.signature_r[0] = std::byte{1};
  r.signature_s[47] = std::byte{2};
  return r;
}

TEST(SnpReport, VersionsThreeAndFiveRoundTripTheirOwnFields) {
  for (uint32_t v : {2u, 3u, 5u}) {
    SCOPED_TRACE(v);
    const snp::Report r = full_report(v);
    const auto bytes = snp::serialize_report(r);
    auto back = snp::parse_report(bytes);
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(*back, r);
    EXPECT_EQ(snp::serialize_report(*back), bytes);
  }
  auto v5 = snp::parse_report(snp::serialize_report(full_report(5)));
  ASSERT_TRUE(v5);
  EXPECT_EQ(v5->current_mit_vector, 7u);
  EXPECT_EQ(*snp::layout_from_cpuid(*v5), snp::TcbLayout::kTurin);
  // A version 3 report with mitigation vectors set is malformed (they are reserved there).
  auto v3_bytes = snp::serialize_report(full_report(3));
  v3_bytes[0x200] = std::byte{1};
  EXPECT_TRUE(FailsWith(snp::parse_report(v3_bytes), ErrorCode::kMalformed));
}

TEST(SnpReport, TcbLayouts) {
  // Milan/Genoa: BOOT_LOADER [7:0], TEE [15:8], SNP [55:48], MICROCODE [63:56].
  auto milan = snp::decode_tcb(0x7308000000000003ull, snp::TcbLayout::kMilanGenoa, "TCB");
  ASSERT_TRUE(milan);
  EXPECT_EQ(*milan, (snp::Tcb{.fmc = 0, .bootloader = 3, .tee = 0, .snp = 8, .microcode = 115}));
  EXPECT_EQ(snp::encode_tcb(*milan, snp::TcbLayout::kMilanGenoa), 0x7308000000000003ull);
  // Turin: FMC [7:0], BOOT_LOADER [15:8], TEE [23:16], SNP [31:24], MICROCODE [63:56].
  auto turin = snp::decode_tcb(0x4800000004030201ull, snp::TcbLayout::kTurin, "TCB");
  ASSERT_TRUE(turin);
  EXPECT_EQ(*turin, (snp::Tcb{.fmc = 1, .bootloader = 2, .tee = 3, .snp = 4, .microcode = 0x48}));
  EXPECT_EQ(snp::encode_tcb(*turin, snp::TcbLayout::kTurin), 0x4800000004030201ull);
  EXPECT_EQ(snp::tcb_string(*turin, snp::TcbLayout::kTurin), "fmc=1 bl=2 tee=3 snp=4 ucode=72");
  // Reserved bits of each layout.
  EXPECT_TRUE(FailsWith(snp::decode_tcb(0x0000000100000000ull, snp::TcbLayout::kMilanGenoa, "TCB"), ErrorCode::kMalformed));
  EXPECT_TRUE(FailsWith(snp::decode_tcb(0x0001000000000000ull, snp::TcbLayout::kTurin, "TCB"), ErrorCode::kMalformed));
  // The Milan value read with the Turin layout has reserved bits set: a layout mix-up shows.
  EXPECT_TRUE(FailsWith(snp::decode_tcb(0x7308000000000003ull, snp::TcbLayout::kTurin, "TCB"), ErrorCode::kMalformed));
}

TEST(SnpReport, PolicyRoundTripAndRules) {
  const snp::GuestPolicy p{.abi_minor = 1, .abi_major = 2, .smt = true, .migrate_ma = true, .debug = true,
                           .single_socket = true, .cxl_allow = true, .mem_aes_256_xts = true, .rapl_dis = true,
                           .ciphertext_hiding = true, .page_swap_disable = true};
  const uint64_t raw = snp::encode_policy(p);
  EXPECT_EQ(raw, 0x3FF0201ull);
  auto back = snp::decode_policy(raw);
  ASSERT_TRUE(back);
  EXPECT_TRUE(back->debug && back->page_swap_disable && back->abi_major == 2);
  EXPECT_TRUE(FailsWith(snp::decode_policy(0x10000), ErrorCode::kMalformed));   // bit 17 clear
  EXPECT_TRUE(FailsWith(snp::decode_policy(0x4020000), ErrorCode::kMalformed));  // bit 26 set
}

TEST(SnpReport, SignatureWiderThanP384IsRejected) {
  snp::Report r = full_report(5);
  r.signature_r[50] = std::byte{1};
  EXPECT_TRUE(FailsWith(snp::signature_der(r), ErrorCode::kMalformed));
}

}  // namespace
}  // namespace tresor
