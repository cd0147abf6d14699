#include "common/config.h"

#include <charconv>
#include <fstream>
#include <sstream>

namespace tpc {
namespace {

const OptionSpec* find_spec(const std::vector<OptionSpec>& specs, std::string_view name) {
  for (auto& s : specs)
    if (s.name == name) return &s;
  return nullptr;
}

std::string trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t\r");
  if (b == std::string_view::npos) return "";
  size_t e = s.find_last_not_of(" \t\r");
  return std::string(s.substr(b, e - b + 1));
}

std::string env_name(std::string_view option) {
  std::string e = "TPC_";
  for (char c : option) e += c == '-' ? '_' : static_cast<char>(std::toupper(c));
  return e;
}

using Values = std::map<std::string, std::vector<std::string>, std::less<>>;

Status read_file(const std::vector<OptionSpec>& specs, const std::string& path, Values* out) {
  std::ifstream in(path);
  if (!in) return invalid_argument("cannot read config file " + path);
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    std::string t = trim(line);
    if (t.empty() || t[0] == '#') continue;
    size_t eq = t.find('=');
    std::string name = trim(eq == std::string::npos ? t : std::string_view(t).substr(0, eq));
    std::string value = eq == std::string::npos ? "" : trim(std::string_view(t).substr(eq + 1));
    const OptionSpec* spec = find_spec(specs, name);
    if (!spec || name == "config")
      return invalid_argument(path + ":" + std::to_string(lineno) + ": unknown option \"" + name +
                              "\"");
    if (eq == std::string::npos && !spec->is_switch)
      return invalid_argument(path + ":" + std::to_string(lineno) + ": \"" + name +
                              "\" needs \"= value\"");
    auto& v = (*out)[name];
    if (!spec->repeated) v.clear();
    v.push_back(value);
  }
  return ok_status();
}

struct CommandLine {
  Values flags;
  std::vector<std::string> positional;
  std::string config_path;  // --config, or empty
};

// One "--name[=value]" argument at argv[*i]; advances *i past a separate value.
Status read_flag(const std::vector<OptionSpec>& specs, int argc, const char* const* argv, int* i,
                 CommandLine* out) {
  std::string name(std::string_view(argv[*i]).substr(2));
  std::string value;
  bool has_value = false;
  if (size_t eq = name.find('='); eq != std::string::npos) {
    value = name.substr(eq + 1);
    name = name.substr(0, eq);
    has_value = true;
  }
  const OptionSpec* spec = find_spec(specs, name);
  if (!spec && name != "config")
    return invalid_argument("unknown flag --" + name + " (see --help)");
  if (spec && spec->is_switch) {
    if (has_value) return invalid_argument("--" + name + " takes no value");
    out->flags[name].push_back("true");
    return ok_status();
  }
  if (!has_value) {
    if (*i + 1 >= argc) return invalid_argument("--" + name + " needs a value");
    value = argv[++*i];
  }
  if (name == "config") {
    out->config_path = value;
    return ok_status();
  }
  auto& v = out->flags[name];
  if (!spec->repeated) v.clear();
  v.push_back(value);
  return ok_status();
}

Status read_command_line(const std::vector<OptionSpec>& specs, int argc, const char* const* argv,
                         CommandLine* out) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg.size() >= 3 && arg.substr(0, 2) == "--") {
      TPC_RETURN_IF_ERROR(read_flag(specs, argc, argv, &i, out));
      continue;
    }
    if (!arg.empty() && arg[0] == '-' && arg != "-")
      return invalid_argument("unknown flag " + std::string(arg) + " (see --help)");
    out->positional.emplace_back(arg);
  }
  return ok_status();
}

std::string env_config_path(const char* const* envp) {
  if (!envp) return "";
  for (const char* const* e = envp; *e; ++e)
    if (std::string_view(*e).substr(0, 11) == "TPC_CONFIG=") return *e + 11;
  return "";
}

// TPC_<OPTION> variables; a repeated option takes a comma-separated list.
Values read_environment(const std::vector<OptionSpec>& specs, const char* const* envp) {
  Values env;
  if (!envp) return env;
  for (const char* const* e = envp; *e; ++e) {
    std::string_view kv = *e;
    if (kv.substr(0, 4) != "TPC_") continue;
    size_t eq = kv.find('=');
    if (eq == std::string_view::npos) continue;
    std::string_view key = kv.substr(0, eq);
    for (auto& s : specs) {
      if (env_name(s.name) != key) continue;
      std::string value(kv.substr(eq + 1));
      auto& v = env[s.name];
      if (!s.repeated) {
        v.push_back(value);
        continue;
      }
      std::stringstream ss(value);
      std::string item;
      while (std::getline(ss, item, ','))
        if (!trim(item).empty()) v.push_back(trim(item));
    }
  }
  return env;
}

}  // namespace

Result<std::pair<std::string, std::string>> split_name_value(std::string_view text,
                                                             std::string_view option) {
  size_t eq = text.find('=');
  if (eq == std::string_view::npos || eq == 0 || eq + 1 == text.size())
    return invalid_argument("--" + std::string(option) + " wants NAME=URL, got \"" +
                            std::string(text) + "\"");
  return std::make_pair(std::string(text.substr(0, eq)), std::string(text.substr(eq + 1)));
}

Result<Config> Config::parse(const std::vector<OptionSpec>& specs, int argc,
                             const char* const* argv, const char* const* envp) {
  Config cfg;
  for (auto& s : specs)
    if (!s.default_value.empty()) cfg.defaults_[s.name] = s.default_value;

  CommandLine line;
  TPC_RETURN_IF_ERROR(read_command_line(specs, argc, argv, &line));
  cfg.positional_ = std::move(line.positional);
  std::string config_path = line.config_path;
  if (config_path.empty()) config_path = env_config_path(envp);
  Values file;
  if (!config_path.empty()) TPC_RETURN_IF_ERROR(read_file(specs, config_path, &file));
  Values env = read_environment(specs, envp);

  // Precedence: flags, then the environment, then the config file, then the defaults.
  for (auto& s : specs) {
    for (const Values* src : {&line.flags, &env, &file}) {
      auto it = src->find(s.name);
      if (it != src->end()) {
        cfg.values_[s.name] = it->second;
        break;
      }
    }
  }
  return cfg;
}

bool Config::has(std::string_view name) const { return values_.count(name) > 0; }

std::string Config::get(std::string_view name) const {
  auto it = values_.find(name);
  if (it != values_.end() && !it->second.empty()) return it->second.back();
  auto d = defaults_.find(name);
  return d == defaults_.end() ? "" : d->second;
}

std::vector<std::string> Config::all(std::string_view name) const {
  auto it = values_.find(name);
  if (it != values_.end()) return it->second;
  auto d = defaults_.find(name);
  if (d != defaults_.end()) return {d->second};
  return {};
}

Result<int64_t> Config::get_int(std::string_view name, int64_t min, int64_t max) const {
  std::string v = get(name);
  int64_t out = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  if (v.empty() || ec != std::errc() || p != v.data() + v.size())
    return invalid_argument("--" + std::string(name) + " must be an integer, got \"" + v + "\"");
  if (out < min || out > max)
    return invalid_argument("--" + std::string(name) + " must be between " + std::to_string(min) +
                            " and " + std::to_string(max) + ", got " + v);
  return out;
}

std::string Config::usage(const std::vector<OptionSpec>& specs) {
  std::string out;
  for (auto& s : specs) {
    std::string left = "  --" + s.name + (s.is_switch ? "" : " VALUE");
    if (left.size() < 32) left.resize(32, ' ');
    out += left + " " + s.help;
    if (!s.default_value.empty()) out += " (default: " + s.default_value + ")";
    if (s.repeated) out += " [repeatable]";
    out += "\n";
  }
  out += "  --config FILE                    read options from FILE (lines \"name = value\")\n";
  return out;
}

}  // namespace tpc
