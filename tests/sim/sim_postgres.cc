#include "tests/sim/sim_postgres.h"

#include "common/assert.h"
#include "common/ids.h"
#include "participant/codec.h"
#include "participant/pg_branch.h"

namespace tpc::sim {
namespace {

using agent::OpKind;
using agent::OpResult;

OpResult failed(Status s, std::string sqlstate = "") {
  OpResult r;
  r.status = std::move(s);
  r.sqlstate = std::move(sqlstate);
  return r;
}

Status lost_connection() { return unavailable("server closed the connection unexpectedly"); }

std::optional<int64_t> number(const pg::Value& v) {
  if (!v) return std::nullopt;
  try {
    size_t used = 0;
    int64_t n = std::stoll(*v, &used);
    if (used != v->size()) return std::nullopt;
    return n;
  } catch (...) {
    return std::nullopt;
  }
}

std::string session_holder(uint64_t s) { return "s" + std::to_string(s); }

}  // namespace

// --- the database ------------------------------------------------------------------------------

int64_t SimDb::total() const {
  int64_t t = 0;
  for (auto& [id, b] : balances) t += b;
  return t;
}

void SimDb::release(const std::string& holder) {
  std::erase_if(locks, [&](const auto& kv) { return kv.second == holder; });
}

void SimDb::end_session(uint64_t id) {
  if (sessions.erase(id) > 0) release(session_holder(id));
}

void SimDb::crash() {
  for (auto& [id, s] : sessions) release(session_holder(id));
  sessions.clear();
}

void SimDb::apply(const std::string& pgg, const std::map<int64_t, int64_t>& deltas) {
  for (auto& [id, d] : deltas) {
    balances[id] += d;
    applied_sum[pgg] += d;
  }
  applied[pgg]++;
}

// --- the executor ------------------------------------------------------------------------------

Status SimExecutor::open() {
  if (!db_.up) return unavailable("could not connect to server: Connection refused");
  return ok_status();
}

uint64_t SimExecutor::session_of(const std::string& gid, bool* lost) {
  *lost = false;
  auto it = sessions_.find(gid);
  if (it == sessions_.end()) return 0;
  if (db_.sessions.count(it->second) > 0) return it->second;
  sessions_.erase(it);
  *lost = true;
  return 0;
}

OpResult SimExecutor::execute(agent::PgOp& op) {
  const std::string pgg = pg::pg_gid(agent_, op.gid);
  // A branch's session stays mapped when its server goes away: its next use finds it lost
  // (session_of), as a broken libpq connection would, instead of silently starting anew.
  if (!db_.up) {
    if (sessions_.count(op.gid)) return failed(lost_connection());
    return failed(unavailable("could not connect to server: Connection refused"));
  }
  OpResult res = run_op(op, pgg);
  if (crash_after_op && crash_after_op()) return failed(lost_connection());
  return res;
}

OpResult SimExecutor::run_op(agent::PgOp& op, const std::string& pgg) {
  switch (op.kind) {
    case OpKind::exec: return exec(op, pgg);
    case OpKind::prepare:
    case OpKind::commit_one_phase: {
      bool lost = false;
      uint64_t s = session_of(op.gid, &lost);
      if (s == 0) return failed(lost ? lost_connection() : unavailable("the branch has no open session"));
      sessions_.erase(op.gid);
      OpResult res;
      if (op.kind == OpKind::prepare) {
        res.prepare = prepare_in(s, op, pgg);
      } else {
        res.outcome = commit_in(s, op, pgg, &res.reason);
      }
      return res;
    }
    case OpKind::rollback: {
      bool lost = false;
      if (uint64_t s = session_of(op.gid, &lost)) db_.end_session(s);
      sessions_.erase(op.gid);
      return OpResult{};
    }
    case OpKind::step: return step(op);
    default: return any_connection(op, pgg);
  }
}

bool SimExecutor::run_statement(uint64_t s, const agent::Statement& st, OpResult* res) {
  SimDb::Session& sess = db_.sessions[s];
  auto fail = [&](std::string msg, std::string sqlstate) {
    sess.failed = true;
    res->status = Status(Code::sql_error, std::move(msg));
    res->sqlstate = std::move(sqlstate);
    return false;
  };
  if (sess.failed) return fail("current transaction is aborted, commands ignored until end of transaction block", "25P02");
  pg::StatementResult out;
  if (st.sql == kTransferSql && st.params.size() == 2) {
    auto delta = number(st.params[0]);
    auto id = number(st.params[1]);
    if (!delta || !id) return fail("invalid input syntax for type bigint", "22P02");
    if (db_.balances.count(*id) > 0) {
      auto lock = db_.locks.find(*id);
      if (lock != db_.locks.end() && lock->second != session_holder(s))
        return fail("canceling statement due to lock timeout", "55P03");
      db_.locks[*id] = session_holder(s);
      sess.deltas[*id] += *delta;
      out.affected = 1;
    }
    out.command_tag = "UPDATE " + std::to_string(out.affected);
  } else if (st.sql == kBalanceSql && st.params.size() == 1) {
    auto id = number(st.params[0]);
    if (!id) return fail("invalid input syntax for type bigint", "22P02");
    out.columns = {"balance"};
    if (auto b = db_.balances.find(*id); b != db_.balances.end()) {
      int64_t own = sess.deltas.count(*id) ? sess.deltas[*id] : 0;
      out.rows.push_back({std::to_string(b->second + own)});
    }
    out.command_tag = "SELECT " + std::to_string(out.rows.size());
  } else {
    return fail("syntax error (the simulated server knows two statements)", "42601");
  }
  int64_t count = out.rows.empty() ? out.affected : static_cast<int64_t>(out.rows.size());
  res->results->push_back(std::move(out));
  if (st.expect_rows && *st.expect_rows != count)
    return fail("expected " + std::to_string(*st.expect_rows) + " rows, got " + std::to_string(count),
                std::string(pg::kExpectRowsSqlstate));
  return true;
}

OpResult SimExecutor::exec(agent::PgOp& op, const std::string& pgg) {
  bool lost = false;
  uint64_t s = session_of(op.gid, &lost);
  if (lost) return failed(lost_connection());
  if (s == 0) {
    s = db_.next_session++;
    db_.sessions[s];
    sessions_[op.gid] = s;
    ++opened_;
  }
  OpResult res;
  res.results = std::make_shared<std::vector<pg::StatementResult>>();
  for (size_t i = 0; i < op.statements.size(); ++i) {
    if (run_statement(s, op.statements[i], &res)) continue;
    if (op.statements.size() > 1)
      res.status = Status(res.status.code(), "statement " + std::to_string(i + 1) + ": " + res.status.message());
    if (op.then_prepare || op.then_commit) {  // the block is rolled back with the round trip
      db_.end_session(s);
      sessions_.erase(op.gid);
    }
    return res;
  }
  if (op.then_prepare) {
    sessions_.erase(op.gid);
    res.prepare = prepare_in(s, op, pgg);
  } else if (op.then_commit) {
    sessions_.erase(op.gid);
    res.outcome = commit_in(s, op, pgg, &res.reason);
  }
  return res;
}

pg::PrepareResult SimExecutor::prepare_in(uint64_t s, const agent::PgOp& op, const std::string& pgg) {
  SimDb::Session sess = db_.sessions[s];
  db_.end_session(s);  // the block ends either way: prepared, rolled back or read-only
  if (sess.failed) return pg::PrepareResult{pg::Vote::no, "the transaction block failed", "25P02"};
  if (sess.deltas.empty()) return pg::PrepareResult{pg::Vote::read_only, "", ""};
  if (db_.markers.count(pgg) > 0)
    return pg::PrepareResult{pg::Vote::no, "duplicate key value violates unique constraint \"tpc_marker_pkey\"", "23505"};
  if (static_cast<int>(db_.prepared.size()) >= db_.max_prepared)
    return pg::PrepareResult{pg::Vote::no, "maximum number of prepared transactions reached",
                             "53200"};
  auto parts = parse_gid(op.gid);
  TPC_ASSERT(parts.has_value());
  db_.prepared[pgg] = SimDb::Prepared{sess.deltas, parts->coordinator, static_cast<int64_t>(parts->epoch),
                                      static_cast<int64_t>(parts->seq), w_.now()};
  for (auto& [id, d] : sess.deltas) db_.locks[id] = "p" + pgg;
  if (on_kept) on_kept(pgg);
  return pg::PrepareResult{pg::Vote::yes, "", ""};
}

pg::Outcome SimExecutor::commit_in(uint64_t s, const agent::PgOp& op, const std::string& pgg, std::string* reason) {
  SimDb::Session sess = db_.sessions[s];
  db_.end_session(s);
  if (sess.failed) {
    *reason = "the transaction block failed";
    return pg::Outcome::aborted;
  }
  if (db_.markers.count(pgg) > 0) {
    *reason = "duplicate key value violates unique constraint \"tpc_marker_pkey\"";
    return pg::Outcome::aborted;
  }
  auto parts = parse_gid(op.gid);
  TPC_ASSERT(parts.has_value());
  db_.markers[pgg] = SimDb::Marker{parts->coordinator, static_cast<int64_t>(parts->epoch),
                                   static_cast<int64_t>(parts->seq), false};
  db_.apply(pgg, sess.deltas);
  if (on_kept) on_kept(pgg);
  return pg::Outcome::committed;
}

// A step: its barrier rows decide (the rule PostgreSQL's run_step follows), then its
// statements run in a session of their own and commit together with its rows. A step's writes
// count in `applied` under "step:<gid>/<branch>/<op>".
OpResult SimExecutor::step(agent::PgOp& op) {
  auto parts = parse_gid(op.gid);
  TPC_ASSERT(parts.has_value());
  auto row = [&](StepOp written) {
    return SimDb::BarrierRow{std::string(step_op_name(written)), parts->coordinator,
                             static_cast<int64_t>(parts->epoch), static_cast<int64_t>(parts->seq),
                             std::nullopt};
  };
  if (op.step_op == StepOp::check) return check(op, row(StepOp::check));
  SimDb::BarrierKey own{op.gid, op.branch, std::string(step_op_name(op.step_op))};
  pg::BarrierRows rows;
  auto found = db_.barriers.find(own);
  rows.own_inserted = found == db_.barriers.end();
  if (!rows.own_inserted) rows.own_written_by = found->second.written_by;
  std::optional<SimDb::BarrierKey> undone;
  if (auto u = undoes(op.step_op)) {
    undone = SimDb::BarrierKey{op.gid, op.branch, std::string(step_op_name(*u))};
    rows.undone_inserted = db_.barriers.count(*undone) == 0;
  }
  OpResult res;
  res.results = std::make_shared<std::vector<pg::StatementResult>>();
  res.barrier = pg::barrier_verdict(op.step_op, rows);
  if (*res.barrier == pg::Barrier::duplicate) res.stored_results = found->second.result;
  if (*res.barrier == pg::Barrier::duplicate || *res.barrier == pg::Barrier::refused) {
    if (on_step) on_step(op, res.barrier);
    return res;
  }
  if (undone && rows.undone_inserted) db_.barriers[*undone] = row(op.step_op);
  if (*res.barrier == pg::Barrier::empty_compensation) {
    db_.barriers[own] = row(op.step_op);
    if (on_step) on_step(op, res.barrier);
    return res;
  }
  uint64_t s = db_.next_session++;
  db_.sessions[s];
  for (size_t i = 0; i < op.statements.size(); ++i) {
    if (run_statement(s, op.statements[i], &res)) continue;
    db_.end_session(s);
    if (undone && rows.undone_inserted) db_.barriers.erase(*undone);  // rolled back with it
    res.barrier.reset();
    res.results->clear();
    res.status = Status(res.status.code(),
                        "statement " + std::to_string(i + 1) + ": " + res.status.message());
    if (on_step) on_step(op, std::nullopt);
    return res;
  }
  SimDb::Session sess = db_.sessions[s];
  db_.end_session(s);
  db_.apply("step:" + op.gid + "/" + op.branch + "/" + std::string(step_op_name(op.step_op)),
            sess.deltas);
  SimDb::BarrierRow mine = row(op.step_op);
  mine.result = dump(agent::encode_results(*res.results));
  db_.barriers[own] = std::move(mine);
  if (on_step) on_step(op, res.barrier);
  return res;
}

// A check-back, as pg::check_local: the local op's row is written in the check's name unless
// it is there; whose row it is answers.
OpResult SimExecutor::check(agent::PgOp& op, SimDb::BarrierRow fence) {
  SimDb::BarrierKey local{op.gid, op.branch, std::string(step_op_name(StepOp::local))};
  auto it = db_.barriers.emplace(local, std::move(fence)).first;
  OpResult res;
  res.results = std::make_shared<std::vector<pg::StatementResult>>();
  bool ran = it->second.written_by == step_op_name(StepOp::local);
  res.barrier = ran ? pg::Barrier::committed : pg::Barrier::fenced;
  if (ran) res.stored_results = it->second.result.value_or("[]");
  if (on_step) on_step(op, res.barrier);
  return res;
}

OpResult SimExecutor::any_connection(const agent::PgOp& op, const std::string& pgg) {
  OpResult res;
  auto marker = db_.markers.find(pgg);
  bool committed_marker = marker != db_.markers.end() && !marker->second.aborted;
  auto prep = db_.prepared.find(pgg);
  switch (op.kind) {
    case OpKind::commit_prepared:
      if (prep != db_.prepared.end()) {
        const SimDb::Prepared& p = prep->second;
        db_.markers[pgg] = SimDb::Marker{p.coordinator, p.epoch, p.seq, false};
        db_.apply(pgg, p.deltas);
        db_.release("p" + pgg);
        db_.prepared.erase(prep);
        res.outcome = pg::Outcome::committed;
      } else {
        res.outcome = pg::outcome_when_not_prepared(committed_marker);
      }
      break;
    case OpKind::rollback_prepared:
      if (prep != db_.prepared.end()) {
        db_.release("p" + pgg);
        db_.prepared.erase(prep);
        res.outcome = pg::Outcome::aborted;
      } else {
        res.outcome = pg::outcome_when_not_prepared(committed_marker);
      }
      break;
    case OpKind::tombstone: {
      // The insert would wait on the prepared branch's own marker row.
      if (prep != db_.prepared.end()) return failed(Status(Code::sql_error, "canceling statement due to lock timeout"), "55P03");
      if (marker == db_.markers.end()) {
        auto parts = parse_gid(op.gid);
        TPC_ASSERT(parts.has_value());
        db_.markers[pgg] = SimDb::Marker{parts->coordinator, static_cast<int64_t>(parts->epoch),
                                         static_cast<int64_t>(parts->seq), true};
        res.outcome = pg::Outcome::aborted;
      } else {
        res.outcome = marker->second.aborted ? pg::Outcome::aborted : pg::Outcome::committed;
      }
      break;
    }
    case OpKind::evidence:
      res.evidence = prep != db_.prepared.end() ? pg::Evidence::prepared
                     : committed_marker         ? pg::Evidence::committed
                                                : pg::Evidence::absent;
      break;
    case OpKind::put_state:
      db_.states[pgg] = {op.state, op.peers.empty() ? op.detail : agent::encode_peers(op.peers)};
      db_.state_written_ms[pgg] = w_.now();
      break;
    case OpKind::delete_state: db_.states.erase(pgg); break;
    default: return failed(internal_error("unknown operation"));
  }
  if (op.clear_state) db_.states.erase(pgg);
  return res;
}

Result<agent::BranchExecutor::Scan> SimExecutor::scan() {
  if (!db_.up) return unavailable("could not connect to server: Connection refused");
  Scan out;
  for (auto& [pgg, p] : db_.prepared) {
    auto gid = pg::global_gid(agent_, pgg);
    if (!gid) continue;
    agent::AgentMachine::ScanEntry e;
    e.gid = *gid;
    e.age_ms = w_.now() - p.prepared_ms;
    if (auto st = db_.states.find(pgg); st != db_.states.end()) {
      e.durable_state = st->second.first;
      e.peers = agent::decode_peers_text(st->second.second);
    }
    out.prepared.push_back(std::move(e));
  }
  for (auto& [pgg, st] : db_.states) {
    auto gid = pg::global_gid(agent_, pgg);
    auto rec = agent::parse_check_record(st.first);
    if (!gid || !rec || db_.prepared.count(pgg) > 0) continue;
    out.decided.push_back(agent::AgentMachine::DecidedEntry{*gid, *rec, st.second});
  }
  return out;
}

Result<agent::BranchExecutor::Purged> SimExecutor::purge_finished(const std::string& coordinator,
                                                                  int64_t epoch, int64_t seq) {
  if (!db_.up) return unavailable("could not connect to server: Connection refused");
  auto below = [&](const std::string& c, int64_t e, int64_t q) {
    return c == coordinator && (e < epoch || (e == epoch && q < seq));
  };
  Purged n;
  n.markers = static_cast<int64_t>(std::erase_if(db_.markers, [&](const auto& kv) {
    return below(kv.second.coordinator, kv.second.epoch, kv.second.seq);
  }));
  n.barriers = static_cast<int64_t>(std::erase_if(db_.barriers, [&](const auto& kv) {
    return below(kv.second.coordinator, kv.second.epoch, kv.second.seq);
  }));
  return n;
}

Result<int64_t> SimExecutor::purge_stale_states() {
  if (!db_.up) return unavailable("could not connect to server: Connection refused");
  int64_t n = std::erase_if(db_.states, [&](const auto& kv) {
    bool threepc = pg::parse_three_pc_record(kv.second.first).has_value();
    return threepc && db_.prepared.count(kv.first) == 0;
  });
  return n;
}

void SimExecutor::close() {
  for (auto& [gid, s] : sessions_) db_.end_session(s);
  sessions_.clear();
}

}  // namespace tpc::sim
