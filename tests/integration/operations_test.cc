// Running the services: start-up refusals (one clear line, non-zero exit), clean stops, the
// decision log refusing a corrupt record, and tpcctl against both services, including an
// operator resolving in-doubt branches by hand and the coordinator reporting a heuristic mix.
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <leveldb/db.h>

#include "common/ids.h"
#include "tests/integration/testbed.h"
#include "wal/decision_log.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

// Runs a binary to its exit; returns the exit code and its output.
int run(const std::vector<std::string>& argv, std::string* output, int64_t timeout_ms = 20'000) {
  auto code = run_to_exit(argv, output, timeout_ms);
  REQUIRE_MESSAGE(code.ok(), code.status().to_string());
  return *code;
}

// The agent's in-doubt entry for gid, or null.
Json agent_in_doubt(Testbed& t, int i, const std::string& gid) {
  Http r = t.agent(i, "GET", "/v1/in-doubt");
  REQUIRE(r.status == 200);
  for (auto& b : r.body["branches"])
    if (b["gid"] == gid) return b;
  return Json();
}

std::optional<std::string> agent_record(Testbed& t, int i, const std::string& gid) {
  auto rec =
      query_value(t.conninfo(i), "SELECT max(state) FROM tpc_agent_state WHERE pg_gid = 'tpc:" +
                                     Testbed::agent_name(i) + ":" + gid + "'");
  REQUIRE_MESSAGE(rec.ok(), rec.status().to_string());
  return *rec;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("the agent refuses to start when max_prepared_transactions is 0") {
  PgCluster::Options po;
  po.max_prepared_transactions = 0;
  auto pg = PgCluster::create(po);
  REQUIRE_MESSAGE(pg.ok(), pg.status().to_string());
  std::string out;
  int code = run({bin_dir() + "/tpc-agent", "--name", "a0", "--listen", "127.0.0.1:" + std::to_string(free_port()),
                  "--pg", (*pg)->conninfo(), "--coordinator", "c1=http://127.0.0.1:1"},
                 &out);
  CHECK(code != 0);
  CHECK(code != -1);
  CHECK(out.find("max_prepared_transactions = 0") != std::string::npos);
  CHECK(out.find("tpc-agent: ") != std::string::npos);
  CHECK(count_lines(out) == 1);
}

TEST_CASE("start-up errors are one clear line and a non-zero exit") {
  Testbed& t = Testbed::fresh(Testbed::Options{.start = false});
  std::string out;
  std::string port = std::to_string(free_port());

  CHECK(run({bin_dir() + "/tpc-coordinator", "--bogus"}, &out) == 2);
  CHECK(out == "tpc-coordinator: unknown flag --bogus (see --help)\n");
  CHECK(run({bin_dir() + "/tpc-coordinator", "--listen", "127.0.0.1:" + port}, &out) == 2);
  CHECK(out.find("--data-dir is required") != std::string::npos);
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", "/etc/passwd/x", "--listen", "127.0.0.1:" + port}, &out) != 0);
  CHECK(out.find("tpc-coordinator: cannot") != std::string::npos);
  CHECK(count_lines(out) == 1);
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", t.dir() + "/d", "--id", "bad-id"}, &out) == 2);
  CHECK(out.find("--id") != std::string::npos);
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", t.dir() + "/d", "--prepare-timeout-ms", "soon"}, &out) == 2);
  CHECK(out.find("--prepare-timeout-ms must be an integer") != std::string::npos);
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", t.dir() + "/d", "--op-url-allow",
             "ftp://x/"},
            &out) == 2);
  CHECK(out.find("--op-url-allow ftp://x/") != std::string::npos);

  // The port is taken: by a second coordinator on another data dir.
  t.start_coordinator();
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", t.dir() + "/other",
             "--listen", "127.0.0.1:" + std::to_string(t.coordinator_url().port)}, &out) != 0);
  CHECK(out.find("cannot listen") != std::string::npos);
  // The same data dir while the first one runs: the log is locked.
  CHECK(run({bin_dir() + "/tpc-coordinator", "--data-dir", t.dir() + "/decision-log",
             "--listen", "127.0.0.1:" + port}, &out) != 0);
  CHECK(out.find("lock") != std::string::npos);

  CHECK(run({bin_dir() + "/tpc-agent", "--name", "a0", "--listen", "127.0.0.1:" + port, "--pg",
             "host=127.0.0.1 port=1 user=tpc dbname=postgres connect_timeout=2", "--coordinator",
             "c1=http://127.0.0.1:1"}, &out) != 0);
  CHECK(out.find("tpc-agent: cannot connect to PostgreSQL") != std::string::npos);
  CHECK(count_lines(out) == 1);
  CHECK(run({bin_dir() + "/tpc-agent", "--name", "a:0", "--pg", t.conninfo(0), "--coordinator", "c1=http://h:1"}, &out) == 2);
  CHECK(out.find("--name") != std::string::npos);
  CHECK(run({bin_dir() + "/tpc-agent", "--name", "a0", "--pg", t.conninfo(0)}, &out) == 2);
  CHECK(out.find("--coordinator") != std::string::npos);
  CHECK(run({bin_dir() + "/tpc-agent", "--name", "a0", "--pg", t.conninfo(0), "--coordinator", "c1"}, &out) == 2);
  CHECK(out.find("NAME=URL") != std::string::npos);
}

TEST_CASE("both services stop cleanly on SIGTERM") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -5).status == 200);
  t.coordinator_process().signal(SIGTERM);
  t.agent_process(0).signal(SIGTERM);
  CHECK(t.coordinator_process().wait(15'000) == 0);
  CHECK(t.agent_process(0).wait(15'000) == 0);
  CHECK(t.wait_log(t.coordinator_process(), "coordinator stopped"));
  CHECK(t.wait_log(t.agent_process(0), "agent stopped"));
  // The open branch ended with its session.
  t.check_invariants();
  CHECK(t.balance(0, 1) == 1000);
}

TEST_CASE("the coordinator refuses to start on a corrupt decision record") {
  Testbed& t = Testbed::fresh(Testbed::Options{.start = false});
  std::string dir = t.dir() + "/decision-log";
  {
    wal::LevelDbOptions lo;
    lo.dir = dir;
    auto log = wal::open_leveldb_log(lo);
    REQUIRE(log.ok());
    wal::TxnRecord r;
    r.gid = "c1-1-1";
    r.branches = {{"a0", "http://127.0.0.1:1", wal::BranchOutcome::pending}};
    Status st = ok_status();
    (*log)->write({wal::LogWrite::put(r)}, true, [&](Status s) { st = s; });
    (*log)->flush();
    REQUIRE(st.ok());
  }
  {
    leveldb::DB* raw = nullptr;
    leveldb::Options o;
    REQUIRE(leveldb::DB::Open(o, dir, &raw).ok());
    std::unique_ptr<leveldb::DB> db(raw);
    std::string value;
    REQUIRE(db->Get(leveldb::ReadOptions(), "t/c1-1-1", &value).ok());
    value[value.size() / 2] ^= 0x20;  // one flipped bit
    REQUIRE(db->Put(leveldb::WriteOptions(), "t/c1-1-1", value).ok());
  }
  std::string out;
  int code = run({bin_dir() + "/tpc-coordinator", "--data-dir", dir, "--listen",
                  "127.0.0.1:" + std::to_string(free_port())},
                 &out);
  CHECK(code != 0);
  CHECK(code != -1);
  CHECK(out.find("c1-1-1") != std::string::npos);
  CHECK(out.find("tpc-coordinator: cannot replay the decision log") != std::string::npos);
}

TEST_CASE("tpcctl lists, shows and lists in-doubt transactions and branches") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -1).status == 200);
  REQUIRE(t.move(1, gid, 1, 1).status == 200);
  REQUIRE(t.commit(gid).status == 200);
  std::string out;
  std::string ctl = bin_dir() + "/tpcctl";
  std::string c = t.coordinator_url().to_string(), a = t.agent_url(0).to_string();
  CHECK(run({ctl, "--coordinator", c, "list"}, &out) == 0);
  CHECK(out.find("GID") != std::string::npos);
  CHECK(out.find(gid) != std::string::npos);
  CHECK(out.find("a0:committed,a1:committed") != std::string::npos);
  CHECK(run({ctl, "--coordinator", c, "list", "--state", "committed", "--json"}, &out) == 0);
  auto j = parse_json(out);
  REQUIRE(j.ok());
  CHECK((*j)["transactions"][0]["gid"] == gid);
  CHECK(run({ctl, "--coordinator", c, "show", gid}, &out) == 0);
  CHECK(out.find("STATE     committed") != std::string::npos);
  CHECK(out.find("PARTICIPANT") != std::string::npos);
  CHECK(out.find("a0           committed") != std::string::npos);
  CHECK(run({ctl, "--coordinator", c, "show", gid, "--json"}, &out) == 0);
  CHECK(out.find("\"committed\"") != std::string::npos);
  CHECK(run({ctl, "--coordinator", c, "in-doubt"}, &out) == 0);
  CHECK(out.find(gid) == std::string::npos);
  CHECK(run({ctl, "--agent", a, "list"}, &out) == 0);
  CHECK(out.find(gid) != std::string::npos);
  CHECK(run({ctl, "--agent", a, "show", gid}, &out) == 0);
  CHECK(run({ctl, "--coordinator", c, "show", "c1-999999999999999999-1"}, &out) == 1);
  CHECK(out.find("HTTP 404") != std::string::npos);
  CHECK(run({ctl, "--coordinator", c, "frob"}, &out) == 2);
  CHECK(run({ctl, "list"}, &out) == 2);
  CHECK(run({ctl, "--coordinator", "http://127.0.0.1:1", "list"}, &out) == 1);
  CHECK(out.find("cannot reach") != std::string::npos);
  t.check_invariants();
}

TEST_CASE("an operator resolves in-doubt branches with tpcctl while the coordinator is gone") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);
  CHECK_FALSE(t.commit(gid).transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  std::string out, ctl = bin_dir() + "/tpcctl";
  // Both branches wait: the coordinator does not answer, and 2PC never decides alone.
  REQUIRE(t.wait_log(t.agent_process(0), "in-doubt branch waits for the coordinator"));
  CHECK(run({ctl, "--agent", t.agent_url(0).to_string(), "in-doubt"}, &out) == 0);
  CHECK(out.find(gid) != std::string::npos);
  CHECK(out.find("prepared") != std::string::npos);
  CHECK(t.prepared(0) == 1);
  for (int i = 0; i < 2; ++i)
    CHECK(run({ctl, "--agent", t.agent_url(i).to_string(), "resolve", gid, "commit"}, &out) == 0);
  CHECK(t.prepared(0) == 0);
  CHECK(t.prepared(1) == 0);
  auto rec = query_value(t.conninfo(0), "SELECT state FROM tpc_agent_state WHERE pg_gid = 'tpc:a0:" + gid + "'");
  REQUIRE(rec.ok());
  CHECK(rec->value_or("") == "heuristic_commit");
  // The coordinator comes back, re-drives its commit decision, and agrees: the agents' checks
  // are settled and their records removed.
  t.start_coordinator();
  CHECK(t.wait_state(gid, "committed"));
  CHECK(eventually(
      [&] {
        return !agent_record(t, 0, gid).has_value() && agent_in_doubt(t, 0, gid).is_null() &&
               agent_in_doubt(t, 1, gid).is_null();
      },
      20'000));
  CHECK(t.balance(0, 1) == 900);
  CHECK(t.balance(1, 1) == 1100);
  t.check_invariants();
}

TEST_CASE("branches resolved against the decision are reported as heuristic_mixed") {
  Testbed::Options o;
  o.coordinator_failpoints = "coord.after_decision_log=crash";
  Testbed& t = Testbed::fresh(o);
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);
  CHECK_FALSE(t.commit(gid).transport.ok());
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
  std::string out, ctl = bin_dir() + "/tpcctl";
  CHECK(run({ctl, "--agent", t.agent_url(0).to_string(), "resolve", gid, "commit"}, &out) == 0);
  CHECK(run({ctl, "--agent", t.agent_url(1).to_string(), "resolve", gid, "abort"}, &out) == 0);
  t.start_coordinator();
  INFO(t.logs());
  CHECK(t.wait_state(gid, "heuristic_mixed"));
  CHECK(t.wait_log(t.coordinator_process(), "heuristic outcome: branches disagree"));
  CHECK(read_file(t.coordinator_process().log_path()).find("branches=a0:committed,a1:aborted") !=
        std::string::npos);
  CHECK(run({ctl, "--coordinator", t.coordinator_url().to_string(), "in-doubt"}, &out) == 0);
  CHECK(out.find(gid) != std::string::npos);
  auto metrics = t.coord("GET", "/metrics");
  CHECK(metrics.raw.find("tpc_coordinator_heuristic_mixed_total 1") != std::string::npos);
  // The operator's mistake moved money one-sidedly; nothing is left prepared.
  CHECK(eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 10'000));
  CHECK(t.total() == Testbed::kTotal - 100);
}

TEST_CASE("a resolve by hand against a presumed abort is reported on both sides until forgotten") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -100).status == 200);
  REQUIRE(t.move(1, gid, 1, 100).status == 200);
  Http vote = t.agent(0, "POST", "/v1/branches/" + gid + "/prepare", "{}");
  REQUIRE_MESSAGE(vote.status == 200, vote.describe());
  // The coordinator dies before any decision; an operator commits the prepared branch by hand.
  t.stop_coordinator(SIGKILL);
  std::string out, ctl = bin_dir() + "/tpcctl";
  REQUIRE(run({ctl, "--agent", t.agent_url(0).to_string(), "resolve", gid, "commit"}, &out) == 0);
  CHECK(agent_record(t, 0, gid) == std::optional<std::string>("heuristic_commit"));
  // The agent restarts before it could check: the record brings the check back.
  t.stop_agent(0, SIGKILL);
  t.start_agent(0);
  CHECK(agent_in_doubt(t, 0, gid)["check"] == "unchecked");

  // The coordinator comes back with no record of the transaction: presumed abort.
  t.start_coordinator();
  INFO(t.logs());
  CHECK(t.wait_log(t.agent_process(0),
                   "heuristic outcome: the branch was decided here against the coordinator"));
  CHECK(eventually([&] { return agent_in_doubt(t, 0, gid)["check"] == "reported"; }, 20'000));
  CHECK(eventually(
      [&] { return agent_record(t, 0, gid) == std::optional<std::string>("reported_commit"); },
      10'000));
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_heuristic_outcomes") == 1);
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_heuristic_mismatch_total") == 1);
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_heuristic_reports_total") == 1);
  // The coordinator recorded the report: its own in-doubt, gauge and state say so.
  CHECK(t.get(gid).state() == "heuristic_mixed");
  CHECK(t.coord("GET", "/metrics").metric("tpc_coordinator_heuristic_outcomes") == 1);
  CHECK(run({ctl, "--coordinator", t.coordinator_url().to_string(), "in-doubt"}, &out) == 0);
  CHECK(out.find(gid) != std::string::npos);
  CHECK(t.total() == Testbed::kTotal - 100);  // the debit the operator's commit kept

  // Both sides keep it across restarts.
  t.stop_agent(0, SIGKILL);
  t.start_agent(0);
  CHECK(agent_in_doubt(t, 0, gid)["check"] == "reported");
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_heuristic_outcomes") == 1);

  // The operator repairs the money and forgets it on both sides.
  CHECK(run({ctl, "--agent", t.agent_url(0).to_string(), "forget", gid}, &out) == 0);
  CHECK(run({ctl, "--coordinator", t.coordinator_url().to_string(), "forget", gid}, &out) == 0);
  CHECK(agent_in_doubt(t, 0, gid).is_null());
  CHECK_FALSE(agent_record(t, 0, gid).has_value());
  CHECK(t.agent(0, "GET", "/metrics").metric("tpc_agent_heuristic_outcomes") == 0);
  CHECK(t.get(gid).state() == "aborted");
  CHECK(run({ctl, "--agent", t.agent_url(0).to_string(), "forget", gid}, &out) != 0);
  t.stop_agent(0, SIGKILL);
  t.start_agent(0);
  CHECK(agent_in_doubt(t, 0, gid).is_null());
  CHECK(t.prepared(0) + t.prepared(1) == 0);
}

TEST_CASE("outcomes past the retention window are reported as forgotten, never guessed") {
  Testbed::Options o;
  o.coordinator_args = {"--retention-ms", "0", "--compaction-interval-ms", "200"};
  Testbed& t = Testbed::fresh(o);
  std::string committed = t.begin();
  REQUIRE(t.move(0, committed, 1, -1).status == 200);
  REQUIRE(t.move(1, committed, 1, 1).status == 200);
  REQUIRE(t.commit(committed).status == 200);
  std::string aborted = t.begin();
  REQUIRE(t.abort(aborted).status == 200);
  // After a restart only the log answers; compaction then erases the finished record.
  t.stop_coordinator();
  t.start_coordinator();
  CHECK(t.wait_log(t.coordinator_process(), "compacted finished outcomes"));
  Http g = t.get(committed);
  CHECK_MESSAGE(g.status == 200, g.describe());
  CHECK(g.body["forgotten"] == true);
  CHECK(g.state() == "unknown");
  Http c = t.commit(committed);
  CHECK(c.status == 409);
  CHECK(c.body["forgotten"] == true);
  // A gid above every erased record had no record to erase: presumed abort still holds.
  Http a = t.get(aborted);
  CHECK(a.status == 200);
  CHECK(a.state() == "aborted");
  CHECK(a.body["presumed"] == true);
  t.check_invariants();
}

namespace {

// The number after "name " on its line of `text`, or -1.
int64_t number_after(const std::string& text, const std::string& name) {
  size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stoll(text.substr(at + name.size() + 2));
}

// The offset of the second physical record header of a LevelDB .log (32 KiB blocks, 7-byte
// headers: crc32c:4, length:2 little-endian, type:1); the first is the start's epoch write.
size_t second_log_record(const std::string& bytes) {
  size_t pos = 0, last = 0, seen = 0;
  while (pos + 7 <= bytes.size()) {
    if (32768 - pos % 32768 < 7) {
      pos += 32768 - pos % 32768;
      continue;
    }
    last = pos;
    if (++seen == 2) break;
    pos += 7 + (static_cast<uint8_t>(bytes[pos + 4]) |
                (static_cast<size_t>(static_cast<uint8_t>(bytes[pos + 5])) << 8));
  }
  return last;
}

}  // namespace

TEST_CASE("a coordinator whose .log lost its synced tail after a kill refuses to restart") {
  Testbed& t = Testbed::fresh();
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -5).status == 200);
  REQUIRE(t.move(1, gid, 1, 5).status == 200);
  REQUIRE(t.commit(gid).status == 200);
  const std::string dir = t.dir() + "/decision-log";
  // Every acknowledged fsync has reached IDENTITY (it is checkpointed every 100 ms).
  REQUIRE(eventually(
      [&] {
        const int64_t fsyncs =
            number_after("\n" + t.coord("GET", "/metrics").raw, "tpc_coordinator_log_fsyncs_total");
        return fsyncs > 0 && number_after(read_file(dir + "/IDENTITY"), "synced_writes") >= fsyncs;
      },
      10'000));
  t.stop_coordinator(SIGKILL);
  std::string newest;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ".log" && e.path().string() > newest) newest = e.path().string();
  REQUIRE(!newest.empty());
  // Everything after the epoch write is cut: the synced commit decision with it.
  std::filesystem::resize_file(newest, second_log_record(read_file(newest)));

  std::string out;
  int code = run({bin_dir() + "/tpc-coordinator", "--data-dir", dir, "--listen",
                  "127.0.0.1:" + std::to_string(free_port())},
                 &out);
  CHECK(code != 0);
  CHECK(code != -1);
  CHECK_MESSAGE(out.find("tpc-coordinator: refusing to open the decision log in " + dir +
                         ": synced writes were lost") != std::string::npos,
                out);
  // Nothing was rolled back: both branches stay committed.
  CHECK(t.balance(0, 1) == 995);
  CHECK(t.balance(1, 1) == 1005);
}
