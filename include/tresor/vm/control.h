// tresor/vm/control.h — the host–guest control channel of a job's VM (issue 6, item 2;
// docs/protocol.md §control channel). One stream (a virtio-serial port in the guest, a Unix
// socket on the host) carries framed messages both ways:
//
//   frame   = length (u32, big-endian, of type + payload) ‖ type (u8) ‖ payload
//
//   host → guest   kStart          the job: JSON (Start below); the first frame, exactly once
//                  kEvidence       report ‖ endorsement certificate (sim evidence), as a reply
//                  kEvidenceError  UTF-8 reason, as a reply
//                  kSignal         u8 signal number for the job (scancel, --signal)
//                  kBrokerData     u32 connection id ‖ bytes from the key broker
//                  kBrokerClose    u32 connection id: the broker closed it
//   guest → host   kEvidenceRequest  REPORT_DATA (64 bytes), sim mode only
//                  kStdout, kStderr  the job's (and the agent's) output
//                  kExit           u8 kind (0 exited, 1 killed by a signal) ‖ u8 code; the last frame
//                  kBrokerOpen     u32 id: a new connection to the key broker
//                  kBrokerData     u32 id ‖ bytes towards the broker
//                  kBrokerClose    u32 id
//                  kOutputBegin    a sealed output's path, relative to the job's output directory
//                  kOutputData     the next bytes of that file
//                  kOutputEnd      u64 its length; the file is complete (one file at a time)
//
// The guest's outputs travel over the channel, not over a writable share: the host's runner,
// running as the job's user, writes them (validate_output_name), so no host process with
// privileges writes into a directory the user controls, and a guest cannot create files with
// another owner or setuid bits on the host.
//
// The guest has no network: its TLS connections to the key broker travel through the channel,
// and the host only relays their bytes (it sees ciphertext, as any router would). Nothing the
// host sends is trusted by the guest beyond what the agent checks itself: the job it is asked to
// run must match the signed manifest, and the broker's certificate must chain to the CA the
// manifest's job was configured with.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/kbs/client.h"

namespace tresor::vm::control {

enum class Type : uint8_t {
  kEvidenceRequest = 0x02,
  kStdout = 0x03,
  kStderr = 0x04,
  kExit = 0x05,
  kBrokerOpen = 0x06,
  kBrokerData = 0x07,
  kBrokerClose = 0x08,
  kOutputBegin = 0x09,
  kOutputData = 0x0A,
  kOutputEnd = 0x0B,
  kStart = 0x81,
  kEvidence = 0x82,
  kEvidenceError = 0x83,
  kSignal = 0x84,
};

inline constexpr size_t kMaxPayload = 1u << 20;

struct Message {
  Type type;
  Bytes payload;
};

/// One end of the channel over `fd` (not owned). send() may be called from several threads;
/// receive() from one.
class Channel {
 public:
  explicit Channel(int fd) : fd_(fd) {}
  [[nodiscard]] Result<void> send(Type type, ByteSpan payload);
  /// The next frame. kUnavailable at a clean end of stream before a frame; kTruncated in the
  /// middle of one; kMalformed for a payload over kMaxPayload or an unknown type.
  [[nodiscard]] Result<Message> receive();
  int fd() const { return fd_; }

 private:
  int fd_;
  std::mutex send_mutex_;
};

/// The job, as the host hands it to the guest's agent.
struct Start {
  uint32_t version = 1;
  std::string manifest_env;                   // TRESOR_MANIFEST
  std::vector<std::string> command;           // argv; command[0] replaced by the script when `script` is set
  std::string script;                         // the batch script's contents (sbatch), or ""
  std::map<std::string, std::string> env;     // the job's environment (Slurm's variables)
  std::string broker_url, broker_ca_pem;      // the broker, as the plugin was configured
  std::vector<std::string> datasets;          // the manifest's, in order: share tresor-data-<i>
  std::string evidence = "channel";           // channel (sim), configfs-tsm, sev-guest, auto
};
[[nodiscard]] Bytes encode_start(const Start& s);
/// Strict: unknown or missing members, wrong types and an unknown version are errors naming them.
[[nodiscard]] Result<Start> decode_start(ByteSpan payload);

[[nodiscard]] Bytes encode_evidence(const kbs::Evidence& e);
[[nodiscard]] Result<kbs::Evidence> decode_evidence(ByteSpan payload);

/// A wait status as kExit carries it, and back.
[[nodiscard]] Bytes encode_exit(int wait_status);
[[nodiscard]] Result<int> decode_exit(ByteSpan payload);

/// A sealed output's name as the guest sends it: a relative path of 1..16 components separated by
/// '/', each 1..255 bytes, none "." or "..", no NUL or control characters, 4096 bytes at most, and
/// ending in ".sealed" (only sealed files leave the guest). The components, or kMalformed naming
/// the name and what is wrong with it.
[[nodiscard]] Result<std::vector<std::string>> validate_output_name(std::string_view name);

[[nodiscard]] Bytes encode_connection(uint32_t id, ByteSpan data = {});
/// The id, and the data after it.
[[nodiscard]] Result<std::pair<uint32_t, ByteSpan>> decode_connection(ByteSpan payload);

}  // namespace tresor::vm::control
