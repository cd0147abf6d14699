// The agent's step endpoint against real PostgreSQL and a real agent process (docs/DESIGN.md
// §8): a TCC transfer's branch on one bank with its try freezing money, its confirm spending it
// and its cancel releasing it; duplicates answered from the barrier with the first call's
// results; an empty compensation and the late try it refuses; business failures (422 with the
// SQLSTATE) and bad input (400) changing nothing; the {"tpc":"gid"} parameter; the barrier
// rows purged once the coordinator reports the transaction finished, after which a late try
// is refused. Each case ends with the money where it should be and no prepared leftovers.
#include <doctest/doctest.h>

#include <future>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

Testbed& bank(Testbed::Options o = {}) {
  o.agent_args.insert(o.agent_args.end(), {"--purge-interval-ms", "200"});
  Testbed& t = Testbed::fresh(o);
  auto r =
      query(t.conninfo(0),
            "ALTER TABLE accounts ADD COLUMN frozen bigint NOT NULL DEFAULT 0 CHECK (frozen >= 0);"
            "DROP TABLE IF EXISTS step_log; CREATE TABLE step_log (gid text, branch text)");
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  return t;
}

Http step(Testbed& t, const std::string& gid, const std::string& branch, const std::string& op,
          const Json& statements) {
  Json body = {{"branch", branch}, {"op", op}, {"statements", statements}};
  return t.agent(0, "POST", "/v1/branches/" + gid + "/step", dump(body));
}

// try: freeze 30 of account 1; confirm: pay the frozen 30 to account 2; cancel: give them back.
Json tcc(const std::string& op) {
  if (op == "try")
    return Json::array(
        {{{"sql", "UPDATE accounts SET balance = balance - $1, frozen = frozen + $1 WHERE id = 1"},
          {"params", {30}},
          {"expect_rows", 1}},
         {{"sql", "INSERT INTO step_log VALUES ($1, $2)"},
          {"params", {{{"tpc", "gid"}}, {{"tpc", "branch"}}}}}});
  if (op == "confirm")
    return Json::array(
        {{{"sql", "UPDATE accounts SET frozen = frozen - 30 WHERE id = 1 RETURNING frozen"}},
         {{"sql", "UPDATE accounts SET balance = balance + 30 WHERE id = 2"}, {"expect_rows", 1}}});
  return Json::array(
      {{{"sql", "UPDATE accounts SET balance = balance + 30, frozen = frozen - 30 WHERE id = 1"}}});
}

std::string money(Testbed& t) {
  auto v = query_value(t.conninfo(0), "SELECT balance || '/' || frozen FROM accounts WHERE id = 1");
  REQUIRE(v.ok());
  return v->value_or("NULL");
}

int64_t barrier_rows(Testbed& t) {
  auto v = query_value(t.conninfo(0), "SELECT count(*) FROM tpc_barrier");
  REQUIRE(v.ok());
  return std::stoll(v->value_or("0"));
}

// The value of tpc_agent_steps_total{outcome="..."}.
double steps_metric(Testbed& t, const std::string& outcome) {
  Http m = t.agent(0, "GET", "/metrics");
  std::string key = "tpc_agent_steps_total{outcome=\"" + outcome + "\"} ";
  size_t at = m.raw.find(key);
  REQUIRE_MESSAGE(at != std::string::npos, key << " missing from /metrics");
  return std::stod(m.raw.substr(at + key.size()));
}

}  // namespace

TEST_CASE(
    "a TCC branch: try freezes once, confirm spends once, duplicates answer the first results") {
  Testbed& t = bank();
  std::string gid = t.begin();
  Http first = step(t, gid, "freeze", "try", tcc("try"));
  REQUIRE_MESSAGE(first.status == 200, first.describe());
  CHECK(first.body["barrier"] == "applied");
  CHECK(first.body["results"].size() == 2);
  CHECK(money(t) == "970/30");
  auto logged = query_value(t.conninfo(0), "SELECT gid || ' ' || branch FROM step_log");
  REQUIRE(logged.ok());
  CHECK(logged->value_or("") == gid + " freeze");

  Http again = step(t, gid, "freeze", "try", tcc("try"));
  REQUIRE_MESSAGE(again.status == 200, again.describe());
  CHECK(again.body["barrier"] == "duplicate");
  CHECK(again.body["results"] == first.body["results"]);
  CHECK(money(t) == "970/30");

  Http confirm = step(t, gid, "freeze", "confirm", tcc("confirm"));
  REQUIRE_MESSAGE(confirm.status == 200, confirm.describe());
  CHECK(confirm.body["results"][0]["rows"][0][0] == "0");
  Http confirm_again = step(t, gid, "freeze", "confirm", tcc("confirm"));
  CHECK(confirm_again.body["barrier"] == "duplicate");
  CHECK(confirm_again.body["results"][0]["rows"][0][0] == "0");  // the first call's, not rerun
  CHECK(money(t) == "970/0");
  CHECK(t.balance(0, 2) == Testbed::kInitial + 30);
  CHECK(steps_metric(t, "applied") == 2);
  CHECK(steps_metric(t, "duplicate") == 2);
  REQUIRE(t.abort(gid).status == 200);  // the XA transaction itself had no branches
  t.check_invariants();
}

TEST_CASE("a cancel whose try never arrived is empty, and the late try is refused with 409") {
  Testbed& t = bank();
  std::string gid = t.begin();
  Http cancel = step(t, gid, "freeze", "cancel", tcc("cancel"));
  REQUIRE_MESSAGE(cancel.status == 200, cancel.describe());
  CHECK(cancel.body["barrier"] == "empty_compensation");
  Http late = step(t, gid, "freeze", "try", tcc("try"));
  CHECK(late.status == 409);
  CHECK(late.body["error"]["code"] == "barrier_refused");
  CHECK(money(t) == "1000/0");
  CHECK(step(t, gid, "freeze", "cancel", tcc("cancel")).body["barrier"] == "duplicate");
  CHECK(money(t) == "1000/0");
  REQUIRE(t.abort(gid).status == 200);
  t.check_invariants();
}

TEST_CASE("a business failure answers 422 with its SQLSTATE and leaves no barrier row") {
  Testbed& t = bank();
  std::string gid = t.begin();
  Json overdraw = Json::array(
      {{{"sql",
         "UPDATE accounts SET balance = balance - 5000, frozen = frozen + 5000 WHERE id = 1"}}});
  Http r = step(t, gid, "freeze", "try", overdraw);
  CHECK(r.status == 422);
  CHECK(r.body["error"]["sqlstate"] == "23514");
  Json missing = Json::array(
      {{{"sql", "UPDATE accounts SET balance = balance - 1 WHERE id = 99"}, {"expect_rows", 1}}});
  Http m = step(t, gid, "other", "action", missing);
  CHECK(m.status == 422);
  CHECK(m.body["error"]["sqlstate"] == "21000");
  CHECK(barrier_rows(t) == 0);
  CHECK(steps_metric(t, "failed") == 2);
  // The failed try did not run, so its cancel is empty.
  CHECK(step(t, gid, "freeze", "cancel", tcc("cancel")).body["barrier"] == "empty_compensation");
  CHECK(money(t) == "1000/0");
  REQUIRE(t.abort(gid).status == 200);
  t.check_invariants();
}

TEST_CASE("bad step requests get 400 or 404 and change nothing") {
  Testbed& t = bank();
  std::string gid = t.begin();
  for (
      const std::string& body :
      {std::string(R"({"op":"try"})"), std::string(R"({"branch":"b","op":"pay"})"),
       std::string(R"({"branch":"b c","op":"try"})"), std::string("not json"),
       std::string(
           R"({"branch":"b","op":"try","statements":[{"sql":"SELECT $1","params":[{"tpc":"x"}]}]})")}) {
    Http r = t.agent(0, "POST", "/v1/branches/" + gid + "/step", body);
    CHECK_MESSAGE(r.status == 400, body << " → " << r.describe());
    CHECK(r.body["error"].contains("message"));
  }
  CHECK(t.agent(0, "POST", "/v1/branches/zz-1-1/step", R"({"branch":"b","op":"try"})").status ==
        404);
  CHECK(t.agent(0, "POST", "/v1/branches/not-a-gid/step", R"({"branch":"b","op":"try"})").status ==
        400);
  CHECK(t.agent(0, "GET", "/v1/branches/" + gid + "/step").status == 405);
  CHECK(barrier_rows(t) == 0);
  REQUIRE(t.abort(gid).status == 200);
  t.check_invariants();
}

TEST_CASE(
    "barrier rows go once the coordinator reports the transaction finished; a late try is "
    "refused") {
  Testbed& t = bank();
  std::string gid = t.begin();
  REQUIRE(step(t, gid, "freeze", "cancel", tcc("cancel")).body["barrier"] == "empty_compensation");
  std::string open = t.begin();  // still active: its rows stay
  REQUIRE(step(t, open, "freeze", "action", Json::array()).body["barrier"] == "applied");
  CHECK(barrier_rows(t) == 3);
  REQUIRE(t.abort(gid).status == 200);
  CHECK(eventually([&] { return barrier_rows(t) == 1; }, 20'000));
  // The rows that made the try hang off are gone; the agent still refuses it.
  Http late = step(t, gid, "freeze", "try", tcc("try"));
  CHECK(late.status == 409);
  CHECK(late.body["error"]["code"] == "barrier_refused");
  CHECK(money(t) == "1000/0");
  REQUIRE(t.abort(open).status == 200);
  t.check_invariants();
}

TEST_CASE("past --steps-max a step is answered 503 and runs nothing; the step in flight goes on") {
  Testbed::Options o;
  o.agent_args = {"--steps-max", "1"};
  o.agent_failpoints[0] = "agent.before_step=1*pause";
  Testbed& t = bank(o);
  std::string gid = t.begin();
  auto held =
      std::async(std::launch::async, [&] { return step(t, gid, "freeze", "try", tcc("try")); });
  REQUIRE(t.wait_log(t.agent_process(0), "failpoint fired name=agent.before_step"));
  Json note = Json::array(
      {{{"sql", "INSERT INTO step_log VALUES ($1, 'other')"}, {"params", {{{"tpc", "gid"}}}}}});
  Http over = step(t, gid, "other", "action", note);
  CHECK_MESSAGE(over.status == 503, over.describe());
  CHECK(over.body["error"]["code"] == "unavailable");
  CHECK_MESSAGE(over.raw.find("steps_max=1") != std::string::npos, over.describe());
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_steps_in_flight") == 1);
  Http release = t.agent(0, "POST", "/v1/failpoints", R"({"spec":""})");
  REQUIRE_MESSAGE(release.status == 200, release.describe());
  Http tried = held.get();
  CHECK_MESSAGE(tried.status == 200, tried.describe());
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_steps_in_flight") == 0);
  CHECK(money(t) == "970/30");
  auto others = query_value(t.conninfo(0), "SELECT count(*) FROM step_log WHERE branch = 'other'");
  REQUIRE(others.ok());
  CHECK(others->value() == "0");
  CHECK(step(t, gid, "freeze", "cancel", tcc("cancel")).body["barrier"] == "applied");
  CHECK(money(t) == "1000/0");
  REQUIRE(t.abort(gid).status == 200);
  t.check_invariants();
}
