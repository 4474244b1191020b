// tresor-agent --guest: the agent as a VM's guest runs it (docs/protocol.md §control channel).
// /init (guest/init.sh) starts it with the control channel's port; everything the job needs
// comes over that one channel:
//  - the job (kStart): manifest, command (and the batch script's text), environment, the
//    broker's URL and CA, the datasets, the evidence source;
//  - the key broker: the guest has no network. The agent listens on the broker's own address on
//    the guest's loopback (the broker's name maps to 127.0.0.1 in /etc/hosts) and relays each
//    TLS connection through the channel; the host only passes bytes on, and TLS is end to end;
//  - sim evidence (kEvidenceRequest), when the VM is not an SEV-SNP guest;
//  - signals for the job (kSignal); the job's stdout and stderr go back as kStdout/kStderr;
//  - the sealed outputs (kOutputBegin/Data/End): sealed into the guest's own memory, then sent
//    to the host one file at a time (the host has no writable share into the guest);
//  - the job's status (kExit), last.
// The datasets are read-only shares, where /init mounted them: <root>/mnt/tresor-data-<i> (the
// manifest's, in order). `--guest-root` moves <root> (tests run the guest side in a process with
// its own network namespace instead of a VM).
#include "guest.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <algorithm>
#include <vector>
#include <thread>

#include "tresor/agent/agent.h"
#include "tresor/agent/guest_evidence.h"
#include "tresor/io.h"
#include "tresor/slurm/job.h"
#include "tresor/vm/control.h"

namespace tresor::agent {
namespace {

namespace fs = std::filesystem;
using vm::control::Channel;
using vm::control::Type;

// Evidence from the host's sim secure processor, across the multiplexed channel.
class MuxEvidence final : public EvidenceProvider {
 public:
  explicit MuxEvidence(Channel& ch) : ch_(ch) {}
  Result<kbs::Evidence> evidence(const std::array<std::byte, 64>& report_data) override {
    std::unique_lock lock(m_);
    reply_.reset();
    TRESOR_TRY(ch_.send(Type::kEvidenceRequest, report_data));
    cv_.wait(lock, [&] { return reply_.has_value() || closed_; });
    if (!reply_) return fail(ErrorCode::kUnavailable, "the control channel closed while waiting for evidence");
    auto r = std::move(*reply_);
    reply_.reset();
    return r;
  }
  void deliver(Result<kbs::Evidence> r) {
    std::lock_guard lock(m_);
    reply_ = std::move(r);
    cv_.notify_all();
  }
  void close() {
    std::lock_guard lock(m_);
    closed_ = true;
    cv_.notify_all();
  }

 private:
  Channel& ch_;
  std::mutex m_;
  std::condition_variable cv_;
  std::optional<Result<kbs::Evidence>> reply_;
  bool closed_ = false;
};

// The broker's connections, relayed through the channel.
class BrokerRelay {
 public:
  explicit BrokerRelay(Channel& ch) : ch_(ch) {}
  ~BrokerRelay() {
    if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
    if (acceptor_.joinable()) acceptor_.join();
    std::lock_guard lock(m_);
    for (auto& [id, fd] : conns_) ::shutdown(fd, SHUT_RDWR);
    for (auto& t : pumps_) t.join();  // the sockets' pumps end at the shutdown
    for (auto& [id, fd] : conns_) ::close(fd);
    if (listen_fd_ >= 0) ::close(listen_fd_);
  }
  Result<void> listen(uint16_t port) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_fd_, 16) != 0) {
      return fail(ErrorCode::kIo, "cannot listen on 127.0.0.1:" + std::to_string(port) + " for the broker relay: " + std::strerror(errno));
    }
    acceptor_ = std::thread([this] { accept_loop(); });
    return {};
  }
  void from_host(uint32_t id, ByteSpan data) {
    if (const int fd = find(id); fd >= 0) (void)write_all_fd(fd, data, "broker relay");
  }
  void closed_by_host(uint32_t id) {
    const int fd = find(id);
    if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
  }

 private:
  int find(uint32_t id) {
    std::lock_guard lock(m_);
    auto it = conns_.find(id);
    return it == conns_.end() ? -1 : it->second;
  }
  void accept_loop() {
    for (;;) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR) continue;
        return;  // shut down
      }
      std::lock_guard lock(m_);
      const uint32_t id = next_++;
      conns_[id] = fd;
      (void)ch_.send(Type::kBrokerOpen, vm::control::encode_connection(id));
      pumps_.emplace_back([this, id, fd] {
        std::byte buf[16384];
        for (;;) {
          const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) break;
          if (!ch_.send(Type::kBrokerData, vm::control::encode_connection(id, ByteSpan(buf, static_cast<size_t>(n))))) break;
        }
        (void)ch_.send(Type::kBrokerClose, vm::control::encode_connection(id));
      });
    }
  }
  Channel& ch_;
  int listen_fd_ = -1;
  std::thread acceptor_;
  std::mutex m_;
  std::map<uint32_t, int> conns_;
  std::vector<std::thread> pumps_;
  uint32_t next_ = 1;
};

// The guest's loopback up (init does it in a VM; a test's network namespace starts with it down).
void loopback_up() {
  const int s = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  ifreq r{};
  std::strncpy(r.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(s, SIOCGIFFLAGS, &r) == 0) {
    r.ifr_flags = static_cast<short>(r.ifr_flags | IFF_UP);
    ::ioctl(s, SIOCSIFFLAGS, &r);
  }
  ::close(s);
}

// https://HOST:PORT → (HOST, PORT)
std::optional<std::pair<std::string, uint16_t>> host_port(const std::string& url) {
  if (!url.starts_with("https://")) return std::nullopt;
  const std::string rest = url.substr(8);
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos) return std::nullopt;
  const int port = std::atoi(rest.substr(colon + 1).c_str());
  if (port <= 0 || port > 65535) return std::nullopt;
  const std::string host = rest.substr(0, colon);
  // A host name or IPv4 address only: it goes into the guest's /etc/hosts.
  if (host.empty() || host.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-") != std::string::npos) {
    return std::nullopt;
  }
  return std::pair<std::string, uint16_t>{host, static_cast<uint16_t>(port)};
}

// Every sealed file under `dir` to the host, in name order, each removed once sent. The first
// failure ends the sending (the host reports the outputs it did not get complete).
Result<size_t> send_outputs(Channel& ch, const fs::path& dir) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path());
  }
  if (ec) return fail(ErrorCode::kIo, "cannot list " + dir.string() + ": " + ec.message());
  std::sort(files.begin(), files.end());
  std::vector<std::byte> buf(256 << 10);
  for (const auto& f : files) {
    const std::string name = fs::relative(f, dir).string();
    const int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fail(ErrorCode::kIo, "cannot read the sealed output " + name + ": " + std::strerror(errno));
    uint64_t total = 0;
    Result<void> sent = ch.send(Type::kOutputBegin, as_bytes(name));
    while (sent) {
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        sent = fail(ErrorCode::kIo, "cannot read the sealed output " + name + ": " + std::strerror(errno));
        break;
      }
      if (n == 0) break;
      total += static_cast<uint64_t>(n);
      sent = ch.send(Type::kOutputData, ByteSpan(buf.data(), static_cast<size_t>(n)));
    }
    ::close(fd);
    if (!sent) return std::unexpected(sent.error());  // no kOutputEnd: the host drops the partial file
    std::array<std::byte, 8> len{};
    store_be64(len.data(), total);
    TRESOR_TRY(ch.send(Type::kOutputEnd, len));
    fs::remove(f, ec);
  }
  return files.size();
}

}  // namespace

bool guest_env_allowed(std::string_view name) {
  // glibc's list of variables unsafe for setuid programs (sysdeps/generic/unsecvars.h), which
  // covers the dynamic loader's (LD_*), plus PATH, which the guest sets itself.
  static constexpr std::string_view kUnsafe[] = {"GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE",
                                                  "NIS_PATH",   "NLSPATH",     "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
                                                  "PATH",       "BASH_ENV",    "ENV"};
  if (name.starts_with("LD_") || name.starts_with("GLIBC_TUNABLES") || name.starts_with("MALLOC_")) return false;
  for (auto u : kUnsafe) {
    if (name == u) return false;
  }
  return true;
}

int run_guest(int fd, const std::string& root) {
  Channel ch(fd);
  auto first = ch.receive();
  if (!first || first->type != Type::kStart) {
    std::fprintf(stderr, "tresor-agent: the control channel did not start with the job: %s\n",
                 first ? "another message came first" : first.error().message.c_str());
    return 2;
  }
  auto start = vm::control::decode_start(first->payload);
  if (!start) {
    std::fprintf(stderr, "tresor-agent: %s\n", start.error().message.c_str());
    return 2;
  }

  // From here on, the agent's and the job's output goes to the host over the channel.
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) return 2;
  ::dup2(out_pipe[1], STDOUT_FILENO);
  ::dup2(err_pipe[1], STDERR_FILENO);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  auto pump = [&ch](int from, Type type) {
    return std::thread([&ch, from, type] {
      std::byte buf[16384];
      for (;;) {
        const ssize_t n = ::read(from, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (!ch.send(type, ByteSpan(buf, static_cast<size_t>(n)))) break;
      }
      ::close(from);
    });
  };
  std::thread out_pump = pump(out_pipe[0], Type::kStdout), err_pump = pump(err_pipe[0], Type::kStderr);

  MuxEvidence mux(ch);
  BrokerRelay relay(ch);
  std::atomic<pid_t> job{0};
  std::atomic<int> pending{0};
  std::thread reader([&] {
    for (;;) {
      auto m = ch.receive();
      if (!m) break;
      switch (m->type) {
        case Type::kEvidence:
          mux.deliver(vm::control::decode_evidence(m->payload));
          break;
        case Type::kEvidenceError:
          mux.deliver(fail(ErrorCode::kUnavailable, "the host could not produce evidence: " +
                                                         std::string(reinterpret_cast<const char*>(m->payload.data()), m->payload.size())));
          break;
        case Type::kSignal:
          if (m->payload.size() != 1) break;
          // Before the job starts (scancel while the VM boots or the agent attests), the signal
          // waits and reaches the job the moment it exists.
          pending = static_cast<int>(m->payload[0]);
          if (job.load() > 0) ::kill(job.load(), pending.load());
          break;
        case Type::kBrokerData:
          if (auto c = vm::control::decode_connection(m->payload)) relay.from_host(c->first, c->second);
          break;
        case Type::kBrokerClose:
          if (auto c = vm::control::decode_connection(m->payload)) relay.closed_by_host(c->first);
          break;
        default:
          break;  // guest-bound types only
      }
    }
    mux.close();
  });

  int status = 2 << 8;
  [&] {
    auto manifest = slurm::decode_manifest_env(start->manifest_env);
    if (!manifest) {
      std::cerr << "tresor-agent: the job's manifest is unreadable: " << manifest.error().message << std::endl;
      return;
    }
    auto manifest_json = manifest_json_of(*manifest);
    if (!manifest_json) return;
    auto broker = host_port(start->broker_url);
    if (!broker) {
      std::cerr << "tresor-agent: broker URL '" << start->broker_url << "' is not https://HOST:PORT" << std::endl;
      return;
    }
    loopback_up();
    if (root == "/" && broker->first != "127.0.0.1") {
      std::ofstream("/etc/hosts", std::ios::app) << "127.0.0.1 " << broker->first << "\n";  // the relay answers for the broker's name
    }
    if (auto l = relay.listen(broker->second); !l) {
      std::cerr << "tresor-agent: " << l.error().message << std::endl;
      return;
    }
    // The job's files: CA, script, dataset links, private memory.
    const fs::path base = fs::path(root) / "tmp/tresor-job";
    std::error_code ec;
    fs::create_directories(base / "datasets", ec);
    fs::create_directories(base / "sealed", ec);
    fs::permissions(base, fs::perms::owner_all, ec);
    Options o;
    o.broker_url = start->broker_url;
    o.broker_ca = (base / "broker-ca.pem").string();
    std::ofstream(o.broker_ca) << start->broker_ca_pem;
    // The shares are the signed manifest's datasets, in its order; the host's list must agree.
    if (start->datasets != manifest->datasets) {
      std::cerr << "tresor-agent: the host's dataset list does not match the job's manifest; nothing was run" << std::endl;
      return;
    }
    for (size_t i = 0; i < manifest->datasets.size(); ++i) {
      const fs::path link = base / "datasets" / manifest->datasets[i];
      fs::create_directories(link.parent_path(), ec);
      fs::create_symlink(fs::path(root) / ("mnt/tresor-data-" + std::to_string(i)), link, ec);
    }
    o.data_root = (base / "datasets").string();
    o.output_dir = (base / "sealed").string();
    o.private_dir = (base / "private").string();
    o.command = start->command;
    // TRESOR_INPUTS chooses whether the agent opens the inputs before the job or the job opens
    // them itself; both happen in the guest. With "sealed" the host sees when the job reads which
    // input (docs/threat-model.md §5), not more: the keys stay in the guest.
    const auto inputs = start->env.find("TRESOR_INPUTS");
    auto sealed_inputs = agent::sealed_inputs_from(inputs == start->env.end() ? nullptr : inputs->second.c_str());
    if (!sealed_inputs) {
      std::cerr << "tresor-agent: " << sealed_inputs.error().message << "; nothing was run" << std::endl;
      return;
    }
    o.sealed_inputs = *sealed_inputs;
    if (!start->script.empty()) {
      o.command[0] = (base / "script").string();
      std::ofstream(o.command[0]) << start->script;
      fs::permissions(o.command[0], fs::perms::owner_all, ec);
    }
    if (auto c = slurm::check_command(*manifest, o.command); !c) {
      std::cerr << "tresor-agent: " << c.error().message << "; nothing was run" << std::endl;
      return;
    }
    // The job's environment comes from the untrusted host: nothing in it may choose what code
    // runs in the guest. The loader's variables and the others glibc ignores for setuid programs
    // are dropped, and PATH is the guest's own (the shares are also mounted noexec).
    ::clearenv();
    for (const auto& [k, v] : start->env) {
      if (!guest_env_allowed(k)) continue;
      ::setenv(k.c_str(), v.c_str(), 1);
    }
    ::setenv("PATH", "/bin:/usr/bin", 1);
    ::setenv("TMPDIR", (fs::path(root) / "tmp").c_str(), 1);
    ::setenv(std::string(slurm::kInsideEnv).c_str(), "1", 1);
    // TRESOR_STEP_ROSTER=1: this task claims its rank of the step; every task has its own VM, on
    // the node's step network when the runner gave it one (its address from /init's DHCP).
    Result<std::string> address = std::string();
    if (const char* w = std::getenv("TRESOR_STEP_ROSTER"); w != nullptr && std::string_view(w) == "1") address = step_network_address();
    auto link = address ? step_link_from([](const char* name) { return std::getenv(name); }, *manifest, *address)
                        : Result<std::optional<StepLink>>(std::unexpected(address.error()));
    if (!link) {
      std::cerr << "tresor-agent: " << link.error().message << "; nothing was run" << std::endl;
      return;
    }
    o.step_link = std::move(*link);
    std::unique_ptr<EvidenceProvider> own;
    EvidenceProvider* evidence = &mux;
    if (start->evidence != "channel") {
      auto p = guest_evidence_provider(start->evidence);
      if (!p) {
        std::cerr << "tresor-agent: " << p.error().message << std::endl;
        return;
      }
      own = std::move(*p);
      evidence = own.get();
    }
    status = run_job(o, *manifest, *manifest_json, *evidence, std::getenv("TRESOR_TIMING") != nullptr, std::cerr,
                     [&](pid_t pid) {
                       job = pid;
                       if (pending.load() != 0) ::kill(pid, pending.load());
                     },
                     [&] { return pending.load(); });
    job = 0;
    // The outputs it sealed (also those of a failed job: they are the user's too).
    if (auto sent = send_outputs(ch, o.output_dir); !sent) {
      std::cerr << "tresor-agent: the sealed outputs could not all be sent to the host: " << sent.error().message << std::endl;
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) status = 1 << 8;
    } else if (*sent > 0) {
      std::cerr << "tresor-agent: " << *sent << " sealed output file(s) sent to the host" << std::endl;
    }
  }();

  // Output first, then the status: the host leaves when it has the status.
  std::cout.flush();
  std::cerr.flush();
  const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  ::dup2(null, STDOUT_FILENO);
  ::dup2(null, STDERR_FILENO);
  out_pump.join();
  err_pump.join();
  (void)ch.send(Type::kExit, vm::control::encode_exit(status));
  ::shutdown(fd, SHUT_WR);  // a socket (tests); a virtio port ignores it and the VM powers off
  reader.detach();          // it ends with the channel, or with the VM
  return 0;
}

}  // namespace tresor::agent
