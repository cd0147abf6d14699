// Best-effort notifications on the coordinator's engine (docs/DESIGN.md §10.3). A notification
// is a record of protocol `notify` with one slot, "notify", holding its HTTP op: logged, then
// POSTed until it answers 2xx, at most its attempts with the capped backoff of every op; a
// business failure (409, 422) or the last attempt gives it up. It is never retried after that:
// the receiver reconciles by asking (GET /v1/notifications/{id}, or the transaction's GET).
//
// Its record is synced before it is sent (and a standalone one's before its 201). Its progress
// is not logged: a crash sends it again (at least once) and may grant it a few attempts more
// than its budget.
#include "common/json.h"
#include "coordinator/coordinator_machine.h"
#include "coordinator/op_slot.h"

namespace tpc::coord {
namespace {

constexpr std::string_view kNotifySlot = "notify";

}  // namespace

Result<std::string> CoordinatorMachine::begin_notification(wal::OpText op, uint32_t attempts_max,
                                                           uint64_t waiter, int64_t now_ms) {
  Txn* n = new_notification(std::move(op), attempts_max, now_ms, /*capped=*/true);
  if (!n)
    return unavailable(
        "too many open transactions (open_txns_max=" + std::to_string(opts_.open_txns_max) + ")");
  Txn& t = *n;
  t.waiters.push_back(Waiter{waiter, RequestKind::begin, true});
  schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  persist_ops(t, /*sync=*/true, now_ms);
  return t.gid;
}

// A notification in memory, not logged yet.
Txn* CoordinatorMachine::new_notification(wal::OpText op, uint32_t attempts_max, int64_t now_ms,
                                          bool capped) {
  TPC_ASSERT(op.op == StepOp::notify);
  auto view = begin_txn(Protocol::notify, std::nullopt, /*expires=*/false, now_ms, capped);
  if (!view.ok()) return nullptr;  // open_txns_max
  Txn& t = *find(view->gid);
  t.state = TxnState::running;
  t.saga.attempts_max = attempts_max;
  BranchSlot s;
  s.participant = std::string(kNotifySlot);
  s.state = BranchState::pending;
  s.ops.push_back(std::move(op));
  t.branches.push_back(std::move(s));
  return &t;
}

// {"gid","protocol","state"} to the transaction's notify op. Logged just before the
// transaction's own end record (in the same write), and sent once durable. A transaction that
// ends again after a crash (its end record lost with the write) is notified again, under a new
// id: at least once; the receiver's GET of the transaction always answers.
void CoordinatorMachine::notify_outcome(Txn& t, int64_t now_ms) {
  if (t.notify.empty() || t.notified || t.protocol == Protocol::notify) return;
  t.notified = true;
  auto op = parse_object(t.notify);
  if (!op.ok()) {
    log_.error("a transaction's notify op does not parse; not sent", {{"gid", t.gid}});
    return;
  }
  // A saga's end record is written as it commits, before its state says so.
  TxnState final_state = t.protocol == Protocol::saga && t.decision == Decision::commit
                             ? TxnState::committed
                             : t.state;
  (*op)["body"] = Json{{"gid", t.gid},
                       {"protocol", std::string(protocol_name(t.protocol))},
                       {"state", std::string(state_name(final_state))}};
  // Not capped by open_txns_max: a durable end record always has its notification.
  Txn* n = new_notification(wal::OpText{StepOp::notify, dump(*op)}, opts_.notify_attempts_max,
                            now_ms, /*capped=*/false);
  TPC_ASSERT(n != nullptr);
  uint64_t seq = ++n->writes;
  // Synced (group commit shares the fsync), and sent once durable: an id the receiver saw is
  // always one GET /v1/notifications/{id} answers.
  ready_.persist.push_back(Persist{record_of_ops(*n, now_ms), /*sync=*/true, /*notify=*/true, seq});
}

std::string CoordinatorMachine::notify_of_options(std::string_view options) {
  if (options.empty()) return "";
  auto j = parse_object(options);
  if (!j.ok() || !j->contains("notify") || !(*j)["notify"].is_object()) return "";
  return dump((*j)["notify"]);
}

void CoordinatorMachine::notify_persisted(Txn& t, int64_t now_ms) {
  answer_waiters(t, /*only_decision_waiters=*/true);  // 201 pending
  BranchSlot& s = t.branches[0];
  if (t.decision == Decision::none && s.state == BranchState::pending)
    send_op(t, 0, StepOp::notify);
  (void)now_ms;
}

void CoordinatorMachine::on_notify_answer(Txn& t, const OpReply& reply, int64_t now_ms) {
  BranchSlot& s = t.branches[0];
  if (reply.outcome == OpOutcome::ok) {
    if (!reply.result.empty()) s.result = reply.result;
    s.state = BranchState::delivered;
    return notify_end(t, true, "", now_ms);
  }
  if (reply.outcome == OpOutcome::business_failure) return notify_end(t, false, "refused", now_ms);
  if (t.saga.attempts_max > 0 && s.attempts >= t.saga.attempts_max)
    return notify_end(t, false, "attempts", now_ms);
  retry_op(t, 0, now_ms);
}

// Delivered (committed) or given up (aborted); its end record is written unsynced.
void CoordinatorMachine::notify_end(Txn& t, bool delivered, std::string_view reason,
                                    int64_t now_ms) {
  if (delivered) {
    t.decision = Decision::commit;
    t.decided_ms = now_ms;
    set_state(t, TxnState::committed);
  } else {
    take_abort(t, reason, "", TxnState::aborted, now_ms);
    log_.warn("notification given up; its receiver reconciles by asking",
              {{"id", t.gid},
               {"reason", reason},
               {"attempts", t.branches[0].attempts},
               {"error", t.branches[0].last_error}});
  }
  finish(t.gid, now_ms);
}

void CoordinatorMachine::recover_notification(Txn& t, int64_t now_ms) {
  if (t.decision != Decision::none) {  // ended, its end record not marked ended: end it again
    t.state = t.decision == Decision::commit ? TxnState::committed : TxnState::aborted;
    return finish(t.gid, now_ms);
  }
  t.state = TxnState::running;
  BranchSlot& s = t.branches[0];
  s.state = BranchState::pending;
  send_op(t, 0, StepOp::notify);
}

}  // namespace tpc::coord
