// AgentService: the driver around AgentMachine. It owns the HTTP server (the agent API of
// docs/DESIGN.md §3), the HTTP client to the coordinators, a bounded pool of worker threads
// that run every PostgreSQL operation (HTTP threads never wait on PostgreSQL), and the
// connection pool: one session per open branch, any idle connection for the rest.
//
// Start-up refuses to run when PostgreSQL is unreachable or max_prepared_transactions is 0,
// creates the agent's tables, and scans pg_prepared_xacts for this agent's branches before it
// answers /healthz; the scan then repeats every scan_interval_ms. Markers of transactions the
// coordinators report finished are purged every purge_interval_ms.
//
// Threads: the machine is serialised by one mutex; its effects run outside it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/http.h"
#include "common/runtime.h"
#include "common/http_server.h"
#include "common/ids.h"
#include "common/log.h"
#include "common/metrics.h"
#include "participant/agent_machine.h"
#include "participant/codec.h"
#include "participant/branch_executor.h"
#include "participant/pg_conn.h"  // ConnectOptions

namespace tpc::agent {

struct AgentConfig {
  HttpServerOptions http;
  int threads = 2;
  std::string advertise_url;  // how coordinators reach us; default http://<listen>
  pg::ConnectOptions pg;
  int pg_workers = 80;                     // threads that run PostgreSQL operations; a statement
                                           // waiting on a lock holds one, so keep it above
                                           // branches_max
  size_t pg_idle_max = 80;                 // idle connections kept open (opening one forks a
                                           // backend: keep them)
  size_t pg_connections_max = 80;          // connections open at once (sessions included);
                                           // keep it under the server's max_connections
  std::map<std::string, std::string> coordinators;  // coordinator id → URL
  std::string token;              // clients and coordinators must send it
  std::string coordinator_token;  // sent to coordinators
  std::string peer_token;         // sent to other agents (3PC termination)
  AgentOptions machine;
  ExecLimits exec;
  int64_t scan_interval_ms = 5'000;
  int64_t purge_interval_ms = 60'000;
  int64_t tick_ms = 50;
  int64_t coordinator_timeout_ms = 5'000;
  size_t list_limit_max = 1'000;
  size_t batch_max = 1'000;  // requests in one POST /v1/batch
  size_t jobs_max = 4'096;   // PostgreSQL operations waiting for a worker; past it one fails (503)
  bool failpoints_endpoint = false;  // serve POST /v1/failpoints (else 404)
};

class AgentService {
 public:
  // Checks PostgreSQL, runs the first in-doubt scan and starts serving.
  static Result<std::unique_ptr<AgentService>> start(const AgentConfig& cfg, Logger& logger);
  // The same driver over another runtime and PostgreSQL (the simulator): no HTTP server; the
  // caller delivers requests to handle(). rt and pg must outlive the service.
  static Result<std::unique_ptr<AgentService>> start_with(const AgentConfig& cfg, Logger& logger,
                                                          Runtime& rt, BranchExecutor& pg);
  ~AgentService();

  uint16_t port() const;
  void shutdown(int64_t drain_ms);
  void on_stop_signal(std::function<void(int)> fn);
  void handle(HttpRequest&& req, Responder respond);

 private:
  AgentService(const AgentConfig& cfg, Logger& logger, Runtime& rt, BranchExecutor& pg);
  Status open();   // PostgreSQL checks and the first in-doubt scan
  void serve();    // timers on
  void register_metrics();

  // Effects.
  void run(Ready ready);
  void op_done(const std::string& gid, OpKind kind, uint64_t step, OpResult res);
  void enlist(const std::string& gid);
  void query_peers(const PeerQuery& q);
  void ask(const std::string& gid);
  void report(const Report& r);
  void reply(const Reply& r);
  template <class Fn>
  void with_machine(Fn&& fn);

  // PostgreSQL work, on the runtime's workers.
  Status scan_once();
  void scan();
  void purge();

  // HTTP.
  void branch_request(const std::string& gid, std::string_view action, const HttpRequest& req,
                      const Responder& respond);
  void list(const HttpRequest& req, const Responder& respond);
  void batch(const HttpRequest& req, const Responder& respond);
  const std::string* coordinator_url(std::string_view gid) const;
  // A request to the coordinator, with its token when there is one.
  HttpRequest coordinator_request(std::string method, std::string target) const;

  void tick();
  void schedule(int64_t delay_ms, std::function<void()> fn);

  AgentConfig cfg_;
  Logger& log_;
  Runtime& rt_;  // time, timers, transport and workers (*real_ unless given)
  BranchExecutor& pg_;
  std::unique_ptr<RealRuntime> real_;
  std::unique_ptr<BranchExecutor> own_pg_;
  std::unique_ptr<HttpServer> server_;
  Metrics metrics_;
  Histogram* op_latency_ = nullptr;

  std::mutex mu_;  // guards machine_
  AgentMachine machine_;

  std::mutex waiters_mu_;
  std::unordered_map<uint64_t, Responder> waiters_;
  std::atomic<uint64_t> next_waiter_{1};

  // This run of the agent, sent with every enlist: a branch enlisted by an earlier run lost its
  // session with that run, and the coordinator refuses to let a new session continue it.
  std::string instance_;
  std::atomic<bool> stopping_{false};
  std::mutex timers_mu_;  // guards shut_down_
  bool shut_down_ = false;
  bool started_ = false;  // start() completed
};

}  // namespace tpc::agent
