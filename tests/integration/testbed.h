// Testbed: the bank the integration tests play with. Two throw-away PostgreSQL clusters
// ("bank a" and "bank b"), each holding `accounts` (kAccounts rows of kInitial), a coordinator
// and one agent per cluster, all real processes talking HTTP.
//
// The clusters are created once per test binary (initdb is slow); Testbed::fresh() gives each
// test case new tables, a new decision log and new processes on new ports. Every test ends
// with check_invariants(): no prepared transaction of ours is left and the money is all there.
// For TCC and saga tests, fresh() can also start a tpc-http-participant (tools/http_participant.h)
// and give `accounts` a `frozen` column for reservations.
#pragma once

#include <csignal>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/http.h"
#include "common/json.h"
#include "tests/harness/harness.h"

namespace tpc::testing {

struct Http {
  Status transport;  // not ok when no HTTP answer came back
  int status = 0;
  Json body;         // null when the body is not JSON
  std::string raw;

  std::string state() const;  // body["state"] or ""
  std::string describe() const;  // "HTTP 409 {...}" for failure messages
  // The value of an unlabelled sample in a /metrics answer; fails the test when absent.
  double metric(const std::string& name) const;
};

class Testbed {
 public:
  static constexpr int kAccounts = 10;
  static constexpr int64_t kInitial = 1000;
  static constexpr int64_t kTotal = 2 * kAccounts * kInitial;

  struct Options {
    std::vector<std::string> coordinator_args;  // extra flags for tpc-coordinator
    std::vector<std::string> agent_args;        // extra flags for both agents
    std::vector<std::string> coordinator_env;   // NAME=VALUE for every coordinator start
    std::string coordinator_failpoints;         // FAILPOINTS for the first coordinator start
    std::string agent_failpoints[2];            // FAILPOINTS for the first start of each agent
    bool start = true;                          // start the processes
    bool failpoints_endpoint = true;            // pass --failpoints-endpoint to every process
    bool http_participant = false;              // start a tpc-http-participant too
    bool frozen = false;  // accounts.frozen: reserved by TCC tries, 0 <= frozen <= balance
  };

  // Fresh tables, decision log and processes. The previous test's processes are killed.
  static Testbed& fresh(const Options& opts);
  static Testbed& fresh() { return fresh(Options{}); }
  ~Testbed();  // at exit: stops the processes and removes the test's directory

  // --- processes -----------------------------------------------------------------------
  void start_coordinator(const std::string& failpoints = "", std::vector<std::string> extra = {});
  // Sends `sig`; for SIGKILL/SIGTERM waits for the exit.
  void stop_coordinator(int sig = SIGKILL);
  void start_agent(int i, const std::string& failpoints = "", std::vector<std::string> extra = {});
  void stop_agent(int i, int sig = SIGKILL);
  Process& coordinator_process() { return *coordinator_; }
  Process& agent_process(int i) { return *agents_[i]; }
  // tpc-http-participant on its own port, started by fresh() with Options::http_participant
  // and killed with the other processes.
  void start_http_participant();
  bool coordinator_running();
  bool agent_running(int i);
  PgCluster& pg(int i);
  std::string conninfo(int i) const;
  const Url& coordinator_url() const { return coordinator_url_; }
  const Url& agent_url(int i) const { return agent_urls_[i]; }
  const Url& http_participant_url() const { return http_participant_url_; }
  // The agents' advertised names: "a0" and "a1".
  static std::string agent_name(int i) { return "a" + std::to_string(i); }

  // --- HTTP ------------------------------------------------------------------------------
  Http call(const Url& url, const std::string& method, const std::string& target,
            const std::string& body = "", int64_t timeout_ms = 30'000,
            const std::vector<std::pair<std::string, std::string>>& headers = {});
  Http coord(const std::string& method, const std::string& target, const std::string& body = "");
  Http agent(int i, const std::string& method, const std::string& target, const std::string& body = "");
  Http http_participant(const std::string& method, const std::string& target,
                        const std::string& body = "",
                        const std::vector<std::pair<std::string, std::string>>& headers = {});
  // POST /v1/transactions; fails the test unless 201.
  std::string begin(const std::string& protocol = "2pc");
  Http exec(int i, const std::string& gid, const std::string& sql, const Json& params = Json::array());
  // balance += delta on bank i's account.
  Http move(int i, const std::string& gid, int account, int64_t delta);
  Http commit(const std::string& gid, const std::string& body = "");
  Http abort(const std::string& gid);
  Http get(const std::string& gid);
  // Polls GET until the state is `state`.
  bool wait_state(const std::string& gid, const std::string& state, int64_t timeout_ms = 20'000);
  // Polls until the log of a process holds `needle`.
  bool wait_log(Process& p, const std::string& needle, int64_t timeout_ms = 20'000);

  // --- PostgreSQL --------------------------------------------------------------------------
  int64_t balance(int i, int account);
  int64_t total();
  // Prepared transactions of our agents in bank i.
  int64_t prepared(int i);
  // Rows in bank i's tpc_barrier (the agents' barrier for TCC and saga steps).
  int64_t barrier_rows(int i);
  // Waits until no prepared transaction of ours is left in either bank; then checks the total.
  void check_invariants(int64_t timeout_ms = 20'000);
  // The tails of every process log and both server logs, for failure messages.
  std::string logs() const;

  const std::string& dir() const { return dir_; }

 private:
  Testbed() = default;
  void reset_databases();
  std::vector<std::string> coordinator_argv(std::vector<std::string> extra) const;
  std::vector<std::string> agent_argv(int i, std::vector<std::string> extra) const;
  void wait_healthy(Process& p, const Url& url);

  std::unique_ptr<PgCluster> clusters_[2];
  std::string dir_;  // this test's temp dir: decision log, process logs
  Options opts_;
  Url coordinator_url_;
  Url agent_urls_[2];
  std::unique_ptr<Process> coordinator_;
  std::unique_ptr<Process> agents_[2];
  Url http_participant_url_;
  std::unique_ptr<Process> http_participant_;
  int starts_ = 0;
};

}  // namespace tpc::testing
