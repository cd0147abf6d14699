// tpc-sim: the whole system under deterministic simulation.
//
// One coordinator and 2-4 agents — the real CoordinatorService and AgentService with their
// real machines, codecs and drivers — run in one thread over the seeded World of sim.h: its
// clock, its network, a MemoryLog that outlives the coordinator's crashes (SimLog) and one
// simulated PostgreSQL database per agent (sim_postgres.h), and a simulated HTTP service with a
// ledger of its own (sim_participant.h). Clients run transfers between accounts of two
// databases, interactive and one-shot, 2PC and 3PC, TCC driven by the client over the agents'
// step endpoint, TCC, sagas and transactional messages driven by the coordinator over HTTP ops
// to the service and SQL ops to the agents (docs/DESIGN.md §8-§10). For a while faults are on:
// messages lost, duplicated, delayed and reordered; partitions (an agent cut from the
// coordinator, from its peers, or both: the 3PC partition); the coordinator, agents and
// databases crash and come back; an agent's job now and then stalls for seconds (waiting for a
// connection or a lock) while later ones overtake it; wall clocks jump forward and back. Then
// the faults stop, the
// clients finish, and the system must settle within a bound.
//
// Invariants, by name:
//   commit_before_durable   a commit or pre-commit leaves the coordinator only once a commit
//                           decision for its gid is durable in the log (checked on the wire)
//   decision_changed        a durable decision is never replaced by the opposite one
//   answers_disagree        two answers about one gid never say committed and aborted
//   told_before_durable     "committed" is answered only once the decision is durable
//   applied_twice           no branch's writes are applied twice
//   atomicity               once settled, each transfer moved its amount on both sides or on
//                           neither (the sum of its applied changes is 0); a 3PC transfer may
//                           end mixed only after a partition or an agent's crash (a branch
//                           found no peer to ask), and then it must be reported (a heuristic
//                           record at the coordinator or a check row at an agent)
//   told_committed_not_applied, told_aborted_but_applied   answers against the databases
//   prepared_left, session_left   once settled, no prepared branch and no open session remain
//   3pc_decided_without_asking, 3pc_termination_rule   a 3PC branch decides alone only after
//                           asking every peer, and as their answers say (docs/DESIGN.md §4.7)
//   3pc_decision_reversed   a branch that decided alone changes its mind only on a peer's
//                           outcome (committed, pre-committed, aborted), never on silence
//   step_applied_twice, confirm_and_cancel, step_atomicity, step_missing, step_failed
//                           steps (tcc transfers): each applies at most once, a branch is never
//                           both confirmed and cancelled, a finished transfer moved its amount
//                           on both sides or neither, with every leg's confirm (or cancel)
//                           recorded, and a confirm or cancel is never refused
//   agent_says_committed, agent_says_aborted   an agent's view of its branch against its database
//   heuristic_in_2pc        a 2PC transaction never ends heuristic here (nobody resolves by hand)
//   work_after_aborted      a branch an agent answered "aborted" for is never prepared or
//                           committed afterwards (the tombstone's promise)
//   money_created           the sum of all balances, the databases' and the service's, is what
//                           it was
//
// TCC and sagas run by the coordinator (tcc_coord and saga transfers), from the ops the
// participants — the service and the agents' steps — saw take effect (the OpJournal):
//   op_before_durable       a try or action leaves the coordinator only once its transaction's
//                           record is durable, a confirm once its commit decision is, a
//                           compensation once its abort decision is (checked on the wire)
//   op_unfinished           once settled, every TCC and saga record has ended
//   ops_without_record      no participant saw an op of a gid the coordinator has no record of
//   tcc_unregistered_branch no participant saw an op of a branch its record does not list
//   tcc_confirm_and_cancel  a branch never sees both a confirm and a cancel, in either order
//   tcc_try_after_cancel    a try never takes effect after its branch's cancel (anti-hanging)
//   tcc_branch_unsettled    every registered branch is confirmed exactly once, after its try
//                           (committed), or cancelled (aborted)
//   tcc_reservation_left    an aborted transaction's cancels undo exactly the tries that ran
//   saga_action_twice, saga_action_missing, saga_compensated_but_committed
//                           a committed saga applied every action once and compensated none
//   saga_not_compensated    an aborted saga compensated every action that ran, once; a step
//                           without compensation (its pivot) never ran
//   saga_action_after_compensation   an action never takes effect after its compensation
//   saga_compensation_order a sequential saga compensates last step first, and ran its
//   saga_action_order       actions first step first
//   saga_forward_aborted    a forward saga never ends aborted
//   frozen_left             once settled, nothing is frozen or pending at the service and the
//                           agents' hold accounts are empty
//   told_disagrees          a client told committed (aborted) sees its transaction's record end
//                           committed (aborted); walked_away_committed: a TCC transaction its
//                           client left without committing never commits
//   participant_contract    the coordinator's HTTP ops carry the headers of docs/DESIGN.md §8
//   op_request_refused      the coordinator accepts every try, saga and message the clients send
//
// Transactional messages (msg transfers, docs/DESIGN.md §10.1): a producer's local op on an
// agent and one or two destinations (SQL ops on agents, the service's /msg/deliver), sent in
// one request with the local op, or begun, the local op run by the client at the agent (checked
// back through the agent) or at the service (/msg/local, checked back through its /msg/check,
// which fences like the agent's barrier), then committed, aborted or left to check-back;
// op_before_durable also covers the local op and the check (after the half message is durable) and
// deliveries (after the commit is):
//   msg_local_twice         a message's local op applies at most once
//   msg_lost                a message whose local op committed is never aborted
//   msg_delivered_without_local   a message whose local op never committed is never committed
//   msg_delivery            a committed message was applied exactly once at every destination
//   msg_delivered_after_abort     no destination of an aborted message is ever called
//   msg_unknown_slot        no participant saw an op of a slot the message does not have
//
// Best-effort notifications (docs/DESIGN.md §10.3): a third of the transactions of every kind
// carry "notify" to the service's /notify, which refuses 2% (422):
//   notify_wrong_state      a notification tells its transaction's final state, the one its
//                           record ended with (aborted when it has none: presumed)
//   notify_lost             every transaction that ended with "notify" in its record has its
//                           notification in the log (written before its end record)
//   notify_not_received     a delivered notification reached the receiver, with its body
//   notify_body             (notify_body: every delivery carried the body logged)
//   notify_gave_up_early    one given up used all its attempts, unless refused
//   notify_unknown          the receiver got no notification the coordinator has no record of
//
// tpc-sim --sabotage NAME breaks the service's bookkeeping on purpose, so that one of these
// invariants must fail (tests/sim/CMakeLists.txt runs each).
//
//   tpc-sim [--seeds N] [--seed S] [--minutes M] [--threads T] [--faulty-ms F] [--verbose]
//           [--keep-going] [--sabotage NAME]
// --seed S replays one seed and prints its events as they happen; a failure prints the seed,
// the invariant, the last events and the command that replays it.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/json.h"
#include "common/log.h"
#include "common/wire.h"
#include "coordinator/op_spec.h"
#include "coordinator/service.h"
#include "participant/agent_service.h"
#include "participant/pg_branch.h"
#include "tests/sim/sim.h"
#include "tests/sim/sim_participant.h"
#include "tests/sim/sim_postgres.h"

namespace tpc::sim {
namespace {

constexpr uint16_t kCoordinatorPort = 17400;
constexpr int64_t kStartMs = 1'700'000'000'000;   // the world's wall clock at 0
constexpr int64_t kSettleMaxMs = 90'000;          // after the faults, everything settles by then
constexpr int64_t kBalance = 1'000;               // every account starts with it
constexpr int kAccountsPerDb = 20;
constexpr int kClients = 4;
constexpr int kPollsMax = 400;                    // GETs of one gid before the client gives up
constexpr size_t kTraceShown = 60;
// The HTTP service: its port, its accounts (the last two nearly empty: debits fail there).
constexpr uint16_t kServicePort = kCoordinatorPort + 20;
constexpr int kServiceAccounts = 10;
constexpr int64_t kServiceLowBalance = 25;
// Accounts of every database for the coordinator's TCC: a debit's try moves its amount to the
// hold account (confirm takes it from there, cancel gives it back); a credit's try puts it on
// the pending one (confirm moves it to the payee, cancel drops it). Both end at 0. No account
// has the missing id: a statement on it with expect_rows 1 is a business failure.
constexpr int64_t kHoldAccount = 100;
constexpr int64_t kPendingAccount = 101;
constexpr int64_t kMissingAccount = 999;
constexpr int kTryResends = 4;  // a try the client heard nothing about is sent this often

struct Options {
  uint64_t first_seed = 1;
  uint64_t seeds = 1;
  double minutes = 0;  // > 0: run seeds until this much time passed
  int threads = 2;
  int64_t faulty_ms = 8'000;
  bool replay = false;
  bool verbose = false;
  bool keep_going = false;  // every failing seed in one line each, instead of stopping at the first
  Sabotage sabotage = Sabotage::none;
};

struct SabotageName {
  const char* name;
  Sabotage value;
};
constexpr SabotageName kSabotages[] = {
    {"skip_compensation_record", Sabotage::skip_compensation_record},
    {"late_compensation", Sabotage::late_compensation},
    {"cancel_after_confirm", Sabotage::cancel_after_confirm},
    {"skip_cancel_record", Sabotage::skip_cancel_record},
    {"keep_frozen", Sabotage::keep_frozen},
    {"double_undo", Sabotage::double_undo},
    {"tell_committed", Sabotage::tell_committed},
};

// Log lines of the services go into the trace (warnings and errors; everything in a replay).
class TraceSink final : public LogSink {
 public:
  TraceSink(World& w, std::string who) : w_(w), who_(std::move(who)) {}
  void write(LogLevel, std::string_view line) override {
    std::string l(line);
    while (!l.empty() && l.back() == '\n') l.pop_back();
    w_.note(who_ + " log: " + l);
    if (watch) watch(l);
  }
  bool wants_timestamps() const override { return false; }
  std::function<void(const std::string&)> watch;  // sees every line (checks that read the logs)

 private:
  World& w_;
  std::string who_;
};

// The value of `key=` in a text log line ("" if absent): up to the next space, or, for a
// quoted value, the text between the quotes.
std::string log_field(const std::string& line, const std::string& key) {
  size_t at = line.find(" " + key + "=");
  if (at == std::string::npos) return "";
  size_t from = at + key.size() + 2;
  bool quoted = from < line.size() && line[from] == '"';
  if (quoted) ++from;
  size_t to = line.find(quoted ? '"' : ' ', from);
  return line.substr(from, to == std::string::npos ? std::string::npos : to - from);
}

// tcc: a transfer made of steps (docs/DESIGN.md §8) the client sends to the agents itself,
// TCC-shaped: try debits the paying leg, confirm credits the paid one, cancel refunds a debit.
// Its gids belong to coordinator kStepCoordinator, which the agents know but which never
// answers, so they never see the transfers finished.
// tcc_coord: a TCC transaction of the coordinator, a debit branch and a credit branch, each an
// HTTP op to the service or a SQL op to an agent; the client commits, aborts or walks away.
// saga: 2-4 steps, HTTP or SQL, whose deltas sum to 0; backward or forward, sequential or
// parallel, waiting for completion or only for acceptance.
enum class Kind { interactive, oneshot, tcc, tcc_coord, saga, msg };
constexpr char kStepCoordinator[] = "s1";
constexpr int kTryAttemptsMax = 5;  // a try still unknown after these is given up: cancel

// One transfer as the client sees it.
struct Transfer {
  uint64_t id = 0;
  Kind kind = Kind::interactive;
  bool three_phase = false;
  std::string gid;
  struct Leg {
    int agent;
    int64_t account;
    int64_t delta;
  };
  std::vector<Leg> legs;
  size_t next_leg = 0;
  std::string told;  // "committed", "aborted", or empty (unknown)
  bool asked_commit = false;
  int polls = 0;
  bool cancelling = false;  // tcc: a try failed, every leg is cancelled
  // tcc_coord and saga: the branches or steps, named t<id>-<index>.
  struct Op {
    int at = -1;  // -1: the HTTP service; else the agent's index
    int64_t account = 0;
    int64_t delta = 0;
    bool fails = false;       // a SQL op on the missing account: a business failure
    bool compensable = true;  // saga: has a compensation
  };
  std::vector<Op> ops;
  std::vector<Json> requests;  // tcc_coord: each branch's try request, the same on every resend
  bool forward = false, parallel = false, accepted = false;
  bool walked_away = false;  // tcc_coord and msg: left without commit or abort
  bool one_request = false;  // msg: sent with its local op (POST /v1/transactions/run)
};

std::string op_name(uint64_t id, size_t i) {
  return "t" + std::to_string(id) + "-" + std::to_string(i);
}

// "t<id>-<index>" → (id, index).
std::optional<std::pair<uint64_t, size_t>> op_name_parts(const std::string& name) {
  size_t dash = name.find('-');
  if (name.size() < 4 || name[0] != 't' || dash == std::string::npos) return std::nullopt;
  try {
    return std::pair{std::stoull(name.substr(1, dash - 1)),
                     static_cast<size_t>(std::stoul(name.substr(dash + 1)))};
  } catch (...) {
    return std::nullopt;
  }
}

std::string state_of(const Json& j) {
  return j.is_object() && j.contains("state") && j["state"].is_string()
             ? j["state"].get<std::string>()
             : "";
}

class Cluster {
 public:
  Cluster(uint64_t seed, const Options& opts) : seed_(seed), opts_(opts), w_(seed) {}

  // Runs the seed; returns the violations (empty: passed).
  std::vector<std::string> run();
  const World& world() const { return w_; }

 private:
  // Processes.
  void start_coordinator();
  void crash_coordinator();
  void start_agent(size_t i);
  void crash_agent(size_t i);
  void crash_database(size_t i, int64_t down_ms);
  void crash_service();
  std::string url_of(int proc) { return "http://127.0.0.1:" + std::to_string(w_.process(proc).port); }

  // Faults.
  void schedule_fault();
  void inject_fault();
  void stop_faults();

  // Clients.
  void client_next(int client);
  void begin_interactive(int client, std::shared_ptr<Transfer> t);
  void exec_leg(int client, std::shared_ptr<Transfer> t);
  void finish(int client, std::shared_ptr<Transfer> t, bool commit);
  void run_oneshot(int client, std::shared_ptr<Transfer> t);
  void tcc_phase(int client, std::shared_ptr<Transfer> t, size_t leg, const std::string& op);
  void tcc_step(int client, std::shared_ptr<Transfer> t, size_t leg, const std::string& op,
                int attempt);
  void tcc_stepped(int client, std::shared_ptr<Transfer> t, size_t leg, const std::string& op,
                   int attempt, const HttpResult& res);
  void check_steps();
  // tcc_coord and saga.
  void tcc_begin(int client, std::shared_ptr<Transfer> t);
  void tcc_try(int client, std::shared_ptr<Transfer> t, size_t i, int attempt);
  void tcc_decide(int client, std::shared_ptr<Transfer> t);
  void run_saga(int client, std::shared_ptr<Transfer> t);
  int took_answer(Transfer& t, const HttpResult& res, const Json& j, const char* what);
  void plan_tcc(Transfer& t);
  void plan_saga(Transfer& t);
  // msg: a transactional message (docs/DESIGN.md §10.1).
  void plan_msg(Transfer& t);
  Json msg_request(const Transfer& t);
  void run_msg(int client, std::shared_ptr<Transfer> t);
  void msg_local(int client, std::shared_ptr<Transfer> t, int attempt);
  void msg_localed(int client, std::shared_ptr<Transfer> t, int attempt, const HttpResult& res);
  void check_msg(const wal::TxnRecord& rec,
                 std::map<std::string, std::vector<const OpEvent*>>& evs);
  // notify: a third of the transactions carry "notify" to the service's /notify.
  void maybe_notify(Json& body);
  void check_notification(const wal::TxnRecord& rec);
  void check_notified();
  Json service_op(const std::string& path, Json body) const;
  Json sql_op(int agent, Json statements) const;
  Json tcc_request(const Transfer& t, size_t i) const;
  Json saga_request(const Transfer& t);
  void poll(int client, std::shared_ptr<Transfer> t);
  void told(int client, std::shared_ptr<Transfer> t, const std::string& state);
  void done(int client, std::shared_ptr<Transfer> t);
  void post(int proc, const std::string& target, const Json& body, int64_t timeout_ms,
            std::function<void(const HttpResult&, const Json&)> then, bool idempotent = false,
            Headers headers = {});
  void get(int proc, const std::string& target, std::function<void(const HttpResult&, const Json&)> then);
  std::shared_ptr<Transfer> new_transfer();

  // Checks.
  void check_wire(int from, int to, const HttpRequest& req);
  void check_commit_message(const std::string& path, const std::string& body);
  void check_op_message(const std::string& gid, const std::string& op, const std::string& to);
  void answer(const std::string& gid, const std::string& state, const char* where);
  bool settled();
  bool ops_open();  // a TCC or saga record has not ended
  void check_ops();
  void check_tcc(const wal::TxnRecord& rec,
                 std::map<std::string, std::vector<const OpEvent*>>& evs);
  void check_saga(const wal::TxnRecord& rec,
                  std::map<std::string, std::vector<const OpEvent*>>& evs);
  Transfer* transfer_of(const wal::TxnRecord& rec);
  void check_agent_views(const Transfer& t);
  void check_unilateral(size_t i, const std::string& line);
  void check_end();
  void note_aborts(size_t i, const HttpRequest& req, const HttpResponse& resp);
  void note_abort(size_t i, const std::string& path, int status, const Json& body);
  void violation(std::string what) {
    w_.note("VIOLATION " + what);
    violations_.push_back(std::move(what));
  }

  const uint64_t seed_;
  const Options opts_;

 public:
  size_t told_committed = 0, told_aborted = 0;
  size_t ops_committed = 0, ops_aborted = 0;  // TCC, saga and msg transactions, by their records
  size_t notified = 0, given_up = 0;          // notifications, by their records

 private:
  World w_;
  int coord_ = -1, app_ = -1, svc_ = -1;
  std::vector<int> agent_procs_;

  // The coordinator.
  wal::MemoryLog store_;
  LogWatch watch_;
  std::unique_ptr<SimRuntime> coord_rt_;
  std::unique_ptr<TraceSink> coord_sink_;
  std::unique_ptr<Logger> coord_log_;
  SimLog* coord_wal_ = nullptr;
  std::unique_ptr<coord::CoordinatorService> coordinator_;

  // The agents and their databases.
  struct Agent {
    std::string name;
    SimDb db;
    std::unique_ptr<SimRuntime> rt;
    std::unique_ptr<TraceSink> sink;
    std::unique_ptr<Logger> log;
    std::unique_ptr<SimExecutor> exec;
    std::unique_ptr<agent::AgentService> service;
  };
  std::vector<std::unique_ptr<Agent>> agents_;

  // The clients.
  std::unique_ptr<SimRuntime> app_rt_;
  bool clients_stop_ = false;
  int clients_busy_ = 0;
  uint64_t next_transfer_ = 1;
  std::vector<std::shared_ptr<Transfer>> transfers_;
  std::map<std::string, std::string> answers_;  // gid → committed/aborted, as first answered
  // A partition happened, or an agent crashed: a 3PC branch may have found no peer to ask, so
  // 3PC may end mixed (reported; docs/DESIGN.md §4.7).
  bool peers_cut_ = false;
  std::map<std::string, std::string> alone_;
  std::set<std::string> aborted_told_;  // pg gids whose agent answered an abort "aborted"  //
                                        // "agent gid" → the outcome it decided alone

  // The HTTP service, and what every participant saw of the ops.
  OpJournal journal_;
  std::unique_ptr<SimParticipant> service_;
  std::string svc_url_;

  int64_t initial_total_ = 0;
  std::set<std::string> notified_gids_;  // transactions whose notification is in the log
  int64_t unfinished_steps_sum_ = 0;  // money moved by steps of transfers the client left
  std::vector<std::string> violations_;
};

// --- processes ----------------------------------------------------------------------------------

void Cluster::start_coordinator() {
  coord::CoordinatorConfig cfg;
  cfg.machine.coordinator_id = "c1";
  cfg.machine.txn_timeout_default_ms = 6'000;
  cfg.machine.prepare_timeout_ms = 2'000;
  cfg.machine.commit_wait_ms = 3'000;
  cfg.machine.retry_min_ms = 50;
  cfg.machine.retry_max_ms = 1'000;
  cfg.message_timeout_ms = 1'000;
  cfg.recovery_wait_ms = 5'000;
  cfg.compaction_interval_ms = 3'600'000;
  cfg.tick_ms = 20;
  for (auto& a : agents_) cfg.participants[a->name] = url_of(agent_procs_[&a - &agents_[0]]);
  auto log = std::make_unique<SimLog>(w_, coord_, store_, watch_);
  coord_wal_ = log.get();
  auto svc = coord::CoordinatorService::start_with(cfg, std::move(log), *coord_log_, *coord_rt_);
  if (!svc.ok()) {
    violation("coordinator_did_not_start: " + svc.status().to_string());
    return;
  }
  coordinator_ = std::move(*svc);
  coord::CoordinatorService* c = coordinator_.get();
  w_.process(coord_).handler = [c](HttpRequest&& req, Responder respond) { c->handle(std::move(req), std::move(respond)); };
}

void Cluster::crash_coordinator() {
  if (!w_.process(coord_).up) return;
  w_.crash(coord_);
  if (coord_wal_) coord_wal_->crash();
  coordinator_.reset();
  coord_wal_ = nullptr;
  w_.at(w_.now() + w_.rng().between(50, 5'000), -1, [this] {
    w_.restart(coord_);
    start_coordinator();
  });
}

void Cluster::start_agent(size_t i) {
  Agent& a = *agents_[i];
  int proc = agent_procs_[i];
  if (a.service || !w_.process(proc).up) return;  // running already, or crashed meanwhile
  if (!a.db.up) {  // the agent refuses to start without its database; it is restarted later
    w_.at(w_.now() + 200, -1, [this, i] { start_agent(i); });
    return;
  }
  agent::AgentConfig cfg;
  cfg.machine.name = a.name;
  cfg.machine.idle_timeout_ms = 5'000;
  cfg.machine.in_doubt_after_ms = 500;
  cfg.machine.ask_min_ms = 100;
  cfg.machine.ask_max_ms = 2'000;
  cfg.machine.precommit_timeout_ms = 3'000;
  cfg.machine.commit_timeout_ms = 3'000;
  cfg.coordinators["c1"] = url_of(coord_);
  cfg.coordinators[kStepCoordinator] = url_of(app_);  // never answers: its gids never finish
  cfg.advertise_url = url_of(proc);
  cfg.tick_ms = 50;
  cfg.scan_interval_ms = 1'000;
  cfg.purge_interval_ms = 5'000;
  cfg.coordinator_timeout_ms = 1'000;
  a.exec = std::make_unique<SimExecutor>(w_, a.db, a.name);
  a.exec->crash_after_op = [this, i] {
    if (!w_.faults_on || !w_.rng().chance(0.01)) return false;
    w_.note("database of " + agents_[i]->name + " crashes after an operation ran");
    crash_database(i, w_.rng().between(20, 800));
    return true;
  };
  auto svc = agent::AgentService::start_with(cfg, *a.log, *a.rt, *a.exec);
  if (!svc.ok()) {
    w_.note(a.name + " did not start: " + svc.status().to_string());
    w_.crash(proc);  // what the failed start had begun (timers, requests) dies with it
    w_.restart(proc);
    a.exec.reset();
    w_.at(w_.now() + 200, -1, [this, i] { start_agent(i); });
    return;
  }
  a.exec->on_step = [this, i](const agent::PgOp& op, std::optional<pg::Barrier> verdict) {
    // A check that fenced its local op counts as an empty one; one that found it committed,
    // as a duplicate.
    OpEffect e = !verdict                                      ? OpEffect::failed
                 : *verdict == pg::Barrier::applied            ? OpEffect::applied
                 : *verdict == pg::Barrier::empty_compensation ? OpEffect::empty
                 : *verdict == pg::Barrier::fenced             ? OpEffect::empty
                 : *verdict == pg::Barrier::refused            ? OpEffect::refused
                                                               : OpEffect::duplicate;
    journal_.add(w_, op.gid, op.branch, std::string(step_op_name(op.step_op)), e, agents_[i]->name);
  };
  a.exec->on_kept = [this, i](const std::string& pgg) {
    if (aborted_told_.count(pgg))
      violation("work_after_aborted " + pgg + ": " + agents_[i]->name +
                " answered aborted, then kept its work");
  };
  a.service = std::move(*svc);
  agent::AgentService* s = a.service.get();
  w_.process(proc).handler = [this, i, s](HttpRequest&& req, Responder respond) {
    auto seen = std::make_shared<HttpRequest>(req);
    s->handle(std::move(req), Responder([this, i, seen, respond](HttpResponse resp) {
                note_aborts(i, *seen, resp);
                respond(std::move(resp));
              }));
  };
}

void Cluster::crash_agent(size_t i) {
  int proc = agent_procs_[i];
  if (!w_.process(proc).up) return;
  w_.crash(proc);
  peers_cut_ = true;
  // A decision taken alone and never carried out dies with the process (it is durable only
  // once recorded); the next run decides afresh.
  std::erase_if(alone_,
                [&](const auto& kv) { return kv.first.rfind(agents_[i]->name + " ", 0) == 0; });
  Agent& a = *agents_[i];
  a.service.reset();  // its connections close: the database rolls back its open blocks
  a.exec.reset();
  w_.at(w_.now() + w_.rng().between(50, 2'000), -1, [this, i, proc] {
    w_.restart(proc);
    start_agent(i);
  });
}

void Cluster::crash_database(size_t i, int64_t down_ms) {
  SimDb& db = agents_[i]->db;
  if (!db.up) return;
  db.up = false;
  db.crash();
  w_.note("database of " + agents_[i]->name + " crashes");
  w_.at(w_.now() + down_ms, -1, [this, i] {
    agents_[i]->db.up = true;
    w_.note("database of " + agents_[i]->name + " is back");
  });
}

// The service's ledger is durable: a crash loses the answers it still held, nothing else.
void Cluster::crash_service() {
  if (!w_.process(svc_).up) return;
  w_.crash(svc_);
  service_->crash();
  w_.at(w_.now() + w_.rng().between(50, 3'000), -1, [this] {
    w_.restart(svc_);
    service_->serve();
  });
}

// --- faults -------------------------------------------------------------------------------------

void Cluster::schedule_fault() {
  w_.at(w_.now() + w_.rng().between(50, 600), -1, [this] {
    if (!w_.faults_on) return;
    inject_fault();
    schedule_fault();
  });
}

void Cluster::inject_fault() {
  Rng& r = w_.rng();
  size_t n = agents_.size();
  size_t i = static_cast<size_t>(r.between(0, static_cast<int64_t>(n) - 1));
  int agent = agent_procs_[i];
  switch (r.between(0, 11)) {
    case 0:
      w_.faults = NetFaults{static_cast<double>(r.between(0, 15)) / 100.0,
                            static_cast<double>(r.between(0, 8)) / 100.0, 0, r.between(1, 40),
                            static_cast<double>(r.between(0, 3)) / 100.0};
      w_.note("network: loss " + std::to_string(w_.faults.loss) + " dup " + std::to_string(w_.faults.duplicate) +
              " delay ≤" + std::to_string(w_.faults.delay_max_ms));
      break;
    case 1:
    case 2: {
      // An agent cut from the coordinator, from its peers, or both (the 3PC partition).
      int how = static_cast<int>(r.between(0, 2));
      if (how != 1) w_.cut(coord_, agent);
      if (how != 0)
        for (int other : agent_procs_)
          if (other != agent) w_.cut(agent, other);
      peers_cut_ = true;
      w_.note("partition: " + agents_[i]->name + (how == 0 ? " | coordinator" : how == 1 ? " | peers" : " | all"));
      w_.at(w_.now() + r.between(200, 6'000), -1, [this] {
        w_.heal();

        w_.note("partition healed");
      });
      break;
    }
    case 3: crash_coordinator(); break;
    case 4:
    case 5: crash_agent(i); break;
    case 6: crash_database(i, r.between(50, 1'500)); break;
    case 7: {
      int who = r.chance(0.5) ? coord_ : agent;
      int64_t jump = r.between(-30'000, 30'000);
      w_.process(who).wall_offset_ms += jump;
      w_.note("clock of " + w_.process(who).name + " jumps " + std::to_string(jump) + " ms");
      break;
    }
    case 10: crash_service(); break;
    case 11:
      w_.cut(coord_, svc_);
      w_.note("partition: svc | coordinator");
      w_.at(w_.now() + r.between(200, 4'000), -1, [this] {
        w_.heal();
        w_.note("partition healed");
      });
      break;
    default: break;  // quiet
  }
}

void Cluster::stop_faults() {
  w_.faults_on = false;
  w_.heal();
  clients_stop_ = true;
  w_.note("faults stop");
}

// --- clients ------------------------------------------------------------------------------------

void Cluster::post(int proc, const std::string& target, const Json& body, int64_t timeout_ms,
                   std::function<void(const HttpResult&, const Json&)> then, bool idempotent,
                   Headers headers) {
  HttpRequest req;
  req.method = "POST";
  req.target = target;
  req.body = dump(body);
  req.headers = std::move(headers);
  SendOptions opts;
  opts.timeout_ms = timeout_ms;
  opts.idempotent = idempotent;  // the network may deliver an idempotent request twice
  Url url{"127.0.0.1", w_.process(proc).port, ""};
  app_rt_->send(url, std::move(req), opts, [then](HttpResult res) {
    Json j;
    if (res.status.ok()) {
      auto p = parse_json(res.body);
      if (p.ok()) j = std::move(*p);
    }
    then(res, j);
  });
}

void Cluster::get(int proc, const std::string& target, std::function<void(const HttpResult&, const Json&)> then) {
  HttpRequest req;
  req.method = "GET";
  req.target = target;
  Url url{"127.0.0.1", w_.process(proc).port, ""};
  app_rt_->send(url, std::move(req), SendOptions{1'000, true}, [then](HttpResult res) {
    Json j;
    if (res.status.ok()) {
      auto p = parse_json(res.body);
      if (p.ok()) j = std::move(*p);
    }
    then(res, j);
  });
}

std::shared_ptr<Transfer> Cluster::new_transfer() {
  Rng& r = w_.rng();
  auto t = std::make_shared<Transfer>();
  t->id = next_transfer_++;
  int64_t roll = r.between(0, 99);
  t->kind = roll < 16   ? Kind::tcc
            : roll < 30 ? Kind::tcc_coord
            : roll < 44 ? Kind::saga
            : roll < 58 ? Kind::msg
            : roll < 80 ? Kind::interactive
                        : Kind::oneshot;
  t->three_phase = r.chance(0.4);
  if (t->kind == Kind::tcc_coord || t->kind == Kind::saga || t->kind == Kind::msg) {
    if (t->kind == Kind::tcc_coord) plan_tcc(*t);
    if (t->kind == Kind::saga) plan_saga(*t);
    if (t->kind == Kind::msg) plan_msg(*t);
    transfers_.push_back(t);
    return t;
  }
  int n = static_cast<int>(agents_.size());
  int from = static_cast<int>(r.between(0, n - 1));
  // One in five moves money inside one database: a single branch, committed in one phase.
  int to = r.chance(0.2) ? from : static_cast<int>((from + r.between(1, n - 1)) % n);
  int64_t amount = r.between(1, 9);
  int64_t a = r.between(1, kAccountsPerDb), b = r.between(1, kAccountsPerDb - 1);
  if (to == from && b >= a) ++b;  // two different accounts
  t->legs.push_back({from, a, -amount});
  t->legs.push_back({to, b, amount});
  transfers_.push_back(t);
  return t;
}

static Json transfer_statement(const Transfer::Leg& leg) {
  return Json{{"sql", kTransferSql}, {"params", Json::array({leg.delta, leg.account})}};
}

// A statement moving delta on account; on the missing account it must find its row (expect_rows
// 1), which fails the op as a business failure (SQLSTATE 21000, 422).
static Json move_statement(int64_t delta, int64_t account, bool missing = false) {
  Json st{{"sql", kTransferSql},
          {"params", Json::array({delta, missing ? kMissingAccount : account})}};
  if (missing) st["expect_rows"] = 1;
  return st;
}

// Where an op runs: the service (half of them) or an agent.
static Transfer::Op op_at(Rng& r, int agents, int64_t delta) {
  Transfer::Op op;
  op.at = r.chance(0.5) ? -1 : static_cast<int>(r.between(0, agents - 1));
  op.account = op.at < 0 ? r.between(1, kServiceAccounts) : r.between(1, kAccountsPerDb);
  op.delta = delta;
  return op;
}

// A debit branch and a credit branch. A SQL try sometimes fails as a business failure; the
// service decides its own failures.
void Cluster::plan_tcc(Transfer& t) {
  Rng& r = w_.rng();
  int n = static_cast<int>(agents_.size());
  int64_t amount = r.between(1, 9);
  for (int64_t delta : {-amount, amount}) {
    Transfer::Op op = op_at(r, n, delta);
    op.fails = op.at >= 0 && r.chance(0.05);
    t.ops.push_back(op);
  }
  for (size_t i = 0; i < t.ops.size(); ++i) t.requests.push_back(tcc_request(t, i));
}

// 2-4 steps whose deltas sum to 0. A backward saga's SQL step sometimes fails as a business
// failure, and its last step, when sequential, is sometimes its pivot (no compensation). A
// forward saga has no step that fails for good (it would retry it forever), and some steps
// without compensation.
void Cluster::plan_saga(Transfer& t) {
  Rng& r = w_.rng();
  int n = static_cast<int>(agents_.size());
  size_t steps = static_cast<size_t>(r.between(2, 4));
  t.forward = r.chance(0.25);
  t.parallel = r.chance(0.3);
  t.accepted = r.chance(0.25);
  std::vector<int64_t> deltas;
  int64_t sum = 0;
  do {
    deltas.clear();
    sum = 0;
    for (size_t i = 0; i + 1 < steps; ++i) {
      int64_t d = r.between(1, 9) * (i == 0 || r.chance(0.5) ? -1 : 1);
      deltas.push_back(d);
      sum += d;
    }
  } while (sum == 0);
  deltas.push_back(-sum);
  for (size_t i = 0; i < steps; ++i) {
    Transfer::Op op = op_at(r, n, deltas[i]);
    op.fails = !t.forward && op.at >= 0 && r.chance(0.08);
    op.compensable = t.forward ? r.chance(0.7) : !(i + 1 == steps && !t.parallel && r.chance(0.25));
    t.ops.push_back(op);
  }
}

Json Cluster::service_op(const std::string& path, Json body) const {
  return Json{
      {"url", svc_url_ + path}, {"body", std::move(body)}, {"headers", Json{{"x-tenant", "sim"}}}};
}

Json Cluster::sql_op(int agent, Json statements) const {
  return Json{{"participant", agents_[static_cast<size_t>(agent)]->name},
              {"statements", std::move(statements)}};
}

// Branch i of a tcc_coord transfer: its try, confirm and cancel.
Json Cluster::tcc_request(const Transfer& t, size_t i) const {
  const Transfer::Op& op = t.ops[i];
  bool debit = op.delta < 0;
  int64_t x = debit ? -op.delta : op.delta;
  Json req{{"branch", op_name(t.id, i)}};
  if (op.at < 0) {
    std::string base = debit ? "/tcc/debit/" : "/tcc/credit/";
    Json body{{"account", op.account}, {"amount", x}};
    for (const char* o : {"try", "confirm", "cancel"}) req[o] = service_op(base + o, body);
    return req;
  }
  if (debit) {
    req["try"] = sql_op(op.at, Json::array({move_statement(-x, op.account, op.fails),
                                            move_statement(x, kHoldAccount)}));
    req["confirm"] = sql_op(op.at, Json::array({move_statement(-x, kHoldAccount)}));
    req["cancel"] = sql_op(
        op.at, Json::array({move_statement(-x, kHoldAccount), move_statement(x, op.account)}));
  } else {
    req["try"] = sql_op(op.at, Json::array({move_statement(x, kPendingAccount, op.fails)}));
    req["confirm"] = sql_op(
        op.at, Json::array({move_statement(-x, kPendingAccount), move_statement(x, op.account)}));
    req["cancel"] = sql_op(op.at, Json::array({move_statement(-x, kPendingAccount)}));
  }
  return req;
}

Json Cluster::saga_request(const Transfer& t) {
  Rng& r = w_.rng();
  Json steps = Json::array();
  for (size_t i = 0; i < t.ops.size(); ++i) {
    const Transfer::Op& op = t.ops[i];
    Json step{{"name", op_name(t.id, i)}};
    if (op.at < 0) {
      step["action"] = service_op("/saga/action", Json{{"account", op.account},
                                                       {"delta", op.delta},
                                                       {"check_funds", !t.forward},
                                                       {"transient", t.forward}});
      if (op.compensable)
        step["compensate"] =
            service_op("/saga/compensate", Json{{"account", op.account}, {"delta", op.delta}});
    } else {
      step["action"] = sql_op(op.at, Json::array({move_statement(op.delta, op.account, op.fails)}));
      if (op.compensable)
        step["compensate"] = sql_op(op.at, Json::array({move_statement(-op.delta, op.account)}));
    }
    steps.push_back(std::move(step));
  }
  Json body{{"protocol", "saga"}, {"steps", std::move(steps)}};
  if (t.parallel) body["parallel"] = true;
  if (t.forward)
    body["recovery"] = "forward";
  else if (r.chance(0.3))
    body["recovery"] = "backward";
  if (t.accepted) body["wait"] = "accepted";
  if (r.chance(0.3)) body["timeout_ms"] = r.between(1'500, 6'000);
  maybe_notify(body);
  if (r.chance(0.3)) {
    Json retry{{"min_ms", r.between(10, 100)}, {"max_ms", r.between(200, 1'000)}};
    if (!t.forward) retry["max_attempts"] = r.between(1, 6);
    body["retry"] = std::move(retry);
  }
  return body;
}

// A producer's local op on one agent takes x from an account; one or two destinations (SQL
// ops on agents, or the HTTP service) give it back. The local op sometimes fails as a business
// failure; half of the messages are sent with it in one request, the others begin, run the
// local op at the agent themselves, and commit, abort or walk away (check-back settles those).
void Cluster::plan_msg(Transfer& t) {
  Rng& r = w_.rng();
  int n = static_cast<int>(agents_.size());
  int64_t x = r.between(2, 9);
  Transfer::Op local;
  local.at = static_cast<int>(r.between(0, n - 1));
  local.account = r.between(1, kAccountsPerDb);
  local.delta = -x;
  local.fails = r.chance(0.05);
  t.ops.push_back(local);
  int64_t first = r.chance(0.5) ? x : r.between(1, x - 1);
  for (int64_t delta : {first, x - first}) {
    if (delta == 0) continue;
    t.ops.push_back(op_at(r, n, delta));
  }
  t.one_request = r.chance(0.5);
  if (!t.one_request && r.chance(0.4)) {  // the producer is the service: an HTTP check
    t.ops[0].at = -1;
    t.ops[0].account = r.between(1, kServiceAccounts);
    t.ops[0].fails = false;
  }
}

Json Cluster::msg_request(const Transfer& t) {
  Rng& r = w_.rng();
  Json destinations = Json::array();
  for (size_t i = 1; i < t.ops.size(); ++i) {
    const Transfer::Op& op = t.ops[i];
    destinations.push_back(
        op.at < 0 ? service_op("/msg/deliver", Json{{"account", op.account}, {"delta", op.delta}})
                  : sql_op(op.at, Json::array({move_statement(op.delta, op.account)})));
  }
  Json body{{"protocol", "msg"}, {"destinations", std::move(destinations)}};
  const Transfer::Op& local = t.ops[0];
  if (t.one_request)
    body["local"] =
        sql_op(local.at, Json::array({move_statement(local.delta, local.account, local.fails)}));
  else if (local.at < 0)
    body["check"] = service_op("/msg/check", Json::object());
  else
    body["check"] = Json{{"participant", agents_[static_cast<size_t>(local.at)]->name}};
  if (r.chance(0.6)) body["timeout_ms"] = r.between(300, 4'000);
  maybe_notify(body);
  return body;
}

void Cluster::run_msg(int client, std::shared_ptr<Transfer> t) {
  const char* path = t->one_request ? "/v1/transactions/run" : "/v1/transactions";
  post(coord_, path, msg_request(*t), 4'000,
       [this, client, t](const HttpResult& res, const Json& j) {
         std::string state = state_of(j);
         int status = took_answer(*t, res, j, "msg");
         if (status < 0) return done(client, t);
         if (t->gid.empty()) return done(client, t);  // never learned it: check-back settles it
         if (!t->one_request) {
           if (status == 201 && state == "prepared") return msg_local(client, t, 1);
           return done(client, t);
         }
         // The one-request form answers once decided: committing or committed, or aborted.
         if (status == 200 && (state == "committing" || state == "committed"))
           return told(client, t, "committed");
         if (status == 409 && state == "aborted") return told(client, t, "aborted");
         poll(client, t);
       });
}

// The producer's local transaction through its agent's step endpoint, then commit (or abort
// when it failed); an unknown answer is resent, and past a few the client walks away.
void Cluster::msg_local(int client, std::shared_ptr<Transfer> t, int attempt) {
  const Transfer::Op& local = t->ops[0];
  auto then = [this, client, t, attempt](const HttpResult& res, const Json&) {
    msg_localed(client, t, attempt, res);
  };
  if (local.at < 0) {  // at the service, with the headers of an HTTP op (docs/DESIGN.md §8)
    Headers h = {{"tpc-gid", t->gid},
                 {"tpc-branch", "local"},
                 {"tpc-op", "local"},
                 {"tpc-attempt", std::to_string(attempt)},
                 {"idempotency-key", t->gid + "/local/local"},
                 {"x-tenant", "sim"}};
    post(svc_, "/msg/local", Json{{"account", local.account}, {"delta", local.delta}}, 1'000, then,
         true, std::move(h));
    return;
  }
  Json body{{"branch", "local"},
            {"op", "local"},
            {"statements", Json::array({move_statement(local.delta, local.account, local.fails)})}};
  post(agent_procs_[static_cast<size_t>(local.at)], "/v1/branches/" + t->gid + "/step", body, 1'000,
       then, true);
}

void Cluster::msg_localed(int client, std::shared_ptr<Transfer> t, int attempt,
                          const HttpResult& res) {
  int status = res.status.ok() ? res.http_status : 0;
  if (status == 200) {
    if (w_.rng().chance(0.15)) {
      t->walked_away = true;  // its check-back finds the local op committed
      return done(client, t);
    }
    return finish(client, t, true);
  }
  if (status == 409 || status == 422) return finish(client, t, false);
  if (attempt < 3) {
    app_rt_->run_after(100, [this, client, t, attempt] { msg_local(client, t, attempt + 1); });
    return;
  }
  t->walked_away = true;
  done(client, t);
}

void Cluster::client_next(int client) {
  if (clients_stop_) return;
  ++clients_busy_;
  auto t = new_transfer();
  if (t->kind == Kind::tcc) {
    t->gid = std::string(kStepCoordinator) + "-1-" + std::to_string(t->id);
    w_.note("client " + std::to_string(client) + " transfer " + std::to_string(t->id) + " tcc " +
            t->gid);
    return tcc_phase(client, t, 0, "try");
  }
  if (t->kind == Kind::msg) {
    w_.note("client " + std::to_string(client) + " transfer " + std::to_string(t->id) + " msg" +
            (t->one_request ? " (one request)" : ""));
    return run_msg(client, t);
  }
  if (t->kind == Kind::tcc_coord || t->kind == Kind::saga) {
    w_.note("client " + std::to_string(client) + " transfer " + std::to_string(t->id) +
            (t->kind == Kind::saga ? " saga" : " tcc (coordinator)"));
    return t->kind == Kind::saga ? run_saga(client, t) : tcc_begin(client, t);
  }
  w_.note("client " + std::to_string(client) + " transfer " + std::to_string(t->id) +
          (t->kind == Kind::interactive ? " interactive" : " one-shot") + (t->three_phase ? " 3pc" : " 2pc"));
  if (t->kind == Kind::interactive)
    begin_interactive(client, t);
  else
    run_oneshot(client, t);
}

void Cluster::done(int client, std::shared_ptr<Transfer> t) {
  w_.note("transfer " + std::to_string(t->id) + " " + (t->gid.empty() ? "(no gid)" : t->gid) + " told " +
          (t->told.empty() ? "nothing" : t->told));
  --clients_busy_;
  // A client that learned nothing (the coordinator down, say) waits longer before the next.
  int64_t pause = t->told.empty() ? w_.rng().between(100, 400) : w_.rng().between(0, 50);
  app_rt_->run_after(pause, [this, client] { client_next(client); });
}

void Cluster::begin_interactive(int client, std::shared_ptr<Transfer> t) {
  Json body{{"protocol", t->three_phase ? "3pc" : "2pc"}};
  maybe_notify(body);
  post(coord_, "/v1/transactions", body, 1'000, [this, client, t](const HttpResult& res, const Json& j) {
    if (!res.status.ok() || res.http_status != 201 || !j.contains("gid")) return done(client, t);
    t->gid = j["gid"].get<std::string>();
    exec_leg(client, t);
  });
}

void Cluster::exec_leg(int client, std::shared_ptr<Transfer> t) {
  if (t->next_leg == t->legs.size()) return finish(client, t, true);
  const Transfer::Leg& leg = t->legs[t->next_leg];
  post(agent_procs_[static_cast<size_t>(leg.agent)], "/v1/branches/" + t->gid + "/exec", transfer_statement(leg), 2'000,
       [this, client, t](const HttpResult& res, const Json&) {
         if (!res.status.ok() || res.http_status != 200) return finish(client, t, false);
         t->next_leg++;
         exec_leg(client, t);
       });
}

void Cluster::finish(int client, std::shared_ptr<Transfer> t, bool commit) {
  t->asked_commit = commit;
  post(coord_, "/v1/transactions/" + t->gid + (commit ? "/commit" : "/abort"), Json::object(), 4'000,
       [this, client, t](const HttpResult& res, const Json& j) {
         std::string state = j.is_object() && j.contains("state") && j["state"].is_string() ? j["state"].get<std::string>() : "";
         if (res.status.ok() && (state == "committed" || state == "aborted")) return told(client, t, state);
         poll(client, t);
       });
}

void Cluster::run_oneshot(int client, std::shared_ptr<Transfer> t) {
  std::map<int, Json> by_agent;
  for (auto& leg : t->legs) by_agent[leg.agent].push_back(transfer_statement(leg));
  Json branches = Json::array();
  for (auto& [agent, statements] : by_agent)
    branches.push_back(Json{{"participant", agents_[static_cast<size_t>(agent)]->name}, {"statements", statements}});
  Json body{{"protocol", t->three_phase ? "3pc" : "2pc"}, {"branches", branches}};
  maybe_notify(body);
  post(coord_, "/v1/transactions/run", body, 5'000, [this, client, t](const HttpResult& res, const Json& j) {
    if (j.is_object() && j.contains("gid") && j["gid"].is_string()) {
      t->gid = j["gid"].get<std::string>();
    }
    std::string state = j.is_object() && j.contains("state") && j["state"].is_string() ? j["state"].get<std::string>() : "";
    if (res.status.ok() && (state == "committed" || state == "aborted")) return told(client, t, state);
    if (t->gid.empty()) return done(client, t);  // never learned its gid: the databases judge it
    poll(client, t);
  });
}

// The legs one after the other: every try, then every confirm — or, once a try failed, every
// cancel (legs never tried included: their cancel is an empty compensation).
void Cluster::tcc_phase(int client, std::shared_ptr<Transfer> t, size_t leg,
                        const std::string& op) {
  if (leg < t->legs.size()) return tcc_step(client, t, leg, op, 1);
  if (op == "try") return tcc_phase(client, t, 0, "confirm");
  t->told = op == "confirm" ? "committed" : "aborted";
  (op == "confirm" ? told_committed : told_aborted)++;
  done(client, t);
}

void Cluster::tcc_step(int client, std::shared_ptr<Transfer> t, size_t leg, const std::string& op,
                       int attempt) {
  const Transfer::Leg& l = t->legs[leg];
  Json statements = Json::array();
  bool pays = l.delta < 0;
  if ((op == "try" && pays) || (op == "confirm" && !pays))
    statements.push_back(transfer_statement(l));
  if (op == "cancel" && pays)
    statements.push_back(transfer_statement(Transfer::Leg{l.agent, l.account, -l.delta}));
  Json body{{"branch", "leg" + std::to_string(leg)}, {"op", op}, {"statements", statements}};
  post(
      agent_procs_[static_cast<size_t>(l.agent)], "/v1/branches/" + t->gid + "/step", body, 1'000,
      [this, client, t, leg, op, attempt](const HttpResult& res, const Json&) {
        tcc_stepped(client, t, leg, op, attempt, res);
      },
      true);
}

void Cluster::tcc_stepped(int client, std::shared_ptr<Transfer> t, size_t leg,
                          const std::string& op, int attempt, const HttpResult& res) {
  bool ok = res.status.ok() && res.http_status == 200;
  bool final_failure = res.status.ok() && (res.http_status == 409 || res.http_status == 422);
  if (op == "try" && !ok && (final_failure || attempt >= kTryAttemptsMax)) {
    t->cancelling = true;
    return tcc_phase(client, t, 0, "cancel");
  }
  if (op == "try" && t->cancelling) return;  // a late answer of a try given up
  if (!ok) {
    // Unknown (or, for confirm/cancel, refused by the business): resend; confirm and cancel
    // until they succeed.
    if (final_failure && op != "try")
      violation("step_failed " + t->gid + " leg" + std::to_string(leg) + " " + op);
    app_rt_->run_after(
        100, [this, client, t, leg, op, attempt] { tcc_step(client, t, leg, op, attempt + 1); });
    return;
  }
  tcc_phase(client, t, leg + 1, op);
}

// A TCC transaction of the coordinator: begin, try each branch, then commit, abort or walk away
// (its timeout aborts it). A try the client heard nothing about is sent again (the same try
// gets the same answer); after kTryResends the client aborts or walks away.
void Cluster::tcc_begin(int client, std::shared_ptr<Transfer> t) {
  Json body{{"protocol", "tcc"}};
  if (w_.rng().chance(0.3)) body["timeout_ms"] = w_.rng().between(1'500, 5'000);
  maybe_notify(body);
  post(coord_, "/v1/transactions", body, 1'000,
       [this, client, t](const HttpResult& res, const Json& j) {
         if (!res.status.ok() || res.http_status != 201 || !j.contains("gid"))
           return done(client, t);
         t->gid = j["gid"].get<std::string>();
         tcc_try(client, t, 0, 1);
       });
}

void Cluster::tcc_try(int client, std::shared_ptr<Transfer> t, size_t i, int attempt) {
  auto then = [this, client, t, i, attempt](const HttpResult& res, const Json& j) {
    std::string state = state_of(j);
    int status = res.status.ok() ? res.http_status : 0;
    if (status == 200 && state == "tried") {
      if (i + 1 < t->ops.size()) return tcc_try(client, t, i + 1, 1);
      return tcc_decide(client, t);
    }
    if (status == 400 || status == 413) {
      violation("op_request_refused try of " + t->gid + ": " + res.body);
      return done(client, t);
    }
    if (status == 404) return done(client, t);  // lost with the coordinator: nothing registered
    if (status == 409 && (state == "aborting" || state == "aborted")) return poll(client, t);
    if (attempt < kTryResends) {
      app_rt_->run_after(200,
                         [this, client, t, i, attempt] { tcc_try(client, t, i, attempt + 1); });
      return;
    }
    if (w_.rng().chance(0.5)) return finish(client, t, false);
    t->walked_away = true;
    done(client, t);
  };
  post(coord_, "/v1/transactions/" + t->gid + "/try", t->requests[i], 4'000, then, true);
}

void Cluster::tcc_decide(int client, std::shared_ptr<Transfer> t) {
  int64_t roll = w_.rng().between(0, 99);
  if (roll < 70) return finish(client, t, true);
  if (roll < 90) return finish(client, t, false);
  t->walked_away = true;
  w_.note("client " + std::to_string(client) + " walks away from " + t->gid);
  done(client, t);
}

// The answer to a saga's or a message's request: its gid taken, and its HTTP status (0: none);
// -1 when the coordinator refused the request as malformed (a violation: the clients send
// only good ones).
int Cluster::took_answer(Transfer& t, const HttpResult& res, const Json& j, const char* what) {
  if (j.is_object() && j.contains("gid") && j["gid"].is_string())
    t.gid = j["gid"].get<std::string>();
  int status = res.status.ok() ? res.http_status : 0;
  if (status != 400 && status != 413) return status;
  violation(std::string("op_request_refused ") + what + ": " + res.body);
  return -1;
}

void Cluster::run_saga(int client, std::shared_ptr<Transfer> t) {
  post(coord_, "/v1/transactions/run", saga_request(*t), 5'000,
       [this, client, t](const HttpResult& res, const Json& j) {
         std::string state = state_of(j);
         int status = took_answer(*t, res, j, "saga");
         if (status < 0) return done(client, t);
         if (state == "aborted" && opts_.sabotage == Sabotage::tell_committed) {
           t->told = "committed";  // the client's bookkeeping, broken on purpose
           return done(client, t);
         }
         if (status != 0 && (state == "committed" || state == "aborted"))
           return told(client, t, state);
         if (t->gid.empty()) return done(client, t);  // never learned its gid: its record is judged
         poll(client, t);
       });
}

// The answer did not come: ask again — a GET, or the commit once more (a client retrying its
// request), which must be answered the same way.
void Cluster::poll(int client, std::shared_ptr<Transfer> t) {
  if (++t->polls > kPollsMax) return done(client, t);
  app_rt_->run_after(100, [this, client, t] {
    auto then = [this, client, t](const HttpResult& res, const Json& j) {
      std::string state = j.is_object() && j.contains("state") && j["state"].is_string() ? j["state"].get<std::string>() : "";
      bool answered = res.status.ok() && (res.http_status == 200 || res.http_status == 409);
      if (answered && (state == "committed" || state == "aborted")) return told(client, t, state);
      poll(client, t);
    };
    if (t->asked_commit && w_.rng().chance(0.5))
      post(coord_, "/v1/transactions/" + t->gid + "/commit", Json::object(), 2'000, then);
    else
      get(coord_, "/v1/transactions/" + t->gid, then);
  });
}

void Cluster::told(int client, std::shared_ptr<Transfer> t, const std::string& state) {
  t->told = state;
  (state == "committed" ? told_committed : told_aborted)++;
  answer(t->gid, state, "client");
  done(client, t);
}

// --- checks -------------------------------------------------------------------------------------

void Cluster::answer(const std::string& gid, const std::string& state, const char* where) {
  if (state == "committed") {
    auto d = watch_.durable.find(gid);
    // A one-phase commit's record (its branch asked to commit in one phase) comes first too.
    bool durable = d != watch_.durable.end() &&
                   (d->second == wal::Decision::commit || d->second == wal::Decision::precommit ||
                    d->second == wal::Decision::one_phase);
    if (!durable) violation("told_before_durable " + gid + " answered committed (" + where + ")");
  }
  auto [it, fresh] = answers_.emplace(gid, state);
  if (!fresh && it->second != state)
    violation("answers_disagree " + gid + ": " + it->second + " then " + state + " (" + where + ")");
}

void Cluster::check_commit_message(const std::string& path, const std::string& body) {
  // /v1/branches/{gid}/commit (not one-phase) and /v1/branches/{gid}/precommit
  const std::string prefix = "/v1/branches/";
  if (path.rfind(prefix, 0) != 0) return;
  size_t slash = path.find('/', prefix.size());
  if (slash == std::string::npos) return;
  std::string gid = path.substr(prefix.size(), slash - prefix.size());
  std::string action = path.substr(slash + 1);
  bool one_phase = body.find("\"one_phase\":true") != std::string::npos;
  if (!((action == "commit" && !one_phase) || action == "precommit")) return;
  auto d = watch_.durable.find(gid);
  bool durable = d != watch_.durable.end() &&
                 (d->second == wal::Decision::commit || d->second == wal::Decision::precommit);
  if (!durable) violation("commit_before_durable " + action + " of " + gid + " sent before its decision was durable");
}

void Cluster::check_wire(int from, int to, const HttpRequest& req) {
  if (opts_.verbose) w_.note(w_.process(from).name + " → " + w_.process(to).name + " " + req.method + " " + req.target);
  if (from != coord_) return;
  std::string path(req.path());
  if (to == svc_)
    return check_op_message(std::string(req.header("tpc-gid")), std::string(req.header("tpc-op")),
                            "svc");
  if (path.size() > 5 && path.compare(path.size() - 5, 5, "/step") == 0) {
    auto j = parse_json(req.body);
    const std::string prefix = "/v1/branches/";
    if (j.ok() && j->contains("op") && (*j)["op"].is_string() && path.rfind(prefix, 0) == 0)
      check_op_message(path.substr(prefix.size(), path.size() - 5 - prefix.size()),
                       (*j)["op"].get<std::string>(), w_.process(to).name);
    return;
  }
  if (path != "/v1/batch") return check_commit_message(path, req.body);
  auto j = parse_json(req.body);
  if (!j.ok() || !j->contains("requests")) return;
  for (auto& item : (*j)["requests"])
    if (item.contains("path") && item.contains("body")) check_commit_message(item["path"].get<std::string>(), dump(item["body"]));
}

// An op leaves the coordinator only once what it depends on is durable: a try or an action its
// transaction's record (the branch's registration, the saga), a confirm the commit decision, a
// compensation the abort decision.
void Cluster::check_op_message(const std::string& gid, const std::string& op,
                               const std::string& to) {
  auto d = watch_.durable.find(gid);
  bool ok = true;
  if (op == "try" || op == "action" || op == "local" || op == "check")
    ok = d != watch_.durable.end();
  if (op == "confirm" || op == "deliver")
    ok = d != watch_.durable.end() && d->second == wal::Decision::commit;
  if (op == "compensate") ok = d != watch_.durable.end() && d->second == wal::Decision::aborted;
  if (!ok)
    violation("op_before_durable " + op + " of " + gid + " sent to " + to +
              " with the durable decision " +
              (d == watch_.durable.end() ? std::string("none")
                                         : std::string(wal::decision_name(d->second))));
}

// What each agent says about its branch of t must match its database.
void Cluster::check_agent_views(const Transfer& t) {
  for (auto& leg : t.legs) {
    Agent& a = *agents_[static_cast<size_t>(leg.agent)];
    if (!a.service) continue;
    HttpRequest req;
    req.method = "GET";
    req.target = "/v1/branches/" + t.gid;
    std::string state;
    a.service->handle(std::move(req), Responder([&state](HttpResponse r) {
      auto j = parse_json(r.body);
      if (r.status == 200 && j.ok() && j->contains("state") && (*j)["state"].is_string()) state = (*j)["state"].get<std::string>();
    }));
    bool applied = a.db.applied.count(pg::pg_gid(a.name, t.gid)) > 0;
    if (state == "committed" && !applied) violation("agent_says_committed " + t.gid + " at " + a.name + ", not applied");
    if (state == "aborted" && applied) violation("agent_says_aborted " + t.gid + " at " + a.name + ", applied");
  }
}

// An agent decided a 3PC branch alone. Its log line says what its peers answered
// (why="peers a1:prepared,a3:unreachable"). Every peer that holds a branch of the gid must
// have been asked, and the decision must follow the termination rule for the answers: any
// committed or pre-committed → commit, any aborted → abort.
void Cluster::check_unilateral(size_t i, const std::string& line) {
  if (line.find("deciding without it") == std::string::npos) return;
  const std::string gid = log_field(line, "gid"), outcome = log_field(line, "outcome");
  std::string why = log_field(line, "why");

  std::set<std::string> asked;
  bool any_commit = false, any_abort = false;
  if (why.rfind("peers ", 0) == 0) {
    std::string list = why.substr(6);
    size_t from = 0;
    while (from <= list.size()) {
      size_t comma = list.find(',', from);
      std::string item = list.substr(from, comma == std::string::npos ? std::string::npos : comma - from);
      size_t colon = item.find(':');
      if (colon != std::string::npos) {
        std::string state = item.substr(colon + 1);
        asked.insert(item.substr(0, colon));
        any_commit = any_commit || state == wire::kCommitted || state == wire::kPrecommitted;
        any_abort = any_abort || state == wire::kAborted;
      }
      if (comma == std::string::npos) break;
      from = comma + 1;
    }
  }
  // Only a peer's outcome may change a decision taken alone in this run.
  auto [first, fresh] = alone_.emplace(agents_[i]->name + " " + gid, outcome);
  if (!fresh && first->second != outcome && !any_commit && !any_abort)
    violation("3pc_decision_reversed " + gid + ": " + agents_[i]->name + " decided " +
              first->second + " alone, then " + outcome + " on \"" + why + "\"");
  first->second = outcome;
  for (size_t j = 0; j < agents_.size(); ++j) {
    if (j == i) continue;
    Agent& p = *agents_[j];
    const std::string pgg = pg::pg_gid(p.name, gid);
    bool has_branch = p.db.prepared.count(pgg) || p.db.states.count(pgg) || p.db.applied.count(pgg);
    if (has_branch && !asked.count(p.name))
      violation("3pc_decided_without_asking " + gid + ": " + agents_[i]->name + " decided alone without asking " + p.name);
  }
  if ((outcome == "abort" && any_commit) || (outcome == "commit" && any_abort))
    violation("3pc_termination_rule " + gid + ": " + agents_[i]->name + " decided " + outcome + " on \"" + why + "\"");
}

// An agent answered "aborted" to an abort (alone or in a batch): that branch must never be
// prepared or committed afterwards (a late exec or prepare refused: the tombstone's job).
void Cluster::note_aborts(size_t i, const HttpRequest& req, const HttpResponse& resp) {
  std::string path(req.path());
  auto body = parse_json(resp.body);
  if (!body.ok()) return;
  if (path != "/v1/batch") return note_abort(i, path, resp.status, *body);
  auto sent = parse_json(req.body);
  if (!sent.ok() || !sent->contains("requests") || !body->contains("responses")) return;
  const Json& reqs = (*sent)["requests"];
  const Json& resps = (*body)["responses"];
  for (size_t k = 0; k < reqs.size() && k < resps.size(); ++k)
    if (reqs[k].contains("path") && resps[k].contains("status") && resps[k].contains("body"))
      note_abort(i, reqs[k]["path"].get<std::string>(), resps[k]["status"].get<int>(),
                 resps[k]["body"]);
}

void Cluster::note_abort(size_t i, const std::string& path, int status, const Json& body) {
  const std::string prefix = "/v1/branches/", suffix = "/abort";
  if (status != 200 || path.rfind(prefix, 0) != 0 || path.size() <= prefix.size() + suffix.size() ||
      path.compare(path.size() - suffix.size(), suffix.size(), suffix) != 0)
    return;
  if (!body.is_object() || !body.contains("state") || body["state"] != wire::kAborted) return;
  std::string gid = path.substr(prefix.size(), path.size() - prefix.size() - suffix.size());
  aborted_told_.insert(pg::pg_gid(agents_[i]->name, gid));
}

bool Cluster::settled() {
  if (clients_busy_ > 0) return false;
  for (auto& a : agents_)
    if (!a->db.prepared.empty() || !a->db.sessions.empty() || !a->service) return false;
  return coordinator_ != nullptr && w_.process(svc_).up && !ops_open();
}

bool Cluster::ops_open() {
  bool open = false;
  (void)store_.for_each([&](wal::TxnRecord&& r) {
    if (calls_ops(r.protocol) && !r.ended) open = true;
  });
  return open;
}

void Cluster::check_end() {
  if (!settled()) {
    for (auto& a : agents_) {
      for (auto& [pgg, p] : a->db.prepared) violation("prepared_left " + pgg + " at " + a->name);
      if (!a->db.sessions.empty()) violation("session_left " + std::to_string(a->db.sessions.size()) + " at " + a->name);
    }
    if (clients_busy_ > 0) violation("clients_not_done " + std::to_string(clients_busy_));
  }
  for (auto& v : watch_.violations) violation(v);
  // Per gid, over every database: how many branches applied, and the sum of their changes.
  struct Applied {
    int branches = 0;
    int64_t sum = 0;
    std::vector<std::string> where;
  };
  std::map<std::string, Applied> by_gid;
  for (auto& a : agents_) {
    for (auto& [pgg, n] : a->db.applied) {
      auto gid = pg::global_gid(a->name, pgg);
      if (!gid) continue;
      if (n > 1) violation("applied_twice " + pgg + " (" + std::to_string(n) + " times)");
      Applied& x = by_gid[*gid];
      x.branches++;
      x.sum += a->db.applied_sum[pgg];
      x.where.push_back(a->name);
    }
  }
  for (auto& [gid, x] : by_gid) {
    if (x.sum == 0) continue;  // both legs, or nothing that moved money
    bool reported = watch_.heuristic.count(gid) > 0;
    for (auto& a : agents_) {
      auto st = a->db.states.find(pg::pg_gid(a->name, gid));
      if (st != a->db.states.end() && agent::parse_check_record(st->second.first)) reported = true;
    }
    bool three_phase = false;
    if (auto rec = store_.get(gid); rec.ok() && rec->has_value())
      three_phase = (*rec)->protocol == Protocol::three_phase;
    if (three_phase && peers_cut_ && reported) continue;  // the documented 3PC risk, reported
    std::string at;
    for (auto& w : x.where) at += (at.empty() ? "" : ",") + w;
    violation(std::string(reported ? "atomicity " : "atomicity (not reported) ") + gid + ": only " + at +
              " applied (sum " + std::to_string(x.sum) + (three_phase ? ", 3pc)" : ")"));
  }
  // A heuristic outcome of a 2PC transaction: nobody resolved anything by hand here.
  for (auto& gid : watch_.heuristic) {
    auto rec = store_.get(gid);
    if (rec.ok() && rec->has_value() && (*rec)->protocol == Protocol::two_phase)
      violation("heuristic_in_2pc " + gid);
  }
  for (auto& t : transfers_) {
    // Steps: check_steps; the coordinator's TCC and sagas: check_ops.
    if (t->gid.empty() || (t->kind != Kind::interactive && t->kind != Kind::oneshot)) continue;
    check_agent_views(*t);
    bool applied = by_gid.count(t->gid) > 0;
    if (t->told == "committed" && !applied) violation("told_committed_not_applied " + t->gid);
    if (t->told == "aborted" && applied) violation("told_aborted_but_applied " + t->gid);
  }
  check_steps();
  check_ops();
  check_notified();
  int64_t total = service_->total(), excused = 0;
  for (auto& a : agents_) total += a->db.total();
  for (auto& [gid, x] : by_gid) excused += x.sum;
  excused += unfinished_steps_sum_;
  if (total - excused != initial_total_)
    violation("money_created: the balances sum to " + std::to_string(total) + ", not " + std::to_string(initial_total_));
}

// Steps: each applied at most once; a branch never both confirmed and cancelled; a transfer
// the client finished moved its amount on both sides (confirmed) or on neither (cancelled);
// one it did not finish is excused from the money check no more than its applied steps say.
void Cluster::check_steps() {
  std::map<std::string, int64_t> sum_by_gid;
  for (auto& a : agents_) {
    for (auto& [key, n] : a->db.applied) {
      if (key.rfind("step:", 0) != 0) continue;
      if (n > 1)
        violation("step_applied_twice " + key + " at " + a->name + " (" + std::to_string(n) +
                  " times)");
      sum_by_gid[key.substr(5, key.find('/') - 5)] += a->db.applied_sum[key];
    }
    for (auto& [key, row] : a->db.barriers) {
      auto& [gid, branch, op] = key;
      if (op == "confirm" && a->db.barriers.count({gid, branch, "cancel"}))
        violation("confirm_and_cancel " + gid + " " + branch + " at " + a->name);
    }
  }
  for (auto& t : transfers_) {
    if (t->kind != Kind::tcc) continue;
    int64_t sum = sum_by_gid.count(t->gid) ? sum_by_gid[t->gid] : 0;
    if (!t->told.empty() && sum != 0)
      violation("step_atomicity " + t->gid + " told " + t->told + ", its steps moved " +
                std::to_string(sum));
    for (size_t leg = 0; leg < t->legs.size() && !t->told.empty(); ++leg) {
      SimDb& db = agents_[static_cast<size_t>(t->legs[leg].agent)]->db;
      std::string op = t->told == "committed" ? "confirm" : "cancel";
      if (!db.barriers.count({t->gid, "leg" + std::to_string(leg), op}))
        violation("step_missing " + t->gid + " leg" + std::to_string(leg) + " told " + t->told +
                  " without its " + op);
    }
    if (t->told.empty() && sum != 0) unfinished_steps_sum_ += sum;
  }
}

// The coordinator's TCC transactions and sagas, once settled: every record ended, and what the
// participants saw take effect (the OpJournal) agrees with how it ended, branch by branch and
// step by step; nothing is left frozen; the clients' answers agree with the records.
void Cluster::check_ops() {
  std::map<std::string, wal::TxnRecord> recs;
  (void)store_.for_each([&](wal::TxnRecord&& r) {
    if (calls_ops(r.protocol)) recs.emplace(r.gid, std::move(r));
  });
  std::map<std::string, std::map<std::string, std::vector<const OpEvent*>>> by_gid;
  for (const OpEvent& e : journal_.events) {
    auto parts = parse_gid(e.gid);
    if (parts && parts->coordinator == "c1") by_gid[e.gid][e.branch].push_back(&e);
  }
  for (auto& [gid, branches] : by_gid)
    if (!recs.count(gid))
      violation("ops_without_record " + gid + ": " + branches.begin()->first + " was called at " +
                branches.begin()->second.front()->where + ", the coordinator has no record of it");
  for (auto& [gid, rec] : recs) {
    if (!rec.ended) {
      violation("op_unfinished " + gid + " (" + std::string(protocol_name(rec.protocol)) +
                ", decision " + std::string(wal::decision_name(rec.decision)) + ")");
      continue;
    }
    if (rec.protocol != Protocol::notify)
      (rec.decision == wal::Decision::commit ? ops_committed : ops_aborted)++;
    auto& evs = by_gid[gid];
    if (rec.protocol == Protocol::tcc)
      check_tcc(rec, evs);
    else if (rec.protocol == Protocol::msg)
      check_msg(rec, evs);
    else if (rec.protocol == Protocol::notify)
      check_notification(rec);
    else
      check_saga(rec, evs);
  }
  for (auto& t : transfers_) {
    if ((t->kind != Kind::tcc_coord && t->kind != Kind::saga && t->kind != Kind::msg) ||
        t->gid.empty())
      continue;
    auto it = recs.find(t->gid);
    bool committed = it != recs.end() && it->second.decision == wal::Decision::commit;
    std::string ended = it == recs.end() ? "without a record"
                                         : std::string(wal::decision_name(it->second.decision));
    if (t->told == "committed" && !committed)
      violation("told_disagrees " + t->gid + ": the client was told committed, the record ended " +
                ended);
    if (t->told == "aborted" && committed)
      violation("told_disagrees " + t->gid +
                ": the client was told aborted, the record ended committed");
    if (t->walked_away && committed && t->kind != Kind::msg)
      violation("walked_away_committed " + t->gid + ": its client never asked to commit");
  }
  if (service_->frozen() != 0) {
    std::string what;
    for (auto& [id, a] : service_->accounts)
      if (a.frozen != 0 || a.incoming != 0)
        what += " " + std::to_string(id) + ":frozen=" + std::to_string(a.frozen) +
                ",incoming=" + std::to_string(a.incoming);
    violation("frozen_left at svc:" + what);
  }
  for (auto& a : agents_)
    for (int64_t id : {kHoldAccount, kPendingAccount})
      if (a->db.balances[id] != 0)
        violation("frozen_left at " + a->name + ": account " + std::to_string(id) + " holds " +
                  std::to_string(a->db.balances[id]));
  for (auto& c : service_->contract) violation("participant_contract " + c);
}

Transfer* Cluster::transfer_of(const wal::TxnRecord& rec) {
  if (rec.branches.empty()) return nullptr;
  auto parts = op_name_parts(rec.branches[0].participant);
  if (!parts || parts->first == 0 || parts->first > transfers_.size()) return nullptr;
  return transfers_[parts->first - 1].get();
}

// One TCC transaction. Every registered branch is confirmed once, after its try (committed),
// or cancelled, undoing its try if it ran (aborted); a branch never sees both a confirm and a
// cancel; a try never takes effect after its cancel; only registered branches are called.
void Cluster::check_tcc(const wal::TxnRecord& rec,
                        std::map<std::string, std::vector<const OpEvent*>>& evs) {
  const std::string& gid = rec.gid;
  bool commit = rec.decision == wal::Decision::commit;
  std::set<std::string> names;
  for (auto& b : rec.branches) names.insert(b.participant);
  for (auto& [branch, list] : evs)
    if (!names.count(branch))
      violation("tcc_unregistered_branch " + gid + " " + branch + " was called at " +
                list.front()->where);
  for (auto& b : rec.branches) {
    const std::string& name = b.participant;
    auto& list = evs[name];
    const OpEvent *confirm = nullptr, *cancel = nullptr;
    int tries = 0, confirms = 0, cancels = 0, empties = 0;
    bool try_after_cancel = false;
    for (const OpEvent* e : list) {
      if (e->effect == OpEffect::duplicate) continue;
      if (e->op == "confirm" && !confirm) confirm = e;
      if (e->op == "cancel" && !cancel) cancel = e;
      if (e->effect == OpEffect::applied && e->op == "try") {
        ++tries;
        try_after_cancel = try_after_cancel || cancel != nullptr;
      }
      if (e->effect == OpEffect::applied && e->op == "confirm") ++confirms;
      if (e->effect == OpEffect::applied && e->op == "cancel") ++cancels;
      if (e->effect == OpEffect::empty && e->op == "cancel") ++empties;
    }
    std::string where = list.empty() ? "" : " at " + list.front()->where;
    if (confirm && cancel)
      violation(
          "tcc_confirm_and_cancel " + gid + " " + name + where + ": " +
          (confirm->seq < cancel->seq
               ? "a cancel (" + std::string(effect_name(cancel->effect)) + ") after its confirm"
               : "a confirm (" + std::string(effect_name(confirm->effect)) + ") after its cancel"));
    if (try_after_cancel) violation("tcc_try_after_cancel " + gid + " " + name + where);
    if (commit && (tries != 1 || confirms != 1))
      violation("tcc_branch_unsettled " + gid + " " + name + where +
                ": committed, its try applied " + std::to_string(tries) + " times, its confirm " +
                std::to_string(confirms));
    if (!commit && cancels + empties == 0)
      violation("tcc_branch_unsettled " + gid + " " + name + where + ": aborted, never cancelled");
    if (!commit && cancels != tries)
      violation("tcc_reservation_left " + gid + " " + name + where + ": aborted, its try applied " +
                std::to_string(tries) + " times, its cancel " + std::to_string(cancels));
  }
}

// One saga. Committed: every action applied once, nothing compensated. Aborted (backward only):
// every action that ran compensated once, a step without compensation never ran; sequential:
// actions first step first, compensations last step first; never an action after its
// compensation.
void Cluster::check_saga(const wal::TxnRecord& rec,
                         std::map<std::string, std::vector<const OpEvent*>>& evs) {
  const std::string& gid = rec.gid;
  bool commit = rec.decision == wal::Decision::commit;
  Transfer* t = transfer_of(rec);
  if (!t) return violation("saga_unknown " + gid + ": its steps name no transfer of the clients");
  if (t->forward && !commit) violation("saga_forward_aborted " + gid);
  std::set<std::string> names;
  std::vector<std::pair<uint64_t, size_t>> actions, compensations;  // (seq, step) applied
  for (size_t i = 0; i < rec.branches.size(); ++i) {
    const wal::BranchRecord& b = rec.branches[i];
    names.insert(b.participant);
    bool compensable = std::any_of(b.ops.begin(), b.ops.end(),
                                   [](const wal::OpText& o) { return o.op == StepOp::compensate; });
    auto& list = evs[b.participant];
    int applied = 0, undone = 0;
    uint64_t first_compensation = 0;
    bool after = false;
    for (const OpEvent* e : list) {
      if (e->op == "compensate" &&
          (e->effect == OpEffect::applied || e->effect == OpEffect::empty) && !first_compensation)
        first_compensation = e->seq;
      if (e->effect != OpEffect::applied) continue;
      if (e->op == "action") {
        ++applied;
        actions.emplace_back(e->seq, i);
        after = after || first_compensation != 0;
      }
      if (e->op == "compensate") {
        ++undone;
        compensations.emplace_back(e->seq, i);
      }
    }
    std::string step =
        gid + " " + b.participant + (list.empty() ? "" : " at " + list.front()->where);
    if (applied > 1)
      violation("saga_action_twice " + step + ": applied " + std::to_string(applied) + " times");
    if (after) violation("saga_action_after_compensation " + step);
    if (commit && applied != 1)
      violation("saga_action_missing " + step + ": committed, its action applied " +
                std::to_string(applied) + " times");
    if (commit && undone > 0) violation("saga_compensated_but_committed " + step);
    if (!commit && compensable && undone != applied)
      violation("saga_not_compensated " + step + ": aborted, its action applied " +
                std::to_string(applied) + " times, compensated " + std::to_string(undone));
    if (!commit && !compensable && applied > 0)
      violation("saga_not_compensated " + step +
                ": aborted, and its step without compensation ran");
  }
  for (auto& [name, list] : evs)
    if (!names.count(name))
      violation("saga_unknown_step " + gid + " " + name + " was called at " + list.front()->where);
  if (t->parallel) return;
  std::sort(actions.begin(), actions.end());
  std::sort(compensations.begin(), compensations.end());
  for (size_t k = 1; k < actions.size(); ++k)
    if (actions[k].second < actions[k - 1].second)
      violation("saga_action_order " + gid + ": step " + std::to_string(actions[k].second) +
                " ran after step " + std::to_string(actions[k - 1].second));
  for (size_t k = 1; k < compensations.size(); ++k)
    if (compensations[k].second > compensations[k - 1].second)
      violation("saga_compensation_order " + gid + ": step " +
                std::to_string(compensations[k].second) + " was compensated after step " +
                std::to_string(compensations[k - 1].second) + " (last step first)");
}

// One transactional message. Its local op applied at most once; committed exactly when it
// applied (a message whose local transaction committed is delivered, one whose local
// transaction did not is never delivered); committed: every destination applied it exactly
// once; aborted: no destination was ever called.
void Cluster::check_msg(const wal::TxnRecord& rec,
                        std::map<std::string, std::vector<const OpEvent*>>& evs) {
  const std::string& gid = rec.gid;
  bool commit = rec.decision == wal::Decision::commit;
  int locals = 0;
  for (const OpEvent* e : evs["local"])
    if (e->op == "local" && e->effect == OpEffect::applied) ++locals;
  if (locals > 1) violation("msg_local_twice " + gid + ": applied " + std::to_string(locals));
  if (commit && locals == 0)
    violation("msg_delivered_without_local " + gid + ": committed, its local op never applied");
  if (!commit && locals > 0)
    violation("msg_lost " + gid + ": its local op committed, the message ended aborted");
  for (size_t i = 1; i < rec.branches.size(); ++i) {
    const std::string& name = rec.branches[i].participant;
    int applied = 0, calls = 0;
    for (const OpEvent* e : evs[name]) {
      if (e->op != "deliver") continue;
      ++calls;
      if (e->effect == OpEffect::applied) ++applied;
    }
    if (commit && applied != 1)
      violation("msg_delivery " + gid + " " + name + ": committed, applied " +
                std::to_string(applied) + " times");
    if (!commit && calls > 0) violation("msg_delivered_after_abort " + gid + " " + name);
  }
  std::set<std::string> names;
  for (auto& b : rec.branches) names.insert(b.participant);
  for (auto& [name, list] : evs)
    if (!names.count(name))
      violation("msg_unknown_slot " + gid + " " + name + " was called at " + list.front()->where);
}

void Cluster::maybe_notify(Json& body) {
  if (w_.rng().chance(0.3)) body["notify"] = service_op("/notify", Json::object());
}

// One notification, once settled (it has ended: op_unfinished). It told its transaction's final
// state, the one its record ended with (or aborted, with no record: presumed); delivered means
// the receiver got it at least once; given up means its attempts ran out or it was refused.
void Cluster::check_notification(const wal::TxnRecord& rec) {
  const std::string& id = rec.gid;
  (rec.decision == wal::Decision::commit ? notified : given_up)++;
  if (rec.branches.size() != 1 || rec.branches[0].ops.size() != 1)
    return violation("notify_record " + id + ": not one slot with its op");
  auto op = parse_object(rec.branches[0].ops[0].json);
  Json body = op.ok() && op->contains("body") ? (*op)["body"] : Json();
  auto received = service_->received.find(id);
  bool got = received != service_->received.end() && !received->second.empty();
  if (rec.decision == wal::Decision::commit && !got)
    violation("notify_not_received " + id + ": delivered, the receiver never got it");
  if (got)
    for (auto& b : received->second)
      if (b != dump(body))
        violation("notify_body " + id + ": received " + b + ", sent " + dump(body));
  auto opts = coord::decode_op_options(rec.options);
  bool refused = opts.ok() && opts->reason == "refused";
  if (rec.decision == wal::Decision::aborted && !refused && opts.ok() &&
      rec.branches[0].attempts < opts->saga.attempts_max)
    violation("notify_gave_up_early " + id + ": " + std::to_string(rec.branches[0].attempts) +
              " of " + std::to_string(opts->saga.attempts_max) + " attempts");
  if (!body.is_object() || !body.contains("gid")) return;  // a standalone notification
  std::string gid = body["gid"].get<std::string>(), told = body.value("state", "");
  notified_gids_.insert(gid);
  auto txn = store_.get(gid);
  std::string state = "aborted";  // no record: presumed aborted
  if (txn.ok() && txn->has_value())
    state =
        std::string(coord::state_name(coord::CoordinatorMachine::view_from_record(**txn).state));
  if (told != state)
    violation("notify_wrong_state " + id + ": told " + gid + " " + told + ", its record says " +
              state);
}

// Every ended transaction whose record carries "notify" has its notification in the log
// (written before the end record), and the receiver knows no notification the log does not.
void Cluster::check_notified() {
  (void)store_.for_each([&](wal::TxnRecord&& r) {
    if (r.protocol == Protocol::notify || !r.ended) return;
    if (r.options.find("\"notify\"") == std::string::npos) return;
    if (!notified_gids_.count(r.gid))
      violation("notify_lost " + r.gid + ": ended with \"notify\", no notification of it logged");
  });
  for (auto& [id, bodies] : service_->received) {
    auto rec = store_.get(id);
    if (!rec.ok() || !rec->has_value() || (*rec)->protocol != Protocol::notify)
      violation("notify_unknown " + id + ": received, the coordinator has no record of it");
  }
}

// --- the run ------------------------------------------------------------------------------------

std::vector<std::string> Cluster::run() {
  Rng setup(seed_ ^ 0x5eed);
  size_t n = static_cast<size_t>(setup.between(2, 4));
  w_.echo = opts_.replay;
  w_.run_until(kStartMs);
  coord_ = w_.add_process("c1", kCoordinatorPort);
  for (size_t i = 0; i < n; ++i) {
    auto a = std::make_unique<Agent>();
    a->name = "a" + std::to_string(i + 1);
    a->db.name = a->name;
    a->db.max_prepared = static_cast<int>(setup.between(3, 10));
    for (int id = 1; id <= kAccountsPerDb; ++id) a->db.balances[id] = kBalance;
    a->db.balances[kHoldAccount] = 0;
    a->db.balances[kPendingAccount] = 0;
    initial_total_ += a->db.total();
    agent_procs_.push_back(w_.add_process(a->name, static_cast<uint16_t>(kCoordinatorPort + 1 + i)));
    agents_.push_back(std::move(a));
  }
  app_ = w_.add_process("app", 0);
  svc_ = w_.add_process("svc", kServicePort);
  svc_url_ = url_of(svc_);
  service_ = std::make_unique<SimParticipant>(w_, svc_, journal_, opts_.sabotage);
  for (int id = 1; id <= kServiceAccounts; ++id)
    service_->accounts[id].balance = id > kServiceAccounts - 2 ? kServiceLowBalance : kBalance;
  initial_total_ += service_->total();
  service_->serve();
  w_.on_send = [this](int from, int to, const HttpRequest& req) { check_wire(from, to, req); };

  LogLevel level = opts_.replay ? LogLevel::info : LogLevel::warn;
  coord_rt_ = std::make_unique<SimRuntime>(w_, coord_);
  coord_sink_ = std::make_unique<TraceSink>(w_, "c1");
  coord_log_ = std::make_unique<Logger>(coord_sink_.get(), LogFormat::text, level);
  for (size_t i = 0; i < n; ++i) {
    Agent& a = *agents_[i];
    a.rt = std::make_unique<SimRuntime>(w_, agent_procs_[i]);
    a.sink = std::make_unique<TraceSink>(w_, a.name);
    a.log = std::make_unique<Logger>(a.sink.get(), LogFormat::text, level);
    a.sink->watch = [this, i](const std::string& line) { check_unilateral(i, line); };
  }
  app_rt_ = std::make_unique<SimRuntime>(w_, app_);
  start_coordinator();
  for (size_t i = 0; i < n; ++i) start_agent(i);

  w_.faults_on = true;
  w_.faults = NetFaults{0.02, 0.02, 0, 10, 0.01};
  for (int p : agent_procs_) w_.process(p).job_stall = 0.005;
  schedule_fault();
  for (int c = 0; c < kClients; ++c)
    app_rt_->run_after(w_.rng().between(0, 100), [this, c] { client_next(c); });
  const int64_t faults_end = w_.now() + opts_.faulty_ms;
  w_.at(faults_end, -1, [this] { stop_faults(); });
  w_.run_until(faults_end);
  // Whatever is down has its restart scheduled; the system must settle within the bound.
  const int64_t deadline = faults_end + kSettleMaxMs;
  while (w_.now() < deadline) {
    w_.run_until(w_.now() + 1'000);
    if (settled()) {
      w_.run_until(w_.now() + 2'000);  // the last acknowledgements
      if (settled()) break;
    }
  }
  check_end();
  // Stop the services while the world is still there.
  service_->release();
  coordinator_.reset();
  for (auto& a : agents_) {
    a->service.reset();
    a->exec.reset();
  }
  return violations_;
}

// --- the command --------------------------------------------------------------------------------

std::optional<Options> parse_args(int argc, char** argv) {
  Options o;
  o.seeds = 1000;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::optional<std::string> {
      if (i + 1 >= argc) return std::nullopt;
      return std::string(argv[++i]);
    };
    auto number = [&](auto* out) {
      auto v = value();
      if (!v) return false;
      try {
        size_t used = 0;
        double d = std::stod(*v, &used);
        if (used != v->size() || d < 0) return false;
        *out = static_cast<std::remove_reference_t<decltype(*out)>>(d);
        return true;
      } catch (...) {
        return false;
      }
    };
    bool ok = true;
    if (a == "--seeds") ok = number(&o.seeds);
    else if (a == "--seed") {
      ok = number(&o.first_seed);
      o.seeds = 1;
      o.replay = true;
      o.threads = 1;
    } else if (a == "--first-seed") ok = number(&o.first_seed);
    else if (a == "--minutes") ok = number(&o.minutes);
    else if (a == "--threads") ok = number(&o.threads) && o.threads >= 1;
    else if (a == "--faulty-ms") ok = number(&o.faulty_ms) && o.faulty_ms >= 100;
    else if (a == "--verbose") o.verbose = true;
    else if (a == "--keep-going")
      o.keep_going = true;
    else if (a == "--sabotage") {
      auto v = value();
      ok = false;
      for (auto& s : kSabotages)
        if (v && *v == s.name) {
          o.sabotage = s.value;
          ok = true;
        }
      if (!ok) {
        std::fprintf(stderr, "tpc-sim: --sabotage needs one of:");
        for (auto& s : kSabotages) std::fprintf(stderr, " %s", s.name);
        std::fprintf(stderr, "\n");
        return std::nullopt;
      }
    } else if (a == "-h" || a == "--help") {
      std::printf(
          "usage: tpc-sim [--seeds N] [--seed S] [--minutes M] [--threads T] [--faulty-ms F] "
          "[--verbose] [--keep-going] [--sabotage S]\n"
          "  --seeds N      run seeds 1..N (default 1000); the first failure stops the run\n"
          "  --seed S       replay seed S alone, printing its events as they happen\n"
          "  --minutes M    run seeds until M minutes passed\n"
          "  --threads T    seeds in parallel (default 2)\n"
          "  --faulty-ms F  how long faults are injected per seed (default 8000, at least 100)\n"
          "  --verbose      also trace every message sent\n"
          "  --keep-going   run every seed; print each failing seed's first violation in one line\n"
          "  --sabotage S   break the HTTP service's bookkeeping on purpose (one of\n"
          "                 skip_compensation_record, late_compensation, cancel_after_confirm,\n"
          "                 skip_cancel_record, keep_frozen, double_undo, tell_committed):\n"
          "                 an invariant must fail\n"
          "The invariants are listed at the top of tests/sim/system_sim.cc.\n");
      std::exit(0);
    } else {
      std::fprintf(stderr, "tpc-sim: unknown argument \"%s\" (see --help)\n", a.c_str());
      return std::nullopt;
    }
    if (!ok) {
      std::fprintf(stderr, "tpc-sim: %s needs a non-negative number\n", a.c_str());
      return std::nullopt;
    }
  }
  return o;
}

int run(const Options& o, const char* self) {
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  std::atomic<uint64_t> next{o.first_seed}, passed{0}, committed{0}, aborted{0}, events{0},
      ops_committed{0}, ops_aborted{0}, notified{0}, given_up{0};
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> failures{0};
  std::mutex out_mu;
  auto more = [&](uint64_t seed) {
    if (failed && !o.keep_going) return false;
    if (o.minutes > 0)
      return std::chrono::duration<double>(Clock::now() - started).count() < o.minutes * 60.0;
    return seed < o.first_seed + o.seeds;
  };
  auto worker = [&] {
    for (;;) {
      uint64_t seed = next.fetch_add(1);
      if (!more(seed)) return;
      Cluster c(seed, o);
      auto v = c.run();
      committed += c.told_committed;
      aborted += c.told_aborted;
      ops_committed += c.ops_committed;
      ops_aborted += c.ops_aborted;
      notified += c.notified;
      given_up += c.given_up;
      events += c.world().events_run();
      if (v.empty()) {
        passed++;
        continue;
      }
      std::lock_guard lock(out_mu);
      failures++;
      if (o.keep_going) {
        failed = true;
        std::fprintf(stderr, "seed %llu: %s\n", static_cast<unsigned long long>(seed),
                     v[0].c_str());
        continue;
      }
      if (failed.exchange(true)) return;
      std::fprintf(stderr, "\nseed %llu: %s\n", static_cast<unsigned long long>(seed), v[0].c_str());
      for (size_t i = 1; i < v.size() && i < 10; ++i) std::fprintf(stderr, "  also: %s\n", v[i].c_str());
      std::fprintf(stderr, "last events:\n");
      for (auto& line : c.world().trace_tail(kTraceShown))
        std::fprintf(stderr, "  %s\n", line.c_str());
      std::string sabotage;
      for (auto& s : kSabotages)
        if (s.value == o.sabotage) sabotage = std::string(" --sabotage ") + s.name;
      std::fprintf(stderr, "replay: %s --seed %llu --faulty-ms %lld%s\n", self,
                   static_cast<unsigned long long>(seed), static_cast<long long>(o.faulty_ms),
                   sabotage.c_str());
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < o.threads; ++t) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  double secs = std::chrono::duration<double>(Clock::now() - started).count();
  std::string fail_note = !failed        ? ""
                          : o.keep_going ? ", " + std::to_string(failures.load()) + " failed"
                                         : ", one failed";
  std::printf(
      "tpc-sim: %llu seeds passed in %.1f s%s (%llu transfers answered committed, %llu aborted; "
      "TCC, sagas and messages of the coordinator: %llu committed, %llu aborted; notifications: "
      "%llu delivered, %llu given up; %llu events)\n",
      static_cast<unsigned long long>(passed.load()), secs, fail_note.c_str(),
      static_cast<unsigned long long>(committed.load()),
      static_cast<unsigned long long>(aborted.load()),
      static_cast<unsigned long long>(ops_committed.load()),
      static_cast<unsigned long long>(ops_aborted.load()),
      static_cast<unsigned long long>(notified.load()),
      static_cast<unsigned long long>(given_up.load()),
      static_cast<unsigned long long>(events.load()));
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace tpc::sim

int main(int argc, char** argv) {
  auto o = tpc::sim::parse_args(argc, argv);
  if (!o) return 2;
  return tpc::sim::run(*o, argv[0]);
}
