// The agent's work inside the sandbox or VM (include/tresor/agent/agent.h).
#include "tresor/agent/agent.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>

#include <filesystem>
#include <map>
#include <memory>

#include "tresor/encoding.h"
#include "tresor/io.h"
#include "tresor/process.h"
#include "tresor/kbs/client.h"
#include "tresor/roster.h"
#include "tresor/sealed.h"
#include "tresor/secret.h"

namespace tresor::agent {
namespace {

namespace fs = std::filesystem;
using sealed::KeyRing;
using sealed::OpenOptions;
using sealed::SealOptions;
using sealed::open_stream;
using sealed::seal_stream;

// Keys of one dataset, fetched as the files need them: "latest" first, then older versions for
// files sealed before a rotation (the sealed format does not say which version sealed a file).
class DatasetKeys {
 public:
  DatasetKeys(kbs::Client& client, const kbs::Attestation& session, std::string dataset)
      : client_(client), session_(session), dataset_(std::move(dataset)) {}

  Result<const DatasetKey*> latest() {
    if (!keys_.empty()) return keys_.rbegin()->second.get();
    auto k = kbs::fetch_dataset_key(client_, session_, dataset_, "latest");
    if (!k) return std::unexpected(k.error());
    newest_ = k->version;
    auto& slot = keys_[k->version];
    slot = std::make_unique<DatasetKey>(DatasetKey{dataset_, std::move(k->key)});
    return slot.get();
  }
  // The next older version not fetched yet, or nullptr when there is none.
  Result<const DatasetKey*> older() {
    const uint32_t oldest = keys_.empty() ? 0 : keys_.begin()->first;
    if (oldest <= 1) return nullptr;
    auto k = kbs::fetch_dataset_key(client_, session_, dataset_, std::to_string(oldest - 1));
    if (!k) return std::unexpected(k.error());
    auto& slot = keys_[k->version];
    slot = std::make_unique<DatasetKey>(DatasetKey{dataset_, std::move(k->key)});
    return slot.get();
  }
  KeyRing ring() const {
    KeyRing r;
    for (const auto& [v, k] : keys_) r.dataset_keys.push_back(k.get());
    return r;
  }

 private:
  kbs::Client& client_;
  const kbs::Attestation& session_;
  std::string dataset_;
  uint32_t newest_ = 0;
  std::map<uint32_t, std::unique_ptr<DatasetKey>> keys_;
};

// Runs `attempt` with the dataset's keys, fetching older key versions while no key opens the file
// (the sealed format does not say which version sealed it).
template <typename F>
auto with_key_versions(DatasetKeys& keys, F&& attempt) -> decltype(attempt()) {
  for (;;) {
    auto r = attempt();
    if (r || r.error().code != ErrorCode::kNoMatchingKey) return r;
    auto older = keys.older();
    if (!older) return std::unexpected(older.error());
    if (*older == nullptr) return r;
  }
}

Result<void> open_one(const fs::path& sealed, const fs::path& plain, DatasetKeys& keys) {
  return with_key_versions(keys, [&]() -> Result<void> {
    auto in = FdFile::open_read(sealed.string());
    if (!in) return std::unexpected(in.error());
    auto out = AtomicOutputFile::create(plain.string(), 0600, /*overwrite=*/false);
    if (!out) return std::unexpected(out.error());
    OpenOptions o;
    o.name = sealed.string();
    TRESOR_TRY(open_stream(*in, *out, keys.ring(), o));
    return out->commit();
  });
}

// The file key of one sealed input (its header read, unlocked with the dataset's keys, its MAC
// verified), and the header's MAC by which the job will find it. Its chunks are checked when the
// job reads them.
Result<void> add_file_key(const fs::path& sealed, const std::string& name, DatasetKeys& keys, sealed::FileKeys& out) {
  auto in = FdFile::open_read(sealed.string());
  if (!in) return std::unexpected(in.error());
  auto unlocked = with_key_versions(keys, [&] { return sealed::read_header(*in, keys.ring(), sealed.string()); });
  if (!unlocked) return std::unexpected(unlocked.error());
  return out.add(unlocked->header.mac, std::move(unlocked->file_key), name);
}

// Writes `text` to `path` (0600), replacing whatever a stale file held.
Result<void> write_private(const fs::path& path, std::string_view text) {
  auto out = AtomicOutputFile::create(path.string(), 0600, /*overwrite=*/true);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(out->write(as_bytes(text)));
  return out->commit();
}

// The step's roster for this task (docs/protocol.md §13.3), after an attestation that carried
// `claim`: waits for it, then writes it and the link key into <private_dir>/step/.
Result<void> take_roster(kbs::Client& client, const kbs::Attestation& session, const LinkClaim& claim, const crypto::Key& key,
                         const StepLink& link, const fs::path& dir, std::ostream& log) {
  auto roster = kbs::fetch_step_roster(client, session, claim, link.wait);
  if (!roster) {
    return fail(roster.error().code, "the roster of step " + link.step + " did not come from the key broker: " + roster.error().message +
                                         " (every task of the step must start with TRESOR_STEP_ROSTER=1 and pass attestation)");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create " + dir.string() + ": " + ec.message());
  auto text = link_key_text(key);
  if (!text) return std::unexpected(text.error());
  auto written = write_private(dir / "link.key", *text);
  secure_wipe(MutableByteSpan(reinterpret_cast<std::byte*>(text->data()), text->size()));
  TRESOR_TRY(written);
  TRESOR_TRY(write_private(dir / "roster.json", *roster));
  auto parsed = parse_roster(*roster);  // checked by fetch_step_roster; read again for the log line
  if (!parsed) return std::unexpected(parsed.error());
  log << "tresor-agent: the roster of step " << link.step << " came from the key broker: " << link.size << " ranks, rank 0 at "
      << parsed->lead_host << ":" << parsed->lead_port << "; this task is rank " << link.rank << "\n";
  return {};
}

}  // namespace

Result<std::string> step_network_address() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return fail(ErrorCode::kIo, std::string("getifaddrs: ") + std::strerror(errno));
  std::vector<std::pair<std::string, std::string>> found;  // interface, address
  for (const ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
    if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET || (a->ifa_flags & IFF_UP) == 0 || (a->ifa_flags & IFF_LOOPBACK) != 0) continue;
    char text[INET_ADDRSTRLEN] = {};
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(a->ifa_addr)->sin_addr, text, sizeof text);
    found.emplace_back(a->ifa_name, text);
  }
  ::freeifaddrs(list);
  if (found.size() > 1) {
    std::string all;
    for (const auto& [name, addr] : found) all += (all.empty() ? "" : ", ") + name + " " + addr;
    return fail(ErrorCode::kInvalidArgument, "this machine has several IPv4 addresses (" + all + "); a job VM has one, on its step network: set TRESOR_STEP_LEAD");
  }
  return found.empty() ? std::string() : found[0].second;
}

Result<std::optional<StepLink>> step_link_from(const slurm::GetEnv& getenv, const Manifest& manifest, const std::string& own_address) {
  const char* want = getenv("TRESOR_STEP_ROSTER");
  if (want == nullptr || *want == '\0' || std::string_view(want) == "0") return std::optional<StepLink>{};
  if (std::string_view(want) != "1") {
    return fail(ErrorCode::kInvalidArgument, std::string("TRESOR_STEP_ROSTER is '") + want +
                                                 "'; it must be 1 (claim this task's rank and get the step's roster) or 0");
  }
  auto ranks = slurm::ranks_from_slurm(getenv);
  if (!ranks) return fail(ranks.error().code, "TRESOR_STEP_ROSTER=1: " + ranks.error().message);
  if (!*ranks) return std::optional<StepLink>{};  // one task: nobody to meet
  StepLink link;
  link.size = (*ranks)->size;
  link.rank = (*ranks)->rank;
  const std::string& run = (*ranks)->run_id;  // JOB.STEP, both digits
  link.step = manifest.job_id + run.substr(run.find('.'));
  if (!valid_step_id(link.step)) {
    return fail(ErrorCode::kInvalidArgument, "TRESOR_STEP_ROSTER=1: the step id " + link.step + " (the manifest's job id and SLURM_STEP_ID) is not 1 to 64 of A-Z a-z 0-9 . _ -");
  }
  if (link.size > 1024) return fail(ErrorCode::kInvalidArgument, "TRESOR_STEP_ROSTER=1: SLURM_NTASKS=" + std::to_string(link.size) + "; a step roster holds at most 1024 ranks");
  if (const char* wait = getenv("TRESOR_STEP_WAIT"); wait != nullptr && *wait != '\0') {
    const std::string_view w(wait);
    int seconds = 0;
    const auto [end, ec] = std::from_chars(w.data(), w.data() + w.size(), seconds);
    if (ec != std::errc{} || end != w.data() + w.size() || seconds < 1 || seconds > 240) {
      return fail(ErrorCode::kInvalidArgument, std::string("TRESOR_STEP_WAIT is '") + wait + "'; it must be 1..240 seconds (the broker session lasts five minutes)");
    }
    link.wait = std::chrono::seconds(seconds);
  }
  if (link.rank != 0) return std::optional<StepLink>{link};
  if (const char* lead = getenv("TRESOR_STEP_LEAD"); lead != nullptr && *lead != '\0') {
    if (!valid_lead_address(lead)) return fail(ErrorCode::kInvalidArgument, std::string("TRESOR_STEP_LEAD is '") + lead + "'; it must be an IPv4 address and a port, as 10.8.0.1:29400");
    link.lead = lead;
    return std::optional<StepLink>{link};
  }
  // Where rank 0 listens when the environment does not say: the loopback its sandbox shares with
  // the step's other tasks (one node only), or its VM's address on the node's step network.
  const bool loopback = own_address == "127.0.0.1";
  if (own_address.empty() || (loopback && (*ranks)->nodes > 1)) {
    const std::string why = loopback ? std::to_string((*ranks)->nodes) + " nodes: their sandboxes share no loopback"
                                     : "this VM has no address on a step network (the node's step_bridge=, docs/admin-guide.md)";
    return fail(ErrorCode::kInvalidArgument, "TRESOR_STEP_ROSTER=1: TRESOR_STEP_LEAD is not set; rank 0's address (ADDRESS:PORT, reachable "
                                             "from the step's other tasks) is needed, and " + why);
  }
  auto port = unused_tcp_port(own_address);
  if (!port) return std::unexpected(port.error());
  link.lead = own_address + ":" + std::to_string(*port);
  return std::optional<StepLink>{link};
}

Result<bool> sealed_inputs_from(const char* value) {
  if (value == nullptr || std::string_view(value) == "opened") return false;
  if (std::string_view(value) == "sealed") return true;
  return fail(ErrorCode::kInvalidArgument, std::string("TRESOR_INPUTS is '") + value + "'; it must be 'opened' (the default) or 'sealed'");
}

Result<void> prepare(const Options& o, const Manifest& manifest, std::string_view manifest_json, EvidenceProvider& evidence,
                     std::ostream& log) {
  auto client = kbs::Client::create({.url = o.broker_url, .ca_file = o.broker_ca});
  if (!client) return std::unexpected(client.error());
  const kbs::EvidenceSource source = [&](const std::array<std::byte, 64>& rd) { return evidence.evidence(rd); };
  // A step's rank: a link key drawn here, in private memory, and claimed in the attestation
  // (REPORT_DATA binds the claim, docs/protocol.md §13.1).
  std::optional<crypto::Key> link_key;
  LinkClaim claim;
  if (o.step_link) {
    auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
    if (!k) return std::unexpected(k.error());
    auto pub = link_public_key(*k);
    if (!pub) return std::unexpected(pub.error());
    link_key = std::move(*k);
    claim = LinkClaim{*pub, o.step_link->step, o.step_link->size, {o.step_link->rank}, o.step_link->lead};
  }
  auto session = kbs::attest(**client, manifest_json, source, o.step_link ? link_claim_text(claim) : std::string());
  if (!session) {
    return fail(session.error().code, "the key broker did not accept this job's attestation: " + session.error().message +
                                          " (the job's manifest, its signer's registration or the evidence was refused; the "
                                          "broker's audit log has the reason)");
  }
  log << "tresor-agent: attested to the key broker as job " << manifest.job_id << "\n";
  if (o.step_link) {
    log << "tresor-agent: claimed rank " << o.step_link->rank << " of step " << o.step_link->step << " (" << o.step_link->size
        << " ranks) with link key " << base64url_encode(claim.key) << (claim.lead.empty() ? std::string() : ", listening at " + claim.lead) << "\n";
    TRESOR_TRY(take_roster(**client, *session, claim, *link_key, *o.step_link, fs::path(o.private_dir) / "step", log));
    // The wait may have used most of the session's five minutes, and the dataset keys are fetched
    // as the inputs are opened: a fresh session for them (the broker takes the same claim again).
    session = kbs::attest(**client, manifest_json, source, link_claim_text(claim));
    if (!session) return fail(session.error().code, "the key broker did not accept this job's attestation after the step's roster: " + session.error().message);
  }
  const fs::path data = fs::path(o.private_dir) / "data";
  std::error_code ec;
  fs::create_directories(data, ec);
  fs::create_directories(fs::path(o.private_dir) / "out", ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create the private directories under " + o.private_dir + ": " + ec.message());
  size_t opened = 0;
  sealed::FileKeys file_keys;
  const fs::path keys_file = fs::path(o.private_dir) / "file-keys";
  for (const auto& dataset : manifest.datasets) {
    DatasetKeys keys(**client, *session, dataset);
    auto first = keys.latest();
    if (!first) {
      fs::remove_all(data, ec);
      return fail(first.error().code, "the key of dataset '" + dataset + "' was not released: " + first.error().message +
                                          " (ask the data owner for a grant, and check that the job's image is approved)");
    }
    log << "tresor-agent: key of dataset " << dataset << " released\n";
    const fs::path dir = fs::path(o.data_root) / dataset;
    if (!fs::is_directory(dir, ec)) continue;  // a dataset without files here: its key only
    for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
      if (!e.is_regular_file() || e.path().extension() != ".sealed") continue;
      const fs::path rel = fs::relative(e.path(), dir);
      if (o.sealed_inputs) {
        if (auto r = add_file_key(e.path(), (fs::path(dataset) / rel).string(), keys, file_keys); !r) {
          return fail(r.error().code, "input " + e.path().string() + " cannot be opened: " + r.error().message + " (the job did not run)");
        }
        ++opened;
        continue;
      }
      fs::path plain = data / dataset / rel;
      plain.replace_extension();
      fs::create_directories(plain.parent_path(), ec);
      if (auto r = open_one(e.path(), plain, keys); !r) {
        fs::remove_all(data, ec);  // nothing half-opened stays behind
        return fail(r.error().code, "input " + e.path().string() + " cannot be opened: " + r.error().message +
                                        " (the job did not run)");
      }
      ++opened;
    }
  }
  if (o.sealed_inputs) {
    auto out = AtomicOutputFile::create(keys_file.string(), 0600, /*overwrite=*/true);  // this job's keys only, replacing any stale file
    if (!out) return std::unexpected(out.error());
    TRESOR_TRY(out->write(file_keys.to_file_text().span()));
    TRESOR_TRY(out->commit());
    log << "tresor-agent: " << opened << " sealed input file(s) left sealed for the job; their file keys are in private memory\n";
    return {};
  }
  log << "tresor-agent: " << opened << " sealed input file(s) opened into private memory\n";
  return {};
}

Result<size_t> seal_outputs(const Options& o, const Manifest& manifest, std::ostream& log) {
  const fs::path out = fs::path(o.private_dir) / "out";
  std::error_code ec;
  size_t sealed = 0;
  SealOptions so;
  so.recipients = manifest.output_recipients;
  for (const auto& e : fs::recursive_directory_iterator(out, ec)) {
    if (!e.is_regular_file()) continue;
    const fs::path rel = fs::relative(e.path(), out);
    fs::path dest = fs::path(o.output_dir) / rel;
    dest += ".sealed";
    fs::create_directories(dest.parent_path(), ec);
    if (ec) return fail(ErrorCode::kIo, "cannot create " + dest.parent_path().string() + ": " + ec.message());
    auto in = FdFile::open_read(e.path().string());
    if (!in) return std::unexpected(in.error());
    auto w = AtomicOutputFile::create(dest.string(), 0644, /*overwrite=*/true);
    if (!w) return std::unexpected(w.error());
    auto n = seal_stream(*in, *w, so);
    if (!n) return std::unexpected(n.error());
    TRESOR_TRY(w->commit());
    ++sealed;
  }
  if (ec) return fail(ErrorCode::kIo, "cannot list " + out.string() + ": " + ec.message());
  log << "tresor-agent: " << sealed << " output file(s) sealed to " << manifest.output_recipients.size() << " recipient(s) in "
      << o.output_dir << "\n";
  return sealed;
}

int run_job(const Options& o, const Manifest& manifest, std::string_view manifest_json, EvidenceProvider& evidence, bool timing,
            std::ostream& log, const std::function<void(pid_t)>& on_start, const std::function<int()>& cancelled) {
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); };
  const auto t_prepare = Clock::now();
  if (auto r = prepare(o, manifest, manifest_json, evidence, log); !r) {
    log << "tresor-agent: " << r.error().message << std::endl;
    return 1 << 8;
  }
  const double prepare_ms = ms_since(t_prepare);
  if (const int sig = cancelled ? cancelled() : 0; sig != 0) {
    log << "tresor-agent: the job was cancelled (signal " << sig << ") before it started; nothing was run" << std::endl;
    return sig;  // the wait status of a death by that signal
  }
  const std::string data = o.private_dir + "/data", out = o.private_dir + "/out";
  const auto t_job = Clock::now();
  const pid_t job = ::fork();
  if (job < 0) return 1 << 8;
  if (job == 0) {
    ::setpgid(0, 0);  // its own group: whatever it leaves running can be ended with it
    ::setenv("TRESOR_DATA", data.c_str(), 1);
    ::setenv("TRESOR_OUTPUT_DIR", out.c_str(), 1);
    ::setenv("TRESOR_INPUTS", o.sealed_inputs ? "sealed" : "opened", 1);
    if (o.sealed_inputs) {
      ::setenv("TRESOR_SEALED_DATA", o.data_root.c_str(), 1);
      ::setenv("TRESOR_FILE_KEYS", (o.private_dir + "/file-keys").c_str(), 1);
    } else {
      ::unsetenv("TRESOR_SEALED_DATA");
      ::unsetenv("TRESOR_FILE_KEYS");
    }
    // The step's roster and link key are the agent's to give (never the host's environment's).
    if (o.step_link) {
      ::setenv("TRESOR_ROSTER", (o.private_dir + "/step/roster.json").c_str(), 1);
      ::setenv("TRESOR_LINK_KEY", (o.private_dir + "/step/link.key").c_str(), 1);
    } else {
      ::unsetenv("TRESOR_ROSTER");
      ::unsetenv("TRESOR_LINK_KEY");
    }
    ::unsetenv("TRESOR_MANIFEST");
    process::default_signals();
    ::umask(022);
    std::vector<std::string> command = o.command;
    std::vector<char*> cmd;
    for (auto& a : command) cmd.push_back(a.data());
    cmd.push_back(nullptr);
    ::execvp(cmd[0], cmd.data());
    std::fprintf(stderr, "tresor-agent: cannot run %s: %s\n", cmd[0], std::strerror(errno));
    std::_Exit(errno == ENOENT ? 127 : 126);
  }
  ::setpgid(job, job);
  if (on_start) on_start(job);
  const int status = process::wait_for(job);
  ::kill(-job, SIGKILL);  // what the job left behind in its group does not outlive it
  const double job_ms = ms_since(t_job);
  // Whatever the job wrote, sealed: the results of a failed job are the user's too.
  const auto t_seal = Clock::now();
  auto sealed = seal_outputs(o, manifest, log);
  if (timing) {
    char line[160];
    std::snprintf(line, sizeof line, "tresor-agent: timing attest_keys_inputs_ms=%.1f job_ms=%.1f seal_ms=%.1f", prepare_ms, job_ms,
                  ms_since(t_seal));
    log << line << std::endl;
  }
  if (!sealed) {
    log << "tresor-agent: the outputs could not be sealed: " << sealed.error().message << " (nothing unsealed was written)" << std::endl;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 1 << 8;
  }
  return status;
}

}  // namespace tresor::agent
