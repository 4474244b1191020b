// tresor-broker's HTTPS and admin sockets (server.h), on Boost.Asio/Beast with OpenSSL.
#include "tresor/broker/server.h"

#include <openssl/ssl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it
#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "tresor/broker/admin.h"

namespace tresor::broker {
namespace {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using unix_socket = boost::asio::local::stream_protocol;

constexpr uint32_t kHeaderLimit = 16 * 1024;
constexpr size_t kAdminLineLimit = 1024 * 1024;

}  // namespace

struct Server::Impl : std::enable_shared_from_this<Server::Impl> {
  Impl(const Config& c, Service& s, Admin* a) : config(c), service(s), admin(a) {}

  class Connection;
  class AdminConnection;

  const Config config;
  Service& service;
  Admin* admin;
  net::io_context io;
  // The acceptors, the purge timer and stop() run on this one strand, so that closing an
  // acceptor never races an accept that is being started on another thread.
  net::strand<net::io_context::executor_type> control = net::make_strand(io);
  ssl::context tls{ssl::context::tls_server};
  tcp::acceptor acceptor{control};
  std::optional<unix_socket::acceptor> admin_acceptor;
  net::steady_timer purge_timer{control};
  net::steady_timer accept_retry{control};
  std::atomic<bool> stopping{false};
  std::mutex conns_mu;
  uint64_t next_id = 0;
  std::map<uint64_t, std::weak_ptr<Connection>> conns;
  std::vector<std::weak_ptr<AdminConnection>> admin_conns;

  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(config.request_timeout_ms); }
  void accept();
  void accept_admin();
  void purge_tick();
  void forget(uint64_t id) {
    std::lock_guard lock(conns_mu);
    conns.erase(id);
  }
};

// One HTTPS connection: handshake, then requests until the client closes, a deadline passes, or
// the server stops. Handlers run on the io threads; the service call may block (fsync, ECDSA),
// which is why the server runs more threads than cores.
class Server::Impl::Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(std::shared_ptr<Impl> server, tcp::socket socket, uint64_t id)
      : server_(std::move(server)), stream_(std::move(socket), server_->tls), id_(id) {
    beast::error_code ec;
    auto ep = beast::get_lowest_layer(stream_).socket().remote_endpoint(ec);
    peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  }
  ~Connection() { server_->forget(id_); }

  void start() {
    beast::get_lowest_layer(stream_).expires_after(server_->timeout());
    stream_.async_handshake(ssl::stream_base::server, [self = shared_from_this()](beast::error_code ec) {
      if (ec) return self->close();
      self->read();
    });
  }

  // Called on stop(): an idle connection (waiting for a request) closes now; a busy one closes
  // after its response.
  void stop_if_idle() {
    net::post(stream_.get_executor(), [self = shared_from_this()] {
      if (!self->busy_) beast::get_lowest_layer(self->stream_).cancel();
    });
  }

 private:
  void read() {
    if (server_->stopping) return shutdown();
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(server_->config.max_body_bytes);
    beast::get_lowest_layer(stream_).expires_after(server_->timeout());
    http::async_read(stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::end_of_stream) return shutdown();
    HttpRequest req;
    req.peer = peer_;
    if (ec == http::error::body_limit) {
      const auto& msg = parser_->get();
      req.method = std::string(msg.method_string());
      req.target = std::string(msg.target());
      return respond(server_->service.refuse(req, Refusal::kBodyTooLarge,
                                             "over " + std::to_string(server_->config.max_body_bytes) + " bytes"),
                     false);
    }
    if (ec && ec.category() == http::make_error_code(http::error::bad_method).category() && ec != http::error::partial_message) {
      return respond(server_->service.refuse(req, Refusal::kBadRequest, ec.message()), false);
    }
    if (ec) return close();  // timeout, reset, TLS failure, or a stop() while idle
    busy_ = true;
    const auto& msg = parser_->get();
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    req.body = msg.body();
    if (auto it = msg.find(http::field::cookie); it != msg.end()) req.cookie = std::string(it->value());
    respond(server_->service.handle(req), msg.keep_alive());
  }

  void respond(HttpResponse r, bool keep_alive) {
    busy_ = true;
    res_ = {};
    res_.version(11);
    res_.result(static_cast<unsigned>(r.status));
    res_.set(http::field::server, "tresor-broker");
    res_.set(http::field::content_type, r.content_type);
    res_.set(http::field::cache_control, "no-store");
    if (!r.set_cookie.empty()) res_.set(http::field::set_cookie, r.set_cookie);
    res_.body() = std::move(r.body);
    keep_alive_ = keep_alive && !server_->stopping;
    res_.keep_alive(keep_alive_);
    res_.prepare_payload();
    beast::get_lowest_layer(stream_).expires_after(server_->timeout());
    http::async_write(stream_, res_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->busy_ = false;
      if (ec) return self->close();
      if (!self->keep_alive_) return self->shutdown();
      self->read();
    });
  }

  void shutdown() {
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(1));
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) { self->close(); });
  }

  void close() {
    beast::error_code ignored;
    beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_both, ignored);
    beast::get_lowest_layer(stream_).close();
  }

  std::shared_ptr<Impl> server_;
  beast::ssl_stream<beast::tcp_stream> stream_;
  uint64_t id_;
  std::string peer_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> res_;
  bool busy_ = false;
  bool keep_alive_ = false;
};

// One admin connection: newline-delimited JSON requests from a peer whose uid SO_PEERCRED vouched
// for (docs/broker.md §5).
class Server::Impl::AdminConnection : public std::enable_shared_from_this<AdminConnection> {
 public:
  AdminConnection(std::shared_ptr<Impl> server, unix_socket::socket socket, uint32_t uid)
      : server_(std::move(server)), socket_(std::move(socket)), uid_(uid) {}

  void close_soon() {
    net::post(socket_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->socket_.close(ignored);
    });
  }

  void read() {
    net::async_read_until(socket_, net::dynamic_buffer(in_, kAdminLineLimit), '\n',
                          [self = shared_from_this()](beast::error_code ec, size_t n) {
                            if (ec) return;  // closed, or a line over the limit: drop the connection
                            std::string line = self->in_.substr(0, n - 1);
                            self->in_.erase(0, n);
                            self->out_ = self->server_->admin->handle(line, self->uid_) + "\n";
                            net::async_write(self->socket_, net::buffer(self->out_), [self](beast::error_code ec2, size_t) {
                              if (!ec2) self->read();
                            });
                          });
  }

 private:
  std::shared_ptr<Impl> server_;
  unix_socket::socket socket_;
  uint32_t uid_;
  std::string in_, out_;
};

void Server::Impl::accept() {
  acceptor.async_accept(net::make_strand(io), [self = shared_from_this()](beast::error_code ec, tcp::socket socket) {
    if (ec) {
      if (!self->acceptor.is_open() || self->stopping) return;  // stopped
      // Out of file descriptors or memory: accepting again at once would spin. Existing
      // connections go on; new ones wait in the listen backlog for 100 ms.
      std::fprintf(stderr, "tresor-broker: accept failed: %s; retrying in 100 ms\n", ec.message().c_str());
      self->accept_retry.expires_after(std::chrono::milliseconds(100));
      self->accept_retry.async_wait([self](beast::error_code wec) {
        if (!wec && !self->stopping) self->accept();
      });
      return;
    }
    std::shared_ptr<Connection> c;
    {
      std::lock_guard lock(self->conns_mu);
      if (self->conns.size() < self->config.max_connections) {
        const uint64_t id = self->next_id++;
        c = std::make_shared<Connection>(self, std::move(socket), id);
        self->conns[id] = c;
      }
    }
    if (c) c->start();
    else socket.close();  // over max_connections: refuse at once, costs nothing
    self->accept();
  });
}

void Server::Impl::accept_admin() {
  admin_acceptor->async_accept(net::make_strand(io), [self = shared_from_this()](beast::error_code ec, unix_socket::socket socket) {
    if (ec) {
      if (!self->admin_acceptor->is_open()) return;
      return self->accept_admin();
    }
    ucred cred{};
    socklen_t len = sizeof cred;
    bool allowed = false;
    if (getsockopt(socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      allowed = cred.uid == 0 || cred.uid == geteuid() ||
                std::find(self->config.admin_uids.begin(), self->config.admin_uids.end(), cred.uid) != self->config.admin_uids.end();
    }
    if (allowed) {
      auto c = std::make_shared<AdminConnection>(self, std::move(socket), cred.uid);
      {
        std::lock_guard lock(self->conns_mu);
        std::erase_if(self->admin_conns, [](const auto& w) { return w.expired(); });
        self->admin_conns.push_back(c);
      }
      c->read();
    } else {
      std::fprintf(stderr, "tresor-broker: admin socket: refused uid %u (not root, the broker's uid, or in [admin] uids)\n",
                   static_cast<unsigned>(cred.uid));
      static const std::string msg = "{\"ok\":false,\"code\":\"permission\",\"error\":\"this uid may not administer the broker\"}\n";
      beast::error_code ignored;
      net::write(socket, net::buffer(msg), ignored);
    }
    self->accept_admin();
  });
}

void Server::Impl::purge_tick() {
  purge_timer.expires_after(std::chrono::seconds(1));
  purge_timer.async_wait([self = shared_from_this()](beast::error_code ec) {
    if (ec || self->stopping) return;
    self->service.purge();
    self->purge_tick();
  });
}

Result<std::unique_ptr<Server>> Server::create(const Config& config, Service& service, Admin* admin) {
  auto impl = std::make_shared<Impl>(config, service, admin);
  SSL_CTX* ctx = impl->tls.native_handle();
  // TLS 1.3 only (issue 4; docs/broker.md §3): no option lowers it.
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) != 1 || SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) != 1) {
    return fail(ErrorCode::kCrypto, "cannot restrict TLS to version 1.3");
  }
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
  struct stat st {};
  if (::stat(config.tls_private_key.c_str(), &st) != 0) return fail(ErrorCode::kIo, "[tls] private_key " + config.tls_private_key + " cannot be read");
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
    return fail(ErrorCode::kIo, "[tls] private_key " + config.tls_private_key + " may be read by group or others (mode " + mode +
                                    "); chmod 600 it");
  }
  if (SSL_CTX_use_certificate_chain_file(ctx, config.tls_certificate.c_str()) != 1) {
    return fail(ErrorCode::kIo, "[tls] certificate " + config.tls_certificate + " is not a readable PEM certificate chain");
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, config.tls_private_key.c_str(), SSL_FILETYPE_PEM) != 1) {
    return fail(ErrorCode::kIo, "[tls] private_key " + config.tls_private_key + " is not a readable PEM private key");
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    return fail(ErrorCode::kIo, "[tls] private_key does not belong to the certificate " + config.tls_certificate);
  }

  beast::error_code ec;
  const auto address = net::ip::make_address(config.address, ec);
  if (ec) return fail(ErrorCode::kInvalidArgument, "[listen] address " + config.address + ": " + ec.message());
  const tcp::endpoint ep(address, config.port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot listen on " + config.address + ":" + std::to_string(config.port) + ": " + ec.message());

  if (admin != nullptr) {
    const std::filesystem::path sock(config.admin_socket);
    std::error_code fec;
    if (std::filesystem::is_socket(sock, fec)) {
      // A socket file left by a crash is removed; one a running broker answers on is not.
      unix_socket::socket probe(impl->io);
      beast::error_code pec;
      probe.connect(unix_socket::endpoint(config.admin_socket), pec);
      if (!pec) return fail(ErrorCode::kExists, "[admin] socket " + config.admin_socket + " is in use by a running broker");
      std::filesystem::remove(sock, fec);
    }
    impl->admin_acceptor.emplace(impl->control);
    impl->admin_acceptor->open(unix_socket(), ec);
    if (!ec) impl->admin_acceptor->bind(unix_socket::endpoint(config.admin_socket), ec);
    // Owner and group only (the directory above it should be private too: RuntimeDirectory 0750).
    if (!ec && ::chmod(config.admin_socket.c_str(), 0660) != 0) ec = beast::error_code(errno, beast::system_category());
    if (!ec) impl->admin_acceptor->listen(net::socket_base::max_listen_connections, ec);
    if (ec) return fail(ErrorCode::kIo, "[admin] socket " + config.admin_socket + ": " + ec.message());
  }
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() {
  stop();
  if (impl_->admin_acceptor) {
    std::error_code ec;
    std::filesystem::remove(impl_->config.admin_socket, ec);
  }
}

uint16_t Server::port() const {
  beast::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

size_t Server::connections() const {
  std::lock_guard lock(impl_->conns_mu);
  return impl_->conns.size();
}

void Server::run() {
  net::post(impl_->control, [impl = impl_] {
    if (impl->stopping) return;
    impl->accept();
    if (impl->admin_acceptor) impl->accept_admin();
    impl->purge_tick();
  });
  std::vector<std::thread> threads;
  for (uint32_t i = 1; i < impl_->config.worker_threads; ++i) threads.emplace_back([this] { impl_->io.run(); });
  impl_->io.run();
  for (auto& t : threads) t.join();
}

void Server::stop() {
  if (impl_->stopping.exchange(true)) return;
  net::post(impl_->control, [impl = impl_] {
    beast::error_code ignored;
    impl->acceptor.close(ignored);
    if (impl->admin_acceptor) impl->admin_acceptor->close(ignored);
    impl->purge_timer.cancel();
    impl->accept_retry.cancel();
    std::vector<std::shared_ptr<Impl::Connection>> live;
    std::vector<std::shared_ptr<Impl::AdminConnection>> admins;
    {
      std::lock_guard lock(impl->conns_mu);
      for (auto& [id, w] : impl->conns) {
        if (auto c = w.lock()) live.push_back(std::move(c));
      }
      for (auto& w : impl->admin_conns) {
        if (auto c = w.lock()) admins.push_back(std::move(c));
      }
    }
    for (auto& c : live) c->stop_if_idle();
    for (auto& c : admins) c->close_soon();
  });
}

}  // namespace tresor::broker
