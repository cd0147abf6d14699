// Small reads of a TCC branch, saga step or message slot, shared by the op machines
// (op_machine.cc, msg_machine.cc). Internal to the coordinator's machine.
#pragma once

#include <algorithm>

#include "coordinator/txn.h"

namespace tpc::coord {

// The op of kind `op` a slot carries, or nullptr.
inline const wal::OpText* op_of(const BranchSlot& b, StepOp op) {
  for (auto& o : b.ops)
    if (o.op == op) return &o;
  return nullptr;
}

// A message's slots: its producer first ("local": the check, and in the one-request form the
// local op), then its destinations.
inline constexpr size_t kProducerSlot = 0;
inline constexpr std::string_view kProducerName = "local";

inline bool all_delivered(const Txn& t) {
  return std::all_of(t.branches.begin() + 1, t.branches.end(), [](const BranchSlot& b) {
    return b.state == BranchState::delivered || b.forced;
  });
}

}  // namespace tpc::coord
