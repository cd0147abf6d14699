// Config: command-line options, with the same options from a config file and the environment.
//
// Precedence: flags > environment (TPC_<NAME>, dashes as underscores, e.g. TPC_DATA_DIR) >
// config file (--config FILE; lines "name = value", '#' comments, a repeated option on several
// lines) > defaults. A repeated option (--participant a=URL --participant b=URL) takes every
// value from the winning source; in the environment its values are comma-separated.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace tpc {

struct OptionSpec {
  std::string name;        // without dashes: "data-dir"
  std::string help;
  std::string default_value;  // "" for none
  bool repeated = false;   // may be given several times
  bool is_switch = false;  // takes no value ("--version")
};

class Config {
 public:
  // argv[0] is skipped. envp may be null. Errors name the offending flag, file line or variable.
  static Result<Config> parse(const std::vector<OptionSpec>& specs, int argc,
                              const char* const* argv, const char* const* envp);

  bool has(std::string_view name) const;
  // The value (or the default); "" when neither.
  std::string get(std::string_view name) const;
  std::vector<std::string> all(std::string_view name) const;
  bool flag(std::string_view name) const { return has(name); }
  // Parses an integer option and checks its range; the error names the option.
  Result<int64_t> get_int(std::string_view name, int64_t min, int64_t max) const;
  // Arguments that are not options, in order (subcommands for tpcctl).
  const std::vector<std::string>& positional() const { return positional_; }

  // "  --name VALUE   help (default: x)" lines for --help.
  static std::string usage(const std::vector<OptionSpec>& specs);

 private:
  std::map<std::string, std::vector<std::string>, std::less<>> values_;
  std::map<std::string, std::string, std::less<>> defaults_;
  std::vector<std::string> positional_;
};

// Splits "NAME=VALUE" (for --participant and --coordinator).
Result<std::pair<std::string, std::string>> split_name_value(std::string_view text,
                                                             std::string_view option);

}  // namespace tpc
