// The SQL of a step (docs/DESIGN.md §8): a SQL op of a TCC branch, a saga step or a message,
// run in one local transaction together with its barrier row in tpc_barrier, so that however
// often the call is resent its statements commit at most once, a cancel/compensate whose
// try/action never ran commits nothing but its rows, and a try/action that comes after its
// cancel/compensate is refused. barrier_verdict (branch_types.h) is the rule; this is its SQL.
//
//   tpc_barrier(gid text, branch text, op text, written_by text, coordinator text,
//               epoch bigint, seq bigint, result text, created_at timestamptz,
//               PRIMARY KEY (gid, branch, op))
// (created by ensure_schema). written_by is the op whose call wrote the row: a cancel writes
// its try's row in its own name. coordinator, epoch and seq come from the gid, so the rows of
// finished transactions are purged like the markers. result is the encoded results of the
// call that applied, so that a duplicate answers what the first call did.
//
// Concurrency: the rows' primary key serialises calls of one key. A second call waits on the
// first's uncommitted row and, once it ends, finds the row (duplicate) or takes it (the first
// rolled back). A cancel's insert of its try's row waits the same way for a try in flight.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/protocol.h"
#include "common/status.h"
#include "participant/branch_types.h"
#include "participant/pg_conn.h"

namespace tpc::pg {

// One call of a step, as its barrier rows record it.
struct StepCall {
  std::string gid;
  std::string branch;
  StepOp op = StepOp::action;
  std::string coordinator;  // the gid's parts, for purging
  int64_t epoch = 0;
  int64_t seq = 0;
};

struct StepRun {
  // ok: `barrier` says what happened. sql_error: a statement (or COMMIT) failed with
  // `sqlstate`; everything was rolled back, barrier rows included. unavailable: the outcome is
  // unknown (the connection broke, possibly during COMMIT) or the barrier rows could not be
  // written (sqlstate set when the server said why); a resend settles it.
  Status status;
  std::string sqlstate;
  std::optional<Barrier> barrier;
  std::vector<StatementResult> results;  // applied
  std::optional<std::string> stored;     // duplicate: the result the first call stored
};

// Encodes a call's results for tpc_barrier.result.
using ResultText = std::string (*)(const std::vector<StatementResult>&);

// Runs the call on `c` (outside any block). A try/action/confirm/deliver/local sends its
// barrier rows and its statements in one round trip (a duplicate's or a refused call's work
// is rolled back), then stores its result and commits in a second. A cancel/compensate reads
// its barrier first and runs its statements only when the op it undoes ran. A statement whose
// row count misses its expectation (expect_rows, one per statement or empty) fails with
// kExpectRowsSqlstate, one returning more than rows_max rows with kTooManyRowsSqlstate; either
// rolls back. A check (a message's check-back, docs/DESIGN.md §10.1) runs no statements: it
// answers committed (with the local op's stored results) or fenced, writing the local op's row
// in its own name so that a later local op is refused.
StepRun run_step(PgConn& c, const StepCall& call, std::vector<PipelineStep> statements,
                 const std::vector<std::optional<int64_t>>& expect_rows, size_t rows_max,
                 ResultText encode);

// Deletes barrier rows of `coordinator` strictly below (epoch, seq), at most `limit`; returns
// the rows deleted.
Result<int64_t> purge_barriers(PgConn& c, std::string_view coordinator, int64_t epoch, int64_t seq,
                               int64_t limit);

}  // namespace tpc::pg
