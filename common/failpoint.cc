#include "common/failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <charconv>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

namespace tpc::failpoint {
namespace {

enum class Kind { off, crash, sleep, error, pause };

struct Point {
  Kind kind = Kind::off;
  int64_t sleep_ms = 0;
  int64_t remaining = -1;  // -1: unlimited
  int percent = 100;
  uint64_t fired = 0;
  std::string action;  // as written, for the log line
};

struct Registry {
  std::mutex mu;
  std::condition_variable reconfigured;  // wakes paused threads
  uint64_t generation = 0;               // configure() calls so far
  std::map<std::string, Point, std::less<>> points;
  std::mt19937_64 rng{1};
  Logger* log = nullptr;
};

std::atomic<bool> g_any{false};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: failpoints may fire during exit
  return *r;
}

std::optional<int64_t> parse_int(std::string_view s) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size() || v < 0) return std::nullopt;
  return v;
}

Result<Point> parse_action(std::string_view a) {
  Point p;
  p.action = std::string(a);
  if (size_t star = a.find('*'); star != std::string_view::npos) {
    auto n = parse_int(a.substr(0, star));
    if (!n) return invalid_argument("bad count in failpoint action \"" + p.action + "\"");
    p.remaining = *n;
    a = a.substr(star + 1);
  }
  if (size_t pct = a.find('%'); pct != std::string_view::npos) {
    auto n = parse_int(a.substr(0, pct));
    if (!n || *n > 100) return invalid_argument("bad probability in failpoint action \"" + p.action + "\"");
    p.percent = static_cast<int>(*n);
    a = a.substr(pct + 1);
  }
  if (a == "crash") {
    p.kind = Kind::crash;
  } else if (a == "error") {
    p.kind = Kind::error;
  } else if (a == "pause") {
    p.kind = Kind::pause;
  } else if (a == "off") {
    p.kind = Kind::off;
  } else if (a.substr(0, 6) == "sleep(" && a.size() > 7 && a.back() == ')') {
    auto ms = parse_int(a.substr(6, a.size() - 7));
    if (!ms) return invalid_argument("bad sleep in failpoint action \"" + p.action + "\"");
    p.kind = Kind::sleep;
    p.sleep_ms = *ms;
  } else {
    return invalid_argument("unknown failpoint action \"" + p.action +
                            "\" (crash, sleep(MS), pause, error, off; with N* or P%)");
  }
  return p;
}

}  // namespace

bool compiled_in() {
#ifdef TPC_FAILPOINTS
  return true;
#else
  return false;
#endif
}

Status configure(std::string_view spec, Logger* log, uint64_t seed) {
  std::map<std::string, Point, std::less<>> points;
  while (!spec.empty()) {
    size_t semi = spec.find(';');
    std::string_view item = spec.substr(0, semi);
    spec = semi == std::string_view::npos ? std::string_view() : spec.substr(semi + 1);
    if (item.empty()) continue;
    size_t eq = item.find('=');
    if (eq == std::string_view::npos || eq == 0)
      return invalid_argument("FAILPOINTS item \"" + std::string(item) + "\" is not name=action");
    auto p = parse_action(item.substr(eq + 1));
    if (!p.ok()) return p.status();
    points[std::string(item.substr(0, eq))] = std::move(*p);
  }
  if (!points.empty() && !compiled_in())
    return invalid_argument("FAILPOINTS is set but failpoints are not compiled in (build with -DTPC_FAILPOINTS=ON)");
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  r.points = std::move(points);
  r.rng.seed(seed);
  r.log = log;
  r.generation++;
  r.reconfigured.notify_all();
  g_any.store(!r.points.empty(), std::memory_order_release);
  return ok_status();
}

bool eval(const char* name) {
  if (!g_any.load(std::memory_order_acquire)) return false;
  Registry& r = registry();
  Kind kind;
  int64_t sleep_ms;
  {
    std::unique_lock lock(r.mu);
    auto it = r.points.find(std::string_view(name));
    if (it == r.points.end()) return false;
    Point& p = it->second;
    if (p.kind == Kind::off || p.remaining == 0) return false;
    if (p.percent < 100 && static_cast<int>(r.rng() % 100) >= p.percent) return false;
    if (p.remaining > 0) --p.remaining;
    ++p.fired;
    kind = p.kind;
    sleep_ms = p.sleep_ms;
    if (r.log) r.log->warn("failpoint fired", {{"name", name}, {"action", p.action}});
    if (kind == Kind::pause) {
      uint64_t gen = r.generation;
      r.reconfigured.wait_for(lock, std::chrono::milliseconds(kPauseMaxMs), [&] { return r.generation != gen; });
      return false;
    }
  }
  switch (kind) {
    case Kind::crash:
      ::kill(::getpid(), SIGKILL);
      ::_exit(137);
    case Kind::sleep:
      std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
      return false;
    case Kind::error:
      return true;
    case Kind::pause:
    case Kind::off:
      return false;
  }
  return false;
}

uint64_t fired(std::string_view name) {
  Registry& r = registry();
  std::lock_guard lock(r.mu);
  auto it = r.points.find(name);
  return it == r.points.end() ? 0 : it->second.fired;
}

}  // namespace tpc::failpoint
