// CoordinatorMachine: the coordinator's protocol as a pure state machine.
//
// Inputs are client requests (begin, enlist, commit, abort, resolve), branch replies (votes,
// acknowledgements), log-write completions and timer ticks, each with the caller's now_ms.
// Outputs accumulate in a Ready (records to persist, messages to send, replies to clients)
// that the driver takes with take_ready() and carries out in order: persist, then send,
// then reply. The machine includes no IO, threads or clocks, so it is unit-tested and
// simulated deterministically.
//
// Protocol rules it enforces (docs/DESIGN.md §4):
//   - persist before send: a commit (2PC), pre-commit (3PC) or one-phase commit message for a
//     transaction is emitted only after on_persisted() for its decision record;
//   - presumed abort: aborts are never written; no record means aborted;
//   - a decision never changes once persisted (TPC_ASSERT);
//   - phase 2 never gives up: commit/abort is resent with capped exponential backoff until
//     every branch acknowledges.
//
// Threads: not thread-safe; the driver serialises every call (one mutex).
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/ids.h"
#include "common/log.h"
#include "common/status.h"
#include "coordinator/txn.h"
#include "wal/record.h"

namespace tpc::coord {

struct MachineOptions {
  std::string coordinator_id = "c1";
  int64_t txn_timeout_default_ms = 60'000;  // an active transaction not committed by then aborts
  int64_t txn_timeout_max_ms = 3'600'000;
  int64_t prepare_timeout_ms = 5'000;  // votes not all in by then: abort
  int64_t commit_wait_ms = 10'000;     // a commit request answered 202 "committing" after
  int64_t retry_min_ms = 50;           // phase-2 resend backoff: min, doubling...
  int64_t retry_max_ms = 5'000;        // ...up to this cap, forever
  size_t branches_per_txn_max = 64;
  size_t open_txns_max = 100'000;      // active or unfinished; past it begin is refused
  size_t finished_kept_max = 100'000;  // finished transactions kept in memory for GET
  size_t waiters_per_txn_max = 64;     // concurrent commit/abort requests on one gid
  uint32_t notify_attempts_max = kNotifyAttemptsDefault;  // of a transaction's notification
};

// Counters read by the driver for /metrics (under the driver's lock).
struct MachineCounters {
  uint64_t begun[kProtocolCount] = {};  // by protocol_index()
  uint64_t committed[kProtocolCount] = {};
  uint64_t aborted[kProtocolCount] = {};
  uint64_t saga_failed = 0;                  // forward sagas stopped past their attempts
  uint64_t ops[kStepOps][kOpOutcomes] = {};  // op answers, by StepOp and OpOutcome
  uint64_t op_failures = 0;  // business failures of confirm, cancel and compensate (retried)
  uint64_t heuristic_mixed = 0;
  uint64_t one_phase = 0;
  uint64_t read_only_branches = 0;
  uint64_t messages_sent = 0;
  uint64_t resends = 0;
  uint64_t recovered = 0;
};

// Transactional messages not finished, for /metrics.
struct MsgGauges {
  size_t prepared = 0;    // half messages
  size_t delivering = 0;  // committed, a destination not acknowledged yet
  int64_t oldest_ms = 0;  // how long the oldest delivering one has been committed
  size_t notifications = 0;  // notifications not delivered or given up yet
};

// What a GET (or a repeated commit/abort) should say about a gid the machine has no live
// transaction for.
enum class LookupKind : uint8_t {
  live,              // view is set
  in_log,            // the driver must read the log: the record decides the answer, and
                     // without one the gid is presumed aborted (or forgotten, see below)
  presumed_aborted,  // ours, below what we issued, never recorded (or record absent)
  forgotten,         // ours, older than the retention horizon: outcome no longer known
  not_ours,          // not a gid this coordinator could have issued: 404
};

struct Lookup {
  LookupKind kind = LookupKind::not_ours;
  TxnView view;                      // for live
  bool forgotten_if_absent = false;  // for in_log: below the retention horizon
};

class CoordinatorMachine {
 public:
  // `log` must outlive the machine.
  CoordinatorMachine(MachineOptions opts, Logger& log);

  // --- start-up -------------------------------------------------------------------------
  // Sets the epoch (already synced by the driver) and the forgotten horizon, and takes every
  // record that is not ended: decided transactions are driven to their outcome.
  void recover(uint64_t epoch, std::optional<GidParts> forgotten_below,
               std::vector<wal::TxnRecord> unfinished, int64_t now_ms);
  // Recovered transactions not finished yet.
  size_t recovering() const { return recovering_; }

  // --- client requests ------------------------------------------------------------------
  // 201 with the view, or an error (invalid_argument, unavailable when open_txns_max).
  // `notify`: the HTTP op told of the outcome (docs/DESIGN.md §10.3), "" for none.
  Result<TxnView> begin(Protocol protocol, std::optional<int64_t> timeout_ms, int64_t now_ms,
                        std::string notify = "");
  // An agent enlists a branch. 201 new, 200 already enlisted with the same url (and the same
  // agent run, `instance`); 409 unless active, or when the agent restarted since it enlisted
  // (the branch's work in its lost session is gone: the transaction can only roll back);
  // 404 not ours.
  ClientReply enlist(std::string_view gid, std::string_view participant, std::string_view url,
                     int64_t now_ms, std::string_view instance = "");
  // Starts (or joins) the commit. The answer comes later as a ClientReply for `waiter` in
  // Ready, or at once through the return value when the outcome is known already or the
  // request is refused. in_log means the driver must answer from the log.
  std::optional<ClientReply> commit(std::string_view gid, uint64_t waiter, CommitOptions opts,
                                    int64_t now_ms);
  std::optional<ClientReply> abort(std::string_view gid, uint64_t waiter, int64_t now_ms);
  // A one-shot transaction: begins, enlists `branches` and commits at once; each branch's
  // statements go out with its prepare (exec_prepare), or for a single branch with its
  // one-phase commit (exec_commit). The answer comes later for `waiter`; errors come back at
  // once (as for begin and enlist).
  Result<std::string> run(Protocol protocol, const std::vector<Peer>& branches, uint64_t waiter,
                          CommitOptions opts, int64_t now_ms, std::string notify = "");
  // Operator decision (tpcctl resolve): see docs/DESIGN.md §4.8; recorded as heuristic. For a
  // saga: abort skips its stuck compensations, commit skips the failed step of a failed
  // forward saga (docs/DESIGN.md §9).
  ClientReply resolve(std::string_view gid, bool commit, int64_t now_ms);

  // --- TCC and saga (docs/DESIGN.md §9) ----------------------------------------------------
  // A TCC branch's try: the branch is registered in a synced record before its try is sent.
  // The answer comes later for `waiter`, or at once when refused or already tried.
  std::optional<ClientReply> try_branch(std::string_view gid, OpBranch branch, uint64_t waiter,
                                        int64_t now_ms);
  // A saga: begins, is synced to the log with every step, then runs. The answer comes later
  // for `waiter` (as it ends, or once durable with wait_accepted); errors come back at once.
  Result<std::string> run_saga(std::vector<OpBranch> steps, SagaOptions opts, uint64_t waiter,
                               int64_t now_ms);
  // A transactional message (docs/DESIGN.md §10.1): begins `prepared` and is synced to the log
  // before `waiter` is answered (201), then waits for its producer's commit or abort, or
  // check-back at its timeout. In the one-request form (a local op) the answer comes once the
  // message is decided. Errors come back at once.
  Result<std::string> begin_msg(MsgRequest req, uint64_t waiter, int64_t now_ms);
  // A best-effort notification (docs/DESIGN.md §10.3): logged (synced) before `waiter` gets
  // its 201, then POSTed until 2xx, at most `attempts_max` times.
  Result<std::string> begin_notification(wal::OpText op, uint32_t attempts_max, uint64_t waiter,
                                         int64_t now_ms);
  // The answer to an OpCall.
  void on_op_reply(const OpReply& reply, int64_t now_ms);

  Lookup lookup(std::string_view gid) const;
  // Compaction erased records below this gid; a gid below it without a record is forgotten.
  void set_forgotten_below(GidParts below);
  // Live and recently finished transactions, newest first, optionally of one state and one
  // protocol; notifications (docs/DESIGN.md §10.3) only when `protocol` is notify.
  std::vector<TxnView> list(std::optional<TxnState> state, size_t limit,
                            std::optional<Protocol> protocol = std::nullopt) const;
  // Decided but unfinished transactions and heuristic outcomes, oldest first.
  std::vector<TxnView> in_doubt(int64_t now_ms, size_t limit) const;

  // --- heuristic outcomes ------------------------------------------------------------------
  // Ended transactions whose branches disagree with the decision stay listed by in_doubt()
  // and counted until an operator clears them (forget), across restarts: the driver passes
  // every ended heuristic record at start.
  void remember_heuristic(const wal::TxnRecord& rec);
  // The record of a finished transaction was rewritten (a branch's report, or forget): the
  // in-memory view and the heuristic list follow it.
  void on_record_rewritten(const wal::TxnRecord& rec);
  size_t heuristic_outcomes() const { return heuristics_.size(); }
  // An agent reports what its branch of a finished transaction did (committed or not). `rec`
  // is the transaction's record, nullopt when it has none (presumed aborted). Returns the
  // record to write (synced) before answering, or nullopt when the report changes nothing.
  static std::optional<wal::TxnRecord> apply_branch_report(std::optional<wal::TxnRecord> rec,
                                                           std::string_view gid,
                                                           std::string_view participant,
                                                           bool committed, int64_t now_ms);
  // Whether a record's outcome is commit (for a one-phase record: its branch's answer).
  static bool record_commits(const wal::TxnRecord& rec);

  // --- branch replies and log completions -------------------------------------------------
  void on_reply(const BranchReply& reply, int64_t now_ms);
  // The synced write of gid's decision record is durable; `seq` is its Persist::seq.
  void on_persisted(std::string_view gid, int64_t now_ms, uint64_t seq = 0);

  // --- time -------------------------------------------------------------------------------
  void tick(int64_t now_ms);
  // The earliest pending deadline, if any.
  std::optional<int64_t> next_deadline_ms() const;

  Ready take_ready();
  bool has_ready() const;

  uint64_t epoch() const { return epoch_; }
  size_t open_txns() const { return live_.size(); }
  size_t prepared_unfinished() const;
  MsgGauges msg_gauges(int64_t now_ms) const;
  const MachineCounters& counters() const { return counters_; }
  // (epoch, seq) strictly below which every gid of ours is finished with its end record
  // durable; agents purge their markers below it.
  GidParts finished_below() const;
  // The end records of `gids` are durable (a synced write covered them). Until then a crash
  // can lose such a record and the transaction is driven again from its decision, which
  // needs the agents' markers: finished_below() stays below it.
  void on_ends_durable(const std::vector<std::string>& gids);

  // The answer a repeated commit/abort/GET gets for a transaction known only from its record.
  static ClientReply reply_from_record(const wal::TxnRecord& rec, RequestKind kind);
  static ClientReply not_a_transaction(ClientReply r);
  static TxnView view_from_record(const wal::TxnRecord& rec);
  // The answer for a gid with no record: presumed aborted, or forgotten.
  static ClientReply reply_without_record(std::string_view gid, RequestKind kind, bool forgotten);

 private:
  struct Timer {
    int64_t at_ms;
    std::string gid;
    TimerKind kind;
    uint32_t branch;  // for resend timers
    bool operator>(const Timer& o) const { return at_ms > o.at_ms; }
  };

  Txn* find(std::string_view gid);
  const Txn* find(std::string_view gid) const;
  bool issued(const GidParts& g) const;

  void set_state(Txn& t, TxnState to);
  void start_prepare(Txn& t, int64_t now_ms);
  void start_one_phase(Txn& t, int64_t now_ms);
  void decide_commit(Txn& t, int64_t now_ms);
  void commit_without_phase2(Txn& t, int64_t now_ms);
  // Records the abort decision (never over another one) and moves t to `state`; the caller
  // persists it and sends what follows.
  void take_abort(Txn& t, std::string_view reason, std::string_view branch, TxnState state,
                  int64_t now_ms);
  void decide_abort(Txn& t, std::string_view reason, std::string_view branch, int64_t now_ms);
  void refuse_enlist(Txn& t, std::string_view participant, int64_t now_ms);
  void after_votes(Txn& t, int64_t now_ms);
  void send(Txn& t, size_t branch, MsgKind kind);
  void send_to_all(Txn& t, BranchState from, MsgKind kind);
  void force_pending(Txn& t, BranchState to);
  // One branch's outcome set by the operator: recorded forced (heuristic), with a WARN line.
  void force_branch(const Txn& t, BranchSlot& b, BranchState to);
  // `fixed` timers are all set the same delay ahead, so they fire in the order they were set:
  // they go into a FIFO lane per kind (constant cost) instead of the heap.
  void schedule(Txn& t, int64_t at_ms, TimerKind kind, uint32_t branch = 0, bool fixed = false);
  // The lane (0..2) or the heap (3) whose next timer is the earliest; -1 when there are none.
  int next_timer_source() const;
  const Timer& timer_at(int source) const;
  // `capped`: refused past open_txns_max (a transaction's outcome notification is not: the
  // transaction it tells of is ending).
  Result<TxnView> begin_txn(Protocol protocol, std::optional<int64_t> timeout_ms, bool expires,
                            int64_t now_ms, bool capped = true);
  void schedule_resend(Txn& t, size_t branch, int64_t now_ms);
  // A WARN line `what` with the branch's attempt and error, and its resend timer delay_ms on.
  void resend_after(Txn& t, size_t branch, int64_t delay_ms, std::string_view what,
                    int64_t now_ms);
  void maybe_finish(Txn& t, int64_t now_ms);
  void finish(const std::string& gid, int64_t now_ms);
  void answer_waiters(Txn& t, bool only_decision_waiters);
  // Its end record is preceded by its notification's (notify_outcome).
  void persist(Txn& t, bool sync, bool notify, int64_t now_ms);
  wal::TxnRecord record_of(const Txn& t, int64_t now_ms) const;
  TxnView view_of(const Txn& t) const;
  ClientReply reply_for(const Txn& t, RequestKind kind, uint64_t waiter) const;
  std::optional<ClientReply> reply_not_live(std::string_view gid, RequestKind kind,
                                            uint64_t waiter) const;
  void remember_finished(TxnView view, uint64_t serial);
  void on_timer(const Timer& timer, int64_t now_ms);
  void log_mixed(const Txn& t);
  void log_mixed_record(const wal::TxnRecord& rec);

  void on_ops_timer(Txn& t, const Timer& timer, int64_t now_ms);
  // TCC and saga (op_machine.cc).
  uint64_t persist_ops(Txn& t, bool sync, int64_t now_ms);
  wal::TxnRecord record_of_ops(const Txn& t, int64_t now_ms) const;
  static TxnView view_from_record_ops(const wal::TxnRecord& rec);
  void recover_ops(const wal::TxnRecord& rec, const GidParts& parts, int64_t now_ms);
  void recover_tcc(Txn& t, int64_t now_ms);
  void recover_saga(Txn& t, int64_t now_ms);
  std::optional<ClientReply> repeated_try(Txn& t, size_t i, const OpBranch& branch,
                                          uint64_t waiter);
  ClientReply try_reply(const Txn& t, size_t i, uint64_t waiter) const;
  Status check_saga(const std::vector<OpBranch>& steps, const SagaOptions& opts) const;
  std::optional<ClientReply> tcc_commit(Txn& t, uint64_t waiter, CommitOptions opts,
                                        int64_t now_ms);
  std::optional<ClientReply> ops_abort(Txn& t, uint64_t waiter, int64_t now_ms);
  ClientReply resolve_ops(Txn& t, bool commit, int64_t now_ms);
  Status resolve_tcc(Txn& t, bool commit, int64_t now_ms);
  Status resolve_saga(Txn& t, bool commit, int64_t now_ms);
  void force_ops(Txn& t, BranchState to, const std::function<bool(const BranchSlot&)>& which);
  void tcc_send_tries(Txn& t);
  void on_try_answer(Txn& t, size_t i, const OpReply& reply, int64_t now_ms);
  bool action_unsent(const Txn& t, const BranchSlot& b) const;
  bool pivot_durable(Txn& t, BranchSlot& b, int64_t now_ms);
  void tcc_abort(Txn& t, std::string_view reason, std::string_view branch, int64_t now_ms);
  void saga_advance(Txn& t, int64_t now_ms);
  void saga_commit(Txn& t, int64_t now_ms);
  void on_action_answer(Txn& t, size_t i, const OpReply& reply, int64_t now_ms);
  bool action_gives_up(const Txn& t, const BranchSlot& b, OpOutcome outcome) const;
  void saga_compensate(Txn& t, std::string_view reason, std::string_view step, int64_t now_ms);
  void saga_compensate_next(Txn& t);
  void saga_fail(Txn& t, size_t i, int64_t now_ms);
  void send_op(Txn& t, size_t i, StepOp op);
  int64_t op_retry_delay(const Txn& t, const BranchSlot& b) const;
  void retry_op(Txn& t, size_t i, int64_t now_ms);
  void resend_op(Txn& t, size_t i);
  void on_settling_answer(Txn& t, size_t i, const OpReply& reply, int64_t now_ms);
  void ops_persisted(Txn& t, uint64_t seq, int64_t now_ms);
  void maybe_finish_ops(Txn& t, int64_t now_ms);
  void on_op_timeout(Txn& t, int64_t now_ms);
  void on_op_wait_timeout(Txn& t, int64_t now_ms);
  ClientReply reply_for_ops(const Txn& t, RequestKind kind, uint64_t waiter) const;
  // Transactional messages (msg_machine.cc).
  void recover_msg(Txn& t, int64_t now_ms);
  std::optional<ClientReply> msg_commit(Txn& t, uint64_t waiter, int64_t now_ms);
  std::optional<ClientReply> msg_abort(Txn& t, uint64_t waiter, int64_t now_ms);
  Status resolve_msg(Txn& t, bool commit, int64_t now_ms);
  void msg_decide_commit(Txn& t, int64_t now_ms);
  void msg_decide_abort(Txn& t, std::string_view reason, int64_t now_ms);
  void msg_check(Txn& t, int64_t now_ms);
  void on_producer_answer(Txn& t, const OpReply& reply, int64_t now_ms);
  void msg_persisted(Txn& t, bool first, bool decided_now, int64_t now_ms);
  void msg_maybe_finish(Txn& t, int64_t now_ms);
  Answer msg_answer(const Txn& t, RequestKind kind) const;
  // Notifications (notify_machine.cc).
  // nullptr past open_txns_max when `capped`.
  Txn* new_notification(wal::OpText op, uint32_t attempts_max, int64_t now_ms, bool capped);
  void notify_persisted(Txn& t, int64_t now_ms);
  void on_notify_answer(Txn& t, const OpReply& reply, int64_t now_ms);
  void recover_notification(Txn& t, int64_t now_ms);
  void notify_end(Txn& t, bool delivered, std::string_view reason, int64_t now_ms);
  // t reached its final state (its end record is being written, or it ends without one): its
  // notification, once, logged (synced) and then sent. Nothing without a "notify".
  void notify_outcome(Txn& t, int64_t now_ms);
  static std::string notify_of_options(std::string_view options);

  MachineOptions opts_;
  Logger& log_;
  uint64_t epoch_ = 0;
  uint64_t next_seq_ = 1;
  uint64_t next_serial_ = 1;
  std::optional<GidParts> forgotten_below_;
  size_t recovering_ = 0;

  std::unordered_map<std::string, Txn> live_;
  // Finished transactions, newest last, for GET and repeated requests.
  std::map<uint64_t, TxnView> finished_by_serial_;
  std::unordered_map<std::string, uint64_t> finished_index_;
  std::priority_queue<Timer, std::vector<Timer>, std::greater<Timer>> timers_;
  std::array<std::deque<Timer>, 3> timer_lanes_;  // by TimerKind: txn, prepare, wait timeouts
  // Uncleared heuristic outcomes of finished transactions, by (epoch, seq).
  std::map<std::pair<uint64_t, uint64_t>, TxnView> heuristics_;
  // Unfinished gids ordered by (epoch, seq), for finished_below(); a finished transaction
  // stays here until its end record is durable (ending_).
  std::map<std::pair<uint64_t, uint64_t>, uint32_t> unfinished_order_;
  std::unordered_map<std::string, std::pair<uint64_t, uint64_t>> ending_;
  void release_order(std::pair<uint64_t, uint64_t> key);
  // on_reply, by message.
  void on_vote(Txn& t, BranchSlot& b, const BranchReply& reply, int64_t now_ms);
  bool on_precommit_answer(Txn& t, BranchSlot& b, const BranchReply& reply);
  bool on_commit_answer(Txn& t, BranchSlot& b, const BranchReply& reply);
  bool on_abort_answer(Txn& t, BranchSlot& b, const BranchReply& reply);
  std::vector<const Txn*> live_by_serial(const std::function<bool(const Txn&)>& keep, size_t limit,
                                         bool newest) const;

  Ready ready_;
  MachineCounters counters_;
};

}  // namespace tpc::coord
