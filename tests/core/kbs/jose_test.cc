// KBS JSON pieces: RFC 8785 canonical JSON against the RFC's own examples, and flattened JWE
// (ECDH-ES+A256KW on P-256, RSA-OAEP-256; A256GCM) against an independent implementation —
// Debian's python3-jwcrypto decrypts what Tresor encrypts and the other way round — plus the
// tamper cases.
#include <gtest/gtest.h>

#include <functional>
#include <openssl/bio.h>
#include <openssl/pem.h>

#include <cmath>
#include <filesystem>
#include <string_view>
#include <utility>

#include "support/test_support.h"
#include "tresor/kbs/jose.h"

namespace tresor {
namespace {

using json = nlohmann::json;
using testing::FailsWith;

TEST(Jcs, Rfc8785SampleObject) {
  // RFC 8785 §3.2.4.
  const auto in = json::parse(R"({
    "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
    "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
    "literals": [null, true, false]
  })");
  auto out = kbs::canonical_json(in);
  ASSERT_TRUE(out) << out.error().message;
  EXPECT_EQ(*out, "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],"
                  "\"string\":\"\xe2\x82\xac$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}");
}

TEST(Jcs, MembersSortByUtf16CodeUnits) {
  // RFC 8785 §3.2.3: U+1F600 (surrogates D83D DE00) sorts before U+FB33, unlike code points.
  const auto in = json::parse(R"({"\u20ac":"Euro","\r":"CR","\ufb33":"Hebrew","1":"One","\ud83d\ude00":"Emoji","\u0080":"Control","\u00f6":"Latin"})");
  auto out = kbs::canonical_json(in);
  ASSERT_TRUE(out);
  const std::vector<std::string> order = {"CR", "One", "Control", "Latin", "Euro", "Emoji", "Hebrew"};
  size_t pos = 0;
  for (const auto& v : order) {
    const size_t at = out->find("\"" + v + "\"");
    ASSERT_NE(at, std::string::npos) << v;
    EXPECT_GT(at, pos) << v << " out of order in " << *out;
    pos = at;
  }
}

TEST(Jcs, StrictParseRefusesRepeatedNamesAndInexactIntegers) {
  EXPECT_TRUE(kbs::parse_strict_json(R"({"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]})", "doc"));  // same name, other objects
  const std::pair<const char*, const char*> bad[] = {
      {R"({"a":1,"a":1})", "doc: member \"a\" appears twice"},
      {R"({"o":{"x":1,"y":2,"x":3}})", "member \"x\" appears twice"},
      {R"({"n":9007199254740993})", "integer 9007199254740993 is beyond ±2^53"},
      {R"({"n":-9007199254740993})", "integer -9007199254740993 is beyond ±2^53"},
      {R"({"n":1152921504606846976})", "integer 1152921504606846976 is beyond ±2^53"},  // 2^60: exact as a double, still refused
      {R"({"n":9007199254740994.0})", "number 9.007199254740994e+15 is beyond ±2^53"},
      {R"([1e300])", "number 1e+300 is beyond ±2^53"},
      {R"([1,)", "doc is not valid JSON"},
  };
  for (const auto& [text, want] : bad) {
    auto r = kbs::parse_strict_json(text, "doc");
    ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument)) << text;
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
  }
  EXPECT_TRUE(kbs::parse_strict_json(R"({"n":9007199254740992,"m":-9007199254740992,"f":9007199254740992.0,"g":-0.5})", "doc"));
}

// Canonical JSON is a fixed point of the strict parser and canonicalization: every number the
// parser takes has a canonical form it takes back. The kbs_json fuzz target found the case that
// broke it: 9999999999999999999.99… (accepted then) → "10000000000000000000" (refused); such
// numbers are now refused on the way in.
TEST(Jcs, AcceptedNumbersCanonicalizeToTextThatParsesBack) {
  EXPECT_FALSE(kbs::parse_strict_json("9999999999999999999.9999999999", "doc"));
  EXPECT_FALSE(kbs::parse_strict_json("[1e21]", "doc"));
  for (const char* text : {"9007199254740992.0", "-9007199254740992", "0.1", "1e-300", "[123456789012.5, -4503599627370495.5]"}) {
    SCOPED_TRACE(text);
    auto j = kbs::parse_strict_json(text, "doc");
    ASSERT_TRUE(j) << j.error().message;
    auto canon = kbs::canonical_json(*j);
    ASSERT_TRUE(canon);
    auto again = kbs::parse_strict_json(*canon, "canonical");
    ASSERT_TRUE(again) << *canon << ": " << again.error().message;
    EXPECT_EQ(*kbs::canonical_json(*again), *canon);
  }
}

// nlohmann::json stops at a raw NUL as if the text ended there; JSON text cannot hold one (RFC
// 8259: U+0000 only escaped, inside strings), so the text is refused, naming the offset.
TEST(Jcs, ANulByteInTheTextIsRefused) {
  using namespace std::literals;
  const std::pair<std::string_view, size_t> cases[] = {{"{\"a\":1}\0{\"b\":2}"sv, 7}, {"1\0"sv, 1}, {"\0"sv, 0}};
  for (const auto& [text, at] : cases) {
    auto r = kbs::parse_strict_json(text, "doc");
    ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
    EXPECT_EQ(r.error().message, "doc is not valid JSON: a NUL byte at offset " + std::to_string(at));
  }
  // Escaped, U+0000 is an ordinary character of a string.
  auto escaped = kbs::parse_strict_json(R"({"a":"x\u0000y"})", "doc");
  ASSERT_TRUE(escaped) << escaped.error().message;
  EXPECT_EQ((*escaped)["a"].get<std::string>().size(), 3u);
}

TEST(Jcs, NumbersInEcmaScriptForm) {
  const std::vector<std::pair<double, std::string>> cases = {
      {0.0, "0"},          {-0.0, "0"},          {1.0, "1"},
      {-0.5, "-0.5"},      {1e20, "100000000000000000000"}, {1e21, "1e+21"},
      {0.000001, "0.000001"}, {1e-7, "1e-7"},    {123e-20, "1.23e-18"},
      {5e-324, "5e-324"},  {1.7976931348623157e308, "1.7976931348623157e+308"},
      {9007199254740992.0, "9007199254740992"}, {333333333.33333329, "333333333.3333333"}};
  for (const auto& [v, want] : cases) {
    auto out = kbs::canonical_json(json(v));
    ASSERT_TRUE(out);
    EXPECT_EQ(*out, want) << v;
  }
  EXPECT_EQ(*kbs::canonical_json(json(42)), "42");
  EXPECT_TRUE(FailsWith(kbs::canonical_json(json(std::nan(""))), ErrorCode::kInvalidArgument));
}

// ---- JWE ---------------------------------------------------------------------------------------

json private_jwk_p256(const crypto::Key& k) {
  auto j = *kbs::public_jwk(k);
  j["d"] = base64url_encode(k.private_raw()->span());
  return j;
}

TEST(Jwe, RoundTripsAndRejectsEveryTamper) {
  const Bytes secret = to_bytes("the dataset key: 0123456789abcdef0123456789abcdef");
  auto ec = crypto::Key::generate(crypto::KeyType::kP256);
  auto rsa = kbs::generate_rsa(2048);
  ASSERT_TRUE(ec && rsa);
  const std::pair<const crypto::Key*, kbs::KeyWrap> recipients[] = {{&*ec, kbs::KeyWrap::kEcdhEsA256kw},
                                                                    {&*rsa, kbs::KeyWrap::kRsaOaep256}};
  for (const auto& [key, wrap] : recipients) {
    SCOPED_TRACE(wrap == kbs::KeyWrap::kRsaOaep256 ? "RSA-OAEP-256" : "ECDH-ES+A256KW");
    auto pub = kbs::public_jwk(*key);
    ASSERT_TRUE(pub);
    auto jwe = kbs::jwe_encrypt(secret, *pub, wrap);
    ASSERT_TRUE(jwe) << jwe.error().message;
    auto back = kbs::jwe_decrypt(*jwe, *key);
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(to_string(back->span()), to_string(secret));
    for (const char* member : {"ciphertext", "tag", "iv", "encrypted_key", "protected"}) {
      SCOPED_TRACE(member);
      json bad = *jwe;
      std::string v = bad[member];
      v[v.size() / 2] = v[v.size() / 2] == 'A' ? 'B' : 'A';
      bad[member] = v;
      auto r = kbs::jwe_decrypt(bad, *key);
      ASSERT_FALSE(r) << "a changed " << member << " was accepted";
    }
    // The wrong recipient cannot open it.
    auto other = wrap == kbs::KeyWrap::kRsaOaep256 ? kbs::generate_rsa(2048) : crypto::Key::generate(crypto::KeyType::kP256);
    ASSERT_TRUE(other);
    EXPECT_TRUE(FailsWith(kbs::jwe_decrypt(*jwe, *other), ErrorCode::kAuth));
  }
  // Mismatched key types and malformed JWKs are named.
  EXPECT_TRUE(FailsWith(kbs::jwe_encrypt(secret, *kbs::public_jwk(*ec), kbs::KeyWrap::kRsaOaep256), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(kbs::jwe_encrypt(secret, json{{"kty", "OKP"}}, kbs::KeyWrap::kEcdhEsA256kw), ErrorCode::kInvalidArgument));
  json off_curve = *kbs::public_jwk(*ec);
  std::string y = off_curve["y"];
  y[3] = y[3] == 'A' ? 'B' : 'A';
  off_curve["y"] = y;
  EXPECT_FALSE(kbs::jwe_encrypt(secret, off_curve, kbs::KeyWrap::kEcdhEsA256kw));
}

// Wrong types and unsupported parameters in guest-supplied JSON are refused with a message naming
// the member, never by a JSON type exception escaping the parser.
TEST(Jwe, WrongTypesAndUnsupportedParametersAreNamed) {
  auto ec = crypto::Key::generate(crypto::KeyType::kP256);
  ASSERT_TRUE(ec);
  auto jwe = kbs::jwe_encrypt(to_bytes("k"), *kbs::public_jwk(*ec), kbs::KeyWrap::kEcdhEsA256kw);
  ASSERT_TRUE(jwe);
  auto with_header = [&](const std::function<void(json&)>& change) {
    json header = json::parse(to_string(*base64url_decode((*jwe)["protected"].get<std::string>(), "test")));
    change(header);
    json out = *jwe;
    out["protected"] = base64url_encode(to_bytes(header.dump()));
    return out;
  };
  const std::vector<std::pair<std::function<void(json&)>, std::string>> cases = {
      {[](json& h) { h["enc"] = 7; }, "\"enc\" must be \"A256GCM\""},
      {[](json& h) { h["alg"] = json::array(); }, "\"alg\" \"\" is not supported"},
      {[](json& h) { h["zip"] = "DEF"; }, "\"zip\" is not supported"},
      {[](json& h) { h["crit"] = json::array({"exp"}); }, "\"crit\" is not supported"},
      {[](json& h) { h["apu"] = "QWxpY2U"; }, "\"apu\" is not supported"},
      {[](json& h) { h["epk"]["crv"] = 256; }, "\"crv\" must be \"P-256\""},
  };
  for (const auto& [change, want] : cases) {
    SCOPED_TRACE(want);
    auto r = kbs::jwe_decrypt(with_header(change), *ec);
    ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
  }
  EXPECT_TRUE(FailsWith(kbs::key_from_jwk(json{{"kty", "EC"}, {"crv", nullptr}}), ErrorCode::kInvalidArgument));
}

// python3-jwcrypto as an independent implementation.
TEST(Jwe, InteroperatesWithJwcrypto) {
  if (!std::filesystem::exists("/usr/bin/python3")) GTEST_SKIP() << "no /usr/bin/python3";
  testing::TempDir dir;
  auto ec = crypto::Key::generate(crypto::KeyType::kP256);
  auto rsa = kbs::generate_rsa(2048);
  ASSERT_TRUE(ec && rsa);
  const std::string ec_jwk = private_jwk_p256(*ec).dump();
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(bio, rsa->get(), nullptr, nullptr, 0, nullptr, nullptr);
  char* pem_data = nullptr;
  const long pem_len = BIO_get_mem_data(bio, &pem_data);
  testing::write_file(dir.file("rsa.pem"), as_bytes(std::string_view(pem_data, static_cast<size_t>(pem_len))), 0600);
  BIO_free(bio);
  testing::write_file(dir.file("ec.jwk"), as_bytes(ec_jwk), 0600);

  const std::string secret = "key material \x01\x02 for the job";
  auto ours_ec = kbs::jwe_encrypt(as_bytes(secret), *kbs::public_jwk(*ec), kbs::KeyWrap::kEcdhEsA256kw);
  auto ours_rsa = kbs::jwe_encrypt(as_bytes(secret), *kbs::public_jwk(*rsa), kbs::KeyWrap::kRsaOaep256);
  ASSERT_TRUE(ours_ec && ours_rsa);
  testing::write_file(dir.file("ec.jwe"), as_bytes(ours_ec->dump()), 0600);
  testing::write_file(dir.file("rsa.jwe"), as_bytes(ours_rsa->dump()), 0600);

  const std::string script = R"PY(
import json, sys
from jwcrypto import jwe, jwk
d = sys.argv[1]
eck = jwk.JWK(**json.load(open(d + '/ec.jwk')))
rsak = jwk.JWK.from_pem(open(d + '/rsa.pem', 'rb').read())
out = {}
for name, key in (('ec', eck), ('rsa', rsak)):
    t = jwe.JWE()
    t.deserialize(open(d + '/' + name + '.jwe').read(), key=key)
    out[name + '_plain'] = t.payload.hex()
msg = b'from jwcrypto to tresor'
for name, key, alg in (('ec', eck, 'ECDH-ES+A256KW'), ('rsa', rsak, 'RSA-OAEP-256')):
    pub = jwk.JWK(**json.loads(key.export_public()))
    t = jwe.JWE(msg, json.dumps({'alg': alg, 'enc': 'A256GCM'}))
    t.add_recipient(pub)
    out[name + '_jwe'] = json.loads(t.serialize())
print(json.dumps(out))
)PY";
  testing::write_file(dir.file("oracle.py"), as_bytes(script), 0600);
  auto r = testing::run_command({"/usr/bin/python3", dir.file("oracle.py"), dir.path().string()});
  if (r.exit_code != 0 && r.err.find("No module named 'jwcrypto'") != std::string::npos) {
    GTEST_SKIP() << "python3-jwcrypto is not installed (scripts/bootstrap installs it)";
  }
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto out = json::parse(r.out);
  EXPECT_EQ(out["ec_plain"], to_hex(as_bytes(secret))) << "jwcrypto could not read Tresor's ECDH-ES+A256KW JWE";
  EXPECT_EQ(out["rsa_plain"], to_hex(as_bytes(secret))) << "jwcrypto could not read Tresor's RSA-OAEP-256 JWE";
  auto theirs_ec = kbs::jwe_decrypt(out["ec_jwe"], *ec);
  ASSERT_TRUE(theirs_ec) << theirs_ec.error().message << "\n" << out["ec_jwe"].dump();
  EXPECT_EQ(to_string(theirs_ec->span()), "from jwcrypto to tresor");
  auto theirs_rsa = kbs::jwe_decrypt(out["rsa_jwe"], *rsa);
  ASSERT_TRUE(theirs_rsa) << theirs_rsa.error().message;
  EXPECT_EQ(to_string(theirs_rsa->span()), "from jwcrypto to tresor");
}

TEST(KbsBinding, ReportDataIsSha384OfCanonicalRuntimeDataThenZeros) {
  auto ec = crypto::Key::generate(crypto::KeyType::kP256);
  ASSERT_TRUE(ec);
  const json pub = *kbs::public_jwk(*ec, "ECDH-ES+A256KW");
  const std::string nonce = base64_encode(testing::pattern_bytes(32, 7));
  auto rd = kbs::runtime_data_binding(nonce, pub);
  ASSERT_TRUE(rd);
  // Oracle: Python's sorted, compact dump equals RFC 8785 for these ASCII string-only objects.
  testing::TempDir dir;
  testing::write_file(dir.file("in.json"), as_bytes(json{{"nonce", nonce}, {"tee-pubkey", pub}}.dump()), 0644);
  auto r = testing::run_command({"/usr/bin/python3", "-c",
                                 "import json,hashlib,sys; d=json.load(open(sys.argv[1])); "
                                 "o={'additional-evidence':'','nonce':d['nonce'],'tee-pubkey':d['tee-pubkey']}; "
                                 "print(hashlib.sha384(json.dumps(o,sort_keys=True,separators=(',',':')).encode()).hexdigest())",
                                 dir.file("in.json")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(to_hex(ByteSpan(*rd).first(48)) + "\n", r.out);
  EXPECT_EQ(to_hex(ByteSpan(*rd).subspan(48)), std::string(32, '0'));
  // Any change to nonce, key or additional evidence changes the binding.
  EXPECT_NE(*kbs::runtime_data_binding(nonce + "x", pub), *rd);
  EXPECT_NE(*kbs::runtime_data_binding(nonce, pub, "{}"), *rd);
  json other = pub;
  other["alg"] = "RSA-OAEP-256";
  EXPECT_NE(*kbs::runtime_data_binding(nonce, other), *rd);
  EXPECT_TRUE(FailsWith(kbs::runtime_data_binding(nonce, json("not a key")), ErrorCode::kInvalidArgument));
}

TEST(Base64url, RoundTripAndRejects) {
  for (size_t n = 0; n < 40; ++n) {
    const Bytes b = testing::pattern_bytes(n, static_cast<uint32_t>(n));
    auto back = base64url_decode(base64url_encode(b));
    ASSERT_TRUE(back);
    EXPECT_EQ(*back, b);
  }
  EXPECT_EQ(base64url_encode(as_bytes("\xfb\xff")), "-_8");
  EXPECT_EQ(base64_encode(as_bytes("\xfb\xff")), "+/8=");
  EXPECT_TRUE(FailsWith(base64url_decode("ab+c"), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(base64url_decode("abc="), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(base64url_decode("a"), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(base64url_decode("ab"), ErrorCode::kInvalidArgument));  // non-zero padding bits
  EXPECT_EQ(to_hex(*base64url_decode("aQ")), "69");
}

}  // namespace
}  // namespace tresor

namespace tresor::kbs {
namespace {

TEST(Jcs, StringsThatAreNotUtf8HaveNoCanonicalForm) {
  // Well-formed: ASCII, 2-, 3- and 4-byte sequences.
  EXPECT_TRUE(canonical_json(nlohmann::json("a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80")));
  for (const char* bad : {"\xff", "\xc3", "\xc0\xaf" /* overlong '/' */, "\xed\xa0\x80" /* surrogate */,
                          "\xf4\x90\x80\x80" /* above U+10FFFF */, "ok\xe2\x82"}) {
    SCOPED_TRACE(::testing::PrintToString(std::string(bad)));
    nlohmann::json j = nlohmann::json::object();
    j["s"] = std::string(bad);
    auto r = canonical_json(j);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find("not valid UTF-8"), std::string::npos);
    nlohmann::json k = nlohmann::json::object();
    k[std::string(bad)] = 1;
    EXPECT_FALSE(canonical_json(k)) << "member names too";
  }
}

}  // namespace
}  // namespace tresor::kbs

namespace tresor::kbs {
namespace {

// The CoCo guest client (confidential-containers guest-components, through the kbs-types crate's
// ProtectedHeader) does not take the GCM AAD from the "protected" text it received: it parses the
// header into {alg, enc, other members} and serializes it again with serde_json — "alg", then
// "enc", then the other members in key order (serde_json's default map), nested objects likewise,
// no whitespace — and base64url-encodes that. A broker's JWE opens there only if its protected
// header is byte-for-byte that re-serialization. This rebuilds it the same way and compares.
std::string reserialized_like_kbs_types(const std::string& header_text) {
  auto h = nlohmann::json::parse(header_text);
  std::string out = "{\"alg\":" + h["alg"].dump() + ",\"enc\":" + h["enc"].dump();
  h.erase("alg");
  h.erase("enc");
  for (const auto& [k, v] : h.items()) {  // std::map: key order
    out.push_back(',');
    out.append(nlohmann::json(k).dump());
    out.push_back(':');
    out.append(v.dump());
  }
  out.push_back('}');
  return out;
}

TEST(Jwe, ProtectedHeaderIsExactlyWhatTheCocoGuestClientReserializes) {
  auto ec = crypto::Key::generate(crypto::KeyType::kP256);
  ASSERT_TRUE(ec);
  auto rsa = generate_rsa(2048);
  ASSERT_TRUE(rsa);
  struct Case {
    const crypto::Key* key;
    KeyWrap wrap;
  };
  for (const Case& c : {Case{&*ec, KeyWrap::kEcdhEsA256kw}, Case{&*rsa, KeyWrap::kRsaOaep256}}) {
    auto jwk = public_jwk(*c.key);
    ASSERT_TRUE(jwk);
    auto jwe = jwe_encrypt(as_bytes("dataset key"), *jwk, c.wrap);
    ASSERT_TRUE(jwe) << jwe.error().message;
    const std::string protected_b64 = (*jwe)["protected"].get<std::string>();
    const Bytes raw = *base64url_decode(protected_b64);
    const std::string text(reinterpret_cast<const char*>(raw.data()), raw.size());
    EXPECT_EQ(text, reserialized_like_kbs_types(text));
    EXPECT_EQ(text.rfind("{\"alg\":", 0), 0u) << text;
    // And the members KBS's Response has, no others: no "aad" (the guest would then use it).
    std::vector<std::string> members;
    for (const auto& [k, v] : jwe->items()) members.push_back(k);
    EXPECT_EQ(members, (std::vector<std::string>{"ciphertext", "encrypted_key", "iv", "protected", "tag"}));
  }
}

}  // namespace
}  // namespace tresor::kbs
