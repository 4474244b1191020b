// tresor report show | verify on the real AMD-signed Milan report: exit codes 0 / 5 / 6 / 7 and
// messages that name the failed check.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "support/test_support.h"

namespace tresor {
namespace {

using testing::read_file;
using testing::run_tresor;
using testing::TempDir;
using testing::write_file;

std::string shared(const std::string& rel) { return std::string(TRESOR_SHARED_TESTDATA_DIR) + "/" + rel; }

struct ReportCli : ::testing::Test {
  TempDir dir;
  std::string report = shared("snp/milan-v2-virtee/report.bin");
  std::string vcek = shared("snp/milan-v2-virtee/vcek.der");
  std::string chain = shared("snp/milan-v2-virtee/cert_chain.pem");
  std::vector<std::string> verify(const std::string& r, std::vector<std::string> extra = {}) {
    std::vector<std::string> a{"report", "verify", r, "--vcek", vcek, "--chain", chain, "--at", "2025-06-01T00:00:00Z"};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
  std::string policy(const std::string& body) {
    const std::string p = dir.file("policy.json");
    write_file(p, as_bytes(body), 0644);
    return p;
  }
};

const char* kGood = R"({"measurements": ["7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"],
  "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}, "allow_smt": true})";

TEST_F(ReportCli, ShowPrintsEveryFieldAsJson) {
  auto r = run_tresor({"report", "show", report, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["version"], 2);
  EXPECT_EQ(j["measurement"], "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f");
  EXPECT_EQ(j["reported_tcb"]["microcode"], 115);
  EXPECT_EQ(j["current_version"], "1.52.4");
  EXPECT_EQ(j["signing_key"], "vcek");
  auto text = run_tresor({"report", "show", report});
  EXPECT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find("measurement: 7a1e5c26"), std::string::npos) << text.out;
}

TEST_F(ReportCli, VerifyAcceptsTheRealReportAndItsPolicy) {
  auto r = run_tresor(verify(report));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("chain verified"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("not judged"), std::string::npos) << r.err;
  auto p = run_tresor(verify(report, {"--policy", policy(kGood)}));
  EXPECT_EQ(p.exit_code, 0) << p.err;
  EXPECT_NE(p.err.find("accepted by policy"), std::string::npos) << p.err;
}

TEST_F(ReportCli, VerifyFailuresHaveDistinctExitCodes) {
  Bytes sig_flipped = read_file(report);
  sig_flipped[0x2A1] ^= std::byte{1};
  write_file(dir.file("sig.bin"), sig_flipped, 0644);
  Bytes reserved = read_file(report);
  reserved[0x4C] = std::byte{1};
  write_file(dir.file("reserved.bin"), reserved, 0644);

  auto sig = run_tresor(verify(dir.file("sig.bin")));
  EXPECT_EQ(sig.exit_code, 5) << sig.err;
  EXPECT_NE(sig.err.find("signature does not verify"), std::string::npos) << sig.err;

  auto parse = run_tresor(verify(dir.file("reserved.bin")));
  EXPECT_EQ(parse.exit_code, 6) << parse.err;
  EXPECT_NE(parse.err.find("0x04C"), std::string::npos) << parse.err;

  auto late = run_tresor({"report", "verify", report, "--vcek", vcek, "--at", "2031-01-01T00:00:00Z"});
  EXPECT_EQ(late.exit_code, 5) << late.err;
  EXPECT_NE(late.err.find("expired"), std::string::npos) << late.err;

  const std::string strict = std::string(kGood).replace(std::string(kGood).find("\"allow_smt\": true"), 17, "\"allow_smt\": false");
  auto denied = run_tresor(verify(report, {"--policy", policy(strict)}));
  EXPECT_EQ(denied.exit_code, 7) << denied.err;
  EXPECT_NE(denied.err.find("GUEST_POLICY.SMT is 1"), std::string::npos) << denied.err;

  auto malformed = run_tresor(verify(report, {"--policy", policy("{\"measurements\": []}")}));
  EXPECT_EQ(malformed.exit_code, 7) << malformed.err;
  EXPECT_NE(malformed.err.find("malformed policy denies"), std::string::npos) << malformed.err;

  auto bad_time = run_tresor(verify(report, {"--at", "yesterday"}));
  EXPECT_EQ(bad_time.exit_code, 2) << bad_time.err;
  auto no_vcek = run_tresor({"report", "verify", report});
  EXPECT_EQ(no_vcek.exit_code, 2) << no_vcek.err;
  EXPECT_EQ(run_tresor({"report", "frob"}).exit_code, 2);
}

TEST_F(ReportCli, SimReportsVerifyOnlyWithTrustSimAndSayWhatTheyAre) {
  const std::string root = dir.file("sim-root");
  auto init = run_tresor({"sim", "init", root, "--rsa-bits", "2048"});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  EXPECT_EQ(run_tresor({"sim", "init", root, "--rsa-bits", "2048"}).exit_code, 3);  // never replaced
  const std::string r = dir.file("sim.bin");
  auto made = run_tresor({"sim", "report", "--dir", root, "-o", r, "--measurement", "abcd", "--host-data", "01"});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  auto show = run_tresor({"report", "show", r, "--json"});
  ASSERT_EQ(show.exit_code, 0);
  const auto j = nlohmann::json::parse(show.out);
  EXPECT_EQ(j["version"], 5);
  EXPECT_EQ(j["measurement"].get<std::string>().substr(0, 6), "abcd00");
  EXPECT_EQ(j["host_data"].get<std::string>().substr(0, 4), "0100");

  auto untrusted = run_tresor({"report", "verify", r, "--vcek", root + "/vcek.pem"});
  EXPECT_EQ(untrusted.exit_code, 5) << untrusted.err;
  EXPECT_NE(untrusted.err.find("sim secure processor"), std::string::npos) << untrusted.err;
  auto trusted = run_tresor({"report", "verify", r, "--vcek", root + "/vcek.pem", "--trust-sim", root});
  EXPECT_EQ(trusted.exit_code, 0) << trusted.err;
  EXPECT_NE(trusted.err.find("WARNING"), std::string::npos) << trusted.err;
  EXPECT_NE(trusted.err.find("TEST Sim chain verified"), std::string::npos) << trusted.err;
  EXPECT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("v4.bin"), "--version", "4"}).exit_code, 2);
  EXPECT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("m.bin"), "--measurement", "zz"}).exit_code, 2);
  EXPECT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("p1.bin"), "--guest-policy", "30000"}).exit_code, 0);
  EXPECT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("p2.bin"), "--guest-policy", "0x30000junk"}).exit_code, 2);
  // A report claiming a TCB other than its VCEK's is refused by the verifier (cert TCB ≠ REPORTED_TCB).
  ASSERT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("tcb.bin"), "--tcb", "3,0,9,115"}).exit_code, 0);
  auto tcb = run_tresor({"report", "verify", dir.file("tcb.bin"), "--vcek", root + "/vcek.pem", "--trust-sim", root});
  EXPECT_EQ(tcb.exit_code, 5) << tcb.err;
  EXPECT_NE(tcb.err.find("REPORTED_TCB"), std::string::npos) << tcb.err;
  EXPECT_EQ(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("t2.bin"), "--tcb", "3,0,9"}).exit_code, 2);
  // GUEST_POLICY without the must-be-one bit 17 is refused by the sim as by the parser.
  EXPECT_NE(run_tresor({"sim", "report", "--dir", root, "-o", dir.file("p3.bin"), "--guest-policy", "0x10000"}).exit_code, 0);
}

TEST_F(ReportCli, OfflineCertificateDirectory) {
  const std::string cache = dir.file("vceks");
  const std::vector<std::string> with_dir{"report", "verify", report, "--cert-dir", cache, "--at", "2025-06-01T00:00:00Z"};
  auto miss = run_tresor(with_dir);
  EXPECT_EQ(miss.exit_code, 3) << miss.err;
  EXPECT_NE(miss.err.find("no VCEK for this report"), std::string::npos) << miss.err;
  auto put = run_tresor({"report", "cache", "--cert-dir", cache, "--vcek", vcek});
  ASSERT_EQ(put.exit_code, 0) << put.err;
  EXPECT_NE(put.err.find("Milan/"), std::string::npos) << put.err;
  auto hit = run_tresor(with_dir);
  EXPECT_EQ(hit.exit_code, 0) << hit.err;
  EXPECT_EQ(run_tresor({"report", "cache", "--cert-dir", cache, "--vcek", vcek}).exit_code, 3);  // never replaced
  EXPECT_EQ(run_tresor({"report", "verify", report}).exit_code, 2);  // neither --vcek nor --cert-dir
  EXPECT_EQ(run_tresor({"report", "verify", report, "--vcek", vcek, "--cert-dir", cache}).exit_code, 2);
}

TEST_F(ReportCli, AbsentPolicyFileDenies) {
  auto r = run_tresor(verify(report, {"--policy", dir.file("no-such-policy.json")}));
  EXPECT_EQ(r.exit_code, 7) << r.err;
  EXPECT_NE(r.err.find("absent policy denies"), std::string::npos) << r.err;
}

TEST_F(ReportCli, MeasurePrintsTheLaunchDigestOnTheLastLine) {
  const std::string fw = shared("snp/measure/ovmf_AmdSev_suffix.bin");
  const std::string empty = dir.file("empty");
  write_file(empty, {}, 0644);
  auto r = run_tresor({"measure", "--ovmf", fw, "--kernel", empty, "--initrd", empty, "--append", "console=ttyS0 loglevel=7",
                       "--vcpus", "1", "--vcpu-type", "EPYC-v4", "--guest-features", "0x21"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977\n");
  auto no_hashes = run_tresor({"measure", "--ovmf", shared("snp/measure/ovmf_OvmfX64_suffix.bin"), "--kernel", empty});
  EXPECT_EQ(no_hashes.exit_code, 2) << no_hashes.err;
  EXPECT_NE(no_hashes.err.find("SNP_KERNEL_HASHES"), std::string::npos) << no_hashes.err;
  EXPECT_EQ(run_tresor({"measure", "--ovmf", fw, "--vcpu-type", "Pentium"}).exit_code, 2);
  EXPECT_EQ(run_tresor({"measure", "--ovmf", fw, "--guest-features", "0xZZ"}).exit_code, 2);
  EXPECT_EQ(run_tresor({"measure", "--ovmf", fw, "--append", "x"}).exit_code, 2);
}

TEST_F(ReportCli, BenchVerifyPrintsRatiosAgainstOpenssl) {
  auto r = run_tresor({"bench", "verify", "--report", report, "--vcek", vcek, "--at", "1748736000", "--seconds", "0.2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("RESULT verify openssl_ecdsa_p384_per_s="), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("cached_ratio="), std::string::npos);
  EXPECT_NE(r.out.find("full_ratio="), std::string::npos);
  // A report that does not verify is refused before anything is timed.
  auto late = run_tresor({"bench", "verify", "--report", report, "--vcek", vcek, "--at", "1956528000", "--seconds", "0.2"});
  EXPECT_EQ(late.exit_code, 5) << late.err;
  EXPECT_EQ(run_tresor({"bench", "verify", "--report", report, "--vcek", vcek, "--at", "soon"}).exit_code, 2);
}

}  // namespace
}  // namespace tresor
