// Names and global ids: validation and parsing.
//
// A gid is "<coordinator>-<epoch>-<seq>": the coordinator's id, the epoch synced at its
// start, and a sequence number within the epoch. All three parts are needed for a gid to be
// unique across restarts. Names use a strict character set so they can be embedded in
// PostgreSQL transaction names, log lines and URLs without escaping surprises.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace tpc {

inline constexpr size_t kNameMaxBytes = 32;
inline constexpr size_t kGidMaxBytes = 64;

// [A-Za-z0-9_]{1,32}: no '-', which separates the parts of a gid.
bool valid_coordinator_id(std::string_view id);
// [A-Za-z0-9_-]{1,32}
bool valid_participant_name(std::string_view name);

inline constexpr size_t kBranchNameMaxBytes = 64;
// A TCC branch's or a saga step's name: [A-Za-z0-9_.:-]{1,64}.
bool valid_branch_name(std::string_view name);

struct GidParts {
  std::string coordinator;
  uint64_t epoch = 0;
  uint64_t seq = 0;
  // Orders gids of one coordinator by (epoch, seq).
  bool operator<(const GidParts& o) const {
    return epoch != o.epoch ? epoch < o.epoch : seq < o.seq;
  }
};

// nullopt unless text is a well-formed gid (decimal parts without leading zeros, at most
// kGidMaxBytes).
std::optional<GidParts> parse_gid(std::string_view text);
std::string make_gid(std::string_view coordinator, uint64_t epoch, uint64_t seq);

}  // namespace tpc
