// 100 MiB through every path (integration label: a few seconds on two cores).
#include <gtest/gtest.h>

#include "support/test_support.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

TEST(SealedLarge, HundredMiBRoundTripOnAllPaths) {
  const Bytes plain = testing::pattern_bytes(100u << 20, 100);
  auto id = Identity::generate();
  ASSERT_TRUE(id);
  sealed::SealOptions o;
  o.recipients.push_back(id->recipient());
  o.threads = 0;  // all cores
  auto s = sealed::seal_buffer(plain, o);
  ASSERT_TRUE(s) << s.error().message;
  sealed::KeyRing ring;
  ring.identities.push_back(&*id);

  const auto want = crypto::sha256(plain);
  ASSERT_TRUE(want);
  for (unsigned threads : {1u, 0u}) {
    MemorySource src(*s);
    MemorySink sink;
    sealed::OpenOptions oo;
    oo.threads = threads;
    auto n = sealed::open_stream(src, sink, ring, oo);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_EQ(*n, plain.size());
    EXPECT_EQ(*crypto::sha256(sink.bytes), *want);
  }
  auto opened = sealed::open_buffer(*s, ring, {});
  ASSERT_TRUE(opened);
  EXPECT_EQ(*crypto::sha256(opened->span()), *want);

  // The single-threaded writer produces a stream the parallel reader accepts, and vice versa.
  o.threads = 1;
  auto s1 = sealed::seal_buffer(plain, o);
  ASSERT_TRUE(s1);
  EXPECT_EQ(s1->size(), s->size());
  MemorySource src(*s1);
  MemorySink sink;
  sealed::OpenOptions oo;
  oo.threads = 0;
  ASSERT_TRUE(sealed::open_stream(src, sink, ring, oo));
  EXPECT_EQ(*crypto::sha256(sink.bytes), *want);

  // One flipped bit deep inside is still found, and named.
  Bytes bad = *s;
  const size_t off = bad.size() / 2;
  bad[off] ^= std::byte{0x04};
  const size_t chunk = (off - sealed::parse_header(*s)->size()) / (sealed::kDefaultChunkSize + sealed::kTagSize);
  auto r = sealed::open_buffer(bad, ring, {});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kChunkAuth);
  EXPECT_NE(r.error().message.find("chunk " + std::to_string(chunk) + " "), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace tresor
