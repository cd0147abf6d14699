// The local message table's SQL. See pg_outbox.h.
#include "participant/pg_outbox.h"

#include "participant/pg_run.h"

namespace tpc::pg {
namespace {

constexpr std::string_view kSchema[] = {
    "CREATE TABLE IF NOT EXISTS tpc_outbox ("
    "id bigserial PRIMARY KEY, key text, destination jsonb NOT NULL, "
    "payload jsonb NOT NULL DEFAULT '{}'::jsonb, "
    "state text NOT NULL DEFAULT 'pending' "
    "CHECK (state IN ('pending', 'delivered', 'dead', 'discarded')), "
    "attempts int NOT NULL DEFAULT 0, next_attempt_at timestamptz NOT NULL DEFAULT now(), "
    "created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz, "
    "discarded_at timestamptz, last_error text)",
    // The rows that hold a key back, and the scan's.
    "CREATE INDEX IF NOT EXISTS tpc_outbox_undelivered ON tpc_outbox (key, id) "
    "WHERE state IN ('pending', 'dead')",
    "CREATE OR REPLACE FUNCTION tpc_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_notify('tpc_outbox', ''); RETURN NULL; END $$",
    "CREATE OR REPLACE TRIGGER tpc_outbox_inserted AFTER INSERT ON tpc_outbox "
    "FOR EACH STATEMENT EXECUTE FUNCTION tpc_outbox_notify()",
};

constexpr std::string_view kInsert =
    "INSERT INTO tpc_outbox (key, destination, payload) VALUES ($1, $2::jsonb, $3::jsonb) "
    "RETURNING id";

constexpr std::string_view kScan =
    "SELECT id, key, destination::text, payload::text, attempts FROM tpc_outbox o "
    "WHERE state = 'pending' AND next_attempt_at <= now() AND (key IS NULL OR NOT EXISTS ("
    "SELECT 1 FROM tpc_outbox p WHERE p.key = o.key AND p.id < o.id "
    "AND p.state IN ('pending', 'dead'))) ORDER BY id LIMIT $1";

constexpr std::string_view kView =
    "SELECT id, key, destination::text, payload::text, state, attempts, created_at::text, "
    "delivered_at::text, discarded_at::text, last_error, next_attempt_at::text FROM tpc_outbox ";

Result<OutboxView> view_of(const std::vector<Value>& r) {
  if (r.size() != 11 || !r[0] || !r[2] || !r[3] || !r[4] || !r[6])
    return internal_error("tpc_outbox: a row of an unexpected shape");
  OutboxView v;
  auto id = parse_int(r[0], "tpc_outbox.id");
  auto attempts = parse_int(r[5], "tpc_outbox.attempts");
  if (!id.ok()) return id.status();
  if (!attempts.ok()) return attempts.status();
  v.id = *id;
  v.key = r[1];
  v.destination = *r[2];
  v.payload = *r[3];
  v.state = *r[4];
  v.attempts = *attempts;
  v.created_at = *r[6];
  v.delivered_at = r[7];
  v.discarded_at = r[8];
  v.last_error = r[9];
  v.next_attempt_at = r[10];
  return v;
}

// One statement outside a block; its result, or the error with its SQLSTATE.
Result<StatementResult> run_one(PgConn& c, std::string_view sql, std::vector<Value> params,
                                std::string_view what) {
  ExecResult r = c.exec(sql, params);
  if (!r.status.ok()) return with_sqlstate(r, what);
  return std::move(r.result);
}

}  // namespace

Status ensure_outbox_schema(PgConn& c) {
  if (c.in_transaction()) return internal_error("ensure_outbox_schema inside a transaction block");
  for (std::string_view sql : kSchema) {
    // Two agents at once: the loser of a catalog race fails on a unique index (23505, 42P07,
    // 42710) or on the function's row (XX000, "tuple concurrently updated"); again finds it.
    constexpr int kAttemptsMax = 3;
    for (int attempt = 1;; ++attempt) {
      ExecResult r = c.exec(sql);
      if (r.status.ok()) break;
      bool lost_race = r.sqlstate == "23505" || r.sqlstate == "42P07" || r.sqlstate == "42710" ||
                       r.sqlstate == "XX000";
      if (!lost_race || attempt == kAttemptsMax) return with_sqlstate(r, "creating tpc_outbox");
    }
  }
  return ok_status();
}

OutboxPut put_outbox(PgConn& c, std::vector<PipelineStep> statements,
                     const std::vector<OutboxInsert>& messages) {
  OutboxPut out;
  if (c.in_transaction()) {
    out.status = internal_error("put_outbox inside a transaction block");
    return out;
  }
  std::vector<PipelineStep> steps;
  steps.push_back(PipelineStep{"BEGIN", {}, true});
  size_t first = steps.size();
  for (auto& s : statements) steps.push_back(std::move(s));
  size_t inserts = steps.size();
  for (const OutboxInsert& m : messages)
    steps.push_back(PipelineStep{std::string(kInsert),
                                 {m.key.empty() ? Value() : Value(m.key), m.destination, m.payload},
                                 true});
  steps.push_back(PipelineStep{"COMMIT", {}, true});
  std::vector<ExecResult> rs = run_steps(c, steps);
  for (size_t i = 0; i < rs.size(); ++i) {
    const ExecResult& r = rs[i];
    if (r.status.ok() || r.skipped) continue;
    std::string what = i == 0              ? std::string("BEGIN")
                       : i < inserts       ? "statement " + std::to_string(i)
                       : i + 1 < rs.size() ? std::string("the message rows")
                                           : std::string("COMMIT");
    // A failed COMMIT whose connection broke may have committed: unavailable says unknown.
    out.status = Status(r.status.code(), what + ": " + r.status.message());
    out.sqlstate = r.sqlstate;
    rollback_if_open(c);
    return out;
  }
  if (rs.back().result.command_tag != "COMMIT") {
    out.status = Status(Code::sql_error, "the block had failed; COMMIT rolled it back");
    out.sqlstate = "25P02";
    return out;
  }
  for (size_t i = first; i < inserts; ++i) out.results.push_back(std::move(rs[i].result));
  for (size_t i = inserts; i + 1 < rs.size(); ++i) {
    const auto& rows = rs[i].result.rows;
    auto id = rows.size() == 1 && rows[0].size() == 1 ? parse_int(rows[0][0], "tpc_outbox.id")
                                                      : Result<int64_t>(internal_error("no id"));
    if (!id.ok()) {
      out.status = id.status();
      return out;
    }
    out.ids.push_back(*id);
  }
  return out;
}

Result<std::vector<agent::OutboxRow>> scan_outbox(PgConn& c, size_t limit) {
  auto r = run_one(c, kScan, {std::to_string(limit)}, "scanning tpc_outbox");
  if (!r.ok()) return r.status();
  std::vector<agent::OutboxRow> rows;
  for (auto& row : r->rows) {
    if (row.size() != 5 || !row[0] || !row[2] || !row[3] || !row[4])
      return internal_error("tpc_outbox: a scanned row of an unexpected shape");
    auto id = parse_int(row[0], "tpc_outbox.id");
    auto attempts = parse_int(row[4], "tpc_outbox.attempts");
    if (!id.ok()) return id.status();
    if (!attempts.ok()) return attempts.status();
    rows.push_back(agent::OutboxRow{*id, row[1], *row[2], *row[3],
                                    static_cast<uint32_t>(std::max<int64_t>(*attempts, 0))});
  }
  return rows;
}

Result<bool> mark_outbox(PgConn& c, const agent::OutboxMark& m) {
  std::string id = std::to_string(m.id), attempts = std::to_string(m.attempts);
  Result<StatementResult> r = internal_error("");
  switch (m.kind) {
    case agent::MarkKind::delivered:
      r = run_one(c,
                  "UPDATE tpc_outbox SET state = 'delivered', attempts = $2, delivered_at = now() "
                  "WHERE id = $1 AND state = 'pending'",
                  {id, attempts}, "marking a message delivered");
      break;
    case agent::MarkKind::retry:
      r = run_one(c,
                  "UPDATE tpc_outbox SET attempts = $2, last_error = $3, "
                  "next_attempt_at = now() + $4 * interval '1 millisecond' "
                  "WHERE id = $1 AND state = 'pending'",
                  {id, attempts, m.error, std::to_string(m.retry_in_ms)},
                  "marking a message for a retry");
      break;
    case agent::MarkKind::dead:
      r = run_one(c,
                  "UPDATE tpc_outbox SET state = 'dead', attempts = $2, last_error = $3 "
                  "WHERE id = $1 AND state = 'pending'",
                  {id, attempts, m.error}, "marking a message dead");
      break;
  }
  if (!r.ok()) return r.status();
  return r->affected == 1;
}

Result<std::vector<OutboxView>> list_outbox(PgConn& c, std::string_view state, size_t limit) {
  auto r =
      run_one(c, std::string(kView) + "WHERE ($1 = '' OR state = $1) ORDER BY id DESC LIMIT $2",
              {std::string(state), std::to_string(limit)}, "listing tpc_outbox");
  if (!r.ok()) return r.status();
  std::vector<OutboxView> out;
  for (auto& row : r->rows) {
    auto v = view_of(row);
    if (!v.ok()) return v.status();
    out.push_back(std::move(*v));
  }
  return out;
}

Result<std::optional<OutboxView>> get_outbox(PgConn& c, int64_t id) {
  auto r =
      run_one(c, std::string(kView) + "WHERE id = $1", {std::to_string(id)}, "reading tpc_outbox");
  if (!r.ok()) return r.status();
  if (r->rows.empty()) return std::optional<OutboxView>();
  auto v = view_of(r->rows[0]);
  if (!v.ok()) return v.status();
  return std::optional<OutboxView>(std::move(*v));
}

namespace {

// `set` on row id if it is dead; whether it was.
Result<bool> update_dead(PgConn& c, int64_t id, std::string_view set, std::string_view what) {
  auto r =
      run_one(c, "UPDATE tpc_outbox SET " + std::string(set) + " WHERE id = $1 AND state = 'dead'",
              {std::to_string(id)}, what);
  if (!r.ok()) return r.status();
  return r->affected == 1;
}

}  // namespace

Result<bool> retry_outbox(PgConn& c, int64_t id) {
  return update_dead(c, id, "state = 'pending', attempts = 0, next_attempt_at = now()",
                     "retrying a message");
}

Result<bool> discard_outbox(PgConn& c, int64_t id) {
  return update_dead(c, id, "state = 'discarded', discarded_at = now()", "discarding a message");
}

Result<int64_t> oldest_undelivered_ms(PgConn& c) {
  auto r = run_one(c,
                   "SELECT coalesce((extract(epoch FROM now() - min(created_at)) * 1000)::bigint, "
                   "0) FROM tpc_outbox WHERE state IN ('pending', 'dead')",
                   {}, "reading the oldest undelivered message");
  if (!r.ok()) return r.status();
  if (r->rows.size() != 1 || r->rows[0].size() != 1) return internal_error("no age");
  return parse_int(r->rows[0][0], "age");
}

}  // namespace tpc::pg
