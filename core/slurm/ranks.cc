// A Slurm step's task layout from its environment (include/tresor/slurm/ranks.h).
#include "tresor/slurm/ranks.h"

#include <charconv>
#include <string_view>
#include <tuple>

namespace tresor::slurm {

Result<std::optional<SlurmRanks>> ranks_from_slurm(const GetEnv& getenv) {
  auto number = [&](const char* name, bool required, int lo, int& into) -> Result<bool> {
    const char* v = getenv(name);
    if (v == nullptr || *v == '\0') {
      if (required) return fail(ErrorCode::kInvalidArgument, std::string(name) + " is not set, though SLURM_NTASKS is");
      return false;
    }
    const std::string_view s(v);
    int parsed = 0;
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), parsed);
    if (ec != std::errc{} || end != s.data() + s.size() || parsed < lo) {
      return fail(ErrorCode::kInvalidArgument, std::string(name) + "=" + std::string(s) + " is not an integer of at least " + std::to_string(lo));
    }
    into = parsed;
    return true;
  };
  SlurmRanks r;
  auto has = number("SLURM_NTASKS", false, 1, r.size);
  if (!has) return std::unexpected(has.error());
  if (!*has || r.size == 1) return std::optional<SlurmRanks>{};
  // The batch script is one task, whatever SLURM_NTASKS says (it is the allocation's count there):
  // Slurm sets SLURM_STEP_ID only for the steps srun launches (env_array_for_step). salloc's
  // interactive step is one task too. Their ids: SLURM_BATCH_SCRIPT 0xfffffffe,
  // SLURM_INTERACTIVE_STEP 0xfffffffd.
  if (const char* step = getenv("SLURM_STEP_ID");
      step == nullptr || *step == '\0' || std::string_view(step) == "4294967294" || std::string_view(step) == "4294967293") {
    return std::optional<SlurmRanks>{};
  }
  for (auto [name, into, lo] : {std::tuple{"SLURM_PROCID", &r.rank, 0}, {"SLURM_LOCALID", &r.local_rank, 0}, {"SLURM_NNODES", &r.nodes, 1}}) {
    auto got = number(name, true, lo, *into);
    if (!got) return std::unexpected(got.error());
  }
  if (r.rank >= r.size) return fail(ErrorCode::kInvalidArgument, "SLURM_PROCID=" + std::to_string(r.rank) + " is not below SLURM_NTASKS=" + std::to_string(r.size));
  if (r.local_rank > r.rank) return fail(ErrorCode::kInvalidArgument, "SLURM_LOCALID=" + std::to_string(r.local_rank) + " exceeds SLURM_PROCID=" + std::to_string(r.rank));
  // The run id: job and step as Slurm gives them (digits only).
  auto digits = [&](const char* name) -> Result<std::string> {
    const char* v = getenv(name);
    if (v == nullptr || *v == '\0') return fail(ErrorCode::kInvalidArgument, std::string(name) + " is not set, though SLURM_NTASKS is");
    const std::string s(v);
    if (s.size() > 20 || s.find_first_not_of("0123456789") != std::string::npos) return fail(ErrorCode::kInvalidArgument, std::string(name) + "=" + s + " is not a number");
    return s;
  };
  auto job = digits("SLURM_JOB_ID");
  if (!job) return std::unexpected(job.error());
  auto step = digits("SLURM_STEP_ID");
  if (!step) return std::unexpected(step.error());
  r.run_id = *job + "." + *step;
  return std::optional<SlurmRanks>{r};
}

}  // namespace tresor::slurm
