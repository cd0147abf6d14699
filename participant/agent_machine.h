// AgentMachine: the participant agent's protocol as a pure state machine, one Branch per gid.
//
// Inputs are requests (exec, prepare, precommit, commit, abort, resolve), completions of the
// work it asked for (PostgreSQL operations, enlistments, outcome queries to the coordinator),
// in-doubt scan results and timer ticks, each with the caller's now_ms. Outputs accumulate in
// a Ready the driver takes and carries out: PgOps for the worker pool, enlistments and outcome
// queries for the coordinator, replies for waiting HTTP requests.
//
// Rules it enforces (docs/DESIGN.md §4, §5):
//   - one operation in flight per branch; later requests queue behind it (bounded);
//   - the branch enlists with the coordinator before its first statement;
//   - an abort of a gid never seen succeeds and leaves a tombstone, so a late exec or prepare
//     of that gid is refused;
//   - unknown gids in commit/abort/precommit are answered from durable evidence (the marker
//     row, pg_prepared_xacts), never from "does not exist";
//   - a 2PC prepared branch never decides alone: it asks the coordinator, with backoff, until
//     the coordinator or an operator settles it;
//   - 3PC: prepared with no pre-commit in time, coordinator unreachable → abort alone;
//     pre-committed with no commit in time, coordinator unreachable → commit alone. A decision
//     taken alone is checked against the coordinator's when they meet again; a disagreement
//     is reported (ERROR line, counter), never hidden.
//
// Threads: not thread-safe; the driver serialises every call.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/ids.h"
#include "common/log.h"
#include "common/protocol.h"
#include "common/status.h"
#include "participant/branch_types.h"

namespace tpc::agent {

enum class BranchState : uint8_t {
  unknown,    // a gid not in memory, being looked up in PostgreSQL
  enlisting,  // the first exec waits for the coordinator to accept the branch
  active,     // a session with an open transaction
  failed,     // active, but a statement failed: it can only abort
  prepared,
  precommitted,  // 3PC
  committed,
  aborted,
  read_only,  // ended at prepare
};

std::string_view branch_state_name(BranchState s);
// The contract's name: enlisting and failed show as "active", unknown as "unknown".
std::string_view external_state_name(BranchState s);
std::optional<BranchState> parse_external_state(std::string_view s);

enum class RequestKind : uint8_t {
  exec,
  prepare,
  precommit,
  commit,
  abort,
  resolve,
  status,
  forget,  // an operator clears a heuristic outcome (HTTP)
  record,  // internal: write the branch's local-decision record
  step,    // a step with its barrier (docs/DESIGN.md §8), outside any branch's session
};

// A branch finished by a decision taken here — an operator's resolve, or 3PC deciding alone —
// is checked against the coordinator's outcome; a disagreement stays reported until an
// operator forgets it. Each step is a durable tpc_agent_state row (see check_record_state), so
// the check and the report survive restarts.
enum class Check : uint8_t {
  none,
  unchecked,  // asking the coordinator for its outcome
  mismatch,   // the coordinator decided otherwise; telling it
  reported,   // the coordinator knows (or cannot be told); until an operator forgets it
};
std::string_view check_name(Check c);

// The tpc_agent_state text of a local decision: "heuristic_commit" (an operator's, unchecked),
// "unilateral_commit" (3PC alone, unchecked), "mismatch_commit", "reported_commit", and the
// same with _abort; the suffix is the branch's own outcome.
std::string check_record_state(Check c, bool operator_decision, bool committed);
struct CheckRecord {
  Check check = Check::none;
  bool operator_decision = false;
  bool committed = false;
};
std::optional<CheckRecord> parse_check_record(std::string_view state);

// A branch of the same transaction at another agent (3PC termination).
struct Peer {
  std::string participant;
  std::string url;
  bool operator==(const Peer&) const = default;
};

struct Statement {
  std::string sql;
  std::vector<pg::Value> params;
  std::optional<int64_t>
      expect_rows;  // the statement fails unless it affects (or returns) this many rows
};

struct Request {
  uint64_t id = 0;  // 0: internal (from the in-doubt resolver); no reply is sent
  RequestKind kind = RequestKind::exec;
  std::vector<Statement> statements;  // exec
  bool prepare = false;               // exec, then prepare in the same operation
  bool one_phase = false;             // commit of an active branch in one phase; for exec:
                                      // statements then a one-phase commit (one-shot)
  bool enlisted = false;              // exec from the coordinator itself: no enlistment
  bool commit = true;                 // resolve: the operator's outcome
  bool alone = false;                 // internal resolve: 3PC deciding without the coordinator
  std::string detail;                 // internal resolve: why
  Protocol protocol = Protocol::two_phase;  // prepare
  std::vector<Peer> peers;                  // 3PC prepare: every branch of the transaction
  std::string branch;                       // step: the TCC branch or saga step it belongs to
  StepOp step_op = StepOp::action;          // step
};

enum class OpKind : uint8_t {
  exec,               // statements in the branch's session (BEGIN first if it has none)
  prepare,            // in the session: read-only check, marker, PREPARE TRANSACTION
  commit_one_phase,   // in the session: marker, COMMIT
  rollback,           // in the session: ROLLBACK; the session ends
  commit_prepared,    // any connection
  rollback_prepared,  // any connection
  evidence,           // any connection: prepared, committed (marker) or absent
  put_state,          // any connection: durable tpc_agent_state row (3PC, operator)
  delete_state,       // any connection: remove the branch's tpc_agent_state row
  tombstone,          // any connection: durable "never commits" mark (pg_branch.h, put_tombstone)
  step,               // any connection: a step's statements with its barrier rows (pg_barrier.h)
};

std::string_view op_name(OpKind k);

struct PgOp {
  std::string gid;
  OpKind kind = OpKind::exec;
  std::vector<Statement> statements;  // exec
  bool then_prepare = false;          // exec: prepare right after, if the statements succeed
  bool then_commit = false;           // exec: one-phase commit right after (marker + COMMIT)
  std::string state;                  // put_state: the state to store
  std::string detail;                 // put_state: free text
  bool clear_state = false;           // commit/rollback_prepared: delete the 3PC record
  std::vector<Peer> peers;            // put_state: kept with the 3PC record
  uint64_t step = 0;                  // step: the machine's id for it (on_step_done)
  std::string branch;                 // step
  StepOp step_op = StepOp::action;    // step
  size_t rows_max = 0;                // step: rows a statement may return; more fails it
};

// What the driver reports back for a PgOp.
struct OpResult {
  Status status;  // ok, sql_error (with sqlstate) or unavailable (connection lost)
  std::string sqlstate;
  std::shared_ptr<std::vector<pg::StatementResult>> results;  // exec
  std::optional<pg::PrepareResult> prepare;                   // prepare, exec+prepare
  std::optional<pg::Outcome> outcome;         // commit_one_phase, commit/rollback_prepared
  std::optional<pg::Evidence> evidence;       // evidence
  std::string reason;                         // commit_one_phase aborted: why
  std::optional<pg::Barrier> barrier;         // step, when ok
  std::optional<std::string> stored_results;  // step, duplicate: the first call's (encoded)
};

enum class Outcome : uint8_t {
  commit,       // the coordinator's decision is commit (or pre-commit)
  abort,        // aborted, or presumed aborted
  pending,      // reachable, not decided yet
  unreachable,  // no answer: down, partitioned, 5xx
  unknown,      // answered, but cannot tell (forgotten, not its gid)
};

struct Reply {
  uint64_t request = 0;
  RequestKind kind = RequestKind::exec;
  Status error;           // not ok: an error (its code says which; sqlstate if set)
  bool contrary = false;  // the branch is, or ended, otherwise than the request asked
  BranchState state = BranchState::unknown;
  std::optional<pg::Vote> vote;  // prepare, exec+prepare
  std::string reason;
  std::string sqlstate;
  std::shared_ptr<std::vector<pg::StatementResult>> results;
  std::optional<pg::Barrier> barrier;         // step; refused comes with a conflict error
  std::optional<std::string> stored_results;  // step, duplicate: the first call's (encoded)
};

// Ask every peer for its state of gid (3PC termination).
struct PeerQuery {
  std::string gid;
  std::vector<Peer> peers;
};

struct PeerAnswer {
  std::string participant;
  std::optional<BranchState> state;  // nullopt: no answer
};

// Tell the coordinator how a branch really ended (POST /v1/transactions/{gid}/heuristic).
struct Report {
  std::string gid;
  bool committed = false;
};

struct Ready {
  std::vector<PgOp> ops;
  std::vector<Report> reports;
  std::vector<PeerQuery> peer_queries;
  std::vector<std::string> enlists;  // gids to enlist with their coordinator
  std::vector<std::string> asks;     // gids whose outcome to ask the coordinator
  std::vector<std::string> cancels;  // gids whose running statement to cancel
  std::vector<Reply> replies;
  bool empty() const {
    return ops.empty() && reports.empty() && peer_queries.empty() && enlists.empty() &&
           asks.empty() && cancels.empty() && replies.empty();
  }
};

struct AgentOptions {
  std::string name = "a1";
  size_t branches_max = 64;            // enlisting/active/failed branches (sessions); past it 503
  size_t queue_per_branch_max = 16;    // requests waiting behind the one in flight
  size_t finished_kept_max = 100'000;  // ended branches remembered (tombstones included)
  int64_t idle_timeout_ms = 60'000;    // an unprepared branch idle this long is rolled back
  int64_t in_doubt_after_ms = 2'000;   // a 2PC prepared branch older than this asks
  int64_t ask_min_ms = 500;            // outcome queries back off from this...
  int64_t ask_max_ms = 30'000;         // ...to this
  int64_t precommit_timeout_ms = 10'000;  // 3PC: prepared, no pre-commit by then → ask
  int64_t commit_timeout_ms = 10'000;     // 3PC: pre-committed, no commit by then → ask
  size_t result_rows_max = 10'000;        // per statement; more fails the statement (54000)
  size_t steps_max = 256;                 // steps in flight; past it 503
};

struct BranchView {
  std::string gid;
  BranchState state = BranchState::unknown;
  Protocol protocol = Protocol::two_phase;
  bool recovered = false;   // found by the in-doubt scan
  bool unilateral = false;  // 3PC: decided alone after a timeout
  bool heuristic = false;   // decided by an operator, or against the coordinator
  Check check = Check::none;
  bool report_pending = false;  // telling the coordinator how the branch ended
  bool busy = false;
  int64_t age_ms = 0;  // since prepared (prepared/precommitted), else since created
  uint32_t asks = 0;
  std::string last_answer;  // the coordinator's last answer to an outcome query
  std::string reason;
  std::string sqlstate;
  int64_t timeout_ms = 0;  // the timeout that applies in this state (0: none)
};

struct AgentCounters {
  uint64_t prepared = 0;
  uint64_t committed = 0;
  uint64_t aborted = 0;
  uint64_t read_only = 0;
  uint64_t one_phase = 0;
  uint64_t votes_no = 0;
  uint64_t idle_rollbacks = 0;
  uint64_t resolved_by_query = 0;
  uint64_t unilateral_commits = 0;
  uint64_t unilateral_aborts = 0;
  uint64_t heuristic_mismatch = 0;  // a decision taken alone or by hand met a different one
  uint64_t refused_overload = 0;
  uint64_t reports_sent = 0;  // heuristic outcomes the coordinator accepted
  // Steps, by what their barrier said; failed: a business failure (an SQL error other than
  // the retryable ones); unknown: the outcome is unknown to the caller, who resends.
  uint64_t steps_applied = 0;
  uint64_t steps_duplicate = 0;
  uint64_t steps_empty_compensation = 0;
  uint64_t steps_refused = 0;
  uint64_t steps_committed = 0;  // checks that found the local op committed
  uint64_t steps_fenced = 0;     // checks that fenced a local op that never ran
  uint64_t steps_failed = 0;
  uint64_t steps_unknown = 0;
};

class AgentMachine {
 public:
  AgentMachine(AgentOptions opts, Logger& log);

  // A request from HTTP (id != 0) or internal (id == 0). Replies come through Ready.
  void request(std::string_view gid, Request req, int64_t now_ms);
  void on_enlisted(std::string_view gid, Status status, int64_t branch_timeout_ms, int64_t now_ms);
  void on_op_done(std::string_view gid, OpKind kind, OpResult result, int64_t now_ms);
  // The coordinator's answer to an outcome query; `recorded`: this branch's state in the
  // coordinator's view, when it lists one.
  void on_outcome(std::string_view gid, Outcome outcome, std::string_view answer, int64_t now_ms,
                  std::optional<BranchState> recorded = std::nullopt);
  // The coordinator's answer to a Report: ok; not_found or invalid_argument (it will never
  // take it: not its gid, forgotten); anything else is retried with backoff.
  void on_reported(std::string_view gid, Status status, int64_t now_ms);

  // A step (RequestKind::step): its statements run with its barrier rows in one local
  // transaction on any connection. The answer says what the barrier found; a business failure
  // (an SQL error not retryable_sqlstate) is final, anything else unknown (unavailable). A
  // step of a transaction its coordinator has reported finished (on_finished_below) runs no
  // more: a try/action is refused, any other op answered duplicate (it ran before the
  // transaction could finish), since its barrier rows may be purged already.
  void step(std::string_view gid, Request req, int64_t now_ms);
  void on_step_done(uint64_t step, OpResult result, int64_t now_ms);
  // Every transaction of `coordinator` below (epoch, seq) has finished (its status's
  // finished_below): their barrier rows and markers may go.
  void on_finished_below(std::string_view coordinator, uint64_t epoch, uint64_t seq);
  // Below which gid of `coordinator` barrier rows and markers may be purged now: its finished
  // mark, held below any step still in flight (one that arrived before the mark moved; its
  // try must still find the cancel's barrier row and be refused). nullopt: no mark yet.
  std::optional<GidParts> purge_mark(std::string_view coordinator) const;
  size_t steps_in_flight() const { return steps_.size(); }
  // How long the oldest step in flight has been (0 with none): one stuck for good also holds
  // back its coordinator's barrier purge.
  int64_t oldest_step_age_ms(int64_t now_ms) const;

  struct ScanEntry {
    std::string gid;
    int64_t age_ms = 0;
    std::optional<std::string> durable_state;  // tpc_agent_state: "prepared3", "precommitted"
    std::vector<Peer> peers;                   // kept with a 3PC state
  };
  // A local-decision record (tpc_agent_state) of a branch that is no longer prepared.
  struct DecidedEntry {
    std::string gid;
    CheckRecord record;
    std::string detail;
  };
  // The agent's prepared transactions as PostgreSQL lists them; the scan started at
  // started_ms (results can be stale by the time they arrive, which is harmless).
  void on_scan(std::vector<ScanEntry> prepared, int64_t started_ms, int64_t now_ms,
               std::vector<DecidedEntry> decided = {});

  // A coordinator's current epoch (from a gid or its status). Unprepared branches of an older
  // epoch can never commit (the coordinator kept no record of them): they are rolled back, and
  // prepared ones ask for their outcome at once.
  void on_coordinator_epoch(std::string_view coordinator, uint64_t epoch, int64_t now_ms);
  // The peers' answers to a PeerQuery. 3PC termination rule: any peer committed or
  // pre-committed → commit; any peer aborted → abort; otherwise a pre-committed branch
  // commits and a prepared one aborts.
  void on_peer_states(std::string_view gid, std::vector<PeerAnswer> answers, int64_t now_ms);

  void tick(int64_t now_ms);
  Ready take_ready();

  std::optional<BranchView> view(std::string_view gid, int64_t now_ms) const;
  std::vector<BranchView> list(std::optional<BranchState> state, size_t limit,
                               int64_t now_ms) const;
  // Prepared or pre-committed branches waiting longer than in_doubt_after_ms, oldest first.
  std::vector<BranchView> in_doubt(int64_t now_ms) const;
  size_t open_sessions() const { return open_sessions_; }
  size_t prepared_count() const;
  int64_t oldest_prepared_age_ms(int64_t now_ms) const;
  const AgentCounters& counters() const { return counters_; }
  // Branches whose outcome disagrees with the coordinator's, not yet forgotten.
  size_t heuristic_outcomes() const { return disagreements_.size(); }

 private:
  struct Branch {
    std::string gid;
    std::string coordinator;
    uint64_t epoch = 0;
    uint64_t serial = 0;
    BranchState state = BranchState::unknown;
    Protocol protocol = Protocol::two_phase;
    bool busy = false;
    bool session = false;  // counts against branches_max
    bool recovered = false;
    bool unilateral = false;
    bool heuristic = false;
    Check check = Check::none;
    std::string recorded;         // its tpc_agent_state row as written: a 3PC or a check record
    std::string check_detail;     // who decided, and why
    bool report_pending = false;  // the coordinator's record of this branch is wrong
    bool reporting = false;
    int64_t next_report_ms = 0;
    uint32_t reports = 0;
    int64_t next_record_ms = 0;                       // a failed record write is retried from here
    std::optional<BranchState> coordinator_recorded;  // this branch in the coordinator's last view
    int64_t created_ms = 0;
    int64_t last_activity_ms = 0;
    int64_t idle_deadline_ms = 0;
    int64_t prepared_ms = 0;  // when prepared (or pre-committed)
    int64_t next_ask_ms = 0;
    uint32_t asks = 0;
    bool asking = false;
    bool ask_now = false;              // skip the in-doubt delay (the coordinator restarted)
    bool cancel_sent = false;          // the running statement was asked to stop
    bool terminating = false;          // waiting for the peers' answers
    std::optional<bool> alone_commit;  // 3PC: the decision taken alone, kept until carried out
    std::vector<Peer> peers;           // 3PC: every branch of the transaction
    std::string last_answer;
    std::string reason;
    std::string sqlstate;
    std::deque<Request> queue;
    Request current;  // the request whose operation is in flight
    OpKind current_op = OpKind::exec;
    bool has_current = false;
  };

  Branch* find(std::string_view gid);
  const Branch* find(std::string_view gid) const;
  Branch& create(std::string_view gid, BranchState state, int64_t now_ms);
  void set_state(Branch& b, BranchState to, int64_t now_ms);
  void pump(Branch& b, int64_t now_ms);
  // Handles the request at the head of the queue: replies, or starts an operation.
  void dispatch(Branch& b, Request req, int64_t now_ms);
  // dispatch, by request.
  void dispatch_status(Branch& b, Request req);
  void dispatch_exec(Branch& b, Request req, int64_t now_ms);
  void dispatch_prepare(Branch& b, Request req);
  void dispatch_precommit(Branch& b, Request req);
  void dispatch_commit(Branch& b, Request req);
  void dispatch_abort(Branch& b, Request req);
  void dispatch_resolve(Branch& b, Request req);
  void dispatch_record(Branch& b, Request req);
  void dispatch_forget(Branch& b, Request req, int64_t now_ms);
  void start_op(Branch& b, Request req, PgOp op);
  bool record_three_pc_first(Branch& b, Request& req);
  void reply(const Request& req, Reply r);
  // The branch's state as the answer; contrary: it is, or ended, otherwise than asked.
  void reply_state(const Branch& b, const Request& req, bool contrary, std::string_view why = {});
  void reply_error(const Request& req, Status s, const Branch* b = nullptr);
  void reply_vote(const Branch& b, const Request& req);
  void finish_op(Branch& b, OpKind kind, OpResult& res, int64_t now_ms);
  // finish_op, by operation.
  void evidence_done(Branch& b, Request req, const OpResult& res, int64_t now_ms);
  void exec_done(Branch& b, Request req, OpResult& res, int64_t now_ms);
  bool over_row_limit(const Request& req, OpResult& res) const;
  void one_phase_done(Branch& b, Request req, const OpResult& res, int64_t now_ms);
  void rollback_done(Branch& b, Request req, int64_t now_ms);
  void prepared_done(Branch& b, OpKind kind, Request req, const OpResult& res, int64_t now_ms);
  void tombstone_done(Branch& b, Request req, const OpResult& res, int64_t now_ms);
  void record_done(Branch& b, OpKind kind, Request req, const OpResult& res, int64_t now_ms);
  void apply_vote(Branch& b, const OpResult& res, int64_t now_ms);
  void decided_alone(Branch& b, bool commit, std::string_view why, int64_t now_ms);
  std::vector<Peer> others(const Branch& b) const;
  void check_against_coordinator(Branch& b, bool coordinator_commits, bool coordinator_knows,
                                 int64_t now_ms);
  void set_check(Branch& b, Check c, int64_t now_ms);
  void persist_check(Branch& b);
  std::string desired_record(const Branch& b) const;
  void apply_forget(Branch& b, int64_t now_ms);
  void correct_coordinator(Branch& b, int64_t now_ms);
  void load_decided(const DecidedEntry& d, int64_t now_ms);
  int64_t backoff_ms(uint32_t attempts) const;
  void resolve_prepared(Branch& b, Request req);
  bool pinned(const Branch& b) const;
  void track_live(Branch& b);
  void retire(Branch& b);
  int64_t timeout_for(const Branch& b) const;
  BranchView view_of(const Branch& b, int64_t now_ms) const;
  void evict_finished();
  void erase_branch(const std::string& gid);
  void cancel_running(Branch& b, std::string_view why);
  void abort_stale(Branch& b, std::string_view why, int64_t now_ms);
  bool finished_at_coordinator(std::string_view gid) const;
  void reply_finished_step(const Request& req);
  void count_step(const Reply& r);

  AgentOptions opts_;
  Logger& log_;
  std::unordered_map<std::string, Branch> branches_;
  std::map<uint64_t, std::string> finished_;  // serial → gid of ended branches, oldest first
  // Branches that timers may act on: not ended, or ended by a decision taken here and not yet
  // settled with the coordinator. tick() walks these only, never the (large) memory of ended
  // branches.
  std::set<std::string, std::less<>> live_;
  std::map<std::string, uint64_t, std::less<>> epochs_;  // coordinator → newest epoch seen
  std::set<std::string, std::less<>> disagreements_;     // check mismatch or reported
  struct StepInFlight {
    Request req;
    std::optional<GidParts> parts;  // of its gid
    int64_t since_ms = 0;           // when it arrived
  };
  std::unordered_map<uint64_t, StepInFlight> steps_;  // steps in flight, by id
  uint64_t next_step_ = 1;
  std::map<std::string, GidParts, std::less<>> finished_below_;  // coordinator → its watermark
  uint64_t next_serial_ = 1;
  size_t open_sessions_ = 0;
  Ready ready_;
  AgentCounters counters_;
};

}  // namespace tpc::agent
