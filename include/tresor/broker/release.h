// tresor/broker/release.h — the broker's one decision: may this attested VM, running this signed
// job manifest, receive this dataset's key? (issue 4, item 3; DESIGN.md "Attestation and key
// release"). Deny by default: a release needs every check below to pass, and a denial names every
// check that failed, for the log and the audit record — never for the HTTP body.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tresor/broker/store.h"
#include "tresor/error.h"
#include "tresor/manifest.h"
#include "tresor/snp/validate.h"

namespace tresor::broker {

/// A dataset's policy document, as stored by `tresor admin policy set`:
///   {"attestation": {…snp policy (docs/attestation.md)…},
///    "users": ["alice", …],          // optional: only these users, even with a grant
///    "groups": ["cardiology", …],    // optional: or members of these groups
///    "expires_at": 1798761600}        // optional: unix seconds after which nothing is released
/// Strict: unknown members and wrong types are errors naming the member.
struct DatasetPolicy {
  snp::Policy attestation;
  std::vector<std::string> users;   // with groups empty too: every user with a grant
  std::vector<std::string> groups;  // a user in any of these is admitted as if listed in users
  int64_t expires_at = 0;          // 0: no expiry
};
[[nodiscard]] Result<DatasetPolicy> parse_dataset_policy(std::string_view json);

struct ReleaseRequest {
  const snp::VerifiedReport* report = nullptr;  // verified evidence of the session
  std::array<std::byte, 64> report_data{};      // the KBS binding of the session's nonce and key
  const Manifest* manifest = nullptr;           // the job manifest the VM presented
  std::string dataset;                          // the resource asked for
  std::optional<uint32_t> key_version;          // a given key version; none: the current one
  /// True only when the caller has itself checked this very Manifest object's signature with
  /// verify_manifest() (the broker does at attest, and keeps the object immutable in the
  /// session): the Ed25519 check is then not repeated. Expiry is checked every time.
  bool manifest_signature_verified = false;
  int64_t now = 0;                              // unix seconds
};

/// What the broker decided, for the audit record.
struct Release {
  std::string user;     // the registered user name the manifest's key belongs to
  DataKey key;          // the dataset's current key
};

/// Every check, in this order, all evaluated so that a denial lists all failures: the manifest's
/// signature and expiry; its user is registered under that identity and not revoked; the dataset
/// exists and is named in the manifest; the user holds a grant on it; the dataset has a policy
/// that parses, has not expired and admits the user; the report's MEASUREMENT equals the
/// manifest's image measurement; HOST_DATA equals SHA-256 of the manifest; REPORT_DATA equals the
/// session binding; and the attestation policy (measurements, TCB, DEBUG never, SMT, VMPL, …).
/// Errors: kAuth when the manifest is forged or expired or its signer unknown or revoked (401);
/// kPolicy for the rest, an unknown dataset included (403: existence is not revealed);
/// kNoMatchingKey when every check passed but the dataset has no key, or not the version asked
/// for (404); kIo when the store cannot open the key (500). Messages list every failed check.
[[nodiscard]] Result<Release> authorize_release(const Store& store, const ReleaseRequest& request);

/// The one mapping from an error to the HTTP status the broker answers with.
int http_status(ErrorCode code);

}  // namespace tresor::broker
