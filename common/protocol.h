// The commit protocols and the ops of a step, one vocabulary for every service, codec and
// record. A protocol's value is the one the decision log stores (a record's protocol byte).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace tpc {

enum class Protocol : uint8_t { two_phase = 2, three_phase = 3 };

// "2pc" / "3pc": the wire's and the logs' spelling.
constexpr std::string_view protocol_name(Protocol p) {
  return p == Protocol::two_phase ? "2pc" : "3pc";
}

constexpr std::optional<Protocol> parse_protocol(std::string_view s) {
  if (s == "2pc") return Protocol::two_phase;
  if (s == "3pc") return Protocol::three_phase;
  return std::nullopt;
}

// The decision log's byte, and back (nullopt: not a protocol).
constexpr uint8_t protocol_byte(Protocol p) {
  return static_cast<uint8_t>(p);
}
constexpr std::optional<Protocol> protocol_from_byte(uint8_t b) {
  if (b == 2) return Protocol::two_phase;
  if (b == 3) return Protocol::three_phase;
  return std::nullopt;
}

// What a call of a TCC branch, a saga step or a message does (docs/DESIGN.md §8): the Tpc-Op
// header of an HTTP op, the "op" of an agent's step, the op of a barrier row.
enum class StepOp : uint8_t { try_op, confirm, cancel, action, compensate, deliver, local };

constexpr std::string_view step_op_name(StepOp op) {
  switch (op) {
    case StepOp::try_op: return "try";
    case StepOp::confirm: return "confirm";
    case StepOp::cancel: return "cancel";
    case StepOp::action: return "action";
    case StepOp::compensate: return "compensate";
    case StepOp::deliver: return "deliver";
    case StepOp::local: return "local";
  }
  return "?";
}

constexpr std::optional<StepOp> parse_step_op(std::string_view s) {
  for (StepOp op : {StepOp::try_op, StepOp::confirm, StepOp::cancel, StepOp::action,
                    StepOp::compensate, StepOp::deliver, StepOp::local})
    if (step_op_name(op) == s) return op;
  return std::nullopt;
}

// The op a compensating op undoes: cancel undoes try, compensate undoes action; nullopt for
// the others.
constexpr std::optional<StepOp> undoes(StepOp op) {
  if (op == StepOp::cancel) return StepOp::try_op;
  if (op == StepOp::compensate) return StepOp::action;
  return std::nullopt;
}

// try and action: the ops a cancel or compensate may undo, and so the ones the barrier refuses
// once that has run.
constexpr bool undone_later(StepOp op) {
  return op == StepOp::try_op || op == StepOp::action;
}

}  // namespace tpc
