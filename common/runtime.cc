#include "common/runtime.h"

#include <random>

namespace tpc {

WorkerPool::WorkerPool(int threads, size_t queue_max) : queue_max_(queue_max) {
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
}

WorkerPool::~WorkerPool() { stop(); }

bool WorkerPool::submit(std::function<void()> job) {
  {
    std::lock_guard lock(mu_);
    if (stopping_ || jobs_.size() >= queue_max_) return false;
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
  return true;
}

void WorkerPool::stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

size_t WorkerPool::queued() const {
  std::lock_guard lock(mu_);
  return jobs_.size();
}

void WorkerPool::work() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and drained
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

RealRuntime::RealRuntime(int loop_threads, int workers, size_t jobs_max)
    : loop_(loop_threads), client_(loop_), workers_(workers, jobs_max) {}

RealRuntime::~RealRuntime() { stop(); }

uint64_t RealRuntime::random64() {
  std::random_device rd;  // getrandom
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

void RealRuntime::stop() {
  if (stopped_) return;
  stopped_ = true;
  workers_.stop();
  loop_.stop();
  loop_.join();
}

}  // namespace tpc
