// The seeded world the whole-system simulator runs in: one thread, virtual time, an event
// queue, processes that crash and restart, and a network between them that loses,
// duplicates, delays and reorders messages and can be partitioned. The real services run on
// it through SimRuntime (a Runtime, common/runtime.h) and SimLog (a DecisionLog over a
// MemoryLog that outlives the process, written late and in order, so that a crash loses
// what was not synced).
//
// Everything is a function of the seed: the same seed replays the same run, event for event.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

#include "common/http.h"
#include "common/http_client.h"
#include "common/rng.h"
#include "common/runtime.h"
#include "wal/decision_log.h"

namespace tpc::sim {

// What the network does to a message, while faults are on.
struct NetFaults {
  double loss = 0;       // a request or an answer vanishes (the sender times out)
  double duplicate = 0;  // an idempotent request arrives twice (the second answer is thrown away)
  int64_t delay_min_ms = 0;
  int64_t delay_max_ms = 3;  // independent per message: reorders
  double late = 0;           // a message arrives 0.5-5 s late (retransmitted after a stall)
};

// One process of the world. Its events carry its incarnation: a crash bumps it, and every
// event of an earlier incarnation is dropped (timers, answers, jobs, log writes in flight).
struct Process {
  std::string name;
  uint16_t port = 0;  // its URL is http://127.0.0.1:<port>
  bool up = true;
  uint64_t incarnation = 1;
  int64_t wall_offset_ms = 0;    // the process's wall clock minus the world's (clock jumps)
  int64_t anchor_ms = 0;         // its monotonic clock at start: its wall clock then
  int64_t started_ms = 0;        // the world's time at its start
  HttpHandler handler;           // empty: serves nothing (clients)
  // While faults are on, the chance that a job waits 2-12 s before it runs (for a connection,
  // behind a lock): jobs submitted later overtake it, as on a real worker pool.
  double job_stall = 0;
};

class World {
 public:
  explicit World(uint64_t seed);

  Rng& rng() { return rng_; }
  int64_t now() const { return now_; }

  int add_process(std::string name, uint16_t port);
  Process& process(int id) { return procs_[static_cast<size_t>(id)]; }
  size_t processes() const { return procs_.size(); }
  // The process is dead: its pending events are dropped, requests to it are refused.
  void crash(int id);
  // Back up with a fresh incarnation; its monotonic clock starts at its wall clock now.
  void restart(int id);

  // Runs fn at `when` as process `proc` (its current incarnation); proc < 0: the world's own
  // event, never dropped. Returns an id for cancel().
  uint64_t at(int64_t when, int proc, std::function<void()> fn);
  bool cancel(uint64_t id);
  // Runs the next event; false when none is left.
  bool step();
  // Runs events until the clock passes `until` (the clock then reads `until`).
  void run_until(int64_t until);
  uint64_t events_run() const { return events_run_; }

  // The network.
  NetFaults faults;
  bool faults_on = false;
  void cut(int a, int b) { cuts_.insert(ordered(a, b)); }
  void heal() { cuts_.clear(); }
  bool is_cut(int a, int b) const { return cuts_.count(ordered(a, b)) > 0; }
  void send(int from, const Url& url, HttpRequest req, SendOptions opts, std::function<void(HttpResult)> done);
  // Called for every request as it leaves `from` for `to` (checks that look at the wire).
  std::function<void(int from, int to, const HttpRequest&)> on_send;

  // The trace: the last events, kept for a failure report; printed as they happen when
  // `echo` is set (a replay).
  void note(const std::string& line);
  std::vector<std::string> trace_tail(size_t n) const;
  bool echo = false;

 private:
  struct Event {
    int64_t when;
    uint64_t seq;
    int proc;
    uint64_t incarnation;
    std::function<void()> fn;
  };
  struct Later {
    bool operator()(const Event& a, const Event& b) const {
      return a.when != b.when ? a.when > b.when : a.seq > b.seq;
    }
  };
  static std::pair<int, int> ordered(int a, int b) { return a < b ? std::pair{a, b} : std::pair{b, a}; }
  int process_at(uint16_t port) const;
  int64_t delay() {
    if (!faults_on) return rng_.between(0, 1);
    if (rng_.chance(faults.late)) return rng_.between(500, 5'000);
    return rng_.between(faults.delay_min_ms, faults.delay_max_ms);
  }
  bool lost() { return faults_on && rng_.chance(faults.loss); }

  Rng rng_;
  int64_t now_ = 0;
  uint64_t next_seq_ = 1;
  uint64_t events_run_ = 0;
  std::priority_queue<Event, std::vector<Event>, Later> queue_;
  std::unordered_set<uint64_t> cancelled_;
  std::vector<Process> procs_;
  std::set<std::pair<int, int>> cuts_;
  std::deque<std::string> trace_;
};

// A process's view of the world, as a Runtime.
class SimRuntime final : public Runtime {
 public:
  SimRuntime(World& w, int proc) : w_(w), proc_(proc) {}
  int64_t now_ms() const override;
  int64_t wall_ms() const override;
  uint64_t run_after(int64_t delay_ms, std::function<void()> fn) override;
  bool cancel(uint64_t timer) override { return w_.cancel(timer); }
  void send(const Url& url, HttpRequest req, SendOptions opts, std::function<void(HttpResult)> done) override;
  bool submit(std::function<void()> job) override;  // a job runs 0-2 ms later (or stalls)
  uint64_t random64() override { return w_.rng().next(); }

 private:
  World& w_;
  int proc_;
};

// What the simulator knows about a coordinator's decision log, across its crashes: which
// decisions are durable (synced, or written before a synced write), for the checks.
struct LogWatch {
  std::map<std::string, wal::Decision> durable;  // gid → the decision of its latest durable record
  std::set<std::string> heuristic;               // gids with a durable heuristic_mixed record
  std::vector<std::string> violations;           // "decision_changed ..." as it happens
  void durable_record(const wal::TxnRecord& r);
};

// A DecisionLog over a MemoryLog that outlives the process. Writes complete 0-4 ms (synced:
// 1-8 ms) later, in order, as events of the process: a crash drops the writes in flight and
// MemoryLog::crash() the unsynced ones already applied.
class SimLog final : public wal::DecisionLog {
 public:
  SimLog(World& w, int proc, wal::MemoryLog& store, LogWatch& watch) : w_(w), proc_(proc), store_(store), watch_(watch) {}

  Status for_each(const std::function<void(wal::TxnRecord&&)>& fn) override { return store_.for_each(fn); }
  Result<std::optional<wal::TxnRecord>> get(std::string_view gid) override { return store_.get(gid); }
  Result<std::optional<std::string>> get_meta(std::string_view key) override { return store_.get_meta(key); }
  Status put_meta(std::string_view key, std::string_view value) override;  // synced
  void write(std::vector<wal::LogWrite> writes, bool sync, wal::WriteDone done) override;
  void flush() override;  // applies every write in flight now
  wal::LogStats stats() const override { return store_.stats(); }

  // The process died: writes in flight are lost, and so are applied writes not yet synced.
  void crash();

 private:
  struct Pending {
    std::vector<wal::LogWrite> writes;
    bool sync = false;
    wal::WriteDone done;
  };
  void apply_one();

  World& w_;
  int proc_;
  wal::MemoryLog& store_;
  LogWatch& watch_;
  std::deque<Pending> pending_;
  std::vector<wal::TxnRecord> unsynced_;  // applied, not yet made durable by a synced write
  int64_t last_due_ms_ = 0;
  bool crashed_ = false;
};

}  // namespace tpc::sim
