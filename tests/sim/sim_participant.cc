#include "tests/sim/sim_participant.h"

namespace tpc::sim {
namespace {

// Chances, per request. Business failures are the business's: always on. The rest only while
// the World's faults are on.
constexpr double kBusinessFailure = 0.07;
constexpr double kNotifyRefused = 0.02;  // a notification answered 422
constexpr double kUnavailable = 0.04;  // 503 with Retry-After, nothing applied
constexpr double kDropBefore = 0.02;   // no answer, nothing applied
constexpr double kDropAfter = 0.03;    // applied, no answer
constexpr double kLate = 0.05;         // applied, answered 0.3-3 s later
constexpr double kTwice = 0.03;        // applied and stored, answered 503: the resend replays
constexpr double kCopy = 0.05;         // the request is handled a second time, 1-300 ms later
constexpr int64_t kLateCompensationMs = 1'500;  // Sabotage::late_compensation

HttpResponse fail(int status, std::string_view code, std::string_view message) {
  return error_response(status, code, message);
}

bool final_status(int s) {
  return (s >= 200 && s < 300) || s == 409 || s == 422;
}

}  // namespace

std::string_view effect_name(OpEffect e) {
  switch (e) {
    case OpEffect::applied: return "applied";
    case OpEffect::empty: return "empty";
    case OpEffect::refused: return "refused";
    case OpEffect::failed: return "failed";
    case OpEffect::duplicate: return "duplicate";
  }
  return "?";
}

int64_t SimParticipant::total() const {
  int64_t t = 0;
  for (auto& [id, a] : accounts) t += a.balance;
  return t;
}

int64_t SimParticipant::frozen() const {
  int64_t t = 0;
  for (auto& [id, a] : accounts)
    t += (a.frozen < 0 ? -a.frozen : a.frozen) + (a.incoming < 0 ? -a.incoming : a.incoming);
  return t;
}

void SimParticipant::serve() {
  w_.process(proc_).handler = [this](HttpRequest&& req, Responder respond) {
    handle(std::move(req), std::move(respond));
  };
}

void SimParticipant::crash() {
  for (auto& [id, r] : held_) dropped_.push_back(std::move(r));
  held_.clear();
}

void SimParticipant::release() {
  held_.clear();
  dropped_.clear();
}

void SimParticipant::hold(Responder r) {
  dropped_.push_back(std::move(r));
}

void SimParticipant::journal(const std::string& gid, const std::string& branch,
                             const std::string& op, OpEffect e) {
  journal_.add(w_, gid, branch, op, e, "svc");
}

void SimParticipant::handle(HttpRequest&& req, Responder respond) {
  Rng& r = w_.rng();
  bool faults = w_.faults_on;
  if (faults && r.chance(kUnavailable)) {
    HttpResponse busy = fail(503, "unavailable", "overloaded, try again later");
    busy.headers.emplace_back("retry-after", std::to_string(r.between(1, 2)));
    return respond(std::move(busy));
  }
  if (faults && r.chance(kDropBefore)) {
    w_.note("svc drops " + req.target + " unanswered");
    return hold(std::move(respond));
  }
  if (faults && r.chance(kCopy)) {
    w_.at(w_.now() + r.between(1, 300), proc_, [this, copy = req] { evaluate(copy, true); });
  }
  HttpResponse resp = evaluate(req, false);
  if (!faults) return respond(std::move(resp));
  if (r.chance(kDropAfter)) {
    w_.note("svc answers " + req.target + " never");
    return hold(std::move(respond));
  }
  if (r.chance(kTwice) && final_status(resp.status)) {
    HttpResponse busy = fail(503, "unavailable", "answered, then lost the connection");
    return respond(std::move(busy));
  }
  if (r.chance(kLate)) {
    uint64_t id = next_held_++;
    held_.emplace(id, std::move(respond));
    w_.at(w_.now() + r.between(300, 3'000), proc_, [this, id, resp = std::move(resp)] {
      auto it = held_.find(id);
      if (it == held_.end()) return;
      Responder late = std::move(it->second);
      held_.erase(it);
      late(resp);
    });
    return;
  }
  respond(std::move(resp));
}

HttpResponse SimParticipant::evaluate(const HttpRequest& req, bool copy) {
  // /tcc/debit/try → kind "debit", op "try"; /saga/action → kind "saga", op "action".
  std::string path(req.path());
  std::string kind, op;
  if (path.rfind("/tcc/debit/", 0) == 0) {
    kind = "debit";
    op = path.substr(11);
  } else if (path.rfind("/tcc/credit/", 0) == 0) {
    kind = "credit";
    op = path.substr(12);
  } else if (path.rfind("/saga/", 0) == 0) {
    kind = "saga";
    op = path.substr(6);
  } else if (path.rfind("/msg/", 0) == 0) {
    kind = "msg";
    op = path.substr(5);
  } else if (path == "/notify") {
    kind = "notify";
    op = "notify";
  }
  bool tcc_op = op == "try" || op == "confirm" || op == "cancel";
  bool saga_op = op == "action" || op == "compensate";
  bool known = kind == "saga"     ? saga_op
               : kind == "msg"    ? op == "deliver" || op == "local" || op == "check"
               : kind == "notify" ? op == "notify"
                                  : tcc_op;
  if (req.method != "POST" || !known) {
    contract.push_back("svc: unexpected " + req.method + " " + req.target);
    return fail(404, "not_found", "no such op: " + path);
  }
  std::string gid(req.header("tpc-gid")), branch(req.header("tpc-branch")),
      tpc_op(req.header("tpc-op")), attempt(req.header("tpc-attempt")),
      key(req.header("idempotency-key"));
  std::string why;
  if (gid.empty() || branch.empty())
    why = "no Tpc-Gid or Tpc-Branch";
  else if (tpc_op != op)
    why = "Tpc-Op \"" + tpc_op + "\" on " + path;
  else if (key != gid + "/" + branch + "/" + op)
    why = "Idempotency-Key \"" + key + "\"";
  else if (attempt.empty() || attempt.find_first_not_of("0123456789") != std::string::npos ||
           attempt == "0")
    why = "Tpc-Attempt \"" + attempt + "\"";
  else if (req.header("x-tenant") != "sim")
    why = "the op's own header x-tenant was not passed on";
  else if (!req.header("authorization").empty())
    why = "the participants' token was sent to a service";
  auto body = parse_json(req.body);
  if (why.empty() && (!body.ok() || !body->is_object())) why = "a body that is not a JSON object";
  if (!why.empty()) {
    if (!copy) contract.push_back("svc: " + why + " (" + req.target + ", gid " + gid + ")");
    return fail(400, "bad_request", why);
  }
  if (auto s = answers_.find(key); s != answers_.end()) {
    journal(gid, branch, op, OpEffect::duplicate);
    HttpResponse r;
    r.status = s->second.status;
    r.body = s->second.body;
    return r;
  }
  bool store = true;
  HttpResponse r = run(gid, branch, kind, op, *body, &store);
  ++evaluated;
  if (store && final_status(r.status)) answers_[key] = Stored{r.status, r.body};
  return r;
}

// A notification (docs/DESIGN.md §10.3): kept, and answered 200; now and then refused (422,
// stored), which gives it up.
// A message's check-back on its producer's local op (the branch "local" of the gid): committed,
// or not, and then fenced so that a local op arriving later is refused. Final either way.
HttpResponse SimParticipant::checked(const std::string& gid, const std::string& branch, Branch& b) {
  if (b.state == State::done) {
    journal(gid, branch, "check", OpEffect::duplicate);
    return json_response(200, Json{{"committed", true}});
  }
  b.state = State::compensated;
  b.empty = true;
  journal(gid, branch, "check", OpEffect::empty);
  return fail(409, "not_committed", "no local op of this gid committed; it is fenced");
}

HttpResponse SimParticipant::notified(const std::string& id, const Json& body, bool* store) {
  if (w_.rng().chance(kNotifyRefused)) {
    journal(id, "notify", "notify", OpEffect::failed);
    return fail(422, "invalid", "the receiver refuses this notification");
  }
  received[id].push_back(dump(body));
  journal(id, "notify", "notify", OpEffect::applied);
  *store = true;
  return json_response(200, Json{{"received", true}});
}

// An action or a delivery that takes effect: the branch is done, its delta applied, journaled.
void SimParticipant::apply_delta(Branch& b, int64_t account, int64_t amount, const std::string& gid,
                                 const std::string& branch, const std::string& op) {
  b.state = State::done;
  b.account = account;
  b.amount = amount;
  accounts[account].balance += amount;
  journal(gid, branch, op, OpEffect::applied);
}

HttpResponse SimParticipant::run(const std::string& gid, const std::string& branch,
                                 const std::string& kind, const std::string& op, const Json& body,
                                 bool* store) {
  if (kind == "notify") return notified(gid, body, store);
  Branch& b = branches_[{gid, branch}];
  if (op == "check") return checked(gid, branch, b);
  auto number = [&](const char* k) -> std::optional<int64_t> {
    if (!body.contains(k) || !body[k].is_number_integer()) return std::nullopt;
    return body[k].get<int64_t>();
  };
  auto flag = [&](const char* k) {
    return body.contains(k) && body[k].is_boolean() && body[k].get<bool>();
  };
  auto account = number("account");
  auto amount = number(kind == "saga" || kind == "msg" ? "delta" : "amount");
  if (!account || !amount || !accounts.count(*account)) {
    if (op == "try" || op == "action") {
      journal(gid, branch, op, OpEffect::failed);
      return fail(409, "unknown_account", "no such account");
    }
    contract.push_back("svc: " + op + " of " + gid + "/" + branch + " names no account of ours");
    *store = false;
    return fail(409, "unknown_account", "no such account");
  }
  Account& a = accounts[*account];
  Rng& rng = w_.rng();
  auto refuse = [&](std::string_view code, std::string_view msg) {
    journal(gid, branch, op, OpEffect::refused);
    *store = false;  // a refused settling op must see the state when it is resent
    return fail(409, code, msg);
  };
  // The business says no: 409 or 422. Stored, unless transient (a forward saga's action).
  auto business_failure = [&](State failed) {
    bool transient = flag("transient");
    if (!transient) b.state = failed;
    *store = !transient;
    journal(gid, branch, op, OpEffect::failed);
    return rng.chance(0.5) ? fail(409, "rejected", "the business refuses")
                           : fail(422, "invalid", "the business cannot do this");
  };
  if (op == "local") {  // a message's producer: its local transaction, unless fenced
    if (b.state == State::compensated) return refuse("fenced", "fenced by its check-back");
    if (b.state != State::none) {
      contract.push_back("svc: a second local op of " + gid + " under its key");
      *store = false;
      return fail(409, "applied", "applied already");
    }
    apply_delta(b, *account, *amount, gid, branch, op);
    return json_response(200, Json{{"balance", a.balance}});
  }
  if (op == "deliver") {  // a message: applied once (its key's stored answer replays it)
    if (b.state != State::none) {
      contract.push_back("svc: a second delivery of " + gid + "/" + branch + " under its key");
      *store = false;
      return fail(409, "delivered", "delivered already");
    }
    apply_delta(b, *account, *amount, gid, branch, op);
    return json_response(200, Json{{"delivered", *amount}});
  }
  if (op == "try") {
    if (b.state == State::cancelled) return refuse("cancelled", "cancelled before its try arrived");
    if (b.state != State::none) {  // tried already under another key: cannot happen
      contract.push_back("svc: a second try of " + gid + "/" + branch);
      *store = false;
      return fail(409, "tried", "tried already");
    }
    if (rng.chance(kBusinessFailure)) return business_failure(State::try_failed);
    if (kind == "debit" && a.balance - a.frozen < *amount) {
      b.state = State::try_failed;
      journal(gid, branch, op, OpEffect::failed);
      return fail(409, "insufficient_funds", "not enough money");
    }
    b.state = State::tried;
    b.account = *account;
    b.amount = *amount;
    (kind == "debit" ? a.frozen : a.incoming) += *amount;
    journal(gid, branch, op, OpEffect::applied);
    return json_response(200, Json{{kind == "debit" ? "frozen" : "pending", *amount}});
  }
  if (op == "confirm") {
    if (b.state == State::cancelled) return refuse("cancelled", "confirm after cancel");
    if (b.state == State::confirmed) {  // a resend whose first answer was not stored: same
      journal(gid, branch, op, OpEffect::duplicate);
      return json_response(200, Json{{"confirmed", b.amount}});
    }
    if (b.state != State::tried) {
      contract.push_back("svc: confirm of " + gid + "/" + branch + " whose try did not succeed");
      return refuse("not_tried", "confirm of a branch never tried");
    }
    Account& t = accounts[b.account];
    if (kind == "debit") {
      t.frozen -= b.amount;
      t.balance -= b.amount;
    } else {
      t.incoming -= b.amount;
      t.balance += b.amount;
    }
    b.state = State::confirmed;
    journal(gid, branch, op, OpEffect::applied);
    if (sabotage_ == Sabotage::cancel_after_confirm)
      journal(gid, branch, "cancel", OpEffect::refused);
    return json_response(200, Json{{kind == "debit" ? "debited" : "credited", b.amount}});
  }
  if (op == "cancel") {
    if (b.state == State::confirmed) return refuse("confirmed", "cancel after confirm");
    if (b.state == State::cancelled) {
      journal(gid, branch, op, OpEffect::duplicate);
      return json_response(200, Json{{"released", 0}});
    }
    if (b.state !=
        State::tried) {  // never tried, or its try failed: empty, and it refuses a late try
      b.state = State::cancelled;
      b.empty = true;
      journal(gid, branch, op, OpEffect::empty);
      return json_response(200, Json{{"empty", true}});
    }
    Account& t = accounts[b.account];
    if (kind == "debit" && sabotage_ != Sabotage::keep_frozen) t.frozen -= b.amount;
    if (kind == "credit") t.incoming -= b.amount;
    b.state = State::cancelled;
    if (sabotage_ == Sabotage::skip_cancel_record && !sabotaged_once_)
      sabotaged_once_ = true;
    else
      journal(gid, branch, op, OpEffect::applied);
    return json_response(200, Json{{kind == "debit" ? "released" : "dropped", b.amount}});
  }
  if (op == "action") {
    if (b.state == State::compensated)
      return refuse("compensated", "compensated before its action arrived");
    if (b.state != State::none) {
      contract.push_back("svc: a second action of " + gid + "/" + branch);
      *store = false;
      return fail(409, "done", "done already");
    }
    if (rng.chance(kBusinessFailure)) return business_failure(State::action_failed);
    if (flag("check_funds") && *amount < 0 && a.balance - a.frozen + *amount < 0) {
      b.state = State::action_failed;
      journal(gid, branch, op, OpEffect::failed);
      return fail(409, "insufficient_funds", "not enough money");
    }
    apply_delta(b, *account, *amount, gid, branch, op);
    return json_response(200, Json{{"balance", a.balance}});
  }
  // compensate
  if (b.state == State::compensated) {
    journal(gid, branch, op, OpEffect::duplicate);
    return json_response(200, Json{{"undone", b.empty ? 0 : b.amount}});
  }
  if (b.state != State::done) {
    b.state = State::compensated;
    b.empty = true;
    journal(gid, branch, op, OpEffect::empty);
    return json_response(200, Json{{"empty", true}});
  }
  b.state = State::compensated;
  int64_t id = b.account, delta = b.amount;
  auto undo = [this, id, delta, gid, branch] {
    accounts[id].balance -= delta * (sabotage_ == Sabotage::double_undo ? 2 : 1);
    if (sabotage_ == Sabotage::skip_compensation_record && !sabotaged_once_)
      sabotaged_once_ = true;
    else
      journal(gid, branch, "compensate", OpEffect::applied);
  };
  if (sabotage_ == Sabotage::late_compensation)
    w_.at(w_.now() + kLateCompensationMs, -1, undo);
  else
    undo();
  return json_response(200, Json{{"undone", delta}});
}

}  // namespace tpc::sim
