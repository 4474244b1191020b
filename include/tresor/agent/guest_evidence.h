// tresor/agent/guest_evidence.h — the agent's SNP evidence from the guest's own AMD-SP (issue 5,
// item 3; DESIGN.md §attestation), behind the EvidenceProvider interface of evidence.h. Two
// kernel interfaces reach the same firmware request (SNP ABI 56860 §7.3 MSG_REPORT_REQ):
//  - configfs-tsm (Linux ≥ 6.7): mkdir /sys/kernel/config/tsm/report/<name>, write REPORT_DATA to
//    inblob, read outblob (the report) and auxblob (the host's certificate table), with the
//    entry's generation read before and after so that a concurrent writer is detected
//    (Documentation/ABI/testing/configfs-tsm-report);
//  - /dev/sev-guest (Linux ≥ 5.19): the SNP_GET_EXT_REPORT ioctl of <linux/sev-guest.h>, whose
//    response is a MSG_REPORT_RSP (56860 Table 25) and whose certificate pages hold the same
//    table (GHCB 56421 §4.1.8.1).
// The parsing is pure and tested on every machine with AMD's real report and VCEK; the device
// I/O is thin and says exactly what is missing where neither interface exists.
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "tresor/agent/evidence.h"
#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/kbs/client.h"

namespace tresor::agent {

/// MSG_REPORT_RSP (SNP ABI 56860 Table 25): STATUS u32 at 0x00 (0 = success; 0x16 =
/// INVALID_PARAM: a bad VMPL or reserved bits), REPORT_SIZE u32 at 0x04, reserved to 0x1F, and
/// REPORT_SIZE bytes of report at 0x20. Returns the report; kUnavailable names a non-zero STATUS,
/// kMalformed a size that does not fit the response.
[[nodiscard]] Result<Bytes> parse_report_response(ByteSpan response);

/// Evidence from the guest's report and the host's certificate table (may be empty): the report
/// must parse and carry exactly `report_data` (a stale or foreign report is refused, naming both
/// values); the endorsement certificate is the one the report's SIGNING_KEY names (VCEK or VLEK),
/// as PEM. Without a table, or without that certificate in it, the PEM is empty and the broker
/// looks the VCEK up in its cache (docs/broker.md).
[[nodiscard]] Result<kbs::Evidence> evidence_from_guest(ByteSpan report, ByteSpan cert_table,
                                                         const std::array<std::byte, 64>& report_data);

/// What one configfs-tsm report entry gave back.
struct TsmOutput {
  std::string provider;  // "sev_guest" for SNP
  Bytes outblob, auxblob;
};

/// The exchange on an existing report entry directory (exposed for tests, which run it on a
/// directory laid out like one): writes `inblob`, reads generation, provider, outblob, auxblob
/// (absent or empty: no table) and generation again. kUnavailable when the generations differ
/// (another process wrote to the entry: the report may not be for this inblob).
[[nodiscard]] Result<TsmOutput> tsm_exchange(const std::string& entry_dir, ByteSpan inblob);

class ConfigfsTsmEvidence final : public EvidenceProvider {
 public:
  static constexpr std::string_view kRoot = "/sys/kernel/config/tsm/report";
  explicit ConfigfsTsmEvidence(std::string root = std::string(kRoot)) : root_(std::move(root)) {}
  /// A private entry (mkdir <root>/tresor-<pid>-<n>), the exchange, the entry removed again.
  Result<kbs::Evidence> evidence(const std::array<std::byte, 64>& report_data) override;

 private:
  std::string root_;
  unsigned next_ = 0;
};

class SevGuestEvidence final : public EvidenceProvider {
 public:
  static constexpr std::string_view kDevice = "/dev/sev-guest";
  explicit SevGuestEvidence(std::string device = std::string(kDevice)) : device_(std::move(device)) {}
  /// SNP_GET_EXT_REPORT at VMPL 0 with certificate pages (grown once when the host's table is
  /// larger than the first guess, as the driver reports).
  Result<kbs::Evidence> evidence(const std::array<std::byte, 64>& report_data) override;

 private:
  std::string device_;
};

/// The provider named on the agent's command line: "configfs-tsm", "sev-guest", or "auto"
/// (configfs-tsm where the kernel offers it, else /dev/sev-guest). kUnavailable says which of
/// the two is missing and what provides it; kInvalidArgument names an unknown kind.
[[nodiscard]] Result<std::unique_ptr<EvidenceProvider>> guest_evidence_provider(std::string_view kind);

}  // namespace tresor::agent
