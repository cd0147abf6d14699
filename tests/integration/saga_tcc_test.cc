// TCC and saga end to end (docs/DESIGN.md §8, §9): two real PostgreSQL clusters behind their
// agents for the SQL ops, a real tpc-http-participant (tools/http_participant.h) for the HTTP
// ops, and a coordinator killed with SIGKILL at each of its TCC and saga failpoints. Covered:
// backward compensation in reverse order, a forward saga retrying an action, recovery after each
// crash, the barrier's duplicate / empty_compensation / barrier_refused answers, TCC
// reservations in accounts.frozen confirmed or released, and a cancel overtaking its try.
// Every case ends with check_all(): no prepared transaction left, the money of both banks and
// the participant all there, nothing frozen, and tpc_barrier purged in both banks.
#include <doctest/doctest.h>

#include <future>
#include <optional>
#include <utility>
#include <vector>

#include "tests/integration/ops.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// --- ops -------------------------------------------------------------------------------------

// A TCC branch reserving `amount` of bank's account `id` in `frozen`: the try freezes it if the
// available balance covers it, the confirm takes it, the cancel releases it.
Json freeze_try(int64_t amount, int id) {
  return Json::array(
      {stmt("UPDATE accounts SET frozen = frozen + $1 WHERE id = $2 AND "
            "balance - frozen >= $1 RETURNING balance, frozen",
            {amount, id}, 1)});
}

Json sql_debit(const std::string& name, int bank, int id, int64_t amount) {
  return {{"branch", name},
          {"try", sql_op(bank, freeze_try(amount, id))},
          {"confirm", sql_op(bank, Json::array({stmt("UPDATE accounts SET balance = balance - $1, "
                                                     "frozen = frozen - $1 WHERE id = $2",
                                                     {amount, id}, 1)}))},
          {"cancel",
           sql_op(bank, Json::array({stmt("UPDATE accounts SET frozen = frozen - $1 WHERE id = $2",
                                          {amount, id}, 1)}))}};
}

// A TCC branch crediting bank's account `id`: the try checks the account is there.
Json sql_credit(const std::string& name, int bank, int id, int64_t amount) {
  return {
      {"branch", name},
      {"try",
       sql_op(bank, Json::array({stmt("SELECT balance FROM accounts WHERE id = $1", {id}, 1)}))},
      {"confirm",
       sql_op(bank, Json::array({stmt("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                      {amount, id}, 1)}))},
      {"cancel", sql_op(bank, Json::array())}};
}

// A TCC branch on the participant's ledger: kind "debit" or "credit".
Json http_tcc(Testbed& t, const std::string& name, const std::string& kind, int64_t amount) {
  Json body = {{"account", "w"}, {"amount", amount}};
  return {{"branch", name},
          {"try", http_op(t, "/tcc/" + kind + "/try", body)},
          {"confirm", http_op(t, "/tcc/" + kind + "/confirm", body)},
          {"cancel", http_op(t, "/tcc/" + kind + "/cancel", body)}};
}

// A saga step adding `delta` to bank's account `id`; its compensation takes it back.
Json sql_step(const std::string& name, int bank, int id, int64_t delta, bool compensate = true) {
  Json s = {
      {"name", name},
      {"action",
       sql_op(bank, Json::array({stmt("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                      {delta, id}, 1)}))}};
  if (compensate)
    s["compensate"] =
        sql_op(bank, Json::array({stmt("UPDATE accounts SET balance = balance - $1 WHERE id = $2",
                                       {delta, id}, 1)}));
  return s;
}

Json saga(Json steps) {
  return {{"protocol", "saga"}, {"steps", std::move(steps)}};
}

// --- requests --------------------------------------------------------------------------------

Http try_branch(Testbed& t, const std::string& gid, const Json& branch) {
  return t.coord("POST", "/v1/transactions/" + gid + "/try", dump(branch));
}

Http run(Testbed& t, const Json& body) {
  return t.coord("POST", "/v1/transactions/run", dump(body));
}

// A step body sent straight to bank's agent, as a late or repeated delivery would arrive.
Http step(Testbed& t, int bank, const std::string& gid, const std::string& branch,
          const std::string& op, const Json& statements) {
  Json body = {{"branch", branch}, {"op", op}, {"statements", statements}};
  return t.agent(bank, "POST", "/v1/branches/" + gid + "/step", dump(body));
}

// An op sent straight to the participant with the headers the coordinator sends.
Http deliver(Testbed& t, const std::string& path, const std::string& gid, const std::string& branch,
             const std::string& op, const Json& body) {
  return t.http_participant("POST", path, dump(body),
                            {{"Tpc-Gid", gid},
                             {"Tpc-Branch", branch},
                             {"Tpc-Op", op},
                             {"Idempotency-Key", gid + "/" + branch + "/" + op}});
}

int64_t frozen(Testbed& t, int bank, int id) {
  auto v =
      query_value(t.conninfo(bank), "SELECT frozen FROM accounts WHERE id = " + std::to_string(id));
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return std::stoll(v->value());
}

// The entry of a branch (TCC) or step (saga) in a view; null when absent.
Json entry(const Http& view, const std::string& name) {
  for (const char* key : {"branches", "steps"})
    if (view.body.contains(key))
      for (auto& b : view.body[key])
        if (b["name"] == name) return b;
  return Json();
}

std::string state_of(Testbed& t, const std::string& gid, const std::string& name) {
  Json e = entry(t.get(gid), name);
  return e.is_object() ? e.value("state", "") : "";
}

}  // namespace

// --- saga ------------------------------------------------------------------------------------

TEST_CASE("a saga whose third step fails compensates the first two, last step first") {
  Testbed& t = bed();
  // Wallet's compensation is held 800 ms at the participant: long enough to see that debit's
  // compensation waits for it.
  set_faults(t, Json::array({{{"path", "/saga/compensate"},
                              {"branch", "wallet"},
                              {"mode", "late"},
                              {"delay_ms", 800}}}));
  Json body = saga(Json::array({sql_step("debit", 0, 1, -100), http_step(t, "wallet", "w", 100),
                                // No such account at the participant: a business failure (409).
                                http_step(t, "ship", "nobody", 1)}));
  body["wait"] = "accepted";
  Http r = run(t, body);
  REQUIRE_MESSAGE(r.status == 202, r.describe());
  CHECK(r.state() == "running");
  std::string gid = r.body["gid"].get<std::string>();

  REQUIRE(eventually(
      [&] {
        for (auto& c : calls(t, gid))
          if (c["branch"] == "wallet" && c["op"] == "compensate") return true;
        return false;
      },
      10'000));
  // Until wallet's compensation is answered, debit's has not run: bank a still shows the debit.
  // (The balance is read before the state, so a debit undone early is always caught.)
  int samples = 0;
  bool debit_undone_early = false;
  bool wallet_done = eventually(
      [&] {
        int64_t balance = t.balance(0, 1);
        if (state_of(t, gid, "wallet") == "compensated") return true;
        ++samples;
        debit_undone_early = debit_undone_early || balance != 900;
        return false;
      },
      10'000);
  CHECK(wallet_done);
  CHECK(samples > 0);
  CHECK_FALSE(debit_undone_early);

  REQUIRE(t.wait_state(gid, "aborted"));
  Http g = t.get(gid);
  INFO(g.describe());
  CHECK(g.body["reason"] == "step_failed");
  CHECK(g.body["step"] == "ship");
  CHECK(entry(g, "ship")["state"] == "compensated");
  CHECK(entry(g, "ship")["last_error"].get<std::string>().find("409") != std::string::npos);
  CHECK(entry(g, "ship")["result"] == Json{{"empty", true}});  // its action never applied
  CHECK(entry(g, "wallet")["state"] == "compensated");
  CHECK(entry(g, "wallet")["result"] == Json{{"undone", 100}});
  CHECK(entry(g, "debit")["state"] == "compensated");
  CHECK(entry(g, "debit")["result"]["barrier"] == "applied");
  CHECK(call_order(calls(t, gid)) == std::vector<std::string>{"wallet/action", "ship/action",
                                                              "ship/compensate",
                                                              "wallet/compensate"});
  CHECK(t.balance(0, 1) == 1000);
  CHECK(wallet(t)["balance"] == kWallet);
  check_all(t);
}

TEST_CASE("a forward saga retries a failing action until it succeeds, and commits") {
  Testbed& t = bed();
  set_faults(t, Json::array({{{"path", "/saga/action"},
                              {"branch", "credit"},
                              {"mode", "unavailable"},
                              {"count", 3}}}));
  // Forward recovery never compensates, so neither step needs a compensation.
  Json body = saga(
      Json::array({sql_step("debit", 0, 2, -50, false), http_step(t, "credit", "w", 50, false)}));
  body["recovery"] = "forward";
  body["retry"] = {{"min_ms", 10}, {"max_ms", 50}};
  Http r = run(t, body);
  INFO(t.logs());
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  CHECK(r.state() == "committed");
  CHECK(r.body["results"]["credit"]["balance"] == kWallet + 50);
  std::string gid = r.body["gid"].get<std::string>();

  Http g = t.get(gid);
  CHECK(g.state() == "committed");
  CHECK(entry(g, "debit")["attempts"] == 1);
  CHECK(entry(g, "credit")["state"] == "done");
  CHECK(entry(g, "credit")["attempts"] == 4);
  Json log = calls(t, gid);
  REQUIRE(log.size() == 4);
  for (int i = 0; i < 4; ++i) {
    CHECK(log[i]["attempt"] == i + 1);
    CHECK(log[i]["status"] == (i < 3 ? 503 : 200));
  }
  CHECK(log[2]["fault"] == "unavailable");
  CHECK_FALSE(log[3].contains("fault"));
  CHECK(t.balance(0, 2) == 950);
  CHECK(wallet(t)["balance"] == kWallet + 50);
  check_all(t);
}

// --- crashes ---------------------------------------------------------------------------------

TEST_CASE("a coordinator killed at a TCC failpoint finishes the transaction after its restart") {
  std::string fp;
  SUBCASE("after_try_registered: the branch is cancelled, its try never sent") {
    fp = "coord.after_try_registered";
  }
  SUBCASE("after_confirm_logged: confirmed") {
    fp = "coord.after_confirm_logged";
  }
  SUBCASE("after_first_confirm: confirmed") {
    fp = "coord.after_first_confirm";
  }
  CAPTURE(fp);
  Testbed::Options o;
  o.coordinator_failpoints = fp + "=crash";
  Testbed& t = bed(o);
  std::string gid = t.begin("tcc");
  Json debit = sql_debit("debit", 0, 1, 100);

  if (fp == "coord.after_try_registered") {
    crashed(t, try_branch(t, gid, debit));
    CHECK(t.barrier_rows(0) == 0);  // registered, not sent
    t.start_coordinator();
    INFO(t.logs());
    REQUIRE(t.wait_state(gid, "aborted"));
    Http g = t.get(gid);
    CHECK(g.body["reason"] == "recovered");
    CHECK(entry(g, "debit")["state"] == "cancelled");
    CHECK(entry(g, "debit")["result"]["barrier"] == "empty_compensation");
    // The try, arriving now, is refused: its cancel ran first.
    Http late = step(t, 0, gid, "debit", "try", debit["try"]["statements"]);
    CHECK_MESSAGE(late.status == 409, late.describe());
    CHECK(late.body["error"]["code"] == "barrier_refused");
    CHECK(frozen(t, 0, 1) == 0);
    CHECK(t.balance(0, 1) == 1000);
    check_all(t);
    return;
  }

  Http d = try_branch(t, gid, debit);
  REQUIRE_MESSAGE(d.status == 200, d.describe());
  Http c = try_branch(t, gid, http_tcc(t, "credit", "credit", 100));
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(frozen(t, 0, 1) == 100);
  crashed(t, t.commit(gid));
  if (fp == "coord.after_confirm_logged") {  // decided, nothing confirmed yet
    CHECK(frozen(t, 0, 1) == 100);
    CHECK(wallet(t)["balance"] == kWallet);
  }
  t.start_coordinator();
  INFO(t.logs());
  REQUIRE(t.wait_state(gid, "committed"));
  Http g = t.get(gid);
  CHECK(entry(g, "debit")["state"] == "confirmed");
  CHECK(entry(g, "credit")["state"] == "confirmed");
  CHECK(t.balance(0, 1) == 900);
  CHECK(frozen(t, 0, 1) == 0);
  CHECK(wallet(t)["balance"] == kWallet + 100);
  Http again = t.commit(gid);
  CHECK_MESSAGE(again.status == 200, again.describe());
  check_all(t);
}

TEST_CASE("a coordinator killed at a saga failpoint finishes the saga after its restart") {
  std::string fp;
  SUBCASE("after_saga_logged: committed") {
    fp = "coord.after_saga_logged";
  }
  SUBCASE("after_first_step_done: committed, the first action applied once") {
    fp = "coord.after_first_step_done";
  }
  SUBCASE("after_compensate_logged: compensated") {
    fp = "coord.after_compensate_logged";
  }
  CAPTURE(fp);
  Testbed::Options o;
  o.coordinator_failpoints = fp + "=crash";
  Testbed& t = bed(o);
  bool fails = fp == "coord.after_compensate_logged";
  Json steps = Json::array({sql_step("debit", 0, 1, -100), http_step(t, "credit", "w", 100)});
  if (fails) steps.push_back(http_step(t, "ship", "nobody", 1));  // 409: unknown account
  crashed(t, run(t, saga(steps)));

  if (fp == "coord.after_saga_logged") {  // durable, no action sent
    CHECK(t.balance(0, 1) == 1000);
    CHECK(t.barrier_rows(0) == 0);
  } else {  // debit applied (and for the failing saga, credit too): nothing compensated yet
    CHECK(t.balance(0, 1) == 900);
    CHECK(wallet(t)["balance"] == (fails ? kWallet + 100 : kWallet));
  }
  t.start_coordinator();
  INFO(t.logs());
  std::string gid = only_gid(t);
  REQUIRE(t.wait_state(gid, fails ? "aborted" : "committed"));
  Http g = t.get(gid);
  if (fails) {
    CHECK(g.body["step"] == "ship");
    for (const char* s : {"debit", "credit", "ship"}) CHECK(entry(g, s)["state"] == "compensated");
    CHECK(t.balance(0, 1) == 1000);
    CHECK(wallet(t)["balance"] == kWallet);
    CHECK(call_order(calls(t, gid)) == std::vector<std::string>{"credit/action", "ship/action",
                                                                "ship/compensate",
                                                                "credit/compensate"});
  } else {
    CHECK(entry(g, "debit")["state"] == "done");
    CHECK(entry(g, "credit")["state"] == "done");
    CHECK(t.balance(0, 1) == 900);
    CHECK(wallet(t)["balance"] == kWallet + 100);
    if (fp == "coord.after_first_step_done")  // sent again after the restart
      CHECK(entry(g, "debit")["result"]["barrier"] == "duplicate");
  }
  check_all(t);
}

// --- the barrier -----------------------------------------------------------------------------

TEST_CASE("resent, late and empty SQL ops: duplicate, empty_compensation, barrier_refused") {
  Testbed& t = bed();
  std::string gid = t.begin("tcc");
  Json debit = sql_debit("debit", 0, 1, 100);
  Http d = try_branch(t, gid, debit);
  REQUIRE_MESSAGE(d.status == 200, d.describe());
  CHECK(d.body["result"]["barrier"] == "applied");
  CHECK(d.body["result"]["results"][0]["rows"][0] == Json::array({"1000", "100"}));
  REQUIRE(try_branch(t, gid, sql_credit("credit", 1, 1, 100)).status == 200);

  // The same try delivered again: answered from the barrier with the first call's results.
  Http again = step(t, 0, gid, "debit", "try", debit["try"]["statements"]);
  REQUIRE_MESSAGE(again.status == 200, again.describe());
  CHECK(again.body["barrier"] == "duplicate");
  CHECK(again.body["results"] == d.body["result"]["results"]);
  CHECK(frozen(t, 0, 1) == 100);  // frozen once

  // A cancel whose try never ran, then that try.
  Json ghost = sql_debit("ghost", 0, 2, 10);
  Http cancel = step(t, 0, gid, "ghost", "cancel", ghost["cancel"]["statements"]);
  REQUIRE_MESSAGE(cancel.status == 200, cancel.describe());
  CHECK(cancel.body["barrier"] == "empty_compensation");
  Http late = step(t, 0, gid, "ghost", "try", ghost["try"]["statements"]);
  CHECK_MESSAGE(late.status == 409, late.describe());
  CHECK(late.body["error"]["code"] == "barrier_refused");
  CHECK(frozen(t, 0, 2) == 0);
  CHECK(steps_metric(t, 0, "duplicate") == 1);
  CHECK(steps_metric(t, 0, "empty_compensation") == 1);
  CHECK(steps_metric(t, 0, "refused") == 1);

  Http c = t.commit(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  check_all(t);  // barrier rows purged, the ghost's included

  // Past the purge the agent still knows the transaction finished: a late try is refused, a
  // late confirm is a duplicate that changes nothing.
  Http late_try = step(t, 0, gid, "debit", "try", debit["try"]["statements"]);
  CHECK_MESSAGE(late_try.status == 409, late_try.describe());
  CHECK(late_try.body["error"]["code"] == "barrier_refused");
  Http late_confirm = step(t, 0, gid, "debit", "confirm", debit["confirm"]["statements"]);
  CHECK_MESSAGE(late_confirm.status == 200, late_confirm.describe());
  CHECK(late_confirm.body["barrier"] == "duplicate");
  CHECK(t.balance(0, 1) == 900);
  CHECK(frozen(t, 0, 1) == 0);
  check_all(t);
}

TEST_CASE("an HTTP try answered 503 after it applied and a confirm answered late apply once") {
  Testbed& t = bed();
  // The try applies, then answers 503 as if the answer were lost; the confirm answers after
  // the coordinator's --message-timeout-ms (2 s), so the coordinator sends it again.
  set_faults(
      t, Json::array({{{"path", "/tcc/credit/try"}, {"mode", "twice"}},
                      {{"path", "/tcc/credit/confirm"}, {"mode", "late"}, {"delay_ms", 2500}}}));
  std::string gid = t.begin("tcc");
  REQUIRE(try_branch(t, gid, sql_debit("debit", 0, 1, 100)).status == 200);
  Http c = try_branch(t, gid, http_tcc(t, "credit", "credit", 100));
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.body["result"] == Json{{"pending", 100}});
  CHECK(entry(t.get(gid), "credit")["attempts"] == 2);

  Http commit = t.commit(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(commit.status == 200, commit.describe());
  CHECK(entry(commit, "credit")["state"] == "confirmed");
  CHECK(entry(commit, "credit")["attempts"] == 2);

  Json log = calls(t, gid);
  REQUIRE(log.size() == 4);
  CHECK(call_order(log) ==
        std::vector<std::string>{"credit/try", "credit/try", "credit/confirm", "credit/confirm"});
  CHECK(log[0]["fault"] == "twice");
  CHECK(log[0]["status"] == 503);
  CHECK(log[1]["replayed"] == true);
  CHECK(log[1]["status"] == 200);
  CHECK(log[2]["fault"] == "late");
  CHECK(log[3]["replayed"] == true);
  CHECK(wallet(t)["balance"] == kWallet + 100);  // credited once
  CHECK(t.balance(0, 1) == 900);
  check_all(t);
}

// --- TCC reservations ------------------------------------------------------------------------

TEST_CASE("a TCC transfer: the try reserves in frozen, the confirm applies it") {
  Testbed& t = bed();
  std::string gid = t.begin("tcc");
  REQUIRE(try_branch(t, gid, sql_debit("debit", 0, 1, 100)).status == 200);
  REQUIRE(try_branch(t, gid, sql_credit("credit", 1, 1, 100)).status == 200);
  CHECK(frozen(t, 0, 1) == 100);
  CHECK(t.balance(0, 1) == 1000);  // reserved, not taken

  // The reservation holds: another transaction cannot freeze what is no longer available.
  std::string other = t.begin("tcc");
  Http greedy = try_branch(t, other, sql_debit("debit", 0, 1, 950));
  CHECK_MESSAGE(greedy.status == 409, greedy.describe());
  CHECK(greedy.body["reason"] == "try_failed");
  REQUIRE(t.wait_state(other, "aborted"));
  CHECK(frozen(t, 0, 1) == 100);

  Http c = t.commit(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  CHECK(c.state() == "committed");
  CHECK(entry(c, "debit")["state"] == "confirmed");
  CHECK(entry(c, "credit")["state"] == "confirmed");
  CHECK(t.balance(0, 1) == 900);
  CHECK(frozen(t, 0, 1) == 0);
  CHECK(t.balance(1, 1) == 1100);
  check_all(t);
}

TEST_CASE("a TCC transfer aborted: each cancel releases its reservation") {
  Testbed& t = bed();
  std::string gid = t.begin("tcc");
  REQUIRE(try_branch(t, gid, sql_debit("debit", 0, 1, 100)).status == 200);
  REQUIRE(try_branch(t, gid, http_tcc(t, "wallet", "debit", 200)).status == 200);
  REQUIRE(try_branch(t, gid, sql_credit("credit", 1, 1, 300)).status == 200);
  CHECK(frozen(t, 0, 1) == 100);
  CHECK(wallet(t)["frozen"] == 200);

  Http a = t.abort(gid);
  INFO(t.logs());
  REQUIRE_MESSAGE(a.status == 200, a.describe());
  CHECK(a.state() == "aborted");
  for (const char* b : {"debit", "wallet", "credit"}) CHECK(entry(a, b)["state"] == "cancelled");
  CHECK(entry(a, "debit")["result"]["barrier"] == "applied");
  CHECK(entry(a, "wallet")["result"] == Json{{"released", 200}});
  CHECK(frozen(t, 0, 1) == 0);
  CHECK(t.balance(0, 1) == 1000);
  CHECK(t.balance(1, 1) == 1000);
  CHECK(wallet(t)["balance"] == kWallet);
  CHECK(t.commit(gid).status == 409);  // the decision never changes
  check_all(t);
}

// --- a cancel before its try -----------------------------------------------------------------

TEST_CASE("a cancel overtakes its try: the cancel is empty and the late try is refused") {
  SUBCASE("SQL: the try is held inside the agent until the cancel has run") {
    Testbed::Options o;
    o.agent_failpoints[0] = "agent.before_step=1*pause";
    Testbed& t = bed(o);
    // An older transaction left open keeps the agents from purging the barrier rows of the
    // next one (they purge below the oldest unfinished gid), so the held try meets its
    // cancel's row however long the test takes to release it.
    std::string holder = t.begin("tcc");
    std::string gid = t.begin("tcc");
    auto tried = std::async(std::launch::async,
                            [&] { return try_branch(t, gid, sql_debit("debit", 0, 1, 100)); });
    REQUIRE(t.wait_log(t.agent_process(0), "failpoint fired name=agent.before_step"));
    Http a = t.abort(gid);
    INFO(t.logs());
    REQUIRE_MESSAGE(a.status == 200, a.describe());
    CHECK(entry(a, "debit")["state"] == "cancelled");
    CHECK(entry(a, "debit")["result"]["barrier"] == "empty_compensation");
    Http try_answer = tried.get();
    CHECK_MESSAGE(try_answer.status == 409, try_answer.describe());
    // Now the held try goes on, and finds its cancel's barrier row.
    Http release = t.agent(0, "POST", "/v1/failpoints", R"({"spec":""})");
    REQUIRE_MESSAGE(release.status == 200, release.describe());
    CHECK(eventually([&] { return steps_metric(t, 0, "refused") == 1; }, 10'000));
    CHECK(steps_metric(t, 0, "applied") == 0);
    CHECK(frozen(t, 0, 1) == 0);
    REQUIRE(t.abort(holder).status == 200);
    check_all(t);
  }
  SUBCASE("HTTP: the participant holds the try without applying it") {
    Testbed& t = bed();
    set_faults(t,
               Json::array({{{"path", "/tcc/debit/try"}, {"mode", "hang"}, {"delay_ms", 10'000}}}));
    std::string gid = t.begin("tcc");
    Json debit = http_tcc(t, "debit", "debit", 100);
    auto tried = std::async(std::launch::async, [&] { return try_branch(t, gid, debit); });
    REQUIRE(eventually([&] { return calls(t, gid).size() == 1; }, 10'000));
    Http a = t.abort(gid);
    INFO(t.logs());
    REQUIRE_MESSAGE(a.status == 200, a.describe());
    CHECK(entry(a, "debit")["state"] == "cancelled");
    CHECK(entry(a, "debit")["result"] == Json{{"empty", true}});
    Http try_answer = tried.get();
    CHECK_MESSAGE(try_answer.status == 409, try_answer.describe());
    // The try arriving now is refused (anti-hanging), and nothing is frozen.
    Http late = deliver(t, "/tcc/debit/try", gid, "debit", "try", debit["try"]["body"]);
    CHECK_MESSAGE(late.status == 409, late.describe());
    CHECK(late.body["error"]["code"] == "cancelled");
    CHECK(wallet(t)["frozen"] == 0);
    check_all(t);
  }
}

int64_t barrier_rows_of(Testbed& t, int bank, const std::string& gid) {
  auto v =
      query_value(t.conninfo(bank), "SELECT count(*) FROM tpc_barrier WHERE gid = '" + gid + "'");
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return std::stoll(v->value());
}

// The agent refuses a late step when it arrives; a try that arrived before its transaction
// finished and is still waiting to run must find its cancel's barrier row when it runs, so
// the agent purges only below the oldest step in flight. An earlier transaction's rows go;
// the held one's stay until its try has been refused.
TEST_CASE("a try held inside the agent while its transaction finishes is refused when it runs") {
  Testbed::Options o;
  o.agent_failpoints[0] = "agent.before_step=1*pause";
  Testbed& t = bed(o);
  std::string earlier = t.begin("tcc");
  std::string gid = t.begin("tcc");
  auto tried = std::async(std::launch::async,
                          [&] { return try_branch(t, gid, sql_debit("debit", 0, 1, 100)); });
  REQUIRE(t.wait_log(t.agent_process(0), "failpoint fired name=agent.before_step"));
  Http a = t.abort(gid);
  REQUIRE_MESSAGE(a.status == 200, a.describe());
  CHECK(tried.get().status == 409);
  Http e = try_branch(t, earlier, sql_debit("debit", 0, 2, 10));
  REQUIRE_MESSAGE(e.status == 200, e.describe());
  Http c = t.abort(earlier);  // its cancel releases what its try froze
  REQUIRE_MESSAGE(c.status == 200, c.describe());
  // Purges run (the earlier transaction's rows go) but stop below the held try's gid.
  REQUIRE(eventually([&] { return barrier_rows_of(t, 0, earlier) == 0; }, 20'000));
  CHECK(barrier_rows_of(t, 0, gid) > 0);
  Http release = t.agent(0, "POST", "/v1/failpoints", R"({"spec":""})");
  REQUIRE_MESSAGE(release.status == 200, release.describe());
  REQUIRE(eventually(
      [&] { return steps_metric(t, 0, "refused") + steps_metric(t, 0, "applied") == 3; }, 10'000));
  INFO(t.logs());
  CHECK(steps_metric(t, 0, "refused") == 1);
  CHECK(frozen(t, 0, 1) == 0);
  check_all(t);
}

// DESIGN.md §9.3 "Views": last_error stays after a later success.
TEST_CASE("a branch's and a step's last_error stay after a later success") {
  Testbed& t = bed();
  set_faults(t, Json::array({{{"path", "/saga/action"}, {"mode", "unavailable"}},
                             {{"path", "/tcc/credit/try"}, {"mode", "unavailable"}}}));
  Http r =
      run(t, saga(Json::array({sql_step("debit", 0, 1, -50), http_step(t, "credit", "w", 50)})));
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  Json credit = entry(r, "credit");
  CHECK(credit["attempts"] == 2);
  CHECK_MESSAGE(credit.value("last_error", "").find("503") != std::string::npos, dump(credit));

  std::string gid = t.begin("tcc");
  REQUIRE(try_branch(t, gid, http_tcc(t, "credit", "credit", 10)).status == 200);
  Json branch = entry(t.get(gid), "credit");
  CHECK(branch["attempts"] == 2);
  CHECK_MESSAGE(branch.value("last_error", "").find("503") != std::string::npos, dump(branch));
  REQUIRE(t.abort(gid).status == 200);
  check_all(t);
}

// DESIGN.md §2 --op-url-allow: an HTTP op must lie under one of the prefixes; one outside is
// refused before anything is logged, and a transaction it was meant for is untouched.
TEST_CASE("with --op-url-allow an HTTP op outside every prefix is refused and nothing changes") {
  Testbed& t = bed();
  std::string base = t.http_participant_url().to_string();
  t.stop_coordinator(SIGTERM);
  t.start_coordinator("", {"--op-url-allow", base + "/tcc"});

  Http r =
      run(t, saga(Json::array({sql_step("debit", 0, 1, -10), http_step(t, "credit", "w", 10)})));
  INFO(r.describe());
  CHECK(r.status == 400);
  CHECK(r.body["error"]["code"] == "invalid_argument");
  CHECK(r.body["error"]["message"].get<std::string>().find("credit.action") != std::string::npos);
  Http none = t.coord("GET", "/v1/transactions?limit=10");
  REQUIRE_MESSAGE(none.status == 200, none.describe());
  CHECK_MESSAGE(none.body["transactions"].empty(), none.describe());

  std::string gid = t.begin("tcc");
  REQUIRE(try_branch(t, gid, sql_debit("debit", 0, 1, 10)).status == 200);
  Json climbing = http_tcc(t, "credit", "credit", 10);
  climbing["cancel"]["url"] = base + "/tcc/../saga/compensate";
  Http refused = try_branch(t, gid, climbing);
  CHECK_MESSAGE(refused.status == 400, refused.describe());
  Http view = t.get(gid);
  CHECK(view.state() == "active");
  CHECK_MESSAGE(entry(view, "credit").is_null(), view.describe());
  REQUIRE(try_branch(t, gid, http_tcc(t, "credit", "credit", 10)).status == 200);
  REQUIRE(t.commit(gid).status == 200);
  CHECK(wallet(t)["balance"] == kWallet + 10);
  check_all(t);
}

// --- operators -------------------------------------------------------------------------------

// DESIGN.md §9.3 "Operator": a compensation that keeps failing is retried and listed in doubt;
// resolve abort records it forced and the saga ends aborted; resolve commit is refused.
TEST_CASE("a stuck compensation: in-doubt lists it, tpcctl shows it, resolve abort forces it") {
  Testbed& t = bed();
  Json debit = sql_step("debit", 0, 1, -100);
  // Its compensation matches no row: 21000, a business failure, at every attempt.
  debit["compensate"] = sql_op(
      0, Json::array(
             {stmt("UPDATE accounts SET balance = balance + 100 WHERE id = $1", {424242}, 1)}));
  Json body = saga(Json::array({debit, http_step(t, "credit", "w", 100),
                                http_step(t, "ship", "nobody", 1)}));  // 409: unknown account
  body["wait"] = "accepted";
  body["retry"] = {{"min_ms", 10}, {"max_ms", 50}};
  Http r = run(t, body);
  REQUIRE_MESSAGE(r.status == 202, r.describe());
  std::string gid = r.body["gid"].get<std::string>();
  REQUIRE(eventually([&] { return entry(t.get(gid), "debit")["attempts"] >= 3; }, 20'000));
  INFO(t.logs());
  Http view = t.get(gid);
  CHECK(view.state() == "compensating");
  CHECK(entry(view, "credit")["state"] == "compensated");
  CHECK(entry(view, "debit")["state"] == "compensating");
  CHECK_MESSAGE(entry(view, "debit").value("last_error", "").find("21000") != std::string::npos,
                view.describe());
  CHECK(listed_in_doubt(t, gid));

  std::string out;
  CHECK(ctl(t, {"in-doubt"}, &out) == 0);
  CHECK_MESSAGE(out.find(gid) != std::string::npos, out);
  CHECK(ctl(t, {"show", gid}, &out) == 0);
  CHECK_MESSAGE(out.find("compensating") != std::string::npos, out);
  CHECK_MESSAGE(out.find("21000") != std::string::npos, out);
  CHECK(ctl(t, {"resolve", gid, "commit"}, &out) == 1);  // a compensating saga never commits
  CHECK_MESSAGE(out.find("conflict") != std::string::npos, out);
  CHECK(t.get(gid).state() == "compensating");
  CHECK(ctl(t, {"resolve", gid, "abort"}, &out) == 0);
  view = t.get(gid);
  CHECK(view.state() == "aborted");
  CHECK(entry(view, "debit")["forced"] == true);
  CHECK(entry(view, "credit").value("forced", false) == false);
  CHECK_FALSE(listed_in_doubt(t, gid));  // ended: nothing left to drive

  // What the forced compensation did not do, the operator does by hand.
  REQUIRE(query(t.conninfo(0), "UPDATE accounts SET balance = balance + 100 WHERE id = 1").ok());
  check_all(t);
}

// A forward saga past max_attempts is failed and in doubt; resolve commit records the failed
// step forced and the saga goes on with the next step; resolve abort is refused.
TEST_CASE("a failed forward saga: in-doubt lists it, resolve commit forces the step and goes on") {
  Testbed& t = bed();
  set_faults(t, Json::array({{{"path", "/saga/action"}, {"branch", "credit"}, {"mode", "fail"}}}));
  Json body =
      saga(Json::array({sql_step("debit", 0, 1, -100, false),
                        http_step(t, "credit", "w", 100, false), sql_step("fee", 1, 1, 0, false)}));
  body["recovery"] = "forward";
  body["retry"] = {{"max_attempts", 2}, {"min_ms", 10}, {"max_ms", 50}};
  body["wait"] = "accepted";
  Http r = run(t, body);
  REQUIRE_MESSAGE(r.status == 202, r.describe());
  std::string gid = r.body["gid"].get<std::string>();
  REQUIRE(eventually([&] { return t.get(gid).state() == "failed"; }, 20'000));
  INFO(t.logs());
  CHECK(listed_in_doubt(t, gid));
  CHECK(entry(t.get(gid), "fee")["state"] == "pending");
  std::string out;
  CHECK(ctl(t, {"resolve", gid, "abort"}, &out) == 1);  // a forward saga never compensates
  CHECK_MESSAGE(out.find("conflict") != std::string::npos, out);
  CHECK(ctl(t, {"resolve", gid, "commit"}, &out) == 0);
  REQUIRE(eventually([&] { return t.get(gid).state() == "committed"; }, 20'000));
  Http view = t.get(gid);
  CHECK(entry(view, "credit")["forced"] == true);
  CHECK(entry(view, "fee")["state"] == "done");
  CHECK_FALSE(listed_in_doubt(t, gid));

  // The credit never applied: the operator credits the wallet by hand.
  set_faults(t, Json::array());
  Http fix = t.http_participant("POST", "/accounts", dump(Json{{"w", kWallet + 100}}));
  REQUIRE_MESSAGE(fix.status == 200, fix.describe());
  check_all(t);
}
