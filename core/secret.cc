#include "tresor/secret.h"

#include <openssl/crypto.h>

#include <cstring>
#include <utility>

namespace tresor {

void secure_wipe(MutableByteSpan bytes) {
  if (!bytes.empty()) OPENSSL_cleanse(bytes.data(), bytes.size());
}

SecretBuffer::SecretBuffer(size_t size)
    : data_(size ? std::make_unique<std::byte[]>(size) : nullptr), size_(size) {}

SecretBuffer SecretBuffer::copy_of(ByteSpan bytes) {
  SecretBuffer s(bytes.size());
  if (!bytes.empty()) std::memcpy(s.data(), bytes.data(), bytes.size());
  return s;
}

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept
    : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

SecretBuffer::~SecretBuffer() { reset(); }

void SecretBuffer::reset() {
  secure_wipe(span());
  data_.reset();
  size_ = 0;
}

}  // namespace tresor
