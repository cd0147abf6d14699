#include "tests/sim/sim.h"

#include <cstdio>

#include "common/assert.h"

namespace tpc::sim {
namespace {

constexpr size_t kTraceKept = 300;
constexpr int64_t kRefusedMs = 1;  // a connection to a dead process is refused at once

}  // namespace

World::World(uint64_t seed) : rng_(seed) {}

int World::add_process(std::string name, uint16_t port) {
  Process p;
  p.name = std::move(name);
  p.port = port;
  p.anchor_ms = now_;
  p.started_ms = now_;
  procs_.push_back(std::move(p));
  return static_cast<int>(procs_.size() - 1);
}

void World::crash(int id) {
  Process& p = process(id);
  p.up = false;
  p.incarnation++;
  p.handler = nullptr;
  note("crash " + p.name);
}

void World::restart(int id) {
  Process& p = process(id);
  p.up = true;
  p.incarnation++;
  p.anchor_ms = now_ + p.wall_offset_ms;
  p.started_ms = now_;
  note("restart " + p.name);
}

uint64_t World::at(int64_t when, int proc, std::function<void()> fn) {
  TPC_ASSERT(when >= now_);
  uint64_t inc = proc >= 0 ? process(proc).incarnation : 0;
  uint64_t seq = next_seq_++;
  queue_.push(Event{when, seq, proc, inc, std::move(fn)});
  return seq;
}

bool World::cancel(uint64_t id) { return cancelled_.insert(id).second; }

bool World::step() {
  while (!queue_.empty()) {
    Event e = std::move(const_cast<Event&>(queue_.top()));
    queue_.pop();
    now_ = e.when;
    if (cancelled_.erase(e.seq) > 0) continue;
    if (e.proc >= 0 && process(e.proc).incarnation != e.incarnation) continue;
    ++events_run_;
    e.fn();
    return true;
  }
  return false;
}

void World::run_until(int64_t until) {
  while (!queue_.empty() && queue_.top().when <= until) step();
  if (now_ < until) now_ = until;
}

int World::process_at(uint16_t port) const {
  for (size_t i = 0; i < procs_.size(); ++i)
    if (procs_[i].port == port) return static_cast<int>(i);
  return -1;
}

void World::send(int from, const Url& url, HttpRequest req, SendOptions opts,
                 std::function<void(HttpResult)> done) {
  int to = process_at(url.port);
  if (on_send && to >= 0) on_send(from, to, req);
  // done runs once: with the answer, or with the transport's error at the deadline.
  auto finished = std::make_shared<bool>(false);
  auto finish = std::make_shared<std::function<void(HttpResult)>>(std::move(done));
  auto complete = [finished, finish](HttpResult r) {
    if (*finished) return;
    *finished = true;
    (*finish)(std::move(r));
  };
  at(now_ + std::max<int64_t>(opts.timeout_ms, 1), from, [complete] {
    complete(HttpResult{Status(Code::timeout, "the request timed out"), 0, "", {}});
  });
  if (to < 0 || !process(to).up || !process(to).handler) {
    if (!is_cut(from, to))
      at(now_ + kRefusedMs, from, [complete] {
        complete(HttpResult{unavailable("connection refused"), 0, "", {}});
      });
    return;
  }
  // A second copy: what the HTTP client's automatic retry of an idempotent request does when
  // the first one's connection broke after it was sent. Requests that carry statements are
  // sent with idempotent = false and never retried.
  int copies = faults_on && opts.idempotent && rng_.chance(faults.duplicate) ? 2 : 1;
  const uint64_t sender = process(from).incarnation;  // an answer reaches only this incarnation
  for (int copy = 0; copy < copies; ++copy) {
    if (is_cut(from, to) || lost()) continue;
    at(now_ + delay(), to, [this, from, to, req, complete, copy, sender] {
      if (is_cut(from, to) || !process(to).handler) return;
      HttpRequest r = req;
      r.client = "127.0.0.1";
      process(to).handler(std::move(r), Responder([this, from, to, complete, copy, sender](HttpResponse resp) {
        if (copy > 0 || process(from).incarnation != sender || is_cut(from, to) || lost()) return;
        at(now_ + delay(), from, [complete, resp = std::move(resp)] {
          complete(HttpResult{ok_status(), resp.status, resp.body, resp.headers});
        });
      }));
    });
  }
}

void World::note(const std::string& line) {
  std::string l = std::to_string(now_) + " " + line;
  if (echo) std::fprintf(stderr, "%s\n", l.c_str());
  trace_.push_back(std::move(l));
  if (trace_.size() > kTraceKept) trace_.pop_front();
}

std::vector<std::string> World::trace_tail(size_t n) const {
  size_t from = trace_.size() > n ? trace_.size() - n : 0;
  return std::vector<std::string>(trace_.begin() + static_cast<long>(from), trace_.end());
}

// --- SimRuntime ------------------------------------------------------------------------------

int64_t SimRuntime::now_ms() const {
  const Process& p = w_.process(proc_);
  return p.anchor_ms + (w_.now() - p.started_ms);
}

int64_t SimRuntime::wall_ms() const { return w_.now() + w_.process(proc_).wall_offset_ms; }

uint64_t SimRuntime::run_after(int64_t delay_ms, std::function<void()> fn) {
  return w_.at(w_.now() + std::max<int64_t>(delay_ms, 0), proc_, std::move(fn));
}

void SimRuntime::send(const Url& url, HttpRequest req, SendOptions opts, std::function<void(HttpResult)> done) {
  w_.send(proc_, url, std::move(req), opts, std::move(done));
}

bool SimRuntime::submit(std::function<void()> job) {
  double stall = w_.process(proc_).job_stall;
  int64_t delay = w_.faults_on && stall > 0 && w_.rng().chance(stall)
                      ? w_.rng().between(2'000, 12'000)
                      : w_.rng().between(0, 2);
  w_.at(w_.now() + delay, proc_, std::move(job));
  return true;
}

// --- the decision log --------------------------------------------------------------------------

void LogWatch::durable_record(const wal::TxnRecord& r) {
  if (r.heuristic_mixed) heuristic.insert(r.gid);
  auto commits = [](wal::Decision d) {
    return d == wal::Decision::commit || d == wal::Decision::precommit || d == wal::Decision::committed_read_only;
  };
  auto it = durable.find(r.gid);
  if (it != durable.end()) {
    wal::Decision was = it->second;
    bool changed = (commits(was) && r.decision == wal::Decision::aborted) ||
                   (was == wal::Decision::aborted && commits(r.decision)) ||
                   (calls_ops(r.protocol) && !wal::decision_may_follow(was, r.decision));
    if (changed)
      violations.push_back("decision_changed " + r.gid + ": " + std::string(wal::decision_name(was)) + " then " +
                           std::string(wal::decision_name(r.decision)));
    // one_phase then its outcome is the normal course; a commit decision stays one.
    if (commits(was) && !commits(r.decision)) return;
  }
  durable[r.gid] = r.decision;
}

void SimLog::write(std::vector<wal::LogWrite> writes, bool sync, wal::WriteDone done) {
  TPC_ASSERT(!crashed_);
  int64_t due =
      std::max(last_due_ms_, w_.now() + (sync ? w_.rng().between(1, 8) : w_.rng().between(0, 4)));
  last_due_ms_ = due;
  pending_.push_back(Pending{std::move(writes), sync, std::move(done)});
  w_.at(due, proc_, [this] { apply_one(); });
}

void SimLog::apply_one() {
  if (pending_.empty()) return;  // flush() applied it
  Pending p = std::move(pending_.front());
  pending_.pop_front();
  for (const auto& wr : p.writes)
    if (wr.kind == wal::LogWrite::Kind::put) unsynced_.push_back(wr.record);
  if (p.sync) {
    for (const auto& r : unsynced_) watch_.durable_record(r);
    unsynced_.clear();
  }
  store_.write(std::move(p.writes), p.sync, std::move(p.done));
}

Status SimLog::put_meta(std::string_view key, std::string_view value) {
  // Synced: every write applied before it is durable too.
  for (const auto& r : unsynced_) watch_.durable_record(r);
  unsynced_.clear();
  return store_.put_meta(key, value);
}

void SimLog::flush() {
  while (!pending_.empty()) apply_one();
}

void SimLog::crash() {
  crashed_ = true;
  pending_.clear();
  unsynced_.clear();
  store_.crash();
}

}  // namespace tpc::sim
