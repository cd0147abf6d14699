// The SQL of the local message table (docs/DESIGN.md §10.2): tpc_outbox, which applications
// insert into inside their own transactions, and what the relay (outbox_relay.h) reads and
// writes. Not wired into the agent yet.
//
//   tpc_outbox(id bigserial PRIMARY KEY, key text, destination jsonb, payload jsonb,
//              state text: pending | delivered | dead | discarded, attempts int,
//              next_attempt_at timestamptz, created_at, delivered_at, discarded_at,
//              last_error text)
// An insert NOTIFYs channel tpc_outbox at commit (a statement trigger), so the relay wakes at
// once; it polls too, since a notification sent while nobody listens is lost.
//
// Per-key order: a row is eligible only while no earlier row of its key is pending or dead, so
// a dead row holds its key back until it is retried or discarded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "participant/outbox_relay.h"
#include "participant/pg_conn.h"

namespace tpc::pg {

inline constexpr std::string_view kOutboxChannel = "tpc_outbox";

// Creates the table, its index and its NOTIFY trigger if missing (outside a block).
Status ensure_outbox_schema(PgConn& c);

// A message to insert: its destination op and payload as JSON text, and its key ("" none).
struct OutboxInsert {
  std::string key;
  std::string destination;
  std::string payload;
};

struct OutboxPut {
  // ok, or sql_error (a statement failed: nothing committed) with sqlstate, or unavailable
  // (the outcome is unknown: the connection broke, possibly during COMMIT).
  Status status;
  std::string sqlstate;
  std::vector<StatementResult> results;
  std::vector<int64_t> ids;  // of the messages, in order
};

// The statements and the message rows in one local transaction (outside a block).
OutboxPut put_outbox(PgConn& c, std::vector<PipelineStep> statements,
                     const std::vector<OutboxInsert>& messages);

// Up to `limit` rows that are pending, due, and the head of their key, oldest first.
Result<std::vector<agent::OutboxRow>> scan_outbox(PgConn& c, size_t limit);

// Writes a relay's mark; a row no longer pending is left alone (false).
Result<bool> mark_outbox(PgConn& c, const agent::OutboxMark& m);

// A row as the views show it.
struct OutboxView {
  int64_t id = 0;
  std::optional<std::string> key;
  std::string destination, payload;  // JSON text
  std::string state;
  int64_t attempts = 0;
  std::string created_at;
  std::optional<std::string> delivered_at, discarded_at, last_error, next_attempt_at;
};

// Newest first; state "" for all.
Result<std::vector<OutboxView>> list_outbox(PgConn& c, std::string_view state, size_t limit);
Result<std::optional<OutboxView>> get_outbox(PgConn& c, int64_t id);
// An operator's redelivery of a dead row (pending again, its attempts from 0), or its discard
// (recorded with discarded_at; the key's later rows go on). False when the row is not dead.
Result<bool> retry_outbox(PgConn& c, int64_t id);
Result<bool> discard_outbox(PgConn& c, int64_t id);

// The age of the oldest pending or dead row, in ms (0: none).
Result<int64_t> oldest_undelivered_ms(PgConn& c);

}  // namespace tpc::pg
