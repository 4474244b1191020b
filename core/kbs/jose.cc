// RFC 8785 JCS, JWK and flattened JWE for the KBS protocol (see tresor/kbs/jose.h).
#include "tresor/kbs/jose.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <set>
#include <cstring>

namespace tresor::kbs {
namespace {

using json = nlohmann::json;

std::unexpected<Error> bad(const std::string& what) { return fail(ErrorCode::kInvalidArgument, what); }
std::unexpected<Error> ossl(const std::string& what) {
  return fail(ErrorCode::kCrypto, what + ": " + crypto::openssl_error_string());
}

// ---- RFC 8785 ------------------------------------------------------------------------------------

// RFC 8785 §3.2.2.2 works on Unicode strings (RFC 8259 §8.1: UTF-8). Byte sequences that are not
// well-formed UTF-8 (RFC 3629 §4: no overlongs, no surrogates, nothing above U+10FFFF) are not
// strings and have no canonical form.
bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1, cp = c & 0x1Fu;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2, cp = c & 0x0Fu;
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3, cp = c & 0x07u;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;  // truncated sequence
    for (size_t k = 1; k <= n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// §3.2.2.3: strings keep every character as UTF-8 except '"', '\\' and the controls below 0x20,
// which use the short escapes where JSON has one and \u00xx (lower-case hex) otherwise.
void put_string(std::string& out, const std::string& s) {
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          static constexpr char kHex[] = "0123456789abcdef";
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

// §3.2.2.3: numbers as ECMAScript Number.prototype.toString — the shortest digits that round
// trip, in plain notation for exponents in [-6, 21), else d.ddde±n.
Result<std::string> put_number(double v) {
  if (!std::isfinite(v)) return bad("canonical JSON: NaN and infinity are not JSON numbers");
  if (v == 0) return std::string("0");  // also -0
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  if (ec != std::errc()) return bad("canonical JSON: number formatting failed");
  std::string sci(buf, end);  // [-]d[.ddd]e[+-]xx
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t epos = sci.find('e');
  std::string digits = sci.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int e = std::stoi(sci.substr(epos + 1));
  const int k = static_cast<int>(digits.size());
  const int n = e + 1;  // value = 0.digits × 10^n
  std::string out;
  if (k <= n && n <= 21) {
    out = digits + std::string(static_cast<size_t>(n - k), '0');
  } else if (0 < n && n <= 21) {
    out = digits.substr(0, static_cast<size_t>(n)) + "." + digits.substr(static_cast<size_t>(n));
  } else if (-6 < n && n <= 0) {
    out = "0." + std::string(static_cast<size_t>(-n), '0') + digits;
  } else {
    out = digits.substr(0, 1);
    if (k > 1) out += "." + digits.substr(1);
    out += "e";
    out += (n - 1 >= 0) ? "+" : "-";
    out += std::to_string(std::abs(n - 1));
  }
  return sign + out;
}

// §3.2.3: member names sorted by their UTF-16 code units.
std::u16string utf16(const std::string& s) {
  std::u16string out;
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    uint32_t cp = c;
    size_t len = 1;
    if (c >= 0xF0 && i + 3 < s.size()) {
      cp = ((c & 0x07u) << 18) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 12) |
           ((static_cast<unsigned char>(s[i + 2]) & 0x3Fu) << 6) | (static_cast<unsigned char>(s[i + 3]) & 0x3Fu);
      len = 4;
    } else if (c >= 0xE0 && i + 2 < s.size()) {
      cp = ((c & 0x0Fu) << 12) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 6) |
           (static_cast<unsigned char>(s[i + 2]) & 0x3Fu);
      len = 3;
    } else if (c >= 0xC0 && i + 1 < s.size()) {
      cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3Fu);
      len = 2;
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(static_cast<char16_t>(0xD800 + (cp >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + (cp & 0x3FF)));
    } else {
      out.push_back(static_cast<char16_t>(cp));
    }
    i += len;
  }
  return out;
}

Result<void> put_value(std::string& out, const json& v) {
  switch (v.type()) {
    case json::value_t::null: out += "null"; return {};
    case json::value_t::boolean: out += v.get<bool>() ? "true" : "false"; return {};
    case json::value_t::string:
      if (!valid_utf8(v.get_ref<const std::string&>())) return bad("canonical JSON: a string is not valid UTF-8");
      put_string(out, v.get_ref<const std::string&>());
      return {};
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: {
      auto n = put_number(v.get<double>());
      if (!n) return std::unexpected(n.error());
      out += *n;
      return {};
    }
    case json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& e : v) {
        if (!first) out += ',';
        first = false;
        TRESOR_TRY(put_value(out, e));
      }
      out += ']';
      return {};
    }
    case json::value_t::object: {
      std::vector<std::string> names;
      for (const auto& [k, _] : v.items()) {
        if (!valid_utf8(k)) return bad("canonical JSON: a member name is not valid UTF-8");
        names.push_back(k);
      }
      std::vector<std::pair<std::u16string, const std::string*>> keys;
      for (const auto& k : names) keys.emplace_back(utf16(k), nullptr);
      for (size_t i = 0; i < names.size(); ++i) keys[i].second = &names[i];
      std::sort(keys.begin(), keys.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      bool first = true;
      for (const auto& [_, name] : keys) {
        if (!first) out += ',';
        first = false;
        put_string(out, *name);
        out += ':';
        TRESOR_TRY(put_value(out, v.at(*name)));
      }
      out += '}';
      return {};
    }
    default: return bad("canonical JSON: unsupported value (binary or discarded)");
  }
}

// ---- JWK -----------------------------------------------------------------------------------------

Result<Bytes> b64_member(const json& j, const char* name, const std::string& where) {
  if (!j.contains(name) || !j[name].is_string()) return bad(where + " lacks the string member \"" + name + "\"");
  return base64url_decode(j[name].get<std::string>(), where + "." + name);
}

Result<Bytes> bn_param(EVP_PKEY* k, const char* name, size_t pad) {
  BIGNUM* bn = nullptr;
  if (EVP_PKEY_get_bn_param(k, name, &bn) != 1) return ossl(std::string("key parameter ") + name);
  const size_t len = std::max<size_t>(pad, static_cast<size_t>(BN_num_bytes(bn)));
  Bytes out(len);
  BN_bn2binpad(bn, reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(len));
  BN_free(bn);
  return out;
}

// ---- JWE -----------------------------------------------------------------------------------------

Result<Bytes> aes_kw(ByteSpan kek, ByteSpan in, bool wrap) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  if (ctx == nullptr) return ossl("EVP_CIPHER_CTX_new");
  EVP_CIPHER_CTX_set_flags(ctx, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
  Bytes out(in.size() + 16);
  int len = 0, fin = 0;
  const auto* k = reinterpret_cast<const unsigned char*>(kek.data());
  bool ok = (wrap ? EVP_EncryptInit_ex(ctx, EVP_aes_256_wrap(), nullptr, k, nullptr)
                  : EVP_DecryptInit_ex(ctx, EVP_aes_256_wrap(), nullptr, k, nullptr)) == 1;
  ok = ok && (wrap ? EVP_EncryptUpdate(ctx, reinterpret_cast<unsigned char*>(out.data()), &len,
                                       reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()))
                   : EVP_DecryptUpdate(ctx, reinterpret_cast<unsigned char*>(out.data()), &len,
                                       reinterpret_cast<const unsigned char*>(in.data()), static_cast<int>(in.size()))) == 1;
  ok = ok && (wrap ? EVP_EncryptFinal_ex(ctx, reinterpret_cast<unsigned char*>(out.data()) + len, &fin)
                   : EVP_DecryptFinal_ex(ctx, reinterpret_cast<unsigned char*>(out.data()) + len, &fin)) == 1;
  EVP_CIPHER_CTX_free(ctx);
  if (!ok) {
    ERR_clear_error();
    secure_wipe(out);
    return wrap ? ossl("AES key wrap") : fail(ErrorCode::kAuth, "JWE: the content key does not unwrap (RFC 3394 integrity check)");
  }
  out.resize(static_cast<size_t>(len + fin));
  return out;
}

Result<Bytes> rsa_oaep(const crypto::Key& key, ByteSpan in, bool encrypt) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr);
  size_t len = 0;
  bool ok = ctx != nullptr && (encrypt ? EVP_PKEY_encrypt_init(ctx) : EVP_PKEY_decrypt_init(ctx)) == 1 &&
            EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
            EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) == 1 && EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1;
  const auto* src = reinterpret_cast<const unsigned char*>(in.data());
  ok = ok && (encrypt ? EVP_PKEY_encrypt(ctx, nullptr, &len, src, in.size()) : EVP_PKEY_decrypt(ctx, nullptr, &len, src, in.size())) == 1;
  Bytes out(ok ? len : 0);
  ok = ok && (encrypt ? EVP_PKEY_encrypt(ctx, reinterpret_cast<unsigned char*>(out.data()), &len, src, in.size())
                      : EVP_PKEY_decrypt(ctx, reinterpret_cast<unsigned char*>(out.data()), &len, src, in.size())) == 1;
  EVP_PKEY_CTX_free(ctx);
  if (!ok) {
    ERR_clear_error();
    return encrypt ? ossl("RSA-OAEP-256") : fail(ErrorCode::kAuth, "JWE: the content key does not decrypt (RSA-OAEP-256)");
  }
  out.resize(len);
  return out;
}

Result<SecretBuffer> ecdh_kek(const crypto::Key& own, const crypto::Key& peer) {
  auto z = crypto::derive_shared(own, peer);
  if (!z) return std::unexpected(z.error());
  return concat_kdf(z->span(), "ECDH-ES+A256KW", {}, {}, 256);
}

}  // namespace

Result<std::string> canonical_json(const json& value) {
  std::string out;
  TRESOR_TRY(put_value(out, value));
  return out;
}

Result<std::array<std::byte, 64>> runtime_data_binding(std::string_view nonce, const json& tee_pubkey,
                                                      std::string_view additional_evidence) {
  if (!tee_pubkey.is_object()) return bad("tee-pubkey must be a JWK object");
  const json runtime = {{"additional-evidence", std::string(additional_evidence)}, {"nonce", std::string(nonce)},
                        {"tee-pubkey", tee_pubkey}};
  auto text = canonical_json(runtime);
  if (!text) return std::unexpected(text.error());
  auto h = crypto::sha384(as_bytes(*text));
  if (!h) return std::unexpected(h.error());
  std::array<std::byte, 64> out{};
  std::memcpy(out.data(), h->data(), h->size());
  return out;
}

Result<SecretBuffer> concat_kdf(ByteSpan z, std::string_view alg_id, ByteSpan apu, ByteSpan apv, size_t bits) {
  // RFC 7518 §4.6.2: OtherInfo = AlgorithmID ‖ PartyUInfo ‖ PartyVInfo ‖ SuppPubInfo, each of the
  // first three as a 32-bit big-endian length and the data; SuppPubInfo = keydatalen in bits.
  Bytes other;
  auto put32 = [&](uint32_t v) {
    for (int i = 3; i >= 0; --i) other.push_back(std::byte((v >> (8 * i)) & 0xff));
  };
  auto put = [&](ByteSpan d) {
    put32(static_cast<uint32_t>(d.size()));
    other.insert(other.end(), d.begin(), d.end());
  };
  put(as_bytes(alg_id));
  put(apu);
  put(apv);
  put32(static_cast<uint32_t>(bits));
  SecretBuffer out(bits / 8);
  size_t done = 0;
  for (uint32_t counter = 1; done < out.size(); ++counter) {
    Bytes round;
    for (int i = 3; i >= 0; --i) round.push_back(std::byte((counter >> (8 * i)) & 0xff));
    round.insert(round.end(), z.begin(), z.end());
    round.insert(round.end(), other.begin(), other.end());
    auto h = crypto::sha256(round);
    secure_wipe(round);
    if (!h) return std::unexpected(h.error());
    const size_t n = std::min(h->size(), out.size() - done);
    std::memcpy(out.data() + done, h->data(), n);
    done += n;
  }
  return out;
}

namespace {

// Numbers beyond ±2^53, written as integers or not, are refused. RFC 8785 §3.2.2.3 canonicalizes
// every number as an IEEE 754 double: an integer beyond 2^53 may not survive (2^53 + 1 becomes
// 2^53), and a double in [2^53, 10^21) prints as ECMAScript's shortest digits without an
// exponent, an integer literal that is not the double's value (2^62 prints 4611686018427388000).
// I-JSON (RFC 7493 §2.2) keeps integers within ±(2^53 − 1) for this reason; Tresor's documents
// hold nothing larger (times, counts, versions). Refusing the floats too keeps canonical JSON a
// fixed point of parse and canonicalize: fuzz.kbs_json found 9999999999999999999.99… accepted,
// canonicalized to 10000000000000000000, and that refused on the way back.
constexpr double kMaxExact = 9007199254740992.0;  // 2^53
bool beyond_exact(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() > (uint64_t{1} << 53);
  if (v.is_number_integer()) return v.get<int64_t>() > (int64_t{1} << 53) || v.get<int64_t>() < -(int64_t{1} << 53);
  return v.is_number_float() && std::fabs(v.get<double>()) > kMaxExact;
}

}  // namespace

Result<json> parse_strict_json(std::string_view text, std::string_view what) {
  TRESOR_TRY(json_text_without_nul(text, what));
  std::vector<std::set<std::string>> names;  // one set per object being parsed
  std::string problem;
  const json::parser_callback_t check = [&](int, json::parse_event_t event, json& parsed) {
    if (!problem.empty()) return true;
    switch (event) {
      case json::parse_event_t::object_start: names.emplace_back(); break;
      case json::parse_event_t::object_end: if (!names.empty()) names.pop_back(); break;
      case json::parse_event_t::key:
        if (!names.empty() && !names.back().insert(parsed.get<std::string>()).second) {
          problem = "member \"" + parsed.get<std::string>() + "\" appears twice in one object";
        }
        break;
      case json::parse_event_t::value:
        if (beyond_exact(parsed)) {
          problem = std::string(parsed.is_number_float() ? "number " : "integer ") + parsed.dump() +
                    " is beyond ±2^53 and has no exact canonical form (RFC 8785 §3.2.2.3, RFC 7493 §2.2)";
        }
        break;
      default: break;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), check);
  } catch (const json::exception& e) {
    return bad(std::string(what) + " is not valid JSON: " + e.what());
  }
  if (!problem.empty()) return bad(std::string(what) + ": " + problem);
  return j;
}

// A member's string value, or "" when it is absent or not a string: callers compare the result
// against the one value they accept, so a wrong type is refused with that member's message
// instead of escaping as a JSON type exception (input from the guest reaches these parsers).
static std::string string_or_empty(const json& obj, const char* name) {
  const auto it = obj.find(name);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

Result<crypto::Key> key_from_jwk(const json& jwk) {
  if (!jwk.is_object() || !jwk.contains("kty") || !jwk["kty"].is_string()) return bad("JWK must be an object with \"kty\"");
  const std::string kty = jwk["kty"];
  if (kty == "EC") {
    if (string_or_empty(jwk, "crv") != "P-256") return bad("JWK \"crv\" must be \"P-256\"");
    auto x = b64_member(jwk, "x", "JWK");
    auto y = b64_member(jwk, "y", "JWK");
    if (!x) return std::unexpected(x.error());
    if (!y) return std::unexpected(y.error());
    if (x->size() != 32 || y->size() != 32) return bad("JWK P-256 coordinates must be 32 bytes each");
    if (jwk.contains("d")) {
      auto d = b64_member(jwk, "d", "JWK");
      if (!d) return std::unexpected(d.error());
      auto k = crypto::Key::from_private(crypto::KeyType::kP256, *d);
      secure_wipe(*d);
      if (!k) return std::unexpected(k.error());
      auto pub = k->public_raw();
      if (!pub || std::memcmp(pub->data() + 1, x->data(), 32) != 0 || std::memcmp(pub->data() + 33, y->data(), 32) != 0) {
        return bad("JWK private key \"d\" does not match \"x\" and \"y\"");
      }
      return k;
    }
    Bytes point{std::byte{0x04}};
    point.insert(point.end(), x->begin(), x->end());
    point.insert(point.end(), y->begin(), y->end());
    return crypto::Key::from_public(crypto::KeyType::kP256, point);
  }
  if (kty == "RSA") {
    auto n = b64_member(jwk, "n", "JWK");
    auto e = b64_member(jwk, "e", "JWK");
    if (!n) return std::unexpected(n.error());
    if (!e) return std::unexpected(e.error());
    if (n->size() < 256) return bad("JWK RSA modulus must be at least 2048 bits");
    BIGNUM* bn_n = BN_bin2bn(reinterpret_cast<const unsigned char*>(n->data()), static_cast<int>(n->size()), nullptr);
    BIGNUM* bn_e = BN_bin2bn(reinterpret_cast<const unsigned char*>(e->data()), static_cast<int>(e->size()), nullptr);
    OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e);
    OSSL_PARAM* params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr);
    EVP_PKEY* pkey = nullptr;
    const bool ok = ctx != nullptr && EVP_PKEY_fromdata_init(ctx) == 1 &&
                    EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1;
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn_n);
    BN_free(bn_e);
    if (!ok) return ossl("JWK RSA key");
    return crypto::Key::adopt(crypto::KeyType::kRsa, pkey, false);
  }
  return bad("JWK \"kty\" \"" + kty + "\" is not supported (EC P-256 or RSA)");
}

Result<json> public_jwk(const crypto::Key& key, std::string_view alg) {
  json j;
  if (key.type() == crypto::KeyType::kP256) {
    auto pub = key.public_raw();
    if (!pub) return std::unexpected(pub.error());
    j = {{"kty", "EC"}, {"crv", "P-256"}, {"x", base64url_encode(ByteSpan(*pub).subspan(1, 32))},
         {"y", base64url_encode(ByteSpan(*pub).subspan(33, 32))}};
  } else if (key.type() == crypto::KeyType::kRsa) {
    auto n = bn_param(key.get(), OSSL_PKEY_PARAM_RSA_N, 0);
    auto e = bn_param(key.get(), OSSL_PKEY_PARAM_RSA_E, 0);
    if (!n) return std::unexpected(n.error());
    if (!e) return std::unexpected(e.error());
    j = {{"kty", "RSA"}, {"n", base64url_encode(*n)}, {"e", base64url_encode(*e)}};
  } else {
    return bad("a JWK here is P-256 or RSA, not " + std::string(crypto::key_type_name(key.type())));
  }
  if (!alg.empty()) j["alg"] = std::string(alg);
  return j;
}

Result<crypto::Key> generate_rsa(unsigned bits) {
  EVP_PKEY* p = EVP_RSA_gen(bits);
  if (p == nullptr) return ossl("RSA key generation");
  return crypto::Key::adopt(crypto::KeyType::kRsa, p, true);
}

Result<json> jwe_encrypt(ByteSpan plaintext, const json& recipient, KeyWrap wrap, crypto::RandomSource& rng) {
  auto peer = key_from_jwk(recipient);
  if (!peer) return std::unexpected(peer.error());
  return jwe_encrypt(plaintext, *peer, wrap, rng);
}

Result<json> jwe_encrypt(ByteSpan plaintext, const crypto::Key& recipient_key, KeyWrap wrap, crypto::RandomSource& rng) {
  const crypto::Key* peer = &recipient_key;
  SecretBuffer cek(32);
  TRESOR_TRY(rng.fill(cek.span()));
  json header;
  Bytes encrypted_key;
  if (wrap == KeyWrap::kEcdhEsA256kw) {
    if (peer->type() != crypto::KeyType::kP256) return bad("ECDH-ES+A256KW needs an EC P-256 recipient key");
    SecretBuffer eph_d(32);
    Result<crypto::Key> eph = fail(ErrorCode::kCrypto, "");
    for (int tries = 0; tries < 8 && !eph; ++tries) {  // a random 32-byte scalar is below n almost always
      TRESOR_TRY(rng.fill(eph_d.span()));
      eph = crypto::Key::from_private(crypto::KeyType::kP256, eph_d.span());
    }
    if (!eph) return std::unexpected(eph.error());
    auto kek = ecdh_kek(*eph, *peer);
    if (!kek) return std::unexpected(kek.error());
    auto wrapped = aes_kw(kek->span(), cek.span(), true);
    if (!wrapped) return std::unexpected(wrapped.error());
    encrypted_key = std::move(*wrapped);
    auto epk = public_jwk(*eph);
    if (!epk) return std::unexpected(epk.error());
    header = {{"alg", "ECDH-ES+A256KW"}, {"enc", "A256GCM"}, {"epk", *epk}};
  } else {
    if (peer->type() != crypto::KeyType::kRsa) return bad("RSA-OAEP-256 needs an RSA recipient key");
    auto wrapped = rsa_oaep(*peer, cek.span(), true);
    if (!wrapped) return std::unexpected(wrapped.error());
    encrypted_key = std::move(*wrapped);
    header = {{"alg", "RSA-OAEP-256"}, {"enc", "A256GCM"}};
  }
  auto header_text = canonical_json(header);
  if (!header_text) return std::unexpected(header_text.error());
  const std::string protected_b64 = base64url_encode(as_bytes(*header_text));
  std::array<std::byte, 12> iv;
  TRESOR_TRY(rng.fill(iv));
  // RFC 7516 §5.1 step 14: AAD = ASCII(BASE64URL(UTF8(JWE Protected Header))).
  auto sealed = crypto::aes256gcm_seal(cek.span(), iv, as_bytes(protected_b64), plaintext);
  if (!sealed) return std::unexpected(sealed.error());
  const ByteSpan ct = ByteSpan(*sealed).first(sealed->size() - 16);
  const ByteSpan tag = ByteSpan(*sealed).subspan(sealed->size() - 16);
  return json{{"protected", protected_b64}, {"encrypted_key", base64url_encode(encrypted_key)},
              {"iv", base64url_encode(iv)}, {"ciphertext", base64url_encode(ct)}, {"tag", base64url_encode(tag)}};
}

Result<SecretBuffer> jwe_decrypt(const json& jwe, const crypto::Key& recipient) {
  if (!jwe.is_object()) return bad("JWE must be a JSON object (flattened serialization)");
  if (!jwe.contains("protected") || !jwe["protected"].is_string()) return bad("JWE lacks \"protected\"");
  const std::string protected_b64 = jwe["protected"];
  auto header_bytes = base64url_decode(protected_b64, "JWE.protected");
  if (!header_bytes) return std::unexpected(header_bytes.error());
  json header;
  try {
    header = json::parse(to_string(*header_bytes));
  } catch (const json::exception&) {
    return bad("JWE protected header is not JSON");
  }
  if (!header.is_object()) return bad("JWE protected header is not a JSON object");
  // RFC 7516 §4 / §7.2.1: the JOSE Header is the union of the protected header and the shared
  // ("unprotected") and per-recipient ("header") unprotected ones; names must not repeat.
  for (const char* member : {"unprotected", "header"}) {
    if (!jwe.contains(member)) continue;
    if (!jwe[member].is_object()) return bad(std::string("JWE \"") + member + "\" must be an object");
    for (const auto& [k, v] : jwe[member].items()) {
      if (header.contains(k)) return bad("JWE header parameter \"" + k + "\" appears twice");
      if (k == "enc" || k == "alg" || k == "zip" || k == "crit") {
        return bad("JWE \"" + k + "\" must be in the protected header");  // Tresor binds these by the AAD
      }
      header[k] = v;
    }
  }
  if (string_or_empty(header, "enc") != "A256GCM") return bad("JWE \"enc\" must be \"A256GCM\"");
  // Parameters Tresor does not implement are refused by name rather than ignored: compression
  // (RFC 7516 §4.1.3), critical extensions (§4.1.13), and the ECDH-ES PartyU/PartyV info
  // (RFC 7518 §4.6.1.2-3), which would change the derived key.
  for (const char* unsupported : {"zip", "crit", "apu", "apv"}) {
    if (header.contains(unsupported)) return bad(std::string("JWE header parameter \"") + unsupported + "\" is not supported");
  }
  if (jwe.contains("aad")) return bad("JWE \"aad\" member is not supported");
  auto ek = b64_member(jwe, "encrypted_key", "JWE");
  auto iv = b64_member(jwe, "iv", "JWE");
  auto ct = b64_member(jwe, "ciphertext", "JWE");
  auto tag = b64_member(jwe, "tag", "JWE");
  if (!ek || !iv || !ct || !tag) return std::unexpected((!ek ? ek : !iv ? iv : !ct ? ct : tag).error());
  if (iv->size() != 12 || tag->size() != 16) return bad("JWE A256GCM needs a 12-byte iv and a 16-byte tag");
  const std::string alg = string_or_empty(header, "alg");
  Result<Bytes> cek = bad("JWE \"alg\" \"" + alg + "\" is not supported (ECDH-ES+A256KW, RSA-OAEP-256)");
  if (alg == "ECDH-ES+A256KW") {
    if (recipient.type() != crypto::KeyType::kP256 || !header.contains("epk")) {
      return bad("JWE ECDH-ES+A256KW needs an \"epk\" and a P-256 private key");
    }
    auto epk = key_from_jwk(header["epk"]);
    if (!epk) return std::unexpected(epk.error());
    auto kek = ecdh_kek(recipient, *epk);
    if (!kek) return std::unexpected(kek.error());
    cek = aes_kw(kek->span(), *ek, false);
  } else if (alg == "RSA-OAEP-256") {
    if (recipient.type() != crypto::KeyType::kRsa) return bad("JWE RSA-OAEP-256 needs an RSA private key");
    cek = rsa_oaep(recipient, *ek, false);
  }
  if (!cek) return std::unexpected(cek.error());
  if (cek->size() != 32) return fail(ErrorCode::kAuth, "JWE content key is not 32 bytes");
  Bytes sealed = *ct;
  sealed.insert(sealed.end(), tag->begin(), tag->end());
  auto plain = crypto::aes256gcm_open(*cek, *iv, as_bytes(protected_b64), sealed);
  secure_wipe(*cek);
  if (!plain) return fail(plain.error().code, "JWE: " + plain.error().message);
  return plain;
}

}  // namespace tresor::kbs
