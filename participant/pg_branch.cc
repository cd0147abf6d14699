// The SQL of a branch at the participant. See pg_branch.h for the contract; the notes here
// are about how each step stays correct when the connection or the server fails mid-way.
//
// prepare() is one round trip in the writing case: the read-only check, the marker row and
// PREPARE TRANSACTION travel as one simple-query string, and the server stops at the first
// statement that fails. The read-only check divides by zero when no xid was assigned, so a
// read-only branch ends with 22012 before the marker or PREPARE run.
#include "participant/pg_branch.h"

#include <charconv>

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

// "<message> (SQLSTATE 23503)" for functions that return only a Status.
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

// The marker INSERT with every value spliced as a literal (part of a simple-query string).
Result<std::string> marker_insert(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                                  int64_t epoch, int64_t seq) {
  auto gid_lit = c.quote_literal(pg_gid);
  if (!gid_lit.ok()) return gid_lit.status();
  auto coord_lit = c.quote_literal(coordinator);
  if (!coord_lit.ok()) return coord_lit.status();
  return "INSERT INTO tpc_marker(pg_gid, coordinator, epoch, seq) VALUES (" + *gid_lit + ", " +
         *coord_lit + ", " + std::to_string(epoch) + ", " + std::to_string(seq) + ")";
}

// Ends a block the server left open after an error; the vote or outcome is already known.
void rollback_if_open(PgConn& c) {
  if (c.in_transaction()) (void)c.exec_simple("ROLLBACK");
}

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
  return *exists ? Outcome::committed : Outcome::aborted;
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
      "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'tpc_marker'::regclass "
      "AND attname = 'aborted' AND NOT attisdropped) THEN "
      "ALTER TABLE tpc_marker ADD COLUMN aborted boolean NOT NULL DEFAULT false; END IF; END $$",
      "CREATE TABLE IF NOT EXISTS tpc_agent_state ("
      "pg_gid text PRIMARY KEY, state text NOT NULL, detail text, "
      "updated_at timestamptz DEFAULT now())",
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

Result<PrepareResult> prepare(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                              int64_t epoch, int64_t seq) {
  if (!c.in_transaction()) {
    // Without an open block the statements below would run in an implicit transaction of
    // their own, and a branch whose work is gone could vote read_only.
    if (!c.usable()) return unavailable("prepare: the connection to the server is lost");
    return vote_no("no open transaction block for the branch", "");
  }
  auto insert = marker_insert(c, pg_gid, coordinator, epoch, seq);
  if (!insert.ok()) {
    rollback_if_open(c);
    return vote_no(insert.status().message(), "");
  }
  auto gid_lit = c.quote_literal(pg_gid);
  if (!gid_lit.ok()) {
    rollback_if_open(c);
    return vote_no(gid_lit.status().message(), "");
  }
  // pg_current_xact_id_if_assigned() is PostgreSQL 13+; txid_current_if_assigned() before.
  const char* xid_fn = c.server_version() >= 130000 ? "pg_current_xact_id_if_assigned()"
                                                    : "txid_current_if_assigned()";
  std::string sql = std::string("SELECT 1/(") + xid_fn + " IS NOT NULL)::int; " + *insert +
                    "; PREPARE TRANSACTION " + *gid_lit;
  std::vector<ExecResult> rs = c.exec_multi(sql);

  // The PREPARE ran and said so: the branch is prepared whatever happened to the connection.
  if (rs.size() >= 3 && rs[2].status.ok()) {
    const std::string& tag = rs[2].result.command_tag;
    if (tag == "PREPARE TRANSACTION") return PrepareResult{Vote::yes, "", ""};
    // A block that had failed is rolled back by PREPARE, answered with the tag ROLLBACK (the
    // failure itself stops the string earlier; this covers a block failed in a way that let
    // the statements pass).
    rollback_if_open(c);
    return vote_no("the transaction block had failed; PREPARE rolled it back (" + tag + ")", "");
  }
  const ExecResult& last = rs.back();
  if (last.status.ok()) {
    // Every statement ran and none failed, but fewer results than statements came back.
    return internal_error("prepare: " + std::to_string(rs.size()) + " results for 3 statements");
  }
  if (rs[0].sqlstate == kDivisionByZero) {
    // No xid: nothing was written, so ROLLBACK ends it exactly like COMMIT would. Even if the
    // connection breaks now, the server rolls the session back: read_only stays true.
    rollback_if_open(c);
    return PrepareResult{Vote::read_only, "", ""};
  }
  if (last.status.code() == Code::unavailable) {
    // The session is gone: the PREPARE may or may not have happened.
    return unavailable("prepare: " + last.status.message());
  }
  // 53200 (no free prepared-transaction slot), 0A000 (temp objects), 23503 (deferred FK),
  // 42710 (gid in use), 25P02 (failed block): the branch cannot commit. A failed PREPARE has
  // already ended the block; an earlier failure left it open.
  rollback_if_open(c);
  return vote_no(last.status.message(), last.sqlstate);
}

Result<Outcome> commit_one_phase(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                                 int64_t epoch, int64_t seq, std::string* reason) {
  auto set_reason = [&](std::string text) {
    if (reason != nullptr) *reason = std::move(text);
  };
  if (!c.in_transaction()) {
    // The INSERT would commit on its own and leave a marker for work that is gone.
    if (!c.usable()) return unavailable("commit_one_phase: the connection to the server is lost");
    set_reason("no open transaction block for the branch");
    return Outcome::aborted;
  }
  auto insert = marker_insert(c, pg_gid, coordinator, epoch, seq);
  if (!insert.ok()) {
    rollback_if_open(c);
    set_reason(insert.status().message());
    return Outcome::aborted;
  }
  std::vector<ExecResult> rs = c.exec_multi(*insert + "; COMMIT");
  if (rs.size() >= 2 && rs[1].status.ok()) {
    const std::string& tag = rs[1].result.command_tag;
    if (tag == "COMMIT") return Outcome::committed;
    set_reason("the transaction block had failed; COMMIT rolled it back (" + tag + ")");
    return Outcome::aborted;
  }
  const ExecResult& last = rs.back();
  if (last.status.ok()) {
    return internal_error("commit_one_phase: " + std::to_string(rs.size()) +
                          " results for 2 statements");
  }
  if (last.status.code() == Code::unavailable) {
    // The COMMIT may have happened: the marker tells, once the server is reachable again.
    return unavailable("commit_one_phase: " + last.status.message());
  }
  // An error at COMMIT (e.g. a deferred constraint) has ended the block; an error in the
  // INSERT (a failed block) left it open.
  rollback_if_open(c);
  std::string why = last.status.message();
  if (!last.sqlstate.empty()) why += " (SQLSTATE " + last.sqlstate + ")";
  set_reason(std::move(why));
  return Outcome::aborted;
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

Result<int64_t> purge_markers(PgConn& c, std::string_view coordinator, int64_t epoch, int64_t seq,
                              int64_t limit) {
  if (limit <= 0) return invalid_argument("purge_markers: limit must be positive");
  ExecResult r = c.exec(
      "DELETE FROM tpc_marker WHERE pg_gid IN (SELECT pg_gid FROM tpc_marker"
      " WHERE coordinator = $1 AND (epoch < $2::bigint OR (epoch = $2::bigint AND seq < "
      "$3::bigint))"
      " LIMIT $4::bigint)",
      {std::string(coordinator), std::to_string(epoch), std::to_string(seq),
       std::to_string(limit)});
  if (!r.status.ok()) return with_sqlstate(r, "purging tpc_marker");
  return r.result.affected;
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
