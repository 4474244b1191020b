// tresor/roster.h — the step roster and link keys: the ranks of one data-parallel training step
// on several machines, where rank 0 listens, and each rank's Ed25519 link key (docs/formats.md
// §13, docs/training.md §5.3); and the link claim an attested VM makes to join a step, which the
// broker turns into rosters (docs/protocol.md §13).
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/error.h"

namespace tresor {

/// The members of one step across machines (docs/training.md §5.3, format in docs/formats.md
/// §13): the step it is for, where rank 0 listens, and each rank's Ed25519 link key (ranks in one
/// VM share theirs). Whoever holds a listed key may join as a rank listing it, so a
/// roster must come from a source that checked each key's holder (in a confidential job: the
/// broker, which lists only attested VMs' keys, docs/scale.md §2.2).
struct Roster {
  std::string step;                           // "JOB.STEP", the Rendezvous's run_id
  std::string lead_host;                      // an IPv4 address literal
  uint16_t lead_port = 0;
  std::vector<std::array<std::byte, 32>> keys;  // per rank
  std::array<std::byte, 32> digest{};         // SHA-256 of the document's bytes; ranks must agree on it
};
/// Parses a roster document (strict: unknown members, malformed keys, addresses and steps are
/// named); kInvalidArgument.
[[nodiscard]] Result<Roster> parse_roster(std::string_view text);
/// A link key file (docs/formats.md §13.1): "tresor-link-key-v1 " + base64url of the
/// Ed25519 seed + "\n". The text holds the secret: the caller wipes it.
[[nodiscard]] Result<std::string> link_key_text(const crypto::Key& key);
/// Reads a link key file's text; kInvalidArgument names what is malformed.
[[nodiscard]] Result<crypto::Key> parse_link_key(std::string_view text);
/// A link key's public half as rosters and claims list it (32 bytes, RFC 8032 §5.1.5);
/// kInvalidArgument for a key that is not Ed25519.
[[nodiscard]] Result<std::array<std::byte, 32>> link_public_key(const crypto::Key& key);
/// The roster document for the given members (the inverse of parse_roster).
[[nodiscard]] std::string roster_text(std::string_view step, std::string_view lead, std::span<const std::array<std::byte, 32>> keys);

/// What a VM declares, bound into its attestation (the KBS runtime-data's "additional-evidence",
/// so REPORT_DATA covers it), to be listed in its step's roster (docs/protocol.md §13):
/// {"link-key":"<base64url>","step":"JOB.STEP","size":N,"ranks":[r, …],"lead":"A:P"}; "lead"
/// exactly when rank 0 is among the ranks.
struct LinkClaim {
  std::array<std::byte, 32> key{};  // Ed25519 link public key
  std::string step;                 // JOB.STEP
  int size = 0;                     // the step's ranks, 1..1024
  std::vector<int> ranks;           // this VM's ranks: ascending, distinct, in [0, size)
  std::string lead;                 // rank 0's listening address, with rank 0 only
};
/// Strict parsing; kInvalidArgument names the member that is wrong.
[[nodiscard]] Result<LinkClaim> parse_link_claim(std::string_view text);
/// The claim's JSON text (what parse_link_claim reads back).
[[nodiscard]] std::string link_claim_text(const LinkClaim& claim);
/// Whether `step` is a valid step id (1..64 of letters, digits, '.', '_', '-').
bool valid_step_id(std::string_view step);
/// Whether `lead` is an IPv4 literal and a port 1..65535, as "10.8.0.1:29400".
bool valid_lead_address(std::string_view lead);

}  // namespace tresor
