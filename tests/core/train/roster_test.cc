// Ranks across machines (include/tresor/train/collective.h, docs/training.md §5.3): the step
// roster's format, and the TCP collective inside TLS 1.3 links pinned to the roster's link keys,
// over real sockets on 127.0.0.1 — sums bit-equal to the rank-order reference, only ciphertext on
// the wire, a flipped byte detected, impostors on either side refused and named, and two ranks
// training the same weights as one.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "support/small_case.h"
#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/train/collective.h"
#include "tresor/train/trainer.h"

namespace tresor::train {
namespace {

using Pub = std::array<std::byte, 32>;

Pub public_of(const crypto::Key& k) {
  auto p = link_public_key(k);
  EXPECT_TRUE(p) << p.error().message;
  return p ? *p : Pub{};
}

// A step of `ranks` ranks on 127.0.0.1: each rank's link key and the roster listing them.
struct Step {
  std::vector<std::shared_ptr<const crypto::Key>> keys;
  std::shared_ptr<const Roster> roster;
  std::string text;
};
Step make_step(int ranks, const std::string& step = "812.0") {
  Step s;
  std::vector<Pub> pubs;
  for (int r = 0; r < ranks; ++r) {
    auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
    EXPECT_TRUE(k);
    pubs.push_back(public_of(*k));
    s.keys.push_back(std::make_shared<const crypto::Key>(std::move(*k)));
  }
  s.text = roster_text(step, "127.0.0.1:" + std::to_string(testing::free_loopback_port()), pubs);
  auto parsed = parse_roster(s.text);
  EXPECT_TRUE(parsed) << parsed.error().message;
  s.roster = std::make_shared<const Roster>(std::move(*parsed));
  return s;
}

Rendezvous rendezvous(const Step& s, int rank, std::shared_ptr<const Roster> roster = nullptr, std::shared_ptr<const crypto::Key> key = nullptr) {
  Rendezvous rv;
  rv.rank = rank;
  rv.size = static_cast<int>(s.keys.size());
  rv.run_id = s.roster->step;
  rv.join_timeout_ms = 20'000;
  rv.io_timeout_ms = 20'000;
  rv.roster = roster ? roster : s.roster;
  rv.link_key = key ? key : s.keys[static_cast<size_t>(rank)];
  return rv;
}

template <typename F>
void on_roster_ranks(const Step& s, F&& fn) {
  std::vector<std::jthread> threads;
  for (int r = 0; r < static_cast<int>(s.keys.size()); ++r) {
    threads.emplace_back([&, r] {
      auto c = connect_tcp(rendezvous(s, r));
      ASSERT_TRUE(c) << c.error().message;
      fn(r, **c);
    });
  }
}

// ---- the roster document -------------------------------------------------------------------

TEST(StepRoster, TheDocumentRoundTripsAndItsDigestIsOfItsBytes) {
  const Step s = make_step(3);
  EXPECT_EQ(s.roster->step, "812.0");
  EXPECT_EQ(s.roster->lead_host, "127.0.0.1");
  EXPECT_NE(s.roster->lead_port, 0);
  ASSERT_EQ(s.roster->keys.size(), 3u);
  for (size_t r = 0; r < 3; ++r) EXPECT_EQ(s.roster->keys[r], public_of(*s.keys[r]));
  auto d = crypto::sha256(as_bytes(s.text));
  ASSERT_TRUE(d);
  EXPECT_EQ(s.roster->digest, *d);
  // The same members written with other spacing: a different document, a different digest.
  auto spaced = parse_roster(" " + s.text);
  ASSERT_TRUE(spaced);
  EXPECT_NE(spaced->digest, s.roster->digest);
}

TEST(StepRoster, MalformedDocumentsAreRefusedNamingWhatIsWrong) {
  const std::string key = base64url_encode(public_of(*crypto::Key::generate(crypto::KeyType::kEd25519)));
  const std::string ranks = R"("ranks":[")" + key + R"("])";
  auto doc = [&](const std::string& step, const std::string& lead, const std::string& rest) {
    return R"({"format":"tresor-step-roster","version":1,"step":)" + step + R"(,"lead":)" + lead + "," + rest + "}";
  };
  ASSERT_TRUE(parse_roster(doc(R"("1.0")", R"("10.8.0.1:29400")", ranks))) << "the well-formed document the cases below vary";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[]", "not a JSON object"},
      {doc(R"("1.0")", R"("10.8.0.1:29400")", ranks + R"(,"extra":1)"), "unknown member \"extra\""},
      {R"({"format":"tresor-step-roster","version":1,"step":"1.0",)" + ranks + "}", "\"lead\" is missing"},
      {R"({"format":"other","version":1,"step":"1.0","lead":"10.8.0.1:1",)" + ranks + "}", "\"format\" must be \"tresor-step-roster\""},
      {R"({"format":"tresor-step-roster","version":2,"step":"1.0","lead":"10.8.0.1:1",)" + ranks + "}", "this Tresor reads version 1"},
      {doc(R"("../x")", R"("10.8.0.1:29400")", ranks), "\"step\" is \"../x\""},
      {doc(R"("")", R"("10.8.0.1:29400")", ranks), "\"step\" is \"\""},
      {doc(R"("1.0")", R"("10.8.0.1")", ranks), "\"lead\" is \"10.8.0.1\""},
      {doc(R"("1.0")", R"("10.8.0.1:0")", ranks), "\"lead\" is \"10.8.0.1:0\""},
      {doc(R"("1.0")", R"("10.8.0.1:65536")", ranks), "\"lead\" is \"10.8.0.1:65536\""},
      {doc(R"("1.0")", R"("10.8.0.1:0080")", ranks), "\"lead\" is \"10.8.0.1:0080\""},
      {doc(R"("1.0")", R"("10.8.0.1:80x")", ranks), "\"lead\" is \"10.8.0.1:80x\""},
      {doc(R"("1.0")", R"("node1:80")", ranks), "\"lead\" is \"node1:80\""},
      {doc(R"("1.0")", R"(29400)", ranks), "\"lead\" must be a string"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", R"("ranks":[])"), "\"ranks\" must be an array of 1..1024"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", R"("ranks":[")" + key + R"(",7])"), "rank 1's link key must be a base64url string"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", R"("ranks":[")" + key.substr(0, 40) + R"("])"), "rank 0's link key is 30 bytes"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", R"("ranks":[")" + key + R"(","not base64!"])"), "rank 1's link key"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", ranks + "," + ranks), "appears twice"},
      {doc(R"("1.0")", R"("10.8.0.1:1")", ranks) + std::string(1, '\0') + "x", "NUL byte"},
  };
  for (const auto& [text, want] : cases) {
    auto r = parse_roster(text);
    ASSERT_FALSE(r) << text;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument) << text;
    EXPECT_NE(r.error().message.find(want), std::string::npos) << "want \"" << want << "\" in: " << r.error().message;
  }
}

TEST(StepRoster, ARendezvousThatDoesNotFitItsRosterIsRefusedBeforeAnyConnection) {
  const Step s = make_step(2);
  auto expect_refused = [](Rendezvous rv, const std::string& want) {
    auto c = connect_tcp(rv);
    ASSERT_FALSE(c) << want;
    EXPECT_EQ(c.error().code, ErrorCode::kInvalidArgument);
    EXPECT_NE(c.error().message.find(want), std::string::npos) << c.error().message;
  };
  Rendezvous rv = rendezvous(s, 1);
  rv.size = 3;
  expect_refused(rv, "the step roster lists 2 ranks, the run has 3");
  rv = rendezvous(s, 1);
  rv.run_id = "812.1";
  expect_refused(rv, "the step roster is for step 812.0, this run is 812.1");
  expect_refused(rendezvous(s, 1, nullptr, s.keys[0]), "this rank's link key (" + base64url_encode(public_of(*s.keys[0])) + ") is not the one the step roster lists for rank 1");
  rv = rendezvous(s, 1);
  rv.link_key = nullptr;
  expect_refused(rv, "a step roster and a link key go together");
  auto x = crypto::Key::generate(crypto::KeyType::kX25519);
  expect_refused(rendezvous(s, 1, nullptr, std::make_shared<const crypto::Key>(std::move(*x))), "must be an Ed25519 private key");
}

// ---- the collective over TLS ---------------------------------------------------------------

TEST(RosterCollective, SumsOverTlsEqualTheRankOrderReference) {
  const Step s = make_step(3);
  const size_t n = 100'003;  // several TLS records and socket buffers
  std::vector<std::vector<float>> out(3), bcast(3);
  std::vector<std::vector<double>> out_d(3);
  on_roster_ranks(s, [&](int r, Collective& c) {
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.size(), 3);
    std::vector<float> v = testing::normal_floats(n, static_cast<uint32_t>(r));
    ASSERT_TRUE(c.all_reduce_sum(v));
    out[static_cast<size_t>(r)] = v;
    std::vector<double> d = {1e16 * (r + 1), 1.0, static_cast<double>(r)};
    ASSERT_TRUE(c.all_reduce_sum(std::span<double>(d)));
    out_d[static_cast<size_t>(r)] = d;
    std::vector<float> b(7, static_cast<float>(r));
    ASSERT_TRUE(c.broadcast(b, 1));
    bcast[static_cast<size_t>(r)] = b;
    // A mismatch still fails on every rank, and the group goes on.
    std::vector<float> odd(r == 2 ? 4 : 5, 1.0f);
    EXPECT_FALSE(c.all_reduce_sum(odd));
    std::vector<float> one{1.0f};
    ASSERT_TRUE(c.all_reduce_sum(one));
    EXPECT_EQ(one[0], 3.0f);
  });
  std::vector<float> want(n, 0.0f);
  for (uint32_t r = 0; r < 3; ++r) {
    const auto v = testing::normal_floats(n, r);
    for (size_t i = 0; i < n; ++i) want[i] += v[i];
  }
  for (size_t r = 0; r < 3; ++r) {
    EXPECT_TRUE(out[r] == want) << "rank " << r;
    EXPECT_EQ(out_d[r], (std::vector<double>{6e16, 3.0, 3.0}));
    EXPECT_EQ(bcast[r], std::vector<float>(7, 1.0f));
  }
}

// A TCP relay between rank 1 and rank 0 that records what rank 1 sends and can flip one byte of
// it at a given offset.
class Relay {
 public:
  Relay(uint16_t to, size_t flip_at) : to_(to), flip_at_(flip_at) {
    listener_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    EXPECT_EQ(::bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(::listen(listener_, 1), 0);
    EXPECT_EQ(::getsockname(listener_, reinterpret_cast<sockaddr*>(&a), &len), 0);
    port_ = ntohs(a.sin_port);
    thread_ = std::jthread([this] { run(); });
  }
  ~Relay() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    ::close(listener_);
  }
  uint16_t port() const { return port_; }
  std::string upstream() {
    thread_.join();
    return seen_;
  }

 private:
  void run() {
    pollfd lp{listener_, POLLIN, 0};
    while (!stop_ && ::poll(&lp, 1, 50) == 0) {
    }
    if (stop_) return;
    const int a = ::accept(listener_, nullptr, nullptr);
    const int b = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    to.sin_port = htons(to_);
    while (::connect(b, reinterpret_cast<sockaddr*>(&to), sizeof to) != 0 && !stop_) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    std::array<pollfd, 2> p{pollfd{a, POLLIN, 0}, pollfd{b, POLLIN, 0}};
    std::array<char, 65536> buf;
    for (bool open = true; open && !stop_;) {
      if (::poll(p.data(), 2, 50) <= 0) continue;
      for (int i = 0; i < 2 && open; ++i) {
        if ((p[static_cast<size_t>(i)].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
        const ssize_t n = ::recv(p[static_cast<size_t>(i)].fd, buf.data(), buf.size(), 0);
        if (n <= 0) {
          open = false;
          break;
        }
        if (i == 0) {  // rank 1 → rank 0
          const size_t at = seen_.size();
          if (flip_at_ >= at && flip_at_ < at + static_cast<size_t>(n)) buf[flip_at_ - at] = static_cast<char>(buf[flip_at_ - at] ^ 0x01);
          seen_.append(buf.data(), static_cast<size_t>(n));
        }
        (void)::send(i == 0 ? b : a, buf.data(), static_cast<size_t>(n), MSG_NOSIGNAL);
      }
    }
    ::close(a);
    ::close(b);
  }
  int listener_ = -1;
  uint16_t to_, port_ = 0;
  size_t flip_at_;
  std::atomic<bool> stop_{false};
  std::string seen_;
  std::jthread thread_;
};

// Rank 1 reaches rank 0 through a relay (its roster's lead points at the relay; the document,
// and so the digest, is the real one).
std::shared_ptr<const Roster> through(const Step& s, uint16_t port) {
  auto r = std::make_shared<Roster>(*s.roster);
  r->lead_port = port;
  return r;
}

TEST(RosterCollective, OnlyCiphertextCrossesTheWire) {
  const Step s = make_step(2);
  Relay relay(s.roster->lead_port, SIZE_MAX);
  const std::vector<float> mine = testing::normal_floats(4096, 1);
  std::vector<float> got;
  {
    std::jthread zero([&] {
      auto c = connect_tcp(rendezvous(s, 0));
      ASSERT_TRUE(c) << c.error().message;
      std::vector<float> v(mine.size(), 0.0f);
      ASSERT_TRUE((*c)->all_reduce_sum(v));
    });
    auto c = connect_tcp(rendezvous(s, 1, through(s, relay.port())));
    ASSERT_TRUE(c) << c.error().message;
    got = mine;
    ASSERT_TRUE((*c)->all_reduce_sum(got));
  }
  EXPECT_EQ(got, mine) << "rank 0 added zeros";
  const std::string wire = relay.upstream();
  ASSERT_GT(wire.size(), mine.size() * sizeof(float)) << "the data went through the relay";
  // Neither the hello nor any 16 bytes of the gradient appear in what rank 1 sent.
  EXPECT_EQ(wire.find("TRDPHELO"), std::string::npos);
  for (size_t at = 0; at + 4 <= mine.size(); at += 512) {
    const std::string piece(reinterpret_cast<const char*>(mine.data() + at), 16);
    EXPECT_EQ(wire.find(piece), std::string::npos) << "plaintext of element " << at << " on the wire";
  }
}

TEST(RosterCollective, AFlippedByteOnTheWireFailsTheCall) {
  const Step s = make_step(2);
  // Past the handshake (a few kilobytes) and the hello, inside the gradient's records.
  Relay relay(s.roster->lead_port, 20'000);
  std::string error0, error1;
  {
    std::jthread zero([&] {
      auto c = connect_tcp(rendezvous(s, 0));
      ASSERT_TRUE(c) << c.error().message;
      std::vector<float> v(16384, 1.0f);
      auto r = (*c)->all_reduce_sum(v);
      ASSERT_FALSE(r) << "rank 0 summed a tampered gradient";
      EXPECT_EQ(r.error().code, ErrorCode::kAuth);
      error0 = r.error().message;
      // The link is not used again: the next call fails with the first error, sending nothing.
      auto again = (*c)->all_reduce_sum(v);
      ASSERT_FALSE(again);
      EXPECT_NE(again.error().message.find("(the link failed earlier)"), std::string::npos) << again.error().message;
    });
    auto c = connect_tcp(rendezvous(s, 1, through(s, relay.port())));
    ASSERT_TRUE(c) << c.error().message;
    std::vector<float> v(16384, 2.0f);
    auto r = (*c)->all_reduce_sum(v);
    ASSERT_FALSE(r);
    error1 = r.error().message;
  }
  EXPECT_NE(error0.find("TLS receiving from rank 1 failed"), std::string::npos) << error0;
  EXPECT_FALSE(error1.empty());
}

// A peer whose machine vanishes (a VM destroyed, a node lost) sends no FIN: the links' TCP
// keepalive notices, and the waiting rank fails naming it within seconds of Rendezvous::keepalive_s
// rather than after io_timeout_ms. Simulated by dropping every packet of the link on loopback
// (iptables, root only), so that the probes go unanswered.
TEST(RosterCollective, APeerWhoseMachineVanishesIsNamedByKeepaliveBeforeTheIoTimeout) {
  if (::geteuid() != 0 || ::access("/usr/sbin/iptables", X_OK) != 0) GTEST_SKIP() << "needs root and iptables to silence a link";
  const Step s = make_step(2);
  const std::string port = std::to_string(s.roster->lead_port);
  auto iptables = [&](const char* op) {
    return testing::run_command({"/bin/sh", "-c", std::string("iptables ") + op + " INPUT -i lo -p tcp --sport " + port + " -j DROP && iptables " + op +
                                                      " INPUT -i lo -p tcp --dport " + port + " -j DROP"});
  };
  std::atomic<bool> done{false};
  std::string error0;
  double waited_s = 0;
  {
    std::jthread one([&] {
      auto rv = rendezvous(s, 1);
      rv.keepalive_s = 1;
      auto c = connect_tcp(rv);
      ASSERT_TRUE(c) << c.error().message;
      std::vector<float> v(1024, 2.0f);
      ASSERT_TRUE((*c)->all_reduce_sum(v));
      while (!done) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // then gone without a word
    });
    auto rv = rendezvous(s, 0);
    rv.keepalive_s = 1;
    rv.io_timeout_ms = 60'000;
    auto c = connect_tcp(rv);
    ASSERT_TRUE(c) << c.error().message;
    std::vector<float> v(1024, 1.0f);
    ASSERT_TRUE((*c)->all_reduce_sum(v));
    EXPECT_EQ(v[0], 3.0f);
    const auto silenced = iptables("-I");
    ASSERT_EQ(silenced.exit_code, 0) << silenced.err;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = (*c)->all_reduce_sum(v);
    waited_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    iptables("-D");
    done = true;
    ASSERT_FALSE(r) << "rank 0 summed without rank 1";
    error0 = r.error().message;
  }
  EXPECT_NE(error0.find("rank 1 stopped answering TCP keepalive probes"), std::string::npos) << error0;
  EXPECT_LT(waited_s, 30.0) << "noticed by keepalive, not after the 60 s io timeout: " << error0;
}

TEST(RosterCollective, ARankWithAnotherKeyIsRefusedAndTheRealOnesStillJoin) {
  const Step s = make_step(3);
  std::string zero_error = "not run";
  bool zero_summed = false;
  std::jthread zero_thread([&] {
    Rendezvous rv = rendezvous(s, 0);
    rv.join_timeout_ms = 20'000;
    auto c = connect_tcp(rv);
    zero_error = c ? "" : c.error().message;
    if (!c) return;
    std::vector<float> v{1.0f};
    zero_summed = (*c)->all_reduce_sum(v) && v[0] == 6.0f;
  });
  // An impostor with the real document (so the real digest) and its own key where rank 1's is:
  // its key is in no rank's place, so rank 0 closes the link without a word.
  auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
  auto fake = std::make_shared<Roster>(*s.roster);
  fake->keys[1] = public_of(*k);
  auto impostor = connect_tcp(rendezvous(s, 1, fake, std::make_shared<const crypto::Key>(std::move(*k))));
  ASSERT_FALSE(impostor);
  EXPECT_NE(impostor.error().message.find("rank 0 at 127.0.0.1:" + std::to_string(s.roster->lead_port) + " closed its connection"), std::string::npos)
      << impostor.error().message;
  // Rank 2's key holder posing as rank 1 (a listed key in another rank's place): refused, named.
  auto as_one = std::make_shared<Roster>(*s.roster);
  as_one->keys[1] = s.roster->keys[2];
  auto swapped = connect_tcp(rendezvous(s, 1, as_one, s.keys[2]));
  ASSERT_FALSE(swapped);
  EXPECT_EQ(swapped.error().code, ErrorCode::kAuth);
  EXPECT_NE(swapped.error().message.find("refused rank 1 of 3"), std::string::npos) << swapped.error().message;
  // A rank holding another document (another digest) is refused too.
  const Step other = make_step(3);
  auto foreign_roster = std::make_shared<Roster>(*other.roster);
  foreign_roster->lead_port = s.roster->lead_port;
  foreign_roster->keys = s.roster->keys;  // the same members; only the document differs
  auto foreign = connect_tcp(rendezvous(s, 1, foreign_roster));
  ASSERT_FALSE(foreign);
  EXPECT_NE(foreign.error().message.find("refused rank 1 of 3"), std::string::npos) << foreign.error().message;
  // The real ranks 1 and 2.
  std::vector<float> two{3.0f};
  std::jthread rank2([&] {
    auto c = connect_tcp(rendezvous(s, 2));
    ASSERT_TRUE(c) << c.error().message;
    ASSERT_TRUE((*c)->all_reduce_sum(two));
  });
  auto real = connect_tcp(rendezvous(s, 1));
  ASSERT_TRUE(real) << real.error().message;
  std::vector<float> v{2.0f};
  ASSERT_TRUE((*real)->all_reduce_sum(v));
  EXPECT_EQ(v[0], 6.0f);
  rank2.join();
  EXPECT_EQ(two[0], 6.0f);
  zero_thread.join();
  EXPECT_EQ(zero_error, "");
  EXPECT_TRUE(zero_summed);
}

TEST(RosterCollective, RankZeroNamesTheRefusalsWhenItGivesUp) {
  const Step s = make_step(2);
  std::string zero_error;
  std::jthread zero([&] {
    Rendezvous rv = rendezvous(s, 0);
    rv.join_timeout_ms = 1500;
    auto c = connect_tcp(rv);
    zero_error = c ? "" : c.error().message;
  });
  auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
  const auto stranger = public_of(*k);
  auto fake = std::make_shared<Roster>(*s.roster);
  fake->keys[1] = stranger;
  Rendezvous rv = rendezvous(s, 1, fake, std::make_shared<const crypto::Key>(std::move(*k)));
  rv.join_timeout_ms = 1000;
  EXPECT_FALSE(connect_tcp(rv));
  zero.join();
  EXPECT_NE(zero_error.find("rank(s) 1 of 2 did not join"), std::string::npos) << zero_error;
  EXPECT_NE(zero_error.find("link key " + base64url_encode(stranger) + " is not in the roster (closed unanswered)"), std::string::npos) << zero_error;
}

TEST(RosterCollective, ARankZeroWithAnotherKeyGetsNothing) {
  const Step s = make_step(2);
  // Something listens on the lead address as rank 0 with a key the roster does not list there.
  auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
  auto fake = std::make_shared<Roster>(*s.roster);
  fake->keys[0] = public_of(*k);
  const auto fake_key = std::make_shared<const crypto::Key>(std::move(*k));
  std::string fake_zero_error;
  std::jthread zero([&] {
    Rendezvous rv = rendezvous(s, 0, fake, fake_key);
    rv.join_timeout_ms = 2000;
    auto c = connect_tcp(rv);
    fake_zero_error = c ? "" : c.error().message;
  });
  Rendezvous rv = rendezvous(s, 1);
  rv.join_timeout_ms = 5000;
  auto c = connect_tcp(rv);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, ErrorCode::kAuth);
  EXPECT_NE(c.error().message.find("holds link key " + base64url_encode(fake->keys[0]) + ", not the roster's key for rank 0"), std::string::npos) << c.error().message;
  EXPECT_NE(c.error().message.find("nothing was sent to it"), std::string::npos);
  zero.join();
  // The fake rank 0 never received a hello: it times out with nobody joined.
  EXPECT_NE(fake_zero_error.find("rank(s) 1 of 2 did not join"), std::string::npos) << fake_zero_error;
}

TEST(RosterCollective, JoiningFailuresNameTheLeadAddress) {
  const Step s = make_step(2);
  Rendezvous rv = rendezvous(s, 1);
  rv.join_timeout_ms = 300;
  auto orphan = connect_tcp(rv);
  ASSERT_FALSE(orphan);
  const std::string lead = "127.0.0.1:" + std::to_string(s.roster->lead_port);
  EXPECT_NE(orphan.error().message.find("rank 1 found no rank 0 at " + lead), std::string::npos) << orphan.error().message;
  // Rank 0 on a machine without the lead address.
  auto elsewhere = std::make_shared<Roster>(*s.roster);
  elsewhere->lead_host = "192.0.2.1";  // TEST-NET-1: not this machine's
  Rendezvous zero = rendezvous(s, 0, elsewhere);
  zero.join_timeout_ms = 300;
  auto z = connect_tcp(zero);
  ASSERT_FALSE(z);
  EXPECT_NE(z.error().message.find("rank 0 cannot listen on 192.0.2.1:"), std::string::npos) << z.error().message;
}

// ---- training across "machines" --------------------------------------------------------------

TEST(RosterTraining, TwoRanksOverTlsTrainTheSameWeightsAsOverPlainTcp) {
  const ct::Prepared* cp = testing::small_case();
  ASSERT_NE(cp, nullptr);
  TrainerOptions o = testing::data_parallel_options(false);
  o.bucket_elements = 500;
  auto train_on = [&](auto&& connect) {
    std::vector<std::vector<float>> weights(2);
    std::vector<std::jthread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        auto c = connect(r);
        ASSERT_TRUE(c) << c.error().message;
        auto net = UNet::create(o.model, r == 0 ? 7 : 99);
        ASSERT_TRUE(net);
        TrainerOptions ro = o;
        ro.collective = c->get();
        auto log = train_unet(*net, {cp}, {cp}, ro);
        ASSERT_TRUE(log) << log.error().message;
        weights[static_cast<size_t>(r)] = net->parameters();
      });
    }
    threads.clear();
    return weights;
  };
  const Step s = make_step(2);
  const auto tls = train_on([&](int r) { return connect_tcp(rendezvous(s, r)); });
  testing::TempDir dir;
  const auto plain = train_on([&](int r) {
    Rendezvous rv;
    rv.rank = r;
    rv.size = 2;
    rv.directory = dir.path().string();
    return connect_tcp(rv);
  });
  ASSERT_FALSE(tls[0].empty());
  EXPECT_TRUE(tls[0] == tls[1]) << "both ranks hold the same weights";
  EXPECT_TRUE(tls[0] == plain[0]) << "the transport changes no bit of the training";
  auto fresh = UNet::create(o.model, 7);
  EXPECT_FALSE(fresh->parameters() == tls[0]) << "the weights moved";
}

}  // namespace
}  // namespace tresor::train
