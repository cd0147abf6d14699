// The values a branch's PostgreSQL work produces, as the agent's machine sees them: a
// statement's result, a prepare's vote, how a prepared branch ended, the durable evidence of
// a branch. Plain data, no libpq: the machine (agent_machine.h) and the simulator use these
// without the PostgreSQL client; pg_conn.h and pg_branch.h produce them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tpc::pg {

using Value = std::optional<std::string>;  // nullopt is SQL NULL

struct StatementResult {
  std::vector<std::string> columns;
  std::vector<std::vector<Value>> rows;
  int64_t affected = 0;      // PQcmdTuples, 0 when empty
  std::string command_tag;   // PQcmdStatus, e.g. "UPDATE 1", "PREPARE TRANSACTION"
  bool truncated = false;    // rows were cut to the agent's limit (after a one-phase commit)
};

enum class Vote : uint8_t { yes, no, read_only };

struct PrepareResult {
  Vote vote = Vote::no;
  std::string reason;     // for no: the server's message
  std::string sqlstate;   // for no from the server, e.g. "23503", "53200"
};

enum class Outcome : uint8_t { committed, aborted };

// Whether the branch is prepared now, and if not whether it committed (marker) or not.
enum class Evidence : uint8_t { prepared, committed, absent };

// A branch PostgreSQL no longer has prepared (42704): it committed iff its marker row exists
// (not a tombstone). "Does not exist" alone is never success: finished earlier, rolled back
// by someone else, or never prepared all answer it.
inline Outcome outcome_when_not_prepared(bool marker_exists) {
  return marker_exists ? Outcome::committed : Outcome::aborted;
}

// The 3PC rows of tpc_agent_state, one text form each (the other rows are decision records,
// agent_machine.h's check_record_state): a branch that is 3PC, recorded with its peers before
// it votes, and one that is pre-committed.
enum class ThreePcRecord : uint8_t { prepared3, precommitted };
constexpr std::string_view three_pc_record_text(ThreePcRecord r) {
  return r == ThreePcRecord::prepared3 ? "prepared3" : "precommitted";
}
constexpr std::optional<ThreePcRecord> parse_three_pc_record(std::string_view s) {
  if (s == "prepared3") return ThreePcRecord::prepared3;
  if (s == "precommitted") return ThreePcRecord::precommitted;
  return std::nullopt;
}

// A statement whose row count differs from its expectation fails with this SQLSTATE.
inline constexpr std::string_view kExpectRowsSqlstate = "21000";  // cardinality_violation

}  // namespace tpc::pg
