#include "participant/agent_service.h"

#include <chrono>
#include <cstdio>

#include "common/cli.h"
#include "common/failpoint.h"
#include "common/ids.h"
#include "common/json.h"
#include "common/wire.h"
#include "participant/pg_executor.h"

namespace tpc::agent {

AgentService::AgentService(const AgentConfig& cfg, Logger& logger, Runtime& rt, BranchExecutor& pg)
    : cfg_(cfg), log_(logger), rt_(rt), pg_(pg), machine_(cfg.machine, logger) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(rt_.random64()));
  instance_ = hex;
}

AgentService::~AgentService() {
  shutdown(0);
}

Result<std::unique_ptr<AgentService>> AgentService::start(const AgentConfig& cfg, Logger& logger) {
  auto real = std::make_unique<RealRuntime>(cfg.threads, cfg.pg_workers, cfg.jobs_max);
  auto pg = std::make_unique<PgExecutor>(
      PgExecutorConfig{cfg.machine.name, cfg.pg, cfg.pg_idle_max, cfg.pg_connections_max,
                       cfg.machine.branches_max},
      logger);
  std::unique_ptr<AgentService> s(new AgentService(cfg, logger, *real, *pg));
  s->real_ = std::move(real);
  s->own_pg_ = std::move(pg);
  TPC_RETURN_IF_ERROR(s->open());
  s->real_->start();
  AgentService* self = s.get();
  auto server =
      HttpServer::start(s->real_->loop(), cfg.http, [self](HttpRequest&& req, Responder respond) {
        self->handle(std::move(req), std::move(respond));
      });
  if (!server.ok()) return server.status();
  s->server_ = std::move(*server);
  s->serve();
  return s;
}

Result<std::unique_ptr<AgentService>> AgentService::start_with(const AgentConfig& cfg,
                                                               Logger& logger, Runtime& rt,
                                                               BranchExecutor& pg) {
  std::unique_ptr<AgentService> s(new AgentService(cfg, logger, rt, pg));
  TPC_RETURN_IF_ERROR(s->open());
  s->serve();
  return s;
}

Status AgentService::open() {
  TPC_RETURN_IF_ERROR(pg_.open());
  // The first scan runs before we serve: prepared branches left by an earlier run are known
  // before any coordinator asks about them.
  if (Status st = scan_once(); !st.ok())
    return Status(st.code(), "cannot scan pg_prepared_xacts: " + st.message());
  register_metrics();
  return ok_status();
}

void AgentService::serve() {
  started_ = true;
  tick();
  schedule(cfg_.scan_interval_ms, [this] { scan(); });
  schedule(cfg_.purge_interval_ms, [this] { purge(); });
  log_.info("agent started", {{"name", cfg_.machine.name},
                              {"listen", cfg_.http.host + ":" + std::to_string(port())},
                              {"url", cfg_.advertise_url},
                              {"prepared", static_cast<uint64_t>(machine_.prepared_count())}});
}

Status AgentService::scan_once() {
  int64_t started = rt_.now_ms();
  TPC_FAILPOINT("agent.during_scan");
  auto found = pg_.scan();
  if (!found.ok()) return found.status();
  with_machine([&](AgentMachine& m) {
    m.on_scan(std::move(found->prepared), started, rt_.now_ms(), std::move(found->decided));
  });
  return ok_status();
}

uint16_t AgentService::port() const {
  return server_ ? server_->port() : 0;
}

void AgentService::on_stop_signal(std::function<void(int)> fn) {
  if (real_) real_->loop().on_stop_signal(std::move(fn));
}

void AgentService::shutdown(int64_t drain_ms) {
  {
    std::lock_guard lock(timers_mu_);
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
  if (real_) real_->stop();  // drains the workers, then stops the loop
  server_.reset();
  // Open sessions end with their connections: PostgreSQL rolls back what was not prepared.
  pg_.close();
  if (started_) log_.info("agent stopped", {{"name", cfg_.machine.name}});
}

template <class Fn>
void AgentService::with_machine(Fn&& fn) {
  Ready ready;
  {
    std::lock_guard lock(mu_);
    fn(machine_);
    ready = machine_.take_ready();
  }
  if (!ready.empty()) run(std::move(ready));
}

void AgentService::schedule(int64_t delay_ms, std::function<void()> fn) {
  if (stopping_) return;
  rt_.run_after(delay_ms, std::move(fn));
}

// --- effects -------------------------------------------------------------------------------

void AgentService::op_done(const std::string& gid, OpKind kind, uint64_t step, OpResult res) {
  with_machine([&](AgentMachine& m) {
    if (kind == OpKind::step)
      m.on_step_done(step, std::move(res), rt_.now_ms());
    else
      m.on_op_done(gid, kind, std::move(res), rt_.now_ms());
  });
}

void AgentService::run(Ready ready) {
  for (auto& op : ready.ops) {
    std::string gid = op.gid;
    OpKind kind = op.kind;
    uint64_t step = op.step;
    bool queued = rt_.submit([this, op = std::move(op)]() mutable {
      int64_t started = rt_.now_ms();
      OpResult res = pg_.execute(op);
      if (op_latency_) op_latency_->observe(static_cast<double>(rt_.now_ms() - started) / 1000.0);
      op_done(op.gid, op.kind, op.step, std::move(res));
    });
    if (!queued) {
      OpResult res;
      res.status = unavailable("too many PostgreSQL operations waiting (" +
                               std::to_string(cfg_.jobs_max) + ")");
      op_done(gid, kind, step, std::move(res));
    }
  }
  for (auto& q : ready.peer_queries) query_peers(q);
  for (auto& gid : ready.cancels) pg_.cancel(gid);
  for (auto& gid : ready.enlists) enlist(gid);
  for (auto& gid : ready.asks) ask(gid);
  for (auto& r : ready.reports) report(r);
  for (auto& r : ready.replies) reply(r);
}

HttpRequest AgentService::coordinator_request(std::string method, std::string target) const {
  HttpRequest req;
  req.method = std::move(method);
  req.target = std::move(target);
  if (!cfg_.coordinator_token.empty())
    req.headers.emplace_back("authorization", "Bearer " + cfg_.coordinator_token);
  return req;
}

const std::string* AgentService::coordinator_url(std::string_view gid) const {
  auto parts = parse_gid(gid);
  if (!parts) return nullptr;
  auto it = cfg_.coordinators.find(parts->coordinator);
  return it == cfg_.coordinators.end() ? nullptr : &it->second;
}

void AgentService::query_peers(const PeerQuery& q) {
  struct Gather {
    std::mutex mu;
    std::vector<PeerAnswer> answers;
    size_t left;
  };
  auto g = std::make_shared<Gather>();
  g->left = q.peers.size();
  auto done = [this, g, gid = q.gid](PeerAnswer a) {
    std::vector<PeerAnswer> all;
    {
      std::lock_guard lock(g->mu);
      g->answers.push_back(std::move(a));
      if (--g->left > 0) return;
      all = std::move(g->answers);
    }
    with_machine([&](AgentMachine& m) { m.on_peer_states(gid, std::move(all), rt_.now_ms()); });
  };
  for (auto& peer : q.peers) {
    auto url = parse_url(peer.url);
    if (!url.ok() || TPC_FAILPOINT("agent.partition")) {
      done(PeerAnswer{peer.participant, std::nullopt});
      continue;
    }
    HttpRequest req;
    req.method = "POST";
    req.target = "/v1/branches/" + q.gid + "/query";
    if (!cfg_.peer_token.empty())
      req.headers.emplace_back("authorization", "Bearer " + cfg_.peer_token);
    SendOptions opts;
    opts.timeout_ms = cfg_.coordinator_timeout_ms;
    rt_.send(*url, std::move(req), opts, [done, name = peer.participant](HttpResult res) {
      PeerAnswer a{name, std::nullopt};
      if (res.status.ok() && res.http_status == 200) {
        auto j = parse_json(res.body);
        if (j.ok() && j->is_object() && j->contains("state") && (*j)["state"].is_string())
          a.state = parse_external_state((*j)["state"].get<std::string>());
      }
      done(std::move(a));
    });
  }
}

void AgentService::enlist(const std::string& gid) {
  const std::string* base = coordinator_url(gid);
  Result<Url> url = base ? parse_url(*base) : Result<Url>(not_found("no coordinator for " + gid));
  if (!url.ok()) {
    with_machine([&](AgentMachine& m) {
      m.on_enlisted(gid, not_found(url.status().message()), 0, rt_.now_ms());
    });
    return;
  }
  HttpRequest req = coordinator_request("POST", "/v1/transactions/" + gid + "/branches");
  req.body = dump(Json{
      {"participant", cfg_.machine.name}, {"url", cfg_.advertise_url}, {"instance", instance_}});
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  rt_.send(*url, std::move(req), opts, [this, gid](HttpResult res) {
    int64_t expires = 0;
    Status st = decode_enlist_answer(res.http_status, res.body, res.status, &expires);
    with_machine([&](AgentMachine& m) { m.on_enlisted(gid, st, expires, rt_.now_ms()); });
  });
}

void AgentService::ask(const std::string& gid) {
  if (TPC_FAILPOINT("agent.partition")) {
    with_machine([&](AgentMachine& m) {
      m.on_outcome(gid, Outcome::unreachable, "partitioned (failpoint)", rt_.now_ms());
    });
    return;
  }
  const std::string* base = coordinator_url(gid);
  Result<Url> url = base ? parse_url(*base) : Result<Url>(not_found("no coordinator configured"));
  if (!url.ok()) {
    with_machine([&](AgentMachine& m) {
      m.on_outcome(gid, Outcome::unknown, "no coordinator configured for this gid", rt_.now_ms());
    });
    return;
  }
  HttpRequest req = coordinator_request("GET", "/v1/transactions/" + gid);
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  rt_.send(*url, std::move(req), opts, [this, gid](HttpResult res) {
    std::string answer;
    Outcome o = decode_outcome_answer(res.http_status, res.body, res.status, &answer);
    std::optional<BranchState> recorded;
    if (res.status.ok() && res.http_status == 200)
      recorded = decode_recorded_state(res.body, cfg_.machine.name);
    with_machine([&](AgentMachine& m) { m.on_outcome(gid, o, answer, rt_.now_ms(), recorded); });
  });
}

void AgentService::report(const Report& r) {
  const std::string* base = coordinator_url(r.gid);
  Result<Url> url = base ? parse_url(*base) : Result<Url>(not_found("no coordinator configured"));
  if (!url.ok() || TPC_FAILPOINT("agent.partition")) {
    Status st =
        url.ok() ? unavailable("partitioned (failpoint)") : not_found(url.status().message());
    with_machine([&](AgentMachine& m) { m.on_reported(r.gid, st, rt_.now_ms()); });
    return;
  }
  HttpRequest req = coordinator_request("POST", "/v1/transactions/" + r.gid + "/heuristic");
  req.body = dump(
      Json{{"participant", cfg_.machine.name}, {"state", r.committed ? "committed" : "aborted"}});
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  rt_.send(*url, std::move(req), opts, [this, gid = r.gid](HttpResult res) {
    Status st = decode_report_answer(res.http_status, res.body, res.status);
    with_machine([&](AgentMachine& m) { m.on_reported(gid, st, rt_.now_ms()); });
  });
}

void AgentService::reply(const Reply& r) {
  Responder respond;
  {
    std::lock_guard lock(waiters_mu_);
    auto it = waiters_.find(r.request);
    if (it == waiters_.end()) return;
    respond = std::move(it->second);
    waiters_.erase(it);
  }
  respond(encode_reply(r));
}

// --- PostgreSQL ----------------------------------------------------------------------------

void AgentService::scan() {
  bool queued = rt_.submit([this] {
    Status st = scan_once();
    if (!st.ok()) log_.warn("in-doubt scan failed", {{"error", st.to_string()}});
    schedule(cfg_.scan_interval_ms, [this] { scan(); });
  });
  if (!queued) schedule(cfg_.scan_interval_ms, [this] { scan(); });  // the workers are full: later
}

void AgentService::purge() {
  for (auto& [id, base] : cfg_.coordinators) {
    auto url = parse_url(base);
    if (!url.ok()) continue;
    HttpRequest req = coordinator_request("GET", "/v1/status");
    SendOptions opts;
    opts.timeout_ms = cfg_.coordinator_timeout_ms;
    rt_.send(*url, std::move(req), opts, [this, id = id](HttpResult res) {
      if (!res.status.ok() || res.http_status != 200) return;
      auto j = parse_json(res.body);
      if (!j.ok() || !j->contains("finished_below")) return;
      const Json& fb = (*j)["finished_below"];
      if (!fb.is_object() || !fb.contains("epoch") || !fb.contains("seq") ||
          !fb["epoch"].is_number_unsigned() || !fb["seq"].is_number_unsigned())
        return;
      std::optional<GidParts> mark;
      with_machine([&](AgentMachine& m) {
        m.on_finished_below(id, fb["epoch"].get<uint64_t>(), fb["seq"].get<uint64_t>());
        mark = m.purge_mark(id);
      });
      if (!mark) return;
      auto epoch = static_cast<int64_t>(mark->epoch), seq = static_cast<int64_t>(mark->seq);
      (void)rt_.submit([this, id, epoch, seq] {  // full: the next purge does it
        auto n = pg_.purge_finished(id, epoch, seq);
        if (n.ok() && n->markers + n->barriers > 0)
          log_.info("purged the rows of finished transactions",
                    {{"coordinator", id}, {"markers", n->markers}, {"barriers", n->barriers}});
      });
    });
  }
  (void)rt_.submit([this] {  // full: the next purge does it
    auto n = pg_.purge_stale_states();
    if (n.ok() && *n > 0) log_.info("purged stale 3PC records", {{"rows", *n}});
  });
  schedule(cfg_.purge_interval_ms, [this] { purge(); });
}

// --- HTTP ----------------------------------------------------------------------------------

void AgentService::handle(HttpRequest&& req, Responder respond) {
  std::string_view path = req.path();
  auto parts = split_path(path);
  if (parts.size() == 1 && parts[0] == "healthz") {
    respond(json_response(200, Json{{"status", "ok"}, {"name", cfg_.machine.name}}));
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
    return respond(std::move(r));
  }
  if (parts.size() >= 2 && parts[0] == "v1") {
    if (parts.size() == 2 && parts[1] == "in-doubt") {
      if (!get) return respond(method_not_allowed("GET"));
      std::vector<BranchView> views;
      {
        std::lock_guard lock(mu_);
        views = machine_.in_doubt(rt_.now_ms());
      }
      Json arr = Json::array();
      for (auto& v : views) arr.push_back(encode_view(v));
      return respond(json_response(200, Json{{"branches", std::move(arr)}}));
    }
    if (parts.size() == 2 && parts[1] == "batch") {
      if (!post) return respond(method_not_allowed("POST"));
      return batch(req, respond);
    }
    if (parts.size() == 2 && parts[1] == "failpoints" && cfg_.failpoints_endpoint) {
      if (!post) return respond(method_not_allowed("POST"));
      return respond(failpoints_endpoint(req.body, &log_));
    }
    if (parts.size() == 2 && parts[1] == "status") {
      if (!get) return respond(method_not_allowed("GET"));
      size_t sessions, prepared;
      {
        std::lock_guard lock(mu_);
        sessions = machine_.open_sessions();
        prepared = machine_.prepared_count();
      }
      return respond(json_response(200, Json{{"name", cfg_.machine.name},
                                             {"open_branches", sessions},
                                             {"prepared", prepared},
                                             {"branches_max", cfg_.machine.branches_max}}));
    }
    if (parts[1] == "branches") {
      if (TPC_FAILPOINT("agent.partition"))
        return respond(error_response(unavailable("partitioned (failpoint agent.partition)")));
      if (parts.size() == 2) {
        if (!get) return respond(method_not_allowed("GET"));
        return list(req, respond);
      }
      auto gid = percent_decode(parts[2]);
      if (!gid) return respond(error_response(invalid_argument("malformed gid in the path")));
      if (parts.size() == 3) {
        if (!get) return respond(method_not_allowed("GET"));
        return branch_request(*gid, "", req, respond);
      }
      if (parts.size() == 4) {
        if (!post) return respond(method_not_allowed("POST"));
        return branch_request(*gid, parts[3], req, respond);
      }
    }
  }
  respond(error_response(not_found("no such path: " + echo(path))));
}

void AgentService::batch(const HttpRequest& req, const Responder& respond) {
  auto j = parse_object(req.body);
  if (!j.ok()) return respond(error_response(j.status()));
  FieldReader r(*j);
  const std::string path(wire::kPath), body_key(wire::kBody);
  const Json* items = r.array(std::string(wire::kRequests), true, cfg_.batch_max);
  if (Status st = r.finish(); !st.ok()) return respond(error_response(st));
  if (items->empty())
    return respond(json_response(200, Json{{std::string(wire::kResponses), Json::array()}}));
  std::vector<HttpRequest> subs;
  for (size_t i = 0; i < items->size(); ++i) {
    const Json& it = (*items)[i];
    std::string where = std::string(wire::kRequests) + "[" + std::to_string(i) + "]";
    if (!it.is_object() || !it.contains(path) || !it[path].is_string())
      return respond(error_response(invalid_argument(where + " needs a \"" + path + "\" string")));
    FieldReader ir(it);
    ir.allow(path);
    ir.allow(body_key);
    if (Status st = ir.finish(); !st.ok())
      return respond(error_response(Status(st.code(), where + ": " + st.message())));
    HttpRequest sub;
    sub.method = "POST";
    sub.target = it[path].get<std::string>();
    if (sub.target.rfind(wire::kBranchesPrefix, 0) != 0)
      return respond(error_response(
          invalid_argument(where + ": only /v1/branches/... requests can be batched")));
    if (it.contains(body_key)) {
      if (!it[body_key].is_object())
        return respond(
            error_response(invalid_argument(where + "." + body_key + " must be an object")));
      sub.body = dump(it[body_key]);
    }
    sub.headers = req.headers;  // the batch's authorization covers its requests
    subs.push_back(std::move(sub));
  }
  // Every request is handled as if it had come alone; the answer goes out when all are done.
  struct Gather {
    std::mutex mu;
    std::vector<HttpResponse> out;
    size_t left;
    Responder respond;
  };
  auto g = std::make_shared<Gather>();
  g->out.resize(subs.size());
  g->left = subs.size();
  g->respond = respond;
  for (size_t i = 0; i < subs.size(); ++i) {
    handle(std::move(subs[i]), Responder([g, i](HttpResponse resp) {
             std::lock_guard lock(g->mu);
             g->out[i] = std::move(resp);
             if (--g->left > 0) return;
             std::string body = "{\"" + std::string(wire::kResponses) + "\":[";
             for (size_t k = 0; k < g->out.size(); ++k) {
               if (k > 0) body += ",";
               body += "{\"" + std::string(wire::kStatus) +
                       "\":" + std::to_string(g->out[k].status) + ",\"" + std::string(wire::kBody) +
                       "\":";
               body += g->out[k].body.empty() ? "{}" : g->out[k].body;
               body += "}";
             }
             body += "]}";
             HttpResponse all;
             all.body = std::move(body);
             g->respond(std::move(all));
           }));
  }
}

void AgentService::list(const HttpRequest& req, const Responder& respond) {
  std::optional<BranchState> state;
  if (auto s = req.query_param("state")) {
    state = parse_external_state(*s);
    if (!state) return respond(error_response(invalid_argument("unknown state " + echo(*s))));
  }
  size_t limit = 100;
  if (auto l = req.query_param("limit")) {
    char* end = nullptr;
    long v = std::strtol(l->c_str(), &end, 10);
    if (l->empty() || *end != '\0' || v < 1 || static_cast<size_t>(v) > cfg_.list_limit_max)
      return respond(error_response(
          invalid_argument("limit must be between 1 and " + std::to_string(cfg_.list_limit_max))));
    limit = static_cast<size_t>(v);
  }
  std::vector<BranchView> views;
  {
    std::lock_guard lock(mu_);
    views = machine_.list(state, limit, rt_.now_ms());
  }
  Json arr = Json::array();
  for (auto& v : views) arr.push_back(encode_view(v));
  respond(json_response(200, Json{{"branches", std::move(arr)}}));
}

void AgentService::branch_request(const std::string& gid, std::string_view action,
                                  const HttpRequest& req, const Responder& respond) {
  if (!parse_gid(gid))
    return respond(error_response(
        invalid_argument("malformed gid " + echo(gid) + " (want <coordinator>-<epoch>-<seq>)")));
  if (!coordinator_url(gid))
    return respond(error_response(not_found("no coordinator configured for gid " + gid)));
  if (action.empty()) {
    std::optional<BranchView> v;
    {
      std::lock_guard lock(mu_);
      v = machine_.view(gid, rt_.now_ms());
    }
    if (!v) return respond(error_response(not_found("no branch " + gid + " in memory")));
    return respond(json_response(200, encode_view(*v)));
  }
  Result<Request> r = invalid_argument("");
  if (action == wire::kExec)
    r = decode_exec(req.body, cfg_.exec);
  else if (action == wire::kStep)
    r = decode_step(req.body, gid, cfg_.exec);
  else if (action == wire::kPrepare)
    r = decode_prepare(req.body);
  else if (action == wire::kCommit)
    r = decode_commit(req.body);
  else if (action == "resolve")
    r = decode_resolve(req.body);
  else if (action == wire::kPrecommit || action == wire::kAbort || action == "query" ||
           action == "forget") {
    auto o = parse_empty_object(req.body);
    if (!o.ok()) return respond(error_response(o.status()));
    Request q;
    q.kind = action == wire::kAbort ? RequestKind::abort
             : action == "query"    ? RequestKind::status
             : action == "forget"   ? RequestKind::forget
                                    : RequestKind::precommit;
    r = q;
  } else {
    return respond(error_response(not_found("no such action: " + echo(action))));
  }
  if (!r.ok()) return respond(error_response(r.status()));
  Request q = std::move(*r);
  q.id = next_waiter_++;
  {
    std::lock_guard lock(waiters_mu_);
    waiters_[q.id] = respond;
  }
  with_machine([&](AgentMachine& m) { m.request(gid, std::move(q), rt_.now_ms()); });
}

// --- time ----------------------------------------------------------------------------------

void AgentService::tick() {
  if (stopping_) return;
  with_machine([&](AgentMachine& m) { m.tick(rt_.now_ms()); });
  schedule(cfg_.tick_ms, [this] { tick(); });
}

void AgentService::register_metrics() {
  CountersUnderLock<AgentCounters> counter{metrics_, mu_, machine_.counters()};
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "committed"}},
          [](const AgentCounters& c) { return c.committed; });
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "aborted"}},
          [](const AgentCounters& c) { return c.aborted; });
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "read_only"}},
          [](const AgentCounters& c) { return c.read_only; });
  counter("tpc_agent_votes_total", "votes", {{"vote", "yes"}},
          [](const AgentCounters& c) { return c.prepared; });
  counter("tpc_agent_votes_total", "votes", {{"vote", "no"}},
          [](const AgentCounters& c) { return c.votes_no; });
  counter("tpc_agent_one_phase_total", "branches committed in one phase", {},
          [](const AgentCounters& c) { return c.one_phase; });
  counter("tpc_agent_idle_rollbacks_total", "unprepared branches rolled back after their timeout",
          {}, [](const AgentCounters& c) { return c.idle_rollbacks; });
  counter("tpc_agent_in_doubt_resolved_total",
          "prepared branches settled by asking the coordinator", {},
          [](const AgentCounters& c) { return c.resolved_by_query; });
  counter("tpc_agent_unilateral_total", "3PC branches that decided alone", {{"outcome", "commit"}},
          [](const AgentCounters& c) { return c.unilateral_commits; });
  counter("tpc_agent_unilateral_total", "3PC branches that decided alone", {{"outcome", "abort"}},
          [](const AgentCounters& c) { return c.unilateral_aborts; });
  counter("tpc_agent_heuristic_mismatch_total",
          "branch outcomes found to disagree with the coordinator's decision", {},
          [](const AgentCounters& c) { return c.heuristic_mismatch; });
  counter("tpc_agent_heuristic_reports_total",
          "heuristic outcomes the coordinator recorded from this agent", {},
          [](const AgentCounters& c) { return c.reports_sent; });
  metrics_.gauge(
      "tpc_agent_heuristic_outcomes",
      "branches whose outcome disagrees with the coordinator's, not yet forgotten by an operator "
      "(kept across restarts)",
      [this] {
        std::lock_guard lock(mu_);
        return static_cast<double>(machine_.heuristic_outcomes());
      });
  counter("tpc_agent_refused_total", "new branches refused past branches_max", {},
          [](const AgentCounters& c) { return c.refused_overload; });
  struct StepCounter {
    const char* outcome;
    uint64_t AgentCounters::*field;
  };
  for (auto [outcome, field] :
       {StepCounter{"applied", &AgentCounters::steps_applied},
        StepCounter{"duplicate", &AgentCounters::steps_duplicate},
        StepCounter{"empty_compensation", &AgentCounters::steps_empty_compensation},
        StepCounter{"refused", &AgentCounters::steps_refused},
        StepCounter{"committed", &AgentCounters::steps_committed},
        StepCounter{"fenced", &AgentCounters::steps_fenced},
        StepCounter{"failed", &AgentCounters::steps_failed},
        StepCounter{"unknown", &AgentCounters::steps_unknown}})
    counter("tpc_agent_steps_total",
            "steps (docs/DESIGN.md §8) by outcome: what the barrier found, a business failure "
            "(failed), or an outcome the caller must resend to learn (unknown)",
            {{"outcome", outcome}}, [field](const AgentCounters& c) { return c.*field; });
  metrics_.gauge("tpc_agent_open_branches", "branches with an open session", [this] {
    std::lock_guard lock(mu_);
    return static_cast<double>(machine_.open_sessions());
  });
  metrics_.gauge("tpc_agent_prepared_branches", "prepared or pre-committed branches", [this] {
    std::lock_guard lock(mu_);
    return static_cast<double>(machine_.prepared_count());
  });
  metrics_.gauge("tpc_agent_oldest_prepared_seconds", "age of the oldest prepared branch", [this] {
    std::lock_guard lock(mu_);
    return static_cast<double>(machine_.oldest_prepared_age_ms(rt_.now_ms())) / 1000.0;
  });
  metrics_.gauge("tpc_agent_steps_in_flight", "SQL steps (docs/DESIGN.md §8) running or waiting",
                 [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.steps_in_flight());
                 });
  metrics_.gauge("tpc_agent_oldest_step_seconds",
                 "age of the oldest step in flight (it also holds back the barrier purge)", [this] {
                   std::lock_guard lock(mu_);
                   return static_cast<double>(machine_.oldest_step_age_ms(rt_.now_ms())) / 1000.0;
                 });
  metrics_.counter_fn("tpc_agent_pg_connections_opened_total", "PostgreSQL connections opened",
                      [this] { return static_cast<double>(pg_.connections_opened()); });
  op_latency_ = &metrics_.histogram("tpc_agent_pg_op_seconds", "PostgreSQL operations, run time",
                                    latency_buckets());
}

}  // namespace tpc::agent
