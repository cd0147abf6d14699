// Unit tests of the coordinator's state machine: every transition of the 2PC, one-phase and
// 3PC paths, the refused ones, recovery, and the answers built from the log.
#include "coordinator/coordinator_machine.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <memory>

#include "coordinator/codec.h"

using namespace tpc;
using namespace tpc::coord;

namespace {

struct Fixture {
  MemorySink sink;
  Logger log{&sink, LogFormat::text, LogLevel::debug};
  MachineOptions opts;
  std::unique_ptr<CoordinatorMachine> m;
  int64_t now = 1'000'000;
  uint64_t next_waiter = 1;

  explicit Fixture(MachineOptions o = {}) : opts(std::move(o)) { restart(1); }

  void restart(uint64_t epoch, std::vector<wal::TxnRecord> unfinished = {},
               std::optional<GidParts> forgotten = std::nullopt) {
    m = std::make_unique<CoordinatorMachine>(opts, log);
    m->recover(epoch, forgotten, std::move(unfinished), now);
  }

  std::string begin(Protocol p = Protocol::two_phase) {
    auto v = m->begin(p, std::nullopt, now);
    REQUIRE(v.ok());
    return v->gid;
  }

  std::string begin_with(std::vector<std::string> branches, Protocol p = Protocol::two_phase) {
    std::string gid = begin(p);
    for (auto& b : branches) {
      auto r = m->enlist(gid, b, "http://127.0.0.1:1/" + b, now);
      REQUIRE(http_status_of(r) == 201);
    }
    return gid;
  }

  Ready ready() { return m->take_ready(); }

  static std::vector<Message> of_kind(const Ready& r, MsgKind k) {
    std::vector<Message> out;
    for (auto& msg : r.messages)
      if (msg.kind == k) out.push_back(msg);
    return out;
  }

  void reply(const std::string& gid, const std::string& b, MsgKind k, ReplyKind r,
             std::string reason = "") {
    m->on_reply(BranchReply{gid, b, k, r, std::move(reason)}, now);
  }

  TxnState state(const std::string& gid) {
    auto l = m->lookup(gid);
    REQUIRE(l.kind == LookupKind::live);
    return l.view.state;
  }

  // Commits gid and lets every branch vote yes; returns the Ready holding the decision.
  Ready commit_to_decision(const std::string& gid, std::vector<std::string> branches,
                           uint64_t waiter) {
    REQUIRE_FALSE(m->commit(gid, waiter, {}, now).has_value());
    Ready r = ready();
    CHECK(of_kind(r, MsgKind::prepare).size() == branches.size());
    for (auto& b : branches) reply(gid, b, MsgKind::prepare, ReplyKind::vote_yes);
    return ready();
  }
};

}  // namespace

TEST_CASE("gids carry the coordinator id and epoch and never repeat across restarts") {
  Fixture f;
  std::string a = f.begin(), b = f.begin();
  CHECK(a == "c1-1-1");
  CHECK(b == "c1-1-2");
  f.restart(2);
  CHECK(f.begin() == "c1-2-1");
}

TEST_CASE("begin is refused past open_txns_max and with a bad timeout") {
  MachineOptions o;
  o.open_txns_max = 2;
  Fixture f(o);
  f.begin();
  f.begin();
  auto r = f.m->begin(Protocol::two_phase, std::nullopt, f.now);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == Code::unavailable);
  Fixture g;
  CHECK(g.m->begin(Protocol::two_phase, 0, g.now).status().code() == Code::invalid_argument);
  CHECK(g.m->begin(Protocol::two_phase, g.opts.txn_timeout_max_ms + 1, g.now).status().code() ==
        Code::invalid_argument);
}

TEST_CASE("enlist: new, repeated, conflicting, too many, unknown and not active") {
  MachineOptions o;
  o.branches_per_txn_max = 2;
  Fixture f(o);
  std::string gid = f.begin();
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:1", f.now)) == 201);
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:1", f.now)) == 200);
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:2", f.now)) == 409);
  CHECK(http_status_of(f.m->enlist(gid, "a2", "http://h:2", f.now)) == 201);
  CHECK(http_status_of(f.m->enlist(gid, "a3", "http://h:3", f.now)) == 413);
  CHECK(http_status_of(f.m->enlist(gid, "bad name", "http://h:3", f.now)) == 400);
  CHECK(http_status_of(f.m->enlist("c9-1-1", "a1", "http://h:1", f.now)) == 404);
  CHECK(http_status_of(f.m->enlist("c1-1-99", "a1", "http://h:1", f.now)) == 404);  // never issued
  Fixture g;
  std::string other = g.begin_with({"a1", "a2"});
  REQUIRE_FALSE(g.m->commit(other, 1, {}, g.now).has_value());
  auto late = g.m->enlist(other, "a3", "http://h:3", g.now);
  CHECK(http_status_of(late) == 409);
  CHECK(late.error.message().find("preparing") != std::string::npos);
}

// An agent that restarted lost the open session of a branch it had enlisted; a later exec of
// the same gid opens a new session, and its enlist says another run of the agent. Letting it
// continue would commit the branch without its earlier statements. (Found by the simulator.)
TEST_CASE("an enlist from a restarted agent run is refused and the transaction can only abort") {
  Fixture f;
  std::string gid = f.begin();
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:1", f.now, "run-1")) == 201);
  CHECK(http_status_of(f.m->enlist(gid, "a1", "http://h:1", f.now, "run-1")) == 200);
  auto again = f.m->enlist(gid, "a1", "http://h:1", f.now, "run-2");
  CHECK(http_status_of(again) == 409);
  CHECK(again.error.message().find("restarted") != std::string::npos);
  auto r = f.m->commit(gid, 1, {}, f.now);
  f.ready();
  auto l = f.m->lookup(gid);
  CHECK((r.has_value() ? r->view.state : l.view.state) != TxnState::committed);
  CHECK((l.view.state == TxnState::aborting || l.view.state == TxnState::aborted));
}

TEST_CASE("a refused enlist makes the transaction rollback-only: its commit answers aborted") {
  for (int refusal = 0; refusal < 2; ++refusal) {
    CAPTURE(refusal);
    MachineOptions o;
    o.branches_per_txn_max = 2;
    Fixture f(o);
    std::string gid = f.begin_with({"a1", "a2"});
    if (refusal == 0) {
      CHECK(http_status_of(f.m->enlist(gid, "a1", "http://elsewhere:1", f.now)) == 409);
    } else {
      CHECK(http_status_of(f.m->enlist(gid, "a3", "http://h:3", f.now)) == 413);
    }
    CHECK(f.state(gid) == TxnState::active);  // the client may still abort it itself
    REQUIRE_FALSE(f.m->commit(gid, 7, {}, f.now).has_value());
    Ready r = f.ready();
    CHECK(Fixture::of_kind(r, MsgKind::prepare).empty());
    CHECK(Fixture::of_kind(r, MsgKind::abort).size() == 2);
    REQUIRE(r.replies.size() == 1);
    CHECK(r.replies[0].waiter == 7);
    CHECK(http_status_of(r.replies[0]) == 409);
    CHECK(r.replies[0].view.state != TxnState::committed);
    CHECK(r.replies[0].view.reason == "enlist_refused");
    CHECK(r.replies[0].view.reason_branch == (refusal == 0 ? "a1" : "a3"));
  }
}

TEST_CASE("an enlist refused while votes are out aborts the transaction at once") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  f.ready();
  CHECK(http_status_of(f.m->enlist(gid, "a3", "http://h:3", f.now)) == 409);
  Ready r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::abort).size() == 2);
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].view.reason == "enlist_refused");
  CHECK(r.replies[0].view.reason_branch == "a3");
  // Late yes votes change nothing: the decision is abort.
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::vote_yes);
  f.reply(gid, "a2", MsgKind::prepare, ReplyKind::vote_yes);
  CHECK(Fixture::of_kind(f.ready(), MsgKind::commit).empty());
}

TEST_CASE("an enlist refused after the commit decision leaves the decision alone") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  Ready d = f.commit_to_decision(gid, {"a1", "a2"}, 1);
  REQUIRE(d.persist.size() == 1);
  CHECK(http_status_of(f.m->enlist(gid, "a3", "http://h:3", f.now)) == 409);
  f.m->on_persisted(gid, f.now);
  CHECK(Fixture::of_kind(f.ready(), MsgKind::commit).size() == 2);
}

TEST_CASE("2PC: the commit decision is durable before any commit is sent") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  Ready r = f.commit_to_decision(gid, {"a1", "a2"}, 7);
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);
  CHECK(r.persist[0].notify);
  CHECK(r.persist[0].record.decision == wal::Decision::commit);
  CHECK(r.persist[0].record.branches.size() == 2);
  CHECK_FALSE(r.persist[0].record.ended);
  CHECK(Fixture::of_kind(r, MsgKind::commit).empty());
  CHECK(r.replies.empty());
  CHECK(f.state(gid) == TxnState::preparing);

  f.m->on_persisted(gid, f.now);
  r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::commit).size() == 2);
  CHECK(f.state(gid) == TxnState::committing);

  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  CHECK(f.ready().replies.empty());
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].waiter == 7);
  CHECK(http_status_of(r.replies[0]) == 200);
  CHECK(r.replies[0].view.state == TxnState::committed);
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.ended);
  CHECK_FALSE(r.persist[0].sync);
  CHECK(r.persist[0].record.branches[0].outcome == wal::BranchOutcome::committed);
  CHECK(f.state(gid) == TxnState::committed);
  CHECK(f.m->open_txns() == 0);
  CHECK(f.m->counters().committed[0] == 1);
  CHECK_FALSE(f.sink.find("gid=" + gid + " committing->committed").empty());
}

TEST_CASE("a vote of no aborts every other branch and writes nothing (presumed abort)") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2", "a3"});
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  f.ready();
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::vote_yes);
  f.reply(gid, "a2", MsgKind::prepare, ReplyKind::vote_no, "deferred constraint");
  Ready r = f.ready();
  CHECK(r.persist.empty());
  auto aborts = Fixture::of_kind(r, MsgKind::abort);
  REQUIRE(aborts.size() == 2);  // a1 (prepared) and a3 (prepare still in flight)
  CHECK(aborts[0].participant == "a1");
  CHECK(aborts[1].participant == "a3");
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].view.state == TxnState::aborted);
  CHECK(r.replies[0].view.reason == "vote_no");
  CHECK(r.replies[0].view.reason_branch == "a2");
  CHECK_FALSE(f.sink.find("gid=" + gid + " preparing->aborting reason=vote_no branch=a2").empty());

  // a3's late yes is ignored; the abort acknowledgements end it.
  f.reply(gid, "a3", MsgKind::prepare, ReplyKind::vote_yes);
  CHECK(f.ready().empty());
  f.reply(gid, "a1", MsgKind::abort, ReplyKind::aborted);
  f.reply(gid, "a3", MsgKind::abort, ReplyKind::aborted);
  r = f.ready();
  CHECK(r.persist.empty());
  CHECK(f.state(gid) == TxnState::aborted);
}

TEST_CASE("a prepare that fails or times out aborts") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  f.ready();
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::failed, "connection refused");
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].view.reason == "prepare_failed");
  CHECK(r.replies[0].view.reason_branch == "a1");
  CHECK(Fixture::of_kind(r, MsgKind::abort).size() == 2);

  std::string gid2 = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(gid2, 2, {}, f.now).has_value());
  f.ready();
  f.reply(gid2, "a1", MsgKind::prepare, ReplyKind::vote_yes);
  f.m->tick(f.now + f.opts.prepare_timeout_ms - 1);
  CHECK(f.ready().replies.empty());
  f.m->tick(f.now + f.opts.prepare_timeout_ms);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].view.reason == "prepare_timeout");
  CHECK(r.replies[0].view.reason_branch == "a2");
  CHECK(r.persist.empty());
}

TEST_CASE("read-only branches leave at prepare") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  f.ready();
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::vote_read_only);
  f.reply(gid, "a2", MsgKind::prepare, ReplyKind::vote_yes);
  Ready r = f.ready();
  REQUIRE(r.persist.size() == 1);
  f.m->on_persisted(gid, f.now);
  r = f.ready();
  auto commits = Fixture::of_kind(r, MsgKind::commit);
  REQUIRE(commits.size() == 1);
  CHECK(commits[0].participant == "a2");
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 200);

  std::string ro = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(ro, 2, {}, f.now).has_value());
  f.ready();
  f.reply(ro, "a1", MsgKind::prepare, ReplyKind::vote_read_only);
  f.reply(ro, "a2", MsgKind::prepare, ReplyKind::vote_read_only);
  r = f.ready();
  CHECK(r.messages.empty());
  // The answer must survive a crash like any commit: one synced record, then the reply.
  CHECK(r.replies.empty());
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);
  CHECK(r.persist[0].record.decision == wal::Decision::committed_read_only);
  CHECK(r.persist[0].record.ended);
  f.m->on_persisted(ro, f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 200);
  CHECK(r.persist.empty());
}

TEST_CASE("a single branch commits in one phase, after a synced one-phase record") {
  Fixture f;
  std::string gid = f.begin_with({"a1"});
  REQUIRE_FALSE(f.m->commit(gid, 3, {}, f.now).has_value());
  Ready r = f.ready();
  CHECK(r.messages.empty());
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);
  CHECK(r.persist[0].record.decision == wal::Decision::one_phase);
  f.m->on_persisted(gid, f.now);
  r = f.ready();
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].kind == MsgKind::commit_one_phase);
  f.reply(gid, "a1", MsgKind::commit_one_phase, ReplyKind::committed);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 200);
  CHECK(f.m->counters().one_phase == 1);
}

TEST_CASE("a one-phase branch that aborts at commit makes the answer aborted, and recorded") {
  Fixture f;
  std::string gid = f.begin_with({"a1"});
  REQUIRE_FALSE(f.m->commit(gid, 3, {}, f.now).has_value());
  f.ready();
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit_one_phase, ReplyKind::aborted, "23503");
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].view.state == TxnState::aborted);
  CHECK(r.replies[0].view.reason == "branch_aborted");
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.ended);
  // After a restart the record alone answers aborted, not committed.
  auto from_log = CoordinatorMachine::reply_from_record(r.persist[0].record, RequestKind::commit);
  CHECK(from_log.view.state == TxnState::aborted);
  CHECK(http_status_of(from_log) == 409);
}

TEST_CASE("phase 2 is resent with capped exponential backoff and never gives up") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  std::vector<int64_t> delays;
  for (int i = 0; i < 20; ++i) {
    f.reply(gid, "a2", MsgKind::commit, ReplyKind::failed, "unreachable");
    CHECK(f.ready().messages.empty());
    auto next = f.m->next_deadline_ms();
    REQUIRE(next.has_value());
    // Skip past timers that no longer apply (the commit wait, the transaction timeout).
    int64_t before = f.now;
    f.now = *next;
    f.m->tick(f.now);
    Ready r = f.ready();
    while (Fixture::of_kind(r, MsgKind::commit).empty()) {
      next = f.m->next_deadline_ms();
      REQUIRE(next.has_value());
      f.now = *next;
      f.m->tick(f.now);
      auto more = f.ready();
      for (auto& m : more.messages) r.messages.push_back(m);
    }
    delays.push_back(f.now - before);
    auto resent = Fixture::of_kind(r, MsgKind::commit);
    REQUIRE(resent.size() == 1);
    CHECK(resent[0].attempt == static_cast<uint32_t>(i + 2));
  }
  CHECK(delays[0] == 50);
  CHECK(delays[1] == 100);
  CHECK(delays[2] == 200);
  CHECK(delays.back() == 5000);
  CHECK(f.state(gid) == TxnState::committing);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  CHECK(f.state(gid) == TxnState::committed);
  CHECK(f.m->counters().resends == 20);
}

TEST_CASE("repeated commit and abort answer the outcome already reached") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  // A second commit while deciding joins the first.
  CHECK_FALSE(f.m->commit(gid, 2, {}, f.now).has_value());
  // An abort after the decision is refused.
  auto ab = f.m->abort(gid, 3, f.now);
  REQUIRE(ab.has_value());
  CHECK(http_status_of(*ab) == 409);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  Ready r = f.ready();
  CHECK(r.replies.size() == 2);
  auto again = f.m->commit(gid, 4, {}, f.now);
  REQUIRE(again.has_value());
  CHECK(http_status_of(*again) == 200);
  CHECK(again->view.state == TxnState::committed);
  auto abort_after = f.m->abort(gid, 5, f.now);
  REQUIRE(abort_after.has_value());
  CHECK(http_status_of(*abort_after) == 409);
  CHECK(abort_after->view.state == TxnState::committed);
}

TEST_CASE("abort of an active transaction answers at once and reaches its branches") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  auto r = f.m->abort(gid, 1, f.now);
  REQUIRE(r.has_value());
  CHECK(http_status_of(*r) == 200);
  CHECK(r->view.state == TxnState::aborted);
  Ready ready = f.ready();
  CHECK(Fixture::of_kind(ready, MsgKind::abort).size() == 2);
  CHECK(ready.persist.empty());
  auto again = f.m->abort(gid, 2, f.now);
  REQUIRE(again.has_value());
  CHECK(http_status_of(*again) == 200);
  auto c = f.m->commit(gid, 3, {}, f.now);
  REQUIRE(c.has_value());
  CHECK(http_status_of(*c) == 409);
  CHECK(c->view.state == TxnState::aborted);
  CHECK(c->view.reason == "client");

  std::string none = f.begin();
  auto r2 = f.m->abort(none, 4, f.now);
  REQUIRE(r2.has_value());
  CHECK(http_status_of(*r2) == 200);
  CHECK(f.state(none) == TxnState::aborted);
}

TEST_CASE("abort while preparing answers the waiting commit with aborted") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  f.ready();
  auto r = f.m->abort(gid, 2, f.now);
  REQUIRE(r.has_value());
  CHECK(http_status_of(*r) == 200);
  Ready ready = f.ready();
  REQUIRE(ready.replies.size() == 1);
  CHECK(ready.replies[0].waiter == 1);
  CHECK(http_status_of(ready.replies[0]) == 409);
  CHECK(ready.replies[0].view.reason == "client");
}

TEST_CASE("an active transaction past its timeout aborts") {
  Fixture f;
  auto v = f.m->begin(Protocol::two_phase, 1000, f.now);
  REQUIRE(v.ok());
  REQUIRE(http_status_of(f.m->enlist(v->gid, "a1", "http://h:1", f.now)) == 201);
  f.m->tick(f.now + 999);
  CHECK(f.state(v->gid) == TxnState::active);
  f.m->tick(f.now + 1000);
  Ready r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::abort).size() == 1);
  CHECK(f.m->lookup(v->gid).view.reason == "timeout");
}

TEST_CASE("timers fire by deadline whether set with the default delay or their own") {
  MachineOptions o;
  o.txn_timeout_default_ms = 10'000;
  Fixture f(o);
  // The default-timeout transaction begins first but expires last; the own-timeout ones sit
  // in the heap and must still fire first, in deadline order.
  std::string slow = f.begin_with({"a1"});
  auto late = f.m->begin(Protocol::two_phase, 8'000, f.now);
  auto early = f.m->begin(Protocol::two_phase, 3'000, f.now);
  REQUIRE(late.ok());
  REQUIRE(early.ok());
  CHECK(f.m->next_deadline_ms() == f.now + 3'000);
  f.m->tick(f.now + 3'000);
  CHECK(f.state(early->gid) != TxnState::active);
  CHECK(f.state(late->gid) == TxnState::active);
  CHECK(f.state(slow) == TxnState::active);
  CHECK(f.m->next_deadline_ms() == f.now + 8'000);
  f.m->tick(f.now + 9'999);
  CHECK(f.state(late->gid) != TxnState::active);
  CHECK(f.state(slow) == TxnState::active);
  CHECK(f.m->next_deadline_ms() == f.now + 10'000);
  f.m->tick(f.now + 10'000);
  CHECK(f.m->lookup(slow).view.reason == "timeout");
}

TEST_CASE("a one-shot transaction arms no transaction timeout; its prepare timeout still applies") {
  MachineOptions o;
  o.txn_timeout_default_ms = 60'000;
  o.prepare_timeout_ms = 500;
  Fixture f(o);
  auto gid = f.m->run(Protocol::two_phase, {{"a1", "http://h:1"}, {"a2", "http://h:2"}}, 7, {}, f.now);
  REQUIRE(gid.ok());
  f.ready();
  CHECK(f.m->next_deadline_ms() == f.now + 500);
  f.m->tick(f.now + 500);
  CHECK(f.m->lookup(*gid).view.reason == "prepare_timeout");
  // Nothing is left waiting for the 60 s transaction timeout.
  for (auto next = f.m->next_deadline_ms(); next; next = f.m->next_deadline_ms()) {
    CHECK(*next < f.now + 60'000);
    f.m->tick(*next);
  }
}

TEST_CASE("a commit not finished within commit_wait_ms is answered 202 committing") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 9);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.m->tick(f.now + f.opts.commit_wait_ms);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 202);
  CHECK(r.replies[0].view.state == TxnState::committing);
}

TEST_CASE("wait for the decision only: answered once the decision is durable") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  CommitOptions o;
  o.wait_decision_only = true;
  REQUIRE_FALSE(f.m->commit(gid, 5, o, f.now).has_value());
  f.ready();
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::vote_yes);
  f.reply(gid, "a2", MsgKind::prepare, ReplyKind::vote_yes);
  CHECK(f.ready().replies.empty());
  f.m->on_persisted(gid, f.now);
  Ready r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 202);
  CHECK(r.replies[0].view.state == TxnState::committing);
}

TEST_CASE("recovery drives a logged commit to the branches that have not acknowledged") {
  Fixture f;
  wal::TxnRecord rec;
  rec.gid = "c1-1-5";
  rec.decision = wal::Decision::commit;
  rec.branches = {{"a1", "http://h:1", wal::BranchOutcome::committed},
                  {"a2", "http://h:2", wal::BranchOutcome::pending}};
  f.restart(2, {rec});
  CHECK(f.m->recovering() == 1);
  Ready r = f.ready();
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].participant == "a2");
  CHECK(r.messages[0].kind == MsgKind::commit);
  CHECK(f.state("c1-1-5") == TxnState::committing);
  f.reply("c1-1-5", "a2", MsgKind::commit, ReplyKind::committed);
  CHECK(f.m->recovering() == 0);
  r = f.ready();
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.ended);
  CHECK(f.begin() == "c1-2-1");
}

TEST_CASE("recovery resends a one-phase commit and a 3PC pre-commit is driven to commit") {
  Fixture f;
  wal::TxnRecord one;
  one.gid = "c1-1-1";
  one.decision = wal::Decision::one_phase;
  one.branches = {{"a1", "http://h:1", wal::BranchOutcome::pending}};
  wal::TxnRecord three;
  three.gid = "c1-1-2";
  three.protocol = Protocol::three_phase;
  three.decision = wal::Decision::precommit;
  three.branches = {{"a1", "http://h:1", wal::BranchOutcome::pending},
                    {"a2", "http://h:2", wal::BranchOutcome::pending}};
  f.restart(2, {one, three});
  Ready r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::commit_one_phase).size() == 1);
  CHECK(Fixture::of_kind(r, MsgKind::commit).size() == 2);
  CHECK(f.m->recovering() == 2);
}

TEST_CASE("3PC: prepare, a durable pre-commit decision, pre-commit to all, then commit") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"}, Protocol::three_phase);
  Ready r = f.commit_to_decision(gid, {"a1", "a2"}, 1);
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);
  CHECK(r.persist[0].record.decision == wal::Decision::precommit);
  CHECK(r.persist[0].record.protocol == Protocol::three_phase);
  CHECK(r.messages.empty());
  f.m->on_persisted(gid, f.now);
  r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::precommit).size() == 2);
  CHECK(Fixture::of_kind(r, MsgKind::commit).empty());
  CHECK(f.state(gid) == TxnState::precommitted);
  f.reply(gid, "a1", MsgKind::precommit, ReplyKind::precommitted);
  f.reply(gid, "a2", MsgKind::precommit, ReplyKind::failed);
  CHECK(f.ready().messages.empty());
  f.m->tick(f.now + f.opts.retry_min_ms);
  r = f.ready();
  REQUIRE(Fixture::of_kind(r, MsgKind::precommit).size() == 1);
  f.reply(gid, "a2", MsgKind::precommit, ReplyKind::precommitted);
  r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::commit).size() == 2);
  CHECK(f.state(gid) == TxnState::committing);
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  CHECK(f.state(gid) == TxnState::committed);
  CHECK(f.m->counters().committed[1] == 1);
}

TEST_CASE("a branch that aborted against a commit decision is reported as heuristic_mixed") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::aborted, "rolled back by hand");
  Ready r = f.ready();
  CHECK(f.state(gid) == TxnState::heuristic_mixed);
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.heuristic_mixed);
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 409);
  auto errors = f.sink.find("heuristic outcome", LogLevel::error);
  REQUIRE(errors.size() == 1);
  CHECK(errors[0].find("branches=a1:committed,a2:aborted") != std::string::npos);
  CHECK(f.m->counters().heuristic_mixed == 1);
  CHECK(f.m->in_doubt(f.now, 10).size() == 1);

  // The same for an abort decision that met a committed branch: recorded despite presumed abort.
  std::string g2 = f.begin_with({"a1", "a2"});
  REQUIRE(f.m->abort(g2, 2, f.now).has_value());
  f.ready();
  f.reply(g2, "a1", MsgKind::abort, ReplyKind::committed);
  f.reply(g2, "a2", MsgKind::abort, ReplyKind::aborted);
  r = f.ready();
  CHECK(f.state(g2) == TxnState::heuristic_mixed);
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.decision == wal::Decision::aborted);
}

TEST_CASE("late and duplicate replies change nothing") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  f.reply(gid, "a1", MsgKind::prepare, ReplyKind::vote_no);  // after the decision: ignored
  f.reply(gid, "zz", MsgKind::commit, ReplyKind::committed);  // unknown branch
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);  // commit not sent yet
  CHECK(f.ready().empty());
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  CHECK(f.state(gid) == TxnState::committing);
  f.reply("c1-1-999", "a1", MsgKind::commit, ReplyKind::committed);
  CHECK(f.ready().empty());
}

TEST_CASE("lookups: live, in the log, not ours, forgotten") {
  Fixture f;
  f.restart(3, {}, GidParts{"c1", 2, 10});
  std::string gid = f.begin();
  CHECK(f.m->lookup(gid).kind == LookupKind::live);
  CHECK(f.m->lookup("c2-3-1").kind == LookupKind::not_ours);
  CHECK(f.m->lookup("c1-4-1").kind == LookupKind::not_ours);   // future epoch
  CHECK(f.m->lookup("c1-3-2").kind == LookupKind::not_ours);   // not issued yet
  CHECK(f.m->lookup("garbage").kind == LookupKind::not_ours);
  auto old = f.m->lookup("c1-2-5");
  CHECK(old.kind == LookupKind::in_log);
  CHECK(old.forgotten_if_absent);
  auto newer = f.m->lookup("c1-2-11");
  CHECK(newer.kind == LookupKind::in_log);
  CHECK_FALSE(newer.forgotten_if_absent);

  auto presumed = CoordinatorMachine::reply_without_record("c1-2-11", RequestKind::get, false);
  CHECK(presumed.view.state == TxnState::aborted);
  CHECK(presumed.view.presumed);
  CHECK(http_status_of(CoordinatorMachine::reply_without_record("c1-2-11", RequestKind::commit,
                                                                false)) == 409);
  CHECK(http_status_of(
            CoordinatorMachine::reply_without_record("c1-2-11", RequestKind::abort, false)) == 200);
  auto forgotten = CoordinatorMachine::reply_without_record("c1-2-5", RequestKind::get, true);
  CHECK(forgotten.view.forgotten);
  CHECK_FALSE(forgotten.view.presumed);
}

TEST_CASE("answers from a record: committed, committing, heuristic") {
  wal::TxnRecord rec;
  rec.gid = "c1-1-1";
  rec.decision = wal::Decision::commit;
  rec.branches = {{"a1", "u", wal::BranchOutcome::committed}, {"a2", "u", wal::BranchOutcome::pending}};
  auto r = CoordinatorMachine::reply_from_record(rec, RequestKind::commit);
  CHECK(r.view.state == TxnState::committing);
  CHECK(http_status_of(r) == 202);
  CHECK(http_status_of(CoordinatorMachine::reply_from_record(rec, RequestKind::abort)) == 409);
  rec.ended = true;
  rec.branches[1].outcome = wal::BranchOutcome::committed;
  CHECK(http_status_of(CoordinatorMachine::reply_from_record(rec, RequestKind::commit)) == 200);
  rec.heuristic_mixed = true;
  CHECK(CoordinatorMachine::view_from_record(rec).state == TxnState::heuristic_mixed);
}

TEST_CASE("resolve: abort before a decision; never against the decision; forced finish") {
  Fixture f;
  std::string undecided = f.begin_with({"a1", "a2"});
  CHECK(http_status_of(f.m->resolve(undecided, true, f.now)) == 409);
  auto r = f.m->resolve(undecided, false, f.now);
  CHECK(http_status_of(r) == 200);
  CHECK(f.m->lookup(undecided).view.reason == "operator");

  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  auto refused = f.m->resolve(gid, false, f.now);
  CHECK(http_status_of(refused) == 409);
  CHECK(refused.error.message().find("never changes") != std::string::npos);
  auto forced = f.m->resolve(gid, true, f.now);
  CHECK(http_status_of(forced) == 200);
  CHECK(f.state(gid) == TxnState::committed);
  Ready ready = f.ready();
  REQUIRE(ready.persist.size() == 1);
  CHECK(ready.persist[0].record.branches[1].outcome == wal::BranchOutcome::forced);
  CHECK_FALSE(f.sink.find("branch resolved by operator", LogLevel::warn).empty());
}

TEST_CASE("finished_below is the oldest unfinished gid") {
  Fixture f;
  std::string a = f.begin_with({"a1", "a2"});
  std::string b = f.begin_with({"a1"});
  CHECK(f.m->finished_below().seq == 1);
  REQUIRE(f.m->abort(a, 1, f.now).has_value());
  f.reply(a, "a1", MsgKind::abort, ReplyKind::aborted);
  f.reply(a, "a2", MsgKind::abort, ReplyKind::aborted);
  CHECK(f.m->finished_below().seq == 2);
  REQUIRE(f.m->abort(b, 2, f.now).has_value());
  f.reply(b, "a1", MsgKind::abort, ReplyKind::aborted);
  CHECK(f.m->finished_below().seq == 3);
}

// A committed transaction's end record is written unsynced: until a synced write covers it, a
// crash can lose it and the transaction is driven again, which needs the agents' markers.
// (Found by the whole-system simulator: markers purged below a horizon that passed an end
// record a crash then lost; the re-driven commit found neither the prepared branch nor its
// marker and the transfer was reported heuristic_mixed.)
TEST_CASE("finished_below passes a committed transaction only once its end record is durable") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  Ready decided = f.commit_to_decision(gid, {"a1", "a2"}, 1);
  REQUIRE(decided.persist.size() == 1);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::committed);
  Ready ended = f.ready();
  REQUIRE(ended.persist.size() == 1);
  CHECK(ended.persist[0].record.ended);
  CHECK_FALSE(ended.persist[0].sync);
  CHECK(f.m->lookup(gid).view.state == TxnState::committed);
  CHECK(f.m->finished_below().seq == 1);
  f.m->on_ends_durable({gid});
  CHECK(f.m->finished_below().seq == 2);
  f.m->on_ends_durable({gid});  // twice is harmless
  CHECK(f.m->finished_below().seq == 2);
}

TEST_CASE("list: newest first across live and finished transactions, by state, up to the limit") {
  Fixture f;
  std::string a = f.begin_with({"a1"});
  std::string b = f.begin_with({"a1"});
  std::string c = f.begin_with({"a1"});
  std::string d = f.begin_with({"a1"});
  for (const std::string& gid : {b, d}) {  // b and d finish (aborted), a and c stay active
    REQUIRE(f.m->abort(gid, 1, f.now).has_value());
    f.reply(gid, "a1", MsgKind::abort, ReplyKind::aborted);
  }
  auto gids = [](const std::vector<TxnView>& views) {
    std::vector<std::string> out;
    for (auto& v : views) out.push_back(v.gid);
    return out;
  };
  CHECK(gids(f.m->list(std::nullopt, 10)) == std::vector<std::string>{d, c, b, a});
  CHECK(gids(f.m->list(std::nullopt, 3)) == std::vector<std::string>{d, c, b});
  CHECK(gids(f.m->list(TxnState::active, 10)) == std::vector<std::string>{c, a});
  CHECK(gids(f.m->list(TxnState::aborted, 1)) == std::vector<std::string>{d});
  CHECK(f.m->list(TxnState::committed, 10).empty());
}

TEST_CASE("a transaction with no branches commits after one synced record") {
  Fixture f;
  std::string gid = f.begin();
  CHECK_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  Ready r = f.ready();
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);
  CHECK(r.replies.empty());
  f.m->on_persisted(gid, f.now);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 200);
  CHECK(r.replies[0].view.state == TxnState::committed);
}

TEST_CASE("a 3PC prepare names every branch so the agents can terminate together") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"}, Protocol::three_phase);
  REQUIRE_FALSE(f.m->commit(gid, 1, {}, f.now).has_value());
  Ready r = f.ready();
  auto prepares = Fixture::of_kind(r, MsgKind::prepare);
  REQUIRE(prepares.size() == 2);
  CHECK(prepares[0].protocol == Protocol::three_phase);
  REQUIRE(prepares[0].peers.size() == 2);
  CHECK(prepares[0].peers[1].participant == "a2");
  std::string two = f.begin_with({"a1", "a2"});
  REQUIRE_FALSE(f.m->commit(two, 2, {}, f.now).has_value());
  CHECK(Fixture::of_kind(f.ready(), MsgKind::prepare)[0].peers.empty());
}

TEST_CASE("views carry the decision, also for a heuristic outcome") {
  Fixture f;
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  // Not durable yet: nobody may act on it (an agent's in-doubt resolver would commit).
  CHECK(f.m->lookup(gid).view.decision == Decision::none);
  auto refused = f.m->abort(gid, 9, f.now);
  REQUIRE(refused.has_value());
  CHECK(refused->view.decision == Decision::none);
  f.m->on_persisted(gid, f.now);
  CHECK(f.m->lookup(gid).view.decision == Decision::commit);
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::aborted);
  auto v = f.m->lookup(gid).view;
  CHECK(v.state == TxnState::heuristic_mixed);
  CHECK(v.decision == Decision::commit);
  std::string ab = f.begin_with({"a1"});
  REQUIRE(f.m->abort(ab, 2, f.now).has_value());
  CHECK(f.m->lookup(ab).view.decision == Decision::abort);
}

TEST_CASE("one-shot: statements go out with prepare, and a single branch with its one-phase commit") {
  Fixture f;
  auto gid = f.m->run(Protocol::two_phase, {{"a1", "http://h:1"}, {"a2", "http://h:2"}}, 7, {}, f.now);
  REQUIRE(gid.ok());
  Ready r = f.ready();
  auto execs = Fixture::of_kind(r, MsgKind::exec_prepare);
  REQUIRE(execs.size() == 2);
  CHECK(Fixture::of_kind(r, MsgKind::prepare).empty());
  f.reply(*gid, "a1", MsgKind::exec_prepare, ReplyKind::vote_yes);
  f.reply(*gid, "a2", MsgKind::exec_prepare, ReplyKind::vote_yes);
  r = f.ready();
  REQUIRE(r.persist.size() == 1);
  f.m->on_persisted(*gid, f.now);
  r = f.ready();
  CHECK(Fixture::of_kind(r, MsgKind::commit).size() == 2);
  f.reply(*gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(*gid, "a2", MsgKind::commit, ReplyKind::committed);
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(r.replies[0].waiter == 7);
  CHECK(http_status_of(r.replies[0]) == 200);

  auto one = f.m->run(Protocol::two_phase, {{"a1", "http://h:1"}}, 8, {}, f.now);
  REQUIRE(one.ok());
  r = f.ready();
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].record.decision == wal::Decision::one_phase);
  CHECK(r.messages.empty());
  f.m->on_persisted(*one, f.now);
  r = f.ready();
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].kind == MsgKind::exec_commit);
  // A failed first send is resent as a plain one-phase commit: the statements never run twice.
  f.reply(*one, "a1", MsgKind::exec_commit, ReplyKind::failed);
  f.m->tick(f.now + f.opts.retry_min_ms);
  r = f.ready();
  REQUIRE(r.messages.size() == 1);
  CHECK(r.messages[0].kind == MsgKind::commit_one_phase);
  f.reply(*one, "a1", MsgKind::commit_one_phase, ReplyKind::committed);
  CHECK(f.state(*one) == TxnState::committed);
}

TEST_CASE("one-shot: a failed statement is a vote of no; bad branch lists are refused") {
  Fixture f;
  auto gid = f.m->run(Protocol::three_phase, {{"a1", "http://h:1"}, {"a2", "http://h:2"}}, 1, {}, f.now);
  REQUIRE(gid.ok());
  Ready r = f.ready();
  auto execs = Fixture::of_kind(r, MsgKind::exec_prepare);
  REQUIRE(execs.size() == 2);
  CHECK(execs[0].peers.size() == 2);  // 3PC: the peers ride along
  f.reply(*gid, "a1", MsgKind::exec_prepare, ReplyKind::vote_no, "23514");
  r = f.ready();
  REQUIRE(r.replies.size() == 1);
  CHECK(http_status_of(r.replies[0]) == 409);
  CHECK(r.replies[0].view.reason_branch == "a1");
  CHECK(f.m->run(Protocol::two_phase, {}, 2, {}, f.now).status().code() == Code::invalid_argument);
  CHECK(f.m->run(Protocol::two_phase, {{"a1", "u"}, {"a1", "u"}}, 3, {}, f.now).status().code() ==
        Code::invalid_argument);
}

TEST_CASE("a branch's report of what it did records a disagreement, and a true one corrects it") {
  // Presumed abort, but the branch committed (an operator's resolve): recorded as heuristic.
  auto rec = CoordinatorMachine::apply_branch_report(std::nullopt, "c1-1-5", "a1", true, 77);
  REQUIRE(rec.has_value());
  CHECK(rec->gid == "c1-1-5");
  CHECK(rec->decision == wal::Decision::aborted);
  CHECK(rec->ended);
  CHECK(rec->heuristic_mixed);
  auto view = CoordinatorMachine::view_from_record(*rec);
  CHECK(view.state == TxnState::heuristic_mixed);
  CHECK(view.decision == Decision::abort);
  REQUIRE(view.branches.size() == 1);
  CHECK(view.branches[0].heuristic);
  // The same report again changes nothing; an abort agrees with the presumption.
  CHECK_FALSE(CoordinatorMachine::apply_branch_report(rec, "c1-1-5", "a1", true, 78).has_value());
  CHECK_FALSE(CoordinatorMachine::apply_branch_report(std::nullopt, "c1-1-6", "a1", false, 78).has_value());

  // A commit record with a branch that answered aborted (a misdirected agent)...
  wal::TxnRecord c;
  c.gid = "c1-1-7";
  c.decision = wal::Decision::commit;
  c.ended = true;
  c.heuristic_mixed = true;
  c.branches = {{"a1", "http://h:1", wal::BranchOutcome::committed},
                {"a2", "http://h:2", wal::BranchOutcome::aborted}};
  // ...is corrected when the right agent reports the branch committed.
  auto fixed = CoordinatorMachine::apply_branch_report(c, "c1-1-7", "a2", true, 80);
  REQUIRE(fixed.has_value());
  CHECK_FALSE(fixed->heuristic_mixed);
  CHECK(CoordinatorMachine::view_from_record(*fixed).state == TxnState::committed);
  // A branch reporting an abort against a commit makes it heuristic.
  c.heuristic_mixed = false;
  c.branches[1].outcome = wal::BranchOutcome::committed;
  auto broken = CoordinatorMachine::apply_branch_report(c, "c1-1-7", "a1", false, 80);
  REQUIRE(broken.has_value());
  CHECK(broken->heuristic_mixed);
}

TEST_CASE("heuristic outcomes stay in in-doubt across restarts until a rewrite clears them") {
  Fixture f;
  wal::TxnRecord h;
  h.gid = "c1-1-3";
  h.decision = wal::Decision::commit;
  h.ended = true;
  h.heuristic_mixed = true;
  h.branches = {{"a1", "http://h:1", wal::BranchOutcome::committed},
                {"a2", "http://h:2", wal::BranchOutcome::aborted}};
  f.restart(2);
  f.m->remember_heuristic(h);
  CHECK(f.m->heuristic_outcomes() == 1);
  auto listed = f.m->in_doubt(f.now, 10);
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].gid == "c1-1-3");
  CHECK(listed[0].state == TxnState::heuristic_mixed);
  h.heuristic_mixed = false;
  f.m->on_record_rewritten(h);
  CHECK(f.m->heuristic_outcomes() == 0);
  CHECK(f.m->in_doubt(f.now, 10).empty());
  // A report that makes a finished transaction heuristic is logged and counted.
  h.heuristic_mixed = true;
  uint64_t before = f.m->counters().heuristic_mixed;
  f.m->on_record_rewritten(h);
  CHECK(f.m->counters().heuristic_mixed == before + 1);
  CHECK_FALSE(f.sink.find("heuristic outcome: branches disagree", LogLevel::error).empty());
}

TEST_CASE("a transaction that ends heuristic is listed beyond the finished views kept") {
  MachineOptions o;
  o.finished_kept_max = 1;
  Fixture f(o);
  std::string gid = f.begin_with({"a1", "a2"});
  f.commit_to_decision(gid, {"a1", "a2"}, 1);
  f.m->on_persisted(gid, f.now);
  f.ready();
  f.reply(gid, "a1", MsgKind::commit, ReplyKind::committed);
  f.reply(gid, "a2", MsgKind::commit, ReplyKind::aborted);
  CHECK(f.m->heuristic_outcomes() == 1);
  // Later transactions push it out of the finished views, not out of in-doubt.
  for (int i = 0; i < 3; ++i) {
    std::string g = f.begin();
    f.m->abort(g, 100 + i, f.now);
  }
  auto listed = f.m->in_doubt(f.now, 10);
  REQUIRE(listed.size() == 1);
  CHECK(listed[0].gid == gid);
}
