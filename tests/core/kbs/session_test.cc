// The KBS handshake state machine: version and TEE checks, one attempt per nonce, expiry after
// 300 s, resources only for attested sessions.
#include <gtest/gtest.h>

#include "support/test_support.h"
#include "tresor/kbs/session.h"

namespace tresor {
namespace {

using testing::FailsWith;

constexpr const char* kRequest = R"({"version":"0.4.0","tee":"snp","extra-params":""})";

TEST(KbsSession, HappyPath) {
  kbs::SessionTable t;
  auto s = t.auth(kRequest, 1000);
  ASSERT_TRUE(s) << s.error().message;
  EXPECT_EQ(base64url_decode(s->id)->size(), 32u);
  EXPECT_EQ(s->nonce.size(), 44u);  // base64 of 32 bytes
  EXPECT_TRUE(FailsWith(t.for_resource(s->id, 1001), ErrorCode::kAuth));  // not attested yet
  auto a = t.begin_attest(s->id, 1010);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->nonce, s->nonce);
  ASSERT_TRUE(t.attested(s->id, nlohmann::json{{"kty", "EC"}}, "job 42"));
  auto r = t.for_resource(s->id, 1100);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->subject, "job 42");
  EXPECT_EQ(r->tee_pubkey["kty"], "EC");
  // Two sessions never share an id or a nonce.
  auto s2 = t.auth(kRequest, 1000);
  ASSERT_TRUE(s2);
  EXPECT_NE(s2->id, s->id);
  EXPECT_NE(s2->nonce, s->nonce);
}

TEST(KbsSession, RequestsAreChecked) {
  kbs::SessionTable t;
  const std::pair<const char*, const char*> cases[] = {
      {"{", "not valid JSON"},
      // A number too large for a double is a JSON range error, not a parse error: found by
      // fuzz.kbs_json; it must be refused like any other bad JSON, not escape as an exception.
      {R"({"version":"0.4.0","tee":"snp","extra-params":-3e1022222222})", "not valid JSON"},
      {"[]", "JSON object"},
      {R"({"version":"0.1.0","tee":"snp"})", "\"0.1.0\" is not supported"},
      {R"({"tee":"snp"})", "(missing)"},
      {R"({"version":"0.4.0","tee":"tdx"})", "\"tdx\" is not supported"},
  };
  for (const auto& [req, want] : cases) {
    SCOPED_TRACE(req);
    auto s = t.auth(req, 0);
    ASSERT_TRUE(FailsWith(s, ErrorCode::kInvalidArgument));
    EXPECT_NE(s.error().message.find(want), std::string::npos) << s.error().message;
  }
  // A NUL byte ends the text for the JSON parser: a request with anything after one is refused.
  const std::string prefix = R"({"version":"0.4.0","tee":"snp"})";
  auto nul = t.auth(prefix + std::string(1, '\0') + "junk", 0);
  ASSERT_TRUE(FailsWith(nul, ErrorCode::kInvalidArgument));
  EXPECT_EQ(nul.error().message, "KBS Request is not valid JSON: a NUL byte at offset " + std::to_string(prefix.size()));
  EXPECT_EQ(t.size(), 0u) << "no refused request left a session";
  EXPECT_TRUE(t.auth(prefix, 0)) << "the same request without it is taken";
  EXPECT_EQ(t.size(), 1u);
}

TEST(KbsSession, OneNonceOneAttempt) {
  kbs::SessionTable t;
  auto s = t.auth(kRequest, 0);
  ASSERT_TRUE(s);
  ASSERT_TRUE(t.begin_attest(s->id, 1));
  auto replay = t.begin_attest(s->id, 2);  // while the first is in progress
  ASSERT_TRUE(FailsWith(replay, ErrorCode::kAuth));
  EXPECT_NE(replay.error().message.find("nonce was already used"), std::string::npos);
  t.failed(s->id);
  EXPECT_TRUE(FailsWith(t.begin_attest(s->id, 3), ErrorCode::kAuth));
  EXPECT_TRUE(FailsWith(t.attested(s->id, {}, ""), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(t.for_resource(s->id, 3), ErrorCode::kAuth));
  // After success, attesting again is also refused.
  auto ok = t.auth(kRequest, 0);
  ASSERT_TRUE(t.begin_attest(ok->id, 1));
  ASSERT_TRUE(t.attested(ok->id, {}, "x"));
  auto again = t.begin_attest(ok->id, 2);
  ASSERT_TRUE(FailsWith(again, ErrorCode::kAuth));
  EXPECT_NE(again.error().message.find("already attested"), std::string::npos);
}

TEST(KbsSession, ExpiryAfterFiveMinutes) {
  kbs::SessionTable t;
  auto late = t.auth(kRequest, 0);
  auto e = t.begin_attest(late->id, 300);
  ASSERT_TRUE(FailsWith(e, ErrorCode::kAuth));
  EXPECT_NE(e.error().message.find("expired"), std::string::npos);
  auto s = t.auth(kRequest, 1000);
  ASSERT_TRUE(t.begin_attest(s->id, 1299));
  ASSERT_TRUE(t.attested(s->id, {}, "x"));
  EXPECT_TRUE(t.for_resource(s->id, 1299));
  EXPECT_TRUE(FailsWith(t.for_resource(s->id, 1300), ErrorCode::kAuth));
  EXPECT_TRUE(FailsWith(t.for_resource("no-such-session", 1000), ErrorCode::kAuth));
  EXPECT_EQ(t.purge(1300), 1u);
  EXPECT_EQ(t.size(), 0u);
}

}  // namespace
}  // namespace tresor
