// EventLoop: one boost::asio::io_context run by N threads, with cancellable timers and
// SIGINT/SIGTERM handling. The only Asio code outside the HTTP server and client.
#include "common/event_loop.h"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <csignal>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/assert.h"

namespace tpc {

namespace asio = boost::asio;

struct EventLoop::Impl {
  // Declared first so it is destroyed last: every timer and the signal set below use it.
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  int threads_n;
  std::vector<std::thread> threads;  // touched by start()/join() only (under run_mu)
  std::mutex run_mu;

  std::mutex timers_mu;
  std::unordered_map<uint64_t, std::unique_ptr<asio::steady_timer>> timers;  // under timers_mu
  uint64_t next_timer_id = 1;                                                // under timers_mu

  std::mutex signal_mu;
  std::unique_ptr<asio::signal_set> signals;         // under signal_mu
  std::vector<std::function<void(int)>> signal_fns;  // under signal_mu

  explicit Impl(int n) : io(n), work(asio::make_work_guard(io)), threads_n(n) {}

  void run_thread() {
    try {
      io.run();
    } catch (const std::exception& e) {
      assert_fail("no exception escapes a loop callback", __FILE__, __LINE__, e.what());
    }
  }

  void arm_signals() {
    // Called with signal_mu held; the handler re-arms, so one wait is pending at a time.
    signals->async_wait([this](const boost::system::error_code& ec, int signo) {
      if (ec) return;  // cancelled: the loop is going away
      std::vector<std::function<void(int)>> fns;
      {
        std::lock_guard lock(signal_mu);
        fns = signal_fns;
        arm_signals();
      }
      for (auto& fn : fns) fn(signo);
    });
  }
};

EventLoop::EventLoop(int threads) : impl_(std::make_unique<Impl>(threads < 1 ? 1 : threads)) {}

EventLoop::~EventLoop() {
  stop();
  join();
  // Timers and the signal set go before the io_context (member order in Impl).
  std::lock_guard lock(impl_->signal_mu);
  if (impl_->signals) {
    boost::system::error_code ec;
    impl_->signals->cancel(ec);
  }
}

void EventLoop::start() {
  std::lock_guard lock(impl_->run_mu);
  if (!impl_->threads.empty()) return;
  if (impl_->io.stopped()) impl_->io.restart();
  if (!impl_->work) impl_->work.emplace(asio::make_work_guard(impl_->io));
  impl_->threads.reserve(static_cast<size_t>(impl_->threads_n));
  for (int i = 0; i < impl_->threads_n; ++i)
    impl_->threads.emplace_back([this] { impl_->run_thread(); });
}

void EventLoop::stop() {
  impl_->work.reset();
  impl_->io.stop();
}

void EventLoop::join() {
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(impl_->run_mu);
    threads.swap(impl_->threads);
  }
  for (auto& t : threads) {
    TPC_ASSERT_MSG(t.get_id() != std::this_thread::get_id(),
                   "an EventLoop cannot be joined from one of its own threads");
    t.join();
  }
}

void EventLoop::post(std::function<void()> fn) {
  asio::post(impl_->io, std::move(fn));
}

uint64_t EventLoop::run_after(int64_t delay_ms, std::function<void()> fn) {
  Impl* impl = impl_.get();
  auto timer = std::make_unique<asio::steady_timer>(impl->io);
  timer->expires_after(std::chrono::milliseconds(delay_ms < 0 ? 0 : delay_ms));
  asio::steady_timer* t = timer.get();
  uint64_t id;
  std::lock_guard lock(impl->timers_mu);
  id = impl->next_timer_id++;
  impl->timers.emplace(id, std::move(timer));
  // The handler runs fn only if it is the one that removes the timer from the map, so a
  // cancel() that found the timer in the map guarantees fn never runs.
  t->async_wait([impl, id, fn = std::move(fn)](const boost::system::error_code&) {
    std::unique_ptr<asio::steady_timer> mine;
    {
      std::lock_guard lock(impl->timers_mu);
      auto it = impl->timers.find(id);
      if (it == impl->timers.end()) return;  // cancelled
      mine = std::move(it->second);
      impl->timers.erase(it);
    }
    fn();
  });
  return id;
}

bool EventLoop::cancel(uint64_t timer_id) {
  std::unique_ptr<asio::steady_timer> timer;
  {
    std::lock_guard lock(impl_->timers_mu);
    auto it = impl_->timers.find(timer_id);
    if (it == impl_->timers.end()) return false;
    timer = std::move(it->second);
    impl_->timers.erase(it);
  }
  timer->cancel();  // a completion already queued still runs but finds the id gone
  return true;
}

void EventLoop::on_stop_signal(std::function<void(int)> fn) {
  std::lock_guard lock(impl_->signal_mu);
  impl_->signal_fns.push_back(std::move(fn));
  if (impl_->signals) return;
  impl_->signals = std::make_unique<asio::signal_set>(impl_->io, SIGINT, SIGTERM);
  impl_->arm_signals();
}

void* EventLoop::native() {
  return &impl_->io;
}

int64_t monotonic_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace tpc
