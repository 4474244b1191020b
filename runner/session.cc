// The host's side of the control channel (include/tresor/vm/session.h). One thread, one poll
// loop over the channel, the signal pipe and the relayed broker connections.
#include "tresor/vm/session.h"

#include "tresor/io.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <vector>

namespace tresor::vm {
namespace {

using control::Type;

int connect_to(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  return fd;
}

}  // namespace

Result<int> serve_guest(int fd, const HostSession& s) {
  control::Channel ch(fd);
  TRESOR_TRY(ch.send(Type::kStart, control::encode_start(s.start)));
  std::map<uint32_t, int> conns;  // connection id → socket to the broker
  bool first = true;
  auto close_all = [&] {
    for (auto& [id, c] : conns) ::close(c);
    conns.clear();
  };
  for (;;) {
    std::vector<pollfd> fds = {{fd, POLLIN, 0}};
    if (s.signal_fd >= 0) fds.push_back({s.signal_fd, POLLIN, 0});
    const size_t first_conn = fds.size();
    std::vector<uint32_t> ids;
    for (const auto& [id, c] : conns) {
      fds.push_back({c, POLLIN, 0});
      ids.push_back(id);
    }
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      close_all();
      return fail(ErrorCode::kIo, std::string("control channel: poll: ") + std::strerror(errno));
    }
    if (s.signal_fd >= 0 && (fds[1].revents & POLLIN) != 0) {
      unsigned char sig = 0;
      if (::read(s.signal_fd, &sig, 1) == 1) (void)ch.send(Type::kSignal, Bytes{std::byte{sig}});
    }
    for (size_t i = first_conn; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      std::byte buf[16384];
      const ssize_t n = ::recv(fds[i].fd, buf, sizeof buf, 0);
      if (n > 0) {
        TRESOR_TRY(ch.send(Type::kBrokerData, control::encode_connection(ids[i - first_conn], ByteSpan(buf, static_cast<size_t>(n)))));
      } else if (n == 0 || errno != EINTR) {
        TRESOR_TRY(ch.send(Type::kBrokerClose, control::encode_connection(ids[i - first_conn])));
        ::close(fds[i].fd);
        conns.erase(ids[i - first_conn]);
      }
    }
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
    auto m = ch.receive();
    if (!m) {
      close_all();
      if (m.error().code == ErrorCode::kUnavailable) {
        return fail(ErrorCode::kUnavailable, "the VM ended without reporting the job's status (the guest crashed, or was destroyed)");
      }
      return std::unexpected(m.error());
    }
    if (first && s.on_first_frame) s.on_first_frame();
    first = false;
    switch (m->type) {
      case Type::kStdout:
        (void)write_all_fd(s.out_fd, m->payload, "the job's output");
        break;
      case Type::kStderr:
        (void)write_all_fd(s.err_fd, m->payload, "the job's output");
        break;
      case Type::kEvidenceRequest: {
        if (!s.evidence || m->payload.size() != 64) {
          const std::string why = !s.evidence ? "this VM's evidence comes from its own AMD-SP" : "REPORT_DATA must be 64 bytes";
          TRESOR_TRY(ch.send(Type::kEvidenceError, as_bytes(why)));
          break;
        }
        std::array<std::byte, 64> rd{};
        std::copy(m->payload.begin(), m->payload.end(), rd.begin());
        auto ev = s.evidence(rd);
        if (ev) {
          TRESOR_TRY(ch.send(Type::kEvidence, control::encode_evidence(*ev)));
        } else {
          TRESOR_TRY(ch.send(Type::kEvidenceError, as_bytes(ev.error().message)));
        }
        break;
      }
      case Type::kBrokerOpen: {
        auto c = control::decode_connection(m->payload);
        if (!c) break;
        const int b = connect_to(s.broker_host, s.broker_port);
        if (b < 0) {
          TRESOR_TRY(ch.send(Type::kBrokerClose, control::encode_connection(c->first)));
        } else {
          conns[c->first] = b;
        }
        break;
      }
      case Type::kBrokerData: {
        auto c = control::decode_connection(m->payload);
        // A broker that went away: its close reaches the guest through poll.
        if (c && conns.contains(c->first)) (void)write_all_fd(conns[c->first], c->second, "broker connection");
        break;
      }
      case Type::kBrokerClose: {
        auto c = control::decode_connection(m->payload);
        if (c && conns.contains(c->first)) {
          ::close(conns[c->first]);
          conns.erase(c->first);
        }
        break;
      }
      case Type::kExit: {
        close_all();
        return control::decode_exit(m->payload);
      }
      default:
        break;  // host-bound types only
    }
  }
}

}  // namespace tresor::vm
