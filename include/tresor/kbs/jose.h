// tresor/kbs/jose.h — the JSON pieces of the KBS protocol (DESIGN.md, "Attestation and key
// release"): RFC 8785 canonical JSON (JCS), JSON Web Keys (RFC 7517/7518 §6) and JSON Web
// Encryption in the flattened JSON serialization (RFC 7516 §7.2.2) with the key management the
// protocol uses: ECDH-ES+A256KW on P-256 (RFC 7518 §4.6, Concat KDF of NIST SP 800-56A, AES Key
// Wrap of RFC 3394) or RSA-OAEP-256 (RFC 7518 §4.3), and content encryption A256GCM (§5.3).
// Pure apart from the CSPRNG; every primitive is OpenSSL's.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::kbs {

/// RFC 8785: object members sorted by the UTF-16 code units of their names, no whitespace,
/// strings with the minimal escapes, numbers in ECMAScript's shortest round-trip form.
/// kInvalidArgument for NaN or infinity (not JSON).
[[nodiscard]] Result<std::string> canonical_json(const nlohmann::json& value);

/// Parses JSON that will be signed, hashed or canonicalized, more strictly than RFC 8259 asks:
/// a member name repeated within one object (RFC 8259 §4 leaves its meaning open; parsers differ
/// on which value wins), numbers beyond ±2^53, integers or not (not exact in RFC 8785's
/// ECMAScript numbers; refusing the floats too keeps canonical JSON a fixed point), and a raw NUL
/// byte anywhere (json_text_without_nul: nlohmann::json would stop reading there) are errors.
/// kInvalidArgument names the problem and prefixes `what`.
[[nodiscard]] Result<nlohmann::json> parse_strict_json(std::string_view text, std::string_view what);

/// A JSON Web Key for the TEE's ephemeral key: EC P-256 ("kty":"EC","crv":"P-256",x,y[,d]) or
/// RSA ("kty":"RSA",n,e). Converting checks the point is on the curve.
[[nodiscard]] Result<crypto::Key> key_from_jwk(const nlohmann::json& jwk);
/// The public JWK of `key` (P-256 or RSA), with "alg" when given.
[[nodiscard]] Result<nlohmann::json> public_jwk(const crypto::Key& key, std::string_view alg = {});
/// An RSA key pair for RSA-OAEP-256 (crypto::Key covers EC; RSA keys are only for JWE).
[[nodiscard]] Result<crypto::Key> generate_rsa(unsigned bits);

enum class KeyWrap { kEcdhEsA256kw, kRsaOaep256 };

/// Encrypts `plaintext` to `recipient` (public JWK) as a flattened JSON JWE with enc A256GCM.
/// The protected header is {"alg":…,"enc":"A256GCM"[,"epk":{…}]} in canonical member order.
[[nodiscard]] Result<nlohmann::json> jwe_encrypt(ByteSpan plaintext, const nlohmann::json& recipient, KeyWrap wrap,
                                                 crypto::RandomSource& rng = crypto::system_random());
/// The same, to a recipient key already imported (and checked) with key_from_jwk().
[[nodiscard]] Result<nlohmann::json> jwe_encrypt(ByteSpan plaintext, const crypto::Key& recipient, KeyWrap wrap,
                                                 crypto::RandomSource& rng = crypto::system_random());
/// Decrypts a flattened JWE with the recipient's private key. kAuth when the key unwrap or the
/// tag fails; kInvalidArgument names a malformed member.
[[nodiscard]] Result<SecretBuffer> jwe_decrypt(const nlohmann::json& jwe, const crypto::Key& recipient_private);

/// The KBS binding of the TEE's key and the broker's nonce into SNP REPORT_DATA (64 bytes):
/// SHA-384 of the canonical JSON of {"additional-evidence": additional_evidence, "nonce": nonce,
/// "tee-pubkey": tee_pubkey} followed by 16 zero bytes (DESIGN.md; KBS protocol 0.4.0).
[[nodiscard]] Result<std::array<std::byte, 64>> runtime_data_binding(std::string_view nonce, const nlohmann::json& tee_pubkey,
                                                                    std::string_view additional_evidence = "");

/// Concat KDF (NIST SP 800-56A §5.8.1, as RFC 7518 §4.6.2 uses it) with SHA-256: `bits` of
/// keying material from the shared secret Z for algorithm `alg_id` with empty PartyU/VInfo.
[[nodiscard]] Result<SecretBuffer> concat_kdf(ByteSpan z, std::string_view alg_id, ByteSpan apu, ByteSpan apv, size_t bits);

}  // namespace tresor::kbs
