// spin_until: poll a condition briefly before the caller falls back to blocking. Private to core/.
//
// Tresor's worker threads hand each other work every few hundred microseconds (one chunk or one
// batch of chunks); a futex wake-up costs tens of microseconds each time (measured: ~75 µs per
// parallel_for on two vCPUs, docs/benchmarks.md). Polling for 200 µs first bridges those gaps,
// and costs nothing measurable when a pool goes idle for good.
#pragma once

#include <chrono>
#include <thread>

namespace tresor::detail {

inline constexpr auto kSpinFor = std::chrono::microseconds(200);

/// Polls `done` (yielding between polls) for up to kSpinFor; true once it holds.
template <typename Pred>
bool spin_until(Pred done) {
  const auto until = std::chrono::steady_clock::now() + kSpinFor;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::yield();
  }
  return true;
}

}  // namespace tresor::detail
