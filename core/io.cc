#include "tresor/io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <stdio.h>  // renameat2, RENAME_NOREPLACE (glibc >= 2.28)
#include <cstring>
#include <utility>

#include "tresor/crypto.h"

namespace tresor {
namespace {

std::unexpected<Error> io_fail(const std::string& what, const std::string& name, int err = errno) {
  return fail(ErrorCode::kIo, what + " " + name + ": " + std::strerror(err));
}

Result<void> pwrite_all(int fd, uint64_t offset, ByteSpan data, const std::string& name) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_fail("cannot write", name);
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

}  // namespace

Result<void> write_all_fd(int fd, ByteSpan data, std::string_view what) {
  for (size_t off = 0; off < data.size();) {
    ssize_t w = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (w < 0 && errno == ENOTSOCK) w = ::write(fd, data.data() + off, data.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return fail(ErrorCode::kIo, std::string(what) + ": write: " + std::strerror(errno));
    off += static_cast<size_t>(w);
  }
  return {};
}

Result<bool> read_exact_fd(int fd, MutableByteSpan out, std::string_view what) {
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t r = ::read(fd, out.data() + got, out.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fail(ErrorCode::kIo, std::string(what) + ": read: " + std::strerror(errno));
    if (r == 0) {
      if (got == 0) return false;
      return fail(ErrorCode::kTruncated, std::string(what) + ": the other end closed in the middle of a frame");
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

Result<size_t> read_full(ByteSource& src, MutableByteSpan out) {
  size_t n = 0;
  while (n < out.size()) {
    auto r = src.read(out.subspan(n));
    if (!r) return std::unexpected(r.error());
    if (*r == 0) break;
    n += *r;
  }
  return n;
}

Result<size_t> MemorySource::read(MutableByteSpan out) {
  const size_t n = std::min({out.size(), data_.size() - pos_, max_read_});
  if (n > 0) std::memcpy(out.data(), data_.data() + pos_, n);
  pos_ += n;
  return n;
}

Result<void> MemorySource::read_at(uint64_t offset, MutableByteSpan out) const {
  if (offset > data_.size() || out.size() > data_.size() - offset) {
    return fail(ErrorCode::kTruncated, "read past the end of the buffer");
  }
  if (!out.empty()) std::memcpy(out.data(), data_.data() + offset, out.size());
  return {};
}

FdFile::FdFile(FdFile&& o) noexcept : fd_(std::exchange(o.fd_, -1)), name_(std::move(o.name_)), owned_(o.owned_) {}

FdFile::~FdFile() {
  if (owned_ && fd_ >= 0) ::close(fd_);
}

Result<FdFile> FdFile::open_read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return io_fail("cannot open", path);
  return FdFile(fd, path, true);
}

Result<size_t> FdFile::read(MutableByteSpan out) {
  for (;;) {
    const ssize_t n = ::read(fd_, out.data(), out.size());
    if (n >= 0) return static_cast<size_t>(n);
    if (errno != EINTR) return io_fail("cannot read", name_);
  }
}

Result<void> FdFile::write(ByteSpan data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_fail("cannot write", name_);
    }
    data = data.subspan(static_cast<size_t>(n));
  }
  return {};
}

bool FdFile::is_regular() const {
  struct stat st{};
  return ::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode);
}

Result<uint64_t> FdFile::size() const {
  struct stat st{};
  if (::fstat(fd_, &st) != 0) return io_fail("cannot stat", name_);
  if (!S_ISREG(st.st_mode)) return fail(ErrorCode::kInvalidArgument, name_ + " is not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

Result<void> FdFile::read_at(uint64_t offset, MutableByteSpan out) const {
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return io_fail("cannot read", name_);
    }
    if (n == 0) return fail(ErrorCode::kTruncated, name_ + " ends at byte " + std::to_string(offset + done));
    done += static_cast<size_t>(n);
  }
  return {};
}

Result<AtomicOutputFile> AtomicOutputFile::create(const std::string& path, unsigned mode, bool overwrite) {
  if (!overwrite && ::access(path.c_str(), F_OK) == 0) {
    return fail(ErrorCode::kExists, path + " already exists; refusing to overwrite it");
  }
  std::string dir = ".";
  std::string base = path;
  if (auto slash = path.rfind('/'); slash != std::string::npos) {
    dir = path.substr(0, slash == 0 ? 1 : slash);
    base = path.substr(slash + 1);
  }
  // Preferred: a file with no name until commit() links it in, so that a process killed midway
  // (Ctrl-C, the OOM killer) leaves no partial output behind. Naming it needs /proc/self/fd.
  int fd = -1;
  std::string temp;
  if (::access("/proc/self/fd", X_OK) == 0) {
    fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, static_cast<mode_t>(mode));
    if (fd < 0 && errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
      return io_fail("cannot create temporary file for", path);
    }
  }
  if (fd < 0) {
    // Fallback: a hidden, randomly named temporary file beside the destination.
    std::array<std::byte, 6> rnd;
    TRESOR_TRY(crypto::random_bytes(rnd));
    temp = (dir == "/" ? "" : dir) + "/." + base + ".tresor-" + to_hex(rnd) + ".tmp";
    fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, static_cast<mode_t>(mode));
    if (fd < 0) return io_fail("cannot create temporary file for", path);
  }
  // The umask may have narrowed the mode; secrets want exactly `mode` (never wider).
  if (::fchmod(fd, static_cast<mode_t>(mode)) != 0) {
    const int err = errno;
    ::close(fd);
    if (!temp.empty()) ::unlink(temp.c_str());
    return io_fail("cannot set mode of the temporary file for", path, err);
  }
  return AtomicOutputFile(fd, path, std::move(temp), overwrite);
}

AtomicOutputFile::AtomicOutputFile(AtomicOutputFile&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      path_(std::move(o.path_)),
      temp_(std::move(o.temp_)),
      overwrite_(o.overwrite_),
      done_(std::exchange(o.done_, true)) {}

AtomicOutputFile::~AtomicOutputFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!done_ && !temp_.empty()) ::unlink(temp_.c_str());
}

Result<void> AtomicOutputFile::write(ByteSpan data) {
  FdFile f(fd_, path_);
  return f.write(data);
}

Result<void> AtomicOutputFile::resize(uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return io_fail("cannot size the output for", path_);
  return {};
}

Result<void> AtomicOutputFile::write_at(uint64_t offset, ByteSpan data) const {
  return pwrite_all(fd_, offset, data, path_);
}

namespace {

// Moves `from` to `to`; without `overwrite` never replaces a file that exists (renameat2 with
// RENAME_NOREPLACE, or link()+unlink() where the file system lacks it).
Result<void> move_into_place(const std::string& from, const std::string& to, bool overwrite) {
  if (overwrite) {
    if (::rename(from.c_str(), to.c_str()) != 0) return io_fail("cannot rename into", to);
    return {};
  }
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return {};
  if (errno == EEXIST) return fail(ErrorCode::kExists, to + " already exists; refusing to overwrite it");
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) return io_fail("cannot create", to);
  if (::link(from.c_str(), to.c_str()) != 0) {
    if (errno == EEXIST) return fail(ErrorCode::kExists, to + " already exists; refusing to overwrite it");
    return io_fail("cannot create", to);
  }
  ::unlink(from.c_str());
  return {};
}

}  // namespace

Result<void> AtomicOutputFile::commit() {
  if (done_) return fail(ErrorCode::kInvalidArgument, "output " + path_ + " already committed");
  if (::fsync(fd_) != 0) return io_fail("cannot sync the output for", path_);
  if (temp_.empty()) {
    // Unnamed file: link it in. linkat() to the destination fails with EEXIST rather than
    // replace anything; with overwrite, link under a fresh name and rename that over.
    const std::string proc = "/proc/self/fd/" + std::to_string(fd_);
    if (!overwrite_) {
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, path_.c_str(), AT_SYMLINK_FOLLOW) != 0) {
        if (errno == EEXIST) return fail(ErrorCode::kExists, path_ + " already exists; refusing to overwrite it");
        return io_fail("cannot create", path_);
      }
    } else {
      std::array<std::byte, 6> rnd;
      TRESOR_TRY(crypto::random_bytes(rnd));
      const std::string named = path_ + ".tresor-" + to_hex(rnd) + ".tmp";
      if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, named.c_str(), AT_SYMLINK_FOLLOW) != 0) {
        return io_fail("cannot create", named);
      }
      if (auto r = move_into_place(named, path_, true); !r) {
        ::unlink(named.c_str());
        return r;
      }
    }
    const int fd = std::exchange(fd_, -1);
    done_ = true;
    if (::close(fd) != 0) return io_fail("cannot close", path_);
    return {};
  }
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) return io_fail("cannot close", temp_);
  TRESOR_TRY(move_into_place(temp_, path_, overwrite_));
  done_ = true;
  return {};
}

Result<void> make_private_dirs(const std::string& dir) {
  std::string path = dir;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
    const std::string part = slash == std::string::npos ? path : path.substr(0, slash);
    if (::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST) {
      return fail(ErrorCode::kIo, "cannot create directory " + part + ": " + std::strerror(errno));
    }
    if (slash == std::string::npos) break;
  }
  return {};
}

Result<std::string> read_small_file(const std::string& path, size_t max_size) {
  auto f = FdFile::open_read(path);
  if (!f) return std::unexpected(f.error());
  std::string out;
  char buf[4096];
  for (;;) {
    auto n = f->read(MutableByteSpan(reinterpret_cast<std::byte*>(buf), sizeof buf));
    if (!n) return std::unexpected(n.error());
    if (*n == 0) break;
    out.append(buf, *n);
    if (out.size() > max_size) {
      return fail(ErrorCode::kInvalidArgument, path + " is larger than " + format_size(max_size) + ", too large for this input");
    }
  }
  secure_wipe(MutableByteSpan(reinterpret_cast<std::byte*>(buf), sizeof buf));
  return out;
}

Result<SecretBuffer> read_secret_file(const std::string& path, size_t max_size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return io_fail("cannot open", path);
  FdFile f(fd, path, /*owned=*/true);
  struct stat st{};
  if (::fstat(fd, &st) != 0) return io_fail("cannot stat", path);
  if (!S_ISREG(st.st_mode)) return fail(ErrorCode::kPermission, path + " is not a regular file; a secret key must be one");
  if (st.st_uid != ::geteuid() && st.st_uid != 0) {
    return fail(ErrorCode::kPermission, path + " belongs to uid " + std::to_string(st.st_uid) +
                                            ", not to you: a secret key must be your own");
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return fail(ErrorCode::kPermission, path + " has mode " + mode +
                                            ": a secret key must not be readable by others (run: chmod 600 " +
                                            path + ")");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size > max_size) return fail(ErrorCode::kInvalidArgument, path + " is larger than " + std::to_string(max_size >> 10) + " KiB; not a key file");
  // Room for what fstat said, at least 64 KiB (a pseudo-file may say 0), and one byte more than
  // the limit allows, so that a file that grew since fstat is noticed.
  SecretBuffer buf(static_cast<size_t>(std::min<uint64_t>(std::max<uint64_t>(size, 64 * 1024), max_size)) + 1);
  auto n = read_full(f, buf.span());
  if (!n) return std::unexpected(n.error());
  if (*n > max_size) return fail(ErrorCode::kInvalidArgument, path + " is larger than " + std::to_string(max_size >> 10) + " KiB; not a key file");
  if (*n == buf.size()) return fail(ErrorCode::kIo, path + " grew while it was read; read it again when it is complete");
  return SecretBuffer::copy_of(buf.span().first(*n));
}

Result<AnonymousTempFile> AnonymousTempFile::create(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    fd = ::memfd_create("tresor-plaintext", MFD_CLOEXEC);
  }
  if (fd < 0) return io_fail("cannot create an anonymous temporary file in", dir);
  return AnonymousTempFile(fd);
}

AnonymousTempFile::AnonymousTempFile(AnonymousTempFile&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}

AnonymousTempFile::~AnonymousTempFile() {
  if (fd_ >= 0) {
    // Free the plaintext's pages now rather than at the last close of a shared descriptor.
    if (::ftruncate(fd_, 0) != 0) {
      // Nothing more to do: the file has no name and goes away with its descriptor.
    }
    ::close(fd_);
  }
}

Result<uint64_t> AnonymousTempFile::size() const {
  struct stat st{};
  if (::fstat(fd_, &st) != 0) return io_fail("cannot stat", "anonymous temporary file");
  return static_cast<uint64_t>(st.st_size);
}

Result<void> AnonymousTempFile::read_at(uint64_t offset, MutableByteSpan out) const {
  return FdFile(fd_, "anonymous temporary file").read_at(offset, out);
}

Result<void> AnonymousTempFile::resize(uint64_t size) const {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return io_fail("cannot size", "anonymous temporary file");
  return {};
}

Result<void> AnonymousTempFile::write_at(uint64_t offset, ByteSpan data) const {
  return pwrite_all(fd_, offset, data, "anonymous temporary file");
}

Result<void> AnonymousTempFile::copy_to(ByteSink& sink) const {
  auto total = size();
  if (!total) return std::unexpected(total.error());
  SecretBuffer buf(1 << 20);
  for (uint64_t off = 0; off < *total;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), *total - off));
    TRESOR_TRY(read_at(off, buf.span().first(n)));
    TRESOR_TRY(sink.write(buf.span().first(n)));
    off += n;
  }
  return {};
}

Result<uint16_t> unused_loopback_port() { return unused_tcp_port("127.0.0.1"); }

Result<uint16_t> unused_tcp_port(const std::string& ipv4) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  if (::inet_pton(AF_INET, ipv4.c_str(), &a.sin_addr) != 1) return fail(ErrorCode::kInvalidArgument, "'" + ipv4 + "' is not an IPv4 address");
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(ErrorCode::kIo, std::string("socket: ") + std::strerror(errno));
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  const int e = errno;
  ::close(fd);
  if (!ok) return fail(ErrorCode::kIo, "no free port on " + ipv4 + ": " + std::strerror(e));
  return ntohs(a.sin_port);
}

}  // namespace tresor
