// TPC_ASSERT: an always-on check of an invariant. A programmer error stops the process with
// file:line and the failed expression; outside input must never reach one.
#pragma once

namespace tpc {
[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* msg);
}

#define TPC_ASSERT(cond)                                              \
  do {                                                                \
    if (!(cond)) ::tpc::assert_fail(#cond, __FILE__, __LINE__, "");   \
  } while (0)

#define TPC_ASSERT_MSG(cond, msg)                                      \
  do {                                                                 \
    if (!(cond)) ::tpc::assert_fail(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
