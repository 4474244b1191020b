// The SPANK plugin's decisions as pure functions (include/tresor/slurm/job.h).
#include "tresor/slurm/job.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <cstdio>
#include <set>
#include <sstream>

#include "tresor/kbs/jose.h"
#include "tresor/vm/domain.h"

namespace tresor::slurm {
namespace {

using json = nlohmann::json;

std::unexpected<Error> bad(std::string message) { return fail(ErrorCode::kInvalidArgument, std::move(message)); }

std::vector<std::string> split(std::string_view s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(sep, start);
    out.emplace_back(s.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  return out;
}

}  // namespace

Result<PluginConfig> parse_plugin_args(const std::vector<std::string>& args) {
  PluginConfig c;
  std::set<std::string> seen;
  for (const auto& a : args) {
    const size_t eq = a.find('=');
    if (eq == std::string::npos || eq == 0) {
      return bad("plugstack.conf argument '" + a + "' is not KEY=VALUE (runner, agent, broker, ca, backends, images, datasets, sim, gpus, hypervisor, accel, snp, boot_timeout, step_bridge)");
    }
    const std::string key = a.substr(0, eq), value = a.substr(eq + 1);
    if (!seen.insert(key).second) return bad("plugstack.conf argument " + key + "= is given twice");
    if (key == "runner" || key == "ca" || key == "images" || key == "agent" || key == "datasets" || key == "sim" || key == "gpus") {
      if (value.empty() || value[0] != '/') return bad("plugstack.conf argument " + key + "= must be an absolute path, not '" + value + "'");
      std::string& field = key == "runner" ? c.runner : key == "ca" ? c.broker_ca : key == "images" ? c.images
                           : key == "agent" ? c.agent : key == "datasets" ? c.datasets : key == "sim" ? c.sim : c.gpus;
      field = value;
    } else if (key == "broker") {
      if (!value.starts_with("https://")) return bad("plugstack.conf argument broker= must be an https:// URL, not '" + value + "'");
      c.broker_url = value;
    } else if (key == "backends") {
      c.backends.clear();
      for (auto& b : split(value, ',')) {
        if (b != "local" && b != "libvirt") return bad("plugstack.conf argument backends= names '" + b + "'; the backends are local and libvirt");
        if (std::ranges::find(c.backends, b) == c.backends.end()) c.backends.push_back(b);
      }
      if (c.backends.empty()) return bad("plugstack.conf argument backends= is empty");
    } else if (key == "hypervisor") {
      if (value.find(":///") == std::string::npos && value.find("://") == std::string::npos) {
        return bad("plugstack.conf argument hypervisor= must be a libvirt URI such as qemu:///system, not '" + value + "'");
      }
      c.hypervisor = value;
    } else if (key == "accel") {
      if (value != "kvm" && value != "tcg") return bad("plugstack.conf argument accel= must be kvm or tcg, not '" + value + "'");
      c.accel = value;
    } else if (key == "boot_timeout") {
      char* end = nullptr;
      errno = 0;
      const unsigned long v = std::strtoul(value.c_str(), &end, 10);
      if (value.empty() || value[0] == '-' || errno != 0 || *end != '\0' || v < 10 || v > 3600) {
        return bad("plugstack.conf argument boot_timeout= must be whole seconds from 10 to 3600, not '" + value + "'");
      }
      c.boot_timeout_s = static_cast<unsigned>(v);
    } else if (key == "step_bridge") {
      // An interface name; the runner checks that it is a bridge on the node.
      if (!vm::valid_interface_name(value)) return bad("plugstack.conf argument step_bridge= must be a bridge's interface name (1..15 of A-Z a-z 0-9 _ . -), not '" + value + "'");
      c.step_bridge = value;
    } else if (key == "snp") {
      if (value != "yes" && value != "no") return bad("plugstack.conf argument snp= must be yes or no, not '" + value + "'");
      c.snp = value == "yes";
    } else {
      return bad("plugstack.conf argument " + key + "= is unknown (runner, agent, broker, ca, backends, images, datasets, sim, gpus, hypervisor, accel, snp, boot_timeout, step_bridge)");
    }
  }
  if (c.broker_url.empty() != c.broker_ca.empty()) return bad("plugstack.conf arguments broker= and ca= go together");
  return c;
}

Result<ImageCatalogue> parse_image_catalogue(std::string_view text) {
  auto parsed = kbs::parse_strict_json(text, "image catalogue");
  if (!parsed) return std::unexpected(parsed.error());
  const json& j = *parsed;
  if (!j.is_object() || !j.contains("images") || !j["images"].is_object()) {
    return bad("image catalogue must be {\"images\": {\"NAME\": {\"measurement\": \"<96 hex>\"}}, \"default\": \"NAME\"}");
  }
  for (const auto& [k, v] : j.items()) {
    if (k != "images" && k != "default") return bad("image catalogue: unknown member \"" + k + "\"");
  }
  ImageCatalogue c;
  for (const auto& [name, v] : j["images"].items()) {
    if (auto ok = validate_dataset_id(name); !ok) return bad("image catalogue: image name '" + name + "': " + ok.error().message);
    if (!v.is_object() || !v.contains("measurement") || !v["measurement"].is_string()) {
      return bad("image catalogue: image '" + name + "' needs \"measurement\": \"<96 hex digits>\"");
    }
    static const std::set<std::string> kMembers = {"measurement", "description", "kernel", "initrd", "cmdline", "firmware", "vcpus"};
    for (const auto& [k, member] : v.items()) {
      if (!kMembers.contains(k)) return bad("image catalogue: image '" + name + "': unknown member \"" + k + "\"");
      if (k == "vcpus") {
        if (!member.is_number_unsigned() || member.get<unsigned>() == 0 || member.get<unsigned>() > 512) {
          return bad("image catalogue: vcpus of '" + name + "' must be a number from 1 to 512");
        }
        continue;
      }
      if (k != "measurement" && !member.is_string()) return bad("image catalogue: " + k + " of '" + name + "' must be a string");
      if ((k == "kernel" || k == "initrd" || k == "firmware") && !member.get<std::string>().starts_with("/")) {
        return bad("image catalogue: " + k + " of '" + name + "' must be an absolute path, not '" + member.get<std::string>() + "'");
      }
    }
    auto m = from_hex(v["measurement"].get<std::string>(), "image catalogue: measurement of '" + name + "'");
    if (!m) return std::unexpected(m.error());
    if (m->size() != 48) return bad("image catalogue: measurement of '" + name + "' must be 96 hex digits (48 bytes)");
    Image img;
    img.name = name;
    std::copy(m->begin(), m->end(), img.measurement.begin());
    if (v.contains("description")) {
      if (!v["description"].is_string()) return bad("image catalogue: description of '" + name + "' must be a string");
      img.description = v["description"].get<std::string>();
    }
    auto member = [&](const char* k) { return v.contains(k) ? v[k].get<std::string>() : std::string(); };
    img.kernel = member("kernel");
    img.initrd = member("initrd");
    img.cmdline = member("cmdline");
    img.firmware = member("firmware");
    if (v.contains("vcpus")) img.vcpus = v["vcpus"].get<unsigned>();
    c.images[name] = std::move(img);
  }
  if (j.contains("default")) {
    if (!j["default"].is_string() || !c.images.contains(j["default"].get<std::string>())) {
      return bad("image catalogue: \"default\" must name one of its images");
    }
    c.default_image = j["default"].get<std::string>();
  }
  return c;
}

Result<std::vector<Recipient>> parse_recipient_values(const std::vector<std::string>& values) {
  std::vector<Recipient> out;
  for (const auto& v : values) {
    for (auto& line : split(v, '\n')) {
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
      const size_t start = line.find_first_not_of(" \t");
      if (start == std::string::npos || line[start] == '#') continue;
      auto r = Recipient::parse(line.substr(start));
      if (!r) return bad("--tresor-recipient: " + r.error().message + " (give a recipient string from 'tresor pubkey', or @FILE)");
      out.push_back(*r);
    }
  }
  return out;
}

Result<JobRequest> check_options(const JobOptions& o, const PluginConfig& config, const ImageCatalogue& images, const std::string& cwd) {
  JobRequest r;
  if (o.datasets.empty()) {
    return bad("--tresor-dataset is required for a confidential job: name the dataset(s) whose keys the job needs, "
               "e.g. --tresor-dataset=dhz/ccta-2024");
  }
  for (const auto& d : split(o.datasets, ',')) {
    if (auto ok = validate_dataset_id(d); !ok) {
      return bad("--tresor-dataset: " + ok.error().message + "; dataset ids look like dhz/ccta-2024, several separated by commas");
    }
    if (std::ranges::find(r.datasets, d) == r.datasets.end()) r.datasets.push_back(d);
  }
  const std::string image = o.image.empty() ? images.default_image : o.image;
  if (image.empty()) {
    return bad("--tresor-image is required: this cluster's catalogue names no default image (ask the administrators which "
               "images data owners have approved)");
  }
  auto it = images.images.find(image);
  if (it == images.images.end()) {
    std::string known;
    for (const auto& [name, _] : images.images) known += (known.empty() ? "" : ", ") + name;
    return bad("--tresor-image: '" + image + "' is not in this cluster's image catalogue (" + (known.empty() ? "empty" : known) + ")");
  }
  r.image = it->second;
  r.backend = o.backend.empty() ? config.backends.front() : o.backend;
  if (std::ranges::find(config.backends, r.backend) == config.backends.end()) {
    std::string allowed;
    for (const auto& b : config.backends) allowed += (allowed.empty() ? "" : ", ") + b;
    return bad("--tresor-backend: '" + r.backend + "' is not allowed on this cluster (allowed: " + allowed + ")");
  }
  std::filesystem::path out = o.output.empty() ? std::filesystem::path(cwd) / "tresor-output" : std::filesystem::path(o.output);
  if (out.is_relative()) out = std::filesystem::path(cwd) / out;
  r.output = out.lexically_normal().string();
  auto rc = parse_recipient_values(o.recipients);
  if (!rc) return std::unexpected(rc.error());
  r.recipients = std::move(*rc);
  return r;
}

Result<Manifest> build_manifest(const JobRequest& request, const Identity& user, ByteSpan script, std::time_t now, std::time_t lifetime,
                                crypto::RandomSource& rng) {
  if (lifetime <= 0) return bad("manifest lifetime must be positive");
  std::array<std::byte, 8> id{};
  TRESOR_TRY(rng.fill(id));
  Manifest m;
  m.job_id = "t-" + to_hex(id);
  m.user = user.recipient();
  m.datasets = request.datasets;
  m.image_measurement = request.image.measurement;
  auto digest = crypto::sha256(script);
  if (!digest) return std::unexpected(digest.error());
  m.script_sha256 = *digest;
  m.output_recipients = request.recipients.empty() ? std::vector<Recipient>{user.recipient()} : request.recipients;
  m.expires_at = static_cast<int64_t>(now + lifetime);
  TRESOR_TRY(sign_manifest(m, user));
  return m;
}

std::optional<size_t> find_operand(const std::vector<std::string>& argv, bool batch) {
  // Short options that take a value (sbatch(1), srun(1), Slurm 22.05). -W is sbatch's --wait (no
  // value) but srun's --wait=SECONDS; -r is srun's --relative.
  static const std::set<char> kBatchShortWithValue = {'A', 'a', 'B', 'b', 'C', 'c', 'D', 'd', 'e', 'F', 'G', 'i', 'J', 'L',
                                                      'M', 'm', 'N', 'n', 'o', 'p', 'q', 'S', 't', 'w', 'x'};
  static const std::set<char> kStepShortWithValue = {'A', 'B', 'C', 'c', 'D', 'd', 'e', 'G', 'i', 'J', 'L', 'M', 'm',
                                                     'N', 'n', 'o', 'p', 'q', 'r', 'S', 'T', 't', 'W', 'w', 'x'};
  const std::set<char>& kShortWithValue = batch ? kBatchShortWithValue : kStepShortWithValue;
  // Long options without a value; any other long option written without '=' takes the next word.
  static const std::set<std::string> kLongFlags = {
      "--contiguous", "--exclusive", "--hold", "--help", "--ignore-pmi", "--kill-on-bad-exit", "--label", "--no-kill",
      "--no-requeue", "--overcommit", "--oversubscribe", "--parsable", "--pty", "--quiet", "--quit-on-interrupt", "--requeue",
      "--spread-job", "--test-only", "--unbuffered", "--usage", "--use-min-nodes", "--verbose", "--wait", "--x11", "--disable-status",
      "--preserve-env", "--multi-prog", "--exact", "--overlap", "--whole", "--ignore-pmi",
      "--reboot", "--nice", "--immediate", "--propagate", "--get-user-env", "--no-allocate", "--jobid-only", "--sockets-per-node-only"};
  for (size_t i = 1; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a == "--") return i + 1 < argv.size() ? std::optional<size_t>(i + 1) : std::nullopt;
    if (a.size() < 2 || a[0] != '-') return i;
    if (a[1] == '-') {
      if (a.find('=') == std::string::npos && !kLongFlags.contains(a)) ++i;
      continue;
    }
    // A cluster of short options: -vN 2 or -o out: the first one that takes a value takes the
    // rest of the word, or the next word when the rest is empty.
    for (size_t k = 1; k < a.size(); ++k) {
      if (kShortWithValue.contains(a[k])) {
        if (k + 1 == a.size()) ++i;
        break;
      }
    }
  }
  return std::nullopt;
}

Result<std::map<unsigned, std::string>> parse_gpu_table(std::string_view text) {
  std::map<unsigned, std::string> table;
  size_t line_no = 0;
  for (auto& line : split(text, '\n')) {
    ++line_no;
    if (auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
    std::istringstream in(line);
    std::string index, pci, extra;
    if (!(in >> index)) continue;  // blank or comment
    const std::string where = "GPU table line " + std::to_string(line_no);
    if (!(in >> pci) || (in >> extra)) return bad(where + ": want \"INDEX PCI-ADDRESS\"");
    if (index.empty() || index.size() > 4 || index.find_first_not_of("0123456789") != std::string::npos) {
      return bad(where + ": GPU index '" + index + "' is not a number");
    }
    unsigned d, b, sl, fn;
    char tail;
    if (pci.size() != 12 || std::sscanf(pci.c_str(), "%4x:%2x:%2x.%1x%c", &d, &b, &sl, &fn, &tail) != 4 || pci[4] != ':' || pci[7] != ':' ||
        pci[10] != '.' || sl > 0x1f || fn > 7) {
      return bad(where + ": '" + pci + "' is not a PCI address DDDD:BB:SS.F");
    }
    if (!table.emplace(static_cast<unsigned>(std::stoul(index)), pci).second) return bad(where + ": GPU " + index + " is listed twice");
  }
  return table;
}

Result<std::vector<std::string>> job_gpus(std::string_view slurm_job_gpus, std::string_view cuda_visible_devices,
                                          const std::map<unsigned, std::string>& table) {
  const std::string_view list = !slurm_job_gpus.empty() ? slurm_job_gpus : cuda_visible_devices;
  std::vector<std::string> out;
  if (list.empty()) return out;
  for (const auto& item : split(list, ',')) {
    if (item.empty() || item.size() > 4 || item.find_first_not_of("0123456789") != std::string::npos) {
      return bad("the job's GPU list '" + std::string(list) + "' has '" + item + "', not a GPU index");
    }
    auto it = table.find(static_cast<unsigned>(std::stoul(item)));
    if (it == table.end()) return bad("GPU " + item + " of this job is not in the node's GPU table (plugstack.conf gpus=)");
    if (std::ranges::find(out, it->second) == out.end()) out.push_back(it->second);
  }
  return out;
}

Bytes command_line_bytes(const std::vector<std::string>& args) {
  Bytes out;
  for (const auto& a : args) {
    const auto b = as_bytes(a);
    out.insert(out.end(), b.begin(), b.end());
    out.push_back(std::byte{0});
  }
  return out;
}

Result<void> check_command(const Manifest& manifest, const std::vector<std::string>& command) {
  if (command.empty()) return fail(ErrorCode::kInvalidArgument, "no command to run");
  std::string script_digest = "(not a readable file)";
  if (std::ifstream in(command[0], std::ios::binary); in) {
    std::ostringstream text;
    text << in.rdbuf();
    auto d = crypto::sha256(as_bytes(text.str()));
    if (!d) return std::unexpected(d.error());
    if (crypto::ct_equal(*d, manifest.script_sha256)) return {};
    script_digest = to_hex(*d);
  }
  auto line = crypto::sha256(command_line_bytes(command));
  if (!line) return std::unexpected(line.error());
  if (crypto::ct_equal(*line, manifest.script_sha256)) return {};
  return fail(ErrorCode::kAuth, "the command to run is not the one the job's manifest was signed for (manifest script SHA-256 " +
                                    to_hex(manifest.script_sha256) + "; this script " + script_digest + ", this command line " +
                                    to_hex(*line) + ")");
}

Result<std::string> encode_manifest_env(const Manifest& m) {
  auto text = manifest_json(m, true);
  if (!text) return std::unexpected(text.error());
  return base64url_encode(as_bytes(*text));
}

Result<Manifest> decode_manifest_env(std::string_view value) {
  auto raw = base64url_decode(value, std::string(kManifestEnv));
  if (!raw) return std::unexpected(raw.error());
  return parse_manifest(std::string_view(reinterpret_cast<const char*>(raw->data()), raw->size()));
}

std::string task_prolog_from_slurm_conf(std::string_view conf) {
  std::string found;
  for (auto line : split(std::string(conf), '\n')) {
    if (const size_t hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    const size_t start = line.find_first_not_of(" \t");
    if (start == std::string::npos) continue;
    line = line.substr(start);
    const size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    std::string key = line.substr(0, eq);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    std::ranges::transform(key, key.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    if (key != "taskprolog") continue;
    std::string value = line.substr(eq + 1);
    const size_t v0 = value.find_first_not_of(" \t");
    value = v0 == std::string::npos ? "" : value.substr(v0);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t' || value.back() == '\r')) value.pop_back();
    found = value;  // the last one wins, as for any slurm.conf key
  }
  return found;
}

std::string apply_task_prolog_output(std::string_view output, std::map<std::string, std::string>& env) {
  std::string printed;
  for (const auto& line : split(std::string(output), '\n')) {
    if (line.starts_with("export ")) {
      const std::string rest = line.substr(7);
      const size_t eq = rest.find('=');
      if (eq == std::string::npos || eq == 0) continue;
      env[rest.substr(0, eq)] = rest.substr(eq + 1);
    } else if (line.starts_with("unset ")) {
      env.erase(line.substr(6));
    } else if (line.starts_with("print ")) {
      printed += line.substr(6) + "\n";
    }
  }
  return printed;
}

}  // namespace tresor::slurm
