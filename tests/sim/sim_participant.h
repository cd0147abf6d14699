// The simulated HTTP participant of the whole-system simulator: a service the coordinator
// calls through HTTP ops (docs/DESIGN.md §8) for TCC branches and saga steps, running as a
// process of the World (sim.h), so that its requests and answers are lost, delayed and cut
// like everyone's, and it crashes. Its ledger, branch states and stored answers are durable:
// a crash loses only the answers it still held.
//
// It behaves as a careful participant does:
//   - idempotence per (gid, branch, op): the first final answer (2xx, 409, 422) is stored under
//     the Idempotency-Key and replayed to every resend; a refused confirm, cancel or compensate
//     is not stored (those are resent until they succeed and must see the current state);
//   - a cancel or compensate whose try or action never arrived is empty, and refuses that try
//     or action later (anti-hanging, 409);
//   - the headers are checked against the contract: Tpc-Gid, Tpc-Branch, Tpc-Op (the op of the
//     path), Tpc-Attempt, Idempotency-Key = gid/branch/op, and the op's own headers passed on.
//
// Endpoints (POST, JSON):
//   /tcc/debit/try|confirm|cancel    {"account","amount"}: freeze, take, release
//   /tcc/credit/try|confirm|cancel   {"account","amount"}: pend, add, drop
//   /saga/action                     {"account","delta","check_funds"?,"transient"?}
//   /saga/compensate                 {"account","delta"}: undoes the action
//   /msg/deliver                     {"account","delta"}: a message's delivery, applied once
//   /msg/local                       {"account","delta"}: a message's producer, the client's own
//                                    local op; refused once /msg/check fenced it
//   /msg/check                       the message's check-back: 200 when /msg/local ran, else
//                                    409 not_committed and fenced
//   /notify                          a notification: kept in `received` (2% refused, 422)
//
// It misbehaves, from the World's seeded Rng: a try or an action fails as a business failure
// (409 or 422, stored; "transient": not stored, the next attempt decides afresh — for forward
// sagas, which retry until the action succeeds), and, while the World's faults are on: 503 with
// Retry-After, no answer at all (before or after applying), a late answer, the answer 503 after
// applying (the resend gets the replay), and a request handled a second time.
//
// Every op it evaluates is written to the OpJournal, which the agents' steps write to as well
// (tests/sim/system_sim.cc), for the checks at the end of a seed.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common/http.h"
#include "common/json.h"
#include "tests/sim/sim.h"

namespace tpc::sim {

// What an op did where it arrived.
enum class OpEffect {
  applied,    // it ran
  empty,      // a cancel or compensate whose try or action never ran
  refused,    // not run: a try/action after its cancel/compensation, a confirm after a cancel…
  failed,     // a business failure: nothing ran
  duplicate,  // a resend: answered from the first call
};
std::string_view effect_name(OpEffect e);

struct OpEvent {
  std::string gid, branch, op;  // op: try, confirm, cancel, action, compensate
  OpEffect effect = OpEffect::applied;
  std::string where;  // "svc" or the agent's name
  uint64_t seq = 0;   // order of evaluation, over every participant
  int64_t at_ms = 0;  // the World's time
};

struct OpJournal {
  std::vector<OpEvent> events;
  void add(World& w, std::string gid, std::string branch, std::string op, OpEffect effect,
           std::string where) {
    if (w.echo)
      w.note(where + " " + op + " " + gid + " " + branch + ": " + std::string(effect_name(effect)));
    events.push_back(OpEvent{std::move(gid), std::move(branch), std::move(op), effect,
                             std::move(where), events.size() + 1, w.now()});
  }
};

// Ways to break the participant's bookkeeping on purpose, each caught by one invariant
// (tpc-sim --sabotage NAME, tests/sim/CMakeLists.txt).
enum class Sabotage {
  none,
  skip_compensation_record,  // one compensation is applied but not journaled
  late_compensation,         // compensations are answered at once, applied 1.5 s later
  cancel_after_confirm,      // a confirm is journaled with a cancel refused after it
  skip_cancel_record,        // one cancel is applied but not journaled
  keep_frozen,               // a debit's cancel leaves the amount frozen
  double_undo,               // a compensation undoes its action twice
  tell_committed,            // (the client) an aborted saga is taken for committed
};

class SimParticipant {
 public:
  struct Account {
    int64_t balance = 0;
    int64_t frozen = 0;    // debits tried, not confirmed or cancelled
    int64_t incoming = 0;  // credits tried, not confirmed or cancelled
  };

  SimParticipant(World& w, int proc, OpJournal& journal, Sabotage sabotage)
      : w_(w), proc_(proc), journal_(journal), sabotage_(sabotage) {}
  ~SimParticipant() { release(); }

  void serve();    // installs the handler: at the start and after a restart
  void crash();    // the answers it held are never given
  void release();  // drops every held answer; at the end of a run, while the World is there

  std::map<int64_t, Account> accounts;
  int64_t total() const;
  int64_t frozen() const;  // frozen and incoming, summed
  // Requests that break the contract of docs/DESIGN.md §8, as they came.
  std::vector<std::string> contract;
  uint64_t evaluated = 0;  // ops evaluated (not replays)
  // Notifications received, by id (the Tpc-Gid of the call): each delivery's body.
  std::map<std::string, std::vector<std::string>> received;

 private:
  enum class State {
    none,
    tried,
    try_failed,
    confirmed,
    cancelled,
    done,
    action_failed,
    compensated
  };
  struct Branch {
    State state = State::none;
    bool empty = false;  // cancelled or compensated without its try or action
    int64_t account = 0;
    int64_t amount = 0;  // tcc: the amount tried; saga: the delta applied
  };
  struct Stored {
    int status;
    std::string body;
  };

  void handle(HttpRequest&& req, Responder respond);
  // Checks, replays or runs the op; `copy` is a second delivery (its answer thrown away).
  HttpResponse evaluate(const HttpRequest& req, bool copy);
  HttpResponse notified(const std::string& id, const Json& body, bool* store);
  HttpResponse checked(const std::string& gid, const std::string& branch, Branch& b);
  void apply_delta(Branch& b, int64_t account, int64_t amount, const std::string& gid,
                   const std::string& branch, const std::string& op);
  HttpResponse run(const std::string& gid, const std::string& branch, const std::string& kind,
                   const std::string& op, const Json& body, bool* store);
  void hold(Responder r);  // never answered
  void journal(const std::string& gid, const std::string& branch, const std::string& op,
               OpEffect e);

  World& w_;
  int proc_;
  OpJournal& journal_;
  Sabotage sabotage_;
  std::map<std::pair<std::string, std::string>, Branch> branches_;  // (gid, branch)
  std::map<std::string, Stored> answers_;                           // Idempotency-Key →
  uint64_t next_held_ = 1;
  std::map<uint64_t, Responder> held_;  // late answers not given yet
  std::vector<Responder> dropped_;      // never answered; released at the end
  bool sabotaged_once_ = false;
};

}  // namespace tpc::sim
