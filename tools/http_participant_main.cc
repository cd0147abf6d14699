// tpc-http-participant: an in-memory account ledger that answers HTTP ops (DESIGN.md §8) as a
// TCC/Saga participant, with fault injection and a call log; for integration tests and
// scripts/demo.sh. The endpoints are described in tools/http_participant.h.
//
//   tpc-http-participant --listen HOST:PORT [--token T] [--threads N]
//
// Prints exactly one line, "listening on HOST:PORT", to stdout once it accepts (port 0 picks a
// free port, shown in that line). SIGINT or SIGTERM stop it.
#include <atomic>
#include <cstdio>
#include <future>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/config.h"
#include "common/event_loop.h"
#include "common/http_server.h"
#include "tools/http_participant.h"

extern char** environ;

namespace {

constexpr char kProgram[] = "tpc-http-participant";
constexpr int64_t kDrainMs = 5'000;

std::vector<tpc::OptionSpec> specs() {
  std::vector<tpc::OptionSpec> s = {
      {"listen", "HOST:PORT to serve on (port 0 picks a free one)", ""},
      {"token", "bearer token every request but /healthz must send", ""},
      {"threads", "event-loop threads", "2"},
      {"help", "print this help", "", false, true},
  };
  tpc::add_logging_options(&s);
  tpc::add_version_option(&s);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  auto spec = specs();
  auto parsed = tpc::parse_command_line(
      kProgram, "tpc-http-participant --listen HOST:PORT [options]", spec, argc, argv);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const tpc::Config& c = std::get<tpc::Config>(parsed);
  if (c.get("listen").empty()) return tpc::fail(kProgram, "--listen is required", 2);
  auto listen = tpc::parse_listen(c.get("listen"));
  if (!listen.ok()) return tpc::fail(kProgram, listen.status().message(), 2);
  auto threads = c.get_int("threads", 1, 64);
  if (!threads.ok()) return tpc::fail(kProgram, threads.status().message(), 2);
  auto logging = tpc::make_logging(c);
  if (!logging.ok()) return tpc::fail(kProgram, logging.status().message(), 2);
  tpc::Logger& log = *(*logging)->logger;

  // Destroyed in reverse: the server, then the participant (its held Responders), then the loop.
  tpc::EventLoop loop(static_cast<int>(*threads));
  tpc::tools::HttpParticipantOptions po;
  po.token = c.get("token");
  po.log = &log;
  tpc::tools::HttpParticipant participant(po);

  std::promise<int> stop;
  std::atomic<bool> stopping{false};
  loop.on_stop_signal([&](int signo) {
    if (!stopping.exchange(true)) stop.set_value(signo);
  });
  loop.start();

  tpc::HttpServerOptions so;
  so.host = listen->first;
  so.port = listen->second;
  auto server = tpc::HttpServer::start(
      loop, so, [&participant](tpc::HttpRequest&& req, tpc::Responder respond) {
        participant.handle(std::move(req), std::move(respond));
      });
  if (!server.ok())
    return tpc::fail(kProgram,
                     "cannot listen on " + c.get("listen") + ": " + server.status().message());

  std::string host = so.host.find(':') == std::string::npos ? so.host : "[" + so.host + "]";
  std::string where = host + ":" + std::to_string((*server)->port());
  std::printf("listening on %s\n", where.c_str());
  std::fflush(stdout);
  log.info("listening", {{"address", where}, {"token", po.token.empty() ? "none" : "required"}});

  int signo = stop.get_future().get();
  log.info("stopping", {{"signal", signo}});
  (*server)->stop();
  participant.stop();  // late answers go now; hung requests are dropped (500)
  if (!(*server)->wait_idle(kDrainMs))
    log.warn("requests still in flight after the drain period", {{"drain_ms", kDrainMs}});
  loop.stop();
  loop.join();
  return 0;
}
