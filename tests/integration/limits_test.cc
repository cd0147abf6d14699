// Limits that keep one client from crashing or locking out the services: the failpoints
// endpoint exists only with --failpoints-endpoint and behind the token, and a client address
// may hold at most --transactions-per-client-max open transactions at the coordinator.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <cctype>

#include "common/failpoint.h"
#include "common/http_client.h"
#include "tests/integration/testbed.h"

using namespace tpc;
using namespace tpc::testing;

namespace {

constexpr int kReceiveTimeoutS = 10;

// POST /v1/transactions over a connection bound to `source` (any 127.0.0.0/8 address is local
// on Linux, so a second loopback address stands for a second client). Returns the whole
// answer, lower-cased.
std::string begin_from(const Url& coordinator, const std::string& source) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  timeval tv{};
  tv.tv_sec = kReceiveTimeoutS;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in from{};
  from.sin_family = AF_INET;
  REQUIRE(::inet_pton(AF_INET, source.c_str(), &from.sin_addr) == 1);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof from) == 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(coordinator.port);
  REQUIRE(::inet_pton(AF_INET, "127.0.0.1", &to.sin_addr) == 1);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0);
  std::string req =
      "POST /v1/transactions HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
  REQUIRE(::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size()));
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

const char kArm[] = R"({"spec":"coord.before_decision_log=crash"})";
const char kArmAgent[] = R"({"spec":"agent.before_commit_prepared=crash"})";

}  // namespace

TEST_CASE("without --failpoints-endpoint POST /v1/failpoints is 404 and arms nothing") {
  Testbed::Options o;
  o.failpoints_endpoint = false;
  Testbed& t = Testbed::fresh(o);
  Http c = t.coord("POST", "/v1/failpoints", kArm);
  CHECK_MESSAGE(c.status == 404, c.describe());
  Http a = t.agent(1, "POST", "/v1/failpoints", kArmAgent);
  CHECK_MESSAGE(a.status == 404, a.describe());
  // A transfer passes both would-be failpoints and commits; both processes live on.
  std::string gid = t.begin();
  REQUIRE(t.move(0, gid, 1, -10).status == 200);
  REQUIRE(t.move(1, gid, 1, 10).status == 200);
  Http commit = t.commit(gid);
  CHECK_MESSAGE(commit.status == 200, commit.describe());
  CHECK(t.coordinator_running());
  CHECK(t.agent_running(1));
  CHECK(t.balance(0, 1) == Testbed::kInitial - 10);
  t.check_invariants();
}

TEST_CASE("with --failpoints-endpoint and --token, POST /v1/failpoints without the token is 401") {
  Testbed::Options o;
  o.coordinator_args = {"--token", "s3cret", "--participant-token", "agent-key"};
  o.agent_args = {"--token", "agent-key", "--coordinator-token", "s3cret"};
  Testbed& t = Testbed::fresh(o);
  Http c = t.coord("POST", "/v1/failpoints", kArm);
  CHECK_MESSAGE(c.status == 401, c.describe());
  Http a = t.agent(1, "POST", "/v1/failpoints", kArmAgent);
  CHECK_MESSAGE(a.status == 401, a.describe());
  // With the token the endpoint answers (404 in a build without failpoints).
  Http ok = t.call(t.coordinator_url(), "POST", "/v1/failpoints", R"({"spec":""})", 5'000,
                   {{"authorization", "Bearer s3cret"}});
  CHECK_MESSAGE(ok.status == (failpoint::compiled_in() ? 200 : 404), ok.describe());
  CHECK(t.coordinator_running());
  CHECK(t.agent_running(1));
}

TEST_CASE("one client address past --transactions-per-client-max gets 429; another still begins") {
  Testbed::Options o;
  o.coordinator_args = {"--transactions-per-client-max", "2"};
  Testbed& t = Testbed::fresh(o);
  std::string g1 = t.begin();
  std::string g2 = t.begin();
  Http third = t.coord("POST", "/v1/transactions", "{}");
  CHECK_MESSAGE(third.status == 429, third.describe());
  REQUIRE(third.body.is_object());
  CHECK(third.body["error"]["code"] == "too_many_requests");
  std::string raw = begin_from(t.coordinator_url(), "127.0.0.1");
  CHECK_MESSAGE(raw.rfind("http/1.1 429", 0) == 0, raw);
  CHECK_MESSAGE(raw.find("\r\nretry-after: 1\r\n") != std::string::npos, raw);

  // Another address is not affected.
  std::string other = begin_from(t.coordinator_url(), "127.0.0.2");
  CHECK_MESSAGE(other.rfind("http/1.1 201", 0) == 0, other);

  // Once one of the first client's transactions ends, it may begin again.
  Http ab = t.abort(g1);
  REQUIRE_MESSAGE(ab.status == 200, ab.describe());
  Http again = t.coord("POST", "/v1/transactions", "{}");
  CHECK_MESSAGE(again.status == 201, again.describe());
  if (again.status == 201) (void)t.abort(again.body["gid"]);
  (void)t.abort(g2);
  t.check_invariants();
}
