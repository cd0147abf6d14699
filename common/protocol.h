// The commit protocols and the ops of a step, one vocabulary for every service, codec and
// record. A protocol's value is the one the decision log stores (a record's protocol byte).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace tpc {

// notify: a best-effort notification (docs/DESIGN.md §10.3), on the same engine though it is
// not a transaction of anyone's.
enum class Protocol : uint8_t {
  two_phase = 2,
  three_phase = 3,
  tcc = 4,
  saga = 5,
  msg = 6,
  notify = 7
};

inline constexpr Protocol kProtocols[] = {Protocol::two_phase, Protocol::three_phase,
                                          Protocol::tcc,       Protocol::saga,
                                          Protocol::msg,       Protocol::notify};

// "2pc" / "3pc" / "tcc" / "saga" / "msg": the wire's and the logs' spelling.
constexpr std::string_view protocol_name(Protocol p) {
  switch (p) {
    case Protocol::two_phase: return "2pc";
    case Protocol::three_phase: return "3pc";
    case Protocol::tcc: return "tcc";
    case Protocol::saga: return "saga";
    case Protocol::msg: return "msg";
    case Protocol::notify: return "notify";
  }
  return "?";
}

constexpr std::optional<Protocol> parse_protocol(std::string_view s) {
  for (Protocol p : kProtocols)
    if (protocol_name(p) == s) return p;
  return std::nullopt;
}

// 2PC and 3PC: the protocols whose branches are prepared transactions at our agents (and so
// the only ones an agent's prepare, commit and abort messages carry).
constexpr bool prepares_branches(Protocol p) {
  return p == Protocol::two_phase || p == Protocol::three_phase;
}

// TCC, saga and transactional messages: the protocols whose branches are ops (docs/DESIGN.md §8).
constexpr bool calls_ops(Protocol p) {
  return !prepares_branches(p);
}

// A dense index per protocol, for counters kept by protocol.
constexpr size_t protocol_index(Protocol p) {
  return static_cast<size_t>(p) - 2;
}
inline constexpr size_t kProtocolCount = 6;

// The decision log's byte, and back (nullopt: not a protocol).
constexpr uint8_t protocol_byte(Protocol p) {
  return static_cast<uint8_t>(p);
}
constexpr std::optional<Protocol> protocol_from_byte(uint8_t b) {
  for (Protocol p : kProtocols)
    if (protocol_byte(p) == b) return p;
  return std::nullopt;
}

// What a call of a TCC branch, a saga step or a message does (docs/DESIGN.md §8): the Tpc-Op
// header of an HTTP op, the "op" of an agent's step, the op of a barrier row.
// check: a transactional message's check-back (§10.1), which at an agent fences the producer's
// local op; notify: a best-effort notification (§10.3).
enum class StepOp : uint8_t {
  try_op,
  confirm,
  cancel,
  action,
  compensate,
  deliver,
  local,
  check,
  notify
};
inline constexpr size_t kStepOps = 9;

constexpr std::string_view step_op_name(StepOp op) {
  switch (op) {
    case StepOp::try_op: return "try";
    case StepOp::confirm: return "confirm";
    case StepOp::cancel: return "cancel";
    case StepOp::action: return "action";
    case StepOp::compensate: return "compensate";
    case StepOp::deliver: return "deliver";
    case StepOp::local: return "local";
    case StepOp::check: return "check";
    case StepOp::notify: return "notify";
  }
  return "?";
}

constexpr std::optional<StepOp> parse_step_op(std::string_view s) {
  for (StepOp op :
       {StepOp::try_op, StepOp::confirm, StepOp::cancel, StepOp::action, StepOp::compensate,
        StepOp::deliver, StepOp::local, StepOp::check, StepOp::notify})
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

// try, action and local: the ops a cancel, compensate or check may come before, and so the
// ones the barrier refuses once that has run (a check fences a local op that never ran).
constexpr bool undone_later(StepOp op) {
  return op == StepOp::try_op || op == StepOp::action || op == StepOp::local;
}

}  // namespace tpc
