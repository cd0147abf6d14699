// Helpers the agent's SQL modules share (pg_branch.cc, pg_barrier.cc): running a list of
// statements in one round trip, checking a statement's row count against its expectation,
// errors with their SQLSTATE, and ending a block an error left open.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "participant/pg_conn.h"

namespace tpc::pg {

// "<what>: <message> (SQLSTATE 23503)" for functions that return only a Status.
Status with_sqlstate(const ExecResult& r, std::string_view what);
// A column's integer, or internal_error naming `what` (NULL, not an integer).
Result<int64_t> parse_int(const Value& v, std::string_view what);
// Ends a block the server left open after an error; the vote or outcome is already known.
void rollback_if_open(PgConn& c);
// The steps in one round trip (a pipeline), or one by one when they are large; one result
// per step, those after a failure skipped.
std::vector<ExecResult> run_steps(PgConn& c, const std::vector<PipelineStep>& steps);
// sql_error when statement i has an expectation (expect_rows[i]) its result does not meet.
Status check_rows(const StatementResult& r, size_t i,
                  const std::vector<std::optional<int64_t>>& expect_rows);

// Deletes at most `limit` rows of `table` (tpc_marker or tpc_barrier: columns coordinator,
// epoch, seq) whose coordinator is `coordinator` and whose (epoch, seq) is below the given one;
// returns the rows deleted.
Result<int64_t> delete_finished(PgConn& c, std::string_view table, std::string_view coordinator,
                                int64_t epoch, int64_t seq, int64_t limit);

}  // namespace tpc::pg
