// tresor/snp/sim.h — the `sim` platform's secure processor (DESIGN.md, "Platforms"): a software
// stand-in for the AMD-SP that signs byte-exact SNP reports with its own test ARK (RSA-4096,
// RSASSA-PSS), ASK (RSA-4096) and VCEK (ECDSA P-384) carrying the same X.509 extensions as
// AMD's, product name "Sim". The same parser, verifier and policy run on its reports. Nothing
// trusts a sim root unless the caller passes it explicitly (VerifyInputs::sim_trust), and every
// verification through it is flagged (VerifiedReport::sim) so that callers warn.
#pragma once

#include <array>
#include <memory>
#include <optional>
#include <string>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"
#include "tresor/snp/report.h"
#include "tresor/snp/verify.h"

namespace tresor::snp::sim {

inline constexpr std::string_view kProductName = "Sim";

/// What `tresor sim init` writes into a directory: ark.pem, ask.pem, vcek.pem (public), the three
/// private keys (ark.key, ask.key, vcek.key, mode 0600) and sim.json (chip id, TCB).
struct InitOptions {
  Tcb tcb{.fmc = 0, .bootloader = 3, .tee = 0, .snp = 8, .microcode = 115};
  int validity_days = 3650;
  int rsa_bits = 4096;  // AMD's roots are RSA-4096
};
[[nodiscard]] Result<void> init(const std::string& dir, const InitOptions& options = {});

/// The trust entry for a sim root (its ARK and ASK), read from a sim directory. Passing it to the
/// verifier (VerifyInputs::sim_trust) is the only way a sim report can verify.
[[nodiscard]] Result<SimTrust> load_trust(const std::string& dir);

struct ReportParams {
  uint32_t version = 5;
  uint64_t policy = 0x30000;  // SMT allowed, reserved bit 17 (GUEST_POLICY, Table 9)
  std::array<std::byte, 48> measurement{};
  std::array<std::byte, 64> report_data{};
  std::array<std::byte, 32> host_data{};
  std::array<std::byte, 16> family_id{};
  std::array<std::byte, 16> image_id{};
  uint32_t vmpl = 0;
  std::optional<Tcb> tcb;  // default: the TCB the VCEK was made for
};

/// SecureProcessor signs reports with the VCEK of a sim directory.
class SecureProcessor {
 public:
  [[nodiscard]] static Result<SecureProcessor> load(const std::string& dir);
  SecureProcessor(SecureProcessor&&) noexcept;
  SecureProcessor& operator=(SecureProcessor&&) noexcept;
  ~SecureProcessor();

  /// A signed report (0x4A0 bytes) of `params.version` (2, 3 or 5).
  [[nodiscard]] Result<std::array<std::byte, kReportSize>> sign_report(const ReportParams& params) const;
  /// The VCEK certificate (PEM) that verifies the reports.
  const std::string& vcek_pem() const;
  ByteSpan chip_id() const;

 private:
  struct Impl;
  explicit SecureProcessor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tresor::snp::sim
