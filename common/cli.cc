#include "common/cli.h"

#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "common/failpoint.h"
#include "common/json.h"

namespace tpc {

int fail(std::string_view program, std::string_view message, int code) {
  std::string line(program);
  line += ": ";
  for (char c : message) line += c == '\n' ? ' ' : c;
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
  return code;
}

Result<std::pair<std::string, uint16_t>> parse_listen(std::string_view text) {
  size_t colon = text.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == text.size())
    return invalid_argument("--listen wants HOST:PORT, got \"" + std::string(text) + "\"");
  std::string host(text.substr(0, colon));
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  std::string_view p = text.substr(colon + 1);
  unsigned port = 0;
  auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
  if (ec != std::errc() || ptr != p.data() + p.size() || port > 65535)
    return invalid_argument("--listen has a bad port in \"" + std::string(text) + "\"");
  return std::make_pair(host, static_cast<uint16_t>(port));
}

void add_version_option(std::vector<OptionSpec>* specs) {
  specs->push_back({"version", "print the version and exit", "", false, true});
}

std::string version_line(std::string_view program) {
  std::string line(program);
  line += " " TPC_VERSION;
  std::string_view describe = TPC_GIT_DESCRIBE;
  if (!describe.empty()) line += " (" + std::string(describe) + ")";
  return line;
}

std::variant<Config, int> parse_command_line(std::string_view program, std::string_view usage,
                                             const std::vector<OptionSpec>& specs, int argc,
                                             char** argv, bool positional_allowed) {
  auto parsed = Config::parse(specs, argc, argv, environ);
  if (!parsed.ok()) return fail(program, parsed.status().message(), 2);
  if (parsed->flag("version")) {
    std::cout << version_line(program) << "\n";
    return 0;
  }
  if (parsed->flag("help")) {
    std::cout << "usage: " << usage << "\n" << Config::usage(specs);
    return 0;
  }
  if (!positional_allowed && !parsed->positional().empty())
    return fail(program, "unexpected argument \"" + parsed->positional()[0] + "\"", 2);
  return std::move(*parsed);
}

void add_logging_options(std::vector<OptionSpec>* specs) {
  specs->push_back({"log-format", "text or json", "text"});
  specs->push_back({"log-level", "debug, info, warn or error", "info"});
}

Result<std::unique_ptr<Logging>> make_logging(const Config& cfg) {
  auto l = std::make_unique<Logging>();
  std::string format = cfg.get("log-format");
  std::string level = cfg.get("log-level");
  LogFormat f;
  if (format == "text")
    f = LogFormat::text;
  else if (format == "json")
    f = LogFormat::json;
  else
    return invalid_argument("--log-format must be text or json, got \"" + format + "\"");
  LogLevel lv;
  if (level == "debug")
    lv = LogLevel::debug;
  else if (level == "info")
    lv = LogLevel::info;
  else if (level == "warn")
    lv = LogLevel::warn;
  else if (level == "error")
    lv = LogLevel::error;
  else
    return invalid_argument("--log-level must be debug, info, warn or error, got \"" + level +
                            "\"");
  l->logger = std::make_unique<Logger>(&l->sink, f, lv);
  return l;
}

Status configure_failpoints_from_env(Logger* log) {
  const char* spec = std::getenv("FAILPOINTS");
  if (!spec || !*spec) return ok_status();
  uint64_t seed = static_cast<uint64_t>(::getpid());
  if (const char* s = std::getenv("FAILPOINTS_SEED")) seed = std::strtoull(s, nullptr, 10);
  Status st = failpoint::configure(spec, log, seed);
  if (!st.ok()) return st;
  log->warn("failpoints configured", {{"spec", spec}, {"seed", seed}});
  return ok_status();
}

}  // namespace tpc

namespace tpc {

HttpResponse failpoints_endpoint(std::string_view body, Logger* log) {
  if (!failpoint::compiled_in())
    return error_response(not_found("failpoints are not compiled into this build"));
  auto j = parse_object(body);
  if (!j.ok()) return error_response(j.status());
  FieldReader r(*j);
  std::string spec;
  r.string("spec", &spec, true, 4096);
  if (Status st = r.finish(); !st.ok()) return error_response(st);
  Status st = failpoint::configure(spec, log, static_cast<uint64_t>(::getpid()));
  if (!st.ok()) return error_response(st);
  log->warn("failpoints configured", {{"spec", spec}});
  return json_response(200, Json{{"spec", spec}});
}

}  // namespace tpc
