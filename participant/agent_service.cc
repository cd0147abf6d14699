#include "participant/agent_service.h"

#include <chrono>

#include "common/cli.h"
#include "common/failpoint.h"
#include "common/ids.h"
#include "common/json.h"
#include "participant/pg_branch.h"

namespace tpc::agent {
namespace {

OpResult failed(Status s, std::string sqlstate = "") {
  OpResult r;
  r.status = std::move(s);
  r.sqlstate = std::move(sqlstate);
  return r;
}

std::string joined(const std::vector<std::string>& items) {
  std::string out;
  for (auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return out;
}

// Whose records the database holds. Prepared transactions named after another agent, or an
// identity row naming another agent, mean --name or --pg points at another agent's database:
// answering that agent's coordinators from here would report its prepared branches as
// aborted, so the agent refuses to start.
//
// A different system identifier only warns (and the row takes the new one): a physical copy
// (pg_basebackup, a promoted replica) keeps the identifier, so a different one means a logical
// copy (pg_dump and restore into another cluster), and no prepared transaction survives that.
// Refusing would not bring a lost branch back; the coordinator treats a definite "aborted"
// from a branch that voted yes as a heuristic outcome.
Status check_identity(pg::PgConn& c, const std::string& name, Logger& log) {
  auto foreign = pg::foreign_prepared_agents(c, name);
  if (!foreign.ok()) return foreign.status();
  if (!foreign->empty())
    return invalid_argument("the database holds prepared transactions of agent " +
                            joined(*foreign) + ", not of --name " + name +
                            ": --name or --pg points at another agent's database");
  auto id = pg::claim_identity(c, name);
  if (!id.ok()) return id.status();
  if (id->agent != name)
    return invalid_argument("the database belongs to agent " + id->agent +
                            " (tpc_agent_identity), not to --name " + name +
                            ": --name or --pg points at another agent's database");
  auto sysid = pg::system_identifier(c);
  if (!sysid.ok()) return sysid.status();
  if (!*sysid)
    log.warn("system identifier unavailable: no EXECUTE on pg_control_system()", {{"agent", name}});
  if (*sysid && id->system_identifier && *id->system_identifier != **sysid) {
    log.warn(
        "database copied to another cluster: prepared transactions from before the copy are gone",
        {{"agent", name},
         {"recorded_system_identifier", *id->system_identifier},
         {"system_identifier", **sysid}});
    TPC_RETURN_IF_ERROR(pg::update_system_identifier(c, **sysid));
  }
  log.info(
      id->created ? "identity recorded" : "identity checked",
      {{"agent", name}, {"database", id->database}, {"system_identifier", sysid->value_or("")}});
  return ok_status();
}

}  // namespace

AgentService::AgentService(const AgentConfig& cfg, Logger& logger)
    : cfg_(cfg), log_(logger), loop_(cfg.threads), client_(loop_), machine_(cfg.machine, logger) {}

AgentService::~AgentService() { shutdown(0); }

Result<std::unique_ptr<AgentService>> AgentService::start(const AgentConfig& cfg, Logger& logger) {
  std::unique_ptr<AgentService> s(new AgentService(cfg, logger));
  TPC_RETURN_IF_ERROR(s->check_postgres());
  for (int i = 0; i < cfg.pg_workers; ++i) s->workers_.emplace_back([p = s.get()] { p->worker_loop(); });
  // The first scan runs before we serve: prepared branches left by an earlier run are known
  // before any coordinator asks about them.
  if (Status st = s->scan_once(); !st.ok())
    return Status(st.code(), "cannot scan pg_prepared_xacts: " + st.message());
  s->register_metrics();
  s->loop_.start();
  AgentService* self = s.get();
  auto server = HttpServer::start(s->loop_, cfg.http, [self](HttpRequest&& req, Responder respond) {
    self->handle(std::move(req), std::move(respond));
  });
  if (!server.ok()) return server.status();
  s->server_ = std::move(*server);
  s->started_ = true;
  s->tick();
  s->schedule(cfg.scan_interval_ms, [self] { self->scan(); });
  s->schedule(cfg.purge_interval_ms, [self] { self->purge(); });
  logger.info("agent started", {{"name", cfg.machine.name},
                                {"listen", cfg.http.host + ":" + std::to_string(s->port())},
                                {"url", cfg.advertise_url},
                                {"prepared", static_cast<uint64_t>(s->machine_.prepared_count())}});
  return s;
}

Status AgentService::check_postgres() {
  auto conn = acquire();
  if (!conn.ok()) return unavailable("cannot connect to PostgreSQL: " + conn.status().message());
  auto mpt = pg::max_prepared_transactions(**conn);
  if (!mpt.ok()) return unavailable("cannot read max_prepared_transactions: " + mpt.status().message());
  if (*mpt == 0)
    return invalid_argument(
        "PostgreSQL has max_prepared_transactions = 0, so PREPARE TRANSACTION cannot work; set it "
        "above 0 (for example to max_connections) in postgresql.conf and restart PostgreSQL");
  if (static_cast<size_t>(*mpt) < cfg_.machine.branches_max)
    log_.warn("max_prepared_transactions is below --branches-max: prepares past it are voted no",
              {{"max_prepared_transactions", *mpt},
               {"branches_max", static_cast<uint64_t>(cfg_.machine.branches_max)}});
  auto missing = pg::missing_privileges(**conn);
  if (!missing.ok())
    return unavailable("cannot check the agent's privileges: " + missing.status().message());
  if (!missing->empty())
    return invalid_argument("the PostgreSQL role lacks " + joined(*missing) + " in this database");
  Status st = pg::ensure_schema(**conn);
  if (!st.ok()) return Status(st.code(), "cannot create the agent's tables: " + st.message());
  st = check_identity(**conn, cfg_.machine.name, log_);
  if (!st.ok()) return Status(st.code(), "identity check: " + st.message());
  log_.info("postgres ready", {{"max_prepared_transactions", *mpt},
                               {"server_version", (*conn)->server_version()}});
  release(std::move(*conn));
  return ok_status();
}

uint16_t AgentService::port() const { return server_ ? server_->port() : 0; }

void AgentService::on_stop_signal(std::function<void(int)> fn) { loop_.on_stop_signal(std::move(fn)); }

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
      log_.warn("shutdown: requests still in flight after the drain period", {{"drain_ms", drain_ms}});
  }
  {
    std::lock_guard lock(jobs_mu_);
    workers_stop_ = true;
  }
  jobs_cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
  loop_.stop();
  loop_.join();
  server_.reset();
  {
    // Open sessions end with their connections: PostgreSQL rolls back what was not prepared.
    std::lock_guard lock(pool_mu_);
    sessions_.clear();
    idle_.clear();
  }
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
  loop_.run_after(delay_ms, std::move(fn));
}

// --- effects -------------------------------------------------------------------------------

void AgentService::run(Ready ready) {
  for (auto& op : ready.ops) {
    submit([this, op = std::move(op)]() mutable {
      int64_t started = monotonic_ms();
      OpResult res = execute(op);
      if (op_latency_) op_latency_->observe(static_cast<double>(monotonic_ms() - started) / 1000.0);
      with_machine([&](AgentMachine& m) { m.on_op_done(op.gid, op.kind, std::move(res), clock_.now_ms()); });
    });
  }
  for (auto& q : ready.peer_queries) query_peers(q);
  for (auto& gid : ready.cancels) cancel(gid);
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

void AgentService::cancel(const std::string& gid) {
  std::shared_ptr<pg::PgCancel> c;
  {
    std::lock_guard lock(cancel_mu_);
    cancel_requested_[gid] = true;
    auto it = running_.find(gid);
    if (it != running_.end()) c = it->second;
  }
  // PQcancel opens a connection to the server: never on a loop thread.
  if (c) std::thread([c] { (void)c->cancel(); }).detach();
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
    with_machine([&](AgentMachine& m) { m.on_peer_states(gid, std::move(all), clock_.now_ms()); });
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
    if (!cfg_.peer_token.empty()) req.headers.emplace_back("authorization", "Bearer " + cfg_.peer_token);
    SendOptions opts;
    opts.timeout_ms = cfg_.coordinator_timeout_ms;
    client_.send(*url, std::move(req), opts, [done, name = peer.participant](HttpResult res) {
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
    with_machine([&](AgentMachine& m) { m.on_enlisted(gid, not_found(url.status().message()), 0, clock_.now_ms()); });
    return;
  }
  HttpRequest req = coordinator_request("POST", "/v1/transactions/" + gid + "/branches");
  req.body = dump(Json{{"participant", cfg_.machine.name}, {"url", cfg_.advertise_url}});
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  client_.send(*url, std::move(req), opts, [this, gid](HttpResult res) {
    int64_t expires = 0;
    Status st = decode_enlist_answer(res.http_status, res.body, res.status, &expires);
    with_machine([&](AgentMachine& m) { m.on_enlisted(gid, st, expires, clock_.now_ms()); });
  });
}

void AgentService::ask(const std::string& gid) {
  if (TPC_FAILPOINT("agent.partition")) {
    with_machine([&](AgentMachine& m) {
      m.on_outcome(gid, Outcome::unreachable, "partitioned (failpoint)", clock_.now_ms());
    });
    return;
  }
  const std::string* base = coordinator_url(gid);
  Result<Url> url = base ? parse_url(*base) : Result<Url>(not_found("no coordinator configured"));
  if (!url.ok()) {
    with_machine([&](AgentMachine& m) {
      m.on_outcome(gid, Outcome::unknown, "no coordinator configured for this gid", clock_.now_ms());
    });
    return;
  }
  HttpRequest req = coordinator_request("GET", "/v1/transactions/" + gid);
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  client_.send(*url, std::move(req), opts, [this, gid](HttpResult res) {
    std::string answer;
    Outcome o = decode_outcome_answer(res.http_status, res.body, res.status, &answer);
    std::optional<BranchState> recorded;
    if (res.status.ok() && res.http_status == 200)
      recorded = decode_recorded_state(res.body, cfg_.machine.name);
    with_machine([&](AgentMachine& m) { m.on_outcome(gid, o, answer, clock_.now_ms(), recorded); });
  });
}

void AgentService::report(const Report& r) {
  const std::string* base = coordinator_url(r.gid);
  Result<Url> url = base ? parse_url(*base) : Result<Url>(not_found("no coordinator configured"));
  if (!url.ok() || TPC_FAILPOINT("agent.partition")) {
    Status st =
        url.ok() ? unavailable("partitioned (failpoint)") : not_found(url.status().message());
    with_machine([&](AgentMachine& m) { m.on_reported(r.gid, st, clock_.now_ms()); });
    return;
  }
  HttpRequest req = coordinator_request("POST", "/v1/transactions/" + r.gid + "/heuristic");
  req.body = dump(
      Json{{"participant", cfg_.machine.name}, {"state", r.committed ? "committed" : "aborted"}});
  SendOptions opts;
  opts.timeout_ms = cfg_.coordinator_timeout_ms;
  client_.send(*url, std::move(req), opts, [this, gid = r.gid](HttpResult res) {
    Status st = decode_report_answer(res.http_status, res.body, res.status);
    with_machine([&](AgentMachine& m) { m.on_reported(gid, st, clock_.now_ms()); });
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

void AgentService::submit(std::function<void()> job) {
  {
    std::lock_guard lock(jobs_mu_);
    jobs_.push_back(std::move(job));
  }
  jobs_cv_.notify_one();
}

void AgentService::worker_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(jobs_mu_);
      jobs_cv_.wait(lock, [this] { return workers_stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and drained
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    job();
  }
}

Result<Conn> AgentService::acquire() {
  {
    std::lock_guard lock(pool_mu_);
    while (!idle_.empty()) {
      Conn c = std::move(idle_.back());
      idle_.pop_back();
      if (c->usable() && !c->in_transaction()) return c;
    }
  }
  if (connections_open_.fetch_add(1) >= static_cast<int64_t>(cfg_.pg_connections_max)) {
    connections_open_.fetch_sub(1);
    return unavailable("all " + std::to_string(cfg_.pg_connections_max) +
                       " PostgreSQL connections are in use (--pg-connections-max)");
  }
  auto c = pg::PgConn::connect(cfg_.pg);
  if (!c.ok()) {
    connections_open_.fetch_sub(1);
    return c.status();
  }
  ++connections_opened_;
  return Conn(c->release(), ConnCloser{&connections_open_});
}

void AgentService::release(Conn conn) {
  if (!conn || !conn->usable() || conn->in_transaction()) return;  // dropped: closes it
  std::lock_guard lock(pool_mu_);
  if (idle_.size() < cfg_.pg_idle_max) idle_.push_back(std::move(conn));
}

Conn AgentService::take_session(const std::string& gid) {
  std::lock_guard lock(pool_mu_);
  auto it = sessions_.find(gid);
  if (it == sessions_.end()) return nullptr;
  Conn c = std::move(it->second);
  sessions_.erase(it);
  return c;
}

void AgentService::sessions_keep(const std::string& gid, Conn conn) {
  std::lock_guard lock(pool_mu_);
  sessions_[gid] = std::move(conn);
}

Status AgentService::record_3pc(const PgOp& op, const std::string& pgg) {
  // A 3PC branch records that it is one, and who its peers are, before it votes: after a
  // restart it must still apply the 3PC timeouts and know whom to ask.
  auto other = acquire();
  if (!other.ok()) return other.status();
  Status st = pg::put_state(**other, pgg, "prepared3", encode_peers(op.peers));
  if (st.ok()) release(std::move(*other));
  return st;
}

void AgentService::forget_3pc(const std::string& pgg) {
  if (auto other = acquire(); other.ok()) {
    (void)pg::delete_state(**other, pgg);
    release(std::move(*other));
  }
}

void AgentService::prepare_branch(const PgOp& op, const std::string& pgg, const GidParts& parts,
                                  pg::PgConn& conn, OpResult* res) {
  if (op.protocol == 3) {
    Status st = record_3pc(op, pgg);
    if (!st.ok()) {
      (void)pg::rollback(conn);
      res->prepare = pg::PrepareResult{pg::Vote::no, "cannot record the 3PC state: " + st.message(), ""};
      return;
    }
  }
  TPC_FAILPOINT("agent.before_prepare");
  auto p = pg::prepare(conn, pgg, parts.coordinator, static_cast<int64_t>(parts.epoch),
                       static_cast<int64_t>(parts.seq));
  if (!p.ok()) {
    res->status = p.status();
    return;
  }
  TPC_FAILPOINT("agent.after_prepare");
  res->prepare = *p;
  if (op.protocol == 3 && p->vote != pg::Vote::yes) forget_3pc(pgg);
}

OpResult AgentService::execute(PgOp& op) {
  auto parts = parse_gid(op.gid);
  TPC_ASSERT(parts.has_value());  // validated at the HTTP edge
  const std::string pgg = pg::pg_gid(cfg_.machine.name, op.gid);
  auto epoch = static_cast<int64_t>(parts->epoch), seq = static_cast<int64_t>(parts->seq);
  OpResult res;
  switch (op.kind) {
    case OpKind::exec: {
      Conn conn = take_session(op.gid);
      bool begin = !conn;
      if (!conn) {
        auto c = acquire();
        if (!c.ok()) return failed(c.status());
        conn = std::move(*c);
      }
      {
        std::lock_guard lock(cancel_mu_);
        if (cancel_requested_.erase(op.gid) > 0) {
          if (begin)
            release(std::move(conn));
          else
            sessions_keep(op.gid, std::move(conn));
          return failed(Status(Code::sql_error, "canceling statement: the branch is being aborted"),
                        "57014");
        }
        running_[op.gid] = conn->canceller();
      }
      pg::Finish finish = op.then_prepare  ? pg::Finish::prepare
                          : op.then_commit ? pg::Finish::commit
                                           : pg::Finish::none;
      if (finish == pg::Finish::prepare && op.protocol == 3) {
        Status st = record_3pc(op, pgg);
        if (!st.ok()) {
          {
            std::lock_guard lock(cancel_mu_);
            running_.erase(op.gid);
          }
          if (!begin) (void)pg::rollback(*conn);
          res.results = std::make_shared<std::vector<pg::StatementResult>>();
          res.prepare = pg::PrepareResult{pg::Vote::no, "cannot record the 3PC state: " + st.message(), ""};
          release(std::move(conn));
          return res;
        }
      }
      std::vector<pg::PipelineStep> steps;
      steps.reserve(op.statements.size());
      for (Statement& st : op.statements)
        steps.push_back(pg::PipelineStep{std::move(st.sql), std::move(st.params), true});
      std::vector<std::optional<int64_t>> expect_rows;
      for (const Statement& st : op.statements) expect_rows.push_back(st.expect_rows);
      if (finish == pg::Finish::prepare) TPC_FAILPOINT("agent.before_prepare");
      size_t statement_count = steps.size();
      pg::BranchRun run =
          pg::run_branch(*conn, begin, std::move(steps), finish, pgg, parts->coordinator, epoch, seq,
                         expect_rows);
      {
        std::lock_guard lock(cancel_mu_);
        running_.erase(op.gid);
        cancel_requested_.erase(op.gid);
      }
      if (run.vote) TPC_FAILPOINT("agent.after_prepare");
      if (run.outcome && *run.outcome == pg::Outcome::committed) TPC_FAILPOINT("agent.after_one_phase_commit");
      res.results = std::make_shared<std::vector<pg::StatementResult>>(std::move(run.results));
      if (!run.status.ok()) {
        if (run.status.code() == Code::unavailable) return failed(run.status);  // the session died
        std::string msg = statement_count > 1
                              ? "statement " + std::to_string(run.failed_statement + 1) + ": " + run.status.message()
                              : run.status.message();
        res.status = Status(run.status.code(), msg);
        res.sqlstate = run.sqlstate;
        if (finish == pg::Finish::none)
          sessions_keep(op.gid, std::move(conn));  // the failed block waits for its rollback
        else
          release(std::move(conn));  // already rolled back
        return res;
      }
      // Rows past the limit: a statement alone fails (the branch then votes no); a branch that
      // already prepared is rolled back; one that already committed keeps its outcome and says
      // its results were cut.
      for (size_t i = 0; i < res.results->size(); ++i) {
        auto& r = (*res.results)[i];
        if (r.rows.size() <= cfg_.result_rows_max) continue;
        std::string why = "statement " + std::to_string(i + 1) + " returned " + std::to_string(r.rows.size()) +
                          " rows; the limit is " + std::to_string(cfg_.result_rows_max);
        if (finish == pg::Finish::commit) {
          r.rows.resize(cfg_.result_rows_max);
          r.truncated = true;
          continue;
        }
        if (finish == pg::Finish::prepare && run.vote && run.vote->vote == pg::Vote::yes)
          (void)pg::rollback_prepared(*conn, pgg);
        res.status = Status(Code::sql_error, why);
        res.sqlstate = "54000";
        res.prepare.reset();
        if (finish == pg::Finish::none)
          sessions_keep(op.gid, std::move(conn));
        else
          release(std::move(conn));
        return res;
      }
      if (finish == pg::Finish::prepare) {
        res.prepare = *run.vote;
        if (op.protocol == 3 && run.vote->vote != pg::Vote::yes) forget_3pc(pgg);
        release(std::move(conn));
        return res;
      }
      if (finish == pg::Finish::commit) {
        res.outcome = *run.outcome;
        res.reason = run.reason;
        release(std::move(conn));
        return res;
      }
      sessions_keep(op.gid, std::move(conn));
      return res;
    }
    case OpKind::prepare: {
      auto conn = take_session(op.gid);
      if (!conn) return failed(unavailable("the branch has no open session"));
      prepare_branch(op, pgg, *parts, *conn, &res);
      if (res.prepare) release(std::move(conn));
      return res;
    }
    case OpKind::commit_one_phase: {
      auto conn = take_session(op.gid);
      if (!conn) return failed(unavailable("the branch has no open session"));
      std::string reason;
      auto o = pg::commit_one_phase(*conn, pgg, parts->coordinator, epoch, seq, &reason);
      if (!o.ok()) return failed(o.status());
      TPC_FAILPOINT("agent.after_one_phase_commit");
      res.outcome = *o;
      res.reason = reason;
      release(std::move(conn));
      return res;
    }
    case OpKind::rollback: {
      auto conn = take_session(op.gid);
      if (conn) {
        Status st = pg::rollback(*conn);
        if (st.ok()) release(std::move(conn));
      }
      return res;
    }
    case OpKind::commit_prepared:
    case OpKind::rollback_prepared:
    case OpKind::evidence:
    case OpKind::put_state:
    case OpKind::delete_state:
    case OpKind::tombstone: {
      auto c = acquire();
      if (!c.ok()) return failed(c.status());
      auto& conn = *c;
      if (op.kind == OpKind::commit_prepared) {
        TPC_FAILPOINT("agent.before_commit_prepared");
        auto o = pg::commit_prepared(*conn, pgg);
        if (!o.ok()) return failed(o.status());
        TPC_FAILPOINT("agent.after_commit_prepared");
        res.outcome = *o;
      } else if (op.kind == OpKind::rollback_prepared) {
        auto o = pg::rollback_prepared(*conn, pgg);
        if (!o.ok()) return failed(o.status());
        res.outcome = *o;
      } else if (op.kind == OpKind::tombstone) {
        auto o = pg::put_tombstone(*conn, pgg, parts->coordinator, epoch, seq);
        if (!o.ok()) return failed(o.status());
        res.outcome = *o;
      } else if (op.kind == OpKind::evidence) {
        auto e = pg::evidence(*conn, pgg);
        if (!e.ok()) return failed(e.status());
        res.evidence = *e;
      } else if (op.kind == OpKind::delete_state) {
        Status st = pg::delete_state(*conn, pgg);
        if (!st.ok()) return failed(st);
      } else {
        std::string detail = op.peers.empty() ? op.detail : encode_peers(op.peers);
        Status st = pg::put_state(*conn, pgg, op.state, detail);
        if (!st.ok()) return failed(st);
      }
      if (op.clear_state) {
        // The pre-commit record has done its job once the branch is finished; a failure
        // here leaves a stale row that the next scan ignores.
        (void)pg::delete_state(*conn, pgg);
      }
      release(std::move(conn));
      return res;
    }
  }
  return failed(internal_error("unknown operation"));
}

Status AgentService::scan_once() {
  int64_t started = clock_.now_ms();
  auto c = acquire();
  if (!c.ok()) return c.status();
  TPC_FAILPOINT("agent.during_scan");
  auto list = pg::list_prepared(**c, cfg_.machine.name);
  if (!list.ok()) return list.status();
  std::vector<AgentMachine::ScanEntry> entries;
  for (auto& x : *list) {
    auto gid = pg::global_gid(cfg_.machine.name, x.pg_gid);
    if (!gid) continue;
    AgentMachine::ScanEntry e;
    e.gid = *gid;
    e.age_ms = x.prepared_age_ms;
    auto state = pg::read_state(**c, x.pg_gid);
    if (!state.ok()) return state.status();
    if (state->has_value()) {
      e.durable_state = (*state)->state;
      e.peers = decode_peers_text((*state)->detail);
    }
    entries.push_back(std::move(e));
  }
  auto rows = pg::list_decided_states(**c, cfg_.machine.name);
  if (!rows.ok()) return rows.status();
  std::vector<AgentMachine::DecidedEntry> decided;
  for (auto& row : *rows) {
    auto gid = pg::global_gid(cfg_.machine.name, row.pg_gid);
    auto rec = parse_check_record(row.state.state);
    if (!gid || !rec) continue;
    decided.push_back(AgentMachine::DecidedEntry{*gid, *rec, row.state.detail});
  }
  release(std::move(*c));
  with_machine([&](AgentMachine& m) {
    m.on_scan(std::move(entries), started, clock_.now_ms(), std::move(decided));
  });
  return ok_status();
}

void AgentService::scan() {
  submit([this] {
    Status st = scan_once();
    if (!st.ok()) log_.warn("in-doubt scan failed", {{"error", st.to_string()}});
    schedule(cfg_.scan_interval_ms, [this] { scan(); });
  });
}

void AgentService::purge() {
  for (auto& [id, base] : cfg_.coordinators) {
    auto url = parse_url(base);
    if (!url.ok()) continue;
    HttpRequest req = coordinator_request("GET", "/v1/status");
    SendOptions opts;
    opts.timeout_ms = cfg_.coordinator_timeout_ms;
    client_.send(*url, std::move(req), opts, [this, id = id](HttpResult res) {
      if (!res.status.ok() || res.http_status != 200) return;
      auto j = parse_json(res.body);
      if (!j.ok() || !j->contains("finished_below")) return;
      const Json& fb = (*j)["finished_below"];
      if (!fb.is_object() || !fb.contains("epoch") || !fb.contains("seq") ||
          !fb["epoch"].is_number_unsigned() || !fb["seq"].is_number_unsigned())
        return;
      auto epoch = fb["epoch"].get<int64_t>(), seq = fb["seq"].get<int64_t>();
      submit([this, id, epoch, seq] {
        auto c = acquire();
        if (!c.ok()) return;
        int64_t total = 0;
        for (int round = 0; round < 10; ++round) {
          auto n = pg::purge_markers(**c, id, epoch, seq, 10'000);
          if (!n.ok()) break;
          total += *n;
          if (*n < 10'000) break;
        }
        release(std::move(*c));
        if (total > 0) log_.info("purged markers", {{"coordinator", id}, {"rows", total}});
      });
    });
  }
  submit([this] {
    auto c = acquire();
    if (!c.ok()) return;
    auto n = pg::purge_stale_states(**c, cfg_.machine.name, 3'600);
    release(std::move(*c));
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
        views = machine_.in_doubt(clock_.now_ms());
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
  const Json* items = r.array("requests", true, cfg_.batch_max);
  if (Status st = r.finish(); !st.ok()) return respond(error_response(st));
  if (items->empty()) return respond(json_response(200, Json{{"responses", Json::array()}}));
  std::vector<HttpRequest> subs;
  for (size_t i = 0; i < items->size(); ++i) {
    const Json& it = (*items)[i];
    std::string where = "requests[" + std::to_string(i) + "]";
    if (!it.is_object() || !it.contains("path") || !it["path"].is_string())
      return respond(error_response(invalid_argument(where + " needs a \"path\" string")));
    FieldReader ir(it);
    ir.allow("path");
    ir.allow("body");
    if (Status st = ir.finish(); !st.ok())
      return respond(error_response(Status(st.code(), where + ": " + st.message())));
    HttpRequest sub;
    sub.method = "POST";
    sub.target = it["path"].get<std::string>();
    if (sub.target.rfind("/v1/branches/", 0) != 0)
      return respond(error_response(invalid_argument(where + ": only /v1/branches/... requests can be batched")));
    if (it.contains("body")) {
      if (!it["body"].is_object()) return respond(error_response(invalid_argument(where + ".body must be an object")));
      sub.body = dump(it["body"]);
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
      std::string body = "{\"responses\":[";
      for (size_t k = 0; k < g->out.size(); ++k) {
        if (k > 0) body += ",";
        body += "{\"status\":" + std::to_string(g->out[k].status) + ",\"body\":";
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
    views = machine_.list(state, limit, clock_.now_ms());
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
      v = machine_.view(gid, clock_.now_ms());
    }
    if (!v) return respond(error_response(not_found("no branch " + gid + " in memory")));
    return respond(json_response(200, encode_view(*v)));
  }
  Result<Request> r = invalid_argument("");
  if (action == "exec")
    r = decode_exec(req.body, cfg_.exec);
  else if (action == "prepare")
    r = decode_prepare(req.body);
  else if (action == "commit")
    r = decode_commit(req.body);
  else if (action == "resolve")
    r = decode_resolve(req.body);
  else if (action == "precommit" || action == "abort" || action == "query" || action == "forget") {
    auto o = parse_empty_object(req.body);
    if (!o.ok()) return respond(error_response(o.status()));
    Request q;
    q.kind = action == "abort"    ? RequestKind::abort
             : action == "query"  ? RequestKind::status
             : action == "forget" ? RequestKind::forget
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
  with_machine([&](AgentMachine& m) { m.request(gid, std::move(q), clock_.now_ms()); });
}

// --- time ----------------------------------------------------------------------------------

void AgentService::tick() {
  if (stopping_) return;
  with_machine([&](AgentMachine& m) { m.tick(clock_.now_ms()); });
  schedule(cfg_.tick_ms, [this] { tick(); });
}

void AgentService::register_metrics() {
  auto counter = [this](const std::string& name, const std::string& help, Labels labels,
                        std::function<uint64_t(const AgentCounters&)> read) {
    metrics_.counter_fn(name, help, [this, read] {
      std::lock_guard lock(mu_);
      return static_cast<double>(read(machine_.counters()));
    }, std::move(labels));
  };
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "committed"}},
          [](const AgentCounters& c) { return c.committed; });
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "aborted"}},
          [](const AgentCounters& c) { return c.aborted; });
  counter("tpc_agent_branches_total", "branches ended, by outcome", {{"outcome", "read_only"}},
          [](const AgentCounters& c) { return c.read_only; });
  counter("tpc_agent_votes_total", "votes", {{"vote", "yes"}}, [](const AgentCounters& c) { return c.prepared; });
  counter("tpc_agent_votes_total", "votes", {{"vote", "no"}}, [](const AgentCounters& c) { return c.votes_no; });
  counter("tpc_agent_one_phase_total", "branches committed in one phase", {},
          [](const AgentCounters& c) { return c.one_phase; });
  counter("tpc_agent_idle_rollbacks_total", "unprepared branches rolled back after their timeout", {},
          [](const AgentCounters& c) { return c.idle_rollbacks; });
  counter("tpc_agent_in_doubt_resolved_total", "prepared branches settled by asking the coordinator", {},
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
    return static_cast<double>(machine_.oldest_prepared_age_ms(clock_.now_ms())) / 1000.0;
  });
  metrics_.counter_fn("tpc_agent_pg_connections_opened_total", "PostgreSQL connections opened",
                      [this] { return static_cast<double>(connections_opened_.load()); });
  op_latency_ = &metrics_.histogram("tpc_agent_pg_op_seconds", "PostgreSQL operations, run time",
                                    latency_buckets());
}

}  // namespace tpc::agent
