// tresor/secret.h — SecretBuffer, an owned byte buffer for key material that wipes itself.
#pragma once

#include <cstddef>
#include <memory>
#include <span>

#include "tresor/encoding.h"

namespace tresor {

/// SecretBuffer owns `size()` bytes of key material. The bytes are wiped with OPENSSL_cleanse on
/// destruction, on move-from and on reset(). It cannot be copied implicitly (clone() makes the copy
/// explicit) and it never prints. Allocation failure throws std::bad_alloc like any container.
class SecretBuffer {
 public:
  SecretBuffer() = default;
  explicit SecretBuffer(size_t size);
  /// Copies `bytes` into a new secret buffer.
  static SecretBuffer copy_of(ByteSpan bytes);

  SecretBuffer(SecretBuffer&& other) noexcept;
  SecretBuffer& operator=(SecretBuffer&& other) noexcept;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;
  ~SecretBuffer();

  SecretBuffer clone() const { return copy_of(span()); }
  /// Wipes and frees the bytes; size() becomes 0.
  void reset();

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  MutableByteSpan span() { return {data_.get(), size_}; }
  ByteSpan span() const { return {data_.get(), size_}; }

 private:
  std::unique_ptr<std::byte[]> data_;
  size_t size_ = 0;
};

/// Wipes `bytes` in a way the compiler cannot elide (OPENSSL_cleanse).
void secure_wipe(MutableByteSpan bytes);

}  // namespace tresor
