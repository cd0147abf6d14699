// Two-phase commit end to end: two real PostgreSQL clusters, a coordinator and two agents as
// real processes, a bank transfer between them. Crashes are real (SIGKILL, failpoints that
// SIGKILL the process, pg_ctl stop -m immediate). Every test ends with check_invariants():
// nothing of ours left in pg_prepared_xacts and the total balance unchanged.
#include <doctest/doctest.h>

#include <future>

#include "common/ids.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// Moves `amount` from bank a's account 1 to bank b's account 1 inside gid.
void transfer_legs(Testbed& t, const std::string& gid, int64_t amount) {
  Http a = t.move(0, gid, 1, -amount);
  REQUIRE_MESSAGE(a.status == 200, a.describe());
  Http b = t.move(1, gid, 1, amount);
  REQUIRE_MESSAGE(b.status == 200, b.describe());
}

}  // namespace

TEST_CASE("a committed transfer applies both sides") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  Http c = t.commit(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.state() == "committed");
  CHECK(c.body["branches"].size() == 2);
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  Http g = t.get(gid);
  CHECK(g.state() == "committed");
  CHECK(g.body["branches"][0]["state"] == "committed");
  CHECK(t.agent(0, "GET", "/v1/branches/" + gid).state() == "committed");
  t.check_invariants();
}

TEST_CASE("a vote of no at PREPARE (deferred foreign key) aborts both branches") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  // Account 999 does not exist; the deferred constraint only fails at PREPARE.
  Http bad = t.exec(1, gid, "INSERT INTO ledger (account, amount) VALUES ($1, $2)", Json::array({999, 100}));
  REQUIRE_MESSAGE(bad.status == 200, bad.describe());
  Http c = t.commit(gid);
  INFO(t.logs());
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.state() == "aborted");
  CHECK(c.body["reason"] == "vote_no");
  CHECK(c.body["branch"] == "a1");
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
  CHECK(t.wait_state(gid, "aborted"));
  t.check_invariants();
}

TEST_CASE("an SQL error answers 422 with the sqlstate and the transaction aborts as a whole") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  Http a = t.move(0, gid, 1, 100);
  REQUIRE(a.status == 200);
  Http b = t.move(1, gid, 1, -5000);  // CHECK (balance >= 0) fails
  CHECK_MESSAGE(b.status == 422, b.describe());
  CHECK(b.body["error"]["sqlstate"] == "23514");
  Http c = t.commit(gid);
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.state() == "aborted");
  CHECK(t.balance(0, 1) == 1000);
  t.check_invariants();
}

TEST_CASE("an agent that does not answer prepare makes the transaction abort") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  REQUIRE(t.agent_process(1).stop_and_wait());
  Http c = t.commit(gid);
  t.agent_process(1).signal(SIGCONT);
  INFO(t.logs());
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.state() == "aborted");
  std::string reason = c.body.value("reason", "");
  CHECK((reason == "prepare_timeout" || reason == "prepare_failed"));
  CHECK(c.body["branch"] == "a1");
  CHECK(t.wait_state(gid, "aborted"));
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
  t.check_invariants();
}

TEST_CASE("coordinator killed right after the decision is logged: recovery commits both") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  Http c = t.commit(gid);
  CHECK_FALSE(c.transport.ok());  // the process died under the request
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  // Both branches are prepared and wait for the outcome.
  CHECK(t.prepared(0) == 1);
  CHECK(t.prepared(1) == 1);
  t.start_coordinator();
  INFO(t.logs());
  CHECK(t.wait_state(gid, "committed"));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  Http again = t.commit(gid);
  CHECK_MESSAGE(again.status == 200, again.describe());
  t.check_invariants();
}

TEST_CASE("coordinator killed before the decision: the prepared branches are aborted") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.before_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  Http c = t.commit(gid);
  CHECK_FALSE(c.transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  t.start_coordinator();
  INFO(t.logs());
  // No record: presumed abort. The agents ask and roll back.
  Http g = t.get(gid);
  CHECK(g.state() == "aborted");
  CHECK(g.body["presumed"] == true);
  t.check_invariants();
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
}

TEST_CASE("an agent killed while prepared resolves its branch from the coordinator after restart") {
  Testbed::Options o;
  o.agent_failpoints[1] = "agent.before_commit_prepared=crash";
  // The coordinator waits long before resending, so the restarted agent settles the branch by
  // asking, not by receiving the resent commit.
  o.coordinator_args = {"--retry-min-ms", "60000", "--retry-max-ms", "60000"};
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  Http c = t.commit(gid);
  INFO(t.logs());
  CHECK_MESSAGE(c.status == 202, c.describe());  // decided commit; a1 not acknowledged yet
  CHECK(c.state() == "committing");
  REQUIRE(t.agent_process(1).wait(10'000) >= 0);
  CHECK(t.prepared(1) == 1);
  t.start_agent(1);
  CHECK(t.wait_log(t.agent_process(1), "in-doubt branch resolved by the coordinator"));
  CHECK(eventually([&] { return t.prepared(1) == 0; }, 10'000));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("PostgreSQL stopped -m immediate while a branch is prepared: finished after restart") {
  Testbed::Options o;
  // The agent holds COMMIT PREPARED back until the test releases it, after the crash; the
  // commit request waits for every acknowledgement, however long the restart takes.
  o.agent_failpoints[1] = "agent.before_commit_prepared=1*pause";
  o.coordinator_args = {"--commit-wait-ms", "25000"};
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  auto commit = std::async(std::launch::async, [&] { return t.commit(gid); });
  REQUIRE(t.wait_log(t.agent_process(1), "failpoint fired name=agent.before_commit_prepared"));
  CHECK(t.prepared(1) == 1);
  REQUIRE(t.pg(1).stop(true).ok());
  REQUIRE(t.pg(1).start().ok());
  CHECK(t.prepared(1) == 1);  // the prepared branch survived the crash
  Http release = t.agent(1, "POST", "/v1/failpoints", R"({"spec":""})");
  REQUIRE_MESSAGE(release.status == 200, release.describe());
  Http c = commit.get();
  INFO(t.logs());
  CHECK_MESSAGE(c.status == 200, c.describe());
  CHECK(c.state() == "committed");
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("duplicate commit and abort messages answer the outcome already reached") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  transfer_legs(t, gid, 100);
  REQUIRE(t.commit(gid).status == 200);
  Http again = t.commit(gid);
  CHECK(again.status == 200);
  CHECK(again.state() == "committed");
  Http abort = t.abort(gid);
  CHECK(abort.status == 409);
  CHECK(abort.state() == "committed");
  // The same messages straight to an agent, as a coordinator resending them would.
  Http ac = t.agent(0, "POST", "/v1/branches/" + gid + "/commit");
  CHECK_MESSAGE(ac.status == 200, ac.describe());
  CHECK(ac.state() == "committed");
  Http aa = t.agent(0, "POST", "/v1/branches/" + gid + "/abort");
  CHECK(aa.status == 409);
  CHECK(aa.state() == "committed");

  std::string g2 = t.begin();
  transfer_legs(t, g2, 50);
  REQUIRE(t.abort(g2).status == 200);
  CHECK(t.abort(g2).status == 200);
  Http c2 = t.commit(g2);
  CHECK(c2.status == 409);
  CHECK(c2.state() == "aborted");
  CHECK(t.balance(0, 1) == 900);
  t.check_invariants();
}

TEST_CASE("an empty rollback of an unseen branch succeeds and a late exec or prepare is refused") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  Http a = t.move(0, gid, 1, -100);
  REQUIRE(a.status == 200);
  // The abort reaches agent 1 before any statement of the branch did.
  Http ab = t.agent(1, "POST", "/v1/branches/" + gid + "/abort");
  CHECK_MESSAGE(ab.status == 200, ab.describe());
  CHECK(ab.state() == "aborted");
  Http late = t.move(1, gid, 1, 100);
  CHECK_MESSAGE(late.status == 409, late.describe());
  Http prep = t.agent(1, "POST", "/v1/branches/" + gid + "/prepare");
  CHECK(prep.status == 200);
  CHECK(prep.body["vote"] == "no");
  REQUIRE(t.abort(gid).status == 200);
  CHECK(t.balance(1, 1) == 1000);
  t.check_invariants();
}

TEST_CASE("a read-only branch votes read_only and leaves phase 2") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -10).status == 200);
  REQUIRE(t.move(0, gid, 2, 10).status == 200);
  Http r = t.exec(1, gid, "SELECT balance FROM accounts WHERE id = $1", Json::array({1}));
  REQUIRE(r.status == 200);
  CHECK(r.body["results"][0]["rows"][0][0] == "1000");
  Http c = t.commit(gid);
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.body["branches"][1]["state"] == "read_only");
  CHECK(t.balance(0, 1) == 990);
  t.check_invariants();
}

TEST_CASE("a single-branch transaction commits in one phase") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -10).status == 200);
  REQUIRE(t.move(0, gid, 2, 10).status == 200);
  Http c = t.commit(gid);
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.body["one_phase"] == true);
  CHECK(t.balance(0, 2) == 1010);
  // A commit failing at COMMIT (deferred constraint) answers aborted.
  std::string g2 = t.begin();
  REQUIRE(t.exec(0, g2, "INSERT INTO ledger (account, amount) VALUES (999, 1)").status == 200);
  Http c2 = t.commit(g2);
  CHECK_MESSAGE(c2.status == 409, c2.describe());
  CHECK(c2.state() == "aborted");
  t.check_invariants();
}

TEST_CASE("coordinator killed after a one-phase decision: recovery finishes the branch") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -10).status == 200);
  REQUIRE(t.move(0, gid, 2, 10).status == 200);
  CHECK_FALSE(t.commit(gid).transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  t.start_coordinator();
  INFO(t.logs());
  CHECK(t.wait_state(gid, "committed"));
  CHECK(t.balance(0, 1) == 990);
  CHECK(t.balance(0, 2) == 1010);
  t.check_invariants();
}

TEST_CASE("an unprepared branch whose coordinator forgot it is rolled back after its timeout") {
  Testbed& t = Testbed::fresh();
  auto r = t.coord("POST", "/v1/transactions", R"({"timeout_ms":1500})");
  REQUIRE(r.status == 201);
  std::string gid = r.body["gid"];
  REQUIRE(t.move(0, gid, 1, -10).status == 200);
  // The coordinator restarts: it has no record of the active transaction (presumed abort).
  t.stop_coordinator();
  t.start_coordinator();
  CHECK(t.wait_log(t.agent_process(0), "rolling back an idle branch", 10'000));
  CHECK(eventually([&] { return t.agent(0, "GET", "/v1/branches/" + gid).state() == "aborted"; },
                   10'000));
  CHECK(t.move(0, gid, 1, -10).status == 409);
  auto locks = query_value(t.conninfo(0), "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                                          "USING (pid) WHERE a.application_name LIKE 'tpc-agent%' "
                                          "AND l.locktype = 'transactionid'");
  REQUIRE(locks.ok());
  CHECK(**locks == "0");
  t.check_invariants();
}

TEST_CASE("gids are unique across coordinator restarts") {
  Testbed& t = Testbed::fresh();
  std::string a = t.begin();
  t.stop_coordinator();
  t.start_coordinator();
  std::string b = t.begin();
  CHECK(a != b);
  auto pa = parse_gid(a), pb = parse_gid(b);
  REQUIRE(pa);
  REQUIRE(pb);
  CHECK(pb->epoch > pa->epoch);
  // The old epoch's gid was active at the crash: presumed aborted now.
  Http g = t.get(a);
  CHECK(g.state() == "aborted");
  t.check_invariants();
}
