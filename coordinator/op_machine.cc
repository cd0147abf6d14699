// TCC and saga on the coordinator's engine (docs/DESIGN.md §9): the same transactions table,
// decision log, timers, waiters and views as 2PC/3PC; branches and steps are called through
// ops (OpCall / OpReply) instead of protocol messages.
//
// Writes: every record of a TCC or saga transaction carries a sequence number (Persist::seq);
// a synced one, once durable, makes every earlier one durable too (the log is one ordered
// queue), so `durable_seq` is all the machine needs to know what is safe to send:
//   - a try only once the record that registered its branch is durable;
//   - a saga's first action only once the saga (its steps and payloads) is durable;
//   - a confirm only once the confirm decision is durable, a compensation only once the
//     compensate decision is.
#include <algorithm>

#include "coordinator/coordinator_machine.h"
#include "coordinator/op_slot.h"
#include "coordinator/op_spec.h"

namespace tpc::coord {
namespace {

// A try whose answer stays unknown this many times aborts its TCC transaction.
constexpr uint32_t kTryAttemptsMax = 3;

// The op a branch, step or message slot in its state waits on the answer of.
std::optional<StepOp> awaited_op(const BranchSlot& b) {
  switch (b.state) {
    case BranchState::trying: return StepOp::try_op;
    case BranchState::confirming: return StepOp::confirm;
    case BranchState::cancelling: return StepOp::cancel;
    case BranchState::running:
      return op_of(b, StepOp::local) != nullptr ? StepOp::local : StepOp::action;
    case BranchState::compensating: return StepOp::compensate;
    case BranchState::checking: return StepOp::check;
    case BranchState::delivering:
      return op_of(b, StepOp::notify) != nullptr ? StepOp::notify : StepOp::deliver;
    default: return std::nullopt;
  }
}

BranchState state_while(StepOp op) {
  switch (op) {
    case StepOp::try_op: return BranchState::trying;
    case StepOp::confirm: return BranchState::confirming;
    case StepOp::cancel: return BranchState::cancelling;
    case StepOp::compensate: return BranchState::compensating;
    case StepOp::check: return BranchState::checking;
    case StepOp::deliver:
    case StepOp::notify: return BranchState::delivering;
    default: return BranchState::running;  // action, local
  }
}

BranchState state_after(StepOp op) {
  switch (op) {
    case StepOp::try_op: return BranchState::tried;
    case StepOp::confirm: return BranchState::confirmed;
    case StepOp::cancel: return BranchState::cancelled;
    case StepOp::compensate: return BranchState::compensated;
    case StepOp::deliver:
    case StepOp::notify: return BranchState::delivered;
    default: return BranchState::done;  // action, local, check
  }
}

wal::BranchOutcome ops_outcome_of(const BranchSlot& b) {
  if (b.forced) return wal::BranchOutcome::forced;
  switch (b.state) {
    case BranchState::confirmed:
    case BranchState::delivered:
    case BranchState::done: return wal::BranchOutcome::committed;
    case BranchState::cancelled:
    case BranchState::compensated: return wal::BranchOutcome::aborted;
    default: return wal::BranchOutcome::pending;
  }
}

size_t slot_index(const Txn& t, std::string_view name) {
  size_t i = 0;
  while (i < t.branches.size() && t.branches[i].participant != name) ++i;
  return i;
}

// A saga step the compensation must undo: its action was sent (an earlier attempt that
// answered unknown may have applied it, even when a later one failed), and it has a
// compensation that has not succeeded yet.
bool needs_compensation(const BranchSlot& b) {
  return b.may_have_run && b.state != BranchState::compensated &&
         op_of(b, StepOp::compensate) != nullptr;
}

// Whether a saga step without compensation may have run: a backward saga then only goes
// forward (docs/DESIGN.md §9: such a step is the saga's last).
// A saga step logged pending may still have run: step progress is logged without a sync, so
// a running saga's record can lag behind what was sent, and an aborted saga's record may come
// from a run that had itself recovered from such a record. Only a step with a compensation
// (a pivot's running mark is synced before its action); compensating a step that never ran is
// empty.
bool may_have_run_unlogged(const wal::TxnRecord& rec, const BranchSlot& s) {
  return rec.protocol == Protocol::saga &&
         (rec.decision == wal::Decision::running || rec.decision == wal::Decision::aborted) &&
         op_of(s, StepOp::compensate) != nullptr;
}

// A TCC transaction or a message whose every branch or destination has its final answer, and
// none is out: maybe_finish_ops ends it now, and its end record carries the last progress.
bool settled_by_this_answer(const Txn& t) {
  if (t.protocol == Protocol::msg) return all_delivered(t) && t.decision_durable;
  if (t.protocol != Protocol::tcc || t.decision == Decision::none) return false;
  if (t.decision == Decision::commit && !t.decision_durable) return false;
  BranchState done =
      t.decision == Decision::commit ? BranchState::confirmed : BranchState::cancelled;
  return std::all_of(t.branches.begin(), t.branches.end(), [done](const BranchSlot& b) {
    return !b.in_flight && (b.forced || b.state == done);
  });
}

bool all_steps_done(const Txn& t) {
  return std::all_of(t.branches.begin(), t.branches.end(),
                     [](const BranchSlot& b) { return b.state == BranchState::done; });
}

bool pivot_may_have_run(const Txn& t) {
  return std::any_of(t.branches.begin(), t.branches.end(), [](const BranchSlot& b) {
    return b.may_have_run && op_of(b, StepOp::compensate) == nullptr;
  });
}

}  // namespace

// --- records -------------------------------------------------------------------------------

uint64_t CoordinatorMachine::persist_ops(Txn& t, bool sync, int64_t now_ms) {
  uint64_t seq = ++t.writes;
  wal::TxnRecord rec = record_of_ops(t, now_ms);
  if (rec.ended) notify_outcome(t, now_ms);  // its notification goes first
  ready_.persist.push_back(Persist{std::move(rec), sync, sync, seq});
  return seq;
}

wal::TxnRecord CoordinatorMachine::record_of_ops(const Txn& t, int64_t now_ms) const {
  wal::TxnRecord r;
  r.gid = t.gid;
  r.protocol = t.protocol;
  switch (t.decision) {
    case Decision::none:
      r.decision = t.protocol == Protocol::tcc   ? wal::Decision::registered
                   : t.protocol == Protocol::msg ? wal::Decision::half
                                                 : wal::Decision::running;
      break;
    case Decision::commit: r.decision = wal::Decision::commit; break;
    case Decision::abort: r.decision = wal::Decision::aborted; break;
  }
  // A saga's commit has nothing left to drive: its record is the end record.
  r.ended = terminal(t.state) || (t.protocol == Protocol::saga && t.decision == Decision::commit);
  r.decided_wall_ms = t.decided_ms;
  r.ended_wall_ms = r.ended ? now_ms : 0;
  for (auto& b : t.branches) {
    wal::BranchRecord br;
    br.participant = b.participant;
    br.outcome = ops_outcome_of(b);
    br.state = static_cast<uint8_t>(b.state);
    br.attempts = b.attempts;
    br.ops = b.ops;
    br.result = b.result;
    br.last_error = b.last_error;
    r.branches.push_back(std::move(br));
  }
  SagaOptions options = t.saga;
  options.notify = t.notify;
  r.options = encode_op_options(OpTxnOptions{options, t.reason, t.reason_branch});
  return r;
}

TxnView CoordinatorMachine::view_from_record_ops(const wal::TxnRecord& rec) {
  TxnView v;
  v.gid = rec.gid;
  v.protocol = rec.protocol;
  v.decided_ms = rec.decided_wall_ms;
  if (auto o = decode_op_options(rec.options); o.ok()) {
    v.reason = o->reason;
    v.reason_branch = o->step;
  }
  bool saga = rec.protocol == Protocol::saga, msg = rec.protocol == Protocol::msg;
  switch (rec.decision) {
    case wal::Decision::commit:
      v.decision = Decision::commit;
      v.state = rec.ended || saga ? TxnState::committed : TxnState::committing;
      break;
    case wal::Decision::aborted:
      v.decision = Decision::abort;
      v.state = rec.ended || msg ? TxnState::aborted
                : saga           ? TxnState::compensating
                                 : TxnState::aborting;
      break;
    default:
      v.decision = Decision::none;
      v.state = saga || rec.protocol == Protocol::notify ? TxnState::running
                : msg                                    ? TxnState::prepared
                                                         : TxnState::active;
      break;
  }
  for (auto& b : rec.branches) {
    BranchView bv;
    bv.participant = b.participant;
    bv.state =
        b.state <= kBranchStateMax ? static_cast<BranchState>(b.state) : BranchState::pending;
    bv.attempts = b.attempts;
    bv.last_error = b.last_error;
    bv.forced = b.outcome == wal::BranchOutcome::forced;
    bv.heuristic = bv.forced;
    bv.result = b.result;
    if (rec.protocol == Protocol::notify && !b.ops.empty()) bv.spec = b.ops[0].json;
    v.branches.push_back(std::move(bv));
  }
  return v;
}

// --- start-up ------------------------------------------------------------------------------

void CoordinatorMachine::recover_ops(const wal::TxnRecord& rec, const GidParts& parts,
                                     int64_t now_ms) {
  Txn t;
  t.serial = next_serial_++;
  t.gid = rec.gid;
  t.parts = parts;
  t.protocol = rec.protocol;
  t.recovered = true;
  t.recorded = true;
  t.created_ms = now_ms;
  t.decided_ms = rec.decided_wall_ms;
  auto options = decode_op_options(rec.options);
  if (options.ok()) {
    t.saga = options->saga;
    t.notify = options->saga.notify;
    t.reason = options->reason;
    t.reason_branch = options->step;
  } else {
    log_.error("recovery reads default options",
               {{"gid", rec.gid}, {"error", options.status().message()}});
  }
  switch (rec.decision) {
    case wal::Decision::commit: t.decision = Decision::commit; break;
    case wal::Decision::aborted: t.decision = Decision::abort; break;
    default: t.decision = Decision::none; break;
  }
  t.decision_durable = t.decision != Decision::none;
  for (auto& b : rec.branches) {
    BranchSlot s;
    s.participant = b.participant;
    s.state = b.state <= kBranchStateMax ? static_cast<BranchState>(b.state) : BranchState::pending;
    s.attempts = b.attempts;
    s.ops = b.ops;
    s.result = b.result;
    s.last_error = b.last_error;
    s.forced = b.outcome == wal::BranchOutcome::forced;
    s.may_have_run = s.state != BranchState::pending || may_have_run_unlogged(rec, s);
    t.branches.push_back(std::move(s));
  }
  std::string gid = t.gid;
  Txn& tx = live_.emplace(gid, std::move(t)).first->second;
  if (holds_finished_below(tx.protocol)) unfinished_order_[{tx.parts.epoch, tx.parts.seq}]++;
  ++recovering_;
  ++counters_.recovered;
  log_.info("recovered", {{"gid", tx.gid},
                          {"protocol", protocol_name(tx.protocol)},
                          {"decision", wal::decision_name(rec.decision)}});
  switch (tx.protocol) {
    case Protocol::tcc: return recover_tcc(tx, now_ms);
    case Protocol::msg: return recover_msg(tx, now_ms);
    case Protocol::notify: return recover_notification(tx, now_ms);
    default: return recover_saga(tx, now_ms);
  }
}

void CoordinatorMachine::recover_tcc(Txn& t, int64_t now_ms) {
  if (t.decision == Decision::none) {
    // Registered, never decided: its tries may have run, and nobody will commit it now.
    t.state = TxnState::active;
    tcc_abort(t, "recovered", "", now_ms);
    return;
  }
  bool commit = t.decision == Decision::commit;
  t.state = commit ? TxnState::committing : TxnState::aborting;
  StepOp op = commit ? StepOp::confirm : StepOp::cancel;
  BranchState done = state_after(op);
  for (size_t i = 0; i < t.branches.size(); ++i)
    if (t.branches[i].state != done && !t.branches[i].forced) send_op(t, i, op);
  maybe_finish_ops(t, now_ms);
}

void CoordinatorMachine::recover_saga(Txn& t, int64_t now_ms) {
  switch (t.decision) {
    case Decision::commit:  // an end record always; kept for a record written otherwise
      t.state = TxnState::committed;
      finish(t.gid, now_ms);
      return;
    case Decision::abort:
      t.state = TxnState::compensating;
      saga_compensate_next(t);
      maybe_finish_ops(t, now_ms);
      return;
    case Decision::none: break;
  }
  bool failed = std::any_of(t.branches.begin(), t.branches.end(),
                            [](const BranchSlot& b) { return b.state == BranchState::failed; });
  if (failed && t.saga.forward) {
    t.state = TxnState::failed;  // stays for an operator, as before the restart
    return;
  }
  t.state = TxnState::running;
  if (t.saga.timeout_ms) {
    t.deadline_ms = now_ms + *t.saga.timeout_ms;
    schedule(t, t.deadline_ms, TimerKind::txn_timeout, 0);
  }
  if (failed) {  // a backward saga whose step failed as the log was being written
    saga_compensate(t, t.reason.empty() ? "step_failed" : t.reason, t.reason_branch, now_ms);
    return;
  }
  // Actions sent before the crash are sent again (an op is idempotent by its key).
  for (size_t i = 0; i < t.branches.size(); ++i)
    if (t.branches[i].state == BranchState::running) send_op(t, i, StepOp::action);
  saga_advance(t, now_ms);
}

// --- client requests -----------------------------------------------------------------------

std::optional<ClientReply> CoordinatorMachine::try_branch(std::string_view gid, OpBranch branch,
                                                          uint64_t waiter, int64_t now_ms) {
  ClientReply r;
  r.waiter = waiter;
  r.kind = RequestKind::try_op;
  r.branch = branch.name;
  Txn* t = find(gid);
  if (!t) {
    auto gone = reply_not_live(gid, RequestKind::try_op, waiter);
    TPC_ASSERT(gone.has_value());
    gone->branch = branch.name;
    if (!gone->needs_log && gone->error.ok()) {
      gone->answer = Answer::contrary;
      gone->error = conflict("transaction " + std::string(gid) +
                             " has ended; branches are tried only while it is active");
    }
    return gone;
  }
  if (t->protocol != Protocol::tcc) {
    r.error = conflict("transaction " + t->gid + " is " + std::string(protocol_name(t->protocol)) +
                       "; only a tcc transaction takes tries");
    return r;
  }
  if (!valid_participant_name(branch.name)) {
    r.error = invalid_argument("\"branch\" must match [A-Za-z0-9_-]{1,32}");
    return r;
  }
  for (StepOp op : {StepOp::try_op, StepOp::confirm, StepOp::cancel})
    if (!std::any_of(branch.ops.begin(), branch.ops.end(),
                     [op](const wal::OpText& o) { return o.op == op; })) {
      r.error = invalid_argument("a TCC branch needs \"" + std::string(step_op_name(op)) + "\"");
      return r;
    }
  size_t i = slot_index(*t, branch.name);
  if (i < t->branches.size()) return repeated_try(*t, i, branch, waiter);
  if (t->state != TxnState::active || t->decision != Decision::none) {
    r.answer = Answer::contrary;
    r.view = view_of(*t);
    r.error = conflict("transaction " + t->gid + " is " + std::string(state_name(t->state)) +
                       "; branches are tried only while it is active");
    return r;
  }
  if (t->branches.size() >= opts_.branches_per_txn_max) {
    r.error = Status(Code::too_large, "a transaction has at most " +
                                          std::to_string(opts_.branches_per_txn_max) + " branches");
    return r;
  }
  BranchSlot b;
  b.participant = std::move(branch.name);
  b.state = BranchState::trying;
  b.ops = std::move(branch.ops);
  b.waiter = waiter;
  t->branches.push_back(std::move(b));
  // Registered before its try goes: a crash now leaves a record that cancels it.
  t->branches.back().registered_seq = persist_ops(*t, /*sync=*/true, now_ms);
  if (log_.enabled(LogLevel::debug))
    log_.debug("branch registered", {{"gid", t->gid}, {"branch", t->branches.back().participant}});
  return std::nullopt;
}

// The same branch tried again (a client's retry): the answer it had, or it waits for it.
std::optional<ClientReply> CoordinatorMachine::repeated_try(Txn& t, size_t i,
                                                            const OpBranch& branch,
                                                            uint64_t waiter) {
  BranchSlot& b = t.branches[i];
  ClientReply r;
  r.waiter = waiter;
  r.kind = RequestKind::try_op;
  r.branch = b.participant;
  if (b.ops != branch.ops) {
    r.error = conflict("branch " + b.participant + " was tried with other ops");
    return r;
  }
  if (b.state == BranchState::trying && t.decision == Decision::none) {
    if (b.waiter != 0) {
      r.error = unavailable("the try of branch " + b.participant + " has not answered yet");
      return r;
    }
    b.waiter = waiter;
    return std::nullopt;
  }
  return try_reply(t, i, waiter);
}

ClientReply CoordinatorMachine::try_reply(const Txn& t, size_t i, uint64_t waiter) const {
  ClientReply r;
  r.waiter = waiter;
  r.kind = RequestKind::try_op;
  r.branch = t.branches[i].participant;
  r.view = view_of(t);
  bool tried = t.decision != Decision::abort && t.branches[i].state != BranchState::trying;
  r.answer = tried ? Answer::done : Answer::contrary;
  return r;
}

Result<std::string> CoordinatorMachine::run_saga(std::vector<OpBranch> steps, SagaOptions opts,
                                                 uint64_t waiter, int64_t now_ms) {
  TPC_RETURN_IF_ERROR(check_saga(steps, opts));
  if (opts.retry_max_ms > 0 && opts.retry_max_ms < opts.retry_min_ms)
    return invalid_argument("\"retry\".max_ms must not be below min_ms");
  auto view = begin_txn(Protocol::saga, opts.timeout_ms, opts.timeout_ms.has_value(), now_ms);
  if (!view.ok()) return view.status();
  Txn& t = *find(view->gid);
  t.saga = opts;
  t.notify = opts.notify;
  t.state = TxnState::running;
  for (auto& s : steps) {
    BranchSlot slot;
    slot.participant = std::move(s.name);
    slot.state = BranchState::pending;
    slot.ops = std::move(s.ops);
    t.branches.push_back(std::move(slot));
  }
  t.waiters.push_back(Waiter{waiter, RequestKind::run, opts.wait_accepted});
  schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  // Every step and payload is durable before the first action goes.
  persist_ops(t, /*sync=*/true, now_ms);
  return t.gid;
}

// A step without compensation is allowed in a forward saga (nothing is ever compensated), and
// in a backward one only as the last of sequential steps: once it may have run, the saga can
// only go forward, and nothing after it could fail and need it undone.
Status CoordinatorMachine::check_saga(const std::vector<OpBranch>& steps,
                                      const SagaOptions& opts) const {
  if (steps.empty()) return invalid_argument("\"steps\" must not be empty");
  if (steps.size() > opts_.branches_per_txn_max)
    return Status(Code::too_large,
                  "a saga has at most " + std::to_string(opts_.branches_per_txn_max) + " steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    const OpBranch& s = steps[i];
    std::string where = "steps[" + std::to_string(i) + "]";
    if (!valid_participant_name(s.name))
      return invalid_argument(where + ".name must match [A-Za-z0-9_-]{1,32}");
    for (size_t j = 0; j < i; ++j)
      if (steps[j].name == s.name) return invalid_argument("step " + s.name + " appears twice");
    auto has = [&](StepOp op) {
      return std::any_of(s.ops.begin(), s.ops.end(),
                         [op](const wal::OpText& o) { return o.op == op; });
    };
    if (!has(StepOp::action)) return invalid_argument(where + " needs \"action\"");
    bool last = i + 1 == steps.size();
    if (!has(StepOp::compensate) && !opts.forward && (opts.parallel || !last))
      return invalid_argument(
          where +
          " has no \"compensate\": a backward saga allows that only for its last step, "
          "and only when its steps are sequential");
  }
  return ok_status();
}

std::optional<ClientReply> CoordinatorMachine::tcc_commit(Txn& t, uint64_t waiter,
                                                          CommitOptions opts, int64_t now_ms) {
  ClientReply r;
  r.waiter = waiter;
  r.kind = RequestKind::commit;
  if (t.protocol == Protocol::saga) {
    r.answer = Answer::contrary;
    r.view = view_of(t);
    r.error = conflict("a saga commits by itself once every step is done");
    return r;
  }
  if (t.protocol == Protocol::msg) return msg_commit(t, waiter, now_ms);
  if (t.protocol == Protocol::notify) return not_a_transaction(std::move(r));
  if (t.decision == Decision::abort) return reply_for_ops(t, RequestKind::commit, waiter);
  if (t.decision == Decision::commit && t.decision_durable && opts.wait_decision_only)
    return reply_for_ops(t, RequestKind::commit, waiter);
  if (t.decision == Decision::none) {
    for (auto& b : t.branches)
      if (b.state == BranchState::trying) {
        r.answer = Answer::contrary;
        r.view = view_of(t);
        r.error = conflict("the try of branch " + b.participant +
                           " has not answered yet; commit once every try has answered");
        return r;
      }
  }
  t.waiters.push_back(Waiter{waiter, RequestKind::commit, opts.wait_decision_only});
  schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  if (t.decision == Decision::commit) return std::nullopt;  // joins the commit in progress
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  set_state(t, TxnState::committing);
  // Synced before the first confirm; confirms go from ops_persisted.
  t.decision_seq = persist_ops(t, /*sync=*/true, now_ms);
  return std::nullopt;
}

std::optional<ClientReply> CoordinatorMachine::ops_abort(Txn& t, uint64_t waiter, int64_t now_ms) {
  if (t.protocol == Protocol::saga) {
    ClientReply r;
    r.waiter = waiter;
    r.kind = RequestKind::abort;
    r.answer = Answer::contrary;
    r.view = view_of(t);
    r.error = conflict(
        "a saga is not aborted by its client; it compensates by itself, and "
        "tpcctl resolve can stop it");
    return r;
  }
  if (t.protocol == Protocol::msg) return msg_abort(t, waiter, now_ms);
  if (t.protocol == Protocol::notify) {
    ClientReply r;
    r.waiter = waiter;
    r.kind = RequestKind::abort;
    return not_a_transaction(std::move(r));
  }
  if (t.decision == Decision::commit) return reply_for_ops(t, RequestKind::abort, waiter);
  std::string gid = t.gid;
  if (t.decision == Decision::none) {
    tcc_abort(t, "client", "", now_ms);
    if (!find(gid)) return reply_not_live(gid, RequestKind::abort, waiter);
  }
  Txn& still = *find(gid);
  still.waiters.push_back(Waiter{waiter, RequestKind::abort, false});
  schedule(still, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  return std::nullopt;
}

ClientReply CoordinatorMachine::resolve_ops(Txn& t, bool commit, int64_t now_ms) {
  ClientReply r;
  r.kind = RequestKind::resolve;
  if (t.protocol == Protocol::notify) return not_a_transaction(std::move(r));
  std::string gid = t.gid;
  Status refused = t.protocol == Protocol::tcc   ? resolve_tcc(t, commit, now_ms)
                   : t.protocol == Protocol::msg ? resolve_msg(t, commit, now_ms)
                                                 : resolve_saga(t, commit, now_ms);
  if (!refused.ok()) {
    r.answer = Answer::contrary;
    r.error = refused;
    return r;
  }
  if (Txn* still = find(gid)) {
    maybe_finish_ops(*still, now_ms);
    if (Txn* live = find(gid)) return reply_for_ops(*live, RequestKind::get, 0);
  }
  auto done = reply_not_live(gid, RequestKind::get, 0);
  TPC_ASSERT(done.has_value());
  done->kind = RequestKind::resolve;
  return *done;
}

Status CoordinatorMachine::resolve_tcc(Txn& t, bool commit, int64_t now_ms) {
  if (t.decision == Decision::none) {
    if (commit)
      return conflict("transaction " + t.gid +
                      " has no confirm decision; the only safe resolution is abort");
    tcc_abort(t, "operator", "", now_ms);
    return ok_status();
  }
  if ((t.decision == Decision::commit) != commit)
    return conflict(std::string("the decision of ") + t.gid + " is " +
                    (t.decision == Decision::commit ? "commit" : "abort") + " and never changes");
  force_ops(t, commit ? BranchState::confirmed : BranchState::cancelled,
            [](const BranchSlot&) { return true; });
  return ok_status();
}

// A saga's operator decisions (docs/DESIGN.md §9): abort skips its stuck compensations (or
// starts them, for a running backward saga); commit skips the failed step of a failed forward
// saga, which then goes on. Skipped ops are recorded as forced (heuristic).
Status CoordinatorMachine::resolve_saga(Txn& t, bool commit, int64_t now_ms) {
  if (!commit && t.state == TxnState::compensating) {
    force_ops(t, BranchState::compensated, needs_compensation);
    return ok_status();
  }
  if (!commit && t.state == TxnState::running && !t.saga.forward && t.decision == Decision::none &&
      !pivot_may_have_run(t)) {
    saga_compensate(t, "operator", "", now_ms);
    return ok_status();
  }
  if (commit && t.state == TxnState::failed) {
    force_ops(t, BranchState::done,
              [](const BranchSlot& b) { return b.state == BranchState::failed; });
    set_state(t, TxnState::running);
    persist_ops(t, /*sync=*/false, now_ms);
    saga_advance(t, now_ms);
    return ok_status();
  }
  return conflict("saga " + t.gid + " is " + std::string(state_name(t.state)) + "; resolve " +
                  (commit ? "commit" : "abort") + " does not apply (see docs/DESIGN.md §9)");
}

void CoordinatorMachine::force_ops(Txn& t, BranchState to,
                                   const std::function<bool(const BranchSlot&)>& which) {
  for (auto& b : t.branches) {
    if (b.state == to || b.forced || !which(b)) continue;
    if (t.protocol == Protocol::tcc &&
        (b.state == BranchState::confirmed || b.state == BranchState::cancelled))
      continue;
    force_branch(t, b, to);
  }
}

// --- TCC -----------------------------------------------------------------------------------

void CoordinatorMachine::tcc_send_tries(Txn& t) {
  if (t.decision != Decision::none) return;
  for (size_t i = 0; i < t.branches.size(); ++i) {
    BranchSlot& b = t.branches[i];
    if (b.state == BranchState::trying && !b.in_flight && b.attempts == 0 && b.registered_seq > 0 &&
        b.registered_seq <= t.durable_seq)
      send_op(t, i, StepOp::try_op);
  }
}

void CoordinatorMachine::on_try_answer(Txn& t, size_t i, const OpReply& reply, int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  if (reply.outcome == OpOutcome::ok) {
    b.state = BranchState::tried;
    b.result = reply.result;  // last_error stays: why earlier attempts failed is still news
    if (b.waiter != 0) ready_.replies.push_back(try_reply(t, i, b.waiter));
    b.waiter = 0;
    return;
  }
  if (reply.outcome == OpOutcome::unknown && b.attempts < kTryAttemptsMax) {
    retry_op(t, i, now_ms);
    return;
  }
  std::string name = b.participant;
  tcc_abort(t, "try_failed", name, now_ms);
}

void CoordinatorMachine::tcc_abort(Txn& t, std::string_view reason, std::string_view branch,
                                   int64_t now_ms) {
  take_abort(t, reason, branch, TxnState::aborting, now_ms);
  // Every registered branch is cancelled, whether its try ran, is still out, or never went:
  // the participant's cancel is empty for a try that never arrived and refuses it later.
  for (size_t i = 0; i < t.branches.size(); ++i) {
    BranchSlot& b = t.branches[i];
    if (b.state == BranchState::cancelled || b.forced) continue;
    send_op(t, i, StepOp::cancel);
  }
  for (size_t i = 0; i < t.branches.size(); ++i) {
    BranchSlot& b = t.branches[i];
    if (b.waiter != 0) ready_.replies.push_back(try_reply(t, i, b.waiter));
    b.waiter = 0;
  }
  if (t.writes > 0 || t.recorded) t.decision_seq = persist_ops(t, /*sync=*/false, now_ms);
  maybe_finish_ops(t, now_ms);
}

// --- saga ----------------------------------------------------------------------------------

void CoordinatorMachine::saga_advance(Txn& t, int64_t now_ms) {
  if (t.state != TxnState::running || t.decision != Decision::none || !t.recorded) return;
  if (all_steps_done(t)) return saga_commit(t, now_ms);
  for (size_t i = 0; i < t.branches.size(); ++i) {
    BranchSlot& b = t.branches[i];
    if (b.state == BranchState::done) continue;
    if (!b.in_flight && action_unsent(t, b) && pivot_durable(t, b, now_ms))
      send_op(t, i, StepOp::action);
    if (!t.saga.parallel) break;  // one step at a time, in order
  }
}

// A step whose action has not gone out yet: pending, or a pivot marked running whose mark
// has become durable since.
bool CoordinatorMachine::action_unsent(const Txn& t, const BranchSlot& b) const {
  if (b.state == BranchState::pending) return true;
  return b.state == BranchState::running && b.attempts == 0 && b.registered_seq <= t.durable_seq;
}

// Step progress is logged without a sync, so after a restart any step may have run (recovery
// assumes so; compensating one that never ran is empty). A step without compensation cannot be
// assumed away like that: it is marked running and that mark synced before its action goes,
// so a restart knows exactly whether the saga may still go backward. (A forward saga never
// goes backward: its steps need no mark.)
bool CoordinatorMachine::pivot_durable(Txn& t, BranchSlot& b, int64_t now_ms) {
  if (t.saga.forward || op_of(b, StepOp::compensate) != nullptr || b.state != BranchState::pending)
    return true;
  b.state = BranchState::running;
  b.may_have_run = true;
  b.registered_seq = persist_ops(t, /*sync=*/true, now_ms);
  return false;
}

void CoordinatorMachine::saga_commit(Txn& t, int64_t now_ms) {
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  t.nothing_to_drive = true;
  // The end record, synced before anyone is told committed (ops_persisted finishes it).
  t.decision_seq = persist_ops(t, /*sync=*/true, now_ms);
}

void CoordinatorMachine::on_action_answer(Txn& t, size_t i, const OpReply& reply, int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  if (reply.outcome == OpOutcome::ok) {
    b.state = BranchState::done;
    b.result = reply.result;  // last_error stays, as for a try
  }
  if (t.state == TxnState::compensating) {  // an action that was out as compensation began
    if (reply.outcome == OpOutcome::business_failure) b.state = BranchState::failed;
    persist_ops(t, /*sync=*/false, now_ms);
    saga_compensate_next(t);
    maybe_finish_ops(t, now_ms);
    return;
  }
  if (t.state != TxnState::running) return;  // failed: waits for an operator
  if (reply.outcome == OpOutcome::ok) {
    // The last step's progress goes with the end record that saga_advance writes at once.
    if (!all_steps_done(t)) persist_ops(t, /*sync=*/false, now_ms);
    saga_advance(t, now_ms);
    return;
  }
  if (!action_gives_up(t, b, reply.outcome)) {
    retry_op(t, i, now_ms);
    return;
  }
  std::string name = b.participant;
  if (t.saga.forward) {
    saga_fail(t, i, now_ms);
    return;
  }
  b.state = BranchState::failed;
  saga_compensate(t, "step_failed", name, now_ms);
}

bool CoordinatorMachine::action_gives_up(const Txn& t, const BranchSlot& b,
                                         OpOutcome outcome) const {
  bool past_attempts = t.saga.attempts_max > 0 && b.attempts >= t.saga.attempts_max;
  if (t.saga.forward) return past_attempts;
  if (outcome == OpOutcome::business_failure) return true;
  // A step without compensation is retried until it answers one way or the other: once it
  // may have run, nothing can undo it.
  return past_attempts && op_of(b, StepOp::compensate) != nullptr;
}

void CoordinatorMachine::saga_compensate(Txn& t, std::string_view reason, std::string_view step,
                                         int64_t now_ms) {
  TPC_ASSERT(!t.saga.forward);
  take_abort(t, reason, step, TxnState::compensating, now_ms);
  // Synced before the first compensation; they go from ops_persisted.
  t.decision_seq = persist_ops(t, /*sync=*/true, now_ms);
}

// Compensations run last step first, each once the one after it succeeded (all at once for a
// parallel saga), and only once no action is still out: an action's answer may still make its
// step one to compensate.
void CoordinatorMachine::saga_compensate_next(Txn& t) {
  if (t.state != TxnState::compensating || !t.decision_durable) return;
  for (auto& b : t.branches)
    if (b.state == BranchState::running && b.in_flight) return;
  for (size_t k = t.branches.size(); k-- > 0;) {
    BranchSlot& b = t.branches[k];
    if (!needs_compensation(b) || b.forced) continue;
    bool out = b.state == BranchState::compensating && (b.in_flight || b.retry_pending);
    if (!out) send_op(t, k, StepOp::compensate);
    if (!t.saga.parallel) return;
  }
}

void CoordinatorMachine::saga_fail(Txn& t, size_t i, int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  b.state = BranchState::failed;
  t.reason = "step_failed";
  t.reason_branch = b.participant;
  set_state(t, TxnState::failed);
  ++counters_.saga_failed;
  log_.error(
      "saga failed: a step is past its attempts; an operator resolves it",
      {{"gid", t.gid}, {"step", b.participant}, {"attempts", b.attempts}, {"error", b.last_error}});
  persist_ops(t, /*sync=*/false, now_ms);
  answer_waiters(t, false);
}

// --- calls and answers ---------------------------------------------------------------------

void CoordinatorMachine::send_op(Txn& t, size_t i, StepOp op) {
  BranchSlot& b = t.branches[i];
  const wal::OpText* text = op_of(b, op);
  TPC_ASSERT(text != nullptr);
  switch (op) {
    case StepOp::try_op:
      TPC_ASSERT_MSG(b.registered_seq > 0 && b.registered_seq <= t.durable_seq,
                     "a try is never sent before its registration is durable");
      break;
    case StepOp::confirm:
      TPC_ASSERT_MSG(t.decision == Decision::commit && t.decision_durable,
                     "a confirm is never sent before the decision is durable");
      break;
    case StepOp::cancel: TPC_ASSERT(t.decision == Decision::abort); break;
    case StepOp::action:
      TPC_ASSERT_MSG(t.recorded, "an action is never sent before its saga is durable");
      TPC_ASSERT_MSG(t.saga.forward || op_of(b, StepOp::compensate) != nullptr ||
                         b.registered_seq <= t.durable_seq,
                     "a pivot's action is never sent before its running mark is durable");
      break;
    case StepOp::compensate:
      TPC_ASSERT_MSG(t.decision == Decision::abort && t.decision_durable,
                     "a compensation is never sent before the decision is durable");
      break;
    case StepOp::local:
    case StepOp::check:
      TPC_ASSERT_MSG(t.recorded && t.decision == Decision::none,
                     "a message's local op or check goes only while its half message is durable "
                     "and undecided");
      break;
    case StepOp::deliver:
      TPC_ASSERT_MSG(t.decision == Decision::commit && t.decision_durable,
                     "a message is never delivered before its commit is durable");
      break;
    case StepOp::notify:
      TPC_ASSERT_MSG(t.recorded, "a notification is never sent before it is logged");
      break;
  }
  BranchState to = state_while(op);
  if (b.state != to) b.attempts = 0;
  b.state = to;
  b.in_flight = true;
  b.retry_pending = false;
  ++b.attempts;
  if (op == StepOp::action) b.may_have_run = true;
  ++counters_.messages_sent;
  if (b.attempts > 1) ++counters_.resends;
  ready_.calls.push_back(OpCall{t.gid, b.participant, op, b.attempts, text->json});
}

int64_t CoordinatorMachine::op_retry_delay(const Txn& t, const BranchSlot& b) const {
  int64_t lo = t.saga.retry_min_ms > 0 ? t.saga.retry_min_ms : opts_.retry_min_ms;
  int64_t hi = t.saga.retry_max_ms > 0 ? t.saga.retry_max_ms : std::max(lo, opts_.retry_max_ms);
  int shift = static_cast<int>(std::min<uint32_t>(b.attempts > 0 ? b.attempts - 1 : 0, 20));
  int64_t delay = std::min(hi, lo << shift);
  return std::max(delay, std::min(b.retry_after_ms, kRetryAfterMaxMs));
}

void CoordinatorMachine::retry_op(Txn& t, size_t i, int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  int64_t delay = op_retry_delay(t, b);
  b.retry_pending = true;
  resend_after(t, i, delay, "op retry", now_ms);
}

void CoordinatorMachine::resend_op(Txn& t, size_t i) {
  BranchSlot& b = t.branches[i];
  if (b.in_flight || !b.retry_pending) return;
  b.retry_pending = false;
  auto op = awaited_op(b);
  if (!op) return;
  if ((*op == StepOp::local || *op == StepOp::check) && t.decision != Decision::none) return;
  if (*op == StepOp::action && (t.state != TxnState::running || t.decision != Decision::none)) {
    saga_compensate_next(t);  // compensating: the step may have run and is undone instead
    return;
  }
  if (*op == StepOp::try_op && t.decision != Decision::none) return;
  send_op(t, i, *op);
}

void CoordinatorMachine::on_op_reply(const OpReply& reply, int64_t now_ms) {
  Txn* t = find(reply.gid);
  if (!t || !calls_ops(t->protocol)) return;
  size_t i = slot_index(*t, reply.branch);
  if (i == t->branches.size()) return;
  BranchSlot& b = t->branches[i];
  // Only the answer to the op the branch waits on counts; anything else is late.
  auto want = awaited_op(b);
  if (!want || *want != reply.op || !b.in_flight) return;
  b.in_flight = false;
  ++counters_.ops[static_cast<size_t>(reply.op)][static_cast<size_t>(reply.outcome)];
  b.retry_after_ms = reply.outcome == OpOutcome::unknown ? reply.retry_after_ms : 0;
  if (reply.outcome != OpOutcome::ok) b.last_error = reply.error;
  switch (reply.op) {
    case StepOp::try_op: return on_try_answer(*t, i, reply, now_ms);
    case StepOp::action: return on_action_answer(*t, i, reply, now_ms);
    case StepOp::local:
    case StepOp::check: return on_producer_answer(*t, reply, now_ms);
    case StepOp::notify: return on_notify_answer(*t, reply, now_ms);
    default: return on_settling_answer(*t, i, reply, now_ms);
  }
}

// Confirm, cancel and compensate: repeated until they succeed, a business failure included
// (reported: it means the participant cannot do what was already decided).
void CoordinatorMachine::on_settling_answer(Txn& t, size_t i, const OpReply& reply,
                                            int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  if (reply.outcome == OpOutcome::ok) {
    b.state = state_after(reply.op);
    if (!reply.result.empty()) b.result = reply.result;
    // last_error stays: why the step failed, or what held its settling op up, is still news.
    // The last confirm, cancel or delivery is logged with the end record, which follows at once.
    if (!settled_by_this_answer(t)) persist_ops(t, /*sync=*/false, now_ms);
    if (reply.op == StepOp::compensate) saga_compensate_next(t);
    maybe_finish_ops(t, now_ms);
    return;
  }
  if (reply.outcome == OpOutcome::business_failure) {
    ++counters_.op_failures;
    log_.error("op refused after the decision; retried until it succeeds",
               {{"gid", t.gid},
                {"branch", b.participant},
                {"op", step_op_name(reply.op)},
                {"attempt", b.attempts},
                {"error", reply.error}});
  }
  retry_op(t, i, now_ms);
}

void CoordinatorMachine::ops_persisted(Txn& t, uint64_t seq, int64_t now_ms) {
  if (seq <= t.durable_seq) return;
  t.durable_seq = seq;
  bool first = !t.recorded;
  t.recorded = true;
  bool decided_now = false;
  if (t.decision != Decision::none && !t.decision_durable && t.decision_seq > 0 &&
      t.decision_seq <= seq) {
    t.decision_durable = true;
    decided_now = true;
  }
  if (t.protocol == Protocol::tcc) {
    tcc_send_tries(t);
    if (decided_now && t.decision == Decision::commit) {
      for (size_t i = 0; i < t.branches.size(); ++i)
        if (t.branches[i].state == BranchState::tried) send_op(t, i, StepOp::confirm);
      answer_waiters(t, true);
    }
    maybe_finish_ops(t, now_ms);
    return;
  }
  if (t.protocol == Protocol::msg) return msg_persisted(t, first, decided_now, now_ms);
  if (t.protocol == Protocol::notify) return notify_persisted(t, now_ms);
  if (t.decision == Decision::commit && t.decision_durable) {
    set_state(t, TxnState::committed);
    finish(t.gid, now_ms);
    return;
  }
  if (first) answer_waiters(t, true);  // "wait":"accepted": the saga is durable
  saga_advance(t, now_ms);
  if (decided_now) saga_compensate_next(t);
  maybe_finish_ops(t, now_ms);
}

void CoordinatorMachine::maybe_finish_ops(Txn& t, int64_t now_ms) {
  if (t.decision == Decision::none) return;
  if (t.protocol == Protocol::msg) return msg_maybe_finish(t, now_ms);
  if (t.protocol == Protocol::notify) return;  // on_notify_answer ends it
  if (t.protocol == Protocol::saga && t.decision == Decision::commit) return;  // ops_persisted
  if (t.decision == Decision::commit && !t.decision_durable) return;
  for (auto& b : t.branches) {
    if (b.in_flight) return;
    if (t.protocol == Protocol::saga) {
      if (needs_compensation(b) && !b.forced) return;
      if (!t.decision_durable) return;
    } else if (!b.forced && b.state != (t.decision == Decision::commit ? BranchState::confirmed
                                                                       : BranchState::cancelled)) {
      return;
    }
  }
  if (t.protocol == Protocol::saga && !t.decision_durable) return;
  set_state(t, t.decision == Decision::commit ? TxnState::committed : TxnState::aborted);
  finish(t.gid, now_ms);
}

void CoordinatorMachine::on_op_timeout(Txn& t, int64_t now_ms) {
  if (t.decision != Decision::none || t.deadline_ms > now_ms) return;
  if (t.protocol == Protocol::msg) return msg_check(t, now_ms);
  if (t.protocol == Protocol::tcc) {
    if (t.state == TxnState::active) tcc_abort(t, "timeout", "", now_ms);
    return;
  }
  if (t.state != TxnState::running) return;
  if (t.saga.forward || pivot_may_have_run(t)) {
    log_.warn("saga past its timeout goes on: it can only go forward",
              {{"gid", t.gid}, {"recovery", t.saga.forward ? "forward" : "pivot"}});
    return;
  }
  saga_compensate(t, "timeout", "", now_ms);
}

void CoordinatorMachine::on_op_wait_timeout(Txn& t, int64_t now_ms) {
  bool undecided_commit =
      t.decision == Decision::commit && !t.decision_durable && t.protocol != Protocol::saga;
  if (undecided_commit || !t.recorded) {
    schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
    return;
  }
  answer_waiters(t, false);
}

ClientReply CoordinatorMachine::reply_for_ops(const Txn& t, RequestKind kind,
                                              uint64_t waiter) const {
  ClientReply r;
  r.waiter = waiter;
  r.kind = kind;
  r.view = view_of(t);
  if (t.protocol == Protocol::msg) {
    r.answer = msg_answer(t, kind);
    return r;
  }
  if (t.protocol == Protocol::notify) {
    r.answer = kind == RequestKind::begin ? Answer::created : Answer::done;
    return r;
  }
  switch (kind) {
    case RequestKind::run:
      r.answer = t.state == TxnState::committed                                ? Answer::done
                 : t.state == TxnState::aborted || t.state == TxnState::failed ? Answer::contrary
                                                                               : Answer::pending;
      break;
    case RequestKind::commit:
      r.answer = t.state == TxnState::committed   ? Answer::done
                 : t.decision == Decision::commit ? Answer::pending
                                                  : Answer::contrary;
      break;
    case RequestKind::abort:
      r.answer = t.state == TxnState::aborted    ? Answer::done
                 : t.decision == Decision::abort ? Answer::pending
                                                 : Answer::contrary;
      break;
    default: break;
  }
  return r;
}

}  // namespace tpc::coord
