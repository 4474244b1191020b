// Files that hold secrets or plaintext: AtomicOutputFile (appears only on commit, never replaces
// a file that appeared meanwhile), read_secret_file (regular, own, private), AnonymousTempFile.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>

#include "support/test_support.h"
#include "tresor/io.h"

namespace tresor {
namespace {

using testing::FailsWith;
using testing::read_file;
using testing::TempDir;
using testing::write_file;

TEST(AtomicOutputFile, AppearsOnlyOnCommitWithItsMode) {
  TempDir dir;
  const std::string path = dir.file("out.bin");
  {
    auto f = AtomicOutputFile::create(path, 0600, false);
    ASSERT_TRUE(f) << f.error().message;
    ASSERT_TRUE(f->write(as_bytes("hello")));
    EXPECT_FALSE(std::filesystem::exists(path));
    // On Linux with /proc the output has no name at all until commit().
    EXPECT_TRUE(f->temp_path().empty()) << "fell back to a named temporary file: " << f->temp_path();
    EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
    ASSERT_TRUE(f->commit());
  }
  EXPECT_EQ(to_string(read_file(path)), "hello");
  struct stat st{};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1) << "temporary file left behind";
}

TEST(AtomicOutputFile, DroppedWithoutCommitLeavesNothing) {
  TempDir dir;
  std::string temp;
  {
    auto f = AtomicOutputFile::create(dir.file("x"), 0600, false);
    ASSERT_TRUE(f);
    ASSERT_TRUE(f->resize(4096));
    ASSERT_TRUE(f->write_at(100, as_bytes("secret")));
    temp = f->temp_path();
  }
  if (!temp.empty()) {
    EXPECT_FALSE(std::filesystem::exists(temp));
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(AtomicOutputFile, NeverReplacesAFileThatAppearedMeanwhile) {
  TempDir dir;
  const std::string path = dir.file("race");
  auto f = AtomicOutputFile::create(path, 0600, false);
  ASSERT_TRUE(f);
  ASSERT_TRUE(f->write(as_bytes("mine")));
  write_file(path, as_bytes("theirs"), 0644);
  EXPECT_TRUE(FailsWith(f->commit(), ErrorCode::kExists));
  EXPECT_EQ(to_string(read_file(path)), "theirs");
  // With overwrite it replaces.
  auto g = AtomicOutputFile::create(path, 0600, true);
  ASSERT_TRUE(g);
  ASSERT_TRUE(g->write(as_bytes("new")));
  ASSERT_TRUE(g->commit());
  EXPECT_EQ(to_string(read_file(path)), "new");
  EXPECT_TRUE(FailsWith(AtomicOutputFile::create(path, 0600, false), ErrorCode::kExists));
}

TEST(AtomicOutputFile, KilledMidwayLeavesNothing) {
  TempDir dir;
  const std::string path = dir.file("partial.out");
  const pid_t pid = ::fork();
  if (pid == 0) {
    auto f = AtomicOutputFile::create(path, 0600, false);
    if (!f || !f->write(as_bytes("half of the plaintext"))) _exit(1);
    ::kill(::getpid(), SIGKILL);
    _exit(2);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child did not get as far as the kill";
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "a killed writer left a file behind";
}

TEST(ReadSecretFile, AcceptsOnlyPrivateRegularFilesOfTheCaller) {
  TempDir dir;
  const std::string ok = dir.file("ok.key");
  write_file(ok, as_bytes("key material"), 0600);
  auto r = read_secret_file(ok);
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(to_string(r->span()), "key material");

  const std::string loose = dir.file("loose.key");
  write_file(loose, as_bytes("k"), 0640);
  auto l = read_secret_file(loose);
  ASSERT_TRUE(FailsWith(l, ErrorCode::kPermission));
  EXPECT_NE(l.error().message.find("chmod 600"), std::string::npos);

  const std::string fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto f = read_secret_file(fifo);  // must not block
  ASSERT_TRUE(FailsWith(f, ErrorCode::kPermission));
  EXPECT_NE(f.error().message.find("regular file"), std::string::npos);

  EXPECT_TRUE(FailsWith(read_secret_file(dir.file("missing")), ErrorCode::kIo));

  if (::geteuid() == 0) {
    const std::string foreign = dir.file("foreign.key");
    write_file(foreign, as_bytes("k"), 0600);
    ASSERT_EQ(::chown(foreign.c_str(), 4242, 4242), 0);
    // Root may read anything, but a key owned by someone else is still not "your" key.
    auto o = read_secret_file(foreign);
    ASSERT_TRUE(FailsWith(o, ErrorCode::kPermission));
    EXPECT_NE(o.error().message.find("uid 4242"), std::string::npos);
  }

  const std::string big = dir.file("big.key");
  write_file(big, Bytes(70 * 1024, std::byte{'a'}), 0600);
  EXPECT_TRUE(FailsWith(read_secret_file(big), ErrorCode::kInvalidArgument));
  // A larger limit (the file keys file's): the same file read whole, one byte over refused.
  auto whole = read_secret_file(big, 70 * 1024);
  ASSERT_TRUE(whole) << whole.error().message;
  EXPECT_EQ(whole->size(), 70u * 1024);
  auto over = read_secret_file(big, 70 * 1024 - 1);
  ASSERT_TRUE(FailsWith(over, ErrorCode::kInvalidArgument));
  EXPECT_NE(over.error().message.find("is larger than 69 KiB"), std::string::npos) << over.error().message;
}

TEST(AnonymousTempFile, HoldsDataWithoutAName) {
  TempDir dir;
  auto t = AnonymousTempFile::create(dir.path().string());
  ASSERT_TRUE(t) << t.error().message;
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "the file must have no name";
  ASSERT_TRUE(t->resize(3 << 20));
  const Bytes data = testing::pattern_bytes(3 << 20, 17);
  ASSERT_TRUE(t->write_at(0, ByteSpan(data).first(1 << 20)));
  ASSERT_TRUE(t->write_at(1 << 20, ByteSpan(data).subspan(1 << 20)));
  EXPECT_EQ(*t->size(), data.size());
  Bytes back(100);
  ASSERT_TRUE(t->read_at(12345, back));
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin() + 12345));
  EXPECT_TRUE(FailsWith(t->read_at(data.size() - 10, back), ErrorCode::kTruncated));
  MemorySink sink;
  ASSERT_TRUE(t->copy_to(sink));
  EXPECT_EQ(sink.bytes, data);
  EXPECT_TRUE(FailsWith(AnonymousTempFile::create(dir.file("no/such/dir")), ErrorCode::kIo));
}

}  // namespace
}  // namespace tresor
