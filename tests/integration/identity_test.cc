// The agent's start-up checks against real PostgreSQL: the identity row saying whose records a
// database holds, prepared transactions of another agent, missing privileges, and a
// max_prepared_transactions below --branches-max.
#include <doctest/doctest.h>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

constexpr int64_t kExitWaitMs = 20'000;  // an agent that refuses exits right after connecting

std::unique_ptr<Process> spawn_agent(const std::string& dir, const std::string& name,
                                     const std::string& conninfo,
                                     const std::string& coordinator_url,
                                     std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = {bin_dir() + "/tpc-agent",
                                   "--listen",
                                   "127.0.0.1:" + std::to_string(free_port()),
                                   "--name",
                                   name,
                                   "--pg",
                                   conninfo,
                                   "--coordinator",
                                   "c1=" + coordinator_url};
  for (auto& a : extra) argv.push_back(a);
  auto p = Process::spawn(argv, dir + "/agent-" + name + ".log");
  REQUIRE_MESSAGE(p.ok(), p.status().to_string());
  return std::move(*p);
}

// Waits for a refused start: a non-zero exit and `needle` in its log.
void expect_refused(Process& p, const std::string& needle) {
  int code = p.wait(kExitWaitMs);
  std::string log = read_file(p.log_path());
  INFO(log);
  CHECK(code > 0);
  CHECK(code < 128);  // an exit, not a signal
  CHECK(log.find(needle) != std::string::npos);
}

std::optional<std::string> value(const std::string& conninfo, const std::string& sql) {
  auto v = query_value(conninfo, sql);
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return *v;
}

}  // namespace

TEST_CASE(
    "an agent records its identity at first start and refuses a database recorded for another "
    "name") {
  Testbed& t = Testbed::fresh();
  std::string db = t.conninfo(1);
  CHECK(value(db, "SELECT agent FROM tpc_agent_identity") == std::optional<std::string>("a1"));
  CHECK(value(db, "SELECT database = current_database() FROM tpc_agent_identity") ==
        std::optional<std::string>("t"));
  CHECK(value(db, "SELECT system_identifier FROM tpc_agent_identity") ==
        value(db, "SELECT system_identifier::text FROM pg_control_system()"));

  t.stop_agent(1);
  auto other = spawn_agent(t.dir(), "a2", db, t.coordinator_url().to_string());
  expect_refused(*other, "the database belongs to agent a1 (tpc_agent_identity), not to --name a2");
  CHECK(value(db, "SELECT agent FROM tpc_agent_identity") == std::optional<std::string>("a1"));

  t.start_agent(1);  // the right name still starts
  t.check_invariants();
}

TEST_CASE("an agent refuses a database holding another agent's prepared branch") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.before_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);
  CHECK_FALSE(t.commit(gid).transport.ok());  // both branches prepared, then the coordinator died
  REQUIRE(t.coordinator_process().wait(kExitWaitMs) >= 0);
  REQUIRE(t.prepared(1) == 1);
  t.stop_agent(1);

  // Without its identity row (a database set up before the row existed) the prepared
  // transaction's gid alone says whose database this is.
  std::string db = t.conninfo(1);
  REQUIRE(query(db, "DELETE FROM tpc_agent_identity").ok());
  auto other = spawn_agent(t.dir(), "a2", db, t.coordinator_url().to_string());
  expect_refused(*other, "the database holds prepared transactions of agent a1, not of --name a2");
  CHECK(value(db, "SELECT count(*) FROM tpc_agent_identity") == std::optional<std::string>("0"));
  CHECK(t.prepared(1) == 1);

  t.start_agent(1);
  t.start_coordinator();
  CHECK(t.wait_state(gid, "aborted"));  // presumed abort, answered to the right agent
  t.check_invariants();
}

TEST_CASE("an agent whose role lacks CREATE on the schema refuses and names the privilege") {
  Testbed& t = Testbed::fresh();
  REQUIRE(t.pg(1).create_database("tpc_limited").ok());
  std::string admin = t.pg(1).conninfo("tpc_limited");
  REQUIRE(query(admin, "CREATE ROLE tpc_limited LOGIN").ok());
  // The PostgreSQL 15 default, stated so the test does not depend on the server version.
  REQUIRE(query(admin, "REVOKE CREATE ON SCHEMA public FROM PUBLIC").ok());
  std::string limited = admin;
  size_t at = limited.find("user=tpc ");
  REQUIRE(at != std::string::npos);
  limited.replace(at, 9, "user=tpc_limited ");

  auto agent = spawn_agent(t.dir(), "lim", limited, t.coordinator_url().to_string());
  expect_refused(*agent, "the PostgreSQL role lacks CREATE on schema public (to create tpc_marker");
  CHECK(value(admin, "SELECT to_regclass('tpc_marker') IS NULL") ==
        std::optional<std::string>("t"));

  // With the tables created by their owner but no rights on them, each missing right is named.
  REQUIRE(query(admin,
                "CREATE TABLE tpc_marker (pg_gid text PRIMARY KEY, coordinator text, epoch bigint, "
                "seq bigint, created_at timestamptz DEFAULT now(), aborted boolean NOT NULL "
                "DEFAULT false)")
              .ok());
  REQUIRE(query(admin, "GRANT SELECT, INSERT ON tpc_marker TO tpc_limited").ok());
  auto again = spawn_agent(t.dir(), "lim", limited, t.coordinator_url().to_string());
  expect_refused(*again,
                 "lacks DELETE on tpc_marker, CREATE on schema public (to create tpc_agent_state");
  t.check_invariants();
}

TEST_CASE("max_prepared_transactions below --branches-max is a warning, not a refusal") {
  PgCluster::Options po;
  po.max_prepared_transactions = 2;
  auto pg = PgCluster::create(po);
  REQUIRE_MESSAGE(pg.ok(), pg.status().to_string());
  std::string dir = make_temp_dir("tpc-identity");
  auto agent =
      spawn_agent(dir, "small", (*pg)->conninfo(), "http://127.0.0.1:1", {"--branches-max", "8"});
  bool warned = eventually(
      [&] {
        std::string log = read_file(agent->log_path());
        return log.find("agent started") != std::string::npos || !agent->running();
      },
      kExitWaitMs);
  std::string log = read_file(agent->log_path());
  INFO(log);
  CHECK(warned);
  CHECK(agent->running());
  CHECK(log.find("WARN max_prepared_transactions is below --branches-max") != std::string::npos);
  CHECK(log.find("max_prepared_transactions=2 branches_max=8") != std::string::npos);
  agent.reset();
  remove_tree(dir);
}
