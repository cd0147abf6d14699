// Metrics: counters, gauges and histograms rendered in the Prometheus text format.
//
// Thread-safe. Counters and histograms are registered once (at start) and updated with
// relaxed atomics on hot paths; gauges are read through a callback at render time. Names and
// label sets are fixed at registration; the registry owns every metric for its whole life.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace tpc {

using Labels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void inc(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  friend class Metrics;
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_.size() + 1 (+Inf)
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_micros_{0};  // sum * 1e6, to stay integral
};

class Metrics {
 public:
  Counter& counter(const std::string& name, const std::string& help, Labels labels = {});
  Histogram& histogram(const std::string& name, const std::string& help, std::vector<double> bounds,
                       Labels labels = {});
  void gauge(const std::string& name, const std::string& help, std::function<double()> read,
             Labels labels = {});
  // A counter whose value is read through a callback at render time (for counters kept
  // elsewhere, e.g. inside a state machine under its driver's lock).
  void counter_fn(const std::string& name, const std::string& help, std::function<double()> read,
                  Labels labels = {});
  std::string render() const;

 private:
  struct Entry {
    std::string name, help, type;
    Labels labels;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> gauge;
  };
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Entry>> entries_;
};

// Registers counters read from a machine's counters struct under the mutex that guards it:
//   CountersUnderLock<C> counter{metrics, mu, machine.counters()};
//   counter("name_total", "help", {{"label", "v"}}, [](const C& c) { return c.field; });
// metrics, mu and counters must outlive every render.
template <class Counters>
struct CountersUnderLock {
  Metrics& metrics;
  std::mutex& mu;
  const Counters& counters;

  void operator()(const std::string& name, const std::string& help, Labels labels,
                  std::function<uint64_t(const Counters&)> read) const {
    metrics.counter_fn(
        name, help,
        [&mu = mu, &counters = counters, read = std::move(read)] {
          std::lock_guard lock(mu);
          return static_cast<double>(read(counters));
        },
        std::move(labels));
  }
};

// Latency buckets in seconds, 100 µs to 60 s.
std::vector<double> latency_buckets();

}  // namespace tpc
