// Best-effort notifications end to end (docs/DESIGN.md §10.3): a real coordinator, the banks'
// agents and a tpc-http-participant as the receiver. Covered: a standalone notification
// delivered and then listed; one to a receiver that is down, given up after its attempts, which
// the receiver then reconciles through GET; "notify" on a 2PC transaction, a saga and a
// transactional message, each telling its final state; a notification still pending when the
// coordinator is killed, delivered after its restart; bad requests refused.
#include <doctest/doctest.h>

#include "tests/integration/ops.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// The receiver's notifications, oldest first.
Json received(Testbed& t) {
  Http r = t.http_participant("GET", "/notify");
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  return r.body["received"];
}

// The notifications received with this body "gid".
std::vector<Json> received_for(Testbed& t, const std::string& gid) {
  std::vector<Json> out;
  for (auto& r : received(t))
    if (r["body"].value("gid", "") == gid) out.push_back(r);
  return out;
}

Json receiver(Testbed& t) {
  return {{"url", t.http_participant_url().to_string() + "/notify"}};
}

// A URL nobody listens on: the port of a socket bound and closed.
std::string dead_url() {
  return "http://127.0.0.1:" + std::to_string(free_port()) + "/hook";
}

Http notification(Testbed& t, const std::string& id) {
  return t.coord("GET", "/v1/notifications/" + id);
}

bool ended(Testbed& t, const std::string& id, const std::string& state) {
  return eventually([&] { return notification(t, id).state() == state; }, 20'000);
}

}  // namespace

TEST_CASE("a notification is logged, delivered once, and listed") {
  Testbed& t = bed();
  Json req = receiver(t);
  req["body"] = {{"order", 7}};
  Http r = t.coord("POST", "/v1/notifications", dump(req));
  REQUIRE_MESSAGE(r.status == 201, r.describe());
  CHECK(r.state() == "pending");
  std::string id = r.body["id"].get<std::string>();
  REQUIRE(ended(t, id, "delivered"));
  Http g = notification(t, id);
  INFO(g.describe());
  CHECK(g.body["attempts"] == 1);
  CHECK(g.body["body"] == Json{{"order", 7}});
  Json got = received(t);
  REQUIRE(got.size() == 1);
  CHECK(got[0]["id"] == id);
  CHECK(got[0]["op"] == "notify");
  CHECK(got[0]["body"] == Json{{"order", 7}});
  Http list = t.coord("GET", "/v1/notifications?state=delivered&limit=10");
  REQUIRE(list.status == 200);
  REQUIRE(list.body["notifications"].size() == 1);
  CHECK(list.body["notifications"][0]["id"] == id);
  CHECK(t.coord("GET", "/v1/notifications?state=given_up").body["notifications"].empty());
  // Not a transaction: listed apart, and commit is refused.
  for (auto& v : t.coord("GET", "/v1/transactions").body["transactions"]) CHECK(v["gid"] != id);
  CHECK(t.commit(id).status == 409);
  Http m = t.coord("GET", "/metrics");
  CHECK(m.metric("tpc_coordinator_notifications_total{outcome=\"delivered\"}") == 1);
  CHECK(m.metric("tpc_coordinator_notifications_pending") == 0);
}

TEST_CASE("a receiver that is down: given up after its attempts, then it reconciles by GET") {
  Testbed& t = bed();
  Json req = {{"url", dead_url()}, {"body", {{"order", 8}}}, {"max_attempts", 3}};
  Http r = t.coord("POST", "/v1/notifications", dump(req));
  REQUIRE_MESSAGE(r.status == 201, r.describe());
  std::string id = r.body["id"].get<std::string>();
  REQUIRE(ended(t, id, "given_up"));
  CHECK(t.coord("GET", "/metrics")
            .metric("tpc_coordinator_notifications_total{outcome=\"given_up\"}") == 1);
  Http g = notification(t, id);
  INFO(g.describe());
  CHECK(g.body["attempts"] == 3);
  CHECK(g.body["reason"] == "attempts");
  CHECK(g.body["last_error"].get<std::string>().find("Connection refused") != std::string::npos);
  CHECK(g.body["body"] == Json{{"order", 8}});  // what the receiver missed
  std::string out;
  CHECK(ctl(t, {"notifications", "--state", "given_up"}, &out) == 0);
  CHECK(out.find(id) != std::string::npos);
  CHECK(out.find("attempts") != std::string::npos);  // the reason column
  CHECK(ctl(t, {"show", id}, &out) == 0);
  CHECK(out.find("given_up") != std::string::npos);
  CHECK(out.find("Connection refused") != std::string::npos);
  // The answer stays after a restart: the receiver may ask any time within the retention.
  t.stop_coordinator();
  t.start_coordinator();
  CHECK(notification(t, id).state() == "given_up");
  // An id that is not a notification's: 404.
  std::string gid = t.begin();
  CHECK(notification(t, gid).status == 404);
  CHECK(t.coord("GET", "/v1/notifications/c1-1-999999").status == 404);
}

TEST_CASE("\"notify\" on a 2PC transaction, a saga and a message tells each one's final state") {
  Testbed& t = bed();
  // 2PC, committed.
  Http b =
      t.coord("POST", "/v1/transactions", dump(Json{{"protocol", "2pc"}, {"notify", receiver(t)}}));
  REQUIRE_MESSAGE(b.status == 201, b.describe());
  std::string xa = b.body["gid"].get<std::string>();
  REQUIRE(t.move(0, xa, 1, -10).status == 200);
  REQUIRE(t.move(1, xa, 1, 10).status == 200);
  REQUIRE(t.commit(xa).status == 200);
  // 2PC, aborted by its client: no record of its own, told all the same.
  b = t.coord("POST", "/v1/transactions", dump(Json{{"protocol", "2pc"}, {"notify", receiver(t)}}));
  std::string dropped = b.body["gid"].get<std::string>();
  REQUIRE(t.abort(dropped).status == 200);
  // A saga whose step fails: aborted.
  Json saga = {{"protocol", "saga"},
               {"steps", Json::array({http_step(t, "ship", "nobody", 1)})},
               {"notify", receiver(t)}};
  Http s = t.coord("POST", "/v1/transactions/run", dump(saga));
  REQUIRE_MESSAGE(s.status == 409, s.describe());
  std::string sg = s.body["gid"].get<std::string>();
  // A message sent with its local op: committed once delivered.
  Json msg = {
      {"protocol", "msg"},
      {"local",
       sql_op(0, Json::array({stmt("UPDATE accounts SET balance = balance - 5 WHERE id = 2",
                                   Json::array(), 1)}))},
      {"destinations", Json::array({sql_op(1, Json::array({stmt("UPDATE accounts SET balance = "
                                                                "balance + 5 WHERE id = 2",
                                                                Json::array(), 1)}))})},
      {"notify", receiver(t)}};
  Http mr = t.coord("POST", "/v1/transactions/run", dump(msg));
  REQUIRE_MESSAGE(mr.status == 200, mr.describe());
  std::string ms = mr.body["gid"].get<std::string>();
  struct Want {
    std::string gid, protocol, state;
  };
  for (const Want& w : {Want{xa, "2pc", "committed"}, Want{dropped, "2pc", "aborted"},
                        Want{sg, "saga", "aborted"}, Want{ms, "msg", "committed"}}) {
    CAPTURE(w.gid);
    REQUIRE(eventually([&] { return received_for(t, w.gid).size() == 1; }, 20'000));
    Json n = received_for(t, w.gid)[0];
    CHECK(n["body"] == Json{{"gid", w.gid}, {"protocol", w.protocol}, {"state", w.state}});
    // The notification is there to be asked about, and so is the transaction.
    CHECK(ended(t, n["id"].get<std::string>(), "delivered"));
    CHECK(t.get(w.gid).state() == w.state);
  }
  check_all(t);
}

TEST_CASE("a pending notification survives a kill -9 of the coordinator") {
  Testbed& t = bed();
  Json req = {{"url", dead_url()}, {"body", {{"order", 9}}}, {"max_attempts", 1000}};
  Http r = t.coord("POST", "/v1/notifications", dump(req));
  REQUIRE_MESSAGE(r.status == 201, r.describe());
  std::string id = r.body["id"].get<std::string>();
  REQUIRE(eventually([&] { return notification(t, id).body.value("attempts", 0) >= 2; }, 10'000));
  t.stop_coordinator();  // SIGKILL
  t.start_coordinator();
  Http g = notification(t, id);
  CHECK(g.state() == "pending");
  CHECK(g.body["body"] == Json{{"order", 9}});
  CHECK(t.coord("GET", "/metrics").metric("tpc_coordinator_notifications_pending") == 1);
}

TEST_CASE("bad notification requests are refused 400 and log nothing") {
  Testbed& t = bed();
  for (const char* body :
       {"", "{}", R"({"url":"ftp://x/"})", R"({"url":"http://127.0.0.1:1/","max_attempts":0})",
        R"({"participant":"a0","statements":[]})", R"({"url":"http://127.0.0.1:1/","extra":1})"}) {
    CAPTURE(body);
    Http r = t.coord("POST", "/v1/notifications", body);
    CHECK_MESSAGE(r.status == 400, r.describe());
  }
  CHECK(t.coord("GET", "/v1/notifications?state=sideways").status == 400);
  CHECK(t.coord("GET", "/v1/notifications/not-an-id").status == 400);
  CHECK(t.coord("GET", "/v1/notifications").body["notifications"].empty());
  Http n = t.coord("POST", "/v1/transactions",
                   dump(Json{{"protocol", "2pc"}, {"notify", {{"participant", "a0"}}}}));
  CHECK_MESSAGE(n.status == 400, n.describe());
}
