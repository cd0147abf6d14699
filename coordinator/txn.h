// The vocabulary of the coordinator's state machine: states, messages to branches, their
// replies, client replies and the Ready of effects. Plain data, no behaviour.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/ids.h"
#include "common/protocol.h"
#include "common/status.h"
#include "wal/record.h"

namespace tpc::coord {

// Global states (docs/DESIGN.md §3): active → preparing → [precommitted →] committing → committed,
// or → aborting → aborted; heuristic_mixed when branches ended with different outcomes.
// TCC (§9): active → committing (confirms) → committed, or → aborting (cancels) → aborted.
// Saga (§9): running → committed, or running → compensating → aborted, or running → failed
// (forward recovery past its attempts: stuck until an operator resolves it).
// Transactional message (§10.1): prepared (the half message) → committing (delivering) →
// committed, or prepared → aborted.
enum class TxnState : uint8_t {
  active,
  preparing,
  precommitted,
  committing,
  committed,
  aborting,
  aborted,
  heuristic_mixed,
  running,
  compensating,
  failed,
  prepared,
};

// A branch as the coordinator sees it.
enum class BranchState : uint8_t {
  active,         // enlisted
  preparing,      // prepare sent
  prepared,       // voted yes
  read_only,      // voted read_only: committed locally, out of phase 2
  precommitting,  // 3PC: pre-commit sent
  precommitted,   // 3PC: pre-commit acknowledged
  committing,     // commit sent
  committed,      // commit acknowledged
  aborting,       // abort sent
  aborted,        // abort acknowledged, or voted no
  // A TCC branch (docs/DESIGN.md §9):
  trying,      // registered; its try goes once the registration is durable
  tried,       // its try succeeded
  confirming,  // confirm sent (and resent until it succeeds)
  confirmed,
  cancelling,  // cancel sent (and resent until it succeeds)
  cancelled,
  // A saga step (its names are the contract's step states):
  pending,       // its action has not been sent
  running,       // action sent
  done,          // action succeeded
  failed,        // action failed for good (a business failure, or past its attempts)
  compensating,  // compensate sent (and resent until it succeeds)
  compensated,
  // A transactional message's producer ("local": pending, running while its local op is out,
  // checking while a check-back is out, done once committed, failed once not) and its
  // destinations (pending, delivering, delivered):
  checking,
  delivering,
  delivered,
};
inline constexpr uint8_t kBranchStateMax = static_cast<uint8_t>(BranchState::delivered);

// exec_prepare / exec_commit carry a one-shot branch's statements with its prepare (or, for a
// single branch, with its one-phase commit); a resent one-phase commit never carries them.
enum class MsgKind : uint8_t {
  prepare,
  precommit,
  commit,
  commit_one_phase,
  abort,
  exec_prepare,
  exec_commit
};

// try_op: a TCC branch's try; run: a saga (answered as the saga ends, or once it is durable),
// or a message with its local op (answered once decided); begin: a half message (answered once
// durable).
enum class RequestKind : uint8_t { get, commit, abort, resolve, try_op, run, begin };

enum class TimerKind : uint8_t { txn_timeout, prepare_timeout, resend, wait_timeout };

// How an op's answer counts (docs/DESIGN.md §8): 2xx, 409/422, anything else.
enum class OpOutcome : uint8_t { ok, business_failure, unknown };
inline constexpr size_t kOpOutcomes = 3;
std::string_view op_outcome_name(OpOutcome o);

// The coordinator's decision for a transaction.
enum class Decision : uint8_t { none, commit, abort };

// Another branch of the same transaction, as a 3PC agent's terminating peers know it.
struct Peer {
  std::string participant;
  std::string url;
  bool operator==(const Peer&) const = default;
};

std::string_view state_name(TxnState s);
std::optional<TxnState> parse_state(std::string_view s);
std::string_view branch_state_name(BranchState s);
std::string_view msg_name(MsgKind k);
bool terminal(TxnState s);

// One message to a branch's agent. The driver sends it and feeds the answer back as a
// BranchReply with the same gid, participant and kind.
struct Message {
  std::string gid;
  std::string participant;
  std::string url;
  MsgKind kind = MsgKind::prepare;
  uint32_t attempt = 0;  // 1 for the first send
  Protocol protocol = Protocol::two_phase;
  std::vector<Peer> peers;  // 3PC prepare: every branch, so agents can terminate together
};

enum class ReplyKind : uint8_t {
  vote_yes,
  vote_no,
  vote_read_only,
  precommitted,
  committed,  // the branch is committed (answer to commit, or 409 to abort)
  aborted,    // the branch is aborted (answer to abort, or 409 to commit)
  failed,     // no usable answer: unreachable, timeout, 5xx, garbage
};

// One call of a TCC branch's or saga step's op. The driver carries it out (an HTTP op, or a
// SQL op through an agent's step endpoint) and feeds the answer back as an OpReply with the
// same gid, branch and op.
struct OpCall {
  std::string gid;
  std::string branch;
  StepOp op = StepOp::action;
  uint32_t attempt = 0;  // 1 for the first call
  std::string spec;      // the op's JSON, as the client described it
};

struct OpReply {
  std::string gid;
  std::string branch;
  StepOp op = StepOp::action;
  OpOutcome outcome = OpOutcome::unknown;
  std::string result;          // ok: the answer's JSON text (empty: none)
  std::string error;           // otherwise: why
  int64_t retry_after_ms = 0;  // the answer's Retry-After (unknown answers)
};

struct BranchReply {
  std::string gid;
  std::string participant;
  MsgKind kind = MsgKind::prepare;
  ReplyKind reply = ReplyKind::failed;
  std::string reason;  // for vote_no / failed / aborted
};

struct CommitOptions {
  // Answer once the decision is durable instead of after every branch acknowledged.
  bool wait_decision_only = false;
};

struct BranchView {
  std::string participant;  // TCC/saga: the branch or step name
  std::string url;
  BranchState state = BranchState::active;
  uint32_t attempts = 0;
  std::string last_error;
  bool heuristic = false;  // ended with the outcome opposite to the decision
  bool forced = false;     // an operator declared it finished
  std::string result;      // TCC/saga: JSON text of its last successful op's answer
  std::string spec;        // a notification: its op's JSON (url, body, headers)
};

struct TxnView {
  std::string gid;
  Protocol protocol = Protocol::two_phase;
  TxnState state = TxnState::aborted;
  Decision decision = Decision::none;
  std::string reason;         // why it aborted (vote_no, prepare_timeout, timeout, client, ...)
  std::string reason_branch;  // the branch that caused it
  bool presumed = false;      // no record: aborted by presumption
  bool forgotten = false;     // older than retention: outcome no longer known
  bool one_phase = false;
  bool recovered = false;
  int64_t created_ms = 0;  // 0 when unknown (after a restart)
  int64_t decided_ms = 0;
  int64_t deadline_ms = 0;  // while active: when it times out
  std::vector<BranchView> branches;
};

// How a reply answers, as the protocol sees it; the codec gives it its HTTP status
// (encode_reply) and nothing else does.
enum class Answer : uint8_t {
  done,      // the request's outcome
  created,   // a new branch enlisted
  pending,   // commit decided, phase 2 still running
  contrary,  // the transaction is, or ended, otherwise than asked (the view says how)
};

struct ClientReply {
  uint64_t waiter = 0;
  RequestKind kind = RequestKind::get;
  Answer answer = Answer::done;
  Status error;            // not ok: the error; alone (no view.gid) it is the whole answer
  TxnView view;            // ok: answer with the view
  bool needs_log = false;  // the driver answers from the log record of view.gid
  std::string branch;      // try_op: the branch tried
};

struct Persist {
  wal::TxnRecord record;
  bool sync = false;
  bool notify = false;  // call on_persisted(gid, now, seq) when durable
  uint64_t seq = 0;     // TCC/saga: the transaction's write count, passed back to on_persisted
};

struct Ready {
  std::vector<Persist> persist;
  std::vector<Message> messages;
  std::vector<OpCall> calls;
  std::vector<ClientReply> replies;
  bool empty() const {
    return persist.empty() && messages.empty() && calls.empty() && replies.empty();
  }
};

// A saga's options (docs/DESIGN.md §9).
// The longest Retry-After an op's answer can make us wait.
inline constexpr int64_t kRetryAfterMaxMs = 300'000;
inline constexpr uint32_t kSagaAttemptsDefault = 5;  // of a backward saga's action
inline constexpr int64_t kSagaAttemptsMax = 1000;

struct SagaOptions {
  bool parallel = false;
  bool forward = false;  // recovery "forward": retry instead of compensating
  uint32_t attempts_max = kSagaAttemptsDefault;  // of an action; 0: unlimited (forward's default)
  int64_t retry_min_ms = 0;                      // 0: the coordinator's
  int64_t retry_max_ms = 0;
  bool wait_accepted = false;  // answer 202 once the saga is durable
  std::optional<int64_t> timeout_ms;
  std::string notify;  // "notify": the HTTP op told of the outcome (docs/DESIGN.md §10.3)
  bool operator==(const SagaOptions&) const = default;
};

// A TCC branch to try, or a saga step: its name and ops.
struct OpBranch {
  std::string name;
  std::vector<wal::OpText> ops;
};

// Notifications (docs/DESIGN.md §10.3) are delivered at most this many times unless told.
inline constexpr uint32_t kNotifyAttemptsDefault = 8;
inline constexpr int64_t kNotifyAttemptsMax = 1000;

// A notification is not a transaction of the agents': it never holds back the purge of their
// markers and barrier rows (finished_below).
constexpr bool holds_finished_below(Protocol p) {
  return p != Protocol::notify;
}

// A transactional message (docs/DESIGN.md §10.1): its producer's ops (check, and in the
// one-request form the local op before it) and one deliver op per destination.
struct MsgRequest {
  std::vector<wal::OpText> producer;
  std::vector<wal::OpText> destinations;
  std::optional<int64_t> timeout_ms;  // check-back after this long undecided
  std::string notify;                 // "notify"
};
inline constexpr int64_t kMsgTimeoutDefaultMs = 10'000;
// An unknown answer to the one-request form's local op is resent this many times in all, then
// the message is settled by check-back.
inline constexpr uint32_t kLocalAttemptsMax = 3;

// --- internal to the machine (in the header for tests that inspect it) ---------------------

struct BranchSlot {
  std::string participant;
  std::string url;
  std::string instance;  // the agent run that enlisted it
  BranchState state = BranchState::active;
  bool in_flight = false;
  uint32_t attempts = 0;
  std::string last_error;
  bool heuristic = false;  // ended opposite to the decision
  bool forced = false;     // an operator declared it finished
  // TCC branches and saga steps:
  std::vector<wal::OpText> ops;
  std::string result;
  uint64_t registered_seq = 0;  // TCC: the write that registered it; its try waits for it.
                                // Saga pivot: the write of its running mark; so does its action
  uint64_t waiter = 0;          // TCC: the try request waiting for its answer
  int64_t retry_after_ms = 0;   // the last answer's Retry-After
  bool retry_pending = false;   // a resend timer is set for its op
  bool may_have_run = false;    // saga: its action was sent and did not fail for good
};

struct Waiter {
  uint64_t id = 0;
  RequestKind kind = RequestKind::commit;
  bool decision_only = false;
};

struct Txn {
  uint64_t serial = 0;
  std::string gid;
  GidParts parts;
  Protocol protocol = Protocol::two_phase;
  TxnState state = TxnState::active;
  Decision decision = Decision::none;
  bool decision_durable = false;  // the commit/pre-commit/one-phase record is synced
  bool one_phase = false;
  bool oneshot = false;           // statements travel with prepare / one-phase commit
  bool nothing_to_drive = false;  // committed with no writing branch: one synced record
  bool recovered = false;
  bool heuristic_mixed = false;
  bool rollback_only = false;  // a branch's enlist was refused: commit answers aborted
  int64_t created_ms = 0;
  int64_t deadline_ms = 0;  // active timeout
  int64_t prepare_deadline_ms = 0;
  int64_t decided_ms = 0;
  std::string reason;
  std::string reason_branch;
  std::vector<BranchSlot> branches;
  std::vector<Waiter> waiters;
  std::string notify;     // "notify": the HTTP op told of the outcome (docs/DESIGN.md §10.3)
  bool notified = false;  // its notification was made
  // TCC and saga:
  SagaOptions saga;
  uint64_t writes = 0;        // records emitted for it (Persist::seq)
  uint64_t durable_seq = 0;   // the last synced one known durable
  uint64_t decision_seq = 0;  // the write of its commit (TCC confirm) or compensate decision
  bool recorded = false;      // a synced record of it is durable in the log
};

}  // namespace tpc::coord
