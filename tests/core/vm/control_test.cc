// The host–guest control channel (include/tresor/vm/control.h): frames over a real socket pair
// (several senders at once, an oversized or unknown frame, a truncated one, a clean end), and
// each payload's encoding with its refusals.
#include "tresor/vm/control.h"

#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <thread>

#include "support/test_support.h"

namespace tresor::vm::control {
namespace {

using testing::FailsWith;

struct Pair {
  int fd[2];
  Pair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fd), 0); }
  ~Pair() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
  void close_end(int i) {
    ::close(fd[i]);
    fd[i] = -1;
  }
};

TEST(VmControl, FramesBothWaysAndFromSeveralThreads) {
  Pair p;
  Channel host(p.fd[0]), guest(p.fd[1]);
  ASSERT_TRUE(host.send(Type::kSignal, Bytes{std::byte{15}}));
  auto m = guest.receive();
  ASSERT_TRUE(m) << m.error().message;
  EXPECT_EQ(m->type, Type::kSignal);
  EXPECT_EQ(m->payload, Bytes{std::byte{15}});

  // Two threads send 200 frames each: every frame arrives whole (sends do not interleave).
  std::thread a([&] {
    for (int i = 0; i < 200; ++i) ASSERT_TRUE(guest.send(Type::kStdout, testing::pattern_bytes(3000, 1)));
  });
  std::thread b([&] {
    for (int i = 0; i < 200; ++i) ASSERT_TRUE(guest.send(Type::kStderr, testing::pattern_bytes(5000, 2)));
  });
  int out = 0, err = 0;
  for (int i = 0; i < 400; ++i) {
    auto f = host.receive();
    ASSERT_TRUE(f) << f.error().message;
    if (f->type == Type::kStdout) {
      EXPECT_EQ(f->payload, testing::pattern_bytes(3000, 1));
      ++out;
    } else {
      EXPECT_EQ(f->payload, testing::pattern_bytes(5000, 2));
      ++err;
    }
  }
  a.join();
  b.join();
  EXPECT_EQ(out, 200);
  EXPECT_EQ(err, 200);
}

TEST(VmControl, BadFramesAreRefused) {
  {
    Pair p;
    const std::byte unknown[] = {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{1}, std::byte{0x42}};
    ASSERT_EQ(::write(p.fd[0], unknown, sizeof unknown), 5);
    auto m = Channel(p.fd[1]).receive();
    ASSERT_FALSE(m);
    EXPECT_NE(m.error().message.find("unknown message type 0x42"), std::string::npos) << m.error().message;
  }
  {
    Pair p;
    const std::byte huge[] = {std::byte{0x7f}, std::byte{0}, std::byte{0}, std::byte{0}, std::byte{0x03}};
    ASSERT_EQ(::write(p.fd[0], huge, sizeof huge), 5);
    EXPECT_TRUE(FailsWith(Channel(p.fd[1]).receive(), ErrorCode::kMalformed));
  }
  {
    Pair p;
    const std::byte partial[] = {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{9}, std::byte{0x03}, std::byte{1}};
    ASSERT_EQ(::write(p.fd[0], partial, sizeof partial), 6);
    p.close_end(0);
    EXPECT_TRUE(FailsWith(Channel(p.fd[1]).receive(), ErrorCode::kTruncated));
  }
  {
    Pair p;
    p.close_end(0);
    EXPECT_TRUE(FailsWith(Channel(p.fd[1]).receive(), ErrorCode::kUnavailable));
  }
  Pair p;
  EXPECT_TRUE(FailsWith(Channel(p.fd[0]).send(Type::kStdout, Bytes(kMaxPayload + 1)), ErrorCode::kInvalidArgument));
}

TEST(VmControl, StartMessage) {
  Start s;
  s.manifest_env = "eyJq";
  s.command = {"/bin/sh", "-c", "echo hi"};
  s.script = "#!/bin/sh\ntrue\n";
  s.env = {{"SLURM_JOB_ID", "42"}, {"HOME", "/home/alice"}};
  s.broker_url = "https://127.0.0.1:8443";
  s.broker_ca_pem = "-----BEGIN CERTIFICATE-----\n…";
  s.datasets = {"dhz/ccta-2024"};
  s.evidence = "sev-guest";
  auto back = decode_start(encode_start(s));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->command, s.command);
  EXPECT_EQ(back->script, s.script);
  EXPECT_EQ(back->env, s.env);
  EXPECT_EQ(back->datasets, s.datasets);
  EXPECT_EQ(back->evidence, "sev-guest");

  auto refuse = [](std::string text, const std::string& want) {
    auto r = decode_start(as_bytes(text));
    if (r) return ::testing::AssertionFailure() << "accepted " << text;
    if (r.error().message.find(want) == std::string::npos) return ::testing::AssertionFailure() << r.error().message;
    return ::testing::AssertionSuccess();
  };
  std::string good(reinterpret_cast<const char*>(encode_start(s).data()), encode_start(s).size());
  std::string v2 = good;
  v2.replace(v2.find("\"version\":1"), 11, "\"version\":2");
  EXPECT_TRUE(refuse(v2, "version 2 (this agent speaks 1)"));
  std::string extra = good;
  extra.insert(1, "\"shell\":true,");
  EXPECT_TRUE(refuse(extra, "unknown member \"shell\""));
  std::string no_cmd = good;
  no_cmd.replace(no_cmd.find("\"command\":["), std::string("\"command\":[\"/bin/sh\",\"-c\",\"echo hi\"]").size(), "\"command\":[]");
  EXPECT_TRUE(refuse(no_cmd, "the command is empty"));
  std::string wrong = good;
  wrong.replace(wrong.find("\"datasets\":[\"dhz/ccta-2024\"]"), std::string("\"datasets\":[\"dhz/ccta-2024\"]").size(), "\"datasets\":\"x\"");
  EXPECT_TRUE(refuse(wrong, "wrong type"));
  EXPECT_TRUE(refuse("[]", "object"));
}

TEST(VmControl, EvidenceExitAndConnectionPayloads) {
  kbs::Evidence e{testing::pattern_bytes(1184, 4), "-----BEGIN CERTIFICATE-----\nMII…\n"};
  auto back = decode_evidence(encode_evidence(e));
  ASSERT_TRUE(back);
  EXPECT_EQ(back->report, e.report);
  EXPECT_EQ(back->endorsement_cert_pem, e.endorsement_cert_pem);
  Bytes cut = encode_evidence(e);
  cut.resize(100);
  EXPECT_TRUE(FailsWith(decode_evidence(cut), ErrorCode::kMalformed));

  // Exit codes and deaths by signal round-trip as waitpid statuses.
  for (int status : {0, 3 << 8, 255 << 8, SIGTERM, SIGKILL}) {
    auto s = decode_exit(encode_exit(status));
    ASSERT_TRUE(s);
    EXPECT_EQ(*s, status);
  }
  EXPECT_TRUE(WIFSIGNALED(*decode_exit(encode_exit(SIGKILL))));
  EXPECT_TRUE(FailsWith(decode_exit(Bytes{std::byte{2}, std::byte{0}}), ErrorCode::kMalformed));
  EXPECT_TRUE(FailsWith(decode_exit(Bytes{std::byte{1}, std::byte{0}}), ErrorCode::kMalformed));
  EXPECT_TRUE(FailsWith(decode_exit(Bytes{std::byte{0}}), ErrorCode::kMalformed));

  const Bytes frame = encode_connection(7, testing::pattern_bytes(10, 5));
  auto c = decode_connection(frame);  // a view into frame
  ASSERT_TRUE(c);
  EXPECT_EQ(c->first, 7u);
  EXPECT_EQ(Bytes(c->second.begin(), c->second.end()), testing::pattern_bytes(10, 5));
  EXPECT_TRUE(FailsWith(decode_connection(Bytes(3)), ErrorCode::kMalformed));
}

// Only sealed files, only below the output directory (docs/protocol.md §12, outputs).
TEST(VmControl, OutputNames) {
  auto ok = validate_output_name("a/b/r.txt.sealed");
  ASSERT_TRUE(ok) << ok.error().message;
  EXPECT_EQ(*ok, (std::vector<std::string>{"a", "b", "r.txt.sealed"}));
  EXPECT_TRUE(validate_output_name("..hidden.sealed"));  // a name that starts with dots is still a name
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "must be 1..4096 bytes"},
      {std::string(4097, 'a'), "must be 1..4096 bytes"},
      {"/etc/passwd.sealed", "must be relative"},
      {"r.txt", "must name a sealed file"},
      {"a/.sealed", "must name a sealed file"},
      {"../r.sealed", "'.' or '..'"},
      {"a/./r.sealed", "'.' or '..'"},
      {"a//r.sealed", "empty or over-long"},
      {std::string(256, 'x') + ".sealed", "empty or over-long"},
      {"a\nb.sealed", "control character"},
      {"1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17.sealed", "16 directories"},
  };
  for (const auto& [name, why] : bad) {
    auto r = validate_output_name(name);
    ASSERT_FALSE(r) << name;
    EXPECT_EQ(r.error().code, ErrorCode::kMalformed);
    EXPECT_NE(r.error().message.find(why), std::string::npos) << r.error().message;
  }
  // The name is shown without its control characters.
  EXPECT_EQ(validate_output_name("a\x1b[2Jb.sealed").error().message.find('\x1b'), std::string::npos);
}

}  // namespace
}  // namespace tresor::vm::control
