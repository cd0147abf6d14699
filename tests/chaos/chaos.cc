// tpc-chaos: concurrent transfers between two real PostgreSQL databases while faults hit every
// process, then a scorecard of what must never happen.
//
//   tpc-chaos --table [--only NAME,...] [--clients C] [--keep]
//       every named failpoint once (armed at run time on the process it belongs to, action
//       1*crash), then external faults (kill -9 of each process, SIGSTOP/SIGCONT, PostgreSQL
//       stopped -m immediate while branches are prepared); one row per fault.
//   tpc-chaos [--chaos] [--seed S] [--seconds N | --minutes M] [--clients C]
//             [--protocol 2pc|3pc|tcc|saga|msg|mix] [--faults kill,stop,pg,failpoint,http]
//             [--keep]
//       faults drawn from the seed at random moments for the whole run.
//
// Each transfer moves money from one bank's account to the other bank's account in one global
// transaction and writes a ledger row tagged with the gid on each side:
//   2pc, 3pc  statements through the agents' exec endpoint, then commit (or abort);
//   tcc       a try per bank (the debit reserves the amount in accounts.frozen, the credit
//             checks the account), then commit (or sometimes abort): the confirms move the money
//             and write the ledger rows, the cancels release the reservation; a few tries ask
//             for more than the balance and fail; a third credit the wallet (below) instead;
//   saga      POST /v1/transactions/run with a debit and a credit step, each an action (balance
//             change and ledger row) and a compensation (the reverse, and the ledger row
//             deleted); a few debits break the accounts' CHECK so that the saga compensates.
//             A third of the others credit a wallet instead: a tpc-http-participant reached
//             by HTTP ops, which the http fault kind makes misbehave for a few calls (503,
//             answered twice, late, never, 422); the money of the banks and the wallet together
//             must stay the same.
//   msg       a transactional message: the producer's local transaction (debit and ledger row)
//             through its agent, and the message crediting the other bank (a SQL op: credit and
//             ledger row, applied once by the barrier) or the wallet; in one request with the
//             local op, or begun, the local op run at the agent by the client, then committed
//             or left to check-back (which fences a local op that never ran). A few local ops
//             break the CHECK: the message aborts. A duplicated delivery shows as a gid's
//             ledger row twice, a lost one as a debit without its credit.
// --protocol mix draws among all five. After the faults stop, every prepared branch is resolved
// and the coordinator has no unfinished TCC or saga transaction: for every gid the two banks'
// ledger rows must be both present or both absent (no mixed outcome), a transfer the client was
// told committed must be present (no lost commit), one told aborted absent (no commit after an
// abort answer), no gid twice (no duplicated commit), the total unchanged, nothing of ours left
// prepared, nothing left frozen, no TCC or saga transaction left unfinished, and no tpc_barrier
// row left once the agents had time to purge the finished gids. A sampler watches
// pg_prepared_xacts to measure how long branches stay prepared. Exit code 0 only when every
// violation count is 0; otherwise it prints how to reproduce the run.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "common/cli.h"
#include "common/config.h"
#include "common/http_client.h"
#include "common/json.h"
#include "tests/harness/harness.h"

namespace tpc::chaos {
namespace {

using testing::PgCluster;
using testing::Process;
using testing::read_file;

constexpr int kAccounts = 20;
constexpr int64_t kInitial = 10'000;
constexpr int64_t kSampleMs = 25;
// Amounts that no debit can take: a saga's (the accounts' CHECK fails), and a TCC try's, past
// any balance even while failing sagas' credits of kSagaTooMuch wait for their compensation.
constexpr int64_t kSagaTooMuch = 10 * kInitial * kAccounts;
constexpr int64_t kTccTooMuch = 1000 * kSagaTooMuch;
// The balance of the wallet, a tpc-http-participant that some sagas credit over HTTP.
constexpr int64_t kWallet = 1'000'000;

struct Options {
  bool table = false;
  std::set<std::string> only;
  uint64_t seed = 1;
  int seconds = 60;
  int clients = 8;
  std::string protocol = "2pc";
  std::set<std::string> faults = {"kill", "stop", "pg", "failpoint", "http"};
  bool keep = false;
  std::string argv_text;  // to print the reproduction command
};

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void sleep_ms(int64_t ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

std::string json_string(const Json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : "";
}

enum class Target { coordinator, agent0, agent1, pg1 };

// A row of the failpoint table.
struct Scenario {
  std::string name;  // failpoint name, or a description of an external fault
  Target target;
  std::string protocol;  // of the load while it runs
  enum class Kind { failpoint, recovery_failpoint, kill, stop, pg_stop } kind;
};

const std::vector<Scenario>& scenarios() {
  using K = Scenario::Kind;
  static const std::vector<Scenario> all = {
      {"coord.after_first_prepare_sent", Target::coordinator, "2pc", K::failpoint},
      {"coord.before_decision_log", Target::coordinator, "2pc", K::failpoint},
      {"coord.after_decision_log", Target::coordinator, "2pc", K::failpoint},
      {"coord.after_first_branch_committed", Target::coordinator, "2pc", K::failpoint},
      {"coord.before_end_record", Target::coordinator, "2pc", K::failpoint},
      {"coord.recovery_after_first_redrive", Target::coordinator, "2pc", K::recovery_failpoint},
      {"coord.after_precommit_logged", Target::coordinator, "3pc", K::failpoint},
      {"coord.after_first_precommit_sent", Target::coordinator, "3pc", K::failpoint},
      {"coord.after_try_registered", Target::coordinator, "tcc", K::failpoint},
      {"coord.after_confirm_logged", Target::coordinator, "tcc", K::failpoint},
      {"coord.after_first_confirm", Target::coordinator, "tcc", K::failpoint},
      {"coord.after_saga_logged", Target::coordinator, "saga", K::failpoint},
      {"coord.after_compensate_logged", Target::coordinator, "saga", K::failpoint},
      {"coord.after_first_step_done", Target::coordinator, "saga", K::failpoint},
      {"coord.after_half_logged", Target::coordinator, "msg", K::failpoint},
      {"coord.after_msg_commit_logged", Target::coordinator, "msg", K::failpoint},
      {"coord.after_first_delivery", Target::coordinator, "msg", K::failpoint},
      {"agent.after_step", Target::agent1, "msg", K::failpoint},
      {"agent.before_prepare", Target::agent1, "2pc", K::failpoint},
      {"agent.after_prepare", Target::agent1, "2pc", K::failpoint},
      {"agent.before_commit_prepared", Target::agent1, "2pc", K::failpoint},
      {"agent.after_commit_prepared", Target::agent1, "2pc", K::failpoint},
      {"agent.before_commit_prepared", Target::agent1, "3pc", K::failpoint},
      {"agent.during_scan", Target::agent1, "2pc", K::failpoint},
      {"agent.before_step", Target::agent0, "tcc", K::failpoint},
      {"agent.after_step", Target::agent1, "tcc", K::failpoint},
      {"agent.after_step", Target::agent0, "saga", K::failpoint},
      {"kill -9 coordinator", Target::coordinator, "mix", K::kill},
      {"kill -9 agent bank0", Target::agent0, "mix", K::kill},
      {"kill -9 agent bank1", Target::agent1, "mix", K::kill},
      {"SIGSTOP/SIGCONT coordinator", Target::coordinator, "mix", K::stop},
      {"SIGSTOP/SIGCONT agent bank1", Target::agent1, "mix", K::stop},
      {"pg_ctl stop -m immediate bank1, branches prepared", Target::pg1, "mix", K::pg_stop},
  };
  return all;
}

struct Violations {
  uint64_t mixed = 0, wrong_total = 0, lost = 0, after_abort = 0, duplicated = 0, mismatch = 0,
           leftover = 0, unfinished = 0, frozen = 0, barrier = 0;
  uint64_t sum() const {
    return mixed + wrong_total + lost + after_abort + duplicated + mismatch + leftover +
           unfinished + frozen + barrier;
  }
  std::string text() const {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "mixed_outcome=%llu wrong_total=%llu lost_commit=%llu commit_after_abort=%llu "
                  "duplicated_commit=%llu outcome_mismatch=%llu leftover_prepared=%llu "
                  "unfinished_left=%llu frozen_left=%llu barrier_left=%llu",
                  (unsigned long long)mixed, (unsigned long long)wrong_total,
                  (unsigned long long)lost, (unsigned long long)after_abort,
                  (unsigned long long)duplicated, (unsigned long long)mismatch,
                  (unsigned long long)leftover, (unsigned long long)unfinished,
                  (unsigned long long)frozen, (unsigned long long)barrier);
    return buf;
  }
};

// One transfer, as the draw decided it.
struct Transfer {
  int from_bank = 0, to_bank = 1, from = 1, to = 1;
  int64_t amount = 1;
  bool reversed = false;  // the credit goes first
};

struct Counts {
  uint64_t attempted = 0, committed = 0, aborted = 0, unknown = 0;
};

class World {
 public:
  explicit World(Options o) : opts_(std::move(o)) {}

  Status setup();
  int run_chaos();
  int run_table();
  void teardown();

 private:
  Status start_coordinator(const std::string& failpoints);
  Status start_agent(int i, const std::string& failpoints);
  Status start_wallet();
  int64_t wallet_balance();  // -1 when the wallet does not answer
  Status wait_healthy(Process& p, const Url& url, int64_t timeout_ms);
  Process* process(Target t);
  Status restart(Target t, const std::string& failpoints = "");
  void restart_dead();

  void start_load(const std::string& protocol);
  void stop_load();
  void client_loop(int id, uint64_t seed);
  std::string begin(const Json& body);
  std::string commit(const std::string& gid);
  std::string abort(const std::string& gid);
  void transfer_xa(const std::string& protocol, const Transfer& t, std::mt19937_64& rng);
  void transfer_tcc(const Transfer& t, std::mt19937_64& rng);
  void transfer_saga(const Transfer& t, std::mt19937_64& rng);
  void transfer_msg(const Transfer& t, std::mt19937_64& rng);
  std::string run(const Json& body, const char* what, HttpResult* r);
  void finish_transfer(const std::string& gid, const std::string& outcome);
  void note_failure(const std::string& step, const HttpResult& r);
  Counts counts() const;

  void sampler_loop();
  int64_t prepared_now(int bank);
  // Waits until nothing of ours is prepared; returns the time it took, or -1.
  int64_t quiesce(int64_t timeout_ms);
  // TCC, saga and msg transactions the coordinator has not finished, or -1 when it cannot tell.
  int64_t unfinished_ops(std::string* some = nullptr);
  // Waits until there are none; returns the time it took, or -1.
  int64_t settle_ops(int64_t timeout_ms);
  int64_t barrier_rows();
  int64_t open_transactions();
  Violations check();
  std::vector<int64_t> prepared_durations(int64_t since_ms);

  Status run_scenario(const Scenario& s, std::string* outcome);
  void inject_random(std::mt19937_64& rng);
  void fault_loop(uint64_t seed);
  void print_times(const char* title, std::vector<int64_t> d);
  int fail_footer(const Violations& v);

  Options opts_;
  std::string dir_;
  std::unique_ptr<PgCluster> pg_[2];
  std::recursive_mutex proc_mu_;  // guards the processes and clusters
  std::unique_ptr<Process> coordinator_;
  std::unique_ptr<Process> agents_[2];
  std::unique_ptr<Process> wallet_;  // never killed: its ledger is in its memory
  Url coordinator_url_;
  Url agent_urls_[2];
  Url wallet_url_;
  int log_serial_ = 0;

  std::atomic<bool> load_stop_{false};
  std::vector<std::thread> clients_;
  std::string load_protocol_ = "2pc";
  std::atomic<uint64_t> attempted_{0}, committed_{0}, aborted_{0}, unknown_{0}, begin_failed_{0},
      run_no_gid_{0}, to_wallet_{0};
  std::mutex outcomes_mu_;
  std::map<std::string, std::string> outcomes_;  // committed | aborted | unknown
  std::mutex reasons_mu_;
  std::map<std::string, uint64_t> reasons_;

  std::atomic<bool> sampler_stop_{false};
  std::thread sampler_;
  std::mutex sample_mu_;
  std::map<std::string, std::pair<int64_t, int64_t>> prepared_seen_;  // pg gid → first, last seen

  std::mutex faults_mu_;
  std::map<std::string, uint64_t> faults_;
};

// --- processes -------------------------------------------------------------------------------

Status World::wait_healthy(Process& p, const Url& url, int64_t timeout_ms) {
  int64_t deadline = now_ms() + timeout_ms;
  while (now_ms() < deadline) {
    if (!p.running()) return unavailable("the process exited (a failpoint may have fired)");
    auto r = http_call(url, "GET", "/healthz", "", 1'000);
    if (r.status.ok() && r.http_status == 200) return ok_status();
    sleep_ms(50);
  }
  return unavailable("no healthy answer from " + url.to_string());
}

Status World::start_coordinator(const std::string& failpoints) {
  // clang-format off
  std::vector<std::string> argv = {testing::bin_dir() + "/tpc-coordinator",
                                   "--listen", "127.0.0.1:" + std::to_string(coordinator_url_.port),
                                   "--data-dir", dir_ + "/decision-log",
                                   "--prepare-timeout-ms", "3000",
                                   "--commit-wait-ms", "5000",
                                   "--retry-min-ms", "20",
                                   "--retry-max-ms", "1000",
                                   "--recovery-wait-ms", "5000",
                                   "--participant", "bank0=" + agent_urls_[0].to_string(),
                                   "--participant", "bank1=" + agent_urls_[1].to_string(),
                                   "--failpoints-endpoint"};
  // clang-format on
  std::vector<std::string> env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p =
      Process::spawn(argv, dir_ + "/coordinator-" + std::to_string(++log_serial_) + ".log", env);
  if (!p.ok()) return p.status();
  coordinator_ = std::move(*p);
  return wait_healthy(*coordinator_, coordinator_url_, 30'000);
}

Status World::start_agent(int i, const std::string& failpoints) {
  // clang-format off
  std::vector<std::string> argv = {testing::bin_dir() + "/tpc-agent",
                                   "--listen", "127.0.0.1:" + std::to_string(agent_urls_[i].port),
                                   "--name", "bank" + std::to_string(i),
                                   "--pg", pg_[i]->conninfo(),
                                   "--coordinator", "c1=" + coordinator_url_.to_string(),
                                   "--in-doubt-after-ms", "1000",
                                   "--scan-interval-ms", "1000",
                                   "--precommit-timeout-ms", "3000",
                                   "--commit-timeout-ms", "3000",
                                   "--lock-timeout-ms", "2000",
                                   "--purge-interval-ms", "500",
                                   "--failpoints-endpoint"};
  // clang-format on
  std::vector<std::string> env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p = Process::spawn(
      argv, dir_ + "/agent" + std::to_string(i) + "-" + std::to_string(++log_serial_) + ".log",
      env);
  if (!p.ok()) return p.status();
  agents_[i] = std::move(*p);
  return wait_healthy(*agents_[i], agent_urls_[i], 30'000);
}

Status World::start_wallet() {
  auto p = Process::spawn({testing::bin_dir() + "/tpc-http-participant", "--listen",
                           "127.0.0.1:" + std::to_string(wallet_url_.port), "--log-level", "warn"},
                          dir_ + "/wallet.log");
  if (!p.ok()) return p.status();
  wallet_ = std::move(*p);
  TPC_RETURN_IF_ERROR(wait_healthy(*wallet_, wallet_url_, 30'000));
  auto r = http_call(wallet_url_, "POST", "/accounts", dump(Json{{"w", kWallet}}), 5'000);
  if (!r.status.ok() || r.http_status != 200) return unavailable("cannot open the wallet account");
  return ok_status();
}

int64_t World::wallet_balance() {
  auto r = http_call(wallet_url_, "GET", "/accounts", "", 5'000);
  auto j =
      r.status.ok() && r.http_status == 200 ? parse_json(r.body) : Result<Json>(unavailable(""));
  if (!j.ok()) return -1;
  const Json* w = &(*j)["accounts"]["w"];
  if (!w->is_object() || !(*w)["balance"].is_number()) return -1;
  return (*w)["balance"].get<int64_t>();
}

Process* World::process(Target t) {
  switch (t) {
    case Target::coordinator: return coordinator_.get();
    case Target::agent0: return agents_[0].get();
    case Target::agent1: return agents_[1].get();
    case Target::pg1: return nullptr;
  }
  return nullptr;
}

Status World::restart(Target t, const std::string& failpoints) {
  std::lock_guard lock(proc_mu_);
  switch (t) {
    case Target::coordinator: return start_coordinator(failpoints);
    case Target::agent0: return start_agent(0, failpoints);
    case Target::agent1: return start_agent(1, failpoints);
    case Target::pg1: return pg_[1]->start();
  }
  return ok_status();
}

void World::restart_dead() {
  std::lock_guard lock(proc_mu_);
  for (int i = 0; i < 2; ++i)
    if (!pg_[i]->running()) (void)pg_[i]->start();
  if (!coordinator_->running()) (void)start_coordinator("");
  for (int i = 0; i < 2; ++i)
    if (!agents_[i]->running()) (void)start_agent(i, "");
}

Status World::setup() {
  dir_ = testing::make_temp_dir("tpc-chaos");
  for (int i = 0; i < 2; ++i) {
    auto c = PgCluster::create();
    if (!c.ok()) return c.status();
    pg_[i] = std::move(*c);
    auto r = testing::query(
        pg_[i]->conninfo(),
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL,"
        " frozen BIGINT NOT NULL DEFAULT 0,"
        " CHECK (frozen >= 0 AND frozen <= balance));"
        "CREATE TABLE ledger (gid text NOT NULL, account int NOT NULL, amount bigint NOT NULL,"
        " to_wallet boolean NOT NULL DEFAULT false);"
        "INSERT INTO accounts SELECT g, " +
            std::to_string(kInitial) + " FROM generate_series(1, " + std::to_string(kAccounts) +
            ") g;");
    if (!r.ok()) return r.status();
  }
  coordinator_url_.host = "127.0.0.1";
  coordinator_url_.port = testing::free_port();
  for (int i = 0; i < 2; ++i) {
    agent_urls_[i].host = "127.0.0.1";
    agent_urls_[i].port = testing::free_port();
  }
  wallet_url_.host = "127.0.0.1";
  wallet_url_.port = testing::free_port();
  TPC_RETURN_IF_ERROR(start_coordinator(""));
  for (int i = 0; i < 2; ++i) TPC_RETURN_IF_ERROR(start_agent(i, ""));
  TPC_RETURN_IF_ERROR(start_wallet());
  sampler_ = std::thread([this] { sampler_loop(); });
  std::printf("tpc-chaos: %s, dir %s\n", opts_.argv_text.c_str(), dir_.c_str());
  std::fflush(stdout);
  return ok_status();
}

void World::teardown() {
  stop_load();
  sampler_stop_ = true;
  if (sampler_.joinable()) sampler_.join();
  std::lock_guard lock(proc_mu_);
  coordinator_.reset();
  for (auto& a : agents_) a.reset();
  wallet_.reset();
  if (!opts_.keep) {
    for (auto& p : pg_) p.reset();
    testing::remove_tree(dir_);
  } else {
    std::printf("kept: %s (PostgreSQL on ports %u and %u)\n", dir_.c_str(), pg_[0]->port(),
                pg_[1]->port());
    pg_[0].release();
    pg_[1].release();
  }
}

// --- load ----------------------------------------------------------------------------------

void World::note_failure(const std::string& step, const HttpResult& r) {
  std::string why;
  if (!r.status.ok()) {
    why = step + ": " + std::string(code_name(r.status.code()));
  } else {
    why = step + ": HTTP " + std::to_string(r.http_status);
    auto j = parse_json(r.body);
    if (j.ok() && j->is_object()) {
      std::string reason = json_string(*j, "reason");
      if (!reason.empty()) {
        why += " " + reason;
      } else if (j->contains("error") && (*j)["error"].is_object()) {
        std::string sqlstate = json_string((*j)["error"], "sqlstate");
        why += " " +
               (!sqlstate.empty() ? sqlstate : json_string((*j)["error"], "message").substr(0, 40));
      }
    }
  }
  std::lock_guard lock(reasons_mu_);
  ++reasons_[why];
}

// One statement of a step or an exec, with the row count it must affect when `expect` >= 0.
Json statement(const std::string& sql, Json params, int expect = -1) {
  Json st = {{"sql", sql}, {"params", std::move(params)}};
  if (expect >= 0) st["expect_rows"] = expect;
  return st;
}

Json sql_op(int bank, Json statements) {
  return Json{{"participant", "bank" + std::to_string(bank)},
              {"statements", std::move(statements)}};
}

// In a SQL op's params: replaced by the transaction's gid.
Json gid_param() {
  return Json{{"tpc", "gid"}};
}

void World::finish_transfer(const std::string& gid, const std::string& outcome) {
  if (outcome == "committed")
    ++committed_;
  else if (outcome == "aborted")
    ++aborted_;
  else
    ++unknown_;
  if (gid.empty()) return;
  std::lock_guard lock(outcomes_mu_);
  outcomes_[gid] = outcome;
}

// Begins a transaction; the gid, or "" when the coordinator refused (counted).
std::string World::begin(const Json& body) {
  auto b = http_call(coordinator_url_, "POST", "/v1/transactions", dump(body), 5'000);
  if (!b.status.ok() || b.http_status != 201) {
    ++begin_failed_;
    sleep_ms(50);
    return "";
  }
  auto j = parse_json(b.body);
  std::string gid = j.ok() ? json_string(*j, "gid") : "";
  if (gid.empty()) return "";
  ++attempted_;
  std::lock_guard lock(outcomes_mu_);
  outcomes_[gid] = "unknown";
  return gid;
}

// Commit, and what its answer told the client.
std::string World::commit(const std::string& gid) {
  auto c = http_call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/commit", "", 15'000);
  if (!(c.status.ok() && c.http_status == 200)) note_failure("commit", c);
  if (!c.status.ok()) return "unknown";
  auto cj = parse_json(c.body);
  std::string state = cj.ok() ? json_string(*cj, "state") : "";
  if (c.http_status == 200 && state == "committed") return "committed";
  if (c.http_status == 409 && state == "aborted") return "aborted";
  return "unknown";
}

std::string World::abort(const std::string& gid) {
  auto a = http_call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/abort", "", 10'000);
  return a.status.ok() && a.http_status == 200 ? "aborted" : "unknown";
}

void World::transfer_xa(const std::string& protocol, const Transfer& t, std::mt19937_64& rng) {
  std::string gid = begin(Json{{"protocol", protocol}});
  if (gid.empty()) return;
  auto leg = [&](int bank, int account, int64_t delta) {
    Json body = {
        {"statements",
         Json::array({statement("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                Json::array({delta, account})),
                      statement("INSERT INTO ledger (gid, account, amount) VALUES ($1, $2, $3)",
                                Json::array({gid, account, delta}))})}};
    return http_call(agent_urls_[bank], "POST", "/v1/branches/" + gid + "/exec", dump(body),
                     10'000);
  };
  bool ok = true;
  for (int k = 0; k < 2 && ok; ++k) {
    bool debit = (k == 0) != t.reversed;
    auto r = debit ? leg(t.from_bank, t.from, -t.amount) : leg(t.to_bank, t.to, t.amount);
    ok = r.status.ok() && r.http_status == 200;
    if (!ok) note_failure("exec", r);
  }
  std::string outcome = "unknown";
  if (!ok) {
    sleep_ms(static_cast<int64_t>(rng() % 20));
    outcome = abort(gid);
  } else {
    outcome = commit(gid);
  }
  finish_transfer(gid, outcome);
}

// TCC: the debit's try reserves the amount (frozen), the credit's checks the account; the
// confirms move the money and write the ledger rows, the cancels release the reservation.
void World::transfer_tcc(const Transfer& t, std::mt19937_64& rng) {
  std::string gid = begin(Json{{"protocol", "tcc"}, {"timeout_ms", 20'000}});
  if (gid.empty()) return;
  // A few tries ask for more than any balance can reach (even with the credits of failing sagas
  // not yet compensated): the try fails, the transaction aborts.
  int64_t amount = rng() % 16 == 0 ? kTccTooMuch : t.amount;
  Json debit = {
      {"branch", "debit"},
      {"try", sql_op(t.from_bank, Json::array({statement(
                                      "UPDATE accounts SET frozen = frozen + $1 WHERE id = $2 "
                                      "AND balance - frozen >= $1",
                                      Json::array({amount, t.from}), 1)}))},
      {"confirm",
       sql_op(t.from_bank,
              Json::array(
                  {statement("UPDATE accounts SET balance = balance - $1, frozen = frozen - $1 "
                             "WHERE id = $2",
                             Json::array({amount, t.from}), 1),
                   statement("INSERT INTO ledger (gid, account, amount) VALUES ($1, $2, $3)",
                             Json::array({gid_param(), t.from, -amount}))}))},
      {"cancel", sql_op(t.from_bank, Json::array({statement(
                                         "UPDATE accounts SET frozen = frozen - $1 WHERE id = $2",
                                         Json::array({amount, t.from}), 1)}))}};
  Json credit = {
      {"branch", "credit"},
      {"try", sql_op(t.to_bank, Json::array({statement("SELECT balance FROM accounts WHERE id = $1",
                                                       Json::array({t.to}), 1)}))},
      {"confirm",
       sql_op(
           t.to_bank,
           Json::array({statement("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                  Json::array({amount, t.to}), 1),
                        statement("INSERT INTO ledger (gid, account, amount) VALUES ($1, $2, $3)",
                                  Json::array({gid_param(), t.to, amount}))}))},
      {"cancel", sql_op(t.to_bank, Json::array())}};
  if (amount != kTccTooMuch && rng() % 3 == 0) {  // the credit goes to the wallet over HTTP
    ++to_wallet_;
    debit["confirm"]["statements"][1] =
        statement("INSERT INTO ledger (gid, account, amount, to_wallet) VALUES ($1, $2, $3, true)",
                  Json::array({gid_param(), t.from, -amount}));
    Json body = {{"account", "w"}, {"amount", amount}};
    auto op = [&](const char* what) {
      return Json{{"url", wallet_url_.to_string() + "/tcc/credit/" + what}, {"body", body}};
    };
    credit = {{"branch", "credit"},
              {"try", op("try")},
              {"confirm", op("confirm")},
              {"cancel", op("cancel")}};
  }
  bool ok = true;
  for (int k = 0; k < 2 && ok; ++k) {
    const Json& branch = (k == 0) != t.reversed ? debit : credit;
    auto r = http_call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/try", dump(branch),
                       20'000);
    ok = r.status.ok() && r.http_status == 200;
    if (!ok) note_failure("try", r);
  }
  std::string outcome;
  if (!ok) {
    outcome = abort(gid);
  } else if (rng() % 8 == 0) {  // the client changes its mind: the cancels release the tries
    {
      std::lock_guard lock(reasons_mu_);
      ++reasons_["abort: client"];
    }
    outcome = abort(gid);
  } else {
    outcome = commit(gid);
  }
  finish_transfer(gid, outcome);
}

// Saga: a debit and a credit step, each with a compensation that reverses the balance change
// and deletes the ledger row. A few debits break the accounts' CHECK: the saga compensates.
void World::transfer_saga(const Transfer& t, std::mt19937_64& rng) {
  bool fail = rng() % 6 == 0;
  int64_t amount = fail ? kSagaTooMuch : t.amount;
  bool reversed = fail ? rng() % 4 != 0 : t.reversed;  // mostly a done credit to compensate
  int from = t.from, to = t.to;
  if (fail) {
    // Until it is compensated a failing saga's credit is visible: its huge amount goes only to
    // accounts that failing debits never take from, so that no failing debit can succeed on it.
    from = static_cast<int>(rng() % (kAccounts / 2)) + 1;
    to = from + kAccounts / 2;
  }
  auto step = [&](const char* name, int bank, int account, int64_t delta) {
    return Json{
        {"name", name},
        {"action",
         sql_op(
             bank,
             Json::array({statement("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                    Json::array({delta, account}), 1),
                          statement("INSERT INTO ledger (gid, account, amount) VALUES ($1, $2, $3)",
                                    Json::array({gid_param(), account, delta}))}))},
        {"compensate",
         sql_op(bank,
                Json::array({statement("UPDATE accounts SET balance = balance - $1 WHERE id = $2",
                                       Json::array({delta, account}), 1),
                             statement("DELETE FROM ledger WHERE gid = $1",
                                       Json::array({gid_param()}), 1)}))}};
  };
  // A third of the others credit the wallet over HTTP; the debit's ledger row says so.
  bool to_wallet = !fail && rng() % 3 == 0;
  Json debit = step("debit", t.from_bank, from, -amount);
  Json credit = step("credit", t.to_bank, to, amount);
  if (to_wallet) {
    ++to_wallet_;
    debit["action"]["statements"][1] =
        statement("INSERT INTO ledger (gid, account, amount, to_wallet) VALUES ($1, $2, $3, true)",
                  Json::array({gid_param(), from, -amount}));
    Json body = {{"account", "w"}, {"delta", amount}};
    credit = {
        {"name", "credit"},
        {"action", {{"url", wallet_url_.to_string() + "/saga/action"}, {"body", body}}},
        {"compensate", {{"url", wallet_url_.to_string() + "/saga/compensate"}, {"body", body}}}};
  }
  bool accepted = rng() % 4 == 0;  // then the client learns the end by polling the view
  Json body = {{"protocol", "saga"},
               {"steps", reversed ? Json::array({credit, debit}) : Json::array({debit, credit})}};
  if (accepted) body["wait"] = "accepted";
  HttpResult r;
  std::string gid = run(body, "run", &r);
  if (gid.empty()) return;
  auto j = parse_json(r.body);
  std::string state = j.ok() ? json_string(*j, "state") : "";
  if (r.http_status == 202) {  // running or compensating: ask until it ends
    int64_t deadline = now_ms() + 20'000;
    while (now_ms() < deadline && state != "committed" && state != "aborted") {
      sleep_ms(100);
      auto g = http_call(coordinator_url_, "GET", "/v1/transactions/" + gid, "", 5'000);
      auto gj = g.status.ok() && g.http_status == 200 ? parse_json(g.body)
                                                      : Result<Json>(unavailable(""));
      if (gj.ok()) state = json_string(*gj, "state");
    }
  } else if (r.http_status != 200) {
    note_failure("run", r);
  }
  std::string outcome = state == "committed" || state == "aborted" ? state : "unknown";
  if (r.http_status == 200 && state != "committed") outcome = "unknown";
  if (r.http_status == 409 && state != "aborted") outcome = "unknown";
  if (fail && outcome == "committed") {
    std::lock_guard lock(reasons_mu_);
    ++reasons_["saga: a failing debit committed"];
  }
  finish_transfer(gid, outcome);
}

// POST /v1/transactions/run of a saga or a message: its gid, and the answer in *r. No gid:
// the coordinator refused before it began, or was not there (nothing ran: not attempted), or
// the answer was lost (it may run: only the ledger can tell; counted unknown).
std::string World::run(const Json& body, const char* what, HttpResult* r) {
  ++attempted_;
  *r = http_call(coordinator_url_, "POST", "/v1/transactions/run", dump(body), 15'000);
  auto j = r->status.ok() ? parse_json(r->body) : Result<Json>(unavailable("no answer"));
  std::string gid = j.ok() ? json_string(*j, "gid") : "";
  if (!gid.empty()) {
    std::lock_guard lock(outcomes_mu_);
    outcomes_[gid] = "unknown";
    return gid;
  }
  bool refused = r->status.ok()
                     ? r->http_status == 429 || r->http_status == 503
                     : r->status.message().find("Connection refused") != std::string::npos;
  sleep_ms(50);
  if (refused) {
    --attempted_;
    ++begin_failed_;
    return "";
  }
  note_failure(what, *r);
  ++run_no_gid_;
  finish_transfer("", "unknown");
  return "";
}

// A transactional message: the producer's local transaction debits from_bank (and writes its
// ledger row) and the message credits to_bank through a SQL op (its ledger row, applied once by
// the barrier), or, for a third of them, the wallet over HTTP. Half are one request with the
// local op; the others begin, run the local op at the agent themselves and commit, or walk away
// and leave the message to check-back, which fences a local op that never ran. A few local ops
// fail (the accounts' CHECK): the message aborts.
void World::transfer_msg(const Transfer& t_in, std::mt19937_64& rng) {
  Transfer t = t_in;
  bool fail = rng() % 8 == 0;
  int64_t amount = fail ? kSagaTooMuch : t.amount;
  // A failing local op takes from the accounts failing sagas never credit (see transfer_saga),
  // so that it fails for certain.
  if (fail) t.from = static_cast<int>(rng() % (kAccounts / 2)) + 1;
  bool to_wallet = rng() % 3 == 0;
  if (to_wallet) ++to_wallet_;
  Json local = Json::array(
      {statement("UPDATE accounts SET balance = balance - $1 WHERE id = $2",
                 Json::array({amount, t.from}), 1),
       statement("INSERT INTO ledger (gid, account, amount, to_wallet) VALUES ($1, $2, $3, $4)",
                 Json::array({gid_param(), t.from, -amount, to_wallet}))});
  Json destination =
      to_wallet
          ? Json{{"url", wallet_url_.to_string() + "/msg/deliver"},
                 {"body", {{"account", "w"}, {"delta", amount}}}}
          : sql_op(
                t.to_bank,
                Json::array({statement("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                       Json::array({amount, t.to}), 1),
                             statement("INSERT INTO ledger (gid, account, amount) VALUES ($1, "
                                       "$2, $3)",
                                       Json::array({gid_param(), t.to, amount}))}));
  auto decided = [](const HttpResult& r) {
    auto j = r.status.ok() ? parse_json(r.body) : Result<Json>(unavailable("no answer"));
    std::string state = j.ok() ? json_string(*j, "state") : "";
    if (r.status.ok() && r.http_status == 200 && (state == "committing" || state == "committed"))
      return std::string("committed");
    if (r.status.ok() && (r.http_status == 200 || r.http_status == 409) && state == "aborted")
      return std::string("aborted");
    return std::string("unknown");
  };
  if (rng() % 2 == 0) {  // one request
    Json body = {{"protocol", "msg"},
                 {"local", sql_op(t.from_bank, local)},
                 {"destinations", Json::array({destination})},
                 {"timeout_ms", 2'000}};
    HttpResult r;
    std::string gid = run(body, "run msg", &r);
    if (gid.empty()) return;
    std::string outcome = decided(r);
    if (outcome == "unknown") note_failure("run msg", r);
    if (fail && outcome == "committed") {
      std::lock_guard lock(reasons_mu_);
      ++reasons_["msg: a failing local op committed"];
    }
    return finish_transfer(gid, outcome);
  }
  std::string gid = begin(Json{{"protocol", "msg"},
                               {"check", {{"participant", "bank" + std::to_string(t.from_bank)}}},
                               {"destinations", Json::array({destination})},
                               {"timeout_ms", 1'500}});
  if (gid.empty()) return;
  Json step = {{"branch", "local"}, {"op", "local"}, {"statements", local}};
  auto l = http_call(agent_urls_[t.from_bank], "POST", "/v1/branches/" + gid + "/step", dump(step),
                     10'000);
  if (l.status.ok() && (l.http_status == 409 || l.http_status == 422))
    return finish_transfer(
        gid, decided(http_call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/abort", "",
                               10'000)));
  if (!l.status.ok() || l.http_status != 200 || rng() % 5 == 0) {
    // Unknown, or the producer goes away: check-back settles it.
    if (!(l.status.ok() && l.http_status == 200)) note_failure("local", l);
    return finish_transfer(gid, "unknown");
  }
  auto c = http_call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/commit", "", 15'000);
  std::string outcome = decided(c);
  if (outcome != "committed") note_failure("commit msg", c);
  finish_transfer(gid, outcome);
}

void World::client_loop(int id, uint64_t seed) {
  static const char* kMix[] = {"2pc", "3pc", "tcc", "saga", "msg"};
  std::mt19937_64 rng(seed * 1000 + static_cast<uint64_t>(id));
  while (!load_stop_) {
    std::string protocol = load_protocol_;
    if (protocol == "mix") protocol = kMix[rng() % 5];
    Transfer t;
    t.from_bank = static_cast<int>(rng() % 2);
    t.to_bank = 1 - t.from_bank;
    t.from = static_cast<int>(rng() % kAccounts) + 1;
    t.to = static_cast<int>(rng() % kAccounts) + 1;
    t.amount = static_cast<int64_t>(rng() % 50) + 1;
    t.reversed = rng() % 2;  // half the transfers lock the banks in the other order
    if (protocol == "tcc")
      transfer_tcc(t, rng);
    else if (protocol == "saga")
      transfer_saga(t, rng);
    else if (protocol == "msg")
      transfer_msg(t, rng);
    else
      transfer_xa(protocol, t, rng);
  }
}

void World::start_load(const std::string& protocol) {
  load_protocol_ = protocol;
  load_stop_ = false;
  static uint64_t round = 0;
  ++round;
  for (int i = 0; i < opts_.clients; ++i)
    clients_.emplace_back([this, i] { client_loop(i, opts_.seed + round * 7919); });
}

void World::stop_load() {
  load_stop_ = true;
  for (auto& t : clients_) t.join();
  clients_.clear();
}

Counts World::counts() const {
  return Counts{attempted_.load(), committed_.load(), aborted_.load(), unknown_.load()};
}

// --- observation and checks ----------------------------------------------------------------

int64_t World::prepared_now(int bank) {
  auto v = testing::query_value(pg_[bank]->conninfo(),
                                "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'tpc:%'");
  return v.ok() ? std::stoll(v->value_or("0")) : -1;
}

void World::sampler_loop() {
  while (!sampler_stop_) {
    int64_t t = now_ms();
    for (int i = 0; i < 2; ++i) {
      auto rows = testing::query(pg_[i]->conninfo(),
                                 "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'tpc:%'");
      if (!rows.ok()) continue;  // PostgreSQL down: nothing to see
      std::lock_guard lock(sample_mu_);
      for (auto& r : *rows) {
        auto [it, inserted] = prepared_seen_.emplace(*r[0], std::make_pair(t, t));
        if (!inserted) it->second.second = t;
      }
    }
    sleep_ms(kSampleMs);
  }
}

std::vector<int64_t> World::prepared_durations(int64_t since_ms) {
  std::vector<int64_t> out;
  std::lock_guard lock(sample_mu_);
  for (auto& [gid, seen] : prepared_seen_)
    if (seen.first >= since_ms) out.push_back(seen.second - seen.first + kSampleMs);
  return out;
}

int64_t World::quiesce(int64_t timeout_ms) {
  restart_dead();
  int64_t start = now_ms();
  bool clean =
      testing::eventually([&] { return prepared_now(0) == 0 && prepared_now(1) == 0; }, timeout_ms);
  return clean ? now_ms() - start : -1;
}

int64_t World::unfinished_ops(std::string* some) {
  int64_t n = 0;
  for (const char* state :
       {"active", "committing", "aborting", "running", "compensating", "failed", "prepared"}) {
    auto r = http_call(coordinator_url_, "GET",
                       std::string("/v1/transactions?limit=1000&state=") + state, "", 5'000);
    auto j =
        r.status.ok() && r.http_status == 200 ? parse_json(r.body) : Result<Json>(unavailable(""));
    if (!j.ok() || !j->contains("transactions") || !(*j)["transactions"].is_array()) return -1;
    for (auto& t : (*j)["transactions"]) {
      std::string protocol = json_string(t, "protocol");
      if (protocol != "tcc" && protocol != "saga" && protocol != "msg") continue;
      if (json_string(t, "state") != state) continue;  // the list is live: it may have moved on
      ++n;
      if (some && some->size() < 200)
        *some += " " + json_string(t, "gid") + "(" + protocol + " " + state + ")";
    }
  }
  return n;
}

int64_t World::settle_ops(int64_t timeout_ms) {
  restart_dead();
  int64_t start = now_ms();
  bool clean = testing::eventually([&] { return unfinished_ops() == 0; }, timeout_ms);
  return clean ? now_ms() - start : -1;
}

int64_t World::barrier_rows() {
  int64_t n = 0;
  for (int i = 0; i < 2; ++i) {
    auto v = testing::query_value(pg_[i]->conninfo(), "SELECT count(*) FROM tpc_barrier");
    if (!v.ok()) return -1;
    n += std::stoll(v->value_or("0"));
  }
  return n;
}

int64_t World::open_transactions() {
  auto r = http_call(coordinator_url_, "GET", "/v1/status", "", 5'000);
  auto j =
      r.status.ok() && r.http_status == 200 ? parse_json(r.body) : Result<Json>(unavailable(""));
  if (!j.ok() || !j->contains("open_transactions") || !(*j)["open_transactions"].is_number())
    return -1;
  return (*j)["open_transactions"].get<int64_t>();
}

Violations World::check() {
  Violations v;
  std::string ci[2] = {pg_[0]->conninfo(), pg_[1]->conninfo()};
  // TCC and saga transactions must all have ended (the caller waited for it, bounded).
  std::string unfinished;
  int64_t ops = unfinished_ops(&unfinished);
  v.unfinished = ops != 0 ? static_cast<uint64_t>(std::max<int64_t>(ops, 1)) : 0;
  if (ops != 0)
    std::fprintf(stderr, "tpc-chaos: TCC/saga/msg transactions left unfinished:%s\n",
                 ops < 0 ? " (the coordinator does not answer)" : unfinished.c_str());
  // Barrier rows are purged once the coordinator reports their gid finished: give the agents a
  // few purge rounds after every transaction (of any protocol: an abandoned active one holds
  // finished_below back until its timeout) has ended.
  testing::eventually([&] { return open_transactions() == 0; }, 90'000);
  int64_t barriers = -1;
  testing::eventually([&] { return (barriers = barrier_rows()) == 0; }, 15'000);
  v.barrier = barriers != 0 ? static_cast<uint64_t>(std::max<int64_t>(barriers, 1)) : 0;
  if (barriers != 0) {
    for (int i = 0; i < 2; ++i) {
      auto rows = testing::query(
          ci[i], "SELECT gid, branch, op, written_by FROM tpc_barrier ORDER BY gid LIMIT 5");
      if (rows.ok())
        for (auto& r : *rows)
          std::fprintf(stderr, "tpc-chaos: bank%d barrier row left: %s %s %s (written by %s)\n", i,
                       r[0]->c_str(), r[1]->c_str(), r[2]->c_str(), r[3]->c_str());
    }
  }
  for (int i = 0; i < 2; ++i) {
    auto f = testing::query_value(ci[i], "SELECT count(*) FROM accounts WHERE frozen <> 0");
    int64_t n = f.ok() ? std::stoll(f->value_or("0")) : 1;
    v.frozen += static_cast<uint64_t>(n);
  }
  // bit 0: bank 0, bit 1: bank 1, bit 2: twice somewhere, bit 3: its credit went to the wallet
  std::map<std::string, int> present;
  for (int i = 0; i < 2; ++i) {
    auto rows =
        testing::query(ci[i], "SELECT gid, count(*), bool_or(to_wallet) FROM ledger GROUP BY gid");
    if (!rows.ok()) {
      std::fprintf(stderr, "tpc-chaos: cannot read the ledger: %s\n",
                   rows.status().to_string().c_str());
      v.leftover = 1;
      return v;
    }
    for (auto& r : *rows) {
      present[*r[0]] |= 1 << i;
      if (*r[1] != "1") present[*r[0]] |= 4;
      if (*r[2] == "t") present[*r[0]] |= 8;
    }
  }
  int64_t total = 0;
  for (int i = 0; i < 2; ++i) {
    auto t = testing::query_value(ci[i], "SELECT sum(balance) FROM accounts");
    total += t.ok() ? std::stoll(t->value_or("0")) : 0;
  }
  int64_t wallet = wallet_balance();
  v.wrong_total = wallet < 0 || total + wallet != 2 * kAccounts * kInitial + kWallet ? 1 : 0;
  if (v.wrong_total)
    std::fprintf(stderr, "tpc-chaos: banks hold %lld, the wallet %lld; expected %lld in all\n",
                 (long long)total, (long long)wallet,
                 (long long)(2 * kAccounts * kInitial + kWallet));
  // A transfer is whole when both banks have its row, or (to the wallet) exactly one has.
  auto whole = [](int bits) { return (bits & 8) ? (bits & 3) != 3 : (bits & 3) == 3; };
  for (auto& [gid, bits] : present) {
    if ((bits & 3) != 0 && !whole(bits)) ++v.mixed;
    if (bits & 4) ++v.duplicated;
  }
  std::map<std::string, std::string> outcomes;
  {
    std::lock_guard lock(outcomes_mu_);
    outcomes = outcomes_;
  }
  for (auto& [gid, seen] : outcomes) {
    int all = present.count(gid) ? present[gid] : 0;
    int bits = all & 3;
    if (seen == "committed" && !whole(all)) ++v.lost;
    if (seen == "aborted" && bits != 0) ++v.after_abort;
    if (seen == "unknown") {
      // The coordinator's final word must match the ledger.
      auto g = http_call(coordinator_url_, "GET", "/v1/transactions/" + gid, "", 5'000);
      auto j = parse_json(g.body);
      std::string state = j.ok() ? json_string(*j, "state") : "";
      if ((state == "committed" && !whole(all)) || (state == "aborted" && bits != 0)) ++v.mismatch;
    }
  }
  int64_t left = prepared_now(0) + prepared_now(1);
  v.leftover = left != 0 ? static_cast<uint64_t>(std::max<int64_t>(left, 1)) : 0;
  return v;
}

void World::print_times(const char* title, std::vector<int64_t> d) {
  if (d.empty()) {
    std::printf("%s: no branch was seen prepared by the sampler\n", title);
    return;
  }
  std::sort(d.begin(), d.end());
  auto pct = [&](double p) {
    return d[std::min(d.size() - 1, static_cast<size_t>(p * static_cast<double>(d.size())))];
  };
  std::printf(
      "%s: %zu branches seen prepared; time prepared p50 %lld ms, p99 %lld ms, max %lld ms\n",
      title, d.size(), (long long)pct(0.5), (long long)pct(0.99), (long long)d.back());
}

int World::fail_footer(const Violations& v) {
  if (v.sum() == 0) {
    std::printf("OK: 0 violations\n");
    return 0;
  }
  std::printf("FAILED: %s\nreproduce with: %s --keep\nlogs: %s\n", v.text().c_str(),
              opts_.argv_text.c_str(), dir_.c_str());
  return 1;
}

// --- the failpoint table -------------------------------------------------------------------

Status World::run_scenario(const Scenario& s, std::string* outcome) {
  using K = Scenario::Kind;
  std::lock_guard lock(proc_mu_);
  Process* p = process(s.target);
  switch (s.kind) {
    case K::failpoint: {
      std::string url =
          (s.target == Target::coordinator ? coordinator_url_
                                           : agent_urls_[s.target == Target::agent0 ? 0 : 1])
              .to_string();
      auto u = parse_url(url);
      auto r =
          http_call(*u, "POST", "/v1/failpoints", dump(Json{{"spec", s.name + "=1*crash"}}), 5'000);
      if (!r.status.ok() || r.http_status != 200)
        return unavailable("cannot arm " + s.name + ": " + r.body);
      bool fired = testing::eventually([&] { return !p->running(); }, 30'000);
      bool logged =
          read_file(p->log_path()).find("failpoint fired name=" + s.name) != std::string::npos;
      *outcome = fired && logged ? "fired" : fired ? "died" : "did not fire";
      (void)http_call(*u, "POST", "/v1/failpoints", R"({"spec":""})", 2'000);
      if (fired) TPC_RETURN_IF_ERROR(restart(s.target));
      return ok_status();
    }
    case K::recovery_failpoint: {
      // Decided transactions must be waiting at the crash: bank1 holds its commits for a
      // while, the coordinator is killed once some commit decision waits on them, and comes
      // back with the failpoint armed; the first transaction it re-drives to the end fires it.
      auto arm = [&](const std::string& spec) {
        return http_call(agent_urls_[1], "POST", "/v1/failpoints", dump(Json{{"spec", spec}}),
                         5'000);
      };
      (void)arm("agent.before_commit_prepared=sleep(3000)");
      bool waiting = testing::eventually(
          [&] {
            auto r = http_call(coordinator_url_, "GET", "/v1/in-doubt", "", 2'000);
            auto j = parse_json(r.body);
            if (!j.ok() || !j->contains("transactions") || !(*j)["transactions"].is_array())
              return false;
            for (auto& t : (*j)["transactions"])
              if (json_string(t, "decision") == "commit") return true;
            return false;
          },
          20'000);
      coordinator_->signal(SIGKILL);
      coordinator_->wait(10'000);
      (void)arm("");
      (void)start_coordinator(s.name +
                              "=1*crash");  // may die before it is healthy: that is the point
      bool fired = testing::eventually([&] { return !coordinator_->running(); }, 30'000);
      bool logged = read_file(coordinator_->log_path()).find("failpoint fired name=" + s.name) !=
                    std::string::npos;
      *outcome = !waiting          ? "nothing in doubt"
                 : fired && logged ? "fired"
                 : fired           ? "died"
                                   : "did not fire";
      if (fired) TPC_RETURN_IF_ERROR(restart(Target::coordinator));
      return ok_status();
    }
    case K::kill:
      sleep_ms(500 + static_cast<int64_t>(opts_.seed % 700));
      p->signal(SIGKILL);
      p->wait(10'000);
      *outcome = "killed";
      return restart(s.target);
    case K::stop:
      p->signal(SIGSTOP);
      sleep_ms(4'000);  // past the prepare timeout: the coordinator must abort or wait
      p->signal(SIGCONT);
      *outcome = "stopped 4 s";
      return ok_status();
    case K::pg_stop: {
      bool prepared = testing::eventually([&] { return prepared_now(1) > 0; }, 20'000);
      Status st = pg_[1]->stop(true);
      if (!st.ok()) return st;
      sleep_ms(1'000);
      *outcome =
          prepared ? "stopped with branches prepared" : "stopped (no prepared branch caught)";
      return pg_[1]->start();
    }
  }
  return ok_status();
}

int World::run_table() {
  struct Row {
    std::string name, protocol, outcome;
    Counts counts;
    int64_t quiesce_ms;
    int64_t max_prepared_ms;
    Violations v;
  };
  std::vector<Row> rows;
  for (const Scenario& s : scenarios()) {
    if (!opts_.only.empty() && !opts_.only.count(s.name)) continue;
    Counts before = counts();
    int64_t started = now_ms();
    start_load(s.protocol);
    sleep_ms(700);  // transfers in flight before the fault
    std::string outcome;
    Status st = run_scenario(s, &outcome);
    if (!st.ok()) outcome += " (" + st.to_string() + ")";
    sleep_ms(700);  // and after it
    stop_load();
    Row r;
    r.name = s.name;
    r.protocol = s.protocol;
    r.outcome = outcome;
    r.quiesce_ms = quiesce(120'000);
    if (r.quiesce_ms >= 0) {
      int64_t settled = settle_ops(120'000);
      r.quiesce_ms = settled < 0 ? -1 : r.quiesce_ms + settled;
    }
    Counts after = counts();
    r.counts = Counts{after.attempted - before.attempted, after.committed - before.committed,
                      after.aborted - before.aborted, after.unknown - before.unknown};
    auto d = prepared_durations(started);
    r.max_prepared_ms = d.empty() ? 0 : *std::max_element(d.begin(), d.end());
    r.v = check();
    std::printf(
        "%-50s %-4s %-32s attempted %4llu committed %4llu aborted %4llu unknown %3llu | "
        "resolved %6lld ms | longest prepared %6lld ms | violations %llu\n",
        r.name.c_str(), r.protocol.c_str(), r.outcome.c_str(),
        (unsigned long long)r.counts.attempted, (unsigned long long)r.counts.committed,
        (unsigned long long)r.counts.aborted, (unsigned long long)r.counts.unknown,
        (long long)r.quiesce_ms, (long long)r.max_prepared_ms, (unsigned long long)r.v.sum());
    std::fflush(stdout);
    rows.push_back(std::move(r));
    if (rows.back().quiesce_ms < 0) break;  // something is stuck: the footer says so
  }
  std::printf(
      "\n| fault | protocol | outcome | transfers (committed/aborted/unknown) | all prepared "
      "branches resolved after | longest-prepared branch | violations |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  bool all_fired = true;
  for (auto& r : rows) {
    all_fired =
        all_fired && r.outcome.rfind("did not fire", 0) != 0 && r.outcome.rfind("died", 0) != 0;
    std::printf("| %s | %s | %s | %llu (%llu/%llu/%llu) | %lld ms | %lld ms | %llu |\n",
                r.name.c_str(), r.protocol.c_str(), r.outcome.c_str(),
                (unsigned long long)r.counts.attempted, (unsigned long long)r.counts.committed,
                (unsigned long long)r.counts.aborted, (unsigned long long)r.counts.unknown,
                (long long)r.quiesce_ms, (long long)r.max_prepared_ms,
                (unsigned long long)r.v.sum());
  }
  print_times("\nin-doubt resolution", prepared_durations(0));
  Violations v = check();
  std::printf("violations: %s\n", v.text().c_str());
  if (!all_fired) {
    std::printf("FAILED: a failpoint did not fire as it should\nreproduce with: %s --keep\n",
                opts_.argv_text.c_str());
    return 1;
  }
  return fail_footer(v);
}

// --- the random chaos run ------------------------------------------------------------------

struct RandomFailpoint {
  Target target;
  std::string name;
  std::string protocols;  // the loads that can reach it, space-separated
};

const std::vector<RandomFailpoint> kRandomFailpoints = {
    {Target::coordinator, "coord.after_first_prepare_sent", "2pc 3pc"},
    {Target::coordinator, "coord.before_decision_log", "2pc 3pc tcc saga msg"},
    {Target::coordinator, "coord.after_decision_log", "2pc 3pc"},
    {Target::coordinator, "coord.after_first_branch_committed", "2pc 3pc"},
    {Target::coordinator, "coord.before_end_record", "2pc 3pc tcc saga msg"},
    {Target::coordinator, "coord.after_precommit_logged", "3pc"},
    {Target::coordinator, "coord.after_first_precommit_sent", "3pc"},
    {Target::coordinator, "coord.after_try_registered", "tcc"},
    {Target::coordinator, "coord.after_confirm_logged", "tcc"},
    {Target::coordinator, "coord.after_first_confirm", "tcc"},
    {Target::coordinator, "coord.after_saga_logged", "saga"},
    {Target::coordinator, "coord.after_compensate_logged", "saga"},
    {Target::coordinator, "coord.after_first_step_done", "saga"},
    {Target::coordinator, "coord.after_half_logged", "msg"},
    {Target::coordinator, "coord.after_msg_commit_logged", "msg"},
    {Target::coordinator, "coord.after_first_delivery", "msg"},
    {Target::agent0, "agent.before_prepare", "2pc 3pc"},
    {Target::agent1, "agent.after_prepare", "2pc 3pc"},
    {Target::agent0, "agent.before_commit_prepared", "2pc 3pc"},
    {Target::agent1, "agent.after_commit_prepared", "2pc 3pc"},
    {Target::agent0, "agent.during_scan", "2pc 3pc"},
    {Target::agent0, "agent.before_step", "tcc saga msg"},
    {Target::agent1, "agent.after_step", "tcc saga msg"},
};

void World::inject_random(std::mt19937_64& rng) {
  std::vector<std::string> kinds(opts_.faults.begin(), opts_.faults.end());
  std::string kind = kinds[rng() % kinds.size()];
  std::lock_guard lock(proc_mu_);
  std::string what;
  Target targets[3] = {Target::coordinator, Target::agent0, Target::agent1};
  if (kind == "kill") {
    Target t = targets[rng() % 3];
    process(t)->signal(SIGKILL);
    process(t)->wait(10'000);
    what = t == Target::coordinator ? "kill_coordinator" : "kill_agent";
    sleep_ms(static_cast<int64_t>(rng() % 1000));
  } else if (kind == "stop") {
    Target t = targets[rng() % 3];
    process(t)->signal(SIGSTOP);
    sleep_ms(500 + static_cast<int64_t>(rng() % 3500));
    process(t)->signal(SIGCONT);
    what = t == Target::coordinator ? "sigstop_coordinator" : "sigstop_agent";
  } else if (kind == "pg") {
    int bank = static_cast<int>(rng() % 2);
    (void)pg_[bank]->stop(true);
    sleep_ms(static_cast<int64_t>(rng() % 1000));
    Status st = pg_[bank]->start();
    if (!st.ok())
      std::fprintf(stderr, "tpc-chaos: cannot restart PostgreSQL: %s\n", st.to_string().c_str());
    what = "pg_immediate_stop";
  } else if (kind == "http") {
    // The wallet misbehaves for its next few calls: refuses, answers twice, late, or never.
    static const char* kModes[] = {"unavailable", "twice", "late", "hang", "fail"};
    std::string mode = kModes[rng() % 5];
    static const char* kPaths[] = {"/saga/action",    "/saga/action",        "/saga/compensate",
                                   "/tcc/credit/try", "/tcc/credit/confirm", "/tcc/credit/cancel"};
    Json rule = {{"path", kPaths[rng() % 6]},
                 {"mode", mode},
                 {"count", 1 + static_cast<int64_t>(rng() % 4)}};
    if (mode == "late" || mode == "hang")
      rule["delay_ms"] = 200 + static_cast<int64_t>(rng() % 6000);
    if (mode == "unavailable" && rng() % 2 == 0) rule["retry_after_s"] = 1;
    (void)http_call(wallet_url_, "POST", "/control/faults",
                    dump(Json{{"rules", Json::array({rule})}}), 2'000);
    what = "http_" + mode;
  } else if (kind == "failpoint") {
    std::vector<const RandomFailpoint*> usable;
    for (auto& f : kRandomFailpoints)
      if (opts_.protocol == "mix" ||
          (" " + f.protocols + " ").find(" " + opts_.protocol + " ") != std::string::npos)
        usable.push_back(&f);
    const RandomFailpoint& f = *usable[rng() % usable.size()];
    Target t = f.target;
    const std::string& name = f.name;
    Url url =
        t == Target::coordinator ? coordinator_url_ : agent_urls_[t == Target::agent0 ? 0 : 1];
    (void)http_call(url, "POST", "/v1/failpoints", dump(Json{{"spec", name + "=1*crash"}}), 2'000);
    what = "failpoint";
  }
  std::lock_guard flock(faults_mu_);
  ++faults_[what];
}

void World::fault_loop(uint64_t seed) {
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ULL);
  while (!load_stop_) {
    int64_t wait = 500 + static_cast<int64_t>(rng() % 2500);
    for (int64_t t = 0; t < wait && !load_stop_; t += 50) sleep_ms(50);
    if (load_stop_) break;
    inject_random(rng);
  }
}

int World::run_chaos() {
  start_load(opts_.protocol);
  std::thread faults;
  if (!opts_.faults.empty()) faults = std::thread([this] { fault_loop(opts_.seed); });
  int64_t end = now_ms() + opts_.seconds * 1000LL;
  // Dead processes (killed, or a failpoint fired) are restarted from this thread only: the
  // harness spawns them with PR_SET_PDEATHSIG, so a process started by the fault thread would
  // be killed when that thread ends, an extra crash at the end of every run.
  while (now_ms() < end) {
    sleep_ms(50);
    restart_dead();
  }
  load_stop_ = true;
  if (faults.joinable()) faults.join();
  stop_load();
  // Disarm anything still armed, then let every in-doubt branch resolve.
  for (const Url& u : {coordinator_url_, agent_urls_[0], agent_urls_[1]})
    (void)http_call(u, "POST", "/v1/failpoints", R"({"spec":""})", 2'000);
  int64_t quiesce_ms = quiesce(120'000);
  int64_t settle_ms = settle_ops(120'000);
  Violations v = check();

  std::printf("\n== chaos scorecard (seed %llu, %d s, %d clients, %s) ==\n",
              (unsigned long long)opts_.seed, opts_.seconds, opts_.clients, opts_.protocol.c_str());
  Counts c = counts();
  std::printf(
      "transfers: attempted %llu, committed %llu, aborted %llu, outcome unknown to the client "
      "%llu (sagas and messages whose answer and gid were lost: %llu), begin refused %llu\n",
      (unsigned long long)c.attempted, (unsigned long long)c.committed,
      (unsigned long long)c.aborted, (unsigned long long)c.unknown,
      (unsigned long long)run_no_gid_.load(), (unsigned long long)begin_failed_.load());
  if (to_wallet_ > 0)
    std::printf(
        "TCC transfers, sagas and messages crediting the wallet over HTTP: %llu; its balance went "
        "from %lld "
        "to %lld\n",
        (unsigned long long)to_wallet_.load(), (long long)kWallet, (long long)wallet_balance());
  std::printf("faults injected:");
  uint64_t n = 0;
  for (auto& [k, cnt] : faults_) {
    std::printf(" %s=%llu", k.c_str(), (unsigned long long)cnt);
    n += cnt;
  }
  std::printf(" (total %llu)\n", (unsigned long long)n);
  std::printf("not committed, by reason:");
  for (auto& [k, cnt] : reasons_) std::printf(" [%s]=%llu", k.c_str(), (unsigned long long)cnt);
  std::printf("\n");
  print_times("in-doubt resolution", prepared_durations(0));
  std::printf("after the load stopped, every prepared branch was resolved within %lld ms\n",
              (long long)quiesce_ms);
  std::printf("then every TCC, saga and msg transaction had ended within %lld ms\n",
              (long long)settle_ms);
  std::printf("violations: %s\n", v.text().c_str());
  return fail_footer(v);
}

}  // namespace
}  // namespace tpc::chaos

int main(int argc, char** argv) {
  using namespace tpc;
  std::vector<OptionSpec> specs = {
      {"table", "run every failpoint and external fault once, one row each", "", false, true},
      {"only", "with --table: only these faults (comma-separated names)", ""},
      {"chaos", "random faults for the whole run (the default)", "", false, true},
      {"seed", "random seed", ""},
      {"seconds", "length of the chaos run", "60"},
      {"minutes", "length of the chaos run, in minutes", ""},
      {"clients", "concurrent transfer clients", "8"},
      {"protocol", "2pc, 3pc, tcc, saga, msg or mix (all five)", "2pc"},
      {"faults", "comma-separated: kill,stop,pg,failpoint,http (the wallet misbehaves)",
       "kill,stop,pg,failpoint,http"},
      {"no-faults", "run the load without faults", "", false, true},
      {"keep", "keep the clusters and logs", "", false, true},
      {"help", "print this help", "", false, true},
  };
  add_version_option(&specs);
  auto parsed = parse_command_line("tpc-chaos",
                                   "tpc-chaos [--table [--only NAME,...] | --chaos] [options]",
                                   specs, argc, argv);
  if (auto* code = std::get_if<int>(&parsed)) return *code;
  Config* c = &std::get<Config>(parsed);
  auto die = [](const std::string& m) { return fail("tpc-chaos", m, 2); };
  chaos::Options o;
  o.table = c->flag("table");
  if (c->get("seed").empty()) {
    o.seed = static_cast<uint64_t>(std::random_device{}());
  } else {
    auto seed = c->get_int("seed", 0, INT64_MAX);
    if (!seed.ok()) return die(seed.status().message());
    o.seed = static_cast<uint64_t>(*seed);
  }
  auto secs = c->get_int("seconds", 1, 86'400);
  auto clients = c->get_int("clients", 1, 256);
  if (!secs.ok()) return die(secs.status().message());
  if (!clients.ok()) return die(clients.status().message());
  o.seconds = static_cast<int>(*secs);
  if (c->has("minutes")) {
    auto m = c->get_int("minutes", 1, 1'440);
    if (!m.ok()) return die(m.status().message());
    o.seconds = static_cast<int>(*m) * 60;
  }
  o.clients = static_cast<int>(*clients);
  o.protocol = c->get("protocol");
  if (o.protocol != "2pc" && o.protocol != "3pc" && o.protocol != "tcc" && o.protocol != "saga" &&
      o.protocol != "msg" && o.protocol != "mix")
    return die("--protocol must be 2pc, 3pc, tcc, saga, msg or mix");
  o.faults.clear();
  auto split = [](const std::string& text) {
    std::vector<std::string> out;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, ','))
      if (!item.empty()) out.push_back(item);
    return out;
  };
  if (!c->flag("no-faults"))
    for (auto& f : split(c->get("faults"))) {
      if (f != "kill" && f != "stop" && f != "pg" && f != "failpoint" && f != "http")
        return die("unknown fault \"" + f + "\"");
      o.faults.insert(f);
    }
  for (auto& name : split(c->get("only"))) {
    bool known = std::any_of(chaos::scenarios().begin(), chaos::scenarios().end(),
                             [&](const chaos::Scenario& s) { return s.name == name; });
    if (!known) return die("--only: no fault named \"" + name + "\" in the table");
    o.only.insert(name);
  }
  o.keep = c->flag("keep");
  o.argv_text = "tpc-chaos";
  if (o.table) {
    o.argv_text +=
        " --table --seed " + std::to_string(o.seed) + " --clients " + std::to_string(o.clients);
    if (!c->get("only").empty()) o.argv_text += " --only " + c->get("only");
  } else {
    o.argv_text += " --chaos --seed " + std::to_string(o.seed) + " --seconds " +
                   std::to_string(o.seconds) + " --clients " + std::to_string(o.clients) +
                   " --protocol " + o.protocol;
    if (c->flag("no-faults"))
      o.argv_text += " --no-faults";
    else
      o.argv_text += " --faults " + c->get("faults");
  }
  chaos::World w(o);
  Status st = w.setup();
  if (!st.ok()) return die("setup failed: " + st.to_string());
  int rc = o.table ? w.run_table() : w.run_chaos();
  w.teardown();
  return rc;
}
