// The host–guest control channel (include/tresor/vm/control.h).
#include "tresor/vm/control.h"

#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "tresor/io.h"
#include "tresor/kbs/jose.h"

namespace tresor::vm::control {
namespace {

using json = nlohmann::json;

bool known(uint8_t t) {
  static const std::set<uint8_t> kTypes = {0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x81, 0x82, 0x83, 0x84};
  return kTypes.contains(t);
}

Error malformed(std::string m) { return Error{ErrorCode::kMalformed, "control channel: " + std::move(m)}; }

}  // namespace

Result<void> Channel::send(Type type, ByteSpan payload) {
  if (payload.size() > kMaxPayload) return fail(ErrorCode::kInvalidArgument, "control channel: payload too large");
  std::array<std::byte, 5> head{};
  store_be32(head.data(), static_cast<uint32_t>(payload.size() + 1));
  head[4] = static_cast<std::byte>(type);
  std::lock_guard lock(send_mutex_);
  TRESOR_TRY(write_all_fd(fd_, head, "control channel"));
  return write_all_fd(fd_, payload, "control channel");
}

Result<Message> Channel::receive() {
  std::array<std::byte, 5> head{};
  auto got = read_exact_fd(fd_, MutableByteSpan(head).first(4), "control channel");
  if (!got) return std::unexpected(got.error());
  if (!*got) return fail(ErrorCode::kUnavailable, "control channel: closed");
  const uint32_t n = load_be32(head.data());
  if (n == 0 || n - 1 > kMaxPayload) return std::unexpected(malformed("a frame of " + std::to_string(n) + " bytes"));
  auto t = read_exact_fd(fd_, MutableByteSpan(head).subspan(4, 1), "control channel");
  if (!t) return std::unexpected(t.error());
  if (!*t) return fail(ErrorCode::kTruncated, "control channel: the other end closed in the middle of a frame");
  const auto type = static_cast<uint8_t>(head[4]);
  if (!known(type)) return std::unexpected(malformed("unknown message type 0x" + to_hex(ByteSpan(head).subspan(4, 1))));
  Message m{static_cast<Type>(type), Bytes(n - 1)};
  if (n > 1) {
    auto body = read_exact_fd(fd_, m.payload, "control channel");
    if (!body) return std::unexpected(body.error());
    if (!*body) return fail(ErrorCode::kTruncated, "control channel: the other end closed in the middle of a frame");
  }
  return m;
}

Result<std::vector<std::string>> validate_output_name(std::string_view name) {
  auto bad = [&](const std::string& why) {
    std::string shown;
    for (char c : name.substr(0, 200)) shown += (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) ? '?' : c;
    return std::unexpected(malformed("output name '" + shown + "' " + why));
  };
  if (name.empty() || name.size() > 4096) return bad("must be 1..4096 bytes");
  if (name.front() == '/') return bad("must be relative to the output directory");
  if (!name.ends_with(".sealed") || name.ends_with("/.sealed")) return bad("must name a sealed file (*.sealed)");
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    const size_t slash = name.find('/', start);
    const std::string_view part = name.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (part.empty() || part.size() > 255) return bad("has an empty or over-long path component");
    if (part == "." || part == "..") return bad("must not contain '.' or '..' components");
    for (char c : part) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return bad("contains a control character");
    }
    parts.emplace_back(part);
    if (parts.size() > 16) return bad("is more than 16 directories deep");
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return parts;
}

Bytes encode_start(const Start& s) {
  json j = {{"version", s.version},         {"manifest_env", s.manifest_env}, {"command", s.command},
            {"script", s.script},           {"env", s.env},                   {"broker_url", s.broker_url},
            {"broker_ca_pem", s.broker_ca_pem}, {"datasets", s.datasets},     {"evidence", s.evidence}};
  const std::string text = j.dump();
  return Bytes(as_bytes(text).begin(), as_bytes(text).end());
}

Result<Start> decode_start(ByteSpan payload) {
  auto parsed = kbs::parse_strict_json(std::string_view(reinterpret_cast<const char*>(payload.data()), payload.size()), "control start");
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  if (!j.is_object()) return std::unexpected(malformed("start must be a JSON object"));
  static const std::set<std::string> kKeys = {"version", "manifest_env", "command", "script", "env", "broker_url", "broker_ca_pem", "datasets", "evidence"};
  for (const auto& [k, v] : j.items()) {
    if (!kKeys.contains(k)) return std::unexpected(malformed("start: unknown member \"" + k + "\""));
  }
  for (const auto& k : kKeys) {
    if (!j.contains(k)) return std::unexpected(malformed("start: \"" + k + "\" is missing"));
  }
  Start s;
  try {
    s.version = j["version"].get<uint32_t>();
    if (s.version != 1) return std::unexpected(malformed("start: version " + std::to_string(s.version) + " (this agent speaks 1)"));
    s.manifest_env = j["manifest_env"].get<std::string>();
    s.command = j["command"].get<std::vector<std::string>>();
    s.script = j["script"].get<std::string>();
    s.env = j["env"].get<std::map<std::string, std::string>>();
    s.broker_url = j["broker_url"].get<std::string>();
    s.broker_ca_pem = j["broker_ca_pem"].get<std::string>();
    s.datasets = j["datasets"].get<std::vector<std::string>>();
    s.evidence = j["evidence"].get<std::string>();
  } catch (const json::exception& e) {
    return std::unexpected(malformed(std::string("start: a member has the wrong type (") + e.what() + ")"));
  }
  if (s.command.empty()) return std::unexpected(malformed("start: the command is empty"));
  return s;
}

Bytes encode_evidence(const kbs::Evidence& e) {
  const auto pem = as_bytes(e.endorsement_cert_pem);
  Bytes out(4 + e.report.size() + pem.size());
  store_be32(out.data(), static_cast<uint32_t>(e.report.size()));
  std::copy(e.report.begin(), e.report.end(), out.begin() + 4);
  std::copy(pem.begin(), pem.end(), out.begin() + 4 + static_cast<std::ptrdiff_t>(e.report.size()));
  return out;
}

Result<kbs::Evidence> decode_evidence(ByteSpan p) {
  if (p.size() < 4 || load_be32(p.data()) > p.size() - 4) return std::unexpected(malformed("evidence: the report length runs past the frame"));
  const uint32_t n = load_be32(p.data());
  kbs::Evidence e;
  e.report.assign(p.begin() + 4, p.begin() + 4 + n);
  e.endorsement_cert_pem.assign(reinterpret_cast<const char*>(p.data() + 4 + n), p.size() - 4 - n);
  return e;
}

Bytes encode_exit(int status) {
  if (WIFSIGNALED(status)) return {std::byte{1}, static_cast<std::byte>(WTERMSIG(status))};
  return {std::byte{0}, static_cast<std::byte>(WIFEXITED(status) ? WEXITSTATUS(status) : 1)};
}

Result<int> decode_exit(ByteSpan p) {
  if (p.size() != 2) return std::unexpected(malformed("exit: " + std::to_string(p.size()) + " bytes, want 2"));
  const int code = static_cast<int>(p[1]);
  if (p[0] == std::byte{0}) return code << 8;                  // as waitpid encodes an exit
  if (p[0] == std::byte{1} && code > 0 && code < 65) return code;  // and a death by signal
  return std::unexpected(malformed("exit: kind " + std::to_string(static_cast<int>(p[0])) + ", code " + std::to_string(code)));
}

Bytes encode_connection(uint32_t id, ByteSpan data) {
  Bytes out(4 + data.size());
  store_be32(out.data(), id);
  std::copy(data.begin(), data.end(), out.begin() + 4);
  return out;
}

Result<std::pair<uint32_t, ByteSpan>> decode_connection(ByteSpan p) {
  if (p.size() < 4) return std::unexpected(malformed("a broker frame without its connection id"));
  return std::pair<uint32_t, ByteSpan>{load_be32(p.data()), p.subspan(4)};
}

}  // namespace tresor::vm::control
