// libFuzzer target for what cluster configuration and the job's environment feed the Slurm path
// (include/tresor/slurm/job.h): the image catalogue, the GPU table, plugstack.conf arguments and
// the TRESOR_MANIFEST value. Nothing may crash; whatever parses must round-trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "tresor/slurm/job.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)tresor::slurm::parse_image_catalogue(text);
  if (auto table = tresor::slurm::parse_gpu_table(text)) {
    for (const auto& [index, pci] : *table) {
      auto gpus = tresor::slurm::job_gpus(std::to_string(index), "", *table);
      if (!gpus || gpus->size() != 1 || gpus->front() != pci) std::abort();
    }
  }
  std::vector<std::string> args;
  std::istringstream words(text);
  for (std::string w; words >> w;) args.push_back(w);
  (void)tresor::slurm::parse_plugin_args(args);
  (void)tresor::slurm::find_operand(args, true);
  (void)tresor::slurm::find_operand(args, false);
  if (auto m = tresor::slurm::decode_manifest_env(text)) {
    auto env = tresor::slurm::encode_manifest_env(*m);
    if (!env) std::abort();
    auto again = tresor::slurm::decode_manifest_env(*env);
    if (!again || !(*again == *m)) std::abort();
  }
  return 0;
}
