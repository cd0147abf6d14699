#include "common/json.h"

namespace tpc {

namespace {

// Builds the document like nlohmann's DOM parser, but refuses a key repeated in one object and
// keeps the text of non-integer numbers that are elements of a "params" array.
class StrictDom {
 public:
  explicit StrictDom(Json* root) : root_(root) {}

  bool null() { return put(nullptr) != nullptr; }
  bool boolean(bool v) { return put(v) != nullptr; }
  bool number_integer(Json::number_integer_t v) { return put(v) != nullptr; }
  bool number_unsigned(Json::number_unsigned_t v) { return put(v) != nullptr; }
  bool number_float(Json::number_float_t v, const std::string& text) {
    if (in_params()) return put(text) != nullptr;
    return put(v) != nullptr;
  }
  bool string(std::string& v) { return put(std::move(v)) != nullptr; }
  bool binary(Json::binary_t& v) { return put(Json::binary(std::move(v))) != nullptr; }
  bool start_object(size_t) { return open(Json::object(), false); }
  bool start_array(size_t) {
    bool params = !stack_.empty() && stack_.back().node->is_object() && key_ == "params";
    return open(Json::array(), params);
  }
  bool end_object() { return close(); }
  bool end_array() { return close(); }
  bool key(std::string& k) {
    Json* obj = stack_.back().node;
    if (obj->contains(k)) {
      error_ = "duplicate key " + echo(k);
      return false;
    }
    key_ = k;
    slot_ = &(*obj)[k];
    return true;
  }
  bool parse_error(size_t byte, const std::string&, const nlohmann::detail::exception& e) {
    // out_of_range 406: a number past the range of a double.
    error_ = (e.id == 406 ? "number out of range at byte " : "malformed JSON at byte ") +
             std::to_string(byte);
    return false;
  }

  const std::string& error() const { return error_; }

 private:
  struct Level {
    Json* node;
    bool params;  // an array under the key "params"
  };

  bool in_params() const { return !stack_.empty() && stack_.back().params; }

  Json* put(Json v) {
    if (stack_.empty()) {
      *root_ = std::move(v);
      return root_;
    }
    Json* top = stack_.back().node;
    if (top->is_array()) {
      top->push_back(std::move(v));
      return &top->back();
    }
    *slot_ = std::move(v);
    return slot_;
  }
  bool open(Json v, bool params) {
    Json* node = put(std::move(v));
    stack_.push_back(Level{node, params});
    return true;
  }
  bool close() {
    stack_.pop_back();
    return true;
  }

  Json* root_;
  std::vector<Level> stack_;
  std::string key_;
  Json* slot_ = nullptr;
  std::string error_;
};

}  // namespace

std::string echo(std::string_view input) {
  if (input.size() <= kEchoBytesMax) return "\"" + std::string(input) + "\"";
  size_t cut = kEchoBytesMax;
  // Do not end inside a UTF-8 sequence.
  while (cut > 0 && (static_cast<unsigned char>(input[cut]) & 0xC0) == 0x80) --cut;
  return "\"" + std::string(input.substr(0, cut)) + "…\"";
}

Result<Json> parse_json(std::string_view text) {
  Json root;
  StrictDom dom(&root);
  bool ok = false;
  try {
    ok = Json::sax_parse(text.begin(), text.end(), &dom);
  } catch (const std::exception&) {
    return invalid_argument("malformed JSON");
  }
  if (!ok) return invalid_argument(dom.error().empty() ? "malformed JSON" : dom.error());
  return root;
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

Result<Json> parse_empty_object(std::string_view body) {
  auto j = parse_object(body);
  if (!j.ok()) return j.status();
  FieldReader r(*j);
  TPC_RETURN_IF_ERROR(r.finish());
  return j;
}

std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

const Json* FieldReader::find(std::string_view key) {
  allow(key);
  auto it = obj_.find(key);
  return it == obj_.end() || it->is_null() ? nullptr : &*it;
}

Status FieldReader::finish() const {
  if (!status_.ok()) return status_;
  for (auto& [k, v] : obj_.items()) {
    bool known = false;
    for (auto& name : known_) known = known || name == k;
    if (!known) return invalid_argument("unknown field " + echo(k));
  }
  return ok_status();
}

bool FieldReader::string(std::string_view key, std::string* out, bool required, size_t max_bytes) {
  const Json* it = find(key);
  if (!it) {
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
  const Json* it = find(key);
  if (!it) {
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
  const Json* it = find(key);
  if (!it) {
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
  const Json* it = find(key);
  if (!it) {
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
  return it;
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

HttpResponse method_not_allowed(std::string_view allow) {
  HttpResponse r =
      error_response(405, "method_not_allowed",
                     "method not allowed on this path (allowed: " + std::string(allow) + ")");
  r.headers.emplace_back("allow", std::string(allow));
  return r;
}

}  // namespace tpc
