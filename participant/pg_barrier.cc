// The SQL of a step. See pg_barrier.h for the contract; the notes here are about what each
// round trip holds and why.
#include "participant/pg_barrier.h"

#include "participant/pg_run.h"

namespace tpc::pg {
namespace {

constexpr std::string_view kBarrierInsert =
    "INSERT INTO tpc_barrier (gid, branch, op, written_by, coordinator, epoch, seq)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";
constexpr std::string_view kBarrierRead =
    "SELECT written_by, result FROM tpc_barrier WHERE gid = $1 AND branch = $2 AND op = $3";
constexpr std::string_view kBarrierResult =
    "UPDATE tpc_barrier SET result = $4 WHERE gid = $1 AND branch = $2 AND op = $3";

PipelineStep insert_row(const StepCall& call, StepOp op) {
  return PipelineStep{
      std::string(kBarrierInsert),
      {call.gid, call.branch, std::string(step_op_name(op)), std::string(step_op_name(call.op)),
       call.coordinator, std::to_string(call.epoch), std::to_string(call.seq)},
      true};
}

std::vector<Value> own_key(const StepCall& call) {
  return {call.gid, call.branch, std::string(step_op_name(call.op))};
}

// The first round trip's barrier part: BEGIN, the call's own row, for a cancel/compensate the
// row of the op it undoes, and the own row as it stands now (this call's, or an earlier one's).
std::vector<PipelineStep> barrier_steps(const StepCall& call) {
  std::vector<PipelineStep> steps;
  steps.push_back(PipelineStep{"BEGIN", {}, true});
  steps.push_back(insert_row(call, call.op));
  if (auto undone = undoes(call.op)) steps.push_back(insert_row(call, *undone));
  steps.push_back(PipelineStep{std::string(kBarrierRead), own_key(call), true});
  return steps;
}

// Reads the barrier part of rs into *rows (and a duplicate's stored result into run). False
// when it failed: the outcome is unknown to the caller, who may resend (the block is ended).
bool read_barrier(PgConn& c, const StepCall& call, const std::vector<ExecResult>& rs,
                  BarrierRows* rows, StepRun* run) {
  size_t n = undoes(call.op) ? 4 : 3;
  for (size_t i = 0; i < n; ++i) {
    if (rs[i].status.ok()) continue;
    run->status = unavailable(with_sqlstate(rs[i], "writing the barrier rows").message());
    run->sqlstate = rs[i].sqlstate;
    rollback_if_open(c);
    return false;
  }
  const StatementResult& own = rs[n - 1].result;
  if (own.rows.size() != 1 || own.rows[0].size() != 2 || !own.rows[0][0]) {
    run->status = internal_error("tpc_barrier: the call's row is missing after its insert");
    rollback_if_open(c);
    return false;
  }
  rows->own_inserted = rs[1].result.affected == 1;
  rows->own_written_by = *own.rows[0][0];
  rows->undone_inserted = n == 4 && rs[2].result.affected == 1;
  if (!rows->own_inserted && own.rows[0][1]) run->stored = *own.rows[0][1];
  return true;
}

// Checks the statements' results rs[first..]: an error, a row count against its expectation,
// the row limit. Moves good results into run->results; on a failure sets run's status, ends
// the block and returns false.
bool statements_ok(PgConn& c, std::vector<ExecResult>& rs, size_t first,
                   const std::vector<std::optional<int64_t>>& expect_rows, size_t rows_max,
                   StepRun* run) {
  for (size_t i = first; i < rs.size(); ++i) {
    ExecResult& r = rs[i];
    size_t at = i - first;
    if (r.status.ok()) {
      if (Status rows = check_rows(r.result, at, expect_rows); !rows.ok()) {
        r.status = rows;
        r.sqlstate = std::string(kExpectRowsSqlstate);
      } else if (r.result.rows.size() > rows_max) {
        r.status = Status(Code::sql_error, "returned " + std::to_string(r.result.rows.size()) +
                                               " rows; the limit is " + std::to_string(rows_max));
        r.sqlstate = std::string(kTooManyRowsSqlstate);
      }
    }
    if (r.status.ok()) {
      run->results.push_back(std::move(r.result));
      continue;
    }
    run->status =
        Status(r.status.code(), "statement " + std::to_string(at + 1) + ": " + r.status.message());
    run->sqlstate = r.sqlstate;
    run->results.clear();
    rollback_if_open(c);
    return false;
  }
  return true;
}

// Ends the block: `steps` (the result row, or nothing), then COMMIT or ROLLBACK.
void end_block(PgConn& c, std::vector<PipelineStep> steps, bool commit, StepRun* run) {
  steps.push_back(PipelineStep{commit ? "COMMIT" : "ROLLBACK", {}, true});
  std::vector<ExecResult> rs = run_steps(c, steps);
  for (ExecResult& r : rs) {
    if (r.status.ok() || r.skipped) continue;
    // unavailable: the COMMIT may have happened; a resend finds the row (duplicate) or not.
    // sql_error: a deferred constraint or a serialization failure at COMMIT; it rolled back.
    run->status = Status(r.status.code(), with_sqlstate(r, "ending the step").message());
    run->sqlstate = r.sqlstate;
    rollback_if_open(c);
    return;
  }
  const ExecResult& last = rs.back();
  if (commit && last.result.command_tag != "COMMIT") {
    run->status = Status(Code::sql_error, "the block had failed; COMMIT rolled it back (" +
                                              last.result.command_tag + ")");
    run->sqlstate = "25P02";  // in_failed_sql_transaction
  }
}

// A check-back, in one round trip: it writes the local op's row in its own name unless the
// local op's is there (ON CONFLICT DO NOTHING waits for a local op in flight to end), then
// reads whose row it is. Either answer is final: a local op arriving later finds the row
// taken and is refused.
StepRun check_local(PgConn& c, const StepCall& call) {
  StepRun run;
  StepCall local = call;
  local.op = StepOp::local;
  PipelineStep fence = insert_row(call, StepOp::local);
  std::vector<PipelineStep> steps{PipelineStep{"BEGIN", {}, true}, std::move(fence),
                                  PipelineStep{std::string(kBarrierRead), own_key(local), true},
                                  PipelineStep{"COMMIT", {}, true}};
  std::vector<ExecResult> rs = run_steps(c, steps);
  for (const ExecResult& r : rs) {
    if (r.status.ok()) continue;
    run.status = unavailable(with_sqlstate(r, "checking the local op's barrier row").message());
    run.sqlstate = r.sqlstate;
    rollback_if_open(c);
    return run;
  }
  const StatementResult& row = rs[2].result;
  if (row.rows.size() != 1 || row.rows[0].size() != 2 || !row.rows[0][0] ||
      rs[3].result.command_tag != "COMMIT") {
    run.status = internal_error("tpc_barrier: the local op's row is missing after the check");
    return run;
  }
  bool ran = *row.rows[0][0] == step_op_name(StepOp::local);
  run.barrier = ran ? Barrier::committed : Barrier::fenced;
  if (ran) run.stored = row.rows[0][1] ? *row.rows[0][1] : std::string("[]");
  return run;
}

}  // namespace

StepRun run_step(PgConn& c, const StepCall& call, std::vector<PipelineStep> statements,
                 const std::vector<std::optional<int64_t>>& expect_rows, size_t rows_max,
                 ResultText encode) {
  StepRun run;
  if (c.in_transaction()) {
    run.status = internal_error("run_step inside a transaction block");
    return run;
  }
  if (call.op == StepOp::check) return check_local(c, call);
  const bool compensating = undoes(call.op).has_value();
  std::vector<PipelineStep> steps = barrier_steps(call);
  const size_t first = steps.size();
  if (!compensating)
    for (auto& s : statements) steps.push_back(std::move(s));
  std::vector<ExecResult> rs = run_steps(c, steps);
  BarrierRows rows;
  if (!read_barrier(c, call, rs, &rows, &run)) return run;
  run.barrier = barrier_verdict(call.op, rows);
  if (*run.barrier != Barrier::applied) {
    // A duplicate or a refused call rolls back whatever its statements did; an empty
    // compensation commits its two rows and nothing else.
    end_block(c, {}, *run.barrier == Barrier::empty_compensation, &run);
    return run;
  }
  if (compensating) rs = statements.empty() ? std::vector<ExecResult>{} : run_steps(c, statements);
  if (!statements_ok(c, rs, compensating ? 0 : first, expect_rows, rows_max, &run)) {
    run.barrier.reset();  // rolled back: nothing applied
    return run;
  }
  std::vector<Value> key = own_key(call);
  key.push_back(encode(run.results));
  end_block(c, {PipelineStep{std::string(kBarrierResult), std::move(key), true}}, true, &run);
  if (!run.status.ok()) {
    run.barrier.reset();
    run.results.clear();
  }
  return run;
}

Result<int64_t> purge_barriers(PgConn& c, std::string_view coordinator, int64_t epoch, int64_t seq,
                               int64_t limit) {
  return delete_finished(c, "tpc_barrier", coordinator, epoch, seq, limit);
}

}  // namespace tpc::pg
