#include "tests/integration/testbed.h"

#include <doctest/doctest.h>

#include <fstream>
#include <sstream>

#include "common/http_client.h"

namespace tpc::testing {
namespace {

std::string tail(const std::string& s, size_t n) {
  return s.size() <= n ? s : "..." + s.substr(s.size() - n);
}

Url local(uint16_t port) {
  Url u;
  u.host = "127.0.0.1";
  u.port = port;
  return u;
}

}  // namespace

std::string Http::state() const {
  if (body.is_object() && body.contains("state") && body["state"].is_string())
    return body["state"].get<std::string>();
  return "";
}

std::string Http::describe() const {
  if (!transport.ok()) return "no answer: " + transport.to_string();
  return "HTTP " + std::to_string(status) + " " + raw;
}

double Http::metric(const std::string& name) const {
  REQUIRE_MESSAGE(status == 200, describe());
  auto at = raw.find("\n" + name + " ");
  REQUIRE_MESSAGE(at != std::string::npos, name << " missing");
  return std::stod(raw.substr(at + name.size() + 2));
}

Testbed& Testbed::fresh(const Options& opts) {
  static Testbed* bed = nullptr;
  static std::unique_ptr<Testbed> owner;
  if (!bed) {
    owner.reset(new Testbed());
    bed = owner.get();
    for (int i = 0; i < 2; ++i) {
      auto c = PgCluster::create();
      REQUIRE_MESSAGE(c.ok(), c.status().to_string());
      bed->clusters_[i] = std::move(*c);
    }
  }
  Testbed& b = *bed;
  for (int i = 0; i < 2; ++i) b.agents_[i].reset();
  b.coordinator_.reset();
  b.http_participant_.reset();
  if (!b.dir_.empty()) remove_tree(b.dir_);
  b.dir_ = make_temp_dir("tpc-it");
  b.opts_ = opts;
  b.starts_ = 0;
  for (int i = 0; i < 2; ++i) {
    if (!b.clusters_[i]->running()) REQUIRE(b.clusters_[i]->start().ok());
  }
  b.reset_databases();
  b.coordinator_url_ = local(free_port());
  for (int i = 0; i < 2; ++i) b.agent_urls_[i] = local(free_port());
  b.http_participant_url_ = local(free_port());
  if (opts.start) {
    b.start_coordinator(opts.coordinator_failpoints);
    for (int i = 0; i < 2; ++i) b.start_agent(i, opts.agent_failpoints[i]);
    if (opts.http_participant) b.start_http_participant();
  }
  return b;
}

Testbed::~Testbed() {
  for (auto& a : agents_) a.reset();
  coordinator_.reset();
  http_participant_.reset();
  if (!dir_.empty()) remove_tree(dir_);
}

void Testbed::reset_databases() {
  for (int i = 0; i < 2; ++i) {
    std::string ci = conninfo(i);
    // Leftovers of an earlier failed test must not leak into this one.
    auto leftovers = query(ci, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()");
    REQUIRE_MESSAGE(leftovers.ok(), leftovers.status().to_string());
    for (auto& row : *leftovers) {
      auto r = query(ci, "ROLLBACK PREPARED '" + *row[0] + "'");
      REQUIRE_MESSAGE(r.ok(), r.status().to_string());
    }
    auto r = query(
        ci,
        "DROP TABLE IF EXISTS ledger, accounts, tpc_marker, tpc_agent_state, tpc_barrier;"
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));"
        "CREATE TABLE ledger (id bigserial PRIMARY KEY, account int NOT NULL"
        "  REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED, amount bigint NOT NULL);"
        "INSERT INTO accounts SELECT g, " +
            std::to_string(kInitial) + " FROM generate_series(1, " + std::to_string(kAccounts) +
            ") g;");
    REQUIRE_MESSAGE(r.ok(), r.status().to_string());
    if (opts_.frozen) {  // what TCC tries reserved; balance still includes it
      auto f = query(ci,
                     "ALTER TABLE accounts ADD COLUMN frozen bigint NOT NULL DEFAULT 0"
                     "  CHECK (frozen >= 0 AND frozen <= balance)");
      REQUIRE_MESSAGE(f.ok(), f.status().to_string());
    }
  }
}

PgCluster& Testbed::pg(int i) { return *clusters_[i]; }

std::string Testbed::conninfo(int i) const { return clusters_[i]->conninfo("postgres"); }

std::vector<std::string> Testbed::coordinator_argv(std::vector<std::string> extra) const {
  std::vector<std::string> argv = {
      bin_dir() + "/tpc-coordinator",
      "--listen", "127.0.0.1:" + std::to_string(coordinator_url_.port),
      "--data-dir", dir_ + "/decision-log",
      "--id", "c1",
      "--prepare-timeout-ms", "2000",
      "--commit-wait-ms", "5000",
      "--message-timeout-ms", "2000",
      "--retry-min-ms", "20",
      "--retry-max-ms", "300",
      "--recovery-wait-ms", "10000",
      "--log-level", "debug",
  };
  for (int i = 0; i < 2; ++i)
    argv.push_back("--participant=" + agent_name(i) + "=" + agent_urls_[i].to_string());
  if (opts_.failpoints_endpoint) argv.push_back("--failpoints-endpoint");
  for (auto& a : opts_.coordinator_args) argv.push_back(a);
  for (auto& a : extra) argv.push_back(a);
  return argv;
}

std::vector<std::string> Testbed::agent_argv(int i, std::vector<std::string> extra) const {
  std::vector<std::string> argv = {
      bin_dir() + "/tpc-agent",
      "--listen", "127.0.0.1:" + std::to_string(agent_urls_[i].port),
      "--name", agent_name(i),
      "--pg", conninfo(i),
      "--coordinator", "c1=" + coordinator_url_.to_string(),
      "--in-doubt-after-ms", "300",
      "--scan-interval-ms", "300",
      "--log-level", "debug",
  };
  if (opts_.failpoints_endpoint) argv.push_back("--failpoints-endpoint");
  for (auto& a : opts_.agent_args) argv.push_back(a);
  for (auto& a : extra) argv.push_back(a);
  return argv;
}

void Testbed::wait_healthy(Process& p, const Url& url) {
  bool up = eventually(
      [&] {
        if (!p.running()) return true;  // reported below
        auto r = http_call(url, "GET", "/healthz", "", 1'000);
        return r.status.ok() && r.http_status == 200;
      },
      20'000);
  REQUIRE_MESSAGE(p.running(), "the process exited at start:\n" << p.log_tail());
  REQUIRE_MESSAGE(up, "no healthy answer from " << url.to_string() << ":\n" << p.log_tail());
}

void Testbed::start_coordinator(const std::string& failpoints, std::vector<std::string> extra) {
  std::vector<std::string> env = opts_.coordinator_env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p = Process::spawn(coordinator_argv(std::move(extra)),
                          dir_ + "/coordinator-" + std::to_string(++starts_) + ".log", env);
  REQUIRE_MESSAGE(p.ok(), p.status().to_string());
  coordinator_ = std::move(*p);
  wait_healthy(*coordinator_, coordinator_url_);
}

void Testbed::stop_coordinator(int sig) {
  REQUIRE(coordinator_);
  coordinator_->signal(sig);
  if (sig == SIGKILL || sig == SIGTERM) REQUIRE(coordinator_->wait(20'000) >= 0);
}

void Testbed::start_agent(int i, const std::string& failpoints, std::vector<std::string> extra) {
  std::vector<std::string> env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p = Process::spawn(agent_argv(i, std::move(extra)),
                          dir_ + "/agent" + std::to_string(i) + "-" + std::to_string(++starts_) + ".log",
                          env);
  REQUIRE_MESSAGE(p.ok(), p.status().to_string());
  agents_[i] = std::move(*p);
  wait_healthy(*agents_[i], agent_urls_[i]);
}

void Testbed::stop_agent(int i, int sig) {
  REQUIRE(agents_[i]);
  agents_[i]->signal(sig);
  if (sig == SIGKILL || sig == SIGTERM) REQUIRE(agents_[i]->wait(20'000) >= 0);
}

void Testbed::start_http_participant() {
  std::vector<std::string> argv = {bin_dir() + "/tpc-http-participant", "--listen",
                                   "127.0.0.1:" + std::to_string(http_participant_url_.port),
                                   "--log-level", "debug"};
  auto p = Process::spawn(argv, dir_ + "/http-participant-" + std::to_string(++starts_) + ".log");
  REQUIRE_MESSAGE(p.ok(), p.status().to_string());
  http_participant_ = std::move(*p);
  wait_healthy(*http_participant_, http_participant_url_);
}

bool Testbed::coordinator_running() { return coordinator_ && coordinator_->running(); }
bool Testbed::agent_running(int i) { return agents_[i] && agents_[i]->running(); }

Http Testbed::call(const Url& url, const std::string& method, const std::string& target,
                   const std::string& body, int64_t timeout_ms,
                   const std::vector<std::pair<std::string, std::string>>& headers) {
  HttpRequest req;
  req.method = method;
  req.target = target;
  req.body = body;
  for (auto& h : headers) req.headers.push_back(h);
  HttpResult r = http_call(url, std::move(req), timeout_ms);
  Http out;
  out.transport = r.status;
  out.status = r.http_status;
  out.raw = r.body;
  auto j = parse_json(r.body);
  if (j.ok()) out.body = std::move(*j);
  return out;
}

Http Testbed::coord(const std::string& method, const std::string& target, const std::string& body) {
  return call(coordinator_url_, method, target, body);
}

Http Testbed::agent(int i, const std::string& method, const std::string& target,
                    const std::string& body) {
  return call(agent_urls_[i], method, target, body);
}

Http Testbed::http_participant(const std::string& method, const std::string& target,
                               const std::string& body,
                               const std::vector<std::pair<std::string, std::string>>& headers) {
  return call(http_participant_url_, method, target, body, 30'000, headers);
}

std::string Testbed::begin(const std::string& protocol) {
  Http r = coord("POST", "/v1/transactions", dump(Json{{"protocol", protocol}}));
  REQUIRE_MESSAGE(r.status == 201, r.describe());
  return r.body["gid"].get<std::string>();
}

Http Testbed::exec(int i, const std::string& gid, const std::string& sql, const Json& params) {
  return agent(i, "POST", "/v1/branches/" + gid + "/exec",
               dump(Json{{"sql", sql}, {"params", params}}));
}

Http Testbed::move(int i, const std::string& gid, int account, int64_t delta) {
  return exec(i, gid, "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
              Json::array({delta, account}));
}

Http Testbed::commit(const std::string& gid, const std::string& body) {
  return coord("POST", "/v1/transactions/" + gid + "/commit", body);
}

Http Testbed::abort(const std::string& gid) {
  return coord("POST", "/v1/transactions/" + gid + "/abort");
}

Http Testbed::get(const std::string& gid) { return coord("GET", "/v1/transactions/" + gid); }

bool Testbed::wait_state(const std::string& gid, const std::string& state, int64_t timeout_ms) {
  return eventually([&] { return get(gid).state() == state; }, timeout_ms);
}

bool Testbed::wait_log(Process& p, const std::string& needle, int64_t timeout_ms) {
  return eventually([&] { return read_file(p.log_path()).find(needle) != std::string::npos; },
                    timeout_ms);
}

int64_t Testbed::balance(int i, int account) {
  auto v = query_value(conninfo(i), "SELECT balance FROM accounts WHERE id = " + std::to_string(account));
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  REQUIRE(v->has_value());
  return std::stoll(**v);
}

int64_t Testbed::total() {
  int64_t sum = 0;
  for (int i = 0; i < 2; ++i) {
    auto v = query_value(conninfo(i), "SELECT sum(balance) FROM accounts");
    REQUIRE_MESSAGE(v.ok(), v.status().to_string());
    sum += std::stoll(v->value());
  }
  return sum;
}

int64_t Testbed::prepared(int i) {
  auto v = query_value(conninfo(i),
                       "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'tpc:%' "
                       "AND database = current_database()");
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return std::stoll(v->value());
}

int64_t Testbed::barrier_rows(int i) {
  auto v = query_value(conninfo(i), "SELECT count(*) FROM tpc_barrier");
  REQUIRE_MESSAGE(v.ok(), v.status().to_string());
  return std::stoll(v->value());
}

void Testbed::check_invariants(int64_t timeout_ms) {
  for (int i = 0; i < 2; ++i)
    if (!clusters_[i]->running()) REQUIRE(clusters_[i]->start().ok());
  bool clean = eventually([&] { return prepared(0) == 0 && prepared(1) == 0; }, timeout_ms);
  INFO(logs());
  CHECK_MESSAGE(clean, "prepared transactions left behind: bank a " << prepared(0) << ", bank b "
                                                                    << prepared(1));
  CHECK(total() == kTotal);
}

std::string Testbed::logs() const {
  std::string out;
  auto add = [&](const std::string& title, const std::string& text) {
    out += "\n----- " + title + " -----\n" + tail(text, 6000);
  };
  if (coordinator_) add("coordinator " + coordinator_->log_path(), coordinator_->log_tail(6000));
  for (int i = 0; i < 2; ++i)
    if (agents_[i]) add("agent " + std::to_string(i), agents_[i]->log_tail(6000));
  if (http_participant_) add("http participant", http_participant_->log_tail(6000));
  return out;
}

}  // namespace tpc::testing
