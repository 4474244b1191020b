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
//
// With a step roster (ranks on several machines, docs/training.md §5.3) there is no rendezvous
// file: rank 0 listens on the roster's lead address; each connection is TLS 1.3 (OpenSSL; one
// cipher suite, TLS_AES_256_GCM_SHA384; no session tickets or resumption) in which both ends
// present a self-signed certificate for their Ed25519 link key and prove its private key
// (CertificateVerify, RFC 8446 §4.4.3). Certificates are not validated as chains: the key is
// pinned instead. A joining rank checks that rank 0's key is the roster's rank-0 key before it
// sends anything, then sends the hello with the roster's SHA-256 in place of the token; rank 0
// closes a peer whose key the roster does not list without a word, and accepts the hello only
// when the digest is its own and the peer's key is the one listed for the rank the hello names.
// Every byte after the handshake, hellos included, is inside TLS.
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
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

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

struct SslDeleter {
  void operator()(SSL* s) const { SSL_free(s); }
};
struct CtxDeleter {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
using SslCtx = std::unique_ptr<SSL_CTX, CtxDeleter>;

// One connection between two ranks: a socket, and its TLS state when the group has a roster.
// TLS reads and writes memory BIOs that this file moves to and from the socket itself, with
// MSG_NOSIGNAL: OpenSSL's socket BIO writes with write(2), which raises SIGPIPE when a peer has
// gone, and a library must not change how its process handles signals.
struct Link {
  Fd fd;
  std::unique_ptr<SSL, SslDeleter> ssl;  // owns rbio and wbio
  BIO* rbio = nullptr;                   // socket → TLS
  BIO* wbio = nullptr;                   // TLS → socket
  std::string broken;                    // why a TLS link failed: it is never used again
  int get() const { return fd.get(); }
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

Result<void> send_fd(int fd, const void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
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

// Reads at least one byte (at most n); the count.
Result<size_t> recv_some(int fd, void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  for (;;) {
    TRESOR_TRY(wait_for(fd, POLLIN, deadline, peer));
    const ssize_t r = ::recv(fd, data, n, MSG_DONTWAIT);
    if (r == 0) return fail(ErrorCode::kIo, "collective: " + peer + " closed its connection (did it exit?)");
    if (r > 0) return static_cast<size_t>(r);
    if (errno == ETIMEDOUT) {
      return fail(ErrorCode::kIo, "collective: " + peer + " stopped answering TCP keepalive probes (its VM or node is gone?)");
    }
    if (errno != EINTR && errno != EAGAIN) return fail(ErrorCode::kIo, "collective: receiving from " + peer + " failed: " + std::strerror(errno));
  }
}

// Sends whatever TLS has written (records, alerts, handshake messages).
Result<void> tls_flush(Link& l, Clock::time_point deadline, const std::string& peer) {
  // Straight from the memory BIO's buffer, then emptied (no copy through a bounce buffer).
  char* data = nullptr;
  const long n = BIO_get_mem_data(l.wbio, &data);
  if (n <= 0) return {};
  TRESOR_TRY(send_fd(l.get(), data, static_cast<size_t>(n), deadline, peer));
  if (BIO_reset(l.wbio) != 1) return fail(ErrorCode::kIo, "collective: TLS output buffer: " + crypto::openssl_error_string());
  return {};
}

// After a TLS call returned r: flushes what it wrote, and feeds it more bytes when it wants them;
// an error otherwise.
Result<void> tls_continue(Link& l, int r, Clock::time_point deadline, const std::string& peer, const char* doing) {
  const int e = SSL_get_error(l.ssl.get(), r);
  const std::string why = e == SSL_ERROR_WANT_READ ? std::string() : crypto::openssl_error_string();
  (void)tls_flush(l, deadline, peer);  // an alert, when TLS failed: the peer learns why
  if (e == SSL_ERROR_WANT_READ) {
    std::array<char, 65536> buf;
    auto n = recv_some(l.get(), buf.data(), buf.size(), deadline, peer);
    if (!n) return std::unexpected(n.error());
    if (BIO_write(l.rbio, buf.data(), static_cast<int>(*n)) != static_cast<int>(*n)) return fail(ErrorCode::kIo, "collective: TLS input buffer: " + crypto::openssl_error_string());
    return {};
  }
  if (e == SSL_ERROR_ZERO_RETURN) return fail(ErrorCode::kIo, "collective: " + peer + " closed its connection (did it exit?)");
  // Anything else is a TLS failure: a record that does not authenticate, a protocol violation,
  // a handshake the peer refused.
  return fail(ErrorCode::kAuth, "collective: TLS " + std::string(doing) + " " + peer + " failed: " + (why.empty() ? "error " + std::to_string(e) : why));
}

// A TLS link whose I/O failed once may have sent part of a record or lost its place in the
// stream: every later call fails with the first error instead of sending garbage.
template <typename Fn>
Result<void> once_broken(Link& l, Fn&& io) {
  if (!l.broken.empty()) return fail(ErrorCode::kIo, l.broken + " (the link failed earlier)");
  auto r = io();
  if (!r && l.ssl) l.broken = r.error().message;
  return r;
}

Result<void> send_tls(Link& l, const void* data, size_t n, Clock::time_point deadline, const std::string& peer);
Result<void> recv_tls(Link& l, void* data, size_t n, Clock::time_point deadline, const std::string& peer);

Result<void> send_all(Link& l, const void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  if (!l.ssl) return send_fd(l.get(), data, n, deadline, peer);
  return once_broken(l, [&] { return send_tls(l, data, n, deadline, peer); });
}

Result<void> recv_all(Link& l, void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  if (!l.ssl) {
    auto* p = static_cast<char*>(data);
    while (n > 0) {
      auto got = recv_some(l.get(), p, n, deadline, peer);
      if (!got) return std::unexpected(got.error());
      p += *got;
      n -= *got;
    }
    return {};
  }
  return once_broken(l, [&] { return recv_tls(l, data, n, deadline, peer); });
}

Result<void> send_tls(Link& l, const void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    // 256 KiB at a time, so that the ciphertext buffered in memory stays small.
    size_t w = 0;
    ERR_clear_error();
    const int r = SSL_write_ex(l.ssl.get(), p, std::min<size_t>(n, size_t{1} << 18), &w);
    if (r != 1) {
      TRESOR_TRY(tls_continue(l, r, deadline, peer, "sending to"));
      continue;
    }
    p += w;
    n -= w;
    TRESOR_TRY(tls_flush(l, deadline, peer));
  }
  return {};
}

Result<void> recv_tls(Link& l, void* data, size_t n, Clock::time_point deadline, const std::string& peer) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    size_t got = 0;
    ERR_clear_error();
    const int r = SSL_read_ex(l.ssl.get(), p, n, &got);
    if (r != 1) {
      TRESOR_TRY(tls_continue(l, r, deadline, peer, "receiving from"));
      continue;
    }
    p += got;
    n -= got;
  }
  return {};
}

Result<void> tls_handshake(Link& l, bool server, Clock::time_point deadline, const std::string& peer) {
  for (;;) {
    ERR_clear_error();
    const int r = server ? SSL_accept(l.ssl.get()) : SSL_connect(l.ssl.get());
    if (r == 1) return tls_flush(l, deadline, peer);
    TRESOR_TRY(tls_continue(l, r, deadline, peer, "handshake with"));
  }
}

// The TLS context of a rank with a roster: TLS 1.3 only, one cipher suite, no tickets or
// resumption, this rank's link key in a self-signed certificate, and the peer's certificate
// demanded but not validated as a chain (the caller pins its key after the handshake; the
// handshake itself checks that the peer holds the key's private half).
struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
Result<SslCtx> link_context(const crypto::Key& own, bool server) {
  auto setup = [](const char* what) { return fail(ErrorCode::kCrypto, std::string("collective: TLS setup (") + what + "): " + crypto::openssl_error_string()); };
  SslCtx ctx(SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) return setup("SSL_CTX_new");
  if (SSL_CTX_set_min_proto_version(ctx.get(), TLS1_3_VERSION) != 1 || SSL_CTX_set_ciphersuites(ctx.get(), "TLS_AES_256_GCM_SHA384") != 1 ||
      SSL_CTX_set_num_tickets(ctx.get(), 0) != 1) {
    return setup("TLS 1.3, TLS_AES_256_GCM_SHA384, no tickets");
  }
  SSL_CTX_set_session_cache_mode(ctx.get(), SSL_SESS_CACHE_OFF);
  std::unique_ptr<X509, X509Deleter> cert(X509_new());
  X509_NAME* name = cert ? X509_get_subject_name(cert.get()) : nullptr;
  if (!cert || name == nullptr || X509_set_version(cert.get(), 2) != 1 || ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1) != 1 ||
      X509_gmtime_adj(X509_getm_notBefore(cert.get()), -86400) == nullptr || X509_gmtime_adj(X509_getm_notAfter(cert.get()), 86400L * 366) == nullptr ||
      X509_set_pubkey(cert.get(), own.get()) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("tresor training rank"), -1, -1, 0) != 1 ||
      X509_set_issuer_name(cert.get(), name) != 1 || X509_sign(cert.get(), own.get(), nullptr) == 0) {
    return setup("the link key's certificate");
  }
  if (SSL_CTX_use_certificate(ctx.get(), cert.get()) != 1 || SSL_CTX_use_PrivateKey(ctx.get(), own.get()) != 1 || SSL_CTX_check_private_key(ctx.get()) != 1) {
    return setup("the link key");
  }
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, [](int, X509_STORE_CTX*) { return 1; });
  return ctx;
}

// Starts TLS on a connected socket (the handshake is the caller's).
Result<void> start_tls(Link& l, SSL_CTX* ctx) {
  l.ssl.reset(SSL_new(ctx));
  l.rbio = BIO_new(BIO_s_mem());
  l.wbio = BIO_new(BIO_s_mem());
  if (!l.ssl || l.rbio == nullptr || l.wbio == nullptr) {
    BIO_free(l.rbio);
    BIO_free(l.wbio);
    l.rbio = l.wbio = nullptr;
    return fail(ErrorCode::kCrypto, "collective: TLS setup: " + crypto::openssl_error_string());
  }
  SSL_set_bio(l.ssl.get(), l.rbio, l.wbio);  // the SSL owns both from here
  return {};
}

// The Ed25519 key of the peer's certificate.
Result<std::array<std::byte, 32>> peer_key(const Link& l) {
  X509* cert = SSL_get0_peer_certificate(l.ssl.get());
  EVP_PKEY* key = cert != nullptr ? X509_get0_pubkey(cert) : nullptr;
  if (key == nullptr || EVP_PKEY_get_id(key) != EVP_PKEY_ED25519) return fail(ErrorCode::kAuth, "the peer's certificate does not hold an Ed25519 key");
  std::array<std::byte, 32> out{};
  size_t n = out.size();
  if (EVP_PKEY_get_raw_public_key(key, reinterpret_cast<unsigned char*>(out.data()), &n) != 1 || n != out.size()) {
    return fail(ErrorCode::kAuth, "the peer's Ed25519 key cannot be read");
  }
  return out;
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
  TcpCollective(int rank, int size, int io_timeout_ms, std::vector<Link> peers) : rank_(rank), size_(size), io_timeout_ms_(io_timeout_ms), peers_(std::move(peers)) {}
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
      Link& fd = peers_[0];
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
      Link& fd = peers_[r];
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
      Link& fd = peers_[r];
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
  std::vector<Link> peers_;  // rank 0: one per rank (index 0 unused); others: [0] = rank 0
};

// TCP_NODELAY (the protocol's small messages go out at once) and keepalive (Rendezvous::keepalive_s:
// a peer whose machine vanished is noticed; tcp(7)).
Result<void> set_socket_options(int fd, int keepalive_s) {
  struct Option {
    int level, name, value;
    const char* what;
  };
  const Option options[] = {{IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY"},
                            {SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
                            {IPPROTO_TCP, TCP_KEEPIDLE, keepalive_s, "TCP_KEEPIDLE"},
                            {IPPROTO_TCP, TCP_KEEPINTVL, std::max(1, keepalive_s / 3), "TCP_KEEPINTVL"},
                            {IPPROTO_TCP, TCP_KEEPCNT, 3, "TCP_KEEPCNT"}};
  for (const Option& o : options) {
    if (::setsockopt(fd, o.level, o.name, &o.value, sizeof o.value) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text(o.what));
  }
  return {};
}

constexpr size_t kHelloSize = 8 + 4 + 4 + kTokenSize;

std::string lead_of(const Roster& r) { return r.lead_host + ":" + std::to_string(r.lead_port); }

// Removes the rendezvous file when rank 0 is done with it (nothing with a roster).
class RemoveOnExit {
 public:
  explicit RemoveOnExit(const fs::path* p) : p_(p) {}
  ~RemoveOnExit() {
    if (p_ != nullptr) ::unlink(p_->c_str());
  }
  RemoveOnExit(const RemoveOnExit&) = delete;
  RemoveOnExit& operator=(const RemoveOnExit&) = delete;

 private:
  const fs::path* p_;
};

// Rank 0 publishes where it listens: the rendezvous file, whole or not at all.
Result<void> write_rendezvous(const fs::path& file, uint16_t port, ByteSpan token, int size) {
  const nlohmann::json j = {{"port", port}, {"token", to_hex(token)}, {"size", size}};
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
  return {};
}

Result<std::unique_ptr<Collective>> serve(const Rendezvous& rv, const fs::path& file) {
  const Roster* roster = rv.roster.get();
  Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) return fail(ErrorCode::kIo, "collective: " + errno_text("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  std::string where = "127.0.0.1";
  if (roster != nullptr) {
    // The roster's lead address, on the machine that has it; a restarted step may rebind at once.
    where = lead_of(*roster);
    if (::inet_pton(AF_INET, roster->lead_host.c_str(), &addr.sin_addr) != 1) return fail(ErrorCode::kInvalidArgument, "collective: lead address " + where);
    addr.sin_port = htons(roster->lead_port);
    const int one = 1;
    if (::setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("SO_REUSEADDR"));
  }
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    return fail(ErrorCode::kIo, "collective: rank 0 cannot listen on " + where + ": " + std::strerror(errno) +
                                    (roster != nullptr ? " (rank 0 must run on the machine that has the roster's lead address)" : ""));
  }
  if (::listen(listener.get(), rv.size) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("listen"));
  socklen_t len = sizeof addr;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) return fail(ErrorCode::kIo, "collective: " + errno_text("getsockname"));
  // What a hello must carry: the token of the rendezvous file, or the roster's digest.
  std::array<std::byte, kTokenSize> secret{};
  SslCtx tls;
  if (roster != nullptr) {
    secret = roster->digest;
    auto ctx = link_context(*rv.link_key, true);
    if (!ctx) return std::unexpected(ctx.error());
    tls = std::move(*ctx);
  } else {
    TRESOR_TRY(crypto::random_bytes(secret));
    TRESOR_TRY(write_rendezvous(file, ntohs(addr.sin_port), secret, rv.size));
  }
  const RemoveOnExit remove_file(roster != nullptr ? nullptr : &file);
  const std::string from = roster != nullptr ? where : file.string();

  std::vector<Link> peers(static_cast<size_t>(rv.size));
  int joined = 1;
  const auto give_up = Clock::now() + std::chrono::milliseconds(rv.join_timeout_ms);
  std::string refused;  // the last rejected hello, for the timeout message
  while (joined < rv.size) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(give_up - Clock::now()).count();
    if (left <= 0) {
      std::string missing;
      for (size_t r = 1; r < peers.size(); ++r)
        if (peers[r].get() < 0) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      return fail(ErrorCode::kIo, "collective: rank(s) " + missing + " of " + std::to_string(rv.size) + " did not join through " + from + " within " +
                                      std::to_string(rv.join_timeout_ms / 1000) + " s" + (refused.empty() ? "" : "; refused: " + refused));
    }
    pollfd p{listener.get(), POLLIN, 0};
    const int pr = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (pr < 0 && errno != EINTR) return fail(ErrorCode::kIo, "collective: " + errno_text("poll"));
    if (pr <= 0) continue;
    Link c;
    c.fd = Fd(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (c.get() < 0) {
      // Out of descriptors or a connection reset before it was taken: not a reason to stop,
      // nor to spin.
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    // A joining rank has 5 s to finish the handshake and say who it is.
    const auto hello_deadline = Clock::now() + std::chrono::seconds(5);
    if (tls) {
      TRESOR_TRY(start_tls(c, tls.get()));
      if (auto h = tls_handshake(c, true, hello_deadline, "a joining rank"); !h) {
        refused = "a connection whose TLS handshake failed (" + h.error().message + ")";
        continue;
      }
      // A peer whose key the roster does not list at all learns nothing, not even a refusal.
      auto key = peer_key(c);
      if (!key || std::ranges::none_of(roster->keys, [&](const auto& k) { return crypto::ct_equal(k, *key); })) {
        refused = "a connection whose link key " + (key ? base64url_encode(*key) : key.error().message) + " is not in the roster (closed unanswered)";
        continue;
      }
    }
    std::array<std::byte, kHelloSize> hello{};
    if (!recv_all(c, hello.data(), hello.size(), hello_deadline, "a joining rank")) {
      refused = "a connection that sent no hello";
      continue;
    }
    uint32_t r = 0, n = 0;
    for (size_t i = 0; i < 4; ++i) {
      r |= static_cast<uint32_t>(hello[8 + i]) << (8 * i);
      n |= static_cast<uint32_t>(hello[12 + i]) << (8 * i);
    }
    const uint8_t bad = 1, ok = 0;
    const auto refuse = [&](std::string why) {
      refused = std::move(why);
      (void)send_all(c, &bad, 1, Clock::now() + std::chrono::seconds(1), "a joining rank");
    };
    if (std::memcmp(hello.data(), kHello, 8) != 0 || !crypto::ct_equal(ByteSpan(hello.data() + 16, kTokenSize), secret)) {
      refuse(roster != nullptr ? "a rank holding another roster (its SHA-256 differs)" : "a connection with a wrong token");
      continue;
    }
    if (n != static_cast<uint32_t>(rv.size) || r == 0 || r >= static_cast<uint32_t>(rv.size) || peers[r].get() >= 0) {
      refuse("rank " + std::to_string(r) + " of " + std::to_string(n) + " (a duplicate, or a run of another size)");
      continue;
    }
    if (roster != nullptr) {
      auto key = peer_key(c);
      if (!key || !crypto::ct_equal(*key, roster->keys[r])) {
        refuse("a connection as rank " + std::to_string(r) + " whose link key " + (key ? base64url_encode(*key) : key.error().message) +
               " is not the roster's key for that rank");
        continue;
      }
    }
    TRESOR_TRY(set_socket_options(c.get(), rv.keepalive_s));
    TRESOR_TRY(send_all(c, &ok, 1, Clock::now() + std::chrono::seconds(5), rank_name(r)));
    peers[r] = std::move(c);
    ++joined;
  }
  return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(0, rv.size, rv.io_timeout_ms, std::move(peers)));
}

std::array<std::byte, kHelloSize> make_hello(const Rendezvous& rv, ByteSpan secret) {
  std::array<std::byte, kHelloSize> hello{};
  std::memcpy(hello.data(), kHello, 8);
  for (size_t i = 0; i < 4; ++i) {
    hello[8 + i] = static_cast<std::byte>(static_cast<uint32_t>(rv.rank) >> (8 * i));
    hello[12 + i] = static_cast<std::byte>(static_cast<uint32_t>(rv.size) >> (8 * i));
  }
  std::copy(secret.begin(), secret.end(), hello.begin() + 16);
  return hello;
}

// A rank other than 0 with a roster: connects to the lead address until rank 0 listens, then TLS
// with rank 0's key pinned. Everything after the connection is final: a rank 0 with another key,
// or one that refuses this rank, stops the join.
Result<std::unique_ptr<Collective>> join_roster(const Rendezvous& rv) {
  const Roster& roster = *rv.roster;
  const std::string lead = lead_of(roster);
  auto tls = link_context(*rv.link_key, false);
  if (!tls) return std::unexpected(tls.error());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(roster.lead_port);
  if (::inet_pton(AF_INET, roster.lead_host.c_str(), &addr.sin_addr) != 1) return fail(ErrorCode::kInvalidArgument, "collective: lead address " + lead);
  const auto give_up = Clock::now() + std::chrono::milliseconds(rv.join_timeout_ms);
  std::string last = "nothing listened there";
  while (Clock::now() < give_up) {
    Link c;
    c.fd = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (c.get() < 0) return fail(ErrorCode::kIo, "collective: " + errno_text("socket"));
    // A non-blocking connect, so that an address that never answers costs at most 5 s a try.
    int err = 0;
    if (::connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      err = errno;
      if (err == EINPROGRESS) {
        if (wait_for(c.get(), POLLOUT, std::min(give_up, Clock::now() + std::chrono::seconds(5)), "rank 0 at " + lead)) {
          socklen_t elen = sizeof err;
          if (::getsockopt(c.get(), SOL_SOCKET, SO_ERROR, &err, &elen) != 0) err = errno;
        } else {
          err = ETIMEDOUT;
        }
      }
    }
    if (err != 0) {
      last = std::strerror(err);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    const std::string peer = "rank 0 at " + lead;
    // Rank 0 takes joiners one at a time (5 s each at most), so a joiner may wait in its backlog:
    // the handshake may take until the join deadline, and one that rank 0 dropped (closed,
    // timed out) is tried again. A TLS failure proper (a key or protocol error) is final.
    const auto deadline = std::max(give_up, Clock::now() + std::chrono::seconds(10));
    TRESOR_TRY(start_tls(c, tls->get()));
    if (auto h = tls_handshake(c, false, deadline, peer); !h) {
      if (h.error().code != ErrorCode::kIo || Clock::now() >= give_up) return std::unexpected(h.error());
      last = h.error().message;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    auto key = peer_key(c);
    if (!key) return fail(ErrorCode::kAuth, "collective: " + peer + ": " + key.error().message);
    if (!crypto::ct_equal(*key, roster.keys[0])) {
      return fail(ErrorCode::kAuth, "collective: " + peer + " holds link key " + base64url_encode(*key) + ", not the roster's key for rank 0 (" +
                                        base64url_encode(roster.keys[0]) + "); nothing was sent to it");
    }
    const auto hello = make_hello(rv, roster.digest);
    TRESOR_TRY(send_all(c, hello.data(), hello.size(), deadline, peer));
    uint8_t status = 1;
    TRESOR_TRY(recv_all(c, &status, 1, deadline, peer));
    if (status != 0) {
      return fail(ErrorCode::kAuth, "collective: " + peer + " refused rank " + std::to_string(rv.rank) + " of " + std::to_string(rv.size) +
                                        " (its roster differs from this rank's, or the rank joined twice; rank 0 names it)");
    }
    TRESOR_TRY(set_socket_options(c.get(), rv.keepalive_s));
    std::vector<Link> peers;
    peers.push_back(std::move(c));
    return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(rv.rank, rv.size, rv.io_timeout_ms, std::move(peers)));
  }
  return fail(ErrorCode::kIo, "collective: rank " + std::to_string(rv.rank) + " found no rank 0 at " + lead + " within " + std::to_string(rv.join_timeout_ms / 1000) +
                                  " s (" + last + ")");
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
      Link c;
      c.fd = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (c.get() < 0) return fail(ErrorCode::kIo, "collective: " + errno_text("socket"));
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(j["port"].get<uint16_t>());
      if (::connect(c.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
        const auto hello = make_hello(rv, *token);
        const auto deadline = Clock::now() + std::chrono::seconds(10);
        TRESOR_TRY(send_all(c, hello.data(), hello.size(), deadline, "rank 0"));
        uint8_t status = 1;
        TRESOR_TRY(recv_all(c, &status, 1, deadline, "rank 0"));
        if (status != 0) {
          // A stale file whose port another run now holds, or a duplicate rank: wait for a fresh file.
          last = "the listener at 127.0.0.1:" + std::to_string(j["port"].get<uint16_t>()) + " refused rank " + std::to_string(rv.rank) +
                 " (a stale file of another run, or a duplicate rank)";
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          continue;
        }
        TRESOR_TRY(set_socket_options(c.get(), rv.keepalive_s));
        std::vector<Link> peers;
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

// A roster and a link key that fit the rendezvous.
Result<void> check_roster(const Rendezvous& rv) {
  if (!rv.roster && !rv.link_key) return {};
  if (!rv.roster || !rv.link_key) return fail(ErrorCode::kInvalidArgument, "collective: a step roster and a link key go together");
  const Roster& roster = *rv.roster;
  if (roster.keys.size() != static_cast<size_t>(rv.size)) {
    return fail(ErrorCode::kInvalidArgument, "collective: the step roster lists " + std::to_string(roster.keys.size()) + " ranks, the run has " + std::to_string(rv.size));
  }
  if (roster.step != rv.run_id) return fail(ErrorCode::kInvalidArgument, "collective: the step roster is for step " + roster.step + ", this run is " + rv.run_id);
  if (rv.link_key->type() != crypto::KeyType::kEd25519 || !rv.link_key->has_private()) return fail(ErrorCode::kInvalidArgument, "collective: the link key must be an Ed25519 private key");
  auto mine = rv.link_key->public_raw();
  if (!mine) return std::unexpected(mine.error());
  if (!crypto::ct_equal(*mine, roster.keys[static_cast<size_t>(rv.rank)])) {
    return fail(ErrorCode::kInvalidArgument, "collective: this rank's link key (" + base64url_encode(*mine) + ") is not the one the step roster lists for rank " +
                                                 std::to_string(rv.rank) + " (" + base64url_encode(roster.keys[static_cast<size_t>(rv.rank)]) + ")");
  }
  return {};
}

}  // namespace

Result<std::unique_ptr<Collective>> connect_tcp(const Rendezvous& rv) {
  if (rv.size < 1 || rv.size > 1024) return fail(ErrorCode::kInvalidArgument, "collective: a group of " + std::to_string(rv.size) + " ranks");
  if (rv.rank < 0 || rv.rank >= rv.size) return fail(ErrorCode::kInvalidArgument, "collective: rank " + std::to_string(rv.rank) + " is not in a group of " + std::to_string(rv.size));
  if (!valid_step_id(rv.run_id)) {  // a run id is a step id (a roster's step must equal it)
    return fail(ErrorCode::kInvalidArgument, "collective: run id \"" + rv.run_id + "\" (1..64 of letters, digits, '.', '_', '-')");
  }
  if (rv.join_timeout_ms <= 0 || rv.io_timeout_ms <= 0) return fail(ErrorCode::kInvalidArgument, "collective: timeouts must be positive");
  if (rv.keepalive_s < 1 || rv.keepalive_s > 3600) return fail(ErrorCode::kInvalidArgument, "collective: keepalive_s must be 1..3600 seconds");
  TRESOR_TRY(check_roster(rv));
  fs::path file;
  if (!rv.roster) {
    std::error_code ec;
    if (rv.directory.empty() || !fs::is_directory(rv.directory, ec)) return fail(ErrorCode::kInvalidArgument, "collective: rendezvous directory \"" + rv.directory + "\" does not exist");
    file = fs::path(rv.directory) / ("tresor-dp-" + rv.run_id + ".json");
  }
  if (rv.size == 1) return std::unique_ptr<Collective>(std::make_unique<TcpCollective>(0, 1, rv.io_timeout_ms, std::vector<Link>(1)));
  if (rv.roster) return rv.rank == 0 ? serve(rv, file) : join_roster(rv);
  return rv.rank == 0 ? serve(rv, file) : join(rv, file);
}

}  // namespace tresor::train
