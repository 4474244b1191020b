// Golden sealed files of format version 1 (tests/testdata/sealed/v1). They must keep opening
// forever, and sealing the same plaintext with the same deterministic randomness must reproduce
// them byte for byte: any change to the format's bytes fails here first.
//
// Regenerate (only for a deliberate new format version, never to make v1 pass):
//   TRESOR_REGENERATE_GOLDEN=1 ./build/tests/sealed_golden_test
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "support/test_support.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

using testing::DeterministicRandom;
using testing::read_file;
using testing::testdata;

constexpr const char* kDir = "sealed/v1";

struct GoldenCase {
  std::string name;
  size_t plaintext_size;
  uint32_t chunk_size;
  bool to_user;
  bool to_dataset;
};

const std::vector<GoldenCase> kCases = {
    {"x25519-two-chunks", 100, 64, true, false},
    {"dataset-and-user", 1000, 256, true, true},
    {"dataset-only", 300, 64, false, true},
    {"empty", 0, 1u << 20, true, false},
    {"exact-chunks", 512, 128, true, false},
};

bool regenerate() { return std::getenv("TRESOR_REGENERATE_GOLDEN") != nullptr; }

Identity golden_identity() {
  DeterministicRandom rng("tresor golden identity v1");
  return *Identity::generate(rng);
}

DatasetKey golden_dataset_key() {
  DeterministicRandom rng("tresor golden dataset key v1");
  return *DatasetKey::generate("dhz/ccta-2024", rng);
}

Bytes golden_plaintext(const GoldenCase& c) { return testing::pattern_bytes(c.plaintext_size, 2024); }

Bytes seal_case(const GoldenCase& c, const Identity& id, const DatasetKey& dk) {
  DeterministicRandom rng("tresor golden v1 " + c.name);
  sealed::SealOptions o;
  o.chunk_size = c.chunk_size;
  o.rng = &rng;
  if (c.to_user) o.recipients.push_back(id.recipient());
  if (c.to_dataset) o.datasets.push_back(&dk);
  auto s = sealed::seal_buffer(golden_plaintext(c), o);
  EXPECT_TRUE(s.has_value()) << s.error().message;
  return s ? *s : Bytes{};
}

std::string path(const std::string& name) { return testdata(std::string(kDir) + "/" + name); }

void write(const std::string& p, ByteSpan data) {
  std::filesystem::create_directories(std::filesystem::path(p).parent_path());
  testing::write_file(p, data, 0644);
}

TEST(SealedGolden, Regenerate) {
  if (!regenerate()) GTEST_SKIP() << "set TRESOR_REGENERATE_GOLDEN=1 to rewrite tests/testdata/sealed/v1";
  const Identity id = golden_identity();
  const DatasetKey dk = golden_dataset_key();
  write(path("golden.identity"), as_bytes(id.to_file_text()));
  write(path("golden.datasetkey"), as_bytes(dk.to_file_text()));
  for (const auto& c : kCases) {
    write(path(c.name + ".plain"), golden_plaintext(c));
    write(path(c.name + ".sealed"), seal_case(c, id, dk));
  }
  // Intermediate values of the first case, for docs/formats.md §8 (test vectors).
  const GoldenCase& c = kCases[0];
  DeterministicRandom rng("tresor golden v1 " + c.name);
  Bytes file_key(32), prefix(7);
  ASSERT_TRUE(rng.fill(file_key));
  ASSERT_TRUE(rng.fill(prefix));
  auto keys = sealed::derive_stream_keys(file_key, prefix);
  ASSERT_TRUE(keys);
  const Bytes sealed_bytes = read_file(path(c.name + ".sealed"));
  auto h = sealed::parse_header(sealed_bytes);
  ASSERT_TRUE(h);
  nlohmann::json j;
  j["case"] = c.name;
  j["recipient"] = id.recipient().to_string();
  j["file_key"] = to_hex(file_key);
  j["nonce_prefix"] = to_hex(prefix);
  j["payload_key"] = to_hex(keys->payload_key.span());
  j["header_mac_key"] = to_hex(keys->mac_key.span());
  j["header"] = to_hex(ByteSpan(sealed_bytes).first(h->size()));
  j["chunk0_nonce"] = to_hex(sealed::chunk_nonce(h->nonce_prefix, 0, false));
  j["chunk1_nonce"] = to_hex(sealed::chunk_nonce(h->nonce_prefix, 1, true));
  j["plaintext"] = to_hex(golden_plaintext(c));
  j["sealed"] = to_hex(sealed_bytes);
  std::ofstream(path("vectors.json")) << j.dump(2) << "\n";
}

class SealedGoldenCase : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(SealedGoldenCase, OpensToRecordedPlaintext) {
  if (regenerate()) GTEST_SKIP();
  const GoldenCase& c = GetParam();
  const Bytes sealed_bytes = read_file(path(c.name + ".sealed"));
  const Bytes plain = read_file(path(c.name + ".plain"));
  ASSERT_EQ(plain.size(), c.plaintext_size);
  // Parse the key files as committed (they are test fixtures, not secrets).
  auto id = Identity::parse(to_string(read_file(path("golden.identity"))));
  ASSERT_TRUE(id) << id.error().message;
  auto dk = DatasetKey::parse("dhz/ccta-2024", to_string(read_file(path("golden.datasetkey"))));
  ASSERT_TRUE(dk) << dk.error().message;
  sealed::KeyRing ring;
  if (c.to_user) ring.identities.push_back(&*id);
  if (c.to_dataset) ring.dataset_keys.push_back(&*dk);
  auto opened = sealed::open_buffer(sealed_bytes, ring, {});
  ASSERT_TRUE(opened) << opened.error().message;
  EXPECT_TRUE(std::equal(plain.begin(), plain.end(), opened->span().begin(), opened->span().end()));

  // The streaming reader agrees.
  MemorySource src(sealed_bytes, 13);
  MemorySink sink;
  auto n = sealed::open_stream(src, sink, ring, {});
  ASSERT_TRUE(n) << n.error().message;
  EXPECT_EQ(sink.bytes, plain);
}

TEST_P(SealedGoldenCase, DeterministicSealReproducesGoldenBytes) {
  if (regenerate()) GTEST_SKIP();
  const GoldenCase& c = GetParam();
  const Bytes golden = read_file(path(c.name + ".sealed"));
  const Bytes again = seal_case(c, golden_identity(), golden_dataset_key());
  ASSERT_EQ(again.size(), golden.size());
  EXPECT_EQ(to_hex(again), to_hex(golden));
}

TEST_P(SealedGoldenCase, WrongIdentityDoesNotOpen) {
  if (regenerate()) GTEST_SKIP();
  const GoldenCase& c = GetParam();
  const Bytes sealed_bytes = read_file(path(c.name + ".sealed"));
  auto other = Identity::generate();
  ASSERT_TRUE(other);
  sealed::KeyRing ring;
  ring.identities.push_back(&*other);
  auto opened = sealed::open_buffer(sealed_bytes, ring, {});
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, ErrorCode::kNoMatchingKey);
}

INSTANTIATE_TEST_SUITE_P(V1, SealedGoldenCase, ::testing::ValuesIn(kCases),
                         [](const auto& param_info) {
                           std::string n = param_info.param.name;
                           for (auto& ch : n) ch = ch == '-' ? '_' : ch;
                           return n;
                         });

TEST(SealedGolden, VectorsFileMatchesDerivations) {
  if (regenerate()) GTEST_SKIP();
  std::ifstream f(path("vectors.json"));
  ASSERT_TRUE(f) << "missing " << path("vectors.json");
  const auto j = nlohmann::json::parse(f);
  auto file_key = from_hex(j["file_key"].get<std::string>());
  auto prefix = from_hex(j["nonce_prefix"].get<std::string>());
  ASSERT_TRUE(file_key && prefix);
  auto keys = sealed::derive_stream_keys(*file_key, *prefix);
  ASSERT_TRUE(keys);
  EXPECT_EQ(to_hex(keys->payload_key.span()), j["payload_key"].get<std::string>());
  EXPECT_EQ(to_hex(keys->mac_key.span()), j["header_mac_key"].get<std::string>());
  // The first chunk decrypts with the recorded payload key and nonce: an implementer's check.
  auto sealed_bytes = from_hex(j["sealed"].get<std::string>());
  auto header = from_hex(j["header"].get<std::string>());
  auto nonce0 = from_hex(j["chunk0_nonce"].get<std::string>());
  auto plain = from_hex(j["plaintext"].get<std::string>());
  ASSERT_TRUE(sealed_bytes && header && nonce0 && plain);
  auto chunk0 = crypto::aes256gcm_open(keys->payload_key.span(), *nonce0, {},
                                       ByteSpan(*sealed_bytes).subspan(header->size(), 64 + 16));
  ASSERT_TRUE(chunk0) << chunk0.error().message;
  EXPECT_TRUE(std::equal(chunk0->span().begin(), chunk0->span().end(), plain->begin()));
}

}  // namespace
}  // namespace tresor
