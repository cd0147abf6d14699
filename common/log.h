// Logger: one structured line per event, as text (`ts LEVEL msg k=v ...`) or JSON.
//
// The logger is passed in, never global. It is thread-safe; the sink serialises lines. A
// MemorySink keeps lines in memory (without timestamps) so tests can assert on them.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace tpc {

enum class LogLevel { debug, info, warn, error };
enum class LogFormat { text, json };

std::string_view level_name(LogLevel l);

struct LogField {
  LogField(std::string_view k, std::string_view v) : key(k), value(v) {}
  LogField(std::string_view k, const std::string& v) : key(k), value(v) {}
  LogField(std::string_view k, const char* v) : key(k), value(v) {}
  LogField(std::string_view k, int64_t v) : key(k), value(std::to_string(v)) {}
  LogField(std::string_view k, uint64_t v) : key(k), value(std::to_string(v)) {}
  LogField(std::string_view k, int v) : key(k), value(std::to_string(v)) {}
  LogField(std::string_view k, unsigned v) : key(k), value(std::to_string(v)) {}
  LogField(std::string_view k, double v);
  std::string_view key;
  std::string value;
};

class LogSink {
 public:
  virtual ~LogSink() = default;
  virtual void write(LogLevel level, std::string_view line) = 0;
  virtual bool wants_timestamps() const { return true; }
};

// Writes each line to stderr with a single write call.
class StderrSink final : public LogSink {
 public:
  void write(LogLevel level, std::string_view line) override;
};

// Keeps every line in memory; for tests.
class MemorySink final : public LogSink {
 public:
  void write(LogLevel level, std::string_view line) override;
  bool wants_timestamps() const override { return false; }
  std::vector<std::string> lines() const;
  // Lines of the given level or above that contain `needle`.
  std::vector<std::string> find(std::string_view needle, LogLevel min = LogLevel::debug) const;
  void clear();

 private:
  mutable std::mutex mu_;
  std::vector<std::pair<LogLevel, std::string>> lines_;
};

class Logger {
 public:
  // `sink` must outlive the logger.
  Logger(LogSink* sink, LogFormat format = LogFormat::text, LogLevel min = LogLevel::info)
      : sink_(sink), format_(format), min_(min) {}

  void log(LogLevel level, std::string_view msg, std::initializer_list<LogField> fields);
  void log(LogLevel level, std::string_view msg, const std::vector<LogField>& fields);
  void debug(std::string_view msg, std::initializer_list<LogField> f = {}) { log(LogLevel::debug, msg, f); }
  void info(std::string_view msg, std::initializer_list<LogField> f = {}) { log(LogLevel::info, msg, f); }
  void warn(std::string_view msg, std::initializer_list<LogField> f = {}) { log(LogLevel::warn, msg, f); }
  void error(std::string_view msg, std::initializer_list<LogField> f = {}) { log(LogLevel::error, msg, f); }
  bool enabled(LogLevel level) const { return level >= min_; }

 private:
  void emit(LogLevel level, std::string_view msg, const LogField* f, size_t n);

  LogSink* sink_;
  LogFormat format_;
  LogLevel min_;
};

}  // namespace tpc
