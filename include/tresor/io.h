// tresor/io.h — byte sources and sinks for the sealed streams, and the atomic output file.
//
// The sealed-format code never touches files itself (DESIGN.md: no I/O inside parsers); it reads
// and writes through these small interfaces. File-backed implementations live here too.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"

namespace tresor {

/// ByteSource yields a stream of bytes. read() returns how many bytes it placed in `out`
/// (possibly fewer than asked), and 0 only at the end of the stream.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  [[nodiscard]] virtual Result<size_t> read(MutableByteSpan out) = 0;
};

/// ByteSink consumes a stream of bytes; write() writes all of `data` or fails.
class ByteSink {
 public:
  virtual ~ByteSink() = default;
  [[nodiscard]] virtual Result<void> write(ByteSpan data) = 0;
};

/// RandomAccessSource reads at offsets (thread-safe: concurrent read_at calls are allowed).
class RandomAccessSource {
 public:
  virtual ~RandomAccessSource() = default;
  [[nodiscard]] virtual Result<uint64_t> size() const = 0;
  /// Reads exactly out.size() bytes at `offset`; kTruncated if the source ends first.
  [[nodiscard]] virtual Result<void> read_at(uint64_t offset, MutableByteSpan out) const = 0;
};

/// RandomAccessSink writes at offsets (thread-safe: concurrent write_at calls to disjoint ranges).
class RandomAccessSink {
 public:
  virtual ~RandomAccessSink() = default;
  /// Sets the final size (called once, before the writes).
  [[nodiscard]] virtual Result<void> resize(uint64_t size) const = 0;
  [[nodiscard]] virtual Result<void> write_at(uint64_t offset, ByteSpan data) const = 0;
};

/// Reads until `out` is full or the source ends; returns the count.
[[nodiscard]] Result<size_t> read_full(ByteSource& src, MutableByteSpan out);

/// In-memory implementations (tests, benchmarks, library users holding buffers).
class MemorySource final : public ByteSource, public RandomAccessSource {
 public:
  explicit MemorySource(ByteSpan data, size_t max_read = SIZE_MAX) : data_(data), max_read_(max_read) {}
  Result<size_t> read(MutableByteSpan out) override;
  Result<uint64_t> size() const override { return data_.size(); }
  Result<void> read_at(uint64_t offset, MutableByteSpan out) const override;

 private:
  ByteSpan data_;
  size_t pos_ = 0;
  size_t max_read_;  // cap per read() call, to exercise short reads
};

class MemorySink final : public ByteSink {
 public:
  Result<void> write(ByteSpan data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return {};
  }
  Bytes bytes;
};

/// Discards everything (benchmarks).
class NullSink final : public ByteSink {
 public:
  Result<void> write(ByteSpan data) override {
    count += data.size();
    return {};
  }
  uint64_t count = 0;
};

/// A file descriptor as source, sink and (for regular files) random-access source. `name` is
/// used in error messages. Does not own the descriptor unless created by open_file().
class FdFile final : public ByteSource, public ByteSink, public RandomAccessSource {
 public:
  FdFile(int fd, std::string name, bool owned = false) : fd_(fd), name_(std::move(name)), owned_(owned) {}
  FdFile(FdFile&& o) noexcept;
  FdFile(const FdFile&) = delete;
  FdFile& operator=(const FdFile&) = delete;
  FdFile& operator=(FdFile&&) = delete;
  ~FdFile() override;

  /// Opens `path` read-only.
  static Result<FdFile> open_read(const std::string& path);

  Result<size_t> read(MutableByteSpan out) override;
  Result<void> write(ByteSpan data) override;
  Result<uint64_t> size() const override;
  Result<void> read_at(uint64_t offset, MutableByteSpan out) const override;

  /// True for regular files (sizes and offsets mean something).
  bool is_regular() const;
  int fd() const { return fd_; }
  const std::string& name() const { return name_; }

 private:
  int fd_;
  std::string name_;
  bool owned_;
};

/// AtomicOutputFile writes to a file that has no name (O_TMPFILE in the destination's directory)
/// and links it in as `path` only in commit(); where the file system lacks O_TMPFILE or /proc is
/// missing, to a hidden randomly named temporary file beside `path` (mode `mode`, O_EXCL)
/// renamed in commit(). Destroying it without commit() leaves nothing behind, and a process
/// killed midway leaves nothing either (in the fallback, the hidden file stays). With
/// `overwrite` false, commit() never replaces a file that exists, even one that appeared
/// meanwhile (linkat, renameat2(RENAME_NOREPLACE), or link()+unlink()).
class AtomicOutputFile final : public ByteSink, public RandomAccessSink {
 public:
  static Result<AtomicOutputFile> create(const std::string& path, unsigned mode, bool overwrite);
  AtomicOutputFile(AtomicOutputFile&& o) noexcept;
  AtomicOutputFile(const AtomicOutputFile&) = delete;
  AtomicOutputFile& operator=(const AtomicOutputFile&) = delete;
  AtomicOutputFile& operator=(AtomicOutputFile&&) = delete;
  ~AtomicOutputFile() override;

  Result<void> write(ByteSpan data) override;
  Result<void> resize(uint64_t size) const override;
  Result<void> write_at(uint64_t offset, ByteSpan data) const override;
  /// fsyncs, closes and renames into place.
  [[nodiscard]] Result<void> commit();
  /// The fallback temporary file's name; empty when the output has no name until commit().
  const std::string& temp_path() const { return temp_; }

 private:
  AtomicOutputFile(int fd, std::string path, std::string temp, bool overwrite)
      : fd_(fd), path_(std::move(path)), temp_(std::move(temp)), overwrite_(overwrite) {}
  int fd_ = -1;
  std::string path_;
  std::string temp_;
  bool overwrite_ = false;
  bool done_ = false;
};

/// Stream helpers for pipes and sockets (the evidence and control channels): writes all of
/// `data` (retrying interrupted and short writes; MSG_NOSIGNAL-like: a closed peer is an error,
/// not a SIGPIPE when `fd` is a socket), and reads exactly out.size() bytes — false at a clean
/// end of stream before the first byte, kTruncated after it. Errors start with `what`.
[[nodiscard]] Result<void> write_all_fd(int fd, ByteSpan data, std::string_view what);
[[nodiscard]] Result<bool> read_exact_fd(int fd, MutableByteSpan out, std::string_view what);

/// Creates `dir` and any missing parents with mode 0700 (existing ones are left as they are).
[[nodiscard]] Result<void> make_private_dirs(const std::string& dir);

/// Reads a whole small file (keys, identities); refuses files over `max_size`.
[[nodiscard]] Result<std::string> read_small_file(const std::string& path, size_t max_size = 1 << 20);

/// Reads a secret file (at most `max_size` bytes) and refuses it unless it is a regular file owned
/// by the caller (or root) that neither group nor others may read. The checks are made on the
/// opened descriptor, so the file cannot be swapped between check and read.
[[nodiscard]] Result<SecretBuffer> read_secret_file(const std::string& path, size_t max_size = 64 * 1024);

/// A TCP port of 127.0.0.1 that nothing listened on at the time of the call (bound to port 0,
/// then released): for tests and benchmarks that must name a port before its listener exists.
/// Racy by nature: another process may take it in between. kIo when no port can be had.
[[nodiscard]] Result<uint16_t> unused_loopback_port();
/// The same on the local IPv4 address `ipv4` (dotted quad); kInvalidArgument when it is not one.
[[nodiscard]] Result<uint16_t> unused_tcp_port(const std::string& ipv4);

/// AnonymousTempFile is a mode-0600 file with no name (O_TMPFILE in `dir`, or a memfd where the
/// file system lacks O_TMPFILE): nothing else can open it, and it disappears when closed. Used to
/// assemble authenticated plaintext before any of it goes to a stream that cannot be taken back.
class AnonymousTempFile final : public RandomAccessSource, public RandomAccessSink {
 public:
  static Result<AnonymousTempFile> create(const std::string& dir);
  AnonymousTempFile(AnonymousTempFile&& o) noexcept;
  AnonymousTempFile(const AnonymousTempFile&) = delete;
  AnonymousTempFile& operator=(const AnonymousTempFile&) = delete;
  AnonymousTempFile& operator=(AnonymousTempFile&&) = delete;
  ~AnonymousTempFile() override;

  Result<uint64_t> size() const override;
  Result<void> read_at(uint64_t offset, MutableByteSpan out) const override;
  Result<void> resize(uint64_t size) const override;
  Result<void> write_at(uint64_t offset, ByteSpan data) const override;
  /// Copies the whole content to `sink` in order.
  [[nodiscard]] Result<void> copy_to(ByteSink& sink) const;

 private:
  explicit AnonymousTempFile(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace tresor
