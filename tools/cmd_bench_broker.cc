// tresor bench broker: concurrent clients running the whole KBS flow (auth → attest → resource)
// against a broker on 127.0.0.1 with real TLS and sim evidence (issue 4, item 9). The baseline,
// measured in the same run, is the same flow handed to the broker's Service directly (no TLS, no
// HTTP, no sockets) by as many threads: the ratio says what the network side costs.
// Hundreds of idle TCP connections are held open throughout (--idle) to show that they do not
// stop service to others. Client and broker share this machine's cores.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <thread>

#include "cli.h"
#include "options.h"
#include "tresor/broker/admin.h"
#include "tresor/broker/server.h"
#include "tresor/broker/service.h"
#include "tresor/broker/store.h"
#include "tresor/kbs/client.h"
#include "tresor/kbs/jose.h"
#include "tresor/snp/sim.h"

namespace tresor::cli {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
constexpr const char* kDataset = "bench/ccta";

struct Setup {
  std::string dir;
  broker::Config config;
  std::optional<broker::Store> store;
  std::optional<snp::sim::SecureProcessor> sp;
  std::optional<Identity> user;
  std::string manifest_text;
  std::array<std::byte, 32> host_data{};
  std::array<std::byte, 48> measurement{};
};

Result<void> prepare(Setup& s, unsigned clients, unsigned idle, unsigned threads) {
  char tmpl[] = "/tmp/tresor-bench-broker-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return fail(ErrorCode::kIo, "cannot create a temporary directory");
  s.dir = tmpl;
  auto& c = s.config;
  c.address = "127.0.0.1";
  c.port = 0;
  c.tls_certificate = s.dir + "/tls.crt";
  c.tls_private_key = s.dir + "/tls.key";
  c.store_path = s.dir + "/broker.db";
  c.sim_trust_dir = s.dir + "/sim";
  c.max_connections = clients + idle + 64;
  c.worker_threads = threads;
  c.max_sessions = 100000;
  c.admin_socket = s.dir + "/admin.sock";
  TRESOR_TRY(broker::write_self_signed_certificate(c.tls_certificate, c.tls_private_key, {"127.0.0.1"}, 1));
  snp::sim::InitOptions o;
  o.rsa_bits = 2048;
  TRESOR_TRY(snp::sim::init(c.sim_trust_dir, o));
  auto sp = snp::sim::SecureProcessor::load(c.sim_trust_dir);
  if (!sp) return std::unexpected(sp.error());
  s.sp.emplace(std::move(*sp));
  std::array<std::byte, broker::kMasterKeySize> master{};
  TRESOR_TRY(crypto::system_random().fill(master));
  auto store = broker::Store::open(c.store_path, master);
  if (!store) return std::unexpected(store.error());
  s.store.emplace(std::move(*store));
  auto id = Identity::generate();
  if (!id) return std::unexpected(id.error());
  s.user.emplace(std::move(*id));
  for (size_t i = 0; i < s.measurement.size(); ++i) s.measurement[i] = std::byte(i);
  std::array<std::byte, 32> key{};
  TRESOR_TRY(crypto::system_random().fill(key));
  TRESOR_TRY(s.store->add_dataset(kDataset));
  if (auto v = s.store->add_key(kDataset, key); !v) return std::unexpected(v.error());
  TRESOR_TRY(s.store->add_user("bench", s.user->recipient().to_string()));
  TRESOR_TRY(s.store->grant("bench", kDataset));
  const std::string policy = R"({"attestation": {"measurements": [")" + to_hex(s.measurement) +
                             R"("], "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}, "allow_smt": true, "products": ["Sim"]}})";
  TRESOR_TRY(s.store->set_policy(kDataset, policy));
  Manifest m;
  m.job_id = "bench";
  m.user = s.user->recipient();
  m.datasets = {kDataset};
  m.image_measurement = s.measurement;
  m.output_recipients = {s.user->recipient()};
  m.expires_at = std::time(nullptr) + 3600;
  TRESOR_TRY(sign_manifest(m, *s.user));
  auto text = manifest_json(m, true);
  if (!text) return std::unexpected(text.error());
  s.manifest_text = *text;
  auto hd = manifest_digest(m);
  if (!hd) return std::unexpected(hd.error());
  s.host_data = *hd;
  return {};
}

kbs::EvidenceSource evidence_for(const Setup& s) {
  return [&s](const std::array<std::byte, 64>& rd) -> Result<kbs::Evidence> {
    snp::sim::ReportParams p;
    p.measurement = s.measurement;
    p.host_data = s.host_data;
    p.report_data = rd;
    auto r = s.sp->sign_report(p);
    if (!r) return std::unexpected(r.error());
    return kbs::Evidence{Bytes(r->begin(), r->end()), s.sp->vcek_pem()};
  };
}

struct Tally {
  std::vector<double> latencies_ms;
  uint64_t errors = 0;
  std::string first_error;
  double client_cpu_s = 0;  // CPU time of the client threads (CLOCK_THREAD_CPUTIME_ID)
};

double thread_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5))];
}

// Runs `flow` on `threads` threads for `seconds`; returns every flow's latency and the errors.
template <typename Flow>
Tally run_load(unsigned threads, double seconds, Flow&& make_flow) {
  std::vector<Tally> per(threads);
  std::vector<std::thread> ts;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      auto flow = make_flow();
      while (Clock::now() < deadline) {
        const auto start = Clock::now();
        auto r = flow();
        if (r) {
          per[t].latencies_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
        } else {
          if (per[t].errors++ == 0) per[t].first_error = r.error().message;
        }
      }
      per[t].client_cpu_s = thread_cpu_s();
    });
  }
  for (auto& t : ts) t.join();
  Tally all;
  for (auto& p : per) {
    all.latencies_ms.insert(all.latencies_ms.end(), p.latencies_ms.begin(), p.latencies_ms.end());
    all.errors += p.errors;
    all.client_cpu_s += p.client_cpu_s;
    if (all.first_error.empty()) all.first_error = p.first_error;
  }
  return all;
}

long peak_rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.starts_with("VmHWM:")) return std::stol(line.substr(6));
  }
  return -1;
}

// The direct baseline: the same three requests handed to Service::handle, with the same client
// work (key generation, evidence signing, JWE decryption).
Result<void> direct_flow(broker::Service& svc, const Setup& s) {
  broker::HttpRequest a{.method = "POST", .target = "/kbs/v0/auth", .body = R"({"version":"0.4.0","tee":"snp"})", .cookie = "", .peer = "bench"};
  auto challenge = svc.handle(a);
  if (challenge.status != 200) return fail(ErrorCode::kUnavailable, "auth " + std::to_string(challenge.status));
  const std::string cookie = challenge.set_cookie.substr(0, challenge.set_cookie.find(';'));
  const std::string nonce = json::parse(challenge.body)["nonce"].get<std::string>();
  auto key = crypto::Key::generate(crypto::KeyType::kP256);
  if (!key) return std::unexpected(key.error());
  auto jwk = kbs::public_jwk(*key, "ECDH-ES+A256KW");
  if (!jwk) return std::unexpected(jwk.error());
  auto rd = kbs::runtime_data_binding(nonce, *jwk);
  if (!rd) return std::unexpected(rd.error());
  auto ev = evidence_for(s)(*rd);
  if (!ev) return std::unexpected(ev.error());
  const json body = {{"runtime-data", {{"nonce", nonce}, {"tee-pubkey", *jwk}}},
                     {"tee-evidence", {{"report", base64_encode(ev->report)}, {"endorsement_cert", ev->endorsement_cert_pem}}},
                     {"init-data", {{"format", "json"}, {"body", s.manifest_text}}}};
  auto att = svc.handle({.method = "POST", .target = "/kbs/v0/attest", .body = body.dump(), .cookie = cookie, .peer = "bench"});
  if (att.status != 200) return fail(ErrorCode::kUnavailable, "attest " + std::to_string(att.status));
  auto res = svc.handle({.method = "GET", .target = std::string("/kbs/v0/resource/") + kDataset + "/latest", .body = "", .cookie = cookie, .peer = "bench"});
  if (res.status != 200) return fail(ErrorCode::kUnavailable, "resource " + std::to_string(res.status));
  auto plain = kbs::jwe_decrypt(json::parse(res.body), *key);
  if (!plain) return std::unexpected(plain.error());
  return {};
}

}  // namespace

int cmd_bench_broker(int argc, char** argv) {
  po::options_description opts("Options");
  unsigned clients = 64, idle = 256, threads = broker::Config{}.worker_threads;
  double seconds = 10;
  opts.add_options()
      ("clients", po::value(&clients)->default_value(64), "concurrent clients, each running full flows back to back")
      ("seconds", po::value(&seconds)->default_value(10), "how long each measurement runs")
      ("idle", po::value(&idle)->default_value(256), "idle TCP connections held open against the broker during the run")
      ("threads", po::value(&threads)->default_value(threads), "the broker's worker threads ([limits] worker_threads)");
  po::variables_map vm;
  if (auto stop = parse_options("bench broker", "[--clients N] [--seconds S] [--idle N]", argc, argv, opts, {}, vm)) return *stop;
  if (clients == 0 || clients > 4096 || seconds <= 0 || seconds > 600 || idle > 10000 || threads == 0 || threads > 256) {
    return usage_error("bench broker", "--clients must be 1..4096, --seconds 0..600, --idle ≤ 10000, --threads 1..256");
  }

  Setup s;
  if (auto r = prepare(s, clients, idle, threads); !r) return report(r.error());
  struct Cleanup {
    std::string dir;
    ~Cleanup() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } cleanup{s.dir};
  auto svc = broker::Service::create(s.config, *s.store);
  if (!svc) return report(svc.error());
  auto server = broker::Server::create(s.config, **svc);
  if (!server) return report(server.error());
  std::thread serving([&] { (*server)->run(); });
  const std::string url = "https://127.0.0.1:" + std::to_string((*server)->port());

  // Idle connections: connected, never sending a byte (they are dropped at the request timeout
  // and reconnected by this loop, so the count stays up for the whole run).
  std::atomic<bool> stop_idle{false};
  std::atomic<size_t> idle_open{0};
  std::thread idler([&] {
    std::vector<int> fds;
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((*server)->port());
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    while (!stop_idle) {
      while (fds.size() < idle) {
        const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0 || ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
          if (fd >= 0) ::close(fd);
          break;
        }
        fds.push_back(fd);
      }
      idle_open = fds.size();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      // Drop the ones the broker closed (their deadline passed) so they are opened again.
      std::erase_if(fds, [](int fd) {
        char c;
        const ssize_t n = ::recv(fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
          ::close(fd);
          return true;
        }
        return false;
      });
    }
    for (int fd : fds) ::close(fd);
  });

  std::fprintf(stderr, "bench broker: %u clients for %.0f s over TLS 1.3 on %s, %u idle connections held open\n", clients, seconds,
               url.c_str(), idle);
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_s();
  Tally https = run_load(clients, seconds, [&] {
    auto c = kbs::Client::create({.url = url, .ca_file = s.config.tls_certificate, .timeout = std::chrono::milliseconds(10000)});
    std::shared_ptr<kbs::Client> client = c ? std::shared_ptr<kbs::Client>(std::move(*c)) : nullptr;
    return [client, &s]() -> Result<void> {
      if (!client) return fail(ErrorCode::kIo, "client setup failed");
      auto session = kbs::attest(*client, s.manifest_text, evidence_for(s));
      if (!session) return std::unexpected(session.error());
      auto key = kbs::fetch_dataset_key(*client, *session, kDataset);
      if (!key) return std::unexpected(key.error());
      return {};
    };
  });
  const double https_s = std::chrono::duration<double>(Clock::now() - t0).count();
  // The broker's own CPU: everything this process spent in the run but the client threads (the
  // idle-connection thread's share is negligible: a poll every 200 ms).
  const double broker_cpu_s = process_cpu_s() - cpu0 - https.client_cpu_s;
  const size_t idle_during = idle_open.load();
  stop_idle = true;
  idler.join();

  std::fprintf(stderr, "bench broker: baseline, the same flow handed to the service directly (%u threads)\n", clients);
  const auto t1 = Clock::now();
  Tally direct = run_load(clients, seconds, [&] { return [&]() { return direct_flow(**svc, s); }; });
  const double direct_s = std::chrono::duration<double>(Clock::now() - t1).count();

  (*server)->stop();
  serving.join();
  (*svc)->shutdown();
  auto records = s.store->audit_records();
  const bool chain_ok = records && audit::verify_chain(*records).has_value();

  const double flows = static_cast<double>(https.latencies_ms.size()) / https_s;
  const double direct_flows = static_cast<double>(direct.latencies_ms.size()) / direct_s;
  const double p50 = percentile(https.latencies_ms, 0.50), p99 = percentile(https.latencies_ms, 0.99);
  const double dp50 = percentile(direct.latencies_ms, 0.50), dp99 = percentile(direct.latencies_ms, 0.99);
  std::printf("%-28s %12s %10s %10s %8s\n", "", "flows/s", "p50 ms", "p99 ms", "errors");
  std::printf("%-28s %12.1f %10.2f %10.2f %8llu\n", "HTTPS (TLS 1.3, 127.0.0.1)", flows, p50, p99,
              static_cast<unsigned long long>(https.errors));
  std::printf("%-28s %12.1f %10.2f %10.2f %8llu\n", "service direct (baseline)", direct_flows, dp50, dp99,
              static_cast<unsigned long long>(direct.errors));
  if (!https.first_error.empty()) std::printf("first HTTPS error: %s\n", https.first_error.c_str());
  if (!direct.first_error.empty()) std::printf("first direct error: %s\n", direct.first_error.c_str());
  const double flows_done = static_cast<double>(https.latencies_ms.size());
  const double broker_ms_per_flow = flows_done > 0 ? 1000.0 * broker_cpu_s / flows_done : 0;
  const double client_ms_per_flow = flows_done > 0 ? 1000.0 * https.client_cpu_s / flows_done : 0;
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  std::printf("CPU per flow: broker %.2f ms, clients %.2f ms (sim evidence signing, key agreement, TLS); the broker alone "
              "could serve ~%.0f flows/s on %u cores\n",
              broker_ms_per_flow, client_ms_per_flow, broker_ms_per_flow > 0 ? 1000.0 * cores / broker_ms_per_flow : 0, cores);
  std::printf("audit records written: %zu, chain %s; idle connections held: %zu; peak RSS %ld KiB\n",
              records ? records->size() : 0, chain_ok ? "verifies" : "BROKEN", idle_during, peak_rss_kib());
  std::printf("RESULT broker clients=%u threads=%u seconds=%.0f flows_per_s=%.1f p50_ms=%.2f p99_ms=%.2f errors=%llu idle_connections=%zu "
              "direct_flows_per_s=%.1f ratio_vs_direct=%.3f broker_cpu_ms_per_flow=%.2f client_cpu_ms_per_flow=%.2f peak_rss_kib=%ld "
              "audit_chain=%s\n",
              clients, threads, seconds, flows, p50, p99, static_cast<unsigned long long>(https.errors), idle_during, direct_flows,
              direct_flows > 0 ? flows / direct_flows : 0.0, broker_ms_per_flow, client_ms_per_flow, peak_rss_kib(),
              chain_ok ? "ok" : "broken");
  return https.errors == 0 && direct.errors == 0 && chain_ok ? kExitOk : kExitInternal;
}

}  // namespace tresor::cli
