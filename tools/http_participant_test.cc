// Tests of HttpParticipant's handler, without a server: requests go straight to handle() and
// answers come back through a Responder into a future. No test sleeps to let something happen;
// delayed answers are awaited on their future with a generous bound.
#include "tools/http_participant.h"

#include <doctest/doctest.h>

#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/json.h"

namespace tpc::tools {
namespace {

constexpr auto kBound = std::chrono::seconds(10);  // for anything that should be quick

HttpRequest request(std::string method, std::string target, std::string body = "",
                    Headers headers = {}) {
  HttpRequest r;
  r.method = std::move(method);
  r.target = std::move(target);
  r.body = std::move(body);
  r.headers = std::move(headers);
  return r;
}

// An HTTP op as the coordinator sends it (DESIGN.md §8).
HttpRequest op_request(const std::string& path, const std::string& gid, const std::string& branch,
                       const std::string& op, const Json& body, int attempt = 1,
                       bool with_key = true) {
  Headers h = {{"tpc-gid", gid},
               {"tpc-branch", branch},
               {"tpc-op", op},
               {"tpc-attempt", std::to_string(attempt)}};
  if (with_key) h.emplace_back("idempotency-key", gid + "/" + branch + "/" + op);
  return request("POST", path, dump(body), std::move(h));
}

Json body_of(const HttpResponse& r) {
  return Json::parse(r.body);
}

std::string error_code(const HttpResponse& r) {
  Json j = body_of(r);
  return j["error"]["code"].get<std::string>();
}

// Hands a request to the participant; the future holds its answer.
std::future<HttpResponse> send(HttpParticipant& p, HttpRequest req) {
  auto promise = std::make_shared<std::promise<HttpResponse>>();
  auto answer = promise->get_future();
  p.handle(std::move(req),
           Responder([promise](HttpResponse r) { promise->set_value(std::move(r)); }));
  return answer;
}

HttpResponse call(HttpParticipant& p, HttpRequest req) {
  auto answer = send(p, std::move(req));
  REQUIRE(answer.wait_for(kBound) == std::future_status::ready);
  return answer.get();
}

struct Bank {
  HttpParticipant p;

  explicit Bank(HttpParticipantOptions o = {}) : p(std::move(o)) {}

  HttpResponse call(HttpRequest r) { return tools::call(p, std::move(r)); }
  HttpResponse op(const std::string& path, const std::string& gid, const std::string& branch,
                  const std::string& op, const Json& body, int attempt = 1, bool with_key = true) {
    return call(op_request(path, gid, branch, op, body, attempt, with_key));
  }
  HttpResponse set(const Json& balances) {
    return call(request("POST", "/accounts", dump(balances)));
  }
  Json accounts() { return body_of(call(request("GET", "/accounts"))); }
  Json account(const std::string& name) { return accounts()["accounts"][name]; }
  HttpResponse faults(const Json& rules) {
    return call(request("POST", "/control/faults", dump(Json{{"rules", rules}})));
  }
  Json calls(const std::string& target = "/calls") {
    return body_of(call(request("GET", target)))["calls"];
  }
};

Json money(const std::string& account, int64_t amount) {
  return {{"account", account}, {"amount", amount}};
}
Json delta(const std::string& account, int64_t d) {
  return {{"account", account}, {"delta", d}};
}
Json acct(int64_t balance, int64_t frozen) {
  return {{"balance", balance}, {"frozen", frozen}};
}

TEST_CASE("accounts are set, listed with their total, and /healthz answers") {
  Bank b;
  HttpResponse r = b.set({{"alice", 100}, {"bob", 50}});
  CHECK(r.status == 200);
  CHECK(b.accounts() ==
        Json{{"accounts", {{"alice", acct(100, 0)}, {"bob", acct(50, 0)}}}, {"total", 150}});
  CHECK(b.set({{"bob", 70}}).status == 200);  // sets bob, leaves alice
  CHECK(b.accounts()["total"] == 170);
  CHECK(b.call(request("GET", "/healthz")).status == 200);
}

TEST_CASE("bad account bodies are refused 400 and change nothing") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  for (const char* body :
       {"[1]", "{\"bob\":-1}", "{\"bob\":1.5}", "{\"bob\":\"7\"}", "{\"\":1}",
        "{\"bob\":1,\"carol\":null}", "not json", "{\"bob\":100000000000000000000}"}) {
    CAPTURE(body);
    CHECK(b.call(request("POST", "/accounts", body)).status == 400);
  }
  CHECK(b.accounts() == Json{{"accounts", {{"alice", acct(100, 0)}}}, {"total", 100}});
}

TEST_CASE("accounts past accounts_max are refused 413") {
  HttpParticipantOptions o;
  o.accounts_max = 2;
  Bank b(o);
  CHECK(b.set({{"a", 1}, {"b", 1}}).status == 200);
  CHECK(b.set({{"c", 1}}).status == 413);
  CHECK(b.set({{"a", 5}}).status == 200);  // an existing account is no new one
  CHECK(b.accounts()["accounts"].size() == 2);
}

TEST_CASE("a TCC debit try freezes the amount and its confirm takes it") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse t = b.op("/tcc/debit/try", "g1", "debit", "try", money("alice", 30));
  CHECK(t.status == 200);
  CHECK(body_of(t) == Json{{"frozen", 30}});
  CHECK(b.account("alice") == acct(100, 30));
  HttpResponse c = b.op("/tcc/debit/confirm", "g1", "debit", "confirm", money("alice", 30));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"debited", 30}});
  CHECK(b.account("alice") == acct(70, 0));
  CHECK(b.accounts()["total"] == 70);
}

TEST_CASE("a debit try past the available balance is refused 409 insufficient_funds") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 80)).status == 200);
  HttpResponse r = b.op("/tcc/debit/try", "g2", "d", "try", money("alice", 30));
  CHECK(r.status == 409);
  CHECK(error_code(r) == "insufficient_funds");
  CHECK(b.account("alice") == acct(100, 80));
  HttpResponse u = b.op("/tcc/debit/try", "g3", "d", "try", money("nobody", 1));
  CHECK(u.status == 409);
  CHECK(error_code(u) == "unknown_account");
}

TEST_CASE("a cancel after a try releases the frozen amount; the branch cannot be confirmed") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 40)).status == 200);
  HttpResponse c = b.op("/tcc/debit/cancel", "g1", "d", "cancel", money("alice", 40));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"released", 40}});
  CHECK(b.account("alice") == acct(100, 0));
  HttpResponse f = b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 40));
  CHECK(f.status == 409);
  CHECK(error_code(f) == "cancelled");
  CHECK(b.account("alice") == acct(100, 0));
}

TEST_CASE("a confirm without an applied try is refused 409 not_tried") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse r = b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 10));
  CHECK(r.status == 409);
  CHECK(error_code(r) == "not_tried");
  CHECK(b.account("alice") == acct(100, 0));
}

TEST_CASE("a cancel after a confirm is refused 409 confirmed") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 10)).status == 200);
  REQUIRE(b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 10)).status == 200);
  HttpResponse r = b.op("/tcc/debit/cancel", "g1", "d", "cancel", money("alice", 10));
  CHECK(r.status == 409);
  CHECK(error_code(r) == "confirmed");
  CHECK(b.account("alice") == acct(90, 0));
}

TEST_CASE("an empty cancel is recorded and refuses the try that arrives after it") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse c = b.op("/tcc/debit/cancel", "g1", "d", "cancel", money("alice", 30));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"empty", true}});
  HttpResponse t = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 30));
  CHECK(t.status == 409);
  CHECK(error_code(t) == "cancelled");
  CHECK(b.account("alice") == acct(100, 0));
  // Another branch of the same transaction is not affected.
  CHECK(b.op("/tcc/debit/try", "g1", "d2", "try", money("alice", 30)).status == 200);
}

TEST_CASE("a credit try pends, its confirm adds, its cancel drops") {
  Bank b;
  REQUIRE(b.set({{"bob", 50}}).status == 200);
  HttpResponse t = b.op("/tcc/credit/try", "g1", "c", "try", money("bob", 20));
  CHECK(t.status == 200);
  CHECK(body_of(t) == Json{{"pending", 20}});
  CHECK(b.account("bob") == acct(50, 0));
  HttpResponse c = b.op("/tcc/credit/confirm", "g1", "c", "confirm", money("bob", 20));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"credited", 20}});
  CHECK(b.account("bob") == acct(70, 0));

  REQUIRE(b.op("/tcc/credit/try", "g2", "c", "try", money("bob", 5)).status == 200);
  HttpResponse x = b.op("/tcc/credit/cancel", "g2", "c", "cancel", money("bob", 5));
  CHECK(x.status == 200);
  CHECK(body_of(x) == Json{{"dropped", 5}});
  CHECK(b.op("/tcc/credit/confirm", "g2", "c", "confirm", money("bob", 5)).status == 409);
  CHECK(b.account("bob") == acct(70, 0));

  HttpResponse e = b.op("/tcc/credit/cancel", "g3", "c", "cancel", money("bob", 9));
  CHECK(body_of(e) == Json{{"empty", true}});
  HttpResponse late = b.op("/tcc/credit/try", "g3", "c", "try", money("bob", 9));
  CHECK(late.status == 409);
  CHECK(error_code(late) == "cancelled");
  CHECK(b.op("/tcc/credit/confirm", "g3", "c", "confirm", money("bob", 9)).status == 409);
  CHECK(b.account("bob") == acct(70, 0));
}

TEST_CASE("a debit and a credit of the same branch name are separate ledgers") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}, {"bob", 0}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "x", "try", money("alice", 10), 1, false).status == 200);
  REQUIRE(b.op("/tcc/credit/try", "g1", "x", "try", money("bob", 10), 1, false).status == 200);
  REQUIRE(b.op("/tcc/debit/confirm", "g1", "x", "confirm", money("alice", 10), 1, false).status ==
          200);
  REQUIRE(b.op("/tcc/credit/confirm", "g1", "x", "confirm", money("bob", 10), 1, false).status ==
          200);
  CHECK(b.account("alice") == acct(90, 0));
  CHECK(b.account("bob") == acct(10, 0));
  CHECK(b.accounts()["total"] == 100);
}

TEST_CASE("confirm and cancel may omit the body, but one that differs from the try is refused") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 10)).status == 200);
  HttpResponse m = b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 11));
  CHECK(m.status == 409);
  CHECK(error_code(m) == "branch_mismatch");
  HttpResponse c = b.op("/tcc/debit/confirm", "g1", "d", "confirm", Json::object());
  CHECK(c.status == 200);
  CHECK(b.account("alice") == acct(90, 0));
}

TEST_CASE("a saga action then its compensation restores the balance") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse a = b.op("/saga/action", "g1", "s1", "action", delta("alice", -40));
  CHECK(a.status == 200);
  CHECK(body_of(a) == Json{{"balance", 60}});
  CHECK(b.account("alice") == acct(60, 0));
  HttpResponse c = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", -40));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"undone", -40}});
  CHECK(b.account("alice") == acct(100, 0));
  // A credit step and its compensation.
  REQUIRE(b.op("/saga/action", "g1", "s2", "action", delta("alice", 25)).status == 200);
  CHECK(b.account("alice") == acct(125, 0));
  REQUIRE(b.op("/saga/compensate", "g1", "s2", "compensate", delta("alice", 25)).status == 200);
  CHECK(b.account("alice") == acct(100, 0));
}

TEST_CASE("a saga action that would go below zero is refused 409 insufficient_funds") {
  Bank b;
  REQUIRE(b.set({{"alice", 10}}).status == 200);
  HttpResponse r = b.op("/saga/action", "g1", "s1", "action", delta("alice", -11));
  CHECK(r.status == 409);
  CHECK(error_code(r) == "insufficient_funds");
  CHECK(b.account("alice") == acct(10, 0));
}

TEST_CASE("a compensation before its action is empty and refuses the action") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse c = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", -40));
  CHECK(c.status == 200);
  CHECK(body_of(c) == Json{{"empty", true}});
  HttpResponse a = b.op("/saga/action", "g1", "s1", "action", delta("alice", -40));
  CHECK(a.status == 409);
  CHECK(error_code(a) == "compensated");
  CHECK(b.account("alice") == acct(100, 0));
}

TEST_CASE("a refused compensation is not stored: its resend succeeds once the money is back") {
  Bank b;
  REQUIRE(b.set({{"alice", 0}}).status == 200);
  REQUIRE(b.op("/saga/action", "g1", "s1", "action", delta("alice", 50)).status == 200);
  REQUIRE(b.op("/saga/action", "g2", "s1", "action", delta("alice", -30)).status == 200);
  HttpResponse r = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", 50));
  CHECK(r.status == 409);
  CHECK(error_code(r) == "insufficient_funds");
  CHECK(b.account("alice") == acct(20, 0));
  REQUIRE(b.set({{"alice", 80}}).status == 200);
  HttpResponse again = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", 50), 2);
  CHECK(again.status == 200);
  CHECK(b.account("alice") == acct(30, 0));
  Json calls = b.calls();
  CHECK(calls.back()["replayed"] == false);
}

TEST_CASE("a message's check finds its local transaction committed, every time") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/msg/local", "g1", "local", "local", delta("alice", -30)).status == 200);
  for (int attempt = 1; attempt <= 2; ++attempt) {
    HttpResponse c = b.op("/msg/check", "g1", "local", "check", Json::object(), attempt);
    CHECK(c.status == 200);
    CHECK(body_of(c) == Json{{"committed", true}, {"balance", 70}});
  }
  HttpResponse d = b.op("/msg/deliver", "g1", "d1", "deliver", delta("alice", 30));
  CHECK(d.status == 200);
  CHECK(b.op("/msg/deliver", "g1", "d1", "deliver", delta("alice", 30), 2).status == 200);
  CHECK(b.account("alice") == acct(100, 0));  // delivered once
}

TEST_CASE("a message's check before its local transaction fences it: refused when it comes") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse c = b.op("/msg/check", "g1", "local", "check", Json::object());
  CHECK(c.status == 409);
  CHECK(error_code(c) == "not_committed");
  HttpResponse late = b.op("/msg/local", "g1", "local", "local", delta("alice", -30));
  CHECK(late.status == 409);
  CHECK(b.account("alice") == acct(100, 0));
  CHECK(error_code(b.op("/msg/check", "g1", "local", "check", Json::object(), 2)) ==
        "not_committed");
}

TEST_CASE("a resend with the same Idempotency-Key gets the same answer and applies nothing") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse first = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10), 1);
  HttpResponse again = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10), 2);
  CHECK(first.status == 200);
  CHECK(again.status == first.status);
  CHECK(again.body == first.body);
  CHECK(b.account("alice") == acct(90, 0));

  // A final refusal is stored too: more money later does not change the answer to the key.
  HttpResponse no = b.op("/tcc/debit/try", "g2", "d", "try", money("alice", 500), 1);
  CHECK(no.status == 409);
  REQUIRE(b.set({{"alice", 1000}}).status == 200);
  HttpResponse no_again = b.op("/tcc/debit/try", "g2", "d", "try", money("alice", 500), 2);
  CHECK(no_again.status == 409);
  CHECK(no_again.body == no.body);
  CHECK(b.account("alice") == acct(1000, 0));

  Json calls = b.calls();
  REQUIRE(calls.size() == 4);
  CHECK(calls[0]["replayed"] == false);
  CHECK(calls[1]["replayed"] == true);
  CHECK(calls[1]["status"] == 200);
  CHECK(calls[1]["attempt"] == 2);
  CHECK(calls[2]["replayed"] == false);
  CHECK(calls[3]["replayed"] == true);
  CHECK(calls[3]["status"] == 409);
}

TEST_CASE("without an Idempotency-Key a resent try is still applied once") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  HttpResponse one = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 30), 1, false);
  HttpResponse two = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 30), 2, false);
  CHECK(one.status == 200);
  CHECK(two.status == 200);
  CHECK(two.body == one.body);
  CHECK(b.account("alice") == acct(100, 30));
}

TEST_CASE("an Idempotency-Key reused with another body is refused 422") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/saga/action", "g1", "s1", "action", delta("alice", -10)).status == 200);
  HttpResponse r = b.op("/saga/action", "g1", "s1", "action", delta("alice", -20));
  CHECK(r.status == 422);
  CHECK(error_code(r) == "idempotency_key_reused");
  CHECK(b.account("alice") == acct(90, 0));
}

TEST_CASE("bad op requests are refused 400, logged, and change nothing") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  const std::vector<std::pair<std::string, Json>> bodies = {
      {"/tcc/debit/try", Json::object()},
      {"/tcc/debit/try", {{"account", "alice"}}},
      {"/tcc/debit/try", money("alice", 0)},
      {"/tcc/debit/try", money("alice", -5)},
      {"/tcc/debit/try", {{"account", "alice"}, {"amount", "5"}}},
      {"/tcc/debit/try", {{"account", "alice"}, {"amount", 1.5}}},
      {"/tcc/debit/try", {{"account", ""}, {"amount", 5}}},
      {"/tcc/debit/try", {{"account", "alice"}, {"amount", 5}, {"extra", 1}}},
      {"/tcc/debit/confirm", {{"account", "alice"}}},
      {"/tcc/credit/try", {{"account", 7}, {"amount", 5}}},
      {"/saga/action", delta("alice", 0)},
      {"/saga/action", money("alice", 5)},
      {"/saga/compensate", {{"delta", 5}}},
  };
  int n = 0;
  for (const auto& [path, body] : bodies) {
    CAPTURE(path);
    CAPTURE(dump(body));
    CHECK(b.op(path, "g" + std::to_string(++n), "s", "x", body).status == 400);
  }
  HttpRequest not_json = op_request("/saga/action", "g0", "s", "action", Json::object());
  not_json.body = "{nope";
  CHECK(b.call(not_json).status == 400);

  HttpRequest no_gid =
      request("POST", "/saga/action", dump(delta("alice", -5)), {{"tpc-branch", "s"}});
  CHECK(b.call(no_gid).status == 400);
  HttpRequest no_branch =
      request("POST", "/saga/action", dump(delta("alice", -5)), {{"tpc-gid", "g"}});
  CHECK(b.call(no_branch).status == 400);
  HttpRequest bad_attempt = op_request("/saga/action", "g", "s", "action", delta("alice", -5));
  for (auto& [k, v] : bad_attempt.headers)
    if (k == "tpc-attempt") v = "first";
  CHECK(b.call(bad_attempt).status == 400);

  CHECK(b.accounts() == Json{{"accounts", {{"alice", acct(100, 0)}}}, {"total", 100}});
  Json calls = b.calls();
  CHECK(calls.size() == bodies.size() + 4);
  for (const Json& c : calls) CHECK(c["status"] == 400);
  // Nothing was stored for the key of a refused request: a good resend applies.
  CHECK(b.op("/saga/action", "g0", "s", "action", delta("alice", -5)).status == 200);
  CHECK(b.account("alice") == acct(95, 0));
}

TEST_CASE("fault fail answers 422 injected without applying, and the answer is stored") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"mode", "fail"}, {"count", 1}}}).status == 200);
  HttpResponse r = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10));
  CHECK(r.status == 422);
  CHECK(error_code(r) == "injected");
  CHECK(b.account("alice") == acct(100, 0));
  // The rule is spent; the resend gets the stored failure, another key applies.
  HttpResponse again = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10), 2);
  CHECK(again.status == 422);
  CHECK(again.body == r.body);
  CHECK(b.op("/saga/action", "g2", "s1", "action", delta("alice", -10)).status == 200);
  CHECK(b.account("alice") == acct(90, 0));
  Json calls = b.calls();
  CHECK(calls[0]["fault"] == "fail");
  CHECK(calls[1]["replayed"] == true);
  CHECK_FALSE(calls[2].contains("fault"));
}

TEST_CASE("fault fail on a compensation is not stored: the resend compensates") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/saga/action", "g1", "s1", "action", delta("alice", -10)).status == 200);
  REQUIRE(b.faults({{{"path", "/saga/compensate"}, {"mode", "fail"}, {"count", 1}}}).status == 200);
  HttpResponse r = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", -10));
  CHECK(r.status == 422);
  CHECK(b.account("alice") == acct(90, 0));
  HttpResponse again = b.op("/saga/compensate", "g1", "s1", "compensate", delta("alice", -10), 2);
  CHECK(again.status == 200);
  CHECK(b.account("alice") == acct(100, 0));
}

TEST_CASE("fault unavailable answers 503 with the rule's Retry-After and applies nothing") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.faults({{{"path", "/tcc/debit/try"},
                     {"mode", "unavailable"},
                     {"count", 1},
                     {"retry_after_s", 2}},
                    {{"path", "/tcc/debit/confirm"}, {"mode", "unavailable"}, {"count", 1}}})
              .status == 200);
  HttpResponse r = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 10));
  CHECK(r.status == 503);
  CHECK(r.header("retry-after") == "2");
  CHECK(b.account("alice") == acct(100, 0));
  HttpResponse retry = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 10), 2);
  CHECK(retry.status == 200);
  CHECK(b.account("alice") == acct(100, 10));
  HttpResponse c = b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 10));
  CHECK(c.status == 503);
  CHECK(c.header("retry-after").empty());  // retry_after_s 0: no header
  CHECK(b.account("alice") == acct(100, 10));
  CHECK(b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 10), 2).status == 200);
  CHECK(b.account("alice") == acct(90, 0));
}

TEST_CASE("fault twice applies, answers 503, and the resend gets the replay") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"mode", "twice"}, {"count", 1}}}).status == 200);
  HttpResponse first = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10), 1);
  CHECK(first.status == 503);
  CHECK(b.account("alice") == acct(90, 0));
  HttpResponse second = b.op("/saga/action", "g1", "s1", "action", delta("alice", -10), 2);
  CHECK(second.status == 200);
  CHECK(body_of(second) == Json{{"balance", 90}});
  CHECK(b.account("alice") == acct(90, 0));
  Json calls = b.calls();
  REQUIRE(calls.size() == 2);
  CHECK(calls[0]["status"] == 503);
  CHECK(calls[0]["fault"] == "twice");
  CHECK(calls[0]["replayed"] == false);
  CHECK(calls[1]["status"] == 200);
  CHECK(calls[1]["replayed"] == true);
}

TEST_CASE("fault late applies at once and answers after delay_ms; a resend meanwhile replays") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  constexpr int64_t kDelayMs = 50;
  REQUIRE(
      b.faults(
           {{{"path", "/tcc/debit/try"}, {"mode", "late"}, {"count", 1}, {"delay_ms", kDelayMs}}})
          .status == 200);
  auto start = std::chrono::steady_clock::now();
  auto answer = send(b.p, op_request("/tcc/debit/try", "g1", "d", "try", money("alice", 30)));
  CHECK(b.account("alice") == acct(100, 30));  // applied before the answer
  HttpResponse resend = b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 30), 2);
  CHECK(resend.status == 200);
  REQUIRE(answer.wait_for(kBound) == std::future_status::ready);
  auto waited = std::chrono::steady_clock::now() - start;
  CHECK(waited >= std::chrono::milliseconds(kDelayMs));
  HttpResponse late = answer.get();
  CHECK(late.status == 200);
  CHECK(late.body == resend.body);
  CHECK(b.account("alice") == acct(100, 30));
  CHECK(b.p.held() == 0);
}

TEST_CASE("fault hang holds the answer, applies nothing, and stop() drops it (500)") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"mode", "hang"}, {"count", 1}}}).status == 200);
  auto answer = send(b.p, op_request("/saga/action", "g1", "s1", "action", delta("alice", -10)));
  // Held for 60 s: nothing can have answered yet.
  CHECK(answer.wait_for(std::chrono::seconds(0)) == std::future_status::timeout);
  CHECK(b.p.held() == 1);
  CHECK(b.account("alice") == acct(100, 0));
  Json calls = b.calls();
  REQUIRE(calls.size() == 1);
  CHECK(calls[0]["status"] == 0);
  CHECK(calls[0]["fault"] == "hang");
  b.p.stop();
  REQUIRE(answer.wait_for(kBound) == std::future_status::ready);
  CHECK(answer.get().status == 500);
  CHECK(b.p.held() == 0);
}

TEST_CASE("fault hang with delay_ms drops the Responder after that delay") {
  Bank b;
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"mode", "hang"}, {"delay_ms", 10}}}).status == 200);
  auto answer = send(b.p, op_request("/saga/action", "g1", "s1", "action", delta("alice", -10)));
  REQUIRE(answer.wait_for(kBound) == std::future_status::ready);
  CHECK(answer.get().status == 500);
}

TEST_CASE("fault rules match by path, branch and op, and count down") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"branch", "s2"}, {"mode", "fail"}, {"count", -1}},
                    {{"path", "/saga/compensate"}, {"op", "compensate"}, {"mode", "fail"}},
                    {{"path", "/tcc/debit/try"}, {"mode", "unavailable"}, {"count", 2}}})
              .status == 200);
  CHECK(b.op("/saga/action", "g1", "s1", "action", delta("alice", -1)).status == 200);
  for (int i = 0; i < 3; ++i)
    CHECK(
        b.op("/saga/action", "g" + std::to_string(i), "s2", "action", delta("alice", -1)).status ==
        422);
  CHECK(b.op("/saga/compensate", "g1", "s1", "cancel", delta("alice", -1)).status == 200);
  CHECK(b.op("/saga/compensate", "g9", "s1", "compensate", delta("alice", -1)).status == 422);
  CHECK(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 1), 1).status == 503);
  CHECK(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 1), 2).status == 503);
  CHECK(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 1), 3).status == 200);
  Json rules = body_of(b.call(request("GET", "/control/faults")))["rules"];
  REQUIRE(rules.size() == 3);
  CHECK(rules[0]["count"] == -1);
  CHECK(rules[1]["count"] == 0);
  CHECK(rules[2]["count"] == 0);
  // DELETE clears them.
  CHECK(body_of(b.call(request("DELETE", "/control/faults"))) == Json{{"rules", Json::array()}});
  CHECK(b.op("/saga/action", "g5", "s2", "action", delta("alice", -1)).status == 200);
}

TEST_CASE("bad fault rules are refused 400 and keep the rules in place") {
  Bank b;
  REQUIRE(b.faults({{{"path", "/saga/action"}, {"mode", "fail"}}}).status == 200);
  const std::vector<Json> bad = {
      {{"path", "/saga/action"}, {"mode", "explode"}},
      {{"path", "/saga/action"}, {"mode", "fail"}, {"count", 0}},
      {{"path", "/saga/action"}, {"mode", "fail"}, {"count", -2}},
      {{"path", "/saga/action"}, {"mode", "fail"}, {"delay_ms", 5}},
      {{"path", "/saga/action"}, {"mode", "late"}, {"retry_after_s", 5}},
      {{"path", "saga/action"}, {"mode", "fail"}},
      {{"mode", "fail"}},
      {{"path", "/saga/action"}, {"mode", "fail"}, {"colour", "red"}},
      Json("fail"),
  };
  for (const Json& rule : bad) {
    CAPTURE(dump(rule));
    CHECK(b.faults(Json::array({rule})).status == 400);
  }
  CHECK(b.call(request("POST", "/control/faults", "{}")).status == 400);
  CHECK(body_of(b.call(request("GET", "/control/faults")))["rules"].size() == 1);
}

TEST_CASE("the call log lists op calls in arrival order, filters by gid, and clears") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 1), 1).status == 200);
  REQUIRE(b.op("/saga/action", "g2", "s1", "action", delta("alice", -1), 3).status == 200);
  REQUIRE(b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 1), 1).status == 200);
  Json calls = b.calls();
  REQUIRE(calls.size() == 3);
  CHECK(calls[0] == Json{{"seq", 1},
                         {"path", "/tcc/debit/try"},
                         {"gid", "g1"},
                         {"branch", "d"},
                         {"op", "try"},
                         {"attempt", 1},
                         {"status", 200},
                         {"replayed", false}});
  CHECK(calls[1]["seq"] == 2);
  CHECK(calls[1]["path"] == "/saga/action");
  CHECK(calls[1]["attempt"] == 3);
  CHECK(calls[2]["seq"] == 3);
  CHECK(calls[2]["op"] == "confirm");
  Json g1 = b.calls("/calls?gid=g1");
  REQUIRE(g1.size() == 2);
  CHECK(g1[0]["seq"] == 1);
  CHECK(g1[1]["seq"] == 3);
  CHECK(b.calls("/calls?gid=none").empty());
  CHECK(b.call(request("DELETE", "/calls")).status == 200);
  CHECK(b.calls().empty());
  REQUIRE(b.op("/saga/action", "g3", "s1", "action", delta("alice", -1)).status == 200);
  CHECK(b.calls()[0]["seq"] == 4);  // seq keeps counting
}

TEST_CASE("the call log keeps the newest calls_max calls") {
  HttpParticipantOptions o;
  o.calls_max = 2;
  Bank b(o);
  for (int i = 1; i <= 3; ++i)
    b.op("/saga/compensate", "g" + std::to_string(i), "s", "compensate", Json::object());
  Json calls = b.calls();
  REQUIRE(calls.size() == 2);
  CHECK(calls[0]["gid"] == "g2");
  CHECK(calls[1]["gid"] == "g3");
}

TEST_CASE("with a token every request but /healthz needs Authorization: Bearer") {
  HttpParticipantOptions o;
  o.token = "s3cret";
  Bank b(o);
  CHECK(b.call(request("GET", "/healthz")).status == 200);
  CHECK(b.call(request("GET", "/accounts")).status == 401);
  CHECK(b.call(request("GET", "/accounts", "", {{"authorization", "Bearer wrong"}})).status == 401);
  HttpRequest no_token = op_request("/saga/action", "g1", "s1", "action", delta("alice", 1));
  CHECK(b.call(no_token).status == 401);
  HttpRequest set =
      request("POST", "/accounts", R"({"alice":5})", {{"authorization", "Bearer s3cret"}});
  CHECK(b.call(set).status == 200);
  HttpRequest get = request("GET", "/accounts", "", {{"authorization", "Bearer s3cret"}});
  CHECK(body_of(b.call(get))["total"] == 5);
}

TEST_CASE("unknown paths are 404, wrong methods 405") {
  Bank b;
  CHECK(b.call(request("GET", "/nope")).status == 404);
  HttpResponse r = b.call(request("GET", "/tcc/debit/try"));
  CHECK(r.status == 405);
  CHECK(r.header("allow") == "POST");
  CHECK(b.call(request("PUT", "/accounts")).status == 405);
  CHECK(b.call(request("POST", "/healthz")).status == 405);
}

TEST_CASE("a balance below what tries froze is refused 409") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 60)).status == 200);
  CHECK(b.set({{"alice", 50}}).status == 409);
  CHECK(b.set({{"alice", 60}}).status == 200);
  CHECK(b.account("alice") == acct(60, 60));
  REQUIRE(b.op("/tcc/debit/confirm", "g1", "d", "confirm", money("alice", 60)).status == 200);
  CHECK(b.account("alice") == acct(0, 0));
}

TEST_CASE("reset forgets accounts, branches, answers, calls and rules") {
  Bank b;
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  REQUIRE(b.op("/tcc/debit/cancel", "g1", "d", "cancel", money("alice", 1)).status == 200);
  REQUIRE(b.faults({{{"path", "/tcc/debit/try"}, {"mode", "fail"}, {"count", -1}}}).status == 200);
  CHECK(b.call(request("POST", "/control/reset")).status == 200);
  CHECK(b.accounts() == Json{{"accounts", Json::object()}, {"total", 0}});
  CHECK(b.calls().empty());
  REQUIRE(b.set({{"alice", 100}}).status == 200);
  CHECK(b.op("/tcc/debit/try", "g1", "d", "try", money("alice", 1)).status == 200);
}

TEST_CASE("concurrent tries from many threads each apply once") {
  Bank b;
  REQUIRE(b.set({{"alice", 1000}}).status == 200);
  constexpr int kThreads = 8, kTries = 50;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&b, t] {
      for (int i = 0; i < kTries; ++i) {
        std::string gid = "g" + std::to_string(t) + "-" + std::to_string(i);
        // Each try is sent twice, as a resend would be.
        for (int attempt = 1; attempt <= 2; ++attempt)
          call(b.p, op_request("/tcc/debit/try", gid, "d", "try", money("alice", 1), attempt));
      }
    });
  for (auto& th : threads) th.join();
  CHECK(b.account("alice") == acct(1000, kThreads * kTries));
  CHECK(b.calls().size() == 2 * kThreads * kTries);
}

}  // namespace
}  // namespace tpc::tools
