// Header parsing and serialization of the sealed format (docs/formats.md §2–§3): a table of
// malformed headers, each rejected with the field named, and exact round trips.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "support/test_support.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

using sealed::Header;

// A valid header with one stanza of each kind (sealed to a fresh identity and dataset key).
struct Fixture {
  Identity id = *Identity::generate();
  DatasetKey dk = *DatasetKey::generate("dhz/ccta-2024");
  Bytes header_bytes;

  Fixture() {
    sealed::SealOptions o;
    o.chunk_size = 4096;
    o.recipients.push_back(id.recipient());
    o.datasets.push_back(&dk);
    auto nh = sealed::make_header(o);
    EXPECT_TRUE(nh);
    header_bytes = nh->bytes;
  }
};

TEST(SealedHeader, ParseSerializeRoundTrip) {
  Fixture f;
  auto h = sealed::parse_header(f.header_bytes);
  ASSERT_TRUE(h) << h.error().message;
  EXPECT_EQ(h->version, 1);
  EXPECT_EQ(h->chunk_size, 4096u);
  ASSERT_EQ(h->stanzas.size(), 2u);
  EXPECT_TRUE(std::holds_alternative<sealed::X25519Stanza>(h->stanzas[0]));
  ASSERT_TRUE(std::holds_alternative<sealed::DatasetStanza>(h->stanzas[1]));
  EXPECT_EQ(std::get<sealed::DatasetStanza>(h->stanzas[1]).dataset_id, "dhz/ccta-2024");
  EXPECT_EQ(h->size(), f.header_bytes.size());
  EXPECT_EQ(sealed::serialize_header(*h), f.header_bytes);
  auto len = sealed::header_length(f.header_bytes);
  ASSERT_TRUE(len);
  EXPECT_EQ(*len, f.header_bytes.size());
}

TEST(SealedHeader, ParseIgnoresBytesAfterHeader) {
  Fixture f;
  Bytes more = f.header_bytes;
  more.resize(more.size() + 100, std::byte{0x5a});
  auto h = sealed::parse_header(more);
  ASSERT_TRUE(h) << h.error().message;
  EXPECT_EQ(sealed::serialize_header(*h), f.header_bytes);
}

TEST(SealedHeader, UnknownStanzaTypeIsKeptAndRoundTrips) {
  Header h;
  h.chunk_size = 64;
  h.stanzas.push_back(sealed::UnknownStanza{200, to_bytes("future stanza")});
  h.stanzas.push_back(sealed::X25519Stanza{});
  const Bytes b = sealed::serialize_header(h);
  auto back = sealed::parse_header(b);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(*back, h);
}

struct BadCase {
  std::string name;
  std::function<void(Bytes&)> mutate;
  ErrorCode want;
  std::string want_text;  // a fragment of the message naming what is wrong
};

void set_le16(Bytes& b, size_t off, uint16_t v) { store_le16(b.data() + off, v); }
void set_le32(Bytes& b, size_t off, uint32_t v) { store_le32(b.data() + off, v); }

TEST(SealedHeader, MalformedHeadersAreRejectedNamingTheField) {
  // Stanza 0 (X25519) starts at byte 28; stanza 1 (dataset) at 28 + 4 + 80 = 112.
  const std::vector<BadCase> cases = {
      {"bad magic", [](Bytes& b) { b[1] = std::byte{'X'}; }, ErrorCode::kNotSealed, "magic"},
      {"version 0", [](Bytes& b) { b[8] = std::byte{0}; }, ErrorCode::kUnsupportedVersion, "version 0"},
      {"version 2", [](Bytes& b) { b[8] = std::byte{2}; }, ErrorCode::kUnsupportedVersion, "version 2"},
      {"flags", [](Bytes& b) { b[9] = std::byte{1}; }, ErrorCode::kMalformed, "flags"},
      {"zero stanzas", [](Bytes& b) { set_le16(b, 10, 0); }, ErrorCode::kMalformed, "stanza count 0"},
      {"too many stanzas", [](Bytes& b) { set_le16(b, 10, 513); }, ErrorCode::kMalformed, "stanza count 513"},
      {"header length too small", [](Bytes& b) { set_le32(b, 12, 40); }, ErrorCode::kMalformed, "header length 40"},
      {"header length too large", [](Bytes& b) { set_le32(b, 12, 70000); }, ErrorCode::kMalformed, "header length 70000"},
      {"header length past data", [](Bytes& b) { set_le32(b, 12, static_cast<uint32_t>(b.size() + 8)); },
       ErrorCode::kTruncated, "truncated"},
      {"chunk size not multiple of 16", [](Bytes& b) { set_le32(b, 16, 1000); }, ErrorCode::kMalformed, "chunk size 1000"},
      {"chunk size too small", [](Bytes& b) { set_le32(b, 16, 0); }, ErrorCode::kMalformed, "chunk size 0"},
      {"chunk size too large", [](Bytes& b) { set_le32(b, 16, (64u << 20) + 16); }, ErrorCode::kMalformed, "chunk size"},
      {"reserved byte", [](Bytes& b) { b[27] = std::byte{7}; }, ErrorCode::kMalformed, "reserved"},
      {"stanza flags", [](Bytes& b) { b[29] = std::byte{1}; }, ErrorCode::kMalformed, "stanza 0 flags"},
      {"x25519 body length", [](Bytes& b) { set_le16(b, 30, 79); }, ErrorCode::kMalformed, "X25519 stanza body is 79"},
      {"stanza runs past header", [](Bytes& b) { set_le16(b, 114, 60000); }, ErrorCode::kMalformed, "runs past the header"},
      {"dataset id length mismatch", [](Bytes& b) { b[116] = std::byte{14}; }, ErrorCode::kMalformed, "dataset stanza body"},
      {"dataset id invalid", [](Bytes& b) { b[117] = std::byte{'/'}; }, ErrorCode::kMalformed, "dataset id"},
      {"stanza count too low leaves bytes", [](Bytes& b) { set_le16(b, 10, 1); }, ErrorCode::kMalformed, "unexplained bytes"},
      {"truncated fixed part", [](Bytes& b) { b.resize(20); }, ErrorCode::kTruncated, "fixed part"},
      {"truncated stanzas", [](Bytes& b) { b.resize(100); }, ErrorCode::kTruncated, "truncated"},
  };
  Fixture f;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Bytes b = f.header_bytes;
    c.mutate(b);
    auto h = sealed::parse_header(b);
    ASSERT_FALSE(h) << "accepted a header with " << c.name;
    EXPECT_EQ(h.error().code, c.want) << h.error().message;
    EXPECT_NE(h.error().message.find(c.want_text), std::string::npos)
        << "message '" << h.error().message << "' does not mention '" << c.want_text << "'";
  }
  // The twin: the unmodified header parses.
  EXPECT_TRUE(sealed::parse_header(f.header_bytes));
}

TEST(SealedHeader, ChunkNonceLayout) {
  const std::array<std::byte, 7> prefix = {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4},
                                           std::byte{5}, std::byte{6}, std::byte{7}};
  EXPECT_EQ(to_hex(sealed::chunk_nonce(prefix, 0, false)), "010203040506070000000000");
  EXPECT_EQ(to_hex(sealed::chunk_nonce(prefix, 0x01020304, true)), "010203040506070102030401");
  EXPECT_NE(sealed::chunk_nonce(prefix, 5, false), sealed::chunk_nonce(prefix, 5, true));
}

TEST(SealedHeader, SealOptionsAreChecked) {
  auto id = Identity::generate();
  ASSERT_TRUE(id);
  sealed::SealOptions o;
  EXPECT_EQ(sealed::check_seal_options(o).error().code, ErrorCode::kInvalidArgument);  // no recipients
  o.recipients.push_back(id->recipient());
  EXPECT_TRUE(sealed::check_seal_options(o));
  for (uint32_t bad : {0u, 8u, 100u, (64u << 20) + 16}) {
    o.chunk_size = bad;
    auto r = sealed::check_seal_options(o);
    ASSERT_FALSE(r) << bad;
    EXPECT_NE(r.error().message.find("chunk size"), std::string::npos);
  }
  o.chunk_size = 16;
  EXPECT_TRUE(sealed::check_seal_options(o));
}

TEST(SealedHeader, UnlockChecksMacAndKeys) {
  Fixture f;
  auto h = sealed::parse_header(f.header_bytes);
  ASSERT_TRUE(h);
  sealed::KeyRing ring;
  ring.identities.push_back(&f.id);
  EXPECT_TRUE(sealed::unlock(*h, f.header_bytes, ring, "x"));

  sealed::KeyRing by_dataset;
  by_dataset.dataset_keys.push_back(&f.dk);
  EXPECT_TRUE(sealed::unlock(*h, f.header_bytes, by_dataset, "x"));

  // A dataset key under another id is not tried; an any-id key (empty id) is.
  DatasetKey renamed{"other/id", f.dk.key.clone()};
  sealed::KeyRing wrong_id;
  wrong_id.dataset_keys.push_back(&renamed);
  EXPECT_EQ(sealed::unlock(*h, f.header_bytes, wrong_id, "x").error().code, ErrorCode::kNoMatchingKey);
  DatasetKey any{"", f.dk.key.clone()};
  sealed::KeyRing any_ring;
  any_ring.dataset_keys.push_back(&any);
  EXPECT_TRUE(sealed::unlock(*h, f.header_bytes, any_ring, "x"));

  // A flipped nonce-prefix bit: the stanza still opens, but the MAC does not verify.
  Bytes altered = f.header_bytes;
  altered[22] ^= std::byte{0x10};
  auto ha = sealed::parse_header(altered);
  ASSERT_TRUE(ha);
  auto r = sealed::unlock(*ha, altered, ring, "file.sealed");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kHeaderAuth);
  EXPECT_NE(r.error().message.find("file.sealed"), std::string::npos);

  sealed::KeyRing empty;
  auto none = sealed::unlock(*h, f.header_bytes, empty, "f");
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, ErrorCode::kNoMatchingKey);
  EXPECT_NE(none.error().message.find("dhz/ccta-2024"), std::string::npos);
}

// File keys open exactly their own file: found by the header's MAC, checked against it.
TEST(SealedHeader, FileKeysOpenTheirOwnFileOnly) {
  Fixture a, b;
  auto ha = sealed::parse_header(a.header_bytes);
  auto hb = sealed::parse_header(b.header_bytes);
  ASSERT_TRUE(ha && hb);
  sealed::KeyRing owner;
  owner.identities.push_back(&a.id);
  auto key_a = sealed::unlock(*ha, a.header_bytes, owner, "a");
  ASSERT_TRUE(key_a);
  sealed::FileKeys fk;
  ASSERT_TRUE(fk.add(ha->mac, key_a->clone(), "demo/a.nii.sealed"));
  sealed::KeyRing ring;
  ring.file_keys.push_back(&fk);
  auto opened = sealed::unlock(*ha, a.header_bytes, ring, "a");
  ASSERT_TRUE(opened) << opened.error().message;
  EXPECT_TRUE(opened->span().size() == key_a->span().size() && std::memcmp(opened->data(), key_a->data(), key_a->size()) == 0);
  // Another file sealed under the same kind of stanzas: no key for it.
  auto other = sealed::unlock(*hb, b.header_bytes, ring, "b.sealed");
  ASSERT_TRUE(testing::FailsWith(other, ErrorCode::kNoMatchingKey));
  EXPECT_NE(other.error().message.find("b.sealed: no stanza opens with the 0 identity(ies) and 0 dataset key(s) and 1 file key(s), none for this file"),
            std::string::npos)
      << other.error().message;
  // A wrong key filed under a file's MAC: the MAC check refuses it.
  sealed::FileKeys wrong;
  ASSERT_TRUE(wrong.add(hb->mac, key_a->clone(), "b"));
  sealed::KeyRing wrong_ring;
  wrong_ring.file_keys.push_back(&wrong);
  EXPECT_TRUE(testing::FailsWith(sealed::unlock(*hb, b.header_bytes, wrong_ring, "b"), ErrorCode::kHeaderAuth));

  // The file text round-trips; its errors name the line.
  const SecretBuffer text = fk.to_file_text();
  auto back = sealed::FileKeys::parse(text.span(), "keys");
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->size(), 1u);
  ASSERT_NE(back->find(ha->mac), nullptr);
  EXPECT_EQ(back->find(hb->mac), nullptr);
  const std::string good(reinterpret_cast<const char*>(text.data()), text.size());
  EXPECT_TRUE(good.starts_with("tresor-file-keys-v1\n")) << good;
  EXPECT_TRUE(good.ends_with(" demo/a.nii.sealed\n")) << good;
  const std::string line = good.substr(good.find('\n') + 1);
  for (const auto& [bad, why] : std::vector<std::pair<std::string, std::string>>{
           {"not-keys\n", "keys: line 1: expected \"tresor-file-keys-v1\""},
           {"# only a comment\n", "keys: empty"},
           {"tresor-file-keys-v1\n" + line.substr(0, 60) + "\n", "keys: line 2: want <header MAC hex> <file key hex> <name>"},
           {"tresor-file-keys-v1\nzz" + line.substr(2), "keys: line 2: the header MAC is not 64 hex digits"},
           {"tresor-file-keys-v1\n" + line.substr(0, 65) + "00" + line.substr(65), "keys: line 2: the file key is not 64 hex digits"},
           {"tresor-file-keys-v1\n" + line + line.substr(0, 65) + (line[65] == '0' ? "1" : "0") + line.substr(66),
            "keys: line 3: file keys: demo/a.nii.sealed has the same header MAC as demo/a.nii.sealed but another key"}}) {
    auto r = sealed::FileKeys::parse(as_bytes(bad), "keys");
    ASSERT_FALSE(r) << bad;
    EXPECT_EQ(r.error().code, ErrorCode::kMalformed) << bad;
    EXPECT_NE(r.error().message.find(why), std::string::npos) << r.error().message;
  }
  // The good text with comments and blank lines still parses; the same file twice (a copy of it
  // elsewhere in the data) is kept once.
  EXPECT_TRUE(sealed::FileKeys::parse(as_bytes("# made by tresor-agent\n\n" + good), "keys"));
  auto twice = sealed::FileKeys::parse(as_bytes(good + line), "keys");
  ASSERT_TRUE(twice) << twice.error().message;
  EXPECT_EQ(twice->size(), 1u);
}

}  // namespace
}  // namespace tresor
