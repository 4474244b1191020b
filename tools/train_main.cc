// tresor-train — the CPU trainer alone, for guest images (docs/images.md, docs/training.md §5.5):
// `tresor-train train …` and `tresor-train predict …` are `tresor train` and `tresor predict`
// with --device cpu only. It links no CUDA library (the tresor CLI's GPU paths bring about
// 850 MiB of them), so `tresor image build --program` can put it into an initramfs.
#include <cstdio>
#include <exception>
#include <string>

#include "cli.h"

int main(int argc, char** argv) {
  using namespace tresor::cli;
  const std::string cmd = argc >= 2 ? argv[1] : "";
  if (cmd == "-h" || cmd == "--help" || cmd.empty()) {
    std::fprintf(cmd.empty() ? stderr : stdout,
                 "Usage: tresor-train train --config FILE [options]    train the coronary U-Net on CPUs (tresor train --help)\n"
                 "       tresor-train predict [options]                segment with a trained checkpoint (tresor predict --help)\n"
                 "The CPU trainer of tresor, without its GPU paths: for guest images.\n");
    return cmd.empty() ? kExitUsage : kExitOk;
  }
  int (*run)(int, char**) = cmd == "train" ? cmd_train : cmd == "predict" ? cmd_predict : nullptr;
  if (run == nullptr) {
    std::fprintf(stderr, "tresor-train: unknown command '%s' (train, predict)\n", cmd.c_str());
    return kExitUsage;
  }
  try {
    return run(argc - 1, argv + 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tresor-train %s: internal error: %s\n", cmd.c_str(), e.what());
    return kExitInternal;
  }
}
