#include "tresor/audit.h"

#include <nlohmann/json.hpp>

#include <set>

#include "tresor/crypto.h"
#include "tresor/kbs/jose.h"

namespace tresor::audit {
namespace {

using json = nlohmann::json;

json body(const Record& r) {
  return {{"seq", r.seq},
          {"time", r.time},
          {"user", r.user},
          {"dataset", r.dataset},
          {"evidence_digest", r.evidence_digest},
          {"measurement", r.measurement},
          {"result", r.result},
          {"reason", r.reason},
          {"sim", r.sim},
          {"prev_hash", r.prev_hash}};
}

}  // namespace

Result<std::string> record_hash(const Record& r) {
  auto text = kbs::canonical_json(body(r));
  if (!text) return std::unexpected(text.error());
  auto h = crypto::sha256(as_bytes(*text));
  if (!h) return std::unexpected(h.error());
  return to_hex(*h);
}

std::string printable(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  for (char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if ((c >= 0x20 && c < 0x7F && c != '\\') || c == '\n') {
      out += ch;
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

Result<Record> chain(const Record* previous, Record next) {
  // Text that reached a decision from the network (a resource path, a parser's message) is
  // stored escaped: a record always canonicalizes and reads back, whatever bytes a client sent.
  for (std::string* field : {&next.user, &next.dataset, &next.evidence_digest, &next.measurement, &next.result, &next.reason}) {
    *field = printable(*field);
  }
  next.seq = previous ? previous->seq + 1 : 1;
  next.prev_hash = previous ? previous->hash : std::string(kGenesis);
  auto h = record_hash(next);
  if (!h) return std::unexpected(h.error());
  next.hash = *h;
  return next;
}

Result<void> verify_chain(std::span<const Record> records) {
  std::string prev(kGenesis);
  uint64_t want_seq = 1;
  for (const Record& r : records) {
    const std::string where = "audit record " + std::to_string(r.seq);
    if (r.seq != want_seq) {
      return fail(ErrorCode::kAuth, where + " follows record " + std::to_string(want_seq - 1) +
                                        ": records were deleted or reordered");
    }
    auto h = record_hash(r);
    if (!h) return std::unexpected(h.error());
    if (*h != r.hash) return fail(ErrorCode::kAuth, where + " was edited: its hash does not match its content");
    if (r.prev_hash != prev) {
      return fail(ErrorCode::kAuth, where + " does not follow the record before it (prev_hash " + r.prev_hash.substr(0, 12) +
                                        "…, want " + prev.substr(0, 12) + "…): a record was replaced");
    }
    prev = r.hash;
    ++want_seq;
  }
  return {};
}

Result<std::string> to_json(const Record& r) {
  json j = body(r);
  j["hash"] = r.hash;
  return kbs::canonical_json(j);
}

Result<Record> from_json(std::string_view text) {
  auto parsed = kbs::parse_strict_json(text, "audit record");
  if (!parsed) return fail(ErrorCode::kMalformed, parsed.error().message);
  const json j = std::move(*parsed);
  static const std::set<std::string> kKeys = {"seq", "time", "user", "dataset", "evidence_digest", "measurement",
                                              "result", "reason", "sim", "prev_hash", "hash"};
  if (!j.is_object() || j.size() != kKeys.size()) return fail(ErrorCode::kMalformed, "audit record has the wrong members");
  for (const auto& [k, v] : j.items()) {
    if (!kKeys.contains(k)) return fail(ErrorCode::kMalformed, "audit record member \"" + k + "\" is unknown");
  }
  try {
    Record r;
    r.seq = j.at("seq").get<uint64_t>();
    r.time = j.at("time").get<int64_t>();
    r.user = j.at("user").get<std::string>();
    r.dataset = j.at("dataset").get<std::string>();
    r.evidence_digest = j.at("evidence_digest").get<std::string>();
    r.measurement = j.at("measurement").get<std::string>();
    r.result = j.at("result").get<std::string>();
    r.reason = j.at("reason").get<std::string>();
    r.sim = j.at("sim").get<bool>();
    r.prev_hash = j.at("prev_hash").get<std::string>();
    r.hash = j.at("hash").get<std::string>();
    return r;
  } catch (const json::exception& e) {
    return fail(ErrorCode::kMalformed, std::string("audit record member has the wrong type: ") + e.what());
  }
}

}  // namespace tresor::audit
