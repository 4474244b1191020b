// tresor inspect: the header of a sealed file, for people (text) or scripts (--json). It prints
// no secrets, and labels what it cannot authenticate without a key.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>

#include "options.h"

namespace tresor::cli {

int cmd_inspect(int argc, char** argv) {
  po::options_description opts("Options");
  std::string in;
  opts.add_options()("json", "print JSON")("input", po::value(&in)->required(), "sealed file, or - for stdin");
  po::positional_options_description pos;
  pos.add("input", 1);
  po::variables_map vm;
  if (auto stop = parse_options("inspect", "[--json] IN", argc, argv, opts, pos, vm)) return *stop;

  auto input = Input::open(in);
  if (!input) return report(input.error());
  Bytes fixed(sealed::kFixedHeaderSize);
  auto n = read_full(*input->file, fixed);
  if (!n) return report(n.error());
  fixed.resize(*n);
  auto len = sealed::header_length(fixed);
  if (!len) return report({len.error().code, in + ": " + len.error().message});
  Bytes all(*len);
  std::copy(fixed.begin(), fixed.end(), all.begin());
  auto m = read_full(*input->file, MutableByteSpan(all).subspan(fixed.size()));
  if (!m) return report(m.error());
  if (fixed.size() + *m < *len) return report({ErrorCode::kTruncated, in + ": sealed header truncated"});
  auto h = sealed::parse_header(all);
  if (!h) return report({h.error().code, in + ": " + h.error().message});

  nlohmann::json j;
  j["format"] = "tresor-sealed";
  j["version"] = h->version;
  j["header_bytes"] = *len;
  j["chunk_size"] = h->chunk_size;
  j["nonce_prefix"] = to_hex(h->nonce_prefix);
  j["stanzas"] = nlohmann::json::array();
  for (const auto& s : h->stanzas) {
    nlohmann::json st;
    if (const auto* x = std::get_if<sealed::X25519Stanza>(&s)) {
      st["type"] = "x25519";
      st["ephemeral"] = to_hex(x->ephemeral);
    } else if (const auto* d = std::get_if<sealed::DatasetStanza>(&s)) {
      st["type"] = "dataset";
      st["dataset"] = d->dataset_id;
    } else {
      const auto& u = std::get<sealed::UnknownStanza>(s);
      st["type"] = "unknown";
      st["type_id"] = u.type;
      st["bytes"] = u.body.size();
    }
    j["stanzas"].push_back(st);
  }
  if (input->size) {
    const uint64_t body = *input->size - *len;
    const uint64_t fs = uint64_t{h->chunk_size} + sealed::kTagSize;
    const uint64_t chunks = body / fs + (body % fs ? 1 : 0);
    j["file_bytes"] = *input->size;
    j["chunks"] = chunks;
    const uint64_t rem = body % fs;
    if (chunks > 0 && (rem == 0 || rem >= sealed::kTagSize)) {
      j["plaintext_bytes"] = (chunks - 1) * h->chunk_size + ((rem ? rem : fs) - sealed::kTagSize);
    }
  }
  j["authenticated"] = false;

  if (vm.count("json")) {
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  std::cout << "format:        Tresor sealed stream, version " << int(h->version) << "\n"
            << "header:        " << *len << " bytes\n"
            << "chunk size:    " << h->chunk_size << " bytes (" << format_size(h->chunk_size) << ")\n"
            << "nonce prefix:  " << to_hex(h->nonce_prefix) << "\n";
  if (j.contains("file_bytes")) {
    std::cout << "file size:     " << j["file_bytes"].get<uint64_t>() << " bytes\n"
              << "chunks:        " << j["chunks"].get<uint64_t>() << "\n";
    if (j.contains("plaintext_bytes")) {
      std::cout << "plaintext:     " << j["plaintext_bytes"].get<uint64_t>() << " bytes ("
                << format_size(j["plaintext_bytes"].get<uint64_t>()) << ")\n";
    }
  }
  std::cout << "sealed to:\n";
  for (const auto& st : j["stanzas"]) {
    const std::string type = st["type"];
    if (type == "x25519") std::cout << "  user recipient (X25519, ephemeral " << st["ephemeral"].get<std::string>().substr(0, 16) << "...)\n";
    if (type == "dataset") std::cout << "  dataset key '" << st["dataset"].get<std::string>() << "'\n";
    if (type == "unknown") std::cout << "  stanza of unknown type " << st["type_id"].get<int>() << " (skipped by this version)\n";
  }
  std::cout << "note:          not authenticated; 'tresor open' verifies the header MAC and every chunk\n";
  return kExitOk;
}

}  // namespace tresor::cli
