// The PostgreSQL layer against a real server: PgConn's parameter binding and error mapping,
// and a branch's SQL life (prepare votes, commit/rollback prepared answered from the marker,
// one-phase commit, the in-doubt scan, purging, agent state) including a server crash while a
// branch is prepared. One cluster serves the file (created on first use); each test works in a
// database of its own and ends by checking that it left nothing prepared.
#include "participant/pg_branch.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <latch>
#include <thread>

#include "participant/pg_conn.h"
#include "tests/harness/harness.h"

namespace tpc::pg {
namespace {

using testing::PgCluster;

PgCluster* shared_cluster() {
  auto c = testing::shared_cluster();
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  return *c;
}

std::unique_ptr<PgConn> connect_to(const std::string& conninfo) {
  auto c = PgConn::connect(ConnectOptions{conninfo});
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  return std::move(c).value();
}

std::string value_of(const std::string& conninfo, const std::string& sql) {
  auto v = testing::query_value(conninfo, sql);
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return v->value_or("NULL");
}

// A fresh database with the tpc tables, and a connection to it.
struct TestDb {
  explicit TestDb(PgCluster* c) : cluster(c) {
    static int counter = 0;
    name = "pgb_" + std::to_string(++counter);
    Status st = cluster->create_database(name);
    REQUIRE_MESSAGE(st.ok(), st.to_string());
    conninfo = cluster->conninfo(name);
    conn = connect();
    Status schema = ensure_schema(*conn);
    REQUIRE_MESSAGE(schema.ok(), schema.to_string());
  }
  std::unique_ptr<PgConn> connect() const { return connect_to(conninfo); }
  void sql(const std::string& text) const {
    auto r = testing::query(conninfo, text);
    REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  }
  std::string value(const std::string& text) const { return value_of(conninfo, text); }
  int prepared_here() const {
    return std::atoi(
        value("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")
            .c_str());
  }
  bool marker(const std::string& gid) const {
    return value("SELECT count(*) FROM tpc_marker WHERE pg_gid = '" + gid + "'") == "1";
  }

  PgCluster* cluster;
  std::string name;
  std::string conninfo;
  std::unique_ptr<PgConn> conn;
};

void exec_ok(PgConn& c, const std::string& sql, const std::vector<Value>& params = {}) {
  ExecResult r = c.exec(sql, params);
  REQUIRE_MESSAGE(r.status.ok(), sql << ": " << r.status.to_string());
}

PrepareResult prepare_ok(PgConn& c, const std::string& gid, int64_t seq = 1) {
  auto r = prepare(c, gid, "c1", 1, seq);
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  return *r;
}

// BEGIN and one INSERT into t(v int), so the branch has an xid.
void begin_writing(PgConn& c, int v) {
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO t(v) VALUES ($1)", {std::to_string(v)});
}

}  // namespace

TEST_CASE("pg_gid joins agent and gid, and global_gid takes back only this agent's") {
  CHECK(pg_gid("a1", "c1-3-42") == "tpc:a1:c1-3-42");
  CHECK(global_gid("a1", "tpc:a1:c1-3-42") == std::optional<std::string>("c1-3-42"));
  CHECK(!global_gid("a", "tpc:a1:c1-3-42").has_value());
  CHECK(!global_gid("a1", "tpc:a:c1-3-42").has_value());
  CHECK(!global_gid("a_1", "tpc:ab1:c1-3-42").has_value());
  CHECK(!global_gid("a1", "tpc:a1:").has_value());
  CHECK(!global_gid("a1", "xtpc:a1:c1-1-1").has_value());
  CHECK(!global_gid("a1", "some-other-gid").has_value());
}

TEST_CASE("statements bind text parameters: an injection attempt stays data, NULL goes both ways") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  CHECK(c.usable());
  CHECK(!c.in_transaction());
  CHECK(c.server_version() >= 130000);
  exec_ok(c, "CREATE TABLE people(id int PRIMARY KEY, name text)");

  REQUIRE(begin(c).ok());
  CHECK(c.in_transaction());
  const std::string evil = "x'); DROP TABLE people; --";
  ExecResult ins = c.exec("INSERT INTO people VALUES ($1, $2)", {"1", evil});
  REQUIRE(ins.status.ok());
  CHECK(ins.result.affected == 1);
  CHECK(ins.result.command_tag == "INSERT 0 1");
  exec_ok(c, "INSERT INTO people VALUES ($1, $2)", {"2", std::nullopt});
  ExecResult sel = c.exec("SELECT id, name, name IS NULL AS missing FROM people ORDER BY id");
  REQUIRE(sel.status.ok());
  CHECK(sel.result.columns == std::vector<std::string>{"id", "name", "missing"});
  REQUIRE(sel.result.rows.size() == 2);
  CHECK(sel.result.rows[0] == std::vector<Value>{"1", evil, "f"});
  CHECK(sel.result.rows[1] == std::vector<Value>{"2", std::nullopt, "t"});
  CHECK(sel.result.affected == 2);
  CHECK(sel.result.command_tag == "SELECT 2");

  // Text in PostgreSQL's output format, whatever the type.
  ExecResult types =
      c.exec("SELECT 1.50::numeric, true, '{1,2}'::int[], 'é'::text, $1::int + 1", {"41"});
  REQUIRE(types.status.ok());
  CHECK(types.result.rows[0] == std::vector<Value>{"1.50", "t", "{1,2}", "é", "42"});

  REQUIRE(rollback(c).ok());
  CHECK(!c.in_transaction());
  CHECK(db.value("SELECT count(*) FROM people") == "0");  // the table is still there
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a SQL error is sql_error with its sqlstate and leaves a failed block") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  ExecResult bad = c.exec("SELECT * FROM no_such_table");
  CHECK(bad.status.code() == Code::sql_error);
  CHECK(bad.sqlstate == "42P01");
  CHECK(bad.status.message().find("no_such_table") != std::string::npos);
  CHECK(bad.status.message().find('\n') == std::string::npos);
  CHECK(c.usable());  // outside a block nothing is left failed

  REQUIRE(begin(c).ok());
  ExecResult div = c.exec("SELECT 1/0");
  CHECK(div.sqlstate == "22012");
  CHECK(c.in_transaction());
  CHECK(!c.usable());  // a failed block
  ExecResult after = c.exec("SELECT 1");
  CHECK(after.sqlstate == "25P02");
  REQUIRE(rollback(c).ok());
  CHECK(c.usable());
  CHECK(rollback(c).ok());  // outside a block it is a no-op

  ExecResult wrong_params = c.exec("SELECT $1::int", {"not a number"});
  CHECK(wrong_params.sqlstate == "22P02");
  // Refused by libpq before sending: bad input, not a lost server.
  std::vector<Value> too_many(70'000, Value("1"));
  CHECK(c.exec("SELECT $1", too_many).status.code() == Code::invalid_argument);
  // Several statements cannot hide in one parameterised statement.
  CHECK(c.exec("SELECT 1; SELECT 2").sqlstate == "42601");
  CHECK(c.usable());
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("exec_multi returns every statement's result and stops at the first error") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  std::vector<ExecResult> rs = c.exec_multi("SELECT 1 AS a; SELECT 'x' AS b, NULL AS c; SHOW port");
  REQUIRE(rs.size() == 3);
  CHECK(rs[0].result.rows[0][0] == Value("1"));
  CHECK(rs[1].result.columns == std::vector<std::string>{"b", "c"});
  CHECK(rs[1].result.rows[0][1] == std::nullopt);
  CHECK(rs[2].result.rows[0][0] == Value(std::to_string(db.cluster->port())));

  rs = c.exec_multi("SELECT 1; SELECT 1/0; SELECT 3");
  REQUIRE(rs.size() == 2);
  CHECK(rs[0].status.ok());
  CHECK(rs[1].sqlstate == "22012");

  ExecResult last = c.exec_simple("SELECT 1; SELECT 2");
  CHECK(last.result.rows[0][0] == Value("2"));
  CHECK(c.exec_multi("").size() == 1);  // an empty query
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("COPY to or from the client is refused and the connection stays usable") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  ExecResult in = c.exec("COPY t FROM STDIN");
  CHECK(in.status.code() == Code::sql_error);
  CHECK(in.sqlstate == "0A000");
  CHECK(c.usable());
  ExecResult out = c.exec("COPY (SELECT 1) TO STDOUT");
  CHECK(out.status.code() == Code::sql_error);
  CHECK(c.usable());
  std::vector<ExecResult> rs = c.exec_multi("COPY (SELECT 1) TO STDOUT; SELECT 7");
  REQUIRE(rs.size() == 2);
  CHECK(rs[1].result.rows[0][0] == Value("7"));
  CHECK(c.exec("SELECT 1").status.ok());
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("quote_literal makes any text safe to splice") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  auto q = c.quote_literal("it's a \\ test");
  REQUIRE(q.ok());
  ExecResult r = c.exec("SELECT " + *q);
  REQUIRE(r.status.ok());
  CHECK(r.result.rows[0][0] == Value("it's a \\ test"));
}

TEST_CASE("connect options: statement_timeout, application_name, and an unreachable server") {
  PgCluster* cluster = shared_cluster();
  ConnectOptions opts{cluster->conninfo()};
  opts.statement_timeout_ms = 200;
  opts.application_name = "pg-branch-test";
  auto c = PgConn::connect(opts);
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  CHECK((*c)->exec("SHOW statement_timeout").result.rows[0][0] == Value("200ms"));
  CHECK((*c)->exec("SHOW application_name").result.rows[0][0] == Value("pg-branch-test"));
  CHECK((*c)->exec("SHOW client_encoding").result.rows[0][0] == Value("UTF8"));
  ExecResult slow = (*c)->exec("SELECT pg_sleep(30)");
  CHECK(slow.sqlstate == "57014");  // canceled by statement_timeout
  CHECK((*c)->usable());

  ConnectOptions nowhere{"host=127.0.0.1 port=" + std::to_string(testing::free_port()) +
                         " user=tpc dbname=postgres"};
  nowhere.connect_timeout_ms = 2'000;
  auto bad = PgConn::connect(nowhere);
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == Code::unavailable);
  CHECK(bad.status().message().find('\n') == std::string::npos);
  CHECK(!bad.status().message().empty());

  auto no_db = PgConn::connect(ConnectOptions{cluster->conninfo("no_such_database")});
  CHECK(no_db.status().code() == Code::unavailable);
}

TEST_CASE("ensure_schema is idempotent and survives agents racing on one database") {
  PgCluster* cluster = shared_cluster();
  for (int round = 0; round < 3; ++round) {
    std::string name = "pgb_race_" + std::to_string(round);
    REQUIRE(cluster->create_database(name).ok());
    constexpr int kAgents = 4;
    std::vector<std::unique_ptr<PgConn>> conns;
    for (int i = 0; i < kAgents; ++i) conns.push_back(connect_to(cluster->conninfo(name)));
    std::vector<Status> results(kAgents);
    std::latch go(kAgents);
    std::vector<std::thread> threads;
    for (int i = 0; i < kAgents; ++i) {
      threads.emplace_back([&, i] {
        go.arrive_and_wait();
        results[i] = ensure_schema(*conns[i]);
      });
    }
    for (auto& t : threads) t.join();
    for (const Status& st : results) CHECK_MESSAGE(st.ok(), st.to_string());
    CHECK(ensure_schema(*conns[0]).ok());
    CHECK(value_of(cluster->conninfo(name),
                   "SELECT count(*) FROM pg_tables WHERE tablename IN ('tpc_marker', "
                   "'tpc_agent_state')") == "2");
  }
}

TEST_CASE("ensure_schema does not wait on prepared branches (an agent restarts among them)") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(id int)");
  const std::string g = pg_gid("a1", "c1-9-1");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO t VALUES (1)");
  REQUIRE(prepare(c, g, "c1", 9, 1)->vote == Vote::yes);
  ConnectOptions o;
  o.conninfo = db.conninfo;
  o.lock_timeout_ms = 500;
  auto other = PgConn::connect(o);
  REQUIRE(other.ok());
  Status st = ensure_schema(**other);
  CHECK_MESSAGE(st.ok(), st.to_string());
  CHECK(*rollback_prepared(c, g) == Outcome::aborted);
}

TEST_CASE("max_prepared_transactions reads the server's setting") {
  TestDb db(shared_cluster());
  auto n = max_prepared_transactions(*db.conn);
  REQUIRE(n.ok());
  CHECK(*n == 100);
}

TEST_CASE(
    "a prepared branch is hidden until COMMIT PREPARED; repeats answer committed from the marker") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-1-1");

  begin_writing(c, 7);
  PrepareResult vote = prepare_ok(c, gid);
  CHECK(vote.vote == Vote::yes);
  CHECK(vote.reason.empty());
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(db.value("SELECT count(*) FROM t") == "0");  // another session sees nothing yet
  CHECK(db.value("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()") == gid);
  CHECK(!db.marker(gid));  // inside the prepared branch
  CHECK(*evidence(c, gid) == Evidence::prepared);

  auto first = commit_prepared(c, gid);
  REQUIRE_MESSAGE(first.ok(), first.status().to_string());
  CHECK(*first == Outcome::committed);
  CHECK(db.value("SELECT v FROM t") == "7");
  CHECK(db.marker(gid));
  CHECK(db.value("SELECT coordinator || ' ' || epoch || ' ' || seq FROM tpc_marker") == "c1 1 1");
  CHECK(*evidence(c, gid) == Evidence::committed);

  // PostgreSQL now answers 42704; the marker says it committed.
  CHECK(*commit_prepared(c, gid) == Outcome::committed);
  CHECK(*rollback_prepared(c, gid) == Outcome::committed);
  // The marker is the evidence: without it the same answer from the server means aborted.
  db.sql("DELETE FROM tpc_marker");
  CHECK(*commit_prepared(c, gid) == Outcome::aborted);
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("ROLLBACK PREPARED aborts; repeats and never-prepared gids answer aborted") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-1-2");

  begin_writing(c, 8);
  CHECK(prepare_ok(c, gid).vote == Vote::yes);
  auto rolled = rollback_prepared(c, gid);
  REQUIRE_MESSAGE(rolled.ok(), rolled.status().to_string());
  CHECK(*rolled == Outcome::aborted);
  CHECK(!db.marker(gid));
  CHECK(db.value("SELECT count(*) FROM t") == "0");
  CHECK(*evidence(c, gid) == Evidence::absent);

  CHECK(*rollback_prepared(c, gid) == Outcome::aborted);
  CHECK(*commit_prepared(c, gid) == Outcome::aborted);  // not "does not exist" as success
  const std::string never = pg_gid("a1", "c1-1-999");
  CHECK(*commit_prepared(c, never) == Outcome::aborted);
  CHECK(*rollback_prepared(c, never) == Outcome::aborted);
  CHECK(*evidence(c, never) == Evidence::absent);
  CHECK(db.value("SELECT count(*) FROM t") == "0");
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("commit and rollback prepared refuse to run inside a block (an error, not an outcome)") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-1-3");
  begin_writing(c, 1);
  CHECK(prepare_ok(c, gid).vote == Vote::yes);
  REQUIRE(begin(c).ok());
  auto inside = commit_prepared(c, gid);
  REQUIRE(!inside.ok());
  CHECK(inside.status().code() == Code::sql_error);
  CHECK(inside.status().message().find("25001") != std::string::npos);
  REQUIRE(rollback(c).ok());
  CHECK(*commit_prepared(c, gid) == Outcome::committed);
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a read-only branch votes read_only and leaves nothing prepared and no marker") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  exec_ok(c, "INSERT INTO t VALUES (1)");
  const std::string gid = pg_gid("a1", "c1-1-4");
  REQUIRE(begin(c).ok());
  exec_ok(c, "SELECT * FROM t");
  PrepareResult vote = prepare_ok(c, gid);
  CHECK(vote.vote == Vote::read_only);
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(!db.marker(gid));
  CHECK(*evidence(c, gid) == Evidence::absent);
  CHECK(db.prepared_here() == 0);

  // An empty branch is read-only too.
  REQUIRE(begin(c).ok());
  CHECK(prepare_ok(c, pg_gid("a1", "c1-1-5")).vote == Vote::read_only);
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a deferred foreign key violation is reported by PREPARE as a no vote with 23503") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE parent(id int PRIMARY KEY)");
  exec_ok(c,
          "CREATE TABLE child(id int, parent_id int REFERENCES parent(id) DEFERRABLE INITIALLY "
          "DEFERRED)");
  const std::string gid = pg_gid("a1", "c1-1-6");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO child VALUES (1, 999)");  // accepted until the end of the block
  PrepareResult vote = prepare_ok(c, gid);
  CHECK(vote.vote == Vote::no);
  CHECK(vote.sqlstate == "23503");
  CHECK(vote.reason.find("foreign key") != std::string::npos);
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(db.value("SELECT count(*) FROM child") == "0");
  CHECK(!db.marker(gid));
  CHECK(*commit_prepared(c, gid) == Outcome::aborted);
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a branch whose block failed votes no and is rolled back") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-1-7");
  begin_writing(c, 1);
  CHECK(c.exec("SELECT 1/0").sqlstate == "22012");  // the app's error, not the read-only check
  PrepareResult vote = prepare_ok(c, gid);
  CHECK(vote.vote == Vote::no);
  CHECK(vote.sqlstate == "25P02");
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(db.value("SELECT count(*) FROM t") == "0");
  CHECK(!db.marker(gid));
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("prepare without an open block votes no rather than read_only") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  PrepareResult vote = prepare_ok(c, pg_gid("a1", "c1-1-8"));
  CHECK(vote.vote == Vote::no);
  CHECK(!vote.reason.empty());
  CHECK(!db.marker(pg_gid("a1", "c1-1-8")));
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a branch that touched a temp table cannot be prepared: no with 0A000") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  const std::string gid = pg_gid("a1", "c1-1-9");
  REQUIRE(begin(c).ok());
  exec_ok(c, "CREATE TEMP TABLE scratch(v int)");
  exec_ok(c, "INSERT INTO scratch VALUES (1)");
  PrepareResult vote = prepare_ok(c, gid);
  CHECK(vote.vote == Vote::no);
  CHECK(vote.sqlstate == "0A000");
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(!db.marker(gid));
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a gid used before cannot be prepared again: its marker makes it a no") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-1-10");
  begin_writing(c, 1);
  CHECK(prepare_ok(c, gid).vote == Vote::yes);
  CHECK(*commit_prepared(c, gid) == Outcome::committed);
  begin_writing(c, 2);
  PrepareResult again = prepare_ok(c, gid);
  CHECK(again.vote == Vote::no);
  CHECK(again.sqlstate == "23505");
  CHECK(!c.in_transaction());
  CHECK(db.value("SELECT string_agg(v::text, ',') FROM t") == "1");
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("with every prepared-transaction slot taken, prepare votes no with 53200") {
  PgCluster::Options opts;
  opts.max_prepared_transactions = 1;
  auto small = PgCluster::create(opts);
  REQUIRE_MESSAGE(small.ok(), small.status().to_string());
  TestDb db(small->get());
  CHECK(*max_prepared_transactions(*db.conn) == 1);
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string first = pg_gid("a1", "c1-1-11");
  const std::string second = pg_gid("a1", "c1-1-12");
  begin_writing(c, 1);
  CHECK(prepare_ok(c, first).vote == Vote::yes);

  begin_writing(c, 2);
  PrepareResult full = prepare_ok(c, second);
  CHECK(full.vote == Vote::no);
  CHECK(full.sqlstate == "53200");
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(!db.marker(second));
  CHECK(db.prepared_here() == 1);

  CHECK(*rollback_prepared(c, first) == Outcome::aborted);
  CHECK(db.value("SELECT count(*) FROM t") == "0");
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("commit_one_phase commits with a marker, or aborts with the reason") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE parent(id int PRIMARY KEY)");
  exec_ok(c,
          "CREATE TABLE child(id int, parent_id int REFERENCES parent(id) DEFERRABLE INITIALLY "
          "DEFERRED)");

  const std::string ok_gid = pg_gid("a1", "c1-2-1");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO parent VALUES (1)");
  std::string reason;
  auto committed = commit_one_phase(c, ok_gid, "c1", 2, 1, &reason);
  REQUIRE_MESSAGE(committed.ok(), committed.status().to_string());
  CHECK(*committed == Outcome::committed);
  CHECK(reason.empty());
  CHECK(!c.in_transaction());
  CHECK(db.value("SELECT count(*) FROM parent") == "1");
  CHECK(db.marker(ok_gid));
  CHECK(*evidence(c, ok_gid) == Evidence::committed);

  // The deferred check fails at COMMIT: nothing is kept, the marker included.
  const std::string fk_gid = pg_gid("a1", "c1-2-2");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO child VALUES (1, 999)");
  auto aborted = commit_one_phase(c, fk_gid, "c1", 2, 2, &reason);
  REQUIRE(aborted.ok());
  CHECK(*aborted == Outcome::aborted);
  CHECK(reason.find("23503") != std::string::npos);
  CHECK(!c.in_transaction());
  CHECK(c.usable());
  CHECK(db.value("SELECT count(*) FROM child") == "0");
  CHECK(!db.marker(fk_gid));

  // A failed block.
  const std::string failed_gid = pg_gid("a1", "c1-2-3");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO parent VALUES (2)");
  CHECK(c.exec("INSERT INTO parent VALUES (1)").sqlstate == "23505");
  auto failed = commit_one_phase(c, failed_gid, "c1", 2, 3, nullptr);
  REQUIRE(failed.ok());
  CHECK(*failed == Outcome::aborted);
  CHECK(!c.in_transaction());
  CHECK(db.value("SELECT count(*) FROM parent") == "1");
  CHECK(!db.marker(failed_gid));

  // No open block: nothing to commit, and no marker left that would claim otherwise.
  const std::string idle_gid = pg_gid("a1", "c1-2-4");
  CHECK(*commit_one_phase(c, idle_gid, "c1", 2, 4, &reason) == Outcome::aborted);
  CHECK(!db.marker(idle_gid));
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("a tombstone makes a late commit of the same gid fail, and never reads as committed") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(id int)");
  const std::string late = pg_gid("a1", "c1-3-1");
  auto t = put_tombstone(c, late, "c1", 3, 1);
  REQUIRE_MESSAGE(t.ok(), t.status().to_string());
  CHECK(*t == Outcome::aborted);
  CHECK(*evidence(c, late) == Evidence::absent);
  CHECK(*put_tombstone(c, late, "c1", 3, 1) == Outcome::aborted);  // idempotent
  // The statements arrive after all: their commit fails on the tombstone, nothing is kept.
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO t VALUES (1)");
  std::string reason;
  CHECK(*commit_one_phase(c, late, "c1", 3, 1, &reason) == Outcome::aborted);
  CHECK(db.value("SELECT count(*) FROM t") == "0");
  // A late prepare of it votes no as well.
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO t VALUES (2)");
  CHECK(prepare(c, late, "c1", 3, 1)->vote == Vote::no);
  CHECK(db.prepared_here() == 0);
  // A branch that did commit wins: the tombstone is not written and the answer is committed.
  const std::string done = pg_gid("a1", "c1-3-2");
  REQUIRE(begin(c).ok());
  exec_ok(c, "INSERT INTO t VALUES (3)");
  REQUIRE(*commit_one_phase(c, done, "c1", 3, 2, &reason) == Outcome::committed);
  CHECK(*put_tombstone(c, done, "c1", 3, 2) == Outcome::committed);
  CHECK(*evidence(c, done) == Evidence::committed);
  // ROLLBACK/COMMIT PREPARED of the tombstoned gid answer aborted, never committed.
  CHECK(*commit_prepared(c, late) == Outcome::aborted);
  CHECK(*rollback_prepared(c, late) == Outcome::aborted);
}

TEST_CASE("list_prepared sees only this agent's branches in this database") {
  PgCluster* cluster = shared_cluster();
  TestDb db(cluster);
  TestDb other(cluster);
  for (TestDb* d : {&db, &other}) exec_ok(*d->conn, "CREATE TABLE t(v int)");

  // "a_1" would match "ab1" under LIKE ('_' is a wildcard); "a_10" shares the prefix "a_1".
  struct Branch {
    TestDb* db;
    std::string agent;
    std::string gid;
  };
  std::vector<Branch> branches = {
      {&db, "a_1", "c1-3-1"},  {&db, "a_1", "c1-3-2"},    {&db, "ab1", "c1-3-3"},
      {&db, "a_10", "c1-3-4"}, {&other, "a_1", "c1-3-5"},
  };
  int seq = 0;
  for (const Branch& b : branches) {
    auto conn = b.db->connect();
    begin_writing(*conn, ++seq);
    CHECK(prepare_ok(*conn, pg_gid(b.agent, b.gid), seq).vote == Vote::yes);
  }

  auto mine = list_prepared(*db.conn, "a_1");
  REQUIRE_MESSAGE(mine.ok(), mine.status().to_string());
  std::vector<std::string> gids;
  for (const PreparedXact& x : *mine) {
    gids.push_back(*global_gid("a_1", x.pg_gid));
    CHECK(x.prepared_age_ms >= 0);
    CHECK(x.prepared_age_ms < 600'000);
  }
  std::sort(gids.begin(), gids.end());
  CHECK(gids == std::vector<std::string>{"c1-3-1", "c1-3-2"});
  CHECK(list_prepared(*db.conn, "ab1")->size() == 1);
  CHECK(list_prepared(*db.conn, "a_10")->size() == 1);
  CHECK(list_prepared(*db.conn, "nobody")->empty());
  CHECK(list_prepared(*other.conn, "a_1")->size() == 1);
  CHECK(list_prepared(*other.conn, "ab1")->empty());

  for (const Branch& b : branches) {
    CHECK(*rollback_prepared(*b.db->conn, pg_gid(b.agent, b.gid)) == Outcome::aborted);
  }
  CHECK(db.prepared_here() == 0);
  CHECK(other.prepared_here() == 0);
}

TEST_CASE("a prepared branch survives a server crash; a broken session answers unavailable") {
  PgCluster* cluster = shared_cluster();
  TestDb db(cluster);
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string gid = pg_gid("a1", "c1-4-1");
  begin_writing(c, 5);
  CHECK(prepare_ok(c, gid).vote == Vote::yes);

  auto open_block = db.connect();
  begin_writing(*open_block, 6);

  REQUIRE(cluster->stop(/*immediate=*/true).ok());

  // Every call on a session whose server is gone is unavailable, never a crash or a vote.
  ExecResult gone = c.exec("SELECT 1");
  CHECK(gone.status.code() == Code::unavailable);
  CHECK(!c.usable());
  CHECK(!c.in_transaction());
  CHECK(c.exec("SELECT 1").status.code() == Code::unavailable);
  CHECK(commit_prepared(c, gid).status().code() == Code::unavailable);
  CHECK(evidence(c, gid).status().code() == Code::unavailable);
  CHECK(list_prepared(c, "a1").status().code() == Code::unavailable);
  auto lost_vote = prepare(*open_block, pg_gid("a1", "c1-4-2"), "c1", 4, 2);
  CHECK(lost_vote.status().code() == Code::unavailable);
  std::string reason;
  CHECK(
      commit_one_phase(*open_block, pg_gid("a1", "c1-4-3"), "c1", 4, 3, &reason).status().code() ==
      Code::unavailable);
  auto refused = PgConn::connect(ConnectOptions{db.conninfo});
  CHECK(refused.status().code() == Code::unavailable);

  Status started = cluster->start();
  REQUIRE_MESSAGE(started.ok(), started.to_string());
  auto fresh = db.connect();
  auto listed = list_prepared(*fresh, "a1");
  REQUIRE(listed.ok());
  REQUIRE(listed->size() == 1);
  CHECK((*listed)[0].pg_gid == gid);
  CHECK(*evidence(*fresh, gid) == Evidence::prepared);
  CHECK(*commit_prepared(*fresh, gid) == Outcome::committed);
  CHECK(db.value("SELECT string_agg(v::text, ',') FROM t") == "5");
  CHECK(db.marker(gid));
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("purge_markers deletes only markers of that coordinator below the watermark") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  db.sql(
      "INSERT INTO tpc_marker(pg_gid, coordinator, epoch, seq) VALUES"
      " ('g1', 'c1', 1, 5), ('g2', 'c1', 1, 9), ('g3', 'c1', 2, 1), ('g4', 'c1', 2, 3),"
      " ('g5', 'c1', 3, 0), ('g6', 'c2', 1, 1), ('g7', 'c_', 1, 1)");
  auto first = purge_markers(c, "c1", 2, 3, 100);
  REQUIRE_MESSAGE(first.ok(), first.status().to_string());
  CHECK(*first == 3);  // g1, g2, g3; g4 is the watermark itself
  CHECK(db.value("SELECT string_agg(pg_gid, ',' ORDER BY pg_gid) FROM tpc_marker") ==
        "g4,g5,g6,g7");
  CHECK(*purge_markers(c, "c1", 2, 3, 100) == 0);

  // At most `limit` per call.
  CHECK(*purge_markers(c, "c1", 9, 0, 1) == 1);
  CHECK(*purge_markers(c, "c1", 9, 0, 1) == 1);
  CHECK(*purge_markers(c, "c1", 9, 0, 1) == 0);
  CHECK(db.value("SELECT string_agg(pg_gid, ',' ORDER BY pg_gid) FROM tpc_marker") == "g6,g7");
  CHECK(purge_markers(c, "c1", 9, 0, 0).status().code() == Code::invalid_argument);
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("agent state is upserted, read back and deleted") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  const std::string gid = pg_gid("a1", "c1-5-1");
  auto none = get_state(c, gid);
  REQUIRE(none.ok());
  CHECK(!none->has_value());
  REQUIRE(put_state(c, gid, "precommitted", "").ok());
  CHECK(*get_state(c, gid) == std::optional<std::string>("precommitted"));
  REQUIRE(put_state(c, gid, "heuristic_commit", "operator alice").ok());
  CHECK(*get_state(c, gid) == std::optional<std::string>("heuristic_commit"));
  CHECK(db.value("SELECT detail FROM tpc_agent_state") == "operator alice");
  CHECK(db.value("SELECT count(*) FROM tpc_agent_state") == "1");
  REQUIRE(delete_state(c, gid).ok());
  CHECK(!get_state(c, gid)->has_value());
  CHECK(delete_state(c, gid).ok());  // deleting what is gone is fine

  REQUIRE(begin(c).ok());  // put_state is its own transaction: refused inside a block
  CHECK(!put_state(c, gid, "x", "").ok());
  REQUIRE(rollback(c).ok());
  CHECK(db.prepared_here() == 0);
}

TEST_CASE("decided states list this agent's local decisions whose transaction is not prepared") {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  const std::string settled = pg_gid("a1", "c1-7-1"), pending = pg_gid("a1", "c1-7-2");
  // Other agents' rows are not this agent's, whatever their names share.
  const std::string three = pg_gid("a1", "c1-7-3"), other = pg_gid("a1_x", "c1-7-4");
  const std::string like = pg_gid("a", "c1-7-5");
  REQUIRE(put_state(c, settled, "mismatch_commit", "resolved by an operator").ok());
  REQUIRE(put_state(c, three, "prepared3", "[]").ok());
  REQUIRE(put_state(c, other, "reported_abort", "").ok());
  REQUIRE(put_state(c, like, "reported_abort", "").ok());
  // Recorded, still prepared: the scan of prepared transactions handles it, not this list.
  begin_writing(c, 1);
  REQUIRE(put_state(*db.connect(), pending, "heuristic_commit", "").ok());
  REQUIRE(prepare_ok(c, pending, 1).vote == Vote::yes);

  auto rows = list_decided_states(c, "a1");
  REQUIRE_MESSAGE(rows.ok(), rows.status().to_string());
  REQUIRE(rows->size() == 1);
  CHECK((*rows)[0].pg_gid == settled);
  CHECK((*rows)[0].state.state == "mismatch_commit");
  CHECK((*rows)[0].state.detail == "resolved by an operator");
  REQUIRE(rollback_prepared(c, pending).ok());
  CHECK(list_decided_states(c, "a1")->size() == 2);
  CHECK(db.prepared_here() == 0);
}

// Not run by default (--no-skip runs it): prints the time of prepare + commit_prepared.
TEST_CASE("timing of a prepare and commit_prepared round" * doctest::skip()) {
  TestDb db(shared_cluster());
  PgConn& c = *db.conn;
  exec_ok(c, "CREATE TABLE t(v int)");
  constexpr int kRounds = 200;
  auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < kRounds; ++i) {
    const std::string gid = pg_gid("a1", "c1-6-" + std::to_string(i));
    begin_writing(c, i);
    REQUIRE(prepare_ok(c, gid, i).vote == Vote::yes);
    REQUIRE(*commit_prepared(c, gid) == Outcome::committed);
  }
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                                  started)
                .count();
  MESSAGE("BEGIN+INSERT+prepare+commit_prepared: " << us / kRounds << " us per round");
  CHECK(db.prepared_here() == 0);
}

}  // namespace tpc::pg
