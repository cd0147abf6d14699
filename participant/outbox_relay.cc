// The relay's rules; see outbox_relay.h.
#include "participant/outbox_relay.h"

#include <algorithm>

#include "common/assert.h"

namespace tpc::agent {

OutboxRelay::OutboxRelay(OutboxOptions opts) : opts_(opts) {
  TPC_ASSERT(opts_.attempts_max >= 1 && opts_.in_flight_max >= 1 && opts_.scan_limit >= 1);
  TPC_ASSERT(opts_.retry_min_ms >= 1 && opts_.retry_max_ms >= opts_.retry_min_ms);
}

void OutboxRelay::wake(int64_t now_ms) {
  request_scan(now_ms);
}

void OutboxRelay::tick(int64_t now_ms) {
  if (now_ms >= next_scan_ms_) request_scan(now_ms);
}

void OutboxRelay::request_scan(int64_t now_ms) {
  if (scanning_) {
    rescan_ = true;
    return;
  }
  if (out_.size() >= opts_.in_flight_max) return;  // the next free slot asks again
  scanning_ = true;
  rescan_ = false;
  next_scan_ms_ = now_ms + opts_.poll_ms;
  ready_.scan = true;
  ready_.scan_limit = opts_.scan_limit;
  ++counters_.scans;
}

void OutboxRelay::on_scanned(std::vector<OutboxRow> rows, int64_t now_ms) {
  TPC_ASSERT_MSG(scanning_, "a scan's rows without a scan");
  scanning_ = false;
  for (OutboxRow& r : rows) {
    if (out_.size() >= opts_.in_flight_max) break;
    if (out_.count(r.id)) continue;                   // still out, or its mark not written
    if (marked_during_scan_.count(r.id)) continue;    // read before its mark was written
    if (r.key && busy_keys_.count(*r.key)) continue;  // its key has a message out
    if (r.key) busy_keys_.insert(*r.key);
    out_.emplace(r.id, Out{r.key, r.attempts, false});
    ++counters_.attempts;
    ready_.deliveries.push_back(
        OutboxDelivery{r.id, std::move(r.destination), std::move(r.payload), r.attempts + 1});
  }
  marked_during_scan_.clear();
  if (rescan_) request_scan(now_ms);
}

void OutboxRelay::on_scan_failed(int64_t now_ms) {
  scanning_ = false;
  marked_during_scan_.clear();
  rescan_ = false;
  next_scan_ms_ = now_ms + opts_.poll_ms;
}

void OutboxRelay::on_delivered(int64_t id, bool ok, std::string error, int64_t retry_after_ms,
                               int64_t now_ms) {
  (void)now_ms;
  auto it = out_.find(id);
  if (it == out_.end() || it->second.marking) return;  // not ours to answer
  Out& o = it->second;
  o.marking = true;
  uint32_t attempts = o.attempts + 1;
  OutboxMark m;
  m.id = id;
  m.attempts = attempts;
  if (ok) {
    m.kind = MarkKind::delivered;
    ++counters_.delivered;
  } else {
    ++counters_.failed;
    m.error = std::move(error);
    if (attempts >= opts_.attempts_max) {
      m.kind = MarkKind::dead;
      ++counters_.dead;
    } else {
      m.kind = MarkKind::retry;
      m.retry_in_ms = retry_delay_ms(attempts, retry_after_ms);
    }
  }
  ready_.marks.push_back(std::move(m));
}

void OutboxRelay::on_marked(int64_t id, bool ok, int64_t now_ms) {
  (void)ok;  // not written: the row is as it was, and a later scan finds it again
  auto it = out_.find(id);
  if (it == out_.end()) return;
  if (it->second.key) busy_keys_.erase(*it->second.key);
  out_.erase(it);
  // A scan in progress may have read the row before this mark: its copy is stale.
  if (scanning_) marked_during_scan_.insert(id);
  request_scan(now_ms);  // the key's next row, or a free slot
}

int64_t OutboxRelay::retry_delay_ms(uint32_t attempts, int64_t retry_after_ms) const {
  int shift = static_cast<int>(std::min<uint32_t>(attempts > 0 ? attempts - 1 : 0, 30));
  int64_t delay = std::min(opts_.retry_max_ms, opts_.retry_min_ms << shift);
  return std::max(delay, std::min(retry_after_ms, opts_.retry_max_ms));
}

OutboxReady OutboxRelay::take_ready() {
  OutboxReady r = std::move(ready_);
  ready_ = OutboxReady{};
  return r;
}

std::optional<int64_t> OutboxRelay::next_deadline_ms() const {
  if (scanning_) return std::nullopt;
  return next_scan_ms_;
}

}  // namespace tpc::agent
