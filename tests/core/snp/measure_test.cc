// SEV-SNP launch measurement: every published case in ../shared/testdata/snp/measure/expected.json
// is reproduced (firmware, empty kernel and initrd, command lines, 1 and 4 vCPUs, guest features
// 0x1 and 0x21), a kernel is refused with a firmware that cannot measure it, and any change to an
// input changes the digest.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "support/test_support.h"
#include "tresor/snp/measure.h"

namespace tresor {
namespace {

using testing::shared_testdata;

using testing::FailsWith;
using testing::read_file;


TEST(SnpMeasure, ReproducesEveryPublishedCase) {
  const auto j = nlohmann::json::parse(std::ifstream(shared_testdata("snp/measure/expected.json")));
  ASSERT_GE(j["cases"].size(), 8u);
  const Bytes empty;
  for (const auto& c : j["cases"]) {
    SCOPED_TRACE(c.dump());
    const Bytes ovmf = read_file(shared_testdata("snp/measure/" + c["ovmf"].get<std::string>()));
    snp::MeasureInputs in;
    in.ovmf = ovmf;
    in.vcpus = c["vcpus"].get<unsigned>();
    auto sig = snp::vcpu_signature(c["vcpu_type"].get<std::string>());
    ASSERT_TRUE(sig);
    in.vcpu_sig = *sig;
    in.guest_features = std::stoull(c["guest_features"].get<std::string>(), nullptr, 16);
    if (!c["kernel"].is_null()) {
      in.kernel = ByteSpan(empty);
      in.append = c.value("append", "");
    }
    auto d = snp::launch_digest(in);
    ASSERT_TRUE(d) << d.error().message;
    EXPECT_EQ(to_hex(*d), c["measurement"].get<std::string>());
  }
}

TEST(SnpMeasure, RefusesAKernelWithoutAKernelHashesSection) {
  const auto j = nlohmann::json::parse(std::ifstream(shared_testdata("snp/measure/expected.json")));
  ASSERT_EQ(j["must_fail"].size(), 1u);
  const Bytes ovmf = read_file(shared_testdata("snp/measure/" + j["must_fail"][0]["ovmf"].get<std::string>()));
  const Bytes empty;
  snp::MeasureInputs in;
  in.ovmf = ovmf;
  in.kernel = ByteSpan(empty);
  auto d = snp::launch_digest(in);
  ASSERT_TRUE(FailsWith(d, ErrorCode::kInvalidArgument));
  EXPECT_NE(d.error().message.find("SNP_KERNEL_HASHES"), std::string::npos) << d.error().message;
  in.kernel.reset();
  EXPECT_TRUE(snp::launch_digest(in));  // the twin: without a kernel it measures
}

TEST(SnpMeasure, EveryInputChangesTheDigest) {
  const Bytes ovmf = read_file(shared_testdata("snp/measure/ovmf_AmdSev_suffix.bin"));
  const Bytes kernel = testing::pattern_bytes(10000, 1), initrd = testing::pattern_bytes(5000, 2);
  snp::MeasureInputs base;
  base.ovmf = ovmf;
  base.kernel = ByteSpan(kernel);
  base.initrd = initrd;
  base.append = "console=ttyS0";
  base.vcpus = 2;
  const auto ref = snp::launch_digest(base);
  ASSERT_TRUE(ref);
  std::vector<std::pair<std::string, snp::MeasureInputs>> variants;
  Bytes other_kernel = kernel;
  other_kernel[5000] ^= std::byte{1};
  Bytes other_ovmf = ovmf;
  other_ovmf[100] ^= std::byte{1};
  auto v = base;
  v.kernel = ByteSpan(other_kernel);
  variants.push_back({"kernel", v});
  v = base;
  v.initrd = {};
  variants.push_back({"initrd", v});
  v = base;
  v.append = "console=ttyS1";
  variants.push_back({"append", v});
  v = base;
  v.vcpus = 3;
  variants.push_back({"vcpus", v});
  v = base;
  v.vcpu_sig = *snp::vcpu_signature("EPYC-Milan");
  variants.push_back({"vcpu type", v});
  v = base;
  v.guest_features = 0x21;
  variants.push_back({"guest features", v});
  v = base;
  v.ovmf = other_ovmf;
  variants.push_back({"firmware", v});
  for (const auto& [name, in] : variants) {
    SCOPED_TRACE(name);
    auto d = snp::launch_digest(in);
    ASSERT_TRUE(d) << d.error().message;
    EXPECT_NE(*d, *ref);
  }
  EXPECT_EQ(*snp::launch_digest(base), *ref);  // and it is deterministic
}

TEST(SnpMeasure, BadInputsAreNamed) {
  snp::MeasureInputs in;
  const Bytes junk = testing::pattern_bytes(8192, 3);
  in.ovmf = junk;
  auto d = snp::launch_digest(in);
  ASSERT_TRUE(FailsWith(d, ErrorCode::kInvalidArgument));
  EXPECT_NE(d.error().message.find("footer"), std::string::npos) << d.error().message;
  const Bytes odd(1000);
  in.ovmf = odd;
  EXPECT_NE(snp::launch_digest(in).error().message.find("multiple of 4 KiB"), std::string::npos);
  auto t = snp::vcpu_signature("Pentium");
  ASSERT_TRUE(FailsWith(t, ErrorCode::kInvalidArgument));
  EXPECT_NE(t.error().message.find("EPYC-Milan"), std::string::npos);
  EXPECT_EQ(*snp::vcpu_signature("EPYC-v4"), 0x800F12u);
  EXPECT_EQ(*snp::vcpu_signature("EPYC-Milan"), 0xA00F11u);
  EXPECT_EQ(*snp::vcpu_signature("EPYC-Genoa"), 0xA10F10u);
}

}  // namespace
}  // namespace tresor
