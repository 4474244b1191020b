// The broker's administration commands (admin.h; docs/broker.md §5).
#include "tresor/broker/admin.h"

#include <ctime>
#include <optional>

#include "tresor/audit.h"
#include "tresor/broker/release.h"
#include "tresor/encoding.h"
#include "tresor/identity.h"

namespace tresor::broker {
namespace {

using json = nlohmann::json;

Result<std::string> text_member(const json& req, const char* name) {
  auto it = req.find(name);
  if (it == req.end() || !it->is_string() || it->get_ref<const std::string&>().empty()) {
    return fail(ErrorCode::kInvalidArgument, std::string("\"") + name + "\" is required (a non-empty string)");
  }
  return it->get<std::string>();
}

json record_json(const audit::Record& r) {
  auto text = audit::to_json(r);
  return text ? json::parse(*text) : json(nullptr);
}

}  // namespace

ErrorCode error_code_from_name(std::string_view name) {
  for (int c = 0; c <= static_cast<int>(ErrorCode::kPolicy); ++c) {
    if (error_code_name(static_cast<ErrorCode>(c)) == name) return static_cast<ErrorCode>(c);
  }
  return ErrorCode::kIo;
}

std::string Admin::handle(std::string_view line, uint32_t uid) {
  json req;
  if (!json_text_without_nul(line, "admin request")) {
    return json{{"ok", false}, {"code", "invalid-argument"}, {"error", "admin request is not valid JSON: it holds a NUL byte"}}.dump();
  }
  try {
    req = json::parse(line);
  } catch (const json::exception&) {
    return json{{"ok", false}, {"code", "invalid-argument"}, {"error", "admin request is not valid JSON"}}.dump();
  }
  if (!req.is_object() || !req.contains("op") || !req["op"].is_string()) {
    return json{{"ok", false}, {"code", "invalid-argument"}, {"error", "admin request must be an object with a string \"op\""}}.dump();
  }
  Result<json> r;
  try {
    r = dispatch(req, uid);
  } catch (const std::exception& e) {
    // A member of the wrong JSON type that slipped past a check: refuse, keep serving.
    r = fail(ErrorCode::kInvalidArgument, std::string("admin request: ") + audit::printable(e.what()));
  }
  if (!r) {
    return json{{"ok", false}, {"code", std::string(error_code_name(r.error().code))}, {"error", audit::printable(r.error().message)}}
        .dump();
  }
  (*r)["ok"] = true;
  return r->dump();
}

Result<void> Admin::audit(const std::string& dataset, const std::string& user, const std::string& what, uint32_t uid) {
  audit::Record rec;
  rec.time = std::time(nullptr);
  rec.dataset = dataset;
  rec.user = user;
  rec.result = "admin";
  rec.reason = what + " (admin socket, uid " + std::to_string(uid) + ")";
  auto r = store_.append_audit(std::move(rec));
  if (!r) return std::unexpected(r.error());
  return {};
}

Result<json> Admin::dispatch(const json& req, uint32_t uid) {
  const std::string op = req["op"].get<std::string>();

  // A key to import: base64url of 32 bytes. Keys are made where the data owner seals (the tresor
  // CLI), never here: a key drawn inside the broker could never be sealed to, since no operation
  // gives one out.
  auto key_from = [&]() -> Result<SecretBuffer> {
    auto it = req.find("key");
    if (it == req.end() || !it->is_string()) return fail(ErrorCode::kInvalidArgument, "\"key\" is required: base64url of 32 bytes");
    auto raw = base64url_decode(it->get<std::string>(), "\"key\"");
    if (!raw) return std::unexpected(raw.error());
    SecretBuffer key(kDataKeySize);
    const bool right_size = raw->size() == kDataKeySize;
    if (right_size) std::copy(raw->begin(), raw->end(), key.span().begin());
    std::fill(raw->begin(), raw->end(), std::byte{0});
    if (!right_size) return fail(ErrorCode::kInvalidArgument, "\"key\" is " + std::to_string(raw->size()) + " bytes; a dataset key is 32");
    return key;
  };

  if (op == "dataset.create") {
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    std::optional<SecretBuffer> key;
    if (req.contains("key")) {
      auto k = key_from();
      if (!k) return std::unexpected(k.error());
      key = std::move(*k);
    }
    TRESOR_TRY(store_.add_dataset(*dataset));
    json out = {{"dataset", *dataset}};
    std::string what = "dataset.create";
    if (key) {
      auto version = store_.add_key(*dataset, key->span());
      if (!version) return std::unexpected(version.error());
      out["version"] = *version;
      what += ": key version " + std::to_string(*version) + " imported";
    }
    TRESOR_TRY(audit(*dataset, "", what, uid));
    return out;
  }
  if (op == "dataset.import-key") {
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    bool create = false;
    if (auto it = req.find("create"); it != req.end()) {
      if (!it->is_boolean()) return fail(ErrorCode::kInvalidArgument, "\"create\" must be true or false");
      create = it->get<bool>();
    }
    auto key = key_from();
    if (!key) return std::unexpected(key.error());
    if (create) {
      auto added = store_.add_dataset(*dataset);
      if (!added && added.error().code != ErrorCode::kExists) return std::unexpected(added.error());
    }
    auto version = store_.add_key(*dataset, key->span());
    if (!version) return std::unexpected(version.error());
    TRESOR_TRY(audit(*dataset, "", op + ": key version " + std::to_string(*version) + " imported", uid));
    return json{{"dataset", *dataset}, {"version", *version}};
  }
  if (op == "dataset.list") {
    auto ds = store_.datasets();
    if (!ds) return std::unexpected(ds.error());
    return json{{"datasets", *ds}};
  }
  if (op == "dataset.show") {
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    auto versions = store_.key_versions(*dataset);
    if (!versions) return std::unexpected(versions.error());
    auto policy = store_.policy(*dataset);
    if (!policy) return std::unexpected(policy.error());
    return json{{"dataset", *dataset}, {"key_versions", *versions}, {"has_policy", policy->has_value()}};
  }
  if (op == "policy.set") {
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    auto it = req.find("policy");
    if (it == req.end() || !it->is_object()) return fail(ErrorCode::kInvalidArgument, "\"policy\" is required (a JSON object)");
    const std::string text = it->dump();
    if (auto p = parse_dataset_policy(text); !p) return std::unexpected(p.error());
    TRESOR_TRY(store_.set_policy(*dataset, text));
    TRESOR_TRY(audit(*dataset, "", "policy.set: " + text, uid));
    return json{{"dataset", *dataset}};
  }
  if (op == "policy.show") {
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    auto policy = store_.policy(*dataset);
    if (!policy) return std::unexpected(policy.error());
    if (!policy->has_value()) return fail(ErrorCode::kNoMatchingKey, "dataset '" + *dataset + "' has no policy (nothing is released)");
    return json{{"dataset", *dataset}, {"policy", json::parse(**policy)}};
  }
  if (op == "user.add") {
    auto name = text_member(req, "user");
    if (!name) return std::unexpected(name.error());
    auto identity = text_member(req, "identity");
    if (!identity) return std::unexpected(identity.error());
    auto recipient = Recipient::parse(*identity);
    if (!recipient) return fail(ErrorCode::kInvalidArgument, "\"identity\": " + recipient.error().message);
    TRESOR_TRY(store_.add_user(*name, recipient->to_string()));
    TRESOR_TRY(audit("", recipient->to_string(), "user.add: '" + *name + "'", uid));
    return json{{"user", *name}};
  }
  if (op == "user.revoke") {
    auto name = text_member(req, "user");
    if (!name) return std::unexpected(name.error());
    TRESOR_TRY(store_.revoke_user(*name));
    TRESOR_TRY(audit("", "", "user.revoke: '" + *name + "'", uid));
    return json{{"user", *name}};
  }
  if (op == "user.show") {
    auto name = text_member(req, "user");
    if (!name) return std::unexpected(name.error());
    auto u = store_.user(*name);
    if (!u) return std::unexpected(u.error());
    if (!u->has_value()) return fail(ErrorCode::kNoMatchingKey, "no user '" + *name + "'");
    auto groups = store_.groups_of(*name);
    if (!groups) return std::unexpected(groups.error());
    return json{{"user", (*u)->name}, {"identity", (*u)->identity}, {"revoked", (*u)->revoked}, {"created", (*u)->created},
                {"groups", *groups}};
  }
  if (op == "group.add" || op == "group.remove") {
    auto group = text_member(req, "group");
    if (!group) return std::unexpected(group.error());
    auto name = text_member(req, "user");
    if (!name) return std::unexpected(name.error());
    if (op == "group.add") TRESOR_TRY(store_.add_to_group(*group, *name));
    else TRESOR_TRY(store_.remove_from_group(*group, *name));
    TRESOR_TRY(audit("", "", op + ": user '" + *name + "', group '" + *group + "'", uid));
    return json{{"group", *group}, {"user", *name}};
  }
  if (op == "grant" || op == "revoke-grant") {
    auto name = text_member(req, "user");
    if (!name) return std::unexpected(name.error());
    auto dataset = text_member(req, "dataset");
    if (!dataset) return std::unexpected(dataset.error());
    if (op == "grant") TRESOR_TRY(store_.grant(*name, *dataset));
    else TRESOR_TRY(store_.revoke_grant(*name, *dataset));
    TRESOR_TRY(audit(*dataset, "", op + ": user '" + *name + "'", uid));
    return json{{"user", *name}, {"dataset", *dataset}};
  }
  if (op == "audit.show" || op == "audit.verify") {
    auto records = store_.audit_records();
    if (!records) return std::unexpected(records.error());
    if (op == "audit.verify") {
      TRESOR_TRY(audit::verify_chain(*records));
      return json{{"records", records->size()}, {"head", records->empty() ? std::string(audit::kGenesis) : records->back().hash}};
    }
    uint64_t from = 1;
    if (auto it = req.find("from"); it != req.end()) {
      if (!it->is_number_unsigned()) return fail(ErrorCode::kInvalidArgument, "\"from\" must be a record number");
      from = it->get<uint64_t>();
    }
    json out = json::array();
    for (const auto& r : *records) {
      if (r.seq >= from) out.push_back(record_json(r));
    }
    return json{{"records", out}};
  }
  return fail(ErrorCode::kInvalidArgument, "unknown admin op \"" + op + "\"");
}

}  // namespace tresor::broker
