// The SQL of a branch's life at the participant: begin, statements, prepare (with the marker
// row and the read-only check), commit/rollback prepared answered from durable evidence, and
// the in-doubt scan of pg_prepared_xacts.
//
// Every function takes the PgConn to use; none keeps state between calls. They block; the
// agent calls them from its worker pool, never from an HTTP thread.
//
// Durable evidence: prepare() inserts a row into tpc_marker keyed by the PostgreSQL gid inside
// the branch, just before PREPARE TRANSACTION (commit_one_phase() before COMMIT). The row is
// visible iff the branch committed, so when COMMIT/ROLLBACK PREPARED answers 42704 ("does not
// exist") the marker tells committed from aborted. "does not exist" alone is never success.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "participant/branch_types.h"
#include "participant/pg_conn.h"

namespace tpc::pg {

// The PostgreSQL transaction name of a branch: "tpc:<agent>:<gid>". Both names are validated
// against a strict character set ([A-Za-z0-9_-], agent up to 32, gid up to 64 characters)
// by the caller; this only joins them.
std::string pg_gid(std::string_view agent, std::string_view gid);
// The inverse, for rows of pg_prepared_xacts: the global gid if `pg_gid` belongs to `agent`.
std::optional<std::string> global_gid(std::string_view agent, std::string_view pg_gid);

// Creates tpc_marker, tpc_agent_state, tpc_agent_identity and tpc_barrier (pg_step.h) if
// missing. Run once at start on any
// connection.
//   tpc_marker(pg_gid text primary key, coordinator text, epoch bigint, seq bigint,
//              created_at timestamptz default now(), aborted boolean default false)
// (a row with aborted = true is a tombstone, see put_tombstone)
//   tpc_agent_state(pg_gid text primary key, state text not null, detail text,
//                   updated_at timestamptz default now())
Status ensure_schema(PgConn& c);
// SHOW max_prepared_transactions.
Result<int> max_prepared_transactions(PgConn& c);

// The privileges the agent lacks in the current database, as readable items such as
// "CREATE on schema public (to create tpc_marker)" or "UPDATE on tpc_agent_state"; empty when
// it has them all. A table that does not exist yet needs CREATE on the current schema; an
// existing one needs the statements the agent runs on it. Run before ensure_schema().
Result<std::vector<std::string>> missing_privileges(PgConn& c);

// tpc_agent_identity: the one row saying whose records this database holds, written at the
// agent's first start (ensure_schema creates the table):
//   tpc_agent_identity(singleton boolean primary key, agent text, system_identifier text,
//                      database text, created_at timestamptz default now())
// system_identifier is pg_control_system()'s, NULL when the role may not execute it.
struct Identity {
  std::string agent;
  std::optional<std::string> system_identifier;
  std::string database;
  bool created = false;  // written by this call
};
// Inserts this agent's row if there is none (a concurrent first start of another agent loses
// or wins on the primary key), then returns the row that stands.
Result<Identity> claim_identity(PgConn& c, std::string_view agent);
// The cluster's system identifier now; nullopt when the role may not execute
// pg_control_system().
Result<std::optional<std::string>> system_identifier(PgConn& c);
// Stores `system_identifier` in the identity row (the database now lives in another cluster).
Status update_system_identifier(PgConn& c, std::string_view system_identifier);
// The agent names of prepared transactions in the current database whose gid has the form
// "tpc:<name>:..." with a name other than `agent`, each once, sorted.
Result<std::vector<std::string>> foreign_prepared_agents(PgConn& c, std::string_view agent);

Status begin(PgConn& c);   // BEGIN
Status rollback(PgConn& c);  // ROLLBACK (a no-op outside a block)

// Inside the open block of `c`: if no xid was assigned (read-only) end the block (ROLLBACK,
// which for a block without writes is the same as COMMIT) and vote read_only;
// otherwise insert the marker and PREPARE TRANSACTION 'pg_gid', checking that the command tag
// is "PREPARE TRANSACTION" (a failed block answers "ROLLBACK"). On no, the block is rolled
// back. `coordinator`, `epoch`, `seq` are stored in the marker for later purging.
// unavailable if the connection broke (the outcome is then unknown until the in-doubt scan).
Result<PrepareResult> prepare(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                              int64_t epoch, int64_t seq);

// What a branch does after its statements in the same round trip.
enum class Finish : uint8_t { none, prepare, commit };

struct BranchRun {
  Status status;              // ok; sql_error when a statement failed (failed_statement,
                              // sqlstate); unavailable when the session is gone
  std::string sqlstate;
  size_t failed_statement = 0;
  std::vector<StatementResult> results;  // one per statement that ran
  std::optional<PrepareResult> vote;     // Finish::prepare, when the statements succeeded
  std::optional<Outcome> outcome;        // Finish::commit, when the statements succeeded
  std::string reason;                    // for an aborted outcome
};

// One round trip for a branch's work (a pipeline of cached prepared statements): BEGIN when
// `begin`, the statements, then, for Finish::prepare, the read-only check, the marker and
// PREPARE TRANSACTION (as prepare() below), or for Finish::commit the marker and COMMIT (as
// commit_one_phase() below). After a failed statement the block is left open for the caller
// to roll back when nothing follows (Finish::none), and rolled back otherwise.
// `expect_rows` (empty, or one per statement): a statement whose row count (affected rows, or
// rows returned) differs from its expectation fails like an SQL error with SQLSTATE
// kExpectRowsSqlstate. With an expectation, the statements and the finish take two round
// trips, so that nothing is prepared or committed after a mismatch.
BranchRun run_branch(PgConn& c, bool begin, std::vector<PipelineStep> statements, Finish finish,
                     std::string_view pg_gid, std::string_view coordinator, int64_t epoch,
                     int64_t seq, const std::vector<std::optional<int64_t>>& expect_rows = {});

// Inside the open block: insert the marker and COMMIT; committed if the tag is "COMMIT",
// aborted otherwise (with the reason in the Status message via `reason`).
Result<Outcome> commit_one_phase(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                                 int64_t epoch, int64_t seq, std::string* reason);

// COMMIT PREPARED 'pg_gid' (outside any block). committed when it ran or when it answered
// 42704 and the marker exists; aborted when 42704 and no marker (a heuristic rollback or never
// prepared). unavailable/sql_error for anything else (retry later).
Result<Outcome> commit_prepared(PgConn& c, std::string_view pg_gid);
// ROLLBACK PREPARED 'pg_gid'. aborted when it ran, or 42704 and no marker; committed when
// 42704 and the marker exists.
Result<Outcome> rollback_prepared(PgConn& c, std::string_view pg_gid);
// A durable "this branch will never commit": a marker row flagged aborted, so that a late
// statement-carrying request for the same gid fails on the marker's primary key when it tries
// to commit. Written when an agent answers "aborted" for a gid it found no trace of. If the
// branch committed meanwhile (its real marker won), answers committed instead.
Result<Outcome> put_tombstone(PgConn& c, std::string_view pg_gid, std::string_view coordinator,
                              int64_t epoch, int64_t seq);

Result<Evidence> evidence(PgConn& c, std::string_view pg_gid);

struct PreparedXact {
  std::string pg_gid;
  int64_t prepared_age_ms = 0;  // now() - prepared, by the server's clock
};
// This agent's prepared transactions in the current database: gid starts with 'tpc:<agent>:'
// (compared with left(), not LIKE, where '_' in an agent name would be a wildcard).
Result<std::vector<PreparedXact>> list_prepared(PgConn& c, std::string_view agent);

// Deletes markers of `coordinator` strictly below (epoch, seq); returns rows deleted. At most
// `limit` rows per call so a purge never holds locks for long.
Result<int64_t> purge_markers(PgConn& c, std::string_view coordinator, int64_t epoch, int64_t seq,
                              int64_t limit);

// tpc_agent_state: durable per-branch facts outside the branch (3PC pre-commit, operator
// decisions). put is an upsert in its own autocommit transaction.
Status put_state(PgConn& c, std::string_view pg_gid, std::string_view state,
                 std::string_view detail);
Result<std::optional<std::string>> get_state(PgConn& c, std::string_view pg_gid);
Status delete_state(PgConn& c, std::string_view pg_gid);
struct AgentState {
  std::string state;
  std::string detail;
};
Result<std::optional<AgentState>> read_state(PgConn& c, std::string_view pg_gid);
// Deletes 3PC rows ("prepared3", "precommitted") of this agent older than older_than_s whose
// transaction is no longer prepared (left behind by a crash between the row and PREPARE, or
// between COMMIT PREPARED and the row's removal).
Result<int64_t> purge_stale_states(PgConn& c, std::string_view agent, int64_t older_than_s);
// This agent's tpc_agent_state rows other than the 3PC ones ("prepared3", "precommitted")
// whose transaction is no longer prepared: decisions taken at the agent, kept until settled.
struct StateRow {
  std::string pg_gid;
  AgentState state;
};
Result<std::vector<StateRow>> list_decided_states(PgConn& c, std::string_view agent);

}  // namespace tpc::pg
