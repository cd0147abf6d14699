#include "participant/agent_machine.h"

#include <algorithm>
#include <set>

#include "common/wire.h"

namespace tpc::agent {
namespace {

bool final_state(BranchState s) {
  return s == BranchState::committed || s == BranchState::aborted || s == BranchState::read_only;
}

bool session_state(BranchState s) {
  return s == BranchState::enlisting || s == BranchState::active || s == BranchState::failed;
}

}  // namespace

std::string_view branch_state_name(BranchState s) {
  switch (s) {
    case BranchState::unknown: return wire::kUnknown;
    case BranchState::enlisting: return "enlisting";
    case BranchState::active: return wire::kActive;
    case BranchState::failed: return "failed";
    case BranchState::prepared: return wire::kPrepared;
    case BranchState::precommitted: return wire::kPrecommitted;
    case BranchState::committed: return wire::kCommitted;
    case BranchState::aborted: return wire::kAborted;
    case BranchState::read_only: return wire::kReadOnly;
  }
  return "?";
}

std::string_view external_state_name(BranchState s) {
  if (s == BranchState::enlisting || s == BranchState::failed) return wire::kActive;
  return branch_state_name(s);
}

std::optional<BranchState> parse_external_state(std::string_view s) {
  for (BranchState b : {BranchState::active, BranchState::prepared, BranchState::precommitted,
                        BranchState::committed, BranchState::aborted, BranchState::read_only,
                        BranchState::unknown})
    if (branch_state_name(b) == s) return b;
  return std::nullopt;
}

std::string_view check_name(Check c) {
  switch (c) {
    case Check::none: return "none";
    case Check::unchecked: return "unchecked";
    case Check::mismatch: return "mismatch";
    case Check::reported: return "reported";
  }
  return "?";
}

std::string check_record_state(Check c, bool operator_decision, bool committed) {
  std::string_view prefix;
  switch (c) {
    case Check::none: return "";
    case Check::unchecked: prefix = operator_decision ? "heuristic" : "unilateral"; break;
    case Check::mismatch: prefix = "mismatch"; break;
    case Check::reported: prefix = "reported"; break;
  }
  return std::string(prefix) + (committed ? "_commit" : "_abort");
}

std::optional<CheckRecord> parse_check_record(std::string_view state) {
  for (Check c : {Check::unchecked, Check::mismatch, Check::reported})
    for (bool op : {true, false})
      for (bool committed : {true, false})
        if (check_record_state(c, op, committed) == state) return CheckRecord{c, op, committed};
  return std::nullopt;
}

std::string_view op_name(OpKind k) {
  switch (k) {
    case OpKind::exec: return "exec";
    case OpKind::prepare: return "prepare";
    case OpKind::commit_one_phase: return "commit_one_phase";
    case OpKind::rollback: return "rollback";
    case OpKind::commit_prepared: return "commit_prepared";
    case OpKind::rollback_prepared: return "rollback_prepared";
    case OpKind::evidence: return "evidence";
    case OpKind::put_state: return "put_state";
    case OpKind::delete_state: return "delete_state";
    case OpKind::tombstone: return "tombstone";
    case OpKind::step: return "step";
  }
  return "?";
}

AgentMachine::AgentMachine(AgentOptions opts, Logger& log) : opts_(std::move(opts)), log_(log) {
  TPC_ASSERT(opts_.branches_max > 0 && opts_.ask_min_ms > 0);
}

AgentMachine::Branch* AgentMachine::find(std::string_view gid) {
  auto it = branches_.find(std::string(gid));
  return it == branches_.end() ? nullptr : &it->second;
}

const AgentMachine::Branch* AgentMachine::find(std::string_view gid) const {
  auto it = branches_.find(std::string(gid));
  return it == branches_.end() ? nullptr : &it->second;
}

AgentMachine::Branch& AgentMachine::create(std::string_view gid, BranchState state,
                                           int64_t now_ms) {
  Branch b;
  b.gid = std::string(gid);
  if (auto parts = parse_gid(gid)) {
    b.coordinator = parts->coordinator;
    b.epoch = parts->epoch;
  }
  b.serial = next_serial_++;
  b.state = BranchState::unknown;
  b.created_ms = now_ms;
  b.last_activity_ms = now_ms;
  Branch& nb = branches_.emplace(b.gid, std::move(b)).first->second;
  set_state(nb, state, now_ms);
  return nb;
}

void AgentMachine::set_state(Branch& b, BranchState to, int64_t now_ms) {
  BranchState from = b.state;
  LogLevel level = to == BranchState::active || to == BranchState::enlisting ? LogLevel::debug
                                                                             : LogLevel::info;
  if (from != to && from != BranchState::unknown && log_.enabled(level)) {
    if (!b.reason.empty() && (to == BranchState::aborted || to == BranchState::failed))
      log_.log(level, std::string(branch_state_name(from)) + "->" + std::string(branch_state_name(to)),
               {{"gid", b.gid}, {"reason", b.reason}});
    else
      log_.log(level, std::string(branch_state_name(from)) + "->" + std::string(branch_state_name(to)),
               {{"gid", b.gid}});
  }
  b.state = to;
  bool had_session = b.session;
  b.session = session_state(to);
  if (b.session && !had_session) ++open_sessions_;
  if (!b.session && had_session) --open_sessions_;
  if ((to == BranchState::prepared || to == BranchState::precommitted) && from != to) {
    b.prepared_ms = now_ms;
    b.asks = 0;
    b.next_ask_ms = 0;
  }
  if (final_state(to))
    finished_[b.serial] = b.gid;
  else
    finished_.erase(b.serial);
  track_live(b);
}

// live_ holds the branches timers act on: not ended, or ended and still checking, reporting
// or writing their record. Ended branches that are not pinned are evictable (finished_).
void AgentMachine::track_live(Branch& b) {
  bool timers = !final_state(b.state) || b.check == Check::unchecked || b.report_pending ||
                desired_record(b) != b.recorded;
  if (timers)
    live_.insert(b.gid);
  else
    live_.erase(b.gid);
  if (final_state(b.state) && !pinned(b)) finished_.emplace(b.serial, b.gid);  // evictable
}

bool AgentMachine::pinned(const Branch& b) const {
  return b.check != Check::none || b.report_pending || desired_record(b) != b.recorded;
}

// The row a branch's check should have: none once the check is over; while the branch is not
// ended, whatever it has (the resolve path writes its intent itself, before acting).
std::string AgentMachine::desired_record(const Branch& b) const {
  if (!final_state(b.state)) return b.recorded;
  if (b.check == Check::none) return "";
  return check_record_state(b.check, !b.unilateral, b.state == BranchState::committed);
}

void AgentMachine::set_check(Branch& b, Check c, int64_t now_ms) {
  b.check = c;
  if (c == Check::mismatch || c == Check::reported)
    disagreements_.insert(b.gid);
  else
    disagreements_.erase(b.gid);
  if (c == Check::unchecked) b.next_ask_ms = now_ms + opts_.ask_min_ms;
  if (c == Check::mismatch && !b.report_pending) {
    b.report_pending = true;
    b.next_report_ms = now_ms;
  }
  persist_check(b);
  track_live(b);
}

// Queues the write of the check's tpc_agent_state row (or its removal once the check is over)
// behind whatever the branch is doing; the caller pumps. A failed write is retried from tick().
void AgentMachine::persist_check(Branch& b) {
  if (desired_record(b) == b.recorded) return;
  for (auto& q : b.queue)
    if (q.kind == RequestKind::record) return;  // one is queued; it writes the latest
  Request internal;
  internal.kind = RequestKind::record;
  b.queue.push_back(internal);
}

void AgentMachine::erase_branch(const std::string& gid) {
  live_.erase(gid);
  branches_.erase(gid);
}

void AgentMachine::reply(const Request& req, Reply r) {
  if (req.id == 0) return;  // internal
  r.request = req.id;
  r.kind = req.kind;
  ready_.replies.push_back(std::move(r));
}

void AgentMachine::reply_state(const Branch& b, const Request& req, bool contrary,
                               std::string_view why) {
  Reply r;
  r.contrary = contrary;
  r.state = b.state;
  r.reason = why.empty() ? b.reason : std::string(why);
  r.sqlstate = b.sqlstate;
  reply(req, std::move(r));
}

void AgentMachine::reply_error(const Request& req, Status s, const Branch* b) {
  Reply r;
  r.error = std::move(s);
  if (b) {
    r.state = b->state;
    r.sqlstate = b->sqlstate;
  }
  reply(req, std::move(r));
}

void AgentMachine::reply_vote(const Branch& b, const Request& req) {
  Reply r;
  r.state = b.state;
  switch (b.state) {
    case BranchState::prepared:
    case BranchState::precommitted:
    case BranchState::committed: r.vote = pg::Vote::yes; break;
    case BranchState::read_only: r.vote = pg::Vote::read_only; break;
    default:
      r.vote = pg::Vote::no;
      r.reason = b.reason.empty() ? "branch is " + std::string(branch_state_name(b.state)) : b.reason;
      r.sqlstate = b.sqlstate;
      break;
  }
  reply(req, std::move(r));
}

void AgentMachine::start_op(Branch& b, Request req, PgOp op) {
  TPC_ASSERT(!b.busy);
  b.busy = true;
  b.current = std::move(req);
  b.has_current = true;
  b.current_op = op.kind;
  op.gid = b.gid;
  ready_.ops.push_back(std::move(op));
}

// A 3PC branch records that it is one, and who its peers are, before it prepares: after a
// restart it must still apply the 3PC timeouts and know whom to ask. True when the record is
// being written (the request runs again once it is, see record_done).
bool AgentMachine::record_three_pc_first(Branch& b, Request& req) {
  const std::string_view prepared3 = pg::three_pc_record_text(pg::ThreePcRecord::prepared3);
  if (b.protocol != Protocol::three_phase || b.recorded == prepared3) return false;
  PgOp op;
  op.kind = OpKind::put_state;
  op.state = std::string(prepared3);
  op.peers = b.peers;
  start_op(b, std::move(req), std::move(op));
  return true;
}

// --- requests ------------------------------------------------------------------------------

void AgentMachine::request(std::string_view gid, Request req, int64_t now_ms) {
  if (req.kind == RequestKind::step) return step(gid, std::move(req), now_ms);
  if (auto parts = parse_gid(gid)) on_coordinator_epoch(parts->coordinator, parts->epoch, now_ms);
  Branch* b = find(gid);
  if (!b) {
    switch (req.kind) {
      case RequestKind::exec: {
        if (open_sessions_ >= opts_.branches_max) {
          ++counters_.refused_overload;
          reply_error(req, unavailable("too many open branches (branches_max=" +
                                       std::to_string(opts_.branches_max) + ")"));
          return;
        }
        if (req.enlisted) {
          // Sent by the coordinator with the branch already enlisted (one-shot).
          Branch& nb = create(gid, BranchState::active, now_ms);
          nb.idle_deadline_ms = now_ms + opts_.idle_timeout_ms;
          nb.queue.push_back(std::move(req));
          pump(nb, now_ms);
          return;
        }
        Branch& nb = create(gid, BranchState::enlisting, now_ms);
        nb.busy = true;  // until the coordinator answers the enlistment
        nb.queue.push_back(std::move(req));
        ready_.enlists.emplace_back(gid);
        return;
      }
      case RequestKind::prepare: {
        Branch& nb = create(gid, BranchState::aborted, now_ms);
        nb.reason = "unknown branch";
        ++counters_.votes_no;
        reply_vote(nb, req);
        evict_finished();
        return;
      }
      case RequestKind::forget:
        reply_error(req,
                    not_found("no branch " + std::string(gid) + " in memory; nothing to forget"));
        return;
      case RequestKind::record: return;  // the branch is gone, and its record with it
      case RequestKind::status:
        if (req.id == 0) return;  // an internal check of a branch that is gone
        [[fallthrough]];
      default: {
        // Commit, abort, pre-commit or resolve of a gid not in memory: ask PostgreSQL first.
        Branch& nb = create(gid, BranchState::unknown, now_ms);
        nb.queue.push_back(std::move(req));
        pump(nb, now_ms);
        return;
      }
    }
  }
  if (b->queue.size() >= opts_.queue_per_branch_max) {
    reply_error(req, unavailable("too many requests waiting on branch " + b->gid));
    return;
  }
  bool aborting = req.kind == RequestKind::abort || (req.kind == RequestKind::resolve && !req.commit);
  if (aborting && b->busy) cancel_running(*b, "abort requested");
  b->queue.push_back(std::move(req));
  pump(*b, now_ms);
}

void AgentMachine::cancel_running(Branch& b, std::string_view why) {
  if (!b.busy || b.current_op != OpKind::exec || b.cancel_sent) return;
  b.cancel_sent = true;
  log_.warn("cancelling the running statement", {{"gid", b.gid}, {"why", why}});
  ready_.cancels.push_back(b.gid);
}

void AgentMachine::abort_stale(Branch& b, std::string_view why, int64_t now_ms) {
  b.reason = std::string(why);
  cancel_running(b, why);
  Request internal;
  internal.kind = RequestKind::abort;
  b.queue.push_back(internal);
  pump(b, now_ms);
}

void AgentMachine::on_coordinator_epoch(std::string_view coordinator, uint64_t epoch,
                                        int64_t now_ms) {
  auto it = epochs_.find(coordinator);
  if (it != epochs_.end() && it->second >= epoch) return;
  bool first = it == epochs_.end();
  epochs_[std::string(coordinator)] = epoch;
  if (first) return;  // nothing older was seen while we ran, except scanned prepared branches
  std::vector<std::string> stale;
  for (auto& [gid, b] : branches_)
    if (b.coordinator == coordinator && b.epoch < epoch) stale.push_back(gid);
  for (auto& gid : stale) {
    Branch* b = find(gid);
    if (!b) continue;
    switch (b->state) {
      case BranchState::active:
      case BranchState::failed: {
        bool queued_abort = false;
        for (auto& q : b->queue) queued_abort = queued_abort || q.kind == RequestKind::abort;
        if (!queued_abort) {
          log_.warn("rolling back a branch of an earlier coordinator epoch", {{"gid", gid}});
          abort_stale(*b, "the coordinator restarted and has no record of it", now_ms);
        }
        break;
      }
      case BranchState::prepared:
      case BranchState::precommitted:
        b->ask_now = true;
        b->next_ask_ms = 0;
        break;
      default: break;
    }
  }
}

void AgentMachine::pump(Branch& b, int64_t now_ms) {
  std::string gid = b.gid;
  while (true) {
    Branch* p = find(gid);
    if (!p || p->busy || p->queue.empty()) break;
    Request req = std::move(p->queue.front());
    p->queue.pop_front();
    dispatch(*p, std::move(req), now_ms);
  }
  if (Branch* p = find(gid); p && !p->busy && p->queue.empty()) {
    if (p->state == BranchState::unknown) {
      erase_branch(gid);  // nothing learned; a later request looks again
      return;
    }
    evict_finished();
  }
}

void AgentMachine::dispatch(Branch& b, Request req, int64_t now_ms) {
  if (b.state == BranchState::unknown) {
    PgOp op;
    op.kind = OpKind::evidence;
    start_op(b, std::move(req), std::move(op));
    return;
  }
  bool from_coordinator = req.id != 0 && !req.one_phase &&
                          (req.kind == RequestKind::commit || req.kind == RequestKind::abort ||
                           req.kind == RequestKind::precommit);
  if (from_coordinator && b.check == Check::unchecked && final_state(b.state))
    check_against_coordinator(b, req.kind != RequestKind::abort, true, now_ms);
  switch (req.kind) {
    case RequestKind::status: return dispatch_status(b, std::move(req));
    case RequestKind::exec: return dispatch_exec(b, std::move(req), now_ms);
    case RequestKind::prepare: return dispatch_prepare(b, std::move(req));
    case RequestKind::precommit: return dispatch_precommit(b, std::move(req));
    case RequestKind::commit: return dispatch_commit(b, std::move(req));
    case RequestKind::abort: return dispatch_abort(b, std::move(req));
    case RequestKind::resolve: return dispatch_resolve(b, std::move(req));
    case RequestKind::record: return dispatch_record(b, std::move(req));
    case RequestKind::forget: return dispatch_forget(b, std::move(req), now_ms);
    case RequestKind::step: TPC_ASSERT_MSG(false, "a step never joins a branch's queue");
  }
}

void AgentMachine::dispatch_status(Branch& b, Request req) {
  const bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  if (req.id != 0) {  // a peer's query (3PC termination): our state, from evidence if need be
    reply_state(b, req, false);
  } else if (prepared) {  // verify a prepared branch PostgreSQL no longer lists
    PgOp op;
    op.kind = OpKind::evidence;
    start_op(b, std::move(req), std::move(op));
  }
}

void AgentMachine::dispatch_exec(Branch& b, Request req, int64_t now_ms) {
  const BranchState s = b.state;
  if (s == BranchState::active) {
    b.last_activity_ms = now_ms;
    if (req.prepare) {
      b.protocol = req.protocol;
      b.peers = req.peers;
      if (record_three_pc_first(b, req)) return;
    }
    PgOp op;
    op.kind = OpKind::exec;
    op.then_prepare = req.prepare;
    op.then_commit = req.one_phase;
    op.statements = std::move(req.statements);  // the reply does not need them
    start_op(b, std::move(req), std::move(op));
  } else if (s == BranchState::failed) {
    reply_error(req,
                conflict("branch " + b.gid + " failed earlier (sqlstate " + b.sqlstate +
                         "); it can only abort"),
                &b);
  } else {
    reply_error(req,
                conflict("branch " + b.gid + " is " + std::string(external_state_name(s)) +
                         "; statements run only while it is active"),
                &b);
  }
}

void AgentMachine::dispatch_prepare(Branch& b, Request req) {
  const BranchState s = b.state;
  if (s == BranchState::active) {
    b.protocol = req.protocol;
    b.peers = req.peers;
    if (record_three_pc_first(b, req)) return;
    PgOp op;
    op.kind = OpKind::prepare;
    start_op(b, std::move(req), std::move(op));
  } else if (s == BranchState::failed) {
    PgOp op;
    op.kind = OpKind::rollback;
    start_op(b, std::move(req), std::move(op));
  } else {
    reply_vote(b, req);
  }
}

void AgentMachine::dispatch_precommit(Branch& b, Request req) {
  const BranchState s = b.state;
  if (s == BranchState::prepared) {
    b.protocol = Protocol::three_phase;
    PgOp op;
    op.kind = OpKind::put_state;
    op.state = std::string(pg::three_pc_record_text(pg::ThreePcRecord::precommitted));
    op.peers = b.peers;
    start_op(b, std::move(req), std::move(op));
  } else if (s == BranchState::precommitted || s == BranchState::committed) {
    reply_state(b, req, false);
  } else if (s == BranchState::aborted) {
    reply_state(b, req, true);
  } else {
    reply_error(req,
                conflict("branch " + b.gid + " is " + std::string(external_state_name(s)) +
                         "; only a prepared branch pre-commits"),
                &b);
  }
}

void AgentMachine::dispatch_commit(Branch& b, Request req) {
  const BranchState s = b.state;
  const bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  if (prepared) {
    PgOp op;
    op.kind = OpKind::commit_prepared;
    op.clear_state = pg::parse_three_pc_record(b.recorded).has_value();
    start_op(b, std::move(req), std::move(op));
  } else if (req.one_phase && s == BranchState::active) {
    PgOp op;
    op.kind = OpKind::commit_one_phase;
    start_op(b, std::move(req), std::move(op));
  } else if (req.one_phase && s == BranchState::failed) {
    PgOp op;
    op.kind = OpKind::rollback;
    start_op(b, std::move(req), std::move(op));
  } else if (s == BranchState::committed || s == BranchState::read_only) {
    reply_state(b, req, false);
  } else if (s == BranchState::aborted) {
    reply_state(b, req, true);
  } else {
    reply_error(req, conflict("branch " + b.gid + " is active; it must be prepared first"), &b);
  }
}

void AgentMachine::dispatch_abort(Branch& b, Request req) {
  const BranchState s = b.state;
  const bool in_session = b.state == BranchState::active || b.state == BranchState::failed;
  const bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  PgOp op;
  if (in_session) {
    op.kind = OpKind::rollback;
    start_op(b, std::move(req), std::move(op));
  } else if (prepared) {
    op.kind = OpKind::rollback_prepared;
    op.clear_state = pg::parse_three_pc_record(b.recorded).has_value();
    start_op(b, std::move(req), std::move(op));
  } else if (s == BranchState::committed) {
    reply_state(b, req, true);
  } else {
    reply_state(b, req, false);
  }
}

void AgentMachine::dispatch_resolve(Branch& b, Request req) {
  const BranchState s = b.state;
  const bool in_session = b.state == BranchState::active || b.state == BranchState::failed;
  const bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  PgOp op;
  if (prepared) {
    resolve_prepared(b, std::move(req));
  } else if (in_session && !req.commit) {
    op.kind = OpKind::rollback;
    start_op(b, std::move(req), std::move(op));
  } else {
    bool done_commit = s == BranchState::committed || s == BranchState::read_only;
    bool done_abort = s == BranchState::aborted;
    bool match = req.commit ? done_commit : done_abort;
    if (match)
      reply_state(b, req, false);
    else
      reply_error(req,
                  conflict("branch " + b.gid + " is " + std::string(external_state_name(s)) +
                           "; cannot resolve it to " + (req.commit ? "commit" : "abort")),
                  &b);
  }
}

void AgentMachine::dispatch_record(Branch& b, Request req) {
  std::string want = desired_record(b);
  if (want == b.recorded) return;
  PgOp op;
  if (want.empty()) {
    op.kind = OpKind::delete_state;
  } else {
    op.kind = OpKind::put_state;
    op.state = want;
    op.detail = b.check_detail;
  }
  req.detail = std::move(want);
  start_op(b, std::move(req), std::move(op));
}

void AgentMachine::dispatch_forget(Branch& b, Request req, int64_t now_ms) {
  const BranchState s = b.state;
  bool outcome_kept = b.check != Check::none || b.heuristic || b.unilateral || b.report_pending;
  if (!final_state(s) || !outcome_kept) {
    reply_error(req,
                conflict("branch " + b.gid + " is " + std::string(external_state_name(s)) +
                         " with no heuristic outcome to forget"),
                &b);
    return;
  }
  if (b.recorded.empty()) {
    apply_forget(b, now_ms);
    reply_state(b, req, false);
    return;
  }
  PgOp op;
  op.kind = OpKind::delete_state;
  start_op(b, std::move(req), std::move(op));
}

// A decision taken here (an operator's resolve, or 3PC deciding alone) is recorded before it
// is carried out: a crash in between finishes it at the next start, and the record keeps it
// checked against the coordinator until they agree or an operator forgets it.
void AgentMachine::resolve_prepared(Branch& b, Request req) {
  std::string intent = check_record_state(Check::unchecked, !req.alone, req.commit);
  if (b.recorded != intent) {
    PgOp op;
    op.kind = OpKind::put_state;
    op.state = intent;
    op.detail = req.alone ? "3PC decided without the coordinator: " + req.detail
                          : std::string("resolved by an operator");
    start_op(b, std::move(req), std::move(op));
    return;
  }
  if (req.alone) {
    b.unilateral = true;
  } else {
    b.heuristic = true;
    log_.warn("branch resolved by operator",
              {{"gid", b.gid}, {"outcome", req.commit ? "commit" : "abort"}});
  }
  PgOp op;
  op.kind = req.commit ? OpKind::commit_prepared : OpKind::rollback_prepared;
  start_op(b, std::move(req), std::move(op));
}

void AgentMachine::apply_forget(Branch& b, int64_t now_ms) {
  log_.warn(
      "heuristic outcome forgotten by an operator",
      {{"gid", b.gid}, {"state", branch_state_name(b.state)}, {"check", check_name(b.check)}});
  b.heuristic = false;
  b.unilateral = false;
  b.report_pending = false;
  b.check_detail.clear();
  set_check(b, Check::none, now_ms);
}

// --- completions ---------------------------------------------------------------------------

void AgentMachine::on_enlisted(std::string_view gid, Status status, int64_t branch_timeout_ms,
                               int64_t now_ms) {
  Branch* b = find(gid);
  if (!b || b->state != BranchState::enlisting) return;
  b->busy = false;
  if (status.ok()) {
    set_state(*b, BranchState::active, now_ms);
    b->idle_deadline_ms =
        now_ms + (branch_timeout_ms > 0 ? branch_timeout_ms + 1'000 : opts_.idle_timeout_ms);
    pump(*b, now_ms);
    return;
  }
  if (status.code() == Code::conflict || status.code() == Code::not_found) {
    b->reason = "the coordinator refused the branch: " + status.message();
    set_state(*b, BranchState::aborted, now_ms);
    while (!b->queue.empty()) {
      Request req = std::move(b->queue.front());
      b->queue.pop_front();
      reply_error(req, conflict(b->reason), b);
    }
    evict_finished();
    return;
  }
  // The coordinator could not be reached: forget the branch so a retry enlists again.
  while (!b->queue.empty()) {
    Request req = std::move(b->queue.front());
    b->queue.pop_front();
    reply_error(req, unavailable("cannot enlist with the coordinator: " + status.message()));
  }
  set_state(*b, BranchState::unknown, now_ms);
  erase_branch(std::string(gid));
}

void AgentMachine::on_op_done(std::string_view gid, OpKind kind, OpResult result, int64_t now_ms) {
  TPC_ASSERT_MSG(kind != OpKind::step, "a step's op ends in on_step_done");
  Branch* b = find(gid);
  if (!b || !b->busy) return;
  TPC_ASSERT(b->current_op == kind);
  b->busy = false;
  b->cancel_sent = false;
  finish_op(*b, kind, result, now_ms);
  pump(*b, now_ms);
}

void AgentMachine::apply_vote(Branch& b, const OpResult& res, int64_t now_ms) {
  if (res.status.ok() && res.prepare) {
    const pg::PrepareResult& p = *res.prepare;
    switch (p.vote) {
      case pg::Vote::yes:
        ++counters_.prepared;
        set_state(b, BranchState::prepared, now_ms);
        return;
      case pg::Vote::read_only:
        ++counters_.read_only;
        set_state(b, BranchState::read_only, now_ms);
        persist_check(b);  // a 3PC record has no use any more
        return;
      case pg::Vote::no:
        b.reason = p.reason;
        b.sqlstate = p.sqlstate;
        break;
    }
  } else {
    // The connection broke: PREPARE may or may not have happened. Vote no; if it did, the
    // in-doubt scan finds it prepared while we say aborted, and rolls it back. A 3PC record
    // stays for that scan (the stale-record purge removes it otherwise).
    b.reason = "lost the PostgreSQL session during prepare: " + res.status.message();
    b.recorded.clear();
  }
  ++counters_.votes_no;
  set_state(b, BranchState::aborted, now_ms);
  persist_check(b);  // a 3PC record has no use any more
}

void AgentMachine::finish_op(Branch& b, OpKind kind, OpResult& res, int64_t now_ms) {
  TPC_ASSERT(b.has_current);
  Request req = std::move(b.current);
  b.has_current = false;
  switch (kind) {
    case OpKind::evidence: return evidence_done(b, std::move(req), res, now_ms);
    case OpKind::exec: return exec_done(b, std::move(req), res, now_ms);
    case OpKind::prepare:
      apply_vote(b, res, now_ms);
      reply_vote(b, req);
      return;
    case OpKind::commit_one_phase: return one_phase_done(b, std::move(req), res, now_ms);
    case OpKind::rollback: return rollback_done(b, std::move(req), now_ms);
    case OpKind::commit_prepared:
    case OpKind::rollback_prepared:
      if (req.kind == RequestKind::exec)  // exec+prepare whose results broke the row limit
        return rollback_done(b, std::move(req), now_ms);
      return prepared_done(b, kind, std::move(req), res, now_ms);
    case OpKind::tombstone: return tombstone_done(b, std::move(req), res, now_ms);
    case OpKind::put_state:
    case OpKind::delete_state: return record_done(b, kind, std::move(req), res, now_ms);
    case OpKind::step: TPC_ASSERT_MSG(false, "a step's op ends in on_step_done");
  }
}

// Learned what PostgreSQL holds for the branch; the request runs again with it.
void AgentMachine::evidence_done(Branch& b, Request req, const OpResult& res, int64_t now_ms) {
  const Status& st = res.status;
  if (!st.ok() || !res.evidence) {
    reply_error(req,
                unavailable("cannot read the branch's state from PostgreSQL: " + st.message()));
    return;
  }
  BranchState before = b.state;
  switch (*res.evidence) {
    case pg::Evidence::prepared:
      if (before != BranchState::prepared && before != BranchState::precommitted) {
        b.recovered = true;
        set_state(b, BranchState::prepared, now_ms);
      }
      break;
    case pg::Evidence::committed: set_state(b, BranchState::committed, now_ms); break;
    case pg::Evidence::absent:
      if (before == BranchState::unknown && req.kind == RequestKind::commit && req.one_phase) {
        // A resent one-phase commit for a branch we never saw: its statements may still be
        // on their way. Make "aborted" durable before saying it.
        PgOp op;
        op.kind = OpKind::tombstone;
        start_op(b, std::move(req), std::move(op));
        return;
      }
      if (before == BranchState::unknown) b.reason = "no prepared transaction and no marker";
      set_state(b, BranchState::aborted, now_ms);
      break;
  }
  if ((before == BranchState::prepared || before == BranchState::precommitted) &&
      b.state != before && b.state != BranchState::prepared) {
    b.heuristic = true;
    b.check_detail = "finished outside the agent";
    log_.warn("prepared branch finished outside the agent",
              {{"gid", b.gid}, {"now", branch_state_name(b.state)}});
    set_check(b, Check::unchecked, now_ms);
  }
  if (req.kind != RequestKind::status || req.id != 0) b.queue.push_front(std::move(req));
}

// Rows past result_rows_max: a branch that committed keeps its outcome and its results are
// cut; otherwise the statement fails (54000), so the branch votes no. True when the branch
// already prepared, so its prepared transaction must be rolled back.
bool AgentMachine::over_row_limit(const Request& req, OpResult& res) const {
  if (!res.status.ok() || !res.results) return false;
  for (size_t i = 0; i < res.results->size(); ++i) {
    pg::StatementResult& r = (*res.results)[i];
    if (r.rows.size() <= opts_.result_rows_max) continue;
    if (req.one_phase) {
      r.rows.resize(opts_.result_rows_max);
      r.truncated = true;
      continue;
    }
    bool prepared = req.prepare && res.prepare && res.prepare->vote == pg::Vote::yes;
    res.status =
        Status(Code::sql_error, "statement " + std::to_string(i + 1) + " returned " +
                                    std::to_string(r.rows.size()) + " rows; the limit is " +
                                    std::to_string(opts_.result_rows_max));
    res.sqlstate = std::string(pg::kTooManyRowsSqlstate);
    res.prepare.reset();
    return prepared;
  }
  return false;
}

void AgentMachine::exec_done(Branch& b, Request req, OpResult& res, int64_t now_ms) {
  const bool undo_prepare = over_row_limit(req, res);
  const Status& st = res.status;
  if (st.ok() && req.one_phase) {  // statements, then a one-phase commit
    Reply r;
    r.results = res.results;
    ++counters_.one_phase;
    if (res.outcome && *res.outcome == pg::Outcome::committed) {
      ++counters_.committed;
      set_state(b, BranchState::committed, now_ms);
    } else {
      ++counters_.aborted;
      b.reason = res.reason;
      set_state(b, BranchState::aborted, now_ms);
      r.contrary = true;
      r.reason = b.reason;
    }
    r.state = b.state;
    reply(req, std::move(r));
    return;
  }
  if (st.ok()) {
    b.last_activity_ms = now_ms;
    Reply r;
    r.results = res.results;
    if (req.prepare) {
      apply_vote(b, res, now_ms);
      r.vote = b.state == BranchState::prepared    ? pg::Vote::yes
               : b.state == BranchState::read_only ? pg::Vote::read_only
                                                   : pg::Vote::no;
      if (*r.vote == pg::Vote::no) {
        r.reason = b.reason;
        r.sqlstate = b.sqlstate;
      }
    }
    r.state = b.state;
    reply(req, std::move(r));
    return;
  }
  if (st.code() == Code::sql_error) {
    b.reason = st.message();
    b.sqlstate = res.sqlstate;
    set_state(b, BranchState::failed, now_ms);
    if (req.prepare || req.one_phase) {
      // exec+prepare votes no, exec+commit aborts: roll back before answering.
      PgOp op;
      op.kind = undo_prepare ? OpKind::rollback_prepared : OpKind::rollback;
      start_op(b, std::move(req), std::move(op));
      return;
    }
    Reply r;
    r.error = Status(Code::sql_error, st.message());
    r.state = b.state;
    r.sqlstate = res.sqlstate;
    reply(req, std::move(r));
    return;
  }
  if (req.one_phase) {
    // The connection broke: the statements and COMMIT may or may not have run (the
    // executor cannot tell where it broke). The marker tells on the next request; never
    // answer aborted here.
    set_state(b, BranchState::unknown, now_ms);
    reply_error(req, unavailable("lost the PostgreSQL session during commit: " + st.message()));
    return;
  }
  b.reason = "lost the PostgreSQL session: " + st.message();
  set_state(b, BranchState::aborted, now_ms);
  reply_error(req, unavailable(b.reason), &b);
}

void AgentMachine::one_phase_done(Branch& b, Request req, const OpResult& res, int64_t now_ms) {
  const Status& st = res.status;
  if (st.ok() && res.outcome) {
    ++counters_.one_phase;
    if (*res.outcome == pg::Outcome::committed) {
      ++counters_.committed;
      set_state(b, BranchState::committed, now_ms);
      reply_state(b, req, false);
    } else {
      ++counters_.aborted;
      b.reason = res.reason;
      set_state(b, BranchState::aborted, now_ms);
      reply_state(b, req, true);
    }
    return;
  }
  // COMMIT may or may not have happened; the marker tells on the next request.
  set_state(b, BranchState::unknown, now_ms);
  reply_error(req, unavailable("lost the PostgreSQL session during commit: " + st.message()));
}

void AgentMachine::rollback_done(Branch& b, Request req, int64_t now_ms) {
  if (b.reason.empty()) b.reason = "rolled back";
  ++counters_.aborted;
  set_state(b, BranchState::aborted, now_ms);
  switch (req.kind) {
    case RequestKind::exec: {  // exec+prepare or exec+commit whose statements failed
      Reply r;
      r.error = Status(Code::sql_error, b.reason);
      r.state = b.state;
      r.sqlstate = b.sqlstate;
      if (req.prepare) r.vote = pg::Vote::no;
      reply(req, std::move(r));
      return;
    }
    case RequestKind::prepare:
      ++counters_.votes_no;
      reply_vote(b, req);
      return;
    case RequestKind::commit: reply_state(b, req, true); return;
    default: reply_state(b, req, false); return;
  }
}

void AgentMachine::prepared_done(Branch& b, OpKind kind, Request req, const OpResult& res,
                                 int64_t now_ms) {
  const Status& st = res.status;
  if (!st.ok() || !res.outcome) {
    reply_error(req,
                unavailable("PostgreSQL did not finish the prepared transaction: " + st.message()),
                &b);
    return;
  }
  if (pg::parse_three_pc_record(b.recorded)) b.recorded.clear();  // the op cleared it
  bool wanted_commit = kind == OpKind::commit_prepared;
  bool committed = *res.outcome == pg::Outcome::committed;
  if (committed) {
    ++counters_.committed;
    set_state(b, BranchState::committed, now_ms);
  } else {
    ++counters_.aborted;
    set_state(b, BranchState::aborted, now_ms);
  }
  if (req.kind == RequestKind::resolve) {
    // Decided here: checked against the coordinator from now on.
    if (committed != wanted_commit)
      log_.error("the branch had already ended the other way", {{"gid", b.gid}});
    set_check(b, Check::unchecked, now_ms);
    reply_state(b, req, committed != wanted_commit);
    return;
  }
  if (committed != wanted_commit) {
    // The coordinator's outcome (or the one it answered us) meets a branch that ended the
    // other way. A request from the coordinator learns it from our answer; an outcome we
    // asked for does not, so it is reported.
    b.heuristic = true;
    ++counters_.heuristic_mismatch;
    log_.error(committed ? "heuristic outcome: asked to abort a branch that had committed"
                         : "heuristic outcome: asked to commit a branch that had been rolled back",
               {{"gid", b.gid}});
    set_check(b, req.id != 0 ? Check::reported : Check::mismatch, now_ms);
  }
  correct_coordinator(b, now_ms);
  reply_state(b, req, committed != wanted_commit);
}

void AgentMachine::tombstone_done(Branch& b, Request req, const OpResult& res, int64_t now_ms) {
  const Status& st = res.status;
  if (!st.ok() || !res.outcome) {
    reply_error(req, unavailable("cannot record the branch as aborted: " + st.message()));
    return;
  }
  b.reason = "no prepared transaction and no marker";
  set_state(b,
            *res.outcome == pg::Outcome::committed ? BranchState::committed : BranchState::aborted,
            now_ms);
  b.queue.push_front(std::move(req));
}

// A tpc_agent_state row written (put_state) or removed (delete_state).
void AgentMachine::record_done(Branch& b, OpKind kind, Request req, const OpResult& res,
                               int64_t now_ms) {
  const Status& st = res.status;
  if (kind == OpKind::put_state) {
    if (req.kind == RequestKind::prepare || req.kind == RequestKind::exec) {
      if (st.ok()) {
        b.recorded = pg::three_pc_record_text(pg::ThreePcRecord::prepared3);
        b.queue.push_front(std::move(req));  // now prepare
        return;
      }
      // Without the record the branch cannot prepare: it votes no.
      b.reason = "cannot record the 3PC state: " + st.message();
      PgOp op;
      op.kind = OpKind::rollback;
      start_op(b, std::move(req), std::move(op));
      return;
    }
    if (req.kind == RequestKind::precommit) {
      if (st.ok()) {
        b.recorded = pg::three_pc_record_text(pg::ThreePcRecord::precommitted);
        set_state(b, BranchState::precommitted, now_ms);
        reply_state(b, req, false);
      } else {
        reply_error(req, unavailable("cannot record the pre-commit: " + st.message()), &b);
      }
      return;
    }
    if (req.kind == RequestKind::resolve) {
      if (!st.ok()) {
        reply_error(
            req, unavailable("cannot record the decision, so nothing was changed: " + st.message()),
            &b);
        return;
      }
      b.recorded = check_record_state(Check::unchecked, !req.alone, req.commit);
      b.check_detail = req.alone ? "3PC decided without the coordinator: " + req.detail
                                 : std::string("resolved by an operator");
      b.queue.push_front(std::move(req));  // now carry it out
      return;
    }
  }
  if (!st.ok()) {
    log_.warn("cannot write the branch's decision record; retrying",
              {{"gid", b.gid}, {"error", st.message()}});
    b.next_record_ms = now_ms + opts_.ask_min_ms;
    reply_error(req, unavailable("cannot write the branch's decision record: " + st.message()), &b);
    track_live(b);
    return;
  }
  b.recorded = kind == OpKind::delete_state ? std::string() : req.detail;
  if (req.kind == RequestKind::forget) {
    apply_forget(b, now_ms);
    reply_state(b, req, false);
    return;
  }
  persist_check(b);  // the check moved on while this was written
  track_live(b);
}

// The coordinator's view listed this branch with another outcome (a misdirected agent once
// answered for it): tell it how the branch really ended.
void AgentMachine::correct_coordinator(Branch& b, int64_t now_ms) {
  std::optional<BranchState> said = std::exchange(b.coordinator_recorded, std::nullopt);
  if (!said || !final_state(*said) || *said == b.state || b.report_pending) return;
  log_.warn("the coordinator's record of this branch is wrong; reporting the true outcome",
            {{"gid", b.gid},
             {"recorded", branch_state_name(*said)},
             {"branch", branch_state_name(b.state)}});
  b.report_pending = true;
  b.next_report_ms = now_ms;
  track_live(b);
}

// --- in-doubt resolution -------------------------------------------------------------------

// The wait before the next attempt after `attempts` of them: ask_min_ms doubling up to ask_max_ms.
int64_t AgentMachine::backoff_ms(uint32_t attempts) const {
  int shift = static_cast<int>(std::min<uint32_t>(attempts > 0 ? attempts - 1 : 0, 16));
  return std::min(opts_.ask_max_ms, opts_.ask_min_ms << shift);
}

void AgentMachine::on_outcome(std::string_view gid, Outcome outcome, std::string_view answer,
                              int64_t now_ms, std::optional<BranchState> recorded) {
  Branch* bp = find(gid);
  if (!bp) return;
  Branch& b = *bp;
  b.asking = false;
  ++b.asks;
  b.last_answer = std::string(answer);
  b.next_ask_ms = now_ms + backoff_ms(b.asks);

  bool decided = outcome == Outcome::commit || outcome == Outcome::abort;
  if (final_state(b.state)) {
    if (b.check == Check::unchecked && decided) {
      check_against_coordinator(b, outcome == Outcome::commit, recorded && *recorded == b.state,
                                now_ms);
      pump(b, now_ms);
    }
    return;
  }
  if (b.busy) return;
  bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  if (!prepared) return;
  if (decided) b.coordinator_recorded = recorded;
  Request internal;
  switch (outcome) {
    case Outcome::commit:
    case Outcome::abort:
      ++counters_.resolved_by_query;
      log_.info("in-doubt branch resolved by the coordinator",
                {{"gid", b.gid}, {"outcome", outcome == Outcome::commit ? "commit" : "abort"}});
      internal.kind = outcome == Outcome::commit ? RequestKind::commit : RequestKind::abort;
      b.queue.push_back(internal);
      pump(b, now_ms);
      return;
    case Outcome::unreachable:
      if (b.protocol == Protocol::three_phase) {
        int64_t age = now_ms - b.prepared_ms;
        bool timed_out = (b.state == BranchState::prepared && age >= opts_.precommit_timeout_ms) ||
                         (b.state == BranchState::precommitted && age >= opts_.commit_timeout_ms);
        if (timed_out) {
          std::vector<Peer> peers = others(b);
          if (peers.empty()) {
            decided_alone(b, b.state == BranchState::precommitted, "no peers to ask", now_ms);
          } else if (!b.terminating) {
            // Ask the other branches first: one that moved on tells us the outcome.
            b.terminating = true;
            ready_.peer_queries.push_back(PeerQuery{b.gid, std::move(peers)});
          }
          return;
        }
      }
      [[fallthrough]];
    case Outcome::pending:
    case Outcome::unknown:
      log_.warn("in-doubt branch waits for the coordinator",
                {{"gid", b.gid}, {"answer", answer}, {"asks", b.asks},
                 {"age_ms", now_ms - b.prepared_ms}});
      return;
  }
}

std::vector<Peer> AgentMachine::others(const Branch& b) const {
  std::vector<Peer> out;
  for (auto& p : b.peers)
    if (p.participant != opts_.name) out.push_back(p);
  return out;
}

void AgentMachine::on_peer_states(std::string_view gid, std::vector<PeerAnswer> answers,
                                  int64_t now_ms) {
  Branch* bp = find(gid);
  if (!bp) return;
  Branch& b = *bp;
  b.terminating = false;
  if (b.busy || !b.queue.empty()) return;
  if (b.state != BranchState::prepared && b.state != BranchState::precommitted) return;
  bool any_commit = false, any_abort = false;
  std::string said;
  for (auto& a : answers) {
    if (!said.empty()) said += ",";
    said += a.participant + ":" + (a.state ? std::string(branch_state_name(*a.state)) : "unreachable");
    if (!a.state) continue;
    any_commit = any_commit || *a.state == BranchState::committed ||
                 *a.state == BranchState::precommitted;
    any_abort = any_abort || *a.state == BranchState::aborted;
  }
  bool commit = any_commit ? true : any_abort ? false : b.state == BranchState::precommitted;
  // A decision taken alone earlier and not carried out yet (PostgreSQL was down, say) is
  // changed only by a peer's outcome, never by silence: the peers that answered then may be
  // unreachable now, and what they said still holds.
  if (!any_commit && !any_abort && b.alone_commit) commit = *b.alone_commit;
  decided_alone(b, commit, "peers " + said, now_ms);
}

void AgentMachine::decided_alone(Branch& b, bool commit, std::string_view why, int64_t now_ms) {
  b.alone_commit = commit;
  b.unilateral = true;
  if (commit)
    ++counters_.unilateral_commits;
  else
    ++counters_.unilateral_aborts;
  log_.warn("3PC timeout with the coordinator unreachable: deciding without it",
            {{"gid", b.gid},
             {"state", branch_state_name(b.state)},
             {"outcome", commit ? "commit" : "abort"},
             {"why", why}});
  Request internal;
  internal.kind = RequestKind::resolve;
  internal.commit = commit;
  internal.alone = true;
  internal.detail = std::string(why);
  b.queue.push_back(internal);
  pump(b, now_ms);
}

// A branch decided here meets the coordinator's outcome. coordinator_knows: the coordinator
// already holds this branch's true outcome (it sent the request we answer, or its view lists
// it), so nothing needs reporting.
void AgentMachine::check_against_coordinator(Branch& b, bool coordinator_commits,
                                             bool coordinator_knows, int64_t now_ms) {
  bool ours = b.state == BranchState::committed;
  if (ours == coordinator_commits) {
    log_.info("a decision taken here matches the coordinator's", {{"gid", b.gid}});
    set_check(b, Check::none, now_ms);
    return;
  }
  b.heuristic = true;
  ++counters_.heuristic_mismatch;
  log_.error("heuristic outcome: the branch was decided here against the coordinator",
             {{"gid", b.gid},
              {"branch", ours ? "committed" : "aborted"},
              {"coordinator", coordinator_commits ? "commit" : "abort"},
              {"decided_by", b.check_detail}});
  set_check(b, coordinator_knows ? Check::reported : Check::mismatch, now_ms);
}

void AgentMachine::on_reported(std::string_view gid, Status status, int64_t now_ms) {
  Branch* bp = find(gid);
  if (!bp || !bp->reporting) return;
  Branch& b = *bp;
  b.reporting = false;
  ++b.reports;
  bool settled =
      status.ok() || status.code() == Code::not_found || status.code() == Code::invalid_argument;
  if (!settled) {
    b.next_report_ms = now_ms + backoff_ms(b.reports);
    log_.warn("cannot report the branch's outcome to the coordinator yet",
              {{"gid", b.gid}, {"error", status.to_string()}, {"reports", b.reports}});
    return;
  }
  if (status.ok()) {
    ++counters_.reports_sent;
    log_.info("the coordinator recorded the branch's outcome", {{"gid", b.gid}});
  } else {
    log_.warn("the coordinator cannot record the branch's outcome",
              {{"gid", b.gid}, {"error", status.to_string()}});
  }
  b.report_pending = false;
  if (b.check == Check::mismatch)
    set_check(b, Check::reported, now_ms);
  else
    track_live(b);
  pump(b, now_ms);
}

void AgentMachine::on_scan(std::vector<ScanEntry> prepared, int64_t started_ms, int64_t now_ms,
                           std::vector<DecidedEntry> decided) {
  std::set<std::string> seen;
  for (auto& e : prepared) {
    seen.insert(e.gid);
    Branch* b = find(e.gid);
    auto three_pc = e.durable_state ? pg::parse_three_pc_record(*e.durable_state) : std::nullopt;
    bool precommitted = three_pc == pg::ThreePcRecord::precommitted;
    bool three = three_pc.has_value();
    if (!b) {
      Branch& nb = create(e.gid, precommitted ? BranchState::precommitted : BranchState::prepared,
                          now_ms);
      nb.recovered = true;
      nb.protocol = three ? Protocol::three_phase : Protocol::two_phase;
      if (three) nb.recorded = *e.durable_state;
      nb.peers = e.peers;
      nb.prepared_ms = now_ms - e.age_ms;
      log_.info("found prepared branch", {{"gid", nb.gid},
                                          {"state", branch_state_name(nb.state)},
                                          {"age_ms", e.age_ms}});
      if (auto rec = e.durable_state ? parse_check_record(*e.durable_state) : std::nullopt;
          rec && rec->check == Check::unchecked) {
        // Decided here and recorded, then stopped before carrying it out: carry it out now.
        nb.recorded = *e.durable_state;
        Request internal;
        internal.kind = RequestKind::resolve;
        internal.commit = rec->committed;
        internal.alone = !rec->operator_decision;
        internal.detail = "recorded before a restart";
        log_.warn("finishing a decision recorded before the restart",
                  {{"gid", nb.gid}, {"record", *e.durable_state}});
        nb.queue.push_back(internal);
        pump(nb, now_ms);
      }
      continue;
    }
    if (b->busy || !b->queue.empty()) continue;
    if (b->state == BranchState::committed || b->state == BranchState::aborted) {
      // PostgreSQL still holds it prepared while we remember an outcome: finish it that way.
      bool commit = b->state == BranchState::committed;
      log_.warn("prepared transaction outlived its outcome; finishing it",
                {{"gid", b->gid}, {"outcome", commit ? "commit" : "abort"}});
      set_state(*b, BranchState::prepared, now_ms);
      Request internal;
      internal.kind = commit ? RequestKind::commit : RequestKind::abort;
      b->queue.push_back(internal);
      pump(*b, now_ms);
    }
  }
  for (auto& d : decided) load_decided(d, now_ms);
  std::vector<std::string> verify;
  for (const std::string& gid : live_) {
    auto it = branches_.find(gid);
    if (it == branches_.end()) continue;
    const Branch& b = it->second;
    if (b.busy || !b.queue.empty() || seen.count(gid)) continue;
    if ((b.state == BranchState::prepared || b.state == BranchState::precommitted) &&
        b.prepared_ms < started_ms)
      verify.push_back(gid);
  }
  for (auto& gid : verify) {
    Request internal;
    internal.kind = RequestKind::status;
    Branch* b = find(gid);
    b->queue.push_back(internal);
    pump(*b, now_ms);
  }
}

// A decision taken here that is still checked, reported or kept for an operator, from its
// record (after a restart). A branch in memory knows more than its record.
void AgentMachine::load_decided(const DecidedEntry& d, int64_t now_ms) {
  if (find(d.gid) || d.record.check == Check::none) return;
  Branch& b =
      create(d.gid, d.record.committed ? BranchState::committed : BranchState::aborted, now_ms);
  b.recovered = true;
  b.recorded = check_record_state(d.record.check, d.record.operator_decision, d.record.committed);
  b.check_detail = d.detail;
  b.heuristic = d.record.operator_decision || d.record.check != Check::unchecked;
  b.unilateral = !d.record.operator_decision;
  log_.warn("found a branch decided here, not yet settled with the coordinator",
            {{"gid", b.gid}, {"record", b.recorded}, {"detail", d.detail}});
  set_check(b, d.record.check, now_ms);
}

void AgentMachine::tick(int64_t now_ms) {
  std::vector<std::string> idle, rewrite;
  for (const std::string& gid : live_) {
    auto it = branches_.find(gid);
    if (it == branches_.end()) continue;
    Branch& b = it->second;
    if (b.busy && b.current_op == OpKind::exec && b.idle_deadline_ms > 0 &&
        now_ms >= b.idle_deadline_ms)
      cancel_running(b, "past its transaction timeout");
    if (b.busy || !b.queue.empty()) continue;
    switch (b.state) {
      case BranchState::active:
      case BranchState::failed:
        if (b.idle_deadline_ms > 0 && now_ms >= b.idle_deadline_ms) idle.push_back(gid);
        break;
      case BranchState::prepared:
      case BranchState::precommitted: {
        if (b.asking || now_ms < b.next_ask_ms) break;
        int64_t age = now_ms - b.prepared_ms;
        int64_t after = b.protocol == Protocol::two_phase  ? opts_.in_doubt_after_ms
                        : b.state == BranchState::prepared ? opts_.precommit_timeout_ms
                                                           : opts_.commit_timeout_ms;
        if (age >= after || b.ask_now) {
          b.asking = true;
          b.ask_now = false;
          ready_.asks.push_back(gid);
        }
        break;
      }
      case BranchState::committed:
      case BranchState::aborted:
      case BranchState::read_only:
        if (b.check == Check::unchecked && !b.asking && now_ms >= b.next_ask_ms) {
          b.asking = true;
          ready_.asks.push_back(gid);
        }
        if (b.report_pending && !b.reporting && now_ms >= b.next_report_ms) {
          b.reporting = true;
          ready_.reports.push_back(Report{gid, b.state == BranchState::committed});
        }
        if (desired_record(b) != b.recorded && now_ms >= b.next_record_ms) rewrite.push_back(gid);
        break;
      default: break;
    }
  }
  for (auto& gid : rewrite) {
    Branch* b = find(gid);
    persist_check(*b);
    pump(*b, now_ms);
  }
  for (auto& gid : idle) {
    Branch* b = find(gid);
    ++counters_.idle_rollbacks;
    b->reason = "idle past its transaction timeout";
    log_.warn("rolling back an idle branch", {{"gid", gid}});
    Request internal;
    internal.kind = RequestKind::abort;
    b->queue.push_back(internal);
    pump(*b, now_ms);
  }
}

void AgentMachine::evict_finished() {
  while (finished_.size() > opts_.finished_kept_max) {
    auto it = finished_.begin();
    Branch* b = find(it->second);
    if (b && (b->busy || !b->queue.empty())) break;
    std::string gid = it->second;
    finished_.erase(it);
    if (b && !pinned(*b)) erase_branch(gid);  // a pinned one comes back once unpinned
  }
}

Ready AgentMachine::take_ready() {
  Ready r = std::move(ready_);
  ready_ = Ready{};
  return r;
}

// --- views ---------------------------------------------------------------------------------

int64_t AgentMachine::timeout_for(const Branch& b) const {
  switch (b.state) {
    case BranchState::active:
    case BranchState::failed: return b.idle_deadline_ms > 0 ? b.idle_deadline_ms - b.created_ms : 0;
    case BranchState::prepared:
      return b.protocol == Protocol::three_phase ? opts_.precommit_timeout_ms
                                                 : opts_.in_doubt_after_ms;
    case BranchState::precommitted: return opts_.commit_timeout_ms;
    default: return 0;
  }
}

BranchView AgentMachine::view_of(const Branch& b, int64_t now_ms) const {
  BranchView v;
  v.gid = b.gid;
  v.state = b.state;
  v.protocol = b.protocol;
  v.recovered = b.recovered;
  v.unilateral = b.unilateral;
  v.heuristic = b.heuristic;
  v.check = b.check;
  v.report_pending = b.report_pending;
  v.busy = b.busy;
  bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
  v.age_ms = now_ms - (prepared ? b.prepared_ms : b.created_ms);
  v.asks = b.asks;
  v.last_answer = b.last_answer;
  v.reason = b.reason;
  v.sqlstate = b.sqlstate;
  v.timeout_ms = timeout_for(b);
  return v;
}

std::optional<BranchView> AgentMachine::view(std::string_view gid, int64_t now_ms) const {
  const Branch* b = find(gid);
  if (!b || b->state == BranchState::unknown) return std::nullopt;
  return view_of(*b, now_ms);
}

std::vector<BranchView> AgentMachine::list(std::optional<BranchState> state, size_t limit,
                                           int64_t now_ms) const {
  // Pointers first, and only `limit` of them ordered: the table may hold 100k finished
  // branches, and this runs under the driver's lock.
  std::vector<const Branch*> picked;
  for (auto& [gid, b] : branches_) {
    if (b.state == BranchState::unknown) continue;
    BranchState ext = b.state == BranchState::enlisting || b.state == BranchState::failed
                          ? BranchState::active
                          : b.state;
    if (state && ext != *state) continue;
    picked.push_back(&b);
  }
  size_t n = std::min(limit, picked.size());
  std::partial_sort(picked.begin(), picked.begin() + static_cast<std::ptrdiff_t>(n), picked.end(),
                    [](const Branch* a, const Branch* b) { return a->serial > b->serial; });
  std::vector<BranchView> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(view_of(*picked[i], now_ms));
  return out;
}

std::vector<BranchView> AgentMachine::in_doubt(int64_t now_ms) const {
  std::vector<BranchView> out;
  for (auto& [gid, b] : branches_) {
    bool prepared = b.state == BranchState::prepared || b.state == BranchState::precommitted;
    if (prepared && now_ms - b.prepared_ms >= opts_.in_doubt_after_ms)
      out.push_back(view_of(b, now_ms));
    else if (b.check != Check::none || b.report_pending)
      out.push_back(view_of(b, now_ms));
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.age_ms > b.age_ms; });
  return out;
}

size_t AgentMachine::prepared_count() const {
  size_t n = 0;
  for (const std::string& gid : live_) {
    const Branch* b = find(gid);
    n += b && (b->state == BranchState::prepared || b->state == BranchState::precommitted);
  }
  return n;
}

int64_t AgentMachine::oldest_prepared_age_ms(int64_t now_ms) const {
  int64_t oldest = 0;
  for (const std::string& gid : live_) {
    const Branch* b = find(gid);
    if (b && (b->state == BranchState::prepared || b->state == BranchState::precommitted))
      oldest = std::max(oldest, now_ms - b->prepared_ms);
  }
  return oldest;
}

}  // namespace tpc::agent
