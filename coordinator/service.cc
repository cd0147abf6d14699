#include "coordinator/service.h"

#include <algorithm>
#include <cstdlib>

#include "common/cli.h"
#include "common/failpoint.h"
#include "common/json.h"
#include "common/wire.h"
#include "coordinator/codec.h"

namespace tpc::coord {
namespace {

constexpr char kEpochKey[] = "epoch";
constexpr char kForgottenKey[] = "forgotten_below";

std::optional<GidParts> parse_horizon(const std::string& text) {
  size_t colon = text.find(':');
  if (colon == std::string::npos) return std::nullopt;
  try {
    return GidParts{"", std::stoull(text.substr(0, colon)), std::stoull(text.substr(colon + 1))};
  } catch (...) {
    return std::nullopt;
  }
}

// The answer when the worker's queue is full (jobs_max).
HttpResponse busy() {
  HttpResponse r =
      error_response(unavailable("too many log reads waiting for the worker; try again"));
  r.headers.emplace_back("retry-after", "1");
  return r;
}

}  // namespace

uint64_t next_epoch(uint64_t previous, uint64_t wall_seconds, uint64_t random) {
  const uint64_t high = std::max<uint64_t>((previous >> kEpochRandomBits) + 1, wall_seconds);
  return (high << kEpochRandomBits) | (random & ((uint64_t{1} << kEpochRandomBits) - 1));
}

CoordinatorService::CoordinatorService(const CoordinatorConfig& cfg,
                                       std::unique_ptr<wal::DecisionLog> log, Logger& logger,
                                       Runtime& rt)
    : cfg_(cfg), log_(logger), rt_(rt), wal_(std::move(log)), machine_(cfg.machine, logger) {}

CoordinatorService::~CoordinatorService() {
  shutdown(0);
}

Result<std::unique_ptr<CoordinatorService>> CoordinatorService::start(
    const CoordinatorConfig& cfg, std::unique_ptr<wal::DecisionLog> log, Logger& logger) {
  // One worker for the log reads off the network threads (answers from finished records,
  // rewrites of finished records, compaction), in order: a compaction pass never erases a
  // record that a rewrite is changing. An answer may wait behind a compaction pass.
  auto real = std::make_unique<RealRuntime>(cfg.threads, 1, cfg.jobs_max);
  std::unique_ptr<CoordinatorService> s(new CoordinatorService(cfg, std::move(log), logger, *real));
  s->real_ = std::move(real);
  TPC_RETURN_IF_ERROR(s->open());
  s->real_->start();
  CoordinatorService* self = s.get();
  auto server =
      HttpServer::start(s->real_->loop(), cfg.http, [self](HttpRequest&& req, Responder respond) {
        self->handle(std::move(req), std::move(respond));
      });
  if (!server.ok()) {
    s->real_->stop();
    return server.status();
  }
  s->server_ = std::move(*server);
  s->serve();
  return s;
}

Result<std::unique_ptr<CoordinatorService>> CoordinatorService::start_with(
    const CoordinatorConfig& cfg, std::unique_ptr<wal::DecisionLog> log, Logger& logger,
    Runtime& rt) {
  std::unique_ptr<CoordinatorService> s(new CoordinatorService(cfg, std::move(log), logger, rt));
  TPC_RETURN_IF_ERROR(s->open());
  s->serve();
  return s;
}

Status CoordinatorService::open() {
  started_ms_ = rt_.now_ms();
  TPC_RETURN_IF_ERROR(recover());
  register_metrics();
  return ok_status();
}

void CoordinatorService::serve() {
  started_ = true;
  Ready ready;
  {
    std::lock_guard lock(mu_);
    ready = machine_.take_ready();
  }
  run(std::move(ready));
  tick();
  schedule_compaction();
  log_.info("coordinator started", {{"id", cfg_.machine.coordinator_id},
                                    {"epoch", epoch_},
                                    {"listen", cfg_.http.host + ":" + std::to_string(port())},
                                    {"recovering", machine_.recovering()}});
}

Status CoordinatorService::recover() {
  auto epoch_text = wal_->get_meta(kEpochKey);
  if (!epoch_text.ok()) return epoch_text.status();
  uint64_t previous = 0;
  if (epoch_text->has_value()) {
    try {
      previous = std::stoull(**epoch_text);
    } catch (...) {
      return corruption("the decision log's epoch is not a number: \"" + **epoch_text + "\"");
    }
  }
  // The epoch grows at every start of the same log (agents roll back unprepared branches of
  // older epochs), and its random low bits keep it unique without trusting the clock: a
  // coordinator whose log was lost and whose clock is back at an earlier start's second still
  // issues new gids.
  epoch_ = next_epoch(previous, static_cast<uint64_t>(rt_.wall_ms() / 1000), rt_.random64());
  TPC_RETURN_IF_ERROR(wal_->put_meta(kEpochKey, std::to_string(epoch_)));

  std::optional<GidParts> forgotten;
  auto horizon = wal_->get_meta(kForgottenKey);
  if (!horizon.ok()) return horizon.status();
  if (horizon->has_value()) {
    forgotten = parse_horizon(**horizon);
    if (!forgotten)
      return corruption("the decision log's horizon is malformed: \"" + **horizon + "\"");
    forgotten->coordinator = cfg_.machine.coordinator_id;
  }

  std::vector<wal::TxnRecord> unfinished, heuristic;
  uint64_t ended = 0;
  Status st = wal_->for_each([&](wal::TxnRecord&& r) {
    if (!r.ended)
      unfinished.push_back(std::move(r));
    else if (++ended; r.heuristic_mixed)
      heuristic.push_back(std::move(r));
  });
  if (!st.ok()) return Status(st.code(), "cannot replay the decision log: " + st.message());
  log_.info("decision log replayed", {{"epoch", epoch_},
                                      {"unfinished", static_cast<uint64_t>(unfinished.size())},
                                      {"ended", ended}});
  std::lock_guard lock(mu_);
  machine_.recover(epoch_, forgotten, std::move(unfinished), rt_.now_ms());
  for (auto& r : heuristic) machine_.remember_heuristic(r);
  recovering_at_start_ = machine_.recovering();
  return ok_status();
}

uint16_t CoordinatorService::port() const {
  return server_ ? server_->port() : 0;
}

void CoordinatorService::on_stop_signal(std::function<void(int)> fn) {
  if (real_) real_->loop().on_stop_signal(std::move(fn));
}

void CoordinatorService::shutdown(int64_t drain_ms) {
  {
    std::lock_guard lock(shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  stopping_ = true;
  if (server_) {
    server_->stop();
    if (!server_->wait_idle(drain_ms))
      log_.warn("shutdown: requests still in flight after the drain period",
                {{"drain_ms", drain_ms}});
  }
  if (uint64_t t = tick_timer_.load()) rt_.cancel(t);
  wal_->flush();
  if (real_) real_->stop();  // drains the workers, then stops the loop
  server_.reset();
  if (started_) log_.info("coordinator stopped", {{"epoch", epoch_}});
}

template <class Fn>
void CoordinatorService::with_machine(Fn&& fn) {
  Ready ready;
  {
    std::lock_guard lock(mu_);
    fn(machine_);
    ready = machine_.take_ready();
  }
  if (!ready.empty()) run(std::move(ready));
}

// --- effects -------------------------------------------------------------------------------

void CoordinatorService::run(Ready ready) {
  if (!ready.persist.empty()) persist(std::move(ready.persist));
  for (const Message& m : ready.messages) send(m);
  for (const OpCall& c : ready.calls) call_op(c);
  for (const ClientReply& r : ready.replies) reply(r);
}

namespace {

// The failpoint fired once a synced record of this kind is durable, before the machine
// hears of it (and so before anything that depends on it is sent).
const char* logged_failpoint(const wal::TxnRecord& rec) {
  switch (rec.protocol) {
    case Protocol::tcc:
      if (rec.decision == wal::Decision::registered) return "coord.after_try_registered";
      if (rec.decision == wal::Decision::commit) return "coord.after_confirm_logged";
      return nullptr;
    case Protocol::saga:
      if (rec.decision == wal::Decision::running) return "coord.after_saga_logged";
      if (rec.decision == wal::Decision::aborted) return "coord.after_compensate_logged";
      return nullptr;
    case Protocol::msg:
      if (rec.decision == wal::Decision::half) return "coord.after_half_logged";
      if (rec.decision == wal::Decision::commit) return "coord.after_msg_commit_logged";
      return nullptr;
    default:
      return rec.decision == wal::Decision::precommit ? "coord.after_precommit_logged"
                                                      : "coord.after_decision_log";
  }
}

}  // namespace

void CoordinatorService::persist(std::vector<Persist> items) {
  std::vector<wal::LogWrite> writes;
  std::vector<std::pair<std::string, uint64_t>> notify;
  std::vector<std::string> ends;
  std::vector<const char*> failpoints;
  bool sync = false;
  for (auto& p : items) {
    sync = sync || p.sync;
    if (p.notify) {
      notify.emplace_back(p.record.gid, p.seq);
      const char* fp = logged_failpoint(p.record);
      if (fp && std::find(failpoints.begin(), failpoints.end(), fp) == failpoints.end())
        failpoints.push_back(fp);
    }
    if (p.record.ended) ends.push_back(p.record.gid);
    writes.push_back(wal::LogWrite::put(std::move(p.record)));
  }
  if (sync) TPC_FAILPOINT("coord.before_decision_log");
  if (!ends.empty()) TPC_FAILPOINT("coord.before_end_record");
  // A synced write makes every write completed before it durable: the end records written
  // unsynced so far, and its own.
  std::vector<std::string> covered;
  if (sync) covered = take_ends_written();
  covered.insert(covered.end(), ends.begin(), ends.end());
  wal_->write(std::move(writes), sync,
              [this, sync, failpoints = std::move(failpoints), notify = std::move(notify),
               ends = std::move(ends), covered = std::move(covered)](Status st) {
                if (!st.ok()) {
                  // Whether the records reached the disk is unknown: stop rather than guess.
                  // Recovery after a restart reads what is there.
                  log_.error("decision log write failed; stopping", {{"error", st.to_string()}});
                  std::_Exit(3);
                }
                if (sync)
                  ends_durable(covered);
                else
                  ends_written(ends);
                if (notify.empty()) return;
                for (const char* fp : failpoints) TPC_FAILPOINT(fp);
                with_machine([&](CoordinatorMachine& m) {
                  int64_t now = rt_.now_ms();
                  for (auto& [gid, seq] : notify) m.on_persisted(gid, now, seq);
                });
              });
}

std::vector<std::string> CoordinatorService::take_ends_written() {
  std::lock_guard lock(ends_mu_);
  std::vector<std::string> out;
  out.swap(ends_written_);
  return out;
}

void CoordinatorService::ends_written(const std::vector<std::string>& gids) {
  if (gids.empty()) return;
  std::lock_guard lock(ends_mu_);
  if (ends_written_.empty()) ends_since_ms_ = rt_.now_ms();
  ends_written_.insert(ends_written_.end(), gids.begin(), gids.end());
}

void CoordinatorService::ends_durable(const std::vector<std::string>& gids) {
  if (gids.empty()) return;
  std::lock_guard lock(mu_);
  machine_.on_ends_durable(gids);
}

// End records wait for a synced write to cover them (finished_below, and so the agents'
// marker purge, waits with them). Under load the next decision does; when none came for
// kEndSyncDelayMs, an empty synced write does.
void CoordinatorService::sync_ends() {
  {
    std::lock_guard lock(ends_mu_);
    if (ends_written_.empty() || ends_sync_out_ || rt_.now_ms() - ends_since_ms_ < kEndSyncDelayMs)
      return;
    ends_sync_out_ = true;
  }
  std::vector<std::string> covered = take_ends_written();
  wal_->write({}, true, [this, covered = std::move(covered)](Status st) {
    if (!st.ok()) {
      log_.error("decision log write failed; stopping", {{"error", st.to_string()}});
      std::_Exit(3);
    }
    ends_durable(covered);
    std::lock_guard lock(ends_mu_);
    ends_sync_out_ = false;
  });
}

void CoordinatorService::send(const Message& m) {
  auto url = parse_url(m.url);
  if (!url.ok()) {
    with_machine([&](CoordinatorMachine& mach) {
      mach.on_reply(
          BranchReply{m.gid, m.participant, m.kind, ReplyKind::failed, url.status().message()},
          rt_.now_ms());
    });
    return;
  }
  bool exec = m.kind == MsgKind::exec_prepare || m.kind == MsgKind::exec_commit;
  std::string_view action = m.kind == MsgKind::commit_one_phase ? wire::kCommit
                            : exec                              ? wire::kExec
                                                                : msg_name(m.kind);
  std::string target = std::string(wire::kBranchesPrefix) + m.gid + "/" + std::string(action);
  std::string body;
  if (exec) {
    std::string statements;
    {
      std::lock_guard lock(runs_mu_);
      auto it = runs_.find(m.gid);
      if (it != runs_.end()) {
        auto st = it->second.statements.find(m.participant);
        if (st != it->second.statements.end()) {
          statements = std::move(st->second);  // sent once: a resend never carries them
          it->second.statements.erase(st);
        }
      }
    }
    body = encode_message_body(m, statements);
  } else {
    body = encode_message_body(m);
  }
  int64_t timeout_ms = m.kind == MsgKind::prepare || m.kind == MsgKind::exec_prepare
                           ? cfg_.machine.prepare_timeout_ms
                           : cfg_.message_timeout_ms;
  Outgoing out{m, std::move(target), std::move(body), timeout_ms, exec};
  // Only phase-2 messages are batched: running them never waits on another transaction's vote.
  // A prepare or a statement may wait on a lock held by a transaction whose own vote would then
  // be stuck in the same batch's answer — a deadlock until the prepare timeout. They go alone.
  bool phase2 = m.kind == MsgKind::commit || m.kind == MsgKind::abort ||
                m.kind == MsgKind::precommit || m.kind == MsgKind::commit_one_phase;
  if (phase2) {
    enqueue(url->to_string(), *url, std::move(out));
    return;
  }
  send_alone(*url, std::move(out));
}

void CoordinatorService::send_alone(const Url& url, Outgoing out) {
  HttpRequest req;
  req.target = std::move(out.target);
  req.body = std::move(out.body);
  SendOptions opts;
  opts.timeout_ms = out.timeout_ms;
  opts.idempotent = !out.exec;  // statements must never run twice: no automatic retry
  transmit(
      url, std::move(req), opts,
      [this, m = std::move(out.m), exec = out.exec](HttpResult res) { deliver(m, exec, res); });
}

// Every request to an agent is a POST, with the participants' token when there is one.
void CoordinatorService::transmit(const Url& url, HttpRequest req, SendOptions opts,
                                  std::function<void(HttpResult)> done, bool to_agent) {
  req.method = "POST";
  if (to_agent && !cfg_.participant_token.empty())
    req.headers.emplace_back("authorization", "Bearer " + cfg_.participant_token);
  if (cfg_.transport)
    cfg_.transport(url, std::move(req), opts, std::move(done));
  else
    rt_.send(url, std::move(req), opts, std::move(done));
}

// An op call (docs/DESIGN.md §8): a SQL op through its agent's step endpoint, an HTTP op
// straight to its URL. Never retried by the transport: the machine counts every attempt.
void CoordinatorService::call_op(const OpCall& c) {
  auto fail = [&](std::string why) {
    op_answered(OpReply{c.gid, c.branch, c.op, OpOutcome::business_failure, "", std::move(why), 0});
  };
  auto target = decode_op_target(c.spec);
  if (!target.ok()) return fail(target.status().message());
  SendOptions opts;
  opts.timeout_ms = cfg_.message_timeout_ms;
  opts.idempotent = false;
  bool sql = target->sql;
  auto done = [this, c, sql](HttpResult res) {
    op_answered(decode_op_answer(c, sql, res.http_status, res.body, res.header("retry-after"),
                                 res.status, rt_.wall_ms()));
  };
  HttpRequest req;
  if (sql) {
    auto it = cfg_.participants.find(target->participant);
    if (it == cfg_.participants.end())
      return fail("unknown participant \"" + target->participant +
                  "\" (name it with --participant NAME=URL)");
    auto url = parse_url(it->second);
    if (!url.ok()) return fail(url.status().message());
    req.target = std::string(wire::kBranchesPrefix) + c.gid + "/" + std::string(wire::kStep);
    req.body = encode_step_body(c, target->body);
    return transmit(*url, std::move(req), opts, std::move(done));
  }
  auto url = parse_url(target->url);
  if (!url.ok()) return fail(url.status().message());
  // The op's URL is the whole target: nothing is appended to its path.
  req.target = url->base_path.empty() ? "/" : url->base_path;
  url->base_path.clear();
  req.headers = op_call_headers(c);
  for (auto& h : target->headers) req.headers.push_back(h);
  req.body = std::move(target->body);
  transmit(*url, std::move(req), opts, std::move(done), false);
}

void CoordinatorService::op_answered(const OpReply& r) {
  if (r.outcome == OpOutcome::ok && r.op == StepOp::confirm)
    TPC_FAILPOINT("coord.after_first_confirm");
  if (r.outcome == OpOutcome::ok && r.op == StepOp::action)
    TPC_FAILPOINT("coord.after_first_step_done");
  if (r.outcome == OpOutcome::ok && r.op == StepOp::deliver)
    TPC_FAILPOINT("coord.after_first_delivery");
  with_machine([&](CoordinatorMachine& m) { m.on_op_reply(r, rt_.now_ms()); });
}

void CoordinatorService::deliver(const Message& m, bool exec, const HttpResult& res) {
  Json results;
  BranchReply br = decode_branch_answer(m, res.http_status, res.body, res.status, &results);
  delivered(m, exec, std::move(br), std::move(results), res.status.ok());
}

void CoordinatorService::delivered(const Message& m, bool exec, BranchReply br, Json results,
                                   bool answered) {
  if (exec && !results.is_null()) {
    std::lock_guard lock(runs_mu_);
    auto it = runs_.find(m.gid);
    if (it != runs_.end()) it->second.results[m.participant] = std::move(results);
  }
  // Fired once a message of the kind has reached its agent (its answer is back).
  if (answered && m.kind == MsgKind::prepare) TPC_FAILPOINT("coord.after_first_prepare_sent");
  if (answered && m.kind == MsgKind::precommit) TPC_FAILPOINT("coord.after_first_precommit_sent");
  if (br.reply == ReplyKind::committed &&
      (m.kind == MsgKind::commit || m.kind == MsgKind::commit_one_phase))
    TPC_FAILPOINT("coord.after_first_branch_committed");
  with_machine([&](CoordinatorMachine& mach) { mach.on_reply(br, rt_.now_ms()); });
}

void CoordinatorService::enqueue(const std::string& lane_key, const Url& url, Outgoing out) {
  {
    std::lock_guard lock(outbox_mu_);
    Lane& lane = lanes_[lane_key];
    lane.url = url;
    lane.queue.push_back(std::move(out));
  }
  pump(lane_key);
}

// Sends what waits in a lane while fewer than agent_requests_max requests are in flight: one
// message alone, or several in one POST /v1/batch. Under light load every message goes at once;
// under heavy load they gather while earlier requests are out, and travel together.
void CoordinatorService::pump(const std::string& lane_key) {
  for (;;) {
    std::vector<Outgoing> batch;
    Url url;
    if (!take_batch(lane_key, &batch, &url)) return;
    SendOptions opts;
    opts.timeout_ms = 0;
    bool exec = false;
    for (auto& o : batch) {
      opts.timeout_ms = std::max(opts.timeout_ms, o.timeout_ms);
      exec = exec || o.exec;
    }
    opts.idempotent = !exec;  // statements must never run twice: no automatic retry
    HttpRequest req = batch_request(batch);
    auto items = std::make_shared<std::vector<Outgoing>>(std::move(batch));
    transmit(url, std::move(req), opts, [this, items, lane_key](HttpResult res) {
      if (items->size() == 1) {
        deliver((*items)[0].m, (*items)[0].exec, res);
      } else {
        deliver_batch(*items, res);
      }
      if (lane_done(lane_key)) return;
      pump(lane_key);
    });
  }
}

// Takes up to batch_max waiting messages of a lane that has room for another request.
bool CoordinatorService::take_batch(const std::string& lane_key, std::vector<Outgoing>* batch,
                                    Url* url) {
  std::lock_guard lock(outbox_mu_);
  auto it = lanes_.find(lane_key);
  if (it == lanes_.end()) return false;
  Lane& lane = it->second;
  if (lane.queue.empty() || lane.in_flight >= cfg_.agent_requests_max) return false;
  size_t n = std::min(lane.queue.size(), cfg_.batch_max);
  for (size_t i = 0; i < n; ++i) {
    batch->push_back(std::move(lane.queue.front()));
    lane.queue.pop_front();
  }
  ++lane.in_flight;
  *url = lane.url;
  return true;
}

// One message as itself; several in the batch envelope, their bodies spliced in as encoded.
HttpRequest CoordinatorService::batch_request(std::vector<Outgoing>& batch) {
  HttpRequest req;
  if (batch.size() == 1) {
    req.target = std::move(batch[0].target);
    req.body = std::move(batch[0].body);
    return req;
  }
  req.target = "/v1/batch";
  std::string body = "{\"" + std::string(wire::kRequests) + "\":[";
  for (size_t i = 0; i < batch.size(); ++i) {
    if (i > 0) body += ",";
    body += "{\"" + std::string(wire::kPath) + "\":\"" + batch[i].target + "\",\"" +
            std::string(wire::kBody) + "\":" + batch[i].body + "}";
  }
  body += "]}";
  req.body = std::move(body);
  return req;
}

// Splits a batch's answer; anything short of a full answer fails every message.
void CoordinatorService::deliver_batch(const std::vector<Outgoing>& items, const HttpResult& res) {
  Result<Json> j = unavailable("");
  if (res.status.ok() && res.http_status == 200) j = parse_json(res.body);
  const std::string responses(wire::kResponses);
  bool ok = j.ok() && j->is_object() && j->contains(responses) && (*j)[responses].is_array() &&
            (*j)[responses].size() == items.size();
  Status failure = res.status.ok()
                       ? unavailable("the batch failed: HTTP " + std::to_string(res.http_status))
                       : res.status;
  const std::string st(wire::kStatus), bd(wire::kBody);
  for (size_t i = 0; i < items.size(); ++i) {
    const Message& m = items[i].m;
    bool exec = items[i].exec;
    if (!ok) {
      Json none;
      delivered(m, exec, decode_branch_answer(m, 0, nullptr, failure, &none), Json(), false);
      continue;
    }
    Json& r = (*j)[responses][i];
    int status = r.contains(st) && r[st].is_number_integer() ? r[st].get<int>() : 0;
    Json* body = r.contains(bd) ? &r[bd] : nullptr;
    Json results;
    BranchReply br = decode_branch_answer(m, status, body, ok_status(), &results);
    delivered(m, exec, std::move(br), std::move(results), true);
  }
}

// One request of the lane finished. An idle lane goes: lanes are keyed by the URLs agents
// enlisted with, which any client can name, so they must not pile up.
bool CoordinatorService::lane_done(const std::string& lane_key) {
  std::lock_guard lock(outbox_mu_);
  auto it = lanes_.find(lane_key);
  if (it != lanes_.end() && --it->second.in_flight == 0 && it->second.queue.empty()) {
    lanes_.erase(it);
    return true;
  }
  return false;
}

ClientReply CoordinatorService::from_log(const ClientReply& r) {
  auto rec = wal_->get(r.view.gid);
  if (!rec.ok()) {
    ClientReply e;
    e.waiter = r.waiter;
    e.kind = r.kind;
    e.error = rec.status();
    return e;
  }
  ClientReply out;
  RequestKind kind = r.kind == RequestKind::resolve ? RequestKind::get : r.kind;
  if (rec->has_value())
    out = CoordinatorMachine::reply_from_record(**rec, kind);
  else
    out = CoordinatorMachine::reply_without_record(r.view.gid, kind, r.view.forgotten);
  out.waiter = r.waiter;
  out.kind = r.kind;
  if (r.kind == RequestKind::resolve && out.error.ok()) {
    // An operator's resolve of a finished transaction: fine if it matches, refused if not.
    out.answer = Answer::done;
  }
  return out;
}

void CoordinatorService::answer(const ClientReply& r, const Responder& respond) {
  if (r.needs_log) {
    if (!rt_.submit([this, r, respond] { respond(encode_reply(from_log(r))); })) respond(busy());
    return;
  }
  respond(encode_reply(r));
}

void CoordinatorService::reply(const ClientReply& r) {
  Pending p;
  {
    std::lock_guard lock(waiters_mu_);
    auto it = waiters_.find(r.waiter);
    if (it == waiters_.end()) return;
    p = std::move(it->second);
    waiters_.erase(it);
  }
  if (commit_latency_ && r.kind == RequestKind::commit)
    commit_latency_->observe(static_cast<double>(rt_.now_ms() - p.started_ms) / 1000.0);
  if (p.run) {
    Json results = Json::object();
    {
      std::lock_guard lock(runs_mu_);
      auto it = runs_.find(r.view.gid);
      if (it != runs_.end()) {
        results = std::move(it->second.results);
        runs_.erase(it);
      }
    }
    if (!r.error.ok() && r.view.gid.empty()) {
      p.respond(encode_reply(r));
      return;
    }
    Json body = encode_reply_body(r);
    body["results"] = std::move(results);
    p.respond(json_response(http_status_of(r), body));
    return;
  }
  answer(r, p.respond);
}

// --- HTTP ----------------------------------------------------------------------------------

void CoordinatorService::handle(HttpRequest&& req, Responder respond) {
  std::string_view path = req.path();
  auto parts = split_path(path);
  if (parts.size() == 1 && parts[0] == "healthz") {
    if (healthy_)
      respond(json_response(200, Json{{"status", "ok"}, {"epoch", epoch_}}));
    else
      respond(
          error_response(unavailable("recovering: replaying and finishing decided transactions")));
    return;
  }
  if (!cfg_.token.empty() && !has_bearer_token(req, cfg_.token)) {
    respond(error_response(Status(Code::unauthorized, "missing or wrong bearer token")));
    return;
  }
  bool get = req.method == "GET", post = req.method == "POST";
  if (parts.size() == 1 && parts[0] == "metrics") {
    if (!get) return respond(method_not_allowed("GET"));
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4";
    r.body = metrics_.render();
    respond(std::move(r));
    return;
  }
  if (parts.empty() || parts[0] != "v1") {
    respond(error_response(not_found("no such path: " + echo(path))));
    return;
  }
  if (parts.size() == 2 && parts[1] == "status") {
    if (!get) return respond(method_not_allowed("GET"));
    return status(respond);
  }
  if (parts.size() == 2 && parts[1] == "failpoints" && cfg_.failpoints_endpoint) {
    if (!post) return respond(method_not_allowed("POST"));
    return respond(failpoints_endpoint(req.body, &log_));
  }
  if (parts.size() == 2 && parts[1] == "in-doubt") {
    if (!get) return respond(method_not_allowed("GET"));
    return in_doubt(respond);
  }
  if (parts.size() >= 2 && parts[1] == "notifications") return notifications(parts, req, respond);
  if (parts.size() >= 2 && parts[1] == "transactions") {
    if (parts.size() == 2) {
      if (post) return begin(req, respond);
      if (get) return list(req, respond);
      return respond(method_not_allowed("GET, POST"));
    }
    if (parts.size() == 3 && parts[2] == "run") {
      if (!post) return respond(method_not_allowed("POST"));
      return run_oneshot(req, respond);
    }
    auto gid = percent_decode(parts[2]);
    if (!gid) {
      respond(error_response(invalid_argument("malformed gid in the path")));
      return;
    }
    if (parts.size() == 3) {
      if (!get) return respond(method_not_allowed("GET"));
      return transaction(*gid, "", req, respond);
    }
    if (parts.size() == 4) {
      if (!post) return respond(method_not_allowed("POST"));
      return transaction(*gid, parts[3], req, respond);
    }
  }
  respond(error_response(not_found("no such path: " + echo(path))));
}

void CoordinatorService::begin(const HttpRequest& req, const Responder& respond) {
  auto parsed = parse_object(req.body);  // parsed once: a half message has its own decoder
  if (!parsed.ok()) return respond(error_response(parsed.status()));
  if (run_protocol(*parsed) == protocol_name(Protocol::msg))
    return begin_msg(*parsed, false, req.client, respond);
  auto body = decode_begin_json(*parsed, cfg_.machine.txn_timeout_max_ms);
  if (!body.ok()) return respond(error_response(body.status()));
  if (Status st = check_notify(body->notify); !st.ok()) return respond(error_response(st));
  if (!healthy_) {
    respond(error_response(unavailable("recovering: not accepting new transactions yet")));
    return;
  }
  Result<TxnView> view = unavailable("");
  bool client_full = false;
  with_machine([&](CoordinatorMachine& m) {
    if (prune_client_txns(req.client) >= cfg_.transactions_per_client_max) {
      client_full = true;
      return;
    }
    view = m.begin(body->protocol, body->timeout_ms, rt_.now_ms(), body->notify);
    if (!view.ok()) return;
    client_txns_[req.client].push_back(view->gid);
    ++client_txns_tracked_;
  });
  if (client_full) return respond(too_many_for_client());
  if (!view.ok()) return respond(error_response(view.status()));
  respond(json_response(201, encode_view(*view)));
}

HttpResponse CoordinatorService::too_many_for_client() const {
  HttpResponse r = error_response(
      429, "too_many_requests",
      "this client has " + std::to_string(cfg_.transactions_per_client_max) +
          " open transactions (--transactions-per-client-max); commit or abort some first");
  r.headers.emplace_back("retry-after", "1");
  return r;
}

size_t CoordinatorService::prune_client_txns(const std::string& client) {
  auto prune = [this](std::vector<std::string>& gids) {
    size_t before = gids.size();
    std::erase_if(gids, [&](const std::string& gid) {
      Lookup l = machine_.lookup(gid);
      return l.kind != LookupKind::live ||
             (l.view.state != TxnState::active && l.view.state != TxnState::preparing &&
              l.view.state != TxnState::prepared);
    });
    client_txns_tracked_ -= before - gids.size();
  };
  // Clients that went away leave gids behind: past twice the global limit, prune them all.
  if (client_txns_tracked_ > 2 * cfg_.machine.open_txns_max) {
    for (auto& [c, gids] : client_txns_) prune(gids);
    std::erase_if(client_txns_, [&](const auto& kv) { return kv.second.empty(); });
  }
  auto it = client_txns_.find(client);
  if (it == client_txns_.end()) return 0;
  prune(it->second);
  size_t left = it->second.size();
  if (left == 0) client_txns_.erase(it);
  return left;
}

void CoordinatorService::run_oneshot(const HttpRequest& req, const Responder& respond) {
  auto parsed = parse_object(req.body);
  if (!parsed.ok()) return respond(error_response(parsed.status()));
  if (run_protocol(*parsed) == protocol_name(Protocol::saga)) return run_saga(*parsed, respond);
  if (run_protocol(*parsed) == protocol_name(Protocol::msg))
    return begin_msg(*parsed, true, req.client, respond);
  auto body = decode_run_json(*parsed, cfg_.statements_max);
  if (!body.ok()) return respond(error_response(body.status()));
  if (Status st = check_notify(body->notify); !st.ok()) return respond(error_response(st));
  if (!healthy_) {
    respond(error_response(unavailable("recovering: not accepting new transactions yet")));
    return;
  }
  std::vector<Peer> branches;
  for (auto& b : body->branches) {
    auto it = cfg_.participants.find(b.participant);
    if (it == cfg_.participants.end())
      return respond(error_response(invalid_argument("unknown participant \"" + b.participant +
                                                     "\" (name it with --participant NAME=URL)")));
    branches.push_back(Peer{b.participant, it->second});
  }
  int64_t now = rt_.now_ms();
  uint64_t waiter = next_waiter_++;
  {
    std::lock_guard lock(waiters_mu_);
    waiters_[waiter] = Pending{respond, now, true};
  }
  // The statements must be in place before the machine can emit the messages that carry
  // them, so the gid is reserved under the machine's lock and the statements stored there too.
  Result<std::string> gid = unavailable("");
  Ready ready;
  {
    std::lock_guard lock(mu_);
    gid = machine_.run(body->protocol, branches, waiter, body->opts, now, body->notify);
    if (gid.ok()) {
      std::lock_guard rlock(runs_mu_);
      RunState& rs = runs_[*gid];
      for (auto& b : body->branches) rs.statements[b.participant] = std::move(b.statements);
    }
    ready = machine_.take_ready();
  }
  if (!gid.ok()) {
    {
      std::lock_guard lock(waiters_mu_);
      waiters_.erase(waiter);
    }
    return respond(error_response(gid.status()));
  }
  run(std::move(ready));
}

// A SQL op must name one of our agents (--participant NAME=URL); an HTTP op's URL must start
// with one of --op-url-allow's prefixes when any is given.
Status CoordinatorService::check_ops(const OpBranch& b) const {
  for (const wal::OpText& op : b.ops) {
    auto t = decode_op_target(op.json);
    if (!t.ok()) return t.status();
    std::string where = b.name + "." + std::string(step_op_name(op.op));
    if (t->sql && !cfg_.participants.contains(t->participant))
      return invalid_argument(where + ": unknown participant \"" + t->participant +
                              "\" (name it with --participant NAME=URL)");
    if (!t->sql && !url_allowed(t->url))
      return invalid_argument(where + ": url \"" + t->url +
                              "\" is outside every --op-url-allow prefix");
  }
  return ok_status();
}

Status CoordinatorService::check_notify(const std::string& notify) const {
  if (notify.empty()) return ok_status();
  return check_ops(OpBranch{"notify", {wal::OpText{StepOp::notify, notify}}});
}

bool CoordinatorService::url_allowed(std::string_view url) const {
  if (cfg_.op_url_prefixes.empty()) return true;
  return std::any_of(cfg_.op_url_prefixes.begin(), cfg_.op_url_prefixes.end(),
                     [&](const Url& prefix) { return url_within(prefix, url); });
}

Status CoordinatorService::start_waiting(const Responder& respond, const StartFn& start) {
  int64_t now = rt_.now_ms();
  uint64_t waiter = next_waiter_++;
  {
    std::lock_guard lock(waiters_mu_);
    waiters_[waiter] = Pending{respond, now};
  }
  Result<std::string> gid = unavailable("");
  with_machine([&](CoordinatorMachine& m) { gid = start(m, waiter, now); });
  if (gid.ok()) return ok_status();
  std::lock_guard lock(waiters_mu_);
  waiters_.erase(waiter);
  return gid.status();
}

void CoordinatorService::run_saga(const Json& j, const Responder& respond) {
  auto body = decode_saga(j, cfg_.statements_max, cfg_.machine.txn_timeout_max_ms);
  if (!body.ok()) return respond(error_response(body.status()));
  for (const OpBranch& step : body->steps)
    if (Status st = check_ops(step); !st.ok()) return respond(error_response(st));
  if (Status st = check_notify(body->opts.notify); !st.ok()) return respond(error_response(st));
  if (!healthy_) {
    respond(error_response(unavailable("recovering: not accepting new transactions yet")));
    return;
  }
  Status st = start_waiting(respond, [&](CoordinatorMachine& m, uint64_t waiter, int64_t now) {
    return m.run_saga(std::move(body->steps), body->opts, waiter, now);
  });
  if (!st.ok()) respond(error_response(st));
}

void CoordinatorService::begin_msg(const Json& j, bool one_request, const std::string& client,
                                   const Responder& respond) {
  auto body = decode_msg(j, one_request, cfg_.statements_max, cfg_.machine.txn_timeout_max_ms);
  if (!body.ok()) return respond(error_response(body.status()));
  for (const OpBranch& ops :
       {OpBranch{"local", body->producer}, OpBranch{"destinations", body->destinations}})
    if (Status st = check_ops(ops); !st.ok()) return respond(error_response(st));
  if (Status st = check_notify(body->notify); !st.ok()) return respond(error_response(st));
  if (!healthy_) {
    respond(error_response(unavailable("recovering: not accepting new transactions yet")));
    return;
  }
  bool client_full = false;
  Status st = start_waiting(respond, [&](CoordinatorMachine& m, uint64_t waiter, int64_t now) {
    // A half message waits for its producer like an active transaction: it counts against
    // --transactions-per-client-max.
    if (!one_request && prune_client_txns(client) >= cfg_.transactions_per_client_max) {
      client_full = true;
      return Result<std::string>(unavailable("too many for this client"));
    }
    auto gid = m.begin_msg(std::move(*body), waiter, now);
    if (gid.ok() && !one_request) {
      client_txns_[client].push_back(*gid);
      ++client_txns_tracked_;
    }
    return gid;
  });
  if (!st.ok()) respond(client_full ? too_many_for_client() : error_response(st));
}

void CoordinatorService::notifications(const std::vector<std::string_view>& parts,
                                       const HttpRequest& req, const Responder& respond) {
  bool get = req.method == "GET", post = req.method == "POST";
  if (parts.size() == 2) {
    if (post) return begin_notification(req, respond);
    if (get) return list_notifications(req, respond);
    return respond(method_not_allowed("GET, POST"));
  }
  if (parts.size() != 3) return respond(error_response(not_found("no such path")));
  if (!get) return respond(method_not_allowed("GET"));
  auto id = percent_decode(parts[2]);
  if (!id || !parse_gid(*id))
    return respond(error_response(invalid_argument("malformed notification id in the path")));
  get_notification(*id, respond);
}

void CoordinatorService::begin_notification(const HttpRequest& req, const Responder& respond) {
  auto body = decode_notification(req.body, cfg_.machine.notify_attempts_max);
  if (!body.ok()) return respond(error_response(body.status()));
  if (Status st = check_ops(OpBranch{"notification", {body->op}}); !st.ok())
    return respond(error_response(st));
  if (!healthy_) {
    respond(error_response(unavailable("recovering: not accepting new notifications yet")));
    return;
  }
  Status st = start_waiting(respond, [&](CoordinatorMachine& m, uint64_t waiter, int64_t now) {
    return m.begin_notification(std::move(body->op), body->attempts_max, waiter, now);
  });
  if (!st.ok()) respond(error_response(st));
}

// The reconciliation query: a notification's state, from memory or from its record. An id of
// ours without a notification record is 404 (a notification is logged before its 201).
void CoordinatorService::get_notification(const std::string& id, const Responder& respond) {
  Lookup l;
  {
    std::lock_guard lock(mu_);
    l = machine_.lookup(id);
  }
  auto answer_view = [id, respond](const TxnView& v) {
    if (v.protocol != Protocol::notify || v.presumed || v.forgotten)
      return respond(error_response(not_found("no notification " + id)));
    respond(json_response(200, encode_notification(v)));
  };
  if (l.kind == LookupKind::live) return answer_view(l.view);
  if (l.kind != LookupKind::in_log)
    return respond(error_response(not_found("no notification " + id)));
  ClientReply r;
  r.kind = RequestKind::get;
  r.view.gid = id;
  r.needs_log = true;
  if (!rt_.submit([this, r, answer_view] { answer_view(from_log(r).view); })) respond(busy());
}

void CoordinatorService::list_notifications(const HttpRequest& req, const Responder& respond) {
  std::optional<TxnState> state;
  if (auto s = req.query_param("state")) {
    state = parse_notification_state(*s);
    if (!state)
      return respond(error_response(
          invalid_argument("state must be pending, delivered or given_up, got " + echo(*s))));
  }
  auto limit = list_limit(req);
  if (!limit.ok()) return respond(error_response(limit.status()));
  std::vector<TxnView> views;
  {
    std::lock_guard lock(mu_);
    views = machine_.list(state, *limit, Protocol::notify);
  }
  Json arr = Json::array();
  for (auto& v : views) arr.push_back(encode_notification(v));
  respond(json_response(200, Json{{"notifications", std::move(arr)}}));
}

void CoordinatorService::try_branch(const std::string& gid, const HttpRequest& req,
                                    const Responder& respond, int64_t now) {
  auto branch = decode_try(req.body, cfg_.statements_max);
  if (!branch.ok()) return respond(error_response(branch.status()));
  if (Status st = check_ops(*branch); !st.ok()) return respond(error_response(st));
  uint64_t waiter = next_waiter_++;
  {
    std::lock_guard lock(waiters_mu_);
    waiters_[waiter] = Pending{respond, now};
  }
  std::optional<ClientReply> immediate;
  with_machine([&](CoordinatorMachine& m) {
    immediate = m.try_branch(gid, std::move(*branch), waiter, now);
  });
  if (immediate) {
    immediate->waiter = waiter;
    reply(*immediate);
  }
}

// ?limit=N of a list: 1..list_limit_max, 100 unless given.
Result<size_t> CoordinatorService::list_limit(const HttpRequest& req) const {
  auto l = req.query_param("limit");
  if (!l) return size_t{100};
  char* end = nullptr;
  long v = std::strtol(l->c_str(), &end, 10);
  if (l->empty() || *end != '\0' || v < 1 || static_cast<size_t>(v) > cfg_.list_limit_max)
    return invalid_argument("limit must be between 1 and " + std::to_string(cfg_.list_limit_max));
  return static_cast<size_t>(v);
}

void CoordinatorService::list(const HttpRequest& req, const Responder& respond) {
  std::optional<TxnState> state;
  if (auto s = req.query_param("state")) {
    state = parse_state(*s);
    if (!state) return respond(error_response(invalid_argument("unknown state \"" + *s + "\"")));
  }
  std::optional<Protocol> protocol;
  if (auto p = req.query_param("protocol")) {
    protocol = parse_protocol(*p);
    if (!protocol || *protocol == Protocol::notify)
      return respond(error_response(
          invalid_argument("protocol must be 2pc, 3pc, tcc, saga or msg, got " + echo(*p))));
  }
  auto limit = list_limit(req);
  if (!limit.ok()) return respond(error_response(limit.status()));
  std::vector<TxnView> views;
  {
    std::lock_guard lock(mu_);
    views = machine_.list(state, *limit, protocol);
  }
  Json arr = Json::array();
  for (auto& v : views) arr.push_back(encode_view(v));
  respond(json_response(200, Json{{"transactions", std::move(arr)}}));
}

void CoordinatorService::transaction(const std::string& gid, std::string_view action,
                                     const HttpRequest& req, const Responder& respond) {
  if (!parse_gid(gid)) {
    respond(error_response(
        invalid_argument("malformed gid " + echo(gid) + " (want <coordinator>-<epoch>-<seq>)")));
    return;
  }
  int64_t now = rt_.now_ms();
  if (action.empty()) return get_transaction(gid, respond);
  if (action == "branches") return enlist(gid, req, respond, now);
  if (action == "commit" || action == "abort")
    return finish(gid, action == "commit", req, respond, now);
  if (action == "heuristic") {
    auto report = decode_branch_report(req.body);
    if (!report.ok()) return respond(error_response(report.status()));
    return rewrite_finished(
        gid, respond, [gid, r = *report, now](std::optional<wal::TxnRecord> rec) {
          return Result<std::optional<wal::TxnRecord>>(CoordinatorMachine::apply_branch_report(
              std::move(rec), gid, r.participant, r.committed, now));
        });
  }
  if (action == "forget") {
    auto o = parse_object(req.body);
    if (!o.ok()) return respond(error_response(o.status()));
    return forget(gid, respond);
  }
  if (action == "resolve") return resolve(gid, req, respond, now);
  if (action == "try") return try_branch(gid, req, respond, now);
  respond(error_response(not_found("no such action: " + echo(action))));
}

void CoordinatorService::get_transaction(const std::string& gid, const Responder& respond) {
  Lookup l;
  {
    std::lock_guard lock(mu_);
    l = machine_.lookup(gid);
  }
  ClientReply r;
  r.kind = RequestKind::get;
  switch (l.kind) {
    case LookupKind::live: r.view = std::move(l.view); break;
    case LookupKind::in_log:
      r.view.gid = gid;
      r.view.forgotten = l.forgotten_if_absent;
      r.needs_log = true;
      break;
    default: r.error = not_found("no transaction " + gid); break;
  }
  answer(r, respond);
}

void CoordinatorService::enlist(const std::string& gid, const HttpRequest& req,
                                const Responder& respond, int64_t now) {
  auto body = decode_enlist(req.body);
  if (!body.ok()) return respond(error_response(body.status()));
  ClientReply r;
  with_machine([&](CoordinatorMachine& m) {
    r = m.enlist(gid, body->participant, body->url, now, body->instance);
  });
  HttpResponse resp = encode_reply(r);
  if (r.error.ok() && r.view.deadline_ms > 0) {
    // The agent rolls its branch back on its own once the transaction's timeout passed.
    auto j = parse_json(resp.body);
    if (j.ok()) {
      (*j)["expires_in_ms"] = std::max<int64_t>(0, r.view.deadline_ms - now);
      resp.body = dump(*j);
    }
  }
  respond(std::move(resp));
}

void CoordinatorService::finish(const std::string& gid, bool commit, const HttpRequest& req,
                                const Responder& respond, int64_t now) {
  CommitOptions opts;
  if (commit) {
    auto o = decode_commit(req.body);
    if (!o.ok()) return respond(error_response(o.status()));
    opts = *o;
  } else {
    auto o = parse_empty_object(req.body);
    if (!o.ok()) return respond(error_response(o.status()));
  }
  uint64_t waiter = next_waiter_++;
  {
    std::lock_guard lock(waiters_mu_);
    waiters_[waiter] = Pending{respond, now};
  }
  std::optional<ClientReply> immediate;
  with_machine([&](CoordinatorMachine& m) {
    immediate = commit ? m.commit(gid, waiter, opts, now) : m.abort(gid, waiter, now);
  });
  if (immediate) {
    immediate->waiter = waiter;
    reply(*immediate);
  }
}

void CoordinatorService::resolve(const std::string& gid, const HttpRequest& req,
                                 const Responder& respond, int64_t now) {
  auto outcome = decode_resolve(req.body);
  if (!outcome.ok()) return respond(error_response(outcome.status()));
  ClientReply r;
  with_machine([&](CoordinatorMachine& m) { r = m.resolve(gid, *outcome, now); });
  if (r.needs_log) {
    bool queued = rt_.submit([this, r, gid, commit = *outcome, respond] {
      ClientReply fr = from_log(r);
      bool committed = fr.view.state == TxnState::committed;
      if (fr.error.ok() && committed != commit) {
        fr.answer = Answer::contrary;
        fr.error =
            conflict("transaction " + gid + " ended " + std::string(state_name(fr.view.state)));
      }
      respond(encode_reply(fr));
    });
    if (!queued) respond(busy());
    return;
  }
  respond(encode_reply(r));
}

// Heuristic reports and forget change the record of a finished transaction: one at a time,
// on a worker, after every queued write is applied (the end record of a transaction that just
// finished), synced before the answer.
void CoordinatorService::rewrite_finished(const std::string& gid, const Responder& respond,
                                          RecordChange change) {
  Lookup l;
  {
    std::lock_guard lock(mu_);
    l = machine_.lookup(gid);
  }
  if (l.kind == LookupKind::live && !terminal(l.view.state))
    return respond(error_response(
        conflict("transaction " + gid + " has not ended; report again once it has")));
  if (l.kind == LookupKind::not_ours)
    return respond(error_response(not_found("no transaction " + gid)));
  bool queued = rt_.submit([this, gid, respond, l, change = std::move(change)] {
    std::lock_guard rewrite(rewrite_mu_);
    wal_->flush();
    auto rec = wal_->get(gid);
    if (!rec.ok()) return respond(error_response(rec.status()));
    if (!rec->has_value() && l.kind == LookupKind::in_log && l.forgotten_if_absent)
      return respond(error_response(not_found("the outcome of " + gid + " was forgotten")));
    auto changed = change(*rec);
    if (!changed.ok()) return respond(error_response(changed.status()));
    if (!changed->has_value()) {
      ClientReply r = rec->has_value()
                          ? CoordinatorMachine::reply_from_record(**rec, RequestKind::get)
                          : CoordinatorMachine::reply_without_record(gid, RequestKind::get, false);
      return respond(encode_reply(r));
    }
    wal::TxnRecord next = std::move(**changed);
    // The write is queued under rewrite_mu_: the next rewrite's flush() waits for it.
    wal_->write({wal::LogWrite::put(next)}, true, [this, next, respond](Status st) {
      if (!st.ok()) {
        log_.error("decision log write failed; stopping", {{"error", st.to_string()}});
        std::_Exit(3);
      }
      with_machine([&](CoordinatorMachine& m) { m.on_record_rewritten(next); });
      respond(encode_reply(CoordinatorMachine::reply_from_record(next, RequestKind::get)));
    });
  });
  if (!queued) respond(busy());
}

void CoordinatorService::forget(const std::string& gid, const Responder& respond) {
  rewrite_finished(
      gid, respond,
      [this, gid](std::optional<wal::TxnRecord> rec) -> Result<std::optional<wal::TxnRecord>> {
        if (!rec || !rec->heuristic_mixed)
          return conflict("transaction " + gid + " has no heuristic outcome to forget");
        rec->heuristic_mixed = false;
        log_.warn("heuristic outcome forgotten by an operator", {{"gid", gid}});
        return rec;
      });
}

void CoordinatorService::status(const Responder& respond) {
  GidParts below;
  size_t open = 0, recovering = 0;
  {
    std::lock_guard lock(mu_);
    below = machine_.finished_below();
    open = machine_.open_txns();
    recovering = machine_.recovering();
  }
  respond(
      json_response(200, Json{{"id", cfg_.machine.coordinator_id},
                              {"epoch", epoch_},
                              {"healthy", healthy_.load()},
                              {"open_transactions", open},
                              {"recovering", recovering},
                              {"finished_below", {{"epoch", below.epoch}, {"seq", below.seq}}}}));
}

void CoordinatorService::in_doubt(const Responder& respond) {
  std::vector<TxnView> views;
  int64_t now = rt_.now_ms();
  {
    std::lock_guard lock(mu_);
    views = machine_.in_doubt(now, cfg_.list_limit_max);
  }
  Json arr = Json::array();
  for (auto& v : views) {
    Json j = encode_view(v);
    if (v.decided_ms > 0) j["age_ms"] = now - v.decided_ms;
    arr.push_back(std::move(j));
  }
  respond(json_response(200, Json{{"transactions", std::move(arr)}}));
}

// --- time ----------------------------------------------------------------------------------

void CoordinatorService::tick() {
  if (stopping_) return;
  int64_t now = rt_.now_ms();
  size_t recovering = 0;
  with_machine([&](CoordinatorMachine& m) {
    m.tick(now);
    recovering = m.recovering();
  });
  if (recovering < recovering_at_start_ && !redrive_failpoint_done_) {
    redrive_failpoint_done_ = true;
    TPC_FAILPOINT("coord.recovery_after_first_redrive");
  }
  if (!healthy_ && (recovering == 0 || now - started_ms_ >= cfg_.recovery_wait_ms)) {
    healthy_ = true;
    if (recovering == 0)
      log_.info("recovery finished", {{"epoch", epoch_}, {"ms", now - started_ms_}});
    else
      log_.warn("recovery still driving transactions; serving anyway",
                {{"unfinished", static_cast<uint64_t>(recovering)}, {"ms", now - started_ms_}});
  }
  sync_ends();
  tick_timer_ = rt_.run_after(cfg_.tick_ms, [this] { tick(); });
}

// Every compaction_interval_ms, a pass on a worker; the next is timed from the pass's end.
void CoordinatorService::schedule_compaction() {
  if (stopping_) return;
  rt_.run_after(cfg_.compaction_interval_ms, [this] {
    if (stopping_) return;
    bool queued = rt_.submit([this] {
      if (stopping_) return;
      compact_once();
      schedule_compaction();
    });
    if (!queued) schedule_compaction();  // the worker is busy: the next interval
  });
}

void CoordinatorService::compact_once() {
  int64_t cutoff = rt_.now_ms() - cfg_.retention_ms;
  std::vector<std::string> erase;
  std::optional<GidParts> highest;
  Status st = wal_->for_each([&](wal::TxnRecord&& r) {
    // A heuristic outcome stays until an operator clears it, whatever its age.
    if (!r.ended || r.heuristic_mixed || r.ended_wall_ms >= cutoff) return;
    auto parts = parse_gid(r.gid);
    if (!parts) return;
    if (!highest || *highest < *parts) highest = parts;
    erase.push_back(std::move(r.gid));
  });
  if (!st.ok()) {
    log_.error("compaction could not read the decision log", {{"error", st.to_string()}});
    return;
  }
  compaction_passes_.fetch_add(1, std::memory_order_relaxed);
  if (erase.empty()) return;
  GidParts below{cfg_.machine.coordinator_id, highest->epoch, highest->seq + 1};
  // The horizon goes first: a gid below it without a record then reads as forgotten, never
  // as presumed aborted.
  Status meta =
      wal_->put_meta(kForgottenKey, std::to_string(below.epoch) + ":" + std::to_string(below.seq));
  if (!meta.ok()) {
    log_.error("compaction could not record its horizon", {{"error", meta.to_string()}});
    return;
  }
  {
    std::lock_guard lock(mu_);
    machine_.set_forgotten_below(below);
  }
  std::vector<wal::LogWrite> writes;
  for (auto& gid : erase) writes.push_back(wal::LogWrite::erase(gid));
  size_t n = writes.size();
  wal_->write(std::move(writes), false, [this, n](Status s) {
    if (!s.ok())
      log_.error("compaction erase failed", {{"error", s.to_string()}});
    else
      log_.info("compacted finished outcomes", {{"records", static_cast<uint64_t>(n)}});
  });
}

void CoordinatorService::register_metrics() {
  CountersUnderLock<MachineCounters> counter{metrics_, mu_, machine_.counters()};
  for (Protocol protocol : kProtocols) {
    if (protocol == Protocol::notify) continue;  // notifications have their own metrics
    size_t p = protocol_index(protocol);
    std::string proto(protocol_name(protocol));
    counter("tpc_coordinator_transactions_begun_total", "transactions begun", {{"protocol", proto}},
            [p](const MachineCounters& c) { return c.begun[p]; });
  }
  for (Protocol protocol : kProtocols) {
    if (protocol == Protocol::notify) continue;
    size_t p = protocol_index(protocol);
    std::string proto(protocol_name(protocol));
    counter("tpc_coordinator_transactions_total", "transactions finished, by outcome",
            {{"protocol", proto}, {"outcome", "committed"}},
            [p](const MachineCounters& c) { return c.committed[p]; });
    counter("tpc_coordinator_transactions_total", "transactions finished, by outcome",
            {{"protocol", proto}, {"outcome", "aborted"}},
            [p](const MachineCounters& c) { return c.aborted[p]; });
  }
  for (size_t op = 0; op < kStepOps; ++op) {
    auto step_op = static_cast<StepOp>(op);
    for (size_t o = 0; o < kOpOutcomes; ++o)
      counter("tpc_coordinator_ops_total",
              "answers to the ops of TCC, sagas and messages, by op and outcome",
              {{"op", std::string(step_op_name(step_op))},
               {"outcome", std::string(op_outcome_name(static_cast<OpOutcome>(o)))}},
              [op, o](const MachineCounters& c) { return c.ops[op][o]; });
  }
  counter("tpc_coordinator_op_failures_total",
          "business failures of confirm, cancel and compensate (retried until they succeed)", {},
          [](const MachineCounters& c) { return c.op_failures; });
  counter("tpc_coordinator_sagas_failed_total",
          "forward sagas stopped past their attempts, waiting for an operator", {},
          [](const MachineCounters& c) { return c.saga_failed; });
  counter("tpc_coordinator_heuristic_mixed_total", "transactions whose branches disagreed", {},
          [](const MachineCounters& c) { return c.heuristic_mixed; });
  metrics_.gauge("tpc_coordinator_heuristic_outcomes",
                 "heuristic outcomes not yet forgotten by an operator (kept across restarts)",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.heuristic_outcomes());
                 });
  counter("tpc_coordinator_one_phase_total", "single-branch transactions committed in one phase",
          {}, [](const MachineCounters& c) { return c.one_phase; });
  counter("tpc_coordinator_read_only_branches_total", "branches that voted read_only", {},
          [](const MachineCounters& c) { return c.read_only_branches; });
  counter("tpc_coordinator_messages_sent_total", "protocol messages sent to agents", {},
          [](const MachineCounters& c) { return c.messages_sent; });
  counter("tpc_coordinator_resends_total", "protocol messages sent again after a failure", {},
          [](const MachineCounters& c) { return c.resends; });
  counter("tpc_coordinator_recovered_total", "transactions re-driven from the log at start", {},
          [](const MachineCounters& c) { return c.recovered; });
  metrics_.gauge("tpc_coordinator_open_transactions", "transactions in memory, not finished",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.open_txns());
                 });
  metrics_.gauge("tpc_coordinator_decided_unfinished", "decided transactions whose phase 2 runs",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.prepared_unfinished());
                 });
  for (TxnState state : {TxnState::prepared, TxnState::committing})
    metrics_.gauge(
        "tpc_coordinator_messages",
        "transactional messages not finished: half (prepared) or delivering",
        [this, state] {
          std::lock_guard lock(mu_);
          MsgGauges g = machine_.msg_gauges(rt_.now_ms());
          return static_cast<double>(state == TxnState::prepared ? g.prepared : g.delivering);
        },
        {{"state", std::string(state_name(state))}});
  size_t np = protocol_index(Protocol::notify);
  counter("tpc_coordinator_notifications_total", "notifications ended, by outcome",
          {{"outcome", "delivered"}}, [np](const MachineCounters& c) { return c.committed[np]; });
  counter("tpc_coordinator_notifications_total", "notifications ended, by outcome",
          {{"outcome", "given_up"}}, [np](const MachineCounters& c) { return c.aborted[np]; });
  metrics_.gauge("tpc_coordinator_notifications_pending", "notifications still being delivered",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.msg_gauges(rt_.now_ms()).notifications);
                 });
  metrics_.gauge("tpc_coordinator_oldest_undelivered_message_seconds",
                 "how long the oldest committed message has waited for a destination to "
                 "acknowledge (0: none)",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.msg_gauges(rt_.now_ms()).oldest_ms) / 1000.0;
                 });
  metrics_.gauge("tpc_coordinator_healthy", "1 once start-up recovery finished",
                 [this] { return healthy_ ? 1.0 : 0.0; });
  metrics_.counter_fn("tpc_coordinator_log_fsyncs_total", "synced writes to the decision log",
                      [this] { return static_cast<double>(wal_->stats().synced_batches); });
  metrics_.counter_fn("tpc_coordinator_log_records_synced_total",
                      "records written in synced batches (decisions per fsync = this / fsyncs)",
                      [this] { return static_cast<double>(wal_->stats().records_synced); });
  metrics_.counter_fn("tpc_coordinator_compaction_passes_total",
                      "passes of compaction over the decision log",
                      [this] { return static_cast<double>(compaction_passes_.load()); });
  commit_latency_ =
      &metrics_.histogram("tpc_coordinator_commit_seconds",
                          "commit requests, from arrival to answer", latency_buckets());
}

}  // namespace tpc::coord
