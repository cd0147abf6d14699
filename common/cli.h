// Helpers shared by the binaries' main(): the one-line error exit, --listen parsing, the logger
// from --log-format/--log-level, and FAILPOINTS from the environment.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/config.h"
#include "common/http.h"
#include "common/log.h"
#include "common/status.h"

namespace tpc {

// Prints "<program>: <message>" as one line on stderr; returns `code` for main to return.
int fail(std::string_view program, std::string_view message, int code = 1);

// "HOST:PORT" (IPv4, a name, or "[v6]:PORT").
Result<std::pair<std::string, uint16_t>> parse_listen(std::string_view text);

// The --version switch every binary has.
void add_version_option(std::vector<OptionSpec>* specs);
// "<program> <version>", the version from CMake's project(), followed by " (<git describe>)"
// when the build was configured inside a git checkout.
std::string version_line(std::string_view program);

// The start of every binary's main(): parses argv and the environment against `specs`, answers
// --version and --help (`usage` is what follows "usage: " on help's first line). Returns the
// configuration, or the code main must exit with: 0 after --version or --help, 2 after a bad
// command line (one line on stderr). `positional_allowed` false refuses positional arguments.
std::variant<Config, int> parse_command_line(std::string_view program, std::string_view usage,
                                             const std::vector<OptionSpec>& specs, int argc,
                                             char** argv, bool positional_allowed = false);

// The option specs every service shares: log-format, log-level.
void add_logging_options(std::vector<OptionSpec>* specs);

struct Logging {
  StderrSink sink;
  std::unique_ptr<Logger> logger;
};
Result<std::unique_ptr<Logging>> make_logging(const Config& cfg);

// Configures failpoints from FAILPOINTS (and FAILPOINTS_SEED) in the environment.
Status configure_failpoints_from_env(Logger* log);

// POST /v1/failpoints {"spec":"name=action;..."}: replaces the failpoint configuration at run
// time, for crash tests that must arm a failpoint at a precise moment. 404 in builds without
// failpoints.
HttpResponse failpoints_endpoint(std::string_view body, Logger* log);

}  // namespace tpc
