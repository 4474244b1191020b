#include "tresor/manifest.h"

#include <nlohmann/json.hpp>

#include <cstring>
#include <set>

#include "tresor/crypto.h"
#include "tresor/kbs/jose.h"

namespace tresor {
namespace {

using json = nlohmann::json;

std::unexpected<Error> bad(const std::string& member, const std::string& what) {
  return fail(ErrorCode::kInvalidArgument, "manifest \"" + member + "\": " + what);
}

Result<void> check_job_id(const std::string& id) {
  if (id.empty() || id.size() > 64 ||
      id.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") != std::string::npos) {
    return bad("job_id", "'" + id + "' must be 1..64 characters of [A-Za-z0-9._-]");
  }
  return {};
}

template <size_t N>
Result<std::array<std::byte, N>> hex_member(const json& j, const char* name) {
  if (!j.contains(name) || !j[name].is_string()) return bad(name, "is required (a string of " + std::to_string(2 * N) + " hex digits)");
  const std::string s = j[name];
  if (s.size() != 2 * N) return bad(name, "is " + std::to_string(s.size()) + " hex digits, want " + std::to_string(2 * N));
  auto b = from_hex(s, std::string("manifest \"") + name + "\"");
  if (!b) return std::unexpected(b.error());
  std::array<std::byte, N> out;
  std::memcpy(out.data(), b->data(), N);
  return out;
}

json to_json(const Manifest& m, bool with_signature) {
  json j = {{"version", std::string(kManifestVersion)},
            {"job_id", m.job_id},
            {"user", m.user.to_string()},
            {"datasets", m.datasets},
            {"image_measurement", to_hex(m.image_measurement)},
            {"script_sha256", to_hex(m.script_sha256)},
            {"output_recipients", json::array()},
            {"expires_at", m.expires_at}};
  for (const auto& r : m.output_recipients) j["output_recipients"].push_back(r.to_string());
  if (with_signature) j["signature"] = base64url_encode(m.signature);
  return j;
}

}  // namespace

Result<std::string> manifest_json(const Manifest& m, bool with_signature) {
  return kbs::canonical_json(to_json(m, with_signature));
}

Result<Manifest> parse_manifest(std::string_view text) {
  auto parsed = kbs::parse_strict_json(text, "manifest");
  if (!parsed) return std::unexpected(parsed.error());
  const json j = std::move(*parsed);
  if (!j.is_object()) return fail(ErrorCode::kInvalidArgument, "manifest must be a JSON object");
  static const std::set<std::string> kKnown = {"version", "job_id", "user", "datasets", "image_measurement",
                                               "script_sha256", "output_recipients", "expires_at", "signature"};
  for (const auto& [k, v] : j.items()) {
    if (!kKnown.contains(k)) return bad(k, "is not a manifest member");
  }
  if (!j.contains("version") || !j["version"].is_string() || j["version"].get<std::string>() != kManifestVersion) return bad("version", "must be \"" + std::string(kManifestVersion) + "\"");
  Manifest m;
  if (!j.contains("job_id") || !j["job_id"].is_string()) return bad("job_id", "is required");
  m.job_id = j["job_id"];
  TRESOR_TRY(check_job_id(m.job_id));
  if (!j.contains("user") || !j["user"].is_string()) return bad("user", "is required (a tresor1… recipient)");
  auto user = Recipient::parse(j["user"].get<std::string>());
  if (!user) return bad("user", user.error().message);
  m.user = *user;
  if (!j.contains("datasets") || !j["datasets"].is_array() || j["datasets"].empty()) {
    return bad("datasets", "must list at least one dataset id");
  }
  for (const auto& d : j["datasets"]) {
    if (!d.is_string()) return bad("datasets", "entries must be strings");
    TRESOR_TRY(validate_dataset_id(d.get<std::string>()));
    m.datasets.push_back(d);
  }
  auto meas = hex_member<48>(j, "image_measurement");
  if (!meas) return std::unexpected(meas.error());
  m.image_measurement = *meas;
  auto script = hex_member<32>(j, "script_sha256");
  if (!script) return std::unexpected(script.error());
  m.script_sha256 = *script;
  if (!j.contains("output_recipients") || !j["output_recipients"].is_array() || j["output_recipients"].empty()) {
    return bad("output_recipients", "must list at least one recipient");
  }
  for (const auto& r : j["output_recipients"]) {
    auto rc = Recipient::parse(r.is_string() ? r.get<std::string>() : "");
    if (!rc) return bad("output_recipients", rc.error().message);
    m.output_recipients.push_back(*rc);
  }
  if (!j.contains("expires_at") || !j["expires_at"].is_number_integer()) return bad("expires_at", "is required (unix seconds)");
  m.expires_at = j["expires_at"].get<int64_t>();
  if (!j.contains("signature") || !j["signature"].is_string()) return bad("signature", "is required");
  auto sig = base64url_decode(j["signature"].get<std::string>(), "manifest \"signature\"");
  if (!sig) return std::unexpected(sig.error());
  if (sig->size() != 64) return bad("signature", "is " + std::to_string(sig->size()) + " bytes, want 64 (Ed25519)");
  std::memcpy(m.signature.data(), sig->data(), 64);
  return m;
}

Result<void> sign_manifest(Manifest& m, const Identity& id) {
  if (!(id.recipient() == m.user)) return fail(ErrorCode::kInvalidArgument, "manifest \"user\" is not the signing identity");
  TRESOR_TRY(check_job_id(m.job_id));
  auto body = manifest_json(m, false);
  if (!body) return std::unexpected(body.error());
  auto key = crypto::Key::from_private(crypto::KeyType::kEd25519, id.ed25519_seed());
  if (!key) return std::unexpected(key.error());
  auto sig = crypto::sign(*key, as_bytes(*body));
  if (!sig) return std::unexpected(sig.error());
  std::memcpy(m.signature.data(), sig->data(), 64);
  return {};
}

Result<void> verify_manifest(const Manifest& m, std::time_t now) {
  auto body = manifest_json(m, false);
  if (!body) return std::unexpected(body.error());
  auto key = crypto::Key::from_public(crypto::KeyType::kEd25519, m.user.ed25519);
  if (!key) return std::unexpected(key.error());
  if (auto v = crypto::verify(*key, as_bytes(*body), m.signature); !v) {
    return fail(ErrorCode::kAuth, "manifest of job " + m.job_id + " is not signed by its user " + m.user.to_string());
  }
  if (now >= m.expires_at) {
    return fail(ErrorCode::kAuth, "manifest of job " + m.job_id + " expired at unix time " + std::to_string(m.expires_at));
  }
  return {};
}

Result<std::array<std::byte, 32>> manifest_digest(const Manifest& m) {
  auto text = manifest_json(m, true);
  if (!text) return std::unexpected(text.error());
  return crypto::sha256(as_bytes(*text));
}

}  // namespace tresor
