#include "common/json.h"

namespace tpc {

Result<Json> parse_json(std::string_view text) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error& e) {
    std::string msg = "malformed JSON at byte " + std::to_string(e.byte);
    return invalid_argument(msg);
  } catch (const std::exception& e) {
    return invalid_argument(std::string("malformed JSON: ") + e.what());
  }
}

Result<Json> parse_object(std::string_view body) {
  bool blank = true;
  for (char c : body)
    if (c != ' ' && c != '\n' && c != '\r' && c != '\t') {
      blank = false;
      break;
    }
  if (blank) return Json::object();
  auto j = parse_json(body);
  if (!j.ok()) return j.status();
  if (!j->is_object()) return invalid_argument("the body must be a JSON object");
  return j;
}

std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

bool FieldReader::string(std::string_view key, std::string* out, bool required, size_t max_bytes) {
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) {
    if (required) fail(invalid_argument("\"" + std::string(key) + "\" is required"));
    return !required;
  }
  if (!it->is_string()) {
    fail(invalid_argument("\"" + std::string(key) + "\" must be a string"));
    return false;
  }
  const auto& s = it->get_ref<const std::string&>();
  if (s.size() > max_bytes) {
    fail(Status(Code::too_large, "\"" + std::string(key) + "\" is longer than " +
                                     std::to_string(max_bytes) + " bytes"));
    return false;
  }
  *out = s;
  return true;
}

bool FieldReader::int64(std::string_view key, int64_t* out, int64_t min, int64_t max,
                        bool required) {
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) {
    if (required) fail(invalid_argument("\"" + std::string(key) + "\" is required"));
    return !required;
  }
  int64_t v = 0;
  if (it->is_number_integer()) {
    if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      fail(invalid_argument("\"" + std::string(key) + "\" is out of range"));
      return false;
    }
    v = it->get<int64_t>();
  } else {
    fail(invalid_argument("\"" + std::string(key) + "\" must be an integer"));
    return false;
  }
  if (v < min || v > max) {
    fail(invalid_argument("\"" + std::string(key) + "\" must be between " + std::to_string(min) +
                          " and " + std::to_string(max)));
    return false;
  }
  *out = v;
  return true;
}

bool FieldReader::boolean(std::string_view key, bool* out, bool required) {
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) {
    if (required) fail(invalid_argument("\"" + std::string(key) + "\" is required"));
    return !required;
  }
  if (!it->is_boolean()) {
    fail(invalid_argument("\"" + std::string(key) + "\" must be true or false"));
    return false;
  }
  *out = it->get<bool>();
  return true;
}

const Json* FieldReader::array(std::string_view key, bool required, size_t max_items) {
  auto it = obj_.find(key);
  if (it == obj_.end() || it->is_null()) {
    if (required) fail(invalid_argument("\"" + std::string(key) + "\" is required"));
    return nullptr;
  }
  if (!it->is_array()) {
    fail(invalid_argument("\"" + std::string(key) + "\" must be an array"));
    return nullptr;
  }
  if (it->size() > max_items) {
    fail(Status(Code::too_large, "\"" + std::string(key) + "\" has more than " +
                                     std::to_string(max_items) + " items"));
    return nullptr;
  }
  return &*it;
}

int http_status_for(Code code) {
  switch (code) {
    case Code::ok: return 200;
    case Code::invalid_argument: return 400;
    case Code::unauthorized: return 401;
    case Code::not_found: return 404;
    case Code::conflict: return 409;
    case Code::too_large: return 413;
    case Code::sql_error: return 422;
    case Code::unavailable: return 503;
    case Code::timeout: return 504;
    case Code::io_error:
    case Code::corruption:
    case Code::internal: return 500;
  }
  return 500;
}

HttpResponse error_response(int http_status, std::string_view code, std::string_view message,
                            const Json& extra) {
  Json err = {{"code", std::string(code)}, {"message", std::string(message)}};
  if (extra.is_object())
    for (auto& [k, v] : extra.items()) err[k] = v;
  HttpResponse r;
  r.status = http_status;
  r.body = dump(Json{{"error", err}});
  if (http_status == 503) r.headers.emplace_back("retry-after", "1");
  return r;
}

HttpResponse error_response(const Status& s, const Json& extra) {
  return error_response(http_status_for(s.code()), code_name(s.code()), s.message(), extra);
}

HttpResponse json_response(int http_status, const Json& body) {
  HttpResponse r;
  r.status = http_status;
  r.body = dump(body);
  return r;
}

HttpResponse method_not_allowed() {
  return error_response(405, "method_not_allowed", "method not allowed on this path");
}

}  // namespace tpc
