// Test harness implementation: throw-away PostgreSQL clusters (initdb + pg_ctl, run as an
// unprivileged user when the tests run as root), child processes with a log file, free ports,
// temp dirs and a libpq query helper.
//
// Children are started with fork + execve. Everything a child needs (argv, envp, paths) is
// built before fork, so the child only makes async-signal-safe calls between fork and exec;
// the tests may have other threads running.
#include "tests/harness/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#if __has_include(<linux/close_range.h>)
#include <linux/close_range.h>
#endif

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

extern char** environ;

namespace tpc::testing {
namespace {

constexpr int kStartAttemptsMax = 5;           // port clashes tolerated by create()
constexpr int64_t kInitdbTimeoutMs = 120'000;  // initdb on a slow CI machine
constexpr int64_t kPgCtlTimeoutMs = 90'000;    // pg_ctl -t 60 plus margin
constexpr int64_t kPgConfigTimeoutMs = 30'000;
constexpr size_t kSocketDirMaxBytes = 90;  // sun_path is 108 bytes with ".s.PGSQL.NNNNN"
constexpr size_t kErrorTailBytes = 600;    // log tail quoted in an error line

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Collapses a multi-line text into one line: trims, joins non-empty lines with " | ".
std::string one_line(std::string_view text, size_t max_bytes) {
  std::string out;
  std::string line;
  auto flush = [&] {
    size_t b = line.find_first_not_of(" \t\r");
    size_t e = line.find_last_not_of(" \t\r");
    if (b != std::string::npos) {
      if (!out.empty()) out += " | ";
      out += line.substr(b, e - b + 1);
    }
    line.clear();
  };
  for (char ch : text) {
    if (ch == '\n') {
      flush();
    } else {
      line += ch;
    }
  }
  flush();
  if (out.size() > max_bytes) out = "..." + out.substr(out.size() - max_bytes);
  return out;
}

std::string read_file_from(const std::string& path, uint64_t offset) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  in.seekg(static_cast<std::streamoff>(offset));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

std::string tail_of(const std::string& path, size_t max_bytes) {
  uint64_t size = file_size(path);
  return read_file_from(path, size > max_bytes ? size - max_bytes : 0);
}

bool is_executable(const std::string& path) {
  return ::access(path.c_str(), X_OK) == 0;
}

// An absolute path for a program name: as is when it holds a '/', else looked up in $PATH.
std::optional<std::string> resolve_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return name;
  const char* path = std::getenv("PATH");
  std::string_view rest = path != nullptr ? path : "/usr/local/bin:/usr/bin:/bin";
  while (true) {
    size_t colon = rest.find(':');
    std::string dir(rest.substr(0, colon));
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + name;
    if (is_executable(candidate)) return candidate;
    if (colon == std::string_view::npos) break;
    rest.remove_prefix(colon + 1);
  }
  return std::nullopt;
}

// The environment with `extra` ("NAME=value") replacing or adding entries.
std::vector<std::string> build_env(const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    std::string_view name = entry.substr(0, entry.find('='));
    bool replaced = std::any_of(extra.begin(), extra.end(), [&](const std::string& x) {
      return std::string_view(x).substr(0, x.find('=')) == name;
    });
    if (!replaced) env.emplace_back(entry);
  }
  env.insert(env.end(), extra.begin(), extra.end());
  return env;
}

std::vector<char*> c_array(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// Who a child runs as: with drop, switch to uid/gid (we are root); else stay who we are.
struct RunAs {
  bool drop = false;
  uid_t uid = 0;
  gid_t gid = 0;
};

// In the child after fork: only async-signal-safe calls from here to execve.
[[noreturn]] void exec_child(const RunAs& as, const char* cwd, int out_fd, int in_fd, int err_pipe,
                             const char* path, char** argv, char** envp) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  signal(SIGPIPE, SIG_DFL);
  if (in_fd >= 0) dup2(in_fd, STDIN_FILENO);
  dup2(out_fd, STDOUT_FILENO);
  dup2(out_fd, STDERR_FILENO);
  if (cwd != nullptr && chdir(cwd) != 0) _exit(126);
  if (as.drop) {
    if (setgroups(0, nullptr) != 0 || setgid(as.gid) != 0 || setuid(as.uid) != 0) _exit(126);
  }
  // No other descriptor (pipes of other children, the tests' sockets) crosses exec: mark them
  // all close-on-exec (the pipe reporting an exec failure already is), or close them.
#if defined(SYS_close_range) && defined(CLOSE_RANGE_CLOEXEC)
  if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0)
#endif
  {
    for (int fd = 3; fd < 4096; ++fd) {
      if (fd != err_pipe) close(fd);
    }
  }
  execve(path, argv, envp);
  int e = errno;
  if (err_pipe >= 0) {
    ssize_t w = write(err_pipe, &e, sizeof e);
    (void)w;
  }
  _exit(127);
}

int decode_wait_status(int st) {
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return -1;
}

// Runs argv (argv[0] absolute or found in $PATH) to completion with stdout+stderr captured
// in *output; kills it after timeout_ms. ok only for exit code 0.
Status run_command(const std::vector<std::string>& argv_in, const RunAs& as, const std::string& cwd,
                   const std::vector<std::string>& env_extra, int64_t timeout_ms,
                   std::string* output, int* exit_code) {
  TPC_ASSERT(!argv_in.empty());
  auto path = resolve_program(argv_in[0]);
  if (!path) return not_found(argv_in[0] + " not found in PATH");
  std::vector<std::string> argv = argv_in;
  std::vector<std::string> env = build_env(env_extra);
  std::vector<char*> cargv = c_array(argv);
  std::vector<char*> cenv = c_array(env);

  int out_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return io_error(std::string("pipe: ") + strerror(errno));
  int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  pid_t pid = fork();
  if (pid < 0) {
    int e = errno;
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    if (null_fd >= 0) ::close(null_fd);
    return io_error(std::string("fork: ") + strerror(e));
  }
  if (pid == 0) {
    exec_child(as, cwd.empty() ? nullptr : cwd.c_str(), out_pipe[1], null_fd, -1, path->c_str(),
               cargv.data(), cenv.data());
  }
  ::close(out_pipe[1]);
  if (null_fd >= 0) ::close(null_fd);

  std::string out;
  int64_t deadline = now_ms() + timeout_ms;
  bool timed_out = false;
  char buf[4096];
  for (;;) {
    int64_t left = deadline - now_ms();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd p{out_pipe[0], POLLIN, 0};
    int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (r < 0 && errno != EINTR) break;
    if (r <= 0) continue;
    ssize_t n = ::read(out_pipe[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(out_pipe[0]);
  if (timed_out) ::kill(pid, SIGKILL);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  int code = decode_wait_status(st);
  if (output != nullptr) *output = out;
  if (exit_code != nullptr) *exit_code = code;
  if (timed_out) {
    return timeout_error(argv_in[0] + " did not finish within " + std::to_string(timeout_ms) +
                         " ms: " + one_line(out, kErrorTailBytes));
  }
  if (code != 0) {
    return Status(Code::internal, argv_in[0] + " failed (exit " + std::to_string(code) +
                                      "): " + one_line(out, kErrorTailBytes));
  }
  return ok_status();
}

bool has_pg_tools(const std::string& dir) {
  return !dir.empty() && is_executable(dir + "/initdb") && is_executable(dir + "/pg_ctl");
}

// Where initdb and pg_ctl live: $TPC_PG_BINDIR, `pg_config --bindir`, the newest
// /usr/lib/postgresql/*/bin, or the directory of initdb in $PATH.
std::optional<std::string> find_pg_bindir() {
  if (const char* env = std::getenv("TPC_PG_BINDIR"); env != nullptr && has_pg_tools(env)) {
    return std::string(env);
  }
  std::string out;
  if (run_command({"pg_config", "--bindir"}, RunAs{}, "", {}, kPgConfigTimeoutMs, &out, nullptr)
          .ok()) {
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    if (has_pg_tools(out)) return out;
  }
  int best_version = -1;
  std::string best;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/usr/lib/postgresql", ec)) {
    std::string name = entry.path().filename().string();
    char* end = nullptr;
    long v = std::strtol(name.c_str(), &end, 10);
    std::string dir = entry.path().string() + "/bin";
    if (end != name.c_str() && *end == '\0' && v > best_version && has_pg_tools(dir)) {
      best_version = static_cast<int>(v);
      best = dir;
    }
  }
  if (!best.empty()) return best;
  if (auto initdb = resolve_program("initdb")) {
    return std::filesystem::path(*initdb).parent_path().string();
  }
  return std::nullopt;
}

// The unprivileged account that runs the server when we are root: `postgres`, else `nobody`.
std::optional<RunAs> server_account() {
  if (::geteuid() != 0) return RunAs{};
  for (const char* name : {"postgres", "nobody"}) {
    if (const passwd* pw = ::getpwnam(name); pw != nullptr) {
      return RunAs{true, pw->pw_uid, pw->pw_gid};
    }
  }
  return std::nullopt;
}

Status write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return io_error("cannot write " + path);
  out << content;
  out.close();
  if (!out) return io_error("cannot write " + path);
  return ok_status();
}

std::string quote_conninfo_value(std::string_view v) {
  bool plain = !v.empty() && v.find_first_of(" '\\") == std::string_view::npos;
  if (plain) return std::string(v);
  std::string out = "'";
  for (char c : v) {
    if (c == '\'' || c == '\\') out += '\\';
    out += c;
  }
  out += "'";
  return out;
}

// A libpq connection closed on scope exit.
struct PgHandle {
  PGconn* conn = nullptr;
  ~PgHandle() {
    if (conn != nullptr) PQfinish(conn);
  }
};

struct PgResult {
  PGresult* res = nullptr;
  ~PgResult() {
    if (res != nullptr) PQclear(res);
  }
};

void ignore_notice(void*, const char*) {}

Result<PGconn*> open_conn(PgHandle& h, const std::string& conninfo) {
  h.conn = PQconnectdb(conninfo.c_str());
  if (h.conn == nullptr) return unavailable("libpq: out of memory");
  if (PQstatus(h.conn) != CONNECTION_OK) {
    return unavailable(one_line(PQerrorMessage(h.conn), kErrorTailBytes));
  }
  PQsetNoticeProcessor(h.conn, ignore_notice, nullptr);
  return h.conn;
}

}  // namespace

std::string read_file(const std::string& path) { return read_file_from(path, 0); }

uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  TPC_ASSERT_MSG(fd >= 0, "socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
            ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  TPC_ASSERT_MSG(ok, "binding 127.0.0.1:0 failed");
  return ntohs(addr.sin_port);
}

std::string make_temp_dir(std::string_view prefix) {
  const char* tmp = std::getenv("TMPDIR");
  std::string base = (tmp != nullptr && *tmp != '\0') ? tmp : "/tmp";
  std::string templ = base + "/" + std::string(prefix) + "XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) return "";
  if (::chmod(templ.c_str(), 0755) != 0) {
    remove_tree(templ);
    return "";
  }
  return templ;
}

void remove_tree(const std::string& path) {
  if (path.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

Result<PgCluster*> shared_cluster() {
  static Result<std::unique_ptr<PgCluster>> cluster = PgCluster::create();
  if (!cluster.ok()) return cluster.status();
  return cluster->get();
}

std::string bin_dir() {
  return TPC_BIN_DIR;
}

// ---------------------------------------------------------------------------------------------
// PgCluster

Result<std::unique_ptr<PgCluster>> PgCluster::create(const Options& opts) {
  auto bindir = find_pg_bindir();
  if (!bindir) {
    return not_found(
        "PostgreSQL binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin)");
  }
  auto account = server_account();
  if (!account) return not_found("running as root and neither `postgres` nor `nobody` exists");

  std::unique_ptr<PgCluster> c(new PgCluster());
  c->bindir_ = *bindir;
  c->dir_ = make_temp_dir("tpc-pg-");
  if (c->dir_.empty()) return io_error(std::string("cannot create a temp dir: ") + strerror(errno));
  c->data_dir_ = c->dir_ + "/data";
  c->log_path_ = c->dir_ + "/server.log";
  c->uid_ = account->drop ? account->uid : ::getuid();
  c->gid_ = account->drop ? account->gid : ::getgid();
  if (account->drop && ::chown(c->dir_.c_str(), c->uid_, c->gid_) != 0) {
    return io_error("chown " + c->dir_ + ": " + strerror(errno));
  }

  std::string out;
  Status st = c->run_as_owner({c->bindir_ + "/initdb", "-D", c->data_dir_, "-U", "tpc",
                               "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"},
                              &out);
  if (!st.ok()) return Status(st.code(), "PgCluster: " + st.message());

  std::string conf_path = c->data_dir_ + "/postgresql.conf";
  std::string base_conf = read_file_from(conf_path, 0);
  if (base_conf.empty()) return io_error("PgCluster: cannot read " + conf_path);
  std::string socket_dir = c->dir_.size() <= kSocketDirMaxBytes ? c->dir_ : "";

  uint16_t port = opts.port != 0 ? opts.port : free_port();
  for (int attempt = 1;; ++attempt) {
    std::string conf = base_conf;
    conf += "\n# Added by the tpc test harness.\n";
    conf += "listen_addresses = '127.0.0.1'\n";
    conf += "port = " + std::to_string(port) + "\n";
    conf += "unix_socket_directories = '" + socket_dir + "'\n";
    conf += "max_prepared_transactions = " + std::to_string(opts.max_prepared_transactions) + "\n";
    conf += "max_connections = " + std::to_string(opts.max_connections) + "\n";
    // Safe for these tests: they crash processes (kill -9, pg_ctl stop -m immediate), never
    // the operating system, so everything written survives in the page cache and crash
    // recovery still sees it. Turning these off makes each commit and PREPARE much cheaper.
    conf += "fsync = off\n";
    conf += "full_page_writes = off\n";
    if (!opts.extra_conf.empty()) conf += opts.extra_conf + "\n";
    TPC_RETURN_IF_ERROR(write_file(conf_path, conf));
    if (::geteuid() == 0 && ::chown(conf_path.c_str(), c->uid_, c->gid_) != 0) {
      return io_error("chown " + conf_path + ": " + strerror(errno));
    }

    uint64_t log_offset = file_size(c->log_path_);
    c->port_ = port;
    st = c->start();
    if (st.ok()) return c;
    std::string log = read_file_from(c->log_path_, log_offset);
    bool clash = log.find("Address already in use") != std::string::npos;
    if (!clash || attempt >= kStartAttemptsMax) return st;
    port = free_port();
  }
}

PgCluster::~PgCluster() {
  if (!data_dir_.empty() && (running_ || file_size(data_dir_ + "/postmaster.pid") > 0)) {
    std::string out;
    (void)run_as_owner({bindir_ + "/pg_ctl", "-D", data_dir_, "-m", "immediate", "-w", "stop"},
                       &out);
  }
  remove_tree(dir_);
}

std::string PgCluster::conninfo(std::string_view dbname) const {
  return "host=127.0.0.1 port=" + std::to_string(port_) +
         " user=tpc dbname=" + quote_conninfo_value(dbname) + " connect_timeout=5";
}

Status PgCluster::create_database(std::string_view name) {
  PgHandle h;
  auto conn = open_conn(h, conninfo("postgres"));
  if (!conn.ok()) return conn.status();
  char* ident = PQescapeIdentifier(h.conn, name.data(), name.size());
  if (ident == nullptr) return invalid_argument("bad database name: " + std::string(name));
  std::string sql = "CREATE DATABASE " + std::string(ident);
  PQfreemem(ident);
  PgResult r{PQexec(h.conn, sql.c_str())};
  if (PQresultStatus(r.res) != PGRES_COMMAND_OK) {
    return Status(Code::sql_error, one_line(PQerrorMessage(h.conn), kErrorTailBytes));
  }
  return ok_status();
}

Status PgCluster::stop(bool immediate) {
  if (!running_) return ok_status();
  std::string out;
  Status st = run_as_owner(
      {bindir_ + "/pg_ctl", "-D", data_dir_, "-m", immediate ? "immediate" : "fast", "-w", "stop"},
      &out);
  running_ = false;
  if (!st.ok()) {
    return Status(st.code(), "PgCluster: " + st.message() + "; server log: " +
                                 one_line(tail_of(log_path_, kErrorTailBytes), kErrorTailBytes));
  }
  return ok_status();
}

Status PgCluster::start() {
  if (running_) return ok_status();
  std::string out;
  Status st = run_as_owner(
      {bindir_ + "/pg_ctl", "-D", data_dir_, "-l", log_path_, "-w", "-t", "60", "start"}, &out);
  if (!st.ok()) {
    return Status(st.code(), "PgCluster: pg_ctl start on port " + std::to_string(port_) +
                                 " failed; server log: " +
                                 one_line(tail_of(log_path_, kErrorTailBytes), kErrorTailBytes));
  }
  running_ = true;
  return ok_status();
}

Status PgCluster::run_as_owner(const std::vector<std::string>& argv, std::string* output) {
  RunAs as;
  std::vector<std::string> env;
  if (::geteuid() == 0) {
    as = RunAs{true, uid_, gid_};
    env.push_back("HOME=" + dir_);
  }
  bool is_initdb = argv[0].ends_with("/initdb");
  return run_command(argv, as, dir_, env, is_initdb ? kInitdbTimeoutMs : kPgCtlTimeoutMs, output,
                     nullptr);
}

// ---------------------------------------------------------------------------------------------
// Process

Result<std::unique_ptr<Process>> Process::spawn(const std::vector<std::string>& argv_in,
                                                const std::string& log_path,
                                                const std::vector<std::string>& env_extra) {
  if (argv_in.empty()) return invalid_argument("Process::spawn: empty argv");
  for (const auto& e : env_extra) {
    if (e.find('=') == std::string::npos) {
      return invalid_argument("Process::spawn: env entry without '=': " + e);
    }
  }
  auto path = resolve_program(argv_in[0]);
  if (!path) return not_found("Process::spawn: " + argv_in[0] + " not found in PATH");
  std::vector<std::string> argv = argv_in;
  std::vector<std::string> env = build_env(env_extra);
  std::vector<char*> cargv = c_array(argv);
  std::vector<char*> cenv = c_array(env);

  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return io_error("Process::spawn: open " + log_path + ": " + strerror(errno));
  int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  int err_pipe[2];
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    ::close(log_fd);
    if (null_fd >= 0) ::close(null_fd);
    return io_error(std::string("Process::spawn: pipe: ") + strerror(errno));
  }
  pid_t parent = ::getpid();
  pid_t pid = fork();
  if (pid < 0) {
    int e = errno;
    ::close(log_fd);
    if (null_fd >= 0) ::close(null_fd);
    ::close(err_pipe[0]);
    ::close(err_pipe[1]);
    return io_error(std::string("Process::spawn: fork: ") + strerror(e));
  }
  if (pid == 0) {
    // Dies with the thread that spawned it, so nothing outlives a crashed test.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(125);
    ::close(err_pipe[0]);
    exec_child(RunAs{}, nullptr, log_fd, null_fd, err_pipe[1], path->c_str(), cargv.data(),
               cenv.data());
  }
  ::close(log_fd);
  if (null_fd >= 0) ::close(null_fd);
  ::close(err_pipe[1]);
  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(err_pipe[0], &child_errno, sizeof child_errno);
  } while (n < 0 && errno == EINTR);
  ::close(err_pipe[0]);

  std::unique_ptr<Process> p(new Process());
  p->pid_ = pid;
  p->log_path_ = log_path;
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    (void)p->wait(-1);
    return io_error("Process::spawn: exec " + *path + ": " + strerror(child_errno));
  }
  return p;
}

Process::~Process() {
  if (pid_ > 0 && !reaped_) {
    ::kill(pid_, SIGKILL);
    (void)wait(-1);
  }
}

void Process::signal(int signo) {
  if (pid_ > 0 && !reaped_) ::kill(pid_, signo);
}

bool Process::stop_and_wait(int64_t timeout_ms) {
  signal(SIGSTOP);
  std::string tasks = "/proc/" + std::to_string(pid_) + "/task";
  return eventually(
      [&] {
        std::error_code ec;
        bool any = false;
        for (auto& entry : std::filesystem::directory_iterator(tasks, ec)) {
          std::ifstream in(entry.path() / "stat");
          std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
          size_t paren = stat.rfind(')');
          if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
          char state = stat[paren + 2];
          if (state != 'T' && state != 't') return false;
          any = true;
        }
        return any && !ec;
      },
      timeout_ms);
}

int Process::wait(int64_t timeout_ms) {
  if (reaped_) return exit_code_;
  TPC_ASSERT(pid_ > 0);
  int64_t deadline = now_ms() + timeout_ms;
  int pidfd = -1;
#ifdef SYS_pidfd_open
  if (timeout_ms >= 0) pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
#endif
  int result = -1;
  for (;;) {
    int st = 0;
    pid_t r = ::waitpid(pid_, &st, timeout_ms < 0 ? 0 : WNOHANG);
    if (r < 0 && errno == EINTR) continue;
    if (r == pid_) {
      reaped_ = true;
      exit_code_ = decode_wait_status(st);
      result = exit_code_;
      break;
    }
    if (r < 0) {  // ECHILD: reaped elsewhere; nothing more to learn
      reaped_ = true;
      exit_code_ = -1;
      break;
    }
    int64_t left = deadline - now_ms();
    if (left <= 0) break;
    if (pidfd >= 0) {
      pollfd p{pidfd, POLLIN, 0};
      (void)::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    } else {
      (void)::poll(nullptr, 0, static_cast<int>(std::min<int64_t>(left, 5)));
    }
  }
  if (pidfd >= 0) ::close(pidfd);
  return result;
}

bool Process::running() {
  if (reaped_ || pid_ <= 0) return false;
  return wait(0) == -1 && !reaped_;
}

std::string Process::log_tail(size_t max_bytes) const {
  return tail_of(log_path_, max_bytes);
}

// ---------------------------------------------------------------------------------------------
// Queries

Result<int> run_to_exit(const std::vector<std::string>& argv, std::string* output,
                        int64_t timeout_ms) {
  std::string dir = make_temp_dir("tpc-run");
  auto p = Process::spawn(argv, dir + "/out.log");
  if (!p.ok()) {
    remove_tree(dir);
    return p.status();
  }
  int code = (*p)->wait(timeout_ms);
  p->reset();  // killed if it did not exit in time
  *output = read_file(dir + "/out.log");
  remove_tree(dir);
  return code;
}

Result<std::vector<Row>> query(const std::string& conninfo, const std::string& sql) {
  PgHandle h;
  auto conn = open_conn(h, conninfo);
  if (!conn.ok()) return conn.status();
  PgResult r{PQexec(h.conn, sql.c_str())};
  ExecStatusType s = PQresultStatus(r.res);
  if (s != PGRES_TUPLES_OK && s != PGRES_COMMAND_OK) {
    const char* state = r.res != nullptr ? PQresultErrorField(r.res, PG_DIAG_SQLSTATE) : nullptr;
    std::string msg = state != nullptr ? std::string(state) + ": " : "";
    return Status(Code::sql_error, msg + one_line(PQerrorMessage(h.conn), kErrorTailBytes));
  }
  std::vector<Row> rows;
  int nrows = PQntuples(r.res);
  int ncols = PQnfields(r.res);
  rows.reserve(static_cast<size_t>(nrows));
  for (int i = 0; i < nrows; ++i) {
    Row row;
    row.reserve(static_cast<size_t>(ncols));
    for (int j = 0; j < ncols; ++j) {
      if (PQgetisnull(r.res, i, j)) {
        row.emplace_back(std::nullopt);
      } else {
        row.emplace_back(
            std::string(PQgetvalue(r.res, i, j), static_cast<size_t>(PQgetlength(r.res, i, j))));
      }
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

Result<std::optional<std::string>> query_value(const std::string& conninfo,
                                               const std::string& sql) {
  auto rows = query(conninfo, sql);
  if (!rows.ok()) return rows.status();
  if (rows->size() != 1 || (*rows)[0].size() != 1) {
    return invalid_argument("query_value: expected one row and one column, got " +
                            std::to_string(rows->size()) + " rows: " + sql);
  }
  return (*rows)[0][0];
}

}  // namespace tpc::testing
