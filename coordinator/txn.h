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
enum class TxnState : uint8_t {
  active,
  preparing,
  precommitted,
  committing,
  committed,
  aborting,
  aborted,
  heuristic_mixed,
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
};

// exec_prepare / exec_commit carry a one-shot branch's statements with its prepare (or, for a
// single branch, with its one-phase commit); a resent one-phase commit never carries them.
enum class MsgKind : uint8_t { prepare, precommit, commit, commit_one_phase, abort, exec_prepare, exec_commit };

enum class RequestKind : uint8_t { get, commit, abort, resolve };

enum class TimerKind : uint8_t { txn_timeout, prepare_timeout, resend, wait_timeout };

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
  std::string participant;
  std::string url;
  BranchState state = BranchState::active;
  uint32_t attempts = 0;
  std::string last_error;
  bool heuristic = false;  // ended with the outcome opposite to the decision
  bool forced = false;     // an operator declared it finished
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
  int64_t created_ms = 0;     // 0 when unknown (after a restart)
  int64_t decided_ms = 0;
  int64_t deadline_ms = 0;    // while active: when it times out
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
};

struct Persist {
  wal::TxnRecord record;
  bool sync = false;
  bool notify = false;  // call on_persisted(gid) when durable
};

struct Ready {
  std::vector<Persist> persist;
  std::vector<Message> messages;
  std::vector<ClientReply> replies;
  bool empty() const { return persist.empty() && messages.empty() && replies.empty(); }
};

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
  bool rollback_only = false;     // a branch's enlist was refused: commit answers aborted
  int64_t created_ms = 0;
  int64_t deadline_ms = 0;        // active timeout
  int64_t prepare_deadline_ms = 0;
  int64_t decided_ms = 0;
  std::string reason;
  std::string reason_branch;
  std::vector<BranchSlot> branches;
  std::vector<Waiter> waiters;
};

}  // namespace tpc::coord
