// The CPU collective backend for ranks that are processes on one machine
// (include/tresor/train/collective.h, docs/training.md §5): TCP on 127.0.0.1, a star around rank 0.
//
// Rendezvous: rank 0 binds 127.0.0.1:0, writes {"port", "token", "size"} to the rendezvous file
// (0600, renamed into place), and accepts the others. A joining rank sends a hello — "TRDPHELO",
// u32 rank, u32 size, the 32-byte token (little-endian) — and reads one status byte (0 accepted).
// Rank 0 removes the file once every rank has joined.
//
// A call: every other rank sends a header — u32 op (1 all-reduce, 2 broadcast), u32 type (0 float,
// 1 double), u64 count, u32 root — and for an all-reduce (or a broadcast from itself) its `count`
// elements; rank 0 checks that all headers agree with its own, adds the buffers in rank order
// (0 first, each addition rounded in the element type, as the shared-memory backend does) and
// answers each rank with a status byte and, when it is 0, the result.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/train/collective.h"

namespace tresor::train {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr char kHello[8] = {'T', 'R', 'D', 'P', 'H', 'E', 'L', 'O'};
constexpr size_t kTokenSize = 32;
constexpr uint32_t kOpReduce = 1, kOpBroadcast = 2;

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// Waits until fd is ready for `events` or the deadline passes.
Result<void> wait_for(int fd, short events, Clock::time_point deadline, const std::string& peer) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return fail(ErrorCode::kIo, "collective: " + peer + " stayed silent past the timeout");
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 60'000)));
    if (r > 0) return {};
    if (r < 0 && errno != EINTR) return fail(ErrorCode::kIo, "collective: " + errno_text("poll"));
  }
}

Result<void> send_all(int fd, const void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    TRESOR_TRY(wait_for(fd, POLLOUT, deadline, peer));
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(ErrorCode::kIo, "collective: sending to " + peer + " failed (" + std::strerror(errno) + "; did it exit?)");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return {};
}

Result<void> recv_all(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    TRESOR_TRY(wait_for(fd, POLLIN, deadline, peer));
    const ssize_t r = ::recv(fd, p, n, MSG_DONTWAIT);
    if (r == 0) return fail(ErrorCode::kIo, "collective: " + peer + " closed its connection (did it exit?)");
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return fail(ErrorCode::kIo, "collective: receiving from " + peer + " failed: " + std::strerror(errno));
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return {};
}

struct Header {
  uint32_t op = 0, type = 0;
  uint64_t count = 0;
  uint32_t root = 0;
};
constexpr size_t kHeaderSize = 20;

std::array<std::byte, kHeaderSize> encode(const Header& h) {
  std::array<std::byte, kHeaderSize> b{};
  auto put = [&](size_t at, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; ++i) b[at + i] = static_cast<std::byte>(v >> (8 * i));
  };
  put(0, h.op, 4);
  put(4, h.type, 4);
  put(8, h.count, 8);
  put(16, h.root, 4);
  return b;
}
Header decode(const std::array<std::byte, kHeaderSize>& b) {
  auto get = [&](size_t at, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(b[at + i]) << (8 * i);
    return v;
  };
  return {static_cast<uint32_t>(get(0, 4)), static_cast<uint32_t>(get(4, 4)), get(8, 8), static_cast<uint32_t>(get(16, 4))};
}

std::string rank_name(size_t r) { return "rank " + std::to_string(r); }

class TcpCollective final : public Collective {
 public:
  TcpCollective(int rank, int size, int io_timeout_ms, std::vector<Fd> peers) : rank_(rank), size_(size), io_timeout_ms_(io_timeout_ms), peers_(std::move(peers)) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Result<void> all_reduce_sum(std::span<float> data) override { return call(kOpReduce, data, 0); }
  Result<void> all_reduce_sum(std::span<double> data) override { return call(kOpReduce, data, 0); }
  Result<void> broadcast(std::span<float> data, int root) override {
    if (root < 0 || root >= size_) return fail(ErrorCode::kInvalidArgument, "broadcast: root " + std::to_string(root) + " is not a rank");
    return call(kOpBroadcast, data, root);
  }

 private:
  Clock::time_point deadline() const { return Clock::now() + std::chrono::milliseconds(io_timeout_ms_); }

  template <typename T>
  Result<void> call(uint32_t op, std::span<T> data, int root) {
    const Header mine{op, std::is_same_v<T, float> ? 0u : 1u, data.size(), static_cast<uint32_t>(root)};
    const size_t bytes = data.size() * sizeof(T);
    const bool sends_data = op == kOpReduce || root == rank_;
    if (rank_ != 0) {
      const int fd = peers_[0].get();
      const auto h = encode(mine);
      TRESOR_TRY(send_all(fd, h.data(), h.size(), deadline(), "rank 0"));
      if (sends_data) TRESOR_TRY(send_all(fd, data.data(), bytes, deadline(), "rank 0"));
      uint8_t status = 1;
      TRESOR_TRY(recv_all(fd, &status, 1, deadline(), "rank 0"));
      if (status != 0) return mismatch(op);
      if (op == kOpReduce || root != rank_) TRESOR_TRY(recv_all(fd, data.data(), bytes, deadline(), "rank 0"));
      return {};
    }
    // Rank 0: every header, in rank order, with its data; a rank whose header disagrees still has
    // its data drained so that the connection stays in step.
    bool same = true;
    std::vector<T> acc;
    if (op == kOpReduce) {
      acc.assign(data.size(), T{0});
      for (size_t i = 0; i < data.size(); ++i) acc[i] += data[i];
    }
    std::vector<T> incoming;
    for (size_t r = 1; r < static_cast<size_t>(size_); ++r) {
      const int fd = peers_[r].get();
      std::array<std::byte, kHeaderSize> hb{};
      TRESOR_TRY(recv_all(fd, hb.data(), hb.size(), deadline(), rank_name(r)));
      const Header h = decode(hb);
      if (h.op != kOpReduce && h.op != kOpBroadcast) return fail(ErrorCode::kIo, "collective: " + rank_name(r) + " sent an unknown operation " + std::to_string(h.op));
      const bool agrees = h.op == mine.op && h.type == mine.type && h.count == mine.count && h.root == mine.root;
      same = same && agrees;
      const bool has_data = h.op == kOpReduce || h.root == r;
      if (!has_data) continue;
      const size_t elem = h.type == 0 ? sizeof(float) : sizeof(double);
      if (h.count > (size_t{1} << 40) / elem) return fail(ErrorCode::kIo, "collective: " + rank_name(r) + " announced " + std::to_string(h.count) + " elements");
      if (!agrees) {
        std::vector<std::byte> drain(h.count * elem);
        TRESOR_TRY(recv_all(fd, drain.data(), drain.size(), deadline(), rank_name(r)));
        continue;
      }
      incoming.resize(data.size());
      TRESOR_TRY(recv_all(fd, incoming.data(), bytes, deadline(), rank_name(r)));
      if (op == kOpReduce) {
        for (size_t i = 0; i < data.size(); ++i) acc[i] += incoming[i];
      } else {
        std::copy(incoming.begin(), incoming.end(), data.begin());
      }
    }
    if (op == kOpReduce && same) std::copy(acc.begin(), acc.end(), data.begin());
    const uint8_t status = same ? 0 : 1;
    for (size_t r = 1; r < static_cast<size_t>(size_); ++r) {
      const int fd = peers_[r].get();
      TRESOR_TRY(send_all(fd, &status, 1, deadline(), rank_name(r)));
      if (same && (op == kOpReduce || static_cast<int>(r) != root)) TRESOR_TRY(send_all(fd, data.data(), bytes, deadline(), rank_name(r)));
    }
    if (!same) return mismatch(op);
    return {};
  }

  static Result<void> mismatch(uint32_t op) {
    return fail(ErrorCode::kInvalidArgument, op == kOpReduce ? "all-reduce: the ranks passed buffers of different lengths or types"
                                                             : "broadcast: the ranks passed buffers of different lengths or roots");
  }

  int rank_, size_, io_timeout_ms_;
  std::vector<Fd> peers_;  // rank 0: one per rank (index 0 unused); others: [0] = rank 0
};

Result<void> set_socket_options(int fd) {
  const int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("TCP_NODELAY"));
  return {};
}

Result<std::unique_ptr<Collective>> serve(const Rendezvous& rv, const fs::path& file) {
  Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) return fail(ErrorCode::kIo, "collective: " + errno_text("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("bind 127.0.0.1"));
  if (::listen(listener.get(), rv.size) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("listen"));
  socklen_t len = sizeof addr;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("getsockname"));
  std::array<std::byte, kTokenSize> token{};
  TRESOR_TRY(crypto::random_bytes(token));
  // The rendezvous file, whole or not at all.
  const nlohmann::json j = {{"port", ntohs(addr.sin_port)}, {"token", to_hex(token)}, {"size", rv.size}};
  const fs::path tmp = file.string() + ".tmp" + std::to_string(::getpid());
  {
    Fd f(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (f.get() < 0) return fail(ErrorCode::kIo, "collective: cannot write " + tmp.string() + ": " + std::strerror(errno));
    const std::string text = j.dump() + "\n";
    if (::write(f.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) return fail(ErrorCode::kIo, "collective: " + errno_text(tmp.c_str()));
  }
  if (::rename(tmp.c_str(), file.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return fail(ErrorCode::kIo, "collective: cannot create " + file.string() + ": " + std::strerror(e));
  }
  struct Unlink {
    const fs::path& p;
    ~Unlink() { ::unlink(p.c_str()); }
  } unlink_file{file};

  std::vector<Fd> peers(static_cast<size_t>(rv.size));
  int joined = 1;
  const auto give_up = Clock::now() + std::chrono::milliseconds(rv.join_timeout_ms);
  std::string refused;  // the last rejected hello, for the timeout message
  while (joined < rv.size) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(give_up - Clock::now()).count();
    if (left <= 0) {
      std::string missing;
      for (size_t r = 1; r < peers.size(); ++r)
        if (peers[r].get() < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      return fail(ErrorCode::kIo, "collective: rank(s) " + missing + " of " + std::to_string(rv.size) + " did not join through " + file.string() + " within " +
                                      std::to_string(rv.join_timeout_ms / 1000) + " s" + (refused.empty() ? "" : "; refused: " + refused));
    }
    pollfd p{listener.get(), POLLIN, 0};
    const int pr = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (pr < 0 && errno != EINTR) return fail(ErrorCode::kIo, "collective: " + errno_text("poll"));
    if (pr <= 0) continue;
    Fd c(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (c.get() < 0) continue;
    std::array<std::byte, 8 + 4 + 4 + kTokenSize> hello{};
    // A joining rank has 5 s to say who it is.
    if (!recv_all(c.get(), hello.data(), hello.size(), Clock::now() + std::chrono::seconds(5), "a joining rank")) {
      refused = "a connection that sent no hello";
      continue;
    }
    uint32_t r = 0, n = 0;
    for (size_t i = 0; i < 4; ++i) {
      r |= static_cast<uint32_t>(hello[8 + i]) << (8 * i);
      n |= static_cast<uint32_t>(hello[12 + i]) << (8 * i);
    }
    const uint8_t bad = 1, ok = 0;
    if (std::memcmp(hello.data(), kHello, 8) != 0 || !crypto::ct_equal(ByteSpan(hello.data() + 16, kTokenSize), token)) {
      refused = "a connection with a wrong token";
      (void)send_all(c.get(), &bad, 1, Clock::now() + std::chrono::seconds(1), "a joining rank");
      continue;
    }
    if (n != static_cast<uint32_t>(rv.size) || r == 0 || r >= static_cast<uint32_t>(rv.size) || peers[r].get() >= 0) {
      refused = "rank " + std::to_string(r) + " of " + std::to_string(n) + " (a duplicate, or a run of another size)";
      (void)send_all(c.get(), &bad, 1, Clock::now() + std::chrono::seconds(1), "a joining rank");
      continue;
    }
    TRESOR_TRY(set_socket_options(c.get()));
    TRESOR_TRY(send_all(c.get(), &ok, 1, Clock::now() + std::chrono::seconds(5), rank_name(r)));
    peers[r] = std::move(c);
    ++joined;
  }
  return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(0, rv.size, rv.io_timeout_ms, std::move(peers)));
}

Result<std::unique_ptr<Collective>> join(const Rendezvous& rv, const fs::path& file) {
  const auto give_up = Clock::now() + std::chrono::milliseconds(rv.join_timeout_ms);
  std::string last = "the file does not exist yet";
  while (Clock::now() < give_up) {
    // A stale file from an earlier run points at a closed port: the connection is refused and
    // this rank reads the file again until rank 0 has replaced it.
    std::ifstream in(file);
    nlohmann::json j;
    if (in) j = nlohmann::json::parse(in, nullptr, false);
    if (in && !j.is_discarded() && j.is_object() && j.contains("port") && j["port"].is_number_unsigned() && j.contains("token") && j["token"].is_string() &&
        j.contains("size") && j["size"].is_number_integer()) {
      if (j["size"].get<int>() != rv.size) {
        return fail(ErrorCode::kInvalidArgument, "collective: " + file.string() + " is for " + std::to_string(j["size"].get<int>()) + " ranks, this rank expects " +
                                                     std::to_string(rv.size));
      }
      auto token = from_hex(j["token"].get<std::string>(), "rendezvous token");
      if (!token || token->size() != kTokenSize) return fail(ErrorCode::kInvalidArgument, "collective: " + file.string() + " holds a malformed token");
      Fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (c.get() < 0) return fail(ErrorCode::kIo, "collective: " + errno_text("socket"));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(j["port"].get<uint16_t>());
      if (::connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
        std::array<std::byte, 8 + 4 + 4 + kTokenSize> hello{};
        std::memcpy(hello.data(), kHello, 8);
        for (size_t i = 0; i < 4; ++i) {
          hello[8 + i] = static_cast<std::byte>(static_cast<uint32_t>(rv.rank) >> (8 * i));
          hello[12 + i] = static_cast<std::byte>(static_cast<uint32_t>(rv.size) >> (8 * i));
        }
        std::copy(token->begin(), token->end(), hello.begin() + 16);
        const auto deadline = Clock::now() + std::chrono::seconds(10);
        TRESOR_TRY(send_all(c.get(), hello.data(), hello.size(), deadline, "rank 0"));
        uint8_t status = 1;
        TRESOR_TRY(recv_all(c.get(), &status, 1, deadline, "rank 0"));
        if (status != 0) {
          // A stale file whose port another run now holds, or a duplicate rank: wait for a fresh file.
          last = "the listener at 127.0.0.1:" + std::to_string(j["port"].get<uint16_t>()) + " refused rank " + std::to_string(rv.rank) +
                 " (a stale file of another run, or a duplicate rank)";
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          continue;
        }
        TRESOR_TRY(set_socket_options(c.get()));
        std::vector<Fd> peers;
        peers.push_back(std::move(c));
        return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(rv.rank, rv.size, rv.io_timeout_ms, std::move(peers)));
      }
      last = "127.0.0.1:" + std::to_string(j["port"].get<uint16_t>()) + " refused the connection";
    } else if (in) {
      last = "the file is incomplete or malformed";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return fail(ErrorCode::kIo, "collective: rank " + std::to_string(rv.rank) + " found no rank 0 through " + file.string() + " within " +
                                  std::to_string(rv.join_timeout_ms / 1000) + " s (" + last + ")");
}

}  // namespace

Result<std::unique_ptr<Collective>> connect_tcp(const Rendezvous& rv) {
  if (rv.size < 1 || rv.size > 1024) return fail(ErrorCode::kInvalidArgument, "collective: a group of " + std::to_string(rv.size) + " ranks");
  if (rv.rank < 0 || rv.rank >= rv.size) return fail(ErrorCode::kInvalidArgument, "collective: rank " + std::to_string(rv.rank) + " is not in a group of " + std::to_string(rv.size));
  if (rv.run_id.empty() || rv.run_id.size() > 64 || rv.run_id.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != std::string::npos) {
    return fail(ErrorCode::kInvalidArgument, "collective: run id \"" + rv.run_id + "\" (1..64 of letters, digits, '.', '_', '-')");
  }
  if (rv.join_timeout_ms <= 0 || rv.io_timeout_ms <= 0) return fail(ErrorCode::kInvalidArgument, "collective: timeouts must be positive");
  std::error_code ec;
  if (rv.directory.empty() || !fs::is_directory(rv.directory, ec)) return fail(ErrorCode::kInvalidArgument, "collective: rendezvous directory \"" + rv.directory + "\" does not exist");
  const fs::path file = fs::path(rv.directory) / ("tresor-dp-" + rv.run_id + ".json");
  if (rv.size == 1) return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(0, 1, rv.io_timeout_ms, std::vector<Fd>(1)));
  return rv.rank == 0 ? serve(rv, file) : join(rv, file);
}

}  // namespace tresor::train
