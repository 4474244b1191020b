// tresor/error.h — the one error type of libtresor.
//
// Every fallible function returns Result<T> = std::expected<T, Error>. An Error carries a code that
// callers branch on and a message for humans that names the object (file, field, chunk) and, where
// it applies, both the value found and the value wanted. Messages never contain secrets.
#pragma once

#include <expected>
#include <string>
#include <string_view>

namespace tresor {

enum class ErrorCode {
  kInvalidArgument,     // caller passed something unusable (bad option, malformed recipient string)
  kIo,                  // the operating system refused a read, write, open or rename
  kExists,              // refusing to overwrite an existing file
  kCrypto,              // OpenSSL failed internally (not an authentication failure)
  kNotSealed,           // the input does not start with the sealed-format magic
  kUnsupportedVersion,  // a sealed-format version this build does not read
  kMalformed,           // a structural field is out of range or inconsistent
  kHeaderAuth,          // the header MAC does not verify: the header was altered
  kNoMatchingKey,       // no stanza opens with the identities and dataset keys supplied
  kTruncated,           // the stream ends before its final chunk
  kTrailingData,        // bytes follow the final chunk
  kChunkReordered,      // a chunk of this stream sits at another position
  kChunkAuth,           // a chunk fails authentication: altered, or from another stream
  kAuth,                // a single AEAD/signature check failed (primitive level)
  kPermission,          // a secret file is readable by others
  kUnavailable,         // a device or facility (GPU, CUDA) is not present on this machine
  kPolicy,              // evidence is authentic but a policy denies it (every failed check named)
  // Keep kPolicy last, or update ErrorCodeTest, which walks every code up to the last.
};

/// Returns a stable lower-case name for `code` ("chunk-auth"), used in logs and tests.
std::string_view error_code_name(ErrorCode code);

struct Error {
  ErrorCode code;
  std::string message;
};

template <typename T>
using Result = std::expected<T, Error>;

/// Builds the unexpected value for a Result: `return fail(ErrorCode::kIo, "open x: ...")`.
inline std::unexpected<Error> fail(ErrorCode code, std::string message) {
  return std::unexpected<Error>(Error{code, std::move(message)});
}

}  // namespace tresor

// Propagates an error from an expression returning Result<void>.
#define TRESOR_TRY(expr)                                            \
  do {                                                              \
    if (auto tresor_try_r_ = (expr); !tresor_try_r_) {              \
      return std::unexpected<::tresor::Error>(std::move(tresor_try_r_).error()); \
    }                                                               \
  } while (false)
