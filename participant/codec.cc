#include "participant/codec.h"

#include "common/ids.h"
#include "common/wire.h"

namespace tpc::agent {
namespace {

// What {"tpc":"gid"} and {"tpc":"branch"} stand for in a step's params; null outside steps.
struct ParamNames {
  std::string_view gid;
  std::string_view branch;
};

Result<pg::Value> decode_name_param(const Json& p, size_t i, const ParamNames* names) {
  std::string where = "params[" + std::to_string(i) + "]";
  if (!names) return invalid_argument(where + " must be a string, number, boolean or null");
  if (p.size() != 1 || !p.contains("tpc") || !p["tpc"].is_string())
    return invalid_argument(
        where + ": the only object allowed is {\"tpc\":\"gid\"} or {\"tpc\":\"branch\"}");
  std::string name = p["tpc"].get<std::string>();
  if (name == "gid") return pg::Value{std::string(names->gid)};
  if (name == "branch") return pg::Value{std::string(names->branch)};
  return invalid_argument(where + ": {\"tpc\":" + echo(name) + "} names nothing (gid or branch)");
}

Result<pg::Value> decode_param(const Json& p, size_t i, const ParamNames* names) {
  if (p.is_object()) return decode_name_param(p, i, names);
  if (p.is_null()) return pg::Value{};
  if (p.is_string()) return pg::Value{p.get<std::string>()};
  if (p.is_boolean()) return pg::Value{p.get<bool>() ? "true" : "false"};
  if (p.is_number_integer()) return pg::Value{p.dump()};
  if (p.is_number_float()) return pg::Value{dump(p)};
  return invalid_argument("params[" + std::to_string(i) +
                          "] must be a string, number, boolean or null");
}

// The fields of one statement, read from `r` (a statements item, or the exec body itself).
Status decode_statement(FieldReader& r, const ExecLimits& limits, const ParamNames* names,
                        Statement* out) {
  r.string("sql", &out->sql, true);
  const Json* params = r.array("params", false, limits.params_max);
  int64_t expect = 0;
  if (r.int64("expect_rows", &expect, 0, INT64_MAX) && r.has("expect_rows"))
    out->expect_rows = expect;
  if (!r.ok()) return r.status();
  if (out->sql.empty()) return invalid_argument("\"sql\" must not be empty");
  if (out->sql.find('\0') != std::string::npos)
    return invalid_argument("\"sql\" must not contain NUL bytes");
  if (params) {
    for (size_t i = 0; i < params->size(); ++i) {
      auto v = decode_param((*params)[i], i, names);
      if (!v.ok()) return v.status();
      if (*v && v->value().find('\0') != std::string::npos)
        return invalid_argument("params[" + std::to_string(i) + "] must not contain NUL bytes");
      out->params.push_back(std::move(*v));
    }
  }
  return ok_status();
}

Status decode_statement_item(const Json& item, size_t i, const ExecLimits& limits,
                             const ParamNames* names, Statement* out) {
  std::string where = "statements[" + std::to_string(i) + "]";
  if (!item.is_object()) return invalid_argument(where + " must be an object");
  FieldReader r(item);
  Status st = decode_statement(r, limits, names, out);
  if (st.ok()) st = r.finish();
  if (!st.ok()) return Status(st.code(), where + ": " + st.message());
  return ok_status();
}

// "sql" (with "params") or "statements", from r; `empty_ok`: neither, or an empty list, is
// allowed and gives no statements.
Status decode_statements(FieldReader& r, const ExecLimits& limits, const ParamNames* names,
                         bool empty_ok, std::vector<Statement>* out) {
  if (r.has("sql")) {
    Statement s;
    TPC_RETURN_IF_ERROR(decode_statement(r, limits, names, &s));
    out->push_back(std::move(s));
    return ok_status();
  }
  const Json* list = r.array("statements", !empty_ok, limits.statements_max);
  if (!r.ok()) return r.status();
  if (!list) return ok_status();
  if (list->empty() && !empty_ok) return invalid_argument("\"statements\" must not be empty");
  for (size_t i = 0; i < list->size(); ++i) {
    Statement s;
    TPC_RETURN_IF_ERROR(decode_statement_item((*list)[i], i, limits, names, &s));
    out->push_back(std::move(s));
  }
  return ok_status();
}

Status decode_peers(FieldReader& r, std::vector<Peer>* out) {
  const Json* peers = r.array("peers", false, 64);
  if (!r.ok()) return r.status();
  if (!peers) return ok_status();
  for (auto& p : *peers) {
    if (!p.is_object()) return invalid_argument("each of \"peers\" must be an object");
    FieldReader pr(p);
    Peer peer;
    pr.string("participant", &peer.participant, true, 64);
    pr.string("url", &peer.url, true, 512);
    TPC_RETURN_IF_ERROR(pr.finish());
    if (!valid_participant_name(peer.participant))
      return invalid_argument("peer name " + echo(peer.participant) +
                              " must match [A-Za-z0-9_-]{1,32}");
    if (auto u = parse_url(peer.url); !u.ok()) return u.status();
    out->push_back(std::move(peer));
  }
  return ok_status();
}

Result<Protocol> decode_protocol(FieldReader& r) {
  std::string protocol;
  r.string("protocol", &protocol, false, 16);
  if (!r.ok()) return r.status();
  if (protocol.empty()) return Protocol::two_phase;
  if (auto p = parse_protocol(protocol); p && prepares_branches(*p)) return *p;
  return invalid_argument("\"protocol\" must be \"2pc\" or \"3pc\"");
}

}  // namespace

Result<Request> decode_exec(std::string_view body, const ExecLimits& limits) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  Request req;
  req.kind = RequestKind::exec;
  FieldReader r(*j);
  r.boolean("prepare", &req.prepare);
  r.boolean("commit", &req.one_phase);
  r.boolean("enlisted", &req.enlisted);
  if (r.ok() && req.prepare && req.one_phase)
    return invalid_argument("give \"prepare\" or \"commit\", not both");
  auto protocol = decode_protocol(r);
  if (!protocol.ok()) return protocol.status();
  req.protocol = *protocol;
  TPC_RETURN_IF_ERROR(decode_peers(r, &req.peers));
  if (r.has("sql") == r.has("statements"))
    return invalid_argument("give either \"sql\" (with \"params\") or \"statements\"");
  TPC_RETURN_IF_ERROR(decode_statements(r, limits, nullptr, false, &req.statements));
  TPC_RETURN_IF_ERROR(r.finish());
  return req;
}

Result<Request> decode_step(std::string_view body, std::string_view gid, const ExecLimits& limits) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  Request req;
  req.kind = RequestKind::step;
  FieldReader r(*j);
  std::string op;
  r.string("branch", &req.branch, true, kBranchNameMaxBytes);
  r.string("op", &op, true, 16);
  if (!r.ok()) return r.status();
  if (!valid_branch_name(req.branch))
    return invalid_argument("\"branch\" must match [A-Za-z0-9_.:-]{1,64}, got " + echo(req.branch));
  auto step_op = parse_step_op(op);
  if (!step_op)
    return invalid_argument(
        "\"op\" must be try, confirm, cancel, action, compensate, deliver, local or check, got " +
        echo(op));
  req.step_op = *step_op;
  if (r.has("sql") && r.has("statements"))
    return invalid_argument("give either \"sql\" (with \"params\") or \"statements\", not both");
  ParamNames names{gid, req.branch};
  TPC_RETURN_IF_ERROR(decode_statements(r, limits, &names, true, &req.statements));
  TPC_RETURN_IF_ERROR(r.finish());
  return req;
}

Result<Request> decode_prepare(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  auto protocol = decode_protocol(r);
  if (!protocol.ok()) return protocol.status();
  Request req;
  req.kind = RequestKind::prepare;
  req.protocol = *protocol;
  TPC_RETURN_IF_ERROR(decode_peers(r, &req.peers));
  TPC_RETURN_IF_ERROR(r.finish());
  return req;
}

Result<Request> decode_commit(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  Request req;
  req.kind = RequestKind::commit;
  r.boolean("one_phase", &req.one_phase);
  TPC_RETURN_IF_ERROR(r.finish());
  return req;
}

Result<Request> decode_resolve(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  std::string outcome;
  r.string("outcome", &outcome, true, 16);
  TPC_RETURN_IF_ERROR(r.finish());
  if (outcome != "commit" && outcome != "abort")
    return invalid_argument("\"outcome\" must be \"commit\" or \"abort\"");
  Request req;
  req.kind = RequestKind::resolve;
  req.commit = outcome == "commit";
  return req;
}

Json encode_results(const std::vector<pg::StatementResult>& results) {
  Json arr = Json::array();
  for (auto& res : results) {
    Json rows = Json::array();
    for (auto& row : res.rows) {
      Json jr = Json::array();
      for (auto& v : row) jr.push_back(v ? Json(*v) : Json(nullptr));
      rows.push_back(std::move(jr));
    }
    Json one = {{"columns", res.columns},
                {"rows", std::move(rows)},
                {"affected", res.affected},
                {"command", res.command_tag}};
    if (res.truncated) one["truncated"] = true;
    arr.push_back(std::move(one));
  }
  return arr;
}

Json encode_view(const BranchView& v) {
  Json j = {{"gid", v.gid},
            {"state", std::string(external_state_name(v.state))},
            {"protocol", std::string(protocol_name(v.protocol))},
            {"age_ms", v.age_ms}};
  if (v.recovered) j["recovered"] = true;
  if (v.unilateral) j["unilateral"] = true;
  if (v.heuristic) j["heuristic"] = true;
  if (v.check != Check::none) j["check"] = std::string(check_name(v.check));
  if (v.report_pending) j["report_pending"] = true;
  if (v.busy) j["busy"] = true;
  if (v.asks > 0) j["asks"] = v.asks;
  if (!v.last_answer.empty()) j["coordinator_answer"] = v.last_answer;
  if (!v.reason.empty()) j["reason"] = v.reason;
  if (!v.sqlstate.empty()) j["sqlstate"] = v.sqlstate;
  if (v.state == BranchState::failed) j["failed"] = true;
  if (v.timeout_ms > 0) j["timeout_ms"] = v.timeout_ms;
  return j;
}

namespace {

// 200 {"barrier","results"}; 409 barrier_refused or fenced; 422 (sqlstate) or 503 from the error.
HttpResponse encode_step_reply(const Reply& r) {
  if (r.barrier == pg::Barrier::refused)
    return error_response(409, "barrier_refused", r.error.message());
  if (r.barrier == pg::Barrier::fenced) return error_response(409, "fenced", r.error.message());
  if (!r.error.ok()) {
    Json extra = Json::object();
    if (!r.sqlstate.empty()) extra["sqlstate"] = r.sqlstate;
    return error_response(r.error, extra);
  }
  TPC_ASSERT(r.barrier.has_value());
  Json results = Json::array();
  if (r.stored_results) {
    auto stored = parse_json(*r.stored_results);
    if (stored.ok() && stored->is_array()) results = std::move(*stored);
  } else if (r.results) {
    results = encode_results(*r.results);
  }
  return json_response(200, Json{{"barrier", std::string(pg::barrier_name(*r.barrier))},
                                 {"results", std::move(results)}});
}

}  // namespace

HttpResponse encode_reply(const Reply& r) {
  if (r.kind == RequestKind::step) return encode_step_reply(r);
  Json extra = Json::object();
  if (!r.sqlstate.empty()) extra["sqlstate"] = r.sqlstate;
  if (!r.error.ok()) {
    HttpResponse resp = error_response(r.error, extra);  // sql_error: 422
    if (r.vote || r.state != BranchState::unknown) {
      auto j = parse_json(resp.body);
      if (j.ok()) {
        if (r.vote) (*j)["vote"] = std::string(wire::kVoteNo);
        if (r.state != BranchState::unknown) (*j)["state"] = std::string(external_state_name(r.state));
        resp.body = dump(*j);
      }
    }
    return resp;
  }
  Json body = Json::object();
  switch (r.kind) {
    case RequestKind::exec:
      body["results"] = r.results ? encode_results(*r.results) : Json::array();
      break;
    default: break;
  }
  if (r.vote) {
    body["vote"] = std::string(*r.vote == pg::Vote::yes  ? wire::kVoteYes
                               : *r.vote == pg::Vote::no ? wire::kVoteNo
                                                         : wire::kVoteReadOnly);
    if (*r.vote == pg::Vote::no && !r.reason.empty()) body["reason"] = r.reason;
    if (*r.vote == pg::Vote::no && !r.sqlstate.empty()) body["sqlstate"] = r.sqlstate;
  }
  if (r.kind != RequestKind::exec || r.vote || r.state == BranchState::committed ||
      r.state == BranchState::aborted)
    body["state"] = std::string(external_state_name(r.state));
  if (r.kind != RequestKind::prepare && r.kind != RequestKind::exec && !r.reason.empty() &&
      r.contrary)
    body["reason"] = r.reason;
  if (r.contrary)
    body["error"] = {{"code", "conflict"},
                     {"message", "branch is " + std::string(external_state_name(r.state))}};
  return json_response(r.contrary ? 409 : 200, body);
}

Status decode_enlist_answer(int http_status, std::string_view body, const Status& transport,
                            int64_t* expires_in_ms) {
  if (!transport.ok()) return unavailable(transport.to_string());
  std::string message = "HTTP " + std::to_string(http_status);
  auto j = parse_json(body);
  if (j.ok() && j->is_object()) {
    if (auto e = j->find("error"); e != j->end() && e->is_object() && e->contains("message") &&
                                   (*e)["message"].is_string())
      message = (*e)["message"].get<std::string>();
    if (auto x = j->find("expires_in_ms"); x != j->end() && x->is_number_integer())
      *expires_in_ms = x->get<int64_t>();
  }
  if (http_status == 200 || http_status == 201) return ok_status();
  if (http_status == 409 || http_status == 413) return conflict(message);
  if (http_status == 404) return not_found(message);
  return unavailable(message);
}

Outcome decode_outcome_answer(int http_status, std::string_view body, const Status& transport,
                              std::string* answer) {
  if (!transport.ok()) {
    *answer = transport.to_string();
    return Outcome::unreachable;
  }
  if (http_status >= 500 || http_status == 0) {
    *answer = "HTTP " + std::to_string(http_status);
    return Outcome::unreachable;
  }
  auto j = parse_json(body);
  if (http_status != 200 || !j.ok() || !j->is_object()) {
    *answer = "HTTP " + std::to_string(http_status);
    return Outcome::unknown;
  }
  auto text = [&](const char* key) {
    auto it = j->find(key);
    return it != j->end() && it->is_string() ? it->get<std::string>() : std::string();
  };
  std::string state = text("state");
  std::string decision = text("decision");
  *answer = state;
  if (auto f = j->find("forgotten"); f != j->end() && f->is_boolean() && f->get<bool>()) {
    *answer = "forgotten";
    return Outcome::unknown;
  }
  if (decision == "commit") return Outcome::commit;
  if (decision == "abort") return Outcome::abort;
  if (state == "active" || state == "preparing") return Outcome::pending;
  return Outcome::unknown;
}

std::optional<BranchState> decode_recorded_state(std::string_view body,
                                                 std::string_view participant) {
  auto j = parse_json(body);
  if (!j.ok() || !j->is_object()) return std::nullopt;
  auto branches = j->find("branches");
  if (branches == j->end() || !branches->is_array()) return std::nullopt;
  for (const Json& b : *branches) {
    if (!b.is_object()) continue;
    auto name = b.find("participant");
    auto state = b.find("state");
    if (name == b.end() || !name->is_string() || *name != participant) continue;
    if (state == b.end() || !state->is_string()) return std::nullopt;
    return parse_external_state(state->get<std::string>());
  }
  return std::nullopt;
}

Status decode_report_answer(int http_status, std::string_view body, const Status& transport) {
  if (!transport.ok()) return unavailable(transport.to_string());
  if (http_status == 200) return ok_status();
  std::string message = "HTTP " + std::to_string(http_status);
  if (auto j = parse_json(body); j.ok() && j->is_object() && j->contains("error"))
    if (const Json& e = (*j)["error"];
        e.is_object() && e.contains("message") && e["message"].is_string())
      message += ": " + e["message"].get<std::string>();
  if (http_status == 404) return not_found(message);
  if (http_status == 400 || http_status == 422) return invalid_argument(message);
  return unavailable(message);
}

}  // namespace tpc::agent

namespace tpc::agent {

std::string encode_peers(const std::vector<Peer>& peers) {
  Json arr = Json::array();
  for (auto& p : peers) arr.push_back(Json{{"participant", p.participant}, {"url", p.url}});
  return dump(arr);
}

std::vector<Peer> decode_peers_text(std::string_view text) {
  std::vector<Peer> out;
  auto j = parse_json(text);
  if (!j.ok() || !j->is_array()) return out;
  Json wrapper = Json{{"peers", *j}};
  FieldReader r(wrapper);
  if (!decode_peers(r, &out).ok()) out.clear();
  return out;
}

}  // namespace tpc::agent
