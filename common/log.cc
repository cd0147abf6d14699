#include "common/log.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>

#include <nlohmann/json.hpp>

namespace tpc {

std::string_view level_name(LogLevel l) {
  switch (l) {
    case LogLevel::debug: return "DEBUG";
    case LogLevel::info: return "INFO";
    case LogLevel::warn: return "WARN";
    case LogLevel::error: return "ERROR";
  }
  return "?";
}

LogField::LogField(std::string_view k, double v) : key(k) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  value = buf;
}

void StderrSink::write(LogLevel, std::string_view line) {
  std::string out(line);
  out.push_back('\n');
  size_t off = 0;
  while (off < out.size()) {
    ssize_t n = ::write(2, out.data() + off, out.size() - off);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

void MemorySink::write(LogLevel level, std::string_view line) {
  std::lock_guard lock(mu_);
  lines_.emplace_back(level, std::string(line));
}

std::vector<std::string> MemorySink::lines() const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (auto& [lvl, l] : lines_) out.push_back(l);
  return out;
}

std::vector<std::string> MemorySink::find(std::string_view needle, LogLevel min) const {
  std::lock_guard lock(mu_);
  std::vector<std::string> out;
  for (auto& [lvl, l] : lines_)
    if (lvl >= min && l.find(needle) != std::string::npos) out.push_back(l);
  return out;
}

void MemorySink::clear() {
  std::lock_guard lock(mu_);
  lines_.clear();
}

namespace {

std::string timestamp() {
  auto now = std::chrono::system_clock::now();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count();
  std::time_t secs = static_cast<std::time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(ms % 1000));
  return buf;
}

bool needs_quotes(std::string_view v) {
  if (v.empty()) return true;
  for (char c : v)
    if (c == ' ' || c == '"' || c == '=' || c == '\n' || c == '\t') return true;
  return false;
}

}  // namespace

void Logger::log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields) {
  if (!enabled(level)) return;
  emit(level, msg, fields.begin(), fields.size());
}

void Logger::log(LogLevel level, std::string_view msg, const std::vector<LogField>& fields) {
  if (!enabled(level)) return;
  emit(level, msg, fields.data(), fields.size());
}

void Logger::emit(LogLevel level, std::string_view msg, const LogField* f, size_t n) {
  std::string line;
  if (format_ == LogFormat::json) {
    nlohmann::json j = nlohmann::json::object();
    if (sink_->wants_timestamps()) j["ts"] = timestamp();
    j["level"] = std::string(level_name(level));
    j["msg"] = std::string(msg);
    for (size_t i = 0; i < n; ++i) j[std::string(f[i].key)] = f[i].value;
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    if (sink_->wants_timestamps()) {
      line = timestamp();
      line.push_back(' ');
    }
    line += level_name(level);
    // A leading gid field comes before the message ("gid=c1-3-42 preparing->aborting ..."),
    // so every line about one transaction starts the same way.
    size_t first = 0;
    if (n > 0 && f[0].key == "gid") {
      line += " gid=";
      line += f[0].value;
      first = 1;
    }
    line.push_back(' ');
    line += msg;
    for (size_t i = first; i < n; ++i) {
      line.push_back(' ');
      line += f[i].key;
      line.push_back('=');
      if (needs_quotes(f[i].value)) {
        nlohmann::json q = f[i].value;
        line += q.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      } else {
        line += f[i].value;
      }
    }
  }
  sink_->write(level, line);
}

}  // namespace tpc
