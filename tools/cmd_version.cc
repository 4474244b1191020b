// tresor version: what this build is and what it can use here.
#include <openssl/crypto.h>

#include <cstdio>

#include "options.h"
#include "tresor/gpu.h"
#include "tresor/sealed.h"

#ifndef TRESOR_VERSION
#define TRESOR_VERSION "unknown"
#endif

namespace tresor::cli {

int cmd_version(int argc, char** argv) {
  po::options_description opts("Options");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("version", "", argc, argv, opts, pos, vm)) return *stop;
  std::printf("tresor %s\n", TRESOR_VERSION);
  std::printf("sealed format: version %d\n", sealed::kVersion);
  std::printf("openssl: %s\n", OpenSSL_version(OPENSSL_VERSION));
  std::printf("cuda: %s\n", gpu::built_with_cuda() ? "built with CUDA (sm_80, sm_90)" : "not built");
  auto devs = gpu::gpu_probe();
  if (!devs) {
    std::printf("gpus: none usable (%s)\n", devs.error().message.c_str());
  } else {
    for (const auto& d : *devs) {
      std::printf("gpu %d: %s, compute %d.%d, %s\n", d.index, d.name.c_str(), d.cc_major, d.cc_minor,
                  format_size(d.memory_bytes).c_str());
    }
  }
  return kExitOk;
}

}  // namespace tresor::cli
