// HttpParticipant: the request handler of tpc-http-participant, an in-memory account ledger
// that answers HTTP ops (DESIGN.md §8) the way a careful TCC/Saga participant does, with fault
// injection and a call log, for integration tests and scripts/demo.sh.
//
// Endpoints (JSON bodies and answers; errors are {"error":{"code","message"}}):
//
//   GET  /healthz                        200 {"status":"ok"} (no token needed)
//   GET  /accounts                       {"accounts":{NAME:{"balance","frozen"}},"total"}
//   POST /accounts {NAME:N,...}          sets those balances (a new account: frozen 0)
//   POST /tcc/debit/try|confirm|cancel   {"account","amount"}: freeze, take, release
//                                        → {"frozen"|"debited"|"released":amount}
//   POST /tcc/credit/try|confirm|cancel  {"account","amount"}: pend, add, drop
//                                        → {"pending"|"credited"|"dropped":amount}
//   POST /saga/action|compensate         {"account","delta"} → {"balance"}, {"undone":delta}
//   POST /msg/local|deliver              {"account","delta"} → {"balance"}: a message's local
//                                        transaction (its producer) and a delivery, once each
//   POST /msg/check                      the message's check-back on /msg/local of the same gid
//                                        and branch: {"committed":true,"balance"}, or 409
//                                        not_committed, which fences it (a later local is refused)
//   POST /notify                         a notification (DESIGN.md §10.3): kept, 200
//   GET  /notify                         {"received":[{"id","op","attempt","body"}]}, oldest first
//   GET|POST|DELETE /control/faults      {"rules":[{"path","branch"?,"op"?,"mode","count"?,
//                                        "delay_ms"?,"retry_after_s"?}]}
//   POST /control/reset                  forgets accounts, branches, answers, calls, rules
//   GET  /calls[?gid=G], DELETE /calls   the call log of the op endpoints, in arrival order
//
// A cancel or compensate whose try or action never arrived answers {"empty":true}. Business
// refusals are 409 with codes insufficient_funds, unknown_account, not_tried, cancelled,
// confirmed, compensated, branch_mismatch, balance_limit.
//
// An op request needs the Tpc-Gid and Tpc-Branch headers. Each branch (gid, branch) keeps its
// state, so an op resent without an Idempotency-Key is still applied once; a cancel or
// compensate whose try or action never arrived is recorded as empty and refuses that try or
// action later (anti-hanging). With an Idempotency-Key, the first final answer (2xx, 409, 422)
// is stored and replayed to every resend; a refused confirm, cancel or compensate is not
// stored, since those ops are resent until they succeed and must see the current state.
//
// Fault rules are matched after the request is validated and before the replay check, so a
// rule also applies to resends: fail (422 "injected", stored for a try or an action, as a real
// refusal would be), unavailable (503, nothing
// applied), hang (no answer for delay_ms or 60 s, then the Responder is dropped: the server
// answers 500), late (applied, answered after delay_ms), twice (applied and stored, answered
// 503 so the caller resends and gets the replay).
//
// Threads: handle() may be called from any thread at once (one mutex); it never blocks on a
// delay. Late and hung answers are held by one timer thread owned by this object. stop() (or
// the destructor) gives every held answer now and must run before the EventLoop of the server
// that made the Responders is destroyed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/http.h"
#include "common/log.h"

namespace tpc::tools {

struct HttpParticipantOptions {
  std::string token;  // "" = no Authorization needed
  size_t accounts_max = 100'000;
  size_t idempotency_entries_max = 1'000'000;  // past it the oldest is forgotten
  size_t calls_max = 1'000'000;                // past it the oldest call is dropped
  size_t branches_max = 1'000'000;             // branch records; past it the oldest is forgotten
  size_t fault_rules_max = 64;
  int64_t hang_ms = 60'000;  // a hung request's Responder is dropped after this
  Logger* log = nullptr;     // one debug line per op call; may be null
};

class HttpParticipant {
 public:
  explicit HttpParticipant(HttpParticipantOptions opts = {});
  ~HttpParticipant();  // stop()
  HttpParticipant(const HttpParticipant&) = delete;
  HttpParticipant& operator=(const HttpParticipant&) = delete;

  // Answers `req` through `respond`: at once, or later from the timer thread (late, hang).
  void handle(HttpRequest&& req, Responder respond);

  // Sends every late answer now and drops every hung Responder (its client gets 500), then
  // joins the timer thread. Later late answers go at once and later hangs are dropped at once.
  void stop();

  // Late or hung requests not answered yet; for tests.
  size_t held() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tpc::tools
