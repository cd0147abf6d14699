// Unit tests of the Boost-free pieces of common/: ids, JSON helpers, config, failpoints,
// metrics and the logger.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "common/config.h"
#include "common/failpoint.h"
#include "common/ids.h"
#include "common/json.h"
#include "common/log.h"
#include "common/metrics.h"

using namespace tpc;

TEST_CASE("a gid parses into coordinator, epoch and sequence") {
  auto g = parse_gid("c1-3-42");
  REQUIRE(g.has_value());
  CHECK(g->coordinator == "c1");
  CHECK(g->epoch == 3);
  CHECK(g->seq == 42);
  CHECK(make_gid("c1", 3, 42) == "c1-3-42");
}

TEST_CASE("malformed gids are refused") {
  for (const char* bad : {"", "c1", "c1-3", "-3-4", "c1--4", "c1-3-", "c1-03-4", "c1-3-4x",
                          "c 1-3-4", "c1;-3-4", "c1-3-4-", "c1-99999999999999999999999-1",
                          "c'1-3-4", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-1-1"}) {
    CAPTURE(bad);
    CHECK_FALSE(parse_gid(bad).has_value());
  }
}

TEST_CASE("names use a strict character set") {
  CHECK(valid_coordinator_id("c1"));
  CHECK(valid_coordinator_id("coord_A9"));
  CHECK_FALSE(valid_coordinator_id("c-1"));
  CHECK_FALSE(valid_coordinator_id(""));
  CHECK_FALSE(valid_coordinator_id(std::string(33, 'a')));
  CHECK(valid_participant_name("bank-a_1"));
  CHECK_FALSE(valid_participant_name("a:1"));
  CHECK_FALSE(valid_participant_name("a'1"));
}

TEST_CASE("JSON bodies: objects only, typed fields, clear errors") {
  CHECK(parse_object("")->is_object());
  CHECK(parse_object("  \n")->is_object());
  CHECK_FALSE(parse_object("[1,2]").ok());
  auto bad = parse_object("{\"a\":");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == Code::invalid_argument);
  CHECK(bad.status().message().find("malformed JSON") != std::string::npos);

  auto j = parse_object(R"({"protocol":"2pc","timeout_ms":"x","flag":true,"n":5})");
  REQUIRE(j.ok());
  FieldReader r(*j);
  std::string protocol;
  int64_t timeout = 7, n = 0;
  bool flag = false;
  CHECK(r.string("protocol", &protocol));
  CHECK(protocol == "2pc");
  CHECK_FALSE(r.int64("timeout_ms", &timeout, 1, 100));
  CHECK(timeout == 7);
  CHECK_FALSE(r.ok());
  CHECK(r.status().message().find("timeout_ms") != std::string::npos);
  FieldReader r2(*j);
  CHECK(r2.boolean("flag", &flag));
  CHECK(flag);
  CHECK_FALSE(r2.int64("n", &n, 10, 20));
  CHECK(r2.status().message().find("between 10 and 20") != std::string::npos);
  FieldReader r3(*j);
  std::string missing;
  CHECK_FALSE(r3.string("missing", &missing, true));
  CHECK(r3.status().code() == Code::invalid_argument);
}

TEST_CASE("strict JSON: repeated keys, unknown fields, no library text, echoed input is cut") {
  auto dup = parse_json(R"({"a":{"b":1,"b":2}})");
  REQUIRE_FALSE(dup.ok());
  CHECK(dup.status().message() == "duplicate key \"b\"");
  CHECK(parse_json(R"([{"b":1},{"b":2}])").ok());  // the same key in two objects

  auto huge = parse_json("[1e999]");
  REQUIRE_FALSE(huge.ok());
  CHECK(huge.status().message() == "number out of range at byte 6");
  CHECK(huge.status().message().find("json.exception") == std::string::npos);
  auto bad = parse_json("{\"a\" 1}");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("json.exception") == std::string::npos);

  // Non-integer numbers keep their text only inside "params" arrays.
  auto p = parse_json(R"({"params":[1.50,7],"x":1.50})");
  REQUIRE(p.ok());
  CHECK((*p)["params"][0] == "1.50");
  CHECK((*p)["params"][1] == 7);
  CHECK((*p)["x"].is_number_float());

  auto j = parse_object(R"({"known":1,"other":2})");
  REQUIRE(j.ok());
  FieldReader r(*j);
  int64_t v = 0;
  CHECK(r.int64("known", &v, 0, 10));
  CHECK(r.finish().message() == "unknown field \"other\"");
  r.allow("other");
  CHECK(r.finish().ok());

  CHECK(echo("abc") == "\"abc\"");
  std::string long_gid(10'000, 'g');
  std::string e = echo(long_gid);
  CHECK(e.size() == kEchoBytesMax + 2 + std::string("…").size());
  CHECK(e.find("…") != std::string::npos);
}

TEST_CASE("405 answers list the allowed methods") {
  auto r = method_not_allowed("GET, POST");
  CHECK(r.status == 405);
  CHECK(r.header("allow") == "GET, POST");
  CHECK(parse_json(r.body).ok());
}

TEST_CASE("error responses carry a status and the JSON error body") {
  auto r = error_response(conflict("branch is prepared"));
  CHECK(r.status == 409);
  auto j = parse_json(r.body);
  REQUIRE(j.ok());
  CHECK((*j)["error"]["code"] == "conflict");
  CHECK((*j)["error"]["message"] == "branch is prepared");
  auto u = error_response(unavailable("busy"));
  CHECK(u.status == 503);
  CHECK(u.header("retry-after") == "1");
}

TEST_CASE("config: flags win over env, env over file, repeated options collect") {
  std::vector<OptionSpec> specs = {
      {"listen", "address", "127.0.0.1:7400"},
      {"data-dir", "dir", ""},
      {"participant", "NAME=URL", "", true},
      {"verbose", "more logs", "", false, true},
  };
  const char* argv[] = {"prog", "--data-dir", "/flag", "--participant", "a=u1",
                        "--participant=b=u2", "--verbose", "list"};
  const char* envp[] = {"TPC_DATA_DIR=/env", "TPC_LISTEN=0.0.0.0:1", "HOME=/x", nullptr};
  auto c = Config::parse(specs, 8, argv, envp);
  REQUIRE(c.ok());
  CHECK(c->get("data-dir") == "/flag");
  CHECK(c->get("listen") == "0.0.0.0:1");
  CHECK(c->all("participant") == std::vector<std::string>{"a=u1", "b=u2"});
  CHECK(c->flag("verbose"));
  CHECK(c->positional() == std::vector<std::string>{"list"});

  const char* bad[] = {"prog", "--nope"};
  auto e = Config::parse(specs, 2, bad, nullptr);
  REQUIRE_FALSE(e.ok());
  CHECK(e.status().message().find("--nope") != std::string::npos);
  const char* missing[] = {"prog", "--listen"};
  CHECK_FALSE(Config::parse(specs, 2, missing, nullptr).ok());
  const char* num[] = {"prog", "--listen", "abc"};
  auto n = Config::parse(specs, 3, num, nullptr);
  REQUIRE(n.ok());
  CHECK_FALSE(n->get_int("listen", 0, 10).ok());
}

TEST_CASE("failpoint specs are validated") {
  MemorySink sink;
  Logger log(&sink);
  CHECK_FALSE(failpoint::configure("x=explode", &log, 1).ok());
  CHECK_FALSE(failpoint::configure("x", &log, 1).ok());
  CHECK_FALSE(failpoint::configure("x=101%error", &log, 1).ok());
  CHECK_FALSE(failpoint::configure("x=sleep(abc)", &log, 1).ok());
  if (!failpoint::compiled_in()) {
    CHECK_FALSE(failpoint::configure("x=error", &log, 1).ok());
    return;
  }
  REQUIRE(failpoint::configure("a.b=2*error;c=sleep(1);d=0%error", &log, 1).ok());
  CHECK(failpoint::eval("a.b"));
  CHECK(failpoint::eval("a.b"));
  CHECK_FALSE(failpoint::eval("a.b"));
  CHECK(failpoint::fired("a.b") == 2);
  CHECK_FALSE(failpoint::eval("c"));
  CHECK(failpoint::fired("c") == 1);
  CHECK_FALSE(failpoint::eval("d"));
  CHECK_FALSE(failpoint::eval("unknown"));
  CHECK(sink.find("failpoint fired name=a.b action=2*error", LogLevel::warn).size() == 2);
  REQUIRE(failpoint::configure("", &log, 1).ok());
  CHECK_FALSE(failpoint::eval("a.b"));
}

TEST_CASE("a paused failpoint holds its thread until the failpoints are configured again") {
  if (!failpoint::compiled_in()) return;
  MemorySink sink;
  Logger log(&sink);
  REQUIRE(failpoint::configure("p=1*pause", &log, 1).ok());
  std::atomic<bool> passed{false};
  std::thread t([&] {
    (void)failpoint::eval("p");
    passed = true;
  });
  // Waits for the failpoint's own log line, then releases it by configuring again.
  while (sink.find("failpoint fired name=p", LogLevel::warn).empty()) std::this_thread::yield();
  CHECK_FALSE(passed.load());
  REQUIRE(failpoint::configure("", &log, 1).ok());
  t.join();
  CHECK(passed.load());
}

TEST_CASE("metrics render in the Prometheus text format") {
  Metrics m;
  m.counter("tpc_x_total", "x", {{"outcome", "committed"}}).inc(3);
  m.gauge("tpc_open", "open", [] { return 2.0; });
  auto& h = m.histogram("tpc_lat_seconds", "lat", {0.1, 1});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  std::string out = m.render();
  CHECK(out.find("# TYPE tpc_x_total counter\ntpc_x_total{outcome=\"committed\"} 3\n") != std::string::npos);
  CHECK(out.find("tpc_open 2\n") != std::string::npos);
  CHECK(out.find("tpc_lat_seconds_bucket{le=\"0.1\"} 1\n") != std::string::npos);
  CHECK(out.find("tpc_lat_seconds_bucket{le=\"1\"} 2\n") != std::string::npos);
  CHECK(out.find("tpc_lat_seconds_bucket{le=\"+Inf\"} 3\n") != std::string::npos);
  CHECK(out.find("tpc_lat_seconds_count 3\n") != std::string::npos);
}

TEST_CASE("log lines are one line of key=value text, or JSON") {
  MemorySink sink;
  Logger text(&sink);
  text.info("preparing->aborting", {{"gid", "c1-3-42"}, {"reason", "vote no"}, {"n", 2}});
  Logger json(&sink, LogFormat::json);
  json.warn("retry", {{"gid", "c1-1-1"}});
  Logger quiet(&sink, LogFormat::text, LogLevel::warn);
  quiet.info("hidden");
  auto lines = sink.lines();
  REQUIRE(lines.size() == 2);
  CHECK(lines[0] == "INFO gid=c1-3-42 preparing->aborting reason=\"vote no\" n=2");
  auto j = parse_json(lines[1]);
  REQUIRE(j.ok());
  CHECK((*j)["level"] == "WARN");
  CHECK((*j)["gid"] == "c1-1-1");
}
