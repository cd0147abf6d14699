// Three-phase commit end to end, against two real PostgreSQL clusters: the happy path, a vote
// of no, the coordinator killed before and after its pre-commit decision (and staying down, so
// the agents' own timeouts and their termination step must finish the work), an agent killed
// while pre-committed, and a partition that makes the branches disagree — detected and
// reported, never hidden.
#include <doctest/doctest.h>

#include <fstream>
#include <future>
#include <sstream>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

Testbed::Options three_pc_options() {
  Testbed::Options o;
  o.agent_args = {"--precommit-timeout-ms", "1000", "--commit-timeout-ms", "1000"};
  return o;
}

void legs(Testbed& t, const std::string& gid, int64_t amount) {
  REQUIRE(t.move(0, gid, 1, -amount).status == 200);
  REQUIRE(t.move(1, gid, 1, amount).status == 200);
}

// Begins a 3PC transfer of 100, commits it, and waits for the coordinator to die at the
// failpoint it was started with; returns the gid.
std::string transfer_until_coordinator_dies(Testbed& t) {
  std::string gid = t.begin("3pc");
  legs(t, gid, 100);
  CHECK_FALSE(t.commit(gid).transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  return gid;
}

int64_t state_rows(Testbed& t, int bank) {
  auto v = query_value(t.conninfo(bank), "SELECT count(*) FROM tpc_agent_state WHERE state IN ('prepared3','precommitted')");
  REQUIRE(v.ok());
  return std::stoll(v->value_or("0"));
}

}  // namespace

TEST_CASE("3PC: prepare, pre-commit, commit") {
  Testbed& t = Testbed::fresh(three_pc_options());
  std::string gid = t.begin("3pc");
  legs(t, gid, 100);
  Http c = t.commit(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.state() == "committed");
  CHECK(c.body["protocol"] == "3pc");
  CHECK(t.wait_log(t.coordinator_process(), "gid=" + gid + " preparing->precommitted"));
  CHECK(t.wait_log(t.coordinator_process(), "gid=" + gid + " precommitted->committing"));
  CHECK(t.wait_log(t.agent_process(1), "gid=" + gid + " prepared->precommitted"));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  // The 3PC records are removed once the branches are finished.
  CHECK(eventually([&] { return state_rows(t, 0) == 0 && state_rows(t, 1) == 0; }, 5'000));
  Http m = t.coord("GET", "/metrics");
  CHECK(m.raw.find("tpc_coordinator_transactions_total{protocol=\"3pc\",outcome=\"committed\"} 1") !=
        std::string::npos);
  t.check_invariants();
}

TEST_CASE("3PC: a vote of no aborts both branches") {
  Testbed& t = Testbed::fresh(three_pc_options());
  std::string gid = t.begin("3pc");
  legs(t, gid, 100);
  REQUIRE(t.exec(1, gid, "INSERT INTO ledger (account, amount) VALUES (999, 1)").status == 200);
  Http c = t.commit(gid);
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.body["reason"] == "vote_no");
  CHECK(t.balance(0, 1) == 1000);
  CHECK(eventually([&] { return state_rows(t, 0) == 0 && state_rows(t, 1) == 0; }, 5'000));
  t.check_invariants();
}

TEST_CASE("3PC: coordinator killed after the pre-commit decision is logged: recovery commits") {
  Testbed::Options o = three_pc_options();
  o.coordinator_failpoints = "coord.after_precommit_logged=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = transfer_until_coordinator_dies(t);
  t.start_coordinator();
  INFO(t.logs());
  CHECK(t.wait_state(gid, "committed"));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("3PC: coordinator killed after the first pre-commit and gone: the agents commit together") {
  Testbed::Options o = three_pc_options();
  o.coordinator_failpoints = "coord.after_first_precommit_sent=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = transfer_until_coordinator_dies(t);
  INFO(t.logs());
  // No coordinator: each agent times out, asks its peer, and at least one of them is
  // pre-committed, so both commit.
  CHECK(eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 20'000));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  CHECK(t.wait_log(t.agent_process(0), "deciding without it"));
  // When the coordinator returns it drives its logged decision and agrees.
  t.start_coordinator();
  CHECK(t.wait_state(gid, "committed"));
  t.check_invariants();
}

TEST_CASE("3PC: coordinator killed before its decision and gone: the agents abort together") {
  Testbed::Options o = three_pc_options();
  o.coordinator_failpoints = "coord.before_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = transfer_until_coordinator_dies(t);
  INFO(t.logs());
  CHECK(eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 20'000));
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
  t.start_coordinator();
  Http g = t.get(gid);
  CHECK(g.state() == "aborted");
  CHECK(g.body["presumed"] == true);
  t.check_invariants();
}

TEST_CASE("3PC: an agent killed while pre-committed commits after its restart") {
  Testbed::Options o = three_pc_options();
  o.agent_failpoints[1] = "agent.before_commit_prepared=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin("3pc");
  legs(t, gid, 100);
  Http c = t.commit(gid);
  CHECK_MESSAGE(c.status == 202, c.describe());  // decided; agent 1 not acknowledged
  CHECK(c.state() == "committing");
  REQUIRE(t.agent_process(1).wait(10'000) >= 0);
  CHECK(t.prepared(1) == 1);
  CHECK(state_rows(t, 1) == 1);  // the durable pre-commit
  t.start_agent(1);
  INFO(t.logs());
  CHECK(t.wait_log(t.agent_process(1), "gid=" + gid + " found prepared branch state=precommitted"));
  CHECK(t.wait_state(gid, "committed"));
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("3PC: a partition makes the branches disagree; it is detected and reported") {
  Testbed::Options o = three_pc_options();
  // The coordinator pauses between logging its pre-commit decision and sending it, until the
  // test has cut agent 1 off and releases it.
  o.coordinator_failpoints = "coord.after_precommit_logged=1*pause";
  o.coordinator_args = {"--commit-wait-ms", "25000"};  // the commit is answered at the end
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin("3pc");
  legs(t, gid, 100);
  auto commit = std::async(std::launch::async, [&] { return t.commit(gid); });
  REQUIRE(t.wait_log(t.coordinator_process(), "failpoint fired name=coord.after_precommit_logged"));
  Http cut = t.agent(1, "POST", "/v1/failpoints", R"({"spec":"agent.partition=error"})");
  REQUIRE_MESSAGE(cut.status == 200, cut.describe());
  Http release = t.coord("POST", "/v1/failpoints", R"({"spec":""})");
  REQUIRE_MESSAGE(release.status == 200, release.describe());
  INFO(t.logs());

  // Agent 0 is pre-committed and commits (the coordinator, which it can reach, says commit).
  // Agent 1 never got the pre-commit, reaches nobody, and aborts alone after its timeout.
  CHECK(t.wait_log(t.agent_process(1), "deciding without it"));
  CHECK(eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 20'000));
  CHECK(t.balance(0, 1) == 900);   // debited
  CHECK(t.balance(1, 1) == 1000);  // never credited: the branches disagree

  // The partition heals: the coordinator's pre-commit reaches agent 1, which answers aborted.
  Http heal = t.agent(1, "POST", "/v1/failpoints", R"({"spec":""})");
  REQUIRE(heal.status == 200);
  CHECK(t.wait_state(gid, "heuristic_mixed"));
  Http c = commit.get();
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.state() == "heuristic_mixed");

  // Reported: the state, one ERROR line with every branch's outcome, the metrics, in-doubt.
  CHECK(t.wait_log(t.coordinator_process(), "heuristic outcome: branches disagree"));
  std::string log = read_file(t.coordinator_process().log_path());
  size_t first = log.find("ERROR gid=" + gid + " heuristic outcome: branches disagree");
  REQUIRE(first != std::string::npos);
  CHECK(log.find("ERROR gid=" + gid + " heuristic outcome", first + 1) == std::string::npos);
  CHECK(log.find("branches=a0:committed,a1:aborted", first) != std::string::npos);
  CHECK(t.coord("GET", "/metrics").raw.find("tpc_coordinator_heuristic_mixed_total 1") != std::string::npos);
  Http doubt = t.coord("GET", "/v1/in-doubt");
  REQUIRE(doubt.body["transactions"].is_array());
  bool listed = false;
  for (auto& tx : doubt.body["transactions"]) listed = listed || tx["gid"] == gid;
  CHECK(listed);
  // The agent that decided alone learns the coordinator's decision and reports the mismatch.
  CHECK(t.wait_log(t.agent_process(1),
                   "heuristic outcome: the branch was decided here against the coordinator"));
  CHECK(eventually([&] {
    return t.agent(1, "GET", "/metrics").raw.find("tpc_agent_heuristic_mismatch_total 1") != std::string::npos;
  }, 10'000));
  CHECK(t.agent(1, "GET", "/metrics").raw.find("tpc_agent_heuristic_outcomes 1") !=
        std::string::npos);
  // Whether the agent asked first or the pre-commit reached it first, the coordinator ends up
  // knowing, and the agent keeps it listed.
  Http mine;
  CHECK(eventually(
      [&] {
        mine = t.agent(1, "GET", "/v1/in-doubt");
        return mine.body["branches"].size() == 1 && mine.body["branches"][0]["check"] == "reported";
      },
      10'000));
  CHECK(mine.body["branches"][0]["gid"] == gid);
  CHECK(t.prepared(0) + t.prepared(1) == 0);
  CHECK(t.total() == Testbed::kTotal - 100);
}

TEST_CASE("2PC stays the default and never decides alone, even past every 3PC timeout") {
  Testbed::Options o = three_pc_options();
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();  // no protocol: 2pc
  CHECK(t.get(gid).body["protocol"] == "2pc");
  legs(t, gid, 100);
  CHECK_FALSE(t.commit(gid).transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  // Several unanswered queries later — well past every 3PC timeout — both still wait.
  REQUIRE(t.wait_log(t.agent_process(0), "gid=" + gid + " in-doubt branch waits for the coordinator"));
  REQUIRE(t.wait_log(t.agent_process(0), "asks=4"));
  CHECK(t.prepared(0) == 1);
  CHECK(t.prepared(1) == 1);
  CHECK(read_file(t.agent_process(0).log_path()).find("deciding without it") == std::string::npos);
  t.start_coordinator();
  CHECK(t.wait_state(gid, "committed"));
  t.check_invariants();
}
