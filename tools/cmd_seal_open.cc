// tresor seal / open.
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "options.h"
#include "tresor/thread_pool.h"

namespace tresor::cli {
namespace {

unsigned current_umask() {
  const mode_t m = ::umask(0);
  ::umask(m);
  return static_cast<unsigned>(m);
}

// Counts what reaches the real sink, to tell the user whether stdout holds partial output.
class CountingSink final : public ByteSink {
 public:
  explicit CountingSink(ByteSink& inner) : inner_(inner) {}
  Result<void> write(ByteSpan data) override {
    TRESOR_TRY(inner_.write(data));
    count += data.size();
    return {};
  }
  uint64_t count = 0;

 private:
  ByteSink& inner_;
};

}  // namespace

int cmd_seal(int argc, char** argv) {
  po::options_description opts("Options");
  std::vector<std::string> recipients, key_files, datasets;
  std::string out, in, chunk = "1MiB", broker;
  unsigned threads = 0;
  opts.add_options()
      ("recipient,r", po::value(&recipients)->composing(), "seal to this recipient (tresor1...), or @FILE with one per line; repeatable")
      ("dataset-key-file", po::value(&key_files)->composing(), "also seal to this dataset key (32-byte hex key file); repeatable")
      ("dataset", po::value(&datasets)->composing(), "dataset ID of the matching --dataset-key-file (or, with --broker, of a new key)")
      ("broker", po::value(&broker), "draw a new key for --dataset, seal to it and register it with the broker at this admin socket "
                                     "(unix:PATH); the key is written nowhere else")
      ("output,o", po::value(&out)->required(), "output file, or - for stdout")
      ("chunk-size", po::value(&chunk)->default_value("1MiB"), "plaintext bytes per chunk (multiple of 16, 16 B..64 MiB)")
      ("threads,j", po::value(&threads)->default_value(0), "worker threads (0 = all cores)")
      ("force,f", "overwrite OUT if it exists")
      ("input", po::value(&in)->required(), "input file, or - for stdin");
  po::positional_options_description pos;
  pos.add("input", 1);
  po::variables_map vm;
  if (auto stop = parse_options("seal", "-r RECIPIENT [-r ...] [--dataset-key-file F --dataset ID] -o OUT IN", argc,
                                argv, opts, pos, vm)) {
    return *stop;
  }
  auto rcpts = parse_recipients(recipients);
  if (!rcpts) return report(rcpts.error());
  Result<std::vector<DatasetKey>> dkeys = std::vector<DatasetKey>{};
  if (!broker.empty()) {
    if (datasets.size() != 1 || !key_files.empty()) {
      return usage_error("seal", "--broker registers one new key: give exactly one --dataset ID and no --dataset-key-file");
    }
    if (out == "-") return usage_error("seal", "--broker needs -o FILE: the file appears only once the broker holds its key");
    auto k = DatasetKey::generate(datasets[0]);
    if (!k) return report(k.error());
    dkeys->push_back(std::move(*k));
  } else {
    dkeys = load_dataset_keys(key_files, datasets, /*ids_required=*/true);
  }
  if (!dkeys) return report(dkeys.error());
  auto cs = parse_size(chunk, "--chunk-size");
  if (!cs) return report(cs.error());
  sealed::SealOptions so;
  so.recipients = std::move(*rcpts);
  for (const auto& k : *dkeys) so.datasets.push_back(&k);
  so.chunk_size = static_cast<uint32_t>(std::min<uint64_t>(*cs, UINT32_MAX));
  so.threads = threads;
  if (auto ok = sealed::check_seal_options(so); !ok) return usage_error("seal", ok.error().message);

  auto input = Input::open(in);
  if (!input) return report(input.error());
  auto output = Output::create(out, 0666 & ~current_umask(), vm.count("force") > 0, /*binary=*/true);
  if (!output) return report(output.error());
  ProgressMeter meter(input->size, want_progress(input->size));
  if (input->size && output->file) {
    // File to file: the parallel path, each worker reading and writing its own run of chunks.
    so.progress = [&meter](uint64_t done) { meter.update(done); };
    auto n = sealed::seal_parallel(*input->file, *output->file, so);
    if (!n) return report(n.error());
  } else {
    ProgressSource progress(*input->file, meter);
    auto n = sealed::seal_stream(progress, output->sink(), so);
    if (!n) return report(n.error());
  }
  meter.finish();
  if (!broker.empty()) {
    // Sealed but not yet visible: the broker must hold the key before the file may exist.
    const auto& k = dkeys->front();
    auto reply = admin_call(broker, {{"op", "dataset.import-key"},
                                     {"dataset", k.id},
                                     {"key", base64url_encode(k.key.span())},
                                     {"create", true}});
    if (!reply) return report({reply.error().code, "the broker did not register the key, so " + out + " was not written: " +
                                                       reply.error().message});
    std::fprintf(stderr, "tresor seal: %s sealed to new key version %u of %s, held by the broker\n", out.c_str(),
                 (*reply)["version"].get<unsigned>(), k.id.c_str());
  }
  if (auto c = output->commit(); !c) return report(c.error());
  return kExitOk;
}

int cmd_open(int argc, char** argv) {
  po::options_description opts("Options");
  std::vector<std::string> identities, key_files, datasets, file_key_files;
  std::string out, in;
  unsigned threads = 0;
  opts.add_options()
      ("identity,i", po::value(&identities)->composing(), "identity file to try; repeatable")
      ("dataset-key-file", po::value(&key_files)->composing(), "dataset key file to try; repeatable")
      ("dataset", po::value(&datasets)->composing(), "dataset ID of the matching --dataset-key-file (default: any dataset in the file)")
      ("file-keys", po::value(&file_key_files)->composing(), "file keys to try (inside a job: $TRESOR_FILE_KEYS); repeatable")
      ("output,o", po::value(&out)->required(), "output file (mode 0600), or - for stdout")
      ("threads,j", po::value(&threads)->default_value(0), "worker threads (0 = all cores)")
      ("force,f", "overwrite OUT if it exists")
      ("input", po::value(&in)->required(), "sealed input file, or - for stdin");
  po::positional_options_description pos;
  pos.add("input", 1);
  po::variables_map vm;
  if (auto stop = parse_options("open", "-i IDENTITY_FILE [--dataset-key-file F [--dataset ID]] -o OUT IN", argc,
                                argv, opts, pos, vm)) {
    return *stop;
  }
  if (identities.empty() && key_files.empty() && file_key_files.empty()) {
    return usage_error("open", "give an identity (-i FILE), a dataset key (--dataset-key-file FILE) or file keys (--file-keys FILE)");
  }
  std::vector<Identity> ids;
  for (const auto& p : identities) {
    auto id = load_identity(p);
    if (!id) return report(id.error());
    ids.push_back(std::move(*id));
  }
  auto dkeys = load_dataset_keys(key_files, datasets, /*ids_required=*/false);
  if (!dkeys) return report(dkeys.error());
  sealed::KeyRing ring;
  for (const auto& id : ids) ring.identities.push_back(&id);
  for (const auto& k : *dkeys) ring.dataset_keys.push_back(&k);
  auto fkeys = load_file_keys(file_key_files);
  if (!fkeys) return report(fkeys.error());
  for (const auto& k : *fkeys) ring.file_keys.push_back(&k);

  auto input = Input::open(in);
  if (!input) return report(input.error());
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = in == "-" ? "<stdin>" : in;

  auto output = Output::create(out, 0600, vm.count("force") > 0, /*binary=*/false);
  if (!output) return report(output.error());
  ProgressMeter meter(input->size, want_progress(input->size));
  if (output->is_stdout() && input->size) {
    // stdout cannot be taken back. Open the file once, in parallel, into a nameless mode-0600
    // temporary file, and copy it out only when every chunk has verified. (Verifying first and
    // decrypting in a second pass would let someone who can rewrite the file between the passes
    // make a truncated plaintext reach stdout.)
    const char* tmpdir = std::getenv("TMPDIR");
    auto staged = AnonymousTempFile::create(tmpdir != nullptr && *tmpdir != '\0' ? tmpdir : "/tmp");
    if (!staged) return report(staged.error());
    oo.progress = [&meter](uint64_t done) { meter.update(done); };
    auto n = sealed::open_parallel(*input->file, *staged, ring, oo);
    if (!n) return report(n.error());
    meter.finish();
    if (auto c = staged->copy_to(output->sink()); !c) return report(c.error());
    return kExitOk;
  }
  if (input->size && output->file) {
    // File to file: the parallel path. On failure the temporary file is emptied and removed.
    oo.progress = [&meter](uint64_t done) { meter.update(done); };
    auto n = sealed::open_parallel(*input->file, *output->file, ring, oo);
    if (!n) return report(n.error());
  } else {
    ProgressSource progress(*input->file, meter);
    CountingSink counted(output->sink());
    auto n = sealed::open_stream(progress, counted, ring, oo);
    if (!n) {
      const int code = report(n.error());
      if (output->is_stdout() && counted.count > 0) {
        std::fputs("tresor: the plaintext already written to stdout is incomplete: discard it\n", stderr);
      }
      return code;  // an AtomicOutputFile that is not committed removes its temporary file
    }
  }
  meter.finish();
  if (auto c = output->commit(); !c) return report(c.error());
  return kExitOk;
}

}  // namespace tresor::cli
