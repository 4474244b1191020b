// tresor roster keygen | pubkey | make | show: link keys and step rosters, for data-parallel
// training across machines (docs/training.md §5.3, format in docs/formats.md "Step roster").
#include <cstdio>
#include <iostream>

#include <nlohmann/json.hpp>

#include "options.h"
#include "tresor/train/collective.h"

namespace tresor::cli {
namespace {

Result<std::string> public_text(const crypto::Key& k) {
  auto pub = link_public_key(k);
  if (!pub) return std::unexpected(pub.error());
  return base64url_encode(*pub);
}

int roster_keygen(int argc, char** argv) {
  po::options_description opts("Options");
  std::string out;
  opts.add_options()("output,o", po::value(&out)->required(), "write the new link key to this file (0600); refuses to overwrite");
  po::positional_options_description pos;
  pos.add("output", 1);
  po::variables_map vm;
  if (auto stop = parse_options("roster keygen", "KEY_FILE", argc, argv, opts, pos, vm)) return *stop;
  if (out == "-") return usage_error("roster keygen", "secret keys are written to a file, not to stdout");
  auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
  if (!k) return report(k.error());
  auto text = train::link_key_text(*k);
  if (!text) return report(text.error());
  auto f = AtomicOutputFile::create(out, 0600, /*overwrite=*/false);
  if (!f) return report(f.error());
  auto w = f->write(as_bytes(*text));
  secure_wipe(MutableByteSpan(reinterpret_cast<std::byte*>(text->data()), text->size()));
  if (!w) return report(w.error());
  if (auto c = f->commit(); !c) return report(c.error());
  auto pub = public_text(*k);
  if (!pub) return report(pub.error());
  std::cout << *pub << "\n";  // the public key: what the roster lists
  return kExitOk;
}

int roster_pubkey(int argc, char** argv) {
  po::options_description opts("Options");
  std::string path;
  opts.add_options()("key", po::value(&path)->required(), "link key file");
  po::positional_options_description pos;
  pos.add("key", 1);
  po::variables_map vm;
  if (auto stop = parse_options("roster pubkey", "KEY_FILE", argc, argv, opts, pos, vm)) return *stop;
  auto k = load_link_key(path);
  if (!k) return report(k.error());
  auto pub = public_text(*k);
  if (!pub) return report(pub.error());
  std::cout << *pub << "\n";
  return kExitOk;
}

int roster_make(int argc, char** argv) {
  po::options_description opts("Options");
  std::string step, lead, out = "-";
  std::vector<std::string> keys;
  opts.add_options()
      ("step", po::value(&step)->required(), "the step the ranks belong to, JOB.STEP (the ranks' --run-id)")
      ("lead", po::value(&lead)->required(), "where rank 0 listens: IPv4 address and port, as 10.8.0.1:29400")
      ("output,o", po::value(&out)->default_value("-"), "write the roster here (default: stdout)")
      ("key", po::value(&keys)->composing(), "the link public keys of ranks 0, 1, … in order");
  po::positional_options_description pos;
  pos.add("key", -1);
  po::variables_map vm;
  // A base64url key may start with '-' (1 in 64): before "--" it would be read as an option.
  for (int i = 1; i < argc; ++i) {
    const std::string_view a(argv[i]);
    if (a == "--") break;
    if (a.size() == 43 && a[0] == '-' && a.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") == std::string_view::npos) {
      return usage_error("roster make", "'" + std::string(a) + "' looks like a link public key starting with '-': put the keys after --, as roster make --step S --lead A:P -- KEY0 KEY1");
    }
  }
  if (auto stop = parse_options("roster make", "--step JOB.STEP --lead ADDRESS:PORT [--] PUBKEY_OF_RANK_0 PUBKEY_OF_RANK_1 ...", argc, argv, opts, pos, vm)) return *stop;
  if (keys.empty()) return usage_error("roster make", "no link public keys given (one per rank, rank 0 first)");
  std::vector<std::array<std::byte, 32>> pubs;
  for (size_t i = 0; i < keys.size(); ++i) {
    auto raw = base64url_decode(keys[i], "rank " + std::to_string(i) + "'s link public key");
    if (!raw) return report(raw.error());
    if (raw->size() != 32) return report(Error{ErrorCode::kInvalidArgument, "rank " + std::to_string(i) + "'s link public key is " + std::to_string(raw->size()) + " bytes, want 32"});
    std::copy(raw->begin(), raw->end(), pubs.emplace_back().begin());
  }
  const std::string text = train::roster_text(step, lead, pubs);
  if (auto parsed = train::parse_roster(text); !parsed) return report(parsed.error());  // the same checks as its readers'
  // A roster is public (keys and an address): a new file is 0644; "-" is stdout.
  auto o = Output::create(out, 0644, /*overwrite=*/true, /*binary=*/false);
  if (!o) return report(o.error());
  if (auto w = o->sink().write(as_bytes(text)); !w) return report(w.error());
  if (auto c = o->commit(); !c) return report(c.error());
  return kExitOk;
}

int roster_show(int argc, char** argv) {
  po::options_description opts("Options");
  std::string path;
  opts.add_options()("roster", po::value(&path)->required(), "step roster file")("json", "print JSON");
  po::positional_options_description pos;
  pos.add("roster", 1);
  po::variables_map vm;
  if (auto stop = parse_options("roster show", "ROSTER_FILE [--json]", argc, argv, opts, pos, vm)) return *stop;
  auto text = read_small_file(path);
  if (!text) return report(text.error());
  auto r = train::parse_roster(*text);
  if (!r) return report(Error{r.error().code, path + ": " + r.error().message});
  if (vm.count("json")) {
    nlohmann::json ranks = nlohmann::json::array();
    for (const auto& k : r->keys) ranks.push_back(base64url_encode(k));
    const nlohmann::json j = {{"step", r->step}, {"lead", r->lead_host + ":" + std::to_string(r->lead_port)}, {"sha256", to_hex(r->digest)}, {"ranks", ranks}};
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << "step    " << r->step << "\nlead    " << r->lead_host << ":" << r->lead_port << "\nsha256  " << to_hex(r->digest) << "\nranks   " << r->keys.size() << "\n";
  for (size_t i = 0; i < r->keys.size(); ++i) std::cout << "  " << i << "  " << base64url_encode(r->keys[i]) << "\n";
  return kExitOk;
}

}  // namespace

int cmd_roster(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::printf("Usage: tresor roster keygen KEY_FILE\n"
                "       tresor roster pubkey KEY_FILE\n"
                "       tresor roster make --step JOB.STEP --lead ADDRESS:PORT [-o FILE] [--] PUBKEY...\n"
                "       tresor roster show ROSTER_FILE [--json]\n\n"
                "Link keys and step rosters for training across machines: `tresor train --roster F --link-key K`\n"
                "joins ranks over TLS 1.3 links in which every rank proves the key the roster lists for it.\n"
                "A roster is only as good as its source: list only keys whose holders you checked.\n");
    return argc < 2 ? kExitUsage : kExitOk;
  }
  const std::string sub = argv[1];
  if (sub == "keygen") return roster_keygen(argc - 1, argv + 1);
  if (sub == "pubkey") return roster_pubkey(argc - 1, argv + 1);
  if (sub == "make") return roster_make(argc - 1, argv + 1);
  if (sub == "show") return roster_show(argc - 1, argv + 1);
  return usage_error("roster", "unknown subcommand '" + sub + "' (keygen, pubkey, make, show)");
}

}  // namespace tresor::cli
