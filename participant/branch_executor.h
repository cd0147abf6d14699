// BranchExecutor: the agent's PostgreSQL side behind an interface — the branch operations the
// machine asks for (PgOp → OpResult), the in-doubt scan, the purges and the start-up checks.
// PgExecutor (participant/pg_executor.h, libpq) in production; the simulator's in-memory
// PostgreSQL in tests/sim/. The driver calls it from Runtime::submit jobs: execute() blocks.
//
// Threads: implementations are thread-safe; each branch has at most one operation in flight
// (the machine's rule).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "participant/agent_machine.h"

namespace tpc::agent {

class BranchExecutor {
 public:
  virtual ~BranchExecutor() = default;

  // Start-up checks: PostgreSQL reachable, max_prepared_transactions, privileges, the agent's
  // tables, the identity of the database. Not ok: the agent must not start.
  virtual Status open() = 0;
  // Runs op to its end; moves the statements out of op.
  virtual OpResult execute(PgOp& op) = 0;
  // Stops the statement running for gid, or the next one before it starts.
  virtual void cancel(const std::string& gid) = 0;

  struct Scan {
    std::vector<AgentMachine::ScanEntry> prepared;
    std::vector<AgentMachine::DecidedEntry> decided;
  };
  // This agent's prepared transactions (with their 3PC or decision records) and the decision
  // records of branches no longer prepared.
  virtual Result<Scan> scan() = 0;
  // The rows of finished transactions: markers and barrier rows of `coordinator` below
  // (epoch, seq).
  struct Purged {
    int64_t markers = 0;
    int64_t barriers = 0;
  };
  virtual Result<Purged> purge_finished(const std::string& coordinator, int64_t epoch,
                                        int64_t seq) = 0;
  // 3PC records left behind by a crash; rows deleted.
  virtual Result<int64_t> purge_stale_states() = 0;
  // Ends every session (PostgreSQL rolls back what was not prepared) and idle connection.
  virtual void close() = 0;
  virtual uint64_t connections_opened() const = 0;
};

}  // namespace tpc::agent
