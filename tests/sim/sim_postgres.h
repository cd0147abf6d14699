// A simulated PostgreSQL database and the agent's BranchExecutor over it, for the
// whole-system simulator. It models what the agent relies on, nothing more:
//   - sessions: a branch's open block; its writes are invisible until it commits, and they
//     are lost when the server crashes or the agent's connection closes;
//   - prepared transactions survive a server crash and hold their gid and their row locks;
//     COMMIT/ROLLBACK PREPARED of a gid that is not prepared answers 42704, which the agent
//     must resolve from the marker row (pg::outcome_when_not_prepared);
//   - max_prepared_transactions slots (53200 when full), the marker's primary key (23505 for a
//     second marker or a tombstone), tpc_agent_state rows;
//   - row locks on accounts: a statement that needs a row another transaction holds fails at
//     once with 55P03 (as with a short lock_timeout);
//   - tpc_barrier rows keyed (gid, branch, op), and steps run against them by the same rule as
//     PostgreSQL's (pg::barrier_verdict), in one local transaction;
//   - two statements: UPDATE accounts SET balance = balance + $1 WHERE id = $2, and
//     SELECT balance FROM accounts WHERE id = $1.
// `applied` counts how often each branch's writes were applied: more than once is a bug.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>

#include "participant/branch_executor.h"
#include "tests/sim/sim.h"

namespace tpc::sim {

inline constexpr char kTransferSql[] = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";
inline constexpr char kBalanceSql[] = "SELECT balance FROM accounts WHERE id = $1";

struct SimDb {
  struct Session {
    std::map<int64_t, int64_t> deltas;  // account → change
    bool failed = false;                // a statement failed: the block is aborted
  };
  struct Prepared {
    std::map<int64_t, int64_t> deltas;
    std::string coordinator;
    int64_t epoch = 0, seq = 0;
    int64_t prepared_ms = 0;
  };
  struct Marker {
    std::string coordinator;
    int64_t epoch = 0, seq = 0;
    bool aborted = false;  // a tombstone
  };

  std::string name;
  bool up = true;
  int max_prepared = 8;
  std::map<int64_t, int64_t> balances;
  uint64_t next_session = 1;
  std::map<uint64_t, Session> sessions;
  std::map<int64_t, std::string> locks;  // account → "s<session>" or "p<pg gid>"
  std::map<std::string, Prepared> prepared;
  std::map<std::string, Marker> markers;
  std::map<std::string, std::pair<std::string, std::string>> states;  // tpc_agent_state
  std::map<std::string, int64_t> state_written_ms;                      // when each row was written
  std::map<std::string, int> applied;  // pg gid → times its writes were applied
  std::map<std::string, int64_t> applied_sum;  // pg gid → the sum of its changes
  struct BarrierRow {
    std::string written_by;
    std::string coordinator;
    int64_t epoch = 0, seq = 0;
    std::optional<std::string> result;
  };
  using BarrierKey = std::tuple<std::string, std::string, std::string>;  // gid, branch, op
  std::map<BarrierKey, BarrierRow> barriers;

  int64_t total() const;
  void end_session(uint64_t id);  // rollback
  void crash();                   // every session is lost; prepared transactions stay
  void release(const std::string& holder);
  void apply(const std::string& pgg, const std::map<int64_t, int64_t>& deltas);
};

class SimExecutor final : public agent::BranchExecutor {
 public:
  SimExecutor(World& w, SimDb& db, std::string agent) : w_(w), db_(db), agent_(std::move(agent)) {}
  ~SimExecutor() override { close(); }

  Status open() override;
  agent::OpResult execute(agent::PgOp& op) override;
  void cancel(const std::string&) override {}  // statements never wait here
  Result<Scan> scan() override;
  Result<Purged> purge_finished(const std::string& coordinator, int64_t epoch,
                                int64_t seq) override;
  Result<int64_t> purge_stale_states() override;
  void close() override;
  uint64_t connections_opened() const override { return opened_; }

  // Asked after each operation ran: true when the server crashes right then, before its
  // answer leaves (the caller has crashed the database). The agent then sees a lost
  // connection for work that was done: a COMMIT PREPARED that committed, a PREPARE that
  // prepared — the ambiguity the marker row exists for.
  std::function<bool()> crash_after_op;
  // Told when a branch's work becomes permanent or may: it prepared, or committed in one phase.
  std::function<void(const std::string& pgg)> on_kept;
  // Told what each step did (its barrier's verdict; nullopt: its statements failed), as it
  // commits — the order of these calls is the order in which steps took effect.
  std::function<void(const agent::PgOp& op, std::optional<pg::Barrier> verdict)> on_step;

 private:
  agent::OpResult run_op(agent::PgOp& op, const std::string& pgg);
  agent::OpResult exec(agent::PgOp& op, const std::string& pgg);
  // Runs one statement in session s; sets res->status/sqlstate on failure.
  bool run_statement(uint64_t s, const agent::Statement& st, agent::OpResult* res);
  pg::PrepareResult prepare_in(uint64_t s, const agent::PgOp& op, const std::string& pgg);
  pg::Outcome commit_in(uint64_t s, const agent::PgOp& op, const std::string& pgg, std::string* reason);
  agent::OpResult any_connection(const agent::PgOp& op, const std::string& pgg);
  agent::OpResult step(agent::PgOp& op);
  agent::OpResult check(agent::PgOp& op, SimDb::BarrierRow fence);
  // The branch's session, if it is still alive; 0 if none (or lost, *lost set).
  uint64_t session_of(const std::string& gid, bool* lost);

  World& w_;
  SimDb& db_;
  std::string agent_;
  std::map<std::string, uint64_t> sessions_;  // gid → db session
  uint64_t opened_ = 0;
};

}  // namespace tpc::sim
