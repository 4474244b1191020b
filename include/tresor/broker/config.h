// tresor/broker/config.h — tresor-broker's configuration file (TOML, `--config`). Strict: an
// unknown table or key, a wrong type or a value out of range is an error naming the key and its
// line, so a typo never silently falls back to a default. docs/broker.md §7 documents every key.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tresor/error.h"

namespace tresor::broker {

struct Config {
  // [listen]
  std::string address = "127.0.0.1";  // an IPv4 or IPv6 literal
  uint16_t port = 8443;
  // [tls] — required; TLS 1.3 only, no option to lower it
  std::string tls_certificate;  // PEM chain
  std::string tls_private_key;  // PEM, mode 0600
  // [store] — required
  std::string store_path;       // SQLite file
  std::string master_key_path;  // 32 raw bytes, mode 0600
  // [attestation]
  std::string vcek_cache_dir;   // offline VCEK/VLEK cache (`tresor report cache`); "" = none
  std::string sim_trust_dir;    // a sim root (`tresor sim init`); "" = sim evidence refused
  // [limits]
  uint32_t max_body_bytes = 64 * 1024;
  uint32_t request_timeout_ms = 5000;
  uint32_t max_connections = 1024;
  uint32_t max_sessions = 4096;
  uint32_t worker_threads = 16;  // threads serving HTTPS; a request blocks on its audit fsync and on ECDSA, so many more than cores
  // [admin]
  std::string admin_socket = "/run/tresor-broker/admin.sock";
  /// Who may use the admin socket, checked on each connection with SO_PEERCRED. Root and the
  /// broker's own uid are always allowed.
  std::vector<uint32_t> admin_uids;

  bool sim_trusted() const { return !sim_trust_dir.empty(); }
};

/// Parses configuration text. `base_dir` resolves relative paths (the config file's directory);
/// `source` names the file in messages. kInvalidArgument names the key, its line and the rule.
[[nodiscard]] Result<Config> parse_config(std::string_view text, const std::string& source, const std::string& base_dir);
/// Creates a new broker directory `dir` (which must not exist, or be empty): broker.toml naming
/// the files below with paths relative to it, master.key (32 random bytes, 0600), tls.crt and
/// tls.key (a self-signed P-256 certificate for `address`, 0600), the store broker.db and the
/// admin socket admin.sock inside it. `sim_trust_dir` non-empty writes [attestation] sim_trust.
[[nodiscard]] Result<void> init_directory(const std::string& dir, const std::string& address, uint16_t port,
                                          const std::string& sim_trust_dir);
/// Reads and parses a configuration file (kIo when it cannot be read).
[[nodiscard]] Result<Config> load_config(const std::string& path);

}  // namespace tresor::broker
