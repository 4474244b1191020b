// tresor-broker end to end over real TLS on 127.0.0.1 (issue 4, item 8): the server and service
// run in this process (so the test owns the clock), the client is the one the agent uses, the
// evidence comes from the sim secure processor and is checked by the production verifier and
// policy. Every bad input gets its status and an audit record, and changes nothing else.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <thread>

#include "support/test_support.h"
#include "tresor/broker/admin.h"
#include "tresor/broker/server.h"
#include "tresor/broker/service.h"
#include "tresor/broker/store.h"
#include "tresor/kbs/client.h"
#include "tresor/kbs/jose.h"
#include "tresor/kbs/session.h"
#include "tresor/manifest.h"
#include "tresor/roster.h"
#include "tresor/snp/sim.h"

namespace tresor::broker {
namespace {

using json = nlohmann::json;
using tresor::testing::FailsWith;
using tresor::testing::run_command;
using tresor::testing::TempDir;

constexpr const char* kDataset = "dhz/ccta-2024";

// What every test shares: a TLS certificate for 127.0.0.1 and a sim root (both slow to make).
struct Shared {
  TempDir dir;
  std::string cert, key, sim;
  Shared() {
    cert = dir.file("tls.crt");
    key = dir.file("tls.key");
    auto r = run_command({"/usr/bin/openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                          "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=tresor-broker-test", "-addext",
                          "subjectAltName=IP:127.0.0.1"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    sim = dir.file("sim");
    snp::sim::InitOptions o;
    o.rsa_bits = 2048;  // the chain's shape matters here, not its strength
    EXPECT_TRUE(snp::sim::init(sim, o));
  }
};
Shared& shared() {
  static Shared s;
  return s;
}

std::array<std::byte, 48> measurement() {
  std::array<std::byte, 48> m{};
  for (size_t i = 0; i < m.size(); ++i) m[i] = std::byte(0xA0 + i);
  return m;
}

std::string policy(const std::string& extra = "", int min_snp = 8) {
  return R"({"attestation": {"measurements": [")" + to_hex(measurement()) +
         R"("], "min_tcb": {"bootloader": 3, "tee": 0, "snp": )" + std::to_string(min_snp) +
         R"(, "microcode": 115}, "allow_smt": true, "products": ["Sim"]})" + extra + "}";
}

// A broker on 127.0.0.1 (any port) over a fresh store, with a clock the test can move.
struct Broker {
  TempDir dir;
  Config config;
  std::optional<Store> store;
  std::unique_ptr<Service> service;
  std::unique_ptr<Admin> admin;
  std::unique_ptr<Server> server;
  std::thread thread;
  std::atomic<std::time_t> skew{0};
  Identity alice = *Identity::generate();
  Bytes key = tresor::testing::pattern_bytes(kDataKeySize, 7);
  snp::sim::SecureProcessor sp = *snp::sim::SecureProcessor::load(shared().sim);

  explicit Broker(bool trust_sim = true, uint32_t max_body = 64 * 1024) {
    config.address = "127.0.0.1";
    config.port = 0;
    config.tls_certificate = shared().cert;
    config.tls_private_key = shared().key;
    config.store_path = dir.file("broker.db");
    config.sim_trust_dir = trust_sim ? shared().sim : "";
    config.max_body_bytes = max_body;
    config.request_timeout_ms = 2000;
    config.worker_threads = 4;
    config.admin_socket = dir.file("admin.sock");
    store.emplace(*Store::open(config.store_path, tresor::testing::pattern_bytes(kMasterKeySize, 1)));
    EXPECT_TRUE(store->add_dataset(kDataset));
    EXPECT_TRUE(store->add_key(kDataset, key));
    EXPECT_TRUE(store->add_user("alice", alice.recipient().to_string()));
    EXPECT_TRUE(store->grant("alice", kDataset));
    EXPECT_TRUE(store->set_policy(kDataset, policy()));
    auto svc = Service::create(config, *store, [this] { return std::time(nullptr) + skew.load(); });
    EXPECT_TRUE(svc) << svc.error().message;
    service = std::move(*svc);
    admin = std::make_unique<Admin>(*store);
    auto srv = Server::create(config, *service, admin.get());
    EXPECT_TRUE(srv) << srv.error().message;
    server = std::move(*srv);
    thread = std::thread([this] { server->run(); });
  }
  ~Broker() {
    server->stop();
    thread.join();
    service->shutdown();
  }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(server->port()); }
  std::unique_ptr<kbs::Client> client() const {
    auto c = kbs::Client::create({.url = url(), .ca_file = shared().cert, .timeout = std::chrono::milliseconds(5000)});
    EXPECT_TRUE(c) << c.error().message;
    return std::move(*c);
  }
  size_t audit_count() const { return store->audit_records()->size(); }
  audit::Record last_audit() const { return store->audit_records()->back(); }
};

// A job: its signed manifest, and how its VM's evidence is made. Tests spoil one piece at a time.
struct Job {
  Manifest manifest;
  snp::sim::ReportParams params;
  std::optional<std::array<std::byte, 64>> report_data_override;
  std::optional<std::array<std::byte, 32>> host_data_override;

  explicit Job(const Broker& b) {
    manifest.job_id = "4242";
    manifest.user = b.alice.recipient();
    manifest.datasets = {kDataset};
    manifest.image_measurement = measurement();
    manifest.output_recipients = {b.alice.recipient()};
    manifest.expires_at = std::time(nullptr) + 3600;
    EXPECT_TRUE(sign_manifest(manifest, b.alice));
    params.measurement = measurement();
  }
  std::string manifest_text() const { return *manifest_json(manifest, true); }
  kbs::EvidenceSource evidence(const Broker& b) {
    return [this, &b](const std::array<std::byte, 64>& rd) -> Result<kbs::Evidence> {
      snp::sim::ReportParams p = params;
      p.report_data = report_data_override.value_or(rd);
      p.host_data = host_data_override.value_or(*manifest_digest(manifest));
      auto report = b.sp.sign_report(p);
      if (!report) return std::unexpected(report.error());
      return kbs::Evidence{Bytes(report->begin(), report->end()), b.sp.vcek_pem()};
    };
  }
};

// One refused step: the status it got and the audit record it left.
::testing::AssertionResult refused(const Broker& b, const Error& e, ErrorCode want, size_t audit_before, const std::string& reason) {
  if (e.code != want) {
    return ::testing::AssertionFailure() << "got " << error_code_name(e.code) << " (" << e.message << "), want " << error_code_name(want);
  }
  if (b.audit_count() != audit_before + 1) {
    return ::testing::AssertionFailure() << "audit records: " << b.audit_count() << ", want " << audit_before + 1;
  }
  const auto last = b.last_audit();
  if (last.result != "denied" || last.reason.find(reason) == std::string::npos) {
    return ::testing::AssertionFailure() << "last audit record is " << last.result << ": " << last.reason << "\nwant it to name: " << reason;
  }
  if (e.message.find("HOST_DATA") != std::string::npos || e.message.find("MEASUREMENT") != std::string::npos) {
    return ::testing::AssertionFailure() << "the client saw decision detail: " << e.message;
  }
  return ::testing::AssertionSuccess();
}

TEST(BrokerServer, FullFlowWithSimEvidenceReleasesTheKeyAndAuditsIt) {
  Broker b;
  Job job(b);
  auto c = b.client();
  auto session = kbs::attest(*c, job.manifest_text(), job.evidence(b));
  ASSERT_TRUE(session) << session.error().message;
  EXPECT_EQ(std::count(session->token.begin(), session->token.end(), '.'), 2) << "a JWT has three parts";
  auto key = kbs::fetch_dataset_key(*c, *session, kDataset);
  ASSERT_TRUE(key) << key.error().message;
  EXPECT_EQ(key->version, 1u);
  EXPECT_EQ(Bytes(key->key.span().begin(), key->key.span().end()), b.key);
  // A rotated key is the new latest; the old version stays available for old files.
  ASSERT_TRUE(b.store->add_key(kDataset, tresor::testing::pattern_bytes(kDataKeySize, 8)));
  EXPECT_EQ(kbs::fetch_dataset_key(*c, *session, kDataset)->version, 2u);
  EXPECT_EQ(kbs::fetch_dataset_key(*c, *session, kDataset, "1")->version, 1u);

  auto records = *b.store->audit_records();
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[0].result, "attested");
  EXPECT_EQ(records[1].result, "released");
  EXPECT_EQ(records[1].dataset, kDataset);
  EXPECT_EQ(records[1].user, b.alice.recipient().to_string());
  EXPECT_EQ(records[1].measurement, to_hex(measurement()));
  EXPECT_TRUE(records[1].sim) << "releases on sim evidence are marked";
  EXPECT_NE(records[1].reason.find("SIM evidence"), std::string::npos);
  EXPECT_TRUE(audit::verify_chain(records));

  auto health = c->request("GET", "/healthz");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  auto metrics = c->request("GET", "/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("tresor_broker_releases_total 3"), std::string::npos) << metrics->body;
  EXPECT_NE(metrics->body.find("tresor_broker_request_duration_seconds_count"), std::string::npos);
  EXPECT_NE(metrics->body.find("endpoint=\"attest\",status=\"200\""), std::string::npos);
}

TEST(BrokerServer, TheTokenIsSignedByTheBrokersKey) {
  Broker b;
  Job job(b);
  auto c = b.client();
  auto session = kbs::attest(*c, job.manifest_text(), job.evidence(b));
  ASSERT_TRUE(session) << session.error().message;
  const std::string& t = session->token;
  const size_t d1 = t.find('.'), d2 = t.rfind('.');
  const Bytes claim_bytes = *base64url_decode(t.substr(d1 + 1, d2 - d1 - 1));
  auto claims = json::parse(std::string(reinterpret_cast<const char*>(claim_bytes.data()), claim_bytes.size()));
  EXPECT_EQ(claims["tresor"]["job_id"], "4242");
  EXPECT_EQ(claims["tcb-status"]["snp.sim"], true);
  auto jwk_key = kbs::key_from_jwk(json::parse(b.service->token_public_jwk()));
  ASSERT_TRUE(jwk_key);
  auto sig = base64url_decode(t.substr(d2 + 1));
  EXPECT_TRUE(crypto::verify(*jwk_key, as_bytes(t.substr(0, d2)), *sig));
  std::string forged = t.substr(0, d2);
  forged[d1 + 5] ^= 1;
  EXPECT_FALSE(crypto::verify(*jwk_key, as_bytes(forged), *sig));
}

TEST(BrokerServer, BadRequestsAreRefusedWithTheirStatusAndAnAuditRecord) {
  Broker b;
  auto c = b.client();
  struct Case {
    const char* name;
    std::string body;
    int status;
    const char* reason;
  };
  const std::vector<Case> cases = {
      {"malformed JSON", "{\"version\": ", 401, "not valid JSON"},
      {"wrong protocol version", R"({"version":"0.1.0","tee":"snp"})", 401, "version \"0.1.0\" is not supported"},
      {"unknown tee", R"({"version":"0.4.0","tee":"tdx"})", 401, "tee \"tdx\" is not supported"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.name);
    const size_t before = b.audit_count();
    auto r = c->request("POST", "/kbs/v0/auth", k.body);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, k.status);
    EXPECT_EQ(b.audit_count(), before + 1);
    EXPECT_NE(b.last_audit().reason.find(k.reason), std::string::npos) << b.last_audit().reason;
  }
  // Malformed Attestation JSON: 400 naming the problem (it is the client's own input).
  ASSERT_TRUE(c->auth());
  const size_t before = b.audit_count();
  auto r = c->request("POST", "/kbs/v0/attest", R"({"runtime-data": 7})");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_NE(r->body.find("\\\"runtime-data\\\" must be an object"), std::string::npos) << r->body;
  EXPECT_EQ(b.audit_count(), before + 1);
  // Unknown endpoint and wrong method.
  EXPECT_EQ(c->request("GET", "/kbs/v0/nothing")->status, 404);
  EXPECT_EQ(c->request("GET", "/kbs/v0/auth")->status, 405);
}

TEST(BrokerServer, OversizedBodyIsRefusedWithoutReadingIt) {
  Broker b(true, 4096);
  auto c = b.client();
  const size_t before = b.audit_count();
  auto r = c->request("POST", "/kbs/v0/attest", std::string(5000, 'x'));
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(b.audit_count(), before + 1);
  EXPECT_NE(b.last_audit().reason.find("body over the limit"), std::string::npos) << b.last_audit().reason;
  // The service goes on: a new connection works.
  EXPECT_EQ(c->request("GET", "/healthz")->status, 200);
}

TEST(BrokerServer, AttestationFailuresAreUnauthorizedAndNameTheCheckInTheAuditLogOnly) {
  struct Case {
    const char* name;
    std::function<void(Broker&, Job&)> spoil;
    const char* reason;
  };
  const std::vector<Case> cases = {
      {"REPORT_DATA mismatch", [](Broker&, Job& j) { j.report_data_override = std::array<std::byte, 64>{}; },
       "REPORT_DATA does not bind"},
      {"HOST_DATA mismatch", [](Broker&, Job& j) { j.host_data_override = std::array<std::byte, 32>{std::byte{1}}; },
       "HOST_DATA is 01"},
      {"forged manifest", [](Broker&, Job& j) { j.manifest.job_id = "4243"; }, "manifest: "},
      {"expired manifest", [](Broker& b, Job&) { b.skew = 7200; }, "manifest: "},
      {"image differs from the manifest", [](Broker&, Job& j) { j.params.measurement[0] ^= std::byte{1}; }, "the manifest names image"},
      {"revoked user", [](Broker& b, Job&) { ASSERT_TRUE(b.store->revoke_user("alice")); }, "'alice' is revoked"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.name);
    Broker fresh;
    Job job(fresh);
    k.spoil(fresh, job);
    auto c = fresh.client();
    const size_t before = fresh.audit_count();
    auto s = kbs::attest(*c, job.manifest_text(), job.evidence(fresh));
    ASSERT_FALSE(s);
    EXPECT_TRUE(refused(fresh, s.error(), ErrorCode::kAuth, before, k.reason));
    // Nothing changed: the session is dead, the key still the only one.
    EXPECT_EQ(*fresh.store->key_versions(kDataset), std::vector<uint32_t>{1});
    EXPECT_TRUE(FailsWith(c->resource(std::string(kDataset) + "/latest"), ErrorCode::kAuth));
  }
}

TEST(BrokerServer, ReplayedNonceAndExpiredSessionAreUnauthorized) {
  Broker b;
  Job job(b);
  auto c = b.client();
  ASSERT_TRUE(kbs::attest(*c, job.manifest_text(), job.evidence(b)));
  // Replay: the same Attestation again on the same session.
  auto nonce_session = c->session_id();
  size_t before = b.audit_count();
  auto again = c->request("POST", "/kbs/v0/attest", "{}");
  ASSERT_TRUE(again);
  EXPECT_EQ(again->status, 401);
  EXPECT_EQ(b.audit_count(), before + 1);
  EXPECT_NE(b.last_audit().reason.find("already attested"), std::string::npos) << b.last_audit().reason;

  // A session whose five minutes have passed: attest and resource both refuse.
  auto c2 = b.client();
  auto nonce = c2->auth();
  ASSERT_TRUE(nonce);
  b.skew = kbs::kSessionLifetime + 1;
  before = b.audit_count();
  auto late = c2->request("POST", "/kbs/v0/attest", "{}");
  EXPECT_EQ(late->status, 401);
  EXPECT_NE(b.last_audit().reason.find("expired"), std::string::npos) << b.last_audit().reason;
  EXPECT_TRUE(FailsWith(c->resource(std::string(kDataset) + "/latest"), ErrorCode::kAuth));
  EXPECT_EQ(b.audit_count(), before + 2);
}

TEST(BrokerServer, ReleaseDenialsAreForbiddenOrNotFound) {
  struct Case {
    const char* name;
    std::function<void(Broker&, Job&)> spoil;
    std::string path;
    ErrorCode code;
    const char* reason;
  };
  const std::string latest = std::string(kDataset) + "/latest";
  const std::vector<Case> cases = {
      {"measurement not allowed", [](Broker&, Job& j) {
         j.params.measurement[47] ^= std::byte{1};
         j.manifest.image_measurement = j.params.measurement;
       }, latest, ErrorCode::kPolicy, "MEASUREMENT"},
      {"DEBUG set", [](Broker&, Job& j) { j.params.policy |= 1ull << 19; }, latest, ErrorCode::kPolicy, "DEBUG"},
      {"TCB too low", [](Broker& b, Job&) { ASSERT_TRUE(b.store->set_policy(kDataset, policy("", 9))); }, latest, ErrorCode::kPolicy, "snp"},
      {"no grant", [](Broker& b, Job&) { ASSERT_TRUE(b.store->revoke_grant("alice", kDataset)); }, latest, ErrorCode::kPolicy,
       "holds no grant"},
      {"dataset not in the manifest", [](Broker& b, Job&) {
         ASSERT_TRUE(b.store->add_dataset("dhz/other"));
         ASSERT_TRUE(b.store->add_key("dhz/other", tresor::testing::pattern_bytes(32, 9)));
       }, "dhz/other/latest", ErrorCode::kPolicy, "not among the job's datasets"},
      {"policy expired", [](Broker& b, Job&) { ASSERT_TRUE(b.store->set_policy(kDataset, policy(R"(, "expires_at": 1000)"))); }, latest,
       ErrorCode::kPolicy, "expired at 1000"},
      {"unknown resource", [](Broker&, Job&) {}, "dhz/nothing-here/latest", ErrorCode::kPolicy, "not registered"},
      {"not a key path", [](Broker&, Job&) {}, "dhz/ccta-2024/pem", ErrorCode::kNoMatchingKey, "not a dataset key path"},
      {"no such version", [](Broker&, Job&) {}, "dhz/ccta-2024/7", ErrorCode::kNoMatchingKey, "no key version 7"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.name);
    Broker b;
    Job job(b);
    k.spoil(b, job);
    ASSERT_TRUE(sign_manifest(job.manifest, b.alice));
    auto c = b.client();
    auto s = kbs::attest(*c, job.manifest_text(), job.evidence(b));
    ASSERT_TRUE(s) << s.error().message;
    const size_t before = b.audit_count();
    auto key = c->resource(k.path);
    ASSERT_FALSE(key);
    EXPECT_TRUE(refused(b, key.error(), k.code, before, k.reason));
    EXPECT_EQ(*b.store->key_versions(kDataset), std::vector<uint32_t>{1});
  }
}

// A fresh Ed25519 link public key (claims carry only the public half).
std::array<std::byte, 32> new_link_key() {
  return *link_public_key(*crypto::Key::generate(crypto::KeyType::kEd25519));
}

// Training across machines (docs/protocol.md §13): VMs of one job claim ranks of a step with
// their link keys when they attest; the broker hands each of them the step's roster once every
// rank is claimed, and never lets a second key take a rank.
TEST(BrokerServer, StepRostersListTheLinkKeysOfTheStepsAttestedVms) {
  Broker b;
  Job job(b);
  const auto p0 = new_link_key(), p1 = new_link_key(), p2 = new_link_key();
  LinkClaim vm0{p0, "4242.0", 2, {0}, "127.0.0.1:29400"};
  LinkClaim vm1{p1, "4242.0", 2, {1}, ""};
  auto c0 = b.client(), c1 = b.client();
  auto s0 = kbs::attest(*c0, job.manifest_text(), job.evidence(b), link_claim_text(vm0));
  ASSERT_TRUE(s0) << s0.error().message;
  EXPECT_NE(b.last_audit().reason.find("ranks 0 of step 4242.0 with link key " + base64url_encode(vm0.key)), std::string::npos) << b.last_audit().reason;
  // Rank 1 has not attested: the roster is not ready, the VM is told which ranks are missing, and
  // its polls leave no audit records.
  const size_t before_polls = b.audit_count();
  auto early = kbs::fetch_step_roster(*c0, *s0, vm0, std::chrono::milliseconds(300), std::chrono::milliseconds(100));
  ASSERT_FALSE(early);
  EXPECT_EQ(early.error().code, ErrorCode::kUnavailable);
  EXPECT_NE(early.error().message.find("rank(s) 1 of 2 not yet claimed"), std::string::npos) << early.error().message;
  EXPECT_EQ(b.audit_count(), before_polls);
  // Rank 1 attests while rank 0 waits.
  std::optional<Result<std::string>> waited;
  std::thread waiter([&] { waited = kbs::fetch_step_roster(*c0, *s0, vm0, std::chrono::milliseconds(10'000), std::chrono::milliseconds(50)); });
  auto s1 = kbs::attest(*c1, job.manifest_text(), job.evidence(b), link_claim_text(vm1));
  waiter.join();
  ASSERT_TRUE(s1) << s1.error().message;
  ASSERT_TRUE(waited && *waited) << (waited ? waited->error().message : "no answer");
  auto r1 = kbs::fetch_step_roster(*c1, *s1, vm1, std::chrono::milliseconds(1000));
  ASSERT_TRUE(r1) << r1.error().message;
  EXPECT_EQ(**waited, *r1) << "every VM of the step gets the same document";
  // The VM checks that the roster lists it as it claimed (here: asked as if it had claimed another key).
  auto mismatch = kbs::fetch_step_roster(*c1, *s1, LinkClaim{p2, "4242.0", 2, {1}, ""}, std::chrono::milliseconds(1000));
  ASSERT_FALSE(mismatch);
  EXPECT_EQ(mismatch.error().code, ErrorCode::kAuth);
  EXPECT_NE(mismatch.error().message.find("lists another key for rank 1, which this VM claimed"), std::string::npos) << mismatch.error().message;
  auto roster = parse_roster(*r1);
  ASSERT_TRUE(roster);
  EXPECT_EQ(roster->step, "4242.0");
  EXPECT_EQ(roster->lead_host, "127.0.0.1");
  EXPECT_EQ(roster->lead_port, 29400);
  EXPECT_EQ(roster->keys, (std::vector<std::array<std::byte, 32>>{vm0.key, vm1.key}));
  EXPECT_EQ(b.last_audit().result, "released");
  EXPECT_NE(b.last_audit().reason.find("the roster of step 4242.0 (2 ranks) to job '4242'"), std::string::npos) << b.last_audit().reason;

  // The same VM attesting again (an agent's retry) keeps its ranks.
  auto again = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(vm1));
  EXPECT_TRUE(again) << again.error().message;
  // Another key for a claimed rank, another size: refused, audited, and the roster unchanged.
  size_t before = b.audit_count();
  auto thief = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{p2, "4242.0", 2, {1}, ""}));
  ASSERT_FALSE(thief);
  EXPECT_TRUE(refused(b, thief.error(), ErrorCode::kPolicy, before, "rank 1 of step 4242.0 is already claimed by another attested VM"));
  before = b.audit_count();
  auto resized = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{p2, "4242.0", 3, {2}, ""}));
  ASSERT_FALSE(resized);
  EXPECT_TRUE(refused(b, resized.error(), ErrorCode::kPolicy, before, "step 4242.0 has 2 ranks by an earlier VM's claim; this VM claims 3"));
  EXPECT_EQ(*kbs::fetch_step_roster(*c1, *s1, vm1, std::chrono::milliseconds(1000)), *r1);
  // A claim the report does not bind never enters a roster.
  before = b.audit_count();
  Job unbound(b);
  unbound.report_data_override = std::array<std::byte, 64>{};
  auto forged = kbs::attest(*b.client(), unbound.manifest_text(), unbound.evidence(b), link_claim_text(LinkClaim{p2, "4242.1", 1, {0}, "127.0.0.1:1"}));
  ASSERT_FALSE(forged);
  EXPECT_TRUE(refused(b, forged.error(), ErrorCode::kAuth, before, "REPORT_DATA does not bind"));
  // A step of another job, and a claim that is not one.
  before = b.audit_count();
  auto other_job = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{p2, "9999.0", 1, {0}, "127.0.0.1:1"}));
  ASSERT_FALSE(other_job);
  EXPECT_TRUE(refused(b, other_job.error(), ErrorCode::kAuth, before, "link claim: step 9999.0 is not a step of job 4242"));
  before = b.audit_count();
  auto junk = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), R"({"link-key":"x","step":"4242.0","size":2,"ranks":[1]})");
  ASSERT_FALSE(junk);
  EXPECT_EQ(junk.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(junk.error().message.find("additional-evidence: link claim"), std::string::npos) << junk.error().message;
  EXPECT_EQ(b.audit_count(), before + 1);
  // A VM that claimed nothing, or claimed another step, gets no roster.
  auto plain_c = b.client();
  auto plain = kbs::attest(*plain_c, job.manifest_text(), job.evidence(b));
  ASSERT_TRUE(plain);
  before = b.audit_count();
  auto nosy = kbs::fetch_step_roster(*plain_c, *plain, vm1, std::chrono::milliseconds(1000));
  ASSERT_FALSE(nosy);
  EXPECT_TRUE(refused(b, nosy.error(), ErrorCode::kPolicy, before, "claimed no ranks of step 4242.0"));
  before = b.audit_count();
  auto elsewhere = kbs::fetch_step_roster(*c0, *s0, LinkClaim{vm0.key, "4242.7", 2, {0}, "127.0.0.1:29400"}, std::chrono::milliseconds(1000));
  ASSERT_FALSE(elsewhere);
  EXPECT_TRUE(refused(b, elsewhere.error(), ErrorCode::kPolicy, before, "claimed no ranks of step 4242.7"));
  // A step id without its step part is not a step of the job.
  before = b.audit_count();
  auto bare = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{p2, "4242.", 1, {0}, "127.0.0.1:1"}));
  ASSERT_FALSE(bare);
  EXPECT_TRUE(refused(b, bare.error(), ErrorCode::kAuth, before, "step 4242. is not a step of job 4242"));
  // As every release, the roster is refused once the user is revoked.
  ASSERT_TRUE(b.store->revoke_user("alice"));
  before = b.audit_count();
  auto revoked = kbs::fetch_step_roster(*c1, *s1, vm1, std::chrono::milliseconds(1000));
  ASSERT_FALSE(revoked);
  EXPECT_TRUE(refused(b, revoked.error(), ErrorCode::kPolicy, before, "is revoked"));
  EXPECT_TRUE(audit::verify_chain(*b.store->audit_records()));
}

// A VM waiting longer than its KBS session lives is told so (and to attest again).
TEST(BrokerServer, ASessionThatEndsWhileWaitingForTheRosterIsNamed) {
  Broker b;
  Job job(b);
  const auto key = new_link_key();
  const LinkClaim claim{key, "4242.0", 2, {0}, "127.0.0.1:2"};
  auto c = b.client();
  auto s = kbs::attest(*c, job.manifest_text(), job.evidence(b), link_claim_text(claim));
  ASSERT_TRUE(s) << s.error().message;
  std::thread later([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    b.skew = kbs::kSessionLifetime + 10;  // the session's five minutes pass
  });
  auto r = kbs::fetch_step_roster(*c, *s, claim, std::chrono::milliseconds(5000), std::chrono::milliseconds(50));
  later.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kAuth);
  EXPECT_NE(r.error().message.find("ended while waiting for the step's other VMs: attest again"), std::string::npos) << r.error().message;
}

// One job cannot take every roster place of the broker: 64 steps at most.
TEST(BrokerServer, AJobHoldsAtMost64StepRosters) {
  Broker b;
  Job job(b);
  const auto key = new_link_key();
  for (int step = 0; step < 64; ++step) {
    auto s = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{key, "4242." + std::to_string(step), 1, {0}, "127.0.0.1:2"}));
    ASSERT_TRUE(s) << "step " << step << ": " << s.error().message;
  }
  const size_t before = b.audit_count();
  auto one_more = kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{key, "4242.64", 1, {0}, "127.0.0.1:2"}));
  ASSERT_FALSE(one_more);
  EXPECT_TRUE(refused(b, one_more.error(), ErrorCode::kPolicy, before, "the job already has 64 steps with rosters"));
  // A step it holds still takes its VMs' retries.
  EXPECT_TRUE(kbs::attest(*b.client(), job.manifest_text(), job.evidence(b), link_claim_text(LinkClaim{key, "4242.3", 1, {0}, "127.0.0.1:2"})));
}

// The link claim's own format (docs/protocol.md §13).
TEST(LinkClaim, MalformedClaimsAreRefusedNamingWhatIsWrong) {
  const std::string key = base64url_encode(*(*crypto::Key::generate(crypto::KeyType::kEd25519)).public_raw());
  const std::string ok = R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[0],"lead":"10.0.0.1:5"})";
  auto c = parse_link_claim(ok);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->step, "7.0");
  EXPECT_EQ(c->size, 2);
  EXPECT_EQ(c->ranks, std::vector<int>{0});
  EXPECT_EQ(c->lead, "10.0.0.1:5");
  auto back = parse_link_claim(link_claim_text(*c));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(link_claim_text(*back), link_claim_text(*c)) << "the text form reads back as itself";
  EXPECT_EQ(back->key, c->key);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[1],"lead":"10.0.0.1:5"})", "this VM does not run rank 0"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[0]})", "\"lead\" is missing"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[1,1]})", "ascend without repeats"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[2]})", "rank 2 is not in 0..1"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":0,"ranks":[0]})", "\"size\" is 0"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[]})", "non-empty array"},
      {R"({"link-key":")" + key + R"(","step":"../7","size":2,"ranks":[1]})", "\"step\" is \"../7\""},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[0],"lead":"x:5"})", "\"lead\" is \"x:5\""},
      {R"({"link-key":"AAAA","step":"7.0","size":2,"ranks":[1]})", "is 3 bytes"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[1],"rank":1})", "unknown member \"rank\""},
      {R"({"step":"7.0","size":2,"ranks":[1]})", "\"link-key\" is missing"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[0],"lead":"10.0.0.1\u0000x:5"})", "\"lead\" is"},
      {R"({"link-key":")" + key + R"(","step":"7.0","size":2,"ranks":[0],"lead":" 10.0.0.1:5"})", "\"lead\" is"},
  };
  for (const auto& [text, want] : cases) {
    auto r = parse_link_claim(text);
    ASSERT_FALSE(r) << text;
    EXPECT_NE(r.error().message.find(want), std::string::npos) << "want \"" << want << "\" in: " << r.error().message;
  }
}

TEST(BrokerServer, SimEvidenceIsRefusedWithoutSimTrust) {
  Broker b(/*trust_sim=*/false);
  Job job(b);
  auto c = b.client();
  const size_t before = b.audit_count();
  auto s = kbs::attest(*c, job.manifest_text(), job.evidence(b));
  ASSERT_FALSE(s);
  EXPECT_TRUE(refused(b, s.error(), ErrorCode::kAuth, before, "evidence: "));
}

TEST(BrokerServer, IdleAndSlowConnectionsDoNotStopService) {
  Broker b;
  // 300 clients that connect and say nothing, and one that starts a request and stalls.
  std::vector<int> idle;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(b.server->port());
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  for (int i = 0; i < 300; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    idle.push_back(fd);
  }
  Job job(b);
  auto c = b.client();
  const auto start = std::chrono::steady_clock::now();
  auto s = kbs::attest(*c, job.manifest_text(), job.evidence(b));
  ASSERT_TRUE(s) << s.error().message;
  ASSERT_TRUE(kbs::fetch_dataset_key(*c, *s, kDataset));
  const auto took = std::chrono::steady_clock::now() - start;
  // Not a timing assertion on speed: the flow must finish before the idle clients' own deadline
  // (2 s) could have freed anything, which shows it was never queued behind them.
  EXPECT_LT(took, std::chrono::milliseconds(b.config.request_timeout_ms));
  EXPECT_GE(b.server->connections(), 300u);
  // Their deadline passes and the broker drops them.
  std::this_thread::sleep_for(std::chrono::milliseconds(b.config.request_timeout_ms + 700));
  EXPECT_LT(b.server->connections(), 10u);
  for (int fd : idle) ::close(fd);
}

std::string admin_over_socket(const std::string& path, const std::string& line) {
  return tresor::testing::unix_line_request(path, line);
}

TEST(BrokerServer, AdminSocketChecksThePeerAndAuditsChanges) {
  Broker b;
  const size_t before = b.audit_count();
  // Over the real socket as this process (the broker's own uid: allowed).
  auto added = json::parse(admin_over_socket(b.config.admin_socket,
                                             R"({"op":"dataset.import-key","dataset":"dhz/ccta-2024","key":")" +
                                                 base64url_encode(tresor::testing::pattern_bytes(32, 8)) + R"("})"));
  EXPECT_EQ(added["ok"], true) << added.dump();
  EXPECT_EQ(added["version"], 2);
  EXPECT_EQ(b.audit_count(), before + 1);
  EXPECT_NE(b.last_audit().reason.find("uid " + std::to_string(::geteuid())), std::string::npos) << b.last_audit().reason;

  // Another uid, not listed in [admin] uids, is refused by SO_PEERCRED (needs root to become it).
  if (::geteuid() == 0) {
    // Open the file-system path to everyone, so that only SO_PEERCRED stands in the way.
    ASSERT_EQ(::chmod(b.dir.path().c_str(), 0755), 0);
    ASSERT_EQ(::chmod(b.config.admin_socket.c_str(), 0666), 0);
    int pipefd[2];
    ASSERT_EQ(::pipe(pipefd), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(pipefd[0]);
      std::string reply = "setuid failed";
      if (::setgid(65534) == 0 && ::setuid(65534) == 0) {
        reply = admin_over_socket(b.config.admin_socket, R"({"op":"dataset.list"})");
      }
      (void)!::write(pipefd[1], reply.data(), reply.size());
      ::_exit(0);
    }
    ::close(pipefd[1]);
    std::string reply;
    char buf[512];
    ssize_t n;
    while ((n = ::read(pipefd[0], buf, sizeof buf)) > 0) reply.append(buf, static_cast<size_t>(n));
    ::close(pipefd[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    EXPECT_NE(reply.find("may not administer"), std::string::npos) << reply;
    EXPECT_EQ(b.audit_count(), before + 1) << "nothing was done for the refused peer";
  }

  Admin& admin = *b.admin;
  auto bad = json::parse(admin.handle(R"({"op":"policy.set","dataset":"dhz/ccta-2024","policy":{"attestation":{}}})", 0));
  EXPECT_EQ(bad["ok"], false);
  EXPECT_EQ(bad["code"], "invalid-argument");
  EXPECT_EQ(b.audit_count(), before + 1) << "a refused change is not applied";
  auto nokey = json::parse(admin.handle(R"({"op":"dataset.import-key","dataset":"dhz/ccta-2024","key":"AAAA"})", 0));
  EXPECT_EQ(nokey["ok"], false);
  EXPECT_NE(nokey["error"].get<std::string>().find("3 bytes; a dataset key is 32"), std::string::npos);
  auto wrong_type = json::parse(admin.handle(R"({"op":"dataset.import-key","dataset":"x/y","key":"AAAA","create":"yes"})", 0));
  EXPECT_EQ(wrong_type["ok"], false) << "a wrong member type is refused, not a crash";
  auto show = admin.handle(R"({"op":"dataset.show","dataset":"dhz/ccta-2024"})", 0);
  EXPECT_EQ(json::parse(show)["key_versions"], json::array({1, 2}));
  EXPECT_EQ(show.find(to_hex(b.key)), std::string::npos) << "keys never come out";
}

TEST(BrokerServer, BytesThatAreNotUtf8CannotPoisonTheAuditLog) {
  Broker b;
  auto c = b.client();
  const size_t before = b.audit_count();
  auto r = c->request("GET", "/kbs/v0/resource/dhz/\xff\xfe/latest");
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->status, 401);
  ASSERT_TRUE(c->auth());
  auto a = c->request("POST", "/kbs/v0/attest", "{\"runtime-data\": \"\xff\"}");
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_EQ(a->status, 400);
  EXPECT_TRUE(json::accept(a->body)) << "the problem detail stays valid JSON";
  // The log took both records and still reads back and verifies; the next decision is recorded.
  auto records = b.store->audit_records();
  ASSERT_TRUE(records) << records.error().message;
  EXPECT_EQ(records->size(), before + 2);
  EXPECT_NE(records->at(before).reason.find("\\xff\\xfe"), std::string::npos) << records->at(before).reason;
  EXPECT_TRUE(audit::verify_chain(*records));
  EXPECT_EQ(c->request("GET", "/kbs/v0/resource/dhz/ccta-2024/latest")->status, 401);
  EXPECT_EQ(b.audit_count(), before + 3);
}

TEST(BrokerServer, StopIsGracefulAndRunReturns) {
  auto b = std::make_unique<Broker>();
  auto c = b->client();
  ASSERT_EQ(c->request("GET", "/healthz")->status, 200);  // an idle kept-alive connection remains
  const auto start = std::chrono::steady_clock::now();
  b.reset();  // stop(), join(): returns without waiting for the idle connection's deadline
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(1500));
}

}  // namespace
}  // namespace tresor::broker
