// The coordinator's timers and retention follow the monotonic clock: a step of the wall clock
// (here made with libfaketime, stepping only the process's wall clock) neither stretches a
// timeout nor fires one early, and never lets compaction forget an outcome younger than
// --retention-ms.
#include <doctest/doctest.h>

#include <chrono>
#include <fstream>
#include <thread>

#include <unistd.h>

#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

constexpr char kFakeTimeLib[] = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

// The coordinator reads its wall-clock offset from this file on every clock call.
struct FakeWallClock {
  std::string path = "/tmp/tpc-faketime-" + std::to_string(getpid());
  FakeWallClock() {
    REQUIRE_MESSAGE(std::ifstream(kFakeTimeLib).good(), "libfaketime is not installed");
    step("+0");
  }
  ~FakeWallClock() { std::remove(path.c_str()); }
  void step(const std::string& offset) {
    std::ofstream(path, std::ios::trunc) << offset << "\n";
  }
  std::vector<std::string> env() const {
    return {std::string("LD_PRELOAD=") + kFakeTimeLib, "FAKETIME_TIMESTAMP_FILE=" + path,
            "FAKETIME_NO_CACHE=1", "FAKETIME_DONT_FAKE_MONOTONIC=1"};
  }
};

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double metric(Testbed& t, const std::string& name) {
  return t.coord("GET", "/metrics").metric(name);
}

}  // namespace

TEST_CASE("a backward step of the wall clock does not stretch a transaction timeout") {
  FakeWallClock clock;
  Testbed& s = Testbed::fresh(Testbed::Options{.coordinator_env = clock.env()});
  Http b = s.coord("POST", "/v1/transactions", R"({"timeout_ms":2000})");
  REQUIRE_MESSAGE(b.status == 201, b.describe());
  std::string gid = b.body["gid"];
  REQUIRE(s.move(0, gid, 1, -5).status == 200);
  int64_t started = steady_ms();
  clock.step("-3600");  // one hour back
  INFO(s.logs());
  CHECK(s.wait_state(gid, "aborted", 15'000));
  CHECK(steady_ms() - started < 8'000);
  s.check_invariants();
  CHECK(s.balance(0, 1) == 1000);
}

TEST_CASE("a forward step of the wall clock aborts nothing and forgets nothing") {
  FakeWallClock clock;
  Testbed& s = Testbed::fresh(Testbed::Options{
      .coordinator_args = {"--retention-ms", "60000", "--compaction-interval-ms", "100"},
      .coordinator_env = clock.env()});
  // A committed transfer whose record ends now...
  std::string done = s.begin();
  REQUIRE(s.move(0, done, 1, -10).status == 200);
  REQUIRE(s.move(1, done, 1, 10).status == 200);
  REQUIRE(s.commit(done).state() == "committed");
  // ...and a transaction still open, 30 s before its timeout (the restart below aborts it).
  Http b = s.coord("POST", "/v1/transactions", R"({"timeout_ms":30000})");
  REQUIRE(b.status == 201);
  std::string open = b.body["gid"];
  REQUIRE(s.move(0, open, 2, -1).status == 200);
  REQUIRE(s.move(1, open, 2, 1).status == 200);

  clock.step("+2d");
  // Let compaction read the log a few times past the step (it would erase the record then).
  double passes = metric(s, "tpc_coordinator_compaction_passes_total");
  bool compacted = false;
  for (int64_t until = steady_ms() + 10'000; steady_ms() < until;) {
    if (metric(s, "tpc_coordinator_compaction_passes_total") >= passes + 3) {
      compacted = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  INFO(s.logs());
  REQUIRE(compacted);
  CHECK(s.get(open).state() == "active");
  // The log still holds the outcome: a restart (with the wall clock back) answers it from there.
  clock.step("+0");
  s.stop_coordinator(SIGKILL);
  s.start_coordinator();
  Http g = s.get(done);
  CHECK(g.state() == "committed");
  CHECK_FALSE(g.body.value("forgotten", false));
  s.check_invariants();
}
