// JSON codecs of the coordinator's HTTP API: request bodies in, views and replies out, and
// the agents' answers to protocol messages. Pure functions over nlohmann::json, no IO.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/json.h"
#include "coordinator/txn.h"

namespace tpc::coord {

struct BeginRequest {
  Protocol protocol = Protocol::two_phase;
  std::optional<int64_t> timeout_ms;
};
// {"protocol":"2pc"|"3pc","timeout_ms":N}, both optional.
Result<BeginRequest> decode_begin(std::string_view body, int64_t timeout_max_ms);

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
