// tpc-wal-bench: measures the LevelDB decision log under group commit.
//
// For each writer count (default 1, 8 and 64), every writer thread writes one synced commit
// record per transaction and waits for its callback before the next, as a committing
// coordinator does. Prints synced writes/s, records per fsync and callback latency.
//
//   tpc-wal-bench [--seconds N] [--dir DIR] [WRITERS ...]
//
// Each run uses a fresh directory under DIR (default: $TMPDIR or /tmp), removed afterwards.
// Prints only; this is not a test.
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "wal/decision_log.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

tpc::wal::TxnRecord commit_record(int writer, uint64_t n) {
  tpc::wal::TxnRecord r;
  r.gid = "c1-17-" + std::to_string(writer) + "-" + std::to_string(n);
  r.protocol = tpc::Protocol::two_phase;
  r.decision = tpc::wal::Decision::commit;
  r.decided_wall_ms = 1'700'000'000'000 + static_cast<int64_t>(n);
  r.branches = {{"a1", "http://127.0.0.1:7401", tpc::wal::BranchOutcome::pending},
                {"a2", "http://127.0.0.1:7402", tpc::wal::BranchOutcome::pending},
                {"a3", "http://127.0.0.1:7403", tpc::wal::BranchOutcome::pending}};
  return r;
}

struct RunResult {
  uint64_t writes = 0;
  double seconds = 0;
  tpc::wal::LogStats stats;
  double p50_us = 0, p99_us = 0;
};

bool run(const fs::path& base, int writers, double seconds, RunResult& out) {
  std::string tmpl = (base / "tpc-wal-bench-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "tpc-wal-bench: cannot create a directory under %s\n",
                 base.string().c_str());
    return false;
  }
  bool ok = true;
  {
    tpc::wal::LevelDbOptions o;
    o.dir = tmpl;
    auto opened = tpc::wal::open_leveldb_log(o);
    if (!opened.ok()) {
      std::fprintf(stderr, "tpc-wal-bench: %s\n", opened.status().to_string().c_str());
      fs::remove_all(tmpl);
      return false;
    }
    tpc::wal::DecisionLog& log = **opened;

    std::atomic<bool> stop{false};
    std::atomic<bool> failed{false};
    std::vector<std::vector<uint32_t>> latencies(writers);
    std::vector<uint64_t> counts(writers, 0);
    std::vector<std::thread> threads;
    const auto start = Clock::now();
    for (int w = 0; w < writers; ++w) {
      threads.emplace_back([&, w] {
        std::binary_semaphore done(0);
        while (!stop.load(std::memory_order_relaxed)) {
          const auto t0 = Clock::now();
          log.write({tpc::wal::LogWrite::put(commit_record(w, counts[w]))}, true,
                    [&](tpc::Status s) {
                      if (!s.ok()) failed = true;
                      done.release();
                    });
          done.acquire();
          latencies[w].push_back(static_cast<uint32_t>(
              std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count()));
          counts[w] += 1;
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    stop = true;
    for (auto& t : threads) t.join();
    out.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    out.stats = log.stats();
    std::vector<uint32_t> all;
    for (int w = 0; w < writers; ++w) {
      out.writes += counts[w];
      all.insert(all.end(), latencies[w].begin(), latencies[w].end());
    }
    std::sort(all.begin(), all.end());
    if (!all.empty()) {
      out.p50_us = all[all.size() / 2];
      out.p99_us = all[std::min(all.size() - 1, all.size() * 99 / 100)];
    }
    ok = !failed;
  }
  std::error_code ec;
  fs::remove_all(tmpl, ec);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  const char* tmpdir = std::getenv("TMPDIR");
  fs::path base = tmpdir != nullptr && *tmpdir != '\0' ? tmpdir : "/tmp";
  std::vector<int> writer_counts;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (a == "--dir" && i + 1 < argc) {
      base = argv[++i];
    } else if (!a.empty() && a.find_first_not_of("0123456789") == std::string::npos) {
      writer_counts.push_back(std::atoi(a.c_str()));
    } else {
      std::fprintf(stderr, "usage: tpc-wal-bench [--seconds N] [--dir DIR] [WRITERS ...]\n");
      return 2;
    }
  }
  if (writer_counts.empty()) writer_counts = {1, 8, 64};
  if (seconds <= 0) seconds = 3;

  std::printf("decision log group commit, synced writes, %.1f s per run, dir %s\n", seconds,
              base.string().c_str());
  std::printf("%8s %12s %14s %10s %10s %10s\n", "writers", "writes/s", "records/fsync", "fsyncs/s",
              "p50 us", "p99 us");
  for (int writers : writer_counts) {
    if (writers <= 0) continue;
    RunResult r;
    if (!run(base, writers, seconds, r)) {
      std::fprintf(stderr, "tpc-wal-bench: run with %d writers failed\n", writers);
      return 1;
    }
    const double per_fsync =
        r.stats.synced_batches == 0
            ? 0
            : static_cast<double>(r.stats.records_synced) / r.stats.synced_batches;
    std::printf("%8d %12.0f %14.2f %10.0f %10.0f %10.0f\n", writers, r.writes / r.seconds,
                per_fsync, r.stats.synced_batches / r.seconds, r.p50_us, r.p99_us);
    std::fflush(stdout);
  }
  return 0;
}
