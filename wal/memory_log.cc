// MemoryLog: the in-memory decision log for tests and the simulator.
//
// It models a sequential log file: every write is appended to an unsynced tail; a synced write
// (or put_meta, which is synced) makes itself and every earlier write durable, as an fsync of
// LevelDB's log file would. crash() throws the unsynced tail away and resets the visible state
// to the durable one. Records are stored encoded, so corruption (put_raw) is caught on read
// exactly as in the LevelDB log. Callbacks run inline, on the caller's thread, after the lock
// is released (a callback may call back into the log).
#include <map>
#include <mutex>
#include <optional>

#include "wal/decision_log.h"

namespace tpc::wal {
namespace {

// One change to the record map: a value, or nullopt for an erase.
struct Change {
  std::string gid;
  std::optional<std::string> value;
};

using RecordMap = std::map<std::string, std::string, std::less<>>;

void apply_change(RecordMap& m, const Change& c) {
  if (c.value) {
    m.insert_or_assign(c.gid, *c.value);
  } else {
    m.erase(c.gid);
  }
}

Status decode_stored(std::string_view gid, std::string_view bytes, TxnRecord& out) {
  Result<TxnRecord> r = decode_record(bytes);
  if (!r.ok()) {
    return corruption("decision log record for gid " + std::string(gid) +
                      " is corrupt: " + r.status().message());
  }
  if (r->gid != gid) {
    return corruption("decision log record for gid " + std::string(gid) +
                      " is corrupt: it carries gid " + r->gid);
  }
  out = std::move(r).value();
  return ok_status();
}

}  // namespace

struct MemoryLog::Impl {
  mutable std::mutex mu;
  RecordMap visible;                                     // what reads see: durable + unsynced tail
  RecordMap durable;                                     // what survives crash()
  std::vector<Change> unsynced;                          // the tail, in write order
  std::map<std::string, std::string, std::less<>> meta;  // always durable
  LogStats stats;

  void sync_tail() {
    for (const Change& c : unsynced) apply_change(durable, c);
    unsynced.clear();
  }
};

MemoryLog::MemoryLog() : impl_(std::make_unique<Impl>()) {}
MemoryLog::~MemoryLog() = default;

Status MemoryLog::for_each(const std::function<void(TxnRecord&&)>& fn) {
  RecordMap snapshot;
  {
    std::lock_guard lock(impl_->mu);
    snapshot = impl_->visible;
  }
  for (const auto& [gid, bytes] : snapshot) {
    TxnRecord rec;
    TPC_RETURN_IF_ERROR(decode_stored(gid, bytes, rec));
    fn(std::move(rec));
  }
  return ok_status();
}

Result<std::optional<TxnRecord>> MemoryLog::get(std::string_view gid) {
  std::string bytes;
  {
    std::lock_guard lock(impl_->mu);
    auto it = impl_->visible.find(gid);
    if (it == impl_->visible.end()) return std::optional<TxnRecord>();
    bytes = it->second;
  }
  TxnRecord rec;
  TPC_RETURN_IF_ERROR(decode_stored(gid, bytes, rec));
  return std::optional<TxnRecord>(std::move(rec));
}

Result<std::optional<std::string>> MemoryLog::get_meta(std::string_view key) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->meta.find(key);
  if (it == impl_->meta.end()) return std::optional<std::string>();
  return std::optional<std::string>(it->second);
}

Status MemoryLog::put_meta(std::string_view key, std::string_view value) {
  std::lock_guard lock(impl_->mu);
  impl_->sync_tail();  // a synced write makes every earlier write durable
  impl_->meta.insert_or_assign(std::string(key), std::string(value));
  return ok_status();
}

void MemoryLog::write(std::vector<LogWrite> writes, bool sync, WriteDone done) {
  std::vector<Change> changes;
  changes.reserve(writes.size());
  for (LogWrite& w : writes) {
    TPC_ASSERT_MSG(!w.record.gid.empty(), "a decision log write needs a gid");
    if (w.kind == LogWrite::Kind::put) {
      changes.push_back({w.record.gid, encode_record(w.record)});
    } else {
      changes.push_back({std::move(w.record.gid), std::nullopt});
    }
  }
  {
    std::lock_guard lock(impl_->mu);
    for (Change& c : changes) {
      apply_change(impl_->visible, c);
      impl_->unsynced.push_back(std::move(c));
    }
    if (sync) impl_->sync_tail();
    impl_->stats.batches += 1;
    impl_->stats.records_written += writes.size();
    if (sync) {
      impl_->stats.synced_batches += 1;
      impl_->stats.records_synced += writes.size();
    }
  }
  if (done) done(ok_status());
}

LogStats MemoryLog::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

void MemoryLog::crash() {
  std::lock_guard lock(impl_->mu);
  impl_->unsynced.clear();
  impl_->visible = impl_->durable;
}

void MemoryLog::put_raw(std::string_view gid, std::string bytes) {
  std::lock_guard lock(impl_->mu);
  // Corruption of what is on disk: it survives a crash, and earlier writes stay ordered first.
  impl_->sync_tail();
  impl_->visible.insert_or_assign(std::string(gid), bytes);
  impl_->durable.insert_or_assign(std::string(gid), std::move(bytes));
}

}  // namespace tpc::wal
