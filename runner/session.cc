// The host's side of the control channel (include/tresor/vm/session.h). One thread, one poll
// loop over the channel, the signal pipe and the relayed broker connections.
#include "tresor/vm/session.h"

#include "tresor/io.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/encoding.h"

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

// The guest's sealed outputs, one file at a time, under the output directory's descriptor. Every
// directory on the way is opened with O_NOFOLLOW (a symbolic link planted in the output directory
// cannot redirect a write), the file is created O_EXCL under a hidden temporary name and renamed
// over the final name only when its announced length has arrived.
class OutputWriter {
 public:
  explicit OutputWriter(int dir_fd) : root_(dir_fd) {}
  OutputWriter(const OutputWriter&) = delete;
  OutputWriter& operator=(const OutputWriter&) = delete;
  ~OutputWriter() { abandon(); }

  void begin(ByteSpan payload) {
    abandon();
    name_.assign(reinterpret_cast<const char*>(payload.data()), payload.size());
    auto parts = control::validate_output_name(name_);
    if (!parts) return refuse(parts.error());
    if (root_ < 0) return refuse(Error{ErrorCode::kInvalidArgument, "output " + name_ + ": this job has no output directory"});
    int dir = ::fcntl(root_, F_DUPFD_CLOEXEC, 0);
    for (size_t i = 0; i + 1 < parts->size() && dir >= 0; ++i) {
      const char* p = (*parts)[i].c_str();
      if (::mkdirat(dir, p, 0755) != 0 && errno != EEXIST) {
        const int err = errno;
        ::close(dir);
        return refuse(Error{ErrorCode::kIo, "output " + name_ + ": cannot create its directory " + (*parts)[i] + ": " + std::strerror(err)});
      }
      const int next = ::openat(dir, p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      const int err = errno;
      ::close(dir);
      dir = next;
      if (dir < 0) {
        return refuse(Error{ErrorCode::kIo, "output " + name_ + ": " + (*parts)[i] + " is not a directory (or a symbolic link): " + std::strerror(err)});
      }
    }
    if (dir < 0) return refuse(Error{ErrorCode::kIo, "output " + name_ + ": " + std::strerror(errno)});
    dir_ = dir;
    final_ = parts->back();
    std::array<std::byte, 6> rnd{};
    if (auto r = crypto::random_bytes(rnd); !r) return refuse(r.error());
    temp_ = "." + final_.substr(0, 200) + ".tresor-" + to_hex(rnd) + ".part";
    fd_ = ::openat(dir_, temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      temp_.clear();
      return refuse(Error{ErrorCode::kIo, "output " + name_ + ": cannot create it: " + std::strerror(errno)});
    }
    written_ = 0;
  }
  void data(ByteSpan payload) {
    if (fd_ < 0) return;  // refused or not begun: its bytes are dropped, the error is kept
    if (auto w = write_all_fd(fd_, payload, "output " + name_); !w) return refuse(w.error());
    written_ += payload.size();
  }
  void end(ByteSpan payload) {
    if (fd_ < 0) {
      if (!error_ && name_.empty()) error_ = Error{ErrorCode::kMalformed, "control channel: an output ended that never began"};
      name_.clear();
      return;
    }
    if (payload.size() != 8 || load_be64(payload.data()) != written_) {
      return refuse(Error{ErrorCode::kTruncated, "output " + name_ + ": " + std::to_string(written_) + " bytes arrived, not the length the guest announced"});
    }
    if (::fsync(fd_) != 0 || ::renameat(dir_, temp_.c_str(), dir_, final_.c_str()) != 0) {
      return refuse(Error{ErrorCode::kIo, "output " + name_ + ": cannot put it in place: " + std::strerror(errno)});
    }
    temp_.clear();
    ++files_;
    close_file();
    name_.clear();
  }
  /// The first failure, if any; a file still open (the guest ended mid-file) counts as one.
  std::optional<Error> finish() {
    if (fd_ >= 0 && !error_) error_ = Error{ErrorCode::kTruncated, "output " + name_ + ": the guest stopped in the middle of it"};
    abandon();
    return error_;
  }

 private:
  void refuse(const Error& e) {
    if (!error_) error_ = e;
    abandon();
  }
  void abandon() {
    if (!temp_.empty() && dir_ >= 0) ::unlinkat(dir_, temp_.c_str(), 0);
    temp_.clear();
    close_file();
  }
  void close_file() {
    if (fd_ >= 0) ::close(fd_);
    if (dir_ >= 0) ::close(dir_);
    fd_ = dir_ = -1;
  }
  int root_;
  int dir_ = -1, fd_ = -1;
  std::string name_, final_, temp_;
  uint64_t written_ = 0;
  size_t files_ = 0;
  std::optional<Error> error_;
};

}  // namespace

Result<int> serve_guest(int fd, const HostSession& s) {
  control::Channel ch(fd);
  TRESOR_TRY(ch.send(Type::kStart, control::encode_start(s.start)));
  OutputWriter outputs(s.output_dir_fd);
  std::map<uint32_t, int> conns;  // connection id → socket to the broker
  bool first = true;
  auto close_all = [&] {
    for (auto& [id, c] : conns) ::close(c);
    conns.clear();
  };
  const auto deadline = std::chrono::steady_clock::now() + s.first_frame_timeout;
  for (;;) {
    int wait_ms = -1;
    if (first && s.first_frame_timeout.count() > 0) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
      if (left <= 0) {
        close_all();
        char why[160];
        std::snprintf(why, sizeof why, "the VM's agent did not answer within %.1f s of the VM's start (it hangs in its firmware or kernel?)",
                      static_cast<double>(s.first_frame_timeout.count()) / 1000.0);
        return fail(ErrorCode::kUnavailable, why);
      }
      wait_ms = static_cast<int>(left);
    }
    std::vector<pollfd> fds = {{fd, POLLIN, 0}};
    if (s.signal_fd >= 0) fds.push_back({s.signal_fd, POLLIN, 0});
    const size_t first_conn = fds.size();
    std::vector<uint32_t> ids;
    for (const auto& [id, c] : conns) {
      fds.push_back({c, POLLIN, 0});
      ids.push_back(id);
    }
    if (::poll(fds.data(), fds.size(), wait_ms) < 0) {
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
      case Type::kOutputBegin:
        outputs.begin(m->payload);
        break;
      case Type::kOutputData:
        outputs.data(m->payload);
        break;
      case Type::kOutputEnd:
        outputs.end(m->payload);
        break;
      case Type::kExit: {
        close_all();
        auto status = control::decode_exit(m->payload);
        if (auto e = outputs.finish(); e && status) {
          return fail(e->code, e->message + " (the job itself " +
                                   (WIFEXITED(*status) ? "exited with " + std::to_string(WEXITSTATUS(*status))
                                                       : "was killed by signal " + std::to_string(WTERMSIG(*status))) + ")");
        }
        return status;
      }
      default:
        break;  // host-bound types only
    }
  }
}

}  // namespace tresor::vm
