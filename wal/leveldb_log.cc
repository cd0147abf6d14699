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
//
// Integrity. LevelDB runs with paranoid_checks and every read verifies checksums, so a damaged
// record inside the store fails the open or the read. LevelDB's log reader (db/log_reader.cc,
// 1.23) still drops a damaged *tail* of the .log silently, even with paranoid_checks: a header
// cut short at the end of the file, a length field pointing past the end of the file, or a
// fragmented record missing its last part are all taken for a writer that died mid-write and
// reported as plain EOF; a zero type with zero length skips the rest of its 32 KiB block
// without a report. Three checks cover what that leaves open:
//  * DIR/IDENTITY, written with fsync + rename when the store is created, names the
//    coordinator id and creation time. A store is only ever created in a directory without
//    IDENTITY and without LevelDB files; with IDENTITY present LevelDB opens with
//    create_if_missing=false (a deleted CURRENT is refused, not replaced by an empty store);
//    LevelDB files without IDENTITY, or an IDENTITY naming another id, are refused.
//  * Every synced write (a group-commit batch or put_meta) carries, in the same atomic
//    WriteBatch, the key "i/synced_writes" = its sequence number n (1, 2, 3, ...).
//  * A checkpoint thread copies the highest n whose fsync LevelDB has acknowledged into
//    IDENTITY (synced_writes), at most every identity_sync_interval_ms, and once more at close
//    after the writer drained. IDENTITY is therefore never ahead of the store. At open the
//    store's "i/synced_writes" must be >= IDENTITY's: losing any synced write numbered at or
//    below the checkpoint also loses its counter (the key only grows, and the tail is what is
//    dropped), so the open is refused.
// What remains undetected: synced writes acknowledged after the last checkpoint, i.e. at most
// the last identity_sync_interval_ms (plus one checkpoint fsync) before a crash; none after a
// clean close. A drop in the middle of the .log that leaves later batches intact (LevelDB's
// zero-type skip) keeps the counter and is not detected by it.
#include <fcntl.h>
#include <leveldb/cache.h>
#include <leveldb/db.h>
#include <leveldb/iterator.h>
#include <leveldb/options.h>
#include <leveldb/write_batch.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>

#include "wal/decision_log.h"

namespace tpc::wal {
namespace {

constexpr std::string_view kRecordPrefix = "t/";
constexpr std::string_view kMetaPrefix = "m/";
// The sequence number of the last synced write, updated inside every synced batch.
constexpr std::string_view kSyncedWritesKey = "i/synced_writes";
constexpr char kIdentityFile[] = "IDENTITY";
constexpr std::string_view kIdentityMagic = "tpc-decision-log 1";
constexpr size_t kIdentityBytesMax = 4096;

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

// DIR/IDENTITY: what the directory belongs to, and the checkpoint of synced writes.
struct Identity {
  std::string coordinator_id;
  int64_t created_ms = 0;
  uint64_t synced_writes = 0;  // every synced write up to this number was acknowledged
};

std::string identity_path(const std::string& dir) {
  return dir + "/" + kIdentityFile;
}

std::string format_identity(const Identity& id) {
  return std::string(kIdentityMagic) + "\ncoordinator " + id.coordinator_id + "\ncreated_ms " +
         std::to_string(id.created_ms) + "\nsynced_writes " + std::to_string(id.synced_writes) +
         "\n";
}

std::optional<uint64_t> parse_u64(std::string_view s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

// The value of "name value" on `line`, or nullopt when the line is another field.
std::optional<std::string> field(const std::string& line, std::string_view name) {
  if (line.size() <= name.size() || line.compare(0, name.size(), name) != 0 ||
      line[name.size()] != ' ') {
    return std::nullopt;
  }
  return line.substr(name.size() + 1);
}

Result<Identity> parse_identity(const std::string& text) {
  std::istringstream in(text);
  std::string magic, coord, created, synced;
  std::getline(in, magic);
  std::getline(in, coord);
  std::getline(in, created);
  std::getline(in, synced);
  Identity id;
  auto c = field(coord, "coordinator");
  auto t = field(created, "created_ms");
  auto n = field(synced, "synced_writes");
  auto created_ms = t ? parse_u64(*t) : std::nullopt;
  auto synced_writes = n ? parse_u64(*n) : std::nullopt;
  if (magic != kIdentityMagic || !c || c->empty() || !created_ms || !synced_writes) {
    return corruption("its IDENTITY file is malformed");
  }
  id.coordinator_id = *c;
  id.created_ms = static_cast<int64_t>(*created_ms);
  id.synced_writes = *synced_writes;
  return id;
}

// nullopt when DIR/IDENTITY does not exist.
Result<std::optional<Identity>> read_identity(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(identity_path(dir), ec)) {
    if (ec) return io_error("cannot read its IDENTITY file: " + ec.message());
    return std::optional<Identity>();
  }
  std::ifstream f(identity_path(dir), std::ios::binary);
  std::string text(kIdentityBytesMax + 1, '\0');
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (f.bad()) return io_error("cannot read its IDENTITY file");
  text.resize(static_cast<size_t>(f.gcount()));
  if (text.size() > kIdentityBytesMax) return corruption("its IDENTITY file is malformed");
  Result<Identity> id = parse_identity(text);
  if (!id.ok()) return id.status();
  return std::optional<Identity>(std::move(id).value());
}

Status errno_error(const std::string& what) {
  return io_error(what + ": " + std::strerror(errno));
}

Status fsync_path(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return errno_error("cannot open " + path);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return errno_error("cannot fsync " + path);
  return ok_status();
}

// Replaces DIR/IDENTITY atomically and durably: write a temporary file, fsync it, rename it
// over IDENTITY, fsync the directory.
Status write_identity(const std::string& dir, const Identity& id) {
  const std::string path = identity_path(dir);
  const std::string tmp = path + ".tmp";
  const std::string text = format_identity(id);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno_error("cannot create " + tmp);
  ssize_t n = ::write(fd, text.data(), text.size());
  bool ok = n == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
  Status st = ok ? ok_status() : errno_error("cannot write " + tmp);
  ::close(fd);
  if (!st.ok()) return st;
  if (::rename(tmp.c_str(), path.c_str()) != 0) return errno_error("cannot rename " + tmp);
  return fsync_path(dir, O_RDONLY | O_DIRECTORY);
}

// True when dir holds files of a LevelDB store (CURRENT, a MANIFEST, a .log or a table). LOCK
// and the info log LOG are left by any open attempt, even one that created nothing.
bool has_leveldb_files(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (name == "CURRENT" || name.rfind("MANIFEST-", 0) == 0 || ext == ".log" || ext == ".ldb" ||
        ext == ".sst") {
      return true;
    }
  }
  return false;
}

int64_t now_wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
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
  // synced_writes: the store's "i/synced_writes" at open; identity.synced_writes <= it.
  LevelDbLog(const LevelDbOptions& opts, Identity identity, uint64_t synced_writes,
             std::unique_ptr<leveldb::Cache> cache, std::unique_ptr<leveldb::DB> db)
      : batch_records_max_(opts.batch_records_max),
        queue_max_(opts.queue_max),
        dir_(opts.dir),
        identity_interval_(std::chrono::milliseconds(opts.identity_sync_interval_ms)),
        cache_(std::move(cache)),
        db_(std::move(db)),
        identity_(std::move(identity)),
        synced_writes_(synced_writes),
        acked_writes_(synced_writes) {
    writer_ = std::thread([this] { writer_loop(); });
    identity_thread_ = std::thread([this] { identity_loop(); });
  }

  ~LevelDbLog() override {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    queue_cv_.notify_one();
    writer_.join();  // the writer drains the queue before it returns
    {
      std::lock_guard lock(identity_mu_);
      identity_stopping_ = true;
    }
    identity_cv_.notify_one();
    identity_thread_.join();  // writes the final checkpoint first
    db_.reset();              // the DB before the cache it uses
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

  // Goes through the writer thread like write(), so that it carries the synced-write counter.
  Status put_meta(std::string_view key, std::string_view value) override {
    TPC_ASSERT_MSG(std::this_thread::get_id() != writer_.get_id(),
                   "put_meta() called from a decision log callback");
    Pending p;
    p.batch.Put(meta_key(key), slice(value));
    p.records = 1;
    p.sync = true;
    std::promise<Status> result;
    auto f = result.get_future();
    p.done = [&result](Status s) { result.set_value(std::move(s)); };
    enqueue(std::move(p));
    Status s = f.get();
    if (!s.ok()) return Status(s.code(), "writing meta " + std::string(key) + ": " + s.message());
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
    enqueue(std::move(p));
  }

  void enqueue(Pending p) {
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
    const Status identity_error = identity_status();
    leveldb::Status s;
    if (identity_error.ok()) {
      // The counter goes into the same atomic batch as the records it counts.
      const uint64_t n = synced_writes_ + 1;
      if (sync) batch->Put(slice(kSyncedWritesKey), std::to_string(n));
      leveldb::WriteOptions wo;
      wo.sync = sync;
      s = db_->Write(wo, batch);
      if (sync && s.ok()) {
        synced_writes_ = n;
        acknowledge(n);
      }
    }

    batches_.fetch_add(1, std::memory_order_relaxed);
    records_written_.fetch_add(records, std::memory_order_relaxed);
    if (sync) {
      synced_batches_.fetch_add(1, std::memory_order_relaxed);
      records_synced_.fetch_add(records, std::memory_order_relaxed);
    }

    const Status status = !identity_error.ok() ? identity_error
                          : s.ok()             ? ok_status()
                                               : io_error("writing " + std::to_string(records) +
                                                          " records to the decision log: " + s.ToString());
    for (Pending& p : taken) {
      if (p.done) p.done(status);
    }
  }

  // The writer made synced write n durable: the checkpoint thread may copy it into IDENTITY.
  void acknowledge(uint64_t n) {
    {
      std::lock_guard lock(identity_mu_);
      acked_writes_ = n;
    }
    identity_cv_.notify_one();
  }

  // ok, or the error of a failed IDENTITY update; once it failed, every later write fails.
  Status identity_status() {
    std::lock_guard lock(identity_mu_);
    return identity_error_;
  }

  // Copies the acknowledged synced-write count into IDENTITY, at most once per
  // identity_interval_, and a last time when the log closes (after the writer drained).
  void identity_loop() {
    std::unique_lock lock(identity_mu_);
    for (;;) {
      identity_cv_.wait(
          lock, [&] { return identity_stopping_ || acked_writes_ > identity_.synced_writes; });
      if (acked_writes_ > identity_.synced_writes) {
        Identity next = identity_;
        next.synced_writes = acked_writes_;
        lock.unlock();
        Status st = write_identity(dir_, next);
        lock.lock();
        if (!st.ok()) {
          identity_error_ = io_error("updating the decision log's IDENTITY file: " + st.message());
          return;
        }
        identity_ = std::move(next);
      }
      if (identity_stopping_) {
        // The close may have come while IDENTITY was being written: write the last count too.
        if (acked_writes_ > identity_.synced_writes) continue;
        return;
      }
      identity_cv_.wait_for(lock, identity_interval_, [&] { return identity_stopping_; });
    }
  }

  const size_t batch_records_max_;
  const size_t queue_max_;
  const std::string dir_;
  const std::chrono::milliseconds identity_interval_;
  std::unique_ptr<leveldb::Cache> cache_;
  std::unique_ptr<leveldb::DB> db_;

  std::mutex identity_mu_;
  std::condition_variable identity_cv_;  // the checkpoint thread waits here
  Identity identity_;                    // as last written to IDENTITY; guarded by identity_mu_
  uint64_t synced_writes_;               // last synced write number; writer thread only
  uint64_t acked_writes_;                // last acknowledged synced write; guarded by identity_mu_
  Status identity_error_;                // guarded by identity_mu_
  bool identity_stopping_ = false;       // guarded by identity_mu_

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

  std::thread writer_;  // last: start after every member above is constructed
  std::thread identity_thread_;
};

Status open_error(const std::string& dir, const std::string& detail) {
  return io_error("cannot open the decision log in " + dir + ": " + detail);
}

// A store that fails an integrity check: one line, naming the directory and the problem.
Status refuse(const std::string& dir, const std::string& detail) {
  return corruption("refusing to open the decision log in " + dir + ": " + detail);
}

// The identity of opts.dir, and whether the store is to be created. Refuses a directory
// whose files do not match: see the integrity notes at the top of the file.
Result<std::pair<Identity, bool>> check_identity(const LevelDbOptions& opts) {
  auto found = read_identity(opts.dir);
  if (!found.ok()) {
    if (found.status().code() == Code::corruption)
      return refuse(opts.dir, found.status().message());
    return open_error(opts.dir, found.status().message());
  }
  if (!found->has_value()) {
    if (has_leveldb_files(opts.dir)) {
      return refuse(opts.dir,
                    "it holds LevelDB files but no IDENTITY file (removed, or the directory "
                    "was not initialised by tpc-coordinator)");
    }
    return std::make_pair(Identity{opts.coordinator_id, now_wall_ms(), 0}, true);
  }
  Identity id = std::move(**found);
  if (id.coordinator_id != opts.coordinator_id) {
    return refuse(opts.dir, "its IDENTITY names coordinator \"" + id.coordinator_id + "\", not \"" +
                                opts.coordinator_id + "\"");
  }
  return std::make_pair(std::move(id), false);
}

// The store's synced-write counter (0 in a store that has none yet).
Result<uint64_t> read_synced_writes(leveldb::DB& db, const std::string& dir) {
  leveldb::ReadOptions ro;
  ro.verify_checksums = true;
  std::string value;
  leveldb::Status s = db.Get(ro, slice(kSyncedWritesKey), &value);
  if (s.IsNotFound()) return uint64_t{0};
  if (!s.ok()) return refuse(dir, "reading its synced-write counter: " + s.ToString());
  auto n = parse_u64(value);
  if (!n) return refuse(dir, "its synced-write counter is not a number");
  return *n;
}

}  // namespace

Result<std::unique_ptr<DecisionLog>> open_leveldb_log(const LevelDbOptions& opts) {
  if (opts.dir.empty()) return open_error("\"\"", "no directory given");
  if (opts.batch_records_max == 0 || opts.queue_max == 0 || opts.identity_sync_interval_ms <= 0) {
    return invalid_argument(
        "decision log: batch_records_max, queue_max and identity_sync_interval_ms must be "
        "positive");
  }
  std::error_code ec;
  std::filesystem::create_directories(opts.dir, ec);
  if (ec) return open_error(opts.dir, "cannot create the directory: " + ec.message());
  auto checked = check_identity(opts);
  if (!checked.ok()) return checked.status();
  auto [identity, create] = std::move(checked).value();

  auto cache = std::unique_ptr<leveldb::Cache>(leveldb::NewLRUCache(opts.block_cache_bytes));
  leveldb::Options lo;
  // A store is created only in a directory without IDENTITY and without LevelDB files.
  lo.create_if_missing = create;
  lo.error_if_exists = create;
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
      return open_error(opts.dir, detail);
    }
    if (!create && s.IsInvalidArgument()) {
      return refuse(opts.dir,
                    "it has an IDENTITY file but its LevelDB store is missing (" + detail + ")");
    }
    if (s.IsCorruption()) {
      return corruption("cannot open the decision log in " + opts.dir + ": " + detail);
    }
    return open_error(opts.dir, detail);
  }
  std::unique_ptr<leveldb::DB> db(raw);
  auto stored = read_synced_writes(*db, opts.dir);
  if (!stored.ok()) return stored.status();
  if (*stored < identity.synced_writes) {
    return refuse(opts.dir, "synced writes were lost: the store ends at synced write " +
                                std::to_string(*stored) + " but write " +
                                std::to_string(identity.synced_writes) +
                                " was acknowledged (a damaged or truncated .log?)");
  }
  if (create) {
    Status st = write_identity(opts.dir, identity);
    if (!st.ok()) return open_error(opts.dir, st.message());
  }
  return std::unique_ptr<DecisionLog>(std::make_unique<LevelDbLog>(
      opts, std::move(identity), *stored, std::move(cache), std::move(db)));
}

}  // namespace tpc::wal
