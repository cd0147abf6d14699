// The SQL of a branch at the participant. See pg_branch.h for the contract; the notes here
// are about how each step stays correct when the connection or the server fails mid-way.
//
// prepare() is one round trip in the writing case: the read-only check, the marker row and
// PREPARE TRANSACTION travel as one simple-query string, and the server stops at the first
// statement that fails. The read-only check divides by zero when no xid was assigned, so a
// read-only branch ends with 22012 before the marker or PREPARE run.
#include "participant/pg_branch.h"

#include <charconv>

#include "participant/pg_run.h"

namespace tpc::pg {
namespace {

constexpr std::string_view kGidPrefix = "tpc:";
constexpr std::string_view kUndefinedObject = "42704";  // "prepared transaction ... does not exist"
constexpr std::string_view kDivisionByZero = "22012";   // the read-only check fired

std::string agent_prefix(std::string_view agent) {
  std::string p(kGidPrefix);
  p += agent;
  p += ':';
  return p;
}

}  // namespace

Status with_sqlstate(const ExecResult& r, std::string_view what) {
  TPC_ASSERT(!r.status.ok());
  std::string msg(what);
  msg += ": ";
  msg += r.status.message();
  if (!r.sqlstate.empty()) msg += " (SQLSTATE " + r.sqlstate + ")";
  return Status(r.status.code(), msg);
}

Result<int64_t> parse_int(const Value& v, std::string_view what) {
  int64_t out = 0;
  if (!v) return internal_error(std::string(what) + ": NULL");
  auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), out);
  if (ec != std::errc() || p != v->data() + v->size()) {
    return internal_error(std::string(what) + ": not an integer: " + *v);
  }
  return out;
}

namespace {

// The marker row, inserted inside the branch just before PREPARE (or COMMIT).
constexpr std::string_view kMarkerInsert =
    "INSERT INTO tpc_marker (pg_gid, coordinator, epoch, seq) VALUES ($1, $2, $3, $4)";

}  // namespace

void rollback_if_open(PgConn& c) {
  if (c.in_transaction()) (void)c.exec_simple("ROLLBACK");
}

namespace {

PrepareResult vote_no(std::string reason, std::string sqlstate) {
  PrepareResult r;
  r.vote = Vote::no;
  r.reason = std::move(reason);
  r.sqlstate = std::move(sqlstate);
  return r;
}

Result<bool> marker_exists(PgConn& c, std::string_view pg_gid) {
  ExecResult r = c.exec("SELECT 1 FROM tpc_marker WHERE pg_gid = $1 AND NOT aborted",
                        {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "reading tpc_marker");
  return !r.result.rows.empty();
}

// COMMIT PREPARED or ROLLBACK PREPARED; `done` is what a run that succeeded means.
Result<Outcome> finish_prepared(PgConn& c, std::string_view verb, std::string_view pg_gid,
                                Outcome done) {
  auto lit = c.quote_literal(pg_gid);
  if (!lit.ok()) return lit.status();
  ExecResult r = c.exec_simple(std::string(verb) + " " + *lit);
  if (r.status.ok()) return done;
  if (r.sqlstate != kUndefinedObject) return with_sqlstate(r, verb);
  // Not prepared (any more): finished earlier, by us or someone else, or never prepared. The
  // marker was inserted inside the branch, so it is visible iff the branch committed. This
  // statement takes a snapshot after the server answered 42704, so a commit that finished
  // before that answer is seen.
  auto exists = marker_exists(c, pg_gid);
  if (!exists.ok()) return exists.status();
  return outcome_when_not_prepared(*exists);
}

}  // namespace

std::string pg_gid(std::string_view agent, std::string_view gid) {
  std::string out = agent_prefix(agent);
  out += gid;
  return out;
}

std::optional<std::string> global_gid(std::string_view agent, std::string_view pg_gid) {
  std::string prefix = agent_prefix(agent);
  if (pg_gid.size() <= prefix.size() || !pg_gid.starts_with(prefix)) return std::nullopt;
  return std::string(pg_gid.substr(prefix.size()));
}

Status ensure_schema(PgConn& c) {
  static constexpr std::string_view kTables[] = {
      "CREATE TABLE IF NOT EXISTS tpc_marker ("
      "pg_gid text PRIMARY KEY, coordinator text, epoch bigint, seq bigint, "
      "created_at timestamptz DEFAULT now(), aborted boolean NOT NULL DEFAULT false)",
      // Tables created before the tombstone column existed. Only when it is missing: ALTER
      // TABLE takes a lock that prepared transactions holding marker rows would block.
      "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
      "'tpc_marker'::regclass "
      "AND attname = 'aborted' AND NOT attisdropped) THEN "
      "ALTER TABLE tpc_marker ADD COLUMN aborted boolean NOT NULL DEFAULT false; END IF; END $$",
      "CREATE TABLE IF NOT EXISTS tpc_agent_state ("
      "pg_gid text PRIMARY KEY, state text NOT NULL, detail text, "
      "updated_at timestamptz DEFAULT now())",
      "CREATE TABLE IF NOT EXISTS tpc_agent_identity ("
      "singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), agent text NOT NULL, "
      "system_identifier text, database text NOT NULL, created_at timestamptz DEFAULT now())",
      "CREATE TABLE IF NOT EXISTS tpc_barrier ("
      "gid text NOT NULL, branch text NOT NULL, op text NOT NULL, written_by text NOT NULL, "
      "coordinator text NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, result text, "
      "created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (gid, branch, op))",
      "CREATE INDEX IF NOT EXISTS tpc_barrier_by_gid_order ON tpc_barrier (coordinator, epoch, "
      "seq)",
  };
  if (c.in_transaction()) return internal_error("ensure_schema inside a transaction block");
  for (std::string_view sql : kTables) {
    // Two agents creating the same table at once: IF NOT EXISTS checks before the catalog
    // insert, so the loser fails on a catalog unique index (23505, 42P07, or 42710 for the
    // table's row type) once the winner commits. Running the statement again then finds the
    // table.
    constexpr int kAttemptsMax = 3;
    for (int attempt = 1;; ++attempt) {
      ExecResult r = c.exec(sql);
      if (r.status.ok()) break;
      bool lost_race = r.sqlstate == "23505" || r.sqlstate == "42P07" || r.sqlstate == "42710";
      if (!lost_race || attempt == kAttemptsMax) return with_sqlstate(r, "creating the tpc tables");
    }
  }
  return ok_status();
}

Result<int> max_prepared_transactions(PgConn& c) {
  ExecResult r = c.exec("SHOW max_prepared_transactions");
  if (!r.status.ok()) return with_sqlstate(r, "SHOW max_prepared_transactions");
  if (r.result.rows.size() != 1 || r.result.rows[0].size() != 1) {
    return internal_error("SHOW max_prepared_transactions: unexpected result shape");
  }
  auto v = parse_int(r.result.rows[0][0], "max_prepared_transactions");
  if (!v.ok()) return v.status();
  return static_cast<int>(*v);
}

namespace {

// The agent's tables and the privileges its statements on each need.
struct TableNeeds {
  std::string_view table;
  std::string_view privileges[4];
};
constexpr TableNeeds kTableNeeds[] = {
    {"tpc_marker", {"SELECT", "INSERT", "DELETE", ""}},
    {"tpc_agent_state", {"SELECT", "INSERT", "UPDATE", "DELETE"}},
    {"tpc_agent_identity", {"SELECT", "INSERT", "UPDATE", ""}},
    {"tpc_barrier", {"SELECT", "INSERT", "UPDATE", "DELETE"}},
};

Result<bool> ask_bool(PgConn& c, const std::string& sql, std::vector<Value> params,
                      std::string_view what) {
  ExecResult r = c.exec(sql, std::move(params));
  if (!r.status.ok()) return with_sqlstate(r, what);
  if (r.result.rows.size() != 1 || r.result.rows[0].size() != 1)
    return internal_error(std::string(what) + ": unexpected result shape");
  return r.result.rows[0][0] == std::optional<std::string>("t");
}

}  // namespace

Result<std::vector<std::string>> missing_privileges(PgConn& c) {
  std::vector<std::string> missing;
  ExecResult schema = c.exec("SELECT current_schema()");
  if (!schema.status.ok()) return with_sqlstate(schema, "reading current_schema()");
  std::optional<std::string> current =
      schema.result.rows.empty() ? std::nullopt : schema.result.rows[0][0];
  std::vector<std::string> to_create;
  for (const TableNeeds& t : kTableNeeds) {
    auto exists = ask_bool(c, "SELECT to_regclass($1) IS NOT NULL", {std::string(t.table)},
                           "looking up the tpc tables");
    if (!exists.ok()) return exists.status();
    if (!*exists) {
      to_create.emplace_back(t.table);
      continue;
    }
    for (std::string_view priv : t.privileges) {
      if (priv.empty()) continue;
      // The oid form: NULL rather than an error if the table vanished meanwhile.
      auto has = ask_bool(c, "SELECT coalesce(has_table_privilege(to_regclass($1), $2), false)",
                          {std::string(t.table), std::string(priv)}, "checking table privileges");
      if (!has.ok()) return has.status();
      if (!*has) missing.push_back(std::string(priv) + " on " + std::string(t.table));
    }
  }
  if (!to_create.empty()) {
    std::string tables;
    for (auto& t : to_create) tables += (tables.empty() ? "" : ", ") + t;
    if (!current) {
      missing.push_back("a schema in search_path to create " + tables + " in");
    } else {
      auto can = ask_bool(c, "SELECT has_schema_privilege($1, 'CREATE')", {*current},
                          "checking schema privileges");
      if (!can.ok()) return can.status();
      if (!*can) missing.push_back("CREATE on schema " + *current + " (to create " + tables + ")");
    }
  }
  auto sees = ask_bool(c, "SELECT has_table_privilege('pg_catalog.pg_prepared_xacts', 'SELECT')",
                       {}, "checking pg_prepared_xacts privileges");
  if (!sees.ok()) return sees.status();
  if (!*sees) missing.push_back("SELECT on pg_catalog.pg_prepared_xacts");
  return missing;
}

Result<std::optional<std::string>> system_identifier(PgConn& c) {
  // pg_control_system() is executable by PUBLIC in stock PostgreSQL, but a site may revoke it.
  auto allowed =
      ask_bool(c, "SELECT has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')", {},
               "checking pg_control_system() privileges");
  if (!allowed.ok()) return allowed.status();
  if (!*allowed) return std::optional<std::string>();
  ExecResult r = c.exec("SELECT system_identifier::text FROM pg_control_system()");
  if (!r.status.ok()) return with_sqlstate(r, "reading pg_control_system()");
  if (r.result.rows.size() != 1)
    return internal_error("pg_control_system(): unexpected result shape");
  return r.result.rows[0][0];
}

Result<Identity> claim_identity(PgConn& c, std::string_view agent) {
  auto sysid = system_identifier(c);
  if (!sysid.ok()) return sysid.status();
  ExecResult ins = c.exec(
      "INSERT INTO tpc_agent_identity (agent, system_identifier, database) "
      "VALUES ($1, $2, current_database()) ON CONFLICT (singleton) DO NOTHING",
      {std::string(agent), *sysid});
  if (!ins.status.ok()) return with_sqlstate(ins, "writing tpc_agent_identity");
  ExecResult r = c.exec("SELECT agent, system_identifier, database FROM tpc_agent_identity");
  if (!r.status.ok()) return with_sqlstate(r, "reading tpc_agent_identity");
  if (r.result.rows.size() != 1 || r.result.rows[0].size() != 3)
    return internal_error("tpc_agent_identity: expected one row");
  const std::vector<Value>& row = r.result.rows[0];
  Identity id;
  id.agent = row[0].value_or("");
  id.system_identifier = row[1];
  id.database = row[2].value_or("");
  id.created = ins.result.affected == 1;
  return id;
}

Status update_system_identifier(PgConn& c, std::string_view system_identifier) {
  ExecResult r = c.exec("UPDATE tpc_agent_identity SET system_identifier = $1",
                        {std::string(system_identifier)});
  if (!r.status.ok()) return with_sqlstate(r, "updating tpc_agent_identity");
  return ok_status();
}

Result<std::vector<std::string>> foreign_prepared_agents(PgConn& c, std::string_view agent) {
  // Agent names never hold ':', so the second field of "tpc:<agent>:<gid>" is the name.
  ExecResult r = c.exec(
      "SELECT DISTINCT split_part(gid, ':', 2) FROM pg_prepared_xacts"
      " WHERE database = current_database() AND left(gid, length($1::text)) = $1::text"
      " AND split_part(gid, ':', 2) <> $2 ORDER BY 1",
      {std::string(kGidPrefix), std::string(agent)});
  if (!r.status.ok()) return with_sqlstate(r, "listing pg_prepared_xacts");
  std::vector<std::string> out;
  for (const auto& row : r.result.rows) out.push_back(row[0].value_or(""));
  return out;
}

Status begin(PgConn& c) {
  ExecResult r = c.exec_simple("BEGIN");
  if (!r.status.ok()) return with_sqlstate(r, "BEGIN");
  return ok_status();
}

Status rollback(PgConn& c) {
  ExecResult r = c.exec_simple("ROLLBACK");
  if (!r.status.ok()) return with_sqlstate(r, "ROLLBACK");
  return ok_status();
}

namespace {

// Statements above this size run one by one rather than in a pipeline: a blocking sender whose
// pipeline fills the socket buffer while the server blocks writing large results would wait
// forever.
constexpr size_t kPipelineBytesMax = 64 << 10;

size_t step_bytes(const std::vector<PipelineStep>& steps) {
  size_t n = 0;
  for (auto& s : steps) {
    n += s.sql.size();
    for (auto& p : s.params) n += p ? p->size() : 0;
  }
  return n;
}

}  // namespace

std::vector<ExecResult> run_steps(PgConn& c, const std::vector<PipelineStep>& steps) {
  if (step_bytes(steps) <= kPipelineBytesMax) return c.exec_pipeline(steps);
  std::vector<ExecResult> out;
  bool failed = false;
  for (auto& s : steps) {
    if (failed) {
      ExecResult skipped;
      skipped.skipped = true;
      skipped.status = Status(Code::sql_error, "not run: an earlier statement failed");
      out.push_back(std::move(skipped));
      continue;
    }
    out.push_back(c.exec(s.sql, s.params));
    failed = !out.back().status.ok();
  }
  return out;
}

namespace {

// The rows a statement affected (INSERT, UPDATE, DELETE) or returned (SELECT).
int64_t row_count(const StatementResult& r) {
  return std::max<int64_t>(r.affected, static_cast<int64_t>(r.rows.size()));
}

bool has_expectation(const std::vector<std::optional<int64_t>>& expect_rows) {
  for (auto& e : expect_rows)
    if (e) return true;
  return false;
}

}  // namespace

Status check_rows(const StatementResult& r, size_t i,
                  const std::vector<std::optional<int64_t>>& expect_rows) {
  if (i >= expect_rows.size() || !expect_rows[i] || row_count(r) == *expect_rows[i])
    return ok_status();
  return Status(Code::sql_error,
                "expected " + std::to_string(*expect_rows[i]) +
                    " rows (expect_rows), the statement " +
                    (r.command_tag.rfind("SELECT", 0) == 0 ? "returned " : "affected ") +
                    std::to_string(row_count(r)));
}

namespace {

// A prepare or commit with no open block: the steps would run in an implicit transaction of
// their own, and a branch whose work is gone could vote read_only, or leave a marker for
// nothing. The answer for it.
BranchRun without_block(PgConn& c, Finish finish) {
  BranchRun run;
  if (!c.usable()) {
    run.status = unavailable("the connection to the server is lost");
  } else if (finish == Finish::prepare) {
    run.vote = vote_no("no open transaction block for the branch", "");
  } else {
    run.outcome = Outcome::aborted;
    run.reason = "no open transaction block for the branch";
  }
  return run;
}

// The steps after the statements: the read-only check, the marker and PREPARE, or the marker
// and COMMIT.
Status add_finish(PgConn& c, Finish finish, std::string_view pg_gid, std::vector<Value> marker,
                  std::vector<PipelineStep>* steps) {
  if (finish == Finish::prepare) {
    auto gid_lit = c.quote_literal(pg_gid);
    if (!gid_lit.ok()) return gid_lit.status();
    // No xid means nothing was written: 1/0 stops the pipeline before the marker and PREPARE.
    steps->push_back(
        PipelineStep{"SELECT 1/(pg_current_xact_id_if_assigned() IS NOT NULL)::int", {}, true});
    steps->push_back(PipelineStep{std::string(kMarkerInsert), std::move(marker), true});
    steps->push_back(PipelineStep{"PREPARE TRANSACTION " + *gid_lit, {}, false});
  } else if (finish == Finish::commit) {
    steps->push_back(PipelineStep{std::string(kMarkerInsert), std::move(marker), true});
    steps->push_back(PipelineStep{"COMMIT", {}, true});
  }
  return ok_status();
}

// BEGIN (rs[0..first)) and the statements (rs[first..finish_at)): their results into run;
// false, with run's status set, at the first that failed (the block rolled back if a finish
// was to follow).
bool statements_ran(PgConn& c, std::vector<ExecResult>& rs, size_t first, size_t finish_at,
                    Finish finish, const std::vector<std::optional<int64_t>>& expect_rows,
                    BranchRun* run) {
  for (size_t i = 0; i < finish_at; ++i) {
    ExecResult& r = rs[i];
    if (r.status.ok() && i >= first) {
      Status rows = check_rows(r.result, i - first, expect_rows);
      if (!rows.ok()) {
        r.status = rows;
        r.sqlstate = std::string(kExpectRowsSqlstate);
      }
    }
    if (r.status.ok()) {
      if (i >= first) run->results.push_back(std::move(r.result));
      continue;
    }
    run->status = r.status;
    run->sqlstate = r.sqlstate;
    run->failed_statement = i >= first ? i - first : 0;
    if (i < first && r.status.code() == Code::sql_error)
      run->status = unavailable("BEGIN: " + r.status.message());
    if (finish != Finish::none && r.status.code() != Code::unavailable) rollback_if_open(c);
    return false;
  }
  return true;
}

// The vote, from the read-only check, the marker insert and PREPARE (rs[at..at+3)).
void read_prepare(PgConn& c, const std::vector<ExecResult>& rs, size_t at, BranchRun* run) {
  const ExecResult& check = rs[at];
  const ExecResult& ins = rs[at + 1];
  const ExecResult& prep = rs[at + 2];
  if (prep.status.ok()) {
    const std::string& tag = prep.result.command_tag;
    if (tag == "PREPARE TRANSACTION") {
      run->vote = PrepareResult{Vote::yes, "", ""};
    } else {
      // A block that had failed is rolled back by PREPARE, answered with the tag ROLLBACK.
      rollback_if_open(c);
      run->vote =
          vote_no("the transaction block had failed; PREPARE rolled it back (" + tag + ")", "");
    }
    return;
  }
  if (check.sqlstate == kDivisionByZero) {
    // No xid: ROLLBACK ends it exactly like COMMIT would. Even if the connection breaks now,
    // the server rolls the session back: read_only stays true.
    rollback_if_open(c);
    run->vote = PrepareResult{Vote::read_only, "", ""};
    return;
  }
  for (const ExecResult* r : {&check, &ins, &prep}) {
    if (r->status.ok() || r->skipped) continue;
    if (r->status.code() == Code::unavailable) {
      // The session is gone: the PREPARE may or may not have happened.
      run->status = unavailable("prepare: " + r->status.message());
      return;
    }
    // 53200 (no free prepared-transaction slot), 0A000 (temp objects), 23503 (deferred FK),
    // 23505 (gid used before: its marker), 25P02 (failed block): the branch cannot commit.
    rollback_if_open(c);
    run->vote = vote_no(r->status.message(), r->sqlstate);
    return;
  }
  run->status = internal_error("prepare: no result said what happened");
}

// The one-phase outcome, from the marker insert and COMMIT (rs[at..at+2)).
void read_commit(PgConn& c, const std::vector<ExecResult>& rs, size_t at, BranchRun* run) {
  const ExecResult& ins = rs[at];
  const ExecResult& commit = rs[at + 1];
  if (commit.status.ok()) {
    const std::string& tag = commit.result.command_tag;
    if (tag == "COMMIT") {
      run->outcome = Outcome::committed;
    } else {
      run->outcome = Outcome::aborted;
      run->reason = "the transaction block had failed; COMMIT rolled it back (" + tag + ")";
    }
    return;
  }
  for (const ExecResult* r : {&ins, &commit}) {
    if (r->status.ok() || r->skipped) continue;
    if (r->status.code() == Code::unavailable) {
      // The COMMIT may have happened: the marker tells, once the server is reachable again.
      run->status = unavailable("commit: " + r->status.message());
      return;
    }
    // An error at COMMIT (a deferred constraint) has ended the block; an error in the INSERT
    // (a failed block, a tombstone for this gid) left it open.
    rollback_if_open(c);
    run->outcome = Outcome::aborted;
    run->reason = r->status.message();
    if (!r->sqlstate.empty()) run->reason += " (SQLSTATE " + r->sqlstate + ")";
    return;
  }
  run->status = internal_error("commit: no result said what happened");
}

}  // namespace

BranchRun run_branch(PgConn& c, bool begin, std::vector<PipelineStep> statements, Finish finish,
                     std::string_view pg_gid, std::string_view coordinator, int64_t epoch,
                     int64_t seq, const std::vector<std::optional<int64_t>>& expect_rows) {
  if (!begin && finish != Finish::none && !c.in_transaction()) return without_block(c, finish);
  BranchRun run;
  std::vector<PipelineStep> steps;
  steps.reserve(statements.size() + 4);
  if (begin) steps.push_back(PipelineStep{"BEGIN", {}, true});
  size_t first = steps.size();
  for (auto& st : statements) steps.push_back(std::move(st));
  size_t finish_at = steps.size();
  std::vector<Value> marker = {std::string(pg_gid), std::string(coordinator), std::to_string(epoch),
                               std::to_string(seq)};
  if (Status st = add_finish(c, finish, pg_gid, std::move(marker), &steps); !st.ok()) {
    run.status = st;
    return run;
  }
  // With an expectation the finish waits until the row counts are checked.
  std::vector<PipelineStep> finish_steps;
  if (has_expectation(expect_rows)) {
    finish_steps.assign(
        std::make_move_iterator(steps.begin() + static_cast<std::ptrdiff_t>(finish_at)),
        std::make_move_iterator(steps.end()));
    steps.resize(finish_at);
  }
  std::vector<ExecResult> rs = run_steps(c, steps);
  if (!statements_ran(c, rs, first, finish_at, finish, expect_rows, &run) || finish == Finish::none)
    return run;
  if (!finish_steps.empty()) {
    std::vector<ExecResult> more = run_steps(c, finish_steps);
    rs.insert(rs.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  if (finish == Finish::prepare)
    read_prepare(c, rs, finish_at, &run);
  else
    read_commit(c, rs, finish_at, &run);
  return run;
}

Result<PrepareResult> prepare(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                              int64_t epoch, int64_t seq) {
  BranchRun run = run_branch(c, false, {}, Finish::prepare, pg_gid, coordinator, epoch, seq);
  if (!run.status.ok()) return run.status;
  return *run.vote;
}

Result<Outcome> commit_one_phase(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                                 int64_t epoch, int64_t seq, std::string* reason) {
  BranchRun run = run_branch(c, false, {}, Finish::commit, pg_gid, coordinator, epoch, seq);
  if (!run.status.ok()) return run.status;
  if (reason != nullptr) *reason = run.reason;
  return *run.outcome;
}

Result<Outcome> commit_prepared(PgConn& c, std::string_view pg_gid) {
  return finish_prepared(c, "COMMIT PREPARED", pg_gid, Outcome::committed);
}

Result<Outcome> rollback_prepared(PgConn& c, std::string_view pg_gid) {
  return finish_prepared(c, "ROLLBACK PREPARED", pg_gid, Outcome::aborted);
}

Result<Evidence> evidence(PgConn& c, std::string_view pg_gid) {
  ExecResult r =
      c.exec("SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database()",
             {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "reading pg_prepared_xacts");
  if (!r.result.rows.empty()) return Evidence::prepared;
  // A second statement, so its snapshot is newer than the scan above: a COMMIT PREPARED that
  // removed the entry before the scan is visible here.
  auto exists = marker_exists(c, pg_gid);
  if (!exists.ok()) return exists.status();
  return *exists ? Evidence::committed : Evidence::absent;
}

Result<std::vector<PreparedXact>> list_prepared(PgConn& c, std::string_view agent) {
  // left() rather than LIKE: '_' in an agent name is a LIKE wildcard.
  ExecResult r = c.exec(
      "SELECT gid, GREATEST(0, (extract(epoch FROM clock_timestamp() - prepared) * 1000))::bigint"
      " FROM pg_prepared_xacts"
      " WHERE database = current_database() AND left(gid, length($1::text)) = $1::text"
      " ORDER BY prepared, gid",
      {agent_prefix(agent)});
  if (!r.status.ok()) return with_sqlstate(r, "listing pg_prepared_xacts");
  std::vector<PreparedXact> out;
  out.reserve(r.result.rows.size());
  for (const auto& row : r.result.rows) {
    TPC_ASSERT(row.size() == 2);
    if (!row[0]) return internal_error("pg_prepared_xacts: NULL gid");
    auto age = parse_int(row[1], "prepared age");
    if (!age.ok()) return age.status();
    out.push_back(PreparedXact{*row[0], *age});
  }
  return out;
}

Result<int64_t> delete_finished(PgConn& c, std::string_view table, std::string_view coordinator,
                                int64_t epoch, int64_t seq, int64_t limit) {
  if (limit <= 0)
    return invalid_argument("purging " + std::string(table) + ": limit must be positive");
  // table is one of the agent's own names, never input.
  std::string sql = "DELETE FROM " + std::string(table) + " WHERE ctid IN (SELECT ctid FROM " +
                    std::string(table) +
                    " WHERE coordinator = $1 AND (epoch < $2::bigint OR (epoch = $2::bigint AND"
                    " seq < $3::bigint)) LIMIT $4::bigint)";
  ExecResult r = c.exec(sql, {std::string(coordinator), std::to_string(epoch), std::to_string(seq),
                              std::to_string(limit)});
  if (!r.status.ok()) return with_sqlstate(r, "purging " + std::string(table));
  return r.result.affected;
}

Result<int64_t> purge_markers(PgConn& c, std::string_view coordinator, int64_t epoch, int64_t seq,
                              int64_t limit) {
  return delete_finished(c, "tpc_marker", coordinator, epoch, seq, limit);
}

Status put_state(PgConn& c, std::string_view pg_gid, std::string_view state,
                 std::string_view detail) {
  if (c.in_transaction()) return internal_error("put_state inside a transaction block");
  ExecResult r = c.exec(
      "INSERT INTO tpc_agent_state(pg_gid, state, detail, updated_at) VALUES ($1, $2, $3, now())"
      " ON CONFLICT (pg_gid) DO UPDATE"
      " SET state = EXCLUDED.state, detail = EXCLUDED.detail, updated_at = EXCLUDED.updated_at",
      {std::string(pg_gid), std::string(state), std::string(detail)});
  if (!r.status.ok()) return with_sqlstate(r, "writing tpc_agent_state");
  return ok_status();
}

Result<std::optional<std::string>> get_state(PgConn& c, std::string_view pg_gid) {
  ExecResult r =
      c.exec("SELECT state FROM tpc_agent_state WHERE pg_gid = $1", {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "reading tpc_agent_state");
  if (r.result.rows.empty()) return std::optional<std::string>();
  return r.result.rows[0][0];
}

Result<std::optional<AgentState>> read_state(PgConn& c, std::string_view pg_gid) {
  ExecResult r = c.exec("SELECT state, coalesce(detail, '') FROM tpc_agent_state WHERE pg_gid = $1",
                        {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "reading tpc_agent_state");
  if (r.result.rows.empty()) return std::optional<AgentState>();
  return std::optional<AgentState>(AgentState{r.result.rows[0][0].value_or(""), r.result.rows[0][1].value_or("")});
}

Result<int64_t> purge_stale_states(PgConn& c, std::string_view agent, int64_t older_than_s) {
  std::string prefix = "tpc:" + std::string(agent) + ":";
  ExecResult r = c.exec(
      "DELETE FROM tpc_agent_state s WHERE left(s.pg_gid, length($1)) = $1 "
      "AND s.state IN ('prepared3', 'precommitted') "
      "AND s.updated_at < now() - make_interval(secs => $2::double precision) "
      "AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = s.pg_gid)",
      {prefix, std::to_string(older_than_s)});
  if (!r.status.ok()) return with_sqlstate(r, "purging tpc_agent_state");
  return r.result.affected;
}

Result<std::vector<StateRow>> list_decided_states(PgConn& c, std::string_view agent) {
  ExecResult r = c.exec(
      "SELECT s.pg_gid, s.state, coalesce(s.detail, '') FROM tpc_agent_state s "
      "WHERE left(s.pg_gid, length($1::text)) = $1::text "
      "AND s.state NOT IN ('prepared3', 'precommitted') "
      "AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = s.pg_gid) "
      "ORDER BY s.updated_at, s.pg_gid",
      {agent_prefix(agent)});
  if (!r.status.ok()) return with_sqlstate(r, "listing tpc_agent_state");
  std::vector<StateRow> out;
  out.reserve(r.result.rows.size());
  for (const auto& row : r.result.rows) {
    TPC_ASSERT(row.size() == 3);
    if (!row[0] || !row[1]) return internal_error("tpc_agent_state: NULL gid or state");
    out.push_back(StateRow{*row[0], AgentState{*row[1], row[2].value_or("")}});
  }
  return out;
}

Result<Outcome> put_tombstone(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                              int64_t epoch, int64_t seq) {
  // The insert waits on the primary key for a branch committing this very gid right now, so
  // whichever comes second sees the first: the row that stays says what happened.
  ExecResult ins = c.exec(
      "INSERT INTO tpc_marker (pg_gid, coordinator, epoch, seq, aborted) VALUES ($1, $2, $3, $4, true) "
      "ON CONFLICT (pg_gid) DO NOTHING",
      {std::string(pg_gid), std::string(coordinator), std::to_string(epoch), std::to_string(seq)});
  if (!ins.status.ok()) return with_sqlstate(ins, "writing a tombstone into tpc_marker");
  ExecResult r = c.exec("SELECT aborted FROM tpc_marker WHERE pg_gid = $1", {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "reading tpc_marker");
  if (r.result.rows.empty()) return internal_error("the tombstone of " + std::string(pg_gid) + " vanished");
  return r.result.rows[0][0] == std::optional<std::string>("t") ? Outcome::aborted : Outcome::committed;
}

Status delete_state(PgConn& c, std::string_view pg_gid) {
  ExecResult r = c.exec("DELETE FROM tpc_agent_state WHERE pg_gid = $1", {std::string(pg_gid)});
  if (!r.status.ok()) return with_sqlstate(r, "deleting from tpc_agent_state");
  return ok_status();
}

}  // namespace tpc::pg
