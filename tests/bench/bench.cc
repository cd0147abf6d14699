// tpc-bench: throughput and latency of global transactions, against a baseline measured in the
// same run on the same machine. It starts its own PostgreSQL clusters (fsync on), a coordinator
// and one agent per database, plus a second coordinator whose participants are fakes inside
// this process, then runs every mode at every concurrency:
//
//   raw               2PC driven by hand over libpq the way application code does it: one
//                     statement per round trip (BEGIN, UPDATE, PREPARE TRANSACTION on each
//                     database in turn, then COMMIT PREPARED on each): the baseline
//   raw-pipelined     the same 2PC at the physical limit: BEGIN; UPDATE; PREPARE TRANSACTION
//                     as one string to both databases at once, then COMMIT PREPARED to both
//   local             the same UPDATEs as plain single-phase transactions (pipelined, in
//                     parallel): the ceiling
//   interactive       begin → exec on each agent (in parallel) → commit, over the HTTP API
//   oneshot           POST /v1/transactions/run carrying every branch's statement
//   coordinator-only  oneshot against a coordinator in this process whose participants are
//                     in-process fakes answering at once: the coordinator's own ceiling (its
//                     HTTP API, state machine and group-committed decision log)
//   saga              POST /v1/transactions/run with protocol saga: one step per database,
//                     each a SQL op (the UPDATE with its barrier row, one local transaction)
//                     with a compensation that is never needed
//   tcc               begin a TCC transaction, try every branch in parallel (a SQL op that
//                     reserves: frozen += 1), then commit (each confirm: balance += 1,
//                     frozen -= 1); three round trips and two local transactions per branch
//   msg               POST /v1/transactions/run with protocol msg: the local op (the UPDATE
//                     on the first database, with its barrier row) and one SQL destination per
//                     other database; answered once the commit is durable, the deliveries
//                     following (the latency is the producer's, not the delivery's)
//
//   tpc-bench [--participants 2,4] [--concurrency 1,8,32,64] [--modes ...] [--seconds 5]
//             [--repeat 3] [--accounts 10000] [--json] [--recovery 100000]
//
// TPC_BENCH_ENV=NAME=VALUE adds one variable to the coordinators' and agents' environment
// (e.g. LD_PRELOAD of another allocator, to compare).
//
// Each cell reports transactions/s, latency p50/p99/max, CPU seconds (the whole machine, from
// /proc/stat) per 1000 transactions, and the ratio to raw at the same concurrency; with
// --repeat N every figure is the median of N runs. coordinator-only also reports decisions per
// fsync. --recovery N writes N decided-but-unfinished transactions into a fresh decision log and
// times the coordinator's start until /healthz answers 200.
#include <libpq-fe.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "common/cli.h"
#include "common/config.h"
#include "common/event_loop.h"
#include "common/http_client.h"
#include "common/http_server.h"
#include "common/json.h"
#include "common/log.h"
#include "coordinator/service.h"
#include "tests/harness/harness.h"
#include "wal/decision_log.h"

namespace tpc::bench {
namespace {

using testing::PgCluster;
using testing::Process;

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void sleep_ms(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// Busy CPU time of the whole machine, in seconds (user + nice + system + irq + softirq).
double machine_cpu_seconds() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  uint64_t user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0;
  in >> cpu >> user >> nice >> system >> idle >> iowait >> irq >> softirq;
  return static_cast<double>(user + nice + system + irq + softirq) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

struct Cell {
  std::string mode;
  int participants = 0;
  int concurrency = 0;
  double tps = 0, p50_ms = 0, p99_ms = 0, max_ms = 0, cpu_per_1000 = 0;
  double decisions_per_fsync = 0;  // coordinator-only
  uint64_t errors = 0;
  double vs_raw = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// --- fake participants -----------------------------------------------------------------------

// What a participant that agrees to everything at once answers: exec with prepare votes yes,
// with commit commits; a batch of commits and aborts gets each acknowledged.
std::string fake_answer(std::string_view path, const std::string& body) {
  if (path == "/v1/batch") {
    auto j = parse_json(body);
    std::string out = "{\"responses\":[";
    size_t n = j.ok() && j->contains("requests") ? (*j)["requests"].size() : 0;
    for (size_t i = 0; i < n; ++i) {
      std::string p = (*j)["requests"][i]["path"];
      out += i ? "," : "";
      out += p.ends_with("/abort") ? R"({"status":200,"body":{"state":"aborted"}})"
                                   : R"({"status":200,"body":{"state":"committed"}})";
    }
    return out + "]}";
  }
  if (path.ends_with("/exec"))
    return body.find("\"commit\":true") != std::string::npos ? R"({"results":[],"state":"committed"})"
                                                             : R"({"results":[],"state":"prepared","vote":"yes"})";
  if (path.ends_with("/prepare")) return R"({"state":"prepared","vote":"yes"})";
  if (path.ends_with("/precommit")) return R"({"state":"precommitted"})";
  if (path.ends_with("/commit")) return R"({"state":"committed"})";
  if (path.ends_with("/abort")) return R"({"state":"aborted"})";
  return R"({"status":"ok"})";
}

// Answers every agent request at once: exec with prepare votes yes, with commit commits.
class FakeAgents {
 public:
  Status start(int n) {
    loop_ = std::make_unique<EventLoop>(1);
    loop_->start();
    for (int i = 0; i < n; ++i) {
      HttpServerOptions o;
      o.port = 0;
      auto s = HttpServer::start(*loop_, o, [](HttpRequest&& req, Responder respond) {
        HttpResponse r;
        r.body = fake_answer(req.path(), req.body);
        respond(std::move(r));
      });
      if (!s.ok()) return s.status();
      servers_.push_back(std::move(*s));
    }
    return ok_status();
  }
  std::string url(int i) const { return "http://127.0.0.1:" + std::to_string(servers_[i]->port()); }
  ~FakeAgents() {
    for (auto& s : servers_) s->stop();
    servers_.clear();
    if (loop_) loop_->stop();
  }

 private:
  std::unique_ptr<EventLoop> loop_;
  std::vector<std::unique_ptr<HttpServer>> servers_;
};

// --- the system under test -------------------------------------------------------------------

const std::vector<std::string> kModes = {"raw",         "raw-pipelined", "local",
                                         "interactive", "oneshot",       "coordinator-only",
                                         "saga",        "tcc",           "msg"};

struct Options {
  std::vector<int> participants = {2, 4};
  std::vector<int> concurrency = {1, 8, 32, 64};
  std::vector<std::string> modes{kModes.begin(), kModes.end()};
  int seconds = 5;
  int repeat = 1;
  int accounts = 10'000;
  bool json = false;
  int64_t recovery = 0;
};

// The branches of one transaction answered so far, on the client loop's thread.
struct Join {
  int left;
  bool ok = true;
};

// POST url+target with body; `then` runs on the client loop's thread.
using Call =
    std::function<void(const Url&, std::string, std::string, std::function<void(HttpResult)>)>;

class Rig {
 public:
  Rig(const Options& o, int participants) : opts_(o), n_(participants) {}
  Status start();
  Cell run(const std::string& mode, int concurrency);
  void stop();

 private:
  Status start_in_process_coordinator();
  Status wait_healthy(const Url& url);
  // One transaction of the mode; returns false on an error.
  bool raw_txn(std::vector<PGconn*>& conns, std::mt19937_64& rng, uint64_t n, bool two_phase, int client);
  bool raw_sequential_txn(std::vector<PGconn*>& conns, std::mt19937_64& rng, uint64_t n, int client);
  // One transaction over HTTP; `done(ok)` runs on the client loop's thread.
  void http_txn(const std::string& mode, HttpClient& client, std::mt19937_64& rng,
                std::function<void(bool)> done);
  void saga_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done);
  void msg_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done);
  void tcc_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done);
  struct Request {
    Url url;
    std::string prefix, suffix;  // the target is prefix + gid + suffix
    std::string body;
  };
  void begin_all_end(const Call& call, std::string begin_body, std::vector<Request> requests,
                     std::function<void(bool)> done);
  double coordinator_fsync_ratio(const Url& url, double* fsyncs, double* records);

  Options opts_;
  int n_;
  std::string dir_;
  std::vector<std::unique_ptr<PgCluster>> pg_;
  std::vector<std::unique_ptr<Process>> agents_;
  std::vector<Url> agent_urls_;
  std::unique_ptr<Process> coordinator_;
  Url coordinator_url_, fake_coordinator_url_;
  StderrSink sink_;
  std::unique_ptr<Logger> logger_;
  std::unique_ptr<coord::CoordinatorService> in_process_;
  std::unique_ptr<EventLoop> client_loop_;
};

Status Rig::wait_healthy(const Url& url) {
  for (int i = 0; i < 600; ++i) {
    auto r = http_call(url, "GET", "/healthz", "", 1'000);
    if (r.status.ok() && r.http_status == 200) return ok_status();
    sleep_ms(50);
  }
  return unavailable("no healthy answer from " + url.to_string());
}

Status Rig::start() {
  dir_ = testing::make_temp_dir("tpc-bench");
  std::vector<std::string> participants;
  for (int i = 0; i < n_; ++i) {
    PgCluster::Options po;
    po.max_connections = 400;
    po.max_prepared_transactions = 300;
    // Durable like production: the harness turns fsync off for tests; the benchmark does not.
    po.extra_conf = "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\nshared_buffers = 128MB\n";
    auto c = PgCluster::create(po);
    if (!c.ok()) return c.status();
    auto r = testing::query((*c)->conninfo(),
                            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL,"
                            " frozen bigint NOT NULL DEFAULT 0);"
                            "INSERT INTO accounts SELECT g, 1000000 FROM generate_series(1, " +
                                std::to_string(opts_.accounts) + ") g;");
    if (!r.ok()) return r.status();
    if (auto v = testing::query((*c)->conninfo(), "VACUUM ANALYZE accounts"); !v.ok()) return v.status();
    pg_.push_back(std::move(*c));
  }
  Url curl;
  curl.host = "127.0.0.1";
  curl.port = testing::free_port();
  coordinator_url_ = curl;
  for (int i = 0; i < n_; ++i) {
    Url u;
    u.host = "127.0.0.1";
    u.port = testing::free_port();
    agent_urls_.push_back(u);
    participants.push_back("a" + std::to_string(i) + "=" + u.to_string());
  }
  {
    std::vector<std::string> argv = {testing::bin_dir() + "/tpc-coordinator", "--listen",
                                     "127.0.0.1:" + std::to_string(curl.port), "--data-dir", dir_ + "/coordinator",
                                     "--log-level", "warn"};
    for (auto& part : participants) argv.push_back("--participant=" + part);
    std::vector<std::string> env;
    if (const char* e = getenv("TPC_BENCH_ENV")) env.push_back(e);
    auto p = Process::spawn(argv, dir_ + "/coordinator.log", env);
    if (!p.ok()) return p.status();
    coordinator_ = std::move(*p);
    TPC_RETURN_IF_ERROR(wait_healthy(coordinator_url_));
  }
  for (int i = 0; i < n_; ++i) {
    std::vector<std::string> argv = {testing::bin_dir() + "/tpc-agent", "--listen",
                                     "127.0.0.1:" + std::to_string(agent_urls_[i].port), "--name",
                                     "a" + std::to_string(i), "--pg", pg_[i]->conninfo(), "--coordinator",
                                     "c1=" + coordinator_url_.to_string(), "--log-level", "warn",
                                     "--branches-max", "160"};
    std::vector<std::string> env;
    if (const char* e = getenv("TPC_BENCH_ENV")) env.push_back(e);
    auto p = Process::spawn(argv, dir_ + "/agent" + std::to_string(i) + ".log", env);
    if (!p.ok()) return p.status();
    agents_.push_back(std::move(*p));
    TPC_RETURN_IF_ERROR(wait_healthy(agent_urls_[i]));
  }
  TPC_RETURN_IF_ERROR(start_in_process_coordinator());
  client_loop_ = std::make_unique<EventLoop>(1);
  client_loop_->start();
  return ok_status();
}

// Participants that answer every message at once, without a network: what is left is the
// coordinator's own work.
void fake_participant(const Url&, HttpRequest req, SendOptions, std::function<void(HttpResult)> done) {
  HttpResult r;
  r.http_status = 200;
  r.body = fake_answer(req.target, req.body);
  done(std::move(r));
}

Status Rig::start_in_process_coordinator() {
  logger_ = std::make_unique<Logger>(&sink_, LogFormat::text, LogLevel::warn);
  coord::CoordinatorConfig cfg;
  cfg.http.port = 0;
  cfg.machine.coordinator_id = "c1";
  for (int i = 0; i < n_; ++i) cfg.participants["a" + std::to_string(i)] = "http://127.0.0.1:1";
  cfg.transport = fake_participant;
  wal::LevelDbOptions lo;
  lo.dir = dir_ + "/in-process-coordinator";
  auto log = wal::open_leveldb_log(lo);
  if (!log.ok()) return log.status();
  auto svc = coord::CoordinatorService::start(cfg, std::move(*log), *logger_);
  if (!svc.ok()) return svc.status();
  in_process_ = std::move(*svc);
  fake_coordinator_url_.host = "127.0.0.1";
  fake_coordinator_url_.port = in_process_->port();
  return wait_healthy(fake_coordinator_url_);
}

void Rig::stop() {
  coordinator_.reset();
  if (in_process_) in_process_->shutdown(1'000);
  in_process_.reset();
  agents_.clear();
  if (client_loop_) client_loop_->stop();
  pg_.clear();
  testing::remove_tree(dir_);
}

bool drain(PGconn* c, bool* ok) {
  while (PGresult* r = PQgetResult(c)) {
    ExecStatusType s = PQresultStatus(r);
    if (s != PGRES_COMMAND_OK && s != PGRES_TUPLES_OK) *ok = false;
    PQclear(r);
  }
  return *ok;
}

bool Rig::raw_txn(std::vector<PGconn*>& conns, std::mt19937_64& rng, uint64_t n, bool two_phase, int client) {
  std::string gid = "raw-" + std::to_string(client) + "-" + std::to_string(n);
  bool ok = true;
  for (auto* c : conns) {
    std::string sql = "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = " +
                      std::to_string(rng() % static_cast<uint64_t>(opts_.accounts) + 1) + "; " +
                      (two_phase ? "PREPARE TRANSACTION '" + gid + "'" : std::string("COMMIT"));
    if (PQsendQuery(c, sql.c_str()) != 1) ok = false;
  }
  for (auto* c : conns) drain(c, &ok);
  if (!two_phase || !ok) return ok;
  std::string commit = "COMMIT PREPARED '" + gid + "'";
  for (auto* c : conns)
    if (PQsendQuery(c, commit.c_str()) != 1) ok = false;
  for (auto* c : conns) drain(c, &ok);
  return ok;
}

bool exec_ok(PGconn* c, const std::string& sql) {
  PGresult* r = PQexec(c, sql.c_str());
  bool ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
  PQclear(r);
  return ok;
}

bool Rig::raw_sequential_txn(std::vector<PGconn*>& conns, std::mt19937_64& rng, uint64_t n, int client) {
  std::string gid = "raw-" + std::to_string(client) + "-" + std::to_string(n);
  for (auto* c : conns) {
    if (!exec_ok(c, "BEGIN")) return false;
    if (!exec_ok(c, "UPDATE accounts SET balance = balance + 1 WHERE id = " +
                        std::to_string(rng() % static_cast<uint64_t>(opts_.accounts) + 1)))
      return false;
    if (!exec_ok(c, "PREPARE TRANSACTION '" + gid + "'")) return false;
  }
  for (auto* c : conns)
    if (!exec_ok(c, "COMMIT PREPARED '" + gid + "'")) return false;
  return true;
}

void Rig::http_txn(const std::string& mode, HttpClient& client, std::mt19937_64& rng,
                   std::function<void(bool)> done) {
  auto call = [&client](const Url& url, std::string target, std::string body,
                        std::function<void(HttpResult)> then) {
    HttpRequest req;
    req.method = "POST";
    req.target = std::move(target);
    req.body = std::move(body);
    SendOptions so;
    so.timeout_ms = 30'000;
    so.idempotent = false;
    client.send(url, std::move(req), so, std::move(then));
  };
  auto statements = [&] {
    return Json::array({Json{{"sql", "UPDATE accounts SET balance = balance + 1 WHERE id = $1"},
                             {"params", Json::array({rng() % static_cast<uint64_t>(opts_.accounts) + 1})}}});
  };
  if (mode == "oneshot" || mode == "coordinator-only") {
    Json branches = Json::array();
    for (int i = 0; i < n_; ++i)
      branches.push_back(Json{{"participant", "a" + std::to_string(i)}, {"statements", statements()}});
    const Url& url = mode == "oneshot" ? coordinator_url_ : fake_coordinator_url_;
    call(url, "/v1/transactions/run", dump(Json{{"branches", branches}}),
         [done = std::move(done)](HttpResult r) { done(r.status.ok() && r.http_status == 200); });
    return;
  }
  if (mode == "saga") return saga_txn(call, rng, std::move(done));
  if (mode == "msg") return msg_txn(call, rng, std::move(done));
  if (mode == "tcc") return tcc_txn(call, rng, std::move(done));
  // interactive: begin, then every branch's exec in parallel, then commit (abort on an error).
  std::vector<Request> execs;
  for (int i = 0; i < n_; ++i)
    execs.push_back(
        {agent_urls_[i], "/v1/branches/", "/exec", dump(Json{{"statements", statements()}})});
  begin_all_end(call, "{}", std::move(execs), std::move(done));
}

// Begins a transaction, sends every request (each to prefix + gid + suffix) in parallel, then
// commits it when all answered 200, or aborts it.
void Rig::begin_all_end(const Call& call, std::string begin_body, std::vector<Request> requests,
                        std::function<void(bool)> done) {
  call(coordinator_url_, "/v1/transactions", std::move(begin_body),
       [this, call, requests = std::move(requests), done = std::move(done)](HttpResult b) mutable {
         if (!b.status.ok() || b.http_status != 201) return done(false);
         auto j = parse_json(b.body);
         if (!j.ok() || !j->contains("gid")) return done(false);
         std::string gid = (*j)["gid"];
         auto join = std::make_shared<Join>(Join{static_cast<int>(requests.size())});
         auto finish = [this, call, gid, join, done = std::move(done)]() {
           call(coordinator_url_, "/v1/transactions/" + gid + (join->ok ? "/commit" : "/abort"), "",
                [ok = join->ok, done](HttpResult c) {
                  done(ok && c.status.ok() && c.http_status == 200);
                });
         };
         for (auto& r : requests)
           call(r.url, r.prefix + gid + r.suffix, std::move(r.body),
                [join, finish](HttpResult res) {
                  join->ok = join->ok && res.status.ok() && res.http_status == 200;
                  if (--join->left == 0) finish();
                });
       });
}

// A SQL op of one statement on agent i.
Json sql_op(int i, const std::string& sql, uint64_t account) {
  return Json{
      {"participant", "a" + std::to_string(i)},
      {"statements", Json::array({Json{{"sql", sql}, {"params", Json::array({account})}}})}};
}

void Rig::saga_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done) {
  Json steps = Json::array();
  for (int i = 0; i < n_; ++i) {
    uint64_t account = rng() % static_cast<uint64_t>(opts_.accounts) + 1;
    steps.push_back(Json{
        {"name", "s" + std::to_string(i)},
        {"action", sql_op(i, "UPDATE accounts SET balance = balance + 1 WHERE id = $1", account)},
        {"compensate",
         sql_op(i, "UPDATE accounts SET balance = balance - 1 WHERE id = $1", account)}});
  }
  call(coordinator_url_, "/v1/transactions/run", dump(Json{{"protocol", "saga"}, {"steps", steps}}),
       [done = std::move(done)](HttpResult r) { done(r.status.ok() && r.http_status == 200); });
}

void Rig::msg_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done) {
  auto op = [&](int i) {
    uint64_t account = rng() % static_cast<uint64_t>(opts_.accounts) + 1;
    return sql_op(i, "UPDATE accounts SET balance = balance + 1 WHERE id = $1", account);
  };
  Json destinations = Json::array();
  for (int i = 1; i < n_; ++i) destinations.push_back(op(i));
  Json body = {{"protocol", "msg"}, {"local", op(0)}, {"destinations", std::move(destinations)}};
  call(coordinator_url_, "/v1/transactions/run", dump(body),
       [done = std::move(done)](HttpResult r) { done(r.status.ok() && r.http_status == 200); });
}

void Rig::tcc_txn(const Call& call, std::mt19937_64& rng, std::function<void(bool)> done) {
  std::vector<Request> tries;
  for (int i = 0; i < n_; ++i) {
    uint64_t account = rng() % static_cast<uint64_t>(opts_.accounts) + 1;
    tries.push_back(
        {coordinator_url_, "/v1/transactions/", "/try",
         dump(Json{
             {"branch", "b" + std::to_string(i)},
             {"try", sql_op(i, "UPDATE accounts SET frozen = frozen + 1 WHERE id = $1", account)},
             {"confirm",
              sql_op(i,
                     "UPDATE accounts SET balance = balance + 1, frozen = frozen - 1 WHERE id = $1",
                     account)},
             {"cancel",
              sql_op(i, "UPDATE accounts SET frozen = frozen - 1 WHERE id = $1", account)}})});
  }
  begin_all_end(call, dump(Json{{"protocol", "tcc"}}), std::move(tries), std::move(done));
}

double Rig::coordinator_fsync_ratio(const Url& url, double* fsyncs, double* records) {
  auto r = http_call(url, "GET", "/metrics", "", 5'000);
  *fsyncs = *records = 0;
  std::istringstream in(r.body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("tpc_coordinator_log_fsyncs_total ", 0) == 0) *fsyncs = std::stod(line.substr(line.find(' ') + 1));
    if (line.rfind("tpc_coordinator_log_records_synced_total ", 0) == 0)
      *records = std::stod(line.substr(line.find(' ') + 1));
  }
  return *fsyncs > 0 ? *records / *fsyncs : 0;
}

Cell Rig::run(const std::string& mode, int concurrency) {
  Cell cell;
  cell.mode = mode;
  cell.participants = n_;
  cell.concurrency = concurrency;
  std::atomic<bool> measuring{false}, stop{false};
  std::atomic<uint64_t> done{0}, errors{0};
  std::mutex lat_mu;
  std::vector<int64_t> latencies;
  HttpClientOptions co;
  co.connections_per_host_max = static_cast<size_t>(concurrency) + 8;
  HttpClient client(*client_loop_, co);
  bool sql_mode = mode == "raw" || mode == "raw-pipelined" || mode == "local";
  // SQL modes: one thread per client, each with its own connections (what an application
  // would write by hand). HTTP modes: `concurrency` closed-loop clients on one event-loop
  // thread, so the load generator costs little of the machine it shares with what it measures.
  std::vector<std::thread> threads;
  for (int c = 0; sql_mode && c < concurrency; ++c) {
    threads.emplace_back([&, c] {
      std::mt19937_64 rng(static_cast<uint64_t>(c) * 7919 + 1);
      std::vector<PGconn*> conns;
      for (auto& pg : pg_) conns.push_back(PQconnectdb(pg->conninfo().c_str()));
      std::vector<int64_t> mine;
      uint64_t n = 0;
      while (!stop) {
        int64_t t0 = now_us();
        bool ok = mode == "raw"             ? raw_sequential_txn(conns, rng, ++n, c)
                  : mode == "raw-pipelined" ? raw_txn(conns, rng, ++n, true, c)
                                            : raw_txn(conns, rng, ++n, false, c);
        if (!measuring) continue;
        if (ok) {
          mine.push_back(now_us() - t0);
          ++done;
        } else {
          ++errors;
        }
      }
      for (auto* pc : conns) PQfinish(pc);
      std::lock_guard lock(lat_mu);
      latencies.insert(latencies.end(), mine.begin(), mine.end());
    });
  }
  struct Chain {
    std::mt19937_64 rng;
    int64_t started_us = 0;
  };
  std::vector<Chain> chains;
  std::promise<void> chains_done;
  int chains_live = sql_mode ? 0 : concurrency;  // touched on the client loop's thread only
  std::function<void(size_t)> next = [&](size_t i) {
    if (stop) {
      if (--chains_live == 0) chains_done.set_value();
      return;
    }
    chains[i].started_us = now_us();
    http_txn(mode, client, chains[i].rng, [&, i](bool ok) {
      if (measuring) {
        if (ok) {
          latencies.push_back(now_us() - chains[i].started_us);  // only this thread appends
          ++done;
        } else {
          ++errors;
        }
      }
      next(i);
    });
  };
  if (!sql_mode) {
    for (int c = 0; c < concurrency; ++c) chains.push_back(Chain{std::mt19937_64(static_cast<uint64_t>(c) * 7919 + 1)});
    client_loop_->post([&] {
      for (size_t i = 0; i < chains.size(); ++i) next(i);
    });
  } else {
    chains_done.set_value();
  }
  sleep_ms(1'000);  // warm-up
  double f0 = 0, r0 = 0, f1 = 0, r1 = 0;
  if (mode == "coordinator-only") coordinator_fsync_ratio(fake_coordinator_url_, &f0, &r0);
  double cpu0 = machine_cpu_seconds();
  int64_t t0 = now_us();
  measuring = true;
  sleep_ms(opts_.seconds * 1000LL);
  measuring = false;
  int64_t t1 = now_us();
  double cpu1 = machine_cpu_seconds();
  if (mode == "coordinator-only") coordinator_fsync_ratio(fake_coordinator_url_, &f1, &r1);
  stop = true;
  for (auto& t : threads) t.join();
  chains_done.get_future().wait();
  double secs = static_cast<double>(t1 - t0) / 1e6;
  uint64_t n = done.load();
  cell.tps = static_cast<double>(n) / secs;
  cell.errors = errors.load();
  std::sort(latencies.begin(), latencies.end());
  if (!latencies.empty()) {
    auto at = [&](double p) {
      return static_cast<double>(latencies[std::min(latencies.size() - 1, static_cast<size_t>(p * static_cast<double>(latencies.size())))]) / 1000.0;
    };
    cell.p50_ms = at(0.5);
    cell.p99_ms = at(0.99);
    cell.max_ms = static_cast<double>(latencies.back()) / 1000.0;
  }
  cell.cpu_per_1000 = n > 0 ? (cpu1 - cpu0) / static_cast<double>(n) * 1000.0 : 0;
  if (f1 > f0) cell.decisions_per_fsync = (r1 - r0) / (f1 - f0);
  return cell;
}

// --- recovery --------------------------------------------------------------------------------

Status recovery_benchmark(int64_t count, Json* out) {
  std::string dir = testing::make_temp_dir("tpc-bench-recovery");
  FakeAgents fakes;
  TPC_RETURN_IF_ERROR(fakes.start(2));
  {
    wal::LevelDbOptions lo;
    lo.dir = dir + "/log";
    auto log = wal::open_leveldb_log(lo);
    if (!log.ok()) return log.status();
    TPC_RETURN_IF_ERROR((*log)->put_meta("epoch", "1"));
    const int64_t batch = 1'000;
    for (int64_t i = 0; i < count; i += batch) {
      std::vector<wal::LogWrite> writes;
      for (int64_t k = i; k < std::min(count, i + batch); ++k) {
        wal::TxnRecord r;
        r.gid = "c1-1-" + std::to_string(k + 1);
        r.decision = wal::Decision::commit;
        r.branches = {{"a0", fakes.url(0), wal::BranchOutcome::pending},
                      {"a1", fakes.url(1), wal::BranchOutcome::pending}};
        writes.push_back(wal::LogWrite::put(std::move(r)));
      }
      (*log)->write(std::move(writes), false, [](Status) {});
    }
    (*log)->flush();
  }
  Url url;
  url.host = "127.0.0.1";
  url.port = testing::free_port();
  int64_t t0 = now_us();
  auto p = Process::spawn({testing::bin_dir() + "/tpc-coordinator", "--listen", "127.0.0.1:" + std::to_string(url.port),
                           "--data-dir", dir + "/log", "--log-level", "warn"},
                          dir + "/coordinator.log");
  if (!p.ok()) return p.status();
  bool healthy = false;
  for (int i = 0; i < 120'000 && !healthy; ++i) {
    auto r = http_call(url, "GET", "/healthz", "", 1'000);
    healthy = r.status.ok() && r.http_status == 200;
    if (!healthy) sleep_ms(5);
  }
  int64_t t1 = now_us();
  std::string log_text = testing::read_file(dir + "/coordinator.log");
  bool all_finished = log_text.find("recovery still driving") == std::string::npos;
  *out = Json{{"transactions", count},
              {"seconds_to_healthy", static_cast<double>(t1 - t0) / 1e6},
              {"healthy", healthy},
              {"all_finished_before_healthy", all_finished}};
  p->reset();
  testing::remove_tree(dir);
  return ok_status();
}

// --- output ----------------------------------------------------------------------------------

void print_table(const std::vector<Cell>& cells) {
  int last_p = -1, last_c = -1;
  for (auto& c : cells) {
    if (c.participants != last_p || c.concurrency != last_c) {
      std::printf("\n%d participants, concurrency %d\n", c.participants, c.concurrency);
      std::printf("  %-17s %10s %9s %9s %9s %14s %8s %s\n", "mode", "tx/s", "p50 ms", "p99 ms", "max ms",
                  "cpu s/1000tx", "vs raw", "");
      last_p = c.participants;
      last_c = c.concurrency;
    }
    std::string extra;
    if (c.mode == "coordinator-only") {
      char buf[64];
      std::snprintf(buf, sizeof buf, "decisions/fsync %.1f", c.decisions_per_fsync);
      extra = buf;
    }
    if (c.errors > 0) extra += (extra.empty() ? "" : ", ") + std::to_string(c.errors) + " errors";
    char ratio[16] = "       -";  // no raw cell in this run
    if (c.vs_raw > 0) std::snprintf(ratio, sizeof ratio, "%7.2fx", c.vs_raw);
    std::printf("  %-17s %10.0f %9.2f %9.2f %9.2f %14.3f %s %s\n", c.mode.c_str(), c.tps, c.p50_ms, c.p99_ms,
                c.max_ms, c.cpu_per_1000, ratio, extra.c_str());
  }
  std::fflush(stdout);
}

}  // namespace
}  // namespace tpc::bench

int main(int argc, char** argv) {
  using namespace tpc;
  using namespace tpc::bench;
  std::vector<OptionSpec> specs = {
      {"participants", "participant counts, comma-separated", "2,4"},
      {"concurrency", "client counts, comma-separated", "1,8,32,64"},
      {"modes", "raw,raw-pipelined,local,interactive,oneshot,coordinator-only,saga,tcc,msg",
       "raw,raw-pipelined,local,interactive,oneshot,coordinator-only,saga,tcc,msg"},
      {"seconds", "measured seconds per cell (after 1 s of warm-up)", "5"},
      {"repeat", "runs per cell; figures are medians", "1"},
      {"accounts", "rows per database", "10000"},
      {"recovery",
       "also time a restart with this many decided-but-unfinished transactions (0: skip)", "0"},
      {"json", "print JSON instead of tables", "", false, true},
      {"help", "print this help", "", false, true},
  };
  add_version_option(&specs);
  auto parsed = parse_command_line("tpc-bench", "tpc-bench [options]", specs, argc, argv);
  if (auto* code = std::get_if<int>(&parsed)) return *code;
  Config* c = &std::get<Config>(parsed);
  auto die = [](const std::string& m) { return fail("tpc-bench", m, 2); };
  Options o;
  auto ints = [](const std::string& text) {
    std::vector<int> out;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, ','))
      if (!item.empty()) out.push_back(std::stoi(item));
    return out;
  };
  try {
    o.participants = ints(c->get("participants"));
    o.concurrency = ints(c->get("concurrency"));
  } catch (...) {
    return die("--participants and --concurrency want comma-separated numbers");
  }
  o.modes.clear();
  {
    std::stringstream ss(c->get("modes"));
    std::string m;
    while (std::getline(ss, m, ',')) {
      if (std::find(kModes.begin(), kModes.end(), m) == kModes.end())
        return die("unknown mode \"" + m + "\"");
      o.modes.push_back(m);
    }
  }
  auto secs = c->get_int("seconds", 1, 3'600);
  auto repeat = c->get_int("repeat", 1, 100);
  auto accounts = c->get_int("accounts", 1, 10'000'000);
  auto recovery = c->get_int("recovery", 0, 10'000'000);
  for (auto* r : {&secs, &repeat, &accounts, &recovery})
    if (!r->ok()) return die(r->status().message());
  o.seconds = static_cast<int>(*secs);
  o.repeat = static_cast<int>(*repeat);
  o.accounts = static_cast<int>(*accounts);
  o.recovery = *recovery;
  o.json = c->flag("json");

  std::vector<Cell> cells;
  for (int p : o.participants) {
    Rig rig(o, p);
    Status st = rig.start();
    if (!st.ok()) return die("set-up failed: " + st.to_string());
    for (int conc : o.concurrency) {
      double raw_tps = 0;
      std::vector<Cell> row;
      for (auto& mode : o.modes) {
        std::vector<Cell> runs;
        for (int i = 0; i < o.repeat; ++i) runs.push_back(rig.run(mode, conc));
        Cell m = runs[0];
        auto med = [&](auto field) {
          std::vector<double> v;
          for (auto& r : runs) v.push_back(r.*field);
          return median(v);
        };
        m.tps = med(&Cell::tps);
        m.p50_ms = med(&Cell::p50_ms);
        m.p99_ms = med(&Cell::p99_ms);
        m.max_ms = med(&Cell::max_ms);
        m.cpu_per_1000 = med(&Cell::cpu_per_1000);
        m.decisions_per_fsync = med(&Cell::decisions_per_fsync);
        if (mode == "raw") raw_tps = m.tps;
        row.push_back(m);
      }
      for (auto& cell : row) {
        cell.vs_raw = raw_tps > 0 ? cell.tps / raw_tps : 0;
        cells.push_back(cell);
      }
      if (!o.json) print_table(row);
    }
    rig.stop();
  }
  Json recovery_json;
  if (o.recovery > 0) {
    Status st = recovery_benchmark(o.recovery, &recovery_json);
    if (!st.ok()) return die("recovery benchmark failed: " + st.to_string());
    if (!o.json)
      std::printf("\nrecovery: %lld decided-but-unfinished transactions, healthy after %.2f s (all finished first: %s)\n",
                  static_cast<long long>(o.recovery), recovery_json["seconds_to_healthy"].get<double>(),
                  recovery_json["all_finished_before_healthy"].get<bool>() ? "yes" : "no");
  }
  if (o.json) {
    Json arr = Json::array();
    for (auto& cell : cells)
      arr.push_back(Json{{"mode", cell.mode}, {"participants", cell.participants}, {"concurrency", cell.concurrency},
                         {"tps", cell.tps}, {"p50_ms", cell.p50_ms}, {"p99_ms", cell.p99_ms}, {"max_ms", cell.max_ms},
                         {"cpu_s_per_1000", cell.cpu_per_1000}, {"vs_raw", cell.vs_raw},
                         {"decisions_per_fsync", cell.decisions_per_fsync}, {"errors", cell.errors}});
    Json out = {{"cells", arr}};
    if (!recovery_json.is_null()) out["recovery"] = recovery_json;
    std::printf("%s\n", out.dump(2).c_str());
  }
  return 0;
}
