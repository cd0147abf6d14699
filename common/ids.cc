#include "common/ids.h"

#include <charconv>

namespace tpc {
namespace {

bool name_char(char c, bool allow_dash) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         (allow_dash && c == '-');
}

bool valid_name(std::string_view s, bool allow_dash) {
  if (s.empty() || s.size() > kNameMaxBytes) return false;
  for (char c : s)
    if (!name_char(c, allow_dash)) return false;
  return true;
}

std::optional<uint64_t> parse_decimal(std::string_view s) {
  if (s.empty() || s.size() > 20) return std::nullopt;
  if (s.size() > 1 && s[0] == '0') return std::nullopt;
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

}  // namespace

bool valid_coordinator_id(std::string_view id) { return valid_name(id, false); }
bool valid_participant_name(std::string_view name) { return valid_name(name, true); }

bool valid_branch_name(std::string_view name) {
  if (name.empty() || name.size() > kBranchNameMaxBytes) return false;
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.' || c == ':';
    if (!ok) return false;
  }
  return true;
}

std::optional<GidParts> parse_gid(std::string_view text) {
  if (text.size() > kGidMaxBytes) return std::nullopt;
  size_t last = text.rfind('-');
  if (last == std::string_view::npos || last == 0) return std::nullopt;
  size_t mid = text.rfind('-', last - 1);
  if (mid == std::string_view::npos) return std::nullopt;
  std::string_view coord = text.substr(0, mid);
  if (!valid_coordinator_id(coord)) return std::nullopt;
  auto epoch = parse_decimal(text.substr(mid + 1, last - mid - 1));
  auto seq = parse_decimal(text.substr(last + 1));
  if (!epoch || !seq) return std::nullopt;
  return GidParts{std::string(coord), *epoch, *seq};
}

std::string make_gid(std::string_view coordinator, uint64_t epoch, uint64_t seq) {
  std::string g(coordinator);
  g += '-';
  g += std::to_string(epoch);
  g += '-';
  g += std::to_string(seq);
  return g;
}

}  // namespace tpc
