// The commit protocols, one vocabulary for every service, codec and record. The values are
// the ones the decision log stores (a record's protocol byte).
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

}  // namespace tpc
