// The real tresor binary, run as a user would: keygen, seal, open, inspect, bench, and every
// failure with its documented exit code, a message that names the problem, and no output left
// behind (docs/cli.md).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <future>

#include "support/test_support.h"
#include "tresor/gpu.h"
#include "tresor/train/trainer.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

using testing::pattern_bytes;
using testing::read_file;
using testing::run_command;
using testing::run_tresor;
using testing::TempDir;
using testing::write_file;

// The file keys of `files` (sealed to `owner`), written to `path` as the agent writes them for a job
// submitted with TRESOR_INPUTS=sealed.
void write_file_keys(const std::string& path, const std::vector<std::string>& files, const Identity& owner) {
  sealed::FileKeys keys;
  sealed::KeyRing ring;
  ring.identities = {&owner};
  for (const auto& f : files) {
    const Bytes bytes = read_file(f);
    auto header = sealed::parse_header(bytes);
    ASSERT_TRUE(header) << f;
    auto key = sealed::unlock(*header, ByteSpan(bytes.data(), header->size()), ring, f);
    ASSERT_TRUE(key) << key.error().message;
    ASSERT_TRUE(keys.add(header->mac, std::move(*key), f));
  }
  const SecretBuffer text = keys.to_file_text();
  write_file(path, text.span(), 0600);
}

struct Cli : ::testing::Test {
  TempDir dir;
  std::string identity = dir.file("me.identity");
  std::string recipient;

  void SetUp() override {
    auto r = run_tresor({"keygen", "-o", identity});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    recipient = r.out.substr(0, r.out.find('\n'));
    ASSERT_TRUE(recipient.starts_with("tresor1")) << r.out;
  }

  std::string make_input(const std::string& name, size_t size, uint32_t seed = 1) {
    const std::string p = dir.file(name);
    write_file(p, pattern_bytes(size, seed), 0644);
    return p;
  }

  // No temporary or output files beyond `expected` in the scratch directory.
  void expect_only(std::initializer_list<std::string> expected) {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir.path())) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    std::vector<std::string> want(expected);
    std::sort(want.begin(), want.end());
    EXPECT_EQ(names, want);
  }
};

TEST_F(Cli, KeygenWritesPrivateIdentityAndPrintsRecipient) {
  struct stat st{};
  ASSERT_EQ(::stat(identity.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto pub = run_tresor({"pubkey", identity});
  EXPECT_EQ(pub.exit_code, 0) << pub.err;
  EXPECT_EQ(pub.out, recipient + "\n");
  // Refuses to overwrite.
  auto again = run_tresor({"keygen", "-o", identity});
  EXPECT_EQ(again.exit_code, 3);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;
  EXPECT_EQ(run_tresor({"pubkey", identity}).out, pub.out);
  // Missing parent directories are created, private to the user.
  const std::string nested = dir.file("home/.config/tresor/identity");
  auto made = run_tresor({"keygen", "-o", nested});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  struct stat dst{};
  ASSERT_EQ(::stat(dir.file("home/.config/tresor").c_str(), &dst), 0);
  EXPECT_EQ(dst.st_mode & 0777, 0700u);
  EXPECT_EQ(run_tresor({"pubkey", nested}).exit_code, 0);
  // Missing -o is a usage error.
  auto usage = run_tresor({"keygen"});
  EXPECT_EQ(usage.exit_code, 2);
  EXPECT_NE(usage.err.find("output"), std::string::npos) << usage.err;
}

TEST_F(Cli, SealOpenRoundTripThroughFilesAndPipes) {
  const std::string in = make_input("scan.dcm", 3 * (1 << 20) + 12345);
  const std::string sealed_path = dir.file("scan.sealed");
  auto s = run_tresor({"seal", "-r", recipient, "-o", sealed_path, in});
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_NE(read_file(sealed_path), read_file(in));

  const std::string out = dir.file("scan.out");
  auto o = run_tresor({"open", "-i", identity, "-o", out, sealed_path});
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_EQ(read_file(out), read_file(in));
  struct stat st{};
  ASSERT_EQ(::stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "plaintext output must be private";

  // From a pipe to stdout, a failure after some chunks says the output is incomplete; a failure
  // before any plaintext does not.
  Bytes bad_tail = read_file(sealed_path);
  bad_tail[bad_tail.size() - 5] ^= std::byte{1};
  auto partial = run_tresor({"open", "-i", identity, "-o", "-", "-"}, to_string(bad_tail));
  EXPECT_EQ(partial.exit_code, 5);
  EXPECT_GT(partial.out.size(), 0u);
  EXPECT_NE(partial.err.find("incomplete"), std::string::npos) << partial.err;
  Bytes bad_head = read_file(sealed_path);
  bad_head[21] ^= std::byte{1};
  auto none = run_tresor({"open", "-i", identity, "-o", "-", "-"}, to_string(bad_head));
  EXPECT_EQ(none.exit_code, 5);
  EXPECT_TRUE(none.out.empty());
  EXPECT_EQ(none.err.find("incomplete"), std::string::npos) << none.err;

  // stdin → stdout both ways.
  const std::string data = to_string(pattern_bytes(200000, 9));
  auto sp = run_tresor({"seal", "-r", recipient, "--chunk-size", "4KiB", "-o", "-", "-"}, data);
  ASSERT_EQ(sp.exit_code, 0) << sp.err;
  auto op = run_tresor({"open", "-i", identity, "-o", "-", "-"}, sp.out);
  ASSERT_EQ(op.exit_code, 0) << op.err;
  EXPECT_EQ(op.out, data);
}

TEST_F(Cli, SeveralRecipientsFromFileAndDatasetKeys) {
  const std::string second = dir.file("second.identity");
  auto k2 = run_tresor({"keygen", "-o", second});
  ASSERT_EQ(k2.exit_code, 0);
  const std::string list = dir.file("recipients.txt");
  write_file(list, as_bytes("# team\n" + k2.out + "\n"), 0644);
  const std::string key = dir.file("ds.key");
  auto dk = run_tresor({"keygen", "--dataset", "dhz/ccta-2024", "-o", key});
  ASSERT_EQ(dk.exit_code, 0) << dk.err;
  EXPECT_EQ(dk.out, "") << "a dataset key must never be printed";

  const std::string in = make_input("in.bin", 70000);
  const std::string sealed_path = dir.file("in.sealed");
  auto s = run_tresor({"seal", "-r", recipient, "-r", "@" + list, "--dataset-key-file", key, "--dataset",
                       "dhz/ccta-2024", "-o", sealed_path, in});
  ASSERT_EQ(s.exit_code, 0) << s.err;

  auto info = run_tresor({"inspect", "--json", sealed_path});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  const auto j = nlohmann::json::parse(info.out);
  ASSERT_EQ(j["stanzas"].size(), 3u);
  EXPECT_EQ(j["stanzas"][2]["dataset"], "dhz/ccta-2024");
  EXPECT_EQ(j["plaintext_bytes"], 70000);
  EXPECT_EQ(j["authenticated"], false);

  int variant = 0;
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"-i", second},
           {"--dataset-key-file", key},
           {"--dataset-key-file", key, "--dataset", "dhz/ccta-2024"}}) {
    const std::string out = dir.file("out-" + std::to_string(variant++));
    std::vector<std::string> cmd{"open"};
    cmd.insert(cmd.end(), args.begin(), args.end());
    cmd.insert(cmd.end(), {"-o", out, sealed_path});
    auto o = run_tresor(cmd);
    ASSERT_EQ(o.exit_code, 0) << o.err;
    EXPECT_EQ(read_file(out), read_file(in));
  }
  // A dataset key named for another dataset does not open it.
  auto wrong = run_tresor({"open", "--dataset-key-file", key, "--dataset", "other/set", "-o", dir.file("x"), sealed_path});
  EXPECT_EQ(wrong.exit_code, 4) << wrong.err;
}

TEST_F(Cli, FailuresHaveDistinctExitCodesAndLeaveNothingBehind) {
  const std::string in = make_input("data.bin", 5 * 4096 + 100);
  const std::string sealed_path = dir.file("data.sealed");
  ASSERT_EQ(run_tresor({"seal", "-r", recipient, "--chunk-size", "4096", "-o", sealed_path, in}).exit_code, 0);
  const Bytes good = read_file(sealed_path);
  const size_t hlen = sealed::parse_header(good)->size();

  struct Case {
    std::string name;
    Bytes file;
    int want_exit;
    std::string want_text;
  };
  auto flipped = [&](size_t off) {
    Bytes b = good;
    b[off] ^= std::byte{0x20};
    return b;
  };
  Bytes truncated(good.begin(), good.begin() + static_cast<long>(hlen + 3 * (4096 + 16)));
  Bytes extended = good;
  extended.insert(extended.end(), good.begin() + static_cast<long>(hlen), good.begin() + static_cast<long>(hlen + 4112));
  Bytes reordered = good;
  std::copy(good.begin() + static_cast<long>(hlen), good.begin() + static_cast<long>(hlen + 4112),
            reordered.begin() + static_cast<long>(hlen + 4112));
  std::copy(good.begin() + static_cast<long>(hlen + 4112), good.begin() + static_cast<long>(hlen + 2 * 4112),
            reordered.begin() + static_cast<long>(hlen));
  Bytes v2 = good;
  v2[8] = std::byte{2};
  const std::vector<Case> cases = {
      {"flipped ciphertext", flipped(hlen + 2 * 4112 + 7), 5, "chunk 2"},
      {"flipped header", flipped(21), 5, "header MAC"},
      {"truncated", truncated, 5, "truncated"},
      {"reordered", reordered, 5, "reordered"},
      {"extended", extended, 5, "chunk"},
      {"not sealed", to_bytes("just text, not a sealed file"), 6, "not a Tresor sealed file"},
      {"unsupported version", v2, 6, "version 2"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string bad = dir.file("bad.sealed");
    write_file(bad, c.file, 0644);
    const std::string out = dir.file("bad.out");
    auto r = run_tresor({"open", "-i", identity, "-o", out, bad});
    EXPECT_EQ(r.exit_code, c.want_exit) << r.err;
    EXPECT_NE(r.err.find(c.want_text), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("bad.sealed"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(out)) << "plaintext of a failing stream was released";
    // To stdout: the whole file is verified first, so nothing at all is written.
    auto so = run_tresor({"open", "-i", identity, "-o", "-", bad});
    EXPECT_EQ(so.exit_code, c.want_exit);
    EXPECT_TRUE(so.out.empty()) << so.out.size() << " bytes of plaintext reached stdout";
    std::filesystem::remove(bad);
  }
  expect_only({"me.identity", "data.bin", "data.sealed"});

  // Wrong identity: exit 4, no output.
  const std::string other = dir.file("other.identity");
  ASSERT_EQ(run_tresor({"keygen", "-o", other}).exit_code, 0);
  auto w = run_tresor({"open", "-i", other, "-o", dir.file("nope"), sealed_path});
  EXPECT_EQ(w.exit_code, 4);
  EXPECT_NE(w.err.find("no stanza opens"), std::string::npos) << w.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("nope")));
}

TEST_F(Cli, BadInputsGiveUsageOrIoErrorsThatSayWhatIsWrong) {
  const std::string in = make_input("x.bin", 10);
  struct Case {
    std::vector<std::string> args;
    int want_exit;
    std::string want_text;
  };
  std::string typo = recipient;
  typo[20] = typo[20] == 'a' ? 'b' : 'a';
  const std::vector<Case> cases = {
      {{"seal", "-r", typo, "-o", dir.file("o"), in}, 2, "checksum"},
      {{"seal", "-r", "age1qqqq", "-o", dir.file("o"), in}, 2, "tresor1"},
      {{"seal", "-o", dir.file("o"), in}, 2, "recipient"},
      {{"seal", "-r", recipient, "--chunk-size", "1000", "-o", dir.file("o"), in}, 2, "multiple of 16"},
      {{"seal", "-r", recipient, "--chunk-size", "lots", "-o", dir.file("o"), in}, 2, "--chunk-size"},
      {{"seal", "-r", recipient, "-o", dir.file("o"), dir.file("missing.bin")}, 3, "missing.bin"},
      {{"seal", "-r", recipient, "--dataset-key-file", in, "-o", dir.file("o"), in}, 2, "--dataset"},
      {{"seal", "-r", recipient, "-o", in, in}, 3, "already exists"},
      {{"open", "-o", dir.file("o"), in}, 2, "identity"},
      {{"open", "-i", dir.file("missing.identity"), "-o", dir.file("o"), in}, 3, "missing.identity"},
      {{"keygen", "--dataset", "../escape", "-o", dir.file("k")}, 2, "dataset id"},
      {{"frobnicate"}, 2, "unknown command"},
      {{"seal", "--bogus"}, 2, "bogus"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.args[0] + " " + c.want_text);
    auto r = run_tresor(c.args);
    EXPECT_EQ(r.exit_code, c.want_exit) << r.err;
    EXPECT_NE(r.err.find(c.want_text), std::string::npos) << r.err;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.file("o")));

  // An identity others can read is refused with the fix in the message.
  const std::string sealed_path = dir.file("x.sealed");
  ASSERT_EQ(run_tresor({"seal", "-r", recipient, "-o", sealed_path, in}).exit_code, 0);
  ::chmod(identity.c_str(), 0644);
  auto loose = run_tresor({"open", "-i", identity, "-o", dir.file("o"), sealed_path});
  EXPECT_EQ(loose.exit_code, 3);
  EXPECT_NE(loose.err.find("chmod 600"), std::string::npos) << loose.err;
  ::chmod(identity.c_str(), 0600);
  EXPECT_EQ(run_tresor({"open", "-i", identity, "-o", dir.file("o"), sealed_path}).exit_code, 0);
  // --force overwrites, without it the existing file is kept.
  EXPECT_EQ(run_tresor({"open", "-i", identity, "-o", dir.file("o"), sealed_path}).exit_code, 3);
  EXPECT_EQ(run_tresor({"open", "-f", "-i", identity, "-o", dir.file("o"), sealed_path}).exit_code, 0);
}

TEST_F(Cli, InspectShowsHeaderWithoutSecrets) {
  const std::string in = make_input("i.bin", 1000);
  const std::string sealed_path = dir.file("i.sealed");
  ASSERT_EQ(run_tresor({"seal", "-r", recipient, "--chunk-size", "256", "-o", sealed_path, in}).exit_code, 0);
  auto r = run_tresor({"inspect", sealed_path});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("version 1"), std::string::npos);
  EXPECT_NE(r.out.find("chunks:        4"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("not authenticated"), std::string::npos);
  EXPECT_EQ(r.out.find("SECRET"), std::string::npos);
  auto bad = run_tresor({"inspect", in});
  EXPECT_EQ(bad.exit_code, 6);
}

TEST_F(Cli, EveryCommandHasHelp) {
  for (const std::string cmd : {"keygen", "pubkey", "seal", "open", "inspect", "bench", "version"}) {
    auto r = run_tresor({cmd, "--help"});
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.out.find("Usage: tresor " + cmd), std::string::npos) << r.out;
  }
  auto top = run_tresor({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.out.find("Exit codes"), std::string::npos);
}

TEST_F(Cli, ProgressBarOnATerminalForLargeInputs) {
  if (!std::filesystem::exists("/usr/bin/script")) GTEST_SKIP() << "util-linux 'script' is not installed";
  const std::string in = make_input("big.bin", 65u << 20);
  const std::string cmd = std::string(TRESOR_BIN) + " seal -r " + recipient + " -o " + dir.file("big.sealed") + " " + in;
  auto r = run_command({"/usr/bin/script", "-qec", cmd, "/dev/null"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("100%"), std::string::npos) << "no progress bar on a terminal: " << r.out;
  // Not on a pipe.
  auto quiet = run_tresor({"seal", "-r", recipient, "-o", dir.file("big2.sealed"), in});
  EXPECT_EQ(quiet.exit_code, 0);
  EXPECT_EQ(quiet.err.find("%"), std::string::npos) << quiet.err;
}

TEST_F(Cli, BenchPrintsRatiosAndResultLine) {
  auto r = run_tresor({"bench", "seal", "--size", "8MiB", "--chunk-size", "1MiB", "--reps", "1", "--threads-max", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("RESULT bench_seal "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("seal_t1_ratio="), std::string::npos);
  EXPECT_NE(r.out.find("open_t2_scaling="), std::string::npos);
  EXPECT_NE(r.out.find("stream_bound_mib="), std::string::npos);
  EXPECT_EQ(run_tresor({"bench", "nope"}).exit_code, 2);
  // The all-reduce over pinned TLS against plain TCP, both measured in this run.
  auto c = run_tresor({"bench", "collective", "--mib", "1", "--reps", "2", "--ranks", "3"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_NE(c.out.find("RESULT bench_collective ranks=3 mib=1.0 reps=2 "), std::string::npos) << c.out;
  EXPECT_NE(c.out.find(" tls_ratio="), std::string::npos) << c.out;
  auto one = run_tresor({"bench", "collective", "--ranks", "1"});
  EXPECT_EQ(one.exit_code, 2);
  EXPECT_NE(one.err.find("--ranks must be 2..8"), std::string::npos) << one.err;
}

TEST_F(Cli, PhantomWritesItsVolumesAndRefusesBadSizes) {
  auto r = run_tresor({"phantom", "-o", dir.file("ph"), "--size", "128x128x64", "--spacing", "1.5x1.5x2", "--seed", "5"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("128x128x64 voxels of 1.5x1.5x2 mm, seed 5"), std::string::npos) << r.out;
  for (const char* f : {"ccta.nii", "labels.nii", "centerlines.json", "dicom/slice-0000.dcm", "dicom/slice-0063.dcm"}) {
    EXPECT_TRUE(std::filesystem::exists(dir.file("ph/") + f)) << f;
  }
  EXPECT_FALSE(std::filesystem::exists(dir.file("ph/dicom/slice-0064.dcm")));
  EXPECT_EQ(std::filesystem::file_size(dir.file("ph/ccta.nii")), 352u + 128 * 128 * 64 * 2);
  auto again = run_tresor({"phantom", "-o", dir.file("ph2"), "--size", "128x128x64", "--spacing", "1.5x1.5x2", "--seed", "5", "--no-dicom"});
  ASSERT_EQ(again.exit_code, 0);
  EXPECT_TRUE(testing::read_file(dir.file("ph/ccta.nii")) == testing::read_file(dir.file("ph2/ccta.nii"))) << "the same seed, the same bytes";
  EXPECT_FALSE(std::filesystem::exists(dir.file("ph2/dicom")));
  auto bad = run_tresor({"phantom", "-o", dir.file("x"), "--size", "128x128"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--size wants three numbers joined by 'x' (e.g. 512x512x256), not '128x128'"), std::string::npos) << bad.err;
  auto small = run_tresor({"phantom", "-o", dir.file("y"), "--size", "8x128x128"});
  EXPECT_NE(small.exit_code, 0);
  EXPECT_NE(small.err.find("dimension 0 is 8 voxels"), std::string::npos) << small.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("y/ccta.nii")));
}

// tresor prep on a directory of cases, in the clear and sealed end to end (sealed inputs opened
// in memory, every output sealed): the sealed run's outputs open to the clear run's bytes.
TEST_F(Cli, PrepPreprocessesCasesInTheClearAndSealed) {
  const std::string cases = dir.file("cases");
  for (const char* seed : {"1", "2"}) {
    auto ph = run_tresor({"phantom", "-o", cases + "/case" + seed, "--size", "240x240x136", "--spacing", "0.5x0.5x0.6", "--seed", seed, "--no-dicom"});
    ASSERT_EQ(ph.exit_code, 0) << ph.err;
  }
  auto r = run_tresor({"prep", "-o", dir.file("out"), cases, "--spacing", "0.6", "--sigmas", "0.6,1.2", "--patches", "2", "--patch-size", "48x40x32", "-j", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("prep: 1/2 case1: 200x200x136 at 0.6 mm"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("prep: 2 cases in"), std::string::npos) << r.out;
  for (const char* f : {"image.nii", "vesselness.nii", "labels.nii", "preview.png", "prep.json", "patches/patch-0000-image.nii", "patches/patch-0001-labels.nii"}) {
    EXPECT_TRUE(std::filesystem::exists(dir.file("out/case2/") + f)) << f;
  }
  EXPECT_EQ(std::filesystem::file_size(dir.file("out/case1/patches/patch-0000-image.nii")), 352u + 48 * 40 * 32 * 4);
  const auto j = nlohmann::json::parse(to_string(testing::read_file(dir.file("out/case1/prep.json"))));
  EXPECT_GE(j["coronary_vesselness_roc_auc"].get<double>(), 0.9) << j.dump();
  EXPECT_EQ(j["output"]["dims"], nlohmann::json({200, 200, 136}));
  EXPECT_EQ(j["patches"]["list"].size(), 2u);
  for (const auto& patch : j["patches"]["list"]) {
    // Every draw is recorded, the spatial transform's too.
    for (const char* key : {"corner", "flipped", "scale", "shift", "noise_sd", "spatial", "rotation_degrees", "scaling", "affine", "contrast", "gamma_inverted", "gamma",
                            "blur_sigma", "lowres_scale"}) {
      EXPECT_TRUE(patch.contains(key)) << key << " in " << patch.dump();
    }
    EXPECT_EQ(patch["rotation_degrees"].size(), 3u);
    EXPECT_EQ(patch["affine"].size(), 9u);
    EXPECT_EQ(patch["blur_sigma"].size(), 3u);
  }

  // Sealed: inputs sealed to me, outputs sealed to me; nothing in the clear.
  const std::string sc = dir.file("sealed_cases/case1");
  std::filesystem::create_directories(sc);
  for (const char* f : {"ccta.nii", "labels.nii"}) {
    auto s = run_tresor({"seal", "-r", recipient, "-o", sc + "/" + f + ".sealed", cases + "/case1/" + f});
    ASSERT_EQ(s.exit_code, 0) << s.err;
  }
  auto sr = run_tresor({"prep", "-o", dir.file("sout"), sc, "-i", identity, "-r", recipient, "--spacing", "0.6", "--sigmas", "0.6,1.2", "--patches", "2",
                        "--patch-size", "48x40x32"});
  ASSERT_EQ(sr.exit_code, 0) << sr.err;
  EXPECT_NE(sr.out.find("(sealed)"), std::string::npos) << sr.out;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir.file("sout"))) {
    if (e.is_regular_file()) {
      EXPECT_TRUE(e.path().string().ends_with(".sealed")) << e.path();
    }
  }
  for (const char* f : {"image.nii", "vesselness.nii", "labels.nii", "patches/patch-0001-image.nii"}) {
    auto o = run_tresor({"open", "-i", identity, "-o", dir.file("opened"), "-f", dir.file("sout/case1/") + f + ".sealed"});
    ASSERT_EQ(o.exit_code, 0) << o.err;
    EXPECT_TRUE(testing::read_file(dir.file("opened")) == testing::read_file(dir.file("out/case1/") + f)) << f;
  }

  // Someone else's identity: the case fails naming it, exit 4 (no matching key), no outputs.
  auto other = run_tresor({"keygen", "-o", dir.file("other.identity")});
  ASSERT_EQ(other.exit_code, 0);
  auto wrong = run_tresor({"prep", "-o", dir.file("wout"), sc, "-i", dir.file("other.identity")});
  EXPECT_EQ(wrong.exit_code, 4) << wrong.err;
  EXPECT_NE(wrong.err.find("case case1: "), std::string::npos) << wrong.err;
  EXPECT_NE(wrong.err.find("1 of 1 cases failed"), std::string::npos) << wrong.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("wout/case1/image.nii")));
}

// A DICOM series whose slices are sealed one by one: prep opens them in memory (-i) and gets what
// it gets from the plain series; on a GPU device the case is read on the host, and prep.json says why.
TEST_F(Cli, PrepReadsASeriesOfSealedDicomSlices) {
  auto ph = run_tresor({"phantom", "-o", dir.file("p/case"), "--size", "128x128x64", "--spacing", "1x1x2"});
  ASSERT_EQ(ph.exit_code, 0) << ph.err;
  std::filesystem::create_directories(dir.file("plain/case/dicom"));
  std::filesystem::create_directories(dir.file("sealed/case/dicom"));
  size_t slices = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.file("p/case/dicom"))) {
    std::filesystem::copy_file(e.path(), dir.file("plain/case/dicom/") + e.path().filename().string());
    auto s = run_tresor({"seal", "-r", recipient, "-o", dir.file("sealed/case/dicom/") + e.path().filename().string() + ".sealed", e.path().string()});
    ASSERT_EQ(s.exit_code, 0) << s.err;
    ++slices;
  }
  ASSERT_EQ(slices, 64u);
  auto plain = run_tresor({"prep", "-o", dir.file("po"), dir.file("plain"), "--spacing", "2", "--sigmas", "2", "--no-preview"});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  auto sealed_run = run_tresor({"prep", "-o", dir.file("so"), dir.file("sealed"), "-i", identity, "--spacing", "2", "--sigmas", "2", "--no-preview",
                                "--device", "emulated"});
  ASSERT_EQ(sealed_run.exit_code, 0) << sealed_run.err;
  const auto jp = nlohmann::json::parse(to_string(testing::read_file(dir.file("po/case/prep.json"))));
  const auto js = nlohmann::json::parse(to_string(testing::read_file(dir.file("so/case/prep.json"))));
  EXPECT_EQ(js["input"], jp["input"]);
  EXPECT_EQ(js["normalisation"], jp["normalisation"]);
  EXPECT_EQ(js["transfer"]["why_not_the_secure_channel"], "a DICOM series is read on the host") << js.dump();
  auto no_key = run_tresor({"prep", "-o", dir.file("no"), dir.file("sealed"), "--spacing", "2", "--sigmas", "2"});
  EXPECT_EQ(no_key.exit_code, 4) << no_key.err;
  EXPECT_NE(no_key.err.find("slice-0000.dcm.sealed: no stanza opens with the 0 identity(ies)"), std::string::npos) << no_key.err;
}

// --file-keys (what the agent gives a job submitted with TRESOR_INPUTS=sealed): a file's own key
// opens that file and no other; the keys file must be private like any key file.
TEST_F(Cli, OpenTakesFileKeysForExactlyTheirFiles) {
  const Identity owner = *Identity::generate();
  std::vector<std::string> files;
  for (const char* name : {"one", "two"}) {
    sealed::SealOptions o;
    o.recipients = {owner.recipient()};
    const std::string text = std::string("contents of ") + name + "\n";
    auto sealed_bytes = sealed::seal_buffer(as_bytes(text), o);
    ASSERT_TRUE(sealed_bytes);
    files.push_back(dir.file(std::string(name) + ".sealed"));
    testing::write_file(files.back(), *sealed_bytes);
  }
  const std::string keys_file = dir.file("file-keys");
  write_file_keys(keys_file, {files[0]}, owner);  // no key for "two"
  auto one = run_tresor({"open", "--file-keys", keys_file, "-o", "-", files[0]});
  ASSERT_EQ(one.exit_code, 0) << one.err;
  EXPECT_EQ(one.out, "contents of one\n");
  auto two = run_tresor({"open", "--file-keys", keys_file, "-o", "-", files[1]});
  EXPECT_EQ(two.exit_code, 4) << two.err;
  EXPECT_NE(two.err.find("and 1 file key(s), none for this file"), std::string::npos) << two.err;
  EXPECT_EQ(two.out, "");
  ::chmod(keys_file.c_str(), 0644);
  auto shared = run_tresor({"open", "--file-keys", keys_file, "-o", "-", files[0]});
  EXPECT_NE(shared.exit_code, 0);
  EXPECT_NE(shared.err.find("has mode 0644"), std::string::npos) << shared.err;
  ::chmod(keys_file.c_str(), 0600);
  testing::write_file(keys_file, as_bytes(std::string("tresor-file-keys-v1\nnot a key line\n")), 0600);
  auto bad = run_tresor({"open", "--file-keys", keys_file, "-o", "-", files[0]});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("file-keys: line 2: the header MAC is not 64 hex digits"), std::string::npos) << bad.err;
}

// --device: auto falls back to the CPU without a GPU and says where it ran; emulated runs the
// CUDA kernels' own code on the CPU and agrees with the reference (labels exactly).
TEST_F(Cli, PrepRunsOnTheDeviceAskedFor) {
  auto ph = run_tresor({"phantom", "-o", dir.file("c/case"), "--size", "128x128x64", "--spacing", "1x1x1.5", "--no-dicom"});
  ASSERT_EQ(ph.exit_code, 0) << ph.err;
  auto cpu = run_tresor({"prep", "-o", dir.file("cpu"), dir.file("c"), "--spacing", "1.5", "--sigmas", "1.5,3", "--device", "cpu"});
  ASSERT_EQ(cpu.exit_code, 0) << cpu.err;
  EXPECT_NE(cpu.out.find("on the CPU"), std::string::npos) << cpu.out;
  auto emu = run_tresor({"prep", "-o", dir.file("emu"), dir.file("c"), "--spacing", "1.5", "--sigmas", "1.5,3", "--device", "emulated"});
  ASSERT_EQ(emu.exit_code, 0) << emu.err;
  EXPECT_NE(emu.out.find("on the emulated GPU"), std::string::npos) << emu.out;
  EXPECT_TRUE(testing::read_file(dir.file("cpu/case/labels.nii")) == testing::read_file(dir.file("emu/case/labels.nii")));
  const auto j = nlohmann::json::parse(to_string(testing::read_file(dir.file("emu/case/prep.json"))));
  EXPECT_EQ(j["device"], "emulated");
  const auto jc = nlohmann::json::parse(to_string(testing::read_file(dir.file("cpu/case/prep.json"))));
  EXPECT_NEAR(j["coronary_vesselness_roc_auc"].get<double>(), jc["coronary_vesselness_roc_auc"].get<double>(), 1e-4);
  EXPECT_NEAR(j["normalisation"]["sd"].get<double>(), jc["normalisation"]["sd"].get<double>(), 1e-9);
  EXPECT_EQ(j["transfer"]["why_not_the_secure_channel"], "ccta.nii is not sealed") << j.dump();

  // Sealed inputs on a GPU device (here its emulation) go through the secure channel: only sealed
  // frames reach the staging buffers, the voxels are decoded in device memory, the outputs are
  // sealed there — and they open to the bytes the clear run wrote.
  std::filesystem::create_directories(dir.file("sc/case"));
  for (const char* f : {"ccta.nii", "labels.nii"}) {
    auto s = run_tresor({"seal", "-r", recipient, "--chunk-size", "64KiB", "-o", dir.file("sc/case/") + f + ".sealed", dir.file("c/case/") + f});
    ASSERT_EQ(s.exit_code, 0) << s.err;
  }
  auto chan = run_tresor({"prep", "-o", dir.file("chan"), dir.file("sc"), "-i", identity, "-r", recipient, "--spacing", "1.5", "--sigmas", "1.5,3",
                          "--device", "emulated"});
  ASSERT_EQ(chan.exit_code, 0) << chan.err;
  for (const char* f : {"image.nii", "vesselness.nii", "labels.nii", "prep.json"}) {
    auto o = run_tresor({"open", "-i", identity, "-o", dir.file("opened"), "-f", dir.file("chan/case/") + f + ".sealed"});
    ASSERT_EQ(o.exit_code, 0) << o.err;
    if (std::string(f) == "prep.json") {
      const auto jj = nlohmann::json::parse(to_string(testing::read_file(dir.file("opened"))));
      EXPECT_EQ(jj["transfer"]["input"], "secure channel: sealed frames into device memory, decrypted there") << jj.dump();
      EXPECT_EQ(jj["transfer"]["outputs"], "sealed on the device") << jj.dump();
      EXPECT_GT(jj["transfer"]["staged_bytes"].get<uint64_t>(), 128u * 128 * 64 * 3) << jj.dump();
      EXPECT_EQ(jj["normalisation"], j["normalisation"]);
      EXPECT_EQ(jj["coronary_vesselness_roc_auc"], j["coronary_vesselness_roc_auc"]);
    } else {
      EXPECT_TRUE(testing::read_file(dir.file("opened")) == testing::read_file(dir.file("emu/case/") + f)) << f;
    }
  }
  // Without labels and previews nothing needs the voxels on the host: no host copies.
  std::filesystem::create_directories(dir.file("sc2/case"));
  std::filesystem::copy_file(dir.file("sc/case/ccta.nii.sealed"), dir.file("sc2/case/ccta.nii.sealed"));
  auto lean = run_tresor({"prep", "-o", dir.file("lean"), dir.file("sc2"), "-i", identity, "-r", recipient, "--spacing", "1.5", "--sigmas", "1.5,3",
                          "--device", "emulated", "--no-preview"});
  ASSERT_EQ(lean.exit_code, 0) << lean.err;
  auto lj = run_tresor({"open", "-i", identity, "-o", "-", dir.file("lean/case/prep.json.sealed")});
  ASSERT_EQ(lj.exit_code, 0) << lj.err;
  EXPECT_EQ(nlohmann::json::parse(lj.out)["transfer"]["host_copies"], false) << lj.out;
  EXPECT_FALSE(std::filesystem::exists(dir.file("lean/case/preview.png.sealed")));
  // A .nii.gz sealed under a .nii name: the device cannot inflate it; the case is read on the host
  // instead, and prep.json says why.
  std::filesystem::create_directories(dir.file("sc3/case"));
  auto gz = testing::run_command({"/bin/sh", "-c", "gzip -c " + dir.file("c/case/ccta.nii") + " > " + dir.file("ccta.gz")});
  ASSERT_EQ(gz.exit_code, 0) << gz.err;
  auto sg = run_tresor({"seal", "-r", recipient, "-o", dir.file("sc3/case/ccta.nii.sealed"), dir.file("ccta.gz")});
  ASSERT_EQ(sg.exit_code, 0) << sg.err;
  auto inflated = run_tresor({"prep", "-o", dir.file("gzout"), dir.file("sc3"), "-i", identity, "--spacing", "1.5", "--sigmas", "1.5,3",
                              "--device", "emulated", "--no-preview"});
  ASSERT_EQ(inflated.exit_code, 0) << inflated.err;
  const auto gj = nlohmann::json::parse(to_string(testing::read_file(dir.file("gzout/case/prep.json"))));
  EXPECT_EQ(gj["transfer"]["why_not_the_secure_channel"], "a file is gzip-compressed inside its seal") << gj.dump();
  EXPECT_EQ(gj["normalisation"], j["normalisation"]);

  auto any = run_tresor({"prep", "-o", dir.file("auto"), dir.file("c"), "--spacing", "1.5", "--sigmas", "1.5"});
  ASSERT_EQ(any.exit_code, 0) << any.err;
  EXPECT_TRUE(any.out.find("on the CPU") != std::string::npos || any.out.find("on cuda:0") != std::string::npos) << any.out;
  auto bad = run_tresor({"prep", "-o", dir.file("x"), dir.file("c"), "--device", "tpu"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--device must be auto, cpu, cuda:N or emulated, not 'tpu'"), std::string::npos) << bad.err;
}

TEST_F(Cli, PrepNamesWhatIsWrongWithItsInputs) {
  auto missing = run_tresor({"prep", "-o", dir.file("o"), dir.file("nothing")});
  EXPECT_EQ(missing.exit_code, 3);
  EXPECT_NE(missing.err.find("nothing: no such file or directory"), std::string::npos) << missing.err;
  std::filesystem::create_directories(dir.file("empty/sub"));
  auto empty = run_tresor({"prep", "-o", dir.file("o"), dir.file("empty")});
  EXPECT_EQ(empty.exit_code, 2);
  EXPECT_NE(empty.err.find("empty: holds no case"), std::string::npos) << empty.err;
  write_file(dir.file("notes.txt"), as_bytes(std::string("x")), 0644);
  auto txt = run_tresor({"prep", "-o", dir.file("o"), dir.file("notes.txt")});
  EXPECT_NE(txt.err.find("notes.txt: not a NIfTI file"), std::string::npos) << txt.err;
  // A volume without labels cannot give patches; a bad option is named before any work.
  auto ph = run_tresor({"phantom", "-o", dir.file("p"), "--size", "128x128x64", "--spacing", "1x1x1.5", "--no-dicom"});
  ASSERT_EQ(ph.exit_code, 0) << ph.err;
  auto nolab = run_tresor({"prep", "-o", dir.file("o"), dir.file("p/ccta.nii"), "--patches", "1", "--spacing", "1.5"});
  EXPECT_NE(nolab.exit_code, 0);
  EXPECT_NE(nolab.err.find("case ccta: ccta: --patches needs labels"), std::string::npos) << nolab.err;
  // The case failed after its image and vesselness were written: none of its outputs remain.
  EXPECT_FALSE(std::filesystem::exists(dir.file("o/ccta"))) << "a failed case leaves no outputs";
  // A directory tresor prep did not write is refused before any work, and its files stay.
  std::filesystem::create_directories(dir.file("o/ccta"));
  write_file(dir.file("o/ccta/mine.txt"), as_bytes(std::string("keep")), 0644);
  auto foreign = run_tresor({"prep", "-o", dir.file("o"), dir.file("p/ccta.nii"), "--spacing", "1.5"});
  EXPECT_NE(foreign.exit_code, 0);
  EXPECT_NE(foreign.err.find("o/ccta holds files but no prep.json (tresor prep did not write it)"), std::string::npos) << foreign.err;
  EXPECT_EQ(to_string(testing::read_file(dir.file("o/ccta/mine.txt"))), "keep");
  // Earlier outputs are replaced as a whole (nothing stale stays beside the new ones), and a
  // staging directory left by a run that no longer exists is removed.
  write_file(dir.file("o/ccta/prep.json"), as_bytes(std::string("old")), 0644);
  std::filesystem::create_directories(dir.file("o/.ccta.tresor-partial-2147483647"));
  auto again = run_tresor({"prep", "-o", dir.file("o"), dir.file("p/ccta.nii"), "--spacing", "1.5"});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_FALSE(std::filesystem::exists(dir.file("o/ccta/mine.txt"))) << "the previous outputs directory was replaced";
  EXPECT_TRUE(to_string(testing::read_file(dir.file("o/ccta/prep.json"))).starts_with("{"));
  EXPECT_TRUE(std::filesystem::exists(dir.file("o/ccta/image.nii")));
  for (const auto& e : std::filesystem::directory_iterator(dir.file("o"))) {
    EXPECT_EQ(e.path().filename().string().find(".tresor-partial"), std::string::npos) << e.path();
  }
  auto sig = run_tresor({"prep", "-o", dir.file("o"), dir.file("p"), "--sigmas", "1,x"});
  EXPECT_EQ(sig.exit_code, 2);
  EXPECT_NE(sig.err.find("--sigmas wants numbers separated by commas, not '1,x'"), std::string::npos) << sig.err;
  auto win = run_tresor({"prep", "-o", dir.file("o"), dir.file("p"), "--window-lower", "700", "--spacing", "1.5"});
  EXPECT_EQ(win.exit_code, 2);
  EXPECT_NE(win.err.find("window: lower 700"), std::string::npos) << win.err;
  // The same case twice.
  auto twice = run_tresor({"prep", "-o", dir.file("o"), dir.file("p"), dir.file("p")});
  EXPECT_NE(twice.err.find("two inputs are both case 'p'"), std::string::npos) << twice.err;
}

// bench prep measures the CPU Frangi against scikit-image on the same volume in the same run
// (a small volume here: the ratio itself is for docs/benchmarks.md, not asserted).
TEST_F(Cli, BenchPrepComparesFrangiWithScikitImage) {
  if (testing::run_command({"/usr/bin/python3", "-c", "import skimage"}).exit_code != 0) GTEST_SKIP() << "python3-skimage is not installed";
  auto r = run_tresor({"bench", "prep", "--size", "48x48x32", "--pipeline-size", "64x64x40", "-j", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const size_t at = r.out.find("RESULT bench_prep size=48x48x32 threads=2 ");
  ASSERT_NE(at, std::string::npos) << r.out;
  for (const char* key : {"skimage_frangi_s=", "frangi_ratio=", "max_abs_diff=", "pipeline_cpu_s="}) EXPECT_NE(r.out.find(key, at), std::string::npos) << key;
  // The two implementations agree (the benchmark would otherwise compare different work).
  const size_t d = r.out.find("max_abs_diff=", at);
  EXPECT_LT(std::stod(r.out.substr(d + 13)), 1e-5) << r.out;
  auto bad = run_tresor({"bench", "prep", "--size", "48x48"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--size wants XxYxZ, not '48x48'"), std::string::npos) << bad.err;
}

// tresor train on prepared phantoms: outputs, the progress line, a run stopped and resumed from
// its checkpoint ends with the uninterrupted run's checkpoint byte for byte, sealed outputs, and
// configuration errors named.
TEST_F(Cli, TrainLearnsResumesAndSealsItsOutputs) {
  for (const char* seed : {"1", "2"}) {
    auto ph = run_tresor({"phantom", "-o", dir.file(std::string("cases/case") + seed), "--size", "240x240x136", "--spacing", "0.5x0.5x0.6", "--seed", seed, "--no-dicom"});
    ASSERT_EQ(ph.exit_code, 0) << ph.err;
  }
  // The validation case at a coarser grid (80 x 80 x 55 voxels instead of 120 x 120 x 82): the
  // whole-volume validation and the predictions below slide windows over all of it.
  for (const auto& [c, spacing] : {std::pair{"case1", "1.0"}, std::pair{"case2", "1.5"}}) {
    auto prep = run_tresor({"prep", "-o", dir.file("prepared"), dir.file(std::string("cases/") + c), "--spacing", spacing, "--sigmas", "1,2", "--no-preview"});
    ASSERT_EQ(prep.exit_code, 0) << prep.err;
  }
  // The whole-volume validation runs in the first run only: it takes seconds per run on 2 cores.
  auto config = [&](const std::string& name, const std::string& out, const std::string& extra = "", bool full_volume = false) {
    write_file(dir.file(name),
               as_bytes("[model]\nlevels = 2\nbase_channels = 4\n[data]\ntrain = [\"prepared/case1\"]\nvalidation = [\"prepared/case2\"]\n"
                        "[training]\nsteps = 16\nbatch = 2\npatch = 16\nvalidate_every = 8\nvalidation_patches = 2\n" +
                        std::string(full_volume ? "" : "full_volume_validation = false\n") + extra + "[output]\ndir = \"" + out + "\"\n"),
               0644);
    return dir.file(name);
  };
  auto whole = run_tresor({"train", "--config", config("a.toml", "whole", "", true)});
  ASSERT_EQ(whole.exit_code, 0) << whole.err;
  EXPECT_NE(whole.out.find("train: 16 steps in"), std::string::npos) << whole.out;
  EXPECT_NE(whole.err.find("train: step 16/16, "), std::string::npos) << whole.err;
  EXPECT_NE(whole.err.find("train: whole-volume validation Dice "), std::string::npos) << whole.err;
  for (const char* f : {"checkpoint.tck", "metrics.json", "curves.png", "prediction.png"}) EXPECT_TRUE(std::filesystem::exists(dir.file("whole/") + f)) << f;
  const auto metrics = nlohmann::json::parse(to_string(testing::read_file(dir.file("whole/metrics.json"))));
  EXPECT_EQ(metrics["loss"].size(), 16u);
  EXPECT_EQ(metrics["validation_dice"].size(), 3u);  // before, at 8, at 16
  ASSERT_EQ(metrics["validation_dice_volume"].size(), 1u);
  EXPECT_TRUE(metrics["validation_dice_volume"][0]["case"].get<std::string>().ends_with("prepared/case2"));
  const double volume_dice = metrics["validation_dice_volume"][0]["dice"].get<double>();
  EXPECT_TRUE(volume_dice >= 0 && volume_dice <= 1) << volume_dice;
  write_file(dir.file("ds.toml"), as_bytes("[model]\nlevels = 3\ndeep_supervision = \"yes\"\n[data]\ntrain = [\"a\"]\nvalidation = [\"b\"]\n[output]\ndir = \"x\"\n"), 0644);
  auto bad_ds = run_tresor({"train", "--config", dir.file("ds.toml")});
  EXPECT_NE(bad_ds.err.find("model.deep_supervision must be true or false"), std::string::npos) << bad_ds.err;
  // The GPU trainer on its CPU emulation (bf16 convolutions): the same patches and schedule, so
  // its losses follow the CPU run's (within 2 % over 6 steps here; measured about 0.5 %).
  auto emulated = run_tresor({"train", "--config", config("emu.toml", "emu"), "--device", "emulated", "--stop-after", "6"});
  ASSERT_EQ(emulated.exit_code, 0) << emulated.err;
  const auto em = nlohmann::json::parse(to_string(testing::read_file(dir.file("emu/metrics.json"))));
  EXPECT_EQ(em["device"], "emulated");
  ASSERT_EQ(em["loss"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    const double cpu = metrics["loss"][i].get<double>(), gpu = em["loss"][i].get<double>();
    EXPECT_NEAR(gpu, cpu, 0.02 * std::abs(cpu)) << "step " << i;
  }
  // The training case sealed (tresor seal of its prepared files): the GPU trainer loads it through
  // the secure channel into (emulated) device memory and takes its batches from the GPU data
  // loader; the losses are the run's on the plain files to the bit.
  std::filesystem::create_directories(dir.file("sealed_cases/case1"));
  for (const char* base : {"image", "vesselness", "labels"}) {
    auto s = run_tresor({"seal", "-r", recipient, "-o", dir.file(std::string("sealed_cases/case1/") + base + ".nii.sealed"), dir.file(std::string("prepared/case1/") + base + ".nii")});
    ASSERT_EQ(s.exit_code, 0) << s.err;
  }
  write_file(dir.file("emu_sealed.toml"),
             as_bytes("[model]\nlevels = 2\nbase_channels = 4\n[data]\ntrain = [\"sealed_cases/case1\"]\nvalidation = [\"prepared/case2\"]\n"
                      "[training]\nsteps = 16\nbatch = 2\npatch = 16\nvalidate_every = 8\nvalidation_patches = 2\nfull_volume_validation = false\n"
                      "[output]\ndir = \"emu_sealed\"\n"),
             0644);
  auto no_key = run_tresor({"train", "--config", dir.file("emu_sealed.toml"), "--device", "emulated", "--stop-after", "1"});
  EXPECT_NE(no_key.exit_code, 0) << "a sealed case without its identity";
  auto emulated_sealed = run_tresor({"train", "--config", dir.file("emu_sealed.toml"), "--device", "emulated", "--stop-after", "6", "-i", identity});
  ASSERT_EQ(emulated_sealed.exit_code, 0) << emulated_sealed.err;
  const auto ems = nlohmann::json::parse(to_string(testing::read_file(dir.file("emu_sealed/metrics.json"))));
  EXPECT_EQ(ems["loss"], em["loss"]) << "the loader's batches are PatchSource's";
  EXPECT_EQ(ems["validation_dice"], em["validation_dice"]);
  // The same with the case's file keys (what a job submitted with TRESOR_INPUTS=sealed holds)
  // instead of the identity.
  {
    std::vector<std::string> sealed_files;
    for (const auto& e : std::filesystem::directory_iterator(dir.file("sealed_cases/case1"))) {
      if (e.path().string().ends_with(".sealed")) sealed_files.push_back(e.path().string());
    }
    auto me = Identity::parse(to_string(read_file(identity)));
    ASSERT_TRUE(me);
    write_file_keys(dir.file("case1.keys"), sealed_files, *me);
    std::string toml = to_string(read_file(dir.file("emu_sealed.toml")));
    toml.replace(toml.find("dir = \"emu_sealed\""), 18, "dir = \"emu_fk\"");
    write_file(dir.file("emu_fk.toml"), as_bytes(toml), 0644);
    auto by_keys = run_tresor({"train", "--config", dir.file("emu_fk.toml"), "--device", "emulated", "--stop-after", "6", "--file-keys", dir.file("case1.keys")});
    ASSERT_EQ(by_keys.exit_code, 0) << by_keys.err;
    const auto fk = nlohmann::json::parse(to_string(read_file(dir.file("emu_fk/metrics.json"))));
    EXPECT_EQ(fk["loss"], ems["loss"]);
  }
  // Two ranks of the GPU trainer (emulated; gradients through the TCP collective) follow the one-rank run.
  auto emulated2 = run_tresor({"train", "--config", config("emu2.toml", "emu2"), "--device", "emulated", "--stop-after", "6", "--ranks", "2"});
  ASSERT_EQ(emulated2.exit_code, 0) << emulated2.err;
  EXPECT_NE(emulated2.out.find(" on 2 ranks"), std::string::npos) << emulated2.out;
  const auto em2 = nlohmann::json::parse(to_string(testing::read_file(dir.file("emu2/metrics.json"))));
  ASSERT_EQ(em2["loss"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) EXPECT_NEAR(em2["loss"][i].get<double>(), em["loss"][i].get<double>(), 1e-6 * std::abs(em["loss"][i].get<double>())) << "step " << i;
  auto bad_device = run_tresor({"train", "--config", config("dev.toml", "x"), "--device", "gpu"});
  EXPECT_EQ(bad_device.exit_code, 2);
  EXPECT_NE(bad_device.err.find("--device must be cpu, cuda, cuda:N or emulated, not 'gpu'"), std::string::npos) << bad_device.err;
  if (!gpu::gpu_probe()) {
    auto no_gpu = run_tresor({"train", "--config", config("dev.toml", "x"), "--device", "cuda:0"});
    EXPECT_EQ(no_gpu.exit_code, 1);
    EXPECT_NE(no_gpu.err.find("--device cuda:0: "), std::string::npos) << no_gpu.err;
  }

  // tresor predict with that checkpoint on the validation case: the same whole-volume Dice as the
  // training run's (the same windows), a NIfTI of the case's size that nibabel reads, a preview;
  // sealed with -r; errors named.
  auto predicted = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("pred"), dir.file("prepared/case2")});
  ASSERT_EQ(predicted.exit_code, 0) << predicted.err;
  EXPECT_NE(predicted.err.find("predict: case2: Dice "), std::string::npos) << predicted.err;
  const auto pj = nlohmann::json::parse(to_string(testing::read_file(dir.file("pred/predict.json"))));
  EXPECT_EQ(pj["tile"], 16) << "the checkpoint's training patch";
  EXPECT_DOUBLE_EQ(pj["cases"][0]["dice"].get<double>(), volume_dice);
  const auto nib = testing::run_command({"/usr/bin/python3", "-c",
                                         "import sys, nibabel, numpy as np\np = nibabel.load(sys.argv[1]).get_fdata()\nl = nibabel.load(sys.argv[2]).get_fdata()\n"
                                         "print(p.shape == l.shape, sorted(set(np.unique(p).astype(int))))",
                                         dir.file("pred/case2/prediction.nii"), dir.file("prepared/case2/labels.nii")});
  ASSERT_EQ(nib.exit_code, 0) << nib.err;
  EXPECT_TRUE(nib.out.starts_with("True [")) << nib.out;
  EXPECT_TRUE(std::filesystem::exists(dir.file("pred/case2/prediction.png")));
  EXPECT_EQ(pj["mirror"], false);
  auto sealed_pred = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("spred"), dir.file("prepared/case2"), "-r", recipient, "--step", "1"});
  ASSERT_EQ(sealed_pred.exit_code, 0) << sealed_pred.err;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir.file("spred"))) {
    if (e.is_regular_file()) {
      EXPECT_TRUE(e.path().string().ends_with(".sealed")) << e.path();
    }
  }
  // --mirror: nnU-Net's test-time mirroring; recorded, and a Dice of its own (the same network and
  // windows as the plain run at step 1: tiles a whole tile apart, 8 times fewer than at 0.5, since
  // each tile runs eight times).
  auto step1 = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("p1pred"), dir.file("prepared/case2"), "--step", "1"});
  ASSERT_EQ(step1.exit_code, 0) << step1.err;
  const double step1_dice = nlohmann::json::parse(to_string(testing::read_file(dir.file("p1pred/predict.json"))))["cases"][0]["dice"].get<double>();
  auto mirrored = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("mpred"), dir.file("prepared/case2"), "--mirror", "--step", "1"});
  ASSERT_EQ(mirrored.exit_code, 0) << mirrored.err;
  const auto mj = nlohmann::json::parse(to_string(testing::read_file(dir.file("mpred/predict.json"))));
  EXPECT_EQ(mj["mirror"], true);
  EXPECT_GT(mj["cases"][0]["dice"].get<double>(), 0.0);
  EXPECT_NE(mj["cases"][0]["dice"].get<double>(), step1_dice) << "mirroring changes the prediction";
  auto no_case = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("x")});
  EXPECT_EQ(no_case.exit_code, 2);
  EXPECT_NE(no_case.err.find("no case directory given"), std::string::npos) << no_case.err;
  auto bad_step = run_tresor({"predict", "-c", dir.file("whole/checkpoint.tck"), "-o", dir.file("x"), dir.file("prepared/case2"), "--step", "0"});
  EXPECT_NE(bad_step.err.find("the step must be in (0, 1]"), std::string::npos) << bad_step.err;
  auto not_ck = run_tresor({"predict", "-c", dir.file("whole/metrics.json"), "-o", dir.file("x"), dir.file("prepared/case2")});
  EXPECT_NE(not_ck.err.find("not a Tresor checkpoint"), std::string::npos) << not_ck.err;

  auto bad_fv = run_tresor({"train", "--config", config("fv.toml", "x", "full_volume_validation = 1\n", true)});
  EXPECT_NE(bad_fv.err.find("training.full_volume_validation must be true or false"), std::string::npos) << bad_fv.err;

  auto half = run_tresor({"train", "--config", config("b.toml", "split"), "--stop-after", "8"});
  ASSERT_EQ(half.exit_code, 0) << half.err;
  auto rest = run_tresor({"train", "--config", config("b.toml", "split"), "--resume", dir.file("split/checkpoint.tck")});
  ASSERT_EQ(rest.exit_code, 0) << rest.err;
  EXPECT_NE(rest.out.find("train: 8 steps in"), std::string::npos) << rest.out;
  EXPECT_TRUE(testing::read_file(dir.file("split/checkpoint.tck")) == testing::read_file(dir.file("whole/checkpoint.tck")))
      << "stopped at 8 and resumed: the same weights and optimizer state as 16 straight steps";

  // Two ranks (processes meeting over TCP on 127.0.0.1) on the global batch of 2 train the
  // weights one rank trains, up to the order of float additions; rank 0 alone writes the outputs.
  auto one_rank = run_tresor({"train", "--config", config("sgd1.toml", "sgd1", "optimizer = \"sgd\"\n")});
  ASSERT_EQ(one_rank.exit_code, 0) << one_rank.err;
  const std::string dp_config = config("dp.toml", "dp", "optimizer = \"sgd\"\n");
  auto rank1 = std::async(std::launch::async, [&] { return run_tresor({"train", "--config", dp_config, "--ranks", "2", "--rank", "1"}); });
  auto rank0 = run_tresor({"train", "--config", dp_config, "--ranks", "2", "--rank", "0"});
  const auto r1 = rank1.get();
  ASSERT_EQ(rank0.exit_code, 0) << rank0.err;
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  EXPECT_NE(rank0.out.find("train: 16 steps in"), std::string::npos) << rank0.out;
  EXPECT_NE(rank0.out.find(" on 2 ranks"), std::string::npos) << rank0.out;
  EXPECT_EQ(r1.out, "") << "only rank 0 reports";
  EXPECT_EQ(r1.err, "");
  auto ck1 = train::parse_checkpoint(testing::read_file(dir.file("sgd1/checkpoint.tck")));
  auto ck2 = train::parse_checkpoint(testing::read_file(dir.file("dp/checkpoint.tck")));
  ASSERT_TRUE(ck1 && ck2);
  ASSERT_EQ(ck1->parameters.size(), ck2->parameters.size());
  double worst = 0, mag = 0;
  for (size_t i = 0; i < ck1->parameters.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(ck1->parameters[i] - ck2->parameters[i])));
    mag = std::max(mag, static_cast<double>(std::abs(ck1->parameters[i])));
  }
  EXPECT_LT(worst, 1e-5 * mag) << "2 ranks against 1: largest weight difference " << worst;
  EXPECT_FALSE(std::filesystem::exists(dir.file("dp/tresor-dp-local.json"))) << "the rendezvous file is removed";
  EXPECT_EQ(nlohmann::json::parse(to_string(testing::read_file(dir.file("dp/metrics.json"))))["ranks"], 2);
  // The launcher form starts rank 1 itself: the same run, byte for byte.
  auto launched = run_tresor({"train", "--config", config("launch.toml", "launch", "optimizer = \"sgd\"\n"), "--ranks", "2"});
  ASSERT_EQ(launched.exit_code, 0) << launched.err;
  EXPECT_NE(launched.out.find(" on 2 ranks"), std::string::npos) << launched.out;
  EXPECT_TRUE(testing::read_file(dir.file("launch/checkpoint.tck")) == testing::read_file(dir.file("dp/checkpoint.tck")));
  // Across machines (here two processes on 127.0.0.1 with a step roster, docs/training.md §5.3):
  // TLS links pinned to each rank's link key carry the same sums, so the same checkpoint.
  auto key0 = run_tresor({"roster", "keygen", dir.file("link0.key")});
  auto key1 = run_tresor({"roster", "keygen", dir.file("link1.key")});
  ASSERT_EQ(key0.exit_code, 0) << key0.err;
  ASSERT_EQ(key1.exit_code, 0) << key1.err;
  EXPECT_EQ(std::filesystem::status(dir.file("link0.key")).permissions() & std::filesystem::perms::all,
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  EXPECT_EQ(run_tresor({"roster", "pubkey", dir.file("link0.key")}).out, key0.out);
  EXPECT_NE(run_tresor({"roster", "keygen", dir.file("link0.key")}).exit_code, 0) << "a link key is never overwritten";
  const std::string pub0 = key0.out.substr(0, key0.out.size() - 1), pub1 = key1.out.substr(0, key1.out.size() - 1);
  const std::string lead = "127.0.0.1:" + std::to_string(testing::free_loopback_port());
  // Keys after "--": a base64url key starts with '-' one time in 64.
  auto made = run_tresor({"roster", "make", "--step", "77.0", "--lead", lead, "-o", dir.file("roster.json"), "--", pub0, pub1});
  ASSERT_EQ(made.exit_code, 0) << made.err;
  auto printed = run_tresor({"roster", "make", "--step", "77.0", "--lead", lead, "--", pub0, pub1});
  EXPECT_EQ(printed.out, to_string(testing::read_file(dir.file("roster.json")))) << "without -o the roster goes to stdout";
  EXPECT_FALSE(std::filesystem::exists("-"));
  auto shown = run_tresor({"roster", "show", dir.file("roster.json")});
  EXPECT_NE(shown.out.find("lead    " + lead), std::string::npos) << shown.out;
  EXPECT_NE(shown.out.find("  1  " + pub1), std::string::npos) << shown.out;
  const std::string roster_config = config("roster.toml", "roster", "optimizer = \"sgd\"\n");
  auto on_roster = [&](int rank, const std::string& key) {
    return run_tresor({"train", "--config", roster_config, "--ranks", "2", "--rank", std::to_string(rank), "--roster", dir.file("roster.json"), "--link-key", key});
  };
  auto roster1 = std::async(std::launch::async, [&] { return on_roster(1, dir.file("link1.key")); });
  auto roster0 = on_roster(0, dir.file("link0.key"));
  const auto ro1 = roster1.get();
  ASSERT_EQ(roster0.exit_code, 0) << roster0.err;
  ASSERT_EQ(ro1.exit_code, 0) << ro1.err;
  EXPECT_NE(roster0.out.find(" on 2 ranks"), std::string::npos) << roster0.out;
  EXPECT_TRUE(testing::read_file(dir.file("roster/checkpoint.tck")) == testing::read_file(dir.file("dp/checkpoint.tck")))
      << "over pinned TLS: the plain two-rank run's weights, bit for bit";
  // The same two ranks as a Slurm step across two nodes (the step's variables as srun sets
  // them; the run id JOB.STEP is the roster's step): with the roster they train, without it the
  // step is refused.
  const std::string slurm_config = config("slurm-roster.toml", "slurm-roster", "optimizer = \"sgd\"\n");
  auto slurm_rank = [&](int rank, const std::vector<std::string>& extra) {
    std::vector<std::string> argv = {"/usr/bin/env", "SLURM_PROCID=" + std::to_string(rank), "SLURM_NTASKS=2", "SLURM_LOCALID=0", "SLURM_NNODES=2",
                                     "SLURM_JOB_ID=77", "SLURM_STEP_ID=0", TRESOR_BIN, "train", "--config", slurm_config};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return testing::run_command(argv);
  };
  auto slurm1 = std::async(std::launch::async, [&] { return slurm_rank(1, {"--roster", dir.file("roster.json"), "--link-key", dir.file("link1.key")}); });
  auto slurm0 = slurm_rank(0, {"--roster", dir.file("roster.json"), "--link-key", dir.file("link0.key")});
  const auto s1 = slurm1.get();
  ASSERT_EQ(slurm0.exit_code, 0) << slurm0.err;
  ASSERT_EQ(s1.exit_code, 0) << s1.err;
  EXPECT_TRUE(testing::read_file(dir.file("slurm-roster/checkpoint.tck")) == testing::read_file(dir.file("dp/checkpoint.tck")));
  auto no_roster = slurm_rank(0, {});
  EXPECT_EQ(no_roster.exit_code, 2);
  EXPECT_NE(no_roster.err.find("the step spans 2 nodes; without --roster and --link-key (or, in a confidential step, TRESOR_STEP_ROSTER=1) the ranks meet on one machine only"), std::string::npos) << no_roster.err;
  auto wrong_key = on_roster(1, dir.file("link0.key"));
  EXPECT_EQ(wrong_key.exit_code, 2);
  EXPECT_NE(wrong_key.err.find("is not the one the step roster lists for rank 1"), std::string::npos) << wrong_key.err;
  // In a Slurm step the agent's variables come in pairs: one alone is refused before anything runs.
  for (const char* alone : {"TRESOR_ROSTER", "TRESOR_LINK_KEY"}) {
    auto unpaired = testing::run_command({"/usr/bin/env", "SLURM_PROCID=0", "SLURM_NTASKS=2", "SLURM_LOCALID=0", "SLURM_NNODES=1", "SLURM_JOB_ID=77", "SLURM_STEP_ID=0",
                                      std::string(alone) + "=" + dir.file("roster.json"), TRESOR_BIN, "train", "--config", roster_config});
    EXPECT_EQ(unpaired.exit_code, 2) << unpaired.err;
    EXPECT_NE(unpaired.err.find(std::string(alone) + " is set without"), std::string::npos) << unpaired.err;
  }
  auto no_link_key = run_tresor({"train", "--config", roster_config, "--roster", dir.file("roster.json")});
  EXPECT_NE(no_link_key.err.find("--roster and --link-key go together"), std::string::npos) << no_link_key.err;
  auto launcher = run_tresor({"train", "--config", roster_config, "--ranks", "2", "--roster", dir.file("roster.json"), "--link-key", dir.file("link0.key")});
  EXPECT_NE(launcher.err.find("--ranks N needs --rank R"), std::string::npos) << launcher.err;
  // A key starting with '-' before "--" would be taken for an option: named, with the fix.
  const std::string dash_key = "-" + pub0.substr(1);
  auto dashed = run_tresor({"roster", "make", "--step", "77.0", "--lead", lead, dash_key, pub1});
  EXPECT_EQ(dashed.exit_code, 2);
  EXPECT_NE(dashed.err.find("'" + dash_key + "' looks like a link public key starting with '-': put the keys after --"), std::string::npos) << dashed.err;
  auto bad_lead = run_tresor({"roster", "make", "--step", "77.0", "--lead", "node1:29400", "--", pub0});
  EXPECT_EQ(bad_lead.exit_code, 2);
  EXPECT_NE(bad_lead.err.find("\"lead\" is \"node1:29400\""), std::string::npos) << bad_lead.err;
  auto other_step = run_tresor({"train", "--config", roster_config, "--ranks", "2", "--rank", "0", "--roster", dir.file("roster.json"), "--link-key",
                                dir.file("link0.key"), "--run-id", "78.0"});
  EXPECT_NE(other_step.err.find("the step roster is for step 77.0, this run is 78.0"), std::string::npos) << other_step.err;

  auto orphan = run_tresor({"train", "--config", dp_config, "--ranks", "2", "--rank", "1", "--join-timeout", "1"});
  EXPECT_EQ(orphan.exit_code, 3);
  EXPECT_NE(orphan.err.find("rank 1 found no rank 0 through"), std::string::npos) << orphan.err;
  auto half_flags = run_tresor({"train", "--config", dp_config, "--rank", "1"});
  EXPECT_NE(half_flags.err.find("--rank needs --ranks"), std::string::npos) << half_flags.err;

  // Sealed: every output sealed to me, and a sealed checkpoint resumes with my identity.
  auto sealed = run_tresor({"train", "--config", config("c.toml", "sealed"), "--stop-after", "8", "-r", recipient});
  ASSERT_EQ(sealed.exit_code, 0) << sealed.err;
  for (const auto& e : std::filesystem::directory_iterator(dir.file("sealed"))) EXPECT_TRUE(e.path().string().ends_with(".sealed")) << e.path();
  auto resumed = run_tresor({"train", "--config", config("c.toml", "sealed"), "--resume", dir.file("sealed/checkpoint.tck.sealed"), "-i", identity});
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  auto opened = run_tresor({"open", "-i", identity, "-o", dir.file("ck"), dir.file("sealed/checkpoint.tck")});
  EXPECT_NE(opened.exit_code, 0) << "no clear checkpoint exists";

  // Configuration errors name the key.
  auto bad_key = run_tresor({"train", "--config", config("d.toml", "x", "epochs = 3\n")});
  EXPECT_EQ(bad_key.exit_code, 2);
  EXPECT_NE(bad_key.err.find("unknown key training.epochs"), std::string::npos) << bad_key.err;
  auto bad_opt = run_tresor({"train", "--config", config("e.toml", "x", "optimizer = \"adam\"\n")});
  EXPECT_NE(bad_opt.err.find("training.optimizer must be \"adamw\" or \"sgd\""), std::string::npos) << bad_opt.err;
  auto bad_patch = run_tresor({"train", "--config", config("f.toml", "x", "seed = -1\n")});
  EXPECT_NE(bad_patch.err.find("training.seed must be an integer"), std::string::npos) << bad_patch.err;
  auto bad_aug = run_tresor({"train", "--config", config("i.toml", "x", "[augmentation]\nrotation_probability = 1.5\n")});
  EXPECT_EQ(bad_aug.exit_code, 2);
  EXPECT_NE(bad_aug.err.find("augmentation.rotation_probability must be a number in 0..1"), std::string::npos) << bad_aug.err;
  auto bad_aug_key = run_tresor({"train", "--config", config("j.toml", "x", "[augmentation]\nelastic_probability = 0.2\n")});
  EXPECT_NE(bad_aug_key.err.find("unknown key augmentation.elastic_probability"), std::string::npos) << bad_aug_key.err;
  auto bad_scaling = run_tresor({"train", "--config", config("k.toml", "x", "[augmentation]\nscaling_min = 1.5\nscaling_max = 1.2\n")});
  EXPECT_NE(bad_scaling.err.find("augmentation.scaling_min is above augmentation.scaling_max"), std::string::npos) << bad_scaling.err;
  auto bad_blur = run_tresor({"train", "--config", config("m.toml", "x", "[augmentation]\nblur_sigma_max = 7\n")});
  EXPECT_NE(bad_blur.err.find("augmentation.blur_sigma_max must be a number in 0.05..5"), std::string::npos) << bad_blur.err;
  auto bad_lowres = run_tresor({"train", "--config", config("n.toml", "x", "[augmentation]\nlowres_scale_min = 0.9\nlowres_scale_max = 0.6\n")});
  EXPECT_NE(bad_lowres.err.find("augmentation.lowres_scale_min is above augmentation.lowres_scale_max"), std::string::npos) << bad_lowres.err;
  // The augmentation section is used: switched off, the first steps see other patches.
  auto no_aug = run_tresor({"train", "--config",
                            config("l.toml", "noaug",
                                   "[augmentation]\nflip_probability = 0\nintensity_probability = 0\nnoise_probability = 0\nrotation_probability = 0\n"
                                   "scaling_probability = 0\ncontrast_probability = 0\ngamma_probability = 0\ngamma_inverted_probability = 0\n"
                                   "blur_probability = 0\nlowres_probability = 0\n"),
                            "--stop-after", "2"});
  ASSERT_EQ(no_aug.exit_code, 0) << no_aug.err;
  const auto no_aug_loss = nlohmann::json::parse(to_string(testing::read_file(dir.file("noaug/metrics.json"))))["loss"];
  ASSERT_EQ(no_aug_loss.size(), 2u);
  EXPECT_NE(no_aug_loss[0].get<double>(), metrics["loss"][0].get<double>());
  write_file(dir.file("g.toml"), as_bytes("[model]\nlevels = 2\n[data]\ntrain = []\n[output]\ndir = \"x\"\n"), 0644);
  auto no_data = run_tresor({"train", "--config", dir.file("g.toml")});
  EXPECT_NE(no_data.err.find("data.train must list at least one prepared case directory"), std::string::npos) << no_data.err;
  auto wrong_resume = run_tresor({"train", "--config", config("h.toml", "y", "optimizer = \"sgd\"\n"), "--resume", dir.file("whole/checkpoint.tck")});
  EXPECT_NE(wrong_resume.err.find("the checkpoint's model or optimizer differs"), std::string::npos) << wrong_resume.err;
}

// tresor bench train: the U-Net step and one convolution against PyTorch on the same model (small
// sizes here), one RESULT line with the ratios; bad sizes named.
TEST_F(Cli, BenchTrainComparesTheStepWithPyTorch) {
  auto r = run_tresor({"bench", "train", "--levels", "2", "--base-channels", "4", "--patch", "8", "--steps", "1", "--conv-channels", "4", "--conv-size", "8", "-j", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const size_t at = r.out.find("RESULT bench_train device=cpu gpu=none levels=2 base_channels=4 patch=8 batch=2 threads=1 params=");
  ASSERT_NE(at, std::string::npos) << r.out;
  for (const char* key : {" step_s=", " conv_gflops=", " torch_step_s=", " step_ratio=", " torch_conv_gflops=", " conv_ratio="}) {
    const size_t k = r.out.find(key, at);
    ASSERT_NE(k, std::string::npos) << key << "\n" << r.out;
    EXPECT_GT(std::stod(r.out.substr(k + std::strlen(key))), 0.0) << key;
  }
  auto no_torch = run_tresor({"bench", "train", "--levels", "2", "--base-channels", "4", "--patch", "8", "--steps", "1", "--conv-size", "8", "--no-torch"});
  ASSERT_EQ(no_torch.exit_code, 0) << no_torch.err;
  EXPECT_EQ(no_torch.out.find("step_ratio="), std::string::npos) << "no baseline, no ratio";
  auto bad = run_tresor({"bench", "train", "--levels", "3", "--patch", "10"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--patch 10 is not a multiple of 4"), std::string::npos) << bad.err;
}

// The GPU data path's benchmark runs everywhere: on the emulated GPU here (the kernel on the
// CPU), saying that these are not GPU figures when no GPU exists.
TEST_F(Cli, BenchGpuMeasuresEveryPathAgainstItsBaseline) {
  auto r = run_tresor({"bench", "gpu", "--size", "2MiB", "--chunk-size", "64KiB", "--reps", "1", "--device", "emulated", "--batch", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("RESULT gpu_channel device=emulated gpu=none size_mib=2 chunk_kib=64 "), std::string::npos) << r.out;
  for (const char* key : {"kernel_ratio=", "upload_ratio=", "speedup_vs_cpu_path=", "d2d_gbps=", "pinned_h2d_gbps="}) {
    EXPECT_NE(r.out.find(key), std::string::npos) << key << "\n" << r.out;
  }
  EXPECT_NE(r.out.find("3 in flight at most"), std::string::npos) << r.out;
  auto auto_dev = run_tresor({"bench", "gpu", "--size", "1MiB", "--chunk-size", "64KiB", "--reps", "1"});
  ASSERT_EQ(auto_dev.exit_code, 0) << auto_dev.err;
  if (auto_dev.out.find("gpu=none") != std::string::npos) {
    EXPECT_NE(auto_dev.out.find("NOT GPU figures"), std::string::npos) << auto_dev.out;
  }
  auto bad = run_tresor({"bench", "gpu", "--device", "tpu"});
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.err.find("--device must be auto, cuda:N, cpu or emulated, not 'tpu'"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace tresor
