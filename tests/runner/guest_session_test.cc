// The guest side of a job VM and the host's side of its control channel, end to end but without
// the VM: tresor-agent --guest-fd runs in a process with its own user and network namespaces (so,
// as in a VM, it has no network, only loopback) with its "shares" under a directory, and
// vm::serve_guest runs here. A real broker over TLS, a sim secure processor and a dataset sealed
// from a marker text: the agent attests with sim evidence fetched over the channel, reaches the
// broker only through the relayed connections, opens the input privately, runs the job and seals
// its output to the user. Also: exit codes and deaths by signal come back exactly, a signal from
// the host reaches the job, a command other than the signed one does not run, a tampered input
// fails the job before it runs, and a guest that dies without a status is reported as such.
#include <signal.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <atomic>
#include <future>
#include <map>
#include <memory>
#include <thread>

#include "support/test_support.h"
#include "tresor/identity.h"
#include "tresor/manifest.h"
#include "tresor/roster.h"
#include "tresor/slurm/job.h"
#include "tresor/snp/sim.h"
#include "tresor/vm/session.h"

namespace tresor {
namespace {

namespace fs = std::filesystem;
using testing::run_command;

std::string read_text(const std::string& path) {
  const Bytes b = testing::read_file(path);
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}
using testing::TempDir;

constexpr const char* kMarker = "PLAINTEXT-MARKER-5521";

class GuestSession : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::access("/usr/bin/unshare", X_OK) != 0) {
      skip_ = "needs unshare (util-linux) for the guest's network namespace";
      return;
    }
    dir_ = new TempDir();
    auto ok = [](const testing::CommandResult& r) {
      EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
      return r;
    };
    ok(run_command({TRESOR_BIN, "sim", "init", dir_->file("sim"), "--rsa-bits", "2048"}));
    const std::string broker = dir_->file("broker");
    ok(run_command({TRESOR_BROKER_BIN, "--init", broker, "--port", "0", "--sim-trust", dir_->file("sim")}));
    broker_ = new testing::Background({TRESOR_BROKER_BIN, "--config", broker + "/broker.toml"});
    port_ = testing::port_in(broker_->first_line());
    auto admin = [&](std::vector<std::string> args) {
      args.insert(args.begin(), {TRESOR_BIN, "admin", "--socket", broker + "/admin.sock"});
      return ok(run_command(args));
    };
    auto id = ok(run_command({TRESOR_BIN, "keygen", "-o", dir_->file("alice")}));
    recipient_ = id.out.substr(0, id.out.find('\n'));
    admin({"user", "add", "alice", recipient_});
    std::ofstream(dir_->file("input.txt")) << kMarker << " coronary lumen\n";
    for (const char* ds : {"dhz/ccta-2024", "dhz/tampered"}) {
      fs::create_directories(dir_->file(std::string("datasets/") + ds));
      ok(run_command({TRESOR_BIN, "seal", "--dataset", ds, "--broker", "unix:" + broker + "/admin.sock", "-r", recipient_, "-o",
                      dir_->file(std::string("datasets/") + ds + "/input.txt.sealed"), dir_->file("input.txt")}));
    }
    {
      std::fstream f(dir_->file("datasets/dhz/tampered/input.txt.sealed"), std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(-20, std::ios::end);
      f.put('\x5a');
    }
    std::ofstream(dir_->file("policy.json")) << R"({"attestation": {"measurements": [")" << std::string(96, 'a')
                                             << R"("], "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}, "allow_smt": true, "products": ["Sim"]}})";
    for (const char* ds : {"dhz/ccta-2024", "dhz/tampered"}) {
      admin({"policy", "set", ds, dir_->file("policy.json")});
      admin({"grant", "alice", ds});
    }
    ca_pem_ = read_text(broker + "/tls.crt");
  }
  static void TearDownTestSuite() {
    delete broker_;
    broker_ = nullptr;
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }

  struct Outcome {
    Result<int> status = 0;
    std::string out, err;
    fs::path root;     // the guest's file system
    fs::path outputs;  // the host's output directory, where serve_guest writes what the guest sends
  };

  // A job for `command` over `dataset`, signed by alice for `signed_command` (default: the same).
  static Outcome run(const std::vector<std::string>& command, const std::string& dataset = "dhz/ccta-2024",
                     std::vector<std::string> signed_command = {}, int signal_after_ms = -1, bool kill_guest = false,
                     const std::map<std::string, std::string>& extra_env = {},
                     const std::function<void(const fs::path&)>& prepare_outputs = {}, const Manifest* shared_manifest = nullptr) {
    if (signed_command.empty()) signed_command = command;
    static std::atomic<int> n{0};  // guests may run side by side (a step's tasks)
    const int me = n++;
    Outcome o;
    o.root = dir_->path() / ("guest-" + std::to_string(me));
    o.outputs = dir_->path() / ("host-out-" + std::to_string(me));
    fs::create_directories(o.outputs);
    if (prepare_outputs) prepare_outputs(o.outputs);
    fs::create_directories(o.root / "mnt");
    fs::create_directories(o.root / "tmp");
    fs::create_symlink(dir_->path() / "datasets" / dataset, o.root / "mnt/tresor-data-0");

    auto alice = *Identity::parse(read_text(dir_->file("alice")));
    slurm::JobRequest req;
    req.datasets = {dataset};
    for (auto& b : req.image.measurement) b = std::byte{0xaa};
    req.output = "/unused";
    req.backend = "libvirt";
    // One manifest for all the tasks of a step (srun signs once per step), or one per job.
    auto manifest = shared_manifest ? *shared_manifest : *slurm::build_manifest(req, alice, slurm::command_line_bytes(signed_command), std::time(nullptr), 3600);
    auto sp = *snp::sim::SecureProcessor::load(dir_->file("sim"));
    const auto host_data = *manifest_digest(manifest);

    vm::HostSession s;
    s.start.manifest_env = *slurm::encode_manifest_env(manifest);
    s.start.command = command;
    s.start.env = {{"PATH", "/usr/bin:/bin"}, {"HOME", "/tmp"}, {"SLURM_JOB_ID", "42"}};
    for (const auto& [k, v] : extra_env) s.start.env[k] = v;
    s.start.broker_url = "https://127.0.0.1:" + std::to_string(port_);
    s.start.broker_ca_pem = ca_pem_;
    s.start.datasets = datasets_override_.empty() ? std::vector<std::string>{dataset} : datasets_override_;
    s.evidence = [&](const std::array<std::byte, 64>& rd) -> Result<kbs::Evidence> {
      snp::sim::ReportParams p;
      p.measurement = manifest.image_measurement;
      p.host_data = host_data;
      p.report_data = rd;
      auto r = sp.sign_report(p);
      if (!r) return std::unexpected(r.error());
      return kbs::Evidence{Bytes(r->begin(), r->end()), sp.vcek_pem()};
    };
    s.broker_port = static_cast<uint16_t>(port_);
    TempDir io;
    s.out_fd = ::open(io.file("out").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    s.err_fd = ::open(io.file("err").c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    int sig[2];
    EXPECT_EQ(::pipe2(sig, O_CLOEXEC), 0);
    s.signal_fd = sig[0];
    s.output_dir_fd = ::open(o.outputs.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    int ch[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ch), 0);
    const pid_t guest = ::fork();
    if (guest == 0) {
      ::dup2(ch[1], 3);  // without CLOEXEC: the agent's channel
      ::execl("/usr/bin/unshare", "unshare", "--user", "--map-root-user", "--net", TRESOR_AGENT_BIN, "--guest-fd", "3", "--guest-root",
              o.root.c_str(), static_cast<char*>(nullptr));
      std::_Exit(127);
    }
    ::close(ch[1]);
    std::thread poke;
    if (signal_after_ms >= 0) {
      poke = std::thread([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(signal_after_ms));
        if (kill_guest) {
          ::kill(guest, SIGKILL);
        } else {
          const unsigned char term = SIGTERM;
          (void)!::write(sig[1], &term, 1);
        }
      });
    }
    o.status = vm::serve_guest(ch[0], s);
    if (poke.joinable()) poke.join();
    int ws = 0;
    ::waitpid(guest, &ws, 0);
    for (int f : {ch[0], sig[0], sig[1], s.out_fd, s.err_fd, s.output_dir_fd}) ::close(f);
    o.out = read_text(io.file("out"));
    o.err = read_text(io.file("err"));
    return o;
  }
  static std::string open_as_alice(const fs::path& sealed) {
    auto r = run_command({TRESOR_BIN, "open", "-i", dir_->file("alice"), "-o", "-", sealed.string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }

  static inline TempDir* dir_ = nullptr;
  static inline testing::Background* broker_ = nullptr;
  static inline int port_ = 0;
  static inline std::vector<std::string> datasets_override_;  // what the host claims, when it lies
  static inline std::string skip_, recipient_, ca_pem_;
};

TEST_F(GuestSession, TheJobAttestsThroughTheChannelAndItsOutputIsSealed) {
  auto o = run({"sh", "-c", "echo job-says-hi; echo to-stderr >&2; tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/r.txt"});
  ASSERT_TRUE(o.status) << o.status.error().message << "\n" << o.err;
  EXPECT_TRUE(WIFEXITED(*o.status) && WEXITSTATUS(*o.status) == 0) << *o.status << "\n" << o.err;
  EXPECT_NE(o.out.find("job-says-hi"), std::string::npos) << o.out;
  EXPECT_NE(o.err.find("to-stderr"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("key of dataset dhz/ccta-2024 released"), std::string::npos) << o.err;
  EXPECT_EQ(open_as_alice(o.outputs / "r.txt.sealed"), std::string(kMarker) + " CORONARY LUMEN\n");
  // Nothing in the clear on the host's side: the shares, the output directory.
  auto scan = run_command({"/usr/bin/grep", "-rl", "--binary-files=text", "-e", kMarker, (o.root / "mnt").string(), o.outputs.string()});
  EXPECT_EQ(scan.out, "");
  EXPECT_EQ(scan.exit_code, 1) << "grep found nothing (and had something to read)";
}

// The outputs come back over the channel and the host writes them under its output directory
// without following links: a subdirectory is created, a symbolic link planted where the guest's
// output goes is refused (the job's results are then reported incomplete), nothing leaves.
TEST_F(GuestSession, OutputsComeBackOverTheChannelIntoTheOutputDirectoryOnly) {
  auto nested = run({"sh", "-c", "mkdir -p $TRESOR_OUTPUT_DIR/a/b && echo deep > $TRESOR_OUTPUT_DIR/a/b/r.txt && echo top > $TRESOR_OUTPUT_DIR/t.txt"});
  ASSERT_TRUE(nested.status) << nested.status.error().message << "\n" << nested.err;
  EXPECT_EQ(open_as_alice(nested.outputs / "a/b/r.txt.sealed"), "deep\n");
  EXPECT_EQ(open_as_alice(nested.outputs / "t.txt.sealed"), "top\n");
  EXPECT_NE(nested.err.find("2 sealed output file(s) sent to the host"), std::string::npos) << nested.err;
  size_t entries = 0;
  for (const auto& e : fs::recursive_directory_iterator(nested.outputs)) entries += e.is_regular_file() ? 1u : 0u;
  EXPECT_EQ(entries, 2u) << "no temporary file left";

  const fs::path elsewhere = dir_->path() / "elsewhere";
  fs::create_directories(elsewhere);
  auto planted = run({"sh", "-c", "mkdir -p $TRESOR_OUTPUT_DIR/a && echo x > $TRESOR_OUTPUT_DIR/a/r.txt"}, "dhz/ccta-2024", {}, -1, false, {},
                     [&](const fs::path& out) { fs::create_directory_symlink(elsewhere, out / "a"); });
  ASSERT_FALSE(planted.status) << "a job whose output could not be written does not pass for done";
  EXPECT_NE(planted.status.error().message.find("output a/r.txt.sealed: a is not a directory (or a symbolic link)"), std::string::npos)
      << planted.status.error().message;
  EXPECT_NE(planted.status.error().message.find("the job itself exited with 0"), std::string::npos) << planted.status.error().message;
  EXPECT_TRUE(fs::is_empty(elsewhere)) << "nothing written through the link";
}

// TRESOR_INPUTS=sealed in the job's environment: inside the VM the agent opens nothing, and the
// job finds its inputs sealed with each file's own key, which opens exactly that file.
TEST_F(GuestSession, WithSealedInputsTheJobGetsTheFilesAndTheirOwnKeys) {
  auto o = run({"sh", "-c",
                "echo inputs=$TRESOR_INPUTS data=$(ls $TRESOR_DATA | wc -l); cat $TRESOR_FILE_KEYS | head -n 1; "
                "stat -c %a $TRESOR_FILE_KEYS; " TRESOR_BIN " open --file-keys $TRESOR_FILE_KEYS -o $TRESOR_OUTPUT_DIR/r.txt "
                "$TRESOR_SEALED_DATA/dhz/ccta-2024/input.txt.sealed"},
               "dhz/ccta-2024", {}, -1, false, {{"TRESOR_INPUTS", "sealed"}});
  ASSERT_TRUE(o.status) << o.status.error().message << "\n" << o.err;
  EXPECT_TRUE(WIFEXITED(*o.status) && WEXITSTATUS(*o.status) == 0) << *o.status << "\n" << o.out << o.err;
  EXPECT_NE(o.out.find("inputs=sealed data=0\ntresor-file-keys-v1\n600\n"), std::string::npos) << o.out;
  EXPECT_NE(o.err.find("1 sealed input file(s) left sealed for the job"), std::string::npos) << o.err;
  EXPECT_EQ(open_as_alice(o.outputs / "r.txt.sealed"), std::string(kMarker) + " coronary lumen\n");
  // Any other value: nothing runs.
  auto bad = run({"sh", "-c", "echo ran"}, "dhz/ccta-2024", {}, -1, false, {{"TRESOR_INPUTS", "both"}});
  EXPECT_EQ(bad.out.find("ran"), std::string::npos) << bad.out;
  EXPECT_NE(bad.err.find("TRESOR_INPUTS is 'both'; it must be 'opened' (the default) or 'sealed'; nothing was run"), std::string::npos) << bad.err;
}

// The job's environment comes from the untrusted host: it must not choose code in the guest.
TEST_F(GuestSession, TheHostCannotChooseCodeThroughTheEnvironment) {
  auto o = run({"sh", "-c", "echo preload=${LD_PRELOAD:-none} libpath=${LD_LIBRARY_PATH:-none} path=$PATH env=${ENV:-none} job=$SLURM_JOB_ID"},
               "dhz/ccta-2024", {}, -1, false,
               {{"LD_PRELOAD", "/mnt/tresor-data-0/evil.so"}, {"LD_LIBRARY_PATH", "/mnt/tresor-data-0"}, {"PATH", "/mnt/tresor-data-0:/bin"},
                {"ENV", "/mnt/tresor-data-0/rc"}, {"GCONV_PATH", "/mnt/tresor-data-0"}});
  ASSERT_TRUE(o.status) << o.status.error().message;
  EXPECT_NE(o.out.find("preload=none libpath=none path=/bin:/usr/bin env=none job=42"), std::string::npos) << o.out << o.err;
}

TEST_F(GuestSession, StatusesAndSignalsComeBackExactly) {
  auto three = run({"sh", "-c", "exit 3"});
  ASSERT_TRUE(three.status) << three.status.error().message;
  EXPECT_TRUE(WIFEXITED(*three.status) && WEXITSTATUS(*three.status) == 3) << *three.status;
  auto killed = run({"sh", "-c", "kill -KILL $$"});
  ASSERT_TRUE(killed.status) << killed.status.error().message;
  EXPECT_TRUE(WIFSIGNALED(*killed.status) && WTERMSIG(*killed.status) == SIGKILL) << *killed.status;
  // SIGTERM from the host (scancel) reaches the job, which dies by it.
  auto term = run({"sh", "-c", "echo started; sleep 30"}, "dhz/ccta-2024", {}, 3000);
  ASSERT_TRUE(term.status) << term.status.error().message;
  EXPECT_TRUE(WIFSIGNALED(*term.status) && WTERMSIG(*term.status) == SIGTERM) << *term.status << "\n" << term.err;
}

TEST_F(GuestSession, RefusalsAndAGuestThatDies) {
  auto other = run({"sh", "-c", "echo SHOULD-NOT-RUN"}, "dhz/ccta-2024", {"sh", "-c", "echo signed"});
  ASSERT_TRUE(other.status);
  EXPECT_TRUE(WIFEXITED(*other.status) && WEXITSTATUS(*other.status) != 0);
  EXPECT_EQ(other.out.find("SHOULD-NOT-RUN"), std::string::npos);
  EXPECT_NE(other.err.find("nothing was run"), std::string::npos) << other.err;

  // A host that lists other datasets than the signed manifest (to map shares elsewhere).
  datasets_override_ = {"../../etc"};
  auto lying = run({"sh", "-c", "echo SHOULD-NOT-RUN"});
  datasets_override_.clear();
  ASSERT_TRUE(lying.status);
  EXPECT_TRUE(WIFEXITED(*lying.status) && WEXITSTATUS(*lying.status) == 2) << *lying.status;
  EXPECT_EQ(lying.out.find("SHOULD-NOT-RUN"), std::string::npos);
  EXPECT_NE(lying.err.find("dataset list does not match the job's manifest"), std::string::npos) << lying.err;

  auto tampered = run({"sh", "-c", "echo SHOULD-NOT-RUN"}, "dhz/tampered");
  ASSERT_TRUE(tampered.status);
  EXPECT_TRUE(WIFEXITED(*tampered.status) && WEXITSTATUS(*tampered.status) == 1);
  EXPECT_EQ(tampered.out.find("SHOULD-NOT-RUN"), std::string::npos);
  EXPECT_TRUE(fs::is_empty(tampered.outputs)) << "no output";

  // The guest killed mid-job: no status is invented.
  auto died = run({"sh", "-c", "sleep 30"}, "dhz/ccta-2024", {}, 3000, true);
  ASSERT_FALSE(died.status);
  EXPECT_EQ(died.status.error().code, ErrorCode::kUnavailable);
  EXPECT_NE(died.status.error().message.find("ended without reporting the job's status"), std::string::npos);
}

// The tasks of a step in two guests (TRESOR_STEP_ROSTER=1, docs/training.md §5.4): each agent
// draws its link key in guest memory, claims its rank through the relayed broker connection, and
// the job finds the broker's roster of the step — the same document in both guests, listing both
// keys and rank 0's address — and its own link key (0600) where TRESOR_ROSTER and TRESOR_LINK_KEY
// say, not where the host's environment said. Rank 0 in a VM without TRESOR_STEP_LEAD and without a
// step network runs nothing.
TEST_F(GuestSession, TheTasksOfAStepGetTheBrokersRosterInGuestMemory) {
  const std::vector<std::string> command = {"sh", "-c", "cat \"$TRESOR_ROSTER\"; echo; head -c 19 \"$TRESOR_LINK_KEY\"; echo; stat -c mode=%a \"$TRESOR_LINK_KEY\"; echo job-ran"};
  auto alice = *Identity::parse(read_text(dir_->file("alice")));
  slurm::JobRequest req;
  req.datasets = {"dhz/ccta-2024"};
  for (auto& b : req.image.measurement) b = std::byte{0xaa};
  req.output = "/unused";
  req.backend = "libvirt";
  const auto manifest = *slurm::build_manifest(req, alice, slurm::command_line_bytes(command), std::time(nullptr), 3600);
  auto env = [](int rank) {
    std::map<std::string, std::string> e = {{"TRESOR_STEP_ROSTER", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_PROCID", std::to_string(rank)}, {"SLURM_LOCALID", "0"},
                                            {"SLURM_NNODES", "2"},        {"SLURM_STEP_ID", "0"}, {"TRESOR_ROSTER", "/etc/hostname"},   {"TRESOR_LINK_KEY", "/etc/hostname"}};
    if (rank == 0) e["TRESOR_STEP_LEAD"] = "10.9.0.1:29400";
    return e;
  };
  auto rank1 = std::async(std::launch::async, [&] { return run(command, "dhz/ccta-2024", {}, -1, false, env(1), {}, &manifest); });
  auto rank0 = run(command, "dhz/ccta-2024", {}, -1, false, env(0), {}, &manifest);
  auto one = rank1.get();
  std::string roster_text[2];
  for (const auto* o : {&rank0, &one}) {
    ASSERT_TRUE(o->status) << o->status.error().message << "\n" << o->err;
    EXPECT_TRUE(WIFEXITED(*o->status) && WEXITSTATUS(*o->status) == 0) << *o->status << "\n" << o->err;
    EXPECT_NE(o->err.find("claimed rank " + std::string(o == &rank0 ? "0" : "1") + " of step " + manifest.job_id + ".0 (2 ranks)"), std::string::npos) << o->err;
    EXPECT_NE(o->out.find("tresor-link-key-v1 "), std::string::npos) << "the job's link key, not the host's file: " << o->out;
    EXPECT_NE(o->out.find("mode=600"), std::string::npos) << o->out;
    EXPECT_NE(o->out.find("job-ran"), std::string::npos) << o->out;
    roster_text[o == &rank0 ? 0 : 1] = o->out.substr(0, o->out.find('\n'));
  }
  EXPECT_EQ(roster_text[0], roster_text[1]) << "one document for the step";
  auto roster = parse_roster(roster_text[0]);
  ASSERT_TRUE(roster) << roster.error().message << ": " << roster_text[0];
  EXPECT_EQ(roster->step, manifest.job_id + ".0");
  EXPECT_EQ(roster->lead_host, "10.9.0.1");
  EXPECT_EQ(roster->lead_port, 29400);
  ASSERT_EQ(roster->keys.size(), 2u);
  EXPECT_NE(roster->keys[0], roster->keys[1]) << "each guest drew its own key";

  // A second guest for rank 1 of the same step (a host's doing): its claim of a held rank is
  // refused (409) when it attests, and its command does not run.
  auto second = run(command, "dhz/ccta-2024", {}, -1, false, env(1), {}, &manifest);
  ASSERT_TRUE(second.status);
  EXPECT_TRUE(WIFEXITED(*second.status) && WEXITSTATUS(*second.status) != 0) << *second.status;
  EXPECT_EQ(second.out.find("job-ran"), std::string::npos) << second.out;
  EXPECT_NE(second.err.find("the key broker did not accept this job's attestation"), std::string::npos) << second.err;
  EXPECT_NE(second.err.find("409"), std::string::npos) << second.err;

  // A step whose other task never attests: after TRESOR_STEP_WAIT the task gives up, naming the
  // missing rank, and its command never runs.
  auto alone_env = env(0);
  alone_env["SLURM_NTASKS"] = "3";
  alone_env["SLURM_STEP_ID"] = "1";  // a step of its own: step .0 holds 2 ranks
  alone_env["TRESOR_STEP_WAIT"] = "2";
  auto alone = run(command, "dhz/ccta-2024", {}, -1, false, alone_env, {}, &manifest);
  ASSERT_TRUE(alone.status);
  EXPECT_TRUE(WIFEXITED(*alone.status) && WEXITSTATUS(*alone.status) != 0) << *alone.status;
  EXPECT_EQ(alone.out.find("job-ran"), std::string::npos) << alone.out;
  EXPECT_NE(alone.err.find("the roster of step " + manifest.job_id + ".1 did not come from the key broker"), std::string::npos) << alone.err;
  EXPECT_NE(alone.err.find("rank(s) 1, 2 of 3 not yet claimed"), std::string::npos) << alone.err;

  // Rank 0 in a VM without a step network (this guest's network namespace has only its loopback)
  // and without TRESOR_STEP_LEAD has nowhere to listen: nothing runs.
  auto lost = env(0);
  lost.erase("TRESOR_STEP_LEAD");
  auto refused = run({"sh", "-c", "echo SHOULD-NOT-RUN"}, "dhz/ccta-2024", {}, -1, false, lost);
  ASSERT_TRUE(refused.status);
  EXPECT_TRUE(WIFEXITED(*refused.status) && WEXITSTATUS(*refused.status) != 0) << *refused.status;
  EXPECT_EQ(refused.out.find("SHOULD-NOT-RUN"), std::string::npos);
  EXPECT_NE(refused.err.find("TRESOR_STEP_LEAD is not set"), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("this VM has no address on a step network"), std::string::npos) << refused.err;
}

// The host's side of the outputs, against a guest that misbehaves (frames written by the test):
// names that would leave the output directory, a length that does not match, a guest that stops
// in the middle of a file. Nothing is written outside the directory, no partial file stays.
TEST(HostSessionOutputs, BadNamesShortFilesAndCutStreamsLeaveNothing) {
  struct Case {
    std::string what;
    std::function<void(vm::control::Channel&)> guest;
    std::string error;  // "" for success
  };
  auto file = [](vm::control::Channel& ch, const std::string& name, const std::string& body, uint64_t announced) {
    ASSERT_TRUE(ch.send(vm::control::Type::kOutputBegin, as_bytes(name)));
    ASSERT_TRUE(ch.send(vm::control::Type::kOutputData, as_bytes(body)));
    std::array<std::byte, 8> len{};
    store_be64(len.data(), announced);
    ASSERT_TRUE(ch.send(vm::control::Type::kOutputEnd, len));
  };
  auto exit0 = [](vm::control::Channel& ch) { ASSERT_TRUE(ch.send(vm::control::Type::kExit, vm::control::encode_exit(0))); };
  const std::vector<Case> cases = {
      {"a good file", [&](auto& ch) { file(ch, "sub/ok.txt.sealed", "sealed-bytes", 12); exit0(ch); }, ""},
      {"a parent", [&](auto& ch) { file(ch, "../escape.sealed", "x", 1); exit0(ch); }, "must not contain '.' or '..' components"},
      {"an absolute name", [&](auto& ch) { file(ch, "/tmp/escape.sealed", "x", 1); exit0(ch); }, "must be relative"},
      {"not sealed", [&](auto& ch) { file(ch, "plain.txt", "x", 1); exit0(ch); }, "must name a sealed file"},
      {"a short file", [&](auto& ch) { file(ch, "short.sealed", "abc", 5); exit0(ch); }, "3 bytes arrived"},
      {"a cut stream", [&](auto& ch) {
         ASSERT_TRUE(ch.send(vm::control::Type::kOutputBegin, as_bytes(std::string("cut.sealed"))));
         ASSERT_TRUE(ch.send(vm::control::Type::kOutputData, as_bytes(std::string("abc"))));
       }, "ended without reporting"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    TempDir dir;
    const fs::path out = dir.path() / "out";
    fs::create_directories(out);
    int sp[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
    std::thread guest([&] {
      vm::control::Channel ch(sp[1]);
      (void)ch.receive();  // kStart
      c.guest(ch);
      ::shutdown(sp[1], SHUT_WR);
    });
    vm::HostSession s;
    s.out_fd = s.err_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    s.output_dir_fd = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    auto status = vm::serve_guest(sp[0], s);
    guest.join();
    for (int f : {sp[0], sp[1], s.out_fd, s.output_dir_fd}) ::close(f);
    std::vector<std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(dir.path())) {
      if (e.is_regular_file()) files.push_back(fs::relative(e.path(), dir.path()).string());
    }
    if (c.error.empty()) {
      ASSERT_TRUE(status) << status.error().message;
      EXPECT_EQ(files, std::vector<std::string>{"out/sub/ok.txt.sealed"});
      EXPECT_EQ(read_text((out / "sub/ok.txt.sealed").string()), "sealed-bytes");
    } else {
      ASSERT_FALSE(status);
      EXPECT_NE(status.error().message.find(c.error), std::string::npos) << status.error().message;
      EXPECT_EQ(files, std::vector<std::string>{}) << "nothing written, nothing partial left";
    }
  }
}

// A guest that never answers (hangs in its firmware or kernel): the host gives up at the boot
// timeout instead of waiting for Slurm's time limit; one that answers in time is not affected.
TEST(HostSessionBoot, AGuestThatNeverAnswersIsGivenUpAtTheBootTimeout) {
  for (const bool answers : {false, true}) {
    SCOPED_TRACE(answers ? "answers" : "silent");
    int sp[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
    std::thread guest([&] {
      vm::control::Channel ch(sp[1]);
      (void)ch.receive();  // kStart
      if (answers) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        (void)ch.send(vm::control::Type::kExit, vm::control::encode_exit(5 << 8));
      } else {
        char c;
        (void)!::read(sp[1], &c, 1);  // until the host closes its end
      }
    });
    vm::HostSession s;
    s.out_fd = s.err_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    s.first_frame_timeout = std::chrono::milliseconds(400);
    auto status = vm::serve_guest(sp[0], s);
    ::shutdown(sp[0], SHUT_RDWR);
    guest.join();
    for (int f : {sp[0], sp[1], s.out_fd}) ::close(f);
    if (answers) {
      ASSERT_TRUE(status) << status.error().message;
      EXPECT_EQ(WEXITSTATUS(*status), 5);
    } else {
      ASSERT_FALSE(status);
      EXPECT_EQ(status.error().code, ErrorCode::kUnavailable);
      EXPECT_NE(status.error().message.find("did not answer within 0.4 s"), std::string::npos) << status.error().message;
    }
  }
}

// The same job inside a real VM: tresor-run's libvirt backend boots the guest image (built here
// from Debian's kernel with this build's agent) under TCG through libvirtd, serves its control
// channel, and leaves with the job's status. Label: slow (about 10 s of emulated boot per run).
class VmBoot : public GuestSession {
 protected:
  static void SetUpTestSuite() {
    GuestSession::SetUpTestSuite();
    if (!skip_.empty()) return;
    if (::geteuid() != 0 || ::access("/usr/sbin/libvirtd", X_OK) != 0 || ::access("/usr/bin/qemu-system-x86_64", X_OK) != 0 ||
        !have_kernel()) {
      vm_skip_ = "needs root, libvirtd, QEMU and a kernel in /boot (scripts/bootstrap installs them)";
      return;
    }
    // With everything installed, a daemon or an image that fails is a failure, not a skip.
    auto started = run_command({TRESOR_LIBVIRT_LOCAL, "start"});
    if (started.exit_code != 0) {
      vm_error_ = "libvirtd did not start: " + started.err;
      return;
    }
    // QEMU runs as libvirt's unprivileged user: it reads the (ciphertext) datasets through 9p.
    run_command({"/bin/chmod", "-R", "a+rX", dir_->file("datasets")});
    ::chmod(dir_->path().c_str(), 0755);
    // step-probe: one rank of a step, for the step-network test (the same image serves all).
    auto image = run_command({TRESOR_BIN, "image", "build", "-o", dir_->file("image"), "--agent", TRESOR_AGENT_BIN, "--program", TRESOR_STEP_PROBE_BIN});
    if (image.exit_code != 0) {
      vm_error_ = "the guest image could not be built: " + image.err;
      return;
    }
    std::ofstream(dir_->file("images.json")) << R"({"images": {"test": {"measurement": ")" << std::string(96, 'a') << R"(", "kernel": ")"
                                             << dir_->file("image/vmlinux") << R"(", "initrd": ")" << dir_->file("image/initrd.cpio")
                                             << R"(", "cmdline": "console=ttyS0 panic=-1 loglevel=4"}}})";
  }
  static void TearDownTestSuite() {
    run_command({TRESOR_LIBVIRT_LOCAL, "stop"});
    GuestSession::TearDownTestSuite();
  }
  void SetUp() override {
    GuestSession::SetUp();
    if (!vm_skip_.empty()) GTEST_SKIP() << vm_skip_;
    if (!vm_error_.empty()) FAIL() << vm_error_;
  }
  // tresor-run with the libvirt backend, as the plugin would start it.
  static testing::CommandResult run_vm(const std::vector<std::string>& command, const std::string& out) {
    return run_command(vm_argv(command, out));
  }
  static Manifest vm_manifest(const std::vector<std::string>& command, const std::string& out) {
    auto alice = *Identity::parse(read_text(dir_->file("alice")));
    slurm::JobRequest req;
    req.datasets = {"dhz/ccta-2024"};
    for (auto& b : req.image.measurement) b = std::byte{0xaa};
    req.output = out;
    req.backend = "libvirt";
    return *slurm::build_manifest(req, alice, slurm::command_line_bytes(command), std::time(nullptr), 3600);
  }
  // `env`: more of the task's environment (a step's Slurm variables); `runner_options`: more of
  // the node's configuration (--step-bridge); `manifest`: one for all the tasks of a step.
  static std::vector<std::string> vm_argv(const std::vector<std::string>& command, const std::string& out,
                                          const std::vector<std::string>& env = {}, const std::vector<std::string>& runner_options = {},
                                          const Manifest* manifest = nullptr) {
    const Manifest m = manifest != nullptr ? *manifest : vm_manifest(command, out);
    std::vector<std::string> argv = {"/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "TRESOR_MANIFEST=" + *slurm::encode_manifest_env(m),
                                     "TRESOR_BACKEND=libvirt", "TRESOR_OUTPUT=" + out, "SLURM_CPUS_ON_NODE=1", "SLURM_MEM_PER_NODE=512"};
    argv.insert(argv.end(), env.begin(), env.end());
    argv.insert(argv.end(), {TRESOR_RUN_BIN, "--slurm-job-id", "77", "--broker", "https://127.0.0.1:" + std::to_string(port_), "--ca",
                             dir_->file("broker/tls.crt"), "--agent", TRESOR_AGENT_BIN, "--datasets", dir_->file("datasets"), "--sim",
                             dir_->file("sim"), "--images", dir_->file("images.json"), "--hypervisor", "qemu:///system", "--accel", "tcg",
                             "--snp", "no"});
    argv.insert(argv.end(), runner_options.begin(), runner_options.end());
    argv.push_back("--");
    argv.insert(argv.end(), command.begin(), command.end());
    return argv;
  }
  static bool domain_left(const std::string& prefix) {
    auto list = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"});
    return list.out.find(prefix) != std::string::npos;
  }
  static inline std::string vm_skip_, vm_error_;
  static bool have_kernel() {
    for (const auto& e : fs::directory_iterator("/boot", fs::directory_options::skip_permission_denied)) {
      if (e.path().filename().string().starts_with("vmlinuz-")) return true;
    }
    return false;
  }
};

TEST_F(VmBoot, TheJobRunsInsideABootedVmAndItsOutputIsSealed) {
  const std::string out = dir_->file("vm-out");
  // The host plants a program on a dataset share: inside the guest it cannot run (noexec).
  const std::string planted = dir_->file("datasets/dhz/ccta-2024/planted.sh");
  std::ofstream(planted) << "#!/bin/sh\necho PLANTED-RAN\n";
  fs::permissions(planted, fs::perms(0755));
  auto r = run_vm({"sh", "-c", "echo in-vm kernel=$(uname -r); /mnt/tresor-data-0/planted.sh; echo planted-rc=$?; "
                               "tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/r.txt; exit 3"},
                  out);
  fs::remove(planted);
  EXPECT_EQ(r.out.find("PLANTED-RAN"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("planted-rc=126"), std::string::npos) << r.out << r.err;
  EXPECT_EQ(r.exit_code, 3) << r.out << r.err;
  EXPECT_NE(r.err.find("backend libvirt: VM tresor-77.0-"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("in-vm kernel="), std::string::npos) << r.out << r.err;
  EXPECT_NE(r.err.find("key of dataset dhz/ccta-2024 released"), std::string::npos) << r.err;
  EXPECT_EQ(open_as_alice(fs::path(out) / "r.txt.sealed"), std::string(kMarker) + " CORONARY LUMEN\n");
  // Nothing left: no domain, no runtime directory.
  auto list = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"});
  EXPECT_EQ(list.out.find("tresor-77."), std::string::npos) << list.out;
  auto dirs = run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-77-vm-* 2>/dev/null"});
  EXPECT_EQ(dirs.out, "");
}

// A step's two tasks, each in its own TCG VM, meet as ranks on the node's step network
// (TRESOR_STEP_ROSTER=1, docs/scale.md §2.2): the runner gives each VM a virtio-net on the step
// bridge (here a test bridge with busybox's DHCP server on it), /init takes an address by DHCP,
// rank 0's agent claims its address there as the step's lead, and the job's program — step-probe,
// the collective `tresor train` uses, in the image — links the two VMs over TLS pinned to the
// broker's roster: the same sums on both. A node without a step network, or naming one that is
// not a bridge, refuses the step before any VM starts.
TEST_F(VmBoot, TheTasksOfAStepMeetAcrossTheirVmsOnTheStepBridge) {
  testing::StepBridge net("trtest-step0", "10.231.7", dir_->path().string());
  ASSERT_EQ(net.error(), "");
  const std::string bridge = net.name();
  const std::vector<std::string> command = {"sh", "-c", "step-probe"};
  const std::string out = dir_->file("vm-step-out");
  const Manifest manifest = vm_manifest(command, out);
  auto task = [&](int rank) {
    return std::vector<std::string>{"TRESOR_STEP_ROSTER=1", "SLURM_JOB_ID=77", "SLURM_STEP_ID=0", "SLURM_NTASKS=2", "SLURM_STEP_NUM_TASKS=2",
                                    "SLURM_PROCID=" + std::to_string(rank), "SLURM_LOCALID=0", "SLURM_NNODES=2"};
  };
  // Refused before any VM starts: no step network on this node, or one that is not a bridge.
  auto none = run_command(vm_argv(command, out, task(1), {}, &manifest));
  EXPECT_EQ(none.exit_code, 2) << none.err;
  EXPECT_NE(none.err.find("this node has no step network for their VMs (plugstack.conf step_bridge="), std::string::npos) << none.err;
  auto wrong = run_command(vm_argv(command, out, task(1), {"--step-bridge", "lo"}, &manifest));
  EXPECT_EQ(wrong.exit_code, 2) << wrong.err;
  EXPECT_NE(wrong.err.find("the step bridge 'lo' (plugstack.conf step_bridge=) is not a bridge on this node"), std::string::npos) << wrong.err;
  EXPECT_FALSE(domain_left("tresor-77.0.1-"));

  auto rank1 = std::async(std::launch::async, [&] { return run_command(vm_argv(command, out, task(1), {"--step-bridge", bridge}, &manifest)); });
  auto rank0 = run_command(vm_argv(command, out, task(0), {"--step-bridge", bridge}, &manifest));
  auto one = rank1.get();
  std::string lead[2];
  for (int r : {0, 1}) {
    const auto& o = r == 0 ? rank0 : one;
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(o.exit_code, 0) << o.out << o.err << net.log();
    EXPECT_NE(o.err.find("VM tresor-77.0." + std::to_string(r) + "-" + manifest.job_id), std::string::npos) << o.err;
    EXPECT_NE(o.err.find("claimed rank " + std::to_string(r) + " of step " + manifest.job_id + ".0 (2 ranks)"), std::string::npos) << o.err;
    const std::string said = "step-probe rank " + std::to_string(r) + " of 2: lead ";
    const size_t at = o.out.find(said);
    ASSERT_NE(at, std::string::npos) << o.out << o.err;
    const std::string line = o.out.substr(at, o.out.find('\n', at) - at);
    EXPECT_NE(line.find(" sum 3 broadcast 7"), std::string::npos) << line;
    EXPECT_EQ(line.find("WRONG"), std::string::npos) << line;
    lead[r] = line.substr(said.size(), line.find(' ', said.size()) - said.size());
  }
  EXPECT_EQ(lead[0], lead[1]) << "one roster for the step";
  EXPECT_TRUE(lead[0].starts_with("10.231.7.")) << "rank 0's address on the step network, from its DHCP: " << lead[0];
  EXPECT_FALSE(domain_left("tresor-77.0."));
}

// scancel: SIGTERM reaches the job inside the VM, which dies by it, and the runner leaves the same
// way with nothing left behind. SIGKILL (scancel --signal=KILL, a node problem): the runner
// cannot clean up, but its keeper sees it go and destroys the VM (and were the keeper killed
// too, libvirt would, when the keeper's connection drops: autodestroy).
TEST_F(VmBoot, CancellingLeavesNoVmBehind) {
  // SIGTERM while the VM still boots, then SIGTERM and SIGKILL while the job runs.
  for (const auto& [sig, during_boot] : std::vector<std::pair<int, bool>>{{SIGTERM, true}, {SIGTERM, false}, {SIGKILL, false}}) {
    SCOPED_TRACE(std::to_string(sig) + (during_boot ? " during boot" : " during the job"));
    TempDir io;
    auto argv = vm_argv({"sh", "-c", "echo started; sleep 120"}, dir_->file("vm-cancel-out"));
    const pid_t runner = ::fork();
    if (runner == 0) {
      const int out = ::open(io.file("out").c_str(), O_WRONLY | O_CREAT, 0600);
      const int err = ::open(io.file("err").c_str(), O_WRONLY | O_CREAT, 0600);
      ::dup2(out, 1);
      ::dup2(err, 2);
      std::vector<char*> a;
      for (auto& x : argv) a.push_back(x.data());
      a.push_back(nullptr);
      ::execv(a[0], a.data());
      std::_Exit(127);
    }
    if (during_boot) {
      bool created = false;  // the domain exists; the guest is still booting
      for (int i = 0; i < 300 && !created; ++i) {
        created = domain_left("tresor-77.");
        if (!created) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
      ASSERT_TRUE(created) << read_text(io.file("err"));
    } else {
      bool started = false;
      for (int i = 0; i < 600 && !started; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        started = read_text(io.file("out")).find("started") != std::string::npos;
      }
      ASSERT_TRUE(started) << read_text(io.file("err"));
      EXPECT_TRUE(domain_left("tresor-77."));
    }
    ::kill(runner, sig);
    int status = 0;
    ::waitpid(runner, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == sig) << status << "\n" << read_text(io.file("err"));
    if (during_boot) {
      EXPECT_EQ(read_text(io.file("out")).find("started"), std::string::npos) << "the job never ran";
    }
    bool gone = false;
    for (int i = 0; i < 100 && !gone; ++i) {
      gone = !domain_left("tresor-77.");
      if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_TRUE(gone) << "the VM outlived its runner";
    // The keeper removes the runtime directory when the runner ends, even by SIGKILL (the
    // plugin's job epilog is the safety net when the keeper itself is killed).
    std::string dirs = "?";
    for (int i = 0; i < 100 && !dirs.empty(); ++i) {
      dirs = run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-77-vm-* 2>/dev/null"}).out;
      if (!dirs.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    EXPECT_EQ(dirs, "") << "no runtime directory left";
  }
}

}  // namespace
}  // namespace tresor
