// tresor/agent/evidence.h — where the agent's SNP evidence comes from (issue 5, item 3), behind
// one interface: the sim secure processor across a channel to the host side (the local backend
// and sim VMs), and later the guest's own configfs-tsm or /dev/sev-guest.
//
// The channel is a stream of frames, each a 4-byte big-endian length and that many bytes:
//   agent → host: REPORT_DATA (64 bytes)
//   host → agent: the signed report, then the endorsement certificate (PEM), or one frame
//                 "error: …" and no second frame when it cannot sign
// The host signs with HOST_DATA and MEASUREMENT it chose at launch (the manifest's digest and the
// image's measurement): the agent chooses only REPORT_DATA, as with the real AMD-SP.
#pragma once

#include <array>
#include <cstddef>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/kbs/client.h"
#include "tresor/snp/sim.h"

namespace tresor::agent {

class EvidenceProvider {
 public:
  virtual ~EvidenceProvider() = default;
  [[nodiscard]] virtual Result<kbs::Evidence> evidence(const std::array<std::byte, 64>& report_data) = 0;
};

/// The agent's end of the channel (a socket or pipe pair inherited as `fd`).
class ChannelEvidence final : public EvidenceProvider {
 public:
  explicit ChannelEvidence(int fd) : fd_(fd) {}
  Result<kbs::Evidence> evidence(const std::array<std::byte, 64>& report_data) override;

 private:
  int fd_;
};

/// The host's end: answers requests on `fd` until the agent closes it, signing with `sp` for
/// the given launch values. Returns how many reports it signed.
[[nodiscard]] Result<size_t> serve_sim_evidence(int fd, const snp::sim::SecureProcessor& sp, const std::array<std::byte, 48>& measurement,
                                                const std::array<std::byte, 32>& host_data);

/// Frames (exposed for tests): write one; read one of at most `max` bytes (kMalformed when longer,
/// kTruncated at a short read, kNoMatchingKey... never: EOF before a frame is kUnavailable).
[[nodiscard]] Result<void> write_frame(int fd, ByteSpan data);
[[nodiscard]] Result<Bytes> read_frame(int fd, size_t max);

}  // namespace tresor::agent
