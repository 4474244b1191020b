// tresor keygen / pubkey.
#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include <cstdio>
#include <iostream>

#include "options.h"

namespace tresor::cli {

int cmd_keygen(int argc, char** argv) {
  po::options_description opts("Options");
  std::string out;
  std::string dataset;
  opts.add_options()("output,o", po::value(&out)->required(), "write the new identity (or dataset key) to this file; refuses to overwrite")(
      "dataset", po::value(&dataset), "create a dataset key for dataset ID instead of a user identity");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("keygen", "-o IDENTITY_FILE | --dataset ID -o KEY_FILE", argc, argv, opts, pos, vm)) return *stop;
  if (out == "-") return usage_error("keygen", "secret keys are written to a file, not to stdout");
  // `tresor keygen -o ~/.config/tresor/identity` on a fresh account: make the missing
  // directories, private to the user.
  if (const auto slash = out.rfind('/'); slash != std::string::npos && slash > 0) {
    if (auto d = make_private_dirs(out.substr(0, slash)); !d) return report(d.error());
  }

  std::string text;
  std::string announce;
  if (vm.count("dataset")) {
    auto k = DatasetKey::generate(dataset);
    if (!k) return report(k.error());
    text = k->to_file_text();
    announce = "tresor: dataset key for '" + dataset + "' written to " + out + "\n";
  } else {
    auto id = Identity::generate();
    if (!id) return report(id.error());
    text = id->to_file_text();
    announce = id->recipient().to_string() + "\n";
  }
  auto f = AtomicOutputFile::create(out, 0600, /*overwrite=*/false);
  if (!f) return report(f.error());
  auto w = f->write(as_bytes(text));
  secure_wipe(MutableByteSpan(reinterpret_cast<std::byte*>(text.data()), text.size()));
  if (!w) return report(w.error());
  if (auto c = f->commit(); !c) return report(c.error());
  if (vm.count("dataset")) {
    std::fputs(announce.c_str(), stderr);
  } else {
    std::fputs(announce.c_str(), stdout);  // the recipient: public, meant to be shared
  }
  return kExitOk;
}

int cmd_pubkey(int argc, char** argv) {
  po::options_description opts("Options");
  std::string path;
  opts.add_options()("identity", po::value(&path)->required(), "identity file");
  po::positional_options_description pos;
  pos.add("identity", 1);
  po::variables_map vm;
  if (auto stop = parse_options("pubkey", "IDENTITY_FILE", argc, argv, opts, pos, vm)) return *stop;
  auto id = load_identity(path);
  if (!id) return report(id.error());
  std::cout << id->recipient().to_string() << "\n";
  return kExitOk;
}

}  // namespace tresor::cli
