// The agent's reading of a step's layout for its roster (agent::step_link_from, docs/training.md
// §5.4): TRESOR_STEP_ROSTER=1 in a Slurm step of several tasks makes a claim for this task's rank
// of step <manifest job id>.<SLURM_STEP_ID>; rank 0 also says where it will listen. Every wrong
// value is refused naming the variable; without the switch, or for one task, there is no claim.
#include <gtest/gtest.h>

#include <map>
#include <string>

#include "tresor/agent/agent.h"
#include "tresor/roster.h"

namespace tresor {
namespace {

using Env = std::map<std::string, std::string>;

slurm::GetEnv getter(const Env& env) {
  return [env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
}

Manifest manifest(std::string job_id = "t-00112233aabbccdd") {
  Manifest m;
  m.job_id = std::move(job_id);
  return m;
}

Env step(std::string rank, std::string tasks = "2", std::string nodes = "1") {
  return {{"TRESOR_STEP_ROSTER", "1"}, {"SLURM_NTASKS", tasks},   {"SLURM_PROCID", rank},   {"SLURM_LOCALID", rank},
          {"SLURM_NNODES", nodes},     {"SLURM_JOB_ID", "4711"}, {"SLURM_STEP_ID", "3"}};
}

void expect_refused(const Env& env, const std::string& says, const std::string& own = "127.0.0.1") {
  auto r = agent::step_link_from(getter(env), manifest(), own);
  ASSERT_FALSE(r) << "accepted; expected: " << says;
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(r.error().message.find(says), std::string::npos) << r.error().message;
}

TEST(StepLink, NoClaimWithoutTheSwitchOrForOneTask) {
  for (const Env& env : {Env{}, Env{{"SLURM_NTASKS", "2"}, {"SLURM_PROCID", "1"}}, Env{{"TRESOR_STEP_ROSTER", "0"}, {"SLURM_NTASKS", "2"}},
                         Env{{"TRESOR_STEP_ROSTER", ""}}, Env{{"TRESOR_STEP_ROSTER", "1"}}, step("0", "1")}) {
    auto r = agent::step_link_from(getter(env), manifest(), "127.0.0.1");
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_FALSE(r->has_value());
  }
}

TEST(StepLink, TheClaimIsForTheManifestsJobAndThisTasksRank) {
  auto one = agent::step_link_from(getter(step("1", "3")), manifest(), "");
  ASSERT_TRUE(one) << one.error().message;
  ASSERT_TRUE(one->has_value());
  EXPECT_EQ((*one)->step, "t-00112233aabbccdd.3") << "the manifest's job id, not Slurm's: the broker checks the claim against the manifest";
  EXPECT_EQ((*one)->size, 3);
  EXPECT_EQ((*one)->rank, 1);
  EXPECT_EQ((*one)->lead, "") << "only rank 0 names where it listens";
  EXPECT_EQ((*one)->wait, std::chrono::seconds(240)) << "within the broker session's five minutes";
  Env quick = step("1");
  quick["TRESOR_STEP_WAIT"] = "7";
  auto q = agent::step_link_from(getter(quick), manifest(), "127.0.0.1");
  ASSERT_TRUE(q) << q.error().message;
  EXPECT_EQ((*q)->wait, std::chrono::seconds(7));
  // Rank 0 in a sandbox on one node: the node's loopback and a port free now.
  auto zero = agent::step_link_from(getter(step("0")), manifest(), "127.0.0.1");
  ASSERT_TRUE(zero) << zero.error().message;
  ASSERT_TRUE(zero->has_value());
  EXPECT_TRUE((*zero)->lead.starts_with("127.0.0.1:")) << (*zero)->lead;
  EXPECT_TRUE(valid_lead_address((*zero)->lead)) << (*zero)->lead;
  // Rank 0 in a VM on a step network, on any number of nodes: its address there, and a port
  // that is free on it (this machine's own address stands in for the VM's).
  auto own = agent::step_network_address();
  ASSERT_TRUE(own || own.error().code == ErrorCode::kInvalidArgument) << own.error().message;
  if (own && !own->empty()) {
    auto vm = agent::step_link_from(getter(step("0", "2", "2")), manifest(), *own);
    ASSERT_TRUE(vm) << vm.error().message;
    EXPECT_TRUE((*vm)->lead.starts_with(*own + ":")) << (*vm)->lead;
    EXPECT_TRUE(valid_lead_address((*vm)->lead)) << (*vm)->lead;
  }
  // The environment's address wins, in a sandbox and in a VM alike.
  Env given = step("0", "2", "2");
  given["TRESOR_STEP_LEAD"] = "10.8.0.1:29400";
  for (const char* where : {"127.0.0.1", "", "10.231.0.5"}) {
    auto r = agent::step_link_from(getter(given), manifest(), where);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_EQ((*r)->lead, "10.8.0.1:29400");
  }
  // The batch script of `sbatch -n 2` (SLURM_NTASKS=2, no SLURM_STEP_ID) is one task: no claim,
  // where a claim for rank 0 of 2 would wait for a rank 1 that never comes.
  Env batch = step("0");
  batch.erase("SLURM_STEP_ID");
  auto b = agent::step_link_from(getter(batch), manifest(), "127.0.0.1");
  ASSERT_TRUE(b) << b.error().message;
  EXPECT_FALSE(b->has_value());
}

TEST(StepLink, WrongValuesAreNamed) {
  Env e = step("1");
  e["TRESOR_STEP_ROSTER"] = "yes";
  expect_refused(e, "TRESOR_STEP_ROSTER is 'yes'; it must be 1");
  e = step("1");
  e["SLURM_PROCID"] = "2";
  expect_refused(e, "TRESOR_STEP_ROSTER=1: SLURM_PROCID=2 is not below SLURM_NTASKS=2");
  e = step("1");
  e.erase("SLURM_JOB_ID");
  expect_refused(e, "SLURM_JOB_ID is not set");
  expect_refused(step("1", "1025"), "SLURM_NTASKS=1025; a step roster holds at most 1024 ranks");
  for (const char* wait : {"0", "241", "5s", "-1", "1e2"}) {
    e = step("1");
    e["TRESOR_STEP_WAIT"] = wait;
    expect_refused(e, std::string("TRESOR_STEP_WAIT is '") + wait + "'; it must be 1..240 seconds");
  }
  // Rank 0 without an address where the others cannot reach its loopback, or in a VM without a
  // step network; an address that is not one is refused too.
  expect_refused(step("0", "2", "2"), "TRESOR_STEP_LEAD is not set; rank 0's address");
  expect_refused(step("0", "2", "2"), "2 nodes: their sandboxes share no loopback");
  expect_refused(step("0"), "this VM has no address on a step network", "");
  expect_refused(step("0"), "'10.0.0' is not an IPv4 address", "10.0.0");
  for (const char* lead : {"node1:29400", "10.8.0.1", "10.8.0.1:0", "10.8.0.1:65536", " 10.8.0.1:1"}) {
    e = step("0");
    e["TRESOR_STEP_LEAD"] = lead;
    expect_refused(e, std::string("TRESOR_STEP_LEAD is '") + lead + "'");
  }
  // A job id so long that its step id no longer fits a claim.
  auto r = agent::step_link_from(getter(step("1")), manifest(std::string(63, 'j')), "127.0.0.1");
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("is not 1 to 64 of A-Z a-z 0-9 . _ -"), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace tresor
