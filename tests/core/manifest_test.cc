// The job manifest: signed by the user's identity, canonical bytes, strict parsing, and the
// HOST_DATA digest that binds a VM to exactly one job.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <functional>

#include "support/test_support.h"
#include "tresor/manifest.h"

namespace tresor {
namespace {

using testing::FailsWith;

struct Fixture {
  Identity alice = *Identity::generate();
  Identity bob = *Identity::generate();
  Manifest m;
  Fixture() {
    m.job_id = "4242";
    m.user = alice.recipient();
    m.datasets = {"dhz/ccta-2024"};
    m.image_measurement[0] = std::byte{0xAB};
    m.script_sha256[31] = std::byte{0xCD};
    m.output_recipients = {alice.recipient(), bob.recipient()};
    m.expires_at = 2000000000;
    EXPECT_TRUE(sign_manifest(m, alice));
  }
};

TEST(Manifest, SignedManifestVerifiesAndRoundTrips) {
  Fixture f;
  EXPECT_TRUE(verify_manifest(f.m, 1900000000));
  auto text = manifest_json(f.m, true);
  ASSERT_TRUE(text);
  auto back = parse_manifest(*text);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(*back, f.m);
  EXPECT_EQ(*manifest_json(*back, true), *text);  // canonical: same bytes again
  EXPECT_EQ(text->find(' '), std::string::npos);
  EXPECT_LT(text->find("\"datasets\""), text->find("\"expires_at\""));  // members sorted
}

TEST(Manifest, EveryChangeBreaksTheSignatureAndTheDigest) {
  Fixture f;
  const auto digest = *manifest_digest(f.m);
  const std::vector<std::pair<std::string, std::function<void(Manifest&)>>> changes = {
      {"job id", [](Manifest& m) { m.job_id = "4243"; }},
      {"dataset", [](Manifest& m) { m.datasets.push_back("dhz/other"); }},
      {"measurement", [](Manifest& m) { m.image_measurement[1] = std::byte{1}; }},
      {"script", [](Manifest& m) { m.script_sha256[0] = std::byte{1}; }},
      {"recipients", [](Manifest& m) { m.output_recipients.pop_back(); }},
      {"expiry", [](Manifest& m) { m.expires_at += 1; }},
  };
  for (const auto& [name, change] : changes) {
    SCOPED_TRACE(name);
    Manifest m = f.m;
    change(m);
    auto v = verify_manifest(m, 1900000000);
    ASSERT_TRUE(FailsWith(v, ErrorCode::kAuth));
    EXPECT_NE(v.error().message.find("not signed"), std::string::npos);
    EXPECT_NE(*manifest_digest(m), digest);
  }
}

TEST(Manifest, ForgedExpiredAndWrongSigner) {
  Fixture f;
  auto expired = verify_manifest(f.m, 2000000000);
  ASSERT_TRUE(FailsWith(expired, ErrorCode::kAuth));
  EXPECT_NE(expired.error().message.find("expired"), std::string::npos);
  // Bob cannot sign as Alice, and a manifest naming Bob but signed by Alice fails.
  Manifest as_bob = f.m;
  EXPECT_TRUE(FailsWith(sign_manifest(as_bob, f.bob), ErrorCode::kInvalidArgument));
  as_bob.user = f.bob.recipient();
  EXPECT_TRUE(FailsWith(verify_manifest(as_bob, 1900000000), ErrorCode::kAuth));
  Manifest flipped = f.m;
  flipped.signature[10] ^= std::byte{1};
  EXPECT_TRUE(FailsWith(verify_manifest(flipped, 1900000000), ErrorCode::kAuth));
}

TEST(Manifest, ParsingIsStrict) {
  Fixture f;
  const auto good = nlohmann::json::parse(*manifest_json(f.m, true));
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> cases = {
      {[](nlohmann::json& j) { j["extra"] = 1; }, "\"extra\": is not a manifest member"},
      {[](nlohmann::json& j) { j["version"] = "v2"; }, "\"version\""},
      {[](nlohmann::json& j) { j["version"] = 1; }, "\"version\""},  // a wrong type is an error, not an exception
      {[](nlohmann::json& j) { j["job_id"] = "a b"; }, "\"job_id\""},
      {[](nlohmann::json& j) { j["user"] = "tresor1xyz"; }, "\"user\""},
      {[](nlohmann::json& j) { j["datasets"] = nlohmann::json::array(); }, "\"datasets\""},
      {[](nlohmann::json& j) { j["datasets"] = {"../etc"}; }, "dataset id"},
      {[](nlohmann::json& j) { j["image_measurement"] = "abcd"; }, "\"image_measurement\": is 4 hex digits"},
      {[](nlohmann::json& j) { j.erase("script_sha256"); }, "\"script_sha256\": is required"},
      {[](nlohmann::json& j) { j["expires_at"] = "soon"; }, "\"expires_at\""},
      {[](nlohmann::json& j) { j["signature"] = "AAAA"; }, "\"signature\": is 3 bytes"},
  };
  for (const auto& [mutate, want] : cases) {
    SCOPED_TRACE(want);
    nlohmann::json j = good;
    mutate(j);
    auto m = parse_manifest(j.dump());
    ASSERT_TRUE(FailsWith(m, ErrorCode::kInvalidArgument));
    EXPECT_NE(m.error().message.find(want), std::string::npos) << m.error().message;
  }
  EXPECT_TRUE(parse_manifest(good.dump()));
  EXPECT_TRUE(FailsWith(parse_manifest("{"), ErrorCode::kInvalidArgument));

  // Text-level problems no JSON object can show: a repeated member (parsers disagree on which
  // value wins, so a signer and a verifier could see different manifests) and an integer that
  // has no exact canonical form.
  const std::string text = good.dump();
  auto dup = parse_manifest(text.substr(0, text.size() - 1) + R"(,"job_id":"9999"})");
  ASSERT_TRUE(FailsWith(dup, ErrorCode::kInvalidArgument));
  EXPECT_NE(dup.error().message.find("\"job_id\" appears twice"), std::string::npos) << dup.error().message;
  nlohmann::json big = good;
  big["expires_at"] = 9007199254740993ull;  // 2^53 + 1
  auto b = parse_manifest(big.dump());
  ASSERT_TRUE(FailsWith(b, ErrorCode::kInvalidArgument));
  EXPECT_NE(b.error().message.find("beyond ±2^53"), std::string::npos) << b.error().message;
  big["expires_at"] = 9007199254740992ull;  // 2^53 itself is exact
  auto exact = parse_manifest(big.dump());
  EXPECT_TRUE(exact) << exact.error().message;
}

}  // namespace
}  // namespace tresor
