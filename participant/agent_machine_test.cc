// Unit tests of the agent's branch state machine: every transition, the refused ones, the
// in-doubt resolver and the 3PC timeouts, with PostgreSQL and the coordinator played by the
// test through OpResults and outcomes.
#include "participant/agent_machine.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <memory>

#include "participant/codec.h"

using namespace tpc;
using namespace tpc::agent;

namespace {

// The HTTP status the agent's codec answers a reply with: what a client would see.
int status_of(const Reply& r) {
  return encode_reply(r).status;
}

struct Fixture {
  MemorySink sink;
  Logger log{&sink, LogFormat::text, LogLevel::debug};
  AgentOptions opts;
  std::unique_ptr<AgentMachine> m;
  int64_t now = 5'000'000;
  uint64_t next_id = 1;

  explicit Fixture(AgentOptions o = {}) : opts(std::move(o)) {
    m = std::make_unique<AgentMachine>(opts, log);
  }

  uint64_t send(const std::string& gid, Request r) {
    r.id = next_id++;
    m->request(gid, r, now);
    return r.id;
  }
  uint64_t exec(const std::string& gid, bool prepare = false) {
    Request r;
    r.kind = RequestKind::exec;
    r.statements = {{"UPDATE t SET v = v + 1", {}}};
    r.prepare = prepare;
    return send(gid, r);
  }
  uint64_t simple(const std::string& gid, RequestKind k, bool one_phase = false) {
    Request r;
    r.kind = k;
    r.one_phase = one_phase;
    return send(gid, r);
  }
  Ready ready() { return m->take_ready(); }

  static OpResult ok() { return OpResult{}; }
  static OpResult vote(pg::Vote v, std::string sqlstate = "") {
    OpResult r;
    r.prepare = pg::PrepareResult{v, v == pg::Vote::no ? "no" : "", sqlstate};
    return r;
  }
  static OpResult outcome(pg::Outcome o) {
    OpResult r;
    r.outcome = o;
    return r;
  }
  static OpResult evidence(pg::Evidence e) {
    OpResult r;
    r.evidence = e;
    return r;
  }
  static OpResult failure(Code c, std::string sqlstate = "") {
    OpResult r;
    r.status = Status(c, "boom");
    r.sqlstate = std::move(sqlstate);
    return r;
  }

  // exec on a fresh gid, enlisted and run; returns the reply.
  Reply open_branch(const std::string& gid) {
    exec(gid);
    Ready r = ready();
    REQUIRE(r.enlists.size() == 1);
    m->on_enlisted(gid, ok_status(), 0, now);
    r = ready();
    REQUIRE(r.ops.size() == 1);
    CHECK(r.ops[0].kind == OpKind::exec);
    m->on_op_done(gid, OpKind::exec, ok(), now);
    r = ready();
    REQUIRE(r.replies.size() == 1);
    return r.replies[0];
  }

  void prepare(const std::string& gid) {
    simple(gid, RequestKind::prepare);
    Ready r = ready();
    REQUIRE(r.ops.size() == 1);
    REQUIRE(r.ops[0].kind == OpKind::prepare);
    m->on_op_done(gid, OpKind::prepare, vote(pg::Vote::yes), now);
    r = ready();
    REQUIRE(r.replies.size() == 1);
    REQUIRE(r.replies[0].vote == pg::Vote::yes);
  }

  // A 3PC prepare of an open branch: the record first, then PREPARE, voting yes.
  void prepare_3pc(const std::string& gid,
                   std::vector<Peer> peers = {{"a1", "http://h:1"}, {"a2", "http://h:2"}}) {
    Request p;
    p.kind = RequestKind::prepare;
    p.protocol = Protocol::three_phase;
    p.peers = peers;
    send(gid, p);
    Ready r = ready();
    REQUIRE(r.ops.size() == 1);
    REQUIRE(r.ops[0].kind == OpKind::put_state);
    CHECK(r.ops[0].state == "prepared3");
    CHECK(r.ops[0].peers == peers);
    CHECK(r.replies.empty());
    m->on_op_done(gid, OpKind::put_state, ok(), now);
    r = ready();
    REQUIRE(r.ops.size() == 1);
    REQUIRE(r.ops[0].kind == OpKind::prepare);
    m->on_op_done(gid, OpKind::prepare, vote(pg::Vote::yes), now);
    r = ready();
    REQUIRE(r.replies.size() == 1);
    REQUIRE(r.replies[0].vote == pg::Vote::yes);
  }

  BranchState state(const std::string& gid) {
    auto v = m->view(gid, now);
    REQUIRE(v.has_value());
    return v->state;
  }
};

}  // namespace

TEST_CASE("the first exec enlists the branch before any statement runs") {
  Fixture f;
  f.exec("c1-1-1");
  Ready r = f.ready();
  CHECK(r.ops.empty());
  REQUIRE(r.enlists == std::vector<std::string>{"c1-1-1"});
  CHECK(f.state("c1-1-1") == BranchState::enlisting);
  f.m->on_enlisted("c1-1-1", ok_status(), 0, f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::exec);
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 200);
  CHECK(f.state("c1-1-1") == BranchState::active);
  CHECK(f.m->open_sessions() == 1);
}

TEST_CASE("a refused enlistment aborts the branch; an unreachable coordinator forgets it") {
  Fixture f;
  f.exec("c1-1-1");
  f.ready();
  f.m->on_enlisted("c1-1-1", conflict("transaction is aborted"), 0, f.now);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::conflict);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
  CHECK(f.m->open_sessions() == 0);

  f.exec("c1-1-2");
  f.ready();
  f.m->on_enlisted("c1-1-2", unavailable("connection refused"), 0, f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::unavailable);
  CHECK_FALSE(f.m->view("c1-1-2", f.now).has_value());
  // A retry enlists again.
  f.exec("c1-1-2");
  CHECK(f.ready().enlists.size() == 1);
}

TEST_CASE("past branches_max new branches get 503 and existing ones go on") {
  AgentOptions o;
  o.branches_max = 1;
  Fixture f(o);
  f.open_branch("c1-1-1");
  f.exec("c1-1-2");
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::unavailable);
  CHECK(f.m->counters().refused_overload == 1);
  f.prepare("c1-1-1");  // the session ends at prepare, freeing the slot
  f.exec("c1-1-2");
  CHECK(f.ready().enlists.size() == 1);
}

TEST_CASE("an SQL error answers 422 with the sqlstate, and the branch then votes no") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.exec("c1-1-1");
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::failure(Code::sql_error, "23505"), f.now);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 422);
  CHECK(r.replies[0].sqlstate == "23505");
  // Further statements are refused without touching PostgreSQL.
  f.exec("c1-1-1");
  r = f.ready();
  CHECK(r.ops.empty());
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::conflict);
  // prepare rolls back and votes no.
  f.simple("c1-1-1", RequestKind::prepare);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback);
  f.m->on_op_done("c1-1-1", OpKind::rollback, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(r.replies[0].sqlstate == "23505");
  CHECK(f.state("c1-1-1") == BranchState::aborted);
}

TEST_CASE("prepare: yes, read_only and no votes, and repeated prepares answer the same") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  CHECK(f.state("c1-1-1") == BranchState::prepared);
  f.simple("c1-1-1", RequestKind::prepare);
  Ready r = f.ready();
  CHECK(r.ops.empty());
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::yes);

  f.open_branch("c1-1-2");
  f.simple("c1-1-2", RequestKind::prepare);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::prepare, Fixture::vote(pg::Vote::read_only), f.now);
  r = f.ready();
  CHECK(r.replies[0].vote == pg::Vote::read_only);
  CHECK(f.state("c1-1-2") == BranchState::read_only);

  f.open_branch("c1-1-3");
  f.simple("c1-1-3", RequestKind::prepare);
  f.ready();
  f.m->on_op_done("c1-1-3", OpKind::prepare, Fixture::vote(pg::Vote::no, "23503"), f.now);
  r = f.ready();
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(r.replies[0].sqlstate == "23503");
  f.simple("c1-1-3", RequestKind::prepare);
  r = f.ready();
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(f.m->open_sessions() == 0);
}

TEST_CASE("a lost session during prepare votes no") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.simple("c1-1-1", RequestKind::prepare);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::prepare, Fixture::failure(Code::unavailable), f.now);
  Ready r = f.ready();
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
}

TEST_CASE("exec with prepare answers results and the vote in one request") {
  Fixture f;
  f.exec("c1-1-1", true);
  f.ready();
  f.m->on_enlisted("c1-1-1", ok_status(), 0, f.now);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].then_prepare);
  OpResult res = Fixture::vote(pg::Vote::yes);
  res.results = std::make_shared<std::vector<pg::StatementResult>>(1);
  f.m->on_op_done("c1-1-1", OpKind::exec, res, f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::yes);
  CHECK(r.replies[0].results->size() == 1);
  CHECK(f.state("c1-1-1") == BranchState::prepared);

  // A statement error: rolled back, answered 422 with vote no.
  f.exec("c1-1-2", true);
  f.ready();
  f.m->on_enlisted("c1-1-2", ok_status(), 0, f.now);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::exec, Fixture::failure(Code::sql_error, "22012"), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback);
  f.m->on_op_done("c1-1-2", OpKind::rollback, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 422);
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(r.replies[0].sqlstate == "22012");
}

TEST_CASE("commit of a prepared branch, repeated commits, and a refused abort after it") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  f.simple("c1-1-1", RequestKind::commit);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  // A duplicate commit queues behind the first.
  f.simple("c1-1-1", RequestKind::commit);
  CHECK(f.ready().empty());
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::committed), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 2);
  CHECK(status_of(r.replies[0]) == 200);
  CHECK(status_of(r.replies[1]) == 200);
  CHECK(r.replies[0].state == BranchState::committed);
  f.simple("c1-1-1", RequestKind::abort);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].state == BranchState::committed);
}

TEST_CASE("commit of a branch that was rolled back outside is answered 409 aborted, loudly") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  f.simple("c1-1-1", RequestKind::commit);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::aborted), f.now);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].state == BranchState::aborted);
  CHECK(f.m->counters().heuristic_mismatch == 1);
  CHECK(f.sink.find("rolled back", LogLevel::error).size() == 1);
}

TEST_CASE("a failed commit_prepared is answered 503 and the branch stays prepared") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  f.simple("c1-1-1", RequestKind::commit);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::failure(Code::unavailable), f.now);
  Ready r = f.ready();
  CHECK(r.replies[0].error.code() == Code::unavailable);
  CHECK(f.state("c1-1-1") == BranchState::prepared);
}

TEST_CASE("one-phase commit of an active branch") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.simple("c1-1-1", RequestKind::commit, true);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_one_phase);
  f.m->on_op_done("c1-1-1", OpKind::commit_one_phase, Fixture::outcome(pg::Outcome::committed), f.now);
  r = f.ready();
  CHECK(status_of(r.replies[0]) == 200);

  f.open_branch("c1-1-2");
  f.simple("c1-1-2", RequestKind::commit, true);
  f.ready();
  OpResult aborted = Fixture::outcome(pg::Outcome::aborted);
  aborted.reason = "deferred constraint";
  f.m->on_op_done("c1-1-2", OpKind::commit_one_phase, aborted, f.now);
  r = f.ready();
  CHECK(status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].reason == "deferred constraint");

  // A session lost mid-commit: unknown until the marker is read on the next request.
  f.open_branch("c1-1-3");
  f.simple("c1-1-3", RequestKind::commit, true);
  f.ready();
  f.m->on_op_done("c1-1-3", OpKind::commit_one_phase, Fixture::failure(Code::unavailable), f.now);
  r = f.ready();
  CHECK(r.replies[0].error.code() == Code::unavailable);
  f.simple("c1-1-3", RequestKind::commit, true);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::evidence);
  f.m->on_op_done("c1-1-3", OpKind::evidence, Fixture::evidence(pg::Evidence::committed), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 200);
}

TEST_CASE("abort of a gid never seen succeeds and blocks a late exec and prepare") {
  Fixture f;
  f.simple("c1-1-9", RequestKind::abort);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::evidence);
  f.m->on_op_done("c1-1-9", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 200);
  CHECK(r.replies[0].state == BranchState::aborted);
  f.exec("c1-1-9");
  r = f.ready();
  CHECK(r.enlists.empty());
  CHECK(r.ops.empty());
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::conflict);
  f.simple("c1-1-9", RequestKind::prepare);
  r = f.ready();
  CHECK(r.replies[0].vote == pg::Vote::no);
}

TEST_CASE("prepare of a gid never seen votes no; commit of one answers from evidence") {
  Fixture f;
  f.simple("c1-1-1", RequestKind::prepare);
  Ready r = f.ready();
  CHECK(r.ops.empty());
  CHECK(r.replies[0].vote == pg::Vote::no);
  f.simple("c1-1-2", RequestKind::commit);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::evidence, Fixture::evidence(pg::Evidence::prepared), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  f.simple("c1-1-3", RequestKind::commit);
  f.ready();
  f.m->on_op_done("c1-1-3", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  r = f.ready();
  CHECK(status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].state == BranchState::aborted);
}

TEST_CASE("statements on a prepared branch and commit of an active 2PC branch are refused") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.simple("c1-1-1", RequestKind::commit);
  Ready r = f.ready();
  CHECK(r.ops.empty());
  CHECK(r.replies[0].error.code() == Code::conflict);
  f.prepare("c1-1-1");
  f.exec("c1-1-1");
  r = f.ready();
  CHECK(r.ops.empty());
  CHECK(r.replies[0].error.code() == Code::conflict);
  f.simple("c1-1-1", RequestKind::precommit);  // a 2PC branch pre-commits only if asked: allowed
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::put_state);
}

TEST_CASE("an unprepared branch idle past its timeout is rolled back") {
  Fixture f;
  f.exec("c1-1-1");
  f.ready();
  f.m->on_enlisted("c1-1-1", ok_status(), 3'000, f.now);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::ok(), f.now);
  f.ready();
  f.m->tick(f.now + 3'999);
  CHECK(f.ready().ops.empty());
  f.m->tick(f.now + 4'000);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback);
  f.m->on_op_done("c1-1-1", OpKind::rollback, Fixture::ok(), f.now + 4'000);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
  CHECK(f.m->counters().idle_rollbacks == 1);
}

TEST_CASE("2PC in-doubt: a prepared branch asks with backoff and never decides alone") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  f.m->tick(f.now + f.opts.in_doubt_after_ms - 1);
  CHECK(f.ready().asks.empty());
  f.now += f.opts.in_doubt_after_ms;
  f.m->tick(f.now);
  Ready r = f.ready();
  REQUIRE(r.asks == std::vector<std::string>{"c1-1-1"});
  // Asking again waits for the answer.
  f.m->tick(f.now + 100'000);
  CHECK(f.ready().asks.empty());
  for (int i = 0; i < 5; ++i) {
    f.m->on_outcome("c1-1-1", Outcome::unreachable, "connection refused", f.now);
    CHECK(f.ready().ops.empty());
    f.m->tick(f.now + (f.opts.ask_min_ms << i) - 1);
    CHECK(f.ready().asks.empty());
    f.now += f.opts.ask_min_ms << i;
    f.m->tick(f.now);
    CHECK(f.ready().asks.size() == 1);
  }
  CHECK(f.state("c1-1-1") == BranchState::prepared);
  CHECK(f.m->in_doubt(f.now).size() == 1);
  f.m->on_outcome("c1-1-1", Outcome::commit, "committing", f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::committed), f.now);
  CHECK(f.state("c1-1-1") == BranchState::committed);
  CHECK(f.m->counters().resolved_by_query == 1);
}

TEST_CASE("the in-doubt scan adopts prepared transactions and reconciles stale memory") {
  Fixture f;
  f.m->on_scan({{"c1-1-1", 7'000, std::nullopt}, {"c1-1-2", 10, std::string("precommitted")}},
               f.now, f.now);
  CHECK(f.state("c1-1-1") == BranchState::prepared);
  CHECK(f.state("c1-1-2") == BranchState::precommitted);
  auto v = f.m->view("c1-1-1", f.now);
  CHECK(v->recovered);
  CHECK(v->age_ms == 7'000);
  f.m->tick(f.now);
  Ready r = f.ready();
  CHECK(r.asks == std::vector<std::string>{"c1-1-1"});  // old enough; the other is not

  // Memory says aborted while PostgreSQL still lists it prepared: rolled back.
  f.simple("c1-1-3", RequestKind::abort);
  f.ready();
  f.m->on_op_done("c1-1-3", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  f.ready();
  f.m->on_scan({{"c1-1-1", 7'000, std::nullopt},
                {"c1-1-2", 10, std::string("precommitted")},
                {"c1-1-3", 0, std::nullopt}},
               f.now, f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback_prepared);

  // Memory says prepared, PostgreSQL no longer lists it: verified from evidence.
  Fixture g;
  g.open_branch("c1-1-4");
  g.prepare("c1-1-4");
  g.m->on_scan({}, g.now + 1, g.now + 1);
  r = g.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::evidence);
  g.m->on_op_done("c1-1-4", OpKind::evidence, Fixture::evidence(pg::Evidence::committed), g.now);
  CHECK(g.state("c1-1-4") == BranchState::committed);
  CHECK(g.m->view("c1-1-4", g.now)->heuristic);
}

TEST_CASE("3PC: pre-commit is recorded durably before it is acknowledged") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare_3pc("c1-1-1", {});
  f.simple("c1-1-1", RequestKind::precommit);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::put_state);
  CHECK(r.ops[0].state == "precommitted");
  CHECK(r.replies.empty());
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].state == BranchState::precommitted);
  f.simple("c1-1-1", RequestKind::precommit);
  CHECK(status_of(f.ready().replies[0]) == 200);
}

TEST_CASE("3PC: a branch that cannot record its 3PC state votes no without preparing") {
  Fixture f;
  f.open_branch("c1-1-1");
  Request p;
  p.kind = RequestKind::prepare;
  p.protocol = Protocol::three_phase;
  f.send("c1-1-1", p);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  REQUIRE(r.ops[0].kind == OpKind::put_state);
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::failure(Code::unavailable), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback);  // never PREPARE
  CHECK(r.replies.empty());
  f.m->on_op_done("c1-1-1", OpKind::rollback, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(r.replies[0].reason.find("cannot record the 3PC state") != std::string::npos);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
  CHECK(r.ops.empty());  // nothing was written, nothing to remove
}

TEST_CASE("3PC: a vote other than yes removes the 3PC record; a lost session keeps it") {
  for (pg::Vote v : {pg::Vote::no, pg::Vote::read_only}) {
    Fixture f;
    f.open_branch("c1-1-1");
    Request p;
    p.kind = RequestKind::prepare;
    p.protocol = Protocol::three_phase;
    f.send("c1-1-1", p);
    f.ready();
    f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
    REQUIRE(f.ready().ops.size() == 1);
    f.m->on_op_done("c1-1-1", OpKind::prepare, Fixture::vote(v), f.now);
    Ready r = f.ready();
    REQUIRE(r.replies.size() == 1);
    CHECK(r.replies[0].vote == v);
    REQUIRE(r.ops.size() == 1);
    CHECK(r.ops[0].kind == OpKind::delete_state);
    f.m->on_op_done("c1-1-1", OpKind::delete_state, Fixture::ok(), f.now);
    f.now += 60'000;
    f.m->tick(f.now);
    CHECK(f.ready().empty());
  }
  // PREPARE may have happened: the record stays for the in-doubt scan.
  Fixture f;
  f.open_branch("c1-1-1");
  Request p;
  p.kind = RequestKind::prepare;
  p.protocol = Protocol::three_phase;
  f.send("c1-1-1", p);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  f.ready();
  f.m->on_op_done("c1-1-1", OpKind::prepare, Fixture::failure(Code::unavailable), f.now);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::no);
  CHECK(r.ops.empty());
  f.now += 60'000;
  f.m->tick(f.now);
  CHECK(f.ready().ops.empty());
}

TEST_CASE("3PC: exec with prepare records the 3PC state before its statements run") {
  Fixture f;
  f.open_branch("c1-1-1");
  Request e;
  e.kind = RequestKind::exec;
  e.statements = {{"UPDATE t SET v = 2", {}}};
  e.prepare = true;
  e.protocol = Protocol::three_phase;
  e.peers = {{"a1", "http://h:1"}};
  f.send("c1-1-1", e);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::put_state);
  CHECK(r.ops[0].peers == e.peers);
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::exec);
  CHECK(r.ops[0].then_prepare);
  CHECK(r.ops[0].statements.size() == 1);
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::vote(pg::Vote::yes), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].vote == pg::Vote::yes);
  // Finishing the branch clears the record in the same operation.
  f.simple("c1-1-1", RequestKind::commit);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  CHECK(r.ops[0].clear_state);
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::committed),
                  f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.ops.empty());
  CHECK(f.state("c1-1-1") == BranchState::committed);
}

namespace {

OpResult rows_result(size_t rows) {
  OpResult res;
  res.results = std::make_shared<std::vector<pg::StatementResult>>(1);
  (*res.results)[0].rows.assign(rows, std::vector<pg::Value>{pg::Value("1")});
  return res;
}

}  // namespace

TEST_CASE("rows past result_rows_max: the statement fails, a prepared branch is rolled back") {
  AgentOptions o;
  o.result_rows_max = 3;
  {
    Fixture f(o);
    f.open_branch("c1-1-1");
    f.exec("c1-1-1");
    REQUIRE(f.ready().ops.size() == 1);
    f.m->on_op_done("c1-1-1", OpKind::exec, rows_result(3), f.now);
    Reply ok = f.ready().replies.at(0);
    CHECK(ok.error.ok());
    f.exec("c1-1-1");
    f.ready();
    f.m->on_op_done("c1-1-1", OpKind::exec, rows_result(4), f.now);
    Reply r = f.ready().replies.at(0);
    CHECK(r.error.code() == Code::sql_error);
    CHECK(r.sqlstate == "54000");
    CHECK(f.state("c1-1-1") == BranchState::failed);
  }
  {
    Fixture f(o);
    f.open_branch("c1-1-1");
    f.exec("c1-1-1", /*prepare=*/true);
    REQUIRE(f.ready().ops.size() == 1);
    OpResult res = rows_result(4);
    res.prepare = pg::PrepareResult{pg::Vote::yes, "", ""};
    f.m->on_op_done("c1-1-1", OpKind::exec, res, f.now);
    Ready r = f.ready();
    CHECK(r.replies.empty());
    REQUIRE(r.ops.size() == 1);
    CHECK(r.ops[0].kind == OpKind::rollback_prepared);
    f.m->on_op_done("c1-1-1", OpKind::rollback_prepared, Fixture::outcome(pg::Outcome::aborted),
                    f.now);
    r = f.ready();
    REQUIRE(r.replies.size() == 1);
    CHECK(r.replies[0].vote == pg::Vote::no);
    CHECK(r.replies[0].sqlstate == "54000");
    CHECK(f.state("c1-1-1") == BranchState::aborted);
  }
  {
    Fixture f(o);
    f.open_branch("c1-1-1");
    Request e;
    e.kind = RequestKind::exec;
    e.statements = {{"SELECT 1", {}}};
    e.one_phase = true;
    f.send("c1-1-1", e);
    REQUIRE(f.ready().ops.size() == 1);
    OpResult res = rows_result(5);
    res.outcome = pg::Outcome::committed;
    f.m->on_op_done("c1-1-1", OpKind::exec, res, f.now);
    Reply r = f.ready().replies.at(0);
    CHECK(r.error.ok());
    CHECK(r.state == BranchState::committed);  // it committed: the answer is cut, not failed
    REQUIRE(r.results->size() == 1);
    CHECK((*r.results)[0].rows.size() == 3);
    CHECK((*r.results)[0].truncated);
  }
}

TEST_CASE("3PC timeouts: prepared and unreachable aborts alone, pre-committed commits alone") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare_3pc("c1-1-1", {});
  f.now += f.opts.precommit_timeout_ms;
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  // A reachable but undecided coordinator: wait.
  f.m->on_outcome("c1-1-1", Outcome::pending, "preparing", f.now);
  CHECK(f.ready().ops.empty());
  f.now += f.opts.ask_min_ms;
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  f.m->on_outcome("c1-1-1", Outcome::unreachable, "connection refused", f.now);
  // The decision is recorded before it is carried out.
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::put_state);
  CHECK(r.ops[0].state == "unilateral_abort");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback_prepared);
  CHECK_FALSE(r.ops[0].clear_state);  // the record stays until the check is over
  f.m->on_op_done("c1-1-1", OpKind::rollback_prepared, Fixture::outcome(pg::Outcome::aborted), f.now);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
  CHECK(f.m->counters().unilateral_aborts == 1);
  CHECK(f.m->view("c1-1-1", f.now)->check == Check::unchecked);
  CHECK(f.m->in_doubt(f.now).size() == 1);

  // Later the coordinator answers commit: the disagreement is reported once, as ERROR.
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  f.m->on_outcome("c1-1-1", Outcome::commit, "committing", f.now);
  CHECK(f.m->counters().heuristic_mismatch == 1);
  CHECK(f.sink.find("heuristic outcome", LogLevel::error).size() == 1);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].state == "mismatch_abort");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  r = f.ready();
  CHECK(r.asks.empty());  // checked: no more asking
  REQUIRE(r.reports.size() == 1);
  CHECK_FALSE(r.reports[0].committed);

  Fixture g;
  g.m->on_scan({{"c1-1-2", 0, std::string("precommitted")}}, g.now, g.now);
  g.now += g.opts.commit_timeout_ms;
  g.m->tick(g.now);
  REQUIRE(g.ready().asks.size() == 1);
  g.m->on_outcome("c1-1-2", Outcome::unreachable, "timeout", g.now);
  r = g.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].state == "unilateral_commit");
  g.m->on_op_done("c1-1-2", OpKind::put_state, Fixture::ok(), g.now);
  r = g.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  CHECK(g.m->counters().unilateral_commits == 1);
}

TEST_CASE("a 2PC prepared branch with an unreachable coordinator waits, whatever its age") {
  Fixture f;
  f.m->on_scan({{"c1-1-1", 3'600'000, std::nullopt}}, f.now, f.now);
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  f.m->on_outcome("c1-1-1", Outcome::unreachable, "connection refused", f.now);
  CHECK(f.ready().ops.empty());
  CHECK(f.state("c1-1-1") == BranchState::prepared);
}

TEST_CASE("operator resolve: records the decision, then rolls back the prepared branch") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  Request r;
  r.kind = RequestKind::resolve;
  r.commit = false;
  f.send("c1-1-1", r);
  Ready ready = f.ready();
  REQUIRE(ready.ops.size() == 1);
  CHECK(ready.ops[0].kind == OpKind::put_state);
  CHECK(ready.ops[0].state == "heuristic_abort");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  ready = f.ready();
  REQUIRE(ready.ops.size() == 1);
  CHECK(ready.ops[0].kind == OpKind::rollback_prepared);
  CHECK(ready.replies.empty());
  f.m->on_op_done("c1-1-1", OpKind::rollback_prepared, Fixture::outcome(pg::Outcome::aborted),
                  f.now);
  ready = f.ready();
  REQUIRE(ready.replies.size() == 1);
  CHECK(status_of(ready.replies[0]) == 200);
  CHECK(ready.ops.empty());  // the record already says what happened
  auto v = f.m->view("c1-1-1", f.now);
  CHECK(v->heuristic);
  CHECK(v->check == Check::unchecked);
  // Resolving it the other way now is refused.
  r.commit = true;
  f.send("c1-1-1", r);
  ready = f.ready();
  CHECK(ready.replies[0].error.code() == Code::conflict);
}

TEST_CASE("operator resolve: a failed record changes nothing") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  Request r;
  r.kind = RequestKind::resolve;
  r.commit = true;
  f.send("c1-1-1", r);
  REQUIRE(f.ready().ops.size() == 1);
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::failure(Code::unavailable), f.now);
  Ready ready = f.ready();
  CHECK(ready.ops.empty());
  REQUIRE(ready.replies.size() == 1);
  CHECK(ready.replies[0].error.code() == Code::unavailable);
  CHECK(f.state("c1-1-1") == BranchState::prepared);
  CHECK_FALSE(f.m->view("c1-1-1", f.now)->heuristic);
}

namespace {

// Resolves a prepared branch by hand to `commit`, with every write succeeding.
void resolve_by_hand(Fixture& f, const std::string& gid, bool commit) {
  Request r;
  r.kind = RequestKind::resolve;
  r.commit = commit;
  f.send(gid, r);
  REQUIRE(f.ready().ops.size() == 1);
  f.m->on_op_done(gid, OpKind::put_state, Fixture::ok(), f.now);
  REQUIRE(f.ready().ops.size() == 1);
  OpKind k = commit ? OpKind::commit_prepared : OpKind::rollback_prepared;
  f.m->on_op_done(gid, k, Fixture::outcome(commit ? pg::Outcome::committed : pg::Outcome::aborted),
                  f.now);
  REQUIRE(f.ready().replies.size() == 1);
}

// Asks (the tick is due) and answers with `o`; returns what followed.
Ready answer_ask(Fixture& f, const std::string& gid, Outcome o,
                 std::optional<BranchState> recorded = std::nullopt) {
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  Ready r = f.ready();
  REQUIRE(r.asks == std::vector<std::string>{gid});
  f.m->on_outcome(gid, o, "answer", f.now, recorded);
  return f.ready();
}

}  // namespace

TEST_CASE("a decision by hand that matches the coordinator's is settled and its record removed") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  resolve_by_hand(f, "c1-1-1", true);
  CHECK(f.m->in_doubt(f.now).size() == 1);
  Ready r = answer_ask(f, "c1-1-1", Outcome::commit);
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::delete_state);
  f.m->on_op_done("c1-1-1", OpKind::delete_state, Fixture::ok(), f.now);
  CHECK(f.m->view("c1-1-1", f.now)->check == Check::none);
  CHECK(f.m->in_doubt(f.now).empty());
  CHECK(f.m->heuristic_outcomes() == 0);
  CHECK(f.m->counters().heuristic_mismatch == 0);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  CHECK(f.ready().empty());
}

TEST_CASE("a decision by hand against the coordinator is reported to it and kept until forgotten") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  resolve_by_hand(f, "c1-1-1", true);
  Ready r = answer_ask(f, "c1-1-1", Outcome::abort);  // presumed abort
  CHECK(f.m->counters().heuristic_mismatch == 1);
  CHECK(f.sink.find("heuristic outcome", LogLevel::error).size() == 1);
  CHECK(f.m->heuristic_outcomes() == 1);
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].state == "mismatch_commit");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  f.m->tick(f.now);
  r = f.ready();
  REQUIRE(r.reports.size() == 1);
  CHECK(r.reports[0].committed);
  // The coordinator is briefly unavailable: reported again later, not at once.
  f.m->on_reported("c1-1-1", unavailable("down"), f.now);
  f.m->tick(f.now);
  CHECK(f.ready().reports.empty());
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  REQUIRE(f.ready().reports.size() == 1);
  f.m->on_reported("c1-1-1", ok_status(), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].state == "reported_commit");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  CHECK(f.m->counters().reports_sent == 1);
  CHECK(f.m->heuristic_outcomes() == 1);
  REQUIRE(f.m->in_doubt(f.now).size() == 1);
  CHECK(f.m->in_doubt(f.now)[0].check == Check::reported);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  CHECK(f.ready().empty());  // nothing more to do until an operator forgets it

  f.simple("c1-1-1", RequestKind::forget);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::delete_state);
  f.m->on_op_done("c1-1-1", OpKind::delete_state, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 200);
  CHECK(r.replies[0].state == BranchState::committed);
  CHECK(f.m->heuristic_outcomes() == 0);
  CHECK(f.m->in_doubt(f.now).empty());
  CHECK(f.sink.find("forgotten by an operator", LogLevel::warn).size() == 1);
  f.simple("c1-1-1", RequestKind::forget);
  CHECK(f.ready().replies[0].error.code() == Code::conflict);
  f.simple("c1-1-9", RequestKind::forget);
  CHECK(f.ready().replies[0].error.code() == Code::not_found);
}

TEST_CASE("the coordinator's own request meeting a decision by hand needs no report") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  resolve_by_hand(f, "c1-1-1", true);
  f.simple("c1-1-1", RequestKind::abort);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 409);  // the coordinator learns it from this answer
  CHECK(f.m->counters().heuristic_mismatch == 1);
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].state == "reported_commit");
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  CHECK(f.ready().empty());
  CHECK(f.m->heuristic_outcomes() == 1);
}

TEST_CASE("decisions taken here come back from their records after a restart") {
  Fixture f;
  f.m->on_scan(
      {{"c1-1-1", 5'000, std::string("heuristic_commit")}}, f.now, f.now,
      {{"c1-1-2", {Check::mismatch, true, false}, "resolved by an operator"},
       {"c1-1-3", {Check::reported, true, true}, "resolved by an operator"},
       {"c1-1-4", {Check::unchecked, false, true}, "3PC decided without the coordinator"}});
  // Recorded but not carried out: carried out now, without writing the record again.
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::commit_prepared);
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::committed),
                  f.now);
  CHECK(f.ready().ops.empty());
  CHECK(f.state("c1-1-1") == BranchState::committed);
  CHECK(f.state("c1-1-2") == BranchState::aborted);
  CHECK(f.state("c1-1-3") == BranchState::committed);
  CHECK(f.m->heuristic_outcomes() == 2);
  CHECK(f.m->in_doubt(f.now).size() == 4);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  r = f.ready();
  CHECK(r.ops.empty());
  std::sort(r.asks.begin(), r.asks.end());
  CHECK(r.asks == std::vector<std::string>{"c1-1-1", "c1-1-4"});
  REQUIRE(r.reports.size() == 1);
  CHECK(r.reports[0].gid == "c1-1-2");
  CHECK(f.m->view("c1-1-4", f.now)->unilateral);
}

TEST_CASE("a branch the coordinator's view records wrongly reports its true outcome") {
  Fixture f;
  f.m->on_scan({{"c1-1-1", 5'000, std::nullopt}}, f.now, f.now);
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  // A misdirected agent once answered "aborted" for this branch.
  f.m->on_outcome("c1-1-1", Outcome::commit, "heuristic_mixed", f.now, BranchState::aborted);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  f.m->on_op_done("c1-1-1", OpKind::commit_prepared, Fixture::outcome(pg::Outcome::committed),
                  f.now);
  f.m->tick(f.now);
  r = f.ready();
  REQUIRE(r.reports.size() == 1);
  CHECK(r.reports[0].committed);
  f.m->on_reported("c1-1-1", ok_status(), f.now);
  f.now += f.opts.ask_max_ms;
  f.m->tick(f.now);
  CHECK(f.ready().empty());
  CHECK(f.m->heuristic_outcomes() == 0);
  CHECK(f.m->in_doubt(f.now).empty());
}

TEST_CASE("a branch still being settled is not evicted with the finished ones") {
  AgentOptions o;
  o.finished_kept_max = 1;
  Fixture f(o);
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  resolve_by_hand(f, "c1-1-1", false);
  for (int i = 2; i <= 4; ++i) {
    std::string gid = "c1-1-" + std::to_string(i);
    f.open_branch(gid);
    f.simple(gid, RequestKind::abort);
    f.m->on_op_done(gid, OpKind::rollback, Fixture::ok(), f.now);
    f.ready();
  }
  CHECK(f.m->view("c1-1-1", f.now).has_value());
  CHECK_FALSE(f.m->view("c1-1-2", f.now).has_value());
  Ready r = answer_ask(f, "c1-1-1", Outcome::abort);
  REQUIRE(r.ops.size() == 1);
  f.m->on_op_done("c1-1-1", OpKind::delete_state, Fixture::ok(), f.now);
  // Settled: evictable again.
  f.open_branch("c1-1-5");
  f.simple("c1-1-5", RequestKind::abort);
  f.m->on_op_done("c1-1-5", OpKind::rollback, Fixture::ok(), f.now);
  CHECK_FALSE(f.m->view("c1-1-1", f.now).has_value());
}

TEST_CASE("requests queue behind the operation in flight, up to a limit") {
  AgentOptions o;
  o.queue_per_branch_max = 2;
  Fixture f(o);
  f.open_branch("c1-1-1");
  f.exec("c1-1-1");
  f.exec("c1-1-1");
  f.exec("c1-1-1");
  f.exec("c1-1-1");
  Ready r = f.ready();
  CHECK(r.ops.size() == 1);
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].error.code() == Code::unavailable);
}

TEST_CASE("finished branches are remembered up to a limit") {
  AgentOptions o;
  o.finished_kept_max = 2;
  Fixture f(o);
  for (int i = 1; i <= 4; ++i) {
    std::string gid = "c1-1-" + std::to_string(i);
    f.simple(gid, RequestKind::prepare);  // votes no: an ended tombstone
    f.ready();
  }
  CHECK_FALSE(f.m->view("c1-1-1", f.now).has_value());
  CHECK_FALSE(f.m->view("c1-1-2", f.now).has_value());
  CHECK(f.m->view("c1-1-4", f.now).has_value());
}

TEST_CASE("an abort while a statement runs cancels it, then rolls the branch back") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.exec("c1-1-1");
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  f.simple("c1-1-1", RequestKind::abort);
  r = f.ready();
  CHECK(r.cancels == std::vector<std::string>{"c1-1-1"});
  CHECK(r.ops.empty());
  f.simple("c1-1-1", RequestKind::abort);  // a second abort does not cancel twice
  CHECK(f.ready().cancels.empty());
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::failure(Code::sql_error, "57014"), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::rollback);
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].sqlstate == "57014");
  f.m->on_op_done("c1-1-1", OpKind::rollback, Fixture::ok(), f.now);
  r = f.ready();
  CHECK(r.replies.size() == 2);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
}

TEST_CASE("a statement still running past the branch's timeout is cancelled") {
  Fixture f;
  f.exec("c1-1-1");
  f.ready();
  f.m->on_enlisted("c1-1-1", ok_status(), 1'000, f.now);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  f.m->tick(f.now + 1'999);
  CHECK(f.ready().cancels.empty());
  f.m->tick(f.now + 2'000);
  CHECK(f.ready().cancels.size() == 1);
}

TEST_CASE("a newer coordinator epoch rolls back unprepared branches of older ones") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.open_branch("c1-1-2");
  f.prepare("c1-1-2");
  f.open_branch("c2-1-1");  // another coordinator: untouched
  f.exec("c1-2-1");        // the coordinator restarted
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].gid == "c1-1-1");
  CHECK(r.ops[0].kind == OpKind::rollback);
  CHECK(r.enlists == std::vector<std::string>{"c1-2-1"});
  f.m->on_op_done("c1-1-1", OpKind::rollback, Fixture::ok(), f.now);
  CHECK(f.state("c1-1-1") == BranchState::aborted);
  CHECK(f.state("c2-1-1") == BranchState::active);
  // The prepared branch of the old epoch asks at once instead of waiting.
  f.m->tick(f.now);
  CHECK(f.ready().asks == std::vector<std::string>{"c1-1-2"});
}

namespace {

// A 3PC branch of agent a1 (the fixture's name) with peers a1 and a2, prepared.
void prepare_3pc(Fixture& f, const std::string& gid) {
  f.open_branch(gid);
  f.prepare_3pc(gid);
}

// Times the branch out with the coordinator unreachable; returns the peer query.
PeerQuery time_out(Fixture& f, const std::string& gid, int64_t timeout_ms) {
  f.now += timeout_ms;
  f.m->tick(f.now);
  REQUIRE(f.ready().asks.size() == 1);
  f.m->on_outcome(gid, Outcome::unreachable, "connection refused", f.now);
  Ready r = f.ready();
  CHECK(r.ops.empty());
  REQUIRE(r.peer_queries.size() == 1);
  return r.peer_queries[0];
}

// The decision taken alone: recorded first, then carried out; returns the op that carries it.
PgOp decided_op(Fixture& f, const std::string& gid) {
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::put_state);
  CHECK(r.ops[0].state.rfind("unilateral_", 0) == 0);
  f.m->on_op_done(gid, OpKind::put_state, Fixture::ok(), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  return r.ops[0];
}

}  // namespace

TEST_CASE("3PC termination: a timed-out branch asks its peers before deciding") {
  Fixture f;
  prepare_3pc(f, "c1-1-1");
  PeerQuery q = time_out(f, "c1-1-1", f.opts.precommit_timeout_ms);
  REQUIRE(q.peers.size() == 1);  // itself excluded
  CHECK(q.peers[0].participant == "a2");

  SUBCASE("a pre-committed peer means commit") {
    f.m->on_peer_states("c1-1-1", {{"a2", BranchState::precommitted}}, f.now);
    PgOp op = decided_op(f, "c1-1-1");
    CHECK(op.kind == OpKind::commit_prepared);
    CHECK_FALSE(op.clear_state);  // the record is the check's now
  }
  SUBCASE("peers only prepared, or unreachable: a prepared branch aborts") {
    f.m->on_peer_states("c1-1-1", {{"a2", BranchState::prepared}}, f.now);
    CHECK(decided_op(f, "c1-1-1").kind == OpKind::rollback_prepared);
  }
  SUBCASE("an aborted peer means abort") {
    f.m->on_peer_states("c1-1-1", {{"a2", BranchState::aborted}}, f.now);
    CHECK(decided_op(f, "c1-1-1").kind == OpKind::rollback_prepared);
  }
  CHECK(f.m->counters().unilateral_commits + f.m->counters().unilateral_aborts == 1);
}

TEST_CASE("3PC termination: a decision taken alone and not carried out stands against silence") {
  Fixture f;
  prepare_3pc(f, "c1-1-1");
  time_out(f, "c1-1-1", f.opts.precommit_timeout_ms);
  f.m->on_peer_states("c1-1-1", {{"a2", BranchState::committed}}, f.now);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  REQUIRE(r.ops[0].kind == OpKind::put_state);
  // PostgreSQL is down: the decision is neither recorded nor carried out.
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::failure(Code::unavailable), f.now);
  f.ready();
  CHECK(f.m->view("c1-1-1", f.now)->state == BranchState::prepared);
  // Later the peer that committed is unreachable; silence does not turn commit into abort.
  PeerQuery q = time_out(f, "c1-1-1", 60'000);
  f.m->on_peer_states("c1-1-1", {{"a2", std::nullopt}}, f.now);
  CHECK(decided_op(f, "c1-1-1").kind == OpKind::commit_prepared);
  CHECK(f.m->counters().unilateral_aborts == 0);
}

TEST_CASE("3PC termination: a pre-committed branch commits unless a peer aborted") {
  Fixture f;
  prepare_3pc(f, "c1-1-1");
  f.simple("c1-1-1", RequestKind::precommit);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].peers.size() == 2);  // the record keeps the peers
  f.m->on_op_done("c1-1-1", OpKind::put_state, Fixture::ok(), f.now);
  f.ready();
  time_out(f, "c1-1-1", f.opts.commit_timeout_ms);
  SUBCASE("unreachable peers") {
    f.m->on_peer_states("c1-1-1", {{"a2", std::nullopt}}, f.now);
    CHECK(decided_op(f, "c1-1-1").kind == OpKind::commit_prepared);
  }
  SUBCASE("an aborted peer") {
    f.m->on_peer_states("c1-1-1", {{"a2", BranchState::aborted}}, f.now);
    CHECK(decided_op(f, "c1-1-1").kind == OpKind::rollback_prepared);
  }
}

TEST_CASE("a peer's query is answered with the branch's state, from evidence when unknown") {
  Fixture f;
  f.open_branch("c1-1-1");
  f.prepare("c1-1-1");
  f.simple("c1-1-1", RequestKind::status);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].state == BranchState::prepared);
  f.simple("c1-1-2", RequestKind::status);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::evidence);
  f.m->on_op_done("c1-1-2", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].state == BranchState::aborted);
  // The answer stands: a late prepare of that gid votes no.
  f.simple("c1-1-2", RequestKind::prepare);
  CHECK(f.ready().replies[0].vote == pg::Vote::no);
}

TEST_CASE("the scan restores a 3PC branch with its peers from its durable record") {
  Fixture f;
  AgentMachine::ScanEntry e{"c1-1-1", 50, std::string("prepared3"), {{"a1", "http://h:1"}, {"a2", "http://h:2"}}};
  f.m->on_scan({e}, f.now, f.now);
  auto v = f.m->view("c1-1-1", f.now);
  REQUIRE(v.has_value());
  CHECK(v->protocol == Protocol::three_phase);
  CHECK(v->state == BranchState::prepared);
  CHECK(v->timeout_ms == f.opts.precommit_timeout_ms);
  PeerQuery q = time_out(f, "c1-1-1", f.opts.precommit_timeout_ms);
  CHECK(q.peers.size() == 1);
}

TEST_CASE("an exec the coordinator sent enlisted skips enlistment; with commit it ends in one phase") {
  Fixture f;
  Request r;
  r.kind = RequestKind::exec;
  r.statements = {{"UPDATE t SET v = 1", {}}};
  r.enlisted = true;
  r.one_phase = true;
  f.send("c1-1-1", r);
  Ready ready = f.ready();
  CHECK(ready.enlists.empty());
  REQUIRE(ready.ops.size() == 1);
  CHECK(ready.ops[0].then_commit);
  f.m->on_op_done("c1-1-1", OpKind::exec, Fixture::outcome(pg::Outcome::committed), f.now);
  ready = f.ready();
  REQUIRE(ready.replies.size() == 1);
  CHECK(ready.replies[0].state == BranchState::committed);
  CHECK(f.m->open_sessions() == 0);

  // Statements that fail: rolled back, answered 422 with the branch aborted.
  f.send("c1-1-2", r);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::exec, Fixture::failure(Code::sql_error, "23514"), f.now);
  ready = f.ready();
  REQUIRE(ready.ops.size() == 1);
  CHECK(ready.ops[0].kind == OpKind::rollback);
  f.m->on_op_done("c1-1-2", OpKind::rollback, Fixture::ok(), f.now);
  ready = f.ready();
  REQUIRE(ready.replies.size() == 1);
  CHECK(status_of(ready.replies[0]) == 422);
  CHECK(ready.replies[0].state == BranchState::aborted);
  CHECK_FALSE(ready.replies[0].vote.has_value());
}

TEST_CASE("a resent one-phase commit for a branch never seen writes a tombstone before answering") {
  Fixture f;
  f.simple("c1-1-1", RequestKind::commit, true);
  Ready r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::evidence);
  f.m->on_op_done("c1-1-1", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  r = f.ready();
  REQUIRE(r.ops.size() == 1);
  CHECK(r.ops[0].kind == OpKind::tombstone);
  CHECK(r.replies.empty());
  f.m->on_op_done("c1-1-1", OpKind::tombstone, Fixture::outcome(pg::Outcome::aborted), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].state == BranchState::aborted);
  // If the branch's own commit got there first, the answer is committed.
  f.simple("c1-1-2", RequestKind::commit, true);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  f.ready();
  f.m->on_op_done("c1-1-2", OpKind::tombstone, Fixture::outcome(pg::Outcome::committed), f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(status_of(r.replies[0]) == 200);
  // A plain abort of a gid never seen needs no tombstone: nothing can enlist it any more.
  f.simple("c1-1-3", RequestKind::abort);
  f.ready();
  f.m->on_op_done("c1-1-3", OpKind::evidence, Fixture::evidence(pg::Evidence::absent), f.now);
  r = f.ready();
  CHECK(r.ops.empty());
  CHECK(r.replies.size() == 1);
}
