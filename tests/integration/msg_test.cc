// Transactional (half) messages end to end (docs/DESIGN.md §10.1): two real PostgreSQL
// clusters behind their agents, a real tpc-http-participant, and a coordinator killed with
// SIGKILL at its message failpoints. The producer takes 150 from bank a's account 1 in its
// local transaction; the message gives 100 to bank b's account 1 (a SQL destination, applied
// once through the barrier) and 50 to the participant's wallet (an HTTP destination). Covered:
// check-back in its three cases, through the agent and through an HTTP op (local committed →
// delivered; never ran → fenced and aborted; the local transaction arriving after the fence →
// refused), the producer's commit and abort, the one-request form, and crashes before and during
// delivery. Every case ends with check_all(): the money all there, nothing prepared, the
// barrier rows purged.
#include <doctest/doctest.h>

#include "tests/integration/ops.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

constexpr int64_t kLocal = 150, kToBank = 100, kToWallet = 50;

Json local_statements() {
  return Json::array(
      {stmt("UPDATE accounts SET balance = balance - $1 WHERE id = 1", {kLocal}, 1)});
}

Json destinations(Testbed& t) {
  return Json::array(
      {sql_op(1, Json::array({stmt("UPDATE accounts SET balance = balance + $1 WHERE id = 1",
                                   {kToBank}, 1)})),
       http_op(t, "/msg/deliver", {{"account", "w"}, {"delta", kToWallet}})});
}

// A half message checked back through bank a's agent, or through the participant's /msg/check.
Json half_message(Testbed& t, bool agent_check, int64_t timeout_ms) {
  Json check = agent_check ? Json{{"participant", Testbed::agent_name(0)}}
                           : http_op(t, "/msg/check", Json::object());
  return {{"protocol", "msg"},
          {"destinations", destinations(t)},
          {"check", std::move(check)},
          {"timeout_ms", timeout_ms}};
}

std::string begin_msg(Testbed& t, const Json& body) {
  Http r = t.coord("POST", "/v1/transactions", dump(body));
  REQUIRE_MESSAGE(r.status == 201, r.describe());
  CHECK(r.state() == "prepared");
  CHECK(r.body["protocol"] == "msg");
  return r.body["gid"].get<std::string>();
}

// The producer's local transaction through bank a's agent (branch "local", op "local").
Http local_at_agent(Testbed& t, const std::string& gid) {
  Json body = {{"branch", "local"}, {"op", "local"}, {"statements", local_statements()}};
  return t.agent(0, "POST", "/v1/branches/" + gid + "/step", dump(body));
}

// The producer's local transaction at the participant: the wallet pays kLocal instead.
Http local_at_participant(Testbed& t, const std::string& gid) {
  return t.http_participant("POST", "/msg/local", dump(Json{{"account", "w"}, {"delta", -kLocal}}),
                            {{"Tpc-Gid", gid}, {"Tpc-Branch", "local"}, {"Tpc-Op", "local"}});
}

// Delivered: bank b and the wallet got the message once; `wallet_paid`: the local transaction
// was the participant's.
void check_delivered(Testbed& t, const std::string& gid, bool wallet_paid) {
  REQUIRE(t.wait_state(gid, "committed"));
  Http g = t.get(gid);
  INFO(g.describe());
  REQUIRE(g.body["destinations"].size() == 2);
  for (auto& d : g.body["destinations"]) CHECK(d["state"] == "delivered");
  CHECK(t.balance(1, 1) == Testbed::kInitial + kToBank);
  int64_t w = kWallet + kToWallet - (wallet_paid ? kLocal : 0);
  CHECK(wallet(t)["balance"] == w);
  if (!wallet_paid) CHECK(t.balance(0, 1) == Testbed::kInitial - kLocal);
  int deliveries = 0;
  for (auto& c : calls(t, gid))
    if (c["op"] == "deliver" && c["status"] == 200 && !c["replayed"].get<bool>()) ++deliveries;
  CHECK(deliveries == 1);
}

// Aborted: no destination was called.
void check_not_delivered(Testbed& t, const std::string& gid, const std::string& reason) {
  REQUIRE(t.wait_state(gid, "aborted"));
  Http g = t.get(gid);
  INFO(g.describe());
  CHECK(g.body["reason"] == reason);
  for (auto& d : g.body["destinations"]) CHECK(d["state"] == "pending");
  for (auto& c : calls(t, gid)) CHECK(c["op"] != "deliver");
}

// Nothing moved in either bank.
void check_untouched(Testbed& t) {
  CHECK(t.balance(0, 1) == Testbed::kInitial);
  CHECK(t.balance(1, 1) == Testbed::kInitial);
}

}  // namespace

// --- check-back ------------------------------------------------------------------------------

TEST_CASE("check-back through the agent: a local transaction that committed is delivered") {
  Testbed& t = bed();
  std::string gid = begin_msg(t, half_message(t, true, 400));
  Http local = local_at_agent(t, gid);
  REQUIRE_MESSAGE(local.status == 200, local.describe());
  CHECK(local.body["barrier"] == "applied");
  // The producer never commits: its check-back finds the local transaction committed.
  check_delivered(t, gid, false);
  Http g = t.get(gid);
  CHECK(g.body["local"]["state"] == "done");
  CHECK(g.body["local"]["result"]["barrier"] == "committed");
  CHECK(steps_metric(t, 0, "committed") >= 1);
  // A resend of the local transaction never applies twice: a duplicate while its barrier row
  // is kept, refused once the coordinator reported the message finished.
  Http late = local_at_agent(t, gid);
  CHECK_MESSAGE((late.status == 409 || late.body["barrier"] == "duplicate"), late.describe());
  CHECK(t.balance(0, 1) == Testbed::kInitial - kLocal);
  check_all(t);
}

TEST_CASE(
    "check-back through the agent: a local transaction that never ran is fenced, and a "
    "late one refused") {
  Testbed& t = bed();
  std::string gid = begin_msg(t, half_message(t, true, 300));
  check_not_delivered(t, gid, "not_committed");
  check_untouched(t);
  CHECK(t.get(gid).body["local"]["last_error"].get<std::string>().find("fenced") !=
        std::string::npos);
  CHECK(steps_metric(t, 0, "fenced") >= 1);
  // The producer's local transaction comes late: refused, nothing applied.
  Http late = local_at_agent(t, gid);
  CHECK_MESSAGE(late.status == 409, late.describe());
  CHECK(t.balance(0, 1) == Testbed::kInitial);
  check_all(t);
}

TEST_CASE("check-back at the agent writes the local op's barrier row in its own name") {
  // The purge is slow here so that the fence row can be read.
  Testbed::Options o;
  o.agent_args = {"--purge-interval-ms", "60000"};
  Testbed& t = bed(o);
  std::string gid = begin_msg(t, half_message(t, true, 200));
  REQUIRE(t.wait_state(gid, "aborted"));
  auto row = query_value(t.conninfo(0), "SELECT written_by FROM tpc_barrier WHERE gid = '" + gid +
                                            "' AND branch = 'local' AND op = 'local'");
  REQUIRE(row.ok());
  CHECK(row->value_or("") == "check");
  Http late = local_at_agent(t, gid);
  CHECK_MESSAGE(late.status == 409, late.describe());
  CHECK(t.balance(0, 1) == Testbed::kInitial);
}

TEST_CASE("check-back through an HTTP op: committed is delivered, not committed is aborted") {
  Testbed& t = bed();
  std::string yes = begin_msg(t, half_message(t, false, 300));
  Http local = local_at_participant(t, yes);
  REQUIRE_MESSAGE(local.status == 200, local.describe());
  std::string no = begin_msg(t, half_message(t, false, 300));
  check_delivered(t, yes, true);
  REQUIRE(t.wait_state(no, "aborted"));
  CHECK(t.get(no).body["reason"] == "not_committed");
  // The participant fenced its own local transaction of `no`: a late one is refused.
  Http late = local_at_participant(t, no);
  CHECK_MESSAGE(late.status == 409, late.describe());
  Json checks = Json::array();
  for (auto& c : calls(t, yes))
    if (c["op"] == "check") checks.push_back(c);
  REQUIRE(checks.size() >= 1);
  CHECK(checks[0]["branch"] == "local");
  check_all(t);
}

// --- the producer decides --------------------------------------------------------------------

TEST_CASE("the producer commits after its local transaction, or aborts: no check-back") {
  Testbed& t = bed();
  std::string gid = begin_msg(t, half_message(t, true, 60'000));
  REQUIRE(local_at_agent(t, gid).status == 200);
  Http c = t.commit(gid);
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK((c.state() == "committing" || c.state() == "committed"));
  check_delivered(t, gid, false);
  Http again = t.commit(gid);
  CHECK(again.status == 200);
  CHECK(t.abort(gid).status == 409);

  std::string dropped = begin_msg(t, half_message(t, true, 60'000));
  Http a = t.abort(dropped);
  REQUIRE_MESSAGE(a.status == 200, a.describe());
  CHECK(a.state() == "aborted");
  check_not_delivered(t, dropped, "client");
  CHECK(t.commit(dropped).status == 409);
  CHECK(steps_metric(t, 0, "fenced") == 0);  // nobody needed to ask
  check_all(t);
}

TEST_CASE("one request: the local transaction and the message, decided by its answer") {
  Testbed& t = bed();
  Json body = {{"protocol", "msg"},
               {"local", sql_op(0, local_statements())},
               {"destinations", destinations(t)}};
  Http r = t.coord("POST", "/v1/transactions/run", dump(body));
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  CHECK((r.state() == "committing" || r.state() == "committed"));
  std::string gid = r.body["gid"].get<std::string>();
  check_delivered(t, gid, false);
  CHECK(t.get(gid).body["local"]["result"]["barrier"] == "applied");
  // Listed by protocol, over the API and by tpcctl.
  std::string other = t.begin();
  Http msgs = t.coord("GET", "/v1/transactions?protocol=msg");
  REQUIRE_MESSAGE(msgs.status == 200, msgs.describe());
  REQUIRE(msgs.body["transactions"].size() == 1);
  CHECK(msgs.body["transactions"][0]["gid"] == gid);
  CHECK(t.coord("GET", "/v1/transactions?protocol=notify").status == 400);
  std::string out;
  CHECK(ctl(t, {"list", "--protocol", "msg"}, &out) == 0);
  CHECK(out.find(gid) != std::string::npos);
  CHECK(out.find(other) == std::string::npos);
  REQUIRE(t.abort(other).status == 200);

  // A local transaction that fails (account 999 does not exist): aborted, nothing delivered.
  body["local"] = sql_op(
      0, Json::array(
             {stmt("UPDATE accounts SET balance = balance - $1 WHERE id = 999", {kLocal}, 1)}));
  Http f = t.coord("POST", "/v1/transactions/run", dump(body));
  REQUIRE_MESSAGE(f.status == 409, f.describe());
  CHECK(f.state() == "aborted");
  CHECK(f.body["reason"] == "local_failed");
  std::string failed = f.body["gid"].get<std::string>();
  for (auto& c : calls(t, failed)) CHECK(c["op"] != "deliver");
  CHECK(t.balance(0, 1) == Testbed::kInitial - kLocal);
  check_all(t);
}

// --- crashes ---------------------------------------------------------------------------------

TEST_CASE("a coordinator killed once the commit is logged delivers after its restart") {
  for (std::string fp : {"coord.after_msg_commit_logged", "coord.after_first_delivery"}) {
    CAPTURE(fp);
    Testbed::Options o;
    o.coordinator_failpoints = fp + "=crash";
    Testbed& t = bed(o);
    std::string gid = begin_msg(t, half_message(t, true, 60'000));
    REQUIRE(local_at_agent(t, gid).status == 200);
    if (fp == "coord.after_msg_commit_logged") {
      crashed(t, t.commit(gid));
    } else {  // the commit is answered once durable, and the first delivery's answer may come
              // before that answer is written out: either way the process dies
      Http c = t.commit(gid);
      CHECK_MESSAGE((c.status == 200 || !c.transport.ok()), c.describe());
      REQUIRE(t.coordinator_process().wait(10'000) >= 0);
    }
    t.start_coordinator();
    check_delivered(t, gid, false);
    check_all(t);
  }
}

TEST_CASE("a coordinator killed with the half message logged settles it by check-back") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_half_logged=crash";
  Testbed& t = bed(o);
  // One request: the half message is durable, the local transaction was never sent.
  Json body = {{"protocol", "msg"},
               {"local", sql_op(0, local_statements())},
               {"destinations", destinations(t)},
               {"timeout_ms", 500}};
  crashed(t, t.coord("POST", "/v1/transactions/run", dump(body)));
  t.start_coordinator();
  std::string gid = only_gid(t);
  check_not_delivered(t, gid, "not_committed");
  check_untouched(t);
  // The client's retry of its local transaction under that gid is refused: fenced.
  Http late = local_at_agent(t, gid);
  CHECK_MESSAGE(late.status == 409, late.describe());
  CHECK(t.balance(0, 1) == Testbed::kInitial);
  check_all(t);
}

// --- operators -------------------------------------------------------------------------------

TEST_CASE(
    "a destination that keeps failing: in-doubt lists the message, tpcctl shows it, "
    "resolve commit skips it (forced)") {
  Testbed& t = bed();
  set_faults(t, Json::array({{{"path", "/msg/deliver"}, {"mode", "unavailable"}, {"count", -1}}}));
  std::string gid = begin_msg(t, half_message(t, true, 60'000));
  REQUIRE(local_at_agent(t, gid).status == 200);
  REQUIRE(t.commit(gid).status == 200);
  REQUIRE(eventually([&] { return t.get(gid).body["destinations"][1].value("attempts", 0) >= 3; },
                     10'000));
  CHECK(t.get(gid).state() == "committing");
  CHECK(listed_in_doubt(t, gid));
  Http m = t.coord("GET", "/metrics");
  CHECK(m.metric("tpc_coordinator_messages{state=\"committing\"}") == 1);
  CHECK(m.metric("tpc_coordinator_messages{state=\"prepared\"}") == 0);
  CHECK(m.metric("tpc_coordinator_oldest_undelivered_message_seconds") > 0);
  CHECK(m.metric("tpc_coordinator_ops_total{op=\"deliver\",outcome=\"unknown\"}") >= 3);
  CHECK(m.metric("tpc_coordinator_ops_total{op=\"deliver\",outcome=\"ok\"}") == 1);
  std::string out;
  CHECK(ctl(t, {"show", gid}, &out) == 0);
  INFO(out);
  CHECK(out.find("SLOT") != std::string::npos);
  CHECK(out.find("local") != std::string::npos);
  CHECK(out.find("delivered") != std::string::npos);   // d1, bank b
  CHECK(out.find("delivering") != std::string::npos);  // d2, the participant
  CHECK(out.find("503") != std::string::npos);
  CHECK(ctl(t, {"resolve", gid, "abort"}, &out) != 0);  // the commit never changes
  CHECK(ctl(t, {"resolve", gid, "commit"}, &out) == 0);
  REQUIRE(t.wait_state(gid, "committed"));
  Json d2 = t.get(gid).body["destinations"][1];
  CHECK(d2["forced"] == true);
  set_faults(t, Json::array());
  CHECK(t.balance(1, 1) == Testbed::kInitial + kToBank);
  CHECK(wallet(t)["balance"] == kWallet);  // never delivered there: the operator's call
  CHECK(t.total() == Testbed::kTotal - kToWallet);
}
