// The step roster, link key files and link claims (include/tresor/roster.h, docs/formats.md §13,
// docs/protocol.md §13).
#include "tresor/roster.h"

#include <arpa/inet.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>

#include "tresor/encoding.h"
#include "tresor/kbs/jose.h"
#include "tresor/secret.h"

namespace tresor {
namespace {

using json = nlohmann::json;
constexpr std::string_view kFormat = "tresor-step-roster";
constexpr size_t kMaxRanks = 1024;
constexpr std::string_view kLinkKeyTag = "tresor-link-key-v1 ";

// Members of a strict object: each present member known, each required one present.
Result<void> check_members(const json& j, std::string_view what, std::initializer_list<std::string_view> required, std::initializer_list<std::string_view> optional) {
  if (!j.is_object()) return fail(ErrorCode::kInvalidArgument, std::string(what) + ": not a JSON object");
  for (const auto& [k, v] : j.items()) {
    if (std::ranges::find(required, k) == required.end() && std::ranges::find(optional, k) == optional.end()) {
      return fail(ErrorCode::kInvalidArgument, std::string(what).append(": unknown member \"").append(k).append("\""));
    }
  }
  for (const auto k : required) {
    if (!j.contains(k)) return fail(ErrorCode::kInvalidArgument, std::string(what).append(": \"").append(k).append("\" is missing"));
  }
  return {};
}

// A base64url Ed25519 public key (32 bytes, a point on the curve).
Result<std::array<std::byte, 32>> ed25519_public(const json& v, const std::string& where) {
  if (!v.is_string()) return fail(ErrorCode::kInvalidArgument, where + " must be a base64url string");
  auto raw = base64url_decode(v.get<std::string>(), where);
  if (!raw) return std::unexpected(raw.error());
  if (raw->size() != 32) return fail(ErrorCode::kInvalidArgument, where + " is " + std::to_string(raw->size()) + " bytes; an Ed25519 public key is 32");
  if (auto k = crypto::Key::from_public(crypto::KeyType::kEd25519, *raw); !k) return fail(ErrorCode::kInvalidArgument, where + ": " + k.error().message);
  std::array<std::byte, 32> out{};
  std::copy(raw->begin(), raw->end(), out.begin());
  return out;
}

Error bad(std::string_view what, const std::string& why) { return Error{ErrorCode::kInvalidArgument, std::string(what) + ": " + why}; }

}  // namespace

bool valid_step_id(std::string_view s) {
  return !s.empty() && s.size() <= 64 && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == std::string_view::npos;
}

bool valid_lead_address(std::string_view lead) {
  // Only digits, dots and the colon (so no "\u0000" or other spelling slips past inet_pton).
  const size_t colon = lead.rfind(':');
  if (colon == std::string_view::npos || colon > 15 || lead.find_first_not_of("0123456789.:") != std::string_view::npos) return false;
  in_addr addr{};
  unsigned port = 0;
  const char* pb = lead.data() + colon + 1;
  const char* pe = lead.data() + lead.size();
  const auto [pend, perr] = std::from_chars(pb, pe, port);
  return ::inet_pton(AF_INET, std::string(lead.substr(0, colon)).c_str(), &addr) == 1 && pb != pe && perr == std::errc() && pend == pe && *pb != '0' && port >= 1 &&
         port <= 65535;
}

Result<Roster> parse_roster(std::string_view text) {
  constexpr std::string_view what = "step roster";
  // The broker's strict reading (duplicate members, NUL bytes and numbers past 2^53 refused).
  auto parsed = kbs::parse_strict_json(text, what);
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  TRESOR_TRY(check_members(j, what, {"format", "version", "step", "lead", "ranks"}, {}));
  if (!j["format"].is_string() || j["format"].get<std::string>() != kFormat) return std::unexpected(bad(what, "\"format\" must be \"" + std::string(kFormat) + "\""));
  if (!j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) return std::unexpected(bad(what, "\"version\" is " + j["version"].dump() + "; this Tresor reads version 1"));
  Roster r;
  if (!j["step"].is_string() || !valid_step_id(j["step"].get<std::string>())) {
    return std::unexpected(bad(what, "\"step\" is " + j["step"].dump() + "; want 1..64 of letters, digits, '.', '_', '-' (JOB.STEP)"));
  }
  r.step = j["step"].get<std::string>();
  if (!j["lead"].is_string()) return std::unexpected(bad(what, "\"lead\" must be a string \"ADDRESS:PORT\""));
  const std::string lead = j["lead"].get<std::string>();
  if (!valid_lead_address(lead)) return std::unexpected(bad(what, "\"lead\" is \"" + lead + "\"; want an IPv4 address and a port 1..65535, as \"10.8.0.1:29400\""));
  const size_t colon = lead.rfind(':');
  r.lead_host = lead.substr(0, colon);
  r.lead_port = static_cast<uint16_t>(std::stoul(lead.substr(colon + 1)));
  const json& ranks = j["ranks"];
  if (!ranks.is_array() || ranks.empty() || ranks.size() > kMaxRanks) {
    return std::unexpected(bad(what, "\"ranks\" must be an array of 1.." + std::to_string(kMaxRanks) + " link keys"));
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    auto key = ed25519_public(ranks[i], "rank " + std::to_string(i) + "'s link key");
    if (!key) return std::unexpected(bad(what, key.error().message));
    r.keys.push_back(*key);
  }
  auto d = crypto::sha256(ByteSpan(reinterpret_cast<const std::byte*>(text.data()), text.size()));
  if (!d) return std::unexpected(d.error());
  r.digest = *d;
  return r;
}

std::string roster_text(std::string_view step, std::string_view lead, std::span<const std::array<std::byte, 32>> keys) {
  json ranks = json::array();
  for (const auto& k : keys) ranks.push_back(base64url_encode(k));
  const json j = {{"format", kFormat}, {"version", 1}, {"step", step}, {"lead", lead}, {"ranks", ranks}};
  return j.dump() + "\n";
}

Result<std::string> link_key_text(const crypto::Key& key) {
  if (key.type() != crypto::KeyType::kEd25519 || !key.has_private()) return fail(ErrorCode::kInvalidArgument, "a link key is an Ed25519 private key");
  auto seed = key.private_raw();
  if (!seed) return std::unexpected(seed.error());
  return std::string(kLinkKeyTag) + base64url_encode(seed->span()) + "\n";
}

Result<std::array<std::byte, 32>> link_public_key(const crypto::Key& key) {
  if (key.type() != crypto::KeyType::kEd25519) return fail(ErrorCode::kInvalidArgument, "a link key is an Ed25519 key");
  auto raw = key.public_raw();
  if (!raw) return std::unexpected(raw.error());
  std::array<std::byte, 32> out{};
  if (raw->size() != out.size()) return fail(ErrorCode::kCrypto, "an Ed25519 public key of " + std::to_string(raw->size()) + " bytes");
  std::copy(raw->begin(), raw->end(), out.begin());
  return out;
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

Result<LinkClaim> parse_link_claim(std::string_view text) {
  constexpr std::string_view what = "link claim";
  auto parsed = kbs::parse_strict_json(text, what);
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  TRESOR_TRY(check_members(j, what, {"link-key", "step", "size", "ranks"}, {"lead"}));
  LinkClaim c;
  auto key = ed25519_public(j["link-key"], "\"link-key\"");
  if (!key) return std::unexpected(bad(what, key.error().message));
  c.key = *key;
  if (!j["step"].is_string() || !valid_step_id(j["step"].get<std::string>())) return std::unexpected(bad(what, "\"step\" is " + j["step"].dump() + "; want JOB.STEP"));
  c.step = j["step"].get<std::string>();
  if (!j["size"].is_number_unsigned() || j["size"].get<uint64_t>() < 1 || j["size"].get<uint64_t>() > kMaxRanks) {
    return std::unexpected(bad(what, "\"size\" is " + j["size"].dump() + "; want 1.." + std::to_string(kMaxRanks)));
  }
  c.size = static_cast<int>(j["size"].get<uint64_t>());
  const json& ranks = j["ranks"];
  if (!ranks.is_array() || ranks.empty()) return std::unexpected(bad(what, "\"ranks\" must be a non-empty array of this VM's ranks"));
  for (const auto& r : ranks) {
    if (!r.is_number_unsigned() || r.get<uint64_t>() >= static_cast<uint64_t>(c.size)) return std::unexpected(bad(what, "rank " + r.dump() + " is not in 0.." + std::to_string(c.size - 1)));
    const int rank = static_cast<int>(r.get<uint64_t>());
    if (!c.ranks.empty() && rank <= c.ranks.back()) return std::unexpected(bad(what, "\"ranks\" must ascend without repeats"));
    c.ranks.push_back(rank);
  }
  const bool has_zero = c.ranks.front() == 0;
  if (j.contains("lead")) {
    if (!has_zero) return std::unexpected(bad(what, "\"lead\" is rank 0's address; this VM does not run rank 0"));
    if (!j["lead"].is_string() || !valid_lead_address(j["lead"].get<std::string>())) {
      return std::unexpected(bad(what, "\"lead\" is " + j["lead"].dump() + "; want an IPv4 address and a port 1..65535"));
    }
    c.lead = j["lead"].get<std::string>();
  } else if (has_zero) {
    return std::unexpected(bad(what, "\"lead\" is missing: the VM of rank 0 says where rank 0 listens"));
  }
  return c;
}

std::string link_claim_text(const LinkClaim& c) {
  json j = {{"link-key", base64url_encode(c.key)}, {"step", c.step}, {"size", c.size}, {"ranks", c.ranks}};
  if (!c.lead.empty()) j["lead"] = c.lead;
  return j.dump();
}

}  // namespace tresor
