// The tresor-broker binary as an operator runs it (issue 4, items 1, 4, 5 and 8): --init, start,
// `tresor admin` over the admin socket, SIGTERM, and crash safety — kill -9 in the middle of a
// burst of key registrations and audited requests, restart, and nothing that was acknowledged is
// lost and the audit chain verifies. Then an edited audit row is caught by `tresor admin audit
// verify`.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "support/test_support.h"
#include "tresor/encoding.h"
#include "tresor/kbs/client.h"

namespace tresor {
namespace {

using json = nlohmann::json;
using tresor::testing::run_command;
using tresor::testing::run_tresor;
using tresor::testing::TempDir;

// A running tresor-broker process; its port is read from the line it prints at start.
class Daemon {
 public:
  explicit Daemon(const std::string& config) : process_({TRESOR_BROKER_BIN, "--config", config}) {
    port_ = tresor::testing::port_in(process_.first_line());
    EXPECT_GT(port_, 0) << "tresor-broker printed: " << process_.first_line();
  }
  int port() const { return port_; }
  int kill(int sig) { return process_.kill(sig); }

 private:
  tresor::testing::Background process_;
  int port_ = 0;
};

// One admin request on the socket; "" when the broker died before answering.
std::string admin(const std::string& sock, const json& req) { return tresor::testing::unix_line_request(sock, req.dump()); }

struct Fixture {
  TempDir dir;
  std::string root = dir.file("broker");
  std::string config = root + "/broker.toml";
  std::string sock = root + "/admin.sock";
  Fixture() {
    auto r = run_command({TRESOR_BROKER_BIN, "--init", root, "--port", "0"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  tresor::testing::CommandResult cli(std::vector<std::string> args) {
    args.insert(args.begin(), {"admin", "--socket", sock});
    return run_tresor(args);
  }
};

// A broker that trusts a fresh sim root (tests only) and has user alice; her identity file.
struct SimBroker {
  std::string sim, root, sock, identity, recipient;
  std::unique_ptr<Daemon> daemon;
  explicit SimBroker(Fixture& f) : sim(f.dir.file("sim")), root(f.dir.file("broker2")), sock(root + "/admin.sock"), identity(f.dir.file("alice.identity")) {
    EXPECT_EQ(run_tresor({"sim", "init", sim, "--rsa-bits", "2048"}).exit_code, 0);
    auto init = run_command({TRESOR_BROKER_BIN, "--init", root, "--port", "0", "--sim-trust", sim});
    EXPECT_EQ(init.exit_code, 0) << init.err;
    daemon = std::make_unique<Daemon>(root + "/broker.toml");
    auto kg = run_tresor({"keygen", "-o", identity});
    EXPECT_EQ(kg.exit_code, 0) << kg.err;
    recipient = kg.out.substr(0, kg.out.find('\n'));
    EXPECT_EQ(admin({"user", "add", "alice", recipient}).exit_code, 0);
  }
  std::string url() const { return "https://127.0.0.1:" + std::to_string(daemon->port()); }
  tresor::testing::CommandResult admin(std::vector<std::string> args) const {
    args.insert(args.begin(), {"admin", "--socket", sock});
    return run_tresor(args);
  }
};

TEST(BrokerDaemon, InitStartAdministerAndStopGracefully) {
  Fixture f;
  EXPECT_EQ(run_command({TRESOR_BROKER_BIN, "--config", f.config, "--check"}).exit_code, 0);
  Daemon d(f.config);
  // The data owner's side: a key made and kept locally, registered with the broker.
  auto created = f.cli({"dataset", "create", "dhz/ccta-2024", "-o", f.dir.file("ccta.key")});
  ASSERT_EQ(created.exit_code, 0) << created.err;
  auto rotated = f.cli({"dataset", "rotate", "dhz/ccta-2024", "-o", f.dir.file("ccta-2.key")});
  ASSERT_EQ(rotated.exit_code, 0) << rotated.err;
  EXPECT_NE(rotated.out.find("key version 2"), std::string::npos) << rotated.out;
  auto shown = f.cli({"dataset", "show", "dhz/ccta-2024", "--json"});
  EXPECT_EQ(json::parse(shown.out)["key_versions"], json::array({1, 2}));
  // Bad input: a clear error naming the problem, exit code 2, and nothing changed.
  auto bad = f.cli({"user", "add", "alice", "not-a-recipient"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("\"identity\""), std::string::npos) << bad.err;
  auto dup = f.cli({"dataset", "create", "dhz/ccta-2024"});
  EXPECT_EQ(dup.exit_code, 3) << dup.err;
  EXPECT_NE(dup.err.find("dhz/ccta-2024"), std::string::npos) << dup.err;
  auto verify = f.cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 0) << verify.err;
  EXPECT_NE(verify.out.find("2 records"), std::string::npos) << verify.out;
  // A second broker on the same admin socket is refused, and the first keeps its socket.
  auto second = run_command({TRESOR_BROKER_BIN, "--config", f.config});
  EXPECT_NE(second.exit_code, 0);
  EXPECT_NE(second.err.find("in use by a running broker"), std::string::npos) << second.err;
  EXPECT_EQ(f.cli({"dataset", "list"}).exit_code, 0);
  EXPECT_EQ(d.kill(SIGTERM), 0) << "SIGTERM is a graceful stop";
}

TEST(BrokerDaemon, KillNineDuringABurstLosesNothingAcknowledged) {
  Fixture f;
  std::mutex mu;
  std::map<std::string, std::vector<int>> acked_versions;  // dataset -> versions the broker confirmed
  size_t acked_denials = 0;                                // refused HTTPS requests that were answered
  {
    Daemon d(f.config);
    for (int i = 0; i < 4; ++i) ASSERT_NE(admin(f.sock, {{"op", "dataset.create"}, {"dataset", "crash/d" + std::to_string(i)}}), "");
    std::atomic<bool> stop{false};
    std::vector<std::thread> writers;
    for (int t = 0; t < 4; ++t) {
      writers.emplace_back([&, t] {
        const std::string ds = "crash/d" + std::to_string(t);
        while (!stop) {
          const std::string reply =
              admin(f.sock, {{"op", "dataset.import-key"}, {"dataset", ds}, {"key", base64url_encode(tresor::testing::pattern_bytes(32, 5))}});
          if (reply.empty()) return;  // the broker is gone
          auto j = json::parse(reply);
          std::lock_guard lock(mu);
          acked_versions[ds].push_back(j["version"].get<int>());
        }
      });
    }
    writers.emplace_back([&] {
      auto c = kbs::Client::create({.url = "https://127.0.0.1:" + std::to_string(d.port()), .ca_file = f.root + "/tls.crt"});
      if (!c) return;
      while (!stop) {
        auto r = (*c)->request("POST", "/kbs/v0/auth", R"({"version":"0.0.1","tee":"snp"})");
        if (!r) return;
        if (r->status == 401) {
          std::lock_guard lock(mu);
          ++acked_denials;
        }
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
    EXPECT_EQ(d.kill(SIGKILL), 128 + SIGKILL);
    stop = true;
    for (auto& w : writers) w.join();
  }
  size_t acked_keys = 0;
  for (const auto& [ds, v] : acked_versions) acked_keys += v.size();
  ASSERT_GT(acked_keys, 20u) << "the burst should have done real work before the kill";
  ASSERT_GT(acked_denials, 5u);

  Daemon again(f.config);  // restarts on the same store (and removes the stale socket)
  for (const auto& [ds, versions] : acked_versions) {
    auto shown = json::parse(admin(f.sock, {{"op", "dataset.show"}, {"dataset", ds}}));
    const auto stored = shown["key_versions"].get<std::vector<int>>();
    for (int v : versions) EXPECT_NE(std::find(stored.begin(), stored.end(), v), stored.end()) << ds << " lost version " << v;
  }
  auto verify = json::parse(admin(f.sock, {{"op", "audit.verify"}}));
  ASSERT_EQ(verify["ok"], true) << verify.dump();
  // Every acknowledged change and every answered denial has its record (plus the 4 creations).
  EXPECT_GE(verify["records"].get<size_t>(), 4 + acked_keys + acked_denials);
  EXPECT_EQ(again.kill(SIGTERM), 0);
}

TEST(BrokerDaemon, AuditVerifyCatchesAnEditedRecord) {
  Fixture f;
  {
    Daemon d(f.config);
    for (const char* ds : {"a/one", "a/two", "a/three"}) ASSERT_NE(admin(f.sock, {{"op", "dataset.create"}, {"dataset", ds}}), "");
    EXPECT_EQ(d.kill(SIGTERM), 0);
  }
  // Someone with write access to the database edits the second record's text (keeping the JSON
  // valid), as an attacker hiding a decision would.
  auto edit = run_command({"/usr/bin/sqlite3", f.root + "/broker.db",
                           "UPDATE audit SET record = replace(record, 'a/two', 'a/TWO') WHERE seq = 2;"});
  ASSERT_EQ(edit.exit_code, 0) << edit.err;
  Daemon d(f.config);
  auto verify = f.cli({"audit", "verify"});
  EXPECT_EQ(verify.exit_code, 5) << verify.out << verify.err;
  EXPECT_NE(verify.err.find("audit record 2"), std::string::npos) << verify.err;
}

}  // namespace
}  // namespace tresor

namespace tresor {
namespace {

// The whole confidential path by hand, as docs/cli.md shows it: the data owner seals with a key
// that only the broker holds, the user signs a job manifest, the job (sim evidence) fetches the
// key and reads the data; a job on an unapproved image gets nothing, and a key file that exists
// is refused before anything is asked of the broker.
TEST(BrokerDaemon, CliFlowSealWithTheBrokerSignAManifestAndFetchTheKey) {
  Fixture f;
  SimBroker b(f);
  const std::string& sim = b.sim;
  const std::string& root2 = b.root;
  const std::string& sock = b.sock;
  const std::string& id = b.identity;
  const std::string& recipient = b.recipient;
  Daemon& d = *b.daemon;
  auto admin_cli = [&](std::vector<std::string> args) { return b.admin(std::move(args)); };

  const std::string plain = f.dir.file("ct.raw");
  tresor::testing::write_file(plain, tresor::testing::pattern_bytes(100000, 3));
  auto sealed = run_tresor({"seal", "--dataset", "dhz/ccta-2024", "--broker", "unix:" + sock, "-r", recipient, "-o",
                            f.dir.file("ct.sealed"), plain});
  ASSERT_EQ(sealed.exit_code, 0) << sealed.err;
  const std::string approved(96, 'a');
  tresor::testing::write_file(f.dir.file("policy.json"),
                              as_bytes(R"({"attestation": {"measurements": [")" + approved +
                                       R"("], "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}, "allow_smt": true, "products": ["Sim"]}})"));
  ASSERT_EQ(admin_cli({"policy", "set", "dhz/ccta-2024", f.dir.file("policy.json")}).exit_code, 0);
  ASSERT_EQ(admin_cli({"grant", "alice", "dhz/ccta-2024"}).exit_code, 0);
  tresor::testing::write_file(f.dir.file("job.sh"), as_bytes("#!/bin/sh\necho hi\n"));

  auto job = [&](const std::string& name, const std::string& image) {
    return run_tresor({"manifest", "create", "-i", id, "--job-id", name, "--dataset", "dhz/ccta-2024", "--image-measurement", image,
                       "--script", f.dir.file("job.sh"), "-o", f.dir.file(name + ".manifest")});
  };
  auto fetch = [&](const std::string& name, const std::string& out) {
    return run_tresor({"kbs", "get-resource", "--url", "https://127.0.0.1:" + std::to_string(d.port()), "--ca", root2 + "/tls.crt",
                       "--manifest", f.dir.file(name + ".manifest"), "--sim", sim, "--dataset", "dhz/ccta-2024", "-o", out});
  };
  ASSERT_EQ(job("1001", approved).exit_code, 0);
  auto shown = run_tresor({"manifest", "show", f.dir.file("1001.manifest")});
  EXPECT_EQ(shown.exit_code, 0) << shown.err;
  EXPECT_NE(shown.out.find("signature:         valid"), std::string::npos) << shown.out;
  auto got = fetch("1001", f.dir.file("released.key"));
  ASSERT_EQ(got.exit_code, 0) << got.err;
  EXPECT_EQ(::access(f.dir.file("released.key").c_str(), F_OK), 0);
  auto opened = run_tresor({"open", "--dataset-key-file", f.dir.file("released.key"), "--dataset", "dhz/ccta-2024", "-o",
                            f.dir.file("ct.opened"), f.dir.file("ct.sealed")});
  ASSERT_EQ(opened.exit_code, 0) << opened.err;
  EXPECT_EQ(tresor::testing::read_file(f.dir.file("ct.opened")), tresor::testing::pattern_bytes(100000, 3));

  // Another image: the broker attests it but releases nothing (exit 7, policy).
  ASSERT_EQ(job("1002", std::string(96, 'b')).exit_code, 0);
  auto denied = fetch("1002", f.dir.file("denied.key"));
  EXPECT_EQ(denied.exit_code, 7) << denied.err;
  EXPECT_NE(denied.err.find("403"), std::string::npos) << denied.err;
  EXPECT_NE(::access(f.dir.file("denied.key").c_str(), F_OK), 0) << "no key file on a denial";

  // An existing output file: refused (exit 3) before any request, so no new audit record.
  const auto before = json::parse(admin(sock, {{"op", "audit.verify"}}))["records"].get<size_t>();
  auto exists = fetch("1001", f.dir.file("released.key"));
  EXPECT_EQ(exists.exit_code, 3) << exists.err;
  EXPECT_EQ(json::parse(admin(sock, {{"op", "audit.verify"}}))["records"].get<size_t>(), before);
  EXPECT_EQ(d.kill(SIGTERM), 0);
}

// Training across machines, the agents' part by hand (docs/protocol.md §13): two "VMs" of one job
// (sim evidence) claim ranks 0 and 1 of a step with their link keys; each gets the same roster
// from the broker, listing exactly their keys; a third with another key for rank 1 is refused.
TEST(BrokerDaemon, CliFlowTwoVmsOfAStepGetTheirRoster) {
  Fixture f;
  SimBroker b(f);
  const std::string& sim = b.sim;
  const std::string& root2 = b.root;
  const std::string& id = b.identity;
  Daemon& d = *b.daemon;
  tresor::testing::write_file(f.dir.file("job.sh"), as_bytes("#!/bin/sh\necho hi\n"));
  auto made = run_tresor({"manifest", "create", "-i", id, "--job-id", "3001", "--dataset", "dhz/ccta-2024", "--image-measurement", std::string(96, 'a'),
                          "--script", f.dir.file("job.sh"), "-o", f.dir.file("job.manifest")});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  std::vector<std::string> pubs;
  for (const char* k : {"vm0.key", "vm1.key", "intruder.key"}) {
    auto r = run_tresor({"roster", "keygen", f.dir.file(k)});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    pubs.push_back(r.out.substr(0, r.out.size() - 1));
  }
  auto vm = [&](const std::string& key, const std::string& ranks, const std::string& out, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"kbs", "get-roster", "--url", "https://127.0.0.1:" + std::to_string(d.port()), "--ca", root2 + "/tls.crt", "--manifest",
                                     f.dir.file("job.manifest"), "--sim", sim, "--link-key", f.dir.file(key), "--step", "3001.0", "--size", "2", "--ranks",
                                     ranks, "-o", f.dir.file(out), "--wait", "30"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_tresor(args);
  };
  auto zero = std::async(std::launch::async, [&] { return vm("vm0.key", "0", "roster0.json", {"--lead", "127.0.0.1:29500"}); });
  auto one = vm("vm1.key", "1", "roster1.json");
  auto z = zero.get();
  ASSERT_EQ(z.exit_code, 0) << z.err;
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const Bytes r0 = tresor::testing::read_file(f.dir.file("roster0.json"));
  EXPECT_EQ(r0, tresor::testing::read_file(f.dir.file("roster1.json"))) << "both VMs hold the same document";
  auto shown = run_tresor({"roster", "show", "--json", f.dir.file("roster0.json")});
  ASSERT_EQ(shown.exit_code, 0) << shown.err;
  const auto j = json::parse(shown.out);
  EXPECT_EQ(j["step"], "3001.0");
  EXPECT_EQ(j["lead"], "127.0.0.1:29500");
  EXPECT_EQ(j["ranks"], json(std::vector<std::string>{pubs[0], pubs[1]}));
  auto intruder = vm("intruder.key", "1", "roster2.json");
  EXPECT_EQ(intruder.exit_code, 7) << intruder.err;
  EXPECT_NE(intruder.err.find("409"), std::string::npos) << intruder.err;
  EXPECT_NE(::access(f.dir.file("roster2.json").c_str(), F_OK), 0) << "no roster for the refused VM";
  auto audit = b.admin({"audit", "show"});
  EXPECT_NE(audit.out.find("rank 1 of step 3001.0 is already claimed by another attested VM"), std::string::npos) << audit.out.substr(0, 4000);
  auto bad = vm("vm0.key", "0,0", "roster3.json", {"--lead", "127.0.0.1:29500"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("ascend without repeats"), std::string::npos) << bad.err;
  EXPECT_EQ(d.kill(SIGTERM), 0);
}

}  // namespace
}  // namespace tresor
