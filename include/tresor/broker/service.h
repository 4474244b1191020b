// tresor/broker/service.h — the broker's request handling, apart from the network: the KBS
// 0.4.0 endpoints (docs/protocol.md), /healthz and /metrics, turned into one call from an HTTP
// request to an HTTP response. The HTTPS server (server.h) owns sockets, TLS, limits and
// timeouts and hands each complete request here; tests can drive this directly with a clock
// of their own. Thread-safe: the server calls handle() from several threads.
//
// Every decision (a refused Request, an attestation, a resource release or denial) is written
// to the hash-chained audit log before the response leaves. Records are committed in groups
// (one SQLite transaction and one fsync for all records that arrive while the previous commit
// runs), and no response waits on anything but its own record's commit.
#pragma once

#include <atomic>
#include <cstdint>
#include <ctime>
#include <functional>
#include <memory>
#include <string>

#include "tresor/broker/config.h"
#include "tresor/broker/store.h"
#include "tresor/error.h"

namespace tresor::broker {

struct HttpRequest {
  std::string method;        // "GET", "POST", …
  std::string target;        // path and query, as sent
  std::string body;
  std::string cookie;        // the Cookie header, "" when absent
  std::string peer;          // the client's address, for the log
};

struct HttpResponse {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  std::string set_cookie;    // the Set-Cookie header value, "" for none
};

/// Why the server refused a request before it reached the service (for metrics and audit).
enum class Refusal { kBodyTooLarge, kBadRequest, kTimeout, kTooManyConnections };

class Service {
 public:
  using Clock = std::function<std::time_t()>;

  /// Builds the service over an open store. Loads the sim trust root when the configuration
  /// names one (and says so on stderr: sim evidence is not confidential hardware).
  [[nodiscard]] static Result<std::unique_ptr<Service>> create(const Config& config, Store& store, Clock clock = nullptr);
  ~Service();

  /// Handles one complete request.
  HttpResponse handle(const HttpRequest& request);
  /// Answers, counts and audits a request the server refused itself (body over the limit,
  /// unparsable HTTP). `detail` goes to the audit record, never to the response body.
  HttpResponse refuse(const HttpRequest& request, Refusal why, const std::string& detail);

  /// The /metrics text (Prometheus exposition format 0.0.4).
  std::string metrics_text() const;
  /// Drops expired and dead sessions (the server calls this once a second).
  void purge();
  /// Waits for every queued audit record to be committed, then stops the audit writer.
  void shutdown();

  /// The public key (JWK) that verifies the tokens /kbs/v0/attest returns.
  std::string token_public_jwk() const;

 private:
  struct Impl;
  explicit Service(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tresor::broker
