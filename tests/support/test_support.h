// Shared helpers for Tresor's tests: deterministic randomness for reproducible vectors, scratch
// directories, file helpers and running the real tresor binary.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/snp/verify.h"

namespace tresor::testing {

/// DeterministicRandom yields SHA-256(seed ‖ be64(counter)) blocks: reproducible "randomness" for
/// test vectors and golden files. Never used outside tests.
class DeterministicRandom final : public crypto::RandomSource {
 public:
  explicit DeterministicRandom(std::string seed) : seed_(std::move(seed)) {}
  Result<void> fill(MutableByteSpan out) override;

 private:
  std::string seed_;
  uint64_t counter_ = 0;
};

/// Pseudo-random, never-zero test data of `n` bytes from `seed` (fast: AES-CTR-like via SHA-256).
Bytes pattern_bytes(size_t n, uint32_t seed);

/// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

Bytes read_file(const std::string& path);
void write_file(const std::string& path, ByteSpan data, unsigned mode = 0600);
std::string testdata(const std::string& relative);
/// A path under ../shared/testdata (the real reference data: AMD-signed report, fixtures).
std::string shared_testdata(const std::string& relative);

/// 2025-06-01 00:00 UTC: a time at which the shared Milan report's VCEK and chain are valid.
std::time_t milan_report_time();
/// The real AMD-signed Milan report (../shared/testdata/snp/milan-v2-virtee), verified against
/// the pinned roots at milan_report_time(). A failure is reported as a test failure.
snp::VerifiedReport verified_milan();

/// Success when `r` failed with exactly `want`; the failure message shows what happened instead.
template <typename T>
::testing::AssertionResult FailsWith(const Result<T>& r, ErrorCode want) {
  if (r) return ::testing::AssertionFailure() << "succeeded, want error " << error_code_name(want);
  if (r.error().code != want) {
    return ::testing::AssertionFailure() << "failed with " << error_code_name(r.error().code) << " ("
                                         << r.error().message << "), want " << error_code_name(want);
  }
  return ::testing::AssertionSuccess();
}

/// Result of running a command: exit code (or 128+signal), stdout and stderr.
struct CommandResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
/// Runs argv (argv[0] is a path) with optional stdin data; captures stdout and stderr.
CommandResult run_command(const std::vector<std::string>& argv, const std::string& stdin_data = "");
/// Runs the tresor binary built with the tests.
CommandResult run_tresor(const std::vector<std::string>& args, const std::string& stdin_data = "");

/// `n` floats drawn from N(0, 1) by std::mt19937(seed): the same values on every run.
std::vector<float> normal_floats(size_t n, uint32_t seed);

/// A TCP port of 127.0.0.1 that nothing listens on at the time of the call (bound, then released).
uint16_t free_loopback_port();

/// A process started in the background (a daemon under test). The constructor returns once the
/// process has written its first line on stdout (which first_line() keeps); the destructor kills
/// it with SIGKILL if it still runs.
class Background {
 public:
  explicit Background(const std::vector<std::string>& argv);
  ~Background();
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;
  const std::string& first_line() const { return line_; }
  /// Sends `sig` and returns the exit status (or 128 + the signal that ended it).
  int kill(int sig);

 private:
  int pid_ = -1;
  std::string line_;
};

/// A step network for job VMs (docs/scale.md §2.2) as a test makes one: a Linux bridge `name`
/// with `prefix`.1/24 on it and busybox's DHCP server handing out `prefix`.10-50; removed (and the
/// server stopped) by the destructor. A bridge of that name left by an earlier run is replaced.
/// error() says what failed ("" when the bridge is up). Needs root.
class StepBridge {
 public:
  StepBridge(std::string name, std::string prefix, const std::string& work_dir);
  ~StepBridge();
  StepBridge(const StepBridge&) = delete;
  StepBridge& operator=(const StepBridge&) = delete;
  const std::string& error() const { return error_; }
  const std::string& name() const { return name_; }
  /// The DHCP server's log, for failure messages.
  std::string log() const;

 private:
  std::string name_, log_, error_;
  std::unique_ptr<Background> dhcp_;
};

/// Sends one line on a Unix stream socket and returns the reply line (with its newline), or ""
/// when the connection fails or closes before a whole line came back.
std::string unix_line_request(const std::string& socket_path, const std::string& line);

/// The port in a line such as "… listening on https://127.0.0.1:PORT (TLS 1.3) …"; 0 if none.
int port_in(const std::string& line);


/// A table of calls that must pass (want_error empty) or fail with kInvalidArgument and a message
/// naming what is wrong (containing want_error): each failing case sits beside a passing twin.
struct CheckCase {
  std::string name;
  std::function<Result<void>()> run;
  std::string want_error;  // empty: must pass
};
inline void expect_checks(const std::vector<CheckCase>& cases) {
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const auto r = c.run();
    if (c.want_error.empty()) {
      EXPECT_TRUE(r) << r.error().message;
    } else {
      ASSERT_FALSE(r);
      EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
      EXPECT_NE(r.error().message.find(c.want_error), std::string::npos) << r.error().message;
    }
  }
}

// scripts/gpu-check sets TRESOR_REQUIRE_GPU=1: on a GPU machine a missing device is a failure.
#define TRESOR_SKIP_WITHOUT_GPU(devs)                                           \
  do {                                                                          \
    if (!(devs)) {                                                              \
      if (std::getenv("TRESOR_REQUIRE_GPU") != nullptr) {                       \
        FAIL() << "TRESOR_REQUIRE_GPU is set but: " << (devs).error().message;  \
      }                                                                         \
      GTEST_SKIP() << "no GPU: " << (devs).error().message;                     \
    }                                                                           \
  } while (false)

}  // namespace tresor::testing
