// Evidence for the agent across the host channel (include/tresor/agent/evidence.h).
#include "tresor/agent/evidence.h"

#include "tresor/io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tresor::agent {
namespace {

constexpr size_t kMaxFrame = 1 << 20;

}  // namespace

Result<void> write_frame(int fd, ByteSpan data) {
  if (data.size() > kMaxFrame) return fail(ErrorCode::kInvalidArgument, "evidence channel: frame too large");
  std::array<std::byte, 4> len{};
  store_be32(len.data(), static_cast<uint32_t>(data.size()));
  TRESOR_TRY(write_all_fd(fd, len, "evidence channel"));
  return write_all_fd(fd, data, "evidence channel");
}

Result<Bytes> read_frame(int fd, size_t max) {
  std::array<std::byte, 4> len{};
  auto got = read_exact_fd(fd, len, "evidence channel");
  if (!got) return std::unexpected(got.error());
  if (!*got) return fail(ErrorCode::kUnavailable, "evidence channel: closed");
  const uint32_t n = load_be32(len.data());
  if (n > max) return fail(ErrorCode::kMalformed, "evidence channel: a frame of " + std::to_string(n) + " bytes (at most " + std::to_string(max) + ")");
  Bytes out(n);
  auto body = read_exact_fd(fd, out, "evidence channel");
  if (!body) return std::unexpected(body.error());
  if (!*body && n > 0) return fail(ErrorCode::kTruncated, "evidence channel: closed before the frame's body");
  return out;
}

Result<kbs::Evidence> ChannelEvidence::evidence(const std::array<std::byte, 64>& report_data) {
  TRESOR_TRY(write_frame(fd_, report_data));
  auto report = read_frame(fd_, kMaxFrame);
  if (!report) return std::unexpected(report.error());
  const std::string_view first(reinterpret_cast<const char*>(report->data()), report->size());
  if (first.starts_with("error: ")) return fail(ErrorCode::kUnavailable, "the host could not produce evidence: " + std::string(first.substr(7)));
  auto cert = read_frame(fd_, kMaxFrame);
  if (!cert) return std::unexpected(cert.error());
  return kbs::Evidence{std::move(*report), std::string(reinterpret_cast<const char*>(cert->data()), cert->size())};
}

Result<size_t> serve_sim_evidence(int fd, const snp::sim::SecureProcessor& sp, const std::array<std::byte, 48>& measurement,
                                  const std::array<std::byte, 32>& host_data) {
  size_t served = 0;
  for (;;) {
    auto req = read_frame(fd, 64);
    if (!req) {
      if (req.error().code == ErrorCode::kUnavailable) return served;  // the agent is done
      return std::unexpected(req.error());
    }
    if (req->size() != 64) {
      const std::string e = "error: REPORT_DATA must be 64 bytes";
      TRESOR_TRY(write_frame(fd, as_bytes(e)));
      continue;
    }
    snp::sim::ReportParams p;
    p.measurement = measurement;
    p.host_data = host_data;
    std::copy(req->begin(), req->end(), p.report_data.begin());
    auto report = sp.sign_report(p);
    if (!report) {
      const std::string e = "error: " + report.error().message;
      TRESOR_TRY(write_frame(fd, as_bytes(e)));
      continue;
    }
    TRESOR_TRY(write_frame(fd, *report));
    TRESOR_TRY(write_frame(fd, as_bytes(sp.vcek_pem())));
    ++served;
  }
}

}  // namespace tresor::agent
