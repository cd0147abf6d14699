// TxnRecord: what the coordinator writes to its decision log for one global transaction, and
// the checksummed, versioned encoding of it.
//
// Presumed abort: a transaction that aborts before any decision is never written. A record
// exists only once a decision was reached that must survive a crash; the record's decision
// never changes once written (the coordinator asserts it), only branch outcomes and `ended`.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/protocol.h"
#include "common/status.h"

namespace tpc::wal {

enum class Decision : uint8_t {
  commit = 1,     // 2PC: every branch in `branches` commits.
  precommit = 2,  // 3PC: the pre-commit decision; the outcome is commit.
  one_phase = 3,  // the single writing branch was asked to commit in one phase; its answer,
                  // recorded later as committed/aborted, is the outcome.
  aborted = 4,    // a one-phase branch answered abort (kept so the answer stays right)
  committed_read_only = 5,  // every branch voted read_only; nothing to drive
  // TCC and saga (record version 2). For them `commit` is the confirm decision (TCC) or every
  // action done (saga), and `aborted` the cancel or compensate decision.
  registered = 6,  // TCC: branches registered before their try, nothing decided; recovery
                   // aborts the transaction (cancels every registered branch)
  running = 7,     // saga: actions going forward; recovery continues them (a notification:
                   // not delivered yet)
  half = 8,        // msg: a half message, its producer's local transaction not known to have
                   // committed; recovery leaves it to check-back
};

// The decisions a record may move to once written: none, except that an undecided TCC or
// saga record (registered, running) or a half message moves to commit or aborted, once.
bool decision_may_follow(Decision from, Decision to);

enum class BranchOutcome : uint8_t {
  pending = 0,     // phase 2 not acknowledged yet
  committed = 1,
  aborted = 2,     // acknowledged as aborted (one-phase no, or a heuristic abort)
  read_only = 3,   // left phase 2 at prepare
  forced = 4,      // an operator declared the branch finished (heuristic)
};

// One op of a TCC branch or saga step, as the client described it (docs/DESIGN.md §8).
struct OpText {
  StepOp op = StepOp::action;
  std::string json;  // the op's JSON object, as validated by the coordinator's codec
  bool operator==(const OpText&) const = default;
};

struct BranchRecord {
  std::string participant;  // 2PC/3PC: the agent's name; TCC/saga: the branch or step name
  std::string url;          // 2PC/3PC only
  BranchOutcome outcome = BranchOutcome::pending;
  // TCC branches and saga steps (record version 2):
  uint8_t state = 0;  // the coordinator's state of the branch or step, opaque to the log
  uint32_t attempts = 0;
  std::vector<OpText> ops;
  std::string result;      // JSON text of its last successful op's answer; empty: none
  std::string last_error;  // why its last op failed; empty: none
  bool operator==(const BranchRecord&) const = default;
};

struct TxnRecord {
  std::string gid;
  Protocol protocol = Protocol::two_phase;
  Decision decision = Decision::commit;
  bool ended = false;            // every branch acknowledged: nothing left to drive
  bool heuristic_mixed = false;  // branches reached different outcomes
  int64_t decided_wall_ms = 0;
  int64_t ended_wall_ms = 0;     // 0 until ended
  std::vector<BranchRecord> branches;
  std::string options;  // the transaction's options, JSON text (version 2): TCC/saga/msg, and a
                        // 2PC/3PC transaction's "notify"
  bool operator==(const TxnRecord&) const = default;
};

// Value layout: [u8 version][u32 crc32c of payload, little-endian][payload]. 2PC and 3PC
// records are written as version 1 (version 2 when they carry options), TCC, saga, msg and
// notification records as version 2; both are read.
inline constexpr uint8_t kRecordVersion = 1;
inline constexpr uint8_t kRecordVersionOps = 2;

std::string encode_record(const TxnRecord& r);
// corruption on a bad checksum, an unknown version or a payload that does not decode.
Result<TxnRecord> decode_record(std::string_view value);

// CRC-32C (Castagnoli).
uint32_t crc32c(std::string_view data);

std::string_view decision_name(Decision d);
std::string_view outcome_name(BranchOutcome o);

}  // namespace tpc::wal
