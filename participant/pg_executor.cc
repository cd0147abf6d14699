#include "participant/pg_executor.h"

#include <functional>

#include "common/failpoint.h"
#include "common/ids.h"
#include "participant/codec.h"
#include "participant/pg_barrier.h"
#include "participant/pg_branch.h"

namespace tpc::agent {
namespace {

OpResult failed(Status s, std::string sqlstate = "") {
  OpResult r;
  r.status = std::move(s);
  r.sqlstate = std::move(sqlstate);
  return r;
}

// The op's statements as cached pipeline steps (moved out), and their row expectations.
std::vector<pg::PipelineStep> pipeline_of(std::vector<Statement>& statements,
                                          std::vector<std::optional<int64_t>>* expect_rows) {
  std::vector<pg::PipelineStep> steps;
  steps.reserve(statements.size());
  for (Statement& st : statements) {
    expect_rows->push_back(st.expect_rows);
    steps.push_back(pg::PipelineStep{std::move(st.sql), std::move(st.params), true});
  }
  return steps;
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return out;
}

// Whose records the database holds. Prepared transactions named after another agent, or an
// identity row naming another agent, mean --name or --pg points at another agent's database:
// answering that agent's coordinators from here would report its prepared branches as
// aborted, so the agent refuses to start.
//
// A different system identifier only warns (and the row takes the new one): a physical copy
// (pg_basebackup, a promoted replica) keeps the identifier, so a different one means a logical
// copy (pg_dump and restore into another cluster), and no prepared transaction survives that.
// Refusing would not bring a lost branch back; the coordinator treats a definite "aborted"
// from a branch that voted yes as a heuristic outcome.
Status check_identity(pg::PgConn& c, const std::string& name, Logger& log) {
  auto foreign = pg::foreign_prepared_agents(c, name);
  if (!foreign.ok()) return foreign.status();
  if (!foreign->empty())
    return invalid_argument("the database holds prepared transactions of agent " +
                            joined(*foreign) + ", not of --name " + name +
                            ": --name or --pg points at another agent's database");
  auto id = pg::claim_identity(c, name);
  if (!id.ok()) return id.status();
  if (id->agent != name)
    return invalid_argument("the database belongs to agent " + id->agent +
                            " (tpc_agent_identity), not to --name " + name +
                            ": --name or --pg points at another agent's database");
  auto sysid = pg::system_identifier(c);
  if (!sysid.ok()) return sysid.status();
  if (!*sysid)
    log.warn("system identifier unavailable: no EXECUTE on pg_control_system()", {{"agent", name}});
  if (*sysid && id->system_identifier && *id->system_identifier != **sysid) {
    log.warn(
        "database copied to another cluster: prepared transactions from before the copy are gone",
        {{"agent", name},
         {"recorded_system_identifier", *id->system_identifier},
         {"system_identifier", **sysid}});
    TPC_RETURN_IF_ERROR(pg::update_system_identifier(c, **sysid));
  }
  log.info(
      id->created ? "identity recorded" : "identity checked",
      {{"agent", name}, {"database", id->database}, {"system_identifier", sysid->value_or("")}});
  return ok_status();
}

}  // namespace

Status PgExecutor::open() {
  auto conn = acquire();
  if (!conn.ok()) return unavailable("cannot connect to PostgreSQL: " + conn.status().message());
  auto mpt = pg::max_prepared_transactions(**conn);
  if (!mpt.ok()) return unavailable("cannot read max_prepared_transactions: " + mpt.status().message());
  if (*mpt == 0)
    return invalid_argument(
        "PostgreSQL has max_prepared_transactions = 0, so PREPARE TRANSACTION cannot work; set it "
        "above 0 (for example to max_connections) in postgresql.conf and restart PostgreSQL");
  if (static_cast<size_t>(*mpt) < cfg_.branches_max)
    log_.warn("max_prepared_transactions is below --branches-max: prepares past it are voted no",
              {{"max_prepared_transactions", *mpt},
               {"branches_max", static_cast<uint64_t>(cfg_.branches_max)}});
  auto missing = pg::missing_privileges(**conn);
  if (!missing.ok())
    return unavailable("cannot check the agent's privileges: " + missing.status().message());
  if (!missing->empty())
    return invalid_argument("the PostgreSQL role lacks " + joined(*missing) + " in this database");
  Status st = pg::ensure_schema(**conn);
  if (!st.ok()) return Status(st.code(), "cannot create the agent's tables: " + st.message());
  st = check_identity(**conn, cfg_.name, log_);
  if (!st.ok()) return Status(st.code(), "identity check: " + st.message());
  log_.info("postgres ready", {{"max_prepared_transactions", *mpt},
                               {"server_version", (*conn)->server_version()}});
  release(std::move(*conn));
  return ok_status();
}

Result<Conn> PgExecutor::acquire() {
  {
    std::lock_guard lock(pool_mu_);
    while (!idle_.empty()) {
      Conn c = std::move(idle_.back());
      idle_.pop_back();
      if (c->usable() && !c->in_transaction()) return c;
    }
  }
  if (connections_open_.fetch_add(1) >= static_cast<int64_t>(cfg_.pg_connections_max)) {
    connections_open_.fetch_sub(1);
    return unavailable("all " + std::to_string(cfg_.pg_connections_max) +
                       " PostgreSQL connections are in use (--pg-connections-max)");
  }
  auto c = pg::PgConn::connect(cfg_.pg);
  if (!c.ok()) {
    connections_open_.fetch_sub(1);
    return c.status();
  }
  ++connections_opened_;
  return Conn(c->release(), ConnCloser{&connections_open_});
}

void PgExecutor::release(Conn conn) {
  if (!conn || !conn->usable() || conn->in_transaction()) return;  // dropped: closes it
  std::lock_guard lock(pool_mu_);
  if (idle_.size() < cfg_.pg_idle_max) idle_.push_back(std::move(conn));
}

Conn PgExecutor::take_session(const std::string& gid) {
  std::lock_guard lock(pool_mu_);
  auto it = sessions_.find(gid);
  if (it == sessions_.end()) return nullptr;
  Conn c = std::move(it->second);
  sessions_.erase(it);
  return c;
}

void PgExecutor::sessions_keep(const std::string& gid, Conn conn) {
  std::lock_guard lock(pool_mu_);
  sessions_[gid] = std::move(conn);
}

void PgExecutor::prepare_branch(const std::string& pgg, const GidParts& parts, pg::PgConn& conn,
                                OpResult* res) {
  TPC_FAILPOINT("agent.before_prepare");
  auto p = pg::prepare(conn, pgg, parts.coordinator, static_cast<int64_t>(parts.epoch),
                       static_cast<int64_t>(parts.seq));
  if (!p.ok()) {
    res->status = p.status();
    return;
  }
  TPC_FAILPOINT("agent.after_prepare");
  res->prepare = *p;
}

OpResult PgExecutor::execute(PgOp& op) {
  auto parts = parse_gid(op.gid);
  TPC_ASSERT(parts.has_value());  // validated at the HTTP edge
  const std::string pgg = pg::pg_gid(cfg_.name, op.gid);
  auto epoch = static_cast<int64_t>(parts->epoch), seq = static_cast<int64_t>(parts->seq);
  OpResult res;
  switch (op.kind) {
    case OpKind::exec: return exec_branch(op, pgg, *parts);
    case OpKind::prepare: {
      auto conn = take_session(op.gid);
      if (!conn) return failed(unavailable("the branch has no open session"));
      prepare_branch(pgg, *parts, *conn, &res);
      if (res.prepare) release(std::move(conn));
      return res;
    }
    case OpKind::commit_one_phase: {
      auto conn = take_session(op.gid);
      if (!conn) return failed(unavailable("the branch has no open session"));
      std::string reason;
      auto o = pg::commit_one_phase(*conn, pgg, parts->coordinator, epoch, seq, &reason);
      if (!o.ok()) return failed(o.status());
      TPC_FAILPOINT("agent.after_one_phase_commit");
      res.outcome = *o;
      res.reason = reason;
      release(std::move(conn));
      return res;
    }
    case OpKind::rollback: {
      auto conn = take_session(op.gid);
      if (conn) {
        Status st = pg::rollback(*conn);
        if (st.ok()) release(std::move(conn));
      }
      return res;
    }
    case OpKind::commit_prepared:
    case OpKind::rollback_prepared:
    case OpKind::evidence:
    case OpKind::put_state:
    case OpKind::delete_state:
    case OpKind::tombstone: return outside_session(op, pgg, *parts);
    case OpKind::step: return run_step(op, *parts);
  }
  return failed(internal_error("unknown operation"));
}

// A step on any idle connection: its statements and barrier rows in one local transaction
// (pg::run_step). The connection goes back to the pool unless it broke.
OpResult PgExecutor::run_step(PgOp& op, const GidParts& parts) {
  auto conn = acquire();
  if (!conn.ok()) return failed(conn.status());
  pg::StepCall call{op.gid,
                    op.branch,
                    op.step_op,
                    parts.coordinator,
                    static_cast<int64_t>(parts.epoch),
                    static_cast<int64_t>(parts.seq)};
  std::vector<std::optional<int64_t>> expect_rows;
  std::vector<pg::PipelineStep> steps = pipeline_of(op.statements, &expect_rows);
  TPC_FAILPOINT("agent.before_step");
  pg::StepRun run = pg::run_step(
      **conn, call, std::move(steps), expect_rows, op.rows_max,
      [](const std::vector<pg::StatementResult>& r) { return dump(encode_results(r)); });
  if ((*conn)->usable()) release(std::move(*conn));
  if (run.status.ok()) TPC_FAILPOINT("agent.after_step");
  OpResult res = failed(run.status, run.sqlstate);
  res.barrier = run.barrier;
  res.results = std::make_shared<std::vector<pg::StatementResult>>(std::move(run.results));
  res.stored_results = std::move(run.stored);
  return res;
}

// The session for an exec: the branch's own, or a new one (begin); registered for cancel().
// nullopt with *refused set when the branch is being aborted or no connection is free.
std::optional<Conn> PgExecutor::exec_session(const std::string& gid, bool* begin,
                                             OpResult* refused) {
  Conn conn = take_session(gid);
  *begin = !conn;
  if (!conn) {
    auto c = acquire();
    if (!c.ok()) {
      *refused = failed(c.status());
      return std::nullopt;
    }
    conn = std::move(*c);
  }
  std::lock_guard lock(cancel_mu_);
  if (cancel_requested_.erase(gid) > 0) {
    if (*begin)
      release(std::move(conn));
    else
      sessions_keep(gid, std::move(conn));
    *refused = failed(Status(Code::sql_error, "canceling statement: the branch is being aborted"),
                      "57014");
    return std::nullopt;
  }
  running_[gid] = conn->canceller();
  return conn;
}

void PgExecutor::exec_done(const std::string& gid) {
  std::lock_guard lock(cancel_mu_);
  running_.erase(gid);
  cancel_requested_.erase(gid);
}

// The statements of an exec, then, as asked, PREPARE (exec+prepare) or COMMIT (one phase), in
// one round trip (pg::run_branch).
OpResult PgExecutor::exec_branch(PgOp& op, const std::string& pgg, const GidParts& parts) {
  bool begin = false;
  OpResult res;
  std::optional<Conn> session = exec_session(op.gid, &begin, &res);
  if (!session) return res;
  Conn conn = std::move(*session);
  pg::Finish finish = op.then_prepare  ? pg::Finish::prepare
                      : op.then_commit ? pg::Finish::commit
                                       : pg::Finish::none;
  std::vector<std::optional<int64_t>> expect_rows;
  std::vector<pg::PipelineStep> steps = pipeline_of(op.statements, &expect_rows);
  if (finish == pg::Finish::prepare) TPC_FAILPOINT("agent.before_prepare");
  size_t statement_count = steps.size();
  pg::BranchRun run = pg::run_branch(*conn, begin, std::move(steps), finish, pgg, parts.coordinator,
                                     static_cast<int64_t>(parts.epoch),
                                     static_cast<int64_t>(parts.seq), expect_rows);
  exec_done(op.gid);
  if (run.vote) TPC_FAILPOINT("agent.after_prepare");
  if (run.outcome && *run.outcome == pg::Outcome::committed)
    TPC_FAILPOINT("agent.after_one_phase_commit");
  res.results = std::make_shared<std::vector<pg::StatementResult>>(std::move(run.results));
  if (!run.status.ok()) {
    if (run.status.code() == Code::unavailable) return failed(run.status);  // the session died
    std::string msg =
        statement_count > 1
            ? "statement " + std::to_string(run.failed_statement + 1) + ": " + run.status.message()
            : run.status.message();
    res.status = Status(run.status.code(), msg);
    res.sqlstate = run.sqlstate;
  } else if (finish == pg::Finish::prepare) {
    res.prepare = *run.vote;
  } else if (finish == pg::Finish::commit) {
    res.outcome = *run.outcome;
    res.reason = run.reason;
  }
  // An open block (no finish) stays the branch's session, failed or not (a failed one waits
  // for its rollback); a finished one gave its connection back.
  if (finish == pg::Finish::none)
    sessions_keep(op.gid, std::move(conn));
  else
    release(std::move(conn));
  return res;
}

// Operations on any connection, outside the branch's session.
OpResult PgExecutor::outside_session(const PgOp& op, const std::string& pgg,
                                     const GidParts& parts) {
  auto epoch = static_cast<int64_t>(parts.epoch), seq = static_cast<int64_t>(parts.seq);
  OpResult res;

  auto c = acquire();
  if (!c.ok()) return failed(c.status());
  auto& conn = *c;
  if (op.kind == OpKind::commit_prepared) {
    TPC_FAILPOINT("agent.before_commit_prepared");
    auto o = pg::commit_prepared(*conn, pgg);
    if (!o.ok()) return failed(o.status());
    TPC_FAILPOINT("agent.after_commit_prepared");
    res.outcome = *o;
  } else if (op.kind == OpKind::rollback_prepared) {
    auto o = pg::rollback_prepared(*conn, pgg);
    if (!o.ok()) return failed(o.status());
    res.outcome = *o;
  } else if (op.kind == OpKind::tombstone) {
    auto o = pg::put_tombstone(*conn, pgg, parts.coordinator, epoch, seq);
    if (!o.ok()) return failed(o.status());
    res.outcome = *o;
  } else if (op.kind == OpKind::evidence) {
    auto e = pg::evidence(*conn, pgg);
    if (!e.ok()) return failed(e.status());
    res.evidence = *e;
  } else if (op.kind == OpKind::delete_state) {
    Status st = pg::delete_state(*conn, pgg);
    if (!st.ok()) return failed(st);
  } else {
    std::string detail = op.peers.empty() ? op.detail : encode_peers(op.peers);
    Status st = pg::put_state(*conn, pgg, op.state, detail);
    if (!st.ok()) return failed(st);
  }
  if (op.clear_state) {
    // The pre-commit record has done its job once the branch is finished; a failure
    // here leaves a stale row that the next scan ignores.
    (void)pg::delete_state(*conn, pgg);
  }
  release(std::move(conn));
  return res;
}

void PgExecutor::cancel(const std::string& gid) {
  std::shared_ptr<pg::PgCancel> c;
  {
    std::lock_guard lock(cancel_mu_);
    cancel_requested_[gid] = true;
    auto it = running_.find(gid);
    if (it != running_.end()) c = it->second;
  }
  // PQcancel opens a connection to the server: on the cancellers' own threads, never on a
  // loop thread nor behind the branch operations.
  // Full: the statement runs to its own end, and the abort waits for it.
  if (c && !cancellers_.submit([c] { (void)c->cancel(); }))
    log_.warn("too many cancels waiting; the statement is not cancelled", {{"gid", gid}});
}

Result<BranchExecutor::Scan> PgExecutor::scan() {
  auto c = acquire();
  if (!c.ok()) return c.status();
  TPC_FAILPOINT("agent.during_scan");
  auto list = pg::list_prepared(**c, cfg_.name);
  if (!list.ok()) return list.status();
  std::vector<AgentMachine::ScanEntry> entries;
  for (auto& x : *list) {
    auto gid = pg::global_gid(cfg_.name, x.pg_gid);
    if (!gid) continue;
    AgentMachine::ScanEntry e;
    e.gid = *gid;
    e.age_ms = x.prepared_age_ms;
    auto state = pg::read_state(**c, x.pg_gid);
    if (!state.ok()) return state.status();
    if (state->has_value()) {
      e.durable_state = (*state)->state;
      e.peers = decode_peers_text((*state)->detail);
    }
    entries.push_back(std::move(e));
  }
  auto rows = pg::list_decided_states(**c, cfg_.name);
  if (!rows.ok()) return rows.status();
  std::vector<AgentMachine::DecidedEntry> decided;
  for (auto& row : *rows) {
    auto gid = pg::global_gid(cfg_.name, row.pg_gid);
    auto rec = parse_check_record(row.state.state);
    if (!gid || !rec) continue;
    decided.push_back(AgentMachine::DecidedEntry{*gid, *rec, row.state.detail});
  }
  release(std::move(*c));
  return Scan{std::move(entries), std::move(decided)};
}

namespace {

// Deletes rows with `purge` in statements of at most kRowsPerStatement, at most
// kRowsPerPass in all, so a purge never holds locks for long.
Result<int64_t> purge_in_rounds(const std::function<Result<int64_t>(int64_t limit)>& purge) {
  constexpr int64_t kRowsPerStatement = 10'000, kRowsPerPass = 100'000;
  int64_t total = 0;
  while (total < kRowsPerPass) {
    auto n = purge(kRowsPerStatement);
    if (!n.ok()) return n.status();
    total += *n;
    if (*n < kRowsPerStatement) break;
  }
  return total;
}

}  // namespace

Result<BranchExecutor::Purged> PgExecutor::purge_finished(const std::string& coordinator,
                                                          int64_t epoch, int64_t seq) {
  auto c = acquire();
  if (!c.ok()) return c.status();
  pg::PgConn& conn = **c;
  auto markers = purge_in_rounds(
      [&](int64_t limit) { return pg::purge_markers(conn, coordinator, epoch, seq, limit); });
  if (!markers.ok()) return markers.status();
  auto barriers = purge_in_rounds(
      [&](int64_t limit) { return pg::purge_barriers(conn, coordinator, epoch, seq, limit); });
  if (!barriers.ok()) return barriers.status();
  release(std::move(*c));
  return Purged{*markers, *barriers};
}

Result<int64_t> PgExecutor::purge_stale_states() {
  auto c = acquire();
  if (!c.ok()) return c.status();
  auto n = pg::purge_stale_states(**c, cfg_.name, 3'600);
  release(std::move(*c));
  return n;
}

void PgExecutor::close() {
  std::lock_guard lock(pool_mu_);
  sessions_.clear();
  idle_.clear();
}

}  // namespace tpc::agent
