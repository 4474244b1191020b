#include "support/test_support.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>

#include "tresor/io.h"

namespace tresor::testing {

Result<void> DeterministicRandom::fill(MutableByteSpan out) {
  size_t done = 0;
  while (done < out.size()) {
    Bytes in = to_bytes(seed_);
    for (int i = 7; i >= 0; --i) in.push_back(std::byte((counter_ >> (8 * i)) & 0xff));
    ++counter_;
    auto h = crypto::sha256(in);
    if (!h) return std::unexpected(h.error());
    const size_t n = std::min(out.size() - done, h->size());
    std::memcpy(out.data() + done, h->data(), n);
    done += n;
  }
  return {};
}

Bytes pattern_bytes(size_t n, uint32_t seed) {
  // xorshift64*: fast and fine for test payloads (not for keys).
  uint64_t x = 0x9E3779B97F4A7C15ull ^ (uint64_t{seed} * 0xD1B54A32D192ED03ull);
  Bytes out(n);
  for (size_t i = 0; i < n; i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const uint64_t v = x * 0x2545F4914F6CDD1Dull;
    for (size_t k = 0; k < 8 && i + k < n; ++k) out[i + k] = std::byte((v >> (8 * k)) & 0xff);
  }
  return out;
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "tresor-test-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Bytes read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return to_bytes(s);
}

void write_file(const std::string& path, ByteSpan data, unsigned mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) throw std::runtime_error("cannot create " + path);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error("cannot write " + path);
    }
    done += static_cast<size_t>(n);
  }
  ::fchmod(fd, mode);
  ::close(fd);
}

// TRESOR_TESTDATA overrides the build's path (scripts/gpu-check runs prebuilt tests elsewhere).
std::string testdata(const std::string& relative) {
  const char* dir = std::getenv("TRESOR_TESTDATA");
  return std::string(dir != nullptr && *dir != '\0' ? dir : TRESOR_TESTDATA_DIR) + "/" + relative;
}

std::string shared_testdata(const std::string& relative) {
  return std::string(TRESOR_SHARED_TESTDATA_DIR) + "/" + relative;
}

std::time_t milan_report_time() {
  std::tm tm{};
  tm.tm_year = 125;
  tm.tm_mon = 5;
  tm.tm_mday = 1;
  return timegm(&tm);
}

snp::VerifiedReport verified_milan() {
  const Bytes report = read_file(shared_testdata("snp/milan-v2-virtee/report.bin"));
  const Bytes vcek = read_file(shared_testdata("snp/milan-v2-virtee/vcek.der"));
  snp::VerifyInputs in;
  in.report = report;
  in.endorsement_cert = vcek;
  in.at = milan_report_time();
  auto v = snp::verify_report(in);
  EXPECT_TRUE(v) << v.error().message;
  return v ? *v : snp::VerifiedReport{};
}

CommandResult run_command(const std::vector<std::string>& argv, const std::string& stdin_data) {
  // A child that exits before reading all its input must not kill the test with SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  int in_pipe[2], out_pipe[2], err_pipe[2];
  if (::pipe2(in_pipe, O_CLOEXEC) || ::pipe2(out_pipe, O_CLOEXEC) || ::pipe2(err_pipe, O_CLOEXEC)) {
    throw std::runtime_error("pipe failed");
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::signal(SIGPIPE, SIG_DFL);
    ::dup2(in_pipe[0], 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    _exit(127);
  }
  ::close(in_pipe[0]);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  CommandResult r;
  size_t written = 0;
  if (stdin_data.empty()) {
    ::close(in_pipe[1]);
    in_pipe[1] = -1;
  } else {
    ::fcntl(in_pipe[1], F_SETFL, O_NONBLOCK);
  }
  bool out_open = true, err_open = true;
  char buf[65536];
  while (out_open || err_open || in_pipe[1] >= 0) {
    pollfd fds[3];
    int nfds = 0;
    if (out_open) fds[nfds++] = {out_pipe[0], POLLIN, 0};
    if (err_open) fds[nfds++] = {err_pipe[0], POLLIN, 0};
    if (in_pipe[1] >= 0) fds[nfds++] = {in_pipe[1], POLLOUT, 0};
    if (::poll(fds, static_cast<nfds_t>(nfds), -1) < 0) break;
    for (int i = 0; i < nfds; ++i) {
      if (fds[i].revents == 0) continue;
      if (fds[i].fd == in_pipe[1]) {
        const ssize_t n = ::write(in_pipe[1], stdin_data.data() + written, stdin_data.size() - written);
        if (n > 0) written += static_cast<size_t>(n);
        if (n < 0 || written == stdin_data.size()) {
          ::close(in_pipe[1]);
          in_pipe[1] = -1;
        }
        continue;
      }
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      std::string& dst = fds[i].fd == out_pipe[0] ? r.out : r.err;
      if (n > 0) {
        dst.append(buf, static_cast<size_t>(n));
      } else {
        (fds[i].fd == out_pipe[0] ? out_open : err_open) = false;
      }
    }
  }
  ::close(out_pipe[0]);
  ::close(err_pipe[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

CommandResult run_tresor(const std::vector<std::string>& args, const std::string& stdin_data) {
  std::vector<std::string> argv{TRESOR_BIN};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, stdin_data);
}

Background::Background(const std::vector<std::string>& argv) {
  int out[2];
  if (::pipe(out) != 0) throw std::runtime_error("pipe failed");
  pid_ = ::fork();
  if (pid_ == 0) {
    ::dup2(out[1], 1);
    ::close(out[0]);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]);
  char c;
  while (::read(out[0], &c, 1) == 1 && c != '\n') line_.push_back(c);
  ::close(out[0]);
}

StepBridge::StepBridge(std::string name, std::string prefix, const std::string& work_dir)
    : name_(std::move(name)), log_(work_dir + "/udhcpd-" + name_ + ".log") {
  run_command({"/bin/sh", "-c", "ip link del " + name_ + " 2>/dev/null"});
  auto made = run_command({"/bin/sh", "-c", "ip link add " + name_ + " type bridge && ip addr add " + prefix + ".1/24 dev " + name_ +
                                                " && ip link set " + name_ + " up"});
  if (made.exit_code != 0) {
    error_ = "cannot make the test bridge " + name_ + ": " + made.err;
    return;
  }
  const std::string conf = work_dir + "/udhcpd-" + name_ + ".conf", leases = work_dir + "/udhcpd-" + name_ + ".leases";
  std::ofstream(conf) << "start " << prefix << ".10\nend " << prefix << ".50\ninterface " << name_ << "\nlease_file " << leases
                      << "\npidfile " << work_dir << "/udhcpd-" << name_ << ".pid\nopt subnet 255.255.255.0\nopt lease 3600\n";
  std::ofstream(leases).flush();
  dhcp_ = std::make_unique<Background>(std::vector<std::string>{"/bin/sh", "-c", "echo up; exec /bin/busybox udhcpd -f " + conf + " > " + log_ + " 2>&1"});
}

StepBridge::~StepBridge() {
  dhcp_.reset();
  run_command({"/bin/sh", "-c", "ip link del " + name_ + " 2>/dev/null"});
}

std::string StepBridge::log() const {
  std::ifstream in(log_);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

Background::~Background() {
  if (pid_ > 0) kill(SIGKILL);
}

int Background::kill(int sig) {
  ::kill(pid_, sig);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string unix_line_request(const std::string& socket_path, const std::string& line) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (fd < 0 || socket_path.size() >= sizeof addr.sun_path) return "";
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return "";
  }
  const std::string msg = line + "\n";
  // A peer that refuses may close before the request is written; its reply is read all the same.
  (void)::send(fd, msg.data(), msg.size(), MSG_NOSIGNAL);
  std::string reply;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0) {
    reply.append(buf, static_cast<size_t>(n));
    if (reply.back() == '\n') break;
  }
  ::close(fd);
  return reply.empty() || reply.back() != '\n' ? "" : reply;
}

int port_in(const std::string& line) {
  const size_t scheme = line.find("://");
  if (scheme == std::string::npos) return 0;
  const size_t colon = line.find(':', scheme + 3);
  return colon == std::string::npos ? 0 : std::atoi(line.c_str() + colon + 1);
}

std::vector<float> normal_floats(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

uint16_t free_loopback_port() {
  auto port = unused_loopback_port();
  if (!port) throw std::runtime_error(port.error().message);
  return *port;
}

}  // namespace tresor::testing
