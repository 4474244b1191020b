// The audit chain: any edit, deletion, reordering or replacement of a record is found and named.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <functional>

#include "support/test_support.h"
#include "tresor/audit.h"

namespace tresor {
namespace {

using testing::FailsWith;

std::vector<audit::Record> make_chain(size_t n) {
  std::vector<audit::Record> out;
  for (size_t i = 0; i < n; ++i) {
    audit::Record r;
    r.time = 1700000000 + static_cast<int64_t>(i);
    r.user = "tresor1user" + std::to_string(i % 3);
    r.dataset = "dhz/ccta-2024";
    r.result = i % 2 ? "released" : "denied";
    r.reason = i % 2 ? "" : "MEASUREMENT is 00…, not one of the 1 allowed";
    r.sim = i == 3;
    auto c = audit::chain(out.empty() ? nullptr : &out.back(), r);
    EXPECT_TRUE(c);
    out.push_back(*c);
  }
  return out;
}

TEST(Audit, ChainVerifiesAndRoundTripsThroughJson) {
  const auto records = make_chain(10);
  EXPECT_TRUE(audit::verify_chain(records));
  EXPECT_EQ(records[0].prev_hash, audit::kGenesis);
  EXPECT_EQ(records[9].seq, 10u);
  for (const auto& r : records) {
    auto text = audit::to_json(r);
    ASSERT_TRUE(text);
    auto back = audit::from_json(*text);
    ASSERT_TRUE(back) << back.error().message;
    EXPECT_EQ(*back, r);
  }
  EXPECT_TRUE(audit::verify_chain(std::span<const audit::Record>()));  // an empty log is a valid log
}

TEST(Audit, EveryTamperIsFoundAndNamed) {
  const auto good = make_chain(10);
  const std::vector<std::tuple<std::string, std::function<void(std::vector<audit::Record>&)>, std::string>> cases = {
      {"edited result", [](auto& v) { v[4].result = "released"; }, "record 5 was edited"},
      {"edited reason", [](auto& v) { v[0].reason = ""; }, "record 1 was edited"},
      {"sim mark removed", [](auto& v) { v[3].sim = false; }, "record 4 was edited"},
      {"deleted", [](auto& v) { v.erase(v.begin() + 6); }, "record 8 follows record 6"},
      {"last two swapped", [](auto& v) { std::swap(v[8], v[9]); }, "record 10 follows record 8"},
      {"replaced with a rehashed forgery",
       [](auto& v) {
         v[2].reason = "forged";
         v[2].hash = *audit::record_hash(v[2]);
       },
       "record 4 does not follow"},
  };
  for (const auto& [name, mutate, want] : cases) {
    SCOPED_TRACE(name);
    auto v = good;
    mutate(v);
    auto r = audit::verify_chain(v);
    ASSERT_TRUE(FailsWith(r, ErrorCode::kAuth));
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
  }
  // Truncating the tail is not detectable from the records alone: the broker keeps the head hash
  // apart (docs). A prefix of a valid chain is valid.
  EXPECT_TRUE(audit::verify_chain(std::span<const audit::Record>(good).first(5)));
}

TEST(Audit, MalformedRecordsAreRejected) {
  EXPECT_TRUE(FailsWith(audit::from_json("{"), ErrorCode::kMalformed));
  EXPECT_TRUE(FailsWith(audit::from_json(R"({"seq":1})"), ErrorCode::kMalformed));
  auto text = *audit::to_json(make_chain(1)[0]);
  auto j = nlohmann::json::parse(text);
  j["seq"] = "one";
  EXPECT_TRUE(FailsWith(audit::from_json(j.dump()), ErrorCode::kMalformed));
  j = nlohmann::json::parse(text);
  j.erase("sim");
  j["extra"] = 1;
  EXPECT_TRUE(FailsWith(audit::from_json(j.dump()), ErrorCode::kMalformed));
}

}  // namespace
}  // namespace tresor

namespace tresor::audit {
namespace {

TEST(Audit, TextFromTheNetworkIsStoredEscapedAndAlwaysReadsBack) {
  Record r;
  r.time = 1;
  r.result = "denied";
  r.reason = std::string("resource dhz/\xff\xfe/latest: back\\slash\nnext line");
  auto c = chain(nullptr, r);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->reason, "resource dhz/\\xff\\xfe/latest: back\\x5cslash\nnext line");
  auto text = to_json(*c);
  ASSERT_TRUE(text);
  auto back = from_json(*text);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(*back, *c);
  EXPECT_TRUE(verify_chain(std::span<const Record>(&*c, 1)));
  EXPECT_EQ(printable("plain text"), "plain text");
}

}  // namespace
}  // namespace tresor::audit
