// Transactional (half) messages on the coordinator's engine (docs/DESIGN.md §10.1). A msg
// transaction has a producer slot ("local": the check-back op, and in the one-request form the
// local op before it) and one slot per destination (its deliver op). It is logged `half`
// (synced) before anyone hears of it, decided by its producer (commit / abort), by the answer
// to its local op, or by check-back at its timeout, and once the commit is durable every
// destination gets the message until it acknowledges.
//
// Writes follow the op machine's rule (op_machine.cc): nothing is sent that depends on a write
// before that write is durable:
//   - the local op and the check only once the half message is durable;
//   - a delivery only once the commit decision is durable.
// An abort is written unsynced: lost in a crash, the message is `half` again and check-back
// settles it the same way (a check through an agent is final once it fenced the local op).
#include <algorithm>

#include "coordinator/coordinator_machine.h"
#include "coordinator/op_slot.h"

namespace tpc::coord {
namespace {

bool one_request(const Txn& t) {
  return op_of(t.branches[kProducerSlot], StepOp::local) != nullptr;
}

std::string destination_name(size_t i) {
  return "d" + std::to_string(i + 1);
}

}  // namespace

Result<std::string> CoordinatorMachine::begin_msg(MsgRequest req, uint64_t waiter, int64_t now_ms) {
  if (req.destinations.empty()) return invalid_argument("\"destinations\" must not be empty");
  if (req.destinations.size() + 1 > opts_.branches_per_txn_max)
    return Status(Code::too_large, "a message has at most " +
                                       std::to_string(opts_.branches_per_txn_max - 1) +
                                       " destinations");
  BranchSlot producer;
  producer.participant = std::string(kProducerName);
  producer.state = BranchState::pending;
  producer.ops = std::move(req.producer);
  TPC_ASSERT_MSG(op_of(producer, StepOp::check) != nullptr, "a message always has its check");
  int64_t timeout = req.timeout_ms.value_or(kMsgTimeoutDefaultMs);
  auto view = begin_txn(Protocol::msg, timeout, /*expires=*/true, now_ms);
  if (!view.ok()) return view.status();
  Txn& t = *find(view->gid);
  t.saga.attempts_max = 0;
  t.saga.timeout_ms = timeout;
  t.notify = std::move(req.notify);
  t.state = TxnState::prepared;
  t.branches.push_back(std::move(producer));
  for (size_t i = 0; i < req.destinations.size(); ++i) {
    BranchSlot d;
    d.participant = destination_name(i);
    d.state = BranchState::pending;
    d.ops.push_back(std::move(req.destinations[i]));
    t.branches.push_back(std::move(d));
  }
  bool local = one_request(t);
  // begin: answered 201 once the half message is durable; run: once the message is decided.
  t.waiters.push_back(
      Waiter{waiter, local ? RequestKind::run : RequestKind::begin, /*decision_only=*/!local});
  schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  persist_ops(t, /*sync=*/true, now_ms);
  return t.gid;
}

void CoordinatorMachine::recover_msg(Txn& t, int64_t now_ms) {
  switch (t.decision) {
    case Decision::none: {
      // Its producer may have committed or not; nobody will tell us now but check-back.
      t.state = TxnState::prepared;
      t.deadline_ms = now_ms + t.saga.timeout_ms.value_or(kMsgTimeoutDefaultMs);
      schedule(t, t.deadline_ms, TimerKind::txn_timeout, 0);
      return;
    }
    case Decision::commit:
      t.state = TxnState::committing;
      for (size_t i = kProducerSlot + 1; i < t.branches.size(); ++i) {
        BranchSlot& d = t.branches[i];
        if (d.state != BranchState::delivered && !d.forced) send_op(t, i, StepOp::deliver);
      }
      return msg_maybe_finish(t, now_ms);
    case Decision::abort: t.state = TxnState::aborted; return finish(t.gid, now_ms);
  }
}

std::optional<ClientReply> CoordinatorMachine::msg_commit(Txn& t, uint64_t waiter, int64_t now_ms) {
  if (t.decision == Decision::commit && !t.decision_durable) {
    t.waiters.push_back(Waiter{waiter, RequestKind::commit, true});
    schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
    return std::nullopt;  // answered with the decision
  }
  if (t.decision != Decision::none) return reply_for_ops(t, RequestKind::commit, waiter);
  if (one_request(t)) {
    ClientReply r = reply_for_ops(t, RequestKind::commit, waiter);
    r.answer = Answer::contrary;
    r.error = conflict("a message sent with its local op is committed by that op's answer");
    return r;
  }
  t.waiters.push_back(Waiter{waiter, RequestKind::commit, true});
  schedule(t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  t.branches[kProducerSlot].state = BranchState::done;  // the producer says it committed
  msg_decide_commit(t, now_ms);
  return std::nullopt;
}

std::optional<ClientReply> CoordinatorMachine::msg_abort(Txn& t, uint64_t waiter, int64_t now_ms) {
  if (t.decision != Decision::none || one_request(t)) {
    ClientReply r = reply_for_ops(t, RequestKind::abort, waiter);
    if (one_request(t) && t.decision == Decision::none) {
      r.answer = Answer::contrary;
      r.error = conflict("a message sent with its local op is settled by that op's answer");
    }
    return r;
  }
  std::string gid = t.gid;
  t.branches[kProducerSlot].state = BranchState::failed;
  msg_decide_abort(t, "client", now_ms);
  return reply_not_live(gid, RequestKind::abort, waiter);
}

// An operator may decide a half message either way (its producer's local transaction is known
// to them), and may skip the stuck deliveries of a committed one (recorded forced, heuristic).
Status CoordinatorMachine::resolve_msg(Txn& t, bool commit, int64_t now_ms) {
  if (t.decision == Decision::none) {
    const BranchSlot& p = t.branches[kProducerSlot];
    if (!commit && p.in_flight && p.state == BranchState::running)
      return conflict("the local op of " + t.gid +
                      " is out and may still commit; resolve once it has answered");
    if (commit)
      msg_decide_commit(t, now_ms);
    else
      msg_decide_abort(t, "operator", now_ms);
    return ok_status();
  }
  if (!commit) return conflict("message " + t.gid + " is committed and its decision never changes");
  force_ops(t, BranchState::delivered, [](const BranchSlot& b) {
    return b.participant != kProducerName && b.state != BranchState::delivered;
  });
  return ok_status();
}

void CoordinatorMachine::msg_decide_commit(Txn& t, int64_t now_ms) {
  TPC_ASSERT_MSG(t.decision == Decision::none, "a decision never changes");
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  set_state(t, TxnState::committing);
  // Synced before the first delivery; deliveries go from msg_persisted.
  t.decision_seq = persist_ops(t, /*sync=*/true, now_ms);
}

void CoordinatorMachine::msg_decide_abort(Txn& t, std::string_view reason, int64_t now_ms) {
  take_abort(t, reason, "", TxnState::aborted, now_ms);
  if (t.branches[kProducerSlot].state != BranchState::failed)
    t.branches[kProducerSlot].state = BranchState::failed;
  // An operator's abort is synced: a crash must not give the message back to check-back.
  if (reason == "operator") persist_ops(t, /*sync=*/true, now_ms);
  finish(t.gid, now_ms);  // writes the end record; nothing was delivered
}

// Check-back: the timeout passed with the message still undecided. One check at a time; the
// one-request form's local op, while out, is waited for (its answer decides).
void CoordinatorMachine::msg_check(Txn& t, int64_t now_ms) {
  if (t.state != TxnState::prepared || t.decision != Decision::none) return;
  BranchSlot& p = t.branches[kProducerSlot];
  if (p.in_flight || p.retry_pending) return;
  if (!t.recorded) {  // the half message is not durable yet: nothing may be asked
    schedule(t, now_ms + opts_.retry_min_ms, TimerKind::txn_timeout, 0);
    t.deadline_ms = now_ms + opts_.retry_min_ms;
    return;
  }
  if (log_.enabled(LogLevel::info))
    log_.info("check-back", {{"gid", t.gid}, {"attempt", p.attempts + 1}});
  send_op(t, kProducerSlot, StepOp::check);
}

void CoordinatorMachine::on_producer_answer(Txn& t, const OpReply& reply, int64_t now_ms) {
  BranchSlot& p = t.branches[kProducerSlot];
  if (t.decision != Decision::none) return;  // the producer or an operator decided meanwhile
  switch (reply.outcome) {
    case OpOutcome::ok:
      p.state = BranchState::done;
      if (!reply.result.empty()) p.result = reply.result;
      return msg_decide_commit(t, now_ms);
    case OpOutcome::business_failure:
      // A local op sent more than once may have an earlier attempt still waiting at the agent
      // that could yet commit: the check fences it and tells which.
      if (reply.op == StepOp::local && p.attempts > 1) {
        send_op(t, kProducerSlot, StepOp::check);
        return;
      }
      p.state = BranchState::failed;
      return msg_decide_abort(t, reply.op == StepOp::local ? "local_failed" : "not_committed",
                              now_ms);
    case OpOutcome::unknown:
      if (reply.op == StepOp::local && p.attempts < kLocalAttemptsMax)
        return retry_op(t, kProducerSlot, now_ms);  // the barrier applies it at most once
      if (reply.op == StepOp::local) {
        // Still unknown: the check finds out, and at an agent fences it so the answer is final.
        send_op(t, kProducerSlot, StepOp::check);
        return;
      }
      return retry_op(t, kProducerSlot, now_ms);
  }
}

void CoordinatorMachine::msg_persisted(Txn& t, bool first, bool decided_now, int64_t now_ms) {
  if (first && t.decision == Decision::none) {
    answer_waiters(t, /*only_decision_waiters=*/true);  // begin: 201 prepared
    BranchSlot& p = t.branches[kProducerSlot];
    if (one_request(t) && p.state == BranchState::pending) send_op(t, kProducerSlot, StepOp::local);
    if (t.deadline_ms <= now_ms) msg_check(t, now_ms);
  }
  if (decided_now && t.decision == Decision::commit) {
    for (size_t i = kProducerSlot + 1; i < t.branches.size(); ++i)
      if (t.branches[i].state == BranchState::pending) send_op(t, i, StepOp::deliver);
    answer_waiters(t, /*only_decision_waiters=*/false);
  }
  msg_maybe_finish(t, now_ms);
}

void CoordinatorMachine::msg_maybe_finish(Txn& t, int64_t now_ms) {
  if (t.decision == Decision::none) return;
  if (t.decision == Decision::abort) {
    if (!terminal(t.state)) set_state(t, TxnState::aborted);
    return finish(t.gid, now_ms);
  }
  if (!t.decision_durable || !all_delivered(t)) return;
  for (size_t i = kProducerSlot + 1; i < t.branches.size(); ++i)
    if (t.branches[i].in_flight) return;
  set_state(t, TxnState::committed);
  finish(t.gid, now_ms);
}

MsgGauges CoordinatorMachine::msg_gauges(int64_t now_ms) const {
  MsgGauges g;
  for (const auto& [gid, t] : live_) {
    if (t.protocol == Protocol::notify) ++g.notifications;
    if (t.protocol != Protocol::msg) continue;
    if (t.state == TxnState::prepared) ++g.prepared;
    if (t.state != TxnState::committing) continue;
    ++g.delivering;
    g.oldest_ms = std::max(g.oldest_ms, now_ms - t.decided_ms);
  }
  return g;
}

// begin: 201 once durable; commit (and the one-request form): 200 once the commit is durable,
// 409 once aborted; abort: 200 once aborted, 409 once committed; a wait past --commit-wait-ms
// answers 202 with the message still prepared.
Answer CoordinatorMachine::msg_answer(const Txn& t, RequestKind kind) const {
  bool committed = t.decision == Decision::commit && t.decision_durable;
  switch (kind) {
    case RequestKind::begin: return Answer::created;
    case RequestKind::run:
    case RequestKind::commit:
      return committed                       ? Answer::done
             : t.decision == Decision::abort ? Answer::contrary
                                             : Answer::pending;
    case RequestKind::abort:
      return t.decision == Decision::abort    ? Answer::done
             : t.decision == Decision::commit ? Answer::contrary
                                              : Answer::pending;
    default: return Answer::done;
  }
}

}  // namespace tpc::coord
