// Shared plumbing of the tresor CLI: exit codes, error reporting, key loading, I/O endpoints.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "tresor/error.h"
#include "tresor/identity.h"
#include "tresor/io.h"
#include "tresor/manifest.h"
#include "tresor/sealed.h"

namespace tresor::cli {

// Documented in docs/cli.md; scripts rely on them.
enum Exit : int {
  kExitOk = 0,
  kExitInternal = 1,   // OpenSSL or another internal failure
  kExitUsage = 2,      // bad options or arguments
  kExitIo = 3,         // file missing, unreadable, exists, or a secret file with loose permissions
  kExitNoKey = 4,      // no identity or dataset key given opens the file
  kExitIntegrity = 5,  // tampering detected: header MAC, chunk tag, truncation, reordering, extension
  kExitFormat = 6,     // not a sealed file or SNP report, unsupported version, malformed input
  kExitPolicy = 7,     // authentic evidence that the attestation policy denies
};

int exit_code_for(ErrorCode code);
/// Prints "tresor: <message>" on stderr and returns the exit code for `e`.
int report(const Error& e);
int usage_error(const std::string& command, const std::string& message);

/// Loads an identity file, refusing it when others may read it.
Result<Identity> load_identity(const std::string& path);
/// Reads a link key file (docs/formats.md §13.1) with the identity file's checks; errors name the file.
Result<crypto::Key> load_link_key(const std::string& path);
/// Parses "-r" values: a recipient string, or @FILE with one recipient per line ('#' comments).
Result<std::vector<Recipient>> parse_recipients(const std::vector<std::string>& values);
/// Loads a dataset key file for dataset `id` (empty id: match any dataset stanza).
Result<DatasetKey> load_dataset_key(const std::string& path, const std::string& id);
/// Pairs --dataset-key-file F with --dataset ID (in order).
Result<std::vector<DatasetKey>> load_dataset_keys(const std::vector<std::string>& files, const std::vector<std::string>& ids, bool ids_required);
/// --file-keys files (sealed::FileKeys: what the agent gives a job that reads its sealed inputs
/// itself); errors name the file and the line.
Result<std::vector<sealed::FileKeys>> load_file_keys(const std::vector<std::string>& files);

/// A file's bytes to `read(bytes, path)`: a name ending in ".sealed" is opened with `ring` into
/// memory first (the plaintext never touches a file), anything else is read as it is.
Result<Bytes> read_whole_file(const std::string& path);
Result<SecretBuffer> open_sealed_file(const std::string& path, const sealed::KeyRing& ring, unsigned threads);
template <typename T, typename Read>
Result<T> with_input(const std::string& path, const sealed::KeyRing& ring, unsigned threads, Read read) {
  if (path.ends_with(".sealed")) {
    auto plain = open_sealed_file(path, ring, threads);
    if (!plain) return std::unexpected(plain.error());
    return read(ByteSpan(plain->data(), plain->size()), path);
  }
  auto bytes = read_whole_file(path);
  if (!bytes) return std::unexpected(bytes.error());
  return read(ByteSpan(*bytes), path);
}
/// Writes `bytes` to `path` atomically — sealed to `seal`'s recipients as `path.sealed` when it
/// has any (mode 0644), else in the clear (mode 0600). Returns the name written.
Result<std::string> write_output(const std::string& path, ByteSpan bytes, const sealed::SealOptions& seal);

/// An input endpoint: a file path or "-" for stdin.
struct Input {
  std::unique_ptr<FdFile> file;
  std::optional<uint64_t> size;  // known for regular files
  static Result<Input> open(const std::string& path);
};

/// An output endpoint: "-" for stdout, else an AtomicOutputFile that appears only on commit().
struct Output {
  std::unique_ptr<FdFile> stdout_file;
  std::unique_ptr<AtomicOutputFile> file;
  ByteSink& sink();
  Result<void> commit();
  bool is_stdout() const { return stdout_file != nullptr; }
  /// `mode` is the file mode for a new file; `binary` refuses to write to a terminal.
  static Result<Output> create(const std::string& path, unsigned mode, bool overwrite, bool binary);
};

/// ProgressMeter draws a progress bar with throughput on stderr (when enabled). update() may be
/// called from one thread at a time.
class ProgressMeter {
 public:
  ProgressMeter(std::optional<uint64_t> total, bool enabled);
  ~ProgressMeter();
  ProgressMeter(const ProgressMeter&) = delete;
  ProgressMeter& operator=(const ProgressMeter&) = delete;
  void update(uint64_t done);
  void finish();
  bool enabled() const { return enabled_; }

 private:
  void draw(bool final);
  std::optional<uint64_t> total_;
  bool enabled_;
  uint64_t done_ = 0;
  double start_ = 0;
  double last_draw_ = 0;
  bool drawn_ = false;
};

/// ByteSource decorator that feeds a ProgressMeter.
class ProgressSource final : public ByteSource {
 public:
  ProgressSource(ByteSource& inner, ProgressMeter& meter) : inner_(inner), meter_(meter) {}
  Result<size_t> read(MutableByteSpan out) override;

 private:
  ByteSource& inner_;
  ProgressMeter& meter_;
  uint64_t done_ = 0;
};

/// True when the progress bar should show: stderr is a terminal and the input is large or unknown.
bool want_progress(std::optional<uint64_t> size);
double now_seconds();

/// Running another program (ldd, qemu-system-x86_64, srun): each of its output streams is left
/// as this process's, collected, or sent to /dev/null.
enum class Stream { kInherit, kCapture, kDiscard };
struct Captured {
  int status = -1;     // the wait status; -1 when it could not be started
  std::string output;  // what the kCapture streams wrote, together
};
/// Runs argv (the first word looked up in PATH) and waits for it.
Captured run_program(const std::vector<std::string>& argv, Stream out, Stream err);

int cmd_keygen(int argc, char** argv);
int cmd_pubkey(int argc, char** argv);
int cmd_seal(int argc, char** argv);
int cmd_open(int argc, char** argv);
int cmd_inspect(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_version(int argc, char** argv);
int cmd_report(int argc, char** argv);
int cmd_sim(int argc, char** argv);
int cmd_measure(int argc, char** argv);
int cmd_image(int argc, char** argv);
int cmd_doctor(int argc, char** argv);
int cmd_bench_verify(int argc, char** argv);
int cmd_admin(int argc, char** argv);
int cmd_kbs(int argc, char** argv);
int cmd_manifest(int argc, char** argv);
int cmd_bench_broker(int argc, char** argv);
int cmd_bench_launch(int argc, char** argv);
int cmd_bench_gpu(int argc, char** argv);
int cmd_phantom(int argc, char** argv);
int cmd_prep(int argc, char** argv);
int cmd_train(int argc, char** argv);
int cmd_roster(int argc, char** argv);
int cmd_bench_prep(int argc, char** argv);
int cmd_bench_train(int argc, char** argv);
int cmd_bench_collective(int argc, char** argv);
int cmd_predict(int argc, char** argv);

/// Reads a job manifest file; returns it with its canonical signed JSON (what goes to the broker).
Result<std::pair<Manifest, std::string>> read_manifest_file(const std::string& path);

/// One request on the broker's admin socket (a path, or "unix:PATH"); the reply, or its error.
Result<nlohmann::json> admin_call(const std::string& socket_path, const nlohmann::json& request);

}  // namespace tresor::cli
