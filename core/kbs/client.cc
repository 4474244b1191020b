// The guest side of the KBS protocol (client.h), on Boost.Beast with OpenSSL.
#include "tresor/kbs/client.h"

#include <openssl/crypto.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <optional>
#include <thread>

#include "tresor/kbs/jose.h"
#include "tresor/kbs/session.h"
#include "tresor/roster.h"

namespace tresor::kbs {
namespace {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using json = nlohmann::json;

constexpr size_t kMaxReplyBody = 1 << 20;

struct Url {
  std::string host;  // without brackets
  std::string port;
};

Result<Url> parse_url(std::string_view url) {
  constexpr std::string_view scheme = "https://";
  if (!url.starts_with(scheme)) return fail(ErrorCode::kInvalidArgument, "broker URL '" + std::string(url) + "' must start with https://");
  std::string_view rest = url.substr(scheme.size());
  if (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
  if (rest.find('/') != std::string_view::npos) {
    return fail(ErrorCode::kInvalidArgument, "broker URL '" + std::string(url) + "' must be https://HOST:PORT without a path");
  }
  Url u;
  if (rest.starts_with('[')) {
    const size_t close = rest.find(']');
    if (close == std::string_view::npos) return fail(ErrorCode::kInvalidArgument, "broker URL '" + std::string(url) + "': unclosed [");
    u.host = std::string(rest.substr(1, close - 1));
    rest.remove_prefix(close + 1);
    if (!rest.empty() && rest.front() != ':') return fail(ErrorCode::kInvalidArgument, "broker URL '" + std::string(url) + "': junk after ]");
    u.port = rest.empty() ? "443" : std::string(rest.substr(1));
  } else {
    const size_t colon = rest.rfind(':');
    u.host = std::string(rest.substr(0, colon));
    u.port = colon == std::string_view::npos ? "443" : std::string(rest.substr(colon + 1));
  }
  if (u.host.empty() || u.port.empty() || u.port.find_first_not_of("0123456789") != std::string::npos) {
    return fail(ErrorCode::kInvalidArgument, "broker URL '" + std::string(url) + "' must be https://HOST:PORT");
  }
  return u;
}

}  // namespace

struct Client::Impl {
  ClientOptions options;
  Url url;
  net::io_context io;
  ssl::context tls{ssl::context::tls_client};
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream;
  beast::flat_buffer buffer;
  std::string session;

  Result<void> connect() {
    stream.reset();
    buffer.clear();
    stream.emplace(io, tls);
    SSL* s = stream->native_handle();
    beast::error_code ec;
    net::ip::make_address(url.host, ec);
    const bool is_ip = !ec;
    if (is_ip) {
      if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(s), url.host.c_str()) != 1) {
        return fail(ErrorCode::kCrypto, "cannot set the broker's IP address for certificate checks");
      }
    } else {
      // SSL_set_tlsext_host_name is a macro with a C cast; its function form is SSL_ctrl.
      if (SSL_ctrl(s, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, const_cast<char*>(url.host.c_str())) != 1 ||
          SSL_set1_host(s, url.host.c_str()) != 1) {
        return fail(ErrorCode::kCrypto, "cannot set the broker's host name for certificate checks");
      }
    }
    tcp::resolver resolver(io);
    auto endpoints = resolver.resolve(url.host, url.port, ec);
    if (ec) return fail(ErrorCode::kUnavailable, "cannot resolve broker " + url.host + ": " + ec.message());
    auto& tcp_stream = beast::get_lowest_layer(*stream);
    tcp_stream.expires_after(options.timeout);
    tcp_stream.connect(endpoints, ec);
    if (ec) return fail(ErrorCode::kUnavailable, "cannot connect to broker " + options.url + ": " + ec.message());
    tcp_stream.expires_after(options.timeout);
    stream->handshake(ssl::stream_base::client, ec);
    if (ec) {
      return fail(ErrorCode::kAuth, "TLS with broker " + options.url + " failed (is its certificate signed by " + options.ca_file +
                                        " and issued for " + url.host + "?): " + ec.message());
    }
    return {};
  }

  Result<HttpReply> once(std::string_view method, std::string_view target, std::string_view body) {
    http::request<http::string_body> req{http::string_to_verb(beast::string_view(method.data(), method.size())), std::string(target), 11};
    req.set(http::field::host, url.host);
    req.set(http::field::user_agent, "tresor-kbs-client");
    req.keep_alive(true);
    if (!session.empty()) req.set(http::field::cookie, "kbs-session-id=" + session);
    if (!body.empty() || method == "POST") {
      req.set(http::field::content_type, "application/json");
      req.body() = std::string(body);
    }
    req.prepare_payload();
    beast::error_code ec;
    beast::get_lowest_layer(*stream).expires_after(options.timeout);
    http::write(*stream, req, ec);
    if (ec) return fail(ErrorCode::kIo, "sending to broker: " + ec.message());
    http::response_parser<http::string_body> parser;
    parser.body_limit(kMaxReplyBody);
    http::read(*stream, buffer, parser, ec);
    if (ec) return fail(ErrorCode::kIo, "reading from broker: " + ec.message());
    auto& res = parser.get();
    for (auto it = res.find(http::field::set_cookie); it != res.end() && it->name() == http::field::set_cookie; ++it) {
      std::string_view v(it->value().data(), it->value().size());
      constexpr std::string_view name = "kbs-session-id=";
      if (v.starts_with(name)) {
        v.remove_prefix(name.size());
        session = std::string(v.substr(0, v.find(';')));
      }
    }
    if (!res.keep_alive()) stream.reset();
    return HttpReply{static_cast<int>(res.result_int()), std::move(res.body())};
  }
};

Result<std::unique_ptr<Client>> Client::create(const ClientOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  auto url = parse_url(options.url);
  if (!url) return std::unexpected(url.error());
  impl->url = std::move(*url);
  if (options.ca_file.empty()) return fail(ErrorCode::kInvalidArgument, "the broker's CA certificate file is required");
  SSL_CTX* ctx = impl->tls.native_handle();
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1) return fail(ErrorCode::kCrypto, "cannot require TLS 1.3");
  if (SSL_CTX_load_verify_locations(ctx, options.ca_file.c_str(), nullptr) != 1) {
    return fail(ErrorCode::kIo, "broker CA file " + options.ca_file + " is not a readable PEM certificate file");
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

const std::string& Client::session_id() const { return impl_->session; }
void Client::set_session_id(std::string id) { impl_->session = std::move(id); }
void Client::close() { impl_->stream.reset(); }

Result<HttpReply> Client::request(std::string_view method, std::string_view target, std::string_view body) {
  const bool fresh = !impl_->stream.has_value();
  if (fresh) TRESOR_TRY(impl_->connect());
  auto r = impl_->once(method, target, body);
  if (!r && !fresh) {
    // The broker may have closed an idle kept-alive connection: one new connection, one retry.
    TRESOR_TRY(impl_->connect());
    r = impl_->once(method, target, body);
  }
  if (!r) impl_->stream.reset();
  return r;
}

Error status_error(const HttpReply& reply, std::string_view what) {
  std::string detail;
  try {
    auto j = json::parse(reply.body);
    if (j.is_object() && j.contains("detail") && j["detail"].is_string()) detail = j["detail"].get<std::string>();
  } catch (const json::exception&) {
  }
  ErrorCode code = ErrorCode::kUnavailable;
  switch (reply.status) {
    case 400:
    case 413: code = ErrorCode::kInvalidArgument; break;
    case 401: code = ErrorCode::kAuth; break;
    case 403:
    case 409: code = ErrorCode::kPolicy; break;
    case 404: code = ErrorCode::kNoMatchingKey; break;
    default: break;
  }
  return Error{code, std::string(what) + ": broker answered " + std::to_string(reply.status) + (detail.empty() ? "" : " (" + detail + ")")};
}

Result<std::string> Client::auth() {
  const json req = {{"version", std::string(kProtocolVersion)}, {"tee", "snp"}, {"extra-params", ""}};
  auto r = request("POST", "/kbs/v0/auth", req.dump());
  if (!r) return std::unexpected(r.error());
  if (r->status != 200) return std::unexpected(status_error(*r, "KBS auth"));
  try {
    auto j = json::parse(r->body);
    if (!j.is_object() || !j.contains("nonce") || !j["nonce"].is_string()) return fail(ErrorCode::kMalformed, "KBS Challenge has no nonce");
    if (impl_->session.empty()) return fail(ErrorCode::kMalformed, "KBS Challenge came without a kbs-session-id cookie");
    return j["nonce"].get<std::string>();
  } catch (const json::exception&) {
    return fail(ErrorCode::kMalformed, "KBS Challenge is not JSON");
  }
}

Result<std::string> Client::attest(const json& attestation) {
  auto r = request("POST", "/kbs/v0/attest", attestation.dump());
  if (!r) return std::unexpected(r.error());
  if (r->status != 200) return std::unexpected(status_error(*r, "KBS attest"));
  try {
    auto j = json::parse(r->body);
    if (!j.is_object() || !j.contains("token") || !j["token"].is_string()) return fail(ErrorCode::kMalformed, "KBS attest reply has no token");
    return j["token"].get<std::string>();
  } catch (const json::exception&) {
    return fail(ErrorCode::kMalformed, "KBS attest reply is not JSON");
  }
}

Result<json> Client::resource(std::string_view path) {
  auto r = request("GET", "/kbs/v0/resource/" + std::string(path));
  if (!r) return std::unexpected(r.error());
  if (r->status != 200) return std::unexpected(status_error(*r, "KBS resource " + std::string(path)));
  return parse_strict_json(r->body, "KBS Response");
}

Result<Attestation> attest(Client& client, std::string_view manifest_json, const EvidenceSource& evidence, std::string_view additional_evidence) {
  auto nonce = client.auth();
  if (!nonce) return std::unexpected(nonce.error());
  auto key = crypto::Key::generate(crypto::KeyType::kP256);
  if (!key) return std::unexpected(key.error());
  auto jwk = public_jwk(*key, "ECDH-ES+A256KW");
  if (!jwk) return std::unexpected(jwk.error());
  auto binding = runtime_data_binding(*nonce, *jwk, additional_evidence);
  if (!binding) return std::unexpected(binding.error());
  auto ev = evidence(*binding);
  if (!ev) return std::unexpected(ev.error());
  json tee_evidence = {{"report", base64_encode(ev->report)}};
  if (!ev->endorsement_cert_pem.empty()) tee_evidence["endorsement_cert"] = ev->endorsement_cert_pem;
  const json body = {
      {"runtime-data", additional_evidence.empty() ? json{{"nonce", *nonce}, {"tee-pubkey", *jwk}}
                                                   : json{{"nonce", *nonce}, {"tee-pubkey", *jwk}, {"additional-evidence", std::string(additional_evidence)}}},
      {"tee-evidence", tee_evidence},
      {"init-data", {{"format", "json"}, {"body", std::string(manifest_json)}}},
  };
  auto token = client.attest(body);
  if (!token) return std::unexpected(token.error());
  return Attestation{std::move(*key), std::move(*token)};
}

Result<ReleasedKey> fetch_dataset_key(Client& client, const Attestation& session, std::string_view dataset, std::string_view tag) {
  auto jwe = client.resource(std::string(dataset) + "/" + std::string(tag));
  if (!jwe) return std::unexpected(jwe.error());
  auto plain = jwe_decrypt(*jwe, session.tee_key);
  if (!plain) return std::unexpected(plain.error());
  const std::string_view text(reinterpret_cast<const char*>(plain->data()), plain->size());
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception&) {
    return fail(ErrorCode::kMalformed, "released resource is not JSON");
  }
  if (!j.is_object() || !j.contains("dataset") || !j["dataset"].is_string() || !j.contains("version") ||
      !j["version"].is_number_unsigned() || !j.contains("key") || !j["key"].is_string()) {
    return fail(ErrorCode::kMalformed, "released resource must be {\"dataset\",\"version\",\"key\"}");
  }
  if (j["dataset"].get<std::string>() != dataset) {
    return fail(ErrorCode::kAuth, "broker released a key of '" + j["dataset"].get<std::string>() + "' when '" + std::string(dataset) +
                                      "' was asked for");
  }
  auto raw = base64url_decode(j["key"].get<std::string>(), "released key");
  std::string& k = j["key"].get_ref<std::string&>();
  OPENSSL_cleanse(k.data(), k.size());
  if (!raw) return std::unexpected(raw.error());
  if (raw->size() != 32) return fail(ErrorCode::kMalformed, "released key is " + std::to_string(raw->size()) + " bytes, not 32");
  const uint32_t version = j["version"].get<uint32_t>();
  if (tag != "latest" && std::to_string(version) != tag) {
    return fail(ErrorCode::kAuth, "broker released key version " + std::to_string(version) + " when version " + std::string(tag) +
                                      " was asked for");
  }
  ReleasedKey out{std::string(dataset), version, SecretBuffer(32)};
  std::copy(raw->begin(), raw->end(), out.key.span().begin());
  OPENSSL_cleanse(raw->data(), raw->size());
  return out;
}

Result<std::string> fetch_step_roster(Client& client, const Attestation& session, const LinkClaim& claim, std::chrono::milliseconds wait,
                                      std::chrono::milliseconds poll) {
  const std::string& step = claim.step;
  const std::string path = "tresor-step/" + step + "/roster";
  const auto give_up = std::chrono::steady_clock::now() + wait;
  bool waited = false;
  for (;;) {
    auto r = client.request("GET", "/kbs/v0/resource/" + path);
    if (!r) return std::unexpected(r.error());
    if (r->status == 503) {
      if (std::chrono::steady_clock::now() + poll > give_up) return std::unexpected(status_error(*r, "KBS resource " + path));
      std::this_thread::sleep_for(poll);
      waited = true;
      continue;
    }
    if (r->status == 401 && waited) {
      // The KBS session ended while the other ranks' VMs were still attesting.
      Error e = status_error(*r, "KBS resource " + path);
      e.message += "; the session (" + std::to_string(kSessionLifetime) + " s) ended while waiting for the step's other VMs: attest again";
      return std::unexpected(e);
    }
    if (r->status != 200) return std::unexpected(status_error(*r, "KBS resource " + path));
    auto jwe = parse_strict_json(r->body, "KBS Response");
    if (!jwe) return std::unexpected(jwe.error());
    auto plain = jwe_decrypt(*jwe, session.tee_key);
    if (!plain) return std::unexpected(plain.error());
    std::string text(reinterpret_cast<const char*>(plain->data()), plain->size());
    auto roster = parse_roster(text);
    if (!roster) return fail(ErrorCode::kMalformed, "the broker's roster: " + roster.error().message);
    if (roster->step != step) return fail(ErrorCode::kAuth, "the broker sent the roster of step " + roster->step + " when " + step + " was asked for");
    if (roster->keys.size() != static_cast<size_t>(claim.size)) {
      return fail(ErrorCode::kAuth, "the broker's roster of step " + step + " has " + std::to_string(roster->keys.size()) + " ranks; this VM claimed a step of " +
                                        std::to_string(claim.size));
    }
    for (const int rank : claim.ranks) {
      if (!crypto::ct_equal(roster->keys[static_cast<size_t>(rank)], claim.key)) {
        return fail(ErrorCode::kAuth, "the broker's roster of step " + step + " lists another key for rank " + std::to_string(rank) + ", which this VM claimed");
      }
    }
    if (!claim.lead.empty() && roster->lead_host + ":" + std::to_string(roster->lead_port) != claim.lead) {
      return fail(ErrorCode::kAuth, "the broker's roster of step " + step + " puts rank 0 at another address than this VM claimed");
    }
    return text;
  }
}

}  // namespace tresor::kbs
