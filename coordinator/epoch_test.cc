// Tests of the coordinator epoch: unique across starts without trusting the clock, and
// growing across restarts of the same decision log.
#include <doctest/doctest.h>

#include <set>

#include "coordinator/service.h"
#include "wal/decision_log.h"

namespace tpc::coord {
namespace {

uint64_t start_epoch(std::unique_ptr<wal::DecisionLog> log) {
  MemorySink sink;
  Logger logger(&sink);
  CoordinatorConfig cfg;
  cfg.http.host = "127.0.0.1";
  cfg.http.port = 0;
  auto s = CoordinatorService::start(cfg, std::move(log), logger);
  REQUIRE_MESSAGE(s.ok(), s.status().to_string());
  const uint64_t epoch = (*s)->epoch();
  (*s)->shutdown(0);
  return epoch;
}

TEST_CASE("two starts on fresh logs in the same wall second get different epochs") {
  // Back to back: almost always the same second, where max(previous+1, wall seconds) repeats.
  const uint64_t a = start_epoch(std::make_unique<wal::MemoryLog>());
  const uint64_t b = start_epoch(std::make_unique<wal::MemoryLog>());
  CHECK(a != b);
}

TEST_CASE("the epoch is the wall second in the high bits and the random draw in the low bits") {
  CHECK(next_epoch(0, 1'800'000'000, 5) == (uint64_t{1'800'000'000} << kEpochRandomBits) + 5);
  CHECK(next_epoch(0, 1'800'000'000, 6) != next_epoch(0, 1'800'000'000, 5));
  // Only kEpochRandomBits of the draw are used.
  CHECK(next_epoch(0, 7, ~uint64_t{0}) == (uint64_t{8} << kEpochRandomBits) - 1);
  // Within JSON's exact integers and 16 decimal digits below 2^33 seconds (year 2242).
  CHECK(next_epoch(0, (uint64_t{1} << 33) - 1, ~uint64_t{0}) < (uint64_t{1} << 53));
  CHECK(std::to_string(next_epoch(0, (uint64_t{1} << 33) - 1, ~uint64_t{0})).size() <= 16);
}

TEST_CASE("the epoch grows at every start of the same log, whatever the clock and the draw") {
  uint64_t previous = 0;
  for (uint64_t random : {~uint64_t{0}, uint64_t{0}, uint64_t{12345}, ~uint64_t{0}, uint64_t{0}}) {
    const uint64_t e = next_epoch(previous, 1'800'000'000, random);  // the clock stands still
    CHECK(e > previous);
    previous = e;
  }
  // A clock gone back does not make it fall.
  CHECK(next_epoch(previous, 1'000, 0) > previous);
  // An epoch of the earlier formula (plain wall seconds) is followed by a larger one.
  CHECK(next_epoch(1'800'000'000, 1'800'000'000, 0) > 1'800'000'000);
}

}  // namespace
}  // namespace tpc::coord
