// Attestation policy: the real Milan report passes a policy written for it; a policy that every
// rule of which fails reports all of them at once, each naming the field and both values; a
// missing or malformed policy denies, naming what is wrong.
#include <gtest/gtest.h>

#include <ctime>
#include <functional>

#include "support/test_support.h"
#include "tresor/snp/validate.h"

namespace tresor {
namespace {

using testing::shared_testdata;

using testing::FailsWith;
using testing::read_file;
using testing::verified_milan;


const char* kMeasurement = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f";


std::string good_policy() {
  return std::string(R"({"measurements": [")") + kMeasurement + R"("],
    "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
    "min_firmware": {"major": 1, "minor": 51},
    "allow_smt": true,
    "vmpls": [0],
    "host_data": "0000000000000000000000000000000000000000000000000000000000000000"})";
}

TEST(SnpValidate, RealReportPassesItsPolicy) {
  const auto v = verified_milan();
  auto p = snp::parse_policy(good_policy());
  ASSERT_TRUE(p) << p.error().message;
  auto ok = snp::validate(v, &*p);
  EXPECT_TRUE(ok) << ok.error().message;
}

TEST(SnpValidate, EveryFailedCheckIsReportedAtOnce) {
  const auto v = verified_milan();
  auto p = snp::parse_policy(R"({
    "measurements": ["000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000001"],
    "min_tcb": {"bootloader": 4, "tee": 1, "snp": 9, "microcode": 116},
    "min_firmware": {"major": 1, "minor": 55},
    "min_guest_abi": {"major": 1, "minor": 0},
    "allow_smt": false,
    "vmpls": [1, 2],
    "signing_keys": ["vlek"],
    "products": ["Genoa", "Turin"],
    "family_ids": ["11111111111111111111111111111111"],
    "image_ids": ["22222222222222222222222222222222"],
    "host_data": "3333333333333333333333333333333333333333333333333333333333333333",
    "report_data": "44444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444444"
  })");
  ASSERT_TRUE(p) << p.error().message;
  auto r = snp::validate(v, &*p);
  ASSERT_TRUE(FailsWith(r, ErrorCode::kPolicy));
  const std::string& m = r.error().message;
  for (const char* want : {"MEASUREMENT is 7a1e5c26", "REPORTED_TCB.bootloader is 3, want at least 4", "REPORTED_TCB.tee is 0, want at least 1",
                           "REPORTED_TCB.snp is 8, want at least 9", "REPORTED_TCB.microcode is 115, want at least 116",
                           "GUEST_POLICY.SMT is 1", "GUEST_POLICY ABI is 0.0, want at least 1.0",
                           "firmware version (CURRENT_MAJOR.CURRENT_MINOR) is 1.52, want at least 1.55", "VMPL is 0",
                           "a VCEK, which the policy does not allow", "product is Milan", "FAMILY_ID is 0000",
                           "IMAGE_ID is 0000", "HOST_DATA is 0000", "want 3333", "REPORT_DATA is d447b55d", "want 4444"}) {
    EXPECT_NE(m.find(want), std::string::npos) << "missing '" << want << "' in:\n" << m;
  }
  EXPECT_NE(m.find("(15 checks failed)"), std::string::npos) << m;
}

TEST(SnpValidate, DebugIsNeverAllowed) {
  auto v = verified_milan();
  v.report.policy |= 1ull << 19;  // GUEST_POLICY.DEBUG
  auto p = snp::parse_policy(good_policy());
  ASSERT_TRUE(p);
  auto r = snp::validate(v, &*p);
  ASSERT_TRUE(FailsWith(r, ErrorCode::kPolicy));
  EXPECT_NE(r.error().message.find("DEBUG is 1"), std::string::npos) << r.error().message;
  EXPECT_TRUE(FailsWith(snp::parse_policy(R"({"measurements":[], "allow_debug": true})"), ErrorCode::kInvalidArgument));
}

TEST(SnpValidate, CallerBindingOverridesThePolicy) {
  const auto v = verified_milan();
  auto p = snp::parse_policy(good_policy());
  ASSERT_TRUE(p);
  snp::Expectations e;
  e.host_data = std::array<std::byte, 32>{};
  e.host_data->at(0) = std::byte{0x5a};
  auto r = snp::validate(v, &*p, e);
  ASSERT_TRUE(FailsWith(r, ErrorCode::kPolicy));
  EXPECT_NE(r.error().message.find("want 5a00"), std::string::npos) << r.error().message;
  snp::Expectations rd;
  rd.report_data = v.report.report_data;
  EXPECT_TRUE(snp::validate(v, &*p, rd));
}

TEST(SnpValidate, MissingPolicyDenies) {
  const auto v = verified_milan();
  EXPECT_TRUE(FailsWith(snp::validate(v, nullptr), ErrorCode::kPolicy));
}

TEST(SnpValidate, MalformedPoliciesAreRejectedNamingTheKey) {
  const std::string m = std::string("\"") + kMeasurement + "\"";
  const std::string tcb = R"("min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"not json", "not valid JSON"},
      {std::string("{}\0{}", 5), "policy is not valid JSON: a NUL byte at offset 2"},  // a parser would stop there
      {"[1,2]", "JSON object"},
      {"{" + tcb + "}", "\"measurements\": is required"},
      {R"({"measurements": [], )" + tcb + "}", "at least one"},
      {R"({"measurements": ["abcd"], )" + tcb + "}", "measurements[0]\": is 4 hex digits"},
      {R"({"measurements": [)" + m + "]}", "\"min_tcb\": is required"},
      {R"({"measurements": [)" + m + R"(], "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8}})", "min_tcb.microcode\": is required"},
      {R"({"measurements": [)" + m + R"(], "min_tcb": {"bootloader": 3, "tee": 0, "snp": 800, "microcode": 1}})", "min_tcb.snp\": must be an integer"},
      {R"({"measurements": [)" + m + R"(], "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 1, "sp": 1}})", "min_tcb.sp\": is not a known"},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "vmpls": [5]})", "\"vmpls\""},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "signing_keys": ["ask"]})", "\"signing_keys\""},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "products": ["Rome"]})", "\"products\""},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "allow_smt": "yes"})", "\"allow_smt\": must be true or false"},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "host_data": "zz"})", "\"host_data\""},
      {R"({"measurements": [)" + m + "], " + tcb + R"(, "allow_smtt": true})", "\"allow_smtt\": is not a known policy key"},
  };
  for (const auto& [text, want] : cases) {
    SCOPED_TRACE(text);
    auto p = snp::parse_policy(text);
    ASSERT_TRUE(FailsWith(p, ErrorCode::kInvalidArgument));
    EXPECT_NE(p.error().message.find(want), std::string::npos) << p.error().message;
  }
  EXPECT_TRUE(snp::parse_policy(good_policy()));  // the twin
}

}  // namespace
}  // namespace tresor
