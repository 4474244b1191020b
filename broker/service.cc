// The broker's request handling (service.h). Protocol: docs/protocol.md; decision: release.h.
#include "tresor/broker/service.h"

#include <openssl/crypto.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <thread>

#include "tresor/broker/release.h"
#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/identity.h"
#include "tresor/kbs/jose.h"
#include "tresor/kbs/session.h"
#include "tresor/manifest.h"
#include "tresor/roster.h"
#include "tresor/snp/certs.h"
#include "tresor/snp/sim.h"
#include "tresor/snp/verify.h"

namespace tresor::broker {
namespace {

using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;

constexpr std::string_view kResourcePrefix = "/kbs/v0/resource/";
constexpr std::string_view kCookieName = "kbs-session-id";

// ---- metrics -------------------------------------------------------------------------------------

constexpr std::array<double, 11> kLatencyBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5};

class Metrics {
 public:
  void request(std::string_view endpoint, int status, double seconds) {
    std::lock_guard lock(mu_);
    ++requests_[{std::string(endpoint), status}];
    size_t b = 0;
    while (b < kLatencyBuckets.size() && seconds > kLatencyBuckets[b]) ++b;
    ++latency_counts_[b];
    latency_sum_ += seconds;
    ++latency_count_;
  }
  void release() {
    std::lock_guard lock(mu_);
    ++releases_;
  }
  void denial(std::string_view reason) {
    std::lock_guard lock(mu_);
    ++denials_[std::string(reason)];
  }
  std::string text(size_t sessions) const {
    std::lock_guard lock(mu_);
    std::string out;
    out += "# HELP tresor_broker_requests_total HTTP requests answered, by endpoint and status.\n";
    out += "# TYPE tresor_broker_requests_total counter\n";
    for (const auto& [k, n] : requests_) {
      out += "tresor_broker_requests_total{endpoint=\"" + k.first + "\",status=\"" + std::to_string(k.second) + "\"} " +
             std::to_string(n) + "\n";
    }
    out += "# HELP tresor_broker_releases_total Dataset keys released.\n";
    out += "# TYPE tresor_broker_releases_total counter\n";
    out += "tresor_broker_releases_total " + std::to_string(releases_) + "\n";
    out += "# HELP tresor_broker_denials_total Requests refused, by reason.\n";
    out += "# TYPE tresor_broker_denials_total counter\n";
    for (const auto& [reason, n] : denials_) {
      out += "tresor_broker_denials_total{reason=\"" + reason + "\"} " + std::to_string(n) + "\n";
    }
    out += "# HELP tresor_broker_sessions KBS sessions in the table.\n";
    out += "# TYPE tresor_broker_sessions gauge\n";
    out += "tresor_broker_sessions " + std::to_string(sessions) + "\n";
    out += "# HELP tresor_broker_request_duration_seconds Time from a complete request to its response.\n";
    out += "# TYPE tresor_broker_request_duration_seconds histogram\n";
    uint64_t cumulative = 0;
    for (size_t b = 0; b < kLatencyBuckets.size(); ++b) {
      cumulative += latency_counts_[b];
      char le[32];
      std::snprintf(le, sizeof le, "%g", kLatencyBuckets[b]);
      out += "tresor_broker_request_duration_seconds_bucket{le=\"" + std::string(le) + "\"} " + std::to_string(cumulative) + "\n";
    }
    cumulative += latency_counts_[kLatencyBuckets.size()];
    out += "tresor_broker_request_duration_seconds_bucket{le=\"+Inf\"} " + std::to_string(cumulative) + "\n";
    char sum[64];
    std::snprintf(sum, sizeof sum, "%.6f", latency_sum_);
    out += "tresor_broker_request_duration_seconds_sum " + std::string(sum) + "\n";
    out += "tresor_broker_request_duration_seconds_count " + std::to_string(latency_count_) + "\n";
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  uint64_t releases_ = 0;
  std::map<std::string, uint64_t> denials_;
  std::array<uint64_t, kLatencyBuckets.size() + 1> latency_counts_{};
  double latency_sum_ = 0;
  uint64_t latency_count_ = 0;
};

// ---- audit group commit --------------------------------------------------------------------------

// One writer thread commits whatever records are queued in one transaction; each caller waits for
// the commit that holds its record, so a response never leaves before its decision is durable.
class AuditWriter {
 public:
  explicit AuditWriter(Store& store) : store_(store), thread_([this] { run(); }) {}
  ~AuditWriter() { stop(); }

  Result<audit::Record> append(audit::Record r) {
    std::future<Result<audit::Record>> done;
    {
      std::lock_guard lock(mu_);
      if (stopping_) return fail(ErrorCode::kUnavailable, "the broker is shutting down");
      queue_.push_back(Pending{std::move(r), {}});
      done = queue_.back().promise.get_future();
    }
    cv_.notify_one();
    return done.get();
  }

  void stop() {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Pending {
    audit::Record record;
    std::promise<Result<audit::Record>> promise;
  };

  void run() {
    for (;;) {
      std::deque<Pending> batch;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, nothing left
        batch.swap(queue_);
      }
      std::vector<audit::Record> records;
      records.reserve(batch.size());
      for (auto& p : batch) records.push_back(p.record);
      auto stored = store_.append_audit_batch(std::move(records));
      for (size_t i = 0; i < batch.size(); ++i) {
        if (stored) batch[i].promise.set_value((*stored)[i]);
        else batch[i].promise.set_value(std::unexpected(stored.error()));
      }
    }
  }

  Store& store_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

// ---- what attest established, kept with the session ---------------------------------------------

struct Attested {
  std::optional<crypto::Key> tee_key;  // tee-pubkey, imported and checked once at attest
  snp::VerifiedReport report;
  Manifest manifest;
  std::array<std::byte, 64> report_data{};
  std::string evidence_digest;
  std::string user;  // registered user name
  std::optional<LinkClaim> link;  // this VM's claim to ranks of a step (additional-evidence)
  std::string job_key;            // hex SHA-256 of the manifest (HOST_DATA): whose steps these are
};

// The step rosters (docs/protocol.md §13): for each job (its manifest's digest) and step, the link
// keys that attested VMs of that job claimed for their ranks. A claim is recorded only after the
// VM's attestation passed every check, and it holds until the manifest expires; a rank claimed by
// one key is never given to another. Memory only: a broker restart forgets them (the VMs of a
// step then fail to join and the step is resubmitted).
class StepRosters {
 public:
  static constexpr size_t kMaxSteps = 4096;      // in all
  static constexpr size_t kMaxStepsPerJob = 64;  // so that one job cannot take every place

  // What a claim changed, so that it can be undone (when the attestation cannot be completed).
  struct Change {
    std::vector<int> ranks;  // ranks this claim newly took
    bool lead = false;       // whether it set the lead
    bool entry = false;      // whether it created the step's entry
  };

  // Records `c` for the job; kPolicy when it conflicts with what the step's other VMs claimed,
  // kUnavailable when the broker holds too many steps.
  Result<Change> claim(const std::string& job, const LinkClaim& c, std::time_t expires, std::time_t now) {
    std::lock_guard lock(mu_);
    std::erase_if(entries_, [&](const auto& e) { return e.second.expires <= now; });
    const auto k = std::make_pair(job, c.step);
    auto it = entries_.find(k);
    Change change;
    if (it == entries_.end()) {
      if (entries_.size() >= kMaxSteps) return fail(ErrorCode::kUnavailable, "the broker holds " + std::to_string(kMaxSteps) + " step rosters already");
      const auto of_job = std::ranges::count_if(entries_, [&](const auto& e) { return e.first.first == job; });
      if (static_cast<size_t>(of_job) >= kMaxStepsPerJob) {
        return fail(ErrorCode::kPolicy, "the job already has " + std::to_string(kMaxStepsPerJob) + " steps with rosters (the most one job may hold)");
      }
      change.entry = true;
      Entry e;
      e.size = c.size;
      e.keys.resize(static_cast<size_t>(c.size));
      e.expires = expires;
      it = entries_.emplace(k, std::move(e)).first;
    }
    Entry& e = it->second;
    if (e.size != c.size) {
      return fail(ErrorCode::kPolicy, "step " + c.step + " has " + std::to_string(e.size) + " ranks by an earlier VM's claim; this VM claims " + std::to_string(c.size));
    }
    for (const int r : c.ranks) {
      const auto& held = e.keys[static_cast<size_t>(r)];
      if (held && !crypto::ct_equal(*held, c.key)) {
        return fail(ErrorCode::kPolicy, "rank " + std::to_string(r) + " of step " + c.step + " is already claimed by another attested VM (link key " + base64url_encode(*held) + ")");
      }
    }
    if (!c.lead.empty() && !e.lead.empty() && e.lead != c.lead) {
      return fail(ErrorCode::kPolicy, "rank 0 of step " + c.step + " listens at " + e.lead + " by an earlier claim; this one says " + c.lead);
    }
    for (const int r : c.ranks) {
      auto& held = e.keys[static_cast<size_t>(r)];
      if (!held) change.ranks.push_back(r);
      held = c.key;
    }
    if (!c.lead.empty() && e.lead.empty()) {
      e.lead = c.lead;
      change.lead = true;
    }
    return change;
  }

  // Undoes what claim() changed.
  void undo(const std::string& job, const std::string& step, const Change& change) {
    std::lock_guard lock(mu_);
    auto it = entries_.find({job, step});
    if (it == entries_.end()) return;
    for (const int r : change.ranks) it->second.keys[static_cast<size_t>(r)].reset();
    if (change.lead) it->second.lead.clear();
    if (change.entry && std::ranges::none_of(it->second.keys, [](const auto& k) { return k.has_value(); })) entries_.erase(it);
  }

  // The roster document once every rank is claimed; otherwise nullopt and `missing` lists the ranks
  // still unclaimed.
  std::optional<std::string> roster(const std::string& job, const std::string& step, std::time_t now, std::string& missing) const {
    std::lock_guard lock(mu_);
    auto it = entries_.find({job, step});
    if (it == entries_.end() || it->second.expires <= now) {
      missing = "all (the step's claims expired with its manifest)";
      return std::nullopt;
    }
    const Entry& e = it->second;
    std::vector<std::array<std::byte, 32>> keys;
    size_t absent = 0;
    for (size_t r = 0; r < e.keys.size(); ++r) {
      if (e.keys[r]) {
        keys.push_back(*e.keys[r]);
      } else if (++absent <= 8) {
        missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
    }
    if (absent > 8) missing += " and " + std::to_string(absent - 8) + " more";
    if (absent > 0) {
      missing += " of " + std::to_string(e.size);
      return std::nullopt;
    }
    return roster_text(step, e.lead, keys);
  }

 private:
  struct Entry {
    int size = 0;
    std::vector<std::optional<std::array<std::byte, 32>>> keys;  // per rank
    std::string lead;
    std::time_t expires = 0;
  };
  mutable std::mutex mu_;
  std::map<std::pair<std::string, std::string>, Entry> entries_;
};

std::string problem(std::string_view type, std::string_view detail) {
  // RFC 7807 problem details, with the type URIs KBS uses (kbs_attestation_protocol.md).
  return json{{"type", "https://github.com/confidential-containers/kbs/errors/" + std::string(type)},
              {"detail", audit::printable(detail)}}
      .dump();
}

HttpResponse error_response(int status, std::string_view detail_for_400 = {}) {
  HttpResponse r;
  r.status = status;
  switch (status) {
    case 400: r.body = problem("InvalidRequest", detail_for_400.empty() ? "bad request" : detail_for_400); break;
    case 401: r.body = problem("Unauthorized", "attestation or session not accepted"); break;
    case 403: r.body = problem("PolicyDeny", "the request is not allowed"); break;
    case 404: r.body = problem("ResourceNotFound", "no such resource"); break;
    case 405: r.body = problem("MethodNotAllowed", "method not allowed on this endpoint"); break;
    case 409: r.body = problem("Conflict", "the request conflicts with what other attested VMs of the job claimed"); break;
    case 413: r.body = problem("PayloadTooLarge", "request body over the broker's limit"); break;
    case 503: r.body = problem("Unavailable", "the broker is busy or shutting down; retry"); break;
    default: r.body = problem("InternalError", "internal error"); break;
  }
  return r;
}

std::string_view reason_for(int status) {
  switch (status) {
    case 400: return "bad_request";
    case 401: return "unauthorized";
    case 403: return "policy";
    case 404: return "not_found";
    case 405: return "method";
    case 408: return "timeout";
    case 409: return "conflict";
    case 413: return "too_large";
    case 503: return "unavailable";
    default: return "internal";
  }
}

// The kbs-session-id value from a Cookie header (RFC 6265 §4.2.1: "name=value; name=value").
std::string session_cookie(std::string_view header) {
  while (!header.empty()) {
    const size_t end = header.find(';');
    std::string_view pair = header.substr(0, end);
    while (!pair.empty() && pair.front() == ' ') pair.remove_prefix(1);
    if (pair.starts_with(kCookieName) && pair.size() > kCookieName.size() && pair[kCookieName.size()] == '=') {
      return std::string(pair.substr(kCookieName.size() + 1));
    }
    if (end == std::string_view::npos) break;
    header.remove_prefix(end + 1);
  }
  return {};
}

// One member of a JSON object, of the given type, or an error naming it.
template <typename Check>
Result<const json*> member(const json& obj, std::string_view where, const char* name, Check is_type, const char* type) {
  auto it = obj.find(name);
  if (it == obj.end()) return fail(ErrorCode::kInvalidArgument, std::string(where) + ": \"" + name + "\" is missing");
  if (!is_type(*it)) return fail(ErrorCode::kInvalidArgument, std::string(where) + ": \"" + name + "\" must be " + type);
  return &*it;
}
bool is_object(const json& j) { return j.is_object(); }
bool is_string(const json& j) { return j.is_string(); }

Result<void> only_members(const json& obj, std::string_view where, std::initializer_list<std::string_view> allowed) {
  for (const auto& [k, v] : obj.items()) {
    if (std::find(allowed.begin(), allowed.end(), k) == allowed.end()) {
      return fail(ErrorCode::kInvalidArgument, std::string(where) + ": unknown member \"" + k + "\"");
    }
  }
  return {};
}

// The parsed Attestation body (docs/protocol.md §3 lists the members Tresor reads).
struct AttestationBody {
  std::string nonce;
  json tee_pubkey;
  std::string additional_evidence;
  Bytes report;
  Bytes endorsement_cert;  // empty: look it up in the VCEK cache
  std::string cert_chain;  // optional PEM
  std::string manifest_text;
};

Result<AttestationBody> parse_attestation(std::string_view text) {
  auto parsed = kbs::parse_strict_json(text, "KBS Attestation");
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  if (!j.is_object()) return fail(ErrorCode::kInvalidArgument, "KBS Attestation must be a JSON object");
  TRESOR_TRY(only_members(j, "KBS Attestation", {"runtime-data", "tee-evidence", "init-data"}));
  AttestationBody out;

  auto rd = member(j, "KBS Attestation", "runtime-data", is_object, "an object");
  if (!rd) return std::unexpected(rd.error());
  TRESOR_TRY(only_members(**rd, "runtime-data", {"nonce", "tee-pubkey", "additional-evidence"}));
  auto nonce = member(**rd, "runtime-data", "nonce", is_string, "a string");
  if (!nonce) return std::unexpected(nonce.error());
  out.nonce = (*nonce)->get<std::string>();
  auto pk = member(**rd, "runtime-data", "tee-pubkey", is_object, "a JWK object");
  if (!pk) return std::unexpected(pk.error());
  out.tee_pubkey = **pk;
  if (auto it = (*rd)->find("additional-evidence"); it != (*rd)->end()) {
    if (!it->is_string()) return fail(ErrorCode::kInvalidArgument, "runtime-data: \"additional-evidence\" must be a string");
    out.additional_evidence = it->get<std::string>();
  }

  auto ev = member(j, "KBS Attestation", "tee-evidence", is_object, "an object");
  if (!ev) return std::unexpected(ev.error());
  TRESOR_TRY(only_members(**ev, "tee-evidence", {"report", "endorsement_cert", "cert_chain"}));
  auto report = member(**ev, "tee-evidence", "report", is_string, "a base64 string");
  if (!report) return std::unexpected(report.error());
  auto report_bytes = base64_decode((*report)->get<std::string>(), "tee-evidence.report");
  if (!report_bytes) return std::unexpected(report_bytes.error());
  out.report = std::move(*report_bytes);
  if (auto it = (*ev)->find("endorsement_cert"); it != (*ev)->end()) {
    if (!it->is_string()) return fail(ErrorCode::kInvalidArgument, "tee-evidence: \"endorsement_cert\" must be a PEM string");
    const auto& pem = it->get_ref<const std::string&>();
    out.endorsement_cert.assign(reinterpret_cast<const std::byte*>(pem.data()), reinterpret_cast<const std::byte*>(pem.data()) + pem.size());
  }
  if (auto it = (*ev)->find("cert_chain"); it != (*ev)->end()) {
    if (!it->is_string()) return fail(ErrorCode::kInvalidArgument, "tee-evidence: \"cert_chain\" must be a PEM string");
    out.cert_chain = it->get<std::string>();
  }

  auto init = member(j, "KBS Attestation", "init-data", is_object, "an object carrying the job manifest");
  if (!init) return std::unexpected(init.error());
  TRESOR_TRY(only_members(**init, "init-data", {"format", "body"}));
  auto format = member(**init, "init-data", "format", is_string, "a string");
  if (!format) return std::unexpected(format.error());
  if ((*format)->get<std::string>() != "json") {
    return fail(ErrorCode::kInvalidArgument, "init-data: \"format\" is " + (*format)->dump() + "; Tresor reads \"json\" (a job manifest)");
  }
  auto body = member(**init, "init-data", "body", is_string, "a string (the signed job manifest)");
  if (!body) return std::unexpected(body.error());
  out.manifest_text = (*body)->get<std::string>();
  return out;
}

// Finds the endorsement certificate in the offline cache by CHIP_ID and REPORTED_TCB. A v2 report
// does not say its product, so each product's reading of the TCB is tried.
Result<Bytes> cached_endorsement(const std::string& dir, ByteSpan report) {
  if (dir.empty()) return fail(ErrorCode::kAuth, "the evidence carries no endorsement certificate and no VCEK cache is configured");
  auto parsed = snp::parse_report(report);
  if (!parsed) return std::unexpected(parsed.error());
  snp::DirectoryCache cache(dir);
  for (auto p : {snp::Product::kMilan, snp::Product::kGenoa, snp::Product::kTurin}) {
    auto tcb = snp::decode_tcb(parsed->reported_tcb, snp::tcb_layout(p), "REPORTED_TCB");
    if (!tcb) continue;
    const size_t id_len = p == snp::Product::kTurin ? 8 : 64;
    if (auto cert = cache.endorsement_cert(p, ByteSpan(parsed->chip_id).first(id_len), *tcb, false); cert) return cert;
  }
  return fail(ErrorCode::kAuth, "no endorsement certificate for this chip and TCB in the VCEK cache");
}

std::string_view endpoint_of(const HttpRequest& r) {
  if (r.target == "/kbs/v0/auth") return "auth";
  if (r.target == "/kbs/v0/attest") return "attest";
  if (r.target.starts_with(kResourcePrefix)) return "resource";
  if (r.target == "/healthz") return "healthz";
  if (r.target == "/metrics") return "metrics";
  return "other";
}

}  // namespace

struct Service::Impl {
  Impl(const Config& c, Store& s, Clock clk)
      : config(c), store(s), clock(std::move(clk)), audit(s), sessions(crypto::system_random(), c.max_sessions) {}

  const Config config;
  Store& store;
  Clock clock;
  AuditWriter audit;
  Metrics metrics;
  snp::CachedVerifier verifier;
  std::optional<snp::SimTrust> sim_trust;
  std::optional<crypto::Key> token_key;
  json token_jwk;
  mutable std::mutex sessions_mu;
  kbs::SessionTable sessions;
  StepRosters rosters;

  std::time_t now() const { return clock ? clock() : std::time(nullptr); }

  // Writes the audit record of a decision. A record that cannot be stored turns the answer into
  // 500: no decision goes unrecorded.
  bool record(audit::Record r) {
    r.time = now();
    auto stored = audit.append(std::move(r));
    if (!stored) {
      std::fprintf(stderr, "tresor-broker: audit log write failed: %s\n", stored.error().message.c_str());
      return false;
    }
    return true;
  }

  HttpResponse deny(int status, audit::Record r, std::string_view detail_for_400 = {}) {
    r.result = "denied";
    metrics.denial(reason_for(status));
    if (!record(std::move(r))) return error_response(500);
    return error_response(status, detail_for_400);
  }

  HttpResponse auth(const HttpRequest& req);
  HttpResponse attest(const HttpRequest& req);
  HttpResponse resource(const HttpRequest& req);
  HttpResponse step_roster(const Attested& attested, const std::string& path, audit::Record rec);
  Result<std::string> token(const Attested& a, const json& tee_pubkey, std::time_t now, std::time_t expires) const;
};

Result<std::unique_ptr<Service>> Service::create(const Config& config, Store& store, Clock clock) {
  auto impl = std::make_unique<Impl>(config, store, std::move(clock));
  if (config.sim_trusted()) {
    auto trust = snp::sim::load_trust(config.sim_trust_dir);
    if (!trust) return fail(trust.error().code, "[attestation] sim_trust: " + trust.error().message);
    impl->sim_trust = std::move(*trust);
    std::fprintf(stderr,
                 "tresor-broker: WARNING: sim evidence is trusted (root %s). Reports signed by it come from a software "
                 "secure processor, not AMD hardware: nothing released on them is confidential. Releases on sim evidence "
                 "are marked \"sim\" in the audit log.\n",
                 config.sim_trust_dir.c_str());
  }
  auto key = crypto::Key::generate(crypto::KeyType::kP256);
  if (!key) return std::unexpected(key.error());
  auto jwk = kbs::public_jwk(*key, "ES256");
  if (!jwk) return std::unexpected(jwk.error());
  impl->token_key = std::move(*key);
  impl->token_jwk = std::move(*jwk);
  return std::unique_ptr<Service>(new Service(std::move(impl)));
}

Service::Service(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Service::~Service() { shutdown(); }

void Service::shutdown() { impl_->audit.stop(); }

std::string Service::token_public_jwk() const { return impl_->token_jwk.dump(); }

void Service::purge() {
  std::lock_guard lock(impl_->sessions_mu);
  impl_->sessions.purge(impl_->now());
}

std::string Service::metrics_text() const {
  size_t n;
  {
    std::lock_guard lock(impl_->sessions_mu);
    n = impl_->sessions.size();
  }
  return impl_->metrics.text(n);
}

HttpResponse Service::handle(const HttpRequest& req) {
  const auto start = SteadyClock::now();
  const std::string_view ep = endpoint_of(req);
  HttpResponse res;
  auto method_is = [&](std::string_view m) { return req.method == m; };
  try {
    if (ep == "auth") {
      res = method_is("POST") ? impl_->auth(req) : error_response(405);
    } else if (ep == "attest") {
      res = method_is("POST") ? impl_->attest(req) : error_response(405);
    } else if (ep == "resource") {
      res = method_is("GET") ? impl_->resource(req) : error_response(405);
    } else if (ep == "healthz") {
      if (method_is("GET")) res.body = "{\"status\":\"ok\"}";
      else res = error_response(405);
    } else if (ep == "metrics") {
      if (method_is("GET")) {
        res.content_type = "text/plain; version=0.0.4";
        res.body = metrics_text();
      } else {
        res = error_response(405);
      }
    } else {
      res = error_response(404);
    }
  } catch (const std::exception& e) {
    // A bug, not a decision: nothing is released, the request is answered, the broker goes on.
    std::fprintf(stderr, "tresor-broker: internal error on %s: %s\n", std::string(ep).c_str(), audit::printable(e.what()).c_str());
    res = error_response(500);
  }
  const double seconds = std::chrono::duration<double>(SteadyClock::now() - start).count();
  impl_->metrics.request(ep, res.status, seconds);
  return res;
}

HttpResponse Service::refuse(const HttpRequest& req, Refusal why, const std::string& detail) {
  int status = 400;
  std::string what;
  switch (why) {
    case Refusal::kBodyTooLarge: status = 413; what = "body over the limit"; break;
    case Refusal::kBadRequest: status = 400; what = "unparsable HTTP"; break;
    case Refusal::kTimeout: status = 408; what = "request timeout"; break;
    case Refusal::kTooManyConnections: status = 503; what = "too many connections"; break;
  }
  audit::Record r;
  r.reason = std::string(endpoint_of(req)) + ": refused by the server: " + what + (detail.empty() ? "" : ": " + detail) +
             " (peer " + req.peer + ")";
  HttpResponse res = impl_->deny(status, std::move(r));
  if (status == 408) res.body = problem("Timeout", "request not received in time");
  impl_->metrics.request(endpoint_of(req), res.status, 0);
  return res;
}

// POST /kbs/v0/auth: Request → Challenge (protocol.md §2).
HttpResponse Service::Impl::auth(const HttpRequest& req) {
  std::optional<kbs::Session> s;
  Error err;
  {
    std::lock_guard lock(sessions_mu);
    auto r = sessions.auth(req.body, now());
    if (r) s = std::move(*r);
    else err = r.error();
  }
  if (!s) {
    audit::Record rec;
    rec.reason = "auth: " + err.message + " (peer " + req.peer + ")";
    // KBS answers a refused Request with 401 (kbs_attestation_protocol.md, "Authentication").
    if (err.code == ErrorCode::kUnavailable) return deny(503, std::move(rec));
    return deny(401, std::move(rec));
  }
  HttpResponse res;
  res.body = json{{"nonce", s->nonce}, {"extra-params", json::object()}}.dump();
  res.set_cookie = std::string(kCookieName) + "=" + s->id + "; Max-Age=" + std::to_string(kbs::kSessionLifetime) +
                   "; Path=/kbs; Secure; HttpOnly";
  return res;
}

// POST /kbs/v0/attest: who is this VM? Everything that does not depend on a dataset is checked
// here (evidence, freshness, key binding, manifest, HOST_DATA, image, user); the dataset checks
// come at each resource request, where authorize_release() checks everything again.
HttpResponse Service::Impl::attest(const HttpRequest& req) {
  const std::string id = session_cookie(req.cookie);
  const std::time_t t = now();
  audit::Record rec;
  if (id.empty()) {
    rec.reason = "attest: no kbs-session-id cookie (peer " + req.peer + ")";
    return deny(401, std::move(rec));
  }
  kbs::Session session;
  {
    std::lock_guard lock(sessions_mu);
    auto s = sessions.begin_attest(id, t);
    if (!s) {
      rec.reason = "attest: " + s.error().message + " (peer " + req.peer + ")";
      return deny(401, std::move(rec));
    }
    session = std::move(*s);
  }
  auto failed = [&](int status, std::string why, std::string_view detail_for_400 = {}) {
    {
      std::lock_guard lock(sessions_mu);
      sessions.failed(id);
    }
    rec.reason = "attest: " + why;
    return deny(status, std::move(rec), detail_for_400);
  };

  auto body = parse_attestation(req.body);
  if (!body) return failed(400, body.error().message, body.error().message);
  // A VM that joins a training step across machines claims its ranks with its link key
  // (docs/protocol.md §13); the claim is bound into REPORT_DATA like the nonce and tee-pubkey.
  std::optional<LinkClaim> link;
  if (!body->additional_evidence.empty()) {
    auto c = parse_link_claim(body->additional_evidence);
    if (!c) return failed(400, "runtime-data additional-evidence: " + c.error().message, "additional-evidence: " + c.error().message);
    link = std::move(*c);
  }
  if (auto digest = crypto::sha256(body->report); digest) rec.evidence_digest = to_hex(*digest);
  if (!crypto::ct_equal(ByteSpan(reinterpret_cast<const std::byte*>(body->nonce.data()), body->nonce.size()),
                        ByteSpan(reinterpret_cast<const std::byte*>(session.nonce.data()), session.nonce.size()))) {
    return failed(401, "runtime-data nonce is not this session's challenge (replayed or mixed up)");
  }
  auto teekey = kbs::key_from_jwk(body->tee_pubkey);
  if (!teekey) return failed(400, "tee-pubkey: " + teekey.error().message, "tee-pubkey: " + teekey.error().message);
  auto binding = kbs::runtime_data_binding(body->nonce, body->tee_pubkey, body->additional_evidence);
  if (!binding) return failed(400, binding.error().message, binding.error().message);

  // The evidence: AMD's chain (or the configured sim root) and the report signature.
  if (body->endorsement_cert.empty()) {
    auto cert = cached_endorsement(config.vcek_cache_dir, body->report);
    if (!cert) {
      const bool unparsable = cert.error().code != ErrorCode::kAuth;
      return failed(unparsable ? 400 : 401, "evidence: " + cert.error().message, "tee-evidence: the report does not parse");
    }
    body->endorsement_cert = std::move(*cert);
  }
  snp::VerifyInputs vi;
  vi.report = body->report;
  vi.endorsement_cert = body->endorsement_cert;
  if (!body->cert_chain.empty()) vi.chain_pem = body->cert_chain;
  vi.at = t;
  vi.sim_trust = sim_trust ? &*sim_trust : nullptr;
  auto verified = verifier.verify(vi);
  if (!verified) {
    const ErrorCode c = verified.error().code;
    const int status = c == ErrorCode::kAuth ? 401 : (c == ErrorCode::kMalformed || c == ErrorCode::kUnsupportedVersion) ? 400 : 500;
    return failed(status, "evidence: " + verified.error().message, "tee-evidence: the report or certificate does not parse");
  }
  rec.measurement = to_hex(verified->report.measurement);
  rec.sim = verified->sim;

  // The job manifest, carried as init-data and bound by HOST_DATA.
  auto manifest = parse_manifest(body->manifest_text);
  if (!manifest) return failed(400, "init-data: " + manifest.error().message, "init-data: " + manifest.error().message);
  rec.user = manifest->user.to_string();
  auto canonical = manifest_json(*manifest, true);
  if (!canonical) return failed(500, canonical.error().message);
  if (*canonical != body->manifest_text) {
    return failed(400, "init-data: the manifest is not in canonical form (RFC 8785), so HOST_DATA could not be its digest",
                  "init-data: the manifest must be sent in its canonical form");
  }
  std::vector<std::string> problems;
  if (auto v = verify_manifest(*manifest, t); !v) problems.push_back("manifest: " + v.error().message);
  auto user = store.user_by_identity(rec.user);
  if (!user) return failed(500, "store: " + user.error().message);
  if (!user->has_value()) problems.push_back("user: the manifest's signer is not a registered user");
  else if ((*user)->revoked) problems.push_back("user: '" + (*user)->name + "' is revoked");
  auto digest = manifest_digest(*manifest);
  if (!digest) return failed(500, digest.error().message);
  if (!crypto::ct_equal(verified->report.host_data, *digest)) {
    problems.push_back("evidence: HOST_DATA is " + to_hex(verified->report.host_data) + ", SHA-256 of the manifest is " + to_hex(*digest));
  }
  if (!crypto::ct_equal(verified->report.report_data, *binding)) {
    problems.push_back("evidence: REPORT_DATA does not bind this session's nonce and tee-pubkey");
  }
  if (!crypto::ct_equal(verified->report.measurement, manifest->image_measurement)) {
    problems.push_back("evidence: MEASUREMENT is " + rec.measurement + ", the manifest names image " + to_hex(manifest->image_measurement));
  }
  if (link && (!link->step.starts_with(manifest->job_id + ".") || link->step.size() == manifest->job_id.size() + 1)) {
    problems.push_back("link claim: step " + link->step + " is not a step of job " + manifest->job_id + " (JOB.STEP)");
  }
  if (!problems.empty()) {
    std::string why = "attestation refused (" + std::to_string(problems.size()) + (problems.size() == 1 ? " check" : " checks") + " failed):";
    for (const auto& p : problems) why += "\n  " + p;
    return failed(401, why);
  }

  auto attested = std::make_shared<Attested>();
  attested->tee_key = std::move(*teekey);
  attested->report = std::move(*verified);
  attested->manifest = std::move(*manifest);
  attested->report_data = *binding;
  attested->evidence_digest = rec.evidence_digest;
  attested->user = (*user)->name;
  attested->job_key = to_hex(*digest);
  auto tok = token(*attested, body->tee_pubkey, t, session.created + kbs::kSessionLifetime);
  if (!tok) return failed(500, "token: " + tok.error().message);

  std::string joined;
  std::optional<StepRosters::Change> claimed;
  if (link) {
    // Only now, with every check passed, may the VM's key enter its step's roster. A claim that
    // conflicts with the step's other VMs' (a rank already held by another key, another size or
    // lead) fails the attestation: a second VM for a rank is a host's doing, never the job's.
    // Should the attestation still not complete (its audit record, the session), the claim is
    // undone: no roster lists a key whose attestation is not in the audit log.
    auto c = rosters.claim(attested->job_key, *link, attested->manifest.expires_at, t);
    if (!c) return failed(c.error().code == ErrorCode::kUnavailable ? 503 : 409, "link claim: " + c.error().message);
    claimed = std::move(*c);
    std::string ranks;
    for (const int r : link->ranks) ranks += (ranks.empty() ? "" : ",") + std::to_string(r);
    joined = "; ranks " + ranks + " of step " + link->step + " with link key " + base64url_encode(link->key);
    attested->link = std::move(link);
  }
  rec.result = "attested";
  rec.reason = "attest: job '" + attested->manifest.job_id + "' of user '" + attested->user + "'" + joined +
               (attested->report.sim ? " on SIM evidence (not confidential hardware)" : "");
  const auto undo_claim = [&] {
    if (claimed) rosters.undo(attested->job_key, attested->link->step, *claimed);
  };
  // The record first: a session whose attestation is not in the audit log is never usable.
  if (!record(std::move(rec))) {
    undo_claim();
    std::lock_guard lock(sessions_mu);
    sessions.failed(id);
    return error_response(500);
  }
  {
    std::lock_guard lock(sessions_mu);
    if (auto r = sessions.attested(id, body->tee_pubkey, attested->manifest.job_id, attested); !r) {
      sessions.failed(id);
      undo_claim();
      return error_response(500);
    }
  }
  HttpResponse res;
  res.body = json{{"token", *tok}}.dump();
  return res;
}

// The attestation results token (kbs_attestation_protocol.md, "Attestation Results Token"): a JWT
// signed ES256 by the broker's token key, whose public JWK it carries in "jwk".
Result<std::string> Service::Impl::token(const Attested& a, const json& tee_pubkey, std::time_t now, std::time_t expires) const {
  const json header = {{"alg", "ES256"}, {"typ", "JWT"}};
  const json claims = {
      {"iss", "tresor-broker"},
      {"iat", static_cast<int64_t>(now)},
      {"exp", static_cast<int64_t>(expires)},  // when the session ends: the token never outlives it
      {"jwk", token_jwk},
      {"tee-pubkey", tee_pubkey},
      {"tcb-status",
       {{"snp.measurement", to_hex(a.report.report.measurement)},
        {"snp.host_data", to_hex(a.report.report.host_data)},
        {"snp.product", std::string(snp::product_name(a.report.product))},
        {"snp.sim", a.report.sim}}},
      {"tresor",
       {{"job_id", a.manifest.job_id}, {"user", a.user}, {"datasets", a.manifest.datasets}, {"evidence_sha256", a.evidence_digest}}},
  };
  auto h = kbs::canonical_json(header);
  if (!h) return std::unexpected(h.error());
  auto c = kbs::canonical_json(claims);
  if (!c) return std::unexpected(c.error());
  const std::string signing_input = base64url_encode(as_bytes(*h)) + "." + base64url_encode(as_bytes(*c));
  auto sig = crypto::sign(*token_key, as_bytes(signing_input));
  if (!sig) return std::unexpected(sig.error());
  return signing_input + "." + base64url_encode(*sig);
}

// GET /kbs/v0/resource/<dataset id>/<tag>: a dataset key as a JWE to the session's tee-pubkey.
// <tag> is "latest" or a key version number (docs/protocol.md §6).
HttpResponse Service::Impl::resource(const HttpRequest& req) {
  const std::time_t t = now();
  audit::Record rec;
  const std::string path = req.target.substr(kResourcePrefix.size());
  const std::string id = session_cookie(req.cookie);
  std::optional<kbs::Session> session;
  {
    std::lock_guard lock(sessions_mu);
    if (!id.empty()) {
      auto s = sessions.for_resource(id, t);
      if (!s) {
        rec.reason = "resource " + path + ": " + s.error().message + " (peer " + req.peer + ")";
        return deny(401, std::move(rec));
      }
      session = std::move(*s);
    }
  }
  if (!session) {
    rec.reason = "resource " + path + ": no kbs-session-id cookie (peer " + req.peer + ")";
    return deny(401, std::move(rec));
  }
  const auto attested = std::static_pointer_cast<const Attested>(session->context);
  rec.user = attested->manifest.user.to_string();
  rec.evidence_digest = attested->evidence_digest;
  rec.measurement = to_hex(attested->report.report.measurement);
  rec.sim = attested->report.sim;

  if (path.starts_with("tresor-step/")) return step_roster(*attested, path, std::move(rec));

  const size_t slash = path.rfind('/');
  const std::string dataset = slash == std::string::npos ? std::string() : path.substr(0, slash);
  const std::string tag = slash == std::string::npos ? path : path.substr(slash + 1);
  rec.dataset = dataset;
  std::optional<uint32_t> version;
  bool tag_ok = tag == "latest";
  if (!tag_ok && !tag.empty() && tag.size() <= 9 && std::ranges::all_of(tag, [](char c) { return c >= '0' && c <= '9'; }) && tag[0] != '0') {
    version = static_cast<uint32_t>(std::stoul(tag));
    tag_ok = true;
  }
  if (dataset.empty() || !validate_dataset_id(dataset) || !tag_ok) {
    rec.reason = "resource " + path + ": not a dataset key path (<dataset id>/latest or <dataset id>/<version>)";
    return deny(404, std::move(rec));
  }

  ReleaseRequest rr;
  rr.report = &attested->report;
  rr.report_data = attested->report_data;
  rr.manifest = &attested->manifest;
  rr.dataset = dataset;
  rr.key_version = version;
  rr.manifest_signature_verified = true;  // verify_manifest() passed at attest for this object
  rr.now = t;
  auto release = authorize_release(store, rr);
  if (!release) {
    const int status = http_status(release.error().code);
    rec.reason = "resource " + path + ": " + release.error().message;
    return deny(status == 400 ? 500 : status, std::move(rec));
  }

  // The plaintext: {"dataset","version","key"} (docs/protocol.md §6), built in a buffer that is
  // wiped after encryption.
  std::string plain = "{\"dataset\":" + json(dataset).dump() + ",\"key\":\"" + base64url_encode(release->key.key.span()) +
                      "\",\"version\":" + std::to_string(release->key.version) + "}";
  const bool rsa = attested->tee_key->type() == crypto::KeyType::kRsa;
  auto jwe = kbs::jwe_encrypt(as_bytes(plain), *attested->tee_key, rsa ? kbs::KeyWrap::kRsaOaep256 : kbs::KeyWrap::kEcdhEsA256kw);
  OPENSSL_cleanse(plain.data(), plain.size());
  if (!jwe) {
    rec.reason = "resource " + path + ": JWE: " + jwe.error().message;
    return deny(500, std::move(rec));
  }
  rec.result = "released";
  rec.reason = "resource " + path + ": key version " + std::to_string(release->key.version) + " of '" + dataset + "' to job '" +
               attested->manifest.job_id + "' of user '" + release->user + "'" +
               (attested->report.sim ? " on SIM evidence (not confidential hardware)" : "");
  if (!record(std::move(rec))) return error_response(500);
  metrics.release();
  HttpResponse res;
  res.body = jwe->dump();
  return res;
}

// GET /kbs/v0/resource/tresor-step/<JOB.STEP>/roster: the step's roster (docs/formats.md §13) as
// a JWE to the session's tee-pubkey, for a VM that claimed ranks of that step when it attested
// (docs/protocol.md §13). 503 while ranks are unclaimed (the VM polls); those answers are not
// decisions and are not audited.
HttpResponse Service::Impl::step_roster(const Attested& attested, const std::string& path, audit::Record rec) {
  constexpr std::string_view prefix = "tresor-step/", suffix = "/roster";
  const std::string step = path.size() > prefix.size() + suffix.size() && path.ends_with(suffix) ? path.substr(prefix.size(), path.size() - prefix.size() - suffix.size()) : "";
  if (!valid_step_id(step)) {
    rec.reason = "resource " + path + ": not a step roster path (tresor-step/<JOB.STEP>/roster)";
    return deny(404, std::move(rec));
  }
  if (!attested.link || attested.link->step != step) {
    rec.reason = "resource " + path + ": this VM of job '" + attested.manifest.job_id + "' claimed no ranks of step " + step + " when it attested";
    return deny(403, std::move(rec));
  }
  // As at every release, the user and the manifest are checked again (revoked or expired since).
  const std::time_t t = now();
  std::vector<std::string> problems;
  if (attested.manifest.expires_at <= t) problems.push_back("manifest: expired at " + std::to_string(attested.manifest.expires_at));
  auto user = store.user_by_identity(attested.manifest.user.to_string());
  if (!user) return error_response(500);
  if (!user->has_value() || (*user)->revoked) problems.push_back("user: '" + attested.user + "' is revoked or no longer registered");
  if (!problems.empty()) {
    rec.reason = "resource " + path + ": " + problems.front();
    return deny(403, std::move(rec));
  }
  std::string missing;
  auto text = rosters.roster(attested.job_key, step, t, missing);
  if (!text) {
    HttpResponse r;
    r.status = 503;
    r.body = problem("RosterIncomplete", "step " + step + ": rank(s) " + missing + " not yet claimed by attested VMs; retry");
    return r;
  }
  auto jwe = kbs::jwe_encrypt(as_bytes(*text), *attested.tee_key,
                              attested.tee_key->type() == crypto::KeyType::kRsa ? kbs::KeyWrap::kRsaOaep256 : kbs::KeyWrap::kEcdhEsA256kw);
  if (!jwe) {
    rec.reason = "resource " + path + ": JWE: " + jwe.error().message;
    return deny(500, std::move(rec));
  }
  rec.result = "released";
  rec.reason = "resource " + path + ": the roster of step " + step + " (" + std::to_string(attested.link->size) + " ranks) to job '" +
               attested.manifest.job_id + "' of user '" + attested.user + "'" + (attested.report.sim ? " on SIM evidence (not confidential hardware)" : "");
  if (!record(std::move(rec))) return error_response(500);
  HttpResponse res;
  res.body = jwe->dump();
  return res;
}

}  // namespace tresor::broker
