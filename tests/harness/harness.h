// Test harness: throw-away PostgreSQL clusters, child processes, free ports, temp dirs, and a
// small libpq query helper. Used by the integration tests and the crash tests.
//
// Running as root: initdb, pg_ctl and postgres refuse to run as root, so PgCluster runs them
// as an unprivileged user (the `postgres` system user from Debian's package, or `nobody`),
// with the data directory owned by that user. The cluster trusts local TCP connections for the
// role `tpc` (a superuser created by initdb -U tpc).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace tpc::testing {

// A port that was free a moment ago on 127.0.0.1 (bind to port 0 and read it back).
uint16_t free_port();
// mkdtemp under $TMPDIR or /tmp, mode 0755 so an unprivileged server can traverse it.
std::string make_temp_dir(std::string_view prefix);
// rm -rf
void remove_tree(const std::string& path);
// The whole content of a file; empty when it cannot be read.
std::string read_file(const std::string& path);
// The directory holding the project's binaries (build/bin), from the TPC_BIN_DIR definition.
std::string bin_dir();

class PgCluster;
// One cluster for the whole test binary, created on first use (a second or so) and stopped at
// exit; the error when it cannot be started.
Result<PgCluster*> shared_cluster();

class PgCluster {
 public:
  struct Options {
    int max_prepared_transactions = 100;
    int max_connections = 200;
    std::string extra_conf;  // appended to postgresql.conf
    uint16_t port = 0;       // 0: a free port; else tried first (a clash still moves it)
  };
  // initdb (about a second), then start on a free port (retried on a port clash).
  static Result<std::unique_ptr<PgCluster>> create(const Options& opts);
  static Result<std::unique_ptr<PgCluster>> create() { return create(Options{}); }
  ~PgCluster();  // stop -m immediate, remove the directory

  uint16_t port() const { return port_; }
  // "host=127.0.0.1 port=N user=tpc dbname=DB connect_timeout=5"
  std::string conninfo(std::string_view dbname = "postgres") const;

  Status create_database(std::string_view name);
  // pg_ctl stop -m fast|immediate -w
  Status stop(bool immediate);
  // pg_ctl start -w on the same port and directory
  Status start();
  bool running() const { return running_; }
  const std::string& data_dir() const { return data_dir_; }

 private:
  PgCluster() = default;
  Status run_as_owner(const std::vector<std::string>& argv, std::string* output);

  std::string dir_;       // the temp dir holding data/ and the server log
  std::string data_dir_;
  std::string log_path_;
  uint16_t port_ = 0;
  bool running_ = false;
  uid_t uid_ = 0;  // the unprivileged owner when the test runs as root; else ours
  gid_t gid_ = 0;
  std::string bindir_;  // where initdb and pg_ctl live
};

// A child process with its stdout and stderr appended to a log file.
class Process {
 public:
  static Result<std::unique_ptr<Process>> spawn(const std::vector<std::string>& argv,
                                                const std::string& log_path,
                                                const std::vector<std::string>& env_extra = {});
  ~Process();  // SIGKILL and reap if still running

  pid_t pid() const { return pid_; }
  void signal(int signo);
  // SIGSTOP, and wait until every thread of the process is stopped (SIGSTOP is asynchronous:
  // a thread may still run a little after kill() returns). False after timeout_ms.
  bool stop_and_wait(int64_t timeout_ms = 5'000);
  // Waits for the exit; returns the exit code, or 128+signal. -1 when timeout_ms passed.
  int wait(int64_t timeout_ms);
  bool running();
  const std::string& log_path() const { return log_path_; }
  // The last `max_bytes` of the log, for failure messages.
  std::string log_tail(size_t max_bytes = 4000) const;

 private:
  Process() = default;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int exit_code_ = 0;
  std::string log_path_;
};

// Runs argv to its exit, its stdout and stderr into *output; returns the exit code (as
// Process::wait: 128+signal, -1 when timeout_ms passed, the process then killed).
Result<int> run_to_exit(const std::vector<std::string>& argv, std::string* output,
                        int64_t timeout_ms = 20'000);

using Row = std::vector<std::optional<std::string>>;

// Runs one statement on a fresh connection; the rows as text. sql_error with the sqlstate in
// the message on failure.
Result<std::vector<Row>> query(const std::string& conninfo, const std::string& sql);
// The single value of a one-row, one-column result.
Result<std::optional<std::string>> query_value(const std::string& conninfo, const std::string& sql);

// Polls pred every 20 ms until it is true or timeout_ms passes; returns the last result.
// (For waiting on an observable state, never as a stand-in for synchronisation.)
template <class Pred>
bool eventually(Pred pred, int64_t timeout_ms);

}  // namespace tpc::testing

#include "tests/harness/eventually.inl"
