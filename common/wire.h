// The words coordinator and agents exchange, spelled once: the branch actions (the last
// segment of /v1/branches/{gid}/ACTION), the branch states and votes an agent answers with,
// and the batch envelope (POST /v1/batch). Both codecs and both ends of a batch use these;
// docs/DESIGN.md §3 is their contract.
#pragma once

#include <string_view>

namespace tpc::wire {

// Branch actions.
inline constexpr std::string_view kExec = "exec";
inline constexpr std::string_view kPrepare = "prepare";
inline constexpr std::string_view kPrecommit = "precommit";
inline constexpr std::string_view kCommit = "commit";
inline constexpr std::string_view kAbort = "abort";
inline constexpr std::string_view kStep = "step";  // docs/DESIGN.md §8
inline constexpr std::string_view kBranchesPrefix = "/v1/branches/";

// Branch states in an agent's answers.
inline constexpr std::string_view kActive = "active";
inline constexpr std::string_view kPrepared = "prepared";
inline constexpr std::string_view kPrecommitted = "precommitted";
inline constexpr std::string_view kCommitted = "committed";
inline constexpr std::string_view kAborted = "aborted";
inline constexpr std::string_view kReadOnly = "read_only";
inline constexpr std::string_view kUnknown = "unknown";

// Votes.
inline constexpr std::string_view kVoteYes = "yes";
inline constexpr std::string_view kVoteNo = "no";
inline constexpr std::string_view kVoteReadOnly = "read_only";

// The batch envelope: {"requests":[{"path","body"}]} → {"responses":[{"status","body"}]}.
inline constexpr std::string_view kRequests = "requests";
inline constexpr std::string_view kResponses = "responses";
inline constexpr std::string_view kPath = "path";
inline constexpr std::string_view kBody = "body";
inline constexpr std::string_view kStatus = "status";

}  // namespace tpc::wire
