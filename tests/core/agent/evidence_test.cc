// The agent's evidence sources: the framed host channel (frames, limits, a closed or truncated
// channel), and the guest's own AMD-SP through configfs-tsm and /dev/sev-guest — their parsing
// run on AMD's real Milan report and VCEK (../shared/testdata/snp/milan-v2-virtee), the configfs
// exchange on a directory laid out like a report entry, and the clear errors where neither
// kernel interface exists (this machine is not an SNP guest).
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "support/test_support.h"
#include "tresor/agent/evidence.h"
#include "tresor/agent/guest_evidence.h"
#include "tresor/snp/certs.h"
#include "tresor/snp/report.h"

namespace tresor {
namespace {

using testing::FailsWith;
using testing::read_file;
using testing::shared_testdata;

struct Milan {
  Bytes report = read_file(shared_testdata("snp/milan-v2-virtee/report.bin"));
  Bytes vcek = read_file(shared_testdata("snp/milan-v2-virtee/vcek.der"));
  std::array<std::byte, 64> report_data = snp::parse_report(report)->report_data;
  Bytes table(bool with_vcek = true) const {
    snp::CertTable t;
    if (with_vcek) t.certs[std::string(snp::kGuidVcek)] = vcek;
    t.certs[std::string(snp::kGuidArk)] = testing::pattern_bytes(300, 1);
    return snp::serialize_cert_table(t);
  }
};

struct SocketPair {
  int fd[2];
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fd), 0); }
  ~SocketPair() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
};

TEST(AgentEvidence, FramesRoundTripAndLimits) {
  SocketPair s;
  const Bytes body = testing::pattern_bytes(1000, 3);
  ASSERT_TRUE(agent::write_frame(s.fd[0], body));
  ASSERT_TRUE(agent::write_frame(s.fd[0], Bytes{}));
  auto a = agent::read_frame(s.fd[1], 4096);
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_EQ(*a, body);
  auto empty = agent::read_frame(s.fd[1], 4096);
  ASSERT_TRUE(empty);
  EXPECT_TRUE(empty->empty());
  // A frame longer than the reader allows is refused, naming both sizes.
  ASSERT_TRUE(agent::write_frame(s.fd[0], body));
  auto big = agent::read_frame(s.fd[1], 64);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, ErrorCode::kMalformed);
  EXPECT_NE(big.error().message.find("1000 bytes (at most 64)"), std::string::npos) << big.error().message;
}

TEST(AgentEvidence, ClosedAndTruncatedChannels) {
  {
    SocketPair s;
    ::close(s.fd[0]);
    s.fd[0] = -1;
    EXPECT_TRUE(FailsWith(agent::read_frame(s.fd[1], 64), ErrorCode::kUnavailable));  // clean EOF
  }
  {
    SocketPair s;
    const std::byte partial[] = {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{9}, std::byte{1}};
    ASSERT_EQ(::write(s.fd[0], partial, sizeof partial), 5);
    ::close(s.fd[0]);
    s.fd[0] = -1;
    EXPECT_TRUE(FailsWith(agent::read_frame(s.fd[1], 64), ErrorCode::kTruncated));  // 1 of 9 bytes
  }
  {
    // The host answers "error: …": the agent reports the host's reason.
    SocketPair s;
    const std::string e = "error: no key";
    ASSERT_TRUE(agent::write_frame(s.fd[1], as_bytes(e)));
    agent::ChannelEvidence ch(s.fd[0]);
    auto ev = ch.evidence({});
    ASSERT_FALSE(ev);
    EXPECT_NE(ev.error().message.find("the host could not produce evidence: no key"), std::string::npos) << ev.error().message;
  }
}

TEST(AgentEvidence, ReportResponseLayout) {
  Milan m;
  Bytes rsp(0x20 + m.report.size() + 100, std::byte{0});  // 56860 Table 25; the driver's buffer is larger
  store_le32(rsp.data() + 4, static_cast<uint32_t>(m.report.size()));
  std::copy(m.report.begin(), m.report.end(), rsp.begin() + 0x20);
  auto r = agent::parse_report_response(rsp);
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(*r, m.report);

  Bytes bad_status = rsp;
  store_le32(bad_status.data(), 0x16);
  auto s = agent::parse_report_response(bad_status);
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message.find("INVALID_PARAM"), std::string::npos) << s.error().message;
  Bytes bad_size = rsp;
  store_le32(bad_size.data() + 4, 4000);
  auto z = agent::parse_report_response(bad_size);
  ASSERT_FALSE(z);
  EXPECT_NE(z.error().message.find("REPORT_SIZE is 4000, want 1184"), std::string::npos) << z.error().message;
  EXPECT_TRUE(FailsWith(agent::parse_report_response(ByteSpan(rsp).first(16)), ErrorCode::kMalformed));
}

TEST(AgentEvidence, GuestReportAndCertificateTable) {
  Milan m;
  auto ev = agent::evidence_from_guest(m.report, m.table(), m.report_data);
  ASSERT_TRUE(ev) << ev.error().message;
  EXPECT_EQ(ev->report, m.report);
  // The VCEK from the table, as PEM that decodes to the same DER.
  ASSERT_TRUE(ev->endorsement_cert_pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
  BIO* bio = BIO_new_mem_buf(ev->endorsement_cert_pem.data(), static_cast<int>(ev->endorsement_cert_pem.size()));
  X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  ASSERT_NE(x, nullptr);
  unsigned char* der = nullptr;
  const int n = i2d_X509(x, &der);
  X509_free(x);
  ASSERT_GT(n, 0);
  EXPECT_EQ(Bytes(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + n), m.vcek);
  OPENSSL_free(der);

  // No table, or no VCEK in it: no certificate (the broker's cache answers).
  auto bare = agent::evidence_from_guest(m.report, {}, m.report_data);
  ASSERT_TRUE(bare);
  EXPECT_TRUE(bare->endorsement_cert_pem.empty());
  auto no_vcek = agent::evidence_from_guest(m.report, m.table(false), m.report_data);
  ASSERT_TRUE(no_vcek);
  EXPECT_TRUE(no_vcek->endorsement_cert_pem.empty());

  // A report for other REPORT_DATA (stale, or another guest's) is refused.
  auto other = m.report_data;
  other[0] ^= std::byte{1};
  auto stale = agent::evidence_from_guest(m.report, m.table(), other);
  ASSERT_FALSE(stale);
  EXPECT_NE(stale.error().message.find("a stale or foreign report"), std::string::npos) << stale.error().message;
  // A truncated report, a broken table, a VCEK entry that is not a certificate.
  EXPECT_FALSE(agent::evidence_from_guest(ByteSpan(m.report).first(1000), m.table(), m.report_data));
  Bytes broken = m.table();
  store_le32(broken.data() + 20, 1u << 30);
  EXPECT_TRUE(FailsWith(agent::evidence_from_guest(m.report, broken, m.report_data), ErrorCode::kMalformed));
  snp::CertTable junk;
  junk.certs[std::string(snp::kGuidVcek)] = testing::pattern_bytes(500, 2);
  auto j = agent::evidence_from_guest(m.report, snp::serialize_cert_table(junk), m.report_data);
  ASSERT_FALSE(j);
  EXPECT_NE(j.error().message.find("the VCEK in the host's certificate table is not one DER certificate"), std::string::npos);
}

// A directory laid out like a configfs-tsm report entry after the kernel answered.
struct TsmEntry {
  testing::TempDir dir;
  Milan m;
  explicit TsmEntry(std::string provider = "sev_guest\n", std::string generation = "1\n") {
    testing::write_file(dir.file("inblob"), {});
    testing::write_file(dir.file("generation"), as_bytes(generation));
    testing::write_file(dir.file("provider"), as_bytes(provider));
    testing::write_file(dir.file("outblob"), m.report);
    testing::write_file(dir.file("auxblob"), m.table());
  }
  std::string path() const { return dir.path().string(); }
};

TEST(AgentEvidence, ConfigfsTsmExchange) {
  TsmEntry e;
  auto out = agent::tsm_exchange(e.path(), e.m.report_data);
  ASSERT_TRUE(out) << out.error().message;
  EXPECT_EQ(out->provider, "sev_guest");
  EXPECT_EQ(out->outblob, e.m.report);
  EXPECT_EQ(out->auxblob, e.m.table());
  EXPECT_EQ(read_file(e.dir.file("inblob")), Bytes(e.m.report_data.begin(), e.m.report_data.end()));  // REPORT_DATA written
  auto ev = agent::evidence_from_guest(out->outblob, out->auxblob, e.m.report_data);
  ASSERT_TRUE(ev) << ev.error().message;
  EXPECT_FALSE(ev->endorsement_cert_pem.empty());

  // No auxblob (a TSM without certificates): an empty table, not an error.
  std::filesystem::remove(e.dir.file("auxblob"));
  auto no_aux = agent::tsm_exchange(e.path(), e.m.report_data);
  ASSERT_TRUE(no_aux) << no_aux.error().message;
  EXPECT_TRUE(no_aux->auxblob.empty());

  TsmEntry bad_gen("sev_guest\n", "seven\n");
  auto g = agent::tsm_exchange(bad_gen.path(), bad_gen.m.report_data);
  ASSERT_FALSE(g);
  EXPECT_NE(g.error().message.find("generation is 'seven', not a number"), std::string::npos) << g.error().message;
  TsmEntry no_outblob;
  std::filesystem::remove(no_outblob.dir.file("outblob"));
  auto o = agent::tsm_exchange(no_outblob.path(), no_outblob.m.report_data);
  ASSERT_FALSE(o);
  EXPECT_NE(o.error().message.find("outblob"), std::string::npos) << o.error().message;
}

TEST(AgentEvidence, GuestInterfacesMissingSayWhat) {
  testing::TempDir dir;
  agent::ConfigfsTsmEvidence tsm(dir.file("no-such-tsm"));
  auto t = tsm.evidence({});
  ASSERT_FALSE(t);
  EXPECT_EQ(t.error().code, ErrorCode::kUnavailable);
  EXPECT_NE(t.error().message.find("Linux ≥ 6.7 with CONFIG_TSM_REPORTS"), std::string::npos) << t.error().message;
  agent::SevGuestEvidence dev(dir.file("no-sev-guest"));
  auto d = dev.evidence({});
  ASSERT_FALSE(d);
  EXPECT_NE(d.error().message.find("modprobe sev-guest"), std::string::npos) << d.error().message;
  // A device that is not the sev-guest driver: the ioctl fails and the error says so.
  agent::SevGuestEvidence null_dev("/dev/null");
  auto n = null_dev.evidence({});
  ASSERT_FALSE(n);
  EXPECT_NE(n.error().message.find("SNP_GET_EXT_REPORT on /dev/null failed"), std::string::npos) << n.error().message;

  EXPECT_TRUE(FailsWith(agent::guest_evidence_provider("tpm"), ErrorCode::kInvalidArgument));
  ASSERT_TRUE(agent::guest_evidence_provider("configfs-tsm"));
  ASSERT_TRUE(agent::guest_evidence_provider("sev-guest"));
  if (!std::filesystem::exists(agent::ConfigfsTsmEvidence::kRoot) && !std::filesystem::exists(agent::SevGuestEvidence::kDevice)) {
    auto a = agent::guest_evidence_provider("auto");
    ASSERT_FALSE(a);
    EXPECT_NE(a.error().message.find("no SEV-SNP guest interface here"), std::string::npos) << a.error().message;
  }
}

}  // namespace
}  // namespace tresor
