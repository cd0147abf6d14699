// Bad input against the real services: every malformed, oversized, unauthorised or
// out-of-place request gets the status and JSON error of docs/DESIGN.md §3, and leaves every
// transaction exactly as it was (checked by committing the transaction afterwards and
// counting the money).
#include <doctest/doctest.h>

#include "common/http_client.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

void expect_error(const Http& r, int status, const std::string& code) {
  INFO(r.describe());
  CHECK(r.status == status);
  REQUIRE(r.body.is_object());
  REQUIRE(r.body.contains("error"));
  CHECK(r.body["error"]["code"] == code);
  CHECK(r.body["error"]["message"].is_string());
}

}  // namespace

TEST_CASE("bad requests to the coordinator are refused with a JSON error and change nothing") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);

  expect_error(t.coord("POST", "/v1/transactions", "{\"protocol\":"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", "[1,2]"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", R"({"protocol":5})"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", R"({"protocol":"4pc"})"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", R"({"timeout_ms":"soon"})"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", R"({"timeout_ms":-1})"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions", std::string(2 << 20, ' ')), 413, "too_large");
  expect_error(t.coord("GET", "/v1/transactions/c9-1-1"), 404, "not_found");
  expect_error(t.coord("GET", "/v1/transactions/c1-999999999999999999-1"), 404, "not_found");
  expect_error(t.coord("GET", "/v1/transactions/c1-1-1%27%3B--"), 400, "invalid_argument");
  expect_error(t.coord("GET", "/v1/transactions/..%2F..%2Fetc"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/c9-1-1/commit"), 404, "not_found");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/commit", R"({"wait":7})"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/commit", "{{{"), 400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/branches", R"({"participant":"x"})"), 400,
               "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/branches",
                       R"({"participant":"x y","url":"http://h:1"})"),
               400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/branches",
                       R"x({"participant":"x","url":"javascript:alert(1)"})x"),
               400, "invalid_argument");
  expect_error(t.coord("POST", "/v1/transactions/" + gid + "/frobnicate"), 404, "not_found");
  expect_error(t.coord("GET", "/v1/nothing"), 404, "not_found");
  expect_error(t.coord("DELETE", "/v1/transactions/" + gid), 405, "method_not_allowed");
  expect_error(t.coord("GET", "/v1/transactions?state=sideways"), 400, "invalid_argument");
  expect_error(t.coord("GET", "/v1/transactions?limit=0"), 400, "invalid_argument");
  expect_error(t.coord("GET", "/v1/transactions?limit=x"), 400, "invalid_argument");

  // The transaction is untouched: still active, and it commits once.
  CHECK(t.get(gid).state() == "active");
  Http c = t.commit(gid);
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("bad requests to an agent are refused with a JSON error and change nothing") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);
  std::string base = "/v1/branches/" + gid;

  expect_error(t.agent(0, "POST", base + "/exec", "{\"sql\":"), 400, "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", "{}"), 400, "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", R"({"sql":42})"), 400, "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", R"({"sql":"SELECT 1","params":{"a":1}})"), 400,
               "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", R"({"sql":"SELECT $1","params":[[1]]})"), 400,
               "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", R"({"sql":"SELECT 1","statements":[]})"), 400,
               "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec", R"({"sql":"SELECT 1","prepare":"yes"})"), 400,
               "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/exec",
                       R"({"sql":"SELECT 1","x":")" + std::string(2 << 20, 'x') + "\"}"),
               413, "too_large");
  expect_error(t.agent(0, "POST", base + "/prepare", R"({"protocol":true})"), 400, "invalid_argument");
  expect_error(t.agent(0, "POST", base + "/commit", R"({"one_phase":"please"})"), 400, "invalid_argument");
  expect_error(t.agent(0, "POST", "/v1/branches/c1-1-1%27%3BDROP/exec", R"({"sql":"SELECT 1"})"), 400,
               "invalid_argument");
  expect_error(t.agent(0, "POST", "/v1/branches/zz-1-1/exec", R"({"sql":"SELECT 1"})"), 404, "not_found");
  expect_error(t.agent(0, "POST", base + "/explode"), 404, "not_found");
  expect_error(t.agent(0, "GET", "/v1/branches?state=wobbly"), 400, "invalid_argument");
  // Statements of an active 2PC branch cannot be committed without prepare.
  expect_error(t.agent(0, "POST", base + "/commit"), 409, "conflict");

  // A parameter that looks like SQL stays data.
  Http inj = t.exec(0, gid, "SELECT $1::text AS v", Json::array({"1'; DROP TABLE accounts; --"}));
  REQUIRE_MESSAGE(inj.status == 200, inj.describe());
  CHECK(inj.body["results"][0]["rows"][0][0] == "1'; DROP TABLE accounts; --");
  Http nul = t.exec(0, gid, "SELECT $1::text IS NULL AS v", Json::array({nullptr}));
  CHECK(nul.body["results"][0]["rows"][0][0] == "t");

  CHECK(t.agent(0, "GET", base).state() == "active");
  Http c = t.commit(gid);
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("with --token every request but /healthz needs the bearer token") {
  Testbed::Options o;
  o.coordinator_args = {"--token", "s3cret", "--participant-token", "agent-key"};
  o.agent_args = {"--token", "agent-key", "--coordinator-token", "s3cret"};
  Testbed& t = Testbed::fresh(o);
  CHECK(t.coord("GET", "/healthz").status == 200);
  expect_error(t.coord("POST", "/v1/transactions"), 401, "unauthorized");
  expect_error(t.call(t.coordinator_url(), "POST", "/v1/transactions", "", 5'000,
                      {{"authorization", "Bearer wrong"}}),
               401, "unauthorized");
  expect_error(t.agent(0, "GET", "/v1/branches"), 401, "unauthorized");
  Http b = t.call(t.coordinator_url(), "POST", "/v1/transactions", "", 5'000,
                  {{"authorization", "Bearer s3cret"}});
  REQUIRE_MESSAGE(b.status == 201, b.describe());
  std::string gid = b.body["gid"];
  auto agent_call = [&](int i, const std::string& sql, Json params) {
    return t.call(t.agent_url(i), "POST", "/v1/branches/" + gid + "/exec",
                  dump(Json{{"sql", sql}, {"params", params}}), 5'000,
                  {{"authorization", "Bearer agent-key"}});
  };
  REQUIRE(agent_call(0, "UPDATE accounts SET balance = balance - 1 WHERE id = 1", Json::array()).status == 200);
  REQUIRE(agent_call(1, "UPDATE accounts SET balance = balance + 1 WHERE id = 1", Json::array()).status == 200);
  Http c = t.call(t.coordinator_url(), "POST", "/v1/transactions/" + gid + "/commit", "", 10'000,
                  {{"authorization", "Bearer s3cret"}});
  CHECK_MESSAGE(c.status == 200, c.describe());
  CHECK(t.balance(1, 1) == 1001);
  t.check_invariants();
}

TEST_CASE("past --branches-max an agent answers 503 with Retry-After; open branches go on") {
  Testbed::Options o;
  o.agent_args = {"--branches-max", "2"};
  Testbed& t = Testbed::fresh(o);
  std::string g1 = t.begin(), g2 = t.begin(), g3 = t.begin();
  REQUIRE(t.move(0, g1, 1, -1).status == 200);
  REQUIRE(t.move(0, g2, 2, -1).status == 200);
  HttpRequest req;
  req.method = "POST";
  req.target = "/v1/branches/" + g3 + "/exec";
  req.body = R"({"sql":"UPDATE accounts SET balance = balance - 1 WHERE id = 3"})";
  HttpResult raw = http_call(t.agent_url(0), req, 5'000);
  CHECK(raw.http_status == 503);
  CHECK(raw.header("retry-after") == "1");
  REQUIRE(t.move(1, g1, 1, 1).status == 200);
  REQUIRE(t.commit(g1).status == 200);  // frees a slot
  CHECK(t.move(0, g3, 3, -1).status == 200);
  REQUIRE(t.abort(g2).status == 200);
  REQUIRE(t.abort(g3).status == 200);
  CHECK(t.balance(0, 2) == 1000);
  CHECK(t.balance(0, 3) == 1000);
  t.check_invariants();
}

TEST_CASE("oversized results fail the statement instead of exhausting memory") {
  Testbed::Options o;
  o.agent_args = {"--result-rows-max", "5"};
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  Http r = t.exec(0, gid, "SELECT * FROM accounts");
  CHECK_MESSAGE(r.status == 422, r.describe());
  CHECK(r.body["error"]["sqlstate"] == "54000");
  Http c = t.commit(gid);
  CHECK(c.status == 409);
  t.check_invariants();
}
