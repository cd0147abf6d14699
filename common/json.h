// JSON helpers: parsing outside input without letting an exception escape, typed field
// readers that turn a wrong type or range into a clear invalid_argument, and the error body
// every endpoint answers with: {"error":{"code":"...","message":"..."}}.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/http.h"
#include "common/status.h"

namespace tpc {

using Json = nlohmann::json;

// Parses a request body that must be a JSON object. An empty (or all-blank) body is {}.
Result<Json> parse_object(std::string_view body);
// Parses any JSON document; invalid_argument with the parser's position on failure.
Result<Json> parse_json(std::string_view text);
// Serialises, replacing invalid UTF-8 rather than throwing.
std::string dump(const Json& j);

// Reads typed fields of one object, remembering the first error. Fields not asked for are
// ignored (forward compatibility); a present field of the wrong type is an error.
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
  bool has(std::string_view key) const { return obj_.contains(key); }

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  void fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }

 private:
  const Json& obj_;
  Status status_;
};

// The HTTP status that fits a Status code (400, 401, 404, 409, 413, 422, 503, 500).
int http_status_for(Code code);
// {"error":{"code":"<code_name>","message":"..."}} plus any extra members of `extra` inside
// "error" (e.g. "sqlstate").
HttpResponse error_response(const Status& s, const Json& extra = Json::object());
HttpResponse error_response(int http_status, std::string_view code, std::string_view message,
                            const Json& extra = Json::object());
HttpResponse json_response(int http_status, const Json& body);
// 405 with the error body every service uses.
HttpResponse method_not_allowed();

}  // namespace tpc
