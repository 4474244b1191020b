// tresor/broker/admin.h — the broker's administration commands, as served on the admin socket
// (server.h) and sent by `tresor admin` (docs/broker.md §5). One JSON object per line in each
// direction:
//   request:  {"op":"dataset.create","dataset":"dhz/ccta-2024"}
//   response: {"ok":true,...}  or  {"ok":false,"code":"exists","error":"dataset 'dhz/ccta-2024' …"}
// Operations: dataset.create (optionally with a first "key"), dataset.import-key (the next key
// version; "create": true registers the dataset too), dataset.list, dataset.show, policy.set,
// policy.show, user.add, user.revoke, user.show, group.add, group.remove, grant, revoke-grant,
// audit.show, audit.verify.
//
// Keys go in and never come out: no operation returns key material (a key leaves the broker
// only as a JWE to an attested VM), and none draws one (the data owner's tresor CLI makes keys,
// where they are sealed to; `tresor admin dataset rotate` is a fresh key made there and imported).
// Every change is written to the audit log with the peer uid.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "tresor/broker/store.h"
#include "tresor/crypto.h"
#include "tresor/error.h"

namespace tresor::broker {

class Admin {
 public:
  explicit Admin(Store& store) : store_(store) {}

  /// Handles one request line from a peer with uid `uid`; returns the response line (no newline).
  std::string handle(std::string_view line, uint32_t uid);

 private:
  Result<nlohmann::json> dispatch(const nlohmann::json& req, uint32_t uid);
  Result<void> audit(const std::string& dataset, const std::string& user, const std::string& what, uint32_t uid);
  Store& store_;
};

/// The error code behind a name error_code_name() gave ("exists", "policy", …), for clients of
/// the admin socket; kIo for a name it does not know.
ErrorCode error_code_from_name(std::string_view name);

}  // namespace tresor::broker
