// PgExecutor: the agent's branch operations on PostgreSQL through libpq. A bounded connection
// pool: one session per open branch (kept between its operations), any idle connection for the
// rest; the agent's tables and identity checked at open(). Cancels run on two threads of their
// own (PQcancel opens a connection).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/ids.h"
#include "common/log.h"
#include "common/runtime.h"
#include "participant/branch_executor.h"
#include "participant/pg_branch.h"
#include "participant/pg_conn.h"

namespace tpc::agent {

// A pooled connection: closing it gives its slot back to the pool's count.
struct ConnCloser {
  std::atomic<int64_t>* open = nullptr;
  void operator()(pg::PgConn* c) const {
    delete c;
    if (open) open->fetch_sub(1);
  }
};
using Conn = std::unique_ptr<pg::PgConn, ConnCloser>;

struct PgExecutorConfig {
  std::string name;                 // the agent's name (its gids' prefix in PostgreSQL)
  pg::ConnectOptions pg;
  size_t pg_idle_max = 80;          // idle connections kept open (opening one forks a backend)
  size_t pg_connections_max = 80;   // open at once, sessions included
  size_t branches_max = 64;         // for the max_prepared_transactions warning
};

class PgExecutor final : public BranchExecutor {
 public:
  PgExecutor(PgExecutorConfig cfg, Logger& logger) : cfg_(std::move(cfg)), log_(logger) {}
  ~PgExecutor() override { close(); }

  Status open() override;
  OpResult execute(PgOp& op) override;
  void cancel(const std::string& gid) override;
  Result<Scan> scan() override;
  Result<Purged> purge_finished(const std::string& coordinator, int64_t epoch,
                                int64_t seq) override;
  Result<int64_t> purge_stale_states() override;
  void close() override;
  uint64_t connections_opened() const override { return connections_opened_.load(); }

 private:
  OpResult exec_branch(PgOp& op, const std::string& pgg, const GidParts& parts);
  OpResult run_step(PgOp& op, const GidParts& parts);
  std::optional<Conn> exec_session(const std::string& gid, bool* begin, OpResult* refused);
  void exec_done(const std::string& gid);
  OpResult outside_session(const PgOp& op, const std::string& pgg, const GidParts& parts);
  void prepare_branch(const std::string& pgg, const GidParts& parts, pg::PgConn& conn,
                      OpResult* res);
  void sessions_keep(const std::string& gid, Conn conn);
  Result<Conn> acquire();
  void release(Conn conn);
  Conn take_session(const std::string& gid);

  const PgExecutorConfig cfg_;
  Logger& log_;

  std::mutex pool_mu_;
  std::vector<Conn> idle_;
  std::unordered_map<std::string, Conn> sessions_;
  std::atomic<uint64_t> connections_opened_{0};
  std::atomic<int64_t> connections_open_{0};

  // Cancelling statements: the canceller of each exec in flight, and cancels asked for before
  // (or between) statements, which execute() honours before running the next one.
  std::mutex cancel_mu_;
  std::unordered_map<std::string, std::shared_ptr<pg::PgCancel>> running_;
  std::unordered_map<std::string, bool> cancel_requested_;
  WorkerPool cancellers_{2, kCancelsWaitingMax};
  static constexpr size_t kCancelsWaitingMax = 1'024;
};

}  // namespace tpc::agent
