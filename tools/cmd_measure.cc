// tresor measure: the SEV-SNP launch measurement of a guest image, computed offline, for data
// owners to approve before the image ever runs (docs/attestation.md §Launch measurement).
#include <cstdio>

#include "options.h"
#include "tresor/snp/measure.h"

namespace tresor::cli {

int cmd_measure(int argc, char** argv) {
  po::options_description opts("Options");
  std::string ovmf, kernel, initrd, append, vcpu_type = "EPYC-v4", features = "0x1";
  unsigned vcpus = 1;
  opts.add_options()
      ("ovmf", po::value(&ovmf)->required(), "firmware image (an AmdSev OVMF build to measure a kernel)")
      ("kernel", po::value(&kernel), "kernel given to QEMU with -kernel")
      ("initrd", po::value(&initrd), "initrd given with -initrd")
      ("append", po::value(&append), "kernel command line given with -append")
      ("vcpus", po::value(&vcpus)->default_value(1), "number of vCPUs")
      ("vcpu-type", po::value(&vcpu_type)->default_value("EPYC-v4"), "QEMU vCPU model: EPYC-v4, EPYC-Milan, EPYC-Genoa, EPYC-Turin, …")
      ("guest-features", po::value(&features)->default_value("0x1"), "SEV_FEATURES of the VMSA (hex; bit 0 = SNP)");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("measure", "--ovmf F [--kernel K --initrd I --append S] --vcpus N --vcpu-type T --guest-features 0xN",
                                argc, argv, opts, pos, vm)) {
    return *stop;
  }
  if ((!initrd.empty() || vm.count("append")) && kernel.empty()) {
    return usage_error("measure", "--initrd and --append measure only together with --kernel");
  }
  auto sig = snp::vcpu_signature(vcpu_type);
  if (!sig) return usage_error("measure", sig.error().message);
  uint64_t guest_features = 0;
  try {
    size_t used = 0;
    guest_features = std::stoull(features, &used, 16);
    if (used != features.size()) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    return usage_error("measure", "--guest-features '" + features + "' is not a hex number");
  }
  auto fw = read_small_file(ovmf, 64u << 20);
  if (!fw) return report(fw.error());
  const Bytes fw_bytes = to_bytes(*fw);
  Bytes kernel_bytes, initrd_bytes;
  snp::MeasureInputs in;
  in.ovmf = fw_bytes;
  in.vcpus = vcpus;
  in.vcpu_sig = *sig;
  in.guest_features = guest_features;
  if (!kernel.empty()) {
    auto k = read_small_file(kernel, 512u << 20);
    if (!k) return report(k.error());
    kernel_bytes = to_bytes(*k);
    in.kernel = ByteSpan(kernel_bytes);
    in.append = append;
    if (!initrd.empty()) {
      auto i = read_small_file(initrd, 2048u << 20);
      if (!i) return report(i.error());
      initrd_bytes = to_bytes(*i);
      in.initrd = initrd_bytes;
    }
  }
  auto d = snp::launch_digest(in);
  if (!d) return report({d.error().code, ovmf + ": " + d.error().message});
  std::fprintf(stderr, "tresor: launch measurement for %u x %s (sig 0x%X), guest features 0x%llx%s\n", vcpus,
               vcpu_type.c_str(), *sig, static_cast<unsigned long long>(guest_features),
               kernel.empty() ? ", firmware only" : ", with kernel, initrd and command line");
  std::printf("%s\n", to_hex(*d).c_str());
  return kExitOk;
}

}  // namespace tresor::cli
