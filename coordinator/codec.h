// JSON codecs of the coordinator's HTTP API: request bodies in, views and replies out, and
// the agents' answers to protocol messages. Pure functions over nlohmann::json, no IO.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/http.h"
#include "common/json.h"
#include "coordinator/txn.h"

namespace tpc::coord {

struct BeginRequest {
  Protocol protocol = Protocol::two_phase;
  std::optional<int64_t> timeout_ms;
  std::string notify;  // the "notify" op's JSON, "" for none
};
// {"protocol":"2pc"|"3pc"|"tcc","timeout_ms":N,"notify":OP}, all optional.
Result<BeginRequest> decode_begin(std::string_view body, int64_t timeout_max_ms);
// decode_begin on an already parsed body.
Result<BeginRequest> decode_begin_json(const Json& body, int64_t timeout_max_ms);

struct EnlistRequest {
  std::string participant;
  std::string url;
  std::string instance;  // the agent's run (a new one at every start); empty: not sent
};
// {"participant":"a1","url":"http://...","instance"?:"..."}; the url must parse.
Result<EnlistRequest> decode_enlist(std::string_view body);

struct RunBranch {
  std::string participant;
  std::string statements;  // the branch's "statements" array, re-serialised
};
struct RunRequest {
  Protocol protocol = Protocol::two_phase;
  std::vector<RunBranch> branches;
  CommitOptions opts;
  std::string notify;
};
// {"protocol","branches":[{"participant":"a1","statements":[{"sql","params"}]}],"wait"}.
// The statements' shape is checked here (sql strings, scalar params); the agent checks them
// again against its own limits.
Result<RunRequest> decode_run(std::string_view body, size_t statements_max);

// {"wait":"completion"|"decision"} (optional).
Result<CommitOptions> decode_commit(std::string_view body);
// {"outcome":"commit"|"abort"} → true for commit.
Result<bool> decode_resolve(std::string_view body);
// POST /v1/transactions/{gid}/heuristic: what an agent's branch of a finished transaction did.
struct BranchReport {
  std::string participant;
  bool committed = false;
};
Result<BranchReport> decode_branch_report(std::string_view body);

// --- TCC and saga (docs/DESIGN.md §8, §9) ------------------------------------------------

// Limits on what an op may carry.
inline constexpr size_t kOpHeadersMax = 32;
inline constexpr size_t kOpHeaderValueMaxBytes = 8 * 1024;
inline constexpr size_t kOpResultMaxBytes = 16 * 1024;  // larger results are kept as a note

// One op (§8): {"url","body"?,"headers"?} or {"participant","statements"}, normalised to the
// JSON text the log keeps. `op` says which call it is: a cancel or compensate SQL op may have
// no statements (it commits only its barrier row). `where` names it in errors.
Result<wal::OpText> decode_op(const Json& j, StepOp op, std::string_view where,
                              size_t statements_max);
// A request's "notify" (docs/DESIGN.md §10.3): an HTTP op, normalised; "" when absent.
Result<std::string> decode_notify(const Json& j);
// POST /v1/transactions/{gid}/try: {"branch","try","confirm","cancel"}.
Result<OpBranch> decode_try(std::string_view body, size_t statements_max);

struct SagaRequest {
  std::vector<OpBranch> steps;
  SagaOptions opts;
};
// POST /v1/transactions/run with "protocol":"saga", already parsed.
Result<SagaRequest> decode_saga(const Json& j, size_t statements_max, int64_t timeout_max_ms);
// A transactional message (docs/DESIGN.md §10.1), already parsed: POST /v1/transactions
// {"protocol":"msg","destinations":[OP,…],"check":OP,"timeout_ms"?}, or with `one_request`
// POST /v1/transactions/run {"protocol":"msg","local":SQL_OP,"destinations":[…],"timeout_ms"?},
// whose check is the local op's agent.
inline constexpr size_t kMsgDestinationsMax = 32;
Result<MsgRequest> decode_msg(const Json& j, bool one_request, size_t statements_max,
                              int64_t timeout_max_ms);
// The "protocol" a run body names, to pick its decoder (nullopt: absent or not a string).
std::optional<std::string> run_protocol(const Json& j);
// decode_run on an already parsed body.
Result<RunRequest> decode_run_json(const Json& j, size_t statements_max);

// Where an op goes and what it carries, read back from its logged JSON.
struct OpTarget {
  bool sql = false;
  std::string url;          // HTTP op
  std::string body;         // HTTP op: the JSON to POST; SQL op: the step's statements array
  Headers headers;          // HTTP op: the client's extra headers (names lower-case)
  std::string participant;  // SQL op
};
Result<OpTarget> decode_op_target(std::string_view spec);
// The agent's step body for a SQL op call: {"branch","op","statements"}.
std::string encode_step_body(const OpCall& c, std::string_view statements);
// The Tpc-* and Idempotency-Key headers of an HTTP op call.
Headers op_call_headers(const OpCall& c);
// An op's answer → its outcome (§8): 2xx ok, 409/422 a business failure, anything else
// unknown. `retry_after` is the answer's Retry-After header, seconds or an HTTP-date (read
// against wall_now_ms), honoured for HTTP ops.
OpReply decode_op_answer(const OpCall& c, bool sql, int http_status, std::string_view body,
                         std::string_view retry_after, const Status& transport,
                         int64_t wall_now_ms);

// A notification (docs/DESIGN.md §10.3): POST /v1/notifications {"url","body"?,"headers"?,
// "max_attempts"?}; the op is an HTTP op (§8) with Tpc-Op notify.
struct NotificationRequest {
  wal::OpText op;
  uint32_t attempts_max = kNotifyAttemptsDefault;
};
Result<NotificationRequest> decode_notification(std::string_view body, uint32_t attempts_default);
// A notification's states on the wire: pending, delivered, given_up (running, committed,
// aborted inside).
std::string_view notification_state_name(TxnState s);
std::optional<TxnState> parse_notification_state(std::string_view s);
// {"id","state","attempts","last_error"?,"reason"?,"url","body"}.
Json encode_notification(const TxnView& v);

// A transaction's view; a notification's is encode_notification's.
Json encode_view(const TxnView& v);
// The HTTP answer for a ClientReply (error body, or the view with an "error" member when the
// outcome is not what was asked).
// The HTTP status of a reply: its error's alone (no view), else its answer's.
int http_status_of(const ClientReply& r);
HttpResponse encode_reply(const ClientReply& r);
// The JSON of a reply that has a view (not a bare error).
Json encode_reply_body(const ClientReply& r);

// The body of a protocol message to an agent; `statements` is the branch's statements array
// for exec_prepare / exec_commit.
std::string encode_message_body(const Message& m, std::string_view statements = "");
// The agent's answer to a message → the machine's ReplyKind (failed for anything unusable).
// For exec_prepare / exec_commit, *results receives the answer's "results" array (or null).
BranchReply decode_branch_answer(const Message& m, int http_status, std::string_view body,
                                 const Status& transport, Json* results = nullptr);
// The same, for an answer already parsed (null when it was not JSON); may move out of *body.
BranchReply decode_branch_answer(const Message& m, int http_status, Json* body,
                                 const Status& transport, Json* results = nullptr);

}  // namespace tpc::coord
