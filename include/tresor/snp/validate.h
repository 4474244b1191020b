// tresor/snp/validate.h — the attestation policy: data (JSON) that decides whether verified
// SEV-SNP claims are acceptable. Validation reports every failed check at once (STYLE.md rule 9),
// each naming the field and both values. No policy, or a malformed one, denies (trustee's rule:
// absent or malformed policy means deny).
//
// Policy format (docs/attestation.md §Policy): a JSON object; unknown keys are errors, so that a
// misspelt rule can never be silently ignored.
//   "measurements":        ["<96 hex>", …]   required, non-empty: allowed launch measurements
//   "min_tcb":             {"bootloader":n, "tee":n, "snp":n, "microcode":n, "fmc":n}  required
//   "min_firmware":        {"major":n, "minor":n}   CURRENT_MAJOR.CURRENT_MINOR at least this
//   "min_guest_abi":       {"major":n, "minor":n}   GUEST_POLICY ABI_MAJOR.ABI_MINOR at least this
//   "allow_smt":           bool (default false)     GUEST_POLICY.SMT may be set
//   "allow_migrate_ma":    bool (default false)     GUEST_POLICY.MIGRATE_MA may be set
//   "require_single_socket": bool (default false)  GUEST_POLICY.SINGLE_SOCKET must be set
//   "vmpls":               [n, …] (default [0])     VMPL must be one of these
//   "signing_keys":        ["vcek"|"vlek", …] (default ["vcek"])
//   "products":            ["Milan"|"Genoa"|"Turin", …] (default: all)
//   "family_ids", "image_ids": ["<32 hex>", …]      if present, the field must be one of these
//   "host_data":           "<64 hex>"               if present, HOST_DATA must equal it
//   "report_data":         "<128 hex>"              if present, REPORT_DATA must equal it
// GUEST_POLICY.DEBUG must be 0 under every policy: there is no key to allow it.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "tresor/error.h"
#include "tresor/snp/verify.h"

namespace tresor::snp {

struct Policy {
  std::vector<std::array<std::byte, 48>> measurements;
  Tcb min_tcb;
  uint8_t min_firmware_major = 0, min_firmware_minor = 0;
  uint8_t min_guest_abi_major = 0, min_guest_abi_minor = 0;
  bool allow_smt = false;
  bool allow_migrate_ma = false;
  bool require_single_socket = false;
  std::vector<uint32_t> vmpls{0};
  bool allow_vcek = true;
  bool allow_vlek = false;
  std::vector<Product> products{Product::kMilan, Product::kGenoa, Product::kTurin};
  std::vector<std::array<std::byte, 16>> family_ids;  // empty: any
  std::vector<std::array<std::byte, 16>> image_ids;   // empty: any
  std::optional<std::array<std::byte, 32>> host_data;
  std::optional<std::array<std::byte, 64>> report_data;
};

/// Parses a policy document. kInvalidArgument names the key and what is wrong with it.
[[nodiscard]] Result<Policy> parse_policy(std::string_view json);

/// Values the caller binds at validation time, overriding the policy's own (for a job: HOST_DATA
/// = SHA-256 of its manifest, REPORT_DATA = the KBS binding of nonce and key).
struct Expectations {
  std::optional<std::array<std::byte, 32>> host_data;
  std::optional<std::array<std::byte, 64>> report_data;
};

/// Checks `claims` against `policy`. kPolicy with every failed check, one per line, when any
/// fails; a missing policy (nullptr) denies.
[[nodiscard]] Result<void> validate(const VerifiedReport& claims, const Policy* policy, const Expectations& expect = {});
/// The same checks as validate(), as a list of what failed (empty: all passed), for callers that
/// combine them with checks of their own (the broker's release decision).
[[nodiscard]] std::vector<std::string> failed_checks(const VerifiedReport& claims, const Policy& policy,
                                                     const Expectations& expect = {});

}  // namespace tresor::snp
