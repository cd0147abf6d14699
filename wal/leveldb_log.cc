// LevelDbLog: the durable decision log on LevelDB, with group commit.
//
// Keys: "t/<gid>" → encode_record(record), "m/<name>" → a meta value.
//
// Group commit: write() encodes its records into a leveldb::WriteBatch on the caller's thread
// and pushes it onto a bounded queue. One writer thread takes everything queued (up to
// batch_records_max records, always at least one whole write() call), appends it into one
// WriteBatch, writes it with sync=true if any of the taken writes asked for sync, and then
// runs the callbacks in queue order. The queue lock is held only to push and to take; never
// during encoding, the LevelDB write or a callback. Reads (get, for_each, get_meta) and
// put_meta go to LevelDB directly from the caller's thread.
//
// Callbacks run on the writer thread, except a write refused because the queue is full (or
// the log is closing): its callback runs inline with unavailable. A callback must not call
// flush() (it would wait for itself); it may call write().
#include <leveldb/cache.h>
#include <leveldb/db.h>
#include <leveldb/iterator.h>
#include <leveldb/options.h>
#include <leveldb/write_batch.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <mutex>
#include <system_error>
#include <thread>

#include "wal/decision_log.h"

namespace tpc::wal {
namespace {

constexpr std::string_view kRecordPrefix = "t/";
constexpr std::string_view kMetaPrefix = "m/";

std::string record_key(std::string_view gid) {
  std::string k;
  k.reserve(kRecordPrefix.size() + gid.size());
  k.append(kRecordPrefix).append(gid);
  return k;
}

std::string meta_key(std::string_view name) {
  std::string k;
  k.reserve(kMetaPrefix.size() + name.size());
  k.append(kMetaPrefix).append(name);
  return k;
}

leveldb::Slice slice(std::string_view s) {
  return leveldb::Slice(s.data(), s.size());
}

// A LevelDB error as a Status: corruption stays corruption, everything else is io_error.
Status from_leveldb(const leveldb::Status& s, std::string_view context) {
  std::string m = std::string(context) + ": " + s.ToString();
  return s.IsCorruption() ? corruption(std::move(m)) : io_error(std::move(m));
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

// One write() call waiting for the writer thread.
struct Pending {
  leveldb::WriteBatch batch;
  size_t records = 0;
  bool sync = false;
  WriteDone done;
};

class LevelDbLog final : public DecisionLog {
 public:
  LevelDbLog(const LevelDbOptions& opts, std::unique_ptr<leveldb::Cache> cache,
             std::unique_ptr<leveldb::DB> db)
      : batch_records_max_(opts.batch_records_max),
        queue_max_(opts.queue_max),
        cache_(std::move(cache)),
        db_(std::move(db)) {
    writer_ = std::thread([this] { writer_loop(); });
  }

  ~LevelDbLog() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    queue_cv_.notify_one();
    writer_.join();  // the writer drains the queue before it returns
    db_.reset();     // the DB before the cache it uses
    cache_.reset();
  }

  Status for_each(const std::function<void(TxnRecord&&)>& fn) override {
    leveldb::ReadOptions ro;
    ro.verify_checksums = true;
    std::unique_ptr<leveldb::Iterator> it(db_->NewIterator(ro));
    for (it->Seek(slice(kRecordPrefix)); it->Valid(); it->Next()) {
      const leveldb::Slice key = it->key();
      if (!key.starts_with(slice(kRecordPrefix))) break;
      const std::string_view gid(key.data() + kRecordPrefix.size(),
                                 key.size() - kRecordPrefix.size());
      TxnRecord rec;
      TPC_RETURN_IF_ERROR(
          decode_stored(gid, std::string_view(it->value().data(), it->value().size()), rec));
      fn(std::move(rec));
    }
    if (!it->status().ok()) return from_leveldb(it->status(), "reading the decision log");
    return ok_status();
  }

  Result<std::optional<TxnRecord>> get(std::string_view gid) override {
    leveldb::ReadOptions ro;
    ro.verify_checksums = true;
    std::string bytes;
    leveldb::Status s = db_->Get(ro, record_key(gid), &bytes);
    if (s.IsNotFound()) return std::optional<TxnRecord>();
    if (!s.ok()) return from_leveldb(s, "reading gid " + std::string(gid));
    TxnRecord rec;
    TPC_RETURN_IF_ERROR(decode_stored(gid, bytes, rec));
    return std::optional<TxnRecord>(std::move(rec));
  }

  Result<std::optional<std::string>> get_meta(std::string_view key) override {
    leveldb::ReadOptions ro;
    ro.verify_checksums = true;
    std::string value;
    leveldb::Status s = db_->Get(ro, meta_key(key), &value);
    if (s.IsNotFound()) return std::optional<std::string>();
    if (!s.ok()) return from_leveldb(s, "reading meta " + std::string(key));
    return std::optional<std::string>(std::move(value));
  }

  Status put_meta(std::string_view key, std::string_view value) override {
    leveldb::WriteOptions wo;
    wo.sync = true;
    leveldb::Status s = db_->Put(wo, meta_key(key), slice(value));
    if (!s.ok()) return from_leveldb(s, "writing meta " + std::string(key));
    return ok_status();
  }

  void write(std::vector<LogWrite> writes, bool sync, WriteDone done) override {
    Pending p;
    p.records = writes.size();
    p.sync = sync;
    p.done = std::move(done);
    for (const LogWrite& w : writes) {
      TPC_ASSERT_MSG(!w.record.gid.empty(), "a decision log write needs a gid");
      if (w.kind == LogWrite::Kind::put) {
        p.batch.Put(record_key(w.record.gid), encode_record(w.record));
      } else {
        p.batch.Delete(record_key(w.record.gid));
      }
    }

    Status refused;
    {
      std::lock_guard lock(mu_);
      if (stopping_) {
        refused = unavailable("the decision log is closing");
      } else if (queue_records_ + p.records > queue_max_) {
        refused = unavailable("the decision log queue is full (" + std::to_string(queue_records_) +
                              " records waiting, queue_max " + std::to_string(queue_max_) + ")");
      } else {
        queue_records_ += p.records;
        queue_depth_.store(queue_records_, std::memory_order_relaxed);
        queue_.push_back(std::move(p));
        enqueued_ += 1;
      }
    }
    if (!refused.ok()) {
      if (p.done) p.done(std::move(refused));
      return;
    }
    queue_cv_.notify_one();
  }

  void flush() override {
    TPC_ASSERT_MSG(std::this_thread::get_id() != writer_.get_id(),
                   "flush() called from a decision log callback");
    std::unique_lock lock(mu_);
    const uint64_t target = enqueued_;
    done_cv_.wait(lock, [&] { return completed_ >= target; });
  }

  LogStats stats() const override {
    LogStats s;
    s.batches = batches_.load(std::memory_order_relaxed);
    s.synced_batches = synced_batches_.load(std::memory_order_relaxed);
    s.records_synced = records_synced_.load(std::memory_order_relaxed);
    s.records_written = records_written_.load(std::memory_order_relaxed);
    s.queue_depth = queue_depth_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  // Moves up to batch_records_max records' worth of whole writes from the queue into `out`
  // (at least one write). Called with mu_ held.
  void take_locked(std::deque<Pending>& out) {
    if (queue_records_ <= batch_records_max_) {
      out.swap(queue_);
      queue_records_ = 0;
    } else {
      size_t taken = 0;
      while (!queue_.empty() &&
             (out.empty() || taken + queue_.front().records <= batch_records_max_)) {
        taken += queue_.front().records;
        out.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      queue_records_ -= taken;
    }
    queue_depth_.store(queue_records_, std::memory_order_relaxed);
  }

  void writer_loop() {
    std::deque<Pending> taken;
    leveldb::WriteBatch group;
    for (;;) {
      {
        std::unique_lock lock(mu_);
        queue_cv_.wait(lock, [&] { return !queue_.empty() || stopping_; });
        if (queue_.empty()) return;  // stopping, and drained
        take_locked(taken);
      }
      write_group(taken, group);
      {
        std::lock_guard lock(mu_);
        completed_ += taken.size();
      }
      done_cv_.notify_all();
      taken.clear();
    }
  }

  // Writes the taken writes as one batch and runs their callbacks in order.
  void write_group(std::deque<Pending>& taken, leveldb::WriteBatch& group) {
    bool sync = false;
    size_t records = 0;
    for (const Pending& p : taken) {
      sync = sync || p.sync;
      records += p.records;
    }
    leveldb::WriteBatch* batch = &taken.front().batch;
    if (taken.size() > 1) {
      group.Clear();
      for (const Pending& p : taken) group.Append(p.batch);
      batch = &group;
    }
    leveldb::WriteOptions wo;
    wo.sync = sync;
    const leveldb::Status s = db_->Write(wo, batch);

    batches_.fetch_add(1, std::memory_order_relaxed);
    records_written_.fetch_add(records, std::memory_order_relaxed);
    if (sync) {
      synced_batches_.fetch_add(1, std::memory_order_relaxed);
      records_synced_.fetch_add(records, std::memory_order_relaxed);
    }

    const Status status = s.ok() ? ok_status()
                                 : io_error("writing " + std::to_string(records) +
                                            " records to the decision log: " + s.ToString());
    for (Pending& p : taken) {
      if (p.done) p.done(status);
    }
  }

  const size_t batch_records_max_;
  const size_t queue_max_;
  std::unique_ptr<leveldb::Cache> cache_;
  std::unique_ptr<leveldb::DB> db_;

  std::mutex mu_;
  std::condition_variable queue_cv_;  // the writer waits here for work
  std::condition_variable done_cv_;   // flush() waits here
  std::deque<Pending> queue_;         // guarded by mu_
  size_t queue_records_ = 0;          // records in queue_; guarded by mu_
  uint64_t enqueued_ = 0;             // write() calls accepted; guarded by mu_
  uint64_t completed_ = 0;            // write() calls whose callback ran; guarded by mu_
  bool stopping_ = false;             // guarded by mu_

  std::atomic<uint64_t> batches_{0};
  std::atomic<uint64_t> synced_batches_{0};
  std::atomic<uint64_t> records_synced_{0};
  std::atomic<uint64_t> records_written_{0};
  std::atomic<uint64_t> queue_depth_{0};

  std::thread writer_;  // last: starts after every member above is constructed
};

Status open_error(const std::string& dir, const std::string& detail) {
  return io_error("cannot open the decision log in " + dir + ": " + detail);
}

}  // namespace

Result<std::unique_ptr<DecisionLog>> open_leveldb_log(const LevelDbOptions& opts) {
  if (opts.dir.empty()) return open_error("\"\"", "no directory given");
  if (opts.batch_records_max == 0 || opts.queue_max == 0) {
    return invalid_argument("decision log: batch_records_max and queue_max must be positive");
  }
  std::error_code ec;
  std::filesystem::create_directories(opts.dir, ec);
  if (ec) return open_error(opts.dir, "cannot create the directory: " + ec.message());

  auto cache = std::unique_ptr<leveldb::Cache>(leveldb::NewLRUCache(opts.block_cache_bytes));
  leveldb::Options lo;
  lo.create_if_missing = true;
  lo.paranoid_checks = true;
  lo.block_cache = cache.get();
  lo.write_buffer_size = opts.write_buffer_bytes;
  // Records are short and mostly distinct ids: Snappy saves little and costs CPU on every write.
  lo.compression = leveldb::kNoCompression;

  leveldb::DB* raw = nullptr;
  const leveldb::Status s = leveldb::DB::Open(lo, opts.dir, &raw);
  if (!s.ok()) {
    std::string detail = s.ToString();
    // LevelDB reports a held LOCK file as "IO error: lock <dir>/LOCK: ...".
    if (detail.find("lock ") != std::string::npos && detail.find("/LOCK") != std::string::npos) {
      detail += " (the store is locked: another process may be using it)";
    }
    if (s.IsCorruption()) {
      return corruption("cannot open the decision log in " + opts.dir + ": " + detail);
    }
    return open_error(opts.dir, detail);
  }
  std::unique_ptr<leveldb::DB> db(raw);
  return std::unique_ptr<DecisionLog>(
      std::make_unique<LevelDbLog>(opts, std::move(cache), std::move(db)));
}

}  // namespace tpc::wal
