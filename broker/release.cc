#include "tresor/encoding.h"
#include "tresor/broker/release.h"

#include <nlohmann/json.hpp>

#include <algorithm>

#include "tresor/crypto.h"

namespace tresor::broker {
namespace {

using json = nlohmann::json;

Error bad(std::string_view member, std::string_view what) {
  return Error{ErrorCode::kInvalidArgument, "dataset policy: \"" + std::string(member) + "\" " + std::string(what)};
}

// Collects failed checks and picks the one status for all of them: 401 when the requester is not
// established (manifest forged or expired, signer unknown or revoked); otherwise 403. An unknown
// dataset is a 403 like any other denial, so that the status never tells a requester which
// datasets exist (a registered user could otherwise probe ids by naming them in a manifest).
// 404 is left for a dataset key version that does not exist, answered only when every other
// check passed.
class Failures {
 public:
  void add(ErrorCode code, std::string what) {
    lines_.push_back(std::move(what));
    if (code == ErrorCode::kAuth) auth_ = true;
    else if (code != ErrorCode::kNoMatchingKey) policy_ = true;
  }
  bool empty() const { return lines_.empty(); }
  Error error() const {
    const ErrorCode code = auth_ ? ErrorCode::kAuth : policy_ ? ErrorCode::kPolicy : ErrorCode::kNoMatchingKey;
    std::string msg = "release denied (" + std::to_string(lines_.size()) + (lines_.size() == 1 ? " check" : " checks") +
                      " failed):";
    for (const auto& l : lines_) msg += "\n  " + l;
    return Error{code, msg};
  }

 private:
  std::vector<std::string> lines_;
  bool auth_ = false, policy_ = false;
};

}  // namespace

Result<DatasetPolicy> parse_dataset_policy(std::string_view text) {
  json j;
  TRESOR_TRY(json_text_without_nul(text, "dataset policy"));
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return fail(ErrorCode::kInvalidArgument, std::string("dataset policy is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return fail(ErrorCode::kInvalidArgument, "dataset policy must be a JSON object");
  for (const auto& [k, v] : j.items()) {
    if (k != "attestation" && k != "users" && k != "groups" && k != "expires_at") {
      return std::unexpected(bad(k, "is not a dataset policy member (attestation, users, groups, expires_at)"));
    }
  }
  DatasetPolicy p;
  if (!j.contains("attestation") || !j["attestation"].is_object()) {
    return std::unexpected(bad("attestation", "is required (an SEV-SNP policy object)"));
  }
  auto snp = snp::parse_policy(j["attestation"].dump());
  if (!snp) return fail(snp.error().code, "dataset policy: \"attestation\": " + snp.error().message);
  p.attestation = std::move(*snp);
  for (const char* member : {"users", "groups"}) {
    if (!j.contains(member)) continue;
    auto& list = std::string_view(member) == "users" ? p.users : p.groups;
    if (!j[member].is_array()) return std::unexpected(bad(member, "must be an array of names"));
    for (const auto& u : j[member]) {
      if (!u.is_string()) return std::unexpected(bad(member, "must be an array of names"));
      if (auto v = validate_user_name(u.get<std::string>()); !v) {
        return fail(ErrorCode::kInvalidArgument, "dataset policy: \"" + std::string(member) + "\": " + v.error().message);
      }
      list.push_back(u.get<std::string>());
    }
    if (list.empty()) {
      return std::unexpected(bad(member, "is empty, which would admit nobody; omit it to admit every granted user"));
    }
  }
  if (j.contains("expires_at")) {
    if (!j["expires_at"].is_number_integer() || j["expires_at"].get<int64_t>() <= 0) {
      return std::unexpected(bad("expires_at", "must be a positive integer (unix seconds)"));
    }
    p.expires_at = j["expires_at"].get<int64_t>();
  }
  return p;
}

Result<Release> authorize_release(const Store& store, const ReleaseRequest& req) {
  if (req.report == nullptr || req.manifest == nullptr) {
    return fail(ErrorCode::kInvalidArgument, "authorize_release needs verified evidence and a manifest");
  }
  const Manifest& m = *req.manifest;
  Failures f;

  // 1. The manifest: signed by its user's key, not expired.
  if (!req.manifest_signature_verified) {
    if (auto v = verify_manifest(m, static_cast<std::time_t>(req.now)); !v) f.add(ErrorCode::kAuth, "manifest: " + v.error().message);
  } else if (req.now >= m.expires_at) {
    f.add(ErrorCode::kAuth, "manifest: expired at " + std::to_string(m.expires_at));
  }

  // 2. Its signer is a registered, unrevoked user.
  Release out;
  const std::string identity = m.user.to_string();
  auto user = store.user_by_identity(identity);
  if (!user) return std::unexpected(user.error());
  if (!user->has_value()) {
    f.add(ErrorCode::kAuth, "user: the manifest's signer " + identity.substr(0, 20) + "… is not a registered user");
  } else if ((*user)->revoked) {
    f.add(ErrorCode::kAuth, "user: '" + (*user)->name + "' is revoked");
  }
  if (user->has_value()) out.user = (*user)->name;

  // 3. The dataset exists and the manifest names it.
  auto known = store.has_dataset(req.dataset);
  if (!known) return std::unexpected(known.error());
  const bool exists = *known;
  if (!exists) f.add(ErrorCode::kPolicy, "dataset: '" + req.dataset + "' is not registered");
  if (std::ranges::find(m.datasets, req.dataset) == m.datasets.end()) {
    f.add(ErrorCode::kPolicy, "manifest: dataset '" + req.dataset + "' is not among the job's datasets");
  }

  // 4. A grant, and 5. the dataset's policy.
  std::optional<DatasetPolicy> policy;
  if (exists) {
    if (!out.user.empty()) {
      auto g = store.has_grant(out.user, req.dataset);
      if (!g) return std::unexpected(g.error());
      if (!*g) f.add(ErrorCode::kPolicy, "grant: user '" + out.user + "' holds no grant on '" + req.dataset + "'");
    }
    auto text = store.policy(req.dataset);
    if (!text) return std::unexpected(text.error());
    if (!text->has_value()) {
      f.add(ErrorCode::kPolicy, "policy: dataset '" + req.dataset + "' has no policy (deny by default)");
    } else if (auto p = parse_dataset_policy(**text); !p) {
      f.add(ErrorCode::kPolicy, "policy: the stored policy does not parse: " + p.error().message);
    } else {
      policy = std::move(*p);
      if (policy->expires_at != 0 && req.now >= policy->expires_at) {
        f.add(ErrorCode::kPolicy, "policy: expired at " + std::to_string(policy->expires_at));
      }
      if ((!policy->users.empty() || !policy->groups.empty()) && !out.user.empty()) {
        bool admitted = std::ranges::find(policy->users, out.user) != policy->users.end();
        if (!admitted && !policy->groups.empty()) {
          auto groups = store.groups_of(out.user);
          if (!groups) return std::unexpected(groups.error());
          for (const auto& g : *groups) admitted = admitted || std::ranges::find(policy->groups, g) != policy->groups.end();
        }
        if (!admitted) {
          f.add(ErrorCode::kPolicy, "policy: user '" + out.user + "' is neither among the dataset's allowed users nor in an allowed group");
        }
      }
    }
  }

  // 6. The VM runs the image the manifest names.
  const auto& report = req.report->report;
  if (!crypto::ct_equal(report.measurement, m.image_measurement)) {
    f.add(ErrorCode::kPolicy, "evidence: MEASUREMENT is " + to_hex(report.measurement) + ", the manifest names image " +
                                  to_hex(m.image_measurement));
  }

  // 7./8. HOST_DATA = SHA-256(manifest), REPORT_DATA = session binding, and the attestation policy.
  auto digest = manifest_digest(m);
  if (!digest) return std::unexpected(digest.error());
  snp::Expectations expect;
  expect.host_data = *digest;
  expect.report_data = req.report_data;
  if (policy) {
    for (auto& line : snp::failed_checks(*req.report, policy->attestation, expect)) {
      f.add(ErrorCode::kPolicy, "evidence: " + line);
    }
  } else {
    // No usable policy: already denied above; still name broken bindings so the record is whole.
    if (!crypto::ct_equal(report.host_data, *digest)) {
      f.add(ErrorCode::kPolicy, "evidence: HOST_DATA is " + to_hex(report.host_data) + ", want " + to_hex(*digest));
    }
    if (!crypto::ct_equal(report.report_data, req.report_data)) {
      f.add(ErrorCode::kPolicy, "evidence: REPORT_DATA does not bind this session's nonce and key");
    }
  }
  // Sim evidence only verifies when the broker's configuration trusts the sim root (SimTrust);
  // the caller marks such releases in the audit record (VerifiedReport::sim).

  if (!f.empty()) return std::unexpected(f.error());

  auto key = req.key_version ? store.key(req.dataset, *req.key_version) : store.current_key(req.dataset);
  if (!key) {
    if (key.error().code == ErrorCode::kNoMatchingKey) {
      return fail(ErrorCode::kNoMatchingKey, "release denied (1 check failed):\n  dataset: " + key.error().message);
    }
    // A wrapped key that does not open (kAuth from the store) means a wrong master key or a
    // damaged row: the broker's fault, never the requester's, so it must not read as a 401.
    return fail(ErrorCode::kIo, "store: the key of '" + req.dataset + "' cannot be read: " + key.error().message);
  }
  out.key = std::move(*key);
  return out;
}

int http_status(ErrorCode code) {
  switch (code) {
    case ErrorCode::kAuth: return 401;
    case ErrorCode::kPolicy:
    case ErrorCode::kPermission: return 403;
    case ErrorCode::kNoMatchingKey: return 404;
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kMalformed:
    case ErrorCode::kUnsupportedVersion:
    case ErrorCode::kTruncated:
    case ErrorCode::kTrailingData: return 400;
    default: return 500;
  }
}

}  // namespace tresor::broker
