// Unit tests of the agent's steps (docs/DESIGN.md §8): the barrier rule itself, the machine's
// answers for each barrier verdict and failure class, its bounds, the finished-transaction
// guard, and the codec's decoding and HTTP statuses.
#include <doctest/doctest.h>

#include "participant/agent_machine.h"
#include "participant/codec.h"

using namespace tpc;
using namespace tpc::agent;

namespace {

struct Fixture {
  MemorySink sink;
  Logger log{&sink, LogFormat::text, LogLevel::debug};
  AgentOptions opts;
  std::unique_ptr<AgentMachine> m;
  uint64_t next_id = 1;
  int64_t now = 1'000'000;

  explicit Fixture(AgentOptions o = {}) : opts(std::move(o)) {
    m = std::make_unique<AgentMachine>(opts, log);
  }
  // Sends a step; returns the PgOp the machine asked for (none: it answered at once).
  std::optional<PgOp> step(const std::string& gid, StepOp op, std::string branch = "debit") {
    Request r;
    r.kind = RequestKind::step;
    r.id = next_id++;
    r.branch = std::move(branch);
    r.step_op = op;
    r.statements = {{"UPDATE accounts SET balance = balance - 5 WHERE id = 1", {}, 1}};
    m->request(gid, std::move(r), now);
    Ready ready = m->take_ready();
    if (ready.ops.empty()) {
      last_replies = std::move(ready.replies);
      return std::nullopt;
    }
    REQUIRE(ready.ops.size() == 1);
    REQUIRE(ready.replies.empty());
    return std::move(ready.ops[0]);
  }
  Reply done(const PgOp& op, OpResult res) {
    m->on_step_done(op.step, std::move(res), now);
    Ready ready = m->take_ready();
    REQUIRE(ready.replies.size() == 1);
    REQUIRE(ready.ops.empty());
    return ready.replies[0];
  }
  static OpResult barrier(pg::Barrier b) {
    OpResult r;
    r.barrier = b;
    r.results = std::make_shared<std::vector<pg::StatementResult>>();
    return r;
  }
  static OpResult failure(Code c, std::string sqlstate) {
    OpResult r;
    r.status = Status(c, "boom");
    r.sqlstate = std::move(sqlstate);
    return r;
  }
  std::vector<Reply> last_replies;
};

int status_of(const Reply& r) {
  return encode_reply(r).status;
}

Json body_of(const Reply& r) {
  auto j = parse_json(encode_reply(r).body);
  REQUIRE(j.ok());
  return *j;
}

}  // namespace

TEST_CASE("the barrier rule") {
  using pg::Barrier;
  auto verdict = [](StepOp op, bool own, std::string by, bool undone) {
    return pg::barrier_verdict(op, pg::BarrierRows{own, std::move(by), undone});
  };
  // First calls.
  CHECK(verdict(StepOp::try_op, true, "", false) == Barrier::applied);
  CHECK(verdict(StepOp::confirm, true, "", false) == Barrier::applied);
  CHECK(verdict(StepOp::action, true, "", false) == Barrier::applied);
  CHECK(verdict(StepOp::cancel, true, "", false) == Barrier::applied);  // its try ran
  // Resends.
  CHECK(verdict(StepOp::try_op, false, "try", false) == Barrier::duplicate);
  CHECK(verdict(StepOp::cancel, false, "cancel", false) == Barrier::duplicate);
  CHECK(verdict(StepOp::deliver, false, "deliver", false) == Barrier::duplicate);
  // A compensation whose action never ran.
  CHECK(verdict(StepOp::cancel, true, "", true) == Barrier::empty_compensation);
  CHECK(verdict(StepOp::compensate, true, "", true) == Barrier::empty_compensation);
  // A try/action whose row its cancel/compensate wrote: anti-hanging.
  CHECK(verdict(StepOp::try_op, false, "cancel", false) == Barrier::refused);
  CHECK(verdict(StepOp::action, false, "compensate", false) == Barrier::refused);
  // A non-compensating op never reads an undone row.
  CHECK(verdict(StepOp::confirm, true, "", true) == Barrier::applied);
}

TEST_CASE("retryable SQLSTATEs are the contract's") {
  for (const char* s : {"08006", "08001", "40001", "40P01", "55P03", "57014", "57P01", "53300"})
    CHECK_MESSAGE(pg::retryable_sqlstate(s), s);
  for (const char* s : {"23505", "23514", "22012", "42601", "21000", "54000", "25P02", "", "4000"})
    CHECK_MESSAGE(!pg::retryable_sqlstate(s), s);
}

TEST_CASE("a step asks for one op on any connection, with its key and the row limit") {
  AgentOptions o;
  o.result_rows_max = 7;
  Fixture f(o);
  auto op = f.step("c1-1-4", StepOp::try_op, "freeze");
  REQUIRE(op);
  CHECK(op->kind == OpKind::step);
  CHECK(op->gid == "c1-1-4");
  CHECK(op->branch == "freeze");
  CHECK(op->step_op == StepOp::try_op);
  CHECK(op->rows_max == 7);
  REQUIRE(op->statements.size() == 1);
  CHECK(op->statements[0].expect_rows == 1);
  CHECK(f.m->steps_in_flight() == 1);
  CHECK(f.m->oldest_step_age_ms(f.now + 250) == 250);
  // It is not a branch: no session, nothing in the branch views.
  CHECK(f.m->open_sessions() == 0);
  CHECK(!f.m->view("c1-1-4", f.now));
}

TEST_CASE("each barrier verdict has its answer") {
  Fixture f;
  SUBCASE("applied: 200 with the results") {
    auto op = f.step("c1-1-1", StepOp::action);
    OpResult res = Fixture::barrier(pg::Barrier::applied);
    pg::StatementResult sr;
    sr.affected = 1;
    sr.command_tag = "UPDATE 1";
    res.results->push_back(sr);
    Reply r = f.done(*op, std::move(res));
    CHECK(status_of(r) == 200);
    Json j = body_of(r);
    CHECK(j["barrier"] == "applied");
    CHECK(j["results"].size() == 1);
    CHECK(j["results"][0]["command"] == "UPDATE 1");
    CHECK(f.m->counters().steps_applied == 1);
  }
  SUBCASE("duplicate: 200 with what the first call stored") {
    auto op = f.step("c1-1-1", StepOp::action);
    OpResult res = Fixture::barrier(pg::Barrier::duplicate);
    res.stored_results = R"([{"columns":[],"rows":[],"affected":1,"command":"UPDATE 1"}])";
    Reply r = f.done(*op, std::move(res));
    CHECK(status_of(r) == 200);
    Json j = body_of(r);
    CHECK(j["barrier"] == "duplicate");
    CHECK(j["results"][0]["affected"] == 1);
    CHECK(f.m->counters().steps_duplicate == 1);
  }
  SUBCASE("empty compensation: 200") {
    auto op = f.step("c1-1-1", StepOp::compensate);
    Reply r = f.done(*op, Fixture::barrier(pg::Barrier::empty_compensation));
    CHECK(status_of(r) == 200);
    CHECK(body_of(r)["barrier"] == "empty_compensation");
    CHECK(body_of(r)["results"] == Json::array());
    CHECK(f.m->counters().steps_empty_compensation == 1);
  }
  SUBCASE("refused: 409 barrier_refused") {
    auto op = f.step("c1-1-1", StepOp::try_op);
    Reply r = f.done(*op, Fixture::barrier(pg::Barrier::refused));
    CHECK(status_of(r) == 409);
    CHECK(body_of(r)["error"]["code"] == "barrier_refused");
    CHECK(f.m->counters().steps_refused == 1);
  }
  CHECK(f.m->steps_in_flight() == 0);
  CHECK(f.m->oldest_step_age_ms(f.now + 250) == 0);
}

TEST_CASE("a business failure is final (422 with its SQLSTATE); the rest is unknown (503)") {
  Fixture f;
  SUBCASE("constraint violation") {
    auto op = f.step("c1-1-1", StepOp::try_op);
    Reply r = f.done(*op, Fixture::failure(Code::sql_error, "23514"));
    CHECK(status_of(r) == 422);
    CHECK(body_of(r)["error"]["sqlstate"] == "23514");
    CHECK(f.m->counters().steps_failed == 1);
  }
  SUBCASE("expect_rows missed") {
    auto op = f.step("c1-1-1", StepOp::try_op);
    Reply r = f.done(*op, Fixture::failure(Code::sql_error, std::string(pg::kExpectRowsSqlstate)));
    CHECK(status_of(r) == 422);
  }
  SUBCASE("serialization failure, lock timeout, cancel: retried") {
    for (const char* s : {"40001", "40P01", "55P03", "57014", "08006"}) {
      auto op = f.step("c1-1-1", StepOp::try_op);
      Reply r = f.done(*op, Fixture::failure(Code::sql_error, s));
      CHECK_MESSAGE(status_of(r) == 503, s);
      CHECK(body_of(r)["error"]["sqlstate"] == s);
    }
    CHECK(f.m->counters().steps_unknown == 5);
  }
  SUBCASE("connection lost (the COMMIT may have happened)") {
    auto op = f.step("c1-1-1", StepOp::confirm);
    Reply r = f.done(*op, Fixture::failure(Code::unavailable, ""));
    CHECK(status_of(r) == 503);
    CHECK(f.m->counters().steps_unknown == 1);
  }
}

TEST_CASE("steps in flight are bounded; past steps_max the answer is 503 and nothing runs") {
  AgentOptions o;
  o.steps_max = 2;
  Fixture f(o);
  auto a = f.step("c1-1-1", StepOp::action, "a");
  auto b = f.step("c1-1-1", StepOp::action, "b");
  REQUIRE(a);
  REQUIRE(b);
  CHECK(!f.step("c1-1-1", StepOp::action, "c"));
  REQUIRE(f.last_replies.size() == 1);
  CHECK(status_of(f.last_replies[0]) == 503);
  f.done(*a, Fixture::barrier(pg::Barrier::applied));
  CHECK(f.step("c1-1-1", StepOp::action, "c"));
}

TEST_CASE("a step of a transaction its coordinator finished runs no more") {
  Fixture f;
  f.m->on_finished_below("c1", 2, 10);
  SUBCASE("a late try or action is refused") {
    for (StepOp op : {StepOp::try_op, StepOp::action}) {
      CHECK(!f.step("c1-2-9", op));
      REQUIRE(f.last_replies.size() == 1);
      CHECK(status_of(f.last_replies[0]) == 409);
      CHECK(body_of(f.last_replies[0])["error"]["code"] == "barrier_refused");
    }
  }
  SUBCASE("a late confirm, cancel or compensate ran before the finish: duplicate") {
    for (StepOp op : {StepOp::confirm, StepOp::cancel, StepOp::compensate, StepOp::deliver}) {
      CHECK(!f.step("c1-1-500", op));
      REQUIRE(f.last_replies.size() == 1);
      CHECK(status_of(f.last_replies[0]) == 200);
      CHECK(body_of(f.last_replies[0])["barrier"] == "duplicate");
    }
  }
  SUBCASE("gids at or above the mark, and of other coordinators, run") {
    CHECK(f.step("c1-2-10", StepOp::try_op));
    CHECK(f.step("c1-3-1", StepOp::try_op));
    CHECK(f.step("c2-1-1", StepOp::try_op));
  }
  SUBCASE("an older mark never moves it back") {
    f.m->on_finished_below("c1", 1, 5);
    CHECK(!f.step("c1-2-9", StepOp::try_op));
  }
}

TEST_CASE("the purge stays below every step in flight, so a held try still meets its cancel") {
  Fixture f;
  CHECK(!f.m->purge_mark("c1"));                 // no mark yet: nothing may go
  auto held = f.step("c1-2-4", StepOp::try_op);  // arrives, then waits for a connection
  REQUIRE(held);
  auto other = f.step("c2-1-1", StepOp::try_op);  // another coordinator's: no effect on c1
  REQUIRE(other);
  f.m->on_finished_below("c1", 2, 10);  // its cancel ran and the transaction finished
  auto mark = f.m->purge_mark("c1");
  REQUIRE(mark);
  CHECK(mark->epoch == 2);
  CHECK(mark->seq == 4);  // c1-2-4's barrier rows stay
  f.done(*held, Fixture::barrier(pg::Barrier::refused));
  mark = f.m->purge_mark("c1");
  REQUIRE(mark);
  CHECK(mark->seq == 10);
  CHECK(!f.m->purge_mark("c3"));
}

TEST_CASE("decode_step: fields, ops, names and the tpc params") {
  ExecLimits limits;
  auto ok = decode_step(
      R"J({"branch":"debit","op":"try","statements":[{"sql":"INSERT INTO t VALUES ($1, $2, $3)",)J"
      R"J("params":[{"tpc":"gid"},{"tpc":"branch"},5],"expect_rows":1}]})J",
      "c1-1-2", limits);
  REQUIRE_MESSAGE(ok.ok(), ok.status().to_string());
  CHECK(ok->kind == RequestKind::step);
  CHECK(ok->branch == "debit");
  CHECK(ok->step_op == StepOp::try_op);
  REQUIRE(ok->statements.size() == 1);
  REQUIRE(ok->statements[0].params.size() == 3);
  CHECK(ok->statements[0].params[0] == "c1-1-2");
  CHECK(ok->statements[0].params[1] == "debit");
  CHECK(ok->statements[0].params[2] == "5");
  CHECK(ok->statements[0].expect_rows == 1);

  auto barrier_only = decode_step(R"({"branch":"b","op":"confirm"})", "c1-1-2", limits);
  REQUIRE(barrier_only.ok());
  CHECK(barrier_only->statements.empty());
  auto short_form =
      decode_step(R"({"branch":"b","op":"local","sql":"SELECT 1"})", "c1-1-2", limits);
  REQUIRE(short_form.ok());
  CHECK(short_form->statements.size() == 1);

  for (
      const char* bad : {
          R"({"op":"try"})",                                         // no branch
          R"({"branch":"b"})",                                       // no op
          R"({"branch":"b","op":"prepare"})",                        // not a step op
          R"({"branch":"has space","op":"try"})",                    // bad name
          R"({"branch":"b","op":"try","statements":[{"sql":""}]})",  // empty sql
          R"({"branch":"b","op":"try","statements":[{"sql":"SELECT $1","params":[{"tpc":"who"}]}]})",
          R"({"branch":"b","op":"try","statements":[{"sql":"SELECT $1","params":[{"x":1}]}]})",
          R"({"branch":"b","op":"try","sql":"SELECT 1","statements":[]})",  // both forms
          R"({"branch":"b","op":"try","extra":1})",                         // unknown field
          R"([1])",
      }) {
    auto r = decode_step(bad, "c1-1-2", limits);
    CHECK_MESSAGE(!r.ok(), bad);
    if (!r.ok()) CHECK(r.status().code() == Code::invalid_argument);
  }
  // Exec keeps refusing objects in params: the names exist only for steps.
  CHECK(!decode_exec(R"({"sql":"SELECT $1","params":[{"tpc":"gid"}]})", limits).ok());
}
