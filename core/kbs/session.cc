#include "tresor/encoding.h"
#include "tresor/kbs/session.h"

namespace tresor::kbs {
namespace {

using json = nlohmann::json;

std::unexpected<Error> denied(const std::string& why) { return fail(ErrorCode::kAuth, why); }

}  // namespace

Result<Session> SessionTable::auth(std::string_view request_json, std::time_t now) {
  json req;
  TRESOR_TRY(json_text_without_nul(request_json, "KBS Request"));
  try {
    req = json::parse(request_json);
  } catch (const json::exception&) {
    return fail(ErrorCode::kInvalidArgument, "KBS Request is not valid JSON");
  }
  if (!req.is_object()) return fail(ErrorCode::kInvalidArgument, "KBS Request must be a JSON object");
  if (!req.contains("version") || !req["version"].is_string() || req["version"] != kProtocolVersion) {
    return fail(ErrorCode::kInvalidArgument, "KBS Request version " + (req.contains("version") ? req["version"].dump() : "(missing)") +
                                                 " is not supported; this broker speaks " + std::string(kProtocolVersion));
  }
  if (!req.contains("tee") || !req["tee"].is_string() || req["tee"] != "snp") {
    return fail(ErrorCode::kInvalidArgument, "KBS Request tee " + (req.contains("tee") ? req["tee"].dump() : "(missing)") +
                                                 " is not supported; this broker attests \"snp\"");
  }
  if (sessions_.size() >= max_sessions_) purge(now);
  if (sessions_.size() >= max_sessions_) return fail(ErrorCode::kUnavailable, "too many KBS sessions in flight");
  std::array<std::byte, 32> id, nonce;
  TRESOR_TRY(rng_.fill(id));
  TRESOR_TRY(rng_.fill(nonce));
  Session s;
  s.id = base64url_encode(id);
  s.nonce = base64_encode(nonce);
  s.created = now;
  sessions_[s.id] = s;
  return s;
}

Result<Session> SessionTable::begin_attest(const std::string& id, std::time_t now) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return denied("unknown KBS session (send a Request to /kbs/v0/auth first)");
  Session& s = it->second;
  if (now - s.created >= kSessionLifetime) {
    sessions_.erase(it);
    return denied("KBS session expired: it is older than " + std::to_string(kSessionLifetime) + " s");
  }
  if (s.state != SessionState::kChallenged) {
    return denied(s.state == SessionState::kAttested ? "KBS session already attested: its nonce was used"
                                                     : "KBS session's nonce was already used");
  }
  Session copy = s;
  s.state = SessionState::kAttesting;  // one nonce, one attempt: a replayed or retried attest fails
  return copy;
}

Result<void> SessionTable::attested(const std::string& id, json tee_pubkey, std::string subject,
                                    std::shared_ptr<const void> context) {
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second.state != SessionState::kAttesting) {
    return fail(ErrorCode::kInvalidArgument, "attested() without a matching begin_attest()");
  }
  it->second.state = SessionState::kAttested;
  it->second.tee_pubkey = std::move(tee_pubkey);
  it->second.subject = std::move(subject);
  it->second.context = std::move(context);
  return {};
}

void SessionTable::failed(const std::string& id) {
  if (auto it = sessions_.find(id); it != sessions_.end() && it->second.state == SessionState::kAttesting) {
    it->second.state = SessionState::kDead;
  }
}

Result<Session> SessionTable::for_resource(const std::string& id, std::time_t now) const {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return denied("unknown KBS session");
  const Session& s = it->second;
  if (now - s.created >= kSessionLifetime) return denied("KBS session expired");
  if (s.state != SessionState::kAttested) return denied("KBS session is not attested");
  return s;
}

size_t SessionTable::purge(std::time_t now) {
  size_t n = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (now - it->second.created >= kSessionLifetime || it->second.state == SessionState::kDead) {
      it = sessions_.erase(it);
      ++n;
    } else {
      ++it;
    }
  }
  return n;
}

}  // namespace tresor::kbs
