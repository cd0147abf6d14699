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

#include "common/protocol.h"

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

// A step's barrier (docs/DESIGN.md §8): what its rows in tpc_barrier, keyed (gid, branch, op),
// say about this call of the step.
enum class Barrier : uint8_t {
  applied,             // first call: the statements ran and committed with the barrier row
  duplicate,           // called before: nothing ran again (the first call's results stand)
  empty_compensation,  // a cancel/compensate whose try/action never ran: only the rows commit
  refused,             // a try/action after its cancel/compensate (anti-hanging): nothing ran
  // A message's check-back (op check, docs/DESIGN.md §10.1), on the row of its local op:
  committed,  // the local op had committed (its results are answered)
  fenced,     // it had not: the check wrote its row, so that it never will
};

constexpr std::string_view barrier_name(Barrier b) {
  switch (b) {
    case Barrier::applied: return "applied";
    case Barrier::duplicate: return "duplicate";
    case Barrier::empty_compensation: return "empty_compensation";
    case Barrier::refused: return "refused";
    case Barrier::committed: return "committed";
    case Barrier::fenced: return "fenced";
  }
  return "?";
}

// The barrier rows as a step finds them, inside its local transaction, after inserting them
// with ON CONFLICT DO NOTHING: its own row (gid, branch, op), and for a cancel/compensate
// also the row of the op it undoes, written in the cancel's (compensate's) name, so that the
// undone op, if it comes later, finds its row taken by another op and is refused.
struct BarrierRows {
  bool own_inserted = false;     // the row (gid, branch, op) is this call's
  std::string own_written_by;    // the op named in that row, when it was there already
  bool undone_inserted = false;  // cancel/compensate: the undone op's row is this call's
};

// The barrier rule, one place for every executor.
inline Barrier barrier_verdict(StepOp op, const BarrierRows& rows) {
  if (!rows.own_inserted)
    return rows.own_written_by == step_op_name(op) ? Barrier::duplicate : Barrier::refused;
  if (undoes(op) && rows.undone_inserted) return Barrier::empty_compensation;
  return Barrier::applied;
}

// The SQLSTATEs after which a step's outcome is unknown and the call is retried (docs/DESIGN.md
// §8): connection exceptions (08), transaction rollbacks such as serialization failures and
// deadlocks (40), lock_not_available (55P03), query_canceled (57014), and the server going
// away or not accepting connections yet (57P01-57P03, 53300). Any other SQL error is the
// business's answer, final.
constexpr bool retryable_sqlstate(std::string_view s) {
  if (s.size() != 5) return false;
  std::string_view cls = s.substr(0, 2);
  return cls == "08" || cls == "40" || s == "55P03" || s == "57014" || s == "57P01" ||
         s == "57P02" || s == "57P03" || s == "53300";
}

// A statement whose row count differs from its expectation fails with this SQLSTATE.
inline constexpr std::string_view kExpectRowsSqlstate = "21000";  // cardinality_violation
// A statement that returns more rows than the agent allows fails with this SQLSTATE.
inline constexpr std::string_view kTooManyRowsSqlstate = "54000";  // program_limit_exceeded

}  // namespace tpc::pg
