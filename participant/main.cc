// tpc-agent: the participant agent next to one PostgreSQL database. See docs/DESIGN.md §2.
#include <atomic>
#include <future>
#include <iostream>

#include "common/cli.h"
#include "common/config.h"
#include "common/ids.h"
#include "participant/agent_service.h"

extern char** environ;

namespace {

constexpr char kProgram[] = "tpc-agent";

std::vector<tpc::OptionSpec> specs() {
  std::vector<tpc::OptionSpec> s = {
      {"listen", "HOST:PORT to serve the API on", "127.0.0.1:7401"},
      {"name", "this agent's participant name ([A-Za-z0-9_-]{1,32})", ""},
      {"pg", "libpq connection string of the database", ""},
      {"coordinator", "ID=URL of a coordinator whose gids this agent serves", "", true},
      {"advertise-url", "URL coordinators use to reach this agent (default http://LISTEN)", ""},
      {"token", "bearer token clients and coordinators must send", ""},
      {"coordinator-token", "bearer token sent to coordinators", ""},
      {"peer-token", "bearer token sent to other agents in 3PC termination (default: --token)", ""},
      {"threads", "event-loop threads", "2"},
      {"pg-workers", "threads running PostgreSQL operations (0: branches-max + 16)", "0"},
      {"pg-connections-max",
       "PostgreSQL connections open at once, sessions included (0: branches-max + 16)", "0"},
      {"branches-max", "open (unprepared) branches; past it new ones get 503", "64"},
      {"steps-max", "TCC and saga SQL steps in flight; past it new ones get 503", "256"},
      {"idle-timeout-ms",
       "an unprepared branch idle this long is rolled back (when the coordinator gives no timeout)",
       "60000"},
      {"in-doubt-after-ms", "a prepared 2PC branch older than this asks the coordinator", "2000"},
      {"precommit-timeout-ms", "3PC: prepared with no pre-commit by then: ask; unreachable: abort",
       "10000"},
      {"commit-timeout-ms", "3PC: pre-committed with no commit by then: ask; unreachable: commit",
       "10000"},
      {"scan-interval-ms", "how often pg_prepared_xacts is scanned", "5000"},
      {"purge-interval-ms", "how often markers of finished transactions are purged", "60000"},
      {"statement-timeout-ms",
       "PostgreSQL statement_timeout for the agent's sessions (0: server default)", "0"},
      {"lock-timeout-ms",
       "PostgreSQL lock_timeout for the agent's sessions (0: server default); bounds distributed "
       "deadlocks",
       "10000"},
      {"statements-max", "statements in one exec request", "1000"},
      {"result-rows-max", "rows one statement may return", "10000"},
      {"body-max-bytes", "largest request body", "1048576"},
      {"connections-max", "concurrent client connections", "1024"},
      {"check-config", "validate the options (flags, environment, --config file) and exit", "",
       false, true},
      {"connections-per-client-max", "concurrent connections from one client address", "256"},
      {"header-timeout-ms",
       "a request's head must arrive within this (from accept or its first byte)", "5000"},
      {"failpoints-endpoint", "serve POST /v1/failpoints (test builds; behind --token)", "", false,
       true},
      {"help", "print this help", "", false, true},
  };
  tpc::add_logging_options(&s);
  tpc::add_version_option(&s);
  return s;
}

// --coordinator ID=URL, one or more.
tpc::Status read_coordinators(const tpc::Config& c, std::map<std::string, std::string>* out) {
  using tpc::invalid_argument;
  auto coordinators = c.all("coordinator");
  if (coordinators.empty())
    return invalid_argument("at least one --coordinator ID=URL is required");
  for (auto& entry : coordinators) {
    auto nv = tpc::split_name_value(entry, "coordinator");
    if (!nv.ok()) return nv.status();
    if (!tpc::valid_coordinator_id(nv->first))
      return invalid_argument("--coordinator id \"" + nv->first +
                              "\" must match [A-Za-z0-9_]{1,32}");
    auto url = tpc::parse_url(nv->second);
    if (!url.ok())
      return invalid_argument("--coordinator " + nv->first + ": " + url.status().message());
    (*out)[nv->first] = nv->second;
  }
  return tpc::ok_status();
}

tpc::Result<tpc::agent::AgentConfig> build(const tpc::Config& c) {
  using tpc::invalid_argument;
  tpc::agent::AgentConfig cfg;
  auto listen = tpc::parse_listen(c.get("listen"));
  if (!listen.ok()) return listen.status();
  cfg.http.host = listen->first;
  cfg.http.port = listen->second;
  std::string name = c.get("name");
  if (name.empty()) return invalid_argument("--name is required");
  if (!tpc::valid_participant_name(name))
    return invalid_argument("--name must match [A-Za-z0-9_-]{1,32}, got \"" + name + "\"");
  cfg.machine.name = name;
  cfg.pg.conninfo = c.get("pg");
  if (cfg.pg.conninfo.empty()) return invalid_argument("--pg is required");
  if (auto st = read_coordinators(c, &cfg.coordinators); !st.ok()) return st;
  cfg.advertise_url = c.get("advertise-url");
  if (cfg.advertise_url.empty()) {
    std::string host =
        listen->first == "0.0.0.0" || listen->first.empty() ? "127.0.0.1" : listen->first;
    cfg.advertise_url = "http://" + host + ":" + std::to_string(listen->second);
  }
  if (auto u = tpc::parse_url(cfg.advertise_url); !u.ok())
    return invalid_argument("--advertise-url: " + u.status().message());
  cfg.token = c.get("token");
  cfg.coordinator_token = c.get("coordinator-token");
  cfg.peer_token = c.has("peer-token") ? c.get("peer-token") : cfg.token;
  int64_t threads = 0, workers = 0, pg_conns = 0, branches = 0, steps = 0, statements = 0, rows = 0,
          body = 0, conns = 0, conns_per_client = 0;
  struct IntOpt {
    const char* name;
    int64_t min, max;
    int64_t* out;
  } ints[] = {
      {"threads", 1, 64, &threads},
      {"pg-workers", 0, 1'024, &workers},
      {"pg-connections-max", 0, 100'000, &pg_conns},
      {"branches-max", 1, 100'000, &branches},
      {"steps-max", 1, 100'000, &steps},
      {"idle-timeout-ms", 1, 86'400'000, &cfg.machine.idle_timeout_ms},
      {"in-doubt-after-ms", 0, 86'400'000, &cfg.machine.in_doubt_after_ms},
      {"precommit-timeout-ms", 1, 86'400'000, &cfg.machine.precommit_timeout_ms},
      {"commit-timeout-ms", 1, 86'400'000, &cfg.machine.commit_timeout_ms},
      {"scan-interval-ms", 10, 86'400'000, &cfg.scan_interval_ms},
      {"purge-interval-ms", 100, 86'400'000, &cfg.purge_interval_ms},
      {"statement-timeout-ms", 0, 86'400'000, &cfg.pg.statement_timeout_ms},
      {"lock-timeout-ms", 0, 86'400'000, &cfg.pg.lock_timeout_ms},
      {"statements-max", 1, 100'000, &statements},
      {"result-rows-max", 1, 100'000'000, &rows},
      {"body-max-bytes", 1'024, 64 << 20, &body},
      {"connections-max", 1, 100'000, &conns},
      {"connections-per-client-max", 1, 100'000, &conns_per_client},
      {"header-timeout-ms", 1, 3'600'000, &cfg.http.header_timeout_ms},
  };
  for (auto& o : ints) {
    auto v = c.get_int(o.name, o.min, o.max);
    if (!v.ok()) return v.status();
    *o.out = *v;
  }
  cfg.threads = static_cast<int>(threads);
  cfg.pg_workers = workers > 0 ? static_cast<int>(workers) : static_cast<int>(branches) + 16;
  cfg.machine.branches_max = static_cast<size_t>(branches);
  cfg.machine.steps_max = static_cast<size_t>(steps);
  cfg.exec.statements_max = static_cast<size_t>(statements);
  cfg.machine.result_rows_max = static_cast<size_t>(rows);
  cfg.http.body_max_bytes = static_cast<size_t>(body);
  cfg.http.connections_max = static_cast<size_t>(conns);
  cfg.http.connections_per_client_max = static_cast<size_t>(conns_per_client);
  cfg.failpoints_endpoint = c.flag("failpoints-endpoint");
  cfg.pg_connections_max =
      pg_conns > 0 ? static_cast<size_t>(pg_conns) : static_cast<size_t>(branches) + 16;
  // Keep every connection the pool may open: opening one forks a PostgreSQL backend, which
  // costs far more than an idle connection.
  cfg.pg_idle_max = cfg.pg_connections_max;
  cfg.pg.application_name = "tpc-agent " + name;
  return cfg;
}

}  // namespace

int main(int argc, char** argv) {
  auto spec = specs();
  auto parsed = tpc::parse_command_line(
      kProgram, "tpc-agent --name NAME --pg CONNINFO --coordinator ID=URL [options]", spec, argc,
      argv);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const tpc::Config& c = std::get<tpc::Config>(parsed);
  auto cfg = build(c);
  if (!cfg.ok()) return tpc::fail(kProgram, cfg.status().message(), 2);
  auto logging = tpc::make_logging(c);
  if (!logging.ok()) return tpc::fail(kProgram, logging.status().message(), 2);
  if (c.flag("check-config")) return 0;  // every option parsed and validated; nothing started
  tpc::Logger& log = *(*logging)->logger;
  if (auto st = tpc::configure_failpoints_from_env(&log); !st.ok())
    return tpc::fail(kProgram, st.message(), 2);

  auto service = tpc::agent::AgentService::start(*cfg, log);
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
