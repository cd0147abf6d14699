#include "tools/http_participant.h"

#include <charconv>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/assert.h"
#include "common/json.h"

namespace tpc::tools {
namespace {

// Amounts, deltas and balances stay at or below this, so 100 000 balances sum within int64.
constexpr int64_t kAmountMax = 10'000'000'000'000;
constexpr size_t kAccountNameBytesMax = 128;
constexpr size_t kHeaderValueBytesMax = 256;     // Tpc-Gid, Tpc-Branch, Tpc-Op
constexpr size_t kIdempotencyKeyBytesMax = 800;  // "<gid>/<branch>/<op>"
constexpr size_t kFaultPathBytesMax = 256;
constexpr int64_t kFaultCountMax = 1'000'000'000;
constexpr int64_t kFaultDelayMsMax = 3'600'000;
constexpr int64_t kLateDelayMsDefault = 1'000;
constexpr int64_t kRetryAfterSMax = 3'600;
constexpr int64_t kAttemptMax = 1'000'000'000;

// ---- Answers given later ---------------------------------------------------------------------

// Late answers sent at their time, and hung requests whose Responder is dropped at their time
// (the server then answers 500). One thread; stop() gives everything at once.
class DelayedAnswers {
 public:
  DelayedAnswers() {
    thread_ = std::thread([this] { run(); });
  }
  ~DelayedAnswers() { stop(); }
  DelayedAnswers(const DelayedAnswers&) = delete;
  DelayedAnswers& operator=(const DelayedAnswers&) = delete;

  // No response: the Responder is held, then dropped.
  void add(int64_t delay_ms, Responder respond, std::optional<HttpResponse> response) {
    Entry e{std::move(respond), std::move(response)};
    {
      std::lock_guard lock(mu_);
      if (!stopped_) {
        pending_.emplace(Clock::now() + std::chrono::milliseconds(delay_ms), std::move(e));
        cv_.notify_one();
        return;
      }
    }
    give(std::move(e));
  }

  void stop() {
    std::lock_guard stop_lock(stop_mu_);
    {
      std::lock_guard lock(mu_);
      if (stopped_) return;
      stopped_ = true;
      cv_.notify_one();
    }
    thread_.join();
    std::multimap<Clock::time_point, Entry> rest;
    {
      std::lock_guard lock(mu_);
      rest.swap(pending_);
    }
    for (auto& [due, e] : rest) give(std::move(e));
  }

  size_t size() const {
    std::lock_guard lock(mu_);
    return pending_.size();
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    Responder respond;
    std::optional<HttpResponse> response;
  };

  static void give(Entry e) {
    if (e.response) e.respond(std::move(*e.response));
    // Otherwise e.respond is dropped here, the last copy of a hung request's Responder.
  }

  void run() {
    std::unique_lock lock(mu_);
    while (!stopped_) {
      if (pending_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto due = pending_.begin()->first;
      if (Clock::now() < due) {
        cv_.wait_until(lock, due);
        continue;
      }
      Entry e = std::move(pending_.begin()->second);
      pending_.erase(pending_.begin());
      lock.unlock();
      give(std::move(e));
      lock.lock();
    }
  }

  std::mutex stop_mu_;  // one stop() at a time
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::multimap<Clock::time_point, Entry> pending_;  // under mu_
  bool stopped_ = false;                             // under mu_
  std::thread thread_;
};

// ---- Bounded state ---------------------------------------------------------------------------

// A map that forgets its oldest entry when a new one would pass max.
template <class V>
class BoundedMap {
 public:
  explicit BoundedMap(size_t max) : max_(max) { TPC_ASSERT(max > 0); }

  V* find(const std::string& key) {
    auto it = map_.find(key);
    return it == map_.end() ? nullptr : &it->second;
  }
  void insert(const std::string& key, V value) {
    TPC_ASSERT(!map_.contains(key));
    if (map_.size() >= max_) {
      map_.erase(order_.front());
      order_.pop_front();
    }
    order_.push_back(key);
    map_.emplace(key, std::move(value));
  }
  void clear() {
    map_.clear();
    order_.clear();
  }

 private:
  size_t max_;
  std::unordered_map<std::string, V> map_;
  std::deque<std::string> order_;  // insertion order, oldest first
};

// ---- Vocabulary ------------------------------------------------------------------------------

enum class Ledger { debit, credit, saga, msg };
enum class Step { first, confirm, undo };  // try/action, confirm, cancel/compensate

struct OpEndpoint {
  std::string_view path;
  Ledger ledger;
  Step step;
  std::string_view op;  // the Tpc-Op this endpoint stands for
};

constexpr OpEndpoint kOpEndpoints[] = {
    {"/tcc/debit/try", Ledger::debit, Step::first, "try"},
    {"/tcc/debit/confirm", Ledger::debit, Step::confirm, "confirm"},
    {"/tcc/debit/cancel", Ledger::debit, Step::undo, "cancel"},
    {"/tcc/credit/try", Ledger::credit, Step::first, "try"},
    {"/tcc/credit/confirm", Ledger::credit, Step::confirm, "confirm"},
    {"/tcc/credit/cancel", Ledger::credit, Step::undo, "cancel"},
    {"/saga/action", Ledger::saga, Step::first, "action"},
    {"/saga/compensate", Ledger::saga, Step::undo, "compensate"},
    {"/msg/local", Ledger::msg, Step::first, "local"},
    {"/msg/check", Ledger::msg, Step::undo, "check"},
    {"/msg/deliver", Ledger::msg, Step::first, "deliver"},
};

enum class FaultMode { fail, unavailable, hang, late, twice };

std::string_view mode_name(FaultMode m) {
  switch (m) {
    case FaultMode::fail: return "fail";
    case FaultMode::unavailable: return "unavailable";
    case FaultMode::hang: return "hang";
    case FaultMode::late: return "late";
    case FaultMode::twice: return "twice";
  }
  return "?";
}

std::optional<FaultMode> parse_mode(std::string_view s) {
  for (FaultMode m : {FaultMode::fail, FaultMode::unavailable, FaultMode::hang, FaultMode::late,
                      FaultMode::twice})
    if (mode_name(m) == s) return m;
  return std::nullopt;
}

struct FaultRule {
  std::string path;
  std::optional<std::string> branch;
  std::optional<std::string> op;
  FaultMode mode = FaultMode::fail;
  int64_t count = 1;  // matching requests still to take; -1 forever
  int64_t delay_ms = 0;
  int64_t retry_after_s = 0;
};

Json rule_json(const FaultRule& r) {
  Json j = {{"path", r.path}, {"mode", mode_name(r.mode)}, {"count", r.count}};
  if (r.branch) j["branch"] = *r.branch;
  if (r.op) j["op"] = *r.op;
  if (r.mode == FaultMode::late || r.mode == FaultMode::hang) j["delay_ms"] = r.delay_ms;
  if (r.mode == FaultMode::unavailable || r.mode == FaultMode::twice)
    j["retry_after_s"] = r.retry_after_s;
  return j;
}

Result<FaultRule> parse_rule(const Json& j, int64_t hang_ms) {
  if (!j.is_object()) return invalid_argument("each fault rule must be an object");
  FieldReader r(j);
  FaultRule rule;
  std::string mode, branch, op;
  r.string("path", &rule.path, true, kFaultPathBytesMax);
  bool has_branch = r.has("branch");
  r.string("branch", &branch, false, kHeaderValueBytesMax);
  bool has_op = r.has("op");
  r.string("op", &op, false, kHeaderValueBytesMax);
  r.string("mode", &mode, true, 32);
  r.int64("count", &rule.count, -1, kFaultCountMax);
  bool has_delay = r.has("delay_ms");
  r.int64("delay_ms", &rule.delay_ms, 0, kFaultDelayMsMax);
  bool has_retry_after = r.has("retry_after_s");
  r.int64("retry_after_s", &rule.retry_after_s, 0, kRetryAfterSMax);
  TPC_RETURN_IF_ERROR(r.finish());
  if (rule.path.empty() || rule.path[0] != '/')
    return invalid_argument("a fault rule's \"path\" must start with /, got " + echo(rule.path));
  auto m = parse_mode(mode);
  if (!m)
    return invalid_argument("\"mode\" must be fail, unavailable, hang, late or twice, got " +
                            echo(mode));
  rule.mode = *m;
  if (rule.count == 0) return invalid_argument("\"count\" must be -1 (forever) or at least 1");
  bool delayed = rule.mode == FaultMode::late || rule.mode == FaultMode::hang;
  if (has_delay && !delayed)
    return invalid_argument("\"delay_ms\" applies to the modes late and hang only");
  bool answers_503 = rule.mode == FaultMode::unavailable || rule.mode == FaultMode::twice;
  if (has_retry_after && !answers_503)
    return invalid_argument("\"retry_after_s\" applies to the modes unavailable and twice only");
  if (!has_delay && rule.mode == FaultMode::late) rule.delay_ms = kLateDelayMsDefault;
  if (!has_delay && rule.mode == FaultMode::hang) rule.delay_ms = hang_ms;
  if (has_branch) rule.branch = branch;
  if (has_op) rule.op = op;
  return rule;
}

// 503; error_response adds Retry-After: 1 to every 503, here the rule decides.
HttpResponse unavailable_response(int64_t retry_after_s, std::string_view message) {
  HttpResponse r = error_response(503, "unavailable", message);
  r.headers.clear();
  if (retry_after_s > 0) r.headers.emplace_back("retry-after", std::to_string(retry_after_s));
  return r;
}

struct Account {
  int64_t balance = 0;
  int64_t frozen = 0;    // held by applied debit tries; balance >= frozen always
  int64_t incoming = 0;  // pending credit tries; balance + incoming <= kAmountMax always
};

enum class BranchState { applied, confirmed, undone, empty_undo };

// One branch of one ledger: a TCC side of (gid, branch), or a saga step.
struct Branch {
  BranchState state = BranchState::applied;
  std::string account;        // empty for an empty undo without a body
  int64_t amount = 0;         // TCC amount, or saga delta
  int64_t balance_after = 0;  // saga: the balance the action left, its answer
};

struct StoredAnswer {
  size_t fingerprint = 0;  // of the path and the body that first used the key
  int status = 0;
  std::string body;
};

struct Call {
  uint64_t seq = 0;
  std::string path, gid, branch, op;
  std::optional<int64_t> attempt;
  int status = 0;  // 0: not answered (hang)
  bool replayed = false;
  std::optional<FaultMode> fault;
};

Json call_json(const Call& c) {
  Json j = {{"seq", c.seq},       {"path", c.path},
            {"gid", c.gid},       {"branch", c.branch},
            {"op", c.op},         {"attempt", c.attempt ? Json(*c.attempt) : Json(nullptr)},
            {"status", c.status}, {"replayed", c.replayed}};
  if (c.fault) j["fault"] = mode_name(*c.fault);
  return j;
}

// A validated op request.
struct OpInput {
  const OpEndpoint* ep = nullptr;
  std::string gid, branch;
  std::string key;  // Idempotency-Key, or "" for none
  std::string account;
  int64_t amount = 0;  // TCC amount or saga delta
  bool given = false;  // whether the body named account and amount
  size_t fingerprint = 0;
};

// What an op did; store=false for a refusal that must not be replayed.
struct Outcome {
  HttpResponse response;
  bool store = true;
};

Outcome ok(Json body) {
  return {json_response(200, body), true};
}
Outcome refuse(std::string_view code, std::string_view message, bool store = true) {
  return {error_response(409, code, message), store};
}

// The header's value cut for the call log.
std::string cut(std::string_view v) {
  return std::string(v.substr(0, std::min(v.size(), kHeaderValueBytesMax)));
}

Status header_value(const HttpRequest& req, std::string_view name, std::string_view shown,
                    bool required, std::string* out) {
  std::string_view v = req.header(name);
  if (v.empty() && required)
    return invalid_argument("the " + std::string(shown) + " header is required");
  if (v.size() > kHeaderValueBytesMax)
    return Status(Code::too_large, "the " + std::string(shown) + " header is longer than " +
                                       std::to_string(kHeaderValueBytesMax) + " bytes");
  *out = std::string(v);
  return ok_status();
}

}  // namespace

// ---- The participant -------------------------------------------------------------------------

struct HttpParticipant::Impl {
  enum class When { now, later, hold };
  struct Reply {
    HttpResponse response;
    When when = When::now;
    int64_t delay_ms = 0;
  };

  explicit Impl(HttpParticipantOptions o)
      : opts(std::move(o)), branches(opts.branches_max), answers(opts.idempotency_entries_max) {
    TPC_ASSERT(opts.calls_max > 0 && opts.accounts_max > 0 && opts.fault_rules_max > 0);
    TPC_ASSERT(opts.hang_ms >= 0 && opts.hang_ms <= kFaultDelayMsMax);
  }

  static Reply now(HttpResponse r) { return Reply{std::move(r), When::now, 0}; }

  Reply route(const HttpRequest& req);
  Reply op_call(const HttpRequest& req, const OpEndpoint& ep);
  Reply op_reply(const HttpRequest& req, const OpEndpoint& ep, Call* call);
  Result<OpInput> parse_op(const HttpRequest& req, const OpEndpoint& ep, Call* call);
  HttpResponse apply_once(const OpInput& in, bool* replayed);
  Outcome apply(const OpInput& in);
  Outcome tcc_try(const OpInput& in);
  Outcome tcc_confirm(const OpInput& in);
  Outcome tcc_cancel(const OpInput& in);
  Outcome saga_action(const OpInput& in);
  Outcome saga_compensate(const OpInput& in);
  Outcome msg_check(const OpInput& in);
  HttpResponse notified(const HttpRequest& req);
  Json received_json() const;
  std::optional<FaultRule> match_fault(std::string_view path, std::string_view branch,
                                       std::string_view op);

  HttpResponse set_accounts(std::string_view body);
  HttpResponse set_faults(std::string_view body);
  Json accounts_json() const;
  Json faults_json() const;
  Json calls_json(const std::optional<std::string>& gid) const;
  void record(Call call);
  Account& account_of(const Branch& b);

  static std::string branch_key(const OpInput& in) {
    char tag = in.ep->ledger == Ledger::debit ? 'd' : in.ep->ledger == Ledger::credit ? 'c' : 's';
    return std::string(1, tag) + '\0' + in.gid + '\0' + in.branch;
  }
  static bool matches(const Branch& b, const OpInput& in) {
    return !in.given || (b.account == in.account && b.amount == in.amount);
  }
  static Outcome mismatch(const Branch& b, bool store) {
    return refuse("branch_mismatch",
                  "this branch was first called with account " + echo(b.account) + " and " +
                      std::to_string(b.amount),
                  store);
  }

  const HttpParticipantOptions opts;
  mutable std::mutex mu;
  std::map<std::string, Account, std::less<>> accounts;  // under mu
  BoundedMap<Branch> branches;                           // under mu
  BoundedMap<StoredAnswer> answers;                      // by Idempotency-Key; under mu
  std::deque<Call> calls;                                // under mu
  std::deque<Json> received;                             // notifications, under mu
  uint64_t seq = 0;                                      // under mu
  std::vector<FaultRule> faults;                         // under mu
  DelayedAnswers delayed;
};

HttpParticipant::HttpParticipant(HttpParticipantOptions opts)
    : impl_(std::make_unique<Impl>(std::move(opts))) {}

HttpParticipant::~HttpParticipant() {
  stop();
}

void HttpParticipant::stop() {
  impl_->delayed.stop();
}

size_t HttpParticipant::held() const {
  return impl_->delayed.size();
}

void HttpParticipant::handle(HttpRequest&& req, Responder respond) {
  Impl::Reply r = impl_->route(req);
  switch (r.when) {
    case Impl::When::now: respond(std::move(r.response)); break;
    case Impl::When::later:
      impl_->delayed.add(r.delay_ms, std::move(respond), std::move(r.response));
      break;
    case Impl::When::hold: impl_->delayed.add(r.delay_ms, std::move(respond), std::nullopt); break;
  }
}

HttpParticipant::Impl::Reply HttpParticipant::Impl::route(const HttpRequest& req) {
  std::string_view path = req.path();
  const std::string& method = req.method;
  if (path == "/healthz")
    return now(method == "GET" ? json_response(200, {{"status", "ok"}})
                               : method_not_allowed("GET"));
  if (!opts.token.empty() && !has_bearer_token(req, opts.token)) {
    HttpResponse r = error_response(Status(Code::unauthorized, "missing or wrong bearer token"));
    r.headers.emplace_back("www-authenticate", "Bearer");
    return now(std::move(r));
  }
  std::lock_guard lock(mu);
  if (path == "/accounts") {
    if (method == "GET") return now(json_response(200, accounts_json()));
    if (method == "POST") return now(set_accounts(req.body));
    return now(method_not_allowed("GET, POST"));
  }
  if (path == "/calls") {
    if (method == "GET") return now(json_response(200, calls_json(req.query_param("gid"))));
    if (method == "DELETE") {
      size_t n = calls.size();
      calls.clear();
      return now(json_response(200, {{"cleared", n}}));
    }
    return now(method_not_allowed("GET, DELETE"));
  }
  if (path == "/control/faults") {
    if (method == "GET") return now(json_response(200, faults_json()));
    if (method == "POST") return now(set_faults(req.body));
    if (method == "DELETE") {
      faults.clear();
      return now(json_response(200, faults_json()));
    }
    return now(method_not_allowed("GET, POST, DELETE"));
  }
  if (path == "/control/reset") {
    if (method != "POST") return now(method_not_allowed("POST"));
    accounts.clear();
    branches.clear();
    answers.clear();
    calls.clear();
    faults.clear();
    received.clear();
    return now(json_response(200, Json::object()));
  }
  if (path == "/notify") {
    if (method == "POST") return now(notified(req));
    if (method == "GET") return now(json_response(200, {{"received", received_json()}}));
    return now(method_not_allowed("GET, POST"));
  }
  for (const OpEndpoint& ep : kOpEndpoints)
    if (path == ep.path)
      return method == "POST" ? op_call(req, ep) : now(method_not_allowed("POST"));
  return now(error_response(not_found("no such path " + echo(path))));
}

// A notification (DESIGN.md §10.3): kept with its Tpc-Gid (the notification's id) and attempt,
// answered 200; the bodies of all of them, oldest first, from GET /notify.
HttpResponse HttpParticipant::Impl::notified(const HttpRequest& req) {
  auto body = parse_object(req.body);
  if (!body.ok()) return error_response(body.status());
  if (received.size() >= opts.calls_max) received.pop_front();
  received.push_back(Json{{"id", cut(req.header("tpc-gid"))},
                          {"op", cut(req.header("tpc-op"))},
                          {"attempt", cut(req.header("tpc-attempt"))},
                          {"body", std::move(*body)}});
  return json_response(200, {{"received", true}});
}

Json HttpParticipant::Impl::received_json() const {
  Json out = Json::array();
  for (auto& r : received) out.push_back(r);
  return out;
}

// ---- Op requests -----------------------------------------------------------------------------

HttpParticipant::Impl::Reply HttpParticipant::Impl::op_call(const HttpRequest& req,
                                                            const OpEndpoint& ep) {
  Call call;
  call.seq = ++seq;
  call.path = std::string(ep.path);
  call.gid = cut(req.header("tpc-gid"));
  call.branch = cut(req.header("tpc-branch"));
  call.op = req.header("tpc-op").empty() ? std::string(ep.op) : cut(req.header("tpc-op"));
  Reply reply = op_reply(req, ep, &call);
  call.status = reply.when == When::hold ? 0 : reply.response.status;
  record(std::move(call));
  return reply;
}

HttpParticipant::Impl::Reply HttpParticipant::Impl::op_reply(const HttpRequest& req,
                                                             const OpEndpoint& ep, Call* call) {
  auto in = parse_op(req, ep, call);
  if (!in.ok()) return now(error_response(in.status()));
  std::optional<FaultRule> rule = match_fault(ep.path, in->branch, call->op);
  if (rule) {
    call->fault = rule->mode;
    switch (rule->mode) {
      case FaultMode::fail: {
        HttpResponse r = error_response(422, "injected", "injected failure (fault rule fail)");
        // Stored like a real refusal: final for a try or an action; a confirm, cancel or
        // compensate is resent until it succeeds, so its refusal is not replayed.
        bool final_op = call->op == "try" || call->op == "action";
        if (final_op && !in->key.empty() && !answers.find(in->key))
          answers.insert(in->key, StoredAnswer{in->fingerprint, r.status, r.body});
        return now(std::move(r));
      }
      case FaultMode::unavailable:
        return now(
            unavailable_response(rule->retry_after_s, "injected: unavailable, nothing applied"));
      case FaultMode::hang: return Reply{HttpResponse{}, When::hold, rule->delay_ms};
      case FaultMode::late:
      case FaultMode::twice: break;  // applied below
    }
  }
  HttpResponse answer = apply_once(*in, &call->replayed);
  if (rule && rule->mode == FaultMode::late)
    return Reply{std::move(answer), When::later, rule->delay_ms};
  if (rule && rule->mode == FaultMode::twice)  // applied, but answered as if the answer was lost
    return now(unavailable_response(rule->retry_after_s, "injected: applied, answered 503"));
  return now(std::move(answer));
}

Result<OpInput> HttpParticipant::Impl::parse_op(const HttpRequest& req, const OpEndpoint& ep,
                                                Call* call) {
  OpInput in;
  in.ep = &ep;
  std::string_view attempt = req.header("tpc-attempt");
  if (!attempt.empty()) {
    int64_t a = 0;
    auto [p, ec] = std::from_chars(attempt.data(), attempt.data() + attempt.size(), a);
    if (ec != std::errc() || p != attempt.data() + attempt.size() || a < 1 || a > kAttemptMax)
      return invalid_argument("Tpc-Attempt must be a positive integer, got " + echo(attempt));
    call->attempt = a;
  }
  TPC_RETURN_IF_ERROR(header_value(req, "tpc-gid", "Tpc-Gid", true, &in.gid));
  TPC_RETURN_IF_ERROR(header_value(req, "tpc-branch", "Tpc-Branch", true, &in.branch));
  std::string unused;
  TPC_RETURN_IF_ERROR(header_value(req, "tpc-op", "Tpc-Op", false, &unused));
  std::string_view key = req.header("idempotency-key");
  if (key.size() > kIdempotencyKeyBytesMax)
    return Status(Code::too_large, "the Idempotency-Key header is longer than " +
                                       std::to_string(kIdempotencyKeyBytesMax) + " bytes");
  in.key = std::string(key);

  auto body = parse_object(req.body);
  if (!body.ok()) return body.status();
  FieldReader r(*body);
  bool saga = ep.ledger == Ledger::saga || ep.ledger == Ledger::msg;  // a delta
  bool required = ep.step == Step::first;  // confirm, cancel and compensate may name neither
  const char* amount_key = saga ? "delta" : "amount";
  bool has_account = r.has("account");
  bool has_amount = r.has(amount_key);
  r.string("account", &in.account, required, kAccountNameBytesMax);
  if (saga)
    r.int64("delta", &in.amount, -kAmountMax, kAmountMax, required);
  else
    r.int64("amount", &in.amount, 1, kAmountMax, required);
  TPC_RETURN_IF_ERROR(r.finish());
  if (has_account != has_amount)
    return invalid_argument("give both \"account\" and \"" + std::string(amount_key) +
                            "\", or neither");
  if (has_account && in.account.empty()) return invalid_argument("\"account\" must not be empty");
  if (saga && has_amount && in.amount == 0) return invalid_argument("\"delta\" must not be 0");
  in.given = has_account;
  in.fingerprint = std::hash<std::string>{}(std::string(ep.path) + '\n' + dump(*body));
  return in;
}

HttpResponse HttpParticipant::Impl::apply_once(const OpInput& in, bool* replayed) {
  if (!in.key.empty()) {
    if (const StoredAnswer* s = answers.find(in.key)) {
      if (s->fingerprint != in.fingerprint)
        return error_response(
            422, "idempotency_key_reused",
            "Idempotency-Key " + echo(in.key) + " was first used with another path or body");
      *replayed = true;
      HttpResponse r;
      r.status = s->status;
      r.body = s->body;
      return r;
    }
  }
  Outcome out = apply(in);
  int st = out.response.status;
  bool final_answer = (st >= 200 && st < 300) || st == 409 || st == 422;
  if (!in.key.empty() && out.store && final_answer)
    answers.insert(in.key, StoredAnswer{in.fingerprint, st, out.response.body});
  return std::move(out.response);
}

Outcome HttpParticipant::Impl::apply(const OpInput& in) {
  if (in.ep->ledger == Ledger::saga)
    return in.ep->step == Step::first ? saga_action(in) : saga_compensate(in);
  // A message's local transaction and its deliveries apply a delta once, as an action does.
  if (in.ep->ledger == Ledger::msg)
    return in.ep->step == Step::first ? saga_action(in) : msg_check(in);
  switch (in.ep->step) {
    case Step::first: return tcc_try(in);
    case Step::confirm: return tcc_confirm(in);
    case Step::undo: return tcc_cancel(in);
  }
  TPC_ASSERT(false);
  return {};
}

Account& HttpParticipant::Impl::account_of(const Branch& b) {
  // Accounts are never removed but by /control/reset, which forgets the branches too.
  auto it = accounts.find(b.account);
  TPC_ASSERT_MSG(it != accounts.end(), "an applied branch names a missing account");
  return it->second;
}

Outcome HttpParticipant::Impl::tcc_try(const OpInput& in) {
  bool debit = in.ep->ledger == Ledger::debit;
  auto result = [&](int64_t amount) { return ok({{debit ? "frozen" : "pending", amount}}); };
  std::string key = branch_key(in);
  if (Branch* b = branches.find(key)) {
    if (b->state == BranchState::undone || b->state == BranchState::empty_undo)
      return refuse("cancelled", "this branch was cancelled; its try is refused");
    if (!matches(*b, in)) return mismatch(*b, true);
    return result(b->amount);  // a resend: applied once
  }
  auto it = accounts.find(in.account);
  if (it == accounts.end()) return refuse("unknown_account", "no account " + echo(in.account));
  Account& a = it->second;
  if (debit) {
    if (a.balance - a.frozen < in.amount)
      return refuse("insufficient_funds",
                    "account " + echo(in.account) + " has " + std::to_string(a.balance - a.frozen) +
                        " available, the try needs " + std::to_string(in.amount));
    a.frozen += in.amount;
  } else {
    if (a.balance + a.incoming > kAmountMax - in.amount)
      return refuse("balance_limit", "the credit would take account " + echo(in.account) +
                                         " past " + std::to_string(kAmountMax));
    a.incoming += in.amount;
  }
  branches.insert(key, Branch{BranchState::applied, in.account, in.amount, 0});
  return result(in.amount);
}

Outcome HttpParticipant::Impl::tcc_confirm(const OpInput& in) {
  bool debit = in.ep->ledger == Ledger::debit;
  auto result = [&](int64_t amount) { return ok({{debit ? "debited" : "credited", amount}}); };
  Branch* b = branches.find(branch_key(in));
  // Refusals are not stored: a confirm is resent until it succeeds.
  if (!b) return refuse("not_tried", "no try of this branch was applied", false);
  if (b->state == BranchState::undone || b->state == BranchState::empty_undo)
    return refuse("cancelled", "this branch was cancelled; it cannot be confirmed", false);
  if (!matches(*b, in)) return mismatch(*b, false);
  if (b->state == BranchState::confirmed) return result(b->amount);
  Account& a = account_of(*b);
  if (debit) {
    TPC_ASSERT(a.frozen >= b->amount && a.balance >= a.frozen);
    a.balance -= b->amount;
    a.frozen -= b->amount;
  } else {
    TPC_ASSERT(a.incoming >= b->amount);
    a.balance += b->amount;
    a.incoming -= b->amount;
  }
  b->state = BranchState::confirmed;
  return result(b->amount);
}

Outcome HttpParticipant::Impl::tcc_cancel(const OpInput& in) {
  bool debit = in.ep->ledger == Ledger::debit;
  auto result = [&](int64_t amount) { return ok({{debit ? "released" : "dropped", amount}}); };
  std::string key = branch_key(in);
  Branch* b = branches.find(key);
  if (!b) {  // empty cancel: the try never arrived, and is refused if it does
    branches.insert(key, Branch{BranchState::empty_undo, in.account, in.amount, 0});
    return ok({{"empty", true}});
  }
  if (b->state == BranchState::empty_undo) return ok({{"empty", true}});
  if (!matches(*b, in)) return mismatch(*b, false);
  if (b->state == BranchState::confirmed)
    return refuse("confirmed", "this branch was confirmed; a cancel cannot undo it", false);
  if (b->state == BranchState::undone) return result(b->amount);
  Account& a = account_of(*b);
  if (debit) {
    TPC_ASSERT(a.frozen >= b->amount);
    a.frozen -= b->amount;
  } else {
    TPC_ASSERT(a.incoming >= b->amount);
    a.incoming -= b->amount;
  }
  b->state = BranchState::undone;
  return result(b->amount);
}

Outcome HttpParticipant::Impl::saga_action(const OpInput& in) {
  std::string key = branch_key(in);
  if (Branch* b = branches.find(key)) {
    if (b->state != BranchState::applied)
      return refuse("compensated",
                    "this step was compensated (a message's local transaction: fenced by its "
                    "check) before it arrived; it is refused");
    if (!matches(*b, in)) return mismatch(*b, true);
    return ok({{"balance", b->balance_after}});  // a resend: applied once
  }
  auto it = accounts.find(in.account);
  if (it == accounts.end()) return refuse("unknown_account", "no account " + echo(in.account));
  Account& a = it->second;
  int64_t after = a.balance + in.amount;
  if (after < a.frozen)
    return refuse("insufficient_funds",
                  "account " + echo(in.account) + " has " + std::to_string(a.balance - a.frozen) +
                      " available, the action needs " + std::to_string(-in.amount));
  if (after > kAmountMax - a.incoming)
    return refuse("balance_limit", "the action would take account " + echo(in.account) + " past " +
                                       std::to_string(kAmountMax));
  a.balance = after;
  branches.insert(key, Branch{BranchState::applied, in.account, in.amount, after});
  return ok({{"balance", after}});
}

// A message's check-back (docs/DESIGN.md §10.1) on its producer's local transaction, the
// branch (gid, branch) of /msg/local: committed, or not — and then fenced, so that a local
// transaction arriving later is refused and the answer stays true.
Outcome HttpParticipant::Impl::msg_check(const OpInput& in) {
  std::string key = branch_key(in);
  Branch* b = branches.find(key);
  if (!b) {
    branches.insert(key, Branch{BranchState::empty_undo, in.account, in.amount, 0});
    return refuse("not_committed", "no local transaction of this gid committed; it is fenced");
  }
  if (b->state == BranchState::empty_undo)
    return refuse("not_committed", "no local transaction of this gid committed; it is fenced");
  return ok({{"committed", true}, {"balance", b->balance_after}});
}

Outcome HttpParticipant::Impl::saga_compensate(const OpInput& in) {
  std::string key = branch_key(in);
  Branch* b = branches.find(key);
  if (!b) {  // empty compensation: the action never arrived, and is refused if it does
    branches.insert(key, Branch{BranchState::empty_undo, in.account, in.amount, 0});
    return ok({{"empty", true}});
  }
  if (b->state == BranchState::empty_undo) return ok({{"empty", true}});
  if (!matches(*b, in)) return mismatch(*b, false);
  if (b->state == BranchState::undone) return ok({{"undone", b->amount}});
  Account& a = account_of(*b);
  int64_t after = a.balance - b->amount;
  // Refusals are not stored: a compensation is resent until it succeeds, e.g. once the
  // account has the money again.
  if (after < a.frozen)
    return refuse(
        "insufficient_funds",
        "account " + echo(b->account) + " lacks the funds to undo " + std::to_string(b->amount),
        false);
  if (after > kAmountMax - a.incoming)
    return refuse(
        "balance_limit",
        "undoing would take account " + echo(b->account) + " past " + std::to_string(kAmountMax),
        false);
  a.balance = after;
  b->state = BranchState::undone;
  return ok({{"undone", b->amount}});
}

std::optional<FaultRule> HttpParticipant::Impl::match_fault(std::string_view path,
                                                            std::string_view branch,
                                                            std::string_view op) {
  for (FaultRule& r : faults) {
    if (r.count == 0 || r.path != path) continue;
    if (r.branch && *r.branch != branch) continue;
    if (r.op && *r.op != op) continue;
    if (r.count > 0) --r.count;
    return r;
  }
  return std::nullopt;
}

void HttpParticipant::Impl::record(Call call) {
  if (opts.log)
    opts.log->debug("call", {{"seq", call.seq},
                             {"path", call.path},
                             {"gid", call.gid},
                             {"branch", call.branch},
                             {"op", call.op},
                             {"status", call.status},
                             {"replayed", call.replayed ? "true" : "false"},
                             {"fault", call.fault ? mode_name(*call.fault) : "none"}});
  if (calls.size() >= opts.calls_max) calls.pop_front();
  calls.push_back(std::move(call));
}

// ---- Accounts, faults, calls -----------------------------------------------------------------

HttpResponse HttpParticipant::Impl::set_accounts(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return error_response(j.status());
  size_t added = 0;
  std::vector<std::pair<std::string, int64_t>> balances;
  for (auto item = j->begin(); item != j->end(); ++item) {
    const std::string& name = item.key();
    const Json& v = item.value();
    if (name.empty() || name.size() > kAccountNameBytesMax)
      return error_response(invalid_argument("an account name has 1 to " +
                                             std::to_string(kAccountNameBytesMax) + " bytes, got " +
                                             echo(name)));
    bool in_range = v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(kAmountMax)
                                           : v.is_number_integer() && v.get<int64_t>() >= 0;
    if (!in_range)
      return error_response(invalid_argument("the balance of " + echo(name) +
                                             " must be an integer from 0 to " +
                                             std::to_string(kAmountMax)));
    int64_t balance = v.get<int64_t>();
    auto it = accounts.find(name);
    if (it == accounts.end()) {
      ++added;
    } else if (balance < it->second.frozen) {
      return error_response(409, "frozen_exceeds_balance",
                            "account " + echo(name) + " has " + std::to_string(it->second.frozen) +
                                " frozen by tries");
    } else if (balance > kAmountMax - it->second.incoming) {
      return error_response(409, "balance_limit",
                            "account " + echo(name) + " has " +
                                std::to_string(it->second.incoming) + " of pending credits");
    }
    balances.emplace_back(name, balance);
  }
  if (accounts.size() + added > opts.accounts_max)
    return error_response(
        Status(Code::too_large, "at most " + std::to_string(opts.accounts_max) + " accounts"));
  for (auto& [name, balance] : balances) accounts[name].balance = balance;
  return json_response(200, accounts_json());
}

Json HttpParticipant::Impl::accounts_json() const {
  Json list = Json::object();
  int64_t total = 0;
  for (const auto& [name, a] : accounts) {
    list[name] = {{"balance", a.balance}, {"frozen", a.frozen}};
    total += a.balance;
  }
  return {{"accounts", list}, {"total", total}};
}

HttpResponse HttpParticipant::Impl::set_faults(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return error_response(j.status());
  FieldReader r(*j);
  const Json* rules = r.array("rules", true, opts.fault_rules_max);
  if (Status st = r.finish(); !st.ok()) return error_response(st);
  std::vector<FaultRule> parsed;
  for (const Json& item : *rules) {
    auto rule = parse_rule(item, opts.hang_ms);
    if (!rule.ok())
      return error_response(Status(rule.status().code(), "rule " + std::to_string(parsed.size()) +
                                                             ": " + rule.status().message()));
    parsed.push_back(std::move(*rule));
  }
  faults = std::move(parsed);
  return json_response(200, faults_json());
}

Json HttpParticipant::Impl::faults_json() const {
  Json list = Json::array();
  for (const FaultRule& r : faults) list.push_back(rule_json(r));
  return {{"rules", list}};
}

Json HttpParticipant::Impl::calls_json(const std::optional<std::string>& gid) const {
  Json list = Json::array();
  for (const Call& c : calls)
    if (!gid || c.gid == *gid) list.push_back(call_json(c));
  return {{"calls", list}};
}

}  // namespace tpc::tools
