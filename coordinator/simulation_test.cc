// A deterministic, seeded simulation of the coordinator (the VOPR idea, STYLE.md).
//
// One CoordinatorMachine is driven the way coordinator/service.cc drives it (persist, then
// send, then reply; on_persisted once a synced write is done; on_reply for every answer), over
//   - a wal::MemoryLog behind a simulated disk whose writes complete late, in order, and of
//     which a crash keeps only a prefix (MemoryLog::crash() then drops what was not synced);
//   - 2-4 fake participants: a model of what an agent and PostgreSQL guarantee (prepared,
//     committed and aborted branches survive a participant crash, active ones are lost; an
//     abort of a branch never seen leaves a tombstone; prepared branches ask the coordinator
//     for the outcome, as the agent's in-doubt resolver does, and act on its "decision");
//   - clients that begin, enlist, commit, abort, repeat and read transactions, and run
//     one-shot ones (CoordinatorMachine::run: statements travel with prepare / commit);
//   - a network that delays, reorders, duplicates and drops messages (a drop is answered
//     ReplyKind::failed, like an HTTP timeout; a late request may still land afterwards);
//   - coordinator crashes: the machine, its pending disk writes and answers are lost, and a
//     new machine recovers from the log with the next epoch, like CoordinatorService::recover.
// Each seed runs a step budget with faults, then stops the faults, runs until quiescent and
// checks the invariants; then crashes the coordinator once more, recovers, quiesces and checks
// that every gid still reads the outcome its branches reached. A violation fails the test with
// its name, the seed and the tail of the event trace. The invariants, by name:
//   commit_before_durable_decision   a commit/precommit/commit_one_phase is sent only once a
//                                    commit decision record for its gid is synced
//   abort_after_commit_decision      no abort for a gid whose commit decision is synced
//   decision_announced_before_durable  no answer (client or in-doubt query) says
//                                    "decision":"commit" before that record is synced
//   commit_reached_aborted_branch, commit_of_unprepared_branch, abort_reached_committed_branch,
//   one_phase_commit_of_prepared_branch, prepare_of_committed_branch,
//   message_to_branch_never_enlisted                                        (at the agent)
//   mixed_outcome, branch_left_in_doubt      atomicity once quiescent
//   told_committed_but_not_committed, told_aborted_but_committed   answers vs branches
//   decision_changed, answers_disagree, heuristic_outcome          answers vs each other and
//                                    the log (a one-phase branch answering abort is legal)
//   gid_reused, machine_not_finished, log_record_not_ended, not_quiescent, final_answer_wrong,
//   answer_to_unknown_waiter, log_lost_synced_write
//
//   TPC_SIM_SEEDS=N    run seeds 1..N (default 2000)
//   TPC_SIM_SEED=S     run seed S alone and print every event as it happens (replay)
//   TPC_SIM_STEPS=K    faulty steps per seed (default 600)
//   TPC_SIM_THREADS=T  seeds run on T threads (default 2); each seed is single-threaded
//   TPC_SIM_IGNORE=a,b  count these invariants' violations instead of failing (to look past
//                       a known bug at what it leads to)
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/rng.h"
#include "coordinator/codec.h"
#include "coordinator/coordinator_machine.h"
#include "wal/decision_log.h"

using namespace tpc;
using namespace tpc::coord;

namespace {

constexpr size_t kSeedsDefault = 2000;
constexpr size_t kStepsDefault = 600;      // faulty steps per seed, then quiescence
constexpr size_t kTraceKept = 400;         // events kept for a failure report
constexpr size_t kTraceShown = 150;        // of which printed
constexpr int kQuiesceRoundsMax = 20'000;  // rounds of "deliver everything, advance time"
constexpr int64_t kStartMs = 1'000'000;
constexpr size_t kOpenPerClientMax = 6;  // transactions the clients keep open at once

// --- randomness --------------------------------------------------------------------------

// What a seed's world looks like and how hostile it is ("swarm testing": every seed draws
// its own mix, so some seeds hammer one fault and others never see it).
struct Knobs {
  size_t participants = 3;
  double drop = 0;              // a message or its answer is lost, or arrives too late
  double duplicate = 0;         // a request lands twice
  int64_t latency_max_ms = 10;  // one way
  int64_t http_timeout_max_ms = 200;
  enum class Disk { fast, normal, slow } disk = Disk::normal;
  double participant_crash = 0;  // per step
  double participant_down = 0;   // per step: unreachable for a while
  double coordinator_crash = 0;  // per step
  double orphan_lands = 0;       // a request sent before a coordinator crash still lands
  bool clock_steps = false;      // the wall clock the service reads may step back or forward
  int64_t in_doubt_after_ms = 0;
  double vote_no = 0.1, vote_read_only = 0.1, one_phase_abort = 0.15;
  MachineOptions machine;
};

Knobs draw_knobs(Rng& rng) {
  Knobs k;
  k.participants = static_cast<size_t>(rng.between(2, 4));
  const double drops[] = {0, 0.02, 0.1, 0.3};
  k.drop = drops[rng.below(4)];
  k.duplicate = rng.chance(0.5) ? 0 : 0.05;
  k.latency_max_ms = rng.pick(std::vector<int64_t>{0, 5, 30, 200});
  k.http_timeout_max_ms = rng.between(20, 400);
  k.disk = static_cast<Knobs::Disk>(rng.below(3));
  const double crashes[] = {0, 0.002, 0.01};
  k.participant_crash = crashes[rng.below(3)];
  k.participant_down = crashes[rng.below(3)];
  k.coordinator_crash = crashes[rng.below(3)];
  k.orphan_lands = rng.chance(0.5) ? 0 : 0.5;
  k.clock_steps = rng.chance(0.25);
  k.in_doubt_after_ms = rng.pick(std::vector<int64_t>{0, 50, 300, 2000});
  k.vote_no = rng.chance(0.3) ? 0 : 0.1;
  k.vote_read_only = rng.chance(0.3) ? 0 : 0.15;
  k.one_phase_abort = rng.chance(0.3) ? 0 : 0.2;
  MachineOptions& o = k.machine;
  o.coordinator_id = "c1";
  o.txn_timeout_default_ms = 2'000;
  o.txn_timeout_max_ms = 10'000;
  o.prepare_timeout_ms = rng.between(100, 1'000);
  o.commit_wait_ms = rng.between(100, 2'000);
  o.retry_min_ms = 10;
  o.retry_max_ms = 200;
  o.finished_kept_max = rng.chance(0.3) ? static_cast<size_t>(rng.between(1, 8)) : 100'000;
  if (rng.chance(0.2)) {  // tight limits: refusals must not break anything either
    o.open_txns_max = static_cast<size_t>(rng.between(2, 8));
    o.waiters_per_txn_max = static_cast<size_t>(rng.between(1, 2));
    o.branches_per_txn_max = static_cast<size_t>(rng.between(1, 3));
  }
  return k;
}

// What the seeds exercised, summed for the test's message (a simulator that never reaches
// the interesting states proves nothing).
struct Stats {
  uint64_t steps = 0, txns = 0, told_committed = 0, told_aborted = 0, committed_2pc = 0,
           committed_3pc = 0, one_phase_committed = 0, one_phase_aborted = 0,
           coordinator_crashes = 0, recovered_records = 0, participant_crashes = 0,
           resolved_in_doubt = 0, messages = 0, failed_replies = 0, ignored = 0;

  void add(const Stats& o) {
    uint64_t* a = &steps;
    const uint64_t* b = &o.steps;
    for (size_t i = 0; i < sizeof(Stats) / sizeof(uint64_t); ++i) a[i] += b[i];
  }
  std::string text() const {
    return "steps=" + std::to_string(steps) + " txns=" + std::to_string(txns) +
           " told_committed=" + std::to_string(told_committed) +
           " told_aborted=" + std::to_string(told_aborted) +
           " committed_2pc=" + std::to_string(committed_2pc) +
           " committed_3pc=" + std::to_string(committed_3pc) +
           " one_phase_committed=" + std::to_string(one_phase_committed) +
           " one_phase_aborted=" + std::to_string(one_phase_aborted) +
           " coordinator_crashes=" + std::to_string(coordinator_crashes) +
           " recovered_records=" + std::to_string(recovered_records) +
           " participant_crashes=" + std::to_string(participant_crashes) +
           " resolved_in_doubt=" + std::to_string(resolved_in_doubt) +
           " messages=" + std::to_string(messages) +
           " failed_replies=" + std::to_string(failed_replies) +
           " ignored_violations=" + std::to_string(ignored);
  }
};

// --- the fake participant ----------------------------------------------------------------

enum class PState : uint8_t { active, prepared, precommitted, committed, aborted, read_only };

const char* pstate_name(PState s) {
  switch (s) {
    case PState::active:
      return "active";
    case PState::prepared:
      return "prepared";
    case PState::precommitted:
      return "precommitted";
    case PState::committed:
      return "committed";
    case PState::aborted:
      return "aborted";
    case PState::read_only:
      return "read_only";
  }
  return "?";
}

struct PBranch {
  PState state = PState::active;
  bool was_prepared = false;  // voted yes at some point
  int64_t prepared_ms = 0;
  // The agent still knows this gid. A restarted agent has forgotten its tombstones and rolled
  // back branches: PostgreSQL keeps no trace of them, so they read as never seen.
  bool remembered = true;
};

struct Participant {
  std::string name;
  std::string url;
  std::map<std::string, PBranch> branches;  // by gid; absent = never seen
  int64_t down_until_ms = 0;
  bool down(int64_t now_ms) const { return down_until_ms > now_ms; }
};

// Prepared (or pre-committed): the branch waits for the coordinator's outcome.
bool in_doubt(const PBranch& b) {
  return b.state == PState::prepared || b.state == PState::precommitted;
}

// --- what the world remembers about a gid -------------------------------------------------

// What an answer told its reader about the outcome.
enum class Said : uint8_t { nothing, committed, commit_promised, aborted, heuristic };

struct GidInfo {
  Protocol protocol = Protocol::two_phase;
  bool oneshot = false;  // POST /v1/transactions/run: statements travel with prepare
  size_t planned = 0;    // branches the client means to enlist before it commits
  bool abandon = false;  // the client never commits nor aborts: it times out
  size_t enlist_tries = 0;
  std::vector<size_t> enlisted;  // participants that accepted a branch
  bool one_phase_branch_aborted = false;
  std::string said_commit;  // the first answer that said commit (empty: none)
  std::string said_abort;   // the first answer that said aborted (empty: none)
};

struct Flight {
  int64_t deliver_at_ms = 0;
  bool is_reply = false;  // false: a request to a participant; true: its answer coming back
  bool orphan = false;    // the answer goes nowhere (a duplicate, a late or a dead sender's)
  Message msg;
  BranchReply reply;
};

struct DiskWrite {
  std::vector<wal::TxnRecord> records;
  bool sync = false;
  std::vector<std::string> notify;
};

// Machine log lines go into the trace.
class TraceSink final : public LogSink {
 public:
  explicit TraceSink(std::function<void(std::string_view)> fn) : fn_(std::move(fn)) {}
  void write(LogLevel, std::string_view line) override { fn_(line); }
  bool wants_timestamps() const override { return false; }

 private:
  std::function<void(std::string_view)> fn_;
};

const char* decision_text(Decision d) {
  switch (d) {
    case Decision::none:
      return "none";
    case Decision::commit:
      return "commit";
    case Decision::abort:
      return "abort";
  }
  return "?";
}

const char* reply_text(ReplyKind r) {
  switch (r) {
    case ReplyKind::vote_yes:
      return "vote_yes";
    case ReplyKind::vote_no:
      return "vote_no";
    case ReplyKind::vote_read_only:
      return "vote_read_only";
    case ReplyKind::precommitted:
      return "precommitted";
    case ReplyKind::committed:
      return "committed";
    case ReplyKind::aborted:
      return "aborted";
    case ReplyKind::failed:
      return "failed";
  }
  return "?";
}

std::string describe(const ClientReply& r) {
  std::string s = std::to_string(http_status_of(r));
  if (!r.view.gid.empty()) {
    s += " state=" + std::string(state_name(r.view.state));
    s += " decision=" + std::string(decision_text(r.view.decision));
  }
  if (r.view.one_phase) s += " one_phase";
  if (r.view.presumed) s += " presumed";
  if (r.view.forgotten) s += " forgotten";
  if (!r.view.reason.empty()) s += " reason=" + r.view.reason;
  if (!r.error.ok()) s += " error=\"" + r.error.message() + "\"";
  return s;
}

Said classify(const ClientReply& r) {
  if (r.view.gid.empty() || http_status_of(r) == 404 || http_status_of(r) >= 500)
    return Said::nothing;
  const TxnView& v = r.view;
  if (v.forgotten) return Said::nothing;
  switch (v.state) {
    case TxnState::committed:
      return Said::committed;
    case TxnState::aborted:
      return Said::aborted;
    case TxnState::heuristic_mixed:
      return Said::heuristic;
    default:
      break;
  }
  if (v.decision == Decision::abort) return Said::aborted;  // aborting: settled
  // A one-phase commit in progress promises nothing: its branch may still answer aborted.
  if (v.decision == Decision::commit && !v.one_phase) return Said::commit_promised;
  return Said::nothing;
}

bool is_commit_decision(wal::Decision d) {
  return d == wal::Decision::commit || d == wal::Decision::precommit ||
         d == wal::Decision::one_phase || d == wal::Decision::committed_read_only;
}

// --- the world ---------------------------------------------------------------------------

class World {
 public:
  World(uint64_t seed, bool verbose, std::set<std::string> ignored = {})
      : seed_(seed),
        verbose_(verbose),
        ignored_(std::move(ignored)),
        rng_(seed),
        knobs_(draw_knobs(rng_)),
        sink_([this](std::string_view line) { trace("  machine: " + std::string(line)); }),
        logger_(&sink_, LogFormat::text, verbose ? LogLevel::info : LogLevel::error) {
    for (size_t i = 0; i < knobs_.participants; ++i) {
      Participant p;
      p.name = "p" + std::to_string(i);
      p.url = "http://" + p.name + ".test:7401";
      participants_.push_back(std::move(p));
    }
  }

  // Runs the seed; false on a violation (see report()).
  bool run(size_t steps) {
    trace(knobs_text());
    start_coordinator();
    for (step_ = 0; step_ < steps && !failed_; ++step_) {
      ++stats_.steps;
      step();
      if (knobs_.disk == Knobs::Disk::fast) flush_disk();
    }
    if (!failed_) quiesce("end of faults");
    if (!failed_) check_quiescent_world("end of faults");
    if (!failed_) {
      trace("final coordinator restart");
      crash_coordinator();
      quiesce("after the final restart");
    }
    if (!failed_) check_quiescent_world("after the final restart");
    if (!failed_) check_final_answers();
    return !failed_;
  }

  std::string report(size_t shown = kTraceShown) const {
    std::string s = "coordinator simulation: seed " + std::to_string(seed_) + " violated " +
                    violation_ + "\n  " + detail_ +
                    "\n  replay: TPC_SIM_SEED=" + std::to_string(seed_) +
                    " coordinator_simulation_test\n  last events:\n";
    s += trace_tail(shown);
    return s;
  }

  std::string trace_tail(size_t shown) const {
    std::string s;
    size_t from = trace_.size() > shown ? trace_.size() - shown : 0;
    for (size_t i = from; i < trace_.size(); ++i) s += "    " + trace_[i] + "\n";
    return s;
  }

  uint64_t seed() const { return seed_; }
  const Stats& stats() const { return stats_; }
  const std::string& violation() const { return violation_; }

 private:
  // --- bookkeeping -------------------------------------------------------------------------

  void trace(std::string line) {
    std::string entry = "[" + std::to_string(step_) + " t=" + std::to_string(now_ - kStartMs) +
                        "] " + std::move(line);
    if (verbose_) std::fprintf(stderr, "%s\n", entry.c_str());
    trace_.push_back(std::move(entry));
    if (trace_.size() > kTraceKept) trace_.pop_front();
  }

  void fail(const std::string& name, std::string detail) {
    if (failed_) return;
    if (ignored_.count(name)) {
      ++stats_.ignored;
      trace("ignored violation " + name + ": " + detail);
      return;
    }
    failed_ = true;
    violation_ = name;
    detail_ = std::move(detail);
    trace("VIOLATION " + violation_ + ": " + detail_);
  }

  std::string knobs_text() const {
    const char* disk[] = {"fast", "normal", "slow"};
    return "seed " + std::to_string(seed_) +
           ": participants=" + std::to_string(knobs_.participants) +
           " drop=" + std::to_string(knobs_.drop) +
           " duplicate=" + std::to_string(knobs_.duplicate) +
           " latency_max_ms=" + std::to_string(knobs_.latency_max_ms) +
           " disk=" + disk[static_cast<int>(knobs_.disk)] +
           " participant_crash=" + std::to_string(knobs_.participant_crash) +
           " participant_down=" + std::to_string(knobs_.participant_down) +
           " coordinator_crash=" + std::to_string(knobs_.coordinator_crash) +
           " in_doubt_after_ms=" + std::to_string(knobs_.in_doubt_after_ms) +
           " prepare_timeout_ms=" + std::to_string(knobs_.machine.prepare_timeout_ms) +
           " finished_kept_max=" + std::to_string(knobs_.machine.finished_kept_max);
  }

  bool faults() const { return !quiescing_; }
  int64_t latency() { return rng_.between(0, knobs_.latency_max_ms); }

  Participant* participant(const std::string& name) {
    for (auto& p : participants_)
      if (p.name == name) return &p;
    return nullptr;
  }

  // --- one step ----------------------------------------------------------------------------

  void step() {
    uint64_t r = rng_.below(1000);
    if (r < 330) return deliver_one();
    if (r < 480) {
      if (knobs_.clock_steps && rng_.chance(0.02)) return step_clock();
      return advance_time();
    }
    if (r < 600) {
      if (knobs_.disk != Knobs::Disk::slow || rng_.chance(0.2)) complete_disk_write();
      return;
    }
    if (r < 900) return client_action();
    if (r < 960) return resolve_in_doubt(false);
    participant_fault();
    if (rng_.chance(knobs_.coordinator_crash * 25)) crash_coordinator();
  }

  void advance_time() {
    int64_t to = now_ + rng_.between(1, 30);
    if (rng_.chance(0.1)) {
      auto d = machine_->next_deadline_ms();
      if (d && *d > to) to = *d;
    }
    now_ = to;
    machine_->tick(now_);
    drain();
  }

  // CoordinatorService passes wall_ms() (system_clock): NTP may step it either way.
  void step_clock() {
    int64_t by = rng_.chance(0.5) ? -rng_.between(1, 1'000) : rng_.between(1, 5'000);
    now_ += by;
    trace("wall clock steps by " + std::to_string(by) + " ms");
    machine_->tick(now_);
    drain();
  }

  // --- the machine's effects ---------------------------------------------------------------

  // Carries out the machine's Ready like CoordinatorService::run: persist, send, reply.
  void drain() {
    while (machine_->has_ready() && !failed_) {
      Ready ready = machine_->take_ready();
      if (!ready.persist.empty()) queue_disk_write(std::move(ready.persist));
      for (const Message& m : ready.messages) send(m);
      for (ClientReply& r : ready.replies) client_reply(std::move(r));
    }
  }

  void queue_disk_write(std::vector<Persist> items) {
    DiskWrite w;
    for (Persist& p : items) {
      w.sync = w.sync || p.sync;
      if (p.notify) w.notify.push_back(p.record.gid);
      trace("persist " + p.record.gid + " decision=" +
            std::string(wal::decision_name(p.record.decision)) + (p.record.ended ? " ended" : "") +
            (p.sync ? " sync" : "") + (p.notify ? " notify" : ""));
      w.records.push_back(std::move(p.record));
    }
    disk_.push_back(std::move(w));
  }

  void complete_disk_write() {
    if (disk_.empty()) return;
    DiskWrite w = std::move(disk_.front());
    disk_.pop_front();
    apply_disk_write(w);
    for (const std::string& gid : w.notify) {
      trace("on_persisted " + gid);
      machine_->on_persisted(gid, now_);
      drain();
    }
  }

  void flush_disk() {
    while (!disk_.empty() && !failed_) complete_disk_write();
  }

  // Writes to the MemoryLog and keeps a shadow of what is durable.
  void apply_disk_write(const DiskWrite& w) {
    std::vector<wal::LogWrite> writes;
    for (const wal::TxnRecord& r : w.records) {
      writes.push_back(wal::LogWrite::put(r));
      unsynced_.push_back(r);
    }
    Status done = internal_error("write callback not called");
    wal_.write(std::move(writes), w.sync, [&done](Status st) { done = std::move(st); });
    if (!done.ok()) fail("log_write_failed", done.to_string());
    if (w.sync) shadow_sync();
  }

  // A synced write makes itself and every earlier write durable.
  void shadow_sync() {
    for (wal::TxnRecord& r : unsynced_) {
      if (is_commit_decision(r.decision)) commit_durable_.insert(r.gid);
      durable_[r.gid] = std::move(r);
    }
    unsynced_.clear();
  }

  void send(const Message& m) {
    bool commits = m.kind == MsgKind::commit || m.kind == MsgKind::precommit ||
                   m.kind == MsgKind::commit_one_phase;
    if (commits && !commit_durable_.count(m.gid))
      fail("commit_before_durable_decision",
           m.gid + ": " + std::string(msg_name(m.kind)) + " to " + m.participant +
               " was sent before a commit decision record for it was synced");
    if (m.kind == MsgKind::abort && commit_durable_.count(m.gid))
      fail("abort_after_commit_decision",
           m.gid + ": abort to " + m.participant + " although its commit decision is durable");
    Participant* to = participant(m.participant);
    auto g = gids_.find(m.gid);
    bool enlisted =
        to && g != gids_.end() &&
        std::find(g->second.enlisted.begin(), g->second.enlisted.end(),
                  static_cast<size_t>(to - participants_.data())) != g->second.enlisted.end();
    if (!enlisted)
      fail("message_to_branch_never_enlisted",
           m.gid + ": " + std::string(msg_name(m.kind)) + " to " + m.participant);
    ++stats_.messages;
    trace("send " + m.gid + " " + std::string(msg_name(m.kind)) + " -> " + m.participant +
          " attempt=" + std::to_string(m.attempt));
    Flight f;
    f.deliver_at_ms = now_ + latency();
    f.msg = m;
    flights_.emplace(next_flight_++, std::move(f));
  }

  // --- the network -------------------------------------------------------------------------

  void deliver_one() {
    std::vector<uint64_t> due;
    for (auto& [id, f] : flights_)
      if (f.deliver_at_ms <= now_) due.push_back(id);
    if (due.empty()) return;
    uint64_t id = rng_.pick(due);
    Flight f = std::move(flights_.at(id));
    flights_.erase(id);
    if (f.is_reply)
      deliver_reply(f);
    else
      deliver_request(f);
  }

  void deliver_request(Flight& f) {
    Participant& p = *participant(f.msg.participant);
    const std::string what = f.msg.gid + " " + std::string(msg_name(f.msg.kind)) + " -> " + p.name +
                             (f.orphan ? " (orphan)" : "");
    if (p.down(now_)) {
      trace("lost " + what + ": participant down");
      return answer_failed(f, "participant unreachable");
    }
    if (faults() && rng_.chance(knobs_.drop)) {
      switch (rng_.below(3)) {
        case 0:
          trace("lost " + what);
          return answer_failed(f, "request lost");
        case 1: {
          BranchReply r = handle(p, f.msg);
          trace("delivered " + what + ", answer " + reply_text(r.reply) + " lost");
          return answer_failed(f, "answer lost");
        }
        default: {
          // Too slow: the sender times out, and the request lands later.
          Flight late = f;
          late.orphan = true;
          late.deliver_at_ms = now_ + rng_.between(1, 2 * knobs_.http_timeout_max_ms);
          flights_.emplace(next_flight_++, std::move(late));
          trace("delayed " + what + " past its timeout");
          return answer_failed(f, "timeout");
        }
      }
    }
    BranchReply r = handle(p, f.msg);
    trace("delivered " + what + ": " + reply_text(r.reply));
    if (faults() && rng_.chance(knobs_.duplicate)) {
      Flight dup = f;
      dup.orphan = true;
      dup.deliver_at_ms = now_ + rng_.between(0, 3 * knobs_.latency_max_ms + 10);
      flights_.emplace(next_flight_++, std::move(dup));
      trace("duplicated " + what);
    }
    if (f.orphan) return;
    Flight back;
    back.is_reply = true;
    back.deliver_at_ms = now_ + latency();
    back.msg = std::move(f.msg);
    back.reply = std::move(r);
    flights_.emplace(next_flight_++, std::move(back));
  }

  void answer_failed(Flight& f, const std::string& why) {
    if (f.orphan) return;
    Flight back;
    back.is_reply = true;
    back.deliver_at_ms = now_ + rng_.between(1, knobs_.http_timeout_max_ms);
    back.reply = BranchReply{f.msg.gid, f.msg.participant, f.msg.kind, ReplyKind::failed, why};
    ++stats_.failed_replies;
    back.msg = std::move(f.msg);
    flights_.emplace(next_flight_++, std::move(back));
  }

  void deliver_reply(Flight& f) {
    if (f.orphan) return;
    trace("reply " + f.reply.gid + " " + std::string(msg_name(f.reply.kind)) + " <- " +
          f.reply.participant + ": " + reply_text(f.reply.reply) +
          (f.reply.reason.empty() ? "" : " (" + f.reply.reason + ")"));
    machine_->on_reply(f.reply, now_);
    drain();
  }

  // --- the fake participant ----------------------------------------------------------------

  // What an agent in front of PostgreSQL answers; also checks that the coordinator never
  // asks for something that would break atomicity.
  BranchReply handle(Participant& p, const Message& m) {
    BranchReply r{m.gid, p.name, m.kind, ReplyKind::failed, ""};
    auto it = p.branches.find(m.gid);
    PBranch* b = it == p.branches.end() ? nullptr : &it->second;
    auto tombstone = [&]() -> PBranch& {
      PBranch& t = p.branches[m.gid];
      t.state = PState::aborted;
      return t;
    };
    const std::string where = m.gid + " at " + p.name;
    if ((m.kind == MsgKind::exec_prepare || m.kind == MsgKind::exec_commit) &&
        (!b || !b->remembered)) {
      // A one-shot branch: the agent runs the statements it carries, then prepares (or
      // commits in one phase). A gid it remembers (a tombstone) refuses them.
      b = &p.branches[m.gid];
      *b = PBranch{};
    }
    switch (m.kind) {
      case MsgKind::prepare:
      case MsgKind::exec_prepare:
        if (!b || b->state == PState::aborted) {
          tombstone();
          r.reply = ReplyKind::vote_no;
          r.reason = "branch unknown or rolled back";
        } else if (b->state == PState::active) {
          double x = static_cast<double>(rng_.below(1'000'000)) / 1e6;
          if (x < knobs_.vote_no) {
            b->state = PState::aborted;
            r.reply = ReplyKind::vote_no;
            r.reason = "deferred constraint";
          } else if (x < knobs_.vote_no + knobs_.vote_read_only) {
            b->state = PState::read_only;
            r.reply = ReplyKind::vote_read_only;
          } else {
            b->state = PState::prepared;
            b->was_prepared = true;
            b->prepared_ms = now_;
            r.reply = ReplyKind::vote_yes;
          }
        } else if (b->state == PState::read_only) {
          r.reply = ReplyKind::vote_read_only;
        } else if (b->state == PState::prepared || b->state == PState::precommitted ||
                   (b->state == PState::committed && b->was_prepared)) {
          r.reply = ReplyKind::vote_yes;  // a late copy of the prepare it already voted on
        } else {
          fail("prepare_of_committed_branch", "prepare reached committed branch " + where);
        }
        break;

      case MsgKind::precommit:
      case MsgKind::commit: {
        bool pre = m.kind == MsgKind::precommit;
        if (b && (b->state == PState::prepared || b->state == PState::precommitted)) {
          b->state = pre ? PState::precommitted : PState::committed;
          r.reply = pre ? ReplyKind::precommitted : ReplyKind::committed;
        } else if (b && (b->state == PState::committed || b->state == PState::read_only)) {
          r.reply = ReplyKind::committed;
        } else if (b && b->state == PState::aborted && b->was_prepared) {
          fail("commit_reached_aborted_branch", std::string(msg_name(m.kind)) + " reached " +
                                                    where +
                                                    ", which voted yes and was then rolled back");
          r.reply = ReplyKind::aborted;
        } else {
          fail("commit_of_unprepared_branch",
               std::string(msg_name(m.kind)) + " reached " + where + " in state " +
                   (b ? pstate_name(b->state) : "unknown") + ": it never voted yes");
          r.reply = ReplyKind::aborted;
        }
        break;
      }

      case MsgKind::commit_one_phase:
      case MsgKind::exec_commit:
        if (b && b->state == PState::active) {
          bool abort = rng_.chance(knobs_.one_phase_abort);
          b->state = abort ? PState::aborted : PState::committed;
          r.reply = abort ? ReplyKind::aborted : ReplyKind::committed;
          if (abort) r.reason = "23505 unique_violation at COMMIT";
        } else if (b && b->state == PState::committed) {
          r.reply = ReplyKind::committed;
        } else if (!b || b->state == PState::aborted) {
          tombstone();
          r.reply = ReplyKind::aborted;  // rolled back (lost in a crash, or an earlier answer)
        } else {
          fail("one_phase_commit_of_prepared_branch",
               "commit_one_phase reached " + where + " in state " + pstate_name(b->state));
        }
        if (r.reply == ReplyKind::aborted) gids_[m.gid].one_phase_branch_aborted = true;
        break;

      case MsgKind::abort:
        if (b && b->state == PState::committed) {
          fail("abort_reached_committed_branch", "abort reached committed branch " + where);
          r.reply = ReplyKind::committed;
        } else if (b && b->state == PState::read_only) {
          r.reply = ReplyKind::aborted;  // nothing to roll back
        } else {
          tombstone();
          r.reply = ReplyKind::aborted;
        }
        break;
    }
    return r;
  }

  void participant_fault() {
    Participant& p = participants_[rng_.below(participants_.size())];
    if (rng_.chance(knobs_.participant_crash * 25)) {
      // PostgreSQL rolls back open sessions; prepared transactions survive; the agent forgets
      // what it kept in memory (a pre-commit) and finds its prepared branches again.
      size_t lost = 0;
      for (auto& [gid, b] : p.branches) {
        if (b.state == PState::active) {
          b.state = PState::aborted;
          ++lost;
        } else if (b.state == PState::precommitted) {
          b.state = PState::prepared;
        }
        if (b.state == PState::aborted) b.remembered = false;
      }
      // Its connections reset: what the coordinator had in flight to it fails, and copies
      // still on the wire die with the old process.
      for (auto it = flights_.begin(); it != flights_.end();) {
        Flight& f = it->second;
        if (f.is_reply || f.msg.participant != p.name) {
          ++it;
          continue;
        }
        if (!f.orphan) answer_failed(f, "connection reset");
        it = flights_.erase(it);
      }
      ++stats_.participant_crashes;
      trace("participant " + p.name + " crashed, " + std::to_string(lost) +
            " active branches lost");
    }
    if (rng_.chance(knobs_.participant_down * 25)) {
      p.down_until_ms = now_ + rng_.between(50, 1'000);
      trace("participant " + p.name +
            " unreachable until t=" + std::to_string(p.down_until_ms - kStartMs));
    }
  }

  // The agent's in-doubt resolver: a prepared branch asks the coordinator (GET) and acts on
  // the answer exactly as participant/codec.cc decode_outcome_answer reads it.
  void resolve_in_doubt(bool all) {
    for (size_t i = 0; i < participants_.size() && !failed_; ++i) {
      Participant& p = participants_[i];
      if (!all && rng_.below(participants_.size()) != 0) continue;
      if (p.down(now_)) continue;
      std::vector<std::string> asking;
      for (auto& [gid, b] : p.branches)
        if (in_doubt(b) && now_ - b.prepared_ms >= knobs_.in_doubt_after_ms) asking.push_back(gid);
      if (asking.empty()) continue;
      if (!all) asking = {rng_.pick(asking)};
      for (const std::string& gid : asking) {
        ClientReply r = get(gid);
        note_answer(gid, r, "in-doubt query of " + p.name);
        PBranch& b = p.branches[gid];
        if (http_status_of(r) != 200 || r.view.forgotten) continue;
        if (r.view.decision == Decision::commit) {
          trace("participant " + p.name + " commits in-doubt " + gid + " (" + describe(r) + ")");
          b.state = PState::committed;
          ++stats_.resolved_in_doubt;
        } else if (r.view.decision == Decision::abort) {
          ++stats_.resolved_in_doubt;
          trace("participant " + p.name + " rolls back in-doubt " + gid + " (" + describe(r) + ")");
          b.state = PState::aborted;
        }
      }
    }
  }

  // --- clients -----------------------------------------------------------------------------

  // A client works on one of its open transactions: enlists the branches it planned, then
  // commits (or aborts, or walks away); or repeats a request, or reads a gid of any epoch.
  void client_action() {
    uint64_t r = rng_.below(100);
    if (open_.empty() || (r < 15 && open_.size() < kOpenPerClientMax)) return begin_txn();
    if (r < 85) {
      const std::string gid = rng_.pick(open_);
      GidInfo& g = gids_[gid];
      if (g.enlisted.size() < g.planned && g.enlist_tries < 2 * g.planned)
        return enlist_branch(gid);
      if (g.abandon) return;
      return request(!rng_.chance(0.12), gid);
    }
    if (r < 89) return run_oneshot();
    if (gid_list_.empty()) return;
    const std::string gid = rng_.pick(gid_list_);  // repeated or late, any epoch
    if (r < 93) return request(true, gid);
    if (r < 96) return request(false, gid);
    ClientReply g = get(gid);
    trace("client GET " + gid + ": " + describe(g));
    note_answer(gid, g, "client GET");
  }

  void begin_txn() {
    Protocol proto = rng_.chance(0.5) ? Protocol::two_phase : Protocol::three_phase;
    std::optional<int64_t> timeout;
    if (rng_.chance(0.3)) timeout = rng_.between(50, 3'000);
    auto v = machine_->begin(proto, timeout, now_);
    drain();
    if (!v.ok()) {
      trace("client begin refused: " + v.status().to_string());
      return;
    }
    const std::string gid = v->gid;
    trace("client begin " + gid + " " + std::string(protocol_name(proto)));
    if (gids_.count(gid)) {
      fail("gid_reused", gid + " was issued before (epoch " + std::to_string(epoch_) + ")");
      return;
    }
    GidInfo& g = gids_[gid];
    g.protocol = proto;
    g.planned = std::vector<size_t>{0, 1, 1, 2, 2, 2, 3, 3, 3, 3}[rng_.below(10)];
    g.abandon = rng_.chance(0.05);
    ++stats_.txns;
    gid_list_.push_back(gid);
    open_.push_back(gid);
  }

  // POST /v1/transactions/run: begin, enlist and commit at once; the coordinator carries each
  // branch's statements with its prepare (or, for one branch, with its one-phase commit).
  void run_oneshot() {
    std::vector<size_t> chosen;
    size_t n = static_cast<size_t>(rng_.between(1, static_cast<int64_t>(participants_.size())));
    for (size_t i = 0; i < participants_.size(); ++i) chosen.push_back(i);
    while (chosen.size() > n) chosen.erase(chosen.begin() + rng_.below(chosen.size()));
    std::vector<Peer> branches;
    for (size_t i : chosen) branches.push_back(Peer{participants_[i].name, participants_[i].url});
    Protocol proto = rng_.chance(0.5) ? Protocol::two_phase : Protocol::three_phase;
    CommitOptions o;
    o.wait_decision_only = rng_.chance(0.25);
    uint64_t waiter = next_waiter_++;
    // The gid is only known once run() returns, but the answer may already be in its Ready.
    auto gid = machine_->run(proto, branches, waiter, o, now_);
    if (!gid.ok()) {
      trace("client run refused: " + gid.status().to_string());
      drain();
      return;
    }
    trace("client run " + *gid + " " + std::string(protocol_name(proto)) + " on " +
          std::to_string(chosen.size()) + " branches waiter=" + std::to_string(waiter));
    if (gids_.count(*gid)) return fail("gid_reused", *gid + " was issued before");
    GidInfo& g = gids_[*gid];
    g.protocol = proto;
    g.oneshot = true;
    g.planned = chosen.size();
    g.enlisted = chosen;
    ++stats_.txns;
    gid_list_.push_back(*gid);
    pending_[waiter] = *gid;
    drain();
  }

  // The agent enlists with the coordinator, then runs the first statement.
  void enlist_branch(const std::string& gid) {
    GidInfo& g = gids_[gid];
    ++g.enlist_tries;
    size_t i = rng_.below(participants_.size());
    if (std::find(g.enlisted.begin(), g.enlisted.end(), i) != g.enlisted.end()) return;
    Participant& p = participants_[i];
    if (p.down(now_)) return;
    ClientReply r = machine_->enlist(gid, p.name, p.url, now_);
    drain();
    trace("enlist " + gid + " " + p.name + ": " + std::to_string(http_status_of(r)));
    if (http_status_of(r) != 201) {
      if (http_status_of(r) == 409)
        open_.erase(std::remove(open_.begin(), open_.end(), gid), open_.end());
      return;
    }
    g.enlisted.push_back(i);
    if (p.branches.count(gid)) {
      trace("  " + p.name + " refuses the statement: " + gid + " already " +
            pstate_name(p.branches[gid].state));
      return;
    }
    p.branches[gid] = PBranch{};
  }

  void request(bool commit, const std::string& gid) {
    open_.erase(std::remove(open_.begin(), open_.end(), gid), open_.end());
    uint64_t waiter = next_waiter_++;
    pending_[waiter] = gid;
    std::optional<ClientReply> immediate;
    if (commit) {
      CommitOptions o;
      o.wait_decision_only = rng_.chance(0.25);
      trace("client commit " + gid + (o.wait_decision_only ? " (decision only)" : "") +
            " waiter=" + std::to_string(waiter));
      immediate = machine_->commit(gid, waiter, o, now_);
    } else {
      trace("client abort " + gid + " waiter=" + std::to_string(waiter));
      immediate = machine_->abort(gid, waiter, now_);
    }
    drain();
    if (immediate && !failed_) {
      immediate->waiter = waiter;
      client_reply(std::move(*immediate));
    }
  }

  void client_reply(ClientReply r) {
    if (r.needs_log) r = from_log(r);
    auto it = pending_.find(r.waiter);
    if (it == pending_.end()) {
      fail("answer_to_unknown_waiter", "waiter " + std::to_string(r.waiter) +
                                           " was answered twice or never asked: " + describe(r));
      return;
    }
    const std::string gid = it->second;
    pending_.erase(it);
    const char* kind = r.kind == RequestKind::commit ? "commit" : "abort";
    trace("client " + std::string(kind) + " " + gid + " answered " + describe(r));
    note_answer(gid, r, std::string("client ") + kind);
  }

  // CoordinatorService::from_log.
  ClientReply from_log(const ClientReply& r) {
    auto rec = wal_.get(r.view.gid);
    if (!rec.ok()) {
      fail("log_read_failed", rec.status().to_string());
      return r;
    }
    RequestKind kind = r.kind == RequestKind::resolve ? RequestKind::get : r.kind;
    ClientReply out = rec->has_value() ? CoordinatorMachine::reply_from_record(**rec, kind)
                                       : CoordinatorMachine::reply_without_record(r.view.gid, kind,
                                                                                  r.view.forgotten);
    out.waiter = r.waiter;
    out.kind = r.kind;
    return out;
  }

  // GET /v1/transactions/{gid}, as CoordinatorService::transaction answers it.
  ClientReply get(const std::string& gid) {
    Lookup l = machine_->lookup(gid);
    ClientReply r;
    r.kind = RequestKind::get;
    switch (l.kind) {
      case LookupKind::live:
        r.view = std::move(l.view);
        break;
      case LookupKind::in_log:
        r.view.gid = gid;
        r.view.forgotten = l.forgotten_if_absent;
        return from_log(r);
      default:

        r.error = not_found("no transaction " + gid);
        break;
    }
    return r;
  }

  // Every answer about a gid, from a client request or an in-doubt query, must agree with
  // every other one and with what is durable.
  void note_answer(const std::string& gid, const ClientReply& r, const std::string& source) {
    auto git = gids_.find(gid);
    if (git == gids_.end()) return;
    GidInfo& g = git->second;
    const std::string said = source + " got " + describe(r) + " at step " + std::to_string(step_);
    if (r.view.decision == Decision::commit && !r.view.gid.empty() && !commit_durable_.count(gid))
      fail("decision_announced_before_durable",
           gid + ": " + said + ", but no commit decision record for it is synced yet (an " +
               "agent's in-doubt resolver commits on \"decision\":\"commit\"; a crash now " +
               "makes the gid presumed aborted)");
    switch (classify(r)) {
      case Said::nothing:
        break;
      case Said::heuristic:
        fail("heuristic_outcome", gid + ": " + said + " (the model allows no heuristics)");
        break;
      case Said::committed:
      case Said::commit_promised:
        if (!g.said_abort.empty())
          fail("answers_disagree", gid + ": " + said + ", but earlier " + g.said_abort);
        if (g.said_commit.empty()) g.said_commit = said;
        break;
      case Said::aborted:
        if (commit_durable_.count(gid) && !g.one_phase_branch_aborted)
          fail("decision_changed",
               gid + ": " + said + ", but its commit decision record is durable");
        if (!g.said_commit.empty())
          fail("answers_disagree", gid + ": " + said + ", but earlier " + g.said_commit);
        if (g.said_abort.empty()) g.said_abort = said;
        break;
    }
  }

  // --- the coordinator's life --------------------------------------------------------------

  // CoordinatorService::recover: the next epoch, synced; every record not ended.
  void start_coordinator() {
    auto e = wal_.get_meta("epoch");
    uint64_t previous = e.ok() && e->has_value() ? std::stoull(**e) : 0;
    epoch_ = std::max<uint64_t>(previous + 1, static_cast<uint64_t>(now_ / 1000));
    if (epoch_ <= previous) fail("epoch_not_new", std::to_string(epoch_));
    if (!wal_.put_meta("epoch", std::to_string(epoch_)).ok()) fail("log_meta_failed", "");
    shadow_sync();  // put_meta is synced
    std::vector<wal::TxnRecord> unfinished;
    Status st = wal_.for_each([&](wal::TxnRecord&& r) {
      if (!r.ended) unfinished.push_back(std::move(r));
    });
    if (!st.ok()) fail("log_replay_failed", st.to_string());
    trace("coordinator starts, epoch " + std::to_string(epoch_) + ", " +
          std::to_string(unfinished.size()) + " unfinished records");
    stats_.recovered_records += unfinished.size();
    machine_ = std::make_unique<CoordinatorMachine>(knobs_.machine, logger_);
    machine_->recover(epoch_, std::nullopt, std::move(unfinished), now_);
    drain();
  }

  void crash_coordinator() {
    // Some queued writes reached the disk before the crash; the rest never happened.
    size_t landed = rng_.below(disk_.size() + 1);
    trace("COORDINATOR CRASH (" + std::to_string(landed) + " of " + std::to_string(disk_.size()) +
          " queued log writes land)");
    ++stats_.coordinator_crashes;
    for (size_t i = 0; i < landed; ++i) apply_disk_write(disk_[i]);
    disk_.clear();
    wal_.crash();
    unsynced_.clear();
    std::map<std::string, wal::TxnRecord> on_disk;
    Status st = wal_.for_each([&](wal::TxnRecord&& r) { on_disk[r.gid] = std::move(r); });
    if (!st.ok() || on_disk != durable_)
      fail("log_lost_synced_write",
           "after MemoryLog::crash() the log does not hold exactly "
           "the synced writes");
    // Requests already on the wire may still land; answers have nowhere to go.
    for (auto it = flights_.begin(); it != flights_.end();) {
      if (!it->second.is_reply && faults() && rng_.chance(knobs_.orphan_lands)) {
        it->second.orphan = true;
        ++it;
      } else {
        it = flights_.erase(it);
      }
    }
    pending_.clear();  // clients see a reset connection
    machine_.reset();
    start_coordinator();
  }

  // --- the end -----------------------------------------------------------------------------

  bool quiet() const {
    if (!flights_.empty() || !disk_.empty() || !pending_.empty()) return false;
    if (machine_->open_txns() != 0 || machine_->recovering() != 0) return false;
    for (auto& p : participants_)
      for (auto& [gid, b] : p.branches)
        if (in_doubt(b)) return false;
    return true;
  }

  void quiesce(const std::string& phase) {
    quiescing_ = true;
    for (auto& p : participants_) p.down_until_ms = 0;
    for (int round = 0; round < kQuiesceRoundsMax && !failed_; ++round) {
      flush_disk();
      bool delivered = true;
      while (delivered && !failed_) {
        delivered = false;
        for (auto& [id, f] : flights_)
          if (f.deliver_at_ms <= now_) delivered = true;
        if (delivered) deliver_one();
      }
      resolve_in_doubt(true);
      if (failed_ || quiet()) return;
      int64_t next = now_ + 1'000;
      for (auto& [id, f] : flights_) next = std::min(next, f.deliver_at_ms);
      if (auto d = machine_->next_deadline_ms()) next = std::min(next, *d);
      now_ = std::max(next, now_ + 1);
      machine_->tick(now_);
      drain();
    }
    if (failed_) return;
    std::string left = "flights=" + std::to_string(flights_.size()) +
                       " disk=" + std::to_string(disk_.size()) +
                       " waiting_clients=" + std::to_string(pending_.size()) +
                       " open_txns=" + std::to_string(machine_->open_txns());
    for (auto& p : participants_)
      for (auto& [gid, b] : p.branches)
        if (in_doubt(b)) left += " in_doubt=" + gid + "@" + p.name;
    fail("not_quiescent",
         phase + ": still busy after " + std::to_string(kQuiesceRoundsMax) + " rounds: " + left);
  }

  // Atomicity, answers against outcomes, and a machine with nothing left to do.
  void check_quiescent_world(const std::string& phase) {
    if (machine_->open_txns() != 0 || machine_->recovering() != 0)
      return fail("machine_not_finished",
                  phase + ": open_txns=" + std::to_string(machine_->open_txns()) +
                      " recovering=" + std::to_string(machine_->recovering()));
    Status st = wal_.for_each([&](wal::TxnRecord&& r) {
      if (!r.ended) fail("log_record_not_ended", phase + ": " + r.gid + " is not ended");
    });
    if (!st.ok()) return fail("log_replay_failed", st.to_string());
    for (auto& [gid, g] : gids_) {
      std::string committed, aborted_after_yes, aborted_before_yes, waiting, states;
      for (size_t i : g.enlisted) {
        const Participant& p = participants_[i];
        auto it = p.branches.find(gid);
        PBranch b = it == p.branches.end() ? PBranch{PState::aborted} : it->second;
        states += " " + p.name + "=" + pstate_name(b.state);
        if (b.state == PState::committed) committed += " " + p.name;
        if (in_doubt(b)) waiting += " " + p.name;
        if (b.state == PState::aborted)
          (b.was_prepared ? aborted_after_yes : aborted_before_yes) += " " + p.name;
      }
      const std::string where =
          phase + ": " + gid + " (" + std::string(protocol_name(g.protocol)) + ")," + states;
      if (!waiting.empty()) return fail("branch_left_in_doubt", where);
      if (!committed.empty() && !aborted_after_yes.empty())
        return fail("mixed_outcome", where + ": committed and rolled back after voting yes");
      if (!committed.empty() && !aborted_before_yes.empty())
        return fail("mixed_outcome", where + ": committed although a branch never voted yes");
      if (!g.said_commit.empty())
        for (size_t i : g.enlisted) {
          auto it = participants_[i].branches.find(gid);
          bool ok =
              it != participants_[i].branches.end() &&
              (it->second.state == PState::committed || it->second.state == PState::read_only);
          if (!ok) return fail("told_committed_but_not_committed", where + ": " + g.said_commit);
        }
      if (!g.said_abort.empty() && !committed.empty())
        return fail("told_aborted_but_committed", where + ": " + g.said_abort);
    }
  }

  // After the last restart every gid must read the outcome its branches reached.
  void check_final_answers() {
    for (auto& [gid, g] : gids_) {
      bool any_committed = false, any_writer = false;
      size_t writers_committed = 0;
      for (size_t i : g.enlisted) {
        auto it = participants_[i].branches.find(gid);
        PState s = it == participants_[i].branches.end() ? PState::aborted : it->second.state;
        any_committed = any_committed || s == PState::committed;
        any_writer = any_writer || s != PState::read_only;
        writers_committed += s == PState::committed;
      }
      count_outcome(g, writers_committed);
      if (!any_writer) continue;  // nothing was written: either answer harms no one
      ClientReply r = get(gid);
      Said s = classify(r);
      if (any_committed && s != Said::committed)
        return fail("final_answer_wrong", gid + " has committed branches but reads " + describe(r));
      if (!any_committed && s != Said::aborted)
        return fail("final_answer_wrong", gid + " committed nowhere but reads " + describe(r));
    }
  }

  void count_outcome(const GidInfo& g, size_t writers_committed) {
    stats_.told_committed += !g.said_commit.empty();
    stats_.told_aborted += !g.said_abort.empty();
    if (g.enlisted.size() == 1) {
      stats_.one_phase_committed += writers_committed == 1;
      stats_.one_phase_aborted += g.one_phase_branch_aborted;
    } else if (writers_committed >= 2) {
      (g.protocol == Protocol::two_phase ? stats_.committed_2pc : stats_.committed_3pc) += 1;
    }
  }

  // --- state -------------------------------------------------------------------------------

  uint64_t seed_;
  bool verbose_;
  std::set<std::string> ignored_;
  Stats stats_;
  Rng rng_;
  Knobs knobs_;
  TraceSink sink_;
  Logger logger_;
  std::deque<std::string> trace_;
  bool failed_ = false;
  std::string violation_, detail_;
  size_t step_ = 0;
  int64_t now_ = kStartMs;
  bool quiescing_ = false;

  wal::MemoryLog wal_;
  std::deque<DiskWrite> disk_;
  std::vector<wal::TxnRecord> unsynced_;           // written, not yet synced
  std::map<std::string, wal::TxnRecord> durable_;  // what a crash keeps
  std::set<std::string> commit_durable_;           // gids with a synced commit decision

  uint64_t epoch_ = 0;
  std::unique_ptr<CoordinatorMachine> machine_;
  std::vector<Participant> participants_;
  std::map<uint64_t, Flight> flights_;
  uint64_t next_flight_ = 1;

  std::map<std::string, GidInfo> gids_;
  std::vector<std::string> gid_list_;        // in issue order
  std::vector<std::string> open_;            // begun, neither commit nor abort asked yet
  std::map<uint64_t, std::string> pending_;  // waiter → gid
  uint64_t next_waiter_ = 1;
};

// --- the test ----------------------------------------------------------------------------

// A TPC_ASSERT in the machine aborts the process: say which seed did it before dying.
thread_local World* g_world = nullptr;

extern "C" void on_abort(int sig) {
  if (g_world) {
    std::string r = g_world->trace_tail(kTraceShown);
    std::fprintf(stderr,
                 "coordinator simulation: seed %llu aborted (a TPC_ASSERT in the machine?)\n"
                 "  replay: TPC_SIM_SEED=%llu coordinator_simulation_test\n  last events:\n%s",
                 static_cast<unsigned long long>(g_world->seed()),
                 static_cast<unsigned long long>(g_world->seed()), r.c_str());
    std::fflush(stderr);
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

std::optional<uint64_t> env_number(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  char* end = nullptr;
  unsigned long long n = std::strtoull(v, &end, 10);
  if (*end != '\0') return std::nullopt;
  return static_cast<uint64_t>(n);
}

std::set<std::string> env_list(const char* name) {
  std::set<std::string> out;
  const char* v = std::getenv(name);
  std::string list = v ? v : "";
  size_t at = 0;
  while (at < list.size()) {
    size_t comma = std::min(list.find(',', at), list.size());
    if (comma > at) out.insert(list.substr(at, comma - at));
    at = comma + 1;
  }
  return out;
}

struct SeedResult {
  bool ok = true;
  std::string violation;
  std::string report;
  Stats stats;
};

// Runs every seed, spread over `threads` threads; results[i] belongs to seeds[i], so what is
// reported does not depend on the scheduling.
std::vector<SeedResult> run_seeds(const std::vector<uint64_t>& seeds, size_t steps, bool verbose,
                                  const std::set<std::string>& ignored, size_t threads) {
  std::vector<SeedResult> results(seeds.size());
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < seeds.size();) {
      World w(seeds[i], verbose, ignored);
      g_world = &w;
      SeedResult& r = results[i];
      r.ok = w.run(steps);
      r.stats = w.stats();
      if (!r.ok) {
        r.violation = w.violation();
        r.report = w.report();
      }
      g_world = nullptr;
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return results;
}

}  // namespace

TEST_CASE("simulation: seeded faults never break atomicity, durability or the answers") {
  const size_t steps = env_number("TPC_SIM_STEPS").value_or(kStepsDefault);
  size_t threads = env_number("TPC_SIM_THREADS").value_or(2);
  std::vector<uint64_t> seeds;
  bool verbose = false;
  if (auto one = env_number("TPC_SIM_SEED")) {
    seeds.push_back(*one);
    verbose = true;
    threads = 1;
  } else {
    uint64_t n = env_number("TPC_SIM_SEEDS").value_or(kSeedsDefault);
    for (uint64_t s = 1; s <= n; ++s) seeds.push_back(s);
  }
  auto previous = std::signal(SIGABRT, on_abort);
  auto started = std::chrono::steady_clock::now();
  std::vector<SeedResult> results =
      run_seeds(seeds, steps, verbose, env_list("TPC_SIM_IGNORE"), std::max<size_t>(threads, 1));
  std::signal(SIGABRT, previous);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  Stats total;
  std::string list, first_report;
  size_t failed = 0;
  std::map<std::string, size_t> by_invariant;
  for (size_t i = 0; i < seeds.size(); ++i) {
    total.add(results[i].stats);
    if (results[i].ok) continue;
    if (++failed <= 30) list += " " + std::to_string(seeds[i]) + ":" + results[i].violation;
    ++by_invariant[results[i].violation];
    if (first_report.empty()) first_report = results[i].report;
  }
  MESSAGE("simulated " << seeds.size() << " seeds x " << steps << " steps in " << secs
                       << " s: " << total.text());
  if (failed > 0) {
    std::string counts;
    for (auto& [name, n] : by_invariant) counts += " " + name + "=" + std::to_string(n);
    FAIL_CHECK(failed << " of " << seeds.size() << " seeds failed (" << counts
                      << " ); first seeds:" << list << "\n"
                      << first_report);
  }
}

// The smallest reproduction of what the simulation found first (e.g. seed 6): the view says
// "decision":"commit" while the commit record is still being written, the agent's in-doubt
// resolver (participant/codec.cc decode_outcome_answer) commits on that field, and a crash
// before the fsync completes leaves the gid presumed aborted: the other branches roll back.
TEST_CASE("simulation finding: no view says decision commit before the decision is durable") {
  MemorySink sink;
  Logger log(&sink);
  CoordinatorMachine m(MachineOptions{}, log);
  m.recover(1, std::nullopt, {}, 0);
  auto begun = m.begin(Protocol::two_phase, std::nullopt, 0);
  REQUIRE(begun.ok());
  const std::string gid = begun->gid;
  REQUIRE(http_status_of(m.enlist(gid, "a1", "http://a1:7401", 0)) == 201);
  REQUIRE(http_status_of(m.enlist(gid, "a2", "http://a2:7401", 0)) == 201);
  REQUIRE_FALSE(m.commit(gid, 1, {}, 0).has_value());
  m.take_ready();
  m.on_reply(BranchReply{gid, "a1", MsgKind::prepare, ReplyKind::vote_yes, ""}, 0);
  m.on_reply(BranchReply{gid, "a2", MsgKind::prepare, ReplyKind::vote_yes, ""}, 0);
  Ready r = m.take_ready();
  REQUIRE(r.persist.size() == 1);
  CHECK(r.persist[0].sync);  // the commit record is on its way to disk; on_persisted not yet

  // a1's in-doubt resolver asks now (GET), and a client asks to abort.
  Lookup l = m.lookup(gid);
  REQUIRE(l.kind == LookupKind::live);
  CHECK_MESSAGE(l.view.decision != Decision::commit, "GET says decision=commit (state "
                                                         << state_name(l.view.state)
                                                         << ") before the record is durable");
  auto aborted = m.abort(gid, 2, 0);
  REQUIRE(aborted.has_value());
  CHECK_MESSAGE(aborted->view.decision != Decision::commit,
                "abort answered " << http_status_of(*aborted)
                                  << " with decision=commit before the record is durable");

  // The coordinator crashes before the fsync completes: the record never reached the log, so
  // the restarted coordinator answers a2's resolver "presumed aborted".
  CoordinatorMachine restarted(MachineOptions{}, log);
  restarted.recover(2, std::nullopt, {}, 0);
  REQUIRE(restarted.lookup(gid).kind == LookupKind::in_log);
  auto presumed = CoordinatorMachine::reply_without_record(gid, RequestKind::get, false);
  CHECK(presumed.view.decision == Decision::abort);
}
