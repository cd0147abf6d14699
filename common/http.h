// Plain HTTP request/response types and URL parsing, free of Boost.
//
// Handlers and clients see only these structs; the Beast code lives in http_server.cc and
// http_client.cc. Header names are stored lower-case.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace tpc {

using Headers = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query, e.g. "/v1/transactions?state=active"
  Headers headers;     // names lower-case
  std::string body;
  std::string client;  // the peer's IP address (set by HttpServer; empty elsewhere)

  // The value of a header (name lower-case), or empty.
  std::string_view header(std::string_view name) const;
  // The target without its query string.
  std::string_view path() const;
  // The decoded value of a query parameter, if present.
  std::optional<std::string> query_param(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string body;
  std::string content_type = "application/json";
  Headers headers;  // extra headers, e.g. {"retry-after", "1"}

  std::string_view header(std::string_view name) const;
};

// Completes one request. Copyable; the first call wins and later calls are ignored. It may be
// called from any thread, at any later time. If every copy is dropped without a call, the
// server answers 500 so a connection never hangs.
class Responder {
 public:
  Responder() = default;
  explicit Responder(std::function<void(HttpResponse)> fn);
  void operator()(HttpResponse response) const;
  explicit operator bool() const { return state_ != nullptr; }

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// The server calls this once per request on a loop thread. It must not block: long work is
// handed to another thread and answered through the Responder later.
using HttpHandler = std::function<void(HttpRequest&& request, Responder respond)>;

// "http://host:port[/base]". Only plain http.
struct Url {
  std::string host;
  uint16_t port = 80;
  std::string base_path;  // "" or "/prefix" without a trailing slash

  std::string to_string() const;  // "http://host:port/base"
  bool operator==(const Url&) const = default;
};

Result<Url> parse_url(std::string_view text);

// Whether `url` lies under `prefix`: the same host (any case) and port, and a path equal to the
// prefix's or below it on a segment boundary, with no "." or ".." segment and no segment
// holding "/", "\\" or ";" (escaped or not).
// So http://h/ok allows http://h:80/ok/x but neither http://h:8080/ok, http://h/okay nor
// http://h/ok/../admin.
bool url_within(const Url& prefix, std::string_view url);

// An HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, or the obsolete RFC 850 and asctime forms) as
// seconds since the Unix epoch; nullopt when it is none of them.
std::optional<int64_t> parse_http_date(std::string_view text);

// "%XX" decoding for path segments and query values; nullopt on a malformed escape.
std::optional<std::string> percent_decode(std::string_view s);

// The non-empty segments of a path: "/v1/transactions/x" → {"v1", "transactions", "x"}.
std::vector<std::string_view> split_path(std::string_view path);

// Whether the request carries "Authorization: Bearer <token>", compared in constant time.
bool has_bearer_token(const HttpRequest& req, std::string_view token);

}  // namespace tpc
