#include "common/status.h"

#include <cstdio>
#include <cstdlib>

namespace tpc {

void assert_fail(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "assertion failed: %s at %s:%d %s\n", expr, file, line, msg);
  std::fflush(stderr);
  std::abort();
}

std::string_view code_name(Code c) {
  switch (c) {
    case Code::ok: return "ok";
    case Code::invalid_argument: return "invalid_argument";
    case Code::unauthorized: return "unauthorized";
    case Code::not_found: return "not_found";
    case Code::conflict: return "conflict";
    case Code::too_large: return "too_large";
    case Code::sql_error: return "sql_error";
    case Code::unavailable: return "unavailable";
    case Code::timeout: return "timeout";
    case Code::io_error: return "io_error";
    case Code::corruption: return "corruption";
    case Code::internal: return "internal";
  }
  return "unknown";
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  std::string s(code_name(code_));
  s += ": ";
  s += message_;
  return s;
}

}  // namespace tpc
