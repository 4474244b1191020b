// tresor-broker's configuration file: a full file parses with relative paths resolved against its
// directory; defaults apply where optional keys are absent; every mistake (bad TOML, unknown
// table or key, wrong type, out-of-range value, missing required key) is refused naming the
// key and its line.
#include "tresor/broker/config.h"

#include <gtest/gtest.h>

#include "support/test_support.h"

namespace tresor::broker {
namespace {

using tresor::testing::FailsWith;

constexpr const char* kFull = R"(# tresor-broker
[listen]
address = "::1"
port = 9443

[tls]
certificate = "tls/broker.crt"
private_key = "/etc/tresor-broker/tls.key"

[store]
path = "/var/lib/tresor-broker/broker.db"
master_key = "/etc/tresor-broker/master.key"

[attestation]
vcek_cache = "vcek"
sim_trust = "/srv/sim"

[limits]
max_body_bytes = 131072
request_timeout_ms = 2000
max_connections = 512
max_sessions = 100

[admin]
socket = "/run/tresor-broker/admin.sock"
)";

constexpr const char* kMinimal = R"(
[tls]
certificate = "/etc/tresor-broker/tls.crt"
private_key = "/etc/tresor-broker/tls.key"
[store]
path = "broker.db"
master_key = "master.key"
)";

TEST(BrokerConfig, FullFileParsesAndResolvesRelativePaths) {
  auto c = parse_config(kFull, "broker.toml", "/etc/tresor-broker");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->address, "::1");
  EXPECT_EQ(c->port, 9443);
  EXPECT_EQ(c->tls_certificate, "/etc/tresor-broker/tls/broker.crt");
  EXPECT_EQ(c->tls_private_key, "/etc/tresor-broker/tls.key");
  EXPECT_EQ(c->vcek_cache_dir, "/etc/tresor-broker/vcek");
  EXPECT_TRUE(c->sim_trusted());
  EXPECT_EQ(c->max_body_bytes, 131072u);
  EXPECT_EQ(c->request_timeout_ms, 2000u);
  EXPECT_EQ(c->max_connections, 512u);
  EXPECT_EQ(c->max_sessions, 100u);
}

TEST(BrokerConfig, DefaultsAreLoopbackAndNoSim) {
  auto c = parse_config(kMinimal, "broker.toml", "/srv/b");
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->address, "127.0.0.1");
  EXPECT_EQ(c->port, 8443);
  EXPECT_EQ(c->store_path, "/srv/b/broker.db");
  EXPECT_FALSE(c->sim_trusted());
  EXPECT_EQ(c->max_body_bytes, 64u * 1024);
}

TEST(BrokerConfig, MistakesAreNamedWithTheirLine) {
  const std::string base = kMinimal;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {base + "[listen\n", "broker.toml:8: not valid TOML"},
      {base + "[listn]\nport = 1\n", "unknown table [listn]"},
      {base + "[listen]\nprot = 8443\n", "broker.toml:9: listen.prot is not a known key (address, port)"},
      {base + "[listen]\nport = \"8443\"\n", "listen.port: port must be an integer"},
      {base + "[listen]\nport = 70000\n", "port is 70000, must be 0..65535"},
      {base + "[listen]\naddress = \"localhost\"\n", "address 'localhost' is not an IPv4 or IPv6 address"},
      {base + "[limits]\nmax_body_bytes = 10\n", "limits.max_body_bytes: the value is 10, must be 1024.."},
      {base + "[attestation]\nsim_trust = 1\n", "attestation.sim_trust: a path must be a string"},
      {"listen = 1\n" + base, "broker.toml:1: listen must be a table"},
      {"[store]\npath = \"a\"\nmaster_key = \"b\"\n", "tls.certificate is required"},
      {"[tls]\ncertificate = \"a\"\nprivate_key = \"\"\n", "tls.private_key: the path must not be empty"},
  };
  for (const auto& [text, want] : cases) {
    SCOPED_TRACE(want);
    auto c = parse_config(text, "broker.toml", "/etc");
    ASSERT_TRUE(FailsWith(c, ErrorCode::kInvalidArgument));
    EXPECT_NE(c.error().message.find(want), std::string::npos) << c.error().message;
  }
}

TEST(BrokerConfig, LoadsFromAFileBesideItsPaths) {
  tresor::testing::TempDir dir;
  const auto path = dir.file("broker.toml");
  tresor::testing::write_file(path, as_bytes(std::string_view(kMinimal)));
  auto c = load_config(path);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->master_key_path, (dir.path() / "master.key").string());
  EXPECT_TRUE(FailsWith(load_config(dir.file("missing.toml")), ErrorCode::kIo));
}

}  // namespace
}  // namespace tresor::broker
