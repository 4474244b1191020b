// tresor admin: the broker's administration over its admin socket (docs/broker.md §5, docs/cli.md).
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <ctime>
#include <cstring>
#include <optional>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "options.h"
#include "tresor/audit.h"
#include "tresor/broker/admin.h"
#include "tresor/encoding.h"
#include "tresor/io.h"

namespace tresor::cli {
namespace {

using json = nlohmann::json;

constexpr const char* kDefaultSocket = "/run/tresor-broker/admin.sock";

std::string format_time(int64_t t) {
  const std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string socket_path(const std::string& given) {
  if (!given.empty()) return given;
  if (const char* env = std::getenv("TRESOR_ADMIN_SOCKET"); env != nullptr && *env != '\0') return env;
  return kDefaultSocket;
}

}  // namespace

Result<json> admin_call(const std::string& socket_path_or_url, const json& request) {
  std::string path = socket_path_or_url;
  if (path.starts_with("unix:")) path = path.substr(5);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    return fail(ErrorCode::kInvalidArgument, "admin socket path '" + path + "' is empty or too long");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  FdFile fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "admin socket " + path, /*owned=*/true);
  if (fd.fd() < 0) return fail(ErrorCode::kIo, std::string("socket: ") + std::strerror(errno));
  if (::connect(fd.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return fail(ErrorCode::kIo, "cannot reach the broker's admin socket " + path + ": " + std::strerror(errno) +
                                    " (is tresor-broker running, and may this user use it?)");
  }
  const std::string line = request.dump() + "\n";
  TRESOR_TRY(fd.write(as_bytes(line)));
  std::string reply;
  char buf[4096];
  while (reply.empty() || reply.back() != '\n') {
    const ssize_t n = ::read(fd.fd(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(ErrorCode::kIo, std::string("reading the admin socket: ") + std::strerror(errno));
    if (n == 0) break;
    reply.append(buf, static_cast<size_t>(n));
  }
  json j;
  try {
    j = json::parse(reply);
  } catch (const json::exception&) {
    return fail(ErrorCode::kIo, "the broker's admin socket answered something that is not JSON");
  }
  if (!j.is_object() || !j.contains("ok") || !j["ok"].is_boolean()) return fail(ErrorCode::kIo, "malformed admin reply");
  if (!j["ok"].get<bool>()) {
    return fail(broker::error_code_from_name(j.value("code", "io")), "broker: " + j.value("error", std::string("refused")));
  }
  return j;
}

int cmd_admin(int argc, char** argv) {
  po::options_description opts("Options");
  std::string socket, key_file, key_out;
  std::vector<std::string> words;
  uint64_t from = 1;
  opts.add_options()
      ("socket,s", po::value(&socket), "the broker's admin socket (default $TRESOR_ADMIN_SOCKET or /run/tresor-broker/admin.sock)")
      ("key-file", po::value(&key_file), "dataset create: register this existing dataset key file as version 1")
      ("output,o", po::value(&key_out), "dataset create/rotate: draw a fresh key here, write it to this file (0600) and register it")
      ("from", po::value(&from)->default_value(1), "audit show: first record number")
      ("json", "print the broker's reply as JSON")
      ("words", po::value(&words)->composing(), "");
  po::positional_options_description pos;
  pos.add("words", -1);
  po::variables_map vm;
  const std::string synopsis =
      "[--socket PATH] WHAT ...\n\n"
      "  dataset create ID [-o NEWKEYFILE | --key-file KEYFILE]\n"
      "                                     register a dataset (with a fresh key written to NEWKEYFILE, or an existing one)\n"
      "  dataset import-key ID KEYFILE      register a dataset key file as the next key version\n"
      "  dataset rotate ID -o NEWKEYFILE    draw a fresh key, keep it in NEWKEYFILE and register it as the next version\n"
      "  dataset list | dataset show ID\n"
      "  policy set ID FILE | policy show ID\n"
      "  user add NAME RECIPIENT | user revoke NAME | user show NAME\n"
      "  group add GROUP USER | group remove GROUP USER   (dataset policies may admit groups)\n"
      "  grant USER DATASET | revoke-grant USER DATASET\n"
      "  audit show [--from N] | audit verify";
  if (auto stop = parse_options("admin", synopsis, argc, argv, opts, pos, vm)) return *stop;
  auto need = [&](size_t n) { return words.size() == n; };
  auto usage = [&] { return usage_error("admin", "unknown or incomplete admin command; see 'tresor admin --help'"); };
  if (words.empty()) return usage();

  json req;
  const std::string what = words[0] + (words.size() > 1 ? " " + words[1] : "");
  auto with_key_file = [&](const std::string& path, const std::string& id) -> Result<void> {
    auto k = load_dataset_key(path, id);
    if (!k) return std::unexpected(k.error());
    req["key"] = base64url_encode(k->key.span());
    return {};
  };
  // A fresh key drawn here, written to -o only once the broker holds it.
  std::optional<DatasetKey> fresh;
  std::optional<Output> fresh_out;
  auto draw_fresh = [&](const std::string& id) -> Result<void> {
    auto k = DatasetKey::generate(id);
    if (!k) return std::unexpected(k.error());
    auto o = Output::create(key_out, 0600, /*overwrite=*/false, /*binary=*/false);
    if (!o) return std::unexpected(o.error());
    TRESOR_TRY(o->sink().write(as_bytes(k->to_file_text())));
    req["key"] = base64url_encode(k->key.span());
    fresh = std::move(*k);
    fresh_out = std::move(*o);
    return {};
  };
  if (what == "dataset create" && need(3)) {
    if (!key_file.empty() && !key_out.empty()) return usage_error("admin", "give --key-file or -o, not both");
    req = {{"op", "dataset.create"}, {"dataset", words[2]}};
    if (!key_file.empty()) {
      if (auto r = with_key_file(key_file, words[2]); !r) return report(r.error());
    } else if (!key_out.empty()) {
      if (auto r = draw_fresh(words[2]); !r) return report(r.error());
    }
  } else if (what == "dataset import-key" && need(4)) {
    req = {{"op", "dataset.import-key"}, {"dataset", words[2]}};
    if (auto r = with_key_file(words[3], words[2]); !r) return report(r.error());
  } else if (what == "dataset rotate" && need(3)) {
    if (key_out.empty()) return usage_error("admin", "dataset rotate needs -o NEWKEYFILE: the data owner seals new files with that key");
    req = {{"op", "dataset.import-key"}, {"dataset", words[2]}};
    if (auto r = draw_fresh(words[2]); !r) return report(r.error());
  } else if (what == "dataset list" && need(2)) {
    req = {{"op", "dataset.list"}};
  } else if (what == "dataset show" && need(3)) {
    req = {{"op", "dataset.show"}, {"dataset", words[2]}};
  } else if (what == "policy set" && need(4)) {
    auto text = read_small_file(words[3]);
    if (!text) return report(text.error());
    try {
      req = {{"op", "policy.set"}, {"dataset", words[2]}, {"policy", json::parse(*text)}};
    } catch (const json::exception& e) {
      return report({ErrorCode::kInvalidArgument, words[3] + " is not valid JSON: " + e.what()});
    }
  } else if (what == "policy show" && need(3)) {
    req = {{"op", "policy.show"}, {"dataset", words[2]}};
  } else if (what == "user add" && need(4)) {
    req = {{"op", "user.add"}, {"user", words[2]}, {"identity", words[3]}};
  } else if (what == "user revoke" && need(3)) {
    req = {{"op", "user.revoke"}, {"user", words[2]}};
  } else if (what == "user show" && need(3)) {
    req = {{"op", "user.show"}, {"user", words[2]}};
  } else if ((what == "group add" || what == "group remove") && need(4)) {
    req = {{"op", "group." + words[1]}, {"group", words[2]}, {"user", words[3]}};
  } else if (words[0] == "grant" && need(3)) {
    req = {{"op", "grant"}, {"user", words[1]}, {"dataset", words[2]}};
  } else if (words[0] == "revoke-grant" && need(3)) {
    req = {{"op", "revoke-grant"}, {"user", words[1]}, {"dataset", words[2]}};
  } else if (what == "audit show" && need(2)) {
    req = {{"op", "audit.show"}, {"from", from}};
  } else if (what == "audit verify" && need(2)) {
    req = {{"op", "audit.verify"}};
  } else {
    return usage();
  }

  auto reply = admin_call(socket_path(socket), req);
  if (!reply) return report(reply.error());
  if (fresh_out) {
    if (auto c = fresh_out->commit(); !c) {
      return report({c.error().code, "the broker holds the new key but " + key_out + " could not be written: " + c.error().message});
    }
    std::fprintf(stderr, "tresor admin: new key for %s written to %s (seal new files with --dataset-key-file %s --dataset %s)\n",
                 fresh->id.c_str(), key_out.c_str(), key_out.c_str(), fresh->id.c_str());
  }
  reply->erase("ok");
  if (vm.count("json")) {
    std::printf("%s\n", reply->dump(2).c_str());
    return kExitOk;
  }
  const std::string op = req["op"].get<std::string>();
  if (op == "audit.show") {
    for (const auto& r : (*reply)["records"]) {
      const int64_t t = r.value("time", int64_t{0});
      std::printf("#%llu %s %s%s dataset=%s user=%s: %s\n", static_cast<unsigned long long>(r.value("seq", uint64_t{0})),
                  format_time(t).c_str(), r.value("result", std::string()).c_str(), r.value("sim", false) ? " [SIM]" : "",
                  r.value("dataset", std::string()).c_str(), r.value("user", std::string()).substr(0, 24).c_str(),
                  r.value("reason", std::string()).c_str());
    }
  } else if (op == "audit.verify") {
    std::printf("audit log intact: %llu records, head %s\n", static_cast<unsigned long long>((*reply)["records"].get<uint64_t>()),
                (*reply)["head"].get<std::string>().c_str());
  } else if (op == "dataset.list") {
    for (const auto& d : (*reply)["datasets"]) std::printf("%s\n", d.get<std::string>().c_str());
  } else if (reply->contains("version")) {
    std::printf("%s: key version %u\n", (*reply)["dataset"].get<std::string>().c_str(), (*reply)["version"].get<unsigned>());
  } else {
    std::printf("%s\n", reply->dump(2).c_str());
  }
  return kExitOk;
}

}  // namespace tresor::cli
