// The launchers' command line (include/tresor/process.h): option pairs, then -- and the command.
#include "tresor/process.h"

#include <gtest/gtest.h>

#include "support/test_support.h"

namespace tresor::process {
namespace {

Result<LauncherArgs> parse(std::vector<std::string> words) {
  std::vector<char*> argv;
  for (auto& w : words) argv.push_back(w.data());
  return parse_launcher_args(static_cast<int>(argv.size()), argv.data(), {"--broker", "--ca"});
}

TEST(LauncherArgs, OptionPairsThenTheCommand) {
  auto a = parse({"tresor-run", "--broker", "https://k:1", "--ca", "/c.pem", "--", "sh", "-c", "echo --broker"});
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_EQ(a->options.at("--broker"), "https://k:1");
  EXPECT_EQ(a->options.at("--ca"), "/c.pem");
  EXPECT_EQ(a->command, (std::vector<std::string>{"sh", "-c", "echo --broker"}));
  struct Case {
    std::vector<std::string> words;
    const char* want;
  };
  for (const auto& k : std::vector<Case>{{{"x", "--broker"}, "option --broker needs a value"},
                                         {{"x", "--colour", "red", "--", "true"}, "unknown option --colour"},
                                         {{"x", "--broker", "b"}, "no command after --"},
                                         {{"x", "--broker", "b", "--"}, "no command after --"}}) {
    auto r = parse(k.words);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().message, k.want);
  }
}

}  // namespace
}  // namespace tresor::process
