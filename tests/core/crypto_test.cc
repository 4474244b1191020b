// Tests for tresor/crypto.h against published known answers: NIST CAVP AES-256-GCM vectors (read
// from tests/testdata/nist/*.rsp), RFC 5869 HKDF, RFC 4231 HMAC, FIPS 180 SHA-2, FIPS 197 AES,
// RFC 7748 X25519, RFC 8032 Ed25519 and RFC 6979 ECDSA P-256. Every accepting check has a
// rejecting twin (STYLE.md rule 16).
#include "tresor/crypto.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <charconv>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "support/cavp.h"
#include "support/test_support.h"
#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"

namespace tresor {
namespace {

using testing::FailsWith;
using testing::CavpFile;
using testing::CavpKind;
using testing::CavpVector;
using testing::load_cavp;
using testing::parse_cavp;

using crypto::Hash;
using crypto::Key;
using crypto::KeyType;

// ---- helpers ----------------------------------------------------------------------------------

// Decodes a hex literal of the test itself; a typo in a literal fails the test, not the library.
Bytes hex(std::string_view s) {
  auto r = from_hex(s, "test literal");
  if (!r) {
    ADD_FAILURE() << "bad hex literal in test: " << r.error().message;
    return {};
  }
  return *r;
}

Bytes concat(ByteSpan a, ByteSpan b) {
  Bytes out(a.begin(), a.end());
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

Bytes flip_bit(ByteSpan b, size_t byte, unsigned bit) {
  Bytes out(b.begin(), b.end());
  out.at(byte) ^= std::byte(1u << bit);
  return out;
}

bool all_bytes_are(ByteSpan b, std::byte value) {
  return std::all_of(b.begin(), b.end(), [value](std::byte x) { return x == value; });
}


template <typename T>
::testing::AssertionResult Succeeds(const Result<T>& r) {
  if (r) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "failed with " << error_code_name(r.error().code) << ": "
                                       << r.error().message;
}

// The subsets in tests/testdata/nist hold exactly these many vectors; a lost file or a lost vector
// fails the count checks instead of silently testing less.
constexpr size_t kEncryptVectorCount = 11;
constexpr size_t kDecryptVectorCount = 7;
constexpr size_t kDecryptFailCount = 3;

const CavpFile& encrypt_file() {
  static const CavpFile f = load_cavp("nist/gcmEncryptExtIV256.subset.rsp", CavpKind::kEncrypt);
  return f;
}
const CavpFile& decrypt_file() {
  static const CavpFile f = load_cavp("nist/gcmDecrypt256.subset.rsp", CavpKind::kDecrypt);
  return f;
}

std::string join(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

// ---- the parser itself --------------------------------------------------------------------------

TEST(CavpParserTest, DataFilesAreFoundAndComplete) {
  const CavpFile& enc = encrypt_file();
  ASSERT_TRUE(enc.found) << "missing " << testing::testdata("nist/gcmEncryptExtIV256.subset.rsp");
  EXPECT_TRUE(enc.errors.empty()) << join(enc.errors);
  EXPECT_EQ(enc.vectors.size(), kEncryptVectorCount);

  const CavpFile& dec = decrypt_file();
  ASSERT_TRUE(dec.found) << "missing " << testing::testdata("nist/gcmDecrypt256.subset.rsp");
  EXPECT_TRUE(dec.errors.empty()) << join(dec.errors);
  EXPECT_EQ(dec.vectors.size(), kDecryptVectorCount);
  EXPECT_EQ(std::count_if(dec.vectors.begin(), dec.vectors.end(), [](const CavpVector& v) { return v.fail; }),
            static_cast<std::ptrdiff_t>(kDecryptFailCount));
}

TEST(CavpParserTest, MissingFileIsReportedNotEmpty) {
  const CavpFile f = load_cavp("nist/no-such-file.rsp", CavpKind::kEncrypt);
  EXPECT_FALSE(f.found);
  EXPECT_TRUE(f.vectors.empty());
}

TEST(CavpParserTest, ParsesSectionsAndFail) {
  const std::string text =
      "# comment\r\n"
      "[Keylen = 256][IVlen = 96][PTlen = 0][AADlen = 0][Taglen = 128]\n"
      "\n"
      "Count = 4\n"
      "Key = " + std::string(64, '0') + "\n"
      "IV = 000000000000000000000000\n"
      "CT = \n"
      "AAD =\n"
      "Tag = 00000000000000000000000000000000\n"
      "FAIL\n";
  const CavpFile f = parse_cavp(text, "inline", CavpKind::kDecrypt);
  EXPECT_TRUE(f.errors.empty()) << join(f.errors);
  ASSERT_EQ(f.vectors.size(), 1u);
  EXPECT_EQ(f.vectors[0].count, "4");
  EXPECT_TRUE(f.vectors[0].fail);
  EXPECT_EQ(f.vectors[0].section.at("Taglen"), "128");
  EXPECT_EQ(f.vectors[0].field("Key").size(), 32u);
  EXPECT_TRUE(f.vectors[0].has("CT"));
  EXPECT_TRUE(f.vectors[0].field("CT").empty());
}

TEST(CavpParserTest, RejectsMalformedInput) {
  struct Case {
    std::string name;
    std::string text;
    std::string want_error;  // substring of one reported error
  };
  const std::string head = "[Keylen = 256]\n[IVlen = 96]\n[PTlen = 0]\n[AADlen = 0]\n[Taglen = 128]\nCount = 0\n";
  const std::string key = "Key = " + std::string(64, '0') + "\n";
  const std::string rest = "IV = 000000000000000000000000\nPT = \nAAD = \nCT = \nTag = " + std::string(32, '0') + "\n";
  const std::vector<Case> cases = {
      {"non-hex value", head + key + "IV = 00000000000000000000000g\nPT = \nAAD = \nCT = \nTag = " +
                            std::string(32, '0') + "\n", "non-hex"},
      {"missing tag", head + key + "IV = 000000000000000000000000\nPT = \nAAD = \nCT = \n", "missing Tag"},
      {"key shorter than Keylen", head + "Key = 00\n" + rest, "Key is 8 bits"},
      {"field before Count", "Key = 00\n", "before the first Count"},
      {"unknown field", head + key + rest + "Nonce = 00\n", "unknown field"},
      {"duplicate field", head + key + key + rest, "given twice"},
      {"unrecognised line", head + key + rest + "garbage\n", "unrecognised"},
      {"FAIL in an encrypt file", head + key + rest + "FAIL\n", "needs PT and no FAIL"},
      {"malformed section", "[Keylen 256\n", "malformed section"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const CavpFile f = parse_cavp(c.text, "inline", CavpKind::kEncrypt);
    EXPECT_TRUE(std::any_of(f.errors.begin(), f.errors.end(),
                            [&](const std::string& e) { return e.find(c.want_error) != std::string::npos; }))
        << "errors:\n" << join(f.errors);
  }
  // The twin: the same text, well formed, has no errors.
  EXPECT_TRUE(parse_cavp(head + key + rest, "inline", CavpKind::kEncrypt).errors.empty());
}

// ---- AES-256-GCM against CAVP -------------------------------------------------------------------

TEST(AesGcmCavpTest, EncryptVectorsSealToCiphertextAndTag) {
  const CavpFile& f = encrypt_file();
  ASSERT_TRUE(f.found);
  ASSERT_EQ(f.vectors.size(), kEncryptVectorCount);
  size_t checked = 0;
  for (const auto& v : f.vectors) {
    SCOPED_TRACE(v.where);
    const Bytes& key = v.field("Key");
    const Bytes& iv = v.field("IV");
    const Bytes& aad = v.field("AAD");
    const Bytes& pt = v.field("PT");
    const Bytes want = concat(v.field("CT"), v.field("Tag"));

    auto one_shot = crypto::aes256gcm_seal(key, iv, aad, pt);
    ASSERT_TRUE(Succeeds(one_shot));
    EXPECT_EQ(to_hex(*one_shot), to_hex(want));

    auto gcm = crypto::AesGcm::create(key);
    ASSERT_TRUE(Succeeds(gcm));
    Bytes out(pt.size() + crypto::kGcmTagSize, std::byte{0xAA});
    ASSERT_TRUE(Succeeds(gcm->seal(iv, aad, pt, out)));
    EXPECT_EQ(to_hex(out), to_hex(want));
    ++checked;
  }
  EXPECT_EQ(checked, kEncryptVectorCount);
}

TEST(AesGcmCavpTest, EncryptVectorsOpenToPlaintext) {
  const CavpFile& f = encrypt_file();
  ASSERT_EQ(f.vectors.size(), kEncryptVectorCount);
  for (const auto& v : f.vectors) {
    SCOPED_TRACE(v.where);
    const Bytes& key = v.field("Key");
    const Bytes& pt = v.field("PT");
    const Bytes sealed = concat(v.field("CT"), v.field("Tag"));

    auto one_shot = crypto::aes256gcm_open(key, v.field("IV"), v.field("AAD"), sealed);
    ASSERT_TRUE(Succeeds(one_shot));
    EXPECT_EQ(to_hex(one_shot->span()), to_hex(pt));

    auto gcm = crypto::AesGcm::create(key);
    ASSERT_TRUE(Succeeds(gcm));
    Bytes out(pt.size(), std::byte{0xAA});
    ASSERT_TRUE(Succeeds(gcm->open(v.field("IV"), v.field("AAD"), sealed, out)));
    EXPECT_EQ(to_hex(out), to_hex(pt));
  }
}

TEST(AesGcmCavpTest, DecryptVectorsOpenOrFailWithZeroedOutput) {
  const CavpFile& f = decrypt_file();
  ASSERT_TRUE(f.found);
  ASSERT_EQ(f.vectors.size(), kDecryptVectorCount);
  size_t passed = 0;
  size_t failed = 0;
  for (const auto& v : f.vectors) {
    SCOPED_TRACE(v.where);
    const Bytes sealed = concat(v.field("CT"), v.field("Tag"));
    auto gcm = crypto::AesGcm::create(v.field("Key"));
    ASSERT_TRUE(Succeeds(gcm));
    Bytes out(v.field("CT").size(), std::byte{0xAA});
    auto opened = gcm->open(v.field("IV"), v.field("AAD"), sealed, out);
    auto one_shot = crypto::aes256gcm_open(v.field("Key"), v.field("IV"), v.field("AAD"), sealed);
    if (v.fail) {
      EXPECT_TRUE(FailsWith(opened, ErrorCode::kAuth));
      EXPECT_TRUE(all_bytes_are(out, std::byte{0})) << "output not zeroed: " << to_hex(out);
      EXPECT_TRUE(FailsWith(one_shot, ErrorCode::kAuth));
      ++failed;
    } else {
      EXPECT_TRUE(Succeeds(opened));
      EXPECT_EQ(to_hex(out), to_hex(v.field("PT")));
      ASSERT_TRUE(Succeeds(one_shot));
      EXPECT_EQ(to_hex(one_shot->span()), to_hex(v.field("PT")));
      ++passed;
    }
  }
  EXPECT_EQ(failed, kDecryptFailCount);
  EXPECT_EQ(passed, kDecryptVectorCount - kDecryptFailCount);
}

TEST(AesGcmCavpTest, AnyFlippedBitFailsAndZeroesOutput) {
  const CavpFile& f = encrypt_file();
  ASSERT_EQ(f.vectors.size(), kEncryptVectorCount);
  size_t tampered = 0;
  for (const auto& v : f.vectors) {
    SCOPED_TRACE(v.where);
    const Bytes& iv = v.field("IV");
    const Bytes& aad = v.field("AAD");
    const Bytes sealed = concat(v.field("CT"), v.field("Tag"));
    const size_t ct_len = v.field("CT").size();
    auto gcm = crypto::AesGcm::create(v.field("Key"));
    ASSERT_TRUE(Succeeds(gcm));

    struct Case {
      std::string name;
      Bytes nonce, aad, sealed;
    };
    std::vector<Case> cases = {
        {"tag first bit", iv, aad, flip_bit(sealed, ct_len, 0)},
        {"tag last bit", iv, aad, flip_bit(sealed, sealed.size() - 1, 7)},
        {"nonce first bit", flip_bit(iv, 0, 0), aad, sealed},
        {"nonce last bit", flip_bit(iv, iv.size() - 1, 7), aad, sealed},
        {"AAD extended", iv, concat(aad, Bytes{std::byte{0}}), sealed},
    };
    if (ct_len > 0) {
      cases.push_back({"ciphertext first bit", iv, aad, flip_bit(sealed, 0, 0)});
      cases.push_back({"ciphertext last bit", iv, aad, flip_bit(sealed, ct_len - 1, 7)});
    }
    if (!aad.empty()) {
      cases.push_back({"AAD first bit", iv, flip_bit(aad, 0, 0), sealed});
      cases.push_back({"AAD last bit", iv, flip_bit(aad, aad.size() - 1, 7), sealed});
      cases.push_back({"AAD dropped", iv, Bytes{}, sealed});
    }
    for (const auto& c : cases) {
      SCOPED_TRACE(c.name);
      Bytes out(ct_len, std::byte{0xAA});
      EXPECT_TRUE(FailsWith(gcm->open(c.nonce, c.aad, c.sealed, out), ErrorCode::kAuth));
      EXPECT_TRUE(all_bytes_are(out, std::byte{0})) << to_hex(out);
      EXPECT_TRUE(FailsWith(crypto::aes256gcm_open(v.field("Key"), c.nonce, c.aad, c.sealed), ErrorCode::kAuth));
      ++tampered;
    }
    // The twin, on the same context after all those failures: the untouched message opens.
    Bytes out(ct_len, std::byte{0xAA});
    EXPECT_TRUE(Succeeds(gcm->open(iv, aad, sealed, out)));
    EXPECT_EQ(to_hex(out), to_hex(v.field("PT")));
  }
  EXPECT_GE(tampered, 5 * kEncryptVectorCount);
}

TEST(AesGcmCavpTest, WrongKeyFails) {
  const CavpFile& f = decrypt_file();
  ASSERT_EQ(f.vectors.size(), kDecryptVectorCount);
  const CavpVector& v = f.vectors.front();
  ASSERT_FALSE(v.fail);
  const Bytes sealed = concat(v.field("CT"), v.field("Tag"));
  EXPECT_TRUE(Succeeds(crypto::aes256gcm_open(v.field("Key"), v.field("IV"), v.field("AAD"), sealed)));
  EXPECT_TRUE(FailsWith(crypto::aes256gcm_open(flip_bit(v.field("Key"), 31, 7), v.field("IV"), v.field("AAD"), sealed),
                        ErrorCode::kAuth));
}

// ---- AES-256-GCM argument checks and context use ------------------------------------------------

TEST(AesGcmTest, KeyAndNonceSizes) {
  struct Case {
    std::string name;
    size_t key_size;
    size_t nonce_size;
    std::optional<ErrorCode> want_error;
  };
  const std::vector<Case> cases = {
      {"32-byte key, 12-byte nonce", 32, 12, std::nullopt},
      {"31-byte key", 31, 12, ErrorCode::kInvalidArgument},
      {"33-byte key", 33, 12, ErrorCode::kInvalidArgument},
      {"16-byte key (AES-128)", 16, 12, ErrorCode::kInvalidArgument},
      {"empty key", 0, 12, ErrorCode::kInvalidArgument},
      {"11-byte nonce", 32, 11, ErrorCode::kInvalidArgument},
      {"13-byte nonce", 32, 13, ErrorCode::kInvalidArgument},
      {"16-byte nonce", 32, 16, ErrorCode::kInvalidArgument},
      {"empty nonce", 32, 0, ErrorCode::kInvalidArgument},
  };
  const Bytes pt = testing::pattern_bytes(40, 1);
  const Bytes aad = to_bytes("header");
  // A genuine message to open with each key/nonce size.
  const Bytes good_key = testing::pattern_bytes(32, 2);
  const Bytes good_nonce = testing::pattern_bytes(12, 3);
  auto sealed = crypto::aes256gcm_seal(good_key, good_nonce, aad, pt);
  ASSERT_TRUE(Succeeds(sealed));

  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const Bytes key = c.key_size == 32 ? good_key : testing::pattern_bytes(c.key_size, 2);
    const Bytes nonce = c.nonce_size == 12 ? good_nonce : testing::pattern_bytes(c.nonce_size, 3);
    auto s = crypto::aes256gcm_seal(key, nonce, aad, pt);
    auto o = crypto::aes256gcm_open(key, nonce, aad, *sealed);
    auto g = crypto::AesGcm::create(key);
    if (!c.want_error) {
      ASSERT_TRUE(Succeeds(s));
      EXPECT_EQ(to_hex(*s), to_hex(*sealed));
      ASSERT_TRUE(Succeeds(o));
      EXPECT_EQ(to_hex(o->span()), to_hex(pt));
      EXPECT_TRUE(Succeeds(g));
      continue;
    }
    EXPECT_TRUE(FailsWith(s, *c.want_error));
    EXPECT_TRUE(FailsWith(o, *c.want_error));
    if (c.key_size != 32) {
      EXPECT_TRUE(FailsWith(g, *c.want_error));
      continue;
    }
    ASSERT_TRUE(Succeeds(g));
    Bytes out(pt.size() + crypto::kGcmTagSize);
    EXPECT_TRUE(FailsWith(g->seal(nonce, aad, pt, out), *c.want_error));
    Bytes plain(pt.size());
    EXPECT_TRUE(FailsWith(g->open(nonce, aad, *sealed, plain), *c.want_error));
    EXPECT_TRUE(FailsWith(g->tag_of_ciphertext(nonce, ByteSpan(*sealed).first(pt.size())), *c.want_error));
  }
}

TEST(AesGcmTest, BufferSizes) {
  auto g = crypto::AesGcm::create(testing::pattern_bytes(32, 4));
  ASSERT_TRUE(Succeeds(g));
  const Bytes nonce(12);
  const Bytes pt = testing::pattern_bytes(20, 5);
  Bytes exact(pt.size() + 16);
  EXPECT_TRUE(Succeeds(g->seal(nonce, {}, pt, exact)));
  Bytes short_out(pt.size() + 15);
  EXPECT_TRUE(FailsWith(g->seal(nonce, {}, pt, short_out), ErrorCode::kInvalidArgument));
  Bytes long_out(pt.size() + 17);
  EXPECT_TRUE(FailsWith(g->seal(nonce, {}, pt, long_out), ErrorCode::kInvalidArgument));

  Bytes plain(pt.size());
  EXPECT_TRUE(Succeeds(g->open(nonce, {}, exact, plain)));
  Bytes plain_short(pt.size() - 1);
  EXPECT_TRUE(FailsWith(g->open(nonce, {}, exact, plain_short), ErrorCode::kInvalidArgument));
  Bytes none;
  EXPECT_TRUE(FailsWith(g->open(nonce, {}, ByteSpan(exact).first(15), none), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(crypto::aes256gcm_open(Bytes(32), nonce, {}, ByteSpan(exact).first(15)),
                        ErrorCode::kInvalidArgument));
  // Exactly a tag and no ciphertext is a valid shape (it just does not authenticate here).
  EXPECT_TRUE(FailsWith(crypto::aes256gcm_open(Bytes(32), nonce, {}, ByteSpan(exact).first(16)), ErrorCode::kAuth));
}

TEST(AesGcmTest, SealInPlaceMatchesSealToSeparateBuffer) {
  const CavpFile& f = encrypt_file();
  ASSERT_EQ(f.vectors.size(), kEncryptVectorCount);
  const CavpVector& v = f.vectors[6];  // PTlen = 408, AADlen = 160
  ASSERT_EQ(v.field("PT").size(), 51u);
  auto g = crypto::AesGcm::create(v.field("Key"));
  ASSERT_TRUE(Succeeds(g));
  Bytes buf = v.field("PT");
  buf.resize(buf.size() + crypto::kGcmTagSize);
  const ByteSpan in = ByteSpan(buf).first(v.field("PT").size());
  ASSERT_TRUE(Succeeds(g->seal(v.field("IV"), v.field("AAD"), in, buf)));
  EXPECT_EQ(to_hex(buf), to_hex(concat(v.field("CT"), v.field("Tag"))));

  // And back, in place: ciphertext ‖ tag → plaintext in the first bytes of the same buffer.
  ASSERT_TRUE(Succeeds(g->open(v.field("IV"), v.field("AAD"), buf, MutableByteSpan(buf).first(in.size()))));
  EXPECT_EQ(to_hex(ByteSpan(buf).first(in.size())), to_hex(v.field("PT")));
}

TEST(AesGcmTest, ContextSealsManyMessagesIndependently) {
  auto g = crypto::AesGcm::create(testing::pattern_bytes(32, 6));
  ASSERT_TRUE(Succeeds(g));
  const Bytes pt = testing::pattern_bytes(100, 7);
  Bytes n0(12), n1(12);
  n1[11] = std::byte{1};
  Bytes a(116), b(116), c(116);
  ASSERT_TRUE(Succeeds(g->seal(n0, {}, pt, a)));
  ASSERT_TRUE(Succeeds(g->seal(n1, {}, pt, b)));
  ASSERT_TRUE(Succeeds(g->seal(n0, {}, pt, c)));
  EXPECT_EQ(to_hex(a), to_hex(c));  // same nonce, same key: same output
  EXPECT_NE(to_hex(a), to_hex(b));  // another nonce: another output
}

TEST(AesGcmTest, TagOfCiphertextMatchesTagWhenThereIsNoAad) {
  const CavpFile& f = encrypt_file();
  ASSERT_EQ(f.vectors.size(), kEncryptVectorCount);
  size_t without_aad = 0;
  size_t with_aad = 0;
  for (const auto& v : f.vectors) {
    SCOPED_TRACE(v.where);
    auto g = crypto::AesGcm::create(v.field("Key"));
    ASSERT_TRUE(Succeeds(g));
    auto tag = g->tag_of_ciphertext(v.field("IV"), v.field("CT"));
    ASSERT_TRUE(Succeeds(tag));
    if (v.field("AAD").empty()) {
      EXPECT_EQ(to_hex(*tag), to_hex(v.field("Tag")));
      ++without_aad;
    } else {
      EXPECT_NE(to_hex(*tag), to_hex(v.field("Tag")));  // the vector's tag also covers its AAD
      ++with_aad;
    }
    auto other = g->tag_of_ciphertext(flip_bit(v.field("IV"), 0, 0), v.field("CT"));
    ASSERT_TRUE(Succeeds(other));
    EXPECT_NE(to_hex(*other), to_hex(*tag));
  }
  EXPECT_EQ(without_aad, 5u);
  EXPECT_EQ(with_aad, 6u);
}

TEST(AesGcmTest, EncryptBlocksFips197AppendixC3) {
  auto g = crypto::AesGcm::create(hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"));
  ASSERT_TRUE(Succeeds(g));
  Bytes blocks = hex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff");
  ASSERT_TRUE(Succeeds(g->encrypt_blocks(blocks)));
  EXPECT_EQ(to_hex(blocks), "8ea2b7ca516745bfeafc49904b4960898ea2b7ca516745bfeafc49904b496089");
  Bytes partial(17);
  EXPECT_TRUE(FailsWith(g->encrypt_blocks(partial), ErrorCode::kInvalidArgument));
  Bytes none;
  EXPECT_TRUE(Succeeds(g->encrypt_blocks(none)));
}

// ---- hashes, HMAC, HKDF ---------------------------------------------------------------------------

TEST(DigestTest, KnownAnswers) {
  struct Case {
    std::string name;
    Hash hash;
    std::string input;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"SHA-256 abc", Hash::kSha256, "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"SHA-256 empty", Hash::kSha256, "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"SHA-384 abc", Hash::kSha384, "abc",
       "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7"},
      {"SHA-384 empty", Hash::kSha384, "",
       "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto d = crypto::digest(c.hash, as_bytes(c.input));
    ASSERT_TRUE(Succeeds(d));
    EXPECT_EQ(d->size(), crypto::hash_size(c.hash));
    EXPECT_EQ(to_hex(*d), c.want);
    // The twin: one more byte of input, another digest.
    auto other = crypto::digest(c.hash, as_bytes(c.input + "d"));
    ASSERT_TRUE(Succeeds(other));
    EXPECT_NE(to_hex(*other), c.want);
  }
  auto s256 = crypto::sha256(as_bytes("abc"));
  ASSERT_TRUE(Succeeds(s256));
  EXPECT_EQ(to_hex(*s256), cases[0].want);
  auto s384 = crypto::sha384(as_bytes("abc"));
  ASSERT_TRUE(Succeeds(s384));
  EXPECT_EQ(to_hex(*s384), cases[2].want);
  EXPECT_EQ(crypto::hash_size(Hash::kSha256), 32u);
  EXPECT_EQ(crypto::hash_size(Hash::kSha384), 48u);
}

TEST(HmacTest, Rfc4231AndEmptyKey) {
  struct Case {
    std::string name;
    Hash hash;
    Bytes key;
    std::string data;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"RFC 4231 TC1 SHA-256", Hash::kSha256, Bytes(20, std::byte{0x0b}), "Hi There",
       "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
      {"RFC 4231 TC1 SHA-384", Hash::kSha384, Bytes(20, std::byte{0x0b}), "Hi There",
       "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6"},
      {"RFC 4231 TC2 SHA-256", Hash::kSha256, to_bytes("Jefe"), "what do ya want for nothing?",
       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
      {"RFC 4231 TC2 SHA-384", Hash::kSha384, to_bytes("Jefe"), "what do ya want for nothing?",
       "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649"},
      {"empty key and data SHA-256", Hash::kSha256, Bytes{}, "",
       "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto mac = crypto::hmac(c.hash, c.key, as_bytes(c.data));
    ASSERT_TRUE(Succeeds(mac));
    EXPECT_EQ(to_hex(*mac), c.want);
    // The twins: another key, or other data, give another MAC. (Not key ‖ 00: HMAC pads the key
    // with zeros to the block size, so that is the same key.)
    auto other_key = crypto::hmac(c.hash, concat(c.key, Bytes{std::byte{1}}), as_bytes(c.data));
    ASSERT_TRUE(Succeeds(other_key));
    EXPECT_NE(to_hex(*other_key), c.want);
    auto other_data = crypto::hmac(c.hash, c.key, as_bytes(c.data + "."));
    ASSERT_TRUE(Succeeds(other_data));
    EXPECT_NE(to_hex(*other_data), c.want);
  }
}

TEST(HkdfTest, Rfc5869KnownAnswersAndLengthLimits) {
  struct Case {
    std::string name;
    Hash hash;
    Bytes ikm, salt, info;
    size_t length;
    std::string want;  // hex OKM; empty when only the length is checked
    std::optional<ErrorCode> want_error;
  };
  const Bytes ikm(22, std::byte{0x0b});
  const Bytes salt = hex("000102030405060708090a0b0c");
  const Bytes info = hex("f0f1f2f3f4f5f6f7f8f9");
  const std::vector<Case> cases = {
      {"RFC 5869 TC1", Hash::kSha256, ikm, salt, info, 42,
       "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865", std::nullopt},
      {"RFC 5869 TC3 (no salt, no info)", Hash::kSha256, ikm, {}, {}, 42,
       "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8", std::nullopt},
      {"SHA-256 length 0", Hash::kSha256, ikm, salt, info, 0, "", ErrorCode::kInvalidArgument},
      {"SHA-256 length 1", Hash::kSha256, ikm, salt, info, 1, "3c", std::nullopt},
      {"SHA-256 length 255*32", Hash::kSha256, ikm, salt, info, 255 * 32, "", std::nullopt},
      {"SHA-256 length 255*32+1", Hash::kSha256, ikm, salt, info, 255 * 32 + 1, "", ErrorCode::kInvalidArgument},
      {"SHA-384 length 0", Hash::kSha384, ikm, salt, info, 0, "", ErrorCode::kInvalidArgument},
      {"SHA-384 length 255*48", Hash::kSha384, ikm, salt, info, 255 * 48, "", std::nullopt},
      {"SHA-384 length 255*48+1", Hash::kSha384, ikm, salt, info, 255 * 48 + 1, "", ErrorCode::kInvalidArgument},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto okm = crypto::hkdf(c.hash, c.ikm, c.salt, c.info, c.length);
    if (c.want_error) {
      EXPECT_TRUE(FailsWith(okm, *c.want_error));
      continue;
    }
    ASSERT_TRUE(Succeeds(okm));
    EXPECT_EQ(okm->size(), c.length);
    if (!c.want.empty()) {
      EXPECT_EQ(to_hex(okm->span()), c.want);
    }
  }
  // TC1 and TC3 differ only in salt and info: each input matters.
  auto tc1_without_info = crypto::hkdf(Hash::kSha256, ikm, salt, {}, 42);
  ASSERT_TRUE(Succeeds(tc1_without_info));
  EXPECT_NE(to_hex(tc1_without_info->span()), cases[0].want);
}

TEST(HkdfTest, Sha384IsDeterministicAndSeparatesInputs) {
  const Bytes ikm = testing::pattern_bytes(32, 8);
  const Bytes salt = to_bytes("salt");
  auto a = crypto::hkdf(Hash::kSha384, ikm, salt, as_bytes("tresor test a"), 48);
  auto a_again = crypto::hkdf(Hash::kSha384, ikm, salt, as_bytes("tresor test a"), 48);
  auto b = crypto::hkdf(Hash::kSha384, ikm, salt, as_bytes("tresor test b"), 48);
  auto other_salt = crypto::hkdf(Hash::kSha384, ikm, as_bytes("salt2"), as_bytes("tresor test a"), 48);
  auto long_a = crypto::hkdf(Hash::kSha384, ikm, salt, as_bytes("tresor test a"), 100);
  auto sha256_a = crypto::hkdf(Hash::kSha256, ikm, salt, as_bytes("tresor test a"), 48);
  for (const auto* r : {&a, &a_again, &b, &other_salt, &long_a, &sha256_a}) ASSERT_TRUE(Succeeds(*r));
  EXPECT_EQ(a->size(), 48u);
  EXPECT_EQ(long_a->size(), 100u);
  EXPECT_EQ(to_hex(a->span()), to_hex(a_again->span()));
  EXPECT_NE(to_hex(a->span()), to_hex(b->span()));
  EXPECT_NE(to_hex(a->span()), to_hex(other_salt->span()));
  EXPECT_NE(to_hex(a->span()), to_hex(sha256_a->span()));
  // HKDF-Expand output is a prefix of any longer output with the same inputs (RFC 5869 §2.3).
  EXPECT_EQ(to_hex(long_a->span().first(48)), to_hex(a->span()));
  EXPECT_FALSE(all_bytes_are(a->span(), std::byte{0}));
}

// ---- X25519 ---------------------------------------------------------------------------------------

constexpr std::string_view kAlicePrivate = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
constexpr std::string_view kAlicePublic = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";
constexpr std::string_view kBobPrivate = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
constexpr std::string_view kBobPublic = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
constexpr std::string_view kAliceBobShared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742";

TEST(X25519Test, Rfc7748Section6_1) {
  auto alice = Key::from_private(KeyType::kX25519, hex(kAlicePrivate));
  auto bob = Key::from_private(KeyType::kX25519, hex(kBobPrivate));
  ASSERT_TRUE(Succeeds(alice));
  ASSERT_TRUE(Succeeds(bob));
  auto alice_pub_raw = alice->public_raw();
  auto bob_pub_raw = bob->public_raw();
  ASSERT_TRUE(Succeeds(alice_pub_raw));
  ASSERT_TRUE(Succeeds(bob_pub_raw));
  EXPECT_EQ(to_hex(*alice_pub_raw), kAlicePublic);
  EXPECT_EQ(to_hex(*bob_pub_raw), kBobPublic);
  auto alice_priv_raw = alice->private_raw();
  ASSERT_TRUE(Succeeds(alice_priv_raw));
  EXPECT_EQ(to_hex(alice_priv_raw->span()), kAlicePrivate);

  auto alice_pub = Key::from_public(KeyType::kX25519, hex(kAlicePublic));
  auto bob_pub = Key::from_public(KeyType::kX25519, hex(kBobPublic));
  ASSERT_TRUE(Succeeds(alice_pub));
  ASSERT_TRUE(Succeeds(bob_pub));
  EXPECT_FALSE(bob_pub->has_private());
  auto ab = crypto::derive_shared(*alice, *bob_pub);
  auto ba = crypto::derive_shared(*bob, *alice_pub);
  ASSERT_TRUE(Succeeds(ab));
  ASSERT_TRUE(Succeeds(ba));
  EXPECT_EQ(to_hex(ab->span()), kAliceBobShared);
  EXPECT_EQ(to_hex(ba->span()), kAliceBobShared);

  // The twin: agreeing with the wrong peer (Alice with herself) gives another secret.
  auto aa = crypto::derive_shared(*alice, *alice_pub);
  ASSERT_TRUE(Succeeds(aa));
  EXPECT_NE(to_hex(aa->span()), kAliceBobShared);
}

TEST(X25519Test, LowOrderPeerKeysAreRejected) {
  auto alice = Key::from_private(KeyType::kX25519, hex(kAlicePrivate));
  ASSERT_TRUE(Succeeds(alice));
  struct Case {
    std::string name;
    std::string peer;
    std::optional<ErrorCode> want_error;
  };
  const std::vector<Case> cases = {
      {"Bob (valid)", std::string(kBobPublic), std::nullopt},
      {"all zero (u = 0)", std::string(64, '0'), ErrorCode::kInvalidArgument},
      {"u = 1", "01" + std::string(62, '0'), ErrorCode::kInvalidArgument},
      {"order-8 point", "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
       ErrorCode::kInvalidArgument},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto peer = Key::from_public(KeyType::kX25519, hex(c.peer));
    ASSERT_TRUE(Succeeds(peer));
    auto shared = crypto::derive_shared(*alice, *peer);
    if (c.want_error) {
      EXPECT_TRUE(FailsWith(shared, *c.want_error));
    } else {
      EXPECT_TRUE(Succeeds(shared));
    }
  }
}

TEST(KeyTest, RawSizesAndMisuse) {
  struct Case {
    std::string name;
    KeyType type;
    bool is_private;
    size_t size;
    std::optional<ErrorCode> want_error;
  };
  const std::vector<Case> cases = {
      {"X25519 private 32", KeyType::kX25519, true, 32, std::nullopt},
      {"X25519 private 31", KeyType::kX25519, true, 31, ErrorCode::kInvalidArgument},
      {"X25519 public 32", KeyType::kX25519, false, 32, std::nullopt},
      {"X25519 public 33", KeyType::kX25519, false, 33, ErrorCode::kInvalidArgument},
      {"Ed25519 private 32", KeyType::kEd25519, true, 32, std::nullopt},
      {"Ed25519 private 64", KeyType::kEd25519, true, 64, ErrorCode::kInvalidArgument},
      {"Ed25519 public 0", KeyType::kEd25519, false, 0, ErrorCode::kInvalidArgument},
      {"P-256 private 32", KeyType::kP256, true, 32, std::nullopt},
      {"P-256 private 31", KeyType::kP256, true, 31, ErrorCode::kInvalidArgument},
      {"P-256 private 48", KeyType::kP256, true, 48, ErrorCode::kInvalidArgument},
      {"P-384 private 48", KeyType::kP384, true, 48, std::nullopt},
      {"P-384 private 32", KeyType::kP384, true, 32, ErrorCode::kInvalidArgument},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const Bytes raw = testing::pattern_bytes(c.size, 9);  // never zero, below both group orders
    auto k = c.is_private ? Key::from_private(c.type, raw) : Key::from_public(c.type, raw);
    if (c.want_error) {
      EXPECT_TRUE(FailsWith(k, *c.want_error));
    } else {
      ASSERT_TRUE(Succeeds(k));
      EXPECT_EQ(k->type(), c.type);
      EXPECT_EQ(k->has_private(), c.is_private);
    }
  }

  auto x = Key::generate(KeyType::kX25519);
  auto ed = Key::generate(KeyType::kEd25519);
  auto p256 = Key::generate(KeyType::kP256);
  auto p384 = Key::generate(KeyType::kP384);
  for (const auto* k : {&x, &ed, &p256, &p384}) ASSERT_TRUE(Succeeds(*k));
  auto x_pub = Key::from_public(KeyType::kX25519, *x->public_raw());
  ASSERT_TRUE(Succeeds(x_pub));
  EXPECT_TRUE(FailsWith(x_pub->private_raw(), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(crypto::derive_shared(*x_pub, *x), ErrorCode::kInvalidArgument));  // no private half
  EXPECT_TRUE(Succeeds(crypto::derive_shared(*x, *x_pub)));
  EXPECT_TRUE(FailsWith(crypto::derive_shared(*p256, *p384), ErrorCode::kInvalidArgument));  // mixed curves
  EXPECT_TRUE(FailsWith(crypto::derive_shared(*ed, *ed), ErrorCode::kInvalidArgument));      // signing key
  EXPECT_TRUE(FailsWith(crypto::sign(*x, as_bytes("m")), ErrorCode::kInvalidArgument));      // agreement key
  EXPECT_TRUE(FailsWith(crypto::verify(*x, as_bytes("m"), Bytes(64)), ErrorCode::kInvalidArgument));
  auto ed_pub = Key::from_public(KeyType::kEd25519, *ed->public_raw());
  ASSERT_TRUE(Succeeds(ed_pub));
  EXPECT_TRUE(FailsWith(crypto::sign(*ed_pub, as_bytes("m")), ErrorCode::kInvalidArgument));  // no private half
  EXPECT_TRUE(Succeeds(crypto::sign(*ed, as_bytes("m"))));
}

TEST(KeyTest, TypeNamesAreDistinct) {
  const std::vector<std::string_view> names = {
      crypto::key_type_name(KeyType::kX25519), crypto::key_type_name(KeyType::kEd25519),
      crypto::key_type_name(KeyType::kP256), crypto::key_type_name(KeyType::kP384)};
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_FALSE(names[i].empty());
    for (size_t j = i + 1; j < names.size(); ++j) EXPECT_NE(names[i], names[j]);
  }
  EXPECT_EQ(crypto::key_type_name(KeyType::kP384), "P-384");
}

// ---- P-256 / P-384 ECDH -----------------------------------------------------------------------------

struct Curve {
  KeyType type;
  size_t scalar;
  std::string_view generator;  // uncompressed SEC1 encoding of G (SEC 2 §2.4.2 / §2.5.1)
  std::string_view order;      // group order n, big-endian
};

const std::vector<Curve>& curves() {
  static const std::vector<Curve> kCurves = {
      {KeyType::kP256, 32,
       "046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
       "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5",
       "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551"},
      {KeyType::kP384, 48,
       "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e3872760ab7"
       "3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e819d7a431d7c90ea0e5f",
       "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973"},
  };
  return kCurves;
}

Bytes minus_one(Bytes big_endian) {
  for (size_t i = big_endian.size(); i-- > 0;) {
    const bool borrow = big_endian[i] == std::byte{0};
    big_endian[i] = std::byte(static_cast<unsigned char>(std::to_integer<unsigned>(big_endian[i]) - 1u));
    if (!borrow) break;
  }
  return big_endian;
}

TEST(EcdhTest, GeneratedKeysAgree) {
  for (const auto& curve : curves()) {
    SCOPED_TRACE(std::string(crypto::key_type_name(curve.type)));
    auto a = Key::generate(curve.type);
    auto b = Key::generate(curve.type);
    auto c = Key::generate(curve.type);
    for (const auto* k : {&a, &b, &c}) ASSERT_TRUE(Succeeds(*k));
    EXPECT_TRUE(a->has_private());
    auto ab = crypto::derive_shared(*a, *b);
    auto ba = crypto::derive_shared(*b, *a);
    auto ac = crypto::derive_shared(*a, *c);
    for (const auto* s : {&ab, &ba, &ac}) ASSERT_TRUE(Succeeds(*s));
    EXPECT_EQ(ab->size(), curve.scalar);  // the x-coordinate
    EXPECT_EQ(to_hex(ab->span()), to_hex(ba->span()));
    EXPECT_NE(to_hex(ab->span()), to_hex(ac->span()));
  }
}

TEST(EcdhTest, PublicKeyEncodingRoundTripsAndOffCurvePointsAreRejected) {
  for (const auto& curve : curves()) {
    SCOPED_TRACE(std::string(crypto::key_type_name(curve.type)));
    auto a = Key::generate(curve.type);
    auto b = Key::generate(curve.type);
    ASSERT_TRUE(Succeeds(a));
    ASSERT_TRUE(Succeeds(b));
    auto raw = a->public_raw();
    ASSERT_TRUE(Succeeds(raw));
    ASSERT_EQ(raw->size(), 1 + 2 * curve.scalar);
    EXPECT_EQ((*raw)[0], std::byte{0x04});

    auto imported = Key::from_public(curve.type, *raw);
    ASSERT_TRUE(Succeeds(imported));
    EXPECT_FALSE(imported->has_private());
    auto again = imported->public_raw();
    ASSERT_TRUE(Succeeds(again));
    EXPECT_EQ(to_hex(*again), to_hex(*raw));
    auto via_import = crypto::derive_shared(*b, *imported);
    auto direct = crypto::derive_shared(*b, *a);
    ASSERT_TRUE(Succeeds(via_import));
    ASSERT_TRUE(Succeeds(direct));
    EXPECT_EQ(to_hex(via_import->span()), to_hex(direct->span()));

    struct Case {
      std::string name;
      Bytes raw;
    };
    const Bytes compressed = [&] {
      Bytes c(raw->begin(), raw->begin() + 1 + static_cast<std::ptrdiff_t>(curve.scalar));
      c[0] = std::byte(0x02 | (std::to_integer<unsigned>(raw->back()) & 1u));
      return c;
    }();
    const std::vector<Case> bad = {
        {"Y last byte flipped (off the curve)", flip_bit(*raw, raw->size() - 1, 0)},
        {"Y first byte flipped (off the curve)", flip_bit(*raw, 1 + curve.scalar, 3)},
        {"X flipped (off the curve)", flip_bit(*raw, 1, 0)},
        {"one byte short", Bytes(raw->begin(), raw->end() - 1)},
        {"one byte long", concat(*raw, Bytes{std::byte{0}})},
        {"prefix 05", [&] { Bytes r = *raw; r[0] = std::byte{0x05}; return r; }()},
        {"compressed form", compressed},
        {"empty", Bytes{}},
        {"all zero", Bytes(raw->size())},
    };
    for (const auto& c : bad) {
      SCOPED_TRACE(c.name);
      EXPECT_TRUE(FailsWith(Key::from_public(curve.type, c.raw), ErrorCode::kInvalidArgument));
    }
  }
}

TEST(EcdhTest, PrivateKeyImport) {
  for (const auto& curve : curves()) {
    SCOPED_TRACE(std::string(crypto::key_type_name(curve.type)));
    auto a = Key::generate(curve.type);
    ASSERT_TRUE(Succeeds(a));
    auto priv = a->private_raw();
    ASSERT_TRUE(Succeeds(priv));
    EXPECT_EQ(priv->size(), curve.scalar);
    auto reimported = Key::from_private(curve.type, priv->span());
    ASSERT_TRUE(Succeeds(reimported));
    EXPECT_TRUE(reimported->has_private());
    EXPECT_EQ(to_hex(*reimported->public_raw()), to_hex(*a->public_raw()));
    auto priv_again = reimported->private_raw();
    ASSERT_TRUE(Succeeds(priv_again));
    EXPECT_EQ(to_hex(priv_again->span()), to_hex(priv->span()));
    // The twin: a scalar one bit off gives another public key.
    auto other = Key::from_private(curve.type, flip_bit(priv->span(), curve.scalar - 1, 0));
    ASSERT_TRUE(Succeeds(other));
    EXPECT_NE(to_hex(*other->public_raw()), to_hex(*a->public_raw()));

    // Known answer: scalar 1 is the generator.
    Bytes one(curve.scalar);
    one.back() = std::byte{1};
    auto g = Key::from_private(curve.type, one);
    ASSERT_TRUE(Succeeds(g));
    EXPECT_EQ(to_hex(*g->public_raw()), curve.generator);

    // Scalars must lie in 1..n-1.
    const Bytes order = hex(curve.order);
    EXPECT_TRUE(FailsWith(Key::from_private(curve.type, Bytes(curve.scalar)), ErrorCode::kInvalidArgument));
    EXPECT_TRUE(FailsWith(Key::from_private(curve.type, order), ErrorCode::kInvalidArgument));
    EXPECT_TRUE(FailsWith(Key::from_private(curve.type, Bytes(curve.scalar, std::byte{0xff})),
                          ErrorCode::kInvalidArgument));
    auto n_minus_1 = Key::from_private(curve.type, minus_one(order));
    ASSERT_TRUE(Succeeds(n_minus_1));
    // (n-1)·G = -G: same x as G, so the first 1 + scalar bytes match.
    EXPECT_EQ(to_hex(ByteSpan(*n_minus_1->public_raw()).first(1 + curve.scalar)),
              curve.generator.substr(0, 2 + 2 * curve.scalar));
    EXPECT_NE(to_hex(*n_minus_1->public_raw()), curve.generator);
  }
}

// ---- Ed25519 ----------------------------------------------------------------------------------------

TEST(Ed25519Test, Rfc8032Section7_1) {
  struct Case {
    std::string name;
    std::string secret, pub, message, signature;
  };
  const std::vector<Case> cases = {
      {"TEST 1", "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
       "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
       "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"},
      {"TEST 2", "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
       "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
       "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto priv = Key::from_private(KeyType::kEd25519, hex(c.secret));
    ASSERT_TRUE(Succeeds(priv));
    auto pub_raw = priv->public_raw();
    ASSERT_TRUE(Succeeds(pub_raw));
    EXPECT_EQ(to_hex(*pub_raw), c.pub);
    const Bytes message = hex(c.message);
    auto sig = crypto::sign(*priv, message);
    ASSERT_TRUE(Succeeds(sig));
    EXPECT_EQ(sig->size(), crypto::kEd25519SignatureSize);
    EXPECT_EQ(to_hex(*sig), c.signature);

    auto pub = Key::from_public(KeyType::kEd25519, hex(c.pub));
    ASSERT_TRUE(Succeeds(pub));
    const Bytes want_sig = hex(c.signature);
    EXPECT_TRUE(Succeeds(crypto::verify(*pub, message, want_sig)));
    EXPECT_TRUE(Succeeds(crypto::verify(*priv, message, want_sig)));

    // Twins that must not verify.
    const Bytes other_message = message.empty() ? Bytes{std::byte{0}} : flip_bit(message, 0, 0);
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, other_message, want_sig), ErrorCode::kAuth));
    for (const size_t byte : {size_t{0}, size_t{31}, size_t{32}, size_t{63}}) {
      SCOPED_TRACE("signature byte " + std::to_string(byte));
      EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, flip_bit(want_sig, byte, 1)), ErrorCode::kAuth));
    }
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, ByteSpan(want_sig).first(63)), ErrorCode::kAuth));
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, concat(want_sig, Bytes{std::byte{0}})), ErrorCode::kAuth));
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, Bytes{}), ErrorCode::kAuth));
  }
}

// OpenSSL imports any 32 bytes as an Ed25519 public key, and its verification accepts the
// signature R = identity, S = 0 under the identity key for every message: a small-order key on a
// step roster or a user's identity would let anyone sign for it. Key::from_public refuses the
// eight small-order points (either sign bit), non-canonical encodings and non-points.
TEST(Ed25519Test, SmallOrderNonCanonicalAndOffCurvePublicKeysAreRefused) {
  struct Case {
    std::string y_le;  // little-endian, sign bit of x clear
    std::string why;
  };
  const std::vector<Case> cases = {
      {"0100000000000000000000000000000000000000000000000000000000000000", "small order"},  // the identity
      {"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "small order"},  // order 2
      {"0000000000000000000000000000000000000000000000000000000000000000", "small order"},  // order 4
      {"c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a", "small order"},  // order 8
      {"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05", "small order"},  // order 8
      {"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "not canonical"},  // y = p
      {"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "not canonical"},  // y = p + 1
      {"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "not canonical"},
      {"0200000000000000000000000000000000000000000000000000000000000000", "not a point of the curve"},  // y = 2
      {"0700000000000000000000000000000000000000000000000000000000000000", "not a point of the curve"},  // y = 7
  };
  for (const auto& c : cases) {
    for (const bool sign : {false, true}) {
      Bytes raw = hex(c.y_le);
      if (sign) raw[31] |= std::byte{0x80};
      SCOPED_TRACE(to_hex(raw));
      auto k = Key::from_public(KeyType::kEd25519, raw);
      ASSERT_FALSE(k);
      EXPECT_EQ(k.error().code, ErrorCode::kInvalidArgument);
      EXPECT_NE(k.error().message.find(c.why), std::string::npos) << k.error().message;
    }
  }
  // Points of the curve that are not small: y = 3 (either x), and every generated key.
  for (const char* ok : {"0300000000000000000000000000000000000000000000000000000000000000", "0300000000000000000000000000000000000000000000000000000000000080"}) {
    EXPECT_TRUE(Succeeds(Key::from_public(KeyType::kEd25519, hex(ok)))) << ok;
  }
  for (int i = 0; i < 50; ++i) {
    auto k = Key::generate(KeyType::kEd25519);
    ASSERT_TRUE(Succeeds(k));
    EXPECT_TRUE(Succeeds(Key::from_public(KeyType::kEd25519, *k->public_raw())));
  }
}

TEST(Ed25519Test, KeysFromOneVectorDoNotVerifyTheOther) {
  auto pub1 = Key::from_public(KeyType::kEd25519, hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"));
  ASSERT_TRUE(Succeeds(pub1));
  auto other = Key::generate(KeyType::kEd25519);
  ASSERT_TRUE(Succeeds(other));
  auto sig = crypto::sign(*other, Bytes{});
  ASSERT_TRUE(Succeeds(sig));
  EXPECT_TRUE(Succeeds(crypto::verify(*other, Bytes{}, *sig)));
  EXPECT_TRUE(FailsWith(crypto::verify(*pub1, Bytes{}, *sig), ErrorCode::kAuth));
}

// ---- ECDSA -----------------------------------------------------------------------------------------

TEST(EcdsaTest, SignVerifyAndTamper) {
  for (const auto& curve : curves()) {
    SCOPED_TRACE(std::string(crypto::key_type_name(curve.type)));
    auto key = Key::generate(curve.type);
    auto other = Key::generate(curve.type);
    ASSERT_TRUE(Succeeds(key));
    ASSERT_TRUE(Succeeds(other));
    auto pub = Key::from_public(curve.type, *key->public_raw());
    ASSERT_TRUE(Succeeds(pub));
    const Bytes message = to_bytes("attestation report digest");
    auto sig = crypto::sign(*key, message);
    ASSERT_TRUE(Succeeds(sig));
    EXPECT_EQ(sig->size(), 2 * curve.scalar);
    EXPECT_TRUE(Succeeds(crypto::verify(*pub, message, *sig)));
    EXPECT_TRUE(Succeeds(crypto::verify(*key, message, *sig)));

    EXPECT_TRUE(FailsWith(crypto::verify(*pub, flip_bit(message, 0, 0), *sig), ErrorCode::kAuth));
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, flip_bit(*sig, 0, 0)), ErrorCode::kAuth));  // r
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, flip_bit(*sig, sig->size() - 1, 0)), ErrorCode::kAuth));  // s
    EXPECT_TRUE(FailsWith(crypto::verify(*other, message, *sig), ErrorCode::kAuth));
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, ByteSpan(*sig).first(sig->size() - 1)), ErrorCode::kAuth));
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, Bytes(sig->size())), ErrorCode::kAuth));  // r = s = 0
    EXPECT_TRUE(FailsWith(crypto::verify(*pub, message, Bytes{}), ErrorCode::kAuth));
  }
}

TEST(EcdsaTest, Rfc6979P256Sha256SampleVerifies) {
  // RFC 6979 §A.2.5: P-256, SHA-256, message "sample".
  const Bytes d = hex("c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721");
  const std::string q =
      "0460fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6"
      "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299";
  const Bytes rs = hex(
      "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716"
      "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8");
  auto priv = Key::from_private(KeyType::kP256, d);
  ASSERT_TRUE(Succeeds(priv));
  EXPECT_EQ(to_hex(*priv->public_raw()), q);
  auto pub = Key::from_public(KeyType::kP256, hex(q));
  ASSERT_TRUE(Succeeds(pub));
  EXPECT_TRUE(Succeeds(crypto::verify(*pub, as_bytes("sample"), rs)));
  EXPECT_TRUE(FailsWith(crypto::verify(*pub, as_bytes("samplf"), rs), ErrorCode::kAuth));
  EXPECT_TRUE(FailsWith(crypto::verify(*pub, as_bytes("sample"), flip_bit(rs, 40, 2)), ErrorCode::kAuth));
  // The same (r, s) is not a P-384 signature.
  auto p384 = Key::generate(KeyType::kP384);
  ASSERT_TRUE(Succeeds(p384));
  EXPECT_TRUE(FailsWith(crypto::verify(*p384, as_bytes("sample"), rs), ErrorCode::kAuth));
}

TEST(EcdsaTest, DerConversion) {
  for (const auto& curve : curves()) {
    SCOPED_TRACE(std::string(crypto::key_type_name(curve.type)));
    auto key = Key::generate(curve.type);
    ASSERT_TRUE(Succeeds(key));
    auto raw = crypto::sign(*key, as_bytes("m"));
    ASSERT_TRUE(Succeeds(raw));
    auto der = crypto::ecdsa_raw_to_der(*raw);
    ASSERT_TRUE(Succeeds(der));
    EXPECT_EQ((*der)[0], std::byte{0x30});  // SEQUENCE
    auto back = crypto::ecdsa_der_to_raw(*der, curve.scalar);
    ASSERT_TRUE(Succeeds(back));
    EXPECT_EQ(to_hex(*back), to_hex(*raw));

    EXPECT_TRUE(FailsWith(crypto::ecdsa_der_to_raw(concat(*der, Bytes{std::byte{0}}), curve.scalar),
                          ErrorCode::kInvalidArgument));  // trailing byte
    EXPECT_TRUE(FailsWith(crypto::ecdsa_der_to_raw(ByteSpan(*der).first(der->size() - 1), curve.scalar),
                          ErrorCode::kInvalidArgument));  // truncated
    EXPECT_TRUE(FailsWith(crypto::ecdsa_der_to_raw(*der, 16), ErrorCode::kInvalidArgument));  // r, s too long
  }
  // Small known DER: SEQUENCE { INTEGER 1, INTEGER 2 }.
  auto small = crypto::ecdsa_der_to_raw(hex("3006020101020102"), 4);
  ASSERT_TRUE(Succeeds(small));
  EXPECT_EQ(to_hex(*small), "0000000100000002");
  auto small_der = crypto::ecdsa_raw_to_der(*small);
  ASSERT_TRUE(Succeeds(small_der));
  EXPECT_EQ(to_hex(*small_der), "3006020101020102");

  struct Case {
    std::string name;
    std::string der_hex;
  };
  const std::vector<Case> garbage = {
      {"empty", ""},
      {"not a sequence", "0406020101020102"},
      {"length past the end", "3007020101020102"},
      {"one integer", "3003020101"},
      {"random bytes", "deadbeef"},
  };
  for (const auto& c : garbage) {
    SCOPED_TRACE(c.name);
    EXPECT_TRUE(FailsWith(crypto::ecdsa_der_to_raw(hex(c.der_hex), 32), ErrorCode::kInvalidArgument));
  }
  EXPECT_TRUE(FailsWith(crypto::ecdsa_raw_to_der(Bytes{}), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(crypto::ecdsa_raw_to_der(Bytes(63, std::byte{1})), ErrorCode::kInvalidArgument));
}

// ---- randomness, comparison, SecretBuffer -----------------------------------------------------------

TEST(RandomTest, DrawsDifferAndAreNotZero) {
  std::array<std::byte, 32> a{};
  std::array<std::byte, 32> b{};
  ASSERT_TRUE(Succeeds(crypto::random_bytes(a)));
  ASSERT_TRUE(Succeeds(crypto::random_bytes(b)));
  EXPECT_FALSE(all_bytes_are(a, std::byte{0}));
  EXPECT_FALSE(all_bytes_are(b, std::byte{0}));
  EXPECT_NE(to_hex(a), to_hex(b));
  std::array<std::byte, 32> c{};
  ASSERT_TRUE(Succeeds(crypto::system_random().fill(c)));
  EXPECT_NE(to_hex(a), to_hex(c));
  EXPECT_TRUE(Succeeds(crypto::random_bytes(MutableByteSpan{})));
  EXPECT_EQ(&crypto::system_random(), &crypto::system_random());
}

TEST(CtEqualTest, Table) {
  struct Case {
    std::string name;
    std::string a, b;
    bool want;
  };
  const std::vector<Case> cases = {
      {"equal", "secret", "secret", true},
      {"last byte differs", "secret", "secres", false},
      {"first byte differs", "secret", "Secret", false},
      {"prefix (different lengths)", "secret", "secre", false},
      {"longer (different lengths)", "secret", "secrets", false},
      {"both empty", "", "", true},
      {"one empty", "", "x", false},
      {"embedded NUL equal", std::string("a\0b", 3), std::string("a\0b", 3), true},
      {"embedded NUL differs", std::string("a\0b", 3), std::string("a\0c", 3), false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(crypto::ct_equal(as_bytes(c.a), as_bytes(c.b)), c.want);
    EXPECT_EQ(crypto::ct_equal(as_bytes(c.b), as_bytes(c.a)), c.want);
  }
}

TEST(SecretBufferTest, CopyCloneMoveReset) {
  const Bytes content = to_bytes("key material");
  SecretBuffer a = SecretBuffer::copy_of(content);
  ASSERT_EQ(a.size(), content.size());
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(to_string(a.span()), "key material");

  SecretBuffer b = a.clone();
  ASSERT_EQ(b.size(), a.size());
  EXPECT_NE(b.data(), a.data());
  b.span()[0] = std::byte{'K'};
  EXPECT_EQ(to_string(a.span()), "key material");  // the clone is independent
  EXPECT_EQ(to_string(b.span()), "Key material");

  SecretBuffer c(std::move(a));
  EXPECT_EQ(to_string(c.span()), "key material");
  EXPECT_EQ(a.size(), 0u);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(a.data(), nullptr);

  SecretBuffer d(4);
  EXPECT_EQ(d.size(), 4u);
  EXPECT_TRUE(all_bytes_are(d.span(), std::byte{0}));
  d = std::move(c);
  EXPECT_EQ(to_string(d.span()), "key material");
  EXPECT_EQ(c.size(), 0u);  // NOLINT(bugprone-use-after-move)
  EXPECT_TRUE(c.span().empty());

  d.reset();
  EXPECT_EQ(d.size(), 0u);
  EXPECT_TRUE(d.empty());
  EXPECT_EQ(d.data(), nullptr);
  d.reset();  // idempotent
  EXPECT_TRUE(d.empty());

  SecretBuffer none;
  EXPECT_TRUE(none.empty());
  SecretBuffer none_copy = SecretBuffer::copy_of({});
  EXPECT_TRUE(none_copy.empty());
  SecretBuffer none_clone = none.clone();
  EXPECT_TRUE(none_clone.empty());
}

TEST(SecretBufferTest, SecureWipeZeroes) {
  Bytes b = to_bytes("wipe me");
  secure_wipe(MutableByteSpan(b).first(4));
  EXPECT_TRUE(all_bytes_are(ByteSpan(b).first(4), std::byte{0}));
  EXPECT_EQ(to_string(ByteSpan(b).subspan(4)), " me");  // only the span given is wiped
  secure_wipe(MutableByteSpan{});                        // empty is fine
}

}  // namespace
}  // namespace tresor
