// Certificate sources: AMD KDS URLs, the extended report's certificate table, the offline
// directory cache, and the rate-limited KDS source (with a fake network and clock) — ending in a
// verification of the real Milan report with a VCEK that came through them.
#include <gtest/gtest.h>

#include <ctime>

#include "support/test_support.h"
#include "tresor/snp/certs.h"

namespace tresor {
namespace {

using testing::shared_testdata;

using testing::FailsWith;
using testing::read_file;


struct Milan {
  Bytes report = read_file(shared_testdata("snp/milan-v2-virtee/report.bin"));
  Bytes vcek = read_file(shared_testdata("snp/milan-v2-virtee/vcek.der"));
  snp::Report parsed = *snp::parse_report(report);
  snp::Tcb tcb{.fmc = 0, .bootloader = 3, .tee = 0, .snp = 8, .microcode = 115};
  ByteSpan chip() const { return parsed.chip_id; }
};

TEST(SnpCerts, KdsUrls) {
  Milan m;
  auto url = snp::kds_vcek_url(snp::Product::kMilan, m.chip(), m.tcb);
  ASSERT_TRUE(url) << url.error().message;
  EXPECT_EQ(*url, "https://kdsintf.amd.com/vcek/v1/Milan/" + to_hex(m.chip()) + "?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115");
  const Bytes turin_id = testing::pattern_bytes(8, 4);
  auto turin = snp::kds_vcek_url(snp::Product::kTurin, turin_id, snp::Tcb{.fmc = 1, .bootloader = 2, .tee = 3, .snp = 4, .microcode = 5});
  ASSERT_TRUE(turin);
  EXPECT_EQ(*turin, "https://kdsintf.amd.com/vcek/v1/Turin/" + to_hex(turin_id) + "?fmcSPL=1&blSPL=2&teeSPL=3&snpSPL=4&ucodeSPL=5");
  EXPECT_TRUE(FailsWith(snp::kds_vcek_url(snp::Product::kTurin, m.chip(), m.tcb), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(snp::kds_vcek_url(snp::Product::kMilan, turin_id, m.tcb), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(snp::kds_vcek_url(snp::Product::kSim, m.chip(), m.tcb), ErrorCode::kInvalidArgument));
  EXPECT_EQ(*snp::kds_chain_url(snp::Product::kGenoa, false), "https://kdsintf.amd.com/vcek/v1/Genoa/cert_chain");
  EXPECT_EQ(*snp::kds_chain_url(snp::Product::kGenoa, true), "https://kdsintf.amd.com/vlek/v1/Genoa/cert_chain");
  EXPECT_EQ(*snp::kds_crl_url(snp::Product::kMilan, false), "https://kdsintf.amd.com/vcek/v1/Milan/crl");
}

TEST(SnpCerts, CertificateTableRoundTripAndBounds) {
  Milan m;
  snp::CertTable t;
  t.certs[std::string(snp::kGuidVcek)] = m.vcek;
  t.certs[std::string(snp::kGuidArk)] = testing::pattern_bytes(700, 5);
  const Bytes bytes = snp::serialize_cert_table(t);
  // GUIDs travel in RFC 4122 byte order, as AMD's tools write them: 63da758d-e664-… is the
  // 16 bytes 63 da 75 8d e6 64 … (a table from a real host must parse to the right names).
  bool found = false;
  for (size_t i = 0; i + 16 <= 48; i += 24) {
    found |= to_hex(ByteSpan(bytes).subspan(i, 16)) == "63da758de6644564adc5f4b93be8accd";
  }
  EXPECT_TRUE(found);
  auto back = snp::parse_cert_table(bytes);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->certs, t.certs);

  snp::TableSource src(*back);
  auto v = src.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, false);
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, m.vcek);
  EXPECT_TRUE(FailsWith(src.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, true), ErrorCode::kUnavailable));

  Bytes no_end(bytes.begin(), bytes.begin() + 24);  // one entry and no terminator
  EXPECT_TRUE(FailsWith(snp::parse_cert_table(no_end), ErrorCode::kMalformed));
  Bytes outside = bytes;
  store_le32(outside.data() + 20, 1u << 30);  // length past the buffer
  EXPECT_TRUE(FailsWith(snp::parse_cert_table(outside), ErrorCode::kMalformed));
  Bytes overlap = bytes;
  store_le32(overlap.data() + 16, 10);  // points into the entries
  EXPECT_TRUE(FailsWith(snp::parse_cert_table(overlap), ErrorCode::kMalformed));
}

TEST(SnpCerts, DirectoryCache) {
  Milan m;
  testing::TempDir dir;
  snp::DirectoryCache cache(dir.file("vceks"));
  auto miss = cache.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, false);
  ASSERT_TRUE(FailsWith(miss, ErrorCode::kUnavailable));
  EXPECT_NE(miss.error().message.find("3-0-8-115"), std::string::npos) << miss.error().message;
  ASSERT_TRUE(cache.put(snp::Product::kMilan, m.chip(), m.tcb, m.vcek));
  auto hit = cache.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, false);
  ASSERT_TRUE(hit);
  EXPECT_EQ(*hit, m.vcek);
  EXPECT_TRUE(FailsWith(cache.put(snp::Product::kMilan, m.chip(), m.tcb, m.vcek), ErrorCode::kExists));
  snp::Tcb newer = m.tcb;
  newer.microcode = 116;
  EXPECT_TRUE(FailsWith(cache.endorsement_cert(snp::Product::kMilan, m.chip(), newer, false), ErrorCode::kUnavailable));
}

class FakeFetcher final : public snp::Fetcher {
 public:
  Result<Bytes> get(const std::string& url) override {
    urls.push_back(url);
    return answer;
  }
  Bytes answer;
  std::vector<std::string> urls;
};
class FakeClock final : public snp::Clock {
 public:
  std::time_t now() override { return t; }
  std::time_t t = 1000;
};

TEST(SnpCerts, KdsSourceCachesAndRespectsTheRateLimit) {
  Milan m;
  testing::TempDir dir;
  snp::DirectoryCache cache(dir.file("vceks"));
  FakeFetcher net;
  net.answer = m.vcek;
  FakeClock clock;
  snp::KdsSource kds(net, clock, cache);

  auto first = kds.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, false);
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_EQ(kds.requests(), 1u);
  ASSERT_EQ(net.urls.size(), 1u);
  EXPECT_EQ(net.urls[0], *snp::kds_vcek_url(snp::Product::kMilan, m.chip(), m.tcb));
  // Cached now: no second request, even right away.
  EXPECT_TRUE(kds.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, false));
  EXPECT_EQ(kds.requests(), 1u);
  // Another TCB within 10 s: refused at once, naming when to retry.
  snp::Tcb other = m.tcb;
  other.microcode = 200;
  clock.t += 4;
  auto limited = kds.endorsement_cert(snp::Product::kMilan, m.chip(), other, false);
  ASSERT_TRUE(FailsWith(limited, ErrorCode::kUnavailable));
  EXPECT_NE(limited.error().message.find("allowed in 6 s"), std::string::npos) << limited.error().message;
  EXPECT_EQ(kds.requests(), 1u);
  // After 10 s it asks — and an answer for another TCB is refused, not cached.
  clock.t += 6;
  auto wrong = kds.endorsement_cert(snp::Product::kMilan, m.chip(), other, false);
  ASSERT_TRUE(FailsWith(wrong, ErrorCode::kAuth));
  EXPECT_EQ(kds.requests(), 2u);
  clock.t += 10;
  net.answer = to_bytes("<html>rate limited</html>");
  EXPECT_TRUE(FailsWith(kds.endorsement_cert(snp::Product::kMilan, m.chip(), other, false), ErrorCode::kMalformed));
  EXPECT_TRUE(FailsWith(cache.endorsement_cert(snp::Product::kMilan, m.chip(), other, false), ErrorCode::kUnavailable));
  EXPECT_TRUE(FailsWith(kds.endorsement_cert(snp::Product::kMilan, m.chip(), m.tcb, true), ErrorCode::kUnavailable));

  // And the VCEK that came this way verifies the report.
  snp::VerifyInputs in;
  in.report = m.report;
  in.endorsement_cert = *first;
  in.at = testing::milan_report_time();
  auto v = snp::verify_report(in);
  EXPECT_TRUE(v) << v.error().message;
}

}  // namespace
}  // namespace tresor
