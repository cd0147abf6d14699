// EventLoop: a pool of threads running one io_context, behind a Boost-free interface.
//
// All methods are thread-safe. Callbacks run on one of the loop's threads. The io_context is
// reachable through native() for the net code in common/ only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace tpc {

class EventLoop {
 public:
  explicit EventLoop(int threads);
  ~EventLoop();  // stop() and join()
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Starts the threads. The loop keeps running while there is nothing to do until stop().
  void start();
  // Asks every thread to return; pending handlers are dropped.
  void stop();
  // Waits for the threads to end.
  void join();

  void post(std::function<void()> fn);
  // Runs fn once after delay_ms; returns an id for cancel(). Ids are never 0.
  uint64_t run_after(int64_t delay_ms, std::function<void()> fn);
  // True if the timer was pending and will not run.
  bool cancel(uint64_t timer_id);
  // Calls fn(signo) on a loop thread when SIGINT or SIGTERM arrives (each time one arrives).
  void on_stop_signal(std::function<void(int)> fn);

  void* native();  // boost::asio::io_context*

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Milliseconds on the monotonic clock; for drivers, never for the protocol cores.
int64_t monotonic_ms();
// Milliseconds since the Unix epoch.
int64_t wall_ms();

// The time a service gives its protocol machine: the wall clock as it read at start, then
// advancing with the monotonic clock. A step of the wall clock (NTP, an operator, a VM
// restore) moves no timer and ages no outcome while the process runs; the values stay close
// enough to the wall clock to be shown as times and written into records. Across a restart
// the new start's wall clock is the anchor: time spent down is measured by it.
// Thread-safe (immutable after construction).
class ServiceClock {
 public:
  ServiceClock() : anchor_wall_ms_(wall_ms()), anchor_monotonic_ms_(monotonic_ms()) {}
  // For tests: anchored at the given readings.
  ServiceClock(int64_t anchor_wall_ms, int64_t anchor_monotonic_ms)
      : anchor_wall_ms_(anchor_wall_ms), anchor_monotonic_ms_(anchor_monotonic_ms) {}

  int64_t now_ms() const { return at(monotonic_ms()); }
  int64_t at(int64_t monotonic_now_ms) const {
    return anchor_wall_ms_ + (monotonic_now_ms - anchor_monotonic_ms_);
  }

 private:
  int64_t anchor_wall_ms_;
  int64_t anchor_monotonic_ms_;
};

}  // namespace tpc
