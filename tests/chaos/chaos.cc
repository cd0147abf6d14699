// tpc-chaos: concurrent transfers between two real PostgreSQL databases while faults drawn
// from a seed hit every process, then a scorecard of what must never happen.
//
//   tpc-chaos [--seed S] [--seconds N] [--clients C] [--protocol 2pc|3pc|mix] [--no-faults]
//             [--faults kill,stop,pg,failpoint] [--keep]
//
// Each transfer moves money from one bank's account to the other bank's account in one global
// transaction, and writes a ledger row tagged with the gid on each side. Afterwards, for every
// gid, the ledger rows of the two banks must be both present or both absent (no mixed outcome),
// a transfer the client was told is committed must be present (no lost commit), one told
// aborted must be absent, the total must be unchanged, and nothing of ours may stay prepared.
// Exit code 0 only when every violation count is 0.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "common/config.h"
#include "common/http_client.h"
#include "common/json.h"
#include "tests/harness/harness.h"

extern char** environ;

namespace tpc::chaos {
namespace {

using testing::PgCluster;
using testing::Process;

constexpr int kAccounts = 20;
constexpr int64_t kInitial = 10'000;

struct Options {
  uint64_t seed = 1;
  int seconds = 60;
  int clients = 8;
  std::string protocol = "2pc";
  std::set<std::string> faults = {"kill", "stop", "pg", "failpoint"};
  bool keep = false;
};

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void sleep_ms(int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// The failpoints a chaos run may arm, with the process they belong to.
const std::vector<std::pair<std::string, std::string>> kFailpoints = {
    {"coordinator", "coord.before_decision_log"},
    {"coordinator", "coord.after_decision_log"},
    {"agent", "agent.before_prepare"},
    {"agent", "agent.after_prepare"},
    {"agent", "agent.before_commit_prepared"},
    {"agent", "agent.after_commit_prepared"},
};

class World {
 public:
  explicit World(Options o) : opts_(std::move(o)), rng_(opts_.seed) {}

  Status setup();
  void run();
  int report();
  void teardown();

 private:
  Status start_coordinator(const std::string& failpoints);
  Status start_agent(int i, const std::string& failpoints);
  Status wait_healthy(Process& p, const Url& url, int64_t timeout_ms);
  void client_loop(int id);
  void note_failure(const std::string& step, const HttpResult& r);
  void fault_loop();
  void inject(std::mt19937_64& rng);
  void restart_dead();
  std::string fresh_log(const std::string& name);
  HttpResult call(const Url& url, const std::string& method, const std::string& target,
                  const std::string& body, int64_t timeout_ms = 10'000);

  Options opts_;
  std::mt19937_64 rng_;
  std::string dir_;
  std::unique_ptr<PgCluster> pg_[2];
  std::mutex proc_mu_;  // guards the processes
  std::unique_ptr<Process> coordinator_;
  std::unique_ptr<Process> agents_[2];
  Url coordinator_url_;
  Url agent_urls_[2];
  int log_serial_ = 0;
  std::atomic<bool> stop_{false};

  // What the clients saw, per gid.
  std::mutex outcomes_mu_;
  std::map<std::string, std::string> outcomes_;  // committed | aborted | unknown
  std::atomic<uint64_t> attempted_{0}, committed_{0}, aborted_{0}, unknown_{0}, begin_failed_{0};
  std::map<std::string, uint64_t> faults_;
  std::mutex faults_mu_;
  std::vector<int64_t> resolve_ms_;
  std::mutex reasons_mu_;
  std::map<std::string, uint64_t> reasons_;  // why transfers did not commit
};

void World::note_failure(const std::string& step, const HttpResult& r) {
  std::string why;
  if (!r.status.ok()) {
    why = step + ": " + std::string(code_name(r.status.code()));
  } else {
    why = step + ": HTTP " + std::to_string(r.http_status);
    auto j = parse_json(r.body);
    if (j.ok() && j->is_object() && j->contains("reason") && (*j)["reason"].is_string()) {
      why += " " + (*j)["reason"].get<std::string>();
    } else if (j.ok() && j->is_object()) {
      if (j->contains("error") && (*j)["error"].is_object()) {
        const Json& e = (*j)["error"];
        if (e.contains("sqlstate") && e["sqlstate"].is_string()) why += " " + e["sqlstate"].get<std::string>();
        else if (e.contains("message") && e["message"].is_string())
          why += " " + e["message"].get<std::string>().substr(0, 40);
      }
    }
  }
  std::lock_guard lock(reasons_mu_);
  ++reasons_[why];
}

std::string World::fresh_log(const std::string& name) {
  return dir_ + "/" + name + "-" + std::to_string(++log_serial_) + ".log";
}

HttpResult World::call(const Url& url, const std::string& method, const std::string& target,
                       const std::string& body, int64_t timeout_ms) {
  return http_call(url, method, target, body, timeout_ms);
}

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
  std::vector<std::string> argv = {testing::bin_dir() + "/tpc-coordinator",
                                   "--listen", "127.0.0.1:" + std::to_string(coordinator_url_.port),
                                   "--data-dir", dir_ + "/decision-log",
                                   "--prepare-timeout-ms", "3000",
                                   "--commit-wait-ms", "5000",
                                   "--retry-min-ms", "20", "--retry-max-ms", "1000",
                                   "--recovery-wait-ms", "5000"};
  std::vector<std::string> env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p = Process::spawn(argv, fresh_log("coordinator"), env);
  if (!p.ok()) return p.status();
  coordinator_ = std::move(*p);
  return wait_healthy(*coordinator_, coordinator_url_, 30'000);
}

Status World::start_agent(int i, const std::string& failpoints) {
  std::vector<std::string> argv = {testing::bin_dir() + "/tpc-agent",
                                   "--listen", "127.0.0.1:" + std::to_string(agent_urls_[i].port),
                                   "--name", "bank" + std::to_string(i),
                                   "--pg", pg_[i]->conninfo(),
                                   "--coordinator", "c1=" + coordinator_url_.to_string(),
                                   "--in-doubt-after-ms", "1000",
                                   "--scan-interval-ms", "1000",
                                   "--lock-timeout-ms", "2000"};
  std::vector<std::string> env;
  if (!failpoints.empty()) env.push_back("FAILPOINTS=" + failpoints);
  auto p = Process::spawn(argv, fresh_log("agent" + std::to_string(i)), env);
  if (!p.ok()) return p.status();
  agents_[i] = std::move(*p);
  return wait_healthy(*agents_[i], agent_urls_[i], 30'000);
}

Status World::setup() {
  dir_ = testing::make_temp_dir("tpc-chaos");
  for (int i = 0; i < 2; ++i) {
    auto c = PgCluster::create();
    if (!c.ok()) return c.status();
    pg_[i] = std::move(*c);
    auto r = testing::query(pg_[i]->conninfo(),
                            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);"
                            "CREATE TABLE ledger (gid text NOT NULL, account int NOT NULL, amount bigint NOT NULL);"
                            "INSERT INTO accounts SELECT g, " + std::to_string(kInitial) +
                                " FROM generate_series(1, " + std::to_string(kAccounts) + ") g;");
    if (!r.ok()) return r.status();
  }
  coordinator_url_.host = "127.0.0.1";
  coordinator_url_.port = testing::free_port();
  for (int i = 0; i < 2; ++i) {
    agent_urls_[i].host = "127.0.0.1";
    agent_urls_[i].port = testing::free_port();
  }
  TPC_RETURN_IF_ERROR(start_coordinator(""));
  for (int i = 0; i < 2; ++i) TPC_RETURN_IF_ERROR(start_agent(i, ""));
  std::printf("chaos: seed=%llu seconds=%d clients=%d protocol=%s dir=%s\n",
              static_cast<unsigned long long>(opts_.seed), opts_.seconds, opts_.clients,
              opts_.protocol.c_str(), dir_.c_str());
  std::fflush(stdout);
  return ok_status();
}

void World::client_loop(int id) {
  std::mt19937_64 rng(opts_.seed * 1000 + static_cast<uint64_t>(id));
  while (!stop_) {
    std::string protocol = opts_.protocol;
    if (protocol == "mix") protocol = rng() % 2 ? "2pc" : "3pc";
    auto b = call(coordinator_url_, "POST", "/v1/transactions", dump(Json{{"protocol", protocol}}), 5'000);
    if (!b.status.ok() || b.http_status != 201) {
      ++begin_failed_;
      sleep_ms(50);
      continue;
    }
    auto j = parse_json(b.body);
    if (!j.ok() || !j->contains("gid")) continue;
    std::string gid = (*j)["gid"];
    ++attempted_;
    {
      std::lock_guard lock(outcomes_mu_);
      outcomes_[gid] = "unknown";
    }
    int from_bank = static_cast<int>(rng() % 2);
    int to_bank = 1 - from_bank;
    int from = static_cast<int>(rng() % kAccounts) + 1, to = static_cast<int>(rng() % kAccounts) + 1;
    int64_t amount = static_cast<int64_t>(rng() % 50) + 1;
    auto leg = [&](int bank, int account, int64_t delta) {
      Json body = {{"statements",
                    Json::array({Json{{"sql", "UPDATE accounts SET balance = balance + $1 WHERE id = $2"},
                                      {"params", Json::array({delta, account})}},
                                 Json{{"sql", "INSERT INTO ledger (gid, account, amount) VALUES ($1, $2, $3)"},
                                      {"params", Json::array({gid, account, delta})}}})}};
      return call(agent_urls_[bank], "POST", "/v1/branches/" + gid + "/exec", dump(body), 10'000);
    };
    bool ok = true;
    // Half the transfers touch the banks in the opposite order: distributed deadlocks happen.
    bool reversed = rng() % 2;
    for (int k = 0; k < 2 && ok; ++k) {
      bool debit = (k == 0) != reversed;
      auto r = debit ? leg(from_bank, from, -amount) : leg(to_bank, to, amount);
      ok = r.status.ok() && r.http_status == 200;
      if (!ok) note_failure("exec", r);
    }
    std::string outcome = "unknown";
    if (!ok) {
      sleep_ms(static_cast<int64_t>(rng() % 20));  // a failing client backs off a little
      auto a = call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/abort", "", 10'000);
      if (a.status.ok() && a.http_status == 200) outcome = "aborted";
    } else {
      auto c = call(coordinator_url_, "POST", "/v1/transactions/" + gid + "/commit", "", 15'000);
      if (!(c.status.ok() && c.http_status == 200)) note_failure("commit", c);
      if (c.status.ok()) {
        auto cj = parse_json(c.body);
        std::string state = cj.ok() && cj->is_object() && cj->contains("state") && (*cj)["state"].is_string()
                                ? (*cj)["state"].get<std::string>()
                                : "";
        if (c.http_status == 200 && state == "committed") outcome = "committed";
        if (c.http_status == 409 && state == "aborted") outcome = "aborted";
      }
    }
    if (outcome == "committed") ++committed_;
    else if (outcome == "aborted") ++aborted_;
    else ++unknown_;
    std::lock_guard lock(outcomes_mu_);
    outcomes_[gid] = outcome;
  }
}

void World::inject(std::mt19937_64& rng) {
  std::vector<std::string> kinds(opts_.faults.begin(), opts_.faults.end());
  std::string kind = kinds[rng() % kinds.size()];
  std::lock_guard lock(proc_mu_);
  std::string what;
  if (kind == "kill") {
    int target = static_cast<int>(rng() % 3);
    Process* p = target == 0 ? coordinator_.get() : agents_[target - 1].get();
    p->signal(SIGKILL);
    p->wait(10'000);
    what = target == 0 ? "kill_coordinator" : "kill_agent";
    sleep_ms(static_cast<int64_t>(rng() % 1000));
  } else if (kind == "stop") {
    int target = static_cast<int>(rng() % 3);
    Process* p = target == 0 ? coordinator_.get() : agents_[target - 1].get();
    p->signal(SIGSTOP);
    sleep_ms(500 + static_cast<int64_t>(rng() % 3000));
    p->signal(SIGCONT);
    what = target == 0 ? "sigstop_coordinator" : "sigstop_agent";
  } else if (kind == "pg") {
    int bank = static_cast<int>(rng() % 2);
    (void)pg_[bank]->stop(true);
    sleep_ms(static_cast<int64_t>(rng() % 1000));
    Status st = pg_[bank]->start();
    if (!st.ok()) std::fprintf(stderr, "chaos: cannot restart PostgreSQL: %s\n", st.to_string().c_str());
    what = "pg_immediate_stop";
  } else if (kind == "failpoint") {
    auto& [proc, name] = kFailpoints[rng() % kFailpoints.size()];
    std::string spec = name + "=1*crash";
    if (proc == "coordinator") {
      coordinator_->signal(SIGKILL);
      coordinator_->wait(10'000);
      (void)start_coordinator(spec);
    } else {
      int i = static_cast<int>(rng() % 2);
      agents_[i]->signal(SIGKILL);
      agents_[i]->wait(10'000);
      (void)start_agent(i, spec);
    }
    what = "failpoint " + name;
  }
  std::lock_guard flock(faults_mu_);
  ++faults_[what];
}

void World::restart_dead() {
  std::lock_guard lock(proc_mu_);
  for (int i = 0; i < 2; ++i)
    if (!pg_[i]->running()) (void)pg_[i]->start();
  if (!coordinator_->running()) (void)start_coordinator("");
  for (int i = 0; i < 2; ++i)
    if (!agents_[i]->running()) (void)start_agent(i, "");
}

void World::fault_loop() {
  std::mt19937_64 rng(opts_.seed ^ 0x9e3779b97f4a7c15ULL);
  while (!stop_) {
    int64_t wait = 500 + static_cast<int64_t>(rng() % 2500);
    for (int64_t t = 0; t < wait && !stop_; t += 50) {
      sleep_ms(50);
      restart_dead();  // a failpoint may have killed a process meanwhile
    }
    if (stop_) break;
    inject(rng);
    restart_dead();
  }
}

void World::run() {
  std::vector<std::thread> threads;
  for (int i = 0; i < opts_.clients; ++i) threads.emplace_back([this, i] { client_loop(i); });
  std::thread faults;
  if (!opts_.faults.empty()) faults = std::thread([this] { fault_loop(); });
  int64_t end = now_ms() + opts_.seconds * 1000LL;
  while (now_ms() < end) {
    sleep_ms(200);
    if (opts_.faults.empty()) restart_dead();
  }
  stop_ = true;
  if (faults.joinable()) faults.join();
  for (auto& t : threads) t.join();
  restart_dead();
}

int World::report() {
  // Quiesce: everything runs again; wait for every in-doubt branch to resolve.
  std::string ci[2] = {pg_[0]->conninfo(), pg_[1]->conninfo()};
  auto prepared = [&](int i) {
    auto v = testing::query_value(ci[i], "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'tpc:%'");
    return v.ok() ? std::stoll(v->value_or("0")) : -1;
  };
  int64_t quiesce_start = now_ms();
  bool clean = testing::eventually([&] { return prepared(0) == 0 && prepared(1) == 0; }, 120'000);
  int64_t quiesce_ms = now_ms() - quiesce_start;

  // Ledger per gid and bank.
  std::map<std::string, int> present;  // bit 0: bank 0, bit 1: bank 1
  for (int i = 0; i < 2; ++i) {
    auto rows = testing::query(ci[i], "SELECT gid, count(*) FROM ledger GROUP BY gid");
    if (!rows.ok()) {
      std::fprintf(stderr, "chaos: cannot read the ledger: %s\n", rows.status().to_string().c_str());
      return 2;
    }
    for (auto& r : *rows) {
      present[*r[0]] |= 1 << i;
      if (*r[1] != "1") present[*r[0]] |= 4;  // duplicated
    }
  }
  int64_t total = 0;
  for (int i = 0; i < 2; ++i) {
    auto v = testing::query_value(ci[i], "SELECT sum(balance) FROM accounts");
    total += v.ok() ? std::stoll(v->value_or("0")) : 0;
  }
  uint64_t mixed = 0, lost = 0, after_abort = 0, duplicated = 0, unknown_resolved_commit = 0,
           unknown_resolved_abort = 0, outcome_mismatch = 0;
  std::map<std::string, std::string> outcomes;
  {
    std::lock_guard lock(outcomes_mu_);
    outcomes = outcomes_;
  }
  for (auto& [gid, bits] : present) {
    if ((bits & 3) == 1 || (bits & 3) == 2) ++mixed;
    if (bits & 4) ++duplicated;
  }
  for (auto& [gid, seen] : outcomes) {
    int bits = present.count(gid) ? present[gid] & 3 : 0;
    if (seen == "committed" && bits != 3) ++lost;
    if (seen == "aborted" && bits != 0) ++after_abort;
    if (seen == "unknown") {
      // The coordinator's final word must match the ledger.
      auto g = http_call(coordinator_url_, "GET", "/v1/transactions/" + gid, "", 5'000);
      auto j = parse_json(g.body);
      std::string state = j.ok() && j->is_object() && j->contains("state") && (*j)["state"].is_string()
                              ? (*j)["state"].get<std::string>() : "";
      if (state == "committed") {
        ++unknown_resolved_commit;
        if (bits != 3) ++outcome_mismatch;
      } else if (state == "aborted") {
        ++unknown_resolved_abort;
        if (bits != 0) ++outcome_mismatch;
      }
    }
  }
  uint64_t wrong_total = total != 2 * kAccounts * kInitial ? 1 : 0;
  uint64_t leftover = clean ? 0 : static_cast<uint64_t>(std::max<int64_t>(0, prepared(0)) + std::max<int64_t>(0, prepared(1)));

  std::printf("\n== chaos scorecard (seed %llu, %d s, %d clients, %s) ==\n",
              static_cast<unsigned long long>(opts_.seed), opts_.seconds, opts_.clients, opts_.protocol.c_str());
  std::printf("transfers: attempted %llu, committed %llu, aborted %llu, unknown to the client %llu "
              "(later committed %llu, aborted %llu), begin refused %llu\n",
              (unsigned long long)attempted_.load(), (unsigned long long)committed_.load(),
              (unsigned long long)aborted_.load(), (unsigned long long)unknown_.load(),
              (unsigned long long)unknown_resolved_commit, (unsigned long long)unknown_resolved_abort,
              (unsigned long long)begin_failed_.load());
  std::printf("faults injected:");
  uint64_t nfaults = 0;
  for (auto& [k, v] : faults_) {
    std::printf(" %s=%llu", k.c_str(), (unsigned long long)v);
    nfaults += v;
  }
  std::printf(" (total %llu)\n", (unsigned long long)nfaults);
  std::printf("not committed, by reason:");
  for (auto& [k, v] : reasons_) std::printf(" [%s]=%llu", k.c_str(), (unsigned long long)v);
  std::printf("\n");
  std::printf("quiesce: every prepared branch resolved %.1f s after the load stopped\n", quiesce_ms / 1000.0);
  std::printf("violations: mixed_outcome=%llu wrong_total=%llu lost_commit=%llu commit_after_abort=%llu "
              "duplicated_commit=%llu outcome_mismatch=%llu leftover_prepared=%llu\n",
              (unsigned long long)mixed, (unsigned long long)wrong_total, (unsigned long long)lost,
              (unsigned long long)after_abort, (unsigned long long)duplicated,
              (unsigned long long)outcome_mismatch, (unsigned long long)leftover);
  uint64_t violations = mixed + wrong_total + lost + after_abort + duplicated + outcome_mismatch + leftover;
  if (violations > 0) {
    std::printf("FAILED: reproduce with: tpc-chaos --seed %llu --seconds %d --clients %d --protocol %s --keep\n",
                (unsigned long long)opts_.seed, opts_.seconds, opts_.clients, opts_.protocol.c_str());
    std::printf("logs: %s\n", dir_.c_str());
    return 1;
  }
  std::printf("OK: 0 violations\n");
  return 0;
}

void World::teardown() {
  stop_ = true;
  std::lock_guard lock(proc_mu_);
  coordinator_.reset();
  for (auto& a : agents_) a.reset();
  if (!opts_.keep) {
    for (auto& p : pg_) p.reset();
    testing::remove_tree(dir_);
  }
}

}  // namespace
}  // namespace tpc::chaos

int main(int argc, char** argv) {
  using namespace tpc;
  std::vector<OptionSpec> specs = {
      {"seed", "random seed", ""},
      {"seconds", "length of the run", "60"},
      {"clients", "concurrent transfer clients", "8"},
      {"protocol", "2pc, 3pc or mix", "2pc"},
      {"faults", "comma-separated: kill,stop,pg,failpoint", "kill,stop,pg,failpoint"},
      {"no-faults", "run the load without faults", "", false, true},
      {"keep", "keep the clusters and logs", "", false, true},
  };
  auto c = Config::parse(specs, argc, argv, nullptr);
  if (!c.ok()) {
    std::fprintf(stderr, "tpc-chaos: %s\n", c.status().message().c_str());
    return 2;
  }
  chaos::Options o;
  o.seed = c->get("seed").empty() ? static_cast<uint64_t>(std::random_device{}()) : std::stoull(c->get("seed"));
  auto secs = c->get_int("seconds", 1, 86'400);
  auto clients = c->get_int("clients", 1, 256);
  if (!secs.ok() || !clients.ok()) {
    std::fprintf(stderr, "tpc-chaos: %s\n", (!secs.ok() ? secs.status() : clients.status()).message().c_str());
    return 2;
  }
  o.seconds = static_cast<int>(*secs);
  o.clients = static_cast<int>(*clients);
  o.protocol = c->get("protocol");
  if (o.protocol != "2pc" && o.protocol != "3pc" && o.protocol != "mix") {
    std::fprintf(stderr, "tpc-chaos: --protocol must be 2pc, 3pc or mix\n");
    return 2;
  }
  o.faults.clear();
  if (!c->flag("no-faults")) {
    std::string f = c->get("faults");
    size_t pos = 0;
    while (pos <= f.size()) {
      size_t comma = f.find(',', pos);
      std::string item = f.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
      if (item == "kill" || item == "stop" || item == "pg" || item == "failpoint") o.faults.insert(item);
      else if (!item.empty()) {
        std::fprintf(stderr, "tpc-chaos: unknown fault \"%s\"\n", item.c_str());
        return 2;
      }
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  }
  o.keep = c->flag("keep");
  chaos::World w(o);
  Status st = w.setup();
  if (!st.ok()) {
    std::fprintf(stderr, "tpc-chaos: setup failed: %s\n", st.to_string().c_str());
    return 2;
  }
  w.run();
  int rc = w.report();
  w.teardown();
  return rc;
}
