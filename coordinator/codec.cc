#include "coordinator/codec.h"

#include "common/wire.h"

namespace tpc::coord {
namespace {

// The shape of one statement of a one-shot branch: the fields the agent's exec takes, a
// non-empty sql string, scalar params, a non-negative integer expect_rows.
Status check_statement(const Json& st) {
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
      if (p.is_object() || p.is_array())
        return invalid_argument("params must be strings, numbers, booleans or null");
  return ok_status();
}

}  // namespace

Result<BeginRequest> decode_begin(std::string_view body, int64_t timeout_max_ms) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  BeginRequest out;
  std::string protocol;
  int64_t timeout = 0;
  r.string("protocol", &protocol, false, 16);
  if (r.int64("timeout_ms", &timeout, 1, timeout_max_ms) && r.has("timeout_ms"))
    out.timeout_ms = timeout;
  TPC_RETURN_IF_ERROR(r.finish());
  if (!protocol.empty()) {
    auto p = parse_protocol(protocol);
    if (!p) return invalid_argument("\"protocol\" must be \"2pc\" or \"3pc\"");
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
  FieldReader r(*j);
  RunRequest out;
  std::string protocol, wait;
  r.string("protocol", &protocol, false, 16);
  r.string("wait", &wait, false, 32);
  const Json* branches = r.array("branches", true, 1024);
  TPC_RETURN_IF_ERROR(r.finish());
  if (!protocol.empty()) {
    auto p = parse_protocol(protocol);
    if (!p) return invalid_argument("\"protocol\" must be \"2pc\" or \"3pc\"");
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

Json encode_view(const TxnView& v) {
  Json j = {{"gid", v.gid}, {"protocol", std::string(protocol_name(v.protocol))},
            {"state", std::string(state_name(v.state))}};
  if (v.presumed) j["presumed"] = true;
  if (v.forgotten) {
    j["forgotten"] = true;
    j["state"] = "unknown";
  }
  if (!v.reason.empty()) j["reason"] = v.reason;
  if (!v.reason_branch.empty()) j["branch"] = v.reason_branch;
  if (v.one_phase) j["one_phase"] = true;
  if (v.recovered) j["recovered"] = true;
  if (v.decided_ms > 0) j["decided_at_ms"] = v.decided_ms;
  // The decision as the agents' in-doubt resolver reads it.
  if (v.decision == Decision::commit) j["decision"] = "commit";
  if (v.decision == Decision::abort && !v.forgotten) j["decision"] = "abort";
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
  Json body = encode_view(r.view);
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
