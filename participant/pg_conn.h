// PgConn: one blocking libpq connection, with statements run through PQexecParams (parameters
// bound as text, never spliced into SQL) and results returned in PostgreSQL's text format.
//
// Not thread-safe: one thread uses a PgConn at a time (the agent's worker pool hands a
// connection to one worker for one operation). Blocking calls are bounded by the connection's
// statement_timeout and by TCP keepalives set at connect time.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "participant/branch_types.h"

struct pg_conn;    // libpq's PGconn
struct pg_cancel;  // libpq's PGcancel

namespace tpc::pg {

// The outcome of running a statement. status is ok, or sql_error with sqlstate set, or
// unavailable when the connection broke (sqlstate empty; the session is gone).
struct ExecResult {
  Status status;
  std::string sqlstate;  // e.g. "23505"; "" unless the server reported an error
  StatementResult result;
  bool skipped = false;  // pipeline: not run, because an earlier statement failed
};

// One statement of a pipeline.
struct PipelineStep {
  std::string sql;
  std::vector<Value> params;
  bool cache = true;  // run as a named prepared statement, prepared once per connection
};

struct ConnectOptions {
  std::string conninfo;          // libpq keyword/value string or URI
  int64_t connect_timeout_ms = 5'000;
  int64_t statement_timeout_ms = 0;  // 0 leaves the server's default
  int64_t lock_timeout_ms = 0;       // 0 leaves the server's default
  std::string application_name = "tpc-agent";
};

// Asks the server to cancel whatever the connection it came from is running. Thread-safe with
// respect to that connection: this is how another thread stops a statement blocked on a lock.
class PgCancel {
 public:
  ~PgCancel();
  Status cancel();

 private:
  friend class PgConn;
  explicit PgCancel(pg_cancel* c) : cancel_(c) {}
  pg_cancel* cancel_;
};

class PgConn {
 public:
  // unavailable with libpq's message (one line) when the server cannot be reached.
  static Result<std::unique_ptr<PgConn>> connect(const ConnectOptions& opts);
  ~PgConn();
  PgConn(const PgConn&) = delete;
  PgConn& operator=(const PgConn&) = delete;

  // One statement with text parameters ($1, $2, ...).
  ExecResult exec(std::string_view sql, const std::vector<Value>& params = {});
  // A statement string without parameters via PQexec; it may hold several statements
  // separated by ';', and the result is the last one's (errors stop at the first failure).
  ExecResult exec_simple(std::string_view sql);
  // A statement string without parameters (PQsendQuery) in one round trip, with every
  // statement's result in order; the server stops at the first error, so an error is the last
  // element. Never empty. When the connection broke, the last element is unavailable.
  std::vector<ExecResult> exec_multi(std::string_view sql);

  // Sends every step at once and reads every result (libpq pipeline mode): one round trip.
  // Steps after a failing one are skipped (ExecResult::skipped). Cached steps become named
  // prepared statements of this connection (at most kStatementsCachedMax), so the server
  // parses and plans them once. One result per step, always.
  std::vector<ExecResult> exec_pipeline(const std::vector<PipelineStep>& steps);
  static constexpr size_t kStatementsCachedMax = 256;

  // PQescapeLiteral: 'text' with quotes, safe to splice. unavailable if libpq fails.
  Result<std::string> quote_literal(std::string_view text);

  // CONNECTION_OK and not inside a failed or unknown transaction state.
  bool usable() const;
  // True while a transaction block is open (PQtransactionStatus is INTRANS or INERROR).
  bool in_transaction() const;
  int server_version() const;
  // A handle another thread may use to cancel the statement running on this connection.
  std::unique_ptr<PgCancel> canceller() const;
  // The channels of the NOTIFYs this connection (after LISTEN) has received so far, taken:
  // reads what the socket holds without blocking (PQconsumeInput, PQnotifies). unavailable
  // when the connection broke (the listener reconnects, LISTENs again and rescans: nothing is
  // kept for a channel while nobody listens).
  Result<std::vector<std::string>> take_notifications();
  // The socket, to wait on for notifications (-1 when the connection is gone).
  int socket() const;

 private:
  explicit PgConn(pg_conn* c) : conn_(c) {}
  pg_conn* conn_;
  std::unordered_map<std::string, std::string> statements_;  // sql → prepared statement name
  uint64_t next_statement_ = 1;
};

}  // namespace tpc::pg
