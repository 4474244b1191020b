// The step roster (include/tresor/train/collective.h, docs/formats.md "Step roster"): the ranks of
// a step across machines, where rank 0 listens, and each rank's Ed25519 link key.
#include <arpa/inet.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/kbs/jose.h"
#include "tresor/secret.h"
#include "tresor/train/collective.h"

namespace tresor::train {
namespace {

using json = nlohmann::json;
constexpr std::string_view kFormat = "tresor-step-roster";
constexpr size_t kMaxRanks = 1024;

Error bad(const std::string& what) { return Error{ErrorCode::kInvalidArgument, "step roster: " + what}; }

bool valid_step(std::string_view s) {
  return !s.empty() && s.size() <= 64 && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == std::string_view::npos;
}

}  // namespace

Result<Roster> parse_roster(std::string_view text) {
  // The broker's strict reading (duplicate members, NUL bytes and numbers past 2^53 refused).
  auto parsed = kbs::parse_strict_json(text, "step roster");
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  if (!j.is_object()) return std::unexpected(bad("not a JSON object"));
  for (const auto& [k, v] : j.items()) {
    if (k != "format" && k != "version" && k != "step" && k != "lead" && k != "ranks") return std::unexpected(bad(std::string("unknown member \"").append(k).append("\"")));
  }
  for (const char* k : {"format", "version", "step", "lead", "ranks"}) {
    if (!j.contains(k)) return std::unexpected(bad(std::string("\"").append(k).append("\" is missing")));
  }
  if (!j["format"].is_string() || j["format"].get<std::string>() != kFormat) return std::unexpected(bad("\"format\" must be \"" + std::string(kFormat) + "\""));
  if (!j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) return std::unexpected(bad("\"version\" is " + j["version"].dump() + "; this Tresor reads version 1"));
  Roster r;
  if (!j["step"].is_string() || !valid_step(j["step"].get<std::string>())) {
    return std::unexpected(bad("\"step\" is " + j["step"].dump() + "; want 1..64 of letters, digits, '.', '_', '-' (JOB.STEP)"));
  }
  r.step = j["step"].get<std::string>();
  // "lead": rank 0's listening address, IPv4 literal ':' port (1..65535, decimal).
  if (!j["lead"].is_string()) return std::unexpected(bad("\"lead\" must be a string \"ADDRESS:PORT\""));
  const std::string lead = j["lead"].get<std::string>();
  const size_t colon = lead.rfind(':');
  in_addr addr{};
  unsigned port = 0;
  const char* pb = lead.data() + (colon == std::string::npos ? lead.size() : colon + 1);
  const char* pe = lead.data() + lead.size();
  const auto [pend, perr] = std::from_chars(pb, pe, port);
  if (colon == std::string::npos || ::inet_pton(AF_INET, lead.substr(0, colon).c_str(), &addr) != 1 || pb == pe || perr != std::errc() || pend != pe ||
      *pb == '0' || port == 0 || port > 65535) {
    return std::unexpected(bad("\"lead\" is \"" + lead + "\"; want an IPv4 address and a port 1..65535, as \"10.8.0.1:29400\""));
  }
  r.lead_host = lead.substr(0, colon);
  r.lead_port = static_cast<uint16_t>(port);
  const json& ranks = j["ranks"];
  if (!ranks.is_array() || ranks.empty() || ranks.size() > kMaxRanks) {
    return std::unexpected(bad("\"ranks\" must be an array of 1.." + std::to_string(kMaxRanks) + " link keys"));
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    const std::string where = "rank " + std::to_string(i) + "'s link key";
    if (!ranks[i].is_string()) return std::unexpected(bad(where + " must be a base64url string"));
    auto raw = base64url_decode(ranks[i].get<std::string>(), where);
    if (!raw) return std::unexpected(bad(raw.error().message));
    if (raw->size() != 32) return std::unexpected(bad(where + " is " + std::to_string(raw->size()) + " bytes; an Ed25519 public key is 32"));
    if (auto k = crypto::Key::from_public(crypto::KeyType::kEd25519, *raw); !k) return std::unexpected(bad(where + ": " + k.error().message));
    auto& key = r.keys.emplace_back();
    std::copy(raw->begin(), raw->end(), key.begin());
  }
  auto d = crypto::sha256(ByteSpan(reinterpret_cast<const std::byte*>(text.data()), text.size()));
  if (!d) return std::unexpected(d.error());
  r.digest = *d;
  return r;
}

constexpr std::string_view kLinkKeyTag = "tresor-link-key-v1 ";

Result<std::string> link_key_text(const crypto::Key& key) {
  if (key.type() != crypto::KeyType::kEd25519 || !key.has_private()) return fail(ErrorCode::kInvalidArgument, "a link key is an Ed25519 private key");
  auto seed = key.private_raw();
  if (!seed) return std::unexpected(seed.error());
  return std::string(kLinkKeyTag) + base64url_encode(seed->span()) + "\n";
}

Result<crypto::Key> parse_link_key(std::string_view text) {
  if (!text.starts_with(kLinkKeyTag)) return fail(ErrorCode::kInvalidArgument, "not a Tresor link key (it starts with \"tresor-link-key-v1 \")");
  std::string_view b64 = text.substr(kLinkKeyTag.size());
  if (b64.ends_with('\n')) b64.remove_suffix(1);
  auto seed = base64url_decode(b64, "link key");
  if (!seed) return std::unexpected(seed.error());
  const SecretBuffer secret = SecretBuffer::copy_of(*seed);
  secure_wipe(MutableByteSpan(seed->data(), seed->size()));
  if (secret.size() != 32) return fail(ErrorCode::kInvalidArgument, "link key: the Ed25519 seed is " + std::to_string(secret.size()) + " bytes, want 32");
  return crypto::Key::from_private(crypto::KeyType::kEd25519, secret.span());
}

std::string roster_text(std::string_view step, std::string_view lead, std::span<const std::array<std::byte, 32>> keys) {
  json ranks = json::array();
  for (const auto& k : keys) ranks.push_back(base64url_encode(k));
  const json j = {{"format", kFormat}, {"version", 1}, {"step", step}, {"lead", lead}, {"ranks", ranks}};
  return j.dump() + "\n";
}

}  // namespace tresor::train
