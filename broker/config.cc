#include "tresor/broker/config.h"

#include <arpa/inet.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <toml++/toml.h>

namespace tresor::broker {
namespace {

std::string where(const std::string& source, const toml::source_region& region) {
  return source + ":" + std::to_string(region.begin.line);
}

// One key of one table: how to read it into the Config.
struct KeyRule {
  std::function<Result<void>(const toml::node&, Config&, const std::string& at)> read;
};

Result<std::string> string_of(const toml::node& n, const std::string& name, const std::string& at) {
  if (!n.is_string()) return fail(ErrorCode::kInvalidArgument, at + ": " + name + " must be a string");
  return std::string(*n.value<std::string_view>());
}

Result<int64_t> integer_of(const toml::node& n, const std::string& name, const std::string& at, int64_t lo, int64_t hi) {
  if (!n.is_integer()) return fail(ErrorCode::kInvalidArgument, at + ": " + name + " must be an integer");
  const int64_t v = *n.value<int64_t>();
  if (v < lo || v > hi) {
    return fail(ErrorCode::kInvalidArgument, at + ": " + name + " is " + std::to_string(v) + ", must be " +
                                                 std::to_string(lo) + ".." + std::to_string(hi));
  }
  return v;
}

}  // namespace

Result<Config> parse_config(std::string_view text, const std::string& source, const std::string& base_dir) {
  toml::table doc;
  try {
    doc = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    return fail(ErrorCode::kInvalidArgument,
                where(source, e.source()) + ": not valid TOML: " + std::string(e.description()));
  }

  Config c;
  auto path_into = [&](std::string Config::*field, bool allow_empty) {
    return [field, allow_empty, &base_dir](const toml::node& n, Config& cfg, const std::string& at) -> Result<void> {
      auto s = string_of(n, "a path", at);
      if (!s) return std::unexpected(s.error());
      if (s->empty()) {
        if (allow_empty) return {};
        return fail(ErrorCode::kInvalidArgument, at + ": the path must not be empty");
      }
      std::filesystem::path p(*s);
      if (p.is_relative()) p = std::filesystem::path(base_dir) / p;
      cfg.*field = p.lexically_normal().string();
      return {};
    };
  };
  auto u32_into = [](uint32_t Config::*field, int64_t lo, int64_t hi) {
    return [field, lo, hi](const toml::node& n, Config& cfg, const std::string& at) -> Result<void> {
      auto v = integer_of(n, "the value", at, lo, hi);
      if (!v) return std::unexpected(v.error());
      cfg.*field = static_cast<uint32_t>(*v);
      return {};
    };
  };

  using Rules = std::map<std::string, KeyRule>;
  const std::map<std::string, std::pair<bool, Rules>> tables = {
      {"listen",
       {false,
        {{"address", {[](const toml::node& n, Config& cfg, const std::string& at) -> Result<void> {
            auto s = string_of(n, "address", at);
            if (!s) return std::unexpected(s.error());
            unsigned char buf[16];
            if (inet_pton(AF_INET, s->c_str(), buf) != 1 && inet_pton(AF_INET6, s->c_str(), buf) != 1) {
              return fail(ErrorCode::kInvalidArgument, at + ": address '" + *s + "' is not an IPv4 or IPv6 address");
            }
            cfg.address = *s;
            return {};
          }}},
         {"port", {[](const toml::node& n, Config& cfg, const std::string& at) -> Result<void> {
            auto v = integer_of(n, "port", at, 0, 65535);  // 0: any free port (printed at start)
            if (!v) return std::unexpected(v.error());
            cfg.port = static_cast<uint16_t>(*v);
            return {};
          }}}}}},
      {"tls", {true, {{"certificate", {path_into(&Config::tls_certificate, false)}},
                      {"private_key", {path_into(&Config::tls_private_key, false)}}}}},
      {"store", {true, {{"path", {path_into(&Config::store_path, false)}},
                        {"master_key", {path_into(&Config::master_key_path, false)}}}}},
      {"attestation", {false, {{"vcek_cache", {path_into(&Config::vcek_cache_dir, true)}},
                               {"sim_trust", {path_into(&Config::sim_trust_dir, true)}}}}},
      {"limits", {false, {{"max_body_bytes", {u32_into(&Config::max_body_bytes, 1024, 16 * 1024 * 1024)}},
                          {"request_timeout_ms", {u32_into(&Config::request_timeout_ms, 100, 600000)}},
                          {"max_connections", {u32_into(&Config::max_connections, 1, 1000000)}},
                          {"max_sessions", {u32_into(&Config::max_sessions, 1, 10000000)}},
                          {"worker_threads", {u32_into(&Config::worker_threads, 1, 256)}}}}},
      {"admin", {false, {{"socket", {path_into(&Config::admin_socket, false)}},
                         {"uids", {[](const toml::node& n, Config& cfg, const std::string& at) -> Result<void> {
                            const toml::array* a = n.as_array();
                            if (a == nullptr) return fail(ErrorCode::kInvalidArgument, at + ": uids must be an array of user ids");
                            cfg.admin_uids.clear();
                            for (const auto& e : *a) {
                              auto v = integer_of(e, "each uid", at, 0, 4294967294);
                              if (!v) return std::unexpected(v.error());
                              cfg.admin_uids.push_back(static_cast<uint32_t>(*v));
                            }
                            return {};
                          }}}}}},
  };

  for (auto&& [name, node] : doc) {
    const std::string at = where(source, node.source());
    const auto t = tables.find(std::string(name.str()));
    if (t == tables.end()) {
      return fail(ErrorCode::kInvalidArgument, at + ": unknown table [" + std::string(name.str()) +
                                                   "] (listen, tls, store, attestation, limits, admin)");
    }
    if (!node.is_table()) return fail(ErrorCode::kInvalidArgument, at + ": " + std::string(name.str()) + " must be a table");
    for (auto&& [key, value] : *node.as_table()) {
      const std::string key_at = where(source, value.source()) + ": " + std::string(name.str()) + "." + std::string(key.str());
      const auto rule = t->second.second.find(std::string(key.str()));
      if (rule == t->second.second.end()) {
        std::string known;
        for (const auto& [k, _] : t->second.second) known += (known.empty() ? "" : ", ") + k;
        return fail(ErrorCode::kInvalidArgument, key_at + " is not a known key (" + known + ")");
      }
      if (auto r = rule->second.read(value, c, key_at); !r) return std::unexpected(r.error());
    }
  }
  for (const auto& [name, spec] : tables) {
    if (!spec.first) continue;
    const toml::table* t = doc[name].as_table();
    for (const auto& [key, _] : spec.second) {
      if (t == nullptr || !t->contains(key)) {
        return fail(ErrorCode::kInvalidArgument, source + ": " + name + "." + key + " is required");
      }
    }
  }
  return c;
}

Result<Config> load_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(ErrorCode::kIo, "cannot read broker configuration " + path);
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return fail(ErrorCode::kIo, "cannot read broker configuration " + path);
  const std::string dir = std::filesystem::absolute(path).parent_path().string();
  return parse_config(text.str(), path, dir);
}

}  // namespace tresor::broker
