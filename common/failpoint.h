// Named failpoints for crash tests, compiled in only when TPC_FAILPOINTS is defined (test
// builds; see the CMake option of the same name). In a release build TPC_FAILPOINT(name) is
// the constant false and no failpoint code exists.
//
// Configured once at start from FAILPOINTS="name=action;name=action", where action is
//   crash          SIGKILL to ourselves, exactly like kill -9
//   sleep(MS)      block the calling thread MS milliseconds
//   error          TPC_FAILPOINT returns true; the caller fails the operation
//   pause          block the calling thread until the failpoints are configured again (a
//                  test releases it with POST /v1/failpoints), at most kPauseMaxMs
//   off
// optionally prefixed by a count "N*" (fire the first N evaluations only) and/or a
// probability "P%" (fire with probability P), e.g. "1*crash", "20%error", "2*sleep(500)".
// A fired failpoint logs one line: `failpoint fired name=... action=...` (WARN).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/log.h"
#include "common/status.h"

namespace tpc::failpoint {

// A paused thread goes on by itself after this long, so a test that never releases it cannot
// hang the process.
inline constexpr int64_t kPauseMaxMs = 60'000;

// Replaces the configuration. `log` must outlive every later evaluation. Without
// TPC_FAILPOINTS a non-empty spec is an error ("failpoints are not compiled in").
Status configure(std::string_view spec, Logger* log, uint64_t seed);
// Evaluates `name`: may crash or sleep; true when the action is error.
bool eval(const char* name);
// Times each failpoint fired since configure (for tests of the mechanism).
uint64_t fired(std::string_view name);
bool compiled_in();
// What TPC_FAILPOINT is without failpoints compiled in: never fires, costs nothing.
constexpr bool never(const char*) { return false; }

}  // namespace tpc::failpoint

#ifdef TPC_FAILPOINTS
#define TPC_FAILPOINT(name) ::tpc::failpoint::eval(name)
#else
#define TPC_FAILPOINT(name) ::tpc::failpoint::never(name)
#endif
