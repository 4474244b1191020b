// tresor/broker/server.h — tresor-broker's network side: HTTPS (TLS 1.3 only, OpenSSL through
// Boost.Asio/Beast) in front of the Service, and the admin socket (a Unix socket whose peers are
// checked with SO_PEERCRED) in front of the admin commands (admin.h).
//
// Every connection is asynchronous with a deadline: the TLS handshake and each request must
// complete within [limits] request_timeout_ms, so idle and slow clients cost a socket and a
// little memory, never a thread. At most [limits] max_connections are open; more are closed at
// once. A request body over [limits] max_body_bytes is answered 413 without reading the rest.
// stop() is graceful: no new connections, requests in progress finish, idle keep-alive
// connections close, and run() returns.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tresor/broker/config.h"
#include "tresor/broker/service.h"
#include "tresor/error.h"

namespace tresor::broker {

class Admin;

class Server {
 public:
  /// Loads the TLS certificate and key, binds the listening socket (and the admin socket when
  /// `admin` is given). kIo names the file or address that failed.
  [[nodiscard]] static Result<std::unique_ptr<Server>> create(const Config& config, Service& service, Admin* admin = nullptr);
  ~Server();

  /// The bound port (useful when the configuration asks for port 0).
  uint16_t port() const;
  /// Serves on config.worker_threads threads until stop(); returns when every connection is done.
  void run();
  /// Begins a graceful shutdown (safe from any thread and from a signal-handling thread).
  void stop();
  /// Open HTTPS connections now (for tests and metrics).
  size_t connections() const;

 private:
  struct Impl;
  explicit Server(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace tresor::broker

namespace tresor::broker {

/// Writes a self-signed TLS certificate (ECDSA P-256, SHA-256) for `names` (IP literals become IP
/// subjectAltNames, others DNS names) valid for `days`, and its private key (mode 0600). For
/// tests, benchmarks and first set-up; docs/broker.md §3 says how to use a real CA instead.
[[nodiscard]] Result<void> write_self_signed_certificate(const std::string& cert_path, const std::string& key_path,
                                                         const std::vector<std::string>& names, int days);

}  // namespace tresor::broker
