// libFuzzer target for the JSON the broker reads from guests and users: strict parsing, RFC 8785
// canonicalization, KBS Requests, JWKs, JWEs, job manifests, attestation policies, link claims and
// step rosters. None may throw or crash; the canonical form must be a fixed point, and an accepted
// manifest, link claim or roster must round-trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "tresor/kbs/jose.h"
#include "tresor/kbs/session.h"
#include "tresor/manifest.h"
#include "tresor/roster.h"
#include "tresor/snp/validate.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tresor;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  static const crypto::Key p256 = *crypto::Key::generate(crypto::KeyType::kP256);

  if (auto j = kbs::parse_strict_json(text, "fuzz")) {
    if (auto canon = kbs::canonical_json(*j)) {
      auto again = kbs::parse_strict_json(*canon, "canonical");
      if (!again) std::abort();
      auto canon2 = kbs::canonical_json(*again);
      if (!canon2 || *canon2 != *canon) std::abort();
    }
    (void)kbs::key_from_jwk(*j);
    (void)kbs::jwe_decrypt(*j, p256);
  }
  if (auto m = parse_manifest(text)) {
    auto out = manifest_json(*m, true);
    if (!out) std::abort();
    auto back = parse_manifest(*out);
    if (!back || !(*back == *m)) std::abort();
  }
  (void)snp::parse_policy(text);  // a data owner's attestation policy
  // A VM's link claim (parsed before its evidence is verified) and a step roster.
  if (auto c = parse_link_claim(text)) {
    auto back = parse_link_claim(link_claim_text(*c));
    if (!back || link_claim_text(*back) != link_claim_text(*c) || back->ranks != c->ranks) std::abort();
  }
  if (auto r = parse_roster(text)) {
    auto back = parse_roster(roster_text(r->step, r->lead_host + ":" + std::to_string(r->lead_port), r->keys));
    if (!back || back->keys != r->keys || back->step != r->step || back->lead_port != r->lead_port || back->lead_host != r->lead_host) std::abort();
  }
  kbs::SessionTable table;
  (void)table.auth(text, 1764500000);
  return 0;
}
