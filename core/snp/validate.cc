// Attestation policy: parsing (JSON, strict) and validation of verified SNP claims. Every check
// cites the report field it reads (SNP ABI spec 56860, Table 23 / Table 9).
#include "tresor/encoding.h"
#include "tresor/snp/validate.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <set>

#include "tresor/crypto.h"

namespace tresor::snp {
namespace {

using json = nlohmann::json;

std::unexpected<Error> bad(const std::string& key, const std::string& what) {
  return fail(ErrorCode::kInvalidArgument, "policy key \"" + key + "\": " + what);
}

template <size_t N>
Result<std::array<std::byte, N>> hex_field(const json& v, const std::string& key) {
  if (!v.is_string()) return bad(key, "must be a string of " + std::to_string(2 * N) + " hex digits");
  const std::string s = v.get<std::string>();
  if (s.size() != 2 * N) {
    return bad(key, "is " + std::to_string(s.size()) + " hex digits, want " + std::to_string(2 * N));
  }
  auto b = from_hex(s, "policy key \"" + key + "\"");
  if (!b) return std::unexpected(b.error());
  std::array<std::byte, N> out;
  std::memcpy(out.data(), b->data(), N);
  return out;
}

template <size_t N>
Result<std::vector<std::array<std::byte, N>>> hex_list(const json& v, const std::string& key) {
  if (!v.is_array()) return bad(key, "must be a list");
  std::vector<std::array<std::byte, N>> out;
  for (size_t i = 0; i < v.size(); ++i) {
    auto h = hex_field<N>(v[i], key + "[" + std::to_string(i) + "]");
    if (!h) return std::unexpected(h.error());
    out.push_back(*h);
  }
  return out;
}

Result<uint8_t> byte_field(const json& obj, const std::string& parent, const char* name, bool required) {
  const std::string key = parent + "." + name;
  if (!obj.contains(name)) {
    if (required) return bad(key, "is required");
    return uint8_t{0};
  }
  const json& v = obj.at(name);
  if (!v.is_number_unsigned() || v.get<uint64_t>() > 255) return bad(key, "must be an integer 0..255");
  return static_cast<uint8_t>(v.get<uint64_t>());
}

Result<void> only_keys(const json& obj, const std::string& where, std::initializer_list<const char*> allowed) {
  for (const auto& [k, v] : obj.items()) {
    if (std::none_of(allowed.begin(), allowed.end(), [&](const char* a) { return k == a; })) {
      return bad(where.empty() ? k : where + "." + k, "is not a known policy key");
    }
  }
  return {};
}

Result<bool> bool_field(const json& obj, const char* key) {
  if (!obj.contains(key)) return false;
  if (!obj.at(key).is_boolean()) return bad(key, "must be true or false");
  return obj.at(key).get<bool>();
}

std::string version_text(int major, int minor) { return std::to_string(major) + "." + std::to_string(minor); }

}  // namespace

Result<Policy> parse_policy(std::string_view text) {
  json j;
  TRESOR_TRY(json_text_without_nul(text, "policy"));
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return fail(ErrorCode::kInvalidArgument, std::string("policy is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return fail(ErrorCode::kInvalidArgument, "policy must be a JSON object");
  TRESOR_TRY(only_keys(j, "", {"measurements", "min_tcb", "min_firmware", "min_guest_abi", "allow_smt", "allow_migrate_ma",
                               "require_single_socket", "vmpls", "signing_keys", "products", "family_ids", "image_ids",
                               "host_data", "report_data"}));
  Policy p;
  if (!j.contains("measurements")) return bad("measurements", "is required (the allowed launch measurements)");
  auto m = hex_list<48>(j["measurements"], "measurements");
  if (!m) return std::unexpected(m.error());
  if (m->empty()) return bad("measurements", "must list at least one measurement");
  p.measurements = std::move(*m);

  if (!j.contains("min_tcb") || !j["min_tcb"].is_object()) return bad("min_tcb", "is required (an object)");
  const json& t = j["min_tcb"];
  TRESOR_TRY(only_keys(t, "min_tcb", {"bootloader", "tee", "snp", "microcode", "fmc"}));
  const std::pair<uint8_t*, const char*> comps[] = {{&p.min_tcb.bootloader, "bootloader"}, {&p.min_tcb.tee, "tee"},
                                                    {&p.min_tcb.snp, "snp"}, {&p.min_tcb.microcode, "microcode"}};
  for (const auto& [dst, name] : comps) {
    auto v = byte_field(t, "min_tcb", name, true);
    if (!v) return std::unexpected(v.error());
    *dst = *v;
  }
  auto fmc = byte_field(t, "min_tcb", "fmc", false);
  if (!fmc) return std::unexpected(fmc.error());
  p.min_tcb.fmc = *fmc;

  for (const auto& [key, major, minor] : {std::tuple{"min_firmware", &p.min_firmware_major, &p.min_firmware_minor},
                                          std::tuple{"min_guest_abi", &p.min_guest_abi_major, &p.min_guest_abi_minor}}) {
    if (!j.contains(key)) continue;
    if (!j[key].is_object()) return bad(key, "must be an object {\"major\":n, \"minor\":n}");
    TRESOR_TRY(only_keys(j[key], key, {"major", "minor"}));
    auto a = byte_field(j[key], key, "major", true);
    if (!a) return std::unexpected(a.error());
    auto b = byte_field(j[key], key, "minor", true);
    if (!b) return std::unexpected(b.error());
    *major = *a;
    *minor = *b;
  }
  auto smt = bool_field(j, "allow_smt");
  auto ma = bool_field(j, "allow_migrate_ma");
  auto ss = bool_field(j, "require_single_socket");
  if (!smt) return std::unexpected(smt.error());
  if (!ma) return std::unexpected(ma.error());
  if (!ss) return std::unexpected(ss.error());
  p.allow_smt = *smt;
  p.allow_migrate_ma = *ma;
  p.require_single_socket = *ss;

  if (j.contains("vmpls")) {
    if (!j["vmpls"].is_array() || j["vmpls"].empty()) return bad("vmpls", "must be a non-empty list of integers 0..3");
    p.vmpls.clear();
    for (const auto& v : j["vmpls"]) {
      if (!v.is_number_unsigned() || v.get<uint64_t>() > 3) return bad("vmpls", "must be a non-empty list of integers 0..3");
      p.vmpls.push_back(static_cast<uint32_t>(v.get<uint64_t>()));
    }
  }
  if (j.contains("signing_keys")) {
    if (!j["signing_keys"].is_array() || j["signing_keys"].empty()) return bad("signing_keys", "must list \"vcek\" and/or \"vlek\"");
    p.allow_vcek = p.allow_vlek = false;
    for (const auto& v : j["signing_keys"]) {
      const std::string s = v.is_string() ? v.get<std::string>() : "";
      if (s == "vcek") {
        p.allow_vcek = true;
      } else if (s == "vlek") {
        p.allow_vlek = true;
      } else {
        return bad("signing_keys", "entries must be \"vcek\" or \"vlek\"");
      }
    }
  }
  if (j.contains("products")) {
    if (!j["products"].is_array() || j["products"].empty()) return bad("products", "must list Milan, Genoa, Turin and/or Sim");
    p.products.clear();
    for (const auto& v : j["products"]) {
      auto prod = product_from_name(v.is_string() ? v.get<std::string>() : "");
      if (!prod) return bad("products", "entries must be \"Milan\", \"Genoa\", \"Turin\" or \"Sim\" (the test platform)");
      p.products.push_back(*prod);
    }
  }
  if (j.contains("family_ids")) {
    auto f = hex_list<16>(j["family_ids"], "family_ids");
    if (!f) return std::unexpected(f.error());
    p.family_ids = std::move(*f);
  }
  if (j.contains("image_ids")) {
    auto f = hex_list<16>(j["image_ids"], "image_ids");
    if (!f) return std::unexpected(f.error());
    p.image_ids = std::move(*f);
  }
  if (j.contains("host_data")) {
    auto h = hex_field<32>(j["host_data"], "host_data");
    if (!h) return std::unexpected(h.error());
    p.host_data = *h;
  }
  if (j.contains("report_data")) {
    auto h = hex_field<64>(j["report_data"], "report_data");
    if (!h) return std::unexpected(h.error());
    p.report_data = *h;
  }
  return p;
}

std::vector<std::string> failed_checks(const VerifiedReport& c, const Policy& p, const Expectations& expect) {
  const Report& r = c.report;
  std::vector<std::string> failed;
  auto check = [&](bool ok, std::string what) {
    if (!ok) failed.push_back(std::move(what));
  };

  // MEASUREMENT (0x090) must be one the data owner approved.
  check(std::any_of(p.measurements.begin(), p.measurements.end(),
                    [&](const auto& m) { return crypto::ct_equal(m, r.measurement); }),
        "MEASUREMENT is " + to_hex(r.measurement) + ", not one of the " + std::to_string(p.measurements.size()) +
            " allowed");
  // REPORTED_TCB (0x180), component by component (Table 3).
  const Tcb& t = c.reported_tcb;
  const std::tuple<const char*, uint8_t, uint8_t> comps[] = {{"bootloader", t.bootloader, p.min_tcb.bootloader},
                                                             {"tee", t.tee, p.min_tcb.tee},
                                                             {"snp", t.snp, p.min_tcb.snp},
                                                             {"microcode", t.microcode, p.min_tcb.microcode},
                                                             {"fmc", t.fmc, c.layout == TcbLayout::kTurin ? p.min_tcb.fmc : uint8_t{0}}};
  for (const auto& [name, have, want] : comps) {
    check(have >= want, std::string("REPORTED_TCB.") + name + " is " + std::to_string(have) + ", want at least " +
                            std::to_string(want));
  }
  // GUEST_POLICY (0x008, Table 9).
  auto gp = decode_policy(r.policy);
  if (!gp) {
    failed.push_back(gp.error().message);
  } else {
    check(!gp->debug, "GUEST_POLICY.DEBUG is 1, want 0 (a debuggable guest's memory is readable by the host)");
    check(p.allow_smt || !gp->smt, "GUEST_POLICY.SMT is 1, want 0 (the policy does not allow SMT)");
    check(p.allow_migrate_ma || !gp->migrate_ma, "GUEST_POLICY.MIGRATE_MA is 1, want 0 (no migration agent allowed)");
    check(!p.require_single_socket || gp->single_socket, "GUEST_POLICY.SINGLE_SOCKET is 0, want 1");
    check(std::pair(gp->abi_major, gp->abi_minor) >= std::pair(p.min_guest_abi_major, p.min_guest_abi_minor),
          "GUEST_POLICY ABI is " + version_text(gp->abi_major, gp->abi_minor) + ", want at least " +
              version_text(p.min_guest_abi_major, p.min_guest_abi_minor));
  }
  // CURRENT_MAJOR/CURRENT_MINOR (0x1EA/0x1E9): the firmware's SNP ABI version.
  check(std::pair(r.current_major, r.current_minor) >= std::pair(p.min_firmware_major, p.min_firmware_minor),
        "firmware version (CURRENT_MAJOR.CURRENT_MINOR) is " + version_text(r.current_major, r.current_minor) +
            ", want at least " + version_text(p.min_firmware_major, p.min_firmware_minor));
  // VMPL (0x030).
  check(std::find(p.vmpls.begin(), p.vmpls.end(), r.vmpl) != p.vmpls.end(),
        "VMPL is " + std::to_string(r.vmpl) + ", not an allowed level");
  // SIGNING_KEY (0x048) and the product of the chain.
  check(c.vlek ? p.allow_vlek : p.allow_vcek,
        std::string("signing key is ") + (c.vlek ? "a VLEK" : "a VCEK") + ", which the policy does not allow");
  check(std::find(p.products.begin(), p.products.end(), c.product) != p.products.end(),
        "product is " + std::string(product_name(c.product)) + ", which the policy does not allow");
  // FAMILY_ID (0x010) and IMAGE_ID (0x020).
  auto one_of = [](const auto& list, const auto& v) {
    return list.empty() || std::any_of(list.begin(), list.end(), [&](const auto& x) { return x == v; });
  };
  check(one_of(p.family_ids, r.family_id), "FAMILY_ID is " + to_hex(r.family_id) + ", not an allowed family");
  check(one_of(p.image_ids, r.image_id), "IMAGE_ID is " + to_hex(r.image_id) + ", not an allowed image");
  // HOST_DATA (0x0C0) and REPORT_DATA (0x050): the caller's binding wins over the policy's.
  if (const auto want = expect.host_data ? expect.host_data : p.host_data) {
    check(crypto::ct_equal(*want, r.host_data), "HOST_DATA is " + to_hex(r.host_data) + ", want " + to_hex(*want));
  }
  if (const auto want = expect.report_data ? expect.report_data : p.report_data) {
    check(crypto::ct_equal(*want, r.report_data), "REPORT_DATA is " + to_hex(r.report_data) + ", want " + to_hex(*want));
  }
  return failed;
}

Result<void> validate(const VerifiedReport& c, const Policy* policy, const Expectations& expect) {
  if (policy == nullptr) return fail(ErrorCode::kPolicy, "no attestation policy: denied");
  const std::vector<std::string> failed = failed_checks(c, *policy, expect);
  if (failed.empty()) return {};
  std::string msg = "attestation policy denies the report (" + std::to_string(failed.size()) + " check" +
                    (failed.size() == 1 ? "" : "s") + " failed):";
  for (const auto& f : failed) msg += "\n  - " + f;
  return fail(ErrorCode::kPolicy, msg);
}

}  // namespace tresor::snp
