// DecisionLog: the coordinator's write-ahead log of decisions, behind an interface.
//
// Two implementations: LevelDbLog (durable; sync=true writes are fsynced, and concurrent
// writes are batched into one synced write: group commit) and MemoryLog (for tests and the
// simulator; a simulated crash drops every write that was not synced).
//
// Threads: every method is thread-safe. write() never blocks on IO; its callback runs on the
// log's writer thread (MemoryLog: inline) once the write is done, in the order of the writes.
// Writes queued before a read are not guaranteed to be visible to that read until their
// callback ran.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "wal/record.h"

namespace tpc::wal {

struct LogWrite {
  enum class Kind : uint8_t { put, erase };
  Kind kind = Kind::put;
  TxnRecord record;  // for put; for erase only record.gid is used

  static LogWrite put(TxnRecord r) { return LogWrite{Kind::put, std::move(r)}; }
  static LogWrite erase(std::string gid) {
    LogWrite w{Kind::erase, {}};
    w.record.gid = std::move(gid);
    return w;
  }
};

struct LogStats {
  uint64_t batches = 0;          // write calls to the store
  uint64_t synced_batches = 0;   // of which synced (= fsyncs)
  uint64_t records_synced = 0;   // put/erase entries that went out in synced batches
  uint64_t records_written = 0;  // all put/erase entries
  uint64_t queue_depth = 0;      // writes waiting now
};

using WriteDone = std::function<void(Status)>;

class DecisionLog {
 public:
  virtual ~DecisionLog() = default;

  // Calls fn for every record, in key order. corruption names the key of the first record
  // that fails its checksum or does not decode; nothing after it is read.
  virtual Status for_each(const std::function<void(TxnRecord&&)>& fn) = 0;
  // A point read; nullopt when there is no record for gid.
  virtual Result<std::optional<TxnRecord>> get(std::string_view gid) = 0;

  // Small named values (the epoch, the forgotten horizon). put_meta is synced and blocking.
  virtual Result<std::optional<std::string>> get_meta(std::string_view key) = 0;
  virtual Status put_meta(std::string_view key, std::string_view value) = 0;

  // Queues writes, applied atomically and in order; done(status) once they are written (and
  // synced to disk when sync is true). A failed write leaves the log in an unknown state for
  // those records: the caller must treat it as fatal.
  // A write refused at once (unavailable: the queue is past queue_max, or the log is closing)
  // calls done inline, before write() returns: do not call write() while holding a lock that
  // done takes. done may call write(), never flush().
  virtual void write(std::vector<LogWrite> writes, bool sync, WriteDone done) = 0;
  // Blocks until every write queued before the call is done. Not from a write callback.
  virtual void flush() = 0;

  virtual LogStats stats() const = 0;
};

struct LevelDbOptions {
  std::string dir;
  // The coordinator whose log this is; written into DIR/IDENTITY at the first open and
  // checked at every later one.
  std::string coordinator_id = "c1";
  // How often, at most, the count of acknowledged synced writes is copied into DIR/IDENTITY
  // (one fsync + rename off the commit path). Synced writes lost after being acknowledged
  // are detected at open if they were acknowledged more than about this long before the stop.
  int64_t identity_sync_interval_ms = 100;
  size_t batch_records_max = 4096;   // a group-commit batch carries at most this many writes
  size_t queue_max = 1'000'000;      // writes waiting; past it write() fails with unavailable
  size_t block_cache_bytes = 8 << 20;
  size_t write_buffer_bytes = 16 << 20;
};

// Opens the LevelDB store in opts.dir, creating it only in a directory that holds neither a
// store nor an IDENTITY file. io_error with a clear message when the directory cannot be
// created or written, or is locked by another process; corruption (one line naming the
// problem) when the store fails its checks: LevelDB files without IDENTITY, IDENTITY without
// an openable store (e.g. CURRENT deleted), IDENTITY naming another coordinator id or
// malformed, a damaged record, or fewer synced writes in the store than IDENTITY counted.
Result<std::unique_ptr<DecisionLog>> open_leveldb_log(const LevelDbOptions& opts);

// The in-memory log. crash() forgets every write whose batch was not synced, as a machine
// crash would; the object stays usable, like a restarted process reopening its store.
class MemoryLog final : public DecisionLog {
 public:
  MemoryLog();
  ~MemoryLog() override;

  Status for_each(const std::function<void(TxnRecord&&)>& fn) override;
  Result<std::optional<TxnRecord>> get(std::string_view gid) override;
  Result<std::optional<std::string>> get_meta(std::string_view key) override;
  Status put_meta(std::string_view key, std::string_view value) override;
  void write(std::vector<LogWrite> writes, bool sync, WriteDone done) override;
  void flush() override {}
  LogStats stats() const override;

  void crash();
  // Test hook: replaces the stored bytes of gid's record (to check corruption handling).
  void put_raw(std::string_view gid, std::string bytes);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tpc::wal
