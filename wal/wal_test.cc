// Tests of the decision log: the record codec and CRC-32C, MemoryLog's crash model, and the
// LevelDB log (durability across reopen, corruption, group commit, limits, open errors).
#include <doctest/doctest.h>
#include <leveldb/db.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <mutex>
#include <thread>

#include "wal/decision_log.h"
#include "wal/record.h"

namespace tpc::wal {
namespace {

namespace fs = std::filesystem;

// ---- helpers -------------------------------------------------------------------------------

TxnRecord full_record(std::string gid, Decision d = Decision::commit) {
  TxnRecord r;
  r.gid = std::move(gid);
  r.protocol = tpc::Protocol::three_phase;
  r.decision = d;
  r.ended = true;
  r.heuristic_mixed = true;
  r.decided_wall_ms = 1'700'000'000'123;
  r.ended_wall_ms = 1'700'000'004'567;
  r.branches = {
      {"a1", "http://127.0.0.1:7401", BranchOutcome::committed},
      {"a2", "http://127.0.0.1:7402", BranchOutcome::read_only},
      {"a3", "http://[::1]:7403/agent", BranchOutcome::forced},
  };
  return r;
}

TxnRecord small_record(std::string gid) {
  TxnRecord r;
  r.gid = std::move(gid);
  r.decided_wall_ms = 42;
  r.branches = {{"a1", "http://a1", BranchOutcome::pending}};
  return r;
}

// A fresh directory under the temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "tpc-wal-test-XXXXXX").string();
    TPC_ASSERT(mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }
  std::string sub(const char* name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::unique_ptr<DecisionLog> open_log(const std::string& dir, size_t batch_records_max = 4096,
                                      size_t queue_max = 1'000'000) {
  LevelDbOptions o;
  o.dir = dir;
  o.batch_records_max = batch_records_max;
  o.queue_max = queue_max;
  auto r = open_leveldb_log(o);
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  return std::move(r).value();
}

// Writes and waits for the callback.
Status write_wait(DecisionLog& log, std::vector<LogWrite> writes, bool sync = true) {
  std::promise<Status> p;
  auto f = p.get_future();
  log.write(std::move(writes), sync, [&p](Status s) { p.set_value(std::move(s)); });
  return f.get();
}

Status put_wait(DecisionLog& log, TxnRecord r, bool sync = true) {
  std::vector<LogWrite> w;
  w.push_back(LogWrite::put(std::move(r)));
  return write_wait(log, std::move(w), sync);
}

std::vector<TxnRecord> read_all(DecisionLog& log) {
  std::vector<TxnRecord> out;
  Status s = log.for_each([&](TxnRecord&& r) { out.push_back(std::move(r)); });
  REQUIRE_MESSAGE(s.ok(), s.to_string());
  return out;
}

std::vector<std::string> gids_of(const std::vector<TxnRecord>& records) {
  std::vector<std::string> g;
  for (const auto& r : records) g.push_back(r.gid);
  return g;
}

// Holds the writer thread inside a callback until released, so that writes pile up in the
// queue deterministically.
class Gate {
 public:
  void enter_and_wait() {
    std::unique_lock lock(mu_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  void wait_entered() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return entered_; });
  }
  void release() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
};

// Queues a first synced write whose callback blocks the writer thread on the gate.
void block_writer(DecisionLog& log, Gate& gate) {
  std::vector<LogWrite> w;
  w.push_back(LogWrite::put(small_record("blocker")));
  log.write(std::move(w), true, [&gate](Status s) {
    CHECK(s.ok());
    gate.enter_and_wait();
  });
  gate.wait_entered();
}

// The payload of an encoded value with a recomputed checksum: lets a test reach the decoder
// behind the checksum.
std::string reseal(std::string value, const std::string& payload) {
  value.resize(1);
  const uint32_t crc = crc32c(payload);
  for (int i = 0; i < 4; ++i) value.push_back(static_cast<char>((crc >> (8 * i)) & 0xff));
  value += payload;
  return value;
}

uint32_t crc32c_bitwise(std::string_view data) {
  uint32_t crc = ~0u;
  for (unsigned char c : data) {
    crc ^= c;
    for (int k = 0; k < 8; ++k) crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

// ---- CRC-32C -------------------------------------------------------------------------------

TEST_CASE("crc32c gives the standard check values") {
  CHECK(crc32c("123456789") == 0xE3069283u);
  CHECK(crc32c("") == 0u);
  // RFC 3720 (iSCSI), B.4.
  CHECK(crc32c(std::string(32, '\0')) == 0x8A9136AAu);
  CHECK(crc32c(std::string(32, '\xff')) == 0x62A8AB43u);
  std::string inc, dec;
  for (int i = 0; i < 32; ++i) {
    inc.push_back(static_cast<char>(i));
    dec.push_back(static_cast<char>(31 - i));
  }
  CHECK(crc32c(inc) == 0x46DD794Eu);
  CHECK(crc32c(dec) == 0x113FDB5Cu);
}

TEST_CASE("crc32c slice-by-8 agrees with the bitwise definition at every length and offset") {
  std::string data;
  uint32_t x = 12345;
  for (int i = 0; i < 300; ++i) {
    x = x * 1103515245u + 12345u;
    data.push_back(static_cast<char>(x >> 16));
  }
  for (size_t off = 0; off < 9; ++off) {
    for (size_t len = 0; off + len <= data.size(); len += 7) {
      const std::string_view s = std::string_view(data).substr(off, len);
      REQUIRE(crc32c(s) == crc32c_bitwise(s));
    }
  }
}

// ---- record codec --------------------------------------------------------------------------

TEST_CASE("a record with every field set survives encode and decode, for every decision") {
  const Decision decisions[] = {Decision::commit, Decision::precommit, Decision::one_phase,
                                Decision::aborted, Decision::committed_read_only};
  for (Decision d : decisions) {
    TxnRecord r = full_record("c1-7-123456", d);
    auto back = decode_record(encode_record(r));
    REQUIRE_MESSAGE(back.ok(), back.status().to_string());
    CHECK(*back == r);
  }
}

TEST_CASE("every branch outcome, extreme integers and empty strings round-trip") {
  TxnRecord r;
  r.gid = "g";
  r.protocol = tpc::Protocol::two_phase;
  r.decision = Decision::one_phase;
  r.decided_wall_ms = INT64_MIN;
  r.ended_wall_ms = INT64_MAX;
  const BranchOutcome outcomes[] = {BranchOutcome::pending, BranchOutcome::committed,
                                    BranchOutcome::aborted, BranchOutcome::read_only,
                                    BranchOutcome::forced};
  for (BranchOutcome o : outcomes) r.branches.push_back({"", "", o});
  r.branches.push_back({std::string(300, 'p'), std::string(70'000, 'u'), BranchOutcome::pending});
  auto back = decode_record(encode_record(r));
  REQUIRE_MESSAGE(back.ok(), back.status().to_string());
  CHECK(*back == r);

  TxnRecord empty;
  empty.gid = "e";
  empty.decided_wall_ms = -1;
  auto back2 = decode_record(encode_record(empty));
  REQUIRE(back2.ok());
  CHECK(*back2 == empty);
}

TEST_CASE("a flipped bit anywhere in an encoded record is detected") {
  const std::string value = encode_record(full_record("c1-7-9"));
  for (size_t byte = 0; byte < value.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = value;
      bad[byte] = static_cast<char>(bad[byte] ^ (1 << bit));
      auto r = decode_record(bad);
      REQUIRE_MESSAGE(!r.ok(), "byte ", byte, " bit ", bit);
      REQUIRE(r.status().code() == Code::corruption);
    }
  }
}

TEST_CASE("a bad checksum is reported as a checksum mismatch") {
  std::string value = encode_record(full_record("c1-7-9"));
  value.back() = static_cast<char>(value.back() ^ 0x10);
  auto r = decode_record(value);
  REQUIRE(!r.ok());
  CHECK(r.status().code() == Code::corruption);
  CHECK(r.status().message().find("checksum mismatch") != std::string::npos);
}

TEST_CASE("an unknown record version is refused") {
  for (int version : {0, 3, 255}) {
    std::string value = encode_record(full_record("c1-7-9"));
    value[0] = static_cast<char>(version);
    auto r = decode_record(value);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == Code::corruption);
    CHECK(r.status().message().find("unknown version " + std::to_string(version)) !=
          std::string::npos);
  }
}

TEST_CASE("a record truncated at any length is refused") {
  const std::string value = encode_record(full_record("c1-7-9"));
  for (size_t len = 0; len < value.size(); ++len) {
    auto r = decode_record(std::string_view(value).substr(0, len));
    REQUIRE_MESSAGE(!r.ok(), "length ", len);
    REQUIRE(r.status().code() == Code::corruption);
  }
}

TEST_CASE("a payload cut short behind a matching checksum is refused as truncated") {
  const std::string value = encode_record(full_record("c1-7-9"));
  const std::string payload = value.substr(5);
  for (size_t len = 0; len < payload.size(); ++len) {
    auto r = decode_record(reseal(value, payload.substr(0, len)));
    REQUIRE_MESSAGE(!r.ok(), "payload length ", len);
    REQUIRE(r.status().code() == Code::corruption);
  }
  auto r = decode_record(reseal(value, payload.substr(0, payload.size() - 1)));
  CHECK(r.status().message().find("truncated") != std::string::npos);
}

TEST_CASE("trailing bytes behind a matching checksum are refused") {
  const std::string value = encode_record(full_record("c1-7-9"));
  auto r = decode_record(reseal(value, value.substr(5) + "x"));
  REQUIRE(!r.ok());
  CHECK(r.status().code() == Code::corruption);
  CHECK(r.status().message().find("trailing") != std::string::npos);
}

TEST_CASE("out-of-range enum values and flags behind a matching checksum are refused") {
  // Payload layout: [gid len = 6]["c1-7-9"][protocol][decision][flags]...
  const std::string value = encode_record(full_record("c1-7-9"));
  const std::string payload = value.substr(5);
  const size_t protocol_at = 1 + 6, decision_at = protocol_at + 1, flags_at = decision_at + 1;
  REQUIRE(payload[protocol_at] == 3);
  REQUIRE(payload[decision_at] == static_cast<char>(Decision::commit));

  auto with = [&](size_t at, int v) {
    std::string p = payload;
    p[at] = static_cast<char>(v);
    return decode_record(reseal(value, p));
  };
  for (int v : {0, 6, 7, 8, 255}) {  // 6 and 7 are TCC's and saga's own
    auto r = with(decision_at, v);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == Code::corruption);
    CHECK(r.status().message().find("decision") != std::string::npos);
  }
  for (int v : {0, 1, 4, 5, 6}) {  // 4 and 5 (TCC, saga) only in version 2 records
    auto r = with(protocol_at, v);
    REQUIRE(!r.ok());
    CHECK(r.status().message().find("protocol") != std::string::npos);
  }
  {
    auto r = with(flags_at, 4);
    REQUIRE(!r.ok());
    CHECK(r.status().message().find("flags") != std::string::npos);
  }
  // The last byte is the third branch's outcome.
  for (int v : {5, 200}) {
    auto r = with(payload.size() - 1, v);
    REQUIRE(!r.ok());
    CHECK(r.status().code() == Code::corruption);
    CHECK(r.status().message().find("outcome") != std::string::npos);
  }
}

TxnRecord saga_record(Decision d = Decision::running) {
  TxnRecord r;
  r.gid = "c1-7-77";
  r.protocol = tpc::Protocol::saga;
  r.decision = d;
  r.decided_wall_ms = 1'700'000'000'000;
  r.options = R"({"recovery":"backward","retry":{"max_attempts":5}})";
  BranchRecord debit{"debit", "", BranchOutcome::committed};
  debit.state = 9;
  debit.attempts = 3;
  debit.ops = {{StepOp::action, R"({"url":"http://127.0.0.1:9/a","body":{"n":1}})"},
               {StepOp::compensate, R"({"participant":"bank_a","statements":[]})"}};
  debit.result = R"({"ok":true})";
  debit.last_error = "503 from http://127.0.0.1:9/a";
  r.branches = {debit, BranchRecord{"credit", "", BranchOutcome::pending}};
  return r;
}

TEST_CASE("version 2: TCC and saga records keep their branches' ops, states and options") {
  for (Decision d : {Decision::running, Decision::commit, Decision::aborted}) {
    TxnRecord r = saga_record(d);
    std::string value = encode_record(r);
    CHECK(static_cast<uint8_t>(value[0]) == kRecordVersionOps);
    auto back = decode_record(value);
    REQUIRE_MESSAGE(back.ok(), back.status().to_string());
    CHECK(*back == r);
  }
  TxnRecord tcc = saga_record(Decision::registered);
  tcc.protocol = tpc::Protocol::tcc;
  auto back = decode_record(encode_record(tcc));
  REQUIRE_MESSAGE(back.ok(), back.status().to_string());
  CHECK(*back == tcc);
  // 2PC and 3PC records stay version 1, readable by the builds before version 2.
  CHECK(static_cast<uint8_t>(encode_record(full_record("c1-7-1"))[0]) == kRecordVersion);
}

TEST_CASE("version 2: a decision of another protocol, a bad op or a cut record is refused") {
  TxnRecord running_tcc = saga_record(Decision::running);
  running_tcc.protocol = tpc::Protocol::tcc;
  auto a = decode_record(encode_record(running_tcc));
  REQUIRE(!a.ok());
  CHECK(a.status().message().find("running in a tcc record") != std::string::npos);
  TxnRecord precommit_saga = saga_record(Decision::precommit);
  CHECK(!decode_record(encode_record(precommit_saga)).ok());

  const std::string value = encode_record(saga_record());
  for (size_t len = 5; len < value.size(); ++len) {
    auto r = decode_record(reseal(value, value.substr(5, len - 5)));
    REQUIRE_MESSAGE(!r.ok(), "payload length ", len - 5);
  }
  // The first op byte of the first branch: gid, protocol, decision, flags, two times, the
  // count, the branch's two strings, its outcome, state and attempts, the op count.
  std::string payload = value.substr(5);
  const size_t op_at = 1 + 7 + 3 + 6 + 1 + 1 + 6 + 1 + 1 + 1 + 1 + 1;
  REQUIRE(payload[op_at] == static_cast<char>(StepOp::action));
  payload[op_at] = static_cast<char>(tpc::kStepOps);
  auto b = decode_record(reseal(value, payload));
  REQUIRE(!b.ok());
  CHECK(b.status().message().find("op: value " + std::to_string(tpc::kStepOps)) !=
        std::string::npos);
  // A half message is msg's alone.
  TxnRecord half_saga = saga_record(Decision::half);
  auto c = decode_record(encode_record(half_saga));
  REQUIRE(!c.ok());
  CHECK(c.status().message().find("half in a saga record") != std::string::npos);
  TxnRecord half = saga_record(Decision::half);
  half.protocol = tpc::Protocol::msg;
  auto d = decode_record(encode_record(half));
  REQUIRE(d.ok());
  CHECK(*d == half);
}

TEST_CASE("a decision moves only from registered, running or half, to commit or aborted") {
  CHECK(decision_may_follow(Decision::half, Decision::commit));
  CHECK(decision_may_follow(Decision::half, Decision::aborted));
  CHECK_FALSE(decision_may_follow(Decision::commit, Decision::half));
  CHECK_FALSE(decision_may_follow(Decision::half, Decision::running));
  CHECK(decision_may_follow(Decision::registered, Decision::commit));
  CHECK(decision_may_follow(Decision::registered, Decision::aborted));
  CHECK(decision_may_follow(Decision::running, Decision::commit));
  CHECK(decision_may_follow(Decision::running, Decision::aborted));
  CHECK(decision_may_follow(Decision::commit, Decision::commit));
  CHECK_FALSE(decision_may_follow(Decision::commit, Decision::aborted));
  CHECK_FALSE(decision_may_follow(Decision::aborted, Decision::commit));
  CHECK_FALSE(decision_may_follow(Decision::running, Decision::registered));
  CHECK_FALSE(decision_may_follow(Decision::aborted, Decision::running));
  CHECK_FALSE(decision_may_follow(Decision::precommit, Decision::aborted));
}

TEST_CASE("a branch count larger than the bytes left is refused without allocating") {
  TxnRecord r;
  r.gid = "g";
  const std::string value = encode_record(r);
  std::string payload = value.substr(5);
  payload.pop_back();                 // the count 0
  payload += "\xff\xff\xff\xff\x0f";  // 2^32 - 1 branches
  auto d = decode_record(reseal(value, payload));
  REQUIRE(!d.ok());
  CHECK(d.status().message().find("branch count") != std::string::npos);
}

TEST_CASE("decisions and outcomes have stable names") {
  CHECK(decision_name(Decision::commit) == "commit");
  CHECK(decision_name(Decision::precommit) == "precommit");
  CHECK(decision_name(Decision::one_phase) == "one_phase");
  CHECK(decision_name(Decision::aborted) == "aborted");
  CHECK(decision_name(Decision::committed_read_only) == "committed_read_only");
  CHECK(decision_name(Decision::registered) == "registered");
  CHECK(decision_name(Decision::running) == "running");
  CHECK(outcome_name(BranchOutcome::pending) == "pending");
  CHECK(outcome_name(BranchOutcome::committed) == "committed");
  CHECK(outcome_name(BranchOutcome::aborted) == "aborted");
  CHECK(outcome_name(BranchOutcome::read_only) == "read_only");
  CHECK(outcome_name(BranchOutcome::forced) == "forced");
}

// ---- MemoryLog -----------------------------------------------------------------------------

TEST_CASE("memory log: a crash drops unsynced writes and keeps all up to the last synced one") {
  MemoryLog log;
  CHECK(put_wait(log, small_record("a"), false).ok());  // unsynced, made durable by "b"
  CHECK(put_wait(log, small_record("b"), true).ok());
  CHECK(put_wait(log, small_record("c"), false).ok());         // unsynced, lost
  CHECK(write_wait(log, {LogWrite::erase("a")}, false).ok());  // unsynced, lost
  CHECK(gids_of(read_all(log)) == std::vector<std::string>{"b", "c"});

  log.crash();
  CHECK(gids_of(read_all(log)) == std::vector<std::string>{"a", "b"});
  CHECK(!log.get("c")->has_value());

  // Still usable after the crash; put_meta is synced and so makes earlier writes durable.
  CHECK(put_wait(log, small_record("d"), false).ok());
  CHECK(log.put_meta("epoch", "7").ok());
  log.crash();
  CHECK(gids_of(read_all(log)) == std::vector<std::string>{"a", "b", "d"});
  CHECK(log.get_meta("epoch")->value() == "7");
  CHECK(!log.get_meta("other")->has_value());
}

TEST_CASE("memory log: an overwrite keeps the newest record, erase removes, order is by key") {
  MemoryLog log;
  TxnRecord first = full_record("g2");
  TxnRecord second = full_record("g2", Decision::precommit);
  second.branches[0].outcome = BranchOutcome::aborted;
  CHECK(put_wait(log, first).ok());
  CHECK(put_wait(log, small_record("g3")).ok());
  CHECK(put_wait(log, small_record("g1")).ok());
  CHECK(put_wait(log, second).ok());
  CHECK(*log.get("g2").value() == second);
  CHECK(gids_of(read_all(log)) == std::vector<std::string>{"g1", "g2", "g3"});
  CHECK(write_wait(log, {LogWrite::erase("g2")}).ok());
  CHECK(!log.get("g2")->has_value());

  const LogStats st = log.stats();
  CHECK(st.batches == 5);
  CHECK(st.synced_batches == 5);
  CHECK(st.records_written == 5);
  CHECK(st.queue_depth == 0);
}

TEST_CASE("memory log: corrupt bytes from put_raw are reported naming the gid") {
  MemoryLog log;
  CHECK(put_wait(log, small_record("g1")).ok());
  CHECK(put_wait(log, small_record("g3")).ok());
  std::string bytes = encode_record(small_record("g2"));
  bytes[bytes.size() / 2] ^= 1;
  log.put_raw("g2", bytes);

  auto g = log.get("g2");
  REQUIRE(!g.ok());
  CHECK(g.status().code() == Code::corruption);
  CHECK(g.status().message().find("gid g2") != std::string::npos);

  std::vector<std::string> seen;
  Status s = log.for_each([&](TxnRecord&& r) { seen.push_back(r.gid); });
  CHECK(s.code() == Code::corruption);
  CHECK(s.message().find("gid g2") != std::string::npos);
  CHECK(seen == std::vector<std::string>{"g1"});  // nothing after the corrupt record

  // A valid record stored under another gid is corruption too.
  log.put_raw("g2", encode_record(small_record("other")));
  CHECK(log.get("g2").status().code() == Code::corruption);

  log.crash();  // what is on disk survives
  CHECK(log.get("g2").status().code() == Code::corruption);
}

// ---- LevelDB log ---------------------------------------------------------------------------

TEST_CASE("leveldb log: records and meta survive close and reopen") {
  TempDir dir;
  const TxnRecord r1 = full_record("c1-1-1");
  const TxnRecord r2 = full_record("c1-1-2", Decision::precommit);
  {
    auto log = open_log(dir.str());
    CHECK(put_wait(*log, r1).ok());
    CHECK(put_wait(*log, r2, false).ok());
    CHECK(log->put_meta("epoch", "3").ok());
    CHECK(log->put_meta("forgotten_before", std::string("\0\1\2", 3)).ok());
  }
  auto log = open_log(dir.str());
  auto all = read_all(*log);
  REQUIRE(all.size() == 2);
  CHECK(all[0] == r1);
  CHECK(all[1] == r2);
  CHECK(*log->get("c1-1-2").value() == r2);
  CHECK(!log->get("c1-1-3")->has_value());
  CHECK(log->get_meta("epoch")->value() == "3");
  CHECK(log->get_meta("forgotten_before")->value() == std::string("\0\1\2", 3));
  CHECK(!log->get_meta("absent")->has_value());
}

TEST_CASE("leveldb log: an overwrite keeps the newest record and erase removes it") {
  TempDir dir;
  auto log = open_log(dir.str());
  TxnRecord older = full_record("g");
  TxnRecord newer = older;
  newer.ended = true;
  newer.branches[0].outcome = BranchOutcome::aborted;
  CHECK(put_wait(*log, older).ok());
  CHECK(put_wait(*log, newer).ok());
  CHECK(*log->get("g").value() == newer);
  CHECK(put_wait(*log, small_record("h")).ok());

  // A put and an erase in one write apply in order.
  std::vector<LogWrite> w;
  w.push_back(LogWrite::put(small_record("i")));
  w.push_back(LogWrite::erase("g"));
  CHECK(write_wait(*log, std::move(w)).ok());
  CHECK(!log->get("g")->has_value());
  log.reset();
  log = open_log(dir.str());
  CHECK(gids_of(read_all(*log)) == std::vector<std::string>{"h", "i"});
}

TEST_CASE("leveldb log: for_each visits records in key order and skips meta") {
  TempDir dir;
  auto log = open_log(dir.str());
  CHECK(log->put_meta("zzz", "v").ok());
  for (const char* g : {"c1-2-10", "c1-2-9", "c1-10-1", "c1-2-1", "a"}) {
    CHECK(put_wait(*log, small_record(g), false).ok());
  }
  log->flush();
  CHECK(gids_of(read_all(*log)) ==
        std::vector<std::string>{"a", "c1-10-1", "c1-2-1", "c1-2-10", "c1-2-9"});
}

TEST_CASE("leveldb log: a corrupt value under t/<gid> is reported by for_each and get") {
  TempDir dir;
  {
    auto log = open_log(dir.str());
    CHECK(put_wait(*log, small_record("g1")).ok());
    CHECK(put_wait(*log, small_record("g2")).ok());
    CHECK(put_wait(*log, small_record("g3")).ok());
  }
  {
    leveldb::DB* raw = nullptr;
    leveldb::Options o;
    REQUIRE(leveldb::DB::Open(o, dir.str(), &raw).ok());
    std::unique_ptr<leveldb::DB> db(raw);
    std::string bytes = encode_record(small_record("g2"));
    bytes[7] ^= 0x40;
    REQUIRE(db->Put(leveldb::WriteOptions(), "t/g2", bytes).ok());
    REQUIRE(db->Put(leveldb::WriteOptions(), "t/g4", "junk").ok());
  }
  auto log = open_log(dir.str());
  std::vector<std::string> seen;
  Status s = log->for_each([&](TxnRecord&& r) { seen.push_back(r.gid); });
  CHECK(s.code() == Code::corruption);
  CHECK(s.message().find("gid g2") != std::string::npos);
  CHECK(s.message().find("checksum") != std::string::npos);
  CHECK(seen == std::vector<std::string>{"g1"});

  auto g2 = log->get("g2");
  REQUIRE(!g2.ok());
  CHECK(g2.status().code() == Code::corruption);
  CHECK(g2.status().message().find("gid g2") != std::string::npos);
  auto g4 = log->get("g4");
  REQUIRE(!g4.ok());
  CHECK(g4.status().message().find("gid g4") != std::string::npos);
  CHECK(*log->get("g3").value() == small_record("g3"));
}

TEST_CASE("leveldb log: group commit batches 8 threads x 500 synced writes, in order") {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 500;
  TempDir dir;
  {
    auto log = open_log(dir.str());
    Gate gate;
    block_writer(*log, gate);  // everything below queues up behind the blocked writer

    std::mutex mu;
    std::vector<std::vector<int>> order(kThreads);
    std::vector<Status> failures;
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; ++i) {
          std::vector<LogWrite> w;
          w.push_back(
              LogWrite::put(small_record("t" + std::to_string(t) + "-" + std::to_string(i))));
          log->write(std::move(w), true, [&, t, i](Status s) {
            std::lock_guard lock(mu);
            if (!s.ok()) failures.push_back(s);
            order[t].push_back(i);
          });
        }
      });
    }
    for (auto& th : threads) th.join();
    CHECK(log->stats().queue_depth == kThreads * kPerThread);
    gate.release();
    log->flush();

    CHECK(failures.empty());
    for (int t = 0; t < kThreads; ++t) {
      REQUIRE(order[t].size() == kPerThread);
      for (int i = 0; i < kPerThread; ++i) REQUIRE(order[t][i] == i);
    }
    const LogStats st = log->stats();
    CHECK(st.records_synced == kThreads * kPerThread + 1);
    CHECK(st.records_written == kThreads * kPerThread + 1);
    CHECK(st.synced_batches == 2);  // the blocker, then everything queued behind it
    CHECK(st.synced_batches < st.records_synced);
    CHECK(st.queue_depth == 0);
  }
  auto log = open_log(dir.str());
  auto all = read_all(*log);
  CHECK(all.size() == kThreads * kPerThread + 1);
  for (int t = 0; t < kThreads; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      const std::string gid = "t" + std::to_string(t) + "-" + std::to_string(i);
      auto r = log->get(gid);
      REQUIRE(r.ok());
      REQUIRE(r->has_value());
      REQUIRE(**r == small_record(gid));
    }
  }
}

TEST_CASE("leveldb log: a group-commit batch carries at most batch_records_max records") {
  TempDir dir;
  auto log = open_log(dir.str(), /*batch_records_max=*/100);
  Gate gate;
  block_writer(*log, gate);
  for (int i = 0; i < 1000; ++i) {
    std::vector<LogWrite> w;
    w.push_back(LogWrite::put(small_record("g" + std::to_string(i))));
    log->write(std::move(w), i % 2 == 0, nullptr);
  }
  // A write of 150 records is larger than the limit and still goes out whole, on its own.
  std::vector<LogWrite> big;
  for (int i = 0; i < 150; ++i)
    big.push_back(LogWrite::put(small_record("big" + std::to_string(i))));
  log->write(std::move(big), true, nullptr);
  gate.release();
  log->flush();
  const LogStats st = log->stats();
  CHECK(st.batches == 1 + 10 + 1);
  CHECK(st.synced_batches == 1 + 10 + 1);  // each batch of 100 holds a synced write
  CHECK(st.records_written == 1 + 1000 + 150);
  CHECK(read_all(*log).size() == 1 + 1000 + 150);
}

TEST_CASE("leveldb log: unsynced batches are written but not counted as synced") {
  TempDir dir;
  auto log = open_log(dir.str());
  CHECK(put_wait(*log, small_record("a"), false).ok());
  CHECK(put_wait(*log, small_record("b"), true).ok());
  const LogStats st = log->stats();
  CHECK(st.batches == 2);
  CHECK(st.synced_batches == 1);
  CHECK(st.records_synced == 1);
  CHECK(st.records_written == 2);
}

TEST_CASE("leveldb log: past queue_max a write fails at once with unavailable") {
  TempDir dir;
  auto log = open_log(dir.str(), 4096, /*queue_max=*/10);
  Gate gate;
  block_writer(*log, gate);
  std::atomic<int> ok_count{0};
  for (int i = 0; i < 10; ++i) {
    std::vector<LogWrite> w;
    w.push_back(LogWrite::put(small_record("q" + std::to_string(i))));
    log->write(std::move(w), true, [&](Status s) {
      if (s.ok()) ok_count++;
    });
  }
  CHECK(log->stats().queue_depth == 10);

  bool called = false;
  Status refused;
  std::vector<LogWrite> w;
  w.push_back(LogWrite::put(small_record("q10")));
  log->write(std::move(w), true, [&](Status s) {
    called = true;
    refused = s;
  });
  CHECK(called);  // inline, while the writer is still blocked
  CHECK(refused.code() == Code::unavailable);
  CHECK(refused.message().find("queue_max") != std::string::npos);

  gate.release();
  log->flush();
  CHECK(ok_count == 10);
  CHECK(!log->get("q10")->has_value());
  // The queue has room again.
  CHECK(put_wait(*log, small_record("q11")).ok());
}

TEST_CASE("leveldb log: closing drains queued writes before the writer stops") {
  TempDir dir;
  std::atomic<int> done{0};
  {
    auto log = open_log(dir.str());
    Gate gate;
    block_writer(*log, gate);
    for (int i = 0; i < 50; ++i) {
      std::vector<LogWrite> w;
      w.push_back(LogWrite::put(small_record("d" + std::to_string(i))));
      log->write(std::move(w), false, [&](Status s) {
        CHECK(s.ok());
        done++;
      });
    }
    gate.release();
  }  // no flush: the destructor drains
  CHECK(done == 50);
  auto log = open_log(dir.str());
  CHECK(read_all(*log).size() == 51);
}

TEST_CASE("leveldb log: opening on an impossible path is an io_error") {
  TempDir dir;
  const std::string file = dir.sub("regular-file");
  std::ofstream(file) << "x";
  LevelDbOptions o;
  o.dir = file + "/log";
  auto r = open_leveldb_log(o);
  REQUIRE(!r.ok());
  CHECK(r.status().code() == Code::io_error);
  CHECK(r.status().message().rfind("cannot open the decision log in " + o.dir, 0) == 0);
  CHECK(r.status().message().find('\n') == std::string::npos);

  o.dir = file;  // the path is a regular file itself
  auto r2 = open_leveldb_log(o);
  REQUIRE(!r2.ok());
  CHECK(r2.status().code() == Code::io_error);
}

TEST_CASE("leveldb log: opening in a directory without write permission is an io_error") {
  TempDir dir;
  const std::string ro = dir.sub("read-only");
  fs::create_directory(ro);
  fs::permissions(dir.str(), fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                 fs::perms::others_read | fs::perms::others_exec);
  fs::permissions(ro, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                          fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  // root ignores permissions: the child drops to an unprivileged user first.
  int out[2];
  REQUIRE(pipe(out) == 0);
  std::fflush(nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(2);
    std::string report;
    for (const std::string& d : {ro, ro + "/log"}) {
      LevelDbOptions o;
      o.dir = d;
      auto r = open_leveldb_log(o);
      report += r.ok() ? "ok" : r.status().to_string();
      report += '\n';
    }
    if (write(out[1], report.data(), report.size()) != static_cast<ssize_t>(report.size())) {
      _exit(3);
    }
    _exit(0);
  }
  close(out[1]);
  std::string report;
  char buf[512];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) report.append(buf, n);
  close(out[0]);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  const size_t nl = report.find('\n');
  REQUIRE(nl != std::string::npos);
  const std::string existing = report.substr(0, nl);
  const std::string below = report.substr(nl + 1);
  CHECK(existing.rfind("io_error: cannot open the decision log in " + ro + ": ", 0) == 0);
  CHECK(existing.find("Permission denied") != std::string::npos);
  CHECK(below.rfind("io_error: cannot open the decision log in " + ro + "/log: ", 0) == 0);
  CHECK(below.find("Permission denied") != std::string::npos);
}

TEST_CASE("leveldb log: a second open of the same directory fails and names the lock") {
  TempDir dir;
  auto first = open_log(dir.str());
  LevelDbOptions o;
  o.dir = dir.str();
  auto second = open_leveldb_log(o);
  REQUIRE(!second.ok());
  CHECK(second.status().code() == Code::io_error);
  CHECK(second.status().message().find("LOCK") != std::string::npos);
  CHECK(second.status().message().find("another process may be using it") != std::string::npos);
}

TEST_CASE("leveldb log: a directory locked by another process fails to open with io_error") {
  TempDir dir;
  int ready[2], stop[2];
  REQUIRE(pipe(ready) == 0);
  REQUIRE(pipe(stop) == 0);
  std::fflush(nullptr);  // the child must not write our buffered output again
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    LevelDbOptions o;
    o.dir = dir.str();
    auto log = open_leveldb_log(o);
    const char c = log.ok() ? 'y' : 'n';
    if (write(ready[1], &c, 1) != 1) _exit(2);
    char x;
    if (read(stop[0], &x, 1) < 0) _exit(3);
    _exit(0);
  }
  char c = 0;
  REQUIRE(read(ready[0], &c, 1) == 1);
  REQUIRE(c == 'y');
  LevelDbOptions o;
  o.dir = dir.str();
  auto r = open_leveldb_log(o);
  CHECK(!r.ok());
  CHECK(r.status().code() == Code::io_error);
  CHECK(r.status().message().find("another process may be using it") != std::string::npos);
  REQUIRE(write(stop[1], "x", 1) == 1);
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  for (int fd : {ready[0], ready[1], stop[0], stop[1]}) close(fd);
  // Free again once the other process is gone.
  auto again = open_leveldb_log(o);
  CHECK(again.ok());
}

TEST_CASE("leveldb log: a write error reaches every callback of its batch as io_error") {
  TempDir dir;
  auto log = open_log(dir.str());
  Gate gate;
  block_writer(*log, gate);

  std::mutex mu;
  std::vector<Status> results;
  auto record = [&](Status s) {
    std::lock_guard lock(mu);
    results.push_back(std::move(s));
  };
  TxnRecord huge = small_record("huge");
  huge.branches[0].url.assign(8 << 20, 'u');
  log->write({LogWrite::put(small_record("x1"))}, true, record);
  log->write({LogWrite::put(huge)}, true, record);
  log->write({LogWrite::put(small_record("x2"))}, false, record);

  // Files of this process may not grow past 4 MiB while the batch is written: the log file
  // append fails with EFBIG (SIGXFSZ ignored).
  rlimit old{};
  REQUIRE(getrlimit(RLIMIT_FSIZE, &old) == 0);
  rlimit small = old;
  small.rlim_cur = 4 << 20;
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
  gate.release();
  log->flush();
  REQUIRE(setrlimit(RLIMIT_FSIZE, &old) == 0);
  signal(SIGXFSZ, old_handler);

  REQUIRE(results.size() == 3);
  for (const Status& s : results) {
    CHECK(s.code() == Code::io_error);
    CHECK(s.message().find("decision log") != std::string::npos);
  }
  CHECK(!log->get("x1")->has_value());
}

// ---- integrity: damaged, truncated or replaced stores are refused ------------------------

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

// The newest (highest-numbered) LevelDB .log file in dir: the one written last.
std::string newest_log_file(const std::string& dir) {
  std::string best;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".log") continue;
    if (best.empty() || e.path().filename().string() > fs::path(best).filename().string())
      best = e.path().string();
  }
  REQUIRE(!best.empty());
  return best;
}

// Offsets of the physical record headers in a LevelDB .log (32 KiB blocks; a header is
// crc32c:4, length:2 little-endian, type:1; a block's last < 7 bytes are zero padding).
std::vector<size_t> log_record_offsets(const std::string& bytes) {
  constexpr size_t kBlockBytes = 32768, kHeaderBytes = 7;
  std::vector<size_t> out;
  size_t pos = 0;
  while (pos + kHeaderBytes <= bytes.size()) {
    const size_t left = kBlockBytes - pos % kBlockBytes;
    if (left < kHeaderBytes) {
      pos += left;
      continue;
    }
    const size_t len = static_cast<uint8_t>(bytes[pos + 4]) |
                       (static_cast<size_t>(static_cast<uint8_t>(bytes[pos + 5])) << 8);
    out.push_back(pos);
    pos += kHeaderBytes + len;
  }
  return out;
}

std::string identity_text(const TempDir& dir) {
  return read_bytes(dir.sub("IDENTITY"));
}

// A store with `n` synced records c1-1-1..c1-1-n, closed cleanly.
void fill(const std::string& dir, int n) {
  auto log = open_log(dir);
  for (int i = 1; i <= n; ++i)
    REQUIRE(put_wait(*log, small_record("c1-1-" + std::to_string(i))).ok());
}

Status open_status(const std::string& dir, std::string id = "c1") {
  LevelDbOptions o;
  o.dir = dir;
  o.coordinator_id = std::move(id);
  auto r = open_leveldb_log(o);
  return r.ok() ? ok_status() : r.status();
}

void check_refused(const Status& s, const std::string& needle) {
  CHECK(s.code() == Code::corruption);
  CHECK_MESSAGE(s.message().find(needle) != std::string::npos, s.message());
  CHECK(s.message().find('\n') == std::string::npos);
}

TEST_CASE("leveldb log: the first open writes IDENTITY with the coordinator id and the count") {
  TempDir dir;
  fill(dir.str(), 3);
  const std::string text = identity_text(dir);
  CHECK(text.rfind("tpc-decision-log 1\ncoordinator c1\ncreated_ms ", 0) == 0);
  CHECK(text.find("\nsynced_writes 3\n") != std::string::npos);
  CHECK(open_status(dir.str()).ok());
}

TEST_CASE("leveldb log: a length byte flipped in the last .log record is refused") {
  TempDir dir;
  fill(dir.str(), 20);
  const std::string path = newest_log_file(dir.str());
  std::string bytes = read_bytes(path);
  const auto offsets = log_record_offsets(bytes);
  REQUIRE(offsets.size() >= 20);
  // The length now points past the end of the file: LevelDB alone takes the record for a torn
  // write and drops it without a report.
  bytes[offsets.back() + 5] ^= 0x40;
  write_bytes(path, bytes);
  check_refused(
      open_status(dir.str()),
      "synced writes were lost: the store ends at synced write 19 but write 20 was acknowledged");
}

TEST_CASE("leveldb log: a .log cut short in its last record is refused") {
  TempDir dir;
  fill(dir.str(), 20);
  const std::string path = newest_log_file(dir.str());
  fs::resize_file(path, fs::file_size(path) - 3);
  check_refused(open_status(dir.str()), "synced writes were lost");
}

TEST_CASE("leveldb log: a .log cut back to an earlier record boundary is refused") {
  TempDir dir;
  fill(dir.str(), 20);
  const std::string path = newest_log_file(dir.str());
  const auto offsets = log_record_offsets(read_bytes(path));
  REQUIRE(offsets.size() >= 20);
  fs::resize_file(path, offsets[offsets.size() - 5]);  // the last five batches gone, cleanly
  check_refused(open_status(dir.str()), "the store ends at synced write 15 but write 20");
}

TEST_CASE("leveldb log: a payload byte flipped in the last .log record is refused") {
  TempDir dir;
  fill(dir.str(), 20);
  const std::string path = newest_log_file(dir.str());
  std::string bytes = read_bytes(path);
  const auto offsets = log_record_offsets(bytes);
  bytes[offsets.back() + 7 + 3] ^= 0x01;
  write_bytes(path, bytes);
  const Status s = open_status(dir.str());
  CHECK(s.code() == Code::corruption);
  CHECK_MESSAGE(s.message().find("checksum mismatch") != std::string::npos, s.message());
}

// The names of the store's .ldb and .log files, sorted.
std::vector<std::string> data_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".ldb" || e.path().extension() == ".log")
      out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST_CASE("leveldb log: a deleted CURRENT is refused, and the tables are left in place") {
  TempDir dir;
  {
    LevelDbOptions o;
    o.dir = dir.str();
    o.write_buffer_bytes = 64 << 10;  // small, so that records reach table files
    auto log = open_leveldb_log(o);
    REQUIRE(log.ok());
    for (int i = 1; i <= 600; ++i)
      REQUIRE(put_wait(**log, full_record("c1-1-" + std::to_string(i))).ok());
  }
  fs::remove(dir.sub("CURRENT"));
  const std::vector<std::string> before = data_files(dir.str());
  CHECK(before.size() >= 2);  // tables and the .log
  check_refused(open_status(dir.str()), "it has an IDENTITY file but its LevelDB store is missing");
  CHECK(data_files(dir.str()) == before);
  CHECK(!fs::exists(dir.sub("CURRENT")));
}

TEST_CASE("leveldb log: LevelDB files without IDENTITY are refused") {
  TempDir dir;
  fill(dir.str(), 2);
  fs::remove(dir.sub("IDENTITY"));
  check_refused(open_status(dir.str()), "it holds LevelDB files but no IDENTITY file");
  CHECK(!fs::exists(dir.sub("IDENTITY")));
}

TEST_CASE("leveldb log: a malformed IDENTITY is refused") {
  TempDir dir;
  fill(dir.str(), 2);
  std::string text = identity_text(dir);
  SUBCASE("garbage") {
    text = "hello\n";
  }
  SUBCASE("a count that is not a number") {
    text.replace(text.find("synced_writes 2"), 15, "synced_writes x");
  }
  SUBCASE("empty") {
    text.clear();
  }
  write_bytes(dir.sub("IDENTITY"), text);
  check_refused(open_status(dir.str()), "its IDENTITY file is malformed");
}

TEST_CASE("leveldb log: a count in IDENTITY beyond the store's is refused") {
  TempDir dir;
  fill(dir.str(), 2);
  std::string text = identity_text(dir);
  text.replace(text.find("synced_writes 2"), 15, "synced_writes 9");
  write_bytes(dir.sub("IDENTITY"), text);
  check_refused(open_status(dir.str()), "the store ends at synced write 2 but write 9");
}

TEST_CASE("leveldb log: a store of another coordinator id is refused") {
  TempDir dir;
  fill(dir.str(), 2);
  check_refused(open_status(dir.str(), "c2"), "its IDENTITY names coordinator \"c1\", not \"c2\"");
  CHECK(open_status(dir.str(), "c1").ok());
}

TEST_CASE("leveldb log: an IDENTITY without a store is refused, not recreated") {
  TempDir dir;
  fill(dir.str(), 2);
  for (const auto& e : fs::directory_iterator(dir.str()))
    if (e.path().filename() != "IDENTITY") fs::remove(e.path());
  check_refused(open_status(dir.str()), "its LevelDB store is missing");
  CHECK(!fs::exists(dir.sub("CURRENT")));
}

TEST_CASE("leveldb log: put_meta is a counted synced write") {
  TempDir dir;
  {
    auto log = open_log(dir.str());
    CHECK(log->put_meta("epoch", "7").ok());
    CHECK(log->stats().synced_batches == 1);
  }
  CHECK(identity_text(dir).find("\nsynced_writes 1\n") != std::string::npos);
  auto log = open_log(dir.str());
  CHECK(log->get_meta("epoch")->value() == "7");
}

TEST_CASE("leveldb log: reopens keep working across compaction into tables and many writes") {
  TempDir dir;
  LevelDbOptions o;
  o.dir = dir.str();
  o.write_buffer_bytes = 64 << 10;
  constexpr int kRounds = 3, kPerRound = 1000;
  for (int round = 0; round < kRounds; ++round) {
    auto log = open_leveldb_log(o);
    REQUIRE_MESSAGE(log.ok(), log.status().to_string());
    for (int i = 0; i < kPerRound; ++i) {
      REQUIRE(
          put_wait(**log, full_record("c1-" + std::to_string(round + 1) + "-" + std::to_string(i)))
              .ok());
    }
    CHECK(read_all(**log).size() == static_cast<size_t>((round + 1) * kPerRound));
  }
  bool tables = false;
  for (const auto& e : fs::directory_iterator(dir.str()))
    tables = tables || e.path().extension() == ".ldb";
  CHECK(tables);
  CHECK(identity_text(dir).find("\nsynced_writes " + std::to_string(kRounds * kPerRound) + "\n") !=
        std::string::npos);
  auto log = open_leveldb_log(o);
  REQUIRE_MESSAGE(log.ok(), log.status().to_string());
  CHECK(read_all(**log).size() == static_cast<size_t>(kRounds * kPerRound));
}

// The count in IDENTITY, polled until it reaches `want` (the checkpoint thread's interval).
bool wait_identity_count(const TempDir& dir, uint64_t want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  const std::string needle = "\nsynced_writes " + std::to_string(want) + "\n";
  while (std::chrono::steady_clock::now() < deadline) {
    if (identity_text(dir).find(needle) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling a file, with a deadline
  }
  return false;
}

TEST_CASE("leveldb log: a process killed after synced writes reopens; then a cut tail is refused") {
  TempDir dir;
  std::fflush(nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    LevelDbOptions o;
    o.dir = dir.str();
    auto log = open_leveldb_log(o);
    if (!log.ok()) _exit(2);
    for (int i = 1; i <= 30; ++i)
      if (!put_wait(**log, small_record("c1-1-" + std::to_string(i))).ok()) _exit(3);
    if (!wait_identity_count(dir, 30)) _exit(4);
    ::kill(::getpid(), SIGKILL);  // no destructor, no final checkpoint
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
  TempDir copy;
  fs::copy(dir.str(), copy.str(),
           fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  fs::remove(copy.sub("LOCK"));

  // The store as the killed process left it opens with every record.
  {
    auto log = open_log(dir.str());
    CHECK(read_all(*log).size() == 30);
  }
  // The same store with its last synced batch cut off is refused, and stays refused (the
  // failed open may already have moved the .log into a table).
  const std::string path = newest_log_file(copy.str());
  fs::resize_file(path, log_record_offsets(read_bytes(path)).back());
  check_refused(open_status(copy.str()), "the store ends at synced write 29 but write 30");
  check_refused(open_status(copy.str()), "the store ends at synced write 29 but write 30");
}

}  // namespace
}  // namespace tpc::wal
