// Tests for tresor/identity.h: identities and their files, recipient strings, dataset ids and
// dataset keys. Every accepted input has a rejected twin (STYLE.md rule 16).
#include "tresor/identity.h"

#include <gtest/gtest.h>

#include <cctype>
#include <optional>
#include <string>
#include <vector>

#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor {
namespace {

using testing::FailsWith;

using testing::DeterministicRandom;


bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

// A random source that always fails, to check that generate() propagates the error.
class FailingRandom final : public crypto::RandomSource {
 public:
  Result<void> fill(MutableByteSpan) override { return fail(ErrorCode::kCrypto, "no entropy (test)"); }
};

// Replaces the character at `pos` with another base32 character (not merely its other case).
std::string mistype(std::string s, size_t pos) {
  const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(s.at(pos))));
  const char replacement = c == 'a' ? 'b' : 'a';
  s[pos] = std::isupper(static_cast<unsigned char>(s[pos])) ? static_cast<char>(std::toupper(replacement))
                                                             : replacement;
  return s;
}

// The TRESOR-SECRET-KEY-1… line of an identity file.
std::string key_line(const std::string& file_text) {
  const size_t start = file_text.find(kIdentityPrefix);
  if (start == std::string::npos) return {};
  return file_text.substr(start, file_text.find('\n', start) - start);
}

// ---- identities ---------------------------------------------------------------------------------

TEST(IdentityTest, GenerateAndFileTextRoundTrip) {
  auto id = Identity::generate();
  ASSERT_TRUE(id) << id.error().message;
  EXPECT_EQ(id->x25519_secret().size(), 32u);
  EXPECT_EQ(id->ed25519_seed().size(), 32u);
  const std::string text = id->to_file_text();
  EXPECT_TRUE(contains(text, "# recipient: " + id->recipient().to_string() + "\n")) << text;
  const std::string line = key_line(text);
  EXPECT_TRUE(line.starts_with(kIdentityPrefix)) << text;

  auto parsed = Identity::parse(text);
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(parsed->recipient(), id->recipient());
  EXPECT_EQ(to_hex(parsed->x25519_secret()), to_hex(id->x25519_secret()));
  EXPECT_EQ(to_hex(parsed->ed25519_seed()), to_hex(id->ed25519_seed()));
  EXPECT_EQ(parsed->to_file_text(), text);

  // The twin: another identity is another recipient with other secrets.
  auto other = Identity::generate();
  ASSERT_TRUE(other) << other.error().message;
  EXPECT_NE(other->recipient(), id->recipient());
  EXPECT_NE(to_hex(other->x25519_secret()), to_hex(id->x25519_secret()));
  EXPECT_NE(other->to_file_text(), text);
}

TEST(IdentityTest, RecipientIsThePublicHalfOfTheSecrets) {
  auto id = Identity::generate();
  auto other = Identity::generate();
  ASSERT_TRUE(id && other);

  auto x = crypto::Key::from_private(crypto::KeyType::kX25519, id->x25519_secret());
  ASSERT_TRUE(x) << x.error().message;
  EXPECT_EQ(to_hex(*x->public_raw()), to_hex(id->recipient().x25519));
  EXPECT_NE(to_hex(*x->public_raw()), to_hex(other->recipient().x25519));

  auto ed = crypto::Key::from_private(crypto::KeyType::kEd25519, id->ed25519_seed());
  ASSERT_TRUE(ed) << ed.error().message;
  auto sig = crypto::sign(*ed, as_bytes("grant"));
  ASSERT_TRUE(sig) << sig.error().message;
  auto pub = crypto::Key::from_public(crypto::KeyType::kEd25519, id->recipient().ed25519);
  auto other_pub = crypto::Key::from_public(crypto::KeyType::kEd25519, other->recipient().ed25519);
  ASSERT_TRUE(pub && other_pub);
  EXPECT_TRUE(crypto::verify(*pub, as_bytes("grant"), *sig));
  EXPECT_TRUE(FailsWith(crypto::verify(*other_pub, as_bytes("grant"), *sig), ErrorCode::kAuth));
}

TEST(IdentityTest, DeterministicRandomIsReproducible) {
  DeterministicRandom rng_a1("identity seed a");
  DeterministicRandom rng_a2("identity seed a");
  DeterministicRandom rng_b("identity seed b");
  auto a1 = Identity::generate(rng_a1);
  auto a2 = Identity::generate(rng_a2);
  auto b = Identity::generate(rng_b);
  ASSERT_TRUE(a1 && a2 && b);
  EXPECT_EQ(a1->recipient().to_string(), a2->recipient().to_string());
  EXPECT_EQ(a1->to_file_text(), a2->to_file_text());
  EXPECT_NE(a1->recipient().to_string(), b->recipient().to_string());
  // The same source, drawn again, moves on.
  auto a3 = Identity::generate(rng_a1);
  ASSERT_TRUE(a3);
  EXPECT_NE(a3->recipient().to_string(), a1->recipient().to_string());
}

TEST(IdentityTest, RandomSourceFailurePropagates) {
  FailingRandom broken;
  EXPECT_TRUE(FailsWith(Identity::generate(broken), ErrorCode::kCrypto));
  EXPECT_TRUE(FailsWith(DatasetKey::generate("dhz/ccta-2024", broken), ErrorCode::kCrypto));
}

TEST(IdentityTest, ParseAcceptsCommentsBlankLinesAndCrLf) {
  DeterministicRandom rng("identity layout");
  auto id = Identity::generate(rng);
  ASSERT_TRUE(id);
  const std::string line = key_line(id->to_file_text());
  ASSERT_FALSE(line.empty());
  std::string lower = line;
  for (size_t i = kIdentityPrefix.size(); i < lower.size(); ++i) {
    lower[i] = static_cast<char>(std::tolower(static_cast<unsigned char>(lower[i])));
  }
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bare line, no newline", line},
      {"comments and blank lines", "# created by a test\n\n# another comment\n" + line + "\n\n"},
      {"CRLF", "# comment\r\n" + line + "\r\n"},
      {"indented and trailing blanks", "  \t" + line + " \t\n"},
      {"lower-case key body", lower + "\n"},
  };
  for (const auto& [name, text] : cases) {
    SCOPED_TRACE(name);
    auto parsed = Identity::parse(text);
    ASSERT_TRUE(parsed) << parsed.error().message;
    EXPECT_EQ(parsed->recipient(), id->recipient());
  }
}

TEST(IdentityTest, ParseRejectsBadFiles) {
  DeterministicRandom rng("identity errors");
  auto id = Identity::generate(rng);
  auto other = Identity::generate(rng);
  ASSERT_TRUE(id && other);
  const std::string line = key_line(id->to_file_text());
  const std::string other_line = key_line(other->to_file_text());
  const std::string body = line.substr(kIdentityPrefix.size());
  ASSERT_EQ(body.size(), 109u);  // 68 bytes in base32 without padding
  struct Case {
    std::string name;
    std::string text;
    std::optional<std::string> want_error;  // substring of the message; nullopt: accepted
  };
  const std::vector<Case> cases = {
      {"valid", line + "\n", std::nullopt},
      {"empty file", "", "found 0"},
      {"comments only", "# TRESOR-SECRET-KEY-1 is not here\n\n", "found 0"},
      {"two key lines", line + "\n" + other_line + "\n", "found 2"},
      {"the same key line twice", line + "\n" + line + "\n", "found 2"},
      {"recipient pasted instead", id->recipient().to_string() + "\n", "public recipient, not an identity"},
      {"wrong prefix", "TRESOR-SECRET-KEY-2" + body + "\n", "does not start with TRESOR-SECRET-KEY-1"},
      {"lower-case prefix", "tresor-secret-key-1" + body + "\n", "does not start with TRESOR-SECRET-KEY-1"},
      {"damaged checksum (body)", mistype(line, kIdentityPrefix.size() + 40) + "\n", "checksum"},
      {"damaged checksum (first character)", mistype(line, kIdentityPrefix.size()) + "\n", "checksum"},
      {"damaged checksum (in the checksum)", mistype(line, kIdentityPrefix.size() + 105) + "\n", "checksum"},
      {"truncated to 65 bytes", line.substr(0, kIdentityPrefix.size() + 104) + "\n", "decodes to 65 bytes, want 68"},
      {"extended to 73 bytes", line + "AAAAAAAA" + "\n", "decodes to 73 bytes, want 68"},
      {"invalid base32 character", line.substr(0, 30) + "1" + line.substr(31) + "\n", "invalid character"},
      {"no body", std::string(kIdentityPrefix) + "\n", "decodes to 0 bytes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto parsed = Identity::parse(c.text);
    if (!c.want_error) {
      EXPECT_TRUE(parsed) << parsed.error().message;
      continue;
    }
    ASSERT_TRUE(FailsWith(parsed, ErrorCode::kInvalidArgument));
    EXPECT_TRUE(contains(parsed.error().message, *c.want_error)) << parsed.error().message;
    // Error messages never contain secrets (tresor/error.h).
    EXPECT_FALSE(contains(parsed.error().message, body.substr(0, 12))) << parsed.error().message;
    EXPECT_FALSE(contains(parsed.error().message, body.substr(50, 12))) << parsed.error().message;
  }
}

// ---- recipients ---------------------------------------------------------------------------------

TEST(RecipientTest, RoundTrip) {
  DeterministicRandom rng("recipient round trip");
  auto id = Identity::generate(rng);
  auto other = Identity::generate(rng);
  ASSERT_TRUE(id && other);
  const std::string text = id->recipient().to_string();
  EXPECT_TRUE(text.starts_with(kRecipientPrefix)) << text;
  EXPECT_EQ(text.size(), kRecipientPrefix.size() + 109);  // 68 bytes in base32
  EXPECT_EQ(text.find_first_not_of("abcdefghijklmnopqrstuvwxyz234567", kRecipientPrefix.size()),
            std::string::npos);
  auto parsed = Recipient::parse(text);
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(*parsed, id->recipient());
  EXPECT_EQ(parsed->to_string(), text);
  EXPECT_NE(*parsed, other->recipient());
  EXPECT_NE(other->recipient().to_string(), text);
}

TEST(RecipientTest, ParseErrors) {
  DeterministicRandom rng("recipient errors");
  auto id = Identity::generate(rng);
  ASSERT_TRUE(id);
  const std::string good = id->recipient().to_string();
  const size_t p = kRecipientPrefix.size();
  struct Case {
    std::string name;
    std::string text;
    std::optional<std::string> want_error;  // substring of the message; nullopt: accepted
  };
  const std::vector<Case> cases = {
      {"valid", good, std::nullopt},
      {"wrong prefix", "tresor2" + good.substr(p), "does not start with \"tresor1\""},
      {"age-style prefix", "age1" + good.substr(p), "does not start with \"tresor1\""},
      {"upper-case prefix", "TRESOR1" + good.substr(p), "does not start with \"tresor1\""},
      {"empty", "", "does not start with \"tresor1\""},
      {"prefix only", std::string(kRecipientPrefix), "decodes to 0 bytes"},
      {"truncated to 65 bytes", good.substr(0, p + 104), "decodes to 65 bytes, want 68 (is it complete?)"},
      {"truncated by 8 characters", good.substr(0, good.size() - 8), ""},
      {"extended by 8 characters", good + "aaaaaaaa", "decodes to 73 bytes"},
      {"mistyped first character", mistype(good, p), "checksum"},
      {"mistyped character in the middle", mistype(good, p + 50), "checksum"},
      {"mistyped character in the checksum", mistype(good, p + 105), "checksum"},
      {"invalid character", good.substr(0, p + 20) + "0" + good.substr(p + 21), "invalid character '0'"},
      {"identity pasted instead", key_line(id->to_file_text()), "does not start with \"tresor1\""},
      {"leading space", " " + good, "does not start with \"tresor1\""},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto parsed = Recipient::parse(c.text);
    if (!c.want_error) {
      ASSERT_TRUE(parsed) << parsed.error().message;
      EXPECT_EQ(*parsed, id->recipient());
      continue;
    }
    ASSERT_TRUE(FailsWith(parsed, ErrorCode::kInvalidArgument));
    EXPECT_TRUE(contains(parsed.error().message, *c.want_error)) << parsed.error().message;
  }
}

// ---- dataset ids and keys --------------------------------------------------------------------------

TEST(DatasetIdTest, Table) {
  struct Case {
    std::string name;
    std::string id;
    bool want_ok;
  };
  const std::vector<Case> cases = {
      {"site/study", "dhz/ccta-2024", true},
      {"one character", "a", true},
      {"dot and underscore", "x.y_z", true},
      {"all allowed characters", "AZaz09._-/b", true},
      {"three segments", "a/b/c", true},
      {"double dot inside a segment", "a..b", true},
      {"trailing dot", "a/b.", true},
      {"128 characters", std::string(128, 'x'), true},
      {"empty", "", false},
      {"absolute", "/abs", false},
      {"empty segment", "a//b", false},
      {"dot-dot segment", "a/../b", false},
      {"trailing dot-dot segment", "a/..", false},
      {"dot-dot alone", "..", false},
      {"leading dot", ".hidden", false},
      {"dot-led segment", "a/.hidden", false},
      {"leading dash", "-x", false},
      {"trailing slash", "a/", false},
      {"space", "a b", false},
      {"backslash", "a\\b", false},
      {"newline", "a\nb", false},
      {"NUL", std::string("a\0b", 3), false},
      {"non-ASCII", "caf\xc3\xa9", false},
      {"129 characters", std::string(129, 'x'), false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto r = validate_dataset_id(c.id);
    if (c.want_ok) {
      EXPECT_TRUE(r) << r.error().message;
    } else {
      ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
      EXPECT_TRUE(contains(r.error().message, "dataset id")) << r.error().message;
    }
  }
}

TEST(DatasetKeyTest, GenerateAndFileTextRoundTrip) {
  auto k = DatasetKey::generate("dhz/ccta-2024");
  ASSERT_TRUE(k) << k.error().message;
  EXPECT_EQ(k->id, "dhz/ccta-2024");
  ASSERT_EQ(k->key.size(), kDatasetKeySize);
  const std::string text = k->to_file_text();
  EXPECT_TRUE(contains(text, "'dhz/ccta-2024'")) << text;
  EXPECT_TRUE(contains(text, to_hex(k->key.span()) + "\n")) << text;

  auto parsed = DatasetKey::parse("dhz/ccta-2024", text);
  ASSERT_TRUE(parsed) << parsed.error().message;
  EXPECT_EQ(parsed->id, "dhz/ccta-2024");
  EXPECT_EQ(to_hex(parsed->key.span()), to_hex(k->key.span()));
  EXPECT_EQ(parsed->to_file_text(), text);

  auto other = DatasetKey::generate("dhz/ccta-2024");
  ASSERT_TRUE(other);
  EXPECT_NE(to_hex(other->key.span()), to_hex(k->key.span()));
}

TEST(DatasetKeyTest, DeterministicRandomIsReproducible) {
  DeterministicRandom a1("dataset seed a");
  DeterministicRandom a2("dataset seed a");
  DeterministicRandom b("dataset seed b");
  auto k1 = DatasetKey::generate("d", a1);
  auto k2 = DatasetKey::generate("d", a2);
  auto k3 = DatasetKey::generate("d", b);
  ASSERT_TRUE(k1 && k2 && k3);
  EXPECT_EQ(to_hex(k1->key.span()), to_hex(k2->key.span()));
  EXPECT_NE(to_hex(k1->key.span()), to_hex(k3->key.span()));
}

TEST(DatasetKeyTest, InvalidIdIsRejected) {
  EXPECT_TRUE(DatasetKey::generate("ok/id"));
  EXPECT_TRUE(FailsWith(DatasetKey::generate("../escape"), ErrorCode::kInvalidArgument));
  const std::string file = std::string(64, 'a') + "\n";
  EXPECT_TRUE(DatasetKey::parse("ok/id", file));
  EXPECT_TRUE(FailsWith(DatasetKey::parse("/abs", file), ErrorCode::kInvalidArgument));
}

TEST(DatasetKeyTest, ParseTable) {
  const std::string hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
  struct Case {
    std::string name;
    std::string text;
    std::optional<std::string> want_error;  // substring of the message; nullopt: accepted
  };
  const std::vector<Case> cases = {
      {"64 hex digits", hex64 + "\n", std::nullopt},
      {"no final newline", hex64, std::nullopt},
      {"comments, blank lines, CRLF", "# dataset key\r\n\r\n" + hex64 + "\r\n", std::nullopt},
      {"upper-case hex", "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF\n", std::nullopt},
      {"63 hex digits", hex64.substr(1) + "\n", "64 hex digits"},
      {"65 hex digits", hex64 + "0\n", "64 hex digits"},
      {"32 hex digits (a 16-byte key)", hex64.substr(0, 32) + "\n", "64 hex digits"},
      {"non-hex digit", hex64.substr(0, 10) + "g" + hex64.substr(11) + "\n", "non-hex character at position 10"},
      {"0x prefix", "0x" + hex64.substr(2) + "\n", "non-hex character at position 1"},
      {"two key lines", hex64 + "\n" + hex64 + "\n", "64 hex digits"},
      {"split over two lines", hex64.substr(0, 32) + "\n" + hex64.substr(32) + "\n", "64 hex digits"},
      {"empty", "", "64 hex digits"},
      {"comments only", "# nothing\n", "64 hex digits"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto k = DatasetKey::parse("dhz/ccta-2024", c.text);
    if (!c.want_error) {
      ASSERT_TRUE(k) << k.error().message;
      EXPECT_EQ(to_hex(k->key.span()), hex64);
      continue;
    }
    ASSERT_TRUE(FailsWith(k, ErrorCode::kInvalidArgument));
    EXPECT_TRUE(contains(k.error().message, *c.want_error)) << k.error().message;
    EXPECT_FALSE(contains(k.error().message, hex64.substr(12, 16))) << "message shows key material";
  }
}

}  // namespace
}  // namespace tresor
