// Tests for tresor/encoding.h and error_code_name: hex, RFC 4648 base32 (lower case, no padding),
// sizes for people, and the fixed-width integer helpers. Every accepted input has a rejected twin.
#include "support/test_support.h"
#include "tresor/encoding.h"

#include <gtest/gtest.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tresor/error.h"

namespace tresor {
namespace {

using testing::FailsWith;


Bytes bytes_of(std::initializer_list<unsigned> values) {
  Bytes out;
  for (unsigned v : values) out.push_back(std::byte(static_cast<unsigned char>(v)));
  return out;
}

// ---- hex ------------------------------------------------------------------------------------------

TEST(HexTest, Encode) {
  EXPECT_EQ(to_hex(Bytes{}), "");
  EXPECT_EQ(to_hex(bytes_of({0x00, 0x01, 0x7f, 0x80, 0xab, 0xff})), "00017f80abff");
  EXPECT_NE(to_hex(bytes_of({0xab})), "AB");  // always lower case
}

TEST(HexTest, Decode) {
  struct Case {
    std::string name;
    std::string input;
    std::string want;                // the bytes, as lower-case hex
    std::optional<std::string> want_error;  // substring of the message
  };
  const std::vector<Case> cases = {
      {"empty", "", "", std::nullopt},
      {"lower case", "00ff7f80", "00ff7f80", std::nullopt},
      {"upper case", "ABCDEF", "abcdef", std::nullopt},
      {"mixed case", "aBcD", "abcd", std::nullopt},
      {"odd length 1", "a", "", "odd number of hex digits (1)"},
      {"odd length 3", "abc", "", "odd number of hex digits (3)"},
      {"non-hex first", "zz00", "", "non-hex character at position 0"},
      {"non-hex second digit", "0g", "", "non-hex character at position 1"},
      {"non-hex later", "00zz", "", "non-hex character at position 2"},
      {"non-hex last", "000x", "", "non-hex character at position 3"},
      {"space", "00 0", "", "non-hex character at position 2"},
      {"0x prefix", "0x00", "", "non-hex character at position 1"},
      {"high bit byte", std::string("0\xc3", 2), "", "non-hex character at position 1"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto r = from_hex(c.input, "test field");
    if (c.want_error) {
      ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
      EXPECT_NE(r.error().message.find(*c.want_error), std::string::npos) << r.error().message;
      EXPECT_NE(r.error().message.find("test field"), std::string::npos) << r.error().message;
      continue;
    }
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(to_hex(*r), c.want);
  }
  // The default name.
  auto bad = from_hex("x");
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("hex string"), std::string::npos);
}

TEST(HexTest, RoundTripsEveryByte) {
  Bytes all(256);
  for (size_t i = 0; i < all.size(); ++i) all[i] = std::byte(static_cast<unsigned char>(i));
  const std::string text = to_hex(all);
  EXPECT_EQ(text.size(), 512u);
  auto back = from_hex(text);
  ASSERT_TRUE(back);
  EXPECT_EQ(*back, all);
  // The twin: one digit changed decodes to other bytes.
  std::string changed = text;
  changed[100] = changed[100] == '0' ? '1' : '0';
  auto other = from_hex(changed);
  ASSERT_TRUE(other);
  EXPECT_NE(*other, all);
}

// ---- base32 -----------------------------------------------------------------------------------------

TEST(Base32Test, Rfc4648Section10Vectors) {
  // RFC 4648 §10 test vectors, lower case and without '=' padding.
  struct Case {
    std::string input;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"", ""},           {"f", "my"},          {"fo", "mzxq"},          {"foo", "mzxw6"},
      {"foob", "mzxw6yq"}, {"fooba", "mzxw6ytb"}, {"foobar", "mzxw6ytboi"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("'" + c.input + "'");
    EXPECT_EQ(base32_encode(as_bytes(c.input)), c.want);
    auto back = base32_decode(c.want);
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(to_string(*back), c.input);
    // Decoding is case-insensitive.
    std::string upper = c.want;
    for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    auto back_upper = base32_decode(upper);
    ASSERT_TRUE(back_upper) << back_upper.error().message;
    EXPECT_EQ(to_string(*back_upper), c.input);
  }
}

TEST(Base32Test, RoundTripsAllLengths) {
  for (size_t n = 0; n <= 70; ++n) {
    SCOPED_TRACE(n);
    Bytes b(n);
    for (size_t i = 0; i < n; ++i) b[i] = std::byte(static_cast<unsigned char>(i * 37 + 11));
    const std::string text = base32_encode(b);
    EXPECT_EQ(text.size(), (n * 8 + 4) / 5);
    EXPECT_EQ(text.find_first_not_of("abcdefghijklmnopqrstuvwxyz234567"), std::string::npos);
    auto back = base32_decode(text);
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(*back, b);
  }
}

TEST(Base32Test, RejectsBadInput) {
  struct Case {
    std::string name;
    std::string input;
    std::optional<std::string> want_error;  // substring of the message; nullopt: accepted
  };
  const std::vector<Case> cases = {
      {"valid 'my'", "my", std::nullopt},
      {"digit 1", "my1", "invalid character '1' at position 2"},
      {"digit 0", "0y", "invalid character '0' at position 0"},
      {"digit 8", "m8", "invalid character '8' at position 1"},
      {"padding '='", "my======", "invalid character '=' at position 2"},
      {"space", "m y", "invalid character ' ' at position 1"},
      {"newline", "my\n", "invalid character"},
      // "f" is 01100110: "my" carries it with the two spare bits zero; "mz" sets the last one.
      {"non-zero padding bits", "mz", "non-zero padding bits"},
      {"non-zero padding bits, 4 bytes", "mzxw6yr", "non-zero padding bits"},
      {"valid 4 bytes", "mzxw6yq", std::nullopt},
      {"one character (5 bits)", "m", "bad length"},
      {"three characters (15 bits)", "mzx", "bad length"},
      {"six characters (30 bits)", "mzxw6y", "bad length"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto r = base32_decode(c.input, "test field");
    if (!c.want_error) {
      EXPECT_TRUE(r) << r.error().message;
      continue;
    }
    ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
    EXPECT_NE(r.error().message.find(*c.want_error), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("test field"), std::string::npos) << r.error().message;
  }
}

// ---- sizes --------------------------------------------------------------------------------------------

TEST(ParseSizeTest, Table) {
  struct Case {
    std::string input;
    uint64_t want;
    std::optional<std::string> want_error;  // substring of the message
  };
  const std::vector<Case> cases = {
      {"4096", 4096, std::nullopt},
      {"0", 0, std::nullopt},
      {"10B", 10, std::nullopt},
      {"64KiB", 64 * 1024, std::nullopt},
      {"64k", 64 * 1024, std::nullopt},
      {"1MiB", 1 << 20, std::nullopt},
      {"1M", 1 << 20, std::nullopt},
      {"1mb", 1 << 20, std::nullopt},
      {"1GiB", 1ull << 30, std::nullopt},
      {"2G", 2ull << 30, std::nullopt},
      {"18446744073709551615", UINT64_MAX, std::nullopt},
      {"17179869183GiB", 17179869183ull << 30, std::nullopt},
      {"", 0, "is not a size"},
      {"KiB", 0, "is not a size"},
      {"-1", 0, "is not a size"},
      {" 1", 0, "is not a size"},
      {"1.5GiB", 0, "unknown unit '.5GiB'"},
      {"1 MiB", 0, "unknown unit ' MiB'"},
      {"1TiB", 0, "unknown unit 'TiB'"},
      {"12XB", 0, "unknown unit 'XB'"},
      {"1KiBB", 0, "unknown unit"},
      {"18446744073709551616", 0, "too large"},
      {"99999999999999999999999", 0, "too large"},
      {"17179869184GiB", 0, "too large"},  // 2^34 GiB = 2^64
      {"18014398509481984KiB", 0, "too large"},  // 2^54 KiB = 2^64
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("'" + c.input + "'");
    auto r = parse_size(c.input, "--chunk-size");
    if (c.want_error) {
      ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument));
      EXPECT_NE(r.error().message.find(*c.want_error), std::string::npos) << r.error().message;
      EXPECT_NE(r.error().message.find("--chunk-size"), std::string::npos) << r.error().message;
      continue;
    }
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ(*r, c.want);
  }
}

TEST(FormatSizeTest, Table) {
  struct Case {
    uint64_t input;
    std::string want;
  };
  const std::vector<Case> cases = {
      {0, "0 B"},
      {512, "512 B"},
      {1023, "1023 B"},
      {1024, "1.0 KiB"},
      {1536, "1.5 KiB"},
      {64 * 1024, "64.0 KiB"},
      {1 << 20, "1.0 MiB"},
      {(1 << 20) - 1, "1024.0 KiB"},  // rounds for display, stays in KiB
      {1ull << 30, "1.0 GiB"},
      {3ull << 29, "1.5 GiB"},
      {1ull << 40, "1.0 TiB"},
      {1ull << 50, "1024.0 TiB"},  // TiB is the largest unit
      {UINT64_MAX, "16777216.0 TiB"},
  };
  std::set<std::string> seen;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.input);
    EXPECT_EQ(format_size(c.input), c.want);
    seen.insert(format_size(c.input));
  }
  EXPECT_EQ(seen.size(), cases.size());  // distinct inputs above, distinct texts
}

TEST(FormatSizeTest, ParsesBackWhereExact) {
  for (const std::string text : {"64KiB", "1MiB", "1GiB"}) {
    SCOPED_TRACE(text);
    auto v = parse_size(text, "size");
    ASSERT_TRUE(v);
    std::string shown = format_size(*v);  // "64.0 KiB"
    EXPECT_EQ(shown.substr(shown.find(' ') + 1), text.substr(text.find_first_not_of("0123456789")));
  }
}

// ---- integer helpers ------------------------------------------------------------------------------------

TEST(EndianTest, StoreAndLoad) {
  std::array<std::byte, 4> b{};
  store_le16(b.data(), 0x1234);
  EXPECT_EQ(to_hex(ByteSpan(b).first(2)), "3412");
  EXPECT_EQ(load_le16(b.data()), 0x1234);
  EXPECT_NE(load_le16(b.data()), 0x3412);

  store_le32(b.data(), 0x12345678u);
  EXPECT_EQ(to_hex(b), "78563412");
  EXPECT_EQ(load_le32(b.data()), 0x12345678u);

  store_be32(b.data(), 0x12345678u);
  EXPECT_EQ(to_hex(b), "12345678");
  EXPECT_EQ(load_le32(b.data()), 0x78563412u);  // read back with the other byte order: swapped

  struct Case {
    uint32_t value;
    std::string le, be;
  };
  const std::vector<Case> cases = {
      {0, "00000000", "00000000"},
      {1, "01000000", "00000001"},
      {0x80000000u, "00000080", "80000000"},
      {0xffffffffu, "ffffffff", "ffffffff"},
      {0x00ff00feu, "fe00ff00", "00ff00fe"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.value);
    store_le32(b.data(), c.value);
    EXPECT_EQ(to_hex(b), c.le);
    EXPECT_EQ(load_le32(b.data()), c.value);
    store_be32(b.data(), c.value);
    EXPECT_EQ(to_hex(b), c.be);
  }
  for (const uint16_t v : {uint16_t{0}, uint16_t{1}, uint16_t{0x8000}, uint16_t{0xffff}, uint16_t{0x00fe}}) {
    SCOPED_TRACE(v);
    store_le16(b.data(), v);
    EXPECT_EQ(load_le16(b.data()), v);
  }
}

TEST(EndianTest, StoresTouchOnlyTheirBytes) {
  std::array<std::byte, 6> b{};
  b.fill(std::byte{0xee});
  store_le16(b.data() + 1, 0x0102);
  EXPECT_EQ(to_hex(b), "ee0201eeeeee");
  b.fill(std::byte{0xee});
  store_le32(b.data() + 1, 0x01020304u);
  EXPECT_EQ(to_hex(b), "ee04030201ee");
  b.fill(std::byte{0xee});
  store_be32(b.data() + 1, 0x01020304u);
  EXPECT_EQ(to_hex(b), "ee01020304ee");
}

TEST(TextBytesTest, RoundTrip) {
  const std::string s("a\0b\xff", 4);
  EXPECT_EQ(as_bytes(s).size(), 4u);
  EXPECT_EQ(to_hex(as_bytes(s)), "610062ff");
  EXPECT_EQ(to_string(as_bytes(s)), s);
  EXPECT_EQ(to_bytes(s), Bytes(as_bytes(s).begin(), as_bytes(s).end()));
  EXPECT_NE(to_string(to_bytes("ab")), "ba");
}

// ---- error codes -----------------------------------------------------------------------------------------

TEST(ErrorCodeTest, EveryCodeHasADistinctName) {
  std::set<std::string_view> names;
  const int last = static_cast<int>(ErrorCode::kPolicy);  // the last enumerator
  for (int i = 0; i <= last; ++i) {
    const std::string_view name = error_code_name(static_cast<ErrorCode>(i));
    SCOPED_TRACE(i);
    EXPECT_FALSE(name.empty());
    EXPECT_NE(name, "unknown");
    EXPECT_EQ(name.find_first_not_of("abcdefghijklmnopqrstuvwxyz-"), std::string_view::npos) << name;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), static_cast<size_t>(last + 1));
  EXPECT_EQ(error_code_name(ErrorCode::kChunkAuth), "chunk-auth");
  EXPECT_EQ(error_code_name(ErrorCode::kInvalidArgument), "invalid-argument");
  EXPECT_EQ(error_code_name(ErrorCode::kAuth), "auth");
  // The twin: a value outside the enumeration is named "unknown", not mistaken for a real code.
  EXPECT_EQ(error_code_name(static_cast<ErrorCode>(last + 1)), "unknown");
}

TEST(ErrorCodeTest, FailBuildsTheUnexpectedValue) {
  const Result<int> r = fail(ErrorCode::kIo, "open x: denied");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kIo);
  EXPECT_EQ(r.error().message, "open x: denied");
  const Result<int> ok = 3;
  EXPECT_TRUE(ok);
}

Result<void> try_chain(bool fail_inner, int& reached) {
  auto inner = [&]() -> Result<void> {
    if (fail_inner) return fail(ErrorCode::kMalformed, "inner");
    return {};
  };
  TRESOR_TRY(inner());
  reached = 1;
  return {};
}

TEST(ErrorCodeTest, TresorTryPropagates) {
  int reached = 0;
  auto bad = try_chain(true, reached);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, ErrorCode::kMalformed);
  EXPECT_EQ(reached, 0);
  auto good = try_chain(false, reached);
  EXPECT_TRUE(good);
  EXPECT_EQ(reached, 1);
}

}  // namespace
}  // namespace tresor
