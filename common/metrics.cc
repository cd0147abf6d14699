#include "common/metrics.h"

#include <cmath>
#include <cstdio>
#include <set>

namespace tpc {

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), buckets_(new std::atomic<uint64_t>[bounds_.size() + 1]) {
  for (size_t i = 0; i <= bounds_.size(); ++i) buckets_[i].store(0);
}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  if (v > 0) sum_micros_.fetch_add(static_cast<uint64_t>(v * 1e6), std::memory_order_relaxed);
}

Counter& Metrics::counter(const std::string& name, const std::string& help, Labels labels) {
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->help = help;
  e->type = "counter";
  e->labels = std::move(labels);
  e->counter = std::make_unique<Counter>();
  Counter& c = *e->counter;
  std::lock_guard lock(mu_);
  entries_.push_back(std::move(e));
  return c;
}

Histogram& Metrics::histogram(const std::string& name, const std::string& help,
                              std::vector<double> bounds, Labels labels) {
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->help = help;
  e->type = "histogram";
  e->labels = std::move(labels);
  e->histogram = std::make_unique<Histogram>(std::move(bounds));
  Histogram& h = *e->histogram;
  std::lock_guard lock(mu_);
  entries_.push_back(std::move(e));
  return h;
}

void Metrics::gauge(const std::string& name, const std::string& help, std::function<double()> read,
                    Labels labels) {
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->help = help;
  e->type = "gauge";
  e->labels = std::move(labels);
  e->gauge = std::move(read);
  std::lock_guard lock(mu_);
  entries_.push_back(std::move(e));
}

void Metrics::counter_fn(const std::string& name, const std::string& help,
                         std::function<double()> read, Labels labels) {
  auto e = std::make_unique<Entry>();
  e->name = name;
  e->help = help;
  e->type = "counter";
  e->labels = std::move(labels);
  e->gauge = std::move(read);
  std::lock_guard lock(mu_);
  entries_.push_back(std::move(e));
}

namespace {

std::string label_text(const Labels& labels, const std::string& extra_k = "",
                       const std::string& extra_v = "") {
  if (labels.empty() && extra_k.empty()) return "";
  std::string s = "{";
  bool first = true;
  auto add = [&](const std::string& k, const std::string& v) {
    if (!first) s += ",";
    first = false;
    s += k + "=\"";
    for (char c : v) {
      if (c == '"' || c == '\\') s += '\\';
      if (c == '\n') {
        s += "\\n";
        continue;
      }
      s += c;
    }
    s += "\"";
  };
  for (auto& [k, v] : labels) add(k, v);
  if (!extra_k.empty()) add(extra_k, extra_v);
  return s + "}";
}

std::string number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  if (v == std::floor(v) && std::fabs(v) < 1e15)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

}  // namespace

std::string Metrics::render() const {
  std::lock_guard lock(mu_);
  std::string out;
  // Samples of one family must be contiguous: order by first registration of each name.
  std::vector<const Entry*> ordered;
  std::set<std::string> described;
  for (auto& e : entries_) {
    if (!described.insert(e->name).second) continue;
    for (auto& same : entries_)
      if (same->name == e->name) ordered.push_back(same.get());
  }
  described.clear();
  for (const Entry* e : ordered) {
    if (described.insert(e->name).second) {
      out += "# HELP " + e->name + " " + e->help + "\n";
      out += "# TYPE " + e->name + " " + e->type + "\n";
    }
    if (e->counter) {
      out += e->name + label_text(e->labels) + " " + std::to_string(e->counter->value()) + "\n";
    } else if (e->gauge) {
      out += e->name + label_text(e->labels) + " " + number(e->gauge()) + "\n";
    } else if (e->histogram) {
      const Histogram& h = *e->histogram;
      uint64_t cum = 0;
      for (size_t i = 0; i <= h.bounds_.size(); ++i) {
        cum += h.buckets_[i].load(std::memory_order_relaxed);
        std::string le = i < h.bounds_.size() ? number(h.bounds_[i]) : "+Inf";
        out += e->name + "_bucket" + label_text(e->labels, "le", le) + " " + std::to_string(cum) + "\n";
      }
      out += e->name + "_sum" + label_text(e->labels) + " " +
             number(static_cast<double>(h.sum_micros_.load()) / 1e6) + "\n";
      out += e->name + "_count" + label_text(e->labels) + " " + std::to_string(h.count()) + "\n";
    }
  }
  return out;
}

std::vector<double> latency_buckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace tpc
