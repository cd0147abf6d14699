// Input the API keeps exact or refuses, end to end against real PostgreSQL: number params keep
// the client's digits through the agent and through the coordinator's one-shot run,
// expect_rows makes a statement with the wrong row count an SQL error that aborts the
// transaction, unknown fields and repeated keys are refused, and 405 answers carry Allow.
#include <doctest/doctest.h>

#include "common/http_client.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// Written as JSON text: a client library building them from doubles would round them.
const char* const kExactNumbers[] = {"18446744073709551617", "123456789012345678901234567890",
                                     "12345678901234567.89"};

Http run(Testbed& t, const std::string& body) {
  return t.coord("POST", "/v1/transactions/run", body);
}

std::string exec_path(const std::string& gid) {
  return "/v1/branches/" + gid + "/exec";
}

// The Allow header of the answer to `method target`.
std::string allow(const Url& url, const std::string& method, const std::string& target) {
  HttpRequest req;
  req.method = method;
  req.target = target;
  HttpResult r = http_call(url, std::move(req), 10'000);
  CHECK(r.http_status == 405);
  return std::string(r.header("allow"));
}

}  // namespace

TEST_CASE("number params reach PostgreSQL with the digits the client sent, via exec and via run") {
  Testbed& t = Testbed::fresh();
  for (const char* n : kExactNumbers) {
    CAPTURE(n);
    std::string gid = t.begin();
    Http e = t.agent(0, "POST", exec_path(gid),
                     std::string(R"({"sql":"SELECT $1::numeric::text","params":[)") + n + "]}");
    INFO(t.logs());
    REQUIRE_MESSAGE(e.status == 200, e.describe());
    CHECK(e.body["results"][0]["rows"][0][0] == n);
    REQUIRE(t.abort(gid).status == 200);

    Http r = run(
        t,
        std::string(
            R"({"branches":[{"participant":"a0","statements":[{"sql":"SELECT $1::numeric::text","params":[)") +
            n + "]}]}]}");
    REQUIRE_MESSAGE(r.status == 200, r.describe());
    CHECK(r.body["results"]["a0"][0]["rows"][0][0] == n);
  }
  t.check_invariants();
}

TEST_CASE("expect_rows: an UPDATE that matches no row fails with 422 and the transaction aborts") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  Http e = t.agent(
      1, "POST", exec_path(gid),
      R"({"sql":"UPDATE accounts SET balance = balance + 100 WHERE id = 999","expect_rows":1})");
  INFO(t.logs());
  CHECK_MESSAGE(e.status == 422, e.describe());
  CHECK(e.body["error"]["sqlstate"] == "21000");
  CHECK(e.body["error"]["message"].get<std::string>().find("expected 1 rows") != std::string::npos);
  Http c = t.commit(gid);
  CHECK_MESSAGE(c.status == 409, c.describe());
  CHECK(c.state() == "aborted");
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.total() == Testbed::kTotal);

  // A matching count changes nothing about the statement.
  std::string ok_gid = t.begin();
  Http ok = t.agent(
      0, "POST", exec_path(ok_gid),
      R"({"statements":[{"sql":"UPDATE accounts SET balance = balance WHERE id = 1","expect_rows":1},
                                      {"sql":"SELECT id FROM accounts WHERE id <= 3","expect_rows":3}]})");
  CHECK_MESSAGE(ok.status == 200, ok.describe());
  REQUIRE(t.commit(ok_gid).status == 200);
  t.check_invariants();
}

TEST_CASE("expect_rows in a one-shot run: the mismatching branch votes no and nothing changes") {
  Testbed& t = Testbed::fresh();
  Http r = run(t, R"({"branches":[
      {"participant":"a0","statements":[{"sql":"UPDATE accounts SET balance = balance - 100 WHERE id = 1","expect_rows":1}]},
      {"participant":"a1","statements":[{"sql":"UPDATE accounts SET balance = balance + 100 WHERE id = 999","expect_rows":1}]}]})");
  INFO(t.logs());
  CHECK_MESSAGE(r.status == 409, r.describe());
  CHECK(r.state() == "aborted");
  CHECK(r.body["branch"] == "a1");
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.total() == Testbed::kTotal);
  // One branch alone (one-phase commit) is refused the same way.
  Http one = run(t, R"({"branches":[{"participant":"a0","statements":[
      {"sql":"UPDATE accounts SET balance = balance - 100 WHERE id = 1"},
      {"sql":"DELETE FROM accounts WHERE id = 999","expect_rows":1}]}]})");
  CHECK(one.status >= 400);
  CHECK(one.state() == "aborted");
  CHECK(t.balance(0, 1) == 1000);
  t.check_invariants();
}

TEST_CASE("unknown fields and repeated keys are refused with 400 naming the field") {
  Testbed& t = Testbed::fresh();
  auto refused = [](const Http& h, const std::string& field) {
    CAPTURE(h.describe());
    CHECK(h.status == 400);
    CHECK(h.body["error"]["code"] == "invalid_argument");
    CHECK(h.body["error"]["message"].get<std::string>().find(field) != std::string::npos);
  };
  refused(t.coord("POST", "/v1/transactions", R"({"protocl":"3pc"})"), "protocl");
  refused(t.coord("POST", "/v1/transactions", R"({"protocol":"2pc","protocol":"3pc"})"),
          "duplicate key");
  std::string gid = t.begin();
  refused(t.agent(0, "POST", exec_path(gid), R"({"sql":"SELECT $1","parms":[1]})"), "parms");
  refused(t.agent(0, "POST", "/v1/branches/" + gid + "/abort", R"({"why":"x"})"), "why");
  refused(t.coord("POST", "/v1/transactions/" + gid + "/abort", R"({"why":"x"})"), "why");
  refused(t.coord("POST", "/v1/transactions/" + gid + "/commit", R"({"wiat":"decision"})"), "wiat");
  refused(
      run(t, R"({"branches":[{"participant":"a0","statements":[{"sql":"SELECT 1","parms":[]}]}]})"),
      "parms");
  CHECK(t.abort(gid).status == 200);
  t.check_invariants();
}

TEST_CASE(
    "error bodies cut echoed input and carry no library text; 405 lists the allowed methods") {
  Testbed& t = Testbed::fresh();
  std::string long_gid(3'000, 'x');
  Http g = t.coord("GET", "/v1/transactions/" + long_gid);
  CHECK(g.status == 400);
  CHECK(g.raw.size() < 400);
  Http a = t.agent(0, "GET", "/v1/branches/" + long_gid);
  CHECK(a.status == 400);
  CHECK(a.raw.size() < 400);
  Http huge = t.coord("POST", "/v1/transactions", R"({"timeout_ms":1e999})");
  CHECK(huge.status == 400);
  CHECK(huge.raw.find("json.exception") == std::string::npos);

  CHECK(allow(t.coordinator_url(), "DELETE", "/v1/transactions") == "GET, POST");
  CHECK(allow(t.coordinator_url(), "GET", "/v1/transactions/run") == "POST");
  CHECK(allow(t.coordinator_url(), "POST", "/v1/in-doubt") == "GET");
  CHECK(allow(t.agent_url(0), "POST", "/v1/in-doubt") == "GET");
  CHECK(allow(t.agent_url(0), "GET", "/v1/branches/c1-1-1/exec") == "POST");
  t.check_invariants();
}
