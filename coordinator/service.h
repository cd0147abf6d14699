// CoordinatorService: the driver around CoordinatorMachine. It owns the HTTP server (the REST
// API of docs/DESIGN.md §3) and the decision log, reaches time, timers, the agents and its
// workers through a Runtime (common/runtime.h), and carries out the machine's effects in
// order: persist, then send, then reply. Reads of the log (answers from finished records,
// compaction, rewrites of finished records) run on the runtime's workers, never on a network
// thread.
//
// Start-up: the epoch is bumped and synced, the log replayed, decided transactions handed to
// the machine, which drives them to their outcome; /healthz answers 200 once they are all
// finished (or recovery_wait_ms passed, whichever is first; the rest goes on in the
// background and is listed as in doubt).
//
// Threads: the machine is serialised by one mutex; effects run outside it, on whichever thread
// produced them (a loop thread, a worker, or the log's writer thread for on_persisted). A failed
// write to the decision log stops the process: it cannot know whether the decision is durable.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common/http.h"
#include "common/http_server.h"
#include "common/json.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/runtime.h"
#include "coordinator/coordinator_machine.h"
#include "wal/decision_log.h"

namespace tpc::coord {

// How protocol messages reach the agents. Empty: HTTP (the HttpClient). The benchmark plugs in
// participants that answer at once, to measure the coordinator alone.
using Transport = std::function<void(const Url& url, HttpRequest request, SendOptions opts,
                                     std::function<void(HttpResult)> done)>;

struct CoordinatorConfig {
  HttpServerOptions http;
  int threads = 2;
  std::string token;              // clients and agents must send "Authorization: Bearer T"
  std::string participant_token;  // sent to agents
  std::map<std::string, std::string> participants;  // name → URL, for one-shot transactions
  std::vector<Url> op_url_prefixes;  // an HTTP op's URL must lie under one; empty: any
  MachineOptions machine;
  int64_t message_timeout_ms = 5'000;     // commit/abort/pre-commit messages, per attempt
  int64_t retention_ms = 24 * 3'600'000;  // finished outcomes stay answerable this long
  int64_t compaction_interval_ms = 60'000;
  int64_t recovery_wait_ms = 30'000;  // /healthz waits at most this for re-driven work
  int64_t tick_ms = 10;
  size_t list_limit_max = 1'000;
  size_t statements_max = 1'000;  // statements of one branch in a one-shot transaction
  size_t agent_requests_max = 4;  // phase-2 requests in flight per agent; more messages wait
  size_t batch_max = 64;          // messages in one POST /v1/batch (1: never batch)
  size_t jobs_max = 10'000;       // log reads waiting for the worker; past it a request gets 503
  size_t transactions_per_client_max = 10'000;  // active transactions begun from one address
  bool failpoints_endpoint = false;             // serve POST /v1/failpoints (else 404)
  Transport transport;                          // empty: HTTP
};

// Random low bits of every epoch: two starts at the same wall second, even with a lost log,
// draw different epochs (collision chance 2^-20). Epochs stay below 2^53 (JSON-safe) until
// the year 2242 and take at most 16 decimal digits of the gid.
inline constexpr unsigned kEpochRandomBits = 20;

// The epoch of a start: greater than `previous` (the last start's, from the log), and at least
// wall_seconds in the high bits, with `random` (its low kEpochRandomBits used) in the low bits.
uint64_t next_epoch(uint64_t previous, uint64_t wall_seconds, uint64_t random);

class CoordinatorService {
 public:
  // Replays `log` and starts serving. `logger` must outlive the service.
  static Result<std::unique_ptr<CoordinatorService>> start(const CoordinatorConfig& cfg,
                                                           std::unique_ptr<wal::DecisionLog> log,
                                                           Logger& logger);
  // The same driver over another runtime (the simulator): no HTTP server; the caller delivers
  // requests to handle(). rt must outlive the service.
  static Result<std::unique_ptr<CoordinatorService>> start_with(
      const CoordinatorConfig& cfg, std::unique_ptr<wal::DecisionLog> log, Logger& logger,
      Runtime& rt);
  ~CoordinatorService();

  uint16_t port() const;
  bool healthy() const { return healthy_.load(); }
  uint64_t epoch() const { return epoch_; }
  // Stops accepting, lets requests in flight finish (up to drain_ms), flushes the log and
  // stops the threads. Idempotent.
  void shutdown(int64_t drain_ms);
  // Calls fn(signo) on SIGINT/SIGTERM.
  void on_stop_signal(std::function<void(int)> fn);

  // The request handler, callable without sockets (tests). A begin counts against
  // transactions_per_client_max by HttpRequest::client.
  void handle(HttpRequest&& req, Responder respond);

 private:
  CoordinatorService(const CoordinatorConfig& cfg, std::unique_ptr<wal::DecisionLog> log,
                     Logger& logger, Runtime& rt);
  Status open();  // replays the log
  void serve();   // drives what recovery found; timers on
  Status recover();
  void register_metrics();

  // Effects.
  void run(Ready ready);
  void persist(std::vector<Persist> items);
  // End records: written unsynced, durable once a later synced write completes.
  std::vector<std::string> take_ends_written();
  void ends_written(const std::vector<std::string>& gids);
  void ends_durable(const std::vector<std::string>& gids);
  void sync_ends();
  void send(const Message& m);
  // The outbox for phase-2 messages: per agent, they wait while agent_requests_max requests
  // are out, then go together.
  struct Outgoing {
    Message m;
    std::string target;
    std::string body;
    int64_t timeout_ms = 0;
    bool exec = false;
  };
  void enqueue(const std::string& lane, const Url& url, Outgoing out);
  void send_alone(const Url& url, Outgoing out);
  void pump(const std::string& lane);
  bool take_batch(const std::string& lane, std::vector<Outgoing>* batch, Url* url);
  static HttpRequest batch_request(std::vector<Outgoing>& batch);
  void deliver_batch(const std::vector<Outgoing>& items, const HttpResult& res);
  bool lane_done(const std::string& lane);
  void deliver(const Message& m, bool exec, const HttpResult& res);
  // `to_agent`: the participants' token goes with it (not with an HTTP op to a service).
  void transmit(const Url& url, HttpRequest req, SendOptions opts,
                std::function<void(HttpResult)> done, bool to_agent = true);
  // TCC and saga: one op call, its answer fed back to the machine.
  void call_op(const OpCall& c);
  void op_answered(const OpReply& r);
  void delivered(const Message& m, bool exec, BranchReply br, Json results, bool answered);
  void reply(const ClientReply& r);
  void answer(const ClientReply& r, const Responder& respond);
  ClientReply from_log(const ClientReply& r);
  template <class Fn>
  void with_machine(Fn&& fn);

  // Handlers.
  void begin(const HttpRequest& req, const Responder& respond);
  void run_oneshot(const HttpRequest& req, const Responder& respond);
  // Registers a waiter answering through `respond`, then calls `start` under the machine's lock
  // with it; when `start` fails the waiter is dropped and its error returned (for the caller
  // to answer).
  using StartFn =
      std::function<Result<std::string>(CoordinatorMachine&, uint64_t waiter, int64_t now_ms)>;
  Status start_waiting(const Responder& respond, const StartFn& start);
  void run_saga(const Json& body, const Responder& respond);
  // A transactional message: POST /v1/transactions, or /run with its local op (one_request).
  void begin_msg(const Json& j, bool one_request, const std::string& client,
                 const Responder& respond);
  HttpResponse too_many_for_client() const;
  // Notifications (docs/DESIGN.md §10.3): /v1/notifications[/{id}].
  void notifications(const std::vector<std::string_view>& parts, const HttpRequest& req,
                     const Responder& respond);
  void begin_notification(const HttpRequest& req, const Responder& respond);
  void get_notification(const std::string& id, const Responder& respond);
  void list_notifications(const HttpRequest& req, const Responder& respond);
  Result<size_t> list_limit(const HttpRequest& req) const;
  Status check_ops(const OpBranch& b) const;
  // A request's "notify" op (empty: none) as check_ops checks ops.
  Status check_notify(const std::string& notify) const;
  bool url_allowed(std::string_view url) const;
  void try_branch(const std::string& gid, const HttpRequest& req, const Responder& respond,
                  int64_t now);
  void list(const HttpRequest& req, const Responder& respond);
  void transaction(const std::string& gid, std::string_view action, const HttpRequest& req,
                   const Responder& respond);
  void get_transaction(const std::string& gid, const Responder& respond);
  void enlist(const std::string& gid, const HttpRequest& req, const Responder& respond,
              int64_t now);
  void finish(const std::string& gid, bool commit, const HttpRequest& req, const Responder& respond,
              int64_t now);
  void resolve(const std::string& gid, const HttpRequest& req, const Responder& respond,
               int64_t now);
  void status(const Responder& respond);
  void in_doubt(const Responder& respond);

  void tick();
  // How a heuristic report or a forget changes a finished record (nullopt: no change).
  using RecordChange =
      std::function<Result<std::optional<wal::TxnRecord>>(std::optional<wal::TxnRecord>)>;
  void rewrite_finished(const std::string& gid, const Responder& respond, RecordChange change);
  void forget(const std::string& gid, const Responder& respond);
  void schedule_compaction();
  void compact_once();

  CoordinatorConfig cfg_;
  Logger& log_;
  Runtime& rt_;  // time, timers, transport and workers (*real_ unless given)
  std::unique_ptr<RealRuntime> real_;
  std::unique_ptr<wal::DecisionLog> wal_;
  std::unique_ptr<HttpServer> server_;
  Metrics metrics_;
  Histogram* commit_latency_ = nullptr;

  mutable std::mutex mu_;  // guards machine_
  CoordinatorMachine machine_;

  std::mutex waiters_mu_;
  struct Pending {
    Responder respond;
    int64_t started_ms = 0;
    bool run = false;  // a one-shot request: the answer carries the branches' results
  };
  std::unordered_map<uint64_t, Pending> waiters_;

  // One-shot transactions: each branch's statements until they were sent, and each branch's
  // results until the client is answered.
  struct RunState {
    std::map<std::string, std::string> statements;  // participant → statements array
    Json results = Json::object();                  // participant → results array
  };
  std::mutex runs_mu_;
  std::unordered_map<std::string, RunState> runs_;

  struct Lane {
    Url url;
    std::deque<Outgoing> queue;
    size_t in_flight = 0;
  };
  std::mutex outbox_mu_;
  std::unordered_map<std::string, Lane> lanes_;
  std::atomic<uint64_t> next_waiter_{1};

  // End records whose write completed unsynced; a synced write started after that covers them.
  std::mutex ends_mu_;
  std::vector<std::string> ends_written_;
  int64_t ends_since_ms_ = 0;   // when the oldest of them was written
  bool ends_sync_out_ = false;  // an empty synced write for them is in flight
  static constexpr int64_t kEndSyncDelayMs = 100;

  uint64_t epoch_ = 0;
  int64_t started_ms_ = 0;
  std::atomic<bool> healthy_{false};
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> tick_timer_{0};

  std::atomic<uint64_t> compaction_passes_{0};  // reads of the log by compaction
  std::mutex rewrite_mu_;                       // one rewrite of a finished record at a time
  std::mutex shutdown_mu_;                      // guards shut_down_
  bool shut_down_ = false;
  bool started_ = false;  // start() completed
  size_t recovering_at_start_ = 0;
  bool redrive_failpoint_done_ = false;

  // Per client address (HttpRequest::client), the gids it began that may still be active;
  // under mu_. Gids no longer active or preparing are dropped when the limit is checked.
  std::unordered_map<std::string, std::vector<std::string>> client_txns_;
  size_t client_txns_tracked_ = 0;  // gids in client_txns_; under mu_
  // Drops `client`'s gids that are no longer open; returns how many remain. Under mu_.
  size_t prune_client_txns(const std::string& client);
};

}  // namespace tpc::coord
