// Liveness: nothing stays stuck. A distributed deadlock (two transfers locking rows of two
// databases in opposite orders, which neither PostgreSQL can see) is broken by an abort that
// cancels the blocked statement, or by lock_timeout; branches a restarted coordinator forgot
// are rolled back as soon as the agent learns of the restart.
#include <doctest/doctest.h>

#include <future>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// T1 locks bank a's account 1 then waits for bank b's account 1; T2 the other way round.
struct Deadlock {
  std::string t1, t2;
  std::future<Http> t1_blocked, t2_blocked;
};

Deadlock make_deadlock(Testbed& t) {
  Deadlock d;
  d.t1 = t.begin();
  d.t2 = t.begin();
  REQUIRE(t.move(0, d.t1, 1, -10).status == 200);
  REQUIRE(t.move(1, d.t2, 1, -10).status == 200);
  d.t1_blocked = std::async(std::launch::async, [&t, gid = d.t1] { return t.move(1, gid, 1, 10); });
  // Wait until T1 really waits on T2's row lock before T2 closes the cycle.
  auto waiting = [&t](int bank) {
    auto v = query_value(t.conninfo(bank),
                         "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                         "AND application_name LIKE 'tpc-agent%'");
    return v.ok() && v->value_or("0") == "1";
  };
  REQUIRE(eventually([&] { return waiting(1); }, 10'000));
  d.t2_blocked = std::async(std::launch::async, [&t, gid = d.t2] { return t.move(0, gid, 1, 10); });
  REQUIRE(eventually([&] { return waiting(0); }, 10'000));
  return d;
}

}  // namespace

TEST_CASE("aborting one side of a distributed deadlock cancels its blocked statement") {
  Testbed::Options o;
  o.agent_args = {"--lock-timeout-ms", "0"};
  Testbed& t = Testbed::fresh(o);
  Deadlock d = make_deadlock(t);
  Http ab = t.abort(d.t1);
  INFO(t.logs());
  CHECK_MESSAGE(ab.status == 200, ab.describe());
  Http r1 = d.t1_blocked.get();
  CHECK_MESSAGE(r1.status == 422, r1.describe());
  CHECK(r1.body["error"]["sqlstate"] == "57014");
  Http r2 = d.t2_blocked.get();
  CHECK_MESSAGE(r2.status == 200, r2.describe());
  Http c = t.commit(d.t2);
  CHECK_MESSAGE(c.status == 200, c.describe());
  CHECK(t.balance(0, 1) == 1010);
  CHECK(t.balance(1, 1) == 990);
  CHECK(t.wait_log(t.agent_process(1), "cancelling the running statement"));
  t.check_invariants();
}

TEST_CASE("lock_timeout breaks a distributed deadlock nobody aborts") {
  Testbed::Options o;
  o.agent_args = {"--lock-timeout-ms", "1000"};
  Testbed& t = Testbed::fresh(o);
  Deadlock d = make_deadlock(t);
  Http r1 = d.t1_blocked.get();
  Http r2 = d.t2_blocked.get();
  INFO(t.logs());
  // At least one side timed out on its lock (55P03); the other may then have gone through.
  int timed_out = (r1.status == 422) + (r2.status == 422);
  CHECK(timed_out >= 1);
  for (const Http* r : {&r1, &r2})
    if (r->status == 422) CHECK(r->body["error"]["sqlstate"] == "55P03");
  t.abort(d.t1);
  t.abort(d.t2);
  t.check_invariants();
  CHECK(t.balance(0, 1) == 1000);
}

TEST_CASE("an open branch the restarted coordinator forgot is rolled back when the agent learns of the restart") {
  Testbed& t = Testbed::fresh();
  std::string old = t.begin();
  REQUIRE(t.move(0, old, 1, -10).status == 200);  // holds bank a's account 1
  t.stop_coordinator();
  t.start_coordinator();
  std::string fresh = t.begin();
  // The first request of the new epoch tells agent 0 the coordinator restarted.
  Http r = t.move(0, fresh, 1, -20);  // would wait 60 s for the old lock otherwise
  INFO(t.logs());
  CHECK_MESSAGE(r.status == 200, r.describe());
  CHECK(t.wait_log(t.agent_process(0), "rolling back a branch of an earlier coordinator epoch"));
  CHECK(eventually([&] { return t.agent(0, "GET", "/v1/branches/" + old).state() == "aborted"; },
                   10'000));
  REQUIRE(t.move(1, fresh, 1, 20).status == 200);
  REQUIRE(t.commit(fresh).status == 200);
  CHECK(t.balance(0, 1) == 980);
  t.check_invariants();
}
