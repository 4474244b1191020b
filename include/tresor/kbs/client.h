// tresor/kbs/client.h — the guest side of the KBS protocol 0.4.0 (docs/protocol.md): an HTTPS
// client that keeps the kbs-session-id cookie, and the attestation handshake built on it. The
// agent uses it inside the VM; `tresor kbs get-resource` uses it by hand with sim evidence.
//
// The client speaks TLS 1.3 only and verifies the broker's certificate against the CA file it is
// given (host name or IP address included). It never sends anything before the certificate has
// verified, and never follows redirects.
#pragma once

#include <array>
#include <chrono>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "tresor/crypto.h"
#include "tresor/roster.h"
#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"

namespace tresor::kbs {

struct ClientOptions {
  std::string url;      // https://HOST:PORT (an IP literal or a DNS name; IPv6 in brackets)
  std::string ca_file;  // PEM: the certificate(s) the broker's chain must lead to (required)
  std::chrono::milliseconds timeout{10000};  // per request: connect, TLS, write and read
};

struct HttpReply {
  int status = 0;
  std::string body;
};

class Client {
 public:
  /// Checks the options and prepares TLS; connects on the first request.
  [[nodiscard]] static Result<std::unique_ptr<Client>> create(const ClientOptions& options);
  ~Client();

  /// One request on the kept-alive connection (reconnecting once if the broker closed it).
  /// Sends and updates the kbs-session-id cookie. Errors only for transport failures.
  [[nodiscard]] Result<HttpReply> request(std::string_view method, std::string_view target, std::string_view body = {});

  /// POST /kbs/v0/auth with {"version":"0.4.0","tee":"snp"}: returns the challenge nonce.
  [[nodiscard]] Result<std::string> auth();
  /// POST /kbs/v0/attest: returns the attestation token.
  [[nodiscard]] Result<std::string> attest(const nlohmann::json& attestation);
  /// GET /kbs/v0/resource/<path>: returns the JWE.
  [[nodiscard]] Result<nlohmann::json> resource(std::string_view path);

  const std::string& session_id() const;
  void set_session_id(std::string id);  // for tests that replay or swap sessions
  void close();

 private:
  struct Impl;
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// The error a broker's status means, with its problem detail: 400 and 413 kInvalidArgument,
/// 401 kAuth, 403 and 409 kPolicy, 404 kNoMatchingKey, others kUnavailable.
Error status_error(const HttpReply& reply, std::string_view what);

/// Evidence from the TEE for a given REPORT_DATA: the signed report and, optionally, the
/// endorsement certificate (PEM) when the broker cannot be expected to have it cached.
struct Evidence {
  Bytes report;
  std::string endorsement_cert_pem;
};
using EvidenceSource = std::function<Result<Evidence>(const std::array<std::byte, 64>& report_data)>;

/// What a completed handshake holds: the ephemeral key the broker encrypts to, and the token.
struct Attestation {
  crypto::Key tee_key;
  std::string token;
};

/// The whole handshake: auth, a fresh P-256 key, the REPORT_DATA binding of nonce and key,
/// evidence for it, and attest with the signed job manifest (its canonical JSON) as init-data.
/// `additional_evidence` (e.g. a link claim, roster.h) goes into runtime-data and so into the
/// REPORT_DATA binding.
[[nodiscard]] Result<Attestation> attest(Client& client, std::string_view manifest_json, const EvidenceSource& evidence,
                                         std::string_view additional_evidence = "");

struct ReleasedKey {
  std::string dataset;
  uint32_t version = 0;
  SecretBuffer key;  // 32 bytes
};

/// GET a dataset key ("latest" or a version number) and decrypt it with the session's key.
[[nodiscard]] Result<ReleasedKey> fetch_dataset_key(Client& client, const Attestation& session, std::string_view dataset,
                                                    std::string_view tag = "latest");

/// GET the roster of the step this session's VM claimed ranks of with `claim` (docs/protocol.md
/// §13), asking again every `poll` while the broker answers 503 (ranks not yet claimed) until
/// `wait` has passed; decrypts it, checks that it is a roster of the claim's step and size that
/// lists the claim's key at its ranks (and its lead, with rank 0), and returns its text.
/// kUnavailable names the ranks still missing when the wait ends; kAuth for a roster that does
/// not list this VM as it claimed.
[[nodiscard]] Result<std::string> fetch_step_roster(Client& client, const Attestation& session, const LinkClaim& claim, std::chrono::milliseconds wait,
                                                    std::chrono::milliseconds poll = std::chrono::milliseconds(250));

}  // namespace tresor::kbs
