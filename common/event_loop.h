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

}  // namespace tpc
