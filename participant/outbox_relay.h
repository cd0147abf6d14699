// OutboxRelay: the agent's relay of its local message table (docs/DESIGN.md §10.2) as a pure
// state machine. Not wired into the agent yet: its store (tpc_outbox in PostgreSQL and in the
// simulated database), its driver and its destinations come next.
//
// The table is the truth; the relay only decides what to do next. Inputs: wake-ups (a NOTIFY,
// a POST /v1/outbox, an operator's retry), ticks, the rows a scan found eligible, the outcome
// of each delivery, and the completion of each row's update. Outputs (OutboxReady): scan the
// table, deliver these rows, write these marks. The driver carries them out in that order and
// feeds the answers back, each with now_ms.
//
// Rules:
//   - A scan returns only rows that are pending, due, and the head of their key: no earlier
//     row of the same key is pending or dead (the store's SQL says so). The relay adds what the
//     table cannot know: a row, or a row of a key, already being delivered or marked is not
//     started again, so one key has at most one message out, and the next goes only once the
//     previous one's mark is written (strict per-key order; keyless rows go in parallel).
//   - One scan at a time; a wake-up during a scan asks for another once it ends. Scans also
//     run every poll_ms, since a NOTIFY can be missed (a reconnect, a restart).
//   - A failed delivery is retried after min(retry_max_ms, retry_min_ms << (attempts - 1)),
//     at least its Retry-After; past attempts_max the row is dead (and holds its key back until
//     an operator retries or discards it).
//   - A row whose mark was written while a scan was running is not taken from that scan (it
//     may have read the row before the mark).
//   - A mark that fails to be written leaves the row as it was; the next scan finds it again
//     (a delivered row may then be delivered twice: at least once, which a SQL destination's
//     barrier and a broker's duplicate window absorb).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace tpc::agent {

struct OutboxOptions {
  uint32_t attempts_max = 10;  // --outbox-attempts-max: then the row is dead
  int64_t retry_min_ms = 100;
  int64_t retry_max_ms = 30'000;
  size_t in_flight_max = 64;  // deliveries and marks at once
  size_t scan_limit = 256;    // rows one scan returns at most
  int64_t poll_ms = 1'000;    // a scan at least this often
};

// A row of tpc_outbox as a scan returns it.
struct OutboxRow {
  int64_t id = 0;
  std::optional<std::string> key;
  std::string destination;  // the op's JSON
  std::string payload;      // JSON
  uint32_t attempts = 0;    // made before this one
};

struct OutboxDelivery {
  int64_t id = 0;
  std::string destination;
  std::string payload;
  uint32_t attempt = 0;  // 1 for the first
};

enum class MarkKind : uint8_t { delivered, retry, dead };

// The update of one row: delivered; or failed, to retry after retry_in_ms; or dead.
struct OutboxMark {
  int64_t id = 0;
  MarkKind kind = MarkKind::delivered;
  uint32_t attempts = 0;  // made, this one included
  int64_t retry_in_ms = 0;
  std::string error;
};

struct OutboxReady {
  bool scan = false;
  size_t scan_limit = 0;
  std::vector<OutboxDelivery> deliveries;
  std::vector<OutboxMark> marks;
  bool empty() const { return !scan && deliveries.empty() && marks.empty(); }
};

struct OutboxCounters {
  uint64_t scans = 0;
  uint64_t attempts = 0;  // deliveries started
  uint64_t delivered = 0;
  uint64_t failed = 0;  // attempts that failed (retried or dead)
  uint64_t dead = 0;
};

class OutboxRelay {
 public:
  explicit OutboxRelay(OutboxOptions opts);

  // Something may be pending: scan now (after the scan in progress, if any).
  void wake(int64_t now_ms);
  void tick(int64_t now_ms);
  // The scan's eligible rows, oldest first; or it failed (the next tick tries again).
  void on_scanned(std::vector<OutboxRow> rows, int64_t now_ms);
  void on_scan_failed(int64_t now_ms);
  // A delivery's outcome; retry_after_ms: the destination's Retry-After (0: none).
  void on_delivered(int64_t id, bool ok, std::string error, int64_t retry_after_ms, int64_t now_ms);
  // A mark is written (ok) or not; either way its row and key are free again.
  void on_marked(int64_t id, bool ok, int64_t now_ms);

  OutboxReady take_ready();
  std::optional<int64_t> next_deadline_ms() const;
  size_t in_flight() const { return out_.size(); }
  const OutboxCounters& counters() const { return counters_; }

 private:
  struct Out {
    std::optional<std::string> key;
    uint32_t attempts = 0;  // before this delivery
    bool marking = false;
  };

  void request_scan(int64_t now_ms);
  int64_t retry_delay_ms(uint32_t attempts, int64_t retry_after_ms) const;

  OutboxOptions opts_;
  std::map<int64_t, Out> out_;            // rows being delivered or marked
  std::set<std::string> busy_keys_;       // keys with a row in out_
  std::set<int64_t> marked_during_scan_;  // a scan in progress may return them as they were
  bool scanning_ = false;
  bool rescan_ = false;
  int64_t next_scan_ms_ = 0;
  OutboxReady ready_;
  OutboxCounters counters_;
};

}  // namespace tpc::agent
