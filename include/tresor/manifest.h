// tresor/manifest.h — the job manifest: what a user authorises one confidential job to do, signed
// with the user's Ed25519 key (the `tresor keygen` identity). The runner puts SHA-256 of the
// signed manifest into the SNP report's HOST_DATA at launch, so the broker can check that the
// attested VM runs exactly this job for exactly this user (DESIGN.md, "Attestation and key
// release"). Canonical JSON (RFC 8785) makes the bytes that are signed and hashed unambiguous.
//
// Format (docs/manifest.md):
//   {"version":"tresor-manifest-v1","job_id":"…","user":"tresor1…","datasets":["dhz/ccta-2024"],
//    "image_measurement":"<96 hex>","script_sha256":"<64 hex>","output_recipients":["tresor1…"],
//    "expires_at":<unix seconds>,"signature":"<base64url Ed25519>"}
#pragma once

#include <array>
#include <ctime>
#include <string>
#include <vector>

#include "tresor/error.h"
#include "tresor/identity.h"

namespace tresor {

inline constexpr std::string_view kManifestVersion = "tresor-manifest-v1";

struct Manifest {
  std::string job_id;                        // scheduler job id, 1..64 of [A-Za-z0-9._-]
  Recipient user;                            // who asks; signs the manifest
  std::vector<std::string> datasets;         // dataset ids the job may receive keys for
  std::array<std::byte, 48> image_measurement{};  // the SNP launch measurement of the image
  std::array<std::byte, 32> script_sha256{};      // the job script
  std::vector<Recipient> output_recipients;  // whom the outputs are sealed to
  int64_t expires_at = 0;                    // unix seconds
  std::array<std::byte, 64> signature{};     // Ed25519 over the canonical JSON without "signature"

  bool operator==(const Manifest&) const = default;
};

/// The canonical JSON of `m`, with or without its signature member.
[[nodiscard]] Result<std::string> manifest_json(const Manifest& m, bool with_signature);
/// Parses a manifest (strict: unknown or missing members, bad ids and bad hex are errors naming
/// the member). Does not verify the signature.
[[nodiscard]] Result<Manifest> parse_manifest(std::string_view json);
/// Signs `m` with `id`, which must be the identity of m.user.
[[nodiscard]] Result<void> sign_manifest(Manifest& m, const Identity& id);
/// Checks the signature with m.user's key and that `now` is before expires_at. kAuth names which.
[[nodiscard]] Result<void> verify_manifest(const Manifest& m, std::time_t now);
/// SHA-256 of the signed manifest's canonical JSON: the HOST_DATA the job's VM is launched with.
[[nodiscard]] Result<std::array<std::byte, 32>> manifest_digest(const Manifest& m);

}  // namespace tresor
