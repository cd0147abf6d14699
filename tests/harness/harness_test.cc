// Tests of the test harness itself: a throw-away PostgreSQL cluster starts, keeps a prepared
// transaction across a crash (pg_ctl stop -m immediate) and leaves nothing behind; child
// processes report exit codes and signals and capture their output.
#include "tests/harness/harness.h"

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>

namespace tpc::testing {
namespace {

std::string value_or_empty(const Result<std::optional<std::string>>& r) {
  REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  REQUIRE(r->has_value());
  return **r;
}

// A listening socket on 127.0.0.1:port, closed on scope exit.
struct Listener {
  int fd = -1;
  explicit Listener(uint16_t port) {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 4) != 0) {
      ::close(fd);
      fd = -1;
    }
  }
  ~Listener() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

TEST_CASE("free_port returns a port that can be bound") {
  uint16_t port = free_port();
  CHECK(port != 0);
  Listener l(port);
  CHECK(l.fd >= 0);
}

TEST_CASE("make_temp_dir creates a 0755 directory that remove_tree removes") {
  std::string dir = make_temp_dir("tpc-harness-test-");
  REQUIRE(!dir.empty());
  struct stat st {};
  REQUIRE(::stat(dir.c_str(), &st) == 0);
  CHECK(S_ISDIR(st.st_mode));
  CHECK((st.st_mode & 0777) == 0755);
  std::filesystem::create_directories(dir + "/a/b");
  std::ofstream(dir + "/a/b/f") << "x";
  remove_tree(dir);
  CHECK(!std::filesystem::exists(dir));
  remove_tree(dir);  // a missing path is fine
}

TEST_CASE("bin_dir names the build's bin directory") {
  CHECK(bin_dir().ends_with("/bin"));
}

TEST_CASE(
    "a cluster starts, answers, keeps a prepared transaction across a crash, and is removed") {
  PgCluster::Options opts;
  opts.max_prepared_transactions = 7;
  opts.extra_conf = "log_min_messages = warning";
  auto created = PgCluster::create(opts);
  REQUIRE_MESSAGE(created.ok(), created.status().to_string());
  std::unique_ptr<PgCluster> cluster = std::move(created).value();
  CHECK(cluster->running());
  CHECK(cluster->port() != 0);

  std::string db = cluster->conninfo("postgres");
  CHECK(value_or_empty(query_value(db, "SELECT 1")) == "1");
  CHECK(value_or_empty(query_value(db, "SHOW max_prepared_transactions")) == "7");
  CHECK(value_or_empty(query_value(db, "SHOW fsync")) == "off");
  CHECK(value_or_empty(query_value(db, "SHOW log_min_messages")) == "warning");
  CHECK(value_or_empty(query_value(db, "SELECT current_user")) == "tpc");

  REQUIRE(cluster->create_database("harness db").ok());
  std::string hdb = cluster->conninfo("harness db");
  CHECK(value_or_empty(query_value(hdb, "SELECT current_database()")) == "harness db");
  CHECK(!cluster->create_database("harness db").ok());  // already exists

  auto made = query(hdb, "CREATE TABLE t(v int)");
  REQUIRE_MESSAGE(made.ok(), made.status().to_string());
  auto prepared =
      query(hdb, "BEGIN; INSERT INTO t VALUES (42); PREPARE TRANSACTION 'harness-test-1'");
  REQUIRE_MESSAGE(prepared.ok(), prepared.status().to_string());
  CHECK(value_or_empty(query_value(hdb, "SELECT count(*) FROM t")) == "0");

  REQUIRE(cluster->stop(/*immediate=*/true).ok());
  CHECK(!cluster->running());
  CHECK(!query_value(db, "SELECT 1").ok());
  Status started = cluster->start();
  REQUIRE_MESSAGE(started.ok(), started.to_string());
  CHECK(cluster->running());
  CHECK(value_or_empty(query_value(
            hdb, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")) ==
        "harness-test-1");
  REQUIRE(query(hdb, "COMMIT PREPARED 'harness-test-1'").ok());
  CHECK(value_or_empty(query_value(hdb, "SELECT v FROM t")) == "42");
  CHECK(value_or_empty(query_value(hdb, "SELECT count(*) FROM pg_prepared_xacts")) == "0");

  REQUIRE(cluster->stop(/*immediate=*/false).ok());
  REQUIRE(cluster->start().ok());
  CHECK(value_or_empty(query_value(hdb, "SELECT v FROM t")) == "42");

  std::string data_dir = cluster->data_dir();
  std::string dir = std::filesystem::path(data_dir).parent_path().string();
  CHECK(std::filesystem::exists(data_dir + "/PG_VERSION"));
  cluster.reset();
  CHECK(!std::filesystem::exists(dir));
  CHECK(!query_value(db, "SELECT 1").ok());
}

TEST_CASE("a cluster whose port is taken starts on another port") {
  uint16_t taken = free_port();
  Listener l(taken);
  REQUIRE(l.fd >= 0);
  PgCluster::Options opts;
  opts.port = taken;
  auto cluster = PgCluster::create(opts);
  REQUIRE_MESSAGE(cluster.ok(), cluster.status().to_string());
  CHECK((*cluster)->port() != taken);
  CHECK(value_or_empty(query_value((*cluster)->conninfo(), "SELECT 1")) == "1");
}

TEST_CASE("a cluster with a bad setting fails with the server's complaint on one line") {
  PgCluster::Options opts;
  opts.extra_conf = "no_such_setting_here = 1";
  auto cluster = PgCluster::create(opts);
  REQUIRE(!cluster.ok());
  const std::string& msg = cluster.status().message();
  CHECK(msg.find('\n') == std::string::npos);
  CHECK_MESSAGE(msg.find("no_such_setting_here") != std::string::npos, msg);
}

TEST_CASE("query reports SQL errors with the sqlstate and query_value wants one value") {
  auto cluster = PgCluster::create();
  REQUIRE_MESSAGE(cluster.ok(), cluster.status().to_string());
  std::string db = (*cluster)->conninfo();
  auto bad = query(db, "SELECT * FROM no_such_table");
  REQUIRE(!bad.ok());
  CHECK(bad.status().code() == Code::sql_error);
  CHECK(bad.status().message().find("42P01") != std::string::npos);
  auto rows = query(db, "SELECT NULL::text, 'x' UNION ALL SELECT 'y', NULL");
  REQUIRE(rows.ok());
  REQUIRE(rows->size() == 2);
  CHECK(!(*rows)[0][0].has_value());
  CHECK((*rows)[0][1] == std::optional<std::string>("x"));
  CHECK(!(*rows)[1][1].has_value());
  CHECK(!query_value(db, "SELECT 1, 2").ok());
  CHECK(!query_value(db, "SELECT 1 WHERE false").ok());
  auto nothing =
      query("host=127.0.0.1 port=1 user=tpc dbname=postgres connect_timeout=2", "SELECT 1");
  REQUIRE(!nothing.ok());
  CHECK(nothing.status().code() == Code::unavailable);
}

TEST_CASE("a process's exit code, output and environment are captured") {
  std::string dir = make_temp_dir("tpc-harness-test-");
  REQUIRE(!dir.empty());
  std::string log = dir + "/p.log";
  {
    auto p = Process::spawn({"/bin/sh", "-c", "echo out-$TPC_HARNESS_X; echo err >&2; exit 3"}, log,
                            {"TPC_HARNESS_X=forty-two"});
    REQUIRE_MESSAGE(p.ok(), p.status().to_string());
    CHECK((*p)->pid() > 0);
    CHECK((*p)->wait(10'000) == 3);
    CHECK(!(*p)->running());
    CHECK((*p)->wait(0) == 3);  // repeated waits answer the same
    std::string tail = (*p)->log_tail();
    CHECK(tail.find("out-forty-two") != std::string::npos);
    CHECK(tail.find("err") != std::string::npos);
    CHECK((*p)->log_tail(3) == "rr\n");
  }
  {
    // Appends to the same log; found via $PATH.
    auto p = Process::spawn({"sh", "-c", "echo second"}, log);
    REQUIRE(p.ok());
    CHECK((*p)->wait(10'000) == 0);
    CHECK((*p)->log_tail().find("out-forty-two") != std::string::npos);
    CHECK((*p)->log_tail().find("second") != std::string::npos);
  }
  remove_tree(dir);
}

TEST_CASE("a process can be signalled, waited for with a timeout, and is killed on destruction") {
  std::string dir = make_temp_dir("tpc-harness-test-");
  REQUIRE(!dir.empty());
  std::string log = dir + "/p.log";
  {
    auto p = Process::spawn({"/bin/sleep", "600"}, log);
    REQUIRE(p.ok());
    CHECK((*p)->running());
    CHECK((*p)->wait(50) == -1);  // still running after the timeout
    (*p)->signal(SIGTERM);
    CHECK((*p)->wait(10'000) == 128 + SIGTERM);
    CHECK(!(*p)->running());
  }
  {
    auto p = Process::spawn({"/bin/sleep", "600"}, log);
    REQUIRE(p.ok());
    (*p)->signal(SIGKILL);
    CHECK((*p)->wait(10'000) == 128 + SIGKILL);
  }
  pid_t pid = -1;
  {
    auto p = Process::spawn({"/bin/sleep", "600"}, log);
    REQUIRE(p.ok());
    pid = (*p)->pid();
    CHECK(::kill(pid, 0) == 0);
  }
  // Killed and reaped: the pid no longer names a process of ours.
  errno = 0;
  CHECK(::kill(pid, 0) == -1);
  CHECK(errno == ESRCH);
  remove_tree(dir);
}

TEST_CASE("spawning something that cannot run is an error, not a child") {
  std::string dir = make_temp_dir("tpc-harness-test-");
  REQUIRE(!dir.empty());
  auto missing = Process::spawn({"/nonexistent/tpc-binary"}, dir + "/p.log");
  CHECK(!missing.ok());
  auto not_in_path = Process::spawn({"tpc-no-such-program-in-path"}, dir + "/p.log");
  CHECK(not_in_path.status().code() == Code::not_found);
  CHECK(Process::spawn({}, dir + "/p.log").status().code() == Code::invalid_argument);
  CHECK(Process::spawn({"/bin/true"}, dir + "/p.log", {"NO_EQUALS"}).status().code() ==
        Code::invalid_argument);
  CHECK(!Process::spawn({"/bin/true"}, dir + "/no/such/dir/p.log").ok());
  remove_tree(dir);
}

TEST_CASE("eventually polls until the predicate holds or the time is up") {
  int calls = 0;
  CHECK(eventually([&] { return ++calls >= 3; }, 10'000));
  CHECK(calls == 3);
  CHECK(!eventually([] { return false; }, 30));
}

}  // namespace tpc::testing
