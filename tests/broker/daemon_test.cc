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
  const std::string sim = f.dir.file("sim");
  ASSERT_EQ(run_tresor({"sim", "init", sim, "--rsa-bits", "2048"}).exit_code, 0);
  // A broker that trusts this sim root (tests only).
  const std::string root2 = f.dir.file("broker2");
  auto init = run_command({TRESOR_BROKER_BIN, "--init", root2, "--port", "0", "--sim-trust", sim});
  ASSERT_EQ(init.exit_code, 0) << init.err;
  Daemon d(root2 + "/broker.toml");
  const std::string sock = root2 + "/admin.sock";
  auto admin_cli = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {"admin", "--socket", sock});
    return run_tresor(args);
  };
  const std::string id = f.dir.file("alice.identity");
  auto kg = run_tresor({"keygen", "-o", id});
  ASSERT_EQ(kg.exit_code, 0) << kg.err;
  std::string recipient = kg.out.substr(0, kg.out.find('\n'));
  ASSERT_EQ(admin_cli({"user", "add", "alice", recipient}).exit_code, 0);

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

}  // namespace
}  // namespace tresor
