// step-probe: one rank of a confidential step, as a test puts it into a guest image (`tresor image
// build --program`). It meets the step's other ranks the way `tresor train` does inside a job —
// Slurm's layout, the broker's roster in TRESOR_ROSTER, this rank's link key in TRESOR_LINK_KEY,
// the TCP collective over TLS pinned to the roster's keys (train::connect_tcp) — then all-reduces
// a vector and broadcasts one from rank 0, and prints what it got:
//   step-probe rank R of N: lead ADDRESS:PORT sum S broadcast B
// Rank r contributes r + 1 to every element of a 1024-float vector, so the sum is N(N+1)/2 on
// every rank; the broadcast is rank 0's vector of 7s. Exit 0 only when both are exactly right.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "tresor/io.h"
#include "tresor/roster.h"
#include "tresor/slurm/ranks.h"
#include "tresor/train/collective.h"

int main() {
  using namespace tresor;
  auto fail = [](const std::string& why) {
    std::fprintf(stderr, "step-probe: %s\n", why.c_str());
    return 1;
  };
  auto ranks = slurm::ranks_from_slurm([](const char* n) { return std::getenv(n); });
  if (!ranks) return fail(ranks.error().message);
  if (!*ranks) return fail("not a task of a step of several");
  const char* roster_path = std::getenv("TRESOR_ROSTER");
  const char* key_path = std::getenv("TRESOR_LINK_KEY");
  if (roster_path == nullptr || key_path == nullptr) return fail("TRESOR_ROSTER and TRESOR_LINK_KEY are not set (TRESOR_STEP_ROSTER=1?)");
  auto text = read_small_file(roster_path);
  if (!text) return fail(text.error().message);
  auto roster = parse_roster(*text);
  if (!roster) return fail(roster.error().message);
  auto key_text = read_secret_file(key_path);
  if (!key_text) return fail(key_text.error().message);
  auto key = parse_link_key(std::string_view(reinterpret_cast<const char*>(key_text->data()), key_text->size()));
  if (!key) return fail(key.error().message);
  train::Rendezvous rv;
  rv.rank = (*ranks)->rank;
  rv.size = (*ranks)->size;
  rv.run_id = roster->step;
  rv.join_timeout_ms = 60'000;
  rv.io_timeout_ms = 60'000;
  const std::string lead = roster->lead_host + ":" + std::to_string(roster->lead_port);
  rv.roster = std::make_shared<const Roster>(std::move(*roster));
  rv.link_key = std::make_shared<const crypto::Key>(std::move(*key));
  auto c = train::connect_tcp(rv);
  if (!c) return fail(c.error().message);
  std::vector<float> v(1024, static_cast<float>(rv.rank + 1));
  if (auto r = (*c)->all_reduce_sum(v); !r) return fail(r.error().message);
  std::vector<float> b(64, rv.rank == 0 ? 7.0f : -1.0f);
  if (auto r = (*c)->broadcast(b, 0); !r) return fail(r.error().message);
  const float want = static_cast<float>(rv.size * (rv.size + 1) / 2);
  bool ok = true;
  for (float x : v) ok = ok && x == want;
  for (float x : b) ok = ok && x == 7.0f;
  std::printf("step-probe rank %d of %d: lead %s sum %g broadcast %g%s\n", rv.rank, rv.size, lead.c_str(), static_cast<double>(v[0]),
              static_cast<double>(b[0]), ok ? "" : " WRONG");
  return ok ? 0 : 1;
}
