// Heuristic outcomes at the coordinator: a branch's report that it ended against the
// decision is recorded durably, listed in in-doubt and counted until an operator forgets it,
// across restarts; a true report corrects a false one.
#include <doctest/doctest.h>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

bool in_doubt_lists(Testbed& t, const std::string& gid) {
  Http r = t.coord("GET", "/v1/in-doubt");
  REQUIRE(r.status == 200);
  for (auto& tx : r.body["transactions"])
    if (tx["gid"] == gid) return true;
  return false;
}

double gauge(Testbed& t, const std::string& name) {
  return t.coord("GET", "/metrics").metric(name);
}

Http report_once(Testbed& t, const std::string& gid, const std::string& participant,
                 const std::string& state) {
  return t.coord("POST", "/v1/transactions/" + gid + "/heuristic",
                 dump(Json{{"participant", participant}, {"state", state}}));
}

// As an agent does: again while the coordinator says the transaction has not ended (its
// abort may still be going out to the branches).
Http report(Testbed& t, const std::string& gid, const std::string& participant, const std::string& state) {
  Http r;
  REQUIRE(eventually([&] {
    r = report_once(t, gid, participant, state);
    return r.status != 409;
  }, 10'000));
  return r;
}

}  // namespace

TEST_CASE("a branch committed against a presumed abort stays reported until forgotten") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -5).status == 200);
  REQUIRE(t.abort(gid).state() == "aborted");
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 0);

  Http r = report(t, gid, "a0", "committed");
  INFO(t.logs());
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  CHECK(r.state() == "heuristic_mixed");
  CHECK(t.get(gid).state() == "heuristic_mixed");
  CHECK(in_doubt_lists(t, gid));
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 1);
  CHECK(t.wait_log(t.coordinator_process(), "heuristic outcome: branches disagree"));

  // Durable: a crash and restart keep it listed, counted and answered.
  t.stop_coordinator(SIGKILL);
  t.start_coordinator();
  CHECK(in_doubt_lists(t, gid));
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 1);
  CHECK(t.get(gid).state() == "heuristic_mixed");

  // The operator forgets it: the outcome stays what the coordinator decided.
  Http f = t.coord("POST", "/v1/transactions/" + gid + "/forget");
  REQUIRE_MESSAGE(f.status == 200, f.describe());
  CHECK(f.state() == "aborted");
  CHECK_FALSE(in_doubt_lists(t, gid));
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 0);
  CHECK(t.coord("POST", "/v1/transactions/" + gid + "/forget").status == 409);
  t.stop_coordinator(SIGKILL);
  t.start_coordinator();
  CHECK_FALSE(in_doubt_lists(t, gid));
  CHECK(t.get(gid).state() == "aborted");
  t.check_invariants();
}

TEST_CASE("reports are refused while the transaction runs, for unknown gids and bad bodies") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  CHECK(report_once(t, gid, "a0", "committed").status == 409);
  CHECK(report(t, "c9-1-1", "a0", "committed").status == 404);
  CHECK(report(t, gid, "a0", "maybe").status == 400);
  CHECK(report(t, gid, "bad name", "aborted").status == 400);
  CHECK(t.coord("POST", "/v1/transactions/" + gid + "/heuristic", "{}").status == 400);
  REQUIRE(t.abort(gid).state() == "aborted");
  // An abort agrees with the presumption: nothing is recorded.
  Http r = report(t, gid, "a0", "aborted");
  CHECK(r.status == 200);
  CHECK(r.state() == "aborted");
  CHECK_FALSE(in_doubt_lists(t, gid));
  t.check_invariants();
}

TEST_CASE("a true report corrects a heuristic outcome a wrong answer caused") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -5).status == 200);
  REQUIRE(t.move(1, gid, 1, 5).status == 200);
  REQUIRE(t.commit(gid).state() == "committed");
  // A misdirected agent once claimed the branch aborted...
  Http wrong = report(t, gid, "a1", "aborted");
  REQUIRE_MESSAGE(wrong.status == 200, wrong.describe());
  CHECK(wrong.state() == "heuristic_mixed");
  CHECK(in_doubt_lists(t, gid));
  // ...and the right one says it committed.
  Http right = report(t, gid, "a1", "committed");
  REQUIRE(right.status == 200);
  CHECK(right.state() == "committed");
  CHECK_FALSE(in_doubt_lists(t, gid));
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 0);
  t.check_invariants();
  CHECK(t.balance(0, 1) == 995);
  CHECK(t.balance(1, 1) == 1005);
}

TEST_CASE("an agent started on the wrong database answers aborted; the right one corrects the coordinator") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  REQUIRE(t.pg(1).create_database("elsewhere").ok());
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -5).status == 200);
  REQUIRE(t.move(1, gid, 1, 5).status == 200);
  CHECK_FALSE(t.commit(gid).transport.ok());  // commit logged, then the coordinator died
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  // a1 comes back pointed at another database, where it cannot see its prepared branch.
  t.stop_agent(1, SIGKILL);
  t.start_agent(1, "", {"--pg", t.pg(1).conninfo("elsewhere")});
  t.start_coordinator();
  INFO(t.logs());
  REQUIRE(t.wait_state(gid, "heuristic_mixed"));
  CHECK(in_doubt_lists(t, gid));
  CHECK(t.prepared(1) == 1);  // the real branch still waits, prepared

  // The right agent returns: it commits the branch and tells the coordinator.
  t.stop_agent(1, SIGKILL);
  t.start_agent(1);
  CHECK(t.wait_log(t.agent_process(1), "reporting the true outcome"));
  CHECK(t.wait_state(gid, "committed"));
  CHECK_FALSE(in_doubt_lists(t, gid));
  CHECK(gauge(t, "tpc_coordinator_heuristic_outcomes") == 0);
  CHECK(t.balance(0, 1) == 995);
  CHECK(t.balance(1, 1) == 1005);
  t.check_invariants();
}
