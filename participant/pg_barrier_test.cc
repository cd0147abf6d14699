// A step's SQL against a real server (pg_barrier.h): at most once per (gid, branch, op), the
// stored result a duplicate answers, empty compensation, anti-hanging, business failures
// rolling back the barrier row with the work, the row limits, concurrent calls of one key and
// of a try racing its cancel, and purging. Accounts keep a frozen column as a TCC transfer
// would; every test checks the money at the end.
#include "participant/pg_barrier.h"

#include <doctest/doctest.h>

#include <atomic>
#include <latch>
#include <thread>

#include "common/ids.h"
#include "participant/pg_branch.h"
#include "participant/pg_conn.h"
#include "tests/harness/harness.h"

namespace tpc::pg {
namespace {

using testing::PgCluster;

PgCluster* cluster() {
  auto c = testing::shared_cluster();
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  return *c;
}

std::string encode_count(const std::vector<StatementResult>& r) {
  return "[" + std::to_string(r.size()) + "]";
}

// A database with the agent's tables and accounts(id, balance, frozen): account 1 holds 100.
struct Bank {
  Bank() {
    static int counter = 0;
    name = "barrier_" + std::to_string(++counter);
    REQUIRE(cluster()->create_database(name).ok());
    conninfo = cluster()->conninfo(name);
    conn = connect();
    REQUIRE(ensure_schema(*conn).ok());
    sql("CREATE TABLE accounts(id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0),"
        " frozen bigint NOT NULL DEFAULT 0 CHECK (frozen >= 0))");
    sql("INSERT INTO accounts VALUES (1, 100, 0)");
  }
  std::unique_ptr<PgConn> connect() const {
    auto c = PgConn::connect(ConnectOptions{conninfo});
    REQUIRE_MESSAGE(c.ok(), c.status().to_string());
    return std::move(c).value();
  }
  void sql(const std::string& text) const {
    auto r = testing::query(conninfo, text);
    REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  }
  std::string value(const std::string& text) const {
    auto v = testing::query_value(conninfo, text);
    REQUIRE_MESSAGE(v.ok(), v.status().to_string());
    return v->value_or("NULL");
  }
  std::string balance() const {
    return value("SELECT balance || '/' || frozen FROM accounts WHERE id = 1");
  }
  int barrier_rows() const { return std::stoi(value("SELECT count(*) FROM tpc_barrier")); }

  StepRun run(PgConn& c, StepOp op, std::vector<PipelineStep> statements,
              std::vector<std::optional<int64_t>> expect = {}, size_t rows_max = 1000,
              const std::string& gid = "c1-1-7") const {
    StepCall call{gid, "freeze", op, "c1", 1, 7};
    if (auto parts = parse_gid(gid)) {
      call.epoch = static_cast<int64_t>(parts->epoch);
      call.seq = static_cast<int64_t>(parts->seq);
    }
    StepRun r = run_step(c, call, std::move(statements), expect, rows_max, encode_count);
    CHECK(!c.in_transaction());  // every path ends its block
    return r;
  }
  StepRun run(StepOp op, std::vector<PipelineStep> statements,
              std::vector<std::optional<int64_t>> expect = {}) const {
    return run(*conn, op, std::move(statements), std::move(expect));
  }

  std::string name, conninfo;
  std::unique_ptr<PgConn> conn;
};

// TCC on one account: try freezes 30, confirm spends the frozen 30, cancel releases it.
std::vector<PipelineStep> tcc(StepOp op) {
  switch (op) {
    case StepOp::try_op:
      return {
          {"UPDATE accounts SET balance = balance - 30, frozen = frozen + 30 WHERE id = 1", {}}};
    case StepOp::confirm: return {{"UPDATE accounts SET frozen = frozen - 30 WHERE id = 1", {}}};
    case StepOp::cancel:
      return {
          {"UPDATE accounts SET balance = balance + 30, frozen = frozen - 30 WHERE id = 1", {}}};
    default: return {};
  }
}

}  // namespace

TEST_CASE("a try runs once however often it is sent; a duplicate answers the stored result") {
  Bank b;
  StepRun first = b.run(StepOp::try_op, tcc(StepOp::try_op));
  REQUIRE_MESSAGE(first.status.ok(), first.status.to_string());
  CHECK(first.barrier == Barrier::applied);
  REQUIRE(first.results.size() == 1);
  CHECK(first.results[0].affected == 1);
  CHECK(b.balance() == "70/30");
  for (int i = 0; i < 3; ++i) {
    StepRun again = b.run(StepOp::try_op, tcc(StepOp::try_op));
    REQUIRE(again.status.ok());
    CHECK(again.barrier == Barrier::duplicate);
    CHECK(again.stored == std::optional<std::string>("[1]"));
    CHECK(again.results.empty());
  }
  CHECK(b.balance() == "70/30");
  StepRun confirm = b.run(StepOp::confirm, tcc(StepOp::confirm));
  CHECK(confirm.barrier == Barrier::applied);
  CHECK(b.run(StepOp::confirm, tcc(StepOp::confirm)).barrier == Barrier::duplicate);
  CHECK(b.balance() == "70/0");
  CHECK(b.value("SELECT string_agg(op || ':' || written_by, ',' ORDER BY op) FROM tpc_barrier") ==
        "confirm:confirm,try:try");
}

TEST_CASE("a cancel whose try never ran commits only its rows, and the late try is refused") {
  Bank b;
  StepRun cancel = b.run(StepOp::cancel, tcc(StepOp::cancel));
  REQUIRE_MESSAGE(cancel.status.ok(), cancel.status.to_string());
  CHECK(cancel.barrier == Barrier::empty_compensation);
  CHECK(b.balance() == "100/0");  // the cancel's UPDATE did not run (it would break frozen >= 0)
  CHECK(b.value("SELECT string_agg(op || ':' || written_by, ',' ORDER BY op) FROM tpc_barrier") ==
        "cancel:cancel,try:cancel");
  StepRun late = b.run(StepOp::try_op, tcc(StepOp::try_op));
  REQUIRE(late.status.ok());
  CHECK(late.barrier == Barrier::refused);
  CHECK(b.balance() == "100/0");
  CHECK(b.run(StepOp::cancel, tcc(StepOp::cancel)).barrier == Barrier::duplicate);
  CHECK(b.balance() == "100/0");
}

TEST_CASE("a cancel after its try undoes it, once") {
  Bank b;
  REQUIRE(b.run(StepOp::try_op, tcc(StepOp::try_op)).barrier == Barrier::applied);
  CHECK(b.balance() == "70/30");
  StepRun cancel = b.run(StepOp::cancel, tcc(StepOp::cancel));
  REQUIRE(cancel.status.ok());
  CHECK(cancel.barrier == Barrier::applied);
  CHECK(b.balance() == "100/0");
  CHECK(b.run(StepOp::cancel, tcc(StepOp::cancel)).barrier == Barrier::duplicate);
  CHECK(b.run(StepOp::try_op, tcc(StepOp::try_op)).barrier == Barrier::duplicate);
  CHECK(b.balance() == "100/0");
}

TEST_CASE("a compensation with no statements after its action commits its row only") {
  Bank b;
  REQUIRE(b.run(StepOp::action, {{"UPDATE accounts SET balance = balance - 1 WHERE id = 1", {}}})
              .barrier == Barrier::applied);
  StepRun comp = b.run(StepOp::compensate, {});
  REQUIRE_MESSAGE(comp.status.ok(), comp.status.to_string());
  CHECK(comp.barrier == Barrier::applied);
  CHECK(comp.results.empty());
  CHECK(b.barrier_rows() == 2);
  CHECK(b.balance() == "99/0");
}

TEST_CASE("a business failure rolls back the work and the barrier row; a later call may apply") {
  Bank b;
  // Freezing 500 breaks balance >= 0.
  std::vector<PipelineStep> too_much = {
      {"UPDATE accounts SET balance = balance - 500, frozen = frozen + 500 WHERE id = 1", {}}};
  StepRun failed = b.run(StepOp::action, too_much);
  CHECK(failed.status.code() == Code::sql_error);
  CHECK(failed.sqlstate == "23514");
  CHECK(!failed.barrier);
  CHECK(b.barrier_rows() == 0);
  CHECK(b.balance() == "100/0");
  // So a compensation finds its action never ran.
  CHECK(b.run(StepOp::compensate, {}).barrier == Barrier::empty_compensation);
}

TEST_CASE("expect_rows and the row limit fail the step before anything commits") {
  Bank b;
  StepRun miss =
      b.run(StepOp::action, {{"UPDATE accounts SET balance = balance - 1 WHERE id = 2", {}}}, {1});
  CHECK(miss.status.code() == Code::sql_error);
  CHECK(miss.sqlstate == kExpectRowsSqlstate);
  StepRun rows = b.run(*b.conn, StepOp::local, {{"SELECT generate_series(1, 5)", {}}}, {}, 4);
  CHECK(rows.status.code() == Code::sql_error);
  CHECK(rows.sqlstate == kTooManyRowsSqlstate);
  // A compensation checks its statements the same way (they run in a round trip of their own).
  REQUIRE(b.run(StepOp::action, {{"UPDATE accounts SET balance = balance - 1 WHERE id = 1", {}}})
              .barrier == Barrier::applied);
  StepRun comp = b.run(StepOp::compensate,
                       {{"UPDATE accounts SET balance = balance + 1 WHERE id = 3", {}}}, {1});
  CHECK(comp.sqlstate == kExpectRowsSqlstate);
  CHECK(b.balance() == "99/0");
  CHECK(b.barrier_rows() == 1);  // the action's only
}

TEST_CASE("a step waiting on a lock past lock_timeout fails with 55P03, nothing applied") {
  Bank b;
  auto holder = b.connect();
  REQUIRE(holder->exec("BEGIN").status.ok());
  REQUIRE(holder->exec("UPDATE accounts SET balance = balance WHERE id = 1").status.ok());
  auto c = b.connect();
  REQUIRE(c->exec("SET lock_timeout = '100ms'").status.ok());
  StepRun r = b.run(*c, StepOp::try_op, tcc(StepOp::try_op));
  CHECK(r.status.code() == Code::sql_error);
  CHECK(r.sqlstate == "55P03");
  CHECK(retryable_sqlstate(r.sqlstate));
  REQUIRE(holder->exec("ROLLBACK").status.ok());
  CHECK(b.barrier_rows() == 0);
  CHECK(b.run(*c, StepOp::try_op, tcc(StepOp::try_op)).barrier == Barrier::applied);
  CHECK(b.balance() == "70/30");
}

TEST_CASE("concurrent calls of one key: exactly one applies") {
  Bank b;
  constexpr int kCallers = 6;
  std::vector<std::unique_ptr<PgConn>> conns;
  for (int i = 0; i < kCallers; ++i) conns.push_back(b.connect());
  std::latch start(kCallers);
  std::vector<StepRun> runs(kCallers);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCallers; ++i)
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      runs[i] = b.run(*conns[i], StepOp::try_op, tcc(StepOp::try_op));
    });
  for (auto& t : threads) t.join();
  int applied = 0, duplicate = 0;
  for (auto& r : runs) {
    REQUIRE_MESSAGE(r.status.ok(), r.status.to_string());
    applied += r.barrier == Barrier::applied;
    duplicate += r.barrier == Barrier::duplicate;
  }
  CHECK(applied == 1);
  CHECK(duplicate == kCallers - 1);
  CHECK(b.balance() == "70/30");
}

TEST_CASE("a try racing its cancel: either both apply or the cancel is empty and the try refused") {
  for (int round = 0; round < 20; ++round) {
    Bank b;
    auto ct = b.connect(), cc = b.connect();
    std::latch start(2);
    StepRun t, c;
    std::thread try_thread([&] {
      start.arrive_and_wait();
      t = b.run(*ct, StepOp::try_op, tcc(StepOp::try_op));
    });
    std::thread cancel_thread([&] {
      start.arrive_and_wait();
      c = b.run(*cc, StepOp::cancel, tcc(StepOp::cancel));
    });
    try_thread.join();
    cancel_thread.join();
    REQUIRE_MESSAGE(t.status.ok(), t.status.to_string());
    REQUIRE_MESSAGE(c.status.ok(), c.status.to_string());
    bool both = t.barrier == Barrier::applied && c.barrier == Barrier::applied;
    bool hung_off = t.barrier == Barrier::refused && c.barrier == Barrier::empty_compensation;
    CHECK_MESSAGE((both || hung_off),
                  "try " << barrier_name(*t.barrier) << ", cancel " << barrier_name(*c.barrier));
    CHECK(b.balance() == "100/0");  // never frozen money left behind, never money created
  }
}

// A message's local op takes 30 from account 1 (docs/DESIGN.md §10.1).
std::vector<PipelineStep> local_op() {
  return {{"UPDATE accounts SET balance = balance - 30 WHERE id = 1", {}}};
}

TEST_CASE("a check after the local op committed answers committed with its results, every time") {
  Bank b;
  REQUIRE(b.run(StepOp::local, local_op()).barrier == Barrier::applied);
  for (int i = 0; i < 2; ++i) {
    StepRun check = b.run(StepOp::check, {});
    REQUIRE_MESSAGE(check.status.ok(), check.status.to_string());
    CHECK(check.barrier == Barrier::committed);
    CHECK(check.stored == std::optional<std::string>("[1]"));
  }
  CHECK(b.balance() == "70/0");
  CHECK(b.value("SELECT string_agg(op || ':' || written_by, ',') FROM tpc_barrier") ==
        "local:local");
}

TEST_CASE("a check before the local op fences it: fenced every time, and the late op refused") {
  Bank b;
  StepRun check = b.run(StepOp::check, {});
  REQUIRE_MESSAGE(check.status.ok(), check.status.to_string());
  CHECK(check.barrier == Barrier::fenced);
  CHECK(b.value("SELECT string_agg(op || ':' || written_by, ',') FROM tpc_barrier") ==
        "local:check");
  StepRun late = b.run(StepOp::local, local_op());
  REQUIRE(late.status.ok());
  CHECK(late.barrier == Barrier::refused);
  CHECK(b.balance() == "100/0");
  CHECK(b.run(StepOp::check, {}).barrier == Barrier::fenced);
}

TEST_CASE("a local op racing its check: committed and applied, or fenced and refused") {
  int committed = 0, fenced = 0;
  for (int round = 0; round < 20; ++round) {
    Bank b;
    auto cl = b.connect(), cc = b.connect();
    std::latch start(2);
    StepRun l, c;
    std::thread local_thread([&] {
      start.arrive_and_wait();
      l = b.run(*cl, StepOp::local, local_op());
    });
    std::thread check_thread([&] {
      start.arrive_and_wait();
      c = b.run(*cc, StepOp::check, {});
    });
    local_thread.join();
    check_thread.join();
    REQUIRE_MESSAGE(l.status.ok(), l.status.to_string());
    REQUIRE_MESSAGE(c.status.ok(), c.status.to_string());
    bool ran = l.barrier == Barrier::applied && c.barrier == Barrier::committed;
    bool fence = l.barrier == Barrier::refused && c.barrier == Barrier::fenced;
    CHECK_MESSAGE((ran || fence),
                  "local " << barrier_name(*l.barrier) << ", check " << barrier_name(*c.barrier));
    CHECK(b.balance() == (ran ? "70/0" : "100/0"));  // the check's answer is what happened
    committed += ran;
    fenced += fence;
  }
  MESSAGE("committed " << committed << ", fenced " << fenced);
}

TEST_CASE("purge_barriers deletes the rows of one coordinator below the mark only") {
  Bank b;
  for (const char* gid : {"c1-1-3", "c1-1-9", "c1-2-1"})
    REQUIRE(b.run(*b.conn, StepOp::local, {}, {}, 10, gid).barrier == Barrier::applied);
  REQUIRE(run_step(*b.conn, StepCall{"c2-1-1", "x", StepOp::local, "c2", 1, 1}, {}, {}, 10,
                   encode_count)
              .barrier == Barrier::applied);
  auto n = purge_barriers(*b.conn, "c1", 1, 9, 100);
  REQUIRE(n.ok());
  CHECK(*n == 1);
  CHECK(b.value("SELECT string_agg(gid, ',' ORDER BY gid) FROM tpc_barrier") ==
        "c1-1-9,c1-2-1,c2-1-1");
  n = purge_barriers(*b.conn, "c1", 3, 0, 1);  // the limit holds
  REQUIRE(n.ok());
  CHECK(*n == 1);
  CHECK(!purge_barriers(*b.conn, "c1", 3, 0, 0).ok());
}

TEST_CASE("ensure_schema creates tpc_barrier, and missing_privileges asks for it") {
  Bank b;
  CHECK(b.value("SELECT to_regclass('tpc_barrier') IS NOT NULL") == "t");
  b.sql("CREATE ROLE barrier_reader LOGIN");
  b.sql("GRANT SELECT, INSERT, UPDATE, DELETE ON tpc_marker, tpc_agent_state TO barrier_reader");
  b.sql("GRANT SELECT, INSERT, UPDATE ON tpc_agent_identity TO barrier_reader");
  b.sql("GRANT SELECT ON tpc_barrier TO barrier_reader");
  auto c = PgConn::connect(ConnectOptions{b.conninfo + " user=barrier_reader"});
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  auto missing = missing_privileges(**c);
  REQUIRE(missing.ok());
  CHECK(*missing == std::vector<std::string>{"INSERT on tpc_barrier", "UPDATE on tpc_barrier",
                                             "DELETE on tpc_barrier"});
  b.sql("DROP OWNED BY barrier_reader");
  b.sql("DROP ROLE barrier_reader");
}

}  // namespace tpc::pg
