// AgentMachine: steps (docs/DESIGN.md §8). A step is not a branch: it has no session, no
// enlistment and no state kept between calls; its barrier rows in PostgreSQL are its memory.
// The machine bounds how many run at once, refuses steps of transactions already finished,
// and turns what the executor found into the answer.
#include <algorithm>

#include "participant/agent_machine.h"

namespace tpc::agent {
namespace {

// The op whose barrier row refuses `op` when it ran first.
std::string_view refuser_name(StepOp op) {
  switch (op) {
    case StepOp::try_op: return "cancel";
    case StepOp::local: return "check-back";
    default: return "compensation";
  }
}

}  // namespace

void AgentMachine::on_finished_below(std::string_view coordinator, uint64_t epoch, uint64_t seq) {
  GidParts mark{std::string(coordinator), epoch, seq};
  auto it = finished_below_.find(coordinator);
  if (it == finished_below_.end())
    finished_below_.emplace(std::string(coordinator), std::move(mark));
  else if (it->second < mark)
    it->second = std::move(mark);  // a stale answer never moves the mark back
}

std::optional<GidParts> AgentMachine::purge_mark(std::string_view coordinator) const {
  auto it = finished_below_.find(coordinator);
  if (it == finished_below_.end()) return std::nullopt;
  GidParts mark = it->second;
  for (const auto& [id, s] : steps_)
    if (s.parts && s.parts->coordinator == coordinator && *s.parts < mark) mark = *s.parts;
  return mark;
}

bool AgentMachine::finished_at_coordinator(std::string_view gid) const {
  auto parts = parse_gid(gid);
  if (!parts) return false;
  auto it = finished_below_.find(parts->coordinator);
  return it != finished_below_.end() && *parts < it->second;
}

// The transaction has finished: every op it needed succeeded, so a call arriving now is a late
// resend. A try/action must not run (its cancel may have run, and its barrier rows may be
// gone); anything else ran already.
void AgentMachine::reply_finished_step(const Request& req) {
  Reply r;
  if (req.step_op == StepOp::check) {
    // Its barrier rows may be gone; the coordinator decided long ago and asks no more.
    r.error = conflict("the transaction has finished at its coordinator; ask it for the outcome");
  } else if (undone_later(req.step_op)) {
    r.barrier = pg::Barrier::refused;
    r.error = conflict("the transaction has finished; a late " +
                       std::string(step_op_name(req.step_op)) + " is refused");
  } else {
    r.barrier = pg::Barrier::duplicate;
    r.results = std::make_shared<std::vector<pg::StatementResult>>();
  }
  count_step(r);
  reply(req, std::move(r));
}

void AgentMachine::step(std::string_view gid, Request req, int64_t now_ms) {
  TPC_ASSERT(req.kind == RequestKind::step);
  if (finished_at_coordinator(gid)) return reply_finished_step(req);
  if (steps_.size() >= opts_.steps_max) {
    Reply r;
    r.error =
        unavailable("too many steps in flight (steps_max=" + std::to_string(opts_.steps_max) + ")");
    count_step(r);
    return reply(req, std::move(r));
  }
  uint64_t id = next_step_++;
  PgOp op;
  op.gid = std::string(gid);
  op.kind = OpKind::step;
  op.step = id;
  op.branch = req.branch;
  op.step_op = req.step_op;
  op.statements = std::move(req.statements);
  op.rows_max = opts_.result_rows_max;
  req.statements.clear();
  steps_.emplace(id, StepInFlight{std::move(req), parse_gid(gid), now_ms});
  ready_.ops.push_back(std::move(op));
}

int64_t AgentMachine::oldest_step_age_ms(int64_t now_ms) const {
  int64_t oldest = now_ms;
  for (auto& [id, s] : steps_) oldest = std::min(oldest, s.since_ms);
  return now_ms - oldest;
}

void AgentMachine::on_step_done(uint64_t step, OpResult result, int64_t now_ms) {
  (void)now_ms;
  auto it = steps_.find(step);
  if (it == steps_.end()) return;
  Request req = std::move(it->second.req);
  steps_.erase(it);
  Reply r;
  r.sqlstate = result.sqlstate;
  if (result.status.ok()) {
    TPC_ASSERT(result.barrier.has_value());
    r.barrier = result.barrier;
    if (*r.barrier == pg::Barrier::refused)
      r.error = conflict(std::string(step_op_name(req.step_op)) + " of branch " + req.branch +
                         " refused: its " + std::string(refuser_name(req.step_op)) + " ran first");
    if (*r.barrier == pg::Barrier::fenced)
      r.error = conflict("the local op of branch " + req.branch +
                         " never committed; the check fenced it, so it never will");
    r.results = result.results;
    r.stored_results = std::move(result.stored_results);
  } else if (result.status.code() == Code::sql_error && !pg::retryable_sqlstate(result.sqlstate)) {
    r.error = result.status;  // the business's answer: final
  } else {
    r.error = unavailable(result.status.message());  // unknown: the caller resends
  }
  count_step(r);
  reply(req, std::move(r));
}

void AgentMachine::count_step(const Reply& r) {
  if (r.barrier) {
    switch (*r.barrier) {
      case pg::Barrier::committed: ++counters_.steps_committed; return;
      case pg::Barrier::fenced: ++counters_.steps_fenced; return;
      case pg::Barrier::applied: ++counters_.steps_applied; return;
      case pg::Barrier::duplicate: ++counters_.steps_duplicate; return;
      case pg::Barrier::empty_compensation: ++counters_.steps_empty_compensation; return;
      case pg::Barrier::refused: ++counters_.steps_refused; return;
    }
  }
  if (r.error.code() == Code::sql_error)
    ++counters_.steps_failed;
  else
    ++counters_.steps_unknown;
}

}  // namespace tpc::agent
