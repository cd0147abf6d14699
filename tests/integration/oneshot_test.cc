// One-shot transactions (POST /v1/transactions/run) end to end: every branch's statements go
// out with its prepare (or a single branch's with its one-phase commit), with the same
// guarantees as interactive transactions — including that statements never run twice.
#include <doctest/doctest.h>

#include <future>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

Json branch(int i, const std::string& sql, Json params = Json::array()) {
  return Json{{"participant", Testbed::agent_name(i)},
              {"statements", Json::array({Json{{"sql", sql}, {"params", params}}})}};
}

Json transfer(int64_t amount, const std::string& protocol = "2pc") {
  return Json{{"protocol", protocol},
              {"branches", Json::array({branch(0, "UPDATE accounts SET balance = balance - $1 WHERE id = 1 RETURNING balance", Json::array({amount})),
                                        branch(1, "UPDATE accounts SET balance = balance + $1 WHERE id = 1 RETURNING balance", Json::array({amount}))})}};
}

Http run(Testbed& t, const Json& body) { return t.coord("POST", "/v1/transactions/run", dump(body)); }

}  // namespace

TEST_CASE("a one-shot transfer commits both branches and returns each branch's results") {
  Testbed& t = Testbed::fresh();
  Http r = run(t, transfer(100));
  INFO(t.logs());
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  CHECK(r.state() == "committed");
  CHECK(r.body["results"]["a0"][0]["rows"][0][0] == "900");
  CHECK(r.body["results"]["a1"][0]["rows"][0][0] == "1100");
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  // The agents did not enlist: the coordinator did it for them.
  CHECK(t.get(r.body["gid"]).state() == "committed");
  t.check_invariants();
}

TEST_CASE("a one-shot transfer whose statement fails changes nothing") {
  Testbed& t = Testbed::fresh();
  Http r = run(t, transfer(5000));  // bank a's CHECK (balance >= 0) fails
  INFO(t.logs());
  CHECK_MESSAGE(r.status == 409, r.describe());
  CHECK(r.state() == "aborted");
  CHECK(r.body["reason"] == "vote_no");
  CHECK(r.body["branch"] == "a0");
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
  t.check_invariants();
}

TEST_CASE("one-shot: a single branch commits in one phase; 3PC works too") {
  Testbed& t = Testbed::fresh();
  Http one = run(t, Json{{"branches", Json::array({branch(0, "UPDATE accounts SET balance = balance + 7 WHERE id = 2")})}});
  REQUIRE_MESSAGE(one.status == 200, one.describe());
  CHECK(one.body["one_phase"] == true);
  CHECK(t.balance(0, 2) == 1007);
  REQUIRE(run(t, Json{{"branches", Json::array({branch(0, "UPDATE accounts SET balance = balance - 7 WHERE id = 2")})}}).status == 200);
  Http three = run(t, transfer(10, "3pc"));
  REQUIRE_MESSAGE(three.status == 200, three.describe());
  CHECK(three.body["protocol"] == "3pc");
  CHECK(t.balance(1, 1) == 1010);
  t.check_invariants();
}

TEST_CASE("one-shot bad input: unknown participants, empty or malformed branches") {
  Testbed& t = Testbed::fresh();
  Http unknown = run(t, Json{{"branches", Json::array({Json{{"participant", "nobody"}, {"statements", Json::array({Json{{"sql", "SELECT 1"}}})}}})}});
  CHECK(unknown.status == 400);
  CHECK(unknown.body["error"]["message"].get<std::string>().find("nobody") != std::string::npos);
  CHECK(run(t, Json{{"branches", Json::array()}}).status == 400);
  CHECK(t.coord("POST", "/v1/transactions/run", "{\"branches\":").status == 400);
  CHECK(t.coord("GET", "/v1/transactions/run").status == 405);
  t.check_invariants();
}

TEST_CASE("one-shot: the coordinator killed after its decision; recovery commits both, once") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  Http r = run(t, transfer(100));
  CHECK_FALSE(r.transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  t.start_coordinator();
  INFO(t.logs());
  CHECK(eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 20'000));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("one-shot single branch: coordinator killed after its one-phase record, before sending") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  Http r = run(t, Json{{"branches", Json::array({branch(0, "UPDATE accounts SET balance = balance + 7 WHERE id = 2")})}});
  CHECK_FALSE(r.transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  t.start_coordinator();
  INFO(t.logs());
  // The statements never reached the agent: the resent one-phase commit finds nothing and the
  // transaction ends aborted — it does not claim a commit that did not happen.
  auto list = t.coord("GET", "/v1/transactions?limit=10");
  REQUIRE(list.status == 200);
  CHECK(t.balance(0, 2) == 1000);
  t.check_invariants();
}

TEST_CASE("one-shot single branch: the agent dies after COMMIT; the resend answers from the marker") {
  Testbed::Options o;
  o.agent_failpoints[0] = "agent.after_one_phase_commit=crash";
  o.coordinator_args = {"--commit-wait-ms", "25000"};  // the answer waits for the resend
  Testbed& t = Testbed::fresh(o);
  // Moves 7 from account 3 to account 2 inside bank a.
  auto future = std::async(std::launch::async, [&] {
    return run(t, Json{{"branches", Json::array({branch(
                                        0, "UPDATE accounts SET balance = balance + CASE id WHEN 2 THEN 7 ELSE -7 END "
                                           "WHERE id IN (2, 3)")})}});
  });
  REQUIRE(t.agent_process(0).wait(10'000) >= 0);
  t.start_agent(0);
  Http r = future.get();
  INFO(t.logs());
  CHECK_MESSAGE(r.status == 200, r.describe());
  CHECK(r.state() == "committed");
  CHECK(t.balance(0, 2) == 1007);  // applied exactly once
  CHECK(t.balance(0, 3) == 993);
  t.check_invariants();
}

TEST_CASE("wait for the decision only: answered once the decision is durable") {
  Testbed& t = Testbed::fresh();
  Json body = transfer(10);
  body["wait"] = "decision";
  Http r = run(t, body);
  // Two branches: their commits are sent only once the decision is durable, so the answer
  // at that moment is always "committing".
  REQUIRE_MESSAGE(r.status == 202, r.describe());
  CHECK(r.state() == "committing");
  std::string gid = r.body["gid"];
  CHECK(t.wait_state(gid, "committed"));
  CHECK(t.balance(1, 1) == 1010);
  t.check_invariants();
}
