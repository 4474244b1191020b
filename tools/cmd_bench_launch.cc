// tresor bench launch: what a confidential job's launch adds (issues 5 and 6). Paired runs of
// `srun true` and `srun --tresor-dataset=ID --tresor-backend=B true` on a configured cluster
// (SLURM_CONF and the user's TRESOR_IDENTITY in the environment; scripts/bench-launch sets one up
// on this machine), the plain run as the baseline measured in the same run, and the added time
// split into phases from the TRESOR_TIMING lines of the agent (attestation and keys, job,
// sealing) and, for the libvirt backend, of the runner (domain create, boot to agent, teardown).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <regex>

#include "cli.h"
#include "options.h"

namespace tresor::cli {
namespace {

struct Run {
  double ms = 0;
  int status = -1;
  std::string err;
};

// The command's time from start to exit, and its standard error (stdout stays ours).
Run run_timed(const std::vector<std::string>& argv) {
  const auto start = std::chrono::steady_clock::now();
  Captured c = run_program(argv, Stream::kInherit, Stream::kCapture);
  return Run{std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count(), c.status, std::move(c.output)};
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}
double p90(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(0.9 * static_cast<double>(v.size() - 1) + 0.5))];
}

}  // namespace

int cmd_bench_launch(int argc, char** argv) {
  po::options_description opts("Options");
  std::string dataset, srun = "srun", backend = "local";
  unsigned runs = 20;
  opts.add_options()
      ("dataset", po::value(&dataset)->required(), "a dataset the user may receive (the confidential run asks for its key)")
      ("runs", po::value(&runs)->default_value(20), "paired runs")
      ("srun", po::value(&srun)->default_value("srun"), "the srun to use")
      ("backend", po::value(&backend)->default_value("local"), "local or libvirt (the cluster must allow it)");
  po::variables_map vm;
  if (auto stop = parse_options("bench launch", "--dataset ID [--runs N]   (with SLURM_CONF and TRESOR_IDENTITY set)", argc, argv,
                                opts, {}, vm)) {
    return *stop;
  }
  if (runs == 0 || runs > 1000) return usage_error("bench launch", "--runs must be 1..1000");
  if (backend != "local" && backend != "libvirt") return usage_error("bench launch", "--backend must be local or libvirt");
  const bool vm_backend = backend == "libvirt";
  const std::regex vm_timing(
      R"(tresor-run: timing domain_create_ms=([0-9.]+) boot_to_agent_ms=([0-9.]+) agent_ms=([0-9.]+) teardown_ms=([0-9.]+))");
  std::vector<double> create, boot, agent_run, teardown;
  ::setenv("TRESOR_TIMING", "1", 1);  // the agent reports its phases
  const std::regex timing(R"(tresor-agent: timing attest_keys_inputs_ms=([0-9.]+) job_ms=([0-9.]+) seal_ms=([0-9.]+))");
  std::vector<double> plain, tresor, added, prepare, job, seal;
  for (unsigned i = 0; i < runs; ++i) {
    Run p = run_timed({srun, "true"});
    Run t = run_timed({srun, "--tresor-dataset=" + dataset, "--tresor-backend=" + backend, "true"});
    if (p.status != 0 || t.status != 0) {
      std::fprintf(stderr, "tresor bench launch: run %u failed:\n%s%s", i + 1, p.err.c_str(), t.err.c_str());
      return kExitInternal;
    }
    std::smatch m;
    if (!std::regex_search(t.err, m, timing)) {
      std::fprintf(stderr, "tresor bench launch: the agent reported no timing (is this cluster's plugin Tresor's?):\n%s", t.err.c_str());
      return kExitInternal;
    }
    if (vm_backend) {
      std::smatch v;
      if (!std::regex_search(t.err, v, vm_timing)) {
        std::fprintf(stderr, "tresor bench launch: the runner reported no VM timing:\n%s", t.err.c_str());
        return kExitInternal;
      }
      create.push_back(std::stod(v[1]));
      boot.push_back(std::stod(v[2]));
      agent_run.push_back(std::stod(v[3]));
      teardown.push_back(std::stod(v[4]));
    }
    plain.push_back(p.ms);
    tresor.push_back(t.ms);
    added.push_back(t.ms - p.ms);
    prepare.push_back(std::stod(m[1]));
    job.push_back(std::stod(m[2]));
    seal.push_back(std::stod(m[3]));
  }
  std::vector<double> launch;
  for (size_t i = 0; i < added.size(); ++i) {
    // The host's clock for the VM's phases (they do not overlap); the guest's own split of its
    // part (attestation, job, sealing) is shown beneath, measured inside the VM.
    launch.push_back(vm_backend ? added[i] - create[i] - boot[i] - agent_run[i] - teardown[i] : added[i] - prepare[i] - seal[i]);
  }
  std::printf("tresor bench launch: %u paired runs of `srun true` and `srun --tresor-dataset=%s --tresor-backend=%s true`\n", runs,
              dataset.c_str(), backend.c_str());
  std::printf("  %-60s %10s %10s\n", "", "median ms", "p90 ms");
  auto row = [](const char* what, const std::vector<double>& v) { std::printf("  %-60s %10.1f %10.1f\n", what, median(v), p90(v)); };
  row("plain srun (baseline)", plain);
  row(vm_backend ? "confidential srun, libvirt backend (a VM per job)" : "confidential srun, local backend", tresor);
  row("added by Tresor", added);
  if (vm_backend) {
    row("  of which: domain created (libvirt, QEMU started)", create);
    row("  of which: boot to the agent's first message", boot);
    row("  of which: the agent's work (first message to the job's status)", agent_run);
    row("    in the guest: attest, key release, inputs opened", prepare);
    row("    in the guest: the job", job);
    row("    in the guest: outputs sealed", seal);
    row("  of which: teardown (power-off, destroy)", teardown);
    row("  of which: plugin, manifest, runner, the rest", launch);
  } else {
    row("  of which: attest, key release, inputs opened", prepare);
    row("  of which: outputs sealed", seal);
    row("  of which: plugin, manifest, runner, sandbox, agent start", launch);
  }
  if (vm_backend) {
    std::printf("RESULT launch-vm runs=%u plain_ms=%.1f tresor_ms=%.1f added_ms=%.1f ratio=%.2f create_ms=%.1f boot_ms=%.1f agent_ms=%.1f "
                "guest_attest_keys_inputs_ms=%.1f guest_job_ms=%.1f guest_seal_ms=%.1f teardown_ms=%.1f rest_ms=%.1f\n",
                runs, median(plain), median(tresor), median(added), median(plain) > 0 ? median(tresor) / median(plain) : 0.0,
                median(create), median(boot), median(agent_run), median(prepare), median(job), median(seal), median(teardown),
                median(launch));
  } else {
    std::printf("RESULT launch runs=%u plain_ms=%.1f tresor_ms=%.1f added_ms=%.1f ratio=%.2f attest_keys_inputs_ms=%.1f seal_ms=%.1f "
                "launch_ms=%.1f\n",
                runs, median(plain), median(tresor), median(added), median(plain) > 0 ? median(tresor) / median(plain) : 0.0,
                median(prepare), median(seal), median(launch));
  }
  return kExitOk;
}

}  // namespace tresor::cli
