// Runtime: what a service's driver needs from the world — the time its machine sees, timers, a
// transport for requests to other services, and a place to run blocking work (PostgreSQL calls,
// log scans) off the network threads. The drivers use nothing else, so the same driver runs
// over real IO (RealRuntime) or inside the seeded simulator (tests/sim/), one thread, virtual
// time.
//
// Threads: RealRuntime is thread-safe; callbacks run on the loop's threads (timers, answers)
// or on a worker (jobs). A simulated runtime runs everything on the simulator's thread.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "common/http.h"
#include "common/http_client.h"

namespace tpc {

class Runtime {
 public:
  virtual ~Runtime() = default;
  // The time the protocol machines see: monotonic, anchored at the wall clock at start
  // (ServiceClock). Every timer and age is measured on it.
  virtual int64_t now_ms() const = 0;
  // The wall clock, only where it is meant: gid epochs.
  virtual int64_t wall_ms() const = 0;
  // Runs fn once after delay_ms; returns an id for cancel() (never 0).
  virtual uint64_t run_after(int64_t delay_ms, std::function<void()> fn) = 0;
  virtual bool cancel(uint64_t timer) = 0;
  // Sends req to url; done is called exactly once with the answer or the transport's error.
  virtual void send(const Url& url, HttpRequest req, SendOptions opts,
                    std::function<void(HttpResult)> done) = 0;
  // Runs job on a worker, where it may block. false: the workers' queue is full (its limit),
  // and the job will not run; the caller fails what it stood for.
  [[nodiscard]] virtual bool submit(std::function<void()> job) = 0;
  // 64 random bits (epochs); the simulator's come from its seed.
  virtual uint64_t random64() = 0;
};

// A fixed set of threads taking jobs from one queue, in order, at most queue_max waiting.
// stop() lets the queued jobs finish, then joins.
class WorkerPool {
 public:
  explicit WorkerPool(int threads, size_t queue_max = SIZE_MAX);
  ~WorkerPool();  // stop()
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // false (and the job dropped) when queue_max jobs wait already, or after stop().
  [[nodiscard]] bool submit(std::function<void()> job);
  void stop();
  size_t queued() const;

 private:
  void work();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  const size_t queue_max_;
  bool stopping_ = false;
};

// The production runtime: the event loop's threads, the keep-alive HTTP client, the service
// clock and a worker pool.
class RealRuntime final : public Runtime {
 public:
  // jobs_max: jobs waiting for a worker; past it submit() refuses.
  RealRuntime(int loop_threads, int workers, size_t jobs_max);
  ~RealRuntime() override;  // stop()

  EventLoop& loop() { return loop_; }
  // Starts the loop's threads (the workers run from construction).
  void start() { loop_.start(); }
  // Drains and joins the workers, then stops and joins the loop. Idempotent.
  void stop();

  int64_t now_ms() const override { return clock_.now_ms(); }
  int64_t wall_ms() const override { return tpc::wall_ms(); }
  uint64_t run_after(int64_t delay_ms, std::function<void()> fn) override {
    return loop_.run_after(delay_ms, std::move(fn));
  }
  bool cancel(uint64_t timer) override { return loop_.cancel(timer); }
  void send(const Url& url, HttpRequest req, SendOptions opts,
            std::function<void(HttpResult)> done) override {
    client_.send(url, std::move(req), opts, std::move(done));
  }
  bool submit(std::function<void()> job) override { return workers_.submit(std::move(job)); }
  uint64_t random64() override;  // the OS's random source

 private:
  const ServiceClock clock_;
  EventLoop loop_;
  HttpClient client_;
  WorkerPool workers_;
  bool stopped_ = false;
};

}  // namespace tpc
