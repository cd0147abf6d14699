// Unit tests of the outbox relay's rules (outbox_relay.h): per-key order, keyless rows in
// parallel, the in-flight bound, backoff, dead rows, single-flight scans, stale scan copies.
#include "participant/outbox_relay.h"

#include <doctest/doctest.h>

#include <algorithm>

using namespace tpc::agent;

namespace {

OutboxRow row(int64_t id, std::optional<std::string> key, uint32_t attempts = 0) {
  return OutboxRow{id, std::move(key), R"({"url":"http://d:1/"})", "{}", attempts};
}

std::vector<int64_t> ids(const std::vector<OutboxDelivery>& d) {
  std::vector<int64_t> out;
  for (auto& x : d) out.push_back(x.id);
  return out;
}

struct Relay {
  OutboxOptions opts;
  OutboxRelay r;
  int64_t now = 1'000;
  explicit Relay(OutboxOptions o = {}) : opts(o), r(o) {}

  OutboxReady scan(std::vector<OutboxRow> rows) {
    r.wake(now);
    OutboxReady asked = r.take_ready();
    REQUIRE(asked.scan);
    r.on_scanned(std::move(rows), now);
    return r.take_ready();
  }
  OutboxMark deliver(int64_t id, bool ok, int64_t retry_after_ms = 0) {
    r.on_delivered(id, ok, ok ? "" : "HTTP 503", retry_after_ms, now);
    OutboxReady m = r.take_ready();
    REQUIRE(m.marks.size() == 1);
    return m.marks[0];
  }
};

}  // namespace

TEST_CASE("one message per key at a time; keyless rows in parallel") {
  Relay t;
  // The store returns only the head of each key; the relay also refuses a second of a key.
  OutboxReady d = t.scan({row(1, "order-7"), row(2, std::nullopt), row(3, std::nullopt),
                          row(4, "order-7"), row(5, "order-8")});
  CHECK(ids(d.deliveries) == std::vector<int64_t>{1, 2, 3, 5});
  CHECK(d.deliveries[0].attempt == 1);
  // order-7's next goes only once 1's mark is written.
  CHECK(t.deliver(1, true).kind == MarkKind::delivered);
  t.r.wake(t.now);
  OutboxReady asked = t.r.take_ready();
  REQUIRE(asked.scan);
  t.r.on_scanned({row(4, "order-7")}, t.now);
  CHECK(t.r.take_ready().deliveries.empty());  // 1's mark not written yet
  t.r.on_marked(1, true, t.now);
  OutboxReady next = t.r.take_ready();
  REQUIRE(next.scan);  // a free key asks for a scan
  t.r.on_scanned({row(4, "order-7")}, t.now);
  CHECK(ids(t.r.take_ready().deliveries) == std::vector<int64_t>{4});
}

TEST_CASE("a failed delivery is retried with capped backoff, at least Retry-After, then dead") {
  OutboxOptions o;
  o.attempts_max = 4;
  o.retry_min_ms = 100;
  o.retry_max_ms = 250;
  Relay t(o);
  t.scan({row(1, "k")});
  OutboxMark m = t.deliver(1, false);
  CHECK(m.kind == MarkKind::retry);
  CHECK(m.attempts == 1);
  CHECK(m.retry_in_ms == 100);
  CHECK(m.error == "HTTP 503");
  t.r.on_marked(1, true, t.now);
  t.r.take_ready();
  t.r.on_scanned({}, t.now);
  CHECK(t.scan({row(1, "k", 1)}).deliveries[0].attempt == 2);
  CHECK(t.deliver(1, false).retry_in_ms == 200);
  t.r.on_marked(1, true, t.now);
  t.r.take_ready();
  t.r.on_scanned({}, t.now);
  t.scan({row(1, "k", 2)});
  CHECK(t.deliver(1, false, 10'000).retry_in_ms == 250);  // capped, Retry-After too
  t.r.on_marked(1, true, t.now);
  t.r.take_ready();
  t.r.on_scanned({}, t.now);
  t.scan({row(1, "k", 3)});
  OutboxMark dead = t.deliver(1, false);
  CHECK(dead.kind == MarkKind::dead);
  CHECK(dead.attempts == 4);
  CHECK(t.r.counters().dead == 1);
  CHECK(t.r.counters().failed == 4);
}

TEST_CASE("one scan at a time: a wake-up during a scan asks for one more after it") {
  Relay t;
  t.r.wake(t.now);
  CHECK(t.r.take_ready().scan);
  t.r.wake(t.now);
  CHECK_FALSE(t.r.take_ready().scan);
  t.r.on_scanned({}, t.now);
  CHECK(t.r.take_ready().scan);
  t.r.on_scan_failed(t.now);
  // Polling: a tick before poll_ms asks nothing; at poll_ms it scans.
  t.r.tick(t.now + t.opts.poll_ms - 1);
  CHECK_FALSE(t.r.take_ready().scan);
  t.r.tick(t.now + t.opts.poll_ms);
  CHECK(t.r.take_ready().scan);
}

TEST_CASE("a scan's copy of a row marked while it ran is stale and not delivered again") {
  Relay t;
  t.scan({row(1, "k")});
  t.deliver(1, true);
  t.r.wake(t.now);  // a scan starts, reading row 1 before its mark is written
  REQUIRE(t.r.take_ready().scan);
  t.r.on_marked(1, true, t.now);
  t.r.take_ready();
  t.r.on_scanned({row(1, "k")}, t.now);
  CHECK(t.r.take_ready().deliveries.empty());
  CHECK(t.r.counters().attempts == 1);
}

TEST_CASE("in flight is bounded; a late or repeated answer changes nothing") {
  OutboxOptions o;
  o.in_flight_max = 2;
  Relay t(o);
  OutboxReady d = t.scan({row(1, std::nullopt), row(2, std::nullopt), row(3, std::nullopt)});
  CHECK(ids(d.deliveries) == std::vector<int64_t>{1, 2});
  t.r.wake(t.now);
  CHECK_FALSE(t.r.take_ready().scan);  // full: the next free slot asks
  t.deliver(1, true);
  t.r.on_delivered(1, false, "late", 0, t.now);  // already answered
  CHECK(t.r.take_ready().marks.empty());
  t.r.on_delivered(99, true, "", 0, t.now);  // not ours
  CHECK(t.r.take_ready().marks.empty());
  t.r.on_marked(1, false, t.now);  // not written: the row stays pending, found again
  CHECK(t.r.take_ready().scan);
  CHECK(t.r.in_flight() == 1);
}
