// JSON codecs of the agent's HTTP API: request bodies in, results, votes and branch views out,
// and the coordinator's answers to enlistments and outcome queries. Pure functions, no IO.
#pragma once

#include <string>
#include <string_view>

#include "common/json.h"
#include "participant/agent_machine.h"

namespace tpc::agent {

struct ExecLimits {
  size_t statements_max = 1'000;
  size_t params_max = 1'000;
};

// {"sql":"…","params":[…]} or {"statements":[{"sql","params"},…]}, optionally "prepare":true
// (and "protocol" with it). Params: strings, numbers, booleans or null, bound as text.
Result<Request> decode_exec(std::string_view body, const ExecLimits& limits);
// A step of transaction `gid`: {"branch":"NAME","op":"try|confirm|cancel|action|compensate|
// deliver|local","statements":[{"sql","params","expect_rows"?},…]} (or "sql" and "params";
// no statements: only the barrier). In params, {"tpc":"gid"} stands for gid and
// {"tpc":"branch"} for the branch.
Result<Request> decode_step(std::string_view body, std::string_view gid, const ExecLimits& limits);
// {"protocol":"2pc"|"3pc"} (optional).
Result<Request> decode_prepare(std::string_view body);
// {"one_phase":true} (optional).
Result<Request> decode_commit(std::string_view body);
// {"outcome":"commit"|"abort"}.
Result<Request> decode_resolve(std::string_view body);

Json encode_results(const std::vector<pg::StatementResult>& results);
Json encode_view(const BranchView& v);
HttpResponse encode_reply(const Reply& r);

// The peers of a 3PC branch as kept in tpc_agent_state.detail (a JSON array), and back
// (empty when the text is not such an array).
std::string encode_peers(const std::vector<Peer>& peers);
std::vector<Peer> decode_peers_text(std::string_view text);

// The coordinator's answer to an enlistment: ok (with the branch's remaining time, if given),
// conflict or not_found (refused for good), unavailable (try again later).
Status decode_enlist_answer(int http_status, std::string_view body, const Status& transport,
                            int64_t* expires_in_ms);
// The coordinator's answer to GET /v1/transactions/{gid}.
Outcome decode_outcome_answer(int http_status, std::string_view body, const Status& transport,
                              std::string* answer);
// The state the coordinator's view (the same answer) records for `participant`'s branch;
// nullopt when it lists none.
std::optional<BranchState> decode_recorded_state(std::string_view body,
                                                 std::string_view participant);
// The coordinator's answer to a heuristic report: ok, not_found or invalid_argument (it will
// never take it), anything else unavailable (report again later).
Status decode_report_answer(int http_status, std::string_view body, const Status& transport);

}  // namespace tpc::agent
