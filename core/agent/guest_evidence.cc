// The guest's own SNP evidence (include/tresor/agent/guest_evidence.h).
#include "tresor/agent/guest_evidence.h"

#include <fcntl.h>
#include <linux/sev-guest.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "tresor/snp/certs.h"
#include "tresor/snp/report.h"

namespace tresor::agent {
namespace {

// 56860 Table 25, MSG_REPORT_RSP.
constexpr size_t kRspStatus = 0x00, kRspReportSize = 0x04, kRspReport = 0x20;
constexpr uint32_t kStatusInvalidParam = 0x16;

std::string errno_text() { return std::strerror(errno); }

Result<std::string> der_to_pem(ByteSpan der, std::string_view what) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  X509* x = d2i_X509(nullptr, &p, static_cast<long>(der.size()));
  if (x == nullptr || p != reinterpret_cast<const unsigned char*>(der.data() + der.size())) {
    X509_free(x);
    return fail(ErrorCode::kMalformed, std::string(what) + " in the host's certificate table is not one DER certificate");
  }
  BIO* bio = BIO_new(BIO_s_mem());
  const bool ok = bio != nullptr && PEM_write_bio_X509(bio, x) == 1;
  X509_free(x);
  std::string pem;
  if (ok) {
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio, &data);
    pem.assign(data, static_cast<size_t>(n));
  }
  BIO_free(bio);
  if (!ok) return fail(ErrorCode::kCrypto, "PEM_write_bio_X509 failed");
  return pem;
}

Result<Bytes> read_file_all(const std::string& path, bool missing_ok) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (missing_ok && errno == ENOENT) return Bytes{};
    return fail(ErrorCode::kIo, "cannot read " + path + ": " + errno_text());
  }
  Bytes out;
  std::byte buf[8192];
  for (;;) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const std::string e = errno_text();
      ::close(fd);
      return fail(ErrorCode::kIo, "cannot read " + path + ": " + e);
    }
    if (r == 0) break;
    out.insert(out.end(), buf, buf + r);
  }
  ::close(fd);
  return out;
}

Result<unsigned long> read_generation(const std::string& entry) {
  auto g = read_file_all(entry + "/generation", false);
  if (!g) return std::unexpected(g.error());
  std::string text(reinterpret_cast<const char*>(g->data()), g->size());
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos) {
    return fail(ErrorCode::kMalformed, entry + "/generation is '" + text + "', not a number");
  }
  return std::stoul(text);
}

}  // namespace

Result<Bytes> parse_report_response(ByteSpan r) {
  if (r.size() < kRspReport) {
    return fail(ErrorCode::kMalformed, "MSG_REPORT_RSP of " + std::to_string(r.size()) + " bytes is shorter than its 32-byte header");
  }
  const uint32_t status = load_le32(r.data() + kRspStatus);
  if (status != 0) {
    return fail(ErrorCode::kUnavailable, "the AMD-SP refused the report request: MSG_REPORT_RSP STATUS is 0x" + to_hex(ByteSpan(r.data(), 4)) +
                                             (status == kStatusInvalidParam ? " (INVALID_PARAM)" : ""));
  }
  const uint32_t size = load_le32(r.data() + kRspReportSize);
  if (size != snp::kReportSize || size > r.size() - kRspReport) {
    return fail(ErrorCode::kMalformed, "MSG_REPORT_RSP REPORT_SIZE is " + std::to_string(size) + ", want " + std::to_string(snp::kReportSize) +
                                           " within a response of " + std::to_string(r.size()) + " bytes");
  }
  return Bytes(r.begin() + kRspReport, r.begin() + kRspReport + size);
}

Result<kbs::Evidence> evidence_from_guest(ByteSpan report, ByteSpan cert_table, const std::array<std::byte, 64>& report_data) {
  auto parsed = snp::parse_report(report);
  if (!parsed) return std::unexpected(Error{parsed.error().code, "the guest's report: " + parsed.error().message});
  if (parsed->report_data != report_data) {
    return fail(ErrorCode::kUnavailable, "the guest's report carries REPORT_DATA " + to_hex(parsed->report_data).substr(0, 16) +
                                             "…, want " + to_hex(report_data).substr(0, 16) + "… (a stale or foreign report)");
  }
  kbs::Evidence ev{Bytes(report.begin(), report.end()), {}};
  if (cert_table.empty()) return ev;
  auto table = snp::parse_cert_table(cert_table);
  if (!table) return std::unexpected(Error{table.error().code, "the host's certificate table: " + table.error().message});
  const bool vlek = parsed->signing_key == snp::SigningKey::kVlek;
  const auto it = table->certs.find(std::string(vlek ? snp::kGuidVlek : snp::kGuidVcek));
  if (it == table->certs.end()) return ev;  // the broker's cache answers for a VCEK
  auto pem = der_to_pem(it->second, vlek ? "the VLEK" : "the VCEK");
  if (!pem) return std::unexpected(pem.error());
  ev.endorsement_cert_pem = std::move(*pem);
  return ev;
}

Result<TsmOutput> tsm_exchange(const std::string& entry, ByteSpan inblob) {
  {
    const int fd = ::open((entry + "/inblob").c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) return fail(ErrorCode::kIo, "cannot open " + entry + "/inblob: " + errno_text());
    const ssize_t w = ::write(fd, inblob.data(), inblob.size());
    const std::string e = errno_text();
    ::close(fd);
    if (w != static_cast<ssize_t>(inblob.size())) return fail(ErrorCode::kIo, "cannot write " + entry + "/inblob: " + e);
  }
  auto before = read_generation(entry);
  if (!before) return std::unexpected(before.error());
  TsmOutput out;
  auto provider = read_file_all(entry + "/provider", false);
  if (!provider) return std::unexpected(provider.error());
  out.provider.assign(reinterpret_cast<const char*>(provider->data()), provider->size());
  while (!out.provider.empty() && out.provider.back() == '\n') out.provider.pop_back();
  auto outblob = read_file_all(entry + "/outblob", false);
  if (!outblob) return std::unexpected(outblob.error());
  out.outblob = std::move(*outblob);
  auto auxblob = read_file_all(entry + "/auxblob", true);  // absent where the TSM has none
  if (!auxblob) return std::unexpected(auxblob.error());
  out.auxblob = std::move(*auxblob);
  auto after = read_generation(entry);
  if (!after) return std::unexpected(after.error());
  if (*after != *before) {
    return fail(ErrorCode::kUnavailable, entry + " was written by someone else during the request (generation " + std::to_string(*before) +
                                             " became " + std::to_string(*after) + "): the report may not be for this REPORT_DATA");
  }
  return out;
}

Result<kbs::Evidence> ConfigfsTsmEvidence::evidence(const std::array<std::byte, 64>& report_data) {
  const std::string entry = root_ + "/tresor-" + std::to_string(::getpid()) + "-" + std::to_string(next_++);
  if (::mkdir(entry.c_str(), 0700) != 0) {
    if (errno == ENOENT) {
      return fail(ErrorCode::kUnavailable, "configfs-tsm is not available (" + root_ +
                                               " does not exist): it needs Linux ≥ 6.7 with CONFIG_TSM_REPORTS, the sev-guest "
                                               "module and configfs mounted on /sys/kernel/config");
    }
    return fail(ErrorCode::kIo, "cannot create the report entry " + entry + ": " + errno_text());
  }
  auto out = tsm_exchange(entry, report_data);
  ::rmdir(entry.c_str());
  if (!out) return std::unexpected(out.error());
  if (out->provider != "sev_guest") {
    return fail(ErrorCode::kUnavailable, "configfs-tsm provider is '" + out->provider + "', want 'sev_guest' (this is not an SEV-SNP guest)");
  }
  return evidence_from_guest(out->outblob, out->auxblob, report_data);
}

Result<kbs::Evidence> SevGuestEvidence::evidence(const std::array<std::byte, 64>& report_data) {
  const int fd = ::open(device_.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      return fail(ErrorCode::kUnavailable, device_ + " does not exist: this is not an SEV-SNP guest, or the sev-guest module is not "
                                                     "loaded (modprobe sev-guest)");
    }
    return fail(ErrorCode::kIo, "cannot open " + device_ + ": " + errno_text());
  }
  snp_ext_report_req req{};
  std::memcpy(req.data.user_data, report_data.data(), report_data.size());
  req.data.vmpl = 0;
  // The driver takes whole pages, at most SEV_FW_BLOB_MAX_SIZE (16 KiB): ARK, ASK and VCEK
  // together are about 4.5 KiB.
  std::vector<std::byte> certs(16384);
  snp_report_resp resp{};
  snp_guest_request_ioctl io{};
  io.msg_version = 1;
  io.req_data = reinterpret_cast<uint64_t>(&req);
  io.resp_data = reinterpret_cast<uint64_t>(&resp);
  req.certs_address = reinterpret_cast<uint64_t>(certs.data());
  req.certs_len = static_cast<uint32_t>(certs.size());
  int rc = ::ioctl(fd, SNP_GET_EXT_REPORT, &io);
  const int err = errno;
  ::close(fd);
  if (rc != 0) {
    char codes[64];
    std::snprintf(codes, sizeof codes, " (firmware error 0x%x, VMM error %u", io.fw_error, io.vmm_error);
    return fail(ErrorCode::kUnavailable, "SNP_GET_EXT_REPORT on " + device_ + " failed: " + std::strerror(err) + codes +
                                             (io.vmm_error == 1 ? ": the host's certificates need " + std::to_string(req.certs_len) + " bytes" : "") + ")");
  }
  auto report = parse_report_response(ByteSpan(reinterpret_cast<const std::byte*>(resp.data), sizeof resp.data));
  if (!report) return std::unexpected(report.error());
  // An all-zero buffer (the host gave no certificates) has no table.
  const bool any = std::any_of(certs.begin(), certs.begin() + 24, [](std::byte b) { return b != std::byte{0}; });
  return evidence_from_guest(*report, any ? ByteSpan(certs) : ByteSpan(), report_data);
}

Result<std::unique_ptr<EvidenceProvider>> guest_evidence_provider(std::string_view kind) {
  if (kind == "configfs-tsm") return std::make_unique<ConfigfsTsmEvidence>();
  if (kind == "sev-guest") return std::make_unique<SevGuestEvidence>();
  if (kind != "auto") {
    return fail(ErrorCode::kInvalidArgument, "evidence source '" + std::string(kind) + "' is unknown: use configfs-tsm, sev-guest or auto");
  }
  struct stat st {};
  if (::stat(std::string(ConfigfsTsmEvidence::kRoot).c_str(), &st) == 0) return std::make_unique<ConfigfsTsmEvidence>();
  if (::stat(std::string(SevGuestEvidence::kDevice).c_str(), &st) == 0) return std::make_unique<SevGuestEvidence>();
  return fail(ErrorCode::kUnavailable, "no SEV-SNP guest interface here: neither " + std::string(ConfigfsTsmEvidence::kRoot) +
                                           " (configfs-tsm, Linux ≥ 6.7) nor " + std::string(SevGuestEvidence::kDevice) +
                                           " (the sev-guest module) exists; outside an SNP VM use the sim evidence channel");
}

}  // namespace tresor::agent
