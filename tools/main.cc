// tresor — the command-line tool for users and data owners (docs/cli.md).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"keygen", tresor::cli::cmd_keygen, "create a user identity (or a dataset key with --dataset)"},
    {"pubkey", tresor::cli::cmd_pubkey, "print the public recipient string of an identity"},
    {"seal", tresor::cli::cmd_seal, "encrypt a file to recipients and/or dataset keys"},
    {"open", tresor::cli::cmd_open, "decrypt and verify a sealed file"},
    {"inspect", tresor::cli::cmd_inspect, "show a sealed file's header (never secrets)"},
    {"report", tresor::cli::cmd_report, "SEV-SNP attestation reports: show, verify against AMD's chain and a policy"},
    {"measure", tresor::cli::cmd_measure, "the SEV-SNP launch measurement of a firmware, kernel and vCPU layout"},
    {"doctor", tresor::cli::cmd_doctor, "what this host lacks to run Tresor's VMs (plain, and SEV-SNP)"},
    {"image", tresor::cli::cmd_image, "guest images for the VM backend: build one from Debian's kernel, check one"},
    {"sim", tresor::cli::cmd_sim, "the sim secure processor: a test root that signs SNP reports (no hardware)"},
    {"manifest", tresor::cli::cmd_manifest, "create and sign a job manifest, or show one"},
    {"kbs", tresor::cli::cmd_kbs, "talk to a key broker by hand (get-resource with sim evidence)"},
    {"admin", tresor::cli::cmd_admin, "administer a key broker over its admin socket"},
    {"phantom", tresor::cli::cmd_phantom, "a synthetic coronary CT angiography volume with its ground truth (NIfTI)"},
    {"prep", tresor::cli::cmd_prep, "CT preprocessing: isotropic z-scored volumes, vesselness, training patches, previews"},
    {"train", tresor::cli::cmd_train, "train the coronary 3D U-Net on prepared CT (CPU reference; sealed checkpoints)"},
    {"roster", tresor::cli::cmd_roster, "link keys and step rosters: data-parallel training across machines over pinned TLS"},
    {"predict", tresor::cli::cmd_predict, "segment prepared CT with a trained checkpoint (sliding windows; sealed outputs)"},
    {"bench", tresor::cli::cmd_bench, "benchmarks: seal (throughput against OpenSSL), verify (SNP reports), broker (KBS flows under load), launch, gpu (the GPU data path), prep (CT preprocessing against scikit-image), train (the U-Net step against PyTorch), collective (the all-reduce over pinned TLS against plain TCP)"},
    {"version", tresor::cli::cmd_version, "print version, OpenSSL and CUDA information"},
};

void print_usage(FILE* f) {
  std::fprintf(f,
               "Usage: tresor COMMAND [OPTIONS]\n\n"
               "Tresor seals data so that only approved confidential jobs and the named users can read it.\n\n"
               "Commands:\n");
  for (const auto& c : kCommands) std::fprintf(f, "  %-9s %s\n", c.name, c.summary);
  std::fprintf(f,
               "\nRun 'tresor COMMAND --help' for a command's options.\n"
               "Exit codes: 0 ok, 1 internal, 2 usage, 3 I/O, 4 no matching key, 5 integrity or authenticity failure,\n"
               "6 format, 7 policy denies.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return tresor::cli::kExitUsage;
  }
  const std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    print_usage(stdout);
    return tresor::cli::kExitOk;
  }
  if (cmd == "--version") return tresor::cli::cmd_version(argc - 1, argv + 1);
  for (const auto& c : kCommands) {
    if (cmd == c.name) {
      try {
        return c.run(argc - 1, argv + 1);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "tresor %s: internal error: %s\n", c.name, e.what());
        return tresor::cli::kExitInternal;
      }
    }
  }
  std::fprintf(stderr, "tresor: unknown command '%s'\n\n", cmd.c_str());
  print_usage(stderr);
  return tresor::cli::kExitUsage;
}
