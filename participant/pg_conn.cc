// PgConn: a blocking libpq connection. Parameters are bound as text through PQexecParams,
// results come back in text format, and every failure is a value: sql_error with the server's
// SQLSTATE, or unavailable when the session is gone (the server's state is then unknown to
// the caller).
#include "participant/pg_conn.h"

#include <libpq-fe.h>

#include <charconv>
#include <string>

namespace tpc::pg {
namespace {

constexpr size_t kMessageMaxBytes = 1000;  // an error message kept in a Status

// libpq messages span lines ("...failed: Connection refused\n\tIs the server running...").
std::string one_line(std::string_view text) {
  std::string out;
  bool space = false;
  for (char ch : text) {
    if (ch == '\n' || ch == '\r' || ch == '\t' || ch == ' ') {
      space = !out.empty();
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += ch;
  }
  if (out.size() > kMessageMaxBytes) out.resize(kMessageMaxBytes);
  return out;
}

std::string conn_message(const PGconn* c) {
  std::string m = one_line(PQerrorMessage(c));
  return m.empty() ? "connection to the server lost" : m;
}

// Notices (e.g. "there is no transaction in progress") would go to stderr; the agent's log
// is structured, so they are dropped.
void drop_notice(void*, const char*) {}

struct ResultGuard {
  PGresult* res;
  ~ResultGuard() {
    if (res != nullptr) PQclear(res);
  }
};

int64_t parse_affected(const char* text) {
  int64_t v = 0;
  std::string_view s(text != nullptr ? text : "");
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  (void)p;
  return ec == std::errc() ? v : 0;
}

void fill_rows(const PGresult* res, StatementResult* out) {
  int ncols = PQnfields(res);
  int nrows = PQntuples(res);
  out->columns.reserve(static_cast<size_t>(ncols));
  for (int j = 0; j < ncols; ++j) out->columns.emplace_back(PQfname(res, j));
  out->rows.reserve(static_cast<size_t>(nrows));
  for (int i = 0; i < nrows; ++i) {
    std::vector<Value> row;
    row.reserve(static_cast<size_t>(ncols));
    for (int j = 0; j < ncols; ++j) {
      if (PQgetisnull(res, i, j)) {
        row.emplace_back(std::nullopt);
      } else {
        row.emplace_back(
            std::string(PQgetvalue(res, i, j), static_cast<size_t>(PQgetlength(res, i, j))));
      }
    }
    out->rows.push_back(std::move(row));
  }
}

ExecResult error_result(const PGresult* res) {
  ExecResult r;
  const char* state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  const char* primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  r.sqlstate = state != nullptr ? state : "";
  std::string msg = one_line(primary != nullptr ? primary : PQresultErrorMessage(res));
  if (msg.empty()) msg = "statement failed";
  r.status = r.sqlstate.empty() ? unavailable(msg) : Status(Code::sql_error, msg);
  return r;
}

// Ends a COPY the server started: the agent has no COPY data to give or take. COPY FROM STDIN
// is failed from our side; COPY TO STDOUT is drained. Either way the statement is refused.
ExecResult end_copy(PGconn* conn, ExecStatusType kind) {
  ExecResult r;
  if (kind == PGRES_COPY_IN) {
    if (PQputCopyEnd(conn, "COPY FROM STDIN is not supported") != 1) {
      r.status = unavailable(conn_message(conn));
      return r;
    }
  } else {
    char* buf = nullptr;
    while (PQgetCopyData(conn, &buf, 0) > 0) {
      PQfreemem(buf);
      buf = nullptr;
    }
  }
  // The COPY's own final result (for COPY IN, the server's error caused by the refusal).
  ResultGuard g{PQgetResult(conn)};
  if (g.res == nullptr && PQstatus(conn) == CONNECTION_BAD) {
    r.status = unavailable(conn_message(conn));
    return r;
  }
  r.sqlstate = "0A000";
  r.status = Status(Code::sql_error, "COPY to or from the client is not supported");
  return r;
}

// Turns one PGresult into an ExecResult; for a COPY, ends it first.
ExecResult collect(PGconn* conn, PGresult* res) {
  if (res == nullptr) {
    // libpq refused before sending (e.g. more than 65535 parameters), or the session is gone.
    ExecResult r;
    r.status = PQstatus(conn) == CONNECTION_OK ? invalid_argument(conn_message(conn))
                                               : unavailable(conn_message(conn));
    return r;
  }
  ExecStatusType s = PQresultStatus(res);
  switch (s) {
    case PGRES_COMMAND_OK:
    case PGRES_TUPLES_OK:
    case PGRES_EMPTY_QUERY: {
      ExecResult r;
      fill_rows(res, &r.result);
      r.result.affected = parse_affected(PQcmdTuples(res));
      r.result.command_tag = PQcmdStatus(res);
      return r;
    }
    case PGRES_COPY_IN:
    case PGRES_COPY_OUT:
      return end_copy(conn, s);
    case PGRES_FATAL_ERROR:
    case PGRES_NONFATAL_ERROR:
    case PGRES_BAD_RESPONSE:
      return error_result(res);
    default: {
      ExecResult r;
      r.status = internal_error(std::string("unexpected libpq result ") + PQresStatus(s));
      return r;
    }
  }
}

// A session that is gone turns an error into unavailable: whatever the server did with the
// open transaction is not known from here.
void mark_if_broken(PGconn* conn, ExecResult* r) {
  if (PQstatus(conn) == CONNECTION_BAD && !r->status.ok() &&
      r->status.code() != Code::unavailable) {
    r->status = unavailable(r->status.message() + " (connection lost)");
  }
}

}  // namespace

Result<std::unique_ptr<PgConn>> PgConn::connect(const ConnectOptions& opts) {
  // Keywords before "dbname" are defaults the conninfo string (expanded in its place) may
  // override; the ones after it win over the conninfo.
  int64_t timeout_s = 0;  // libpq: 0 waits forever
  if (opts.connect_timeout_ms > 0) timeout_s = (opts.connect_timeout_ms + 999) / 1000;
  std::string timeout = std::to_string(timeout_s);
  // Results are sent on as JSON, so the client encoding is always UTF8.
  const char* keys[] = {"application_name",    "keepalives",       "keepalives_idle",
                        "keepalives_interval", "keepalives_count", "dbname",
                        "client_encoding",     "connect_timeout",  nullptr};
  const char* values[] = {opts.application_name.c_str(),
                          "1",
                          "10",
                          "5",
                          "3",
                          opts.conninfo.c_str(),
                          "UTF8",
                          timeout.c_str(),
                          nullptr};
  PGconn* c = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
  if (c == nullptr) return unavailable("libpq: out of memory");
  if (PQstatus(c) != CONNECTION_OK) {
    std::string msg = conn_message(c);
    PQfinish(c);
    return unavailable(msg);
  }
  PQsetNoticeProcessor(c, drop_notice, nullptr);
  std::unique_ptr<PgConn> conn(new PgConn(c));
  if (opts.statement_timeout_ms > 0) {
    ExecResult r =
        conn->exec_simple("SET statement_timeout = " + std::to_string(opts.statement_timeout_ms));
    if (!r.status.ok()) return r.status;
  }
  if (opts.lock_timeout_ms > 0) {
    ExecResult r = conn->exec_simple("SET lock_timeout = " + std::to_string(opts.lock_timeout_ms));
    if (!r.status.ok()) return r.status;
  }
  return conn;
}

PgCancel::~PgCancel() {
  if (cancel_ != nullptr) PQfreeCancel(cancel_);
}

Status PgCancel::cancel() {
  if (cancel_ == nullptr) return unavailable("no cancel handle");
  char err[256] = {0};
  if (PQcancel(cancel_, err, sizeof err) != 1) return unavailable(one_line(err));
  return ok_status();
}

std::unique_ptr<PgCancel> PgConn::canceller() const {
  PGcancel* c = PQgetCancel(conn_);
  if (c == nullptr) return nullptr;
  return std::unique_ptr<PgCancel>(new PgCancel(c));
}

PgConn::~PgConn() {
  PQfinish(conn_);
}

ExecResult PgConn::exec(std::string_view sql, const std::vector<Value>& params) {
  std::string text(sql);
  std::vector<const char*> values;
  values.reserve(params.size());
  for (const auto& p : params) values.push_back(p ? p->c_str() : nullptr);
  ResultGuard g{PQexecParams(conn_, text.c_str(), static_cast<int>(params.size()), nullptr,
                             values.data(), nullptr, nullptr, /*resultFormat=*/0)};
  ExecResult r = collect(conn_, g.res);
  if (g.res != nullptr &&
      (PQresultStatus(g.res) == PGRES_COPY_IN || PQresultStatus(g.res) == PGRES_COPY_OUT)) {
    // PQexecParams returned before the COPY ended; collect the remaining results.
    while (PGresult* rest = PQgetResult(conn_)) PQclear(rest);
  }
  mark_if_broken(conn_, &r);
  return r;
}

ExecResult PgConn::exec_simple(std::string_view sql) {
  std::vector<ExecResult> all = exec_multi(sql);
  TPC_ASSERT(!all.empty());
  return std::move(all.back());
}

std::vector<ExecResult> PgConn::exec_multi(std::string_view sql) {
  std::vector<ExecResult> out;
  std::string text(sql);
  if (PQsendQuery(conn_, text.c_str()) != 1) {
    ExecResult r;
    r.status = unavailable(conn_message(conn_));
    out.push_back(std::move(r));
    return out;
  }
  for (;;) {
    ResultGuard g{PQgetResult(conn_)};
    if (g.res == nullptr) break;
    out.push_back(collect(conn_, g.res));
  }
  if (PQstatus(conn_) == CONNECTION_BAD) {
    if (out.empty() || out.back().status.ok()) {
      ExecResult r;
      r.status = unavailable(conn_message(conn_));
      out.push_back(std::move(r));
    }
    for (auto& r : out) mark_if_broken(conn_, &r);
  }
  if (out.empty()) {  // cannot happen with a working server; reported rather than hidden
    ExecResult r;
    r.status = internal_error("no result for a statement string");
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<ExecResult> PgConn::exec_pipeline(const std::vector<PipelineStep>& steps) {
  std::vector<ExecResult> out(steps.size());
  auto broken = [&](size_t from) {
    for (size_t i = from; i < out.size(); ++i)
      if (out[i].status.ok() && !out[i].skipped) out[i].status = unavailable(conn_message(conn_));
    (void)PQexitPipelineMode(conn_);
    return out;
  };
  if (steps.empty()) return out;
  if (PQenterPipelineMode(conn_) != 1) return broken(0);

  std::vector<std::string> names(steps.size());
  std::vector<bool> preparing(steps.size(), false);
  for (size_t i = 0; i < steps.size(); ++i) {
    const PipelineStep& st = steps[i];
    std::vector<const char*> values;
    values.reserve(st.params.size());
    for (const auto& p : st.params) values.push_back(p ? p->c_str() : nullptr);
    int n = static_cast<int>(st.params.size());
    if (st.cache) {
      auto it = statements_.find(st.sql);
      if (it != statements_.end()) {
        names[i] = it->second;
      } else if (statements_.size() < kStatementsCachedMax) {
        names[i] = "tpc_s" + std::to_string(next_statement_++);
        if (PQsendPrepare(conn_, names[i].c_str(), st.sql.c_str(), n, nullptr) != 1) return broken(0);
        preparing[i] = true;
      }
    }
    int sent = names[i].empty()
                   ? PQsendQueryParams(conn_, st.sql.c_str(), n, nullptr, values.data(), nullptr,
                                       nullptr, 0)
                   : PQsendQueryPrepared(conn_, names[i].c_str(), n, values.data(), nullptr,
                                         nullptr, 0);
    if (sent != 1) return broken(0);
  }
  if (PQpipelineSync(conn_) != 1) return broken(0);

  // Each command's results end with a null; the sync ends with PGRES_PIPELINE_SYNC.
  auto take = [&]() -> PGresult* {
    PGresult* r = PQgetResult(conn_);
    if (r == nullptr) return nullptr;
    while (PGresult* extra = PQgetResult(conn_)) PQclear(extra);  // up to the null
    return r;
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    bool prepare_failed = false;
    if (preparing[i]) {
      ResultGuard pg{take()};
      if (pg.res == nullptr) return broken(i);
      if (PQresultStatus(pg.res) == PGRES_COMMAND_OK) {
        statements_[steps[i].sql] = names[i];
      } else if (PQresultStatus(pg.res) != PGRES_PIPELINE_ABORTED) {
        out[i] = collect(conn_, pg.res);  // e.g. a syntax error: the statement's own error
        prepare_failed = true;
      }
    }
    ResultGuard g{take()};
    if (g.res == nullptr) return broken(i);
    if (prepare_failed) continue;
    if (PQresultStatus(g.res) == PGRES_PIPELINE_ABORTED) {
      out[i].skipped = true;
      out[i].status = Status(Code::sql_error, "not run: an earlier statement failed");
      continue;
    }
    out[i] = collect(conn_, g.res);
    // The statement cache is gone (e.g. DISCARD ALL in the branch): prepare afresh next time.
    if (out[i].sqlstate == "26000") statements_.clear();
  }
  ResultGuard sync{PQgetResult(conn_)};
  if (sync.res == nullptr || PQresultStatus(sync.res) != PGRES_PIPELINE_SYNC) return broken(steps.size());
  if (PQexitPipelineMode(conn_) != 1) return broken(steps.size());
  for (auto& r : out) mark_if_broken(conn_, &r);
  return out;
}

Result<std::string> PgConn::quote_literal(std::string_view text) {
  char* q = PQescapeLiteral(conn_, text.data(), text.size());
  if (q == nullptr) return unavailable("quoting a literal failed: " + conn_message(conn_));
  std::string out(q);
  PQfreemem(q);
  return out;
}

bool PgConn::usable() const {
  if (PQstatus(conn_) != CONNECTION_OK) return false;
  PGTransactionStatusType t = PQtransactionStatus(conn_);
  return t == PQTRANS_IDLE || t == PQTRANS_INTRANS;
}

bool PgConn::in_transaction() const {
  PGTransactionStatusType t = PQtransactionStatus(conn_);
  return t == PQTRANS_INTRANS || t == PQTRANS_INERROR;
}

int PgConn::server_version() const {
  return PQserverVersion(conn_);
}

Result<std::vector<std::string>> PgConn::take_notifications() {
  if (PQconsumeInput(conn_) == 0) return unavailable(conn_message(conn_));
  std::vector<std::string> out;
  while (PGnotify* n = PQnotifies(conn_)) {
    out.emplace_back(n->relname);
    PQfreemem(n);
  }
  return out;
}

int PgConn::socket() const {
  return PQsocket(conn_);
}

}  // namespace tpc::pg
