#include "coordinator/codec.h"

#include "common/wire.h"

namespace tpc::coord {
namespace {

// The shape of one statement of a one-shot branch: the fields the agent's exec takes, a
// non-empty sql string, scalar params, a non-negative integer expect_rows.
// In a SQL op's params, {"tpc":"gid"} and {"tpc":"branch"} stand for the transaction's gid
// and the branch or step name (docs/DESIGN.md §8); the agent substitutes them.
bool tpc_param(const Json& p) {
  if (!p.is_object() || p.size() != 1 || !p.contains("tpc") || !p["tpc"].is_string()) return false;
  const std::string& v = p["tpc"].get_ref<const std::string&>();
  return v == "gid" || v == "branch";
}

Status check_statement(const Json& st, bool tpc_params = false) {
  if (!st.is_object()) return invalid_argument("each statement must be an object");
  FieldReader r(st);
  std::string sql;
  int64_t expect = 0;
  r.string("sql", &sql, true);
  const Json* params = r.array("params");
  r.int64("expect_rows", &expect, 0, INT64_MAX);
  TPC_RETURN_IF_ERROR(r.finish());
  if (sql.empty()) return invalid_argument("\"sql\" must not be empty");
  if (params)
    for (auto& p : *params)
      if ((p.is_object() || p.is_array()) && !(tpc_params && tpc_param(p)))
        return invalid_argument(
            tpc_params ? "params must be strings, numbers, booleans, null, {\"tpc\":\"gid\"} or "
                         "{\"tpc\":\"branch\"}"
                       : "params must be strings, numbers, booleans or null");
  return ok_status();
}

}  // namespace

Result<std::string> decode_notify(const Json& j) {
  if (!j.contains("notify")) return std::string();
  const Json& n = j["notify"];
  if (!n.is_object() || !n.contains("url"))
    return invalid_argument("\"notify\" must be an HTTP op: {\"url\",\"body\"?,\"headers\"?}");
  auto op = decode_op(n, StepOp::notify, "notify", 0);
  if (!op.ok()) return op.status();
  return std::move(op->json);
}

namespace {

// Ends a body's FieldReader, "notify" allowed, then decodes that op into *notify ("" absent).
Status finish_with_notify(FieldReader& r, const Json& j, std::string* notify) {
  r.allow("notify");
  TPC_RETURN_IF_ERROR(r.finish());
  auto op = decode_notify(j);
  if (!op.ok()) return op.status();
  *notify = std::move(*op);
  return ok_status();
}

}  // namespace

Result<BeginRequest> decode_begin(std::string_view body, int64_t timeout_max_ms) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  return decode_begin_json(*j, timeout_max_ms);
}

Result<BeginRequest> decode_begin_json(const Json& j, int64_t timeout_max_ms) {
  FieldReader r(j);
  BeginRequest out;
  std::string protocol;
  int64_t timeout = 0;
  r.string("protocol", &protocol, false, 16);
  if (r.int64("timeout_ms", &timeout, 1, timeout_max_ms) && r.has("timeout_ms"))
    out.timeout_ms = timeout;
  TPC_RETURN_IF_ERROR(finish_with_notify(r, j, &out.notify));
  if (!protocol.empty()) {
    auto p = parse_protocol(protocol);
    if (p == Protocol::saga)
      return invalid_argument("a saga is run in one request: POST /v1/transactions/run");
    if (!p || p == Protocol::notify)
      return invalid_argument("\"protocol\" must be \"2pc\", \"3pc\", \"tcc\" or \"msg\"");
    out.protocol = *p;
  }
  return out;
}

Result<EnlistRequest> decode_enlist(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  EnlistRequest out;
  r.string("participant", &out.participant, true, 64);
  r.string("url", &out.url, true, 512);
  r.string("instance", &out.instance, false, 64);
  TPC_RETURN_IF_ERROR(r.finish());
  if (!valid_participant_name(out.participant))
    return invalid_argument("\"participant\" must match [A-Za-z0-9_-]{1,32}");
  auto u = parse_url(out.url);
  if (!u.ok()) return u.status();
  return out;
}

Result<RunRequest> decode_run(std::string_view body, size_t statements_max) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  return decode_run_json(*j, statements_max);
}

std::optional<std::string> run_protocol(const Json& j) {
  auto it = j.find("protocol");
  if (it == j.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

Result<RunRequest> decode_run_json(const Json& j, size_t statements_max) {
  FieldReader r(j);
  RunRequest out;
  std::string protocol, wait;
  r.string("protocol", &protocol, false, 16);
  r.string("wait", &wait, false, 32);
  const Json* branches = r.array("branches", true, 1024);
  TPC_RETURN_IF_ERROR(finish_with_notify(r, j, &out.notify));
  if (!protocol.empty()) {
    auto p = parse_protocol(protocol);
    if (p == Protocol::tcc)
      return invalid_argument(
          "a tcc transaction begins with POST /v1/transactions, then tries its branches");
    if (p == Protocol::saga) return invalid_argument("a saga's run names \"steps\", not branches");
    if (p == Protocol::msg)
      return invalid_argument("a message's run names \"local\" and \"destinations\"");
    if (!p || !prepares_branches(*p))
      return invalid_argument("\"protocol\" must be \"2pc\", \"3pc\", \"saga\" or \"msg\"");
    out.protocol = *p;
  }
  if (wait == "decision")
    out.opts.wait_decision_only = true;
  else if (!wait.empty() && wait != "completion")
    return invalid_argument("\"wait\" must be \"completion\" or \"decision\"");
  for (size_t i = 0; i < branches->size(); ++i) {
    const Json& b = (*branches)[i];
    std::string where = "branches[" + std::to_string(i) + "]";
    if (!b.is_object()) return invalid_argument(where + " must be an object");
    FieldReader br(b);
    RunBranch rb;
    br.string("participant", &rb.participant, true, 64);
    const Json* statements = br.array("statements", true, statements_max);
    if (Status st = br.finish(); !st.ok()) return Status(st.code(), where + ": " + st.message());
    if (!valid_participant_name(rb.participant))
      return invalid_argument(where + ".participant must match [A-Za-z0-9_-]{1,32}");
    if (statements->empty()) return invalid_argument(where + ".statements must not be empty");
    for (size_t k = 0; k < statements->size(); ++k) {
      Status st = check_statement((*statements)[k]);
      if (!st.ok())
        return Status(st.code(), where + ".statements[" + std::to_string(k) + "]: " + st.message());
    }
    // Params that are not integers were kept as the text the client sent (see parse_json):
    // the agent binds exactly those digits.
    rb.statements = dump(*statements);
    out.branches.push_back(std::move(rb));
  }
  return out;
}

Result<CommitOptions> decode_commit(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  std::string wait;
  r.string("wait", &wait, false, 32);
  TPC_RETURN_IF_ERROR(r.finish());
  CommitOptions o;
  if (wait == "decision")
    o.wait_decision_only = true;
  else if (!wait.empty() && wait != "completion")
    return invalid_argument("\"wait\" must be \"completion\" or \"decision\"");
  return o;
}

Result<bool> decode_resolve(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  std::string outcome;
  r.string("outcome", &outcome, true, 16);
  TPC_RETURN_IF_ERROR(r.finish());
  if (outcome != "commit" && outcome != "abort")
    return invalid_argument("\"outcome\" must be \"commit\" or \"abort\"");
  return outcome == "commit";
}

Result<BranchReport> decode_branch_report(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  BranchReport out;
  std::string state;
  r.string("participant", &out.participant, true, 64);
  r.string("state", &state, true, 16);
  if (!r.ok()) return r.status();
  if (!valid_participant_name(out.participant))
    return invalid_argument("participant name must match [A-Za-z0-9_-]{1,32}");
  if (state != wire::kCommitted && state != wire::kAborted)
    return invalid_argument("\"state\" must be \"committed\" or \"aborted\"");
  out.committed = state == wire::kCommitted;
  return out;
}

// --- TCC and saga ops ------------------------------------------------------------------------

namespace {

// Headers a client may not set on an HTTP op: the ones the coordinator writes, and the ones
// that frame the request.
bool reserved_op_header(std::string_view lower) {
  static constexpr std::string_view kReserved[] = {"host",
                                                   "content-length",
                                                   "transfer-encoding",
                                                   "connection",
                                                   "content-type",
                                                   "tpc-gid",
                                                   "tpc-branch",
                                                   "tpc-op",
                                                   "tpc-attempt",
                                                   "idempotency-key",
                                                   "expect",
                                                   "upgrade",
                                                   "te",
                                                   "trailer",
                                                   "keep-alive"};
  for (auto r : kReserved)
    if (r == lower) return true;
  return false;
}

bool header_token(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
  return true;
}

bool header_value_ok(std::string_view v) {
  for (char c : v)
    if (c == '\r' || c == '\n' || c == '\0') return false;
  return true;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

Status in(std::string_view where, const Status& st) {
  return Status(st.code(), std::string(where) + ": " + st.message());
}

Result<wal::OpText> decode_http_op(const Json& j, StepOp op, std::string_view where) {
  FieldReader r(j);
  std::string url;
  r.string("url", &url, true, 2048);
  bool has_body = r.has("body");
  bool has_headers = r.has("headers");
  if (Status st = r.finish(); !st.ok()) return in(where, st);
  auto u = parse_url(url);
  if (!u.ok()) return in(where, u.status());
  Json norm = {{"url", url}};
  if (has_body) norm["body"] = j["body"];
  if (has_headers) {
    const Json& h = j["headers"];
    if (!h.is_object()) return invalid_argument(std::string(where) + ".headers must be an object");
    if (h.size() > kOpHeadersMax)
      return invalid_argument(std::string(where) + ".headers: at most " +
                              std::to_string(kOpHeadersMax));
    Json hs = Json::object();
    for (auto it = h.begin(); it != h.end(); ++it) {
      std::string name = lower(it.key());
      if (!header_token(name))
        return invalid_argument(std::string(where) + ".headers: bad header name " + echo(it.key()));
      if (reserved_op_header(name))
        return invalid_argument(std::string(where) + ".headers: " + name +
                                " is set by the coordinator");
      if (!it->is_string() || it->get_ref<const std::string&>().size() > kOpHeaderValueMaxBytes ||
          !header_value_ok(it->get_ref<const std::string&>()))
        return invalid_argument(
            std::string(where) + ".headers." + name + " must be a string of at most " +
            std::to_string(kOpHeaderValueMaxBytes) + " bytes, without CR, LF or NUL");
      hs[name] = *it;
    }
    norm["headers"] = std::move(hs);
  }
  return wal::OpText{op, dump(norm)};
}

Result<wal::OpText> decode_sql_op(const Json& j, StepOp op, std::string_view where,
                                  size_t statements_max) {
  FieldReader r(j);
  std::string participant;
  r.string("participant", &participant, true, 64);
  // A check through an agent has no statements: the agent answers from its barrier table.
  const bool check = op == StepOp::check;
  const Json* statements = r.array("statements", !check, statements_max);
  if (Status st = r.finish(); !st.ok()) return in(where, st);
  if (!valid_participant_name(participant))
    return invalid_argument(std::string(where) + ".participant must match [A-Za-z0-9_-]{1,32}");
  if (check) {
    if (statements != nullptr)
      return invalid_argument(std::string(where) +
                              " names an agent, which answers from its barrier table: it takes "
                              "no \"statements\"");
    return wal::OpText{op, dump(Json{{"participant", participant}})};
  }
  bool may_be_empty = op == StepOp::cancel || op == StepOp::compensate;
  if (statements->empty() && !may_be_empty)
    return invalid_argument(std::string(where) + ".statements must not be empty");
  for (size_t k = 0; k < statements->size(); ++k) {
    Status st = check_statement((*statements)[k], true);
    if (!st.ok()) return in(std::string(where) + ".statements[" + std::to_string(k) + "]", st);
  }
  return wal::OpText{op, dump(Json{{"participant", participant}, {"statements", *statements}})};
}

}  // namespace

Result<wal::OpText> decode_op(const Json& j, StepOp op, std::string_view where,
                              size_t statements_max) {
  if (!j.is_object())
    return invalid_argument(std::string(where) +
                            " must be an op: {\"url\",...} or {\"participant\",\"statements\"}");
  bool http = j.contains("url"), sql = j.contains("participant");
  if (http == sql)
    return invalid_argument(std::string(where) +
                            " must name either \"url\" (an HTTP op) or \"participant\" (a SQL op)");
  return http ? decode_http_op(j, op, where) : decode_sql_op(j, op, where, statements_max);
}

Result<OpBranch> decode_try(std::string_view body, size_t statements_max) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  OpBranch out;
  r.string("branch", &out.name, true, 64);
  for (auto k : {"try", "confirm", "cancel"})
    if (!r.has(k)) r.fail(invalid_argument(std::string("missing field \"") + k + "\""));
  TPC_RETURN_IF_ERROR(r.finish());
  if (!valid_participant_name(out.name))
    return invalid_argument("\"branch\" must match [A-Za-z0-9_-]{1,32}");
  for (StepOp op : {StepOp::try_op, StepOp::confirm, StepOp::cancel}) {
    std::string key(step_op_name(op));
    auto o = decode_op((*j)[key], op, key, statements_max);
    if (!o.ok()) return o.status();
    out.ops.push_back(std::move(*o));
  }
  return out;
}

Result<SagaRequest> decode_saga(const Json& j, size_t statements_max, int64_t timeout_max_ms) {
  FieldReader r(j);
  SagaRequest out;
  std::string protocol, recovery, wait;
  int64_t timeout = 0;
  r.string("protocol", &protocol, true, 16);
  const Json* steps = r.array("steps", true, 1024);
  r.boolean("parallel", &out.opts.parallel);
  r.string("recovery", &recovery, false, 16);
  r.string("wait", &wait, false, 16);
  if (r.int64("timeout_ms", &timeout, 1, timeout_max_ms) && r.has("timeout_ms"))
    out.opts.timeout_ms = timeout;
  bool has_retry = r.has("retry");
  TPC_RETURN_IF_ERROR(finish_with_notify(r, j, &out.opts.notify));
  if (protocol != "saga") return invalid_argument("\"protocol\" must be \"saga\"");
  if (recovery == "forward")
    out.opts.forward = true;
  else if (!recovery.empty() && recovery != "backward")
    return invalid_argument("\"recovery\" must be \"backward\" or \"forward\"");
  if (wait == "accepted")
    out.opts.wait_accepted = true;
  else if (!wait.empty() && wait != "completion")
    return invalid_argument("\"wait\" must be \"completion\" or \"accepted\"");
  // Forward recovery retries until the step succeeds unless told otherwise.
  out.opts.attempts_max = out.opts.forward ? 0 : kSagaAttemptsDefault;
  if (has_retry) {
    const Json& rj = j["retry"];
    if (!rj.is_object()) return invalid_argument("\"retry\" must be an object");
    FieldReader rr(rj);
    int64_t attempts = out.opts.attempts_max, min_ms = 0, max_ms = 0;
    rr.int64("max_attempts", &attempts, out.opts.forward ? 0 : 1, kSagaAttemptsMax);
    rr.int64("min_ms", &min_ms, 1, kRetryAfterMaxMs);
    rr.int64("max_ms", &max_ms, 1, kRetryAfterMaxMs);
    if (Status st = rr.finish(); !st.ok()) return in("retry", st);
    out.opts.attempts_max = static_cast<uint32_t>(attempts);
    out.opts.retry_min_ms = min_ms;
    out.opts.retry_max_ms = max_ms;
  }
  for (size_t i = 0; i < steps->size(); ++i) {
    const Json& s = (*steps)[i];
    std::string where = "steps[" + std::to_string(i) + "]";
    if (!s.is_object()) return invalid_argument(where + " must be an object");
    FieldReader sr(s);
    OpBranch step;
    sr.string("name", &step.name, true, 64);
    bool has_action = sr.has("action"), has_compensate = sr.has("compensate");
    if (Status st = sr.finish(); !st.ok()) return in(where, st);
    if (!has_action) return invalid_argument(where + " needs \"action\"");
    auto a = decode_op(s["action"], StepOp::action, where + ".action", statements_max);
    if (!a.ok()) return a.status();
    step.ops.push_back(std::move(*a));
    if (has_compensate) {
      auto c =
          decode_op(s["compensate"], StepOp::compensate, where + ".compensate", statements_max);
      if (!c.ok()) return c.status();
      step.ops.push_back(std::move(*c));
    }
    out.steps.push_back(std::move(step));
  }
  return out;
}

Result<MsgRequest> decode_msg(const Json& j, bool one_request, size_t statements_max,
                              int64_t timeout_max_ms) {
  FieldReader r(j);
  MsgRequest out;
  std::string protocol;
  int64_t timeout = 0;
  r.string("protocol", &protocol, true, 16);
  const Json* destinations = r.array("destinations", true, kMsgDestinationsMax);
  bool has_check = r.has("check"), has_local = r.has("local");
  if (r.int64("timeout_ms", &timeout, 1, timeout_max_ms) && r.has("timeout_ms"))
    out.timeout_ms = timeout;
  TPC_RETURN_IF_ERROR(finish_with_notify(r, j, &out.notify));
  if (protocol != "msg") return invalid_argument("\"protocol\" must be \"msg\"");
  if (destinations->empty()) return invalid_argument("\"destinations\" must not be empty");
  if (one_request) {
    if (has_check)
      return invalid_argument(
          "the one-request form takes no \"check\": the agent of \"local\" answers it");
    if (!has_local) return invalid_argument("missing field \"local\"");
    const Json& lj = j["local"];
    if (!lj.is_object() || !lj.contains("participant"))
      return invalid_argument("\"local\" must be a SQL op: {\"participant\",\"statements\"}");
    auto local = decode_op(lj, StepOp::local, "local", statements_max);
    if (!local.ok()) return local.status();
    out.producer.push_back(std::move(*local));
    out.producer.push_back(
        wal::OpText{StepOp::check, dump(Json{{"participant", lj["participant"]}})});
  } else {
    if (has_local)
      return invalid_argument(
          "\"local\" goes with POST /v1/transactions/run; a half message names its \"check\"");
    if (!has_check) return invalid_argument("missing field \"check\"");
    auto check = decode_op(j["check"], StepOp::check, "check", statements_max);
    if (!check.ok()) return check.status();
    out.producer.push_back(std::move(*check));
  }
  for (size_t i = 0; i < destinations->size(); ++i) {
    auto d = decode_op((*destinations)[i], StepOp::deliver,
                       "destinations[" + std::to_string(i) + "]", statements_max);
    if (!d.ok()) return d.status();
    out.destinations.push_back(std::move(*d));
  }
  return out;
}

Result<OpTarget> decode_op_target(std::string_view spec) {
  auto j = parse_object(spec);
  if (!j.ok()) return corruption("an op's logged JSON does not parse: " + j.status().message());
  OpTarget t;
  if (j->contains("participant")) {
    t.sql = true;
    t.participant = (*j)["participant"].get<std::string>();
    t.body = j->contains("statements") ? dump((*j)["statements"]) : "[]";
    return t;
  }
  if (!j->contains("url") || !(*j)["url"].is_string()) return corruption("an op without a url");
  t.url = (*j)["url"].get<std::string>();
  t.body = j->contains("body") ? dump((*j)["body"]) : "{}";
  if (j->contains("headers"))
    for (auto it = (*j)["headers"].begin(); it != (*j)["headers"].end(); ++it)
      t.headers.emplace_back(it.key(), it->get<std::string>());
  return t;
}

std::string encode_step_body(const OpCall& c, std::string_view statements) {
  std::string body = dump(Json{{"branch", c.branch}, {"op", std::string(step_op_name(c.op))}});
  body.pop_back();  // '}'
  body += ",\"statements\":";
  body += statements.empty() ? std::string_view("[]") : statements;
  body += "}";
  return body;
}

Headers op_call_headers(const OpCall& c) {
  std::string op(step_op_name(c.op));
  return {{"tpc-gid", c.gid},
          {"tpc-branch", c.branch},
          {"tpc-op", op},
          {"tpc-attempt", std::to_string(c.attempt)},
          {"idempotency-key", c.gid + "/" + c.branch + "/" + op}};
}

namespace {

// The op's result as the log keeps it: the answer's JSON, or a note when it is too large.
std::string op_result(std::string_view body) {
  if (body.empty()) return "";
  auto j = parse_json(body);
  if (!j.ok()) return "";
  if (body.size() > kOpResultMaxBytes)
    return dump(Json{{"truncated", true}, {"bytes", body.size()}});
  return dump(*j);
}

// Why an op failed, in one line: the answer's error message, or its status.
std::string op_error(int http_status, std::string_view body) {
  std::string what = "HTTP " + std::to_string(http_status);
  auto j = parse_json(body);
  if (!j.ok() || !j->is_object()) return what;
  if (auto e = j->find("error"); e != j->end()) {
    if (e->is_string()) return what + ": " + e->get<std::string>();
    if (e->is_object()) {
      std::string msg;
      if (e->contains("code") && (*e)["code"].is_string()) msg = (*e)["code"].get<std::string>();
      if (e->contains("message") && (*e)["message"].is_string())
        msg += (msg.empty() ? "" : ": ") + (*e)["message"].get<std::string>();
      if (e->contains("sqlstate") && (*e)["sqlstate"].is_string())
        msg += " (SQLSTATE " + (*e)["sqlstate"].get<std::string>() + ")";
      if (!msg.empty()) return what + ": " + msg.substr(0, 512);
    }
  }
  return what;
}

// Retry-After as seconds or as an HTTP-date (then against wall_now_ms); 0 when malformed.
int64_t retry_after_ms(std::string_view v, int64_t wall_now_ms) {
  if (v.empty()) return 0;
  if (v.size() <= 9 &&
      std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    int64_t s = 0;
    for (char c : v) s = s * 10 + (c - '0');
    return std::min(s * 1000, kRetryAfterMaxMs);
  }
  auto at = parse_http_date(v);
  if (!at) return 0;
  return std::clamp(*at * 1000 - wall_now_ms, int64_t{0}, kRetryAfterMaxMs);
}

}  // namespace

OpReply decode_op_answer(const OpCall& c, bool sql, int http_status, std::string_view body,
                         std::string_view retry_after, const Status& transport,
                         int64_t wall_now_ms) {
  OpReply r{c.gid, c.branch, c.op, OpOutcome::unknown, "", "", 0};
  if (!transport.ok()) {
    r.error = transport.to_string();
    return r;
  }
  if (http_status >= 200 && http_status < 300) {
    r.outcome = OpOutcome::ok;
    r.result = op_result(body);
    return r;
  }
  r.error = op_error(http_status, body);
  if (http_status == 409 || http_status == 422) {
    r.outcome = OpOutcome::business_failure;
    return r;
  }
  // Our agent's 503s always carry Retry-After: 1, a hint for clients; a SQL op that met a
  // serialisation failure is retried at the op's own pace.
  if (!sql) r.retry_after_ms = retry_after_ms(retry_after, wall_now_ms);
  return r;
}

namespace {

// A logged op result back to JSON (null when there is none).
Json result_json(const std::string& text) {
  if (text.empty()) return Json();
  auto j = parse_json(text);
  return j.ok() ? std::move(*j) : Json();
}

// A TCC transaction's "branches" or a saga's "steps", and a saga's "results" of its done steps.
void encode_op_branches(const TxnView& v, Json* j) {
  Json arr = Json::array();
  Json results = Json::object();
  for (auto& b : v.branches) {
    Json jb = {{"name", b.participant},
               {"state", std::string(branch_state_name(b.state))},
               {"attempts", b.attempts}};
    if (!b.result.empty()) jb["result"] = result_json(b.result);
    if (!b.last_error.empty()) jb["last_error"] = b.last_error;
    if (b.heuristic) jb["heuristic"] = true;
    if (b.forced) jb["forced"] = true;
    if (b.state == BranchState::done) results[b.participant] = result_json(b.result);
    arr.push_back(std::move(jb));
  }
  if (v.protocol == Protocol::saga) {
    (*j)["steps"] = std::move(arr);
    (*j)["results"] = std::move(results);
  } else if (v.protocol == Protocol::msg && !arr.empty()) {
    // The producer's slot first, then the destinations.
    Json local = std::move(arr[0]);
    local.erase("name");
    arr.erase(arr.begin());
    (*j)["local"] = std::move(local);
    (*j)["destinations"] = std::move(arr);
  } else {
    (*j)["branches"] = std::move(arr);
  }
}

// 200 to a try: {"gid","branch","state":"tried","result"}.
Json encode_tried(const ClientReply& r) {
  Json j = {{"gid", r.view.gid},
            {"protocol", std::string(protocol_name(r.view.protocol))},
            {"branch", r.branch},
            {"state", "tried"},
            {"result", Json()}};
  for (auto& b : r.view.branches)
    if (b.participant == r.branch) j["result"] = result_json(b.result);
  return j;
}

}  // namespace

// A notification (docs/DESIGN.md §10.3): {"id","state","attempts","last_error"?,"url","body"}.
Json encode_notification(const TxnView& v) {
  Json j = {{"id", v.gid}, {"state", std::string(notification_state_name(v.state))}};
  if (v.branches.empty()) return j;
  const BranchView& b = v.branches[0];
  j["attempts"] = b.attempts;
  if (!b.last_error.empty()) j["last_error"] = b.last_error;
  if (!v.reason.empty()) j["reason"] = v.reason;
  if (auto op = parse_object(b.spec); op.ok()) {
    j["url"] = (*op)["url"];
    j["body"] = op->contains("body") ? (*op)["body"] : Json::object();
  }
  return j;
}

std::string_view notification_state_name(TxnState s) {
  switch (s) {
    case TxnState::committed: return "delivered";
    case TxnState::aborted: return "given_up";
    default: return "pending";
  }
}

std::optional<TxnState> parse_notification_state(std::string_view s) {
  if (s == "pending") return TxnState::running;
  if (s == "delivered") return TxnState::committed;
  if (s == "given_up") return TxnState::aborted;
  return std::nullopt;
}

Result<NotificationRequest> decode_notification(std::string_view body, uint32_t attempts_default) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  NotificationRequest out;
  int64_t attempts = attempts_default;
  r.allow("url");
  r.allow("body");
  r.allow("headers");
  r.int64("max_attempts", &attempts, 1, kNotifyAttemptsMax);
  TPC_RETURN_IF_ERROR(r.finish());
  Json op = *j;
  op.erase("max_attempts");
  if (!op.contains("url")) return invalid_argument("missing field \"url\"");
  auto o = decode_op(op, StepOp::notify, "notification", 0);
  if (!o.ok()) return o.status();
  out.op = std::move(*o);
  out.attempts_max = static_cast<uint32_t>(attempts);
  return out;
}

Json encode_view(const TxnView& v) {
  if (v.protocol == Protocol::notify) return encode_notification(v);
  Json j = {{"gid", v.gid}, {"protocol", std::string(protocol_name(v.protocol))},
            {"state", std::string(state_name(v.state))}};
  if (v.presumed) j["presumed"] = true;
  if (v.forgotten) {
    j["forgotten"] = true;
    j["state"] = "unknown";
  }
  if (!v.reason.empty()) j["reason"] = v.reason;
  if (!v.reason_branch.empty())
    j[v.protocol == Protocol::saga ? "step" : "branch"] = v.reason_branch;
  if (v.one_phase) j["one_phase"] = true;
  if (v.recovered) j["recovered"] = true;
  if (v.decided_ms > 0) j["decided_at_ms"] = v.decided_ms;
  // The decision as the agents' in-doubt resolver reads it.
  if (v.decision == Decision::commit) j["decision"] = "commit";
  if (v.decision == Decision::abort && !v.forgotten) j["decision"] = "abort";
  if (calls_ops(v.protocol)) {
    encode_op_branches(v, &j);
    return j;
  }
  Json branches = Json::array();
  for (auto& b : v.branches) {
    Json jb = {{"participant", b.participant}, {"url", b.url},
               {"state", std::string(branch_state_name(b.state))}};
    if (b.attempts > 1) jb["attempts"] = b.attempts;
    if (!b.last_error.empty()) jb["last_error"] = b.last_error;
    if (b.heuristic) jb["heuristic"] = true;
    if (b.forced) jb["forced"] = true;
    branches.push_back(std::move(jb));
  }
  j["branches"] = std::move(branches);
  return j;
}

Json encode_reply_body(const ClientReply& r) {
  if (r.kind == RequestKind::try_op && r.error.ok() && r.answer == Answer::done)
    return encode_tried(r);
  Json body = encode_view(r.view);
  if (r.kind == RequestKind::try_op && !body.contains("branch")) body["branch"] = r.branch;
  if (!r.error.ok()) {
    body["error"] = {{"code", std::string(code_name(r.error.code()))}, {"message", r.error.message()}};
  } else if (r.answer == Answer::contrary) {
    std::string msg = "transaction " + r.view.gid + " is " + std::string(state_name(r.view.state));
    body["error"] = {{"code", "conflict"}, {"message", msg}};
  }
  return body;
}

int http_status_of(const ClientReply& r) {
  if (!r.error.ok() && r.view.gid.empty()) return http_status_for(r.error.code());
  switch (r.answer) {
    case Answer::done: return 200;
    case Answer::created: return 201;
    case Answer::pending: return 202;
    case Answer::contrary: return 409;
  }
  return 500;
}

HttpResponse encode_reply(const ClientReply& r) {
  if (!r.error.ok() && r.view.gid.empty()) return error_response(r.error);
  return json_response(http_status_of(r), encode_reply_body(r));
}

std::string encode_message_body(const Message& m, std::string_view statements) {
  auto peers = [&] {
    Json arr = Json::array();
    for (auto& p : m.peers) arr.push_back(Json{{"participant", p.participant}, {"url", p.url}});
    return arr;
  };
  switch (m.kind) {
    case MsgKind::prepare: {
      if (m.protocol != Protocol::three_phase) return "{}";
      return dump(Json{{"protocol", "3pc"}, {"peers", peers()}});
    }
    case MsgKind::exec_prepare:
    case MsgKind::exec_commit: {
      // The statements are spliced in as they came from the client (already re-serialised).
      Json head = {{"enlisted", true}};
      if (m.kind == MsgKind::exec_prepare) {
        head["prepare"] = true;
        if (m.protocol == Protocol::three_phase) {
          head["protocol"] = "3pc";
          head["peers"] = peers();
        }
      } else {
        head["commit"] = true;
      }
      std::string body = dump(head);
      body.pop_back();  // '}'
      body += ",\"statements\":";
      body += statements.empty() ? std::string_view("[]") : statements;
      body += "}";
      return body;
    }
    case MsgKind::commit_one_phase: return R"({"one_phase":true})";
    default: return "{}";
  }
}

namespace {

std::string answer_state(const Json* j, std::string* vote, std::string* reason) {
  if (!j || !j->is_object()) return "";
  std::string state;
  if (auto it = j->find("state"); it != j->end() && it->is_string()) state = it->get<std::string>();
  if (auto it = j->find("vote"); vote && it != j->end() && it->is_string()) *vote = it->get<std::string>();
  if (reason) {
    if (auto it = j->find("reason"); it != j->end() && it->is_string())
      *reason = it->get<std::string>();
    else if (auto e = j->find("error"); e != j->end() && e->is_object() && e->contains("message") &&
                                        (*e)["message"].is_string())
      *reason = (*e)["message"].get<std::string>();
  }
  return state;
}

}  // namespace

BranchReply decode_branch_answer(const Message& m, int http_status, std::string_view body,
                                 const Status& transport, Json* results) {
  if (!transport.ok()) return decode_branch_answer(m, http_status, nullptr, transport, results);
  auto j = parse_json(body);
  return decode_branch_answer(m, http_status, j.ok() ? &*j : nullptr, transport, results);
}

// An answer that proves the agent did nothing with the request: it was refused as it arrived
// (malformed, unauthorised, unknown path or coordinator, too large). Not 408/425/429 (try
// again), 409/422 (they carry the branch's state or SQL error) or 5xx (anything may have
// happened).
static bool refused_before_acting(int http_status) {
  switch (http_status) {
    case 400:
    case 401:
    case 403:
    case 404:
    case 405:
    case 411:
    case 413:
    case 414:
    case 415:
    case 431: return true;
    default: return false;
  }
}

BranchReply decode_branch_answer(const Message& m, int http_status, Json* body,
                                 const Status& transport, Json* results) {
  BranchReply out{m.gid, m.participant, m.kind, ReplyKind::failed, ""};
  if (!transport.ok()) {
    out.reason = transport.to_string();
    return out;
  }
  std::string vote, reason;
  std::string state = answer_state(body, &vote, &reason);
  out.reason = reason;
  if (results && (m.kind == MsgKind::exec_prepare || m.kind == MsgKind::exec_commit)) {
    *results = body && body->is_object() && body->contains("results") ? std::move((*body)["results"]) : Json();
  }
  bool refused = refused_before_acting(http_status);
  switch (m.kind) {
    case MsgKind::exec_prepare:
      if (refused) out.reply = ReplyKind::vote_no;
      if (http_status == 200) {
        if (vote == wire::kVoteYes) out.reply = ReplyKind::vote_yes;
        if (vote == wire::kVoteNo) out.reply = ReplyKind::vote_no;
        if (vote == wire::kVoteReadOnly) out.reply = ReplyKind::vote_read_only;
      }
      if (http_status == 422 || http_status == 409) out.reply = ReplyKind::vote_no;  // the statements failed
      break;
    case MsgKind::exec_commit:
      // The statements travel only with the first attempt: a refusal of it is final.
      if (refused) out.reply = ReplyKind::aborted;
      if (http_status == 200 && state == wire::kCommitted) out.reply = ReplyKind::committed;
      if ((http_status == 409 || http_status == 422) && state == wire::kAborted)
        out.reply = ReplyKind::aborted;
      break;
    case MsgKind::prepare:
      if (refused) out.reply = ReplyKind::vote_no;
      if (http_status == 200) {
        if (vote == wire::kVoteYes) out.reply = ReplyKind::vote_yes;
        if (vote == wire::kVoteNo) out.reply = ReplyKind::vote_no;
        if (vote == wire::kVoteReadOnly) out.reply = ReplyKind::vote_read_only;
      }
      break;
    case MsgKind::precommit:
      if (http_status == 200 && state == wire::kPrecommitted) out.reply = ReplyKind::precommitted;
      if (http_status == 200 && state == wire::kCommitted) out.reply = ReplyKind::committed;
      if (http_status == 409 && state == wire::kAborted) out.reply = ReplyKind::aborted;
      break;
    case MsgKind::commit:
    case MsgKind::commit_one_phase:
      // A first one-phase commit refused as it arrived never committed the unprepared branch
      // (which cannot commit without it); a resend may follow one that did.
      if (refused && m.kind == MsgKind::commit_one_phase && m.attempt == 1) out.reply = ReplyKind::aborted;
      if (http_status == 200 && (state == wire::kCommitted || state == wire::kReadOnly))
        out.reply = ReplyKind::committed;
      if (http_status == 409 && state == wire::kAborted) out.reply = ReplyKind::aborted;
      break;
    case MsgKind::abort:
      // Presumed abort: an agent that refuses the abort and later finds the branch prepared
      // asks, and a gid without a record reads aborted. A commit refused this way is retried.
      if (refused) out.reply = ReplyKind::aborted;
      if (http_status == 200 && (state == wire::kAborted || state == wire::kReadOnly))
        out.reply = ReplyKind::aborted;
      if (http_status == 409 && state == wire::kCommitted) out.reply = ReplyKind::committed;
      break;
  }
  if (out.reply == ReplyKind::failed && out.reason.empty())
    out.reason = "HTTP " + std::to_string(http_status);
  else if (out.reply == ReplyKind::failed)
    out.reason = "HTTP " + std::to_string(http_status) + ": " + out.reason;
  return out;
}

}  // namespace tpc::coord
