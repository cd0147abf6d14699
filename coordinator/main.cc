// tpc-coordinator: the transaction coordinator service. Command line: docs/DESIGN.md §2.
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <future>
#include <iostream>

#include "common/cli.h"
#include "common/config.h"
#include "common/ids.h"
#include "coordinator/service.h"
#include "wal/decision_log.h"

extern char** environ;

namespace {

constexpr char kProgram[] = "tpc-coordinator";

std::vector<tpc::OptionSpec> specs() {
  std::vector<tpc::OptionSpec> s = {
      {"listen", "HOST:PORT to serve the API on", "127.0.0.1:7400"},
      {"data-dir", "directory of the decision log (created if missing)", ""},
      {"id", "coordinator id, the prefix of every gid ([A-Za-z0-9_]{1,32})", "c1"},
      {"token", "bearer token clients and agents must send", ""},
      {"participant", "NAME=URL of an agent, for one-shot transactions", "", true},
      {"participant-token", "bearer token sent to agents", ""},
      {"op-url-allow", "URL prefix an HTTP op may call (repeatable; none: any http:// URL)", "",
       true},
      {"threads", "event-loop threads", "2"},
      {"prepare-timeout-ms", "votes not all in by then: abort", "5000"},
      {"txn-timeout-ms", "default timeout of an active transaction", "60000"},
      {"txn-timeout-max-ms", "largest timeout_ms a client may ask for", "3600000"},
      {"commit-wait-ms", "a commit still finishing by then is answered 202 committing", "10000"},
      {"notify-attempts-max", "attempts of a notification unless its request says (then given up)",
       "8"},
      {"message-timeout-ms", "timeout of one commit/abort/pre-commit message", "5000"},
      {"retry-min-ms", "phase-2 resend backoff, first delay", "50"},
      {"retry-max-ms", "phase-2 resend backoff, cap", "5000"},
      {"retention-ms", "finished outcomes stay answerable this long", "86400000"},
      {"compaction-interval-ms", "how often finished outcomes past retention are erased", "60000"},
      {"recovery-wait-ms", "at start, /healthz waits at most this for re-driven transactions",
       "30000"},
      {"open-txns-max", "open transactions; past it begin answers 503", "100000"},
      {"branches-per-txn-max", "branches of one transaction", "64"},
      {"body-max-bytes", "largest request body", "1048576"},
      {"connections-max", "concurrent client connections", "1024"},
      {"connections-per-client-max", "concurrent connections from one client address", "256"},
      {"header-timeout-ms",
       "a request's head must arrive within this (from accept or its first byte)", "5000"},
      {"transactions-per-client-max",
       "open transactions begun from one client address; past it begin answers 429", "10000"},
      {"failpoints-endpoint", "serve POST /v1/failpoints (test builds; behind --token)", "", false,
       true},
      {"agent-requests-max",
       "phase-2 requests in flight to one agent; more commits/aborts wait and go batched", "4"},
      {"batch-max", "messages in one batch to an agent (1: never batch)", "64"},
      {"check-config", "validate the options (flags, environment, --config file) and exit", "",
       false, true},
      {"help", "print this help", "", false, true},
  };
  tpc::add_logging_options(&s);
  tpc::add_version_option(&s);
  return s;
}

tpc::Result<tpc::coord::CoordinatorConfig> build(const tpc::Config& c) {
  using tpc::invalid_argument;
  tpc::coord::CoordinatorConfig cfg;
  auto listen = tpc::parse_listen(c.get("listen"));
  if (!listen.ok()) return listen.status();
  cfg.http.host = listen->first;
  cfg.http.port = listen->second;
  std::string id = c.get("id");
  if (!tpc::valid_coordinator_id(id))
    return invalid_argument("--id must match [A-Za-z0-9_]{1,32}, got \"" + id + "\"");
  cfg.machine.coordinator_id = id;
  cfg.token = c.get("token");
  cfg.participant_token = c.get("participant-token");
  for (auto& p : c.all("participant")) {
    auto nv = tpc::split_name_value(p, "participant");
    if (!nv.ok()) return nv.status();
    if (!tpc::valid_participant_name(nv->first))
      return invalid_argument("--participant name \"" + nv->first +
                              "\" must match [A-Za-z0-9_-]{1,32}");
    auto url = tpc::parse_url(nv->second);
    if (!url.ok())
      return invalid_argument("--participant " + nv->first + ": " + url.status().message());
    cfg.participants[nv->first] = nv->second;
  }
  for (auto& prefix : c.all("op-url-allow")) {
    auto url = tpc::parse_url(prefix);
    if (!url.ok())
      return invalid_argument("--op-url-allow " + prefix + ": " + url.status().message());
    cfg.op_url_prefixes.push_back(*url);
  }
  struct IntOpt {
    const char* name;
    int64_t min, max;
    int64_t* out;
  };
  int64_t threads = 0, body = 0, conns = 0, conns_per_client = 0, txns_per_client = 0, open_max = 0,
          branches_max = 0, agent_reqs = 0, batch_max = 0, notify_attempts = 0;
  IntOpt ints[] = {
      {"threads", 1, 64, &threads},
      {"prepare-timeout-ms", 1, 3'600'000, &cfg.machine.prepare_timeout_ms},
      {"txn-timeout-ms", 1, 86'400'000, &cfg.machine.txn_timeout_default_ms},
      {"txn-timeout-max-ms", 1, 86'400'000, &cfg.machine.txn_timeout_max_ms},
      {"commit-wait-ms", 1, 3'600'000, &cfg.machine.commit_wait_ms},
      {"notify-attempts-max", 1, tpc::coord::kNotifyAttemptsMax, &notify_attempts},
      {"message-timeout-ms", 1, 3'600'000, &cfg.message_timeout_ms},
      {"retry-min-ms", 1, 60'000, &cfg.machine.retry_min_ms},
      {"retry-max-ms", 1, 3'600'000, &cfg.machine.retry_max_ms},
      {"retention-ms", 0, 365LL * 86'400'000, &cfg.retention_ms},
      {"compaction-interval-ms", 100, 86'400'000, &cfg.compaction_interval_ms},
      {"recovery-wait-ms", 0, 3'600'000, &cfg.recovery_wait_ms},
      {"open-txns-max", 1, 10'000'000, &open_max},
      {"branches-per-txn-max", 1, 1'000, &branches_max},
      {"body-max-bytes", 1'024, 64 << 20, &body},
      {"connections-max", 1, 100'000, &conns},
      {"connections-per-client-max", 1, 100'000, &conns_per_client},
      {"header-timeout-ms", 1, 3'600'000, &cfg.http.header_timeout_ms},
      {"transactions-per-client-max", 1, 10'000'000, &txns_per_client},
      {"agent-requests-max", 1, 1'024, &agent_reqs},
      {"batch-max", 1, 1'000, &batch_max},
  };
  for (auto& o : ints) {
    auto v = c.get_int(o.name, o.min, o.max);
    if (!v.ok()) return v.status();
    *o.out = *v;
  }
  if (cfg.machine.retry_max_ms < cfg.machine.retry_min_ms)
    return invalid_argument("--retry-max-ms must be at least --retry-min-ms");
  if (cfg.machine.txn_timeout_default_ms > cfg.machine.txn_timeout_max_ms)
    return invalid_argument("--txn-timeout-ms must not exceed --txn-timeout-max-ms");
  cfg.threads = static_cast<int>(threads);
  cfg.machine.notify_attempts_max = static_cast<uint32_t>(notify_attempts);
  cfg.http.body_max_bytes = static_cast<size_t>(body);
  cfg.http.connections_max = static_cast<size_t>(conns);
  cfg.http.connections_per_client_max = static_cast<size_t>(conns_per_client);
  cfg.failpoints_endpoint = c.flag("failpoints-endpoint");
  cfg.transactions_per_client_max = static_cast<size_t>(txns_per_client);
  cfg.machine.open_txns_max = static_cast<size_t>(open_max);
  cfg.machine.branches_per_txn_max = static_cast<size_t>(branches_max);
  cfg.agent_requests_max = static_cast<size_t>(agent_reqs);
  cfg.batch_max = static_cast<size_t>(batch_max);
  return cfg;
}

}  // namespace

int main(int argc, char** argv) {
  auto spec = specs();
  auto parsed = tpc::parse_command_line(kProgram, "tpc-coordinator --data-dir DIR [options]", spec,
                                        argc, argv);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const tpc::Config& c = std::get<tpc::Config>(parsed);
  if (c.get("data-dir").empty()) return tpc::fail(kProgram, "--data-dir is required", 2);
  auto cfg = build(c);
  if (!cfg.ok()) return tpc::fail(kProgram, cfg.status().message(), 2);
  auto logging = tpc::make_logging(c);
  if (!logging.ok()) return tpc::fail(kProgram, logging.status().message(), 2);
  if (c.flag("check-config")) return 0;  // every option parsed and validated; nothing started
  tpc::Logger& log = *(*logging)->logger;
  if (auto st = tpc::configure_failpoints_from_env(&log); !st.ok())
    return tpc::fail(kProgram, st.message(), 2);

  std::string dir = c.get("data-dir");
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    return tpc::fail(kProgram, "cannot create --data-dir " + dir + ": " + std::strerror(errno));
  tpc::wal::LevelDbOptions lo;
  lo.dir = dir;
  lo.coordinator_id = cfg->machine.coordinator_id;
  auto wal = tpc::wal::open_leveldb_log(lo);
  if (!wal.ok()) return tpc::fail(kProgram, wal.status().message());

  auto service = tpc::coord::CoordinatorService::start(*cfg, std::move(*wal), log);
  if (!service.ok()) return tpc::fail(kProgram, service.status().message());

  std::promise<int> stop;
  std::atomic<bool> stopping{false};
  (*service)->on_stop_signal([&](int signo) {
    if (!stopping.exchange(true)) stop.set_value(signo);
  });
  int signo = stop.get_future().get();
  log.info("stopping", {{"signal", signo}});
  (*service)->shutdown(10'000);
  return 0;
}
