#include "cli.h"

#include "tresor/roster.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <iostream>

namespace tresor::cli {

int exit_code_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return kExitUsage;
    case ErrorCode::kIo:
    case ErrorCode::kExists:
    case ErrorCode::kPermission: return kExitIo;
    case ErrorCode::kNoMatchingKey: return kExitNoKey;
    case ErrorCode::kHeaderAuth:
    case ErrorCode::kTruncated:
    case ErrorCode::kTrailingData:
    case ErrorCode::kChunkReordered:
    case ErrorCode::kChunkAuth:
    case ErrorCode::kAuth: return kExitIntegrity;
    case ErrorCode::kNotSealed:
    case ErrorCode::kUnsupportedVersion:
    case ErrorCode::kMalformed: return kExitFormat;
    case ErrorCode::kPolicy: return kExitPolicy;
    case ErrorCode::kCrypto:
    case ErrorCode::kUnavailable: return kExitInternal;
  }
  return kExitInternal;
}

int report(const Error& e) {
  std::fprintf(stderr, "tresor: %s [%s]\n", e.message.c_str(), std::string(error_code_name(e.code)).c_str());
  return exit_code_for(e.code);
}

int usage_error(const std::string& command, const std::string& message) {
  std::fprintf(stderr, "tresor %s: %s\nRun 'tresor %s --help' for usage.\n", command.c_str(), message.c_str(),
               command.c_str());
  return kExitUsage;
}

Result<Identity> load_identity(const std::string& path) {
  auto text = read_secret_file(path);
  if (!text) return std::unexpected(text.error());
  auto id = Identity::parse(std::string_view(reinterpret_cast<const char*>(text->data()), text->size()));
  if (!id) return fail(id.error().code, path + ": " + id.error().message);
  return id;
}

Result<crypto::Key> load_link_key(const std::string& path) {
  auto text = read_secret_file(path);
  if (!text) return std::unexpected(text.error());
  auto k = parse_link_key(std::string_view(reinterpret_cast<const char*>(text->data()), text->size()));
  if (!k) return fail(k.error().code, path + ": " + k.error().message);
  return k;
}

Result<std::vector<Recipient>> parse_recipients(const std::vector<std::string>& values) {
  std::vector<Recipient> out;
  for (const auto& v : values) {
    if (v.starts_with("@")) {
      auto text = read_small_file(v.substr(1));
      if (!text) return std::unexpected(text.error());
      size_t pos = 0;
      int line_no = 0;
      while (pos < text->size()) {
        size_t end = text->find('\n', pos);
        if (end == std::string::npos) end = text->size();
        std::string line = text->substr(pos, end - pos);
        pos = end + 1;
        ++line_no;
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
        if (line.empty() || line.front() == '#') continue;
        auto r = Recipient::parse(line);
        if (!r) return fail(r.error().code, v.substr(1) + " line " + std::to_string(line_no) + ": " + r.error().message);
        out.push_back(*r);
      }
      continue;
    }
    auto r = Recipient::parse(v);
    if (!r) return std::unexpected(r.error());
    out.push_back(*r);
  }
  return out;
}

// Pairs --dataset-key-file F with --dataset ID (in order).
Result<std::vector<DatasetKey>> load_dataset_keys(const std::vector<std::string>& files,
                                                  const std::vector<std::string>& ids, bool ids_required) {
  if (ids.size() > files.size() || (ids_required && ids.size() != files.size())) {
    return fail(ErrorCode::kInvalidArgument, "give one --dataset ID for each --dataset-key-file (got " +
                                                 std::to_string(ids.size()) + " and " + std::to_string(files.size()) + ")");
  }
  std::vector<DatasetKey> out;
  for (size_t i = 0; i < files.size(); ++i) {
    auto k = load_dataset_key(files[i], i < ids.size() ? ids[i] : std::string());
    if (!k) return std::unexpected(k.error());
    out.push_back(std::move(*k));
  }
  return out;
}

Result<Bytes> read_whole_file(const std::string& path) {
  auto in = FdFile::open_read(path);
  if (!in) return std::unexpected(in.error());
  auto size = in->size();
  if (!size) return std::unexpected(size.error());
  Bytes bytes(static_cast<size_t>(*size));
  TRESOR_TRY(in->read_at(0, bytes));
  return bytes;
}

Result<std::vector<sealed::FileKeys>> load_file_keys(const std::vector<std::string>& files) {
  std::vector<sealed::FileKeys> out;
  for (const auto& f : files) {
    auto k = sealed::FileKeys::load(f);
    if (!k) return std::unexpected(k.error());
    out.push_back(std::move(*k));
  }
  return out;
}

Result<SecretBuffer> open_sealed_file(const std::string& path, const sealed::KeyRing& ring, unsigned threads) {
  auto sealed_bytes = read_whole_file(path);
  if (!sealed_bytes) return std::unexpected(sealed_bytes.error());
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = path;
  return sealed::open_buffer(*sealed_bytes, ring, oo);
}

Result<std::string> write_output(const std::string& path, ByteSpan bytes, const sealed::SealOptions& seal) {
  std::string name = path;
  Bytes sealed_bytes;
  if (!seal.recipients.empty()) {
    auto s = sealed::seal_buffer(bytes, seal);
    if (!s) return std::unexpected(s.error());
    sealed_bytes = std::move(*s);
    bytes = sealed_bytes;
    name += ".sealed";
  }
  auto out = AtomicOutputFile::create(name, seal.recipients.empty() ? 0600 : 0644, /*overwrite=*/true);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(out->write(bytes));
  TRESOR_TRY(out->commit());
  return name;
}

Result<DatasetKey> load_dataset_key(const std::string& path, const std::string& id) {
  auto text = read_secret_file(path);
  if (!text) return std::unexpected(text.error());
  std::string_view view(reinterpret_cast<const char*>(text->data()), text->size());
  if (id.empty()) {
    // Any-id key (open only): parse with a placeholder id, then clear it.
    auto k = DatasetKey::parse("any", view);
    if (!k) return fail(k.error().code, path + ": " + k.error().message);
    k->id.clear();
    return k;
  }
  auto k = DatasetKey::parse(id, view);
  if (!k) return fail(k.error().code, path + ": " + k.error().message);
  return k;
}

Result<Input> Input::open(const std::string& path) {
  Input in;
  if (path == "-") {
    in.file = std::make_unique<FdFile>(STDIN_FILENO, "<stdin>");
  } else {
    auto f = FdFile::open_read(path);
    if (!f) return std::unexpected(f.error());
    in.file = std::make_unique<FdFile>(std::move(*f));
  }
  if (in.file->is_regular()) {
    auto s = in.file->size();
    if (s) in.size = *s;
  }
  return in;
}

ByteSink& Output::sink() {
  if (stdout_file) return *stdout_file;
  return *file;
}

Result<void> Output::commit() {
  if (file) return file->commit();
  return {};
}

Result<Output> Output::create(const std::string& path, unsigned mode, bool overwrite, bool binary) {
  Output out;
  if (path == "-") {
    if (binary && ::isatty(STDOUT_FILENO)) {
      return fail(ErrorCode::kInvalidArgument, "refusing to write sealed binary data to a terminal; use -o FILE");
    }
    out.stdout_file = std::make_unique<FdFile>(STDOUT_FILENO, "<stdout>");
    return out;
  }
  auto f = AtomicOutputFile::create(path, mode, overwrite);
  if (!f) return std::unexpected(f.error());
  out.file = std::make_unique<AtomicOutputFile>(std::move(*f));
  return out;
}

Captured run_program(const std::vector<std::string>& argv, Stream out, Stream err) {
  Captured c;
  int pipe_fds[2];
  if (argv.empty() || ::pipe2(pipe_fds, O_CLOEXEC) != 0) return c;
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    return c;
  }
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    for (const auto& [fd, how] : {std::pair{STDOUT_FILENO, out}, std::pair{STDERR_FILENO, err}}) {
      if (how == Stream::kCapture) ::dup2(pipe_fds[1], fd);
      if (how == Stream::kDiscard) ::dup2(null, fd);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::_Exit(127);
  }
  ::close(pipe_fds[1]);
  char buf[4096];
  for (ssize_t n; (n = ::read(pipe_fds[0], buf, sizeof buf)) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    c.output.append(buf, static_cast<size_t>(n));
  }
  ::close(pipe_fds[0]);
  while (::waitpid(pid, &c.status, 0) < 0 && errno == EINTR) {
  }
  return c;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool want_progress(std::optional<uint64_t> size) {
  constexpr uint64_t kLarge = 64ull << 20;
  return ::isatty(STDERR_FILENO) && (!size || *size >= kLarge);
}

ProgressMeter::ProgressMeter(std::optional<uint64_t> total, bool enabled)
    : total_(total), enabled_(enabled), start_(now_seconds()), last_draw_(start_) {}

ProgressMeter::~ProgressMeter() {
  if (drawn_) std::fputc('\n', stderr);
}

void ProgressMeter::update(uint64_t done) {
  done_ = total_ ? std::min(done, *total_) : done;
  if (enabled_ && now_seconds() - last_draw_ > 0.2) draw(false);
}

void ProgressMeter::finish() {
  if (total_) done_ = *total_;
  if (enabled_) draw(true);
}

void ProgressMeter::draw(bool final) {
  last_draw_ = now_seconds();
  const double secs = std::max(1e-9, last_draw_ - start_);
  const double rate = static_cast<double>(done_) / secs;
  char line[160];
  if (total_ && *total_ > 0) {
    const double frac = std::min(1.0, static_cast<double>(done_) / static_cast<double>(*total_));
    const int width = 30;
    const int filled = static_cast<int>(frac * width);
    std::string bar(static_cast<size_t>(filled), '#');
    bar.append(static_cast<size_t>(width - filled), ' ');
    std::snprintf(line, sizeof line, "\r[%s] %3.0f%% %s / %s  %s/s ", bar.c_str(), frac * 100,
                  format_size(done_).c_str(), format_size(*total_).c_str(),
                  format_size(static_cast<uint64_t>(rate)).c_str());
  } else {
    std::snprintf(line, sizeof line, "\r%s  %s/s ", format_size(done_).c_str(),
                  format_size(static_cast<uint64_t>(rate)).c_str());
  }
  std::fputs(line, stderr);
  if (final) std::fputc('\n', stderr);
  drawn_ = !final;
}

Result<size_t> ProgressSource::read(MutableByteSpan out) {
  auto n = inner_.read(out);
  if (n) {
    done_ += *n;
    meter_.update(done_);
  }
  return n;
}

}  // namespace tresor::cli
