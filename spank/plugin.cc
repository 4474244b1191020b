// spank_tresor.so — the SPANK entry points and nothing else (STYLE.md rule 3, after pyxis): one
// dispatcher on spank_context(), the submit side in submit.cc, the remote side in remote.cc, the
// decisions in libtresor (include/tresor/slurm/job.h). No exception crosses into Slurm.
#include <algorithm>
#include <cstring>
#include <exception>

#include "plugin.h"

// Everything else is hidden (-fvisibility=hidden, exports.map); these are what Slurm looks up.
#define TRESOR_SPANK_EXPORT __attribute__((visibility("default")))

extern "C" {
// The plugin loader looks these up by name (SPANK_PLUGIN, with C linkage for C++).
TRESOR_SPANK_EXPORT extern const char plugin_name[] = "tresor";
TRESOR_SPANK_EXPORT extern const char plugin_type[] = "spank";
TRESOR_SPANK_EXPORT extern const unsigned int plugin_version = SLURM_VERSION_NUMBER;
TRESOR_SPANK_EXPORT extern const unsigned int spank_plugin_version = 1;
}

namespace tresor::spank {

State& state() {
  static State s;
  return s;
}

namespace {

// An option given without a value arrives remotely as the text "(null)" (PLATFORM.md).
std::string value_of(const char* optarg) {
  if (optarg == nullptr || std::strcmp(optarg, "(null)") == 0) return {};
  return optarg;
}

// Callbacks save the value; they run on both sides, more than once in a step: idempotent.
int on_dataset(int, const char* v, int) { state().options.datasets = value_of(v); return 0; }
int on_image(int, const char* v, int) { state().options.image = value_of(v); return 0; }
int on_output(int, const char* v, int) { state().options.output = value_of(v); return 0; }
int on_backend(int, const char* v, int) { state().options.backend = value_of(v); return 0; }
int on_recipient(int, const char* v, int) {
  const std::string r = value_of(v);
  auto& list = state().recipient_args;
  if (!r.empty() && std::find(list.begin(), list.end(), r) == list.end()) list.push_back(r);
  return 0;
}

struct spank_option kOptions[] = {
    {const_cast<char*>("tresor-dataset"), const_cast<char*>("ID[,ID...]"),
     const_cast<char*>("Run as a confidential Tresor job that may receive the keys of these datasets [TRESOR_DATASET]"), 1, 0,
     on_dataset},
    {const_cast<char*>("tresor-image"), const_cast<char*>("NAME"),
     const_cast<char*>("Tresor guest image from the cluster's catalogue (default: the catalogue's) [TRESOR_IMAGE]"), 1, 0, on_image},
    {const_cast<char*>("tresor-output"), const_cast<char*>("DIR"),
     const_cast<char*>("Where the job's sealed outputs go (default: ./tresor-output) [TRESOR_OUTPUT]"), 1, 0, on_output},
    {const_cast<char*>("tresor-recipient"), const_cast<char*>("RECIPIENT|@FILE"),
     const_cast<char*>("Seal the outputs to this recipient (default: your own key) [TRESOR_RECIPIENT]"), 1, 0, on_recipient},
    {const_cast<char*>("tresor-backend"), const_cast<char*>("local|libvirt"),
     const_cast<char*>("Where the job runs: local (no VM, NOT confidential) or libvirt [TRESOR_BACKEND]"), 1, 0, on_backend},
};

template <typename F>
int guarded(const char* where, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    slurm_error("tresor: internal error in %s: %s", where, e.what());
  } catch (...) {
    slurm_error("tresor: internal error in %s", where);
  }
  return -1;
}

}  // namespace
}  // namespace tresor::spank

extern "C" TRESOR_SPANK_EXPORT int slurm_spank_init(spank_t sp, int ac, char** av) {
  using namespace tresor::spank;
  return guarded("init", [&] {
    const spank_context_t ctx = spank_context();
    if (ctx == S_CTX_LOCAL || ctx == S_CTX_REMOTE || ctx == S_CTX_ALLOCATOR) {
      // sbatch accepts options only when registered here, not through a static table.
      for (auto& o : kOptions) {
        if (spank_option_register(sp, &o) != ESPANK_SUCCESS) {
          slurm_error("tresor: cannot register --%s", o.name);
          return -1;
        }
      }
    }
    std::vector<std::string> args(av, av + ac);
    auto config = tresor::slurm::parse_plugin_args(args);
    if (!config) {
      slurm_error("tresor: %s", config.error().message.c_str());
      return -1;
    }
    state().config = std::move(*config);
    state().config_ok = true;
    return 0;
  });
}

extern "C" TRESOR_SPANK_EXPORT int slurm_spank_init_post_opt(spank_t sp, int, char**) {
  using namespace tresor::spank;
  return guarded("init_post_opt", [&] {
    const spank_context_t ctx = spank_context();
    if (ctx == S_CTX_ALLOCATOR || ctx == S_CTX_LOCAL) return submit(sp);
    return 0;
  });
}

extern "C" TRESOR_SPANK_EXPORT int slurm_spank_task_init_privileged(spank_t sp, int, char**) {
  using namespace tresor::spank;
  return guarded("task_init_privileged", [&] {
    if (spank_context() != S_CTX_REMOTE) return 0;
    const int evidence = start_evidence_server(sp);
    return evidence != 0 ? evidence : start_vm_keeper(sp);
  });
}

extern "C" TRESOR_SPANK_EXPORT int slurm_spank_task_init(spank_t sp, int, char**) {
  using namespace tresor::spank;
  return guarded("task_init", [&] { return spank_context() == S_CTX_REMOTE ? exec_runner(sp) : 0; });
}

// slurmd, after the job (as root): the safety net for a runner that was killed before it could
// clean up — its sandbox's mount point is removed (plugin.h, remote.cc).
extern "C" TRESOR_SPANK_EXPORT int slurm_spank_job_epilog(spank_t sp, int, char**) {
  using namespace tresor::spank;
  return guarded("job_epilog", [&] { return cleanup_after_job(sp); });
}
