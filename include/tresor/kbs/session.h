// tresor/kbs/session.h — the KBS handshake as an explicit state machine with expiry (STYLE.md
// rule 7; KBS protocol: Request → Challenge → Attestation → Response). Pure: the caller passes
// the time and the randomness source; nothing here touches the network or the clock.
//
//   (none) --auth--> CHALLENGED --begin_attest--> ATTESTING --attested--> ATTESTED --resource--> …
//                         |                           \--failed--> DEAD (one nonce, one try)
//                         \__ 300 s without attest: expired
//   ATTESTED sessions expire 300 s after the challenge too.
#pragma once

#include <ctime>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "tresor/crypto.h"
#include "tresor/error.h"

namespace tresor::kbs {

inline constexpr std::string_view kProtocolVersion = "0.4.0";
inline constexpr std::time_t kSessionLifetime = 300;  // seconds (KBS: sessions expire after 5 minutes)
inline constexpr size_t kMaxSessions = 100000;

enum class SessionState { kChallenged, kAttesting, kAttested, kDead };

struct Session {
  std::string id;         // the kbs-session-id cookie value (base64url of 32 random bytes)
  std::string nonce;      // base64 of 32 random bytes, bound into REPORT_DATA
  std::time_t created = 0;
  SessionState state = SessionState::kChallenged;
  nlohmann::json tee_pubkey;  // set on a successful attest
  std::string subject;        // what attest established (e.g. the job), for the resource step
  /// The caller's own record of what attest established (the broker keeps the verified report
  /// and the manifest here); opaque to the table.
  std::shared_ptr<const void> context;
};

/// SessionTable holds the handshakes in flight. Not thread-safe: the broker guards it.
class SessionTable {
 public:
  explicit SessionTable(crypto::RandomSource& rng = crypto::system_random(), size_t max_sessions = kMaxSessions)
      : rng_(rng), max_sessions_(max_sessions) {}

  /// Handles a Request: {"version":"0.4.0","tee":"snp",...}. Creates a session and returns it.
  /// kInvalidArgument for malformed JSON, another version or another TEE (named).
  [[nodiscard]] Result<Session> auth(std::string_view request_json, std::time_t now);
  /// Looks up a session for the attest step: it must exist, be CHALLENGED and not expired. It is
  /// ATTESTING from now on: a second attest with the same nonce (a replay, or a retry) fails.
  [[nodiscard]] Result<Session> begin_attest(const std::string& id, std::time_t now);
  /// Records the outcome of the attestation begun with begin_attest().
  [[nodiscard]] Result<void> attested(const std::string& id, nlohmann::json tee_pubkey, std::string subject,
                                      std::shared_ptr<const void> context = nullptr);
  void failed(const std::string& id);
  /// Looks up a session for a resource request: ATTESTED and not expired.
  [[nodiscard]] Result<Session> for_resource(const std::string& id, std::time_t now) const;
  /// Drops expired and dead sessions; returns how many were dropped.
  size_t purge(std::time_t now);
  size_t size() const { return sessions_.size(); }

 private:
  crypto::RandomSource& rng_;
  size_t max_sessions_;
  std::map<std::string, Session> sessions_;
};

}  // namespace tresor::kbs
