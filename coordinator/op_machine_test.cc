// Unit tests of the coordinator machine's TCC and saga transitions (docs/DESIGN.md §9): every
// transition, the refused ones, the order of writes and calls, timeouts and recovery.
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <memory>

#include "coordinator/codec.h"
#include "coordinator/coordinator_machine.h"

using namespace tpc;
using namespace tpc::coord;

namespace {

wal::OpText op_text(StepOp op, std::string_view path) {
  return {op, std::string(R"({"url":"http://127.0.0.1:9/)") + std::string(path) + "\"}"};
}

OpBranch tcc_branch(std::string name) {
  return {name,
          {op_text(StepOp::try_op, name + "/try"), op_text(StepOp::confirm, name + "/confirm"),
           op_text(StepOp::cancel, name + "/cancel")}};
}

OpBranch step(std::string name, bool compensate = true) {
  OpBranch b{name, {op_text(StepOp::action, name + "/action")}};
  if (compensate) b.ops.push_back(op_text(StepOp::compensate, name + "/compensate"));
  return b;
}

struct Fixture {
  MemorySink sink;
  Logger log{&sink, LogFormat::text, LogLevel::debug};
  MachineOptions opts;
  std::unique_ptr<CoordinatorMachine> m;
  int64_t now = 1'000'000;
  // Everything the machine asked for, in order, since the last take().
  std::vector<Persist> persisted;
  std::vector<OpCall> calls;
  std::vector<ClientReply> replies;
  // Every call ever made, for order checks across the whole test.
  std::vector<OpCall> history;
  // What the log holds: the last record written of each gid.
  std::map<std::string, wal::TxnRecord> log_records;

  explicit Fixture(MachineOptions o = {}) : opts(std::move(o)) { restart(1); }

  void restart(uint64_t epoch, std::vector<wal::TxnRecord> unfinished = {}) {
    m = std::make_unique<CoordinatorMachine>(opts, log);
    m->recover(epoch, std::nullopt, std::move(unfinished), now);
    take();
  }

  // Collects the machine's effects without completing any write.
  void take() {
    Ready r = m->take_ready();
    for (auto& p : r.persist) {
      log_records[p.record.gid] = p.record;
      persisted.push_back(std::move(p));
    }
    for (auto& c : r.calls) {
      history.push_back(c);
      calls.push_back(std::move(c));
    }
    for (auto& x : r.replies) replies.push_back(std::move(x));
  }

  // Completes every synced write taken so far (they become durable in order).
  void sync() {
    std::vector<Persist> done = std::move(persisted);
    persisted.clear();
    for (auto& p : done)
      if (p.notify) m->on_persisted(p.record.gid, now, p.seq);
    take();
  }

  void clear() {
    calls.clear();
    replies.clear();
  }

  void answer(const OpCall& c, OpOutcome outcome, std::string result = "",
              int64_t retry_after_ms = 0) {
    m->on_op_reply(OpReply{c.gid, c.branch, c.op, outcome, std::move(result),
                           outcome == OpOutcome::ok ? "" : "failed", retry_after_ms},
                   now);
    take();
  }

  // Answers the one outstanding call of `branch` doing `op`.
  void answer(const std::string& branch, StepOp op, OpOutcome outcome, std::string result = "") {
    auto it = std::find_if(calls.begin(), calls.end(),
                           [&](const OpCall& c) { return c.branch == branch && c.op == op; });
    REQUIRE_MESSAGE(it != calls.end(), "no call of " << branch << " " << step_op_name(op));
    OpCall c = *it;
    calls.erase(it);
    answer(c, outcome, std::move(result));
  }

  void advance(int64_t ms) {
    now += ms;
    m->tick(now);
    take();
  }

  std::string begin_tcc(std::optional<int64_t> timeout_ms = std::nullopt) {
    auto v = m->begin(Protocol::tcc, timeout_ms, now);
    REQUIRE(v.ok());
    CHECK(v->state == TxnState::active);
    return v->gid;
  }

  // Tries a branch and lets its registration become durable.
  void tried(const std::string& gid, const std::string& name, uint64_t waiter) {
    REQUIRE_FALSE(m->try_branch(gid, tcc_branch(name), waiter, now).has_value());
    take();
    sync();
    answer(name, StepOp::try_op, OpOutcome::ok, R"({"frozen":1})");
  }

  TxnView view(const std::string& gid) {
    auto l = m->lookup(gid);
    REQUIRE(l.kind == LookupKind::live);
    return l.view;
  }

  const BranchView& branch(const TxnView& v, const std::string& name) {
    auto it = std::find_if(v.branches.begin(), v.branches.end(),
                           [&](const BranchView& b) { return b.participant == name; });
    REQUIRE(it != v.branches.end());
    return *it;
  }

  std::vector<std::string> called(StepOp op) const {
    std::vector<std::string> out;
    for (auto& c : history)
      if (c.op == op) out.push_back(c.branch);
    return out;
  }

  const ClientReply* reply_to(uint64_t waiter) const {
    for (auto& r : replies)
      if (r.waiter == waiter) return &r;
    return nullptr;
  }

  std::string run(std::vector<OpBranch> steps, SagaOptions o, uint64_t waiter) {
    auto gid = m->run_saga(std::move(steps), o, waiter, now);
    REQUIRE(gid.ok());
    take();
    return *gid;
  }
};

}  // namespace

// --- TCC -----------------------------------------------------------------------------------

TEST_CASE("TCC: a branch's registration is durable before its try is sent") {
  Fixture f;
  std::string gid = f.begin_tcc();
  REQUIRE_FALSE(f.m->try_branch(gid, tcc_branch("debit"), 5, f.now).has_value());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.decision == wal::Decision::registered);
  CHECK(f.persisted[0].record.protocol == Protocol::tcc);
  REQUIRE(f.persisted[0].record.branches.size() == 1);
  CHECK(f.persisted[0].record.branches[0].ops.size() == 3);
  CHECK(f.calls.empty());  // not before the write is durable
  f.sync();
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].op == StepOp::try_op);
  CHECK(f.calls[0].attempt == 1);
  CHECK(f.calls[0].spec.find("debit/try") != std::string::npos);
  CHECK(f.replies.empty());
  f.answer("debit", StepOp::try_op, OpOutcome::ok, R"({"frozen":30})");
  const ClientReply* r = f.reply_to(5);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 200);
  CHECK(r->branch == "debit");
  CHECK(f.branch(r->view, "debit").state == BranchState::tried);
  CHECK(f.branch(r->view, "debit").result == R"({"frozen":30})");
}

TEST_CASE("TCC: commit confirms every tried branch once the decision is durable") {
  Fixture f;
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  f.tried(gid, "credit", 2);
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 9, {}, f.now).has_value());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].record.decision == wal::Decision::commit);
  CHECK(f.persisted[0].sync);
  CHECK(f.calls.empty());
  CHECK(f.view(gid).state == TxnState::committing);
  f.sync();
  CHECK(f.calls.size() == 2);
  CHECK(f.called(StepOp::confirm) == std::vector<std::string>{"debit", "credit"});
  f.answer("debit", StepOp::confirm, OpOutcome::ok);
  CHECK(f.replies.empty());
  f.answer("credit", StepOp::confirm, OpOutcome::ok);
  const ClientReply* r = f.reply_to(9);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 200);
  CHECK(r->view.state == TxnState::committed);
  CHECK(f.called(StepOp::cancel).empty());
  // The end record goes after the confirms.
  REQUIRE_FALSE(f.persisted.empty());
  CHECK(f.persisted.back().record.ended);
  CHECK(f.persisted.back().record.decision == wal::Decision::commit);
  CHECK(f.m->counters().committed[protocol_index(Protocol::tcc)] == 1);
}

TEST_CASE("TCC: commit is refused while a try has not answered, and changes nothing") {
  Fixture f;
  std::string gid = f.begin_tcc();
  REQUIRE_FALSE(f.m->try_branch(gid, tcc_branch("debit"), 1, f.now).has_value());
  f.take();
  auto r = f.m->commit(gid, 2, {}, f.now);
  REQUIRE(r.has_value());
  CHECK(http_status_of(*r) == 409);
  CHECK(r->error.message().find("debit") != std::string::npos);
  f.take();
  CHECK(f.view(gid).state == TxnState::active);
  CHECK(f.view(gid).decision == Decision::none);
}

TEST_CASE("TCC: a failed try aborts the transaction and cancels every registered branch") {
  for (OpOutcome failure : {OpOutcome::business_failure, OpOutcome::unknown}) {
    CAPTURE(op_outcome_name(failure));
    Fixture f;
    std::string gid = f.begin_tcc();
    f.tried(gid, "credit", 1);
    REQUIRE_FALSE(f.m->try_branch(gid, tcc_branch("fee"), 2, f.now).has_value());
    REQUIRE_FALSE(f.m->try_branch(gid, tcc_branch("debit"), 3, f.now).has_value());
    f.take();
    f.sync();
    // An unknown try is asked again a few times before it counts as failed.
    int answers = failure == OpOutcome::unknown ? 3 : 1;
    for (int k = 0; k < answers; ++k) {
      f.answer("debit", StepOp::try_op, failure);
      if (k + 1 < answers) f.advance(f.opts.retry_max_ms);
    }
    const ClientReply* r = f.reply_to(3);
    REQUIRE(r != nullptr);
    CHECK(http_status_of(*r) == 409);
    CHECK(r->view.reason == "try_failed");
    CHECK(r->view.reason_branch == "debit");
    // The fee branch's try is still out: its waiter learns of the abort too.
    REQUIRE(f.reply_to(2) != nullptr);
    CHECK(http_status_of(*f.reply_to(2)) == 409);
    auto cancels = f.called(StepOp::cancel);
    std::sort(cancels.begin(), cancels.end());
    CHECK(cancels == std::vector<std::string>{"credit", "debit", "fee"});
    // The fee try answers late: it is ignored (the branch is being cancelled).
    f.answer("fee", StepOp::try_op, OpOutcome::ok);
    CHECK(f.branch(f.view(gid), "fee").state == BranchState::cancelling);
    // A commit now is refused with the outcome.
    auto c = f.m->commit(gid, 8, {}, f.now);
    REQUIRE(c.has_value());
    CHECK(http_status_of(*c) == 409);
    REQUIRE_FALSE(f.m->abort(gid, 7, f.now).has_value());
    f.take();
    for (std::string b : {"credit", "debit", "fee"}) f.answer(b, StepOp::cancel, OpOutcome::ok);
    REQUIRE(f.reply_to(7) != nullptr);
    CHECK(http_status_of(*f.reply_to(7)) == 200);
    CHECK(f.reply_to(7)->view.state == TxnState::aborted);
    CHECK(f.called(StepOp::confirm).empty());
  }
}

TEST_CASE("TCC: confirm and cancel are repeated until they succeed, business failures too") {
  Fixture f;
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 9, {}, f.now).has_value());
  f.take();
  f.sync();
  f.answer("debit", StepOp::confirm, OpOutcome::business_failure);
  CHECK(f.m->counters().op_failures == 1);
  CHECK(f.sink.find("op refused after the decision", LogLevel::error).size() == 1);
  CHECK(f.calls.empty());
  f.advance(f.opts.retry_min_ms - 1);
  CHECK(f.calls.empty());  // backoff
  f.advance(1);
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].attempt == 2);
  f.answer("debit", StepOp::confirm, OpOutcome::unknown);
  f.advance(2 * f.opts.retry_min_ms);
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].attempt == 3);
  // A stuck confirm is in doubt for the operator.
  auto doubt = f.m->in_doubt(f.now, 10);
  REQUIRE(doubt.size() == 1);
  CHECK(doubt[0].gid == gid);
  CHECK(f.branch(doubt[0], "debit").last_error == "failed");
  f.answer("debit", StepOp::confirm, OpOutcome::ok);
  CHECK(http_status_of(*f.reply_to(9)) == 200);
}

TEST_CASE("TCC: commit answers 202 committing past commit_wait_ms, then the confirms go on") {
  Fixture f;
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 9, {}, f.now).has_value());
  f.take();
  f.sync();
  f.advance(f.opts.commit_wait_ms);
  REQUIRE(f.reply_to(9) != nullptr);
  CHECK(http_status_of(*f.reply_to(9)) == 202);
  CHECK(f.reply_to(9)->view.state == TxnState::committing);
}

TEST_CASE("TCC: an active transaction is aborted at its timeout") {
  Fixture f;
  std::string gid = f.begin_tcc(1'000);
  f.tried(gid, "debit", 1);
  f.advance(1'000);
  CHECK(f.view(gid).state == TxnState::aborting);
  CHECK(f.view(gid).reason == "timeout");
  CHECK(f.called(StepOp::cancel) == std::vector<std::string>{"debit"});
  f.answer("debit", StepOp::cancel, OpOutcome::ok);
  CHECK(f.m->lookup(gid).view.state == TxnState::aborted);
}

TEST_CASE("TCC: abort with no branch leaves no record; with branches, an ended one") {
  Fixture f;
  std::string empty = f.begin_tcc();
  auto r = f.m->abort(empty, 1, f.now);
  REQUIRE(r.has_value());
  CHECK(http_status_of(*r) == 200);
  f.take();
  CHECK(f.persisted.empty());
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 2);
  f.persisted.clear();
  REQUIRE_FALSE(f.m->abort(gid, 3, f.now).has_value());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].record.decision == wal::Decision::aborted);
  f.answer("debit", StepOp::cancel, OpOutcome::ok);
  CHECK(http_status_of(*f.reply_to(3)) == 200);
  CHECK(f.persisted.back().record.ended);
}

TEST_CASE("TCC: refused tries change nothing") {
  MachineOptions o;
  o.branches_per_txn_max = 1;
  Fixture f(o);
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  f.persisted.clear();
  f.clear();
  // The same branch again: the answer it had.
  auto again = f.m->try_branch(gid, tcc_branch("debit"), 2, f.now);
  REQUIRE(again.has_value());
  CHECK(http_status_of(*again) == 200);
  // The same name with other ops, a bad name, missing ops, too many branches.
  OpBranch other = tcc_branch("debit");
  other.ops[0].json = R"({"url":"http://elsewhere:1/try"})";
  CHECK(http_status_of(*f.m->try_branch(gid, other, 3, f.now)) == 409);
  CHECK(http_status_of(*f.m->try_branch(gid, tcc_branch("bad name"), 3, f.now)) == 400);
  OpBranch no_cancel = tcc_branch("x");
  no_cancel.ops.pop_back();
  CHECK(http_status_of(*f.m->try_branch(gid, no_cancel, 3, f.now)) == 400);
  CHECK(http_status_of(*f.m->try_branch(gid, tcc_branch("credit"), 3, f.now)) == 413);
  // Not a TCC transaction; unknown gid; enlist into a TCC transaction.
  auto xa = f.m->begin(Protocol::two_phase, std::nullopt, f.now);
  CHECK(http_status_of(*f.m->try_branch(xa->gid, tcc_branch("a"), 4, f.now)) == 409);
  CHECK(http_status_of(*f.m->try_branch("c9-1-1", tcc_branch("a"), 4, f.now)) == 404);
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:1", f.now)) == 409);
  f.take();
  CHECK(f.persisted.empty());
  CHECK(f.calls.empty());
  CHECK(f.view(gid).branches.size() == 1);
  // After the abort, a try is refused with the outcome.
  REQUIRE_FALSE(f.m->abort(gid, 5, f.now).has_value());
  auto late = f.m->try_branch(gid, tcc_branch("credit"), 6, f.now);
  REQUIRE(late.has_value());
  CHECK(http_status_of(*late) == 409);
}

TEST_CASE("TCC: recovery aborts a registered transaction and finishes a decided one") {
  Fixture f;
  std::string registered = f.begin_tcc();
  f.tried(registered, "debit", 1);
  std::string decided = f.begin_tcc();
  f.tried(decided, "debit", 2);
  f.tried(decided, "credit", 3);
  REQUIRE_FALSE(f.m->commit(decided, 4, {}, f.now).has_value());
  f.take();
  f.sync();
  f.answer("debit", StepOp::confirm, OpOutcome::ok);
  f.persisted.clear();
  f.history.clear();
  f.clear();
  std::vector<wal::TxnRecord> unfinished;
  for (auto& [gid, rec] : f.log_records)
    if (!rec.ended) unfinished.push_back(rec);
  REQUIRE(unfinished.size() == 2);
  f.restart(2, unfinished);
  CHECK(f.view(registered).state == TxnState::aborting);
  CHECK(f.view(registered).reason == "recovered");
  CHECK(f.view(decided).state == TxnState::committing);
  std::vector<std::string> cancels = f.called(StepOp::cancel), confirms = f.called(StepOp::confirm);
  CHECK(cancels == std::vector<std::string>{"debit"});
  CHECK(confirms == std::vector<std::string>{"credit"});  // debit's confirm was recorded done
  for (auto& c : std::vector<OpCall>(f.calls)) f.answer(c, OpOutcome::ok);
  CHECK(f.m->lookup(registered).view.state == TxnState::aborted);
  CHECK(f.m->lookup(decided).view.state == TxnState::committed);
}

TEST_CASE("TCC: resolve aborts an undecided transaction and never changes a decision") {
  Fixture f;
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  CHECK(http_status_of(f.m->resolve(gid, true, f.now)) == 409);
  auto r = f.m->resolve(gid, false, f.now);
  f.take();
  CHECK(r.view.state == TxnState::aborting);
  CHECK(http_status_of(f.m->resolve(gid, true, f.now)) == 409);
  // The stuck cancel is declared done by the operator: recorded as forced.
  auto done = f.m->resolve(gid, false, f.now);
  f.take();
  CHECK(done.view.state == TxnState::aborted);
  CHECK(done.view.branches[0].forced);
  CHECK(f.persisted.back().record.branches[0].outcome == wal::BranchOutcome::forced);
}

// --- saga ----------------------------------------------------------------------------------

TEST_CASE("saga: durable before the first action, steps in order, committed once synced") {
  Fixture f;
  std::string gid = f.run({step("a"), step("b"), step("c")}, {}, 7);
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.decision == wal::Decision::running);
  CHECK(f.persisted[0].record.branches.size() == 3);
  CHECK(f.calls.empty());
  f.sync();
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].branch == "a");
  CHECK(f.view(gid).state == TxnState::running);
  f.answer("a", StepOp::action, OpOutcome::ok, R"({"balance":1})");
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].branch == "b");
  f.answer("b", StepOp::action, OpOutcome::ok);
  f.answer("c", StepOp::action, OpOutcome::ok);
  CHECK(f.replies.empty());  // the end record is not durable yet
  REQUIRE_FALSE(f.persisted.empty());
  CHECK(f.persisted.back().sync);
  CHECK(f.persisted.back().record.ended);
  CHECK(f.persisted.back().record.decision == wal::Decision::commit);
  f.sync();
  const ClientReply* r = f.reply_to(7);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 200);
  CHECK(r->view.state == TxnState::committed);
  CHECK(f.branch(r->view, "a").result == R"({"balance":1})");
  CHECK(f.called(StepOp::compensate).empty());
  CHECK(f.m->counters().committed[protocol_index(Protocol::saga)] == 1);
}

TEST_CASE("saga: a failing third step compensates the steps that ran, last first") {
  Fixture f;
  std::string gid = f.run({step("a"), step("b"), step("c"), step("d")}, {}, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  f.answer("b", StepOp::action, OpOutcome::ok);
  f.answer("c", StepOp::action, OpOutcome::business_failure);
  CHECK(f.view(gid).state == TxnState::compensating);
  CHECK(f.persisted.back().sync);
  CHECK(f.persisted.back().record.decision == wal::Decision::aborted);
  CHECK(f.calls.empty());  // the compensation decision first
  f.sync();
  // c is compensated too (its participant finds nothing to undo: an empty compensation), one
  // at a time, in reverse order; d never ran.
  for (std::string s : {"c", "b", "a"}) {
    REQUIRE(f.calls.size() == 1);
    CHECK(f.calls[0].branch == s);
    f.answer(s, StepOp::compensate, OpOutcome::ok);
  }
  CHECK(f.called(StepOp::compensate) == std::vector<std::string>{"c", "b", "a"});
  CHECK(f.called(StepOp::action) == std::vector<std::string>{"a", "b", "c"});
  const ClientReply* r = f.reply_to(7);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 409);
  CHECK(r->view.state == TxnState::aborted);
  CHECK(r->view.reason == "step_failed");
  CHECK(r->view.reason_branch == "c");
  CHECK(f.branch(r->view, "d").state == BranchState::pending);
}

TEST_CASE("saga: an action unknown past max_attempts starts backward recovery") {
  Fixture f;
  SagaOptions o;
  o.attempts_max = 2;
  o.retry_min_ms = 10;
  o.retry_max_ms = 10;
  std::string gid = f.run({step("a"), step("b")}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  f.answer("b", StepOp::action, OpOutcome::unknown);
  f.advance(10);
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].attempt == 2);
  f.answer("b", StepOp::action, OpOutcome::unknown);
  CHECK(f.view(gid).state == TxnState::compensating);
  f.sync();
  f.answer("b", StepOp::compensate, OpOutcome::unknown);  // compensations never give up
  f.advance(10);
  f.answer("b", StepOp::compensate, OpOutcome::business_failure);
  f.advance(20);
  f.answer("b", StepOp::compensate, OpOutcome::ok);
  f.answer("a", StepOp::compensate, OpOutcome::ok);
  CHECK(f.m->lookup(gid).view.state == TxnState::aborted);
  CHECK(f.m->counters().op_failures == 1);
}

TEST_CASE("saga: forward recovery retries until the action succeeds, never compensates") {
  Fixture f;
  SagaOptions o;
  o.forward = true;
  o.attempts_max = 0;
  std::string gid = f.run({step("a", false), step("b", false)}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  for (int k = 0; k < 12; ++k) {
    f.answer("b", StepOp::action, k % 2 ? OpOutcome::unknown : OpOutcome::business_failure);
    f.advance(f.opts.retry_max_ms);
  }
  // The request got 202 running once commit_wait_ms had passed.
  REQUIRE(f.reply_to(7) != nullptr);
  CHECK(http_status_of(*f.reply_to(7)) == 202);
  CHECK(f.reply_to(7)->view.state == TxnState::running);
  f.answer("b", StepOp::action, OpOutcome::ok);
  f.sync();
  CHECK(f.m->lookup(gid).view.state == TxnState::committed);
  CHECK(f.called(StepOp::compensate).empty());
  CHECK(f.m->lookup(gid).view.branches[1].attempts == 13);
}

TEST_CASE("saga: forward past max_attempts fails, is in doubt, and resolve commit goes on") {
  Fixture f;
  SagaOptions o;
  o.forward = true;
  o.attempts_max = 2;
  std::string gid = f.run({step("a", false), step("b", false), step("c", false)}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  f.answer("b", StepOp::action, OpOutcome::business_failure);
  f.advance(f.opts.retry_max_ms);
  f.answer("b", StepOp::action, OpOutcome::business_failure);
  CHECK(f.view(gid).state == TxnState::failed);
  CHECK(http_status_of(*f.reply_to(7)) == 409);
  CHECK(f.m->counters().saga_failed == 1);
  auto doubt = f.m->in_doubt(f.now, 10);
  REQUIRE(doubt.size() == 1);
  CHECK(doubt[0].state == TxnState::failed);
  CHECK(http_status_of(f.m->resolve(gid, false, f.now)) == 409);  // forward never compensates
  f.advance(60'000);
  CHECK(f.calls.empty());  // a failed saga waits for its operator
  auto r = f.m->resolve(gid, true, f.now);
  f.take();
  CHECK(r.view.state == TxnState::running);
  CHECK(f.branch(r.view, "b").forced);
  f.answer("c", StepOp::action, OpOutcome::ok);
  f.sync();
  CHECK(f.m->lookup(gid).view.state == TxnState::committed);
}

TEST_CASE("saga: parallel steps run at once; compensation waits for actions still out") {
  Fixture f;
  SagaOptions o;
  o.parallel = true;
  std::string gid = f.run({step("a"), step("b"), step("c")}, o, 7);
  f.sync();
  CHECK(f.calls.size() == 3);
  f.answer("a", StepOp::action, OpOutcome::ok);
  f.answer("b", StepOp::action, OpOutcome::business_failure);
  f.sync();
  CHECK(f.calls.size() == 1);  // c's action is still out: nothing compensated yet
  f.answer("c", StepOp::action, OpOutcome::ok);
  std::vector<std::string> comp;
  for (auto& c : f.calls) comp.push_back(c.branch);
  std::sort(comp.begin(), comp.end());
  CHECK(comp == std::vector<std::string>{"a", "b", "c"});  // all at once
  for (auto& c : std::vector<OpCall>(f.calls)) f.answer(c, OpOutcome::ok);
  CHECK(f.m->lookup(gid).view.state == TxnState::aborted);
}

TEST_CASE("saga: wait accepted answers 202 once the saga is durable") {
  Fixture f;
  SagaOptions o;
  o.wait_accepted = true;
  std::string gid = f.run({step("a")}, o, 7);
  CHECK(f.replies.empty());
  f.sync();
  REQUIRE(f.reply_to(7) != nullptr);
  CHECK(http_status_of(*f.reply_to(7)) == 202);
  CHECK(f.reply_to(7)->view.state == TxnState::running);
}

TEST_CASE("saga: a step without compensation only in forward sagas or last of sequential ones") {
  Fixture f;
  auto bad = f.m->run_saga({step("a", false), step("b")}, {}, 1, f.now);
  CHECK(bad.status().code() == Code::invalid_argument);
  SagaOptions par;
  par.parallel = true;
  CHECK(f.m->run_saga({step("a"), step("b", false)}, par, 1, f.now).status().code() ==
        Code::invalid_argument);
  CHECK(f.m->run_saga({step("a"), step("a")}, {}, 1, f.now).status().code() ==
        Code::invalid_argument);
  CHECK(f.m->run_saga({}, {}, 1, f.now).status().code() == Code::invalid_argument);
  CHECK(f.m->run_saga({OpBranch{"x", {op_text(StepOp::compensate, "c")}}}, {}, 1, f.now)
            .status()
            .code() == Code::invalid_argument);
  f.take();
  CHECK(f.persisted.empty());
  CHECK(f.m->run_saga({step("a"), step("b", false)}, {}, 1, f.now).ok());
  SagaOptions fwd;
  fwd.forward = true;
  CHECK(f.m->run_saga({step("a", false), step("b", false)}, fwd, 2, f.now).ok());
  CHECK(f.m->begin(Protocol::saga, std::nullopt, f.now).status().code() == Code::invalid_argument);
}

TEST_CASE("saga: the last step without compensation is retried until it answers") {
  Fixture f;
  SagaOptions o;
  o.attempts_max = 1;
  o.timeout_ms = 5'000;
  std::string gid = f.run({step("a"), step("pay", false)}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  // The pivot is marked running, synced, before its action goes.
  CHECK(f.calls.empty());
  REQUIRE(f.persisted.back().sync);
  CHECK(f.persisted.back().record.branches[1].state == static_cast<uint8_t>(BranchState::running));
  f.sync();
  f.answer("pay", StepOp::action, OpOutcome::unknown);
  f.advance(5'000);  // past the timeout too: it may have run, so the saga only goes forward
  CHECK(f.view(gid).state == TxnState::running);
  for (auto& c : std::vector<OpCall>(f.calls)) f.answer(c, OpOutcome::ok);
  f.sync();
  CHECK(f.m->lookup(gid).view.state == TxnState::committed);
}

TEST_CASE(
    "saga: the timeout compensates a backward saga; resolve abort skips a stuck compensation") {
  Fixture f;
  SagaOptions o;
  o.timeout_ms = 1'000;
  std::string gid = f.run({step("a"), step("b")}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  f.advance(1'000);  // b's action is out
  CHECK(f.view(gid).state == TxnState::compensating);
  CHECK(f.view(gid).reason == "timeout");
  f.sync();
  CHECK(f.called(StepOp::compensate).empty());  // b's action has not answered
  f.answer("b", StepOp::action, OpOutcome::unknown);
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].branch == "b");
  CHECK(f.calls[0].op == StepOp::compensate);
  f.answer("b", StepOp::compensate, OpOutcome::ok);
  f.answer("a", StepOp::compensate, OpOutcome::business_failure);
  CHECK(http_status_of(f.m->resolve(gid, true, f.now)) == 409);
  auto r = f.m->resolve(gid, false, f.now);
  f.take();
  CHECK(r.view.state == TxnState::aborted);
  CHECK(f.branch(r.view, "a").forced);
  CHECK(f.persisted.back().record.branches[0].outcome == wal::BranchOutcome::forced);
}

TEST_CASE("saga: recovery goes on from the step it had reached") {
  Fixture f;
  std::string gid = f.run({step("a"), step("b"), step("c")}, {}, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok, R"({"n":1})");
  REQUIRE(f.calls.size() == 1);  // b's action is out as the coordinator dies
  wal::TxnRecord rec = f.persisted.back().record;
  f.persisted.clear();
  f.history.clear();
  f.clear();
  f.restart(2, {rec});
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].branch == "b");  // sent again: the op is idempotent by its key
  CHECK(f.view(gid).state == TxnState::running);
  CHECK(f.branch(f.view(gid), "a").result == R"({"n":1})");
  f.answer("b", StepOp::action, OpOutcome::business_failure);
  f.sync();
  // c is logged pending but step progress is not synced: it may have run, so it is
  // compensated too (an empty compensation if it never ran), last first.
  f.answer("c", StepOp::compensate, OpOutcome::ok);
  f.answer("b", StepOp::compensate, OpOutcome::ok);
  // The compensating record is what the next restart reads.
  wal::TxnRecord comp = f.persisted.back().record;
  CHECK(comp.decision == wal::Decision::aborted);
  f.persisted.clear();
  f.clear();
  f.history.clear();
  f.restart(3, {comp});
  CHECK(f.view(gid).state == TxnState::compensating);
  CHECK(f.called(StepOp::compensate) == std::vector<std::string>{"a"});
  f.answer("a", StepOp::compensate, OpOutcome::ok);
  CHECK(f.m->lookup(gid).view.state == TxnState::aborted);
  CHECK(f.called(StepOp::action).empty());
}

TEST_CASE("saga: a step sent after the last record may have run: a restart compensates it") {
  Fixture f;
  std::string gid = f.run({step("a"), step("b")}, {}, 7);
  f.sync();
  wal::TxnRecord lagging = f.persisted.empty() ? f.log_records[gid] : f.persisted.back().record;
  f.answer("a", StepOp::action, OpOutcome::ok);  // a done, b sent: neither record synced
  REQUIRE(f.calls.size() == 1);
  f.persisted.clear();
  f.history.clear();
  f.clear();
  f.restart(2, {lagging});  // the durable record still shows both steps pending
  f.answer("a", StepOp::action, OpOutcome::business_failure);  // a changed its mind
  f.sync();
  CHECK(f.view(gid).state == TxnState::compensating);
  // b's action went out before the crash: it is compensated (last first), then a.
  f.answer("b", StepOp::compensate, OpOutcome::ok);
  f.answer("a", StepOp::compensate, OpOutcome::ok);
  CHECK(f.called(StepOp::compensate) == std::vector<std::string>{"b", "a"});
  CHECK(f.m->lookup(gid).view.state == TxnState::aborted);
}

TEST_CASE("saga: a pivot whose running mark is durable keeps a restarted saga going forward") {
  Fixture f;
  SagaOptions o;
  o.timeout_ms = 1'000;
  std::string gid = f.run({step("a"), step("pay", false)}, o, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::ok);
  REQUIRE(!f.persisted.empty());
  wal::TxnRecord marked = f.persisted.back().record;  // pay marked running, synced
  f.sync();
  REQUIRE(f.calls.size() == 1);  // pay's action is out as the coordinator dies
  f.persisted.clear();
  f.history.clear();
  f.clear();
  f.restart(2, {marked});
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].branch == "pay");
  f.advance(1'000);  // past the timeout: pay may have run, so no compensation
  CHECK(f.view(gid).state == TxnState::running);
  CHECK(f.called(StepOp::compensate).empty());
  for (auto& c : std::vector<OpCall>(f.calls)) f.answer(c, OpOutcome::ok);
  f.sync();
  CHECK(f.m->lookup(gid).view.state == TxnState::committed);
}

TEST_CASE("saga: a retry waits at least as long as Retry-After asks, capped") {
  Fixture f;
  std::string gid = f.run({step("a")}, {}, 7);
  f.sync();
  OpCall c = f.calls[0];
  f.clear();
  f.answer(c, OpOutcome::unknown, "", 3'000);
  f.advance(2'999);
  CHECK(f.calls.empty());
  f.advance(1);
  CHECK(f.calls.size() == 1);
  (void)gid;
}

TEST_CASE("answers from the log: TCC and saga records give their views") {
  Fixture f;
  std::string gid = f.run({step("a"), step("b")}, {}, 7);
  f.sync();
  f.answer("a", StepOp::action, OpOutcome::business_failure);
  f.sync();
  f.answer("a", StepOp::compensate, OpOutcome::ok);
  wal::TxnRecord rec = f.persisted.back().record;
  CHECK(rec.ended);
  auto round = wal::decode_record(wal::encode_record(rec));
  REQUIRE(round.ok());
  TxnView v = CoordinatorMachine::view_from_record(*round);
  CHECK(v.state == TxnState::aborted);
  CHECK(v.reason == "step_failed");
  CHECK(v.reason_branch == "a");
  CHECK(v.branches[0].state == BranchState::compensated);
  CHECK(v.branches[1].state == BranchState::pending);
  ClientReply r = CoordinatorMachine::reply_from_record(*round, RequestKind::get);
  CHECK(http_status_of(r) == 200);
}

// --- transactional messages (docs/DESIGN.md §10.1) ------------------------------------------

namespace {

MsgRequest half_message(size_t destinations, std::optional<int64_t> timeout_ms = std::nullopt) {
  MsgRequest req;
  req.producer.push_back(op_text(StepOp::check, "producer/check"));
  for (size_t i = 0; i < destinations; ++i)
    req.destinations.push_back(op_text(StepOp::deliver, "dest" + std::to_string(i)));
  req.timeout_ms = timeout_ms;
  return req;
}

MsgRequest message_with_local() {
  MsgRequest req = half_message(2);
  req.producer.clear();
  req.producer.push_back(
      {StepOp::local, R"({"participant":"a1","statements":[{"sql":"UPDATE t SET v = 1"}]})"});
  req.producer.push_back({StepOp::check, R"({"participant":"a1"})"});
  return req;
}

// A half message begun and durable: the 201 taken.
std::string prepared_msg(Fixture& f, MsgRequest req, uint64_t waiter = 1) {
  auto gid = f.m->begin_msg(std::move(req), waiter, f.now);
  REQUIRE(gid.ok());
  f.take();
  f.sync();
  f.clear();
  return *gid;
}

TxnState state_of(Fixture& f, const std::string& gid) {
  auto l = f.m->lookup(gid);
  REQUIRE(l.kind == LookupKind::live);  // live, or finished and still in memory
  return l.view.state;
}

}  // namespace

TEST_CASE("msg: the half message is synced before the 201, and nothing is delivered yet") {
  Fixture f;
  auto gid = f.m->begin_msg(half_message(2), 7, f.now);
  REQUIRE(gid.ok());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.protocol == Protocol::msg);
  CHECK(f.persisted[0].record.decision == wal::Decision::half);
  CHECK(f.persisted[0].record.branches.size() == 3);  // local, d1, d2
  CHECK(f.replies.empty());                           // not before it is durable
  f.sync();
  const ClientReply* r = f.reply_to(7);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 201);
  CHECK(r->view.state == TxnState::prepared);
  CHECK(f.calls.empty());
  Json j = encode_view(r->view);
  CHECK(j["state"] == "prepared");
  CHECK(j["destinations"].size() == 2);
  CHECK(j["destinations"][0]["name"] == "d1");
  CHECK(j["local"]["state"] == "pending");
}

TEST_CASE("msg: commit delivers to every destination once the decision is durable") {
  Fixture f;
  std::string gid = prepared_msg(f, half_message(2));
  REQUIRE_FALSE(f.m->commit(gid, 9, {}, f.now).has_value());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.decision == wal::Decision::commit);
  CHECK(f.calls.empty());
  CHECK(f.replies.empty());
  f.sync();
  CHECK(f.called(StepOp::deliver) == std::vector<std::string>{"d1", "d2"});
  const ClientReply* r = f.reply_to(9);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 200);
  CHECK(r->view.state == TxnState::committing);
  // A destination that fails is called again until it acknowledges, a business failure too.
  f.answer("d1", StepOp::deliver, OpOutcome::ok);
  f.answer("d2", StepOp::deliver, OpOutcome::business_failure);
  CHECK(f.view(gid).state == TxnState::committing);
  f.advance(10'000);
  f.answer("d2", StepOp::deliver, OpOutcome::unknown);
  f.advance(10'000);
  f.answer("d2", StepOp::deliver, OpOutcome::ok);
  CHECK(state_of(f, gid) == TxnState::committed);
  CHECK(f.log_records[gid].ended);
  CHECK(f.called(StepOp::deliver) == std::vector<std::string>{"d1", "d2", "d2", "d2"});
  // A repeated commit answers committed; an abort is refused.
  auto again = f.m->commit(gid, 10, {}, f.now);
  REQUIRE(again.has_value());
  CHECK(http_status_of(*again) == 200);
  auto late = f.m->abort(gid, 11, f.now);
  REQUIRE(late.has_value());
  CHECK(http_status_of(*late) == 409);
}

TEST_CASE("msg: abort ends it at once and nothing is ever delivered") {
  Fixture f;
  std::string gid = prepared_msg(f, half_message(1));
  auto r = f.m->abort(gid, 3, f.now);
  f.take();
  REQUIRE(r.has_value());
  CHECK(http_status_of(*r) == 200);
  CHECK(r->view.state == TxnState::aborted);
  CHECK(f.log_records[gid].decision == wal::Decision::aborted);
  CHECK(f.log_records[gid].ended);
  f.advance(60'000);  // no check-back either
  CHECK(f.history.empty());
  auto late = f.m->commit(gid, 4, {}, f.now);
  REQUIRE(late.has_value());
  CHECK(http_status_of(*late) == 409);
}

TEST_CASE("msg: check-back at the timeout: 2xx commits, a business failure aborts") {
  for (OpOutcome answer : {OpOutcome::ok, OpOutcome::business_failure}) {
    CAPTURE(op_outcome_name(answer));
    Fixture f;
    std::string gid = prepared_msg(f, half_message(1, 2'000));
    f.advance(1'999);
    CHECK(f.calls.empty());
    f.advance(1);
    REQUIRE(f.calls.size() == 1);
    CHECK(f.calls[0].op == StepOp::check);
    CHECK(f.calls[0].branch == "local");
    // Listed as in doubt while its producer is silent.
    CHECK(f.m->in_doubt(f.now, 10).size() == 1);
    // Unknown answers ask again, with backoff.
    f.answer("local", StepOp::check, OpOutcome::unknown);
    CHECK(f.calls.empty());
    f.advance(f.opts.retry_min_ms);
    f.answer("local", StepOp::check, answer);
    if (answer == OpOutcome::ok) {
      CHECK(f.view(gid).state == TxnState::committing);
      f.sync();
      f.answer("d1", StepOp::deliver, OpOutcome::ok);
      CHECK(state_of(f, gid) == TxnState::committed);
      CHECK(f.log_records[gid].decision == wal::Decision::commit);
    } else {
      CHECK(state_of(f, gid) == TxnState::aborted);
      CHECK(f.log_records[gid].decision == wal::Decision::aborted);
      CHECK(f.log_records[gid].options.find("not_committed") != std::string::npos);
      CHECK(f.called(StepOp::deliver).empty());
    }
  }
}

TEST_CASE("msg: the producer's commit while a check is out wins, and the check's answer is late") {
  Fixture f;
  std::string gid = prepared_msg(f, half_message(1, 1'000));
  f.advance(1'000);
  REQUIRE(f.calls.size() == 1);
  OpCall check = f.calls[0];
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 5, {}, f.now).has_value());
  f.take();
  f.sync();
  f.answer(check, OpOutcome::business_failure);  // ignored: decided
  CHECK(f.view(gid).state == TxnState::committing);
  CHECK(f.called(StepOp::deliver) == std::vector<std::string>{"d1"});
}

TEST_CASE("msg: one request: the local op after the half message, its answer decides") {
  SUBCASE("committed") {
    Fixture f;
    auto gid = f.m->begin_msg(message_with_local(), 4, f.now);
    REQUIRE(gid.ok());
    f.take();
    CHECK(f.calls.empty());  // not before the half message is durable
    f.sync();
    REQUIRE(f.calls.size() == 1);
    CHECK(f.calls[0].op == StepOp::local);
    CHECK(f.replies.empty());
    f.answer("local", StepOp::local, OpOutcome::ok, R"({"barrier":"applied","results":[]})");
    CHECK(f.replies.empty());  // not before the commit is durable
    f.sync();
    const ClientReply* r = f.reply_to(4);
    REQUIRE(r != nullptr);
    CHECK(http_status_of(*r) == 200);
    CHECK(f.called(StepOp::deliver).size() == 2);
    // Commit and abort belong to the local op's answer.
    auto c = f.m->abort(*gid, 5, f.now);
    REQUIRE(c.has_value());
    CHECK(http_status_of(*c) == 409);
  }
  SUBCASE("failed") {
    Fixture f;
    auto gid = f.m->begin_msg(message_with_local(), 4, f.now);
    f.take();
    f.sync();
    f.answer("local", StepOp::local, OpOutcome::business_failure);
    const ClientReply* r = f.reply_to(4);
    REQUIRE(r != nullptr);
    CHECK(http_status_of(*r) == 409);
    CHECK(r->view.state == TxnState::aborted);
    CHECK(r->view.reason == "local_failed");
  }
  SUBCASE("unknown: resent, then settled by a check") {
    Fixture f;
    auto gid = f.m->begin_msg(message_with_local(), 4, f.now);
    f.take();
    f.sync();
    for (uint32_t i = 1; i < kLocalAttemptsMax; ++i) {
      f.answer("local", StepOp::local, OpOutcome::unknown);
      f.advance(1'000);
    }
    CHECK(f.called(StepOp::local).size() == kLocalAttemptsMax);
    f.answer("local", StepOp::local, OpOutcome::unknown);
    REQUIRE(f.calls.size() == 1);
    CHECK(f.calls[0].op == StepOp::check);
    CHECK(f.calls[0].spec == R"({"participant":"a1"})");
    f.answer("local", StepOp::check, OpOutcome::business_failure);  // fenced
    const ClientReply* r = f.reply_to(4);
    REQUIRE(r != nullptr);
    CHECK(http_status_of(*r) == 409);
    CHECK(r->view.reason == "not_committed");
  }
}

TEST_CASE("msg: recovery leaves a half message to check-back and goes on delivering a commit") {
  Fixture f;
  std::string half = prepared_msg(f, half_message(1, 5'000));
  std::string decided = prepared_msg(f, half_message(2), 2);
  REQUIRE_FALSE(f.m->commit(decided, 3, {}, f.now).has_value());
  f.take();
  f.sync();
  f.answer("d1", StepOp::deliver, OpOutcome::ok);  // d1 acknowledged (logged unsynced)
  std::vector<wal::TxnRecord> unfinished{f.log_records[half], f.log_records[decided]};
  f.history.clear();
  f.clear();
  f.restart(2, unfinished);
  CHECK(f.view(half).state == TxnState::prepared);
  CHECK(f.called(StepOp::deliver) == std::vector<std::string>{"d2"});
  CHECK(f.called(StepOp::check).empty());
  f.advance(5'000);
  CHECK(f.called(StepOp::check) == std::vector<std::string>{"local"});
  f.answer("local", StepOp::check, OpOutcome::business_failure);
  CHECK(state_of(f, half) == TxnState::aborted);
  f.answer("d2", StepOp::deliver, OpOutcome::ok);
  CHECK(state_of(f, decided) == TxnState::committed);
  CHECK(f.m->open_txns() == 0);
}

TEST_CASE("msg: an operator decides a half message, or skips a stuck delivery (forced)") {
  Fixture f;
  std::string a = prepared_msg(f, half_message(1));
  ClientReply r = f.m->resolve(a, false, f.now);
  f.take();
  CHECK(r.view.state == TxnState::aborted);
  CHECK(r.view.reason == "operator");
  std::string b = prepared_msg(f, half_message(1), 2);
  f.m->resolve(b, true, f.now);
  f.take();
  f.sync();
  CHECK(f.called(StepOp::deliver) == std::vector<std::string>{"d1"});
  ClientReply no = f.m->resolve(b, false, f.now);
  CHECK(http_status_of(no) == 409);
  ClientReply yes = f.m->resolve(b, true, f.now);
  f.take();
  CHECK(yes.view.state == TxnState::committed);
  CHECK(f.branch(yes.view, "d1").forced);
}

// --- notifications (docs/DESIGN.md §10.3) --------------------------------------------------

namespace {

wal::OpText notify_op() {
  return {StepOp::notify, R"({"url":"http://127.0.0.1:9/hook","body":{"order":7}})"};
}

}  // namespace

TEST_CASE("notification: logged (synced) before its 201, then POSTed until 2xx") {
  Fixture f;
  auto id = f.m->begin_notification(notify_op(), 3, 5, f.now);
  REQUIRE(id.ok());
  f.take();
  REQUIRE(f.persisted.size() == 1);
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.protocol == Protocol::notify);
  CHECK(f.calls.empty());
  CHECK(f.replies.empty());
  f.sync();
  const ClientReply* r = f.reply_to(5);
  REQUIRE(r != nullptr);
  CHECK(http_status_of(*r) == 201);
  Json j = encode_view(r->view);
  CHECK(j["id"] == *id);
  CHECK(j["state"] == "pending");
  CHECK(j["body"] == Json{{"order", 7}});
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].op == StepOp::notify);
  f.answer("notify", StepOp::notify, OpOutcome::unknown);
  f.advance(f.opts.retry_min_ms);
  f.answer("notify", StepOp::notify, OpOutcome::ok);
  auto l = f.m->lookup(*id);
  REQUIRE(l.kind == LookupKind::live);
  Json done = encode_view(l.view);
  CHECK(done["state"] == "delivered");
  CHECK(done["attempts"] == 2);
  CHECK(f.log_records[*id].ended);
  CHECK(f.m->open_txns() == 0);
  // Neither listed with the transactions nor in doubt; listed with the notifications.
  CHECK(f.m->list(std::nullopt, 10).empty());
  CHECK(f.m->list(std::nullopt, 10, Protocol::notify).size() == 1);
  CHECK(f.m->list(std::nullopt, 10, Protocol::msg).empty());
  CHECK(f.m->in_doubt(f.now, 10).empty());
  // Not a transaction: commit, abort and resolve are refused.
  auto c = f.m->commit(*id, 9, {}, f.now);
  REQUIRE(c.has_value());
  CHECK(http_status_of(*c) == 409);
}

TEST_CASE("notification: given up after its attempts, or at once on a business failure") {
  Fixture f;
  std::string id = *f.m->begin_notification(notify_op(), 3, 1, f.now);
  f.take();
  f.sync();
  for (int i = 0; i < 3; ++i) {
    f.answer("notify", StepOp::notify, OpOutcome::unknown);
    f.advance(f.opts.retry_max_ms);
  }
  CHECK(f.called(StepOp::notify).size() == 3);
  Json j = encode_view(f.m->lookup(id).view);
  CHECK(j["state"] == "given_up");
  CHECK(j["reason"] == "attempts");
  CHECK(j["attempts"] == 3);
  CHECK(j["last_error"] == "failed");
  CHECK(f.log_records[id].decision == wal::Decision::aborted);

  std::string refused = *f.m->begin_notification(notify_op(), 3, 2, f.now);
  f.take();
  f.sync();
  f.answer("notify", StepOp::notify, OpOutcome::business_failure);
  Json r = encode_view(f.m->lookup(refused).view);
  CHECK(r["state"] == "given_up");
  CHECK(r["reason"] == "refused");
  CHECK(r["attempts"] == 1);
}

TEST_CASE(
    "notification: a pending one is sent again after a restart; it never holds back "
    "finished_below") {
  Fixture f;
  std::string id = *f.m->begin_notification(notify_op(), 8, 1, f.now);
  f.take();
  f.sync();
  GidParts below = f.m->finished_below();
  CHECK(below.seq > parse_gid(id)->seq);  // not held back by the pending notification
  std::vector<wal::TxnRecord> unfinished{f.log_records[id]};
  f.history.clear();
  f.restart(2, unfinished);
  CHECK(f.called(StepOp::notify).size() == 1);
  f.answer("notify", StepOp::notify, OpOutcome::ok);
  CHECK(encode_view(f.m->lookup(id).view)["state"] == "delivered");
  CHECK(f.m->recovering() == 0);
}

TEST_CASE(
    "notify: a transaction's outcome is logged as a notification just before its end "
    "record, then sent") {
  Fixture f;
  auto v = f.m->begin(Protocol::tcc, std::nullopt, f.now, R"({"url":"http://127.0.0.1:9/done"})");
  REQUIRE(v.ok());
  std::string gid = v->gid;
  f.tried(gid, "debit", 1);
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 2, {}, f.now).has_value());
  f.take();
  CHECK(f.log_records[gid].options.find("\"notify\"") != std::string::npos);  // survives a crash
  f.sync();
  f.persisted.clear();
  f.answer("debit", StepOp::confirm, OpOutcome::ok);
  // The notification's record, then the transaction's end record, last.
  REQUIRE(f.persisted.size() >= 2);
  const Persist& note = f.persisted[f.persisted.size() - 2];
  CHECK(note.record.protocol == Protocol::notify);
  CHECK(note.sync);
  CHECK(f.persisted.back().record.gid == gid);
  CHECK(f.persisted.back().record.ended);
  std::string id = note.record.gid;
  CHECK(f.calls.empty());  // sent once its record is written
  f.sync();
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].op == StepOp::notify);
  CHECK(f.calls[0].gid == id);
  auto body = parse_object(f.calls[0].spec);
  REQUIRE(body.ok());
  CHECK((*body)["url"] == "http://127.0.0.1:9/done");
  CHECK((*body)["body"] == Json{{"gid", gid}, {"protocol", "tcc"}, {"state", "committed"}});
  f.answer("notify", StepOp::notify, OpOutcome::ok);
  CHECK(encode_view(f.m->lookup(id).view)["state"] == "delivered");
}

TEST_CASE("notify: a 2PC transaction's op is kept in its decision record") {
  Fixture f;
  auto v = f.m->begin(Protocol::two_phase, std::nullopt, f.now, R"({"url":"http://h:1/n"})");
  REQUIRE(v.ok());
  wal::TxnRecord rec;
  rec.gid = v->gid;
  rec.protocol = Protocol::two_phase;
  rec.decision = wal::Decision::commit;
  rec.branches.push_back({"a1", "http://127.0.0.1:1", wal::BranchOutcome::pending});
  rec.options = R"({"notify":{"url":"http://h:1/n"}})";
  auto decoded = wal::decode_record(wal::encode_record(rec));
  REQUIRE_MESSAGE(decoded.ok(), decoded.status().to_string());
  CHECK(*decoded == rec);
  // Recovered, committed, finished: its notification goes out.
  f.restart(2, {rec});
  f.m->on_reply(BranchReply{rec.gid, "a1", MsgKind::commit, ReplyKind::committed, ""}, f.now);
  f.take();
  REQUIRE_FALSE(f.persisted.empty());
  CHECK(f.persisted[0].record.protocol == Protocol::notify);
  f.sync();
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].spec.find(R"("state":"committed")") != std::string::npos);
}

TEST_CASE(
    "msg: a local op failing on a resend is settled by a check, which fences the first "
    "attempt that may still be waiting at the agent") {
  Fixture f;
  auto gid = f.m->begin_msg(message_with_local(), 4, f.now);
  REQUIRE(gid.ok());
  f.take();
  f.sync();
  f.answer("local", StepOp::local, OpOutcome::unknown);
  f.advance(1'000);
  f.answer("local", StepOp::local, OpOutcome::business_failure);
  REQUIRE(f.calls.size() == 1);
  CHECK(f.calls[0].op == StepOp::check);
  CHECK(f.view(*gid).state == TxnState::prepared);
  f.answer("local", StepOp::check, OpOutcome::ok);  // the first attempt had committed
  CHECK(f.view(*gid).state == TxnState::committing);
}

TEST_CASE("msg: an operator's abort is synced, and refused while the local op is out") {
  Fixture f;
  auto gid = f.m->begin_msg(message_with_local(), 4, f.now);
  REQUIRE(gid.ok());
  f.take();
  f.sync();
  REQUIRE(f.calls.size() == 1);  // the local op is out
  ClientReply no = f.m->resolve(*gid, false, f.now);
  CHECK(http_status_of(no) == 409);
  f.answer("local", StepOp::local, OpOutcome::unknown);
  f.persisted.clear();
  ClientReply yes = f.m->resolve(*gid, false, f.now);
  f.take();
  CHECK(yes.view.state == TxnState::aborted);
  REQUIRE_FALSE(f.persisted.empty());
  CHECK(f.persisted[0].sync);
  CHECK(f.persisted[0].record.decision == wal::Decision::aborted);
}

TEST_CASE("TCC: the last confirm's progress is logged with the end record alone") {
  Fixture f;
  std::string gid = f.begin_tcc();
  f.tried(gid, "debit", 1);
  f.tried(gid, "credit", 2);
  f.clear();
  REQUIRE_FALSE(f.m->commit(gid, 9, {}, f.now).has_value());
  f.take();
  f.sync();
  f.persisted.clear();
  f.answer("debit", StepOp::confirm, OpOutcome::ok);
  REQUIRE(f.persisted.size() == 1);  // progress: debit confirmed
  CHECK_FALSE(f.persisted[0].record.ended);
  f.persisted.clear();
  f.answer("credit", StepOp::confirm, OpOutcome::ok);
  REQUIRE(f.persisted.size() == 1);  // the end record, with both confirmed
  CHECK(f.persisted[0].record.ended);
  for (auto& b : f.persisted[0].record.branches) CHECK(b.outcome == wal::BranchOutcome::committed);
}
