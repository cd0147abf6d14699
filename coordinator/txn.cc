#include "coordinator/txn.h"

#include "common/wire.h"

namespace tpc::coord {

std::string_view state_name(TxnState s) {
  switch (s) {
    case TxnState::active: return "active";
    case TxnState::preparing: return "preparing";
    case TxnState::precommitted: return "precommitted";
    case TxnState::committing: return "committing";
    case TxnState::committed: return "committed";
    case TxnState::aborting: return "aborting";
    case TxnState::aborted: return "aborted";
    case TxnState::heuristic_mixed: return "heuristic_mixed";
    case TxnState::running: return "running";
    case TxnState::compensating: return "compensating";
    case TxnState::failed: return "failed";
    case TxnState::prepared: return "prepared";
  }
  return "?";
}

std::optional<TxnState> parse_state(std::string_view s) {
  for (TxnState t :
       {TxnState::active, TxnState::preparing, TxnState::precommitted, TxnState::committing,
        TxnState::committed, TxnState::aborting, TxnState::aborted, TxnState::heuristic_mixed,
        TxnState::running, TxnState::compensating, TxnState::failed, TxnState::prepared})
    if (state_name(t) == s) return t;
  return std::nullopt;
}

std::string_view branch_state_name(BranchState s) {
  switch (s) {
    case BranchState::active: return "active";
    case BranchState::preparing: return "preparing";
    case BranchState::prepared: return "prepared";
    case BranchState::read_only: return "read_only";
    case BranchState::precommitting: return "precommitting";
    case BranchState::precommitted: return "precommitted";
    case BranchState::committing: return "committing";
    case BranchState::committed: return "committed";
    case BranchState::aborting: return "aborting";
    case BranchState::aborted: return "aborted";
    case BranchState::trying: return "trying";
    case BranchState::tried: return "tried";
    case BranchState::confirming: return "confirming";
    case BranchState::confirmed: return "confirmed";
    case BranchState::cancelling: return "cancelling";
    case BranchState::cancelled: return "cancelled";
    case BranchState::pending: return "pending";
    case BranchState::running: return "running";
    case BranchState::done: return "done";
    case BranchState::failed: return "failed";
    case BranchState::compensating: return "compensating";
    case BranchState::compensated: return "compensated";
    case BranchState::checking: return "checking";
    case BranchState::delivering: return "delivering";
    case BranchState::delivered: return "delivered";
  }
  return "?";
}

std::string_view msg_name(MsgKind k) {
  switch (k) {
    case MsgKind::prepare: return wire::kPrepare;
    case MsgKind::precommit: return wire::kPrecommit;
    case MsgKind::commit: return wire::kCommit;
    case MsgKind::commit_one_phase: return "commit_one_phase";
    case MsgKind::abort: return wire::kAbort;
    case MsgKind::exec_prepare: return "exec_prepare";
    case MsgKind::exec_commit: return "exec_commit";
  }
  return "?";
}

std::string_view op_outcome_name(OpOutcome o) {
  switch (o) {
    case OpOutcome::ok: return "ok";
    case OpOutcome::business_failure: return "business_failure";
    case OpOutcome::unknown: return "unknown";
  }
  return "?";
}

bool terminal(TxnState s) {
  return s == TxnState::committed || s == TxnState::aborted || s == TxnState::heuristic_mixed;
}

}  // namespace tpc::coord
