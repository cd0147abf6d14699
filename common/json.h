// JSON helpers: parsing outside input without letting an exception escape, typed field
// readers that turn a wrong type or range into a clear invalid_argument, and the error body
// every endpoint answers with: {"error":{"code":"...","message":"..."}}.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/http.h"
#include "common/status.h"

namespace tpc {

using Json = nlohmann::json;

// Parses a request body that must be a JSON object. An empty (or all-blank) body is {}.
Result<Json> parse_object(std::string_view body);
// The same for a body that takes no fields: anything but {} (or blank) is refused.
Result<Json> parse_empty_object(std::string_view body);
// Parses any JSON document; invalid_argument with the parser's position on failure. A key
// repeated in one object is refused. A non-integer number (or an integer beyond 64 bits)
// that is an element of an array under the key "params" is kept as a string of its exact
// text, so its digits reach PostgreSQL as the client wrote them.
Result<Json> parse_json(std::string_view text);
// Client input echoed in an error message, quoted and cut to kEchoBytesMax bytes with "…".
constexpr size_t kEchoBytesMax = 64;
std::string echo(std::string_view input);
// Serialises, replacing invalid UTF-8 rather than throwing.
std::string dump(const Json& j);

// Reads typed fields of one object, remembering the first error; a present field of the wrong
// type is an error. finish() refuses any field that was not asked for.
class FieldReader {
 public:
  explicit FieldReader(const Json& obj) : obj_(obj) {}

  // Each returns false (and records the error) when the field is present but invalid, or
  // missing and required. When absent and optional, *out is untouched and true is returned.
  bool string(std::string_view key, std::string* out, bool required = false,
              size_t max_bytes = 1 << 20);
  bool int64(std::string_view key, int64_t* out, int64_t min, int64_t max, bool required = false);
  bool boolean(std::string_view key, bool* out, bool required = false);
  // An array; absent → nullptr (unless required).
  const Json* array(std::string_view key, bool required = false, size_t max_items = SIZE_MAX);
  // Whether the field is present; it counts as known.
  bool has(std::string_view key) {
    allow(key);
    return obj_.contains(key);
  }
  // Marks a field read elsewhere as known.
  void allow(std::string_view key) { known_.emplace_back(key); }
  // The first error, or invalid_argument naming the first field not asked for.
  Status finish() const;

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  void fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }

 private:
  const Json* find(std::string_view key);

  const Json& obj_;
  Status status_;
  std::vector<std::string> known_;
};

// The HTTP status that fits a Status code (400, 401, 404, 409, 413, 422, 503, 500).
int http_status_for(Code code);
// {"error":{"code":"<code_name>","message":"..."}} plus any extra members of `extra` inside
// "error" (e.g. "sqlstate").
HttpResponse error_response(const Status& s, const Json& extra = Json::object());
HttpResponse error_response(int http_status, std::string_view code, std::string_view message,
                            const Json& extra = Json::object());
HttpResponse json_response(int http_status, const Json& body);
// 405 with the error body every service uses and the Allow header, e.g. "GET" or "GET, POST".
HttpResponse method_not_allowed(std::string_view allow);

}  // namespace tpc
