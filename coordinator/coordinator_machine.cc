#include "coordinator/coordinator_machine.h"

#include <algorithm>

#include "common/json.h"
namespace tpc::coord {
namespace {

bool branch_final(BranchState s) {
  return s == BranchState::committed || s == BranchState::aborted || s == BranchState::read_only;
}

wal::BranchOutcome outcome_of(const BranchSlot& b) {
  if (b.forced) return wal::BranchOutcome::forced;
  switch (b.state) {
    case BranchState::committed: return wal::BranchOutcome::committed;
    case BranchState::aborted: return wal::BranchOutcome::aborted;
    case BranchState::read_only: return wal::BranchOutcome::read_only;
    default: return wal::BranchOutcome::pending;
  }
}

BranchState state_of(wal::BranchOutcome o, bool commit_decision) {
  switch (o) {
    case wal::BranchOutcome::committed: return BranchState::committed;
    case wal::BranchOutcome::aborted: return BranchState::aborted;
    case wal::BranchOutcome::read_only: return BranchState::read_only;
    case wal::BranchOutcome::forced:
      return commit_decision ? BranchState::committed : BranchState::aborted;
    case wal::BranchOutcome::pending: break;
  }
  return commit_decision ? BranchState::committing : BranchState::aborting;
}

// A branch outcome opposite to the record's decision (a one-phase record has no decision of
// its own: its branch's answer is the outcome).
bool against_decision(const wal::TxnRecord& rec, wal::BranchOutcome o) {
  switch (rec.decision) {
    case wal::Decision::one_phase: return false;
    case wal::Decision::aborted: return o == wal::BranchOutcome::committed;
    default: return o == wal::BranchOutcome::aborted;
  }
}

}  // namespace

CoordinatorMachine::CoordinatorMachine(MachineOptions opts, Logger& log)
    : opts_(std::move(opts)), log_(log) {
  TPC_ASSERT(valid_coordinator_id(opts_.coordinator_id));
  TPC_ASSERT(opts_.retry_min_ms > 0 && opts_.retry_max_ms >= opts_.retry_min_ms);
}

// --- helpers -----------------------------------------------------------------------------

Txn* CoordinatorMachine::find(std::string_view gid) {
  auto it = live_.find(std::string(gid));
  return it == live_.end() ? nullptr : &it->second;
}

const Txn* CoordinatorMachine::find(std::string_view gid) const {
  auto it = live_.find(std::string(gid));
  return it == live_.end() ? nullptr : &it->second;
}

bool CoordinatorMachine::issued(const GidParts& g) const {
  if (g.coordinator != opts_.coordinator_id) return false;
  if (g.epoch < epoch_) return g.epoch > 0;
  return g.epoch == epoch_ && g.seq >= 1 && g.seq < next_seq_;
}

void CoordinatorMachine::set_state(Txn& t, TxnState to) {
  if (t.state == to) return;
  LogLevel level = to == TxnState::heuristic_mixed ? LogLevel::error : LogLevel::info;
  if (!log_.enabled(level)) {
    t.state = to;
    return;
  }
  std::string transition = std::string(state_name(t.state)) + "->" + std::string(state_name(to));
  if (!t.reason.empty() && (to == TxnState::aborting || to == TxnState::aborted)) {
    if (t.reason_branch.empty())
      log_.log(level, transition, {{"gid", t.gid}, {"reason", t.reason}});
    else
      log_.log(level, transition,
               {{"gid", t.gid}, {"reason", t.reason}, {"branch", t.reason_branch}});
  } else {
    log_.log(level, transition, {{"gid", t.gid}});
  }
  t.state = to;
}

namespace {
int lane_of(TimerKind kind) {
  switch (kind) {
    case TimerKind::txn_timeout: return 0;
    case TimerKind::prepare_timeout: return 1;
    case TimerKind::wait_timeout: return 2;
    case TimerKind::resend: break;
  }
  return -1;
}
}  // namespace

void CoordinatorMachine::schedule(Txn& t, int64_t at_ms, TimerKind kind, uint32_t branch,
                                  bool fixed) {
  int lane = fixed ? lane_of(kind) : -1;
  if (lane >= 0)
    timer_lanes_[lane].push_back(Timer{at_ms, t.gid, kind, branch});
  else
    timers_.push(Timer{at_ms, t.gid, kind, branch});
}

int CoordinatorMachine::next_timer_source() const {
  int best = timers_.empty() ? -1 : 3;
  for (int i = 0; i < 3; ++i)
    if (!timer_lanes_[i].empty() &&
        (best < 0 || timer_lanes_[i].front().at_ms < timer_at(best).at_ms))
      best = i;
  return best;
}

const CoordinatorMachine::Timer& CoordinatorMachine::timer_at(int source) const {
  return source == 3 ? timers_.top() : timer_lanes_[source].front();
}

void CoordinatorMachine::send(Txn& t, size_t i, MsgKind kind) {
  BranchSlot& b = t.branches[i];
  if (t.oneshot && kind == MsgKind::prepare) kind = MsgKind::exec_prepare;
  // Only the first one-phase commit carries the statements: a resend must never run them twice.
  if (t.oneshot && kind == MsgKind::commit_one_phase && b.attempts == 0)
    kind = MsgKind::exec_commit;
  if (kind == MsgKind::commit || kind == MsgKind::precommit || kind == MsgKind::commit_one_phase ||
      kind == MsgKind::exec_commit)
    TPC_ASSERT_MSG(t.decision == Decision::commit && t.decision_durable,
                   "a commit is never sent before the decision is durable");
  if (kind == MsgKind::abort) TPC_ASSERT(t.decision == Decision::abort);
  switch (kind) {
    case MsgKind::prepare:
    case MsgKind::exec_prepare: b.state = BranchState::preparing; break;
    case MsgKind::precommit: b.state = BranchState::precommitting; break;
    case MsgKind::commit:
    case MsgKind::commit_one_phase:
    case MsgKind::exec_commit: b.state = BranchState::committing; break;
    case MsgKind::abort: b.state = BranchState::aborting; break;
  }
  b.in_flight = true;
  ++b.attempts;
  ++counters_.messages_sent;
  if (b.attempts > 1) ++counters_.resends;
  Message m{t.gid, b.participant, b.url, kind, b.attempts, t.protocol, {}};
  if ((kind == MsgKind::prepare || kind == MsgKind::exec_prepare) &&
      t.protocol == Protocol::three_phase)
    for (auto& other : t.branches) m.peers.push_back(Peer{other.participant, other.url});
  ready_.messages.push_back(std::move(m));
}

void CoordinatorMachine::send_to_all(Txn& t, BranchState from, MsgKind kind) {
  for (size_t i = 0; i < t.branches.size(); ++i) {
    if (t.branches[i].state != from) continue;
    t.branches[i].attempts = 0;
    send(t, i, kind);
  }
}

void CoordinatorMachine::schedule_resend(Txn& t, size_t i, int64_t now_ms) {
  BranchSlot& b = t.branches[i];
  int shift = static_cast<int>(std::min<uint32_t>(b.attempts > 0 ? b.attempts - 1 : 0, 20));
  int64_t delay = std::min(opts_.retry_max_ms, opts_.retry_min_ms << shift);
  resend_after(t, i, delay, "branch retry", now_ms);
}

void CoordinatorMachine::resend_after(Txn& t, size_t i, int64_t delay_ms, std::string_view what,
                                      int64_t now_ms) {
  const BranchSlot& b = t.branches[i];
  log_.warn(what, {{"gid", t.gid},
                   {"branch", b.participant},
                   {"state", branch_state_name(b.state)},
                   {"attempt", b.attempts},
                   {"delay_ms", delay_ms},
                   {"error", b.last_error}});
  schedule(t, now_ms + delay_ms, TimerKind::resend, static_cast<uint32_t>(i));
}

wal::TxnRecord CoordinatorMachine::record_of(const Txn& t, int64_t now_ms) const {
  if (calls_ops(t.protocol)) return record_of_ops(t, now_ms);
  wal::TxnRecord r;
  r.gid = t.gid;
  r.protocol = t.protocol;
  bool all_read_only = std::all_of(t.branches.begin(), t.branches.end(), [](const BranchSlot& b) {
    return b.state == BranchState::read_only;
  });
  if (t.decision == Decision::abort)
    r.decision = wal::Decision::aborted;
  else if (t.one_phase)
    r.decision = wal::Decision::one_phase;
  else if (all_read_only)
    r.decision = wal::Decision::committed_read_only;
  else
    r.decision =
        t.protocol == Protocol::two_phase ? wal::Decision::commit : wal::Decision::precommit;
  r.ended = terminal(t.state);
  r.heuristic_mixed = t.heuristic_mixed;
  r.decided_wall_ms = t.decided_ms;
  r.ended_wall_ms = r.ended ? now_ms : 0;
  for (auto& b : t.branches) r.branches.push_back({b.participant, b.url, outcome_of(b)});
  if (!t.notify.empty())
    if (auto op = parse_json(t.notify); op.ok()) r.options = dump(Json{{"notify", std::move(*op)}});
  return r;
}

void CoordinatorMachine::persist(Txn& t, bool sync, bool notify, int64_t now_ms) {
  wal::TxnRecord rec = record_of(t, now_ms);
  if (rec.ended) notify_outcome(t, now_ms);
  ready_.persist.push_back(Persist{std::move(rec), sync, notify});
}

TxnView CoordinatorMachine::view_of(const Txn& t) const {
  TxnView v;
  v.gid = t.gid;
  v.protocol = t.protocol;
  v.state = t.state;
  // The decision is announced only once it cannot be lost: agents' in-doubt resolvers act on
  // it. A one-phase transaction has no decision of its own: its branch's answer is the outcome.
  v.decision = t.decision;
  if (t.decision == Decision::commit && !t.decision_durable) v.decision = Decision::none;
  if (t.one_phase && t.decision == Decision::commit)
    v.decision = t.state == TxnState::committed ? Decision::commit
                 : t.state == TxnState::aborted ? Decision::abort
                                                : Decision::none;
  v.reason = t.reason;
  v.reason_branch = t.reason_branch;
  v.one_phase = t.one_phase;
  v.recovered = t.recovered;
  v.created_ms = t.created_ms;
  v.decided_ms = t.decided_ms;
  bool waits = t.state == TxnState::active || (t.state == TxnState::running && t.saga.timeout_ms);
  v.deadline_ms = waits ? t.deadline_ms : 0;
  for (auto& b : t.branches) {
    v.branches.push_back({b.participant, b.url, b.state, b.attempts, b.last_error,
                          b.heuristic || b.forced, b.forced, b.result});
    if (t.protocol == Protocol::notify && !b.ops.empty()) v.branches.back().spec = b.ops[0].json;
  }
  return v;
}

ClientReply CoordinatorMachine::reply_for(const Txn& t, RequestKind kind, uint64_t waiter) const {
  if (calls_ops(t.protocol)) return reply_for_ops(t, kind, waiter);
  ClientReply r;
  r.waiter = waiter;
  r.kind = kind;
  r.view = view_of(t);
  if (kind == RequestKind::get) return r;
  bool commit_asked = kind == RequestKind::commit;
  if (t.state == TxnState::heuristic_mixed) {
    r.answer = Answer::contrary;
  } else if (t.decision == Decision::abort) {
    if (!terminal(t.state)) r.view.state = TxnState::aborted;  // the outcome is settled
    r.answer = commit_asked ? Answer::contrary : Answer::done;
  } else if (t.decision == Decision::commit) {
    if (t.state == TxnState::aborted) {  // a one-phase branch answered abort
      r.answer = commit_asked ? Answer::contrary : Answer::done;
    } else if (t.state == TxnState::committed) {
      r.answer = commit_asked ? Answer::done : Answer::contrary;
    } else {
      // Decided, phase 2 still running: the outcome is commit.
      r.answer = commit_asked ? Answer::pending : Answer::contrary;
    }
  } else {
    r.answer = Answer::contrary;
    r.error = conflict("transaction " + t.gid + " is " + std::string(state_name(t.state)));
  }
  return r;
}

// A commit, abort or resolve of a notification's id: refused, its view alone answers.
ClientReply CoordinatorMachine::not_a_transaction(ClientReply r) {
  r.view = TxnView{};
  r.error = conflict("that id is a notification's, not a transaction's");
  return r;
}

ClientReply CoordinatorMachine::reply_from_record(const wal::TxnRecord& rec, RequestKind kind) {
  ClientReply r;
  r.kind = kind;
  r.view = view_from_record(rec);
  if (kind == RequestKind::get) return r;
  if (rec.protocol == Protocol::notify) return not_a_transaction(std::move(r));
  bool commit_asked = kind == RequestKind::commit;
  switch (r.view.state) {
    case TxnState::committed: r.answer = commit_asked ? Answer::done : Answer::contrary; break;
    case TxnState::aborted: r.answer = commit_asked ? Answer::contrary : Answer::done; break;
    case TxnState::committing: r.answer = commit_asked ? Answer::pending : Answer::contrary; break;
    default: r.answer = Answer::contrary; break;
  }
  return r;
}

TxnView CoordinatorMachine::view_from_record(const wal::TxnRecord& rec) {
  if (calls_ops(rec.protocol)) return view_from_record_ops(rec);
  TxnView v;
  v.gid = rec.gid;
  v.protocol = rec.protocol;
  v.decided_ms = rec.decided_wall_ms;
  v.one_phase = rec.decision == wal::Decision::one_phase;
  bool commit = rec.decision != wal::Decision::aborted;
  v.decision = commit ? Decision::commit : Decision::abort;
  for (auto& b : rec.branches)
    v.branches.push_back({b.participant, b.url, state_of(b.outcome, commit), 0, "",
                          against_decision(rec, b.outcome),
                          b.outcome == wal::BranchOutcome::forced});
  if (rec.heuristic_mixed) {
    v.state = TxnState::heuristic_mixed;
  } else if (!rec.ended) {
    v.state = commit ? TxnState::committing : TxnState::aborting;
  } else if (rec.decision == wal::Decision::one_phase) {
    bool committed =
        !rec.branches.empty() && (rec.branches[0].outcome == wal::BranchOutcome::committed ||
                                  rec.branches[0].outcome == wal::BranchOutcome::forced);
    v.state = committed ? TxnState::committed : TxnState::aborted;
    if (!committed) {
      v.reason = "branch_aborted";
      v.decision = Decision::abort;
    }
  } else {
    v.state = commit ? TxnState::committed : TxnState::aborted;
  }
  return v;
}

ClientReply CoordinatorMachine::reply_without_record(std::string_view gid, RequestKind kind,
                                                     bool forgotten) {
  ClientReply r;
  r.kind = kind;
  r.view.gid = std::string(gid);
  r.view.state = TxnState::aborted;
  if (forgotten) {
    r.view.forgotten = true;
    r.error = Status(Code::not_found, "the outcome of " + std::string(gid) +
                                          " is older than the retention window and was forgotten");
    r.answer = kind == RequestKind::get ? Answer::done : Answer::contrary;
    return r;
  }
  r.view.presumed = true;
  r.view.decision = Decision::abort;
  r.view.reason = "presumed_abort";
  r.answer = kind == RequestKind::commit ? Answer::contrary : Answer::done;
  return r;
}

std::optional<ClientReply> CoordinatorMachine::reply_not_live(std::string_view gid,
                                                              RequestKind kind,
                                                              uint64_t waiter) const {
  ClientReply r;
  r.kind = kind;
  r.waiter = waiter;
  // A finished transaction still in memory answers from its view.
  auto it = finished_index_.find(std::string(gid));
  if (it != finished_index_.end()) {
    r.view = finished_by_serial_.at(it->second);
    if (r.view.protocol == Protocol::notify && kind != RequestKind::get)
      return not_a_transaction(std::move(r));
    switch (r.view.state) {
      case TxnState::committed:
        r.answer = kind == RequestKind::abort ? Answer::contrary : Answer::done;
        break;
      case TxnState::aborted:
        r.answer = kind == RequestKind::commit ? Answer::contrary : Answer::done;
        break;
      default: r.answer = kind == RequestKind::get ? Answer::done : Answer::contrary; break;
    }
    return r;
  }
  Lookup l = lookup(gid);
  switch (l.kind) {
    case LookupKind::live: return std::nullopt;  // the caller handles live transactions
    case LookupKind::in_log:
      r.view.gid = std::string(gid);
      r.needs_log = true;
      r.view.forgotten = l.forgotten_if_absent;
      return r;
    case LookupKind::presumed_aborted:
    case LookupKind::forgotten:
      r = reply_without_record(gid, kind, l.kind == LookupKind::forgotten);
      r.waiter = waiter;
      return r;
    case LookupKind::not_ours: break;
  }
  r.error = not_found("no transaction " + std::string(gid));
  return r;
}

// --- start-up ------------------------------------------------------------------------------

void CoordinatorMachine::recover(uint64_t epoch, std::optional<GidParts> forgotten_below,
                                 std::vector<wal::TxnRecord> unfinished, int64_t now_ms) {
  TPC_ASSERT(epoch > 0);
  epoch_ = epoch;
  next_seq_ = 1;
  forgotten_below_ = std::move(forgotten_below);
  for (auto& rec : unfinished) {
    TPC_ASSERT(!rec.ended);
    auto parts = parse_gid(rec.gid);
    if (!parts || parts->coordinator != opts_.coordinator_id) {
      log_.error("recovery skips a record of another coordinator", {{"gid", rec.gid}});
      continue;
    }
    if (calls_ops(rec.protocol)) {
      recover_ops(rec, *parts, now_ms);
      continue;
    }
    Txn t;
    t.serial = next_serial_++;
    t.gid = rec.gid;
    t.parts = *parts;
    t.protocol = rec.protocol;
    t.recovered = true;
    t.created_ms = now_ms;
    t.decided_ms = rec.decided_wall_ms;
    t.heuristic_mixed = rec.heuristic_mixed;
    t.notify = notify_of_options(rec.options);
    bool commit = rec.decision != wal::Decision::aborted;
    t.decision = commit ? Decision::commit : Decision::abort;
    t.decision_durable = true;
    t.one_phase = rec.decision == wal::Decision::one_phase;
    t.state = commit ? TxnState::committing : TxnState::aborting;
    for (auto& b : rec.branches) {
      BranchSlot s;
      s.participant = b.participant;
      s.url = b.url;
      s.state = state_of(b.outcome, commit);
      s.forced = b.outcome == wal::BranchOutcome::forced;
      t.branches.push_back(std::move(s));
    }
    std::string gid = t.gid;
    auto [it, inserted] = live_.emplace(gid, std::move(t));
    TPC_ASSERT(inserted);
    Txn& tx = it->second;
    unfinished_order_[{tx.parts.epoch, tx.parts.seq}]++;
    ++recovering_;
    ++counters_.recovered;
    log_.info("recovered", {{"gid", tx.gid},
                            {"decision", wal::decision_name(rec.decision)},
                            {"state", state_name(tx.state)}});
    MsgKind kind = !commit        ? MsgKind::abort
                   : tx.one_phase ? MsgKind::commit_one_phase
                                  : MsgKind::commit;
    send_to_all(tx, commit ? BranchState::committing : BranchState::aborting, kind);
    maybe_finish(tx, now_ms);
  }
}

// --- client requests ---------------------------------------------------------------------

Result<TxnView> CoordinatorMachine::begin(Protocol protocol, std::optional<int64_t> timeout_ms,
                                          int64_t now_ms, std::string notify) {
  if (protocol == Protocol::saga)
    return invalid_argument("a saga begins with its steps: POST /v1/transactions/run");
  if (protocol == Protocol::msg)
    return invalid_argument("a message begins with its destinations and check (begin_msg)");
  if (protocol == Protocol::notify)
    return invalid_argument("a notification is sent with POST /v1/notifications");
  auto view = begin_txn(protocol, timeout_ms, true, now_ms);
  if (view.ok()) find(view->gid)->notify = std::move(notify);
  return view;
}

// `expires`: whether the transaction's timeout is armed. A one-shot transaction is committed in
// the same step it begins, so it never waits as active and needs no timer.
Result<TxnView> CoordinatorMachine::begin_txn(Protocol protocol, std::optional<int64_t> timeout_ms,
                                              bool expires, int64_t now_ms, bool capped) {
  TPC_ASSERT(epoch_ > 0);
  if (capped && live_.size() >= opts_.open_txns_max)
    return unavailable(
        "too many open transactions (open_txns_max=" + std::to_string(opts_.open_txns_max) + ")");
  int64_t timeout = timeout_ms.value_or(opts_.txn_timeout_default_ms);
  if (timeout < 1 || timeout > opts_.txn_timeout_max_ms)
    return invalid_argument("\"timeout_ms\" must be between 1 and " +
                            std::to_string(opts_.txn_timeout_max_ms));
  Txn t;
  t.serial = next_serial_++;
  t.parts = GidParts{opts_.coordinator_id, epoch_, next_seq_++};
  t.gid = make_gid(opts_.coordinator_id, t.parts.epoch, t.parts.seq);
  t.protocol = protocol;
  t.created_ms = now_ms;
  t.deadline_ms = now_ms + timeout;
  std::string gid = t.gid;
  Txn& tx = live_.emplace(gid, std::move(t)).first->second;
  if (holds_finished_below(protocol)) unfinished_order_[{tx.parts.epoch, tx.parts.seq}]++;
  if (expires) schedule(tx, tx.deadline_ms, TimerKind::txn_timeout, 0, !timeout_ms.has_value());
  ++counters_.begun[protocol_index(protocol)];
  if (log_.enabled(LogLevel::info))
    log_.info("begin", {{"gid", tx.gid}, {"protocol", protocol_name(protocol)}});
  return view_of(tx);
}

ClientReply CoordinatorMachine::enlist(std::string_view gid, std::string_view participant,
                                       std::string_view url, int64_t now_ms,
                                       std::string_view instance) {
  ClientReply r;
  if (!valid_participant_name(participant)) {
    r.error = invalid_argument("participant name must match [A-Za-z0-9_-]{1,32}");
    return r;
  }
  Txn* t = find(gid);
  if (t && calls_ops(t->protocol)) {
    r.answer = Answer::contrary;
    r.error = conflict("transaction " + t->gid + " is " + std::string(protocol_name(t->protocol)) +
                       "; agents do not enlist in it");
    return r;
  }
  if (!t) {
    auto parts = parse_gid(gid);
    if (parts && issued(*parts)) {
      r.answer = Answer::contrary;
      r.error = conflict("transaction " + std::string(gid) + " is not active");
    } else {
      r.error = not_found("no transaction " + std::string(gid));
    }
    return r;
  }
  if (t->state != TxnState::active) {
    r.answer = Answer::contrary;
    r.error = conflict("transaction " + t->gid + " is " + std::string(state_name(t->state)) +
                       "; branches enlist only while it is active");
    refuse_enlist(*t, participant, now_ms);
    return r;
  }
  for (auto& b : t->branches) {
    if (b.participant != participant) continue;
    if (b.url != url) {
      r.answer = Answer::contrary;
      r.error = conflict("participant " + b.participant + " is enlisted with url " + b.url);
      refuse_enlist(*t, participant, now_ms);
      return r;
    }
    if (!b.instance.empty() && !instance.empty() && b.instance != instance) {
      r.answer = Answer::contrary;
      r.error = conflict("participant " + b.participant +
                         " restarted since it enlisted: the branch's work is lost, the transaction "
                         "can only roll back");
      refuse_enlist(*t, participant, now_ms);
      return r;
    }
    r.answer = Answer::done;
    r.view = view_of(*t);
    return r;
  }
  if (t->branches.size() >= opts_.branches_per_txn_max) {
    r.error = Status(Code::too_large, "a transaction has at most " +
                                          std::to_string(opts_.branches_per_txn_max) + " branches");
    refuse_enlist(*t, participant, now_ms);
    return r;
  }
  BranchSlot b;
  b.participant = std::string(participant);
  b.url = std::string(url);
  b.instance = std::string(instance);
  t->branches.push_back(std::move(b));
  if (log_.enabled(LogLevel::debug))
    log_.debug("enlist", {{"gid", t->gid}, {"branch", participant}, {"url", url}});
  r.answer = Answer::created;
  r.view = view_of(*t);
  return r;
}

// A branch the transaction could not take holds writes the client meant to commit: the
// transaction can only roll back. Before the decision that is final (rollback-only while
// active; an abort at once while votes are out); after it, the refused branch never ran.
void CoordinatorMachine::refuse_enlist(Txn& t, std::string_view participant, int64_t now_ms) {
  if (t.decision != Decision::none || t.rollback_only) return;
  log_.warn("enlist refused: the transaction can only roll back",
            {{"gid", t.gid}, {"branch", participant}, {"state", state_name(t.state)}});
  if (t.state != TxnState::active) {
    decide_abort(t, "enlist_refused", participant, now_ms);
    return;
  }
  t.rollback_only = true;
  t.reason = "enlist_refused";
  t.reason_branch = std::string(participant);
}

std::optional<ClientReply> CoordinatorMachine::commit(std::string_view gid, uint64_t waiter,
                                                      CommitOptions opts, int64_t now_ms) {
  Txn* t = find(gid);
  if (!t) return reply_not_live(gid, RequestKind::commit, waiter);
  if (t->waiters.size() >= opts_.waiters_per_txn_max) {
    ClientReply r;
    r.waiter = waiter;
    r.kind = RequestKind::commit;
    r.error = unavailable("too many requests waiting on " + t->gid);
    return r;
  }
  if (calls_ops(t->protocol)) return tcc_commit(*t, waiter, opts, now_ms);
  if (t->decision == Decision::abort) return reply_for(*t, RequestKind::commit, waiter);
  if (t->decision == Decision::commit && t->decision_durable && opts.wait_decision_only)
    return reply_for(*t, RequestKind::commit, waiter);
  t->waiters.push_back(Waiter{waiter, RequestKind::commit, opts.wait_decision_only});
  schedule(*t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
  if (t->state != TxnState::active || t->decision != Decision::none)
    return std::nullopt;  // joins the commit in progress

  if (t->rollback_only) {
    std::string branch = t->reason_branch;
    decide_abort(*t, "enlist_refused", branch, now_ms);
    return std::nullopt;
  }

  if (t->branches.empty()) {
    commit_without_phase2(*t, now_ms);
  } else if (t->branches.size() == 1) {
    start_one_phase(*t, now_ms);
  } else {
    start_prepare(*t, now_ms);
  }
  return std::nullopt;
}

Result<std::string> CoordinatorMachine::run(Protocol protocol, const std::vector<Peer>& branches,
                                            uint64_t waiter, CommitOptions opts, int64_t now_ms,
                                            std::string notify) {
  if (!prepares_branches(protocol)) return invalid_argument("a one-shot transaction is 2pc or 3pc");
  if (branches.empty()) return invalid_argument("\"branches\" must not be empty");
  if (branches.size() > opts_.branches_per_txn_max)
    return Status(Code::too_large, "a transaction has at most " +
                                       std::to_string(opts_.branches_per_txn_max) + " branches");
  for (size_t i = 0; i < branches.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (branches[i].participant == branches[j].participant)
        return invalid_argument("participant " + branches[i].participant + " appears twice");
  auto view = begin_txn(protocol, std::nullopt, false, now_ms);
  if (!view.ok()) return view.status();
  Txn& t = *find(view->gid);
  t.oneshot = true;
  t.notify = std::move(notify);
  for (auto& b : branches) {
    BranchSlot slot;
    slot.participant = b.participant;
    slot.url = b.url;
    t.branches.push_back(std::move(slot));
  }
  std::string gid = t.gid;
  auto immediate = commit(gid, waiter, opts, now_ms);
  TPC_ASSERT(!immediate.has_value());  // a fresh, active transaction with branches
  return gid;
}

std::optional<ClientReply> CoordinatorMachine::abort(std::string_view gid, uint64_t waiter,
                                                     int64_t now_ms) {
  Txn* t = find(gid);
  if (!t) return reply_not_live(gid, RequestKind::abort, waiter);
  if (calls_ops(t->protocol)) return ops_abort(*t, waiter, now_ms);
  if (t->decision == Decision::none) {
    decide_abort(*t, "client", "", now_ms);
    // decide_abort may have finished (and erased) the transaction.
    if (Txn* still = find(gid)) return reply_for(*still, RequestKind::abort, waiter);
    return reply_not_live(gid, RequestKind::abort, waiter);
  }
  return reply_for(*t, RequestKind::abort, waiter);
}

ClientReply CoordinatorMachine::resolve(std::string_view gid, bool commit, int64_t now_ms) {
  RequestKind kind = RequestKind::resolve;
  Txn* t = find(gid);
  if (!t) {
    auto r = reply_not_live(gid, kind, 0);
    TPC_ASSERT(r.has_value());
    if (r->needs_log || !r->error.ok()) return *r;
    bool committed = r->view.state == TxnState::committed;
    r->answer = committed == commit ? Answer::done : Answer::contrary;
    return *r;
  }
  if (calls_ops(t->protocol)) return resolve_ops(*t, commit, now_ms);
  ClientReply r;
  r.kind = kind;
  if (t->decision == Decision::none) {
    if (commit) {
      r.answer = Answer::contrary;
      r.error = conflict("transaction " + t->gid +
                         " has no commit decision; the only safe resolution is abort");
      return r;
    }
    decide_abort(*t, "operator", "", now_ms);
  } else if ((t->decision == Decision::commit) != commit) {
    r.answer = Answer::contrary;
    r.error =
        conflict(std::string("the decision of ") + t->gid + " is " +
                 (t->decision == Decision::commit ? "commit" : "abort") + " and never changes");
    return r;
  } else {
    force_pending(*t, commit ? BranchState::committed : BranchState::aborted);
  }
  if (Txn* still = find(gid)) {
    maybe_finish(*still, now_ms);
  }
  if (Txn* still = find(gid)) return reply_for(*still, RequestKind::get, 0);
  auto done = reply_not_live(gid, RequestKind::get, 0);
  TPC_ASSERT(done.has_value());
  done->kind = kind;
  return *done;
}

void CoordinatorMachine::force_pending(Txn& t, BranchState to) {
  for (auto& b : t.branches)
    if (!branch_final(b.state)) force_branch(t, b, to);
}

void CoordinatorMachine::force_branch(const Txn& t, BranchSlot& b, BranchState to) {
  log_.warn("branch resolved by operator", {{"gid", t.gid},
                                            {"branch", b.participant},
                                            {"from", branch_state_name(b.state)},
                                            {"to", branch_state_name(to)}});
  b.state = to;
  b.forced = true;
  b.in_flight = false;
  b.last_error = "resolved by operator";
}

void CoordinatorMachine::set_forgotten_below(GidParts below) {
  if (!forgotten_below_ || *forgotten_below_ < below) forgotten_below_ = std::move(below);
}

Lookup CoordinatorMachine::lookup(std::string_view gid) const {
  Lookup l;
  if (const Txn* t = find(gid)) {
    l.kind = LookupKind::live;
    l.view = view_of(*t);
    return l;
  }
  auto it = finished_index_.find(std::string(gid));
  if (it != finished_index_.end()) {
    l.kind = LookupKind::live;
    l.view = finished_by_serial_.at(it->second);
    return l;
  }
  auto parts = parse_gid(gid);
  if (!parts || !issued(*parts)) {
    l.kind = LookupKind::not_ours;
    return l;
  }
  l.kind = LookupKind::in_log;
  l.forgotten_if_absent = forgotten_below_ && *parts < *forgotten_below_;
  return l;
}

// The `limit` live transactions with the highest (newest) or lowest (oldest) serials among
// those `keep` accepts, in that order. Only pointers are gathered and only `limit` of them
// ordered: a view of a few entries never sorts the whole table under the driver's lock.
std::vector<const Txn*> CoordinatorMachine::live_by_serial(
    const std::function<bool(const Txn&)>& keep, size_t limit, bool newest) const {
  std::vector<const Txn*> picked;
  for (auto& [gid, t] : live_)
    if (keep(t)) picked.push_back(&t);
  auto order = [newest](const Txn* a, const Txn* b) {
    return newest ? a->serial > b->serial : a->serial < b->serial;
  };
  size_t n = std::min(limit, picked.size());
  std::partial_sort(picked.begin(), picked.begin() + static_cast<std::ptrdiff_t>(n), picked.end(),
                    order);
  picked.resize(n);
  return picked;
}

std::vector<TxnView> CoordinatorMachine::list(std::optional<TxnState> state, size_t limit,
                                              std::optional<Protocol> protocol) const {
  auto wanted = [&](Protocol p, TxnState st) {
    bool kind = protocol ? p == *protocol : p != Protocol::notify;
    return kind && (!state || st == *state);
  };
  auto live =
      live_by_serial([&](const Txn& t) { return wanted(t.protocol, t.state); }, limit, true);
  // Newest first: merge the live ones with the finished ones, which are kept by serial.
  std::vector<TxnView> out;
  auto fin = finished_by_serial_.rbegin();
  size_t li = 0;
  while (out.size() < limit) {
    while (fin != finished_by_serial_.rend() && !wanted(fin->second.protocol, fin->second.state))
      ++fin;
    bool have_fin = fin != finished_by_serial_.rend(), have_live = li < live.size();
    if (!have_fin && !have_live) break;
    if (have_live && (!have_fin || live[li]->serial > fin->first)) {
      out.push_back(view_of(*live[li++]));
    } else {
      out.push_back(fin->second);
      ++fin;
    }
  }
  return out;
}

std::vector<TxnView> CoordinatorMachine::in_doubt(int64_t now_ms, size_t limit) const {
  std::vector<TxnView> out;
  for (auto& [key, v] : heuristics_) {
    if (out.size() >= limit) break;
    out.push_back(v);
  }
  if (out.size() >= limit) return out;
  auto decided = live_by_serial(
      [now_ms](const Txn& t) {
        // A half message past its timeout is being checked back: its producer is silent.
        bool checking = t.state == TxnState::prepared && t.deadline_ms <= now_ms;
        if (t.protocol == Protocol::notify) return false;  // best effort: it gives up
        return t.decision != Decision::none || t.state == TxnState::failed || checking;
      },
      limit - out.size(), false);
  for (const Txn* t : decided) out.push_back(view_of(*t));
  return out;
}

size_t CoordinatorMachine::prepared_unfinished() const {
  size_t n = 0;
  for (auto& [gid, t] : live_)
    if (t.decision != Decision::none && prepares_branches(t.protocol)) ++n;
  return n;
}

GidParts CoordinatorMachine::finished_below() const {
  if (unfinished_order_.empty()) return GidParts{opts_.coordinator_id, epoch_, next_seq_};
  auto [epoch, seq] = unfinished_order_.begin()->first;
  return GidParts{opts_.coordinator_id, epoch, seq};
}

// --- protocol ------------------------------------------------------------------------------

void CoordinatorMachine::start_prepare(Txn& t, int64_t now_ms) {
  set_state(t, TxnState::preparing);
  t.prepare_deadline_ms = now_ms + opts_.prepare_timeout_ms;
  schedule(t, t.prepare_deadline_ms, TimerKind::prepare_timeout, 0, true);
  send_to_all(t, BranchState::active, MsgKind::prepare);
}

void CoordinatorMachine::start_one_phase(Txn& t, int64_t now_ms) {
  TPC_ASSERT(t.branches.size() == 1 && t.decision == Decision::none);
  t.one_phase = true;
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  ++counters_.one_phase;
  set_state(t, TxnState::committing);
  persist(t, /*sync=*/true, /*notify=*/true, now_ms);
}

void CoordinatorMachine::commit_without_phase2(Txn& t, int64_t now_ms) {
  // Nothing to drive (no branch, or every branch read-only), but the answer must survive a
  // crash like any commit: the ended record is synced before anyone is told committed.
  TPC_ASSERT(t.decision == Decision::none);
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  t.nothing_to_drive = true;
  wal::TxnRecord r = record_of(t, now_ms);
  r.decision = wal::Decision::committed_read_only;
  r.ended = true;
  r.ended_wall_ms = now_ms;
  ready_.persist.push_back(Persist{std::move(r), /*sync=*/true, /*notify=*/true});
}

void CoordinatorMachine::decide_commit(Txn& t, int64_t now_ms) {
  TPC_ASSERT(t.decision == Decision::none);
  t.decision = Decision::commit;
  t.decided_ms = now_ms;
  persist(t, /*sync=*/true, /*notify=*/true, now_ms);
}

void CoordinatorMachine::take_abort(Txn& t, std::string_view reason, std::string_view branch,
                                    TxnState state, int64_t now_ms) {
  TPC_ASSERT_MSG(t.decision == Decision::none, "a decision never changes");
  t.decision = Decision::abort;
  t.decided_ms = now_ms;
  t.reason = std::string(reason);
  t.reason_branch = std::string(branch);
  set_state(t, state);
}

void CoordinatorMachine::decide_abort(Txn& t, std::string_view reason, std::string_view branch,
                                      int64_t now_ms) {
  take_abort(t, reason, branch, TxnState::aborting, now_ms);
  for (size_t i = 0; i < t.branches.size(); ++i) {
    BranchSlot& b = t.branches[i];
    if (b.state == BranchState::active || b.state == BranchState::preparing ||
        b.state == BranchState::prepared) {
      b.attempts = 0;
      send(t, i, MsgKind::abort);
    }
  }
  answer_waiters(t, false);
  maybe_finish(t, now_ms);
}

void CoordinatorMachine::after_votes(Txn& t, int64_t now_ms) {
  for (auto& b : t.branches)
    if (b.state == BranchState::preparing) return;  // still waiting
  size_t writers = 0;
  for (auto& b : t.branches) writers += b.state == BranchState::prepared;
  if (writers == 0) {
    commit_without_phase2(t, now_ms);
    return;
  }
  decide_commit(t, now_ms);
}

void CoordinatorMachine::on_persisted(std::string_view gid, int64_t now_ms, uint64_t seq) {
  Txn* t = find(gid);
  if (t && calls_ops(t->protocol)) return ops_persisted(*t, seq, now_ms);
  if (!t || t->decision != Decision::commit || t->decision_durable) return;
  t->decision_durable = true;
  if (t->nothing_to_drive) {
    set_state(*t, TxnState::committed);
    finish(t->gid, now_ms);
    return;
  }
  if (log_.enabled(LogLevel::debug)) log_.debug("decision durable", {{"gid", t->gid}});
  if (t->one_phase) {
    send_to_all(*t, BranchState::active, MsgKind::commit_one_phase);
  } else if (t->protocol == Protocol::three_phase) {
    set_state(*t, TxnState::precommitted);
    send_to_all(*t, BranchState::prepared, MsgKind::precommit);
  } else {
    set_state(*t, TxnState::committing);
    send_to_all(*t, BranchState::prepared, MsgKind::commit);
  }
  answer_waiters(*t, true);
  maybe_finish(*t, now_ms);
}

namespace {

// The state a branch waits in for the answer to a message of this kind.
BranchState awaited_state(MsgKind kind) {
  switch (kind) {
    case MsgKind::prepare:
    case MsgKind::exec_prepare: return BranchState::preparing;
    case MsgKind::precommit: return BranchState::precommitting;
    case MsgKind::commit:
    case MsgKind::commit_one_phase:
    case MsgKind::exec_commit: return BranchState::committing;
    case MsgKind::abort: return BranchState::aborting;
  }
  return BranchState::active;
}

}  // namespace

void CoordinatorMachine::on_reply(const BranchReply& reply, int64_t now_ms) {
  Txn* t = find(reply.gid);
  if (!t) return;
  size_t i = 0;
  while (i < t->branches.size() && t->branches[i].participant != reply.participant) ++i;
  if (i == t->branches.size()) return;
  BranchSlot& b = t->branches[i];
  // Only the answer to the message the branch is waiting for counts; anything else is late.
  if (b.state != awaited_state(reply.kind) || !b.in_flight) return;
  b.in_flight = false;
  if (!reply.reason.empty()) b.last_error = reply.reason;
  bool settled = false;
  switch (reply.kind) {
    case MsgKind::prepare:
    case MsgKind::exec_prepare: return on_vote(*t, b, reply, now_ms);
    case MsgKind::precommit: settled = on_precommit_answer(*t, b, reply); break;
    case MsgKind::commit:
    case MsgKind::commit_one_phase:
    case MsgKind::exec_commit: settled = on_commit_answer(*t, b, reply); break;
    case MsgKind::abort: settled = on_abort_answer(*t, b, reply); break;
  }
  if (!settled) return schedule_resend(*t, i, now_ms);
  if (reply.kind == MsgKind::precommit &&
      std::none_of(t->branches.begin(), t->branches.end(),
                   [](const BranchSlot& s) { return s.state == BranchState::precommitting; })) {
    set_state(*t, TxnState::committing);
    send_to_all(*t, BranchState::precommitted, MsgKind::commit);
  }
  maybe_finish(*t, now_ms);
}

void CoordinatorMachine::on_vote(Txn& t, BranchSlot& b, const BranchReply& reply, int64_t now_ms) {
  if (t.decision != Decision::none) return;
  switch (reply.reply) {
    case ReplyKind::vote_yes: b.state = BranchState::prepared; break;
    case ReplyKind::vote_read_only:
      b.state = BranchState::read_only;
      ++counters_.read_only_branches;
      break;
    case ReplyKind::vote_no:
      b.state = BranchState::aborted;
      decide_abort(t, "vote_no", b.participant, now_ms);
      return;
    default:
      // No usable answer: the branch may or may not be prepared; abort is sent to it.
      decide_abort(t, "prepare_failed", b.participant, now_ms);
      return;
  }
  after_votes(t, now_ms);
}

// False: no usable answer, the pre-commit is sent again.
bool CoordinatorMachine::on_precommit_answer(Txn& t, BranchSlot& b, const BranchReply& reply) {
  if (reply.reply == ReplyKind::precommitted) {
    b.state = BranchState::precommitted;
    return true;
  }
  if (reply.reply != ReplyKind::aborted && reply.reply != ReplyKind::committed) return false;
  // The branch decided on its own (3PC timeout): commit is fine, abort is heuristic.
  b.state = reply.reply == ReplyKind::committed ? BranchState::committed : BranchState::aborted;
  b.heuristic = reply.reply == ReplyKind::aborted;
  if (b.heuristic) t.heuristic_mixed = true;
  return true;
}

// False: no usable answer, the commit is sent again.
bool CoordinatorMachine::on_commit_answer(Txn& t, BranchSlot& b, const BranchReply& reply) {
  if (reply.reply == ReplyKind::committed) {
    b.state = BranchState::committed;
    return true;
  }
  if (reply.reply != ReplyKind::aborted) return false;
  b.state = BranchState::aborted;
  if (t.one_phase) {
    t.reason = "branch_aborted";
    t.reason_branch = b.participant;
  } else {
    b.heuristic = true;
    t.heuristic_mixed = true;
    log_.warn("branch aborted against a commit decision",
              {{"gid", t.gid}, {"branch", b.participant}, {"reason", reply.reason}});
  }
  return true;
}

// False: no usable answer, the abort is sent again.
bool CoordinatorMachine::on_abort_answer(Txn& t, BranchSlot& b, const BranchReply& reply) {
  if (reply.reply == ReplyKind::aborted) {
    b.state = BranchState::aborted;
    return true;
  }
  if (reply.reply != ReplyKind::committed) return false;
  b.state = BranchState::committed;
  b.heuristic = true;
  t.heuristic_mixed = true;
  log_.warn("branch committed against an abort decision",
            {{"gid", t.gid}, {"branch", b.participant}});
  return true;
}

void CoordinatorMachine::maybe_finish(Txn& t, int64_t now_ms) {
  if (t.decision == Decision::none) return;
  if (t.decision == Decision::commit && !t.decision_durable) return;
  for (auto& b : t.branches)
    if (!branch_final(b.state) || b.in_flight) return;
  if (t.heuristic_mixed) {
    log_mixed(t);
    set_state(t, TxnState::heuristic_mixed);
  } else if (t.decision == Decision::abort ||
             (t.one_phase && t.branches[0].state == BranchState::aborted)) {
    set_state(t, TxnState::aborted);
  } else {
    set_state(t, TxnState::committed);
  }
  finish(t.gid, now_ms);
}

void CoordinatorMachine::log_mixed(const Txn& t) {
  std::vector<LogField> fields;
  fields.emplace_back("gid", t.gid);
  fields.emplace_back("decision", t.decision == Decision::commit ? "commit" : "abort");
  std::string outcomes;
  for (auto& b : t.branches) {
    if (!outcomes.empty()) outcomes += ",";
    outcomes += b.participant + ":" + std::string(branch_state_name(b.state));
  }
  fields.emplace_back("branches", outcomes);
  log_.log(LogLevel::error, "heuristic outcome: branches disagree", fields);
  ++counters_.heuristic_mixed;
}

void CoordinatorMachine::finish(const std::string& gid_in, int64_t now_ms) {
  std::string gid = gid_in;  // the argument may live inside the transaction we erase
  Txn* tp = find(gid);
  TPC_ASSERT(tp != nullptr && terminal(tp->state));
  Txn& t = *tp;
  // Presumed abort: a plain abort leaves no record. Everything else is recorded as ended.
  bool record = calls_ops(t.protocol)
                    ? (t.writes > 0 || t.recovered) && !t.nothing_to_drive
                    : (t.decision == Decision::commit && !t.nothing_to_drive) || t.heuristic_mixed;
  if (record) persist(t, /*sync=*/false, /*notify=*/false, now_ms);
  notify_outcome(t, now_ms);  // when no end record was written (a plain abort), or earlier
  int p = protocol_index(t.protocol);
  if (t.state == TxnState::committed) ++counters_.committed[p];
  if (t.state == TxnState::aborted) ++counters_.aborted[p];
  answer_waiters(t, false);
  if (t.recovered) {
    TPC_ASSERT(recovering_ > 0);
    --recovering_;
  }
  auto key = std::make_pair(t.parts.epoch, t.parts.seq);
  if (!holds_finished_below(t.protocol))
    ;  // never in unfinished_order_
  else if (record)
    ending_[gid] = key;  // leaves unfinished_order_ once its end record is durable
  else
    release_order(key);
  remember_finished(view_of(t), t.serial);
  if (t.heuristic_mixed) heuristics_[key] = view_of(t);
  live_.erase(gid);
}

void CoordinatorMachine::release_order(std::pair<uint64_t, uint64_t> key) {
  auto it = unfinished_order_.find(key);
  if (it != unfinished_order_.end() && --it->second == 0) unfinished_order_.erase(it);
}

void CoordinatorMachine::on_ends_durable(const std::vector<std::string>& gids) {
  for (const auto& gid : gids) {
    auto it = ending_.find(gid);
    if (it == ending_.end()) continue;
    release_order(it->second);
    ending_.erase(it);
  }
}

void CoordinatorMachine::remember_finished(TxnView view, uint64_t serial) {
  finished_index_[view.gid] = serial;
  finished_by_serial_.emplace(serial, std::move(view));
  while (finished_by_serial_.size() > opts_.finished_kept_max) {
    auto oldest = finished_by_serial_.begin();
    finished_index_.erase(oldest->second.gid);
    finished_by_serial_.erase(oldest);
  }
}

void CoordinatorMachine::answer_waiters(Txn& t, bool only_decision_waiters) {
  std::vector<Waiter> keep;
  for (auto& w : t.waiters) {
    if (only_decision_waiters && !w.decision_only) {
      keep.push_back(w);
      continue;
    }
    ready_.replies.push_back(reply_for(t, w.kind, w.id));
  }
  t.waiters = std::move(keep);
}

// --- heuristic outcomes --------------------------------------------------------------------

void CoordinatorMachine::remember_heuristic(const wal::TxnRecord& rec) {
  auto parts = parse_gid(rec.gid);
  if (!parts || !rec.ended || !rec.heuristic_mixed) return;
  heuristics_[{parts->epoch, parts->seq}] = view_from_record(rec);
}

void CoordinatorMachine::on_record_rewritten(const wal::TxnRecord& rec) {
  auto parts = parse_gid(rec.gid);
  if (!parts) return;
  TxnView view = view_from_record(rec);
  auto it = finished_index_.find(rec.gid);
  if (it != finished_index_.end()) finished_by_serial_[it->second] = view;
  auto key = std::make_pair(parts->epoch, parts->seq);
  bool was = heuristics_.count(key) > 0;
  if (rec.heuristic_mixed) {
    heuristics_[key] = view;
    if (!was) log_mixed_record(rec);
  } else if (was) {
    heuristics_.erase(key);
    log_.info("heuristic outcome cleared", {{"gid", rec.gid}, {"state", state_name(view.state)}});
  }
}

void CoordinatorMachine::log_mixed_record(const wal::TxnRecord& rec) {
  TxnView v = view_from_record(rec);
  std::string outcomes;
  for (auto& b : v.branches) {
    if (!outcomes.empty()) outcomes += ",";
    outcomes += b.participant + ":" + std::string(branch_state_name(b.state));
  }
  log_.error("heuristic outcome: branches disagree",
             {{"gid", rec.gid},
              {"decision", v.decision == Decision::commit ? "commit" : "abort"},
              {"branches", outcomes},
              {"reported", "by a branch after the transaction ended"}});
  ++counters_.heuristic_mixed;
}

bool CoordinatorMachine::record_commits(const wal::TxnRecord& rec) {
  switch (rec.decision) {
    case wal::Decision::aborted: return false;
    case wal::Decision::one_phase:
      return !rec.branches.empty() && (rec.branches[0].outcome == wal::BranchOutcome::committed ||
                                       rec.branches[0].outcome == wal::BranchOutcome::forced);
    default: return true;
  }
}

std::optional<wal::TxnRecord> CoordinatorMachine::apply_branch_report(
    std::optional<wal::TxnRecord> rec, std::string_view gid, std::string_view participant,
    bool committed, int64_t now_ms) {
  if (!rec) {
    if (!committed) return std::nullopt;  // agrees with the presumed abort
    // A branch committed a transaction the coordinator never decided: record the abort it
    // answers with, and the branch that disagrees.
    wal::TxnRecord r;
    r.gid = std::string(gid);
    r.decision = wal::Decision::aborted;
    r.ended = true;
    r.decided_wall_ms = now_ms;
    r.ended_wall_ms = now_ms;
    rec = std::move(r);
  }
  wal::TxnRecord r = std::move(*rec);
  auto outcome = committed ? wal::BranchOutcome::committed : wal::BranchOutcome::aborted;
  auto b = std::find_if(r.branches.begin(), r.branches.end(),
                        [&](const wal::BranchRecord& x) { return x.participant == participant; });
  if (b == r.branches.end()) {
    r.branches.push_back({std::string(participant), "", outcome});
  } else if (b->outcome == outcome) {
    return std::nullopt;  // already known
  } else {
    b->outcome = outcome;
  }
  bool mixed = false;
  for (auto& x : r.branches)
    mixed = mixed || against_decision(r, x.outcome) || x.outcome == wal::BranchOutcome::forced;
  r.heuristic_mixed = mixed;
  return r;
}

// --- time ----------------------------------------------------------------------------------

void CoordinatorMachine::tick(int64_t now_ms) {
  for (int source; (source = next_timer_source()) >= 0 && timer_at(source).at_ms <= now_ms;) {
    Timer timer;
    if (source == 3) {
      timer = timers_.top();
      timers_.pop();
    } else {
      timer = std::move(timer_lanes_[source].front());
      timer_lanes_[source].pop_front();
    }
    on_timer(timer, now_ms);
  }
}

void CoordinatorMachine::on_timer(const Timer& timer, int64_t now_ms) {
  Txn* t = find(timer.gid);
  if (!t) return;
  if (calls_ops(t->protocol)) return on_ops_timer(*t, timer, now_ms);
  switch (timer.kind) {
    case TimerKind::txn_timeout:
      if (t->state == TxnState::active && t->decision == Decision::none && t->deadline_ms <= now_ms)
        decide_abort(*t, "timeout", "", now_ms);
      return;
    case TimerKind::prepare_timeout:
      if (t->state == TxnState::preparing && t->decision == Decision::none) {
        std::string late;
        for (auto& b : t->branches)
          if (b.state == BranchState::preparing) {
            late = b.participant;
            break;
          }
        decide_abort(*t, "prepare_timeout", late, now_ms);
      }
      return;
    case TimerKind::resend: {
      if (timer.branch >= t->branches.size()) return;
      BranchSlot& b = t->branches[timer.branch];
      if (b.in_flight) return;
      MsgKind kind;
      switch (b.state) {
        case BranchState::precommitting: kind = MsgKind::precommit; break;
        case BranchState::committing:
          kind = t->one_phase ? MsgKind::commit_one_phase : MsgKind::commit;
          break;
        case BranchState::aborting: kind = MsgKind::abort; break;
        default: return;
      }
      send(*t, timer.branch, kind);
      return;
    }
    case TimerKind::wait_timeout: {
      // Commit requests still waiting get 202 "committing" once the decision is commit.
      if (t->decision != Decision::commit || !t->decision_durable) {
        if (t->decision == Decision::none)
          schedule(*t, now_ms + opts_.commit_wait_ms, TimerKind::wait_timeout, 0, true);
        return;
      }
      answer_waiters(*t, false);
      return;
    }
  }
}

void CoordinatorMachine::on_ops_timer(Txn& t, const Timer& timer, int64_t now_ms) {
  switch (timer.kind) {
    case TimerKind::txn_timeout: return on_op_timeout(t, now_ms);
    case TimerKind::resend:
      if (timer.branch < t.branches.size()) resend_op(t, timer.branch);
      return;
    case TimerKind::wait_timeout: return on_op_wait_timeout(t, now_ms);
    case TimerKind::prepare_timeout: return;
  }
}

std::optional<int64_t> CoordinatorMachine::next_deadline_ms() const {
  int source = next_timer_source();
  if (source < 0) return std::nullopt;
  return timer_at(source).at_ms;
}

Ready CoordinatorMachine::take_ready() {
  Ready r = std::move(ready_);
  ready_ = Ready{};
  return r;
}

bool CoordinatorMachine::has_ready() const {
  return !ready_.empty();
}

}  // namespace tpc::coord
