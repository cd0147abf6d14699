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
};

enum class BranchOutcome : uint8_t {
  pending = 0,     // phase 2 not acknowledged yet
  committed = 1,
  aborted = 2,     // acknowledged as aborted (one-phase no, or a heuristic abort)
  read_only = 3,   // left phase 2 at prepare
  forced = 4,      // an operator declared the branch finished (heuristic)
};

struct BranchRecord {
  std::string participant;
  std::string url;
  BranchOutcome outcome = BranchOutcome::pending;
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
  bool operator==(const TxnRecord&) const = default;
};

// Value layout: [u8 version][u32 crc32c of payload, little-endian][payload].
inline constexpr uint8_t kRecordVersion = 1;

std::string encode_record(const TxnRecord& r);
// corruption on a bad checksum, an unknown version or a payload that does not decode.
Result<TxnRecord> decode_record(std::string_view value);

// CRC-32C (Castagnoli).
uint32_t crc32c(std::string_view data);

std::string_view decision_name(Decision d);
std::string_view outcome_name(BranchOutcome o);

}  // namespace tpc::wal
