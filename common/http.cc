#include "common/http.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <charconv>
#include <ctime>

namespace tpc {
namespace {

std::string_view find_header(const Headers& h, std::string_view name) {
  for (auto& [k, v] : h)
    if (k == name) return v;
  return {};
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string_view HttpRequest::header(std::string_view name) const {
  return find_header(headers, name);
}

std::string_view HttpResponse::header(std::string_view name) const {
  return find_header(headers, name);
}

std::string_view HttpRequest::path() const {
  std::string_view t = target;
  return t.substr(0, t.find('?'));
}

std::optional<std::string> HttpRequest::query_param(std::string_view name) const {
  std::string_view t = target;
  size_t q = t.find('?');
  if (q == std::string_view::npos) return std::nullopt;
  std::string_view rest = t.substr(q + 1);
  while (!rest.empty()) {
    size_t amp = rest.find('&');
    std::string_view kv = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    size_t eq = kv.find('=');
    std::string_view k = kv.substr(0, eq);
    if (k != name) continue;
    std::string_view v = eq == std::string_view::npos ? std::string_view() : kv.substr(eq + 1);
    return percent_decode(v);
  }
  return std::nullopt;
}

bool url_within(const Url& prefix, std::string_view text) {
  auto url = parse_url(text);
  if (!url.ok()) return false;
  std::string_view path = url->base_path;  // parse_url refuses queries
  // Refused too: what some servers turn into a separator or strip before they resolve dots
  // ("..%2F", "..\\", "..;").
  for (std::string_view segment : split_path(path)) {
    auto decoded = percent_decode(segment);
    if (!decoded || *decoded == "." || *decoded == ".." ||
        decoded->find_first_of("/\\;") != std::string::npos)
      return false;
  }
  auto lower = [](unsigned char c) { return std::tolower(c); };
  bool same_host = std::ranges::equal(prefix.host, url->host, {}, lower, lower);
  return same_host && prefix.port == url->port &&
         (path == prefix.base_path || path.starts_with(prefix.base_path + "/"));
}

std::optional<int64_t> parse_http_date(std::string_view text) {
  if (text.size() > 64) return std::nullopt;
  std::string t(text);
  // strptime reads day and month names in the C locale, which the services never change.
  for (const char* format :
       {"%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"}) {
    std::tm tm{};
    const char* end = strptime(t.c_str(), format, &tm);
    if (end != nullptr && *end == '\0') return static_cast<int64_t>(timegm(&tm));
  }
  return std::nullopt;
}

std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      int hi = hex_value(s[i + 1]), lo = hex_value(s[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else if (s[i] == '+') {
      out.push_back(' ');
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

struct Responder::State {
  std::function<void(HttpResponse)> fn;
  std::atomic<bool> done{false};
  ~State() {
    if (!done.exchange(true) && fn) {
      HttpResponse r;
      r.status = 500;
      r.body =
          R"({"error":{"code":"internal","message":"the request was dropped without an answer"}})";
      fn(std::move(r));
    }
  }
};

Responder::Responder(std::function<void(HttpResponse)> fn) : state_(std::make_shared<State>()) {
  state_->fn = std::move(fn);
}

void Responder::operator()(HttpResponse response) const {
  if (!state_ || state_->done.exchange(true)) return;
  state_->fn(std::move(response));
}

std::string Url::to_string() const {
  std::string h = host.find(':') == std::string::npos ? host : "[" + host + "]";
  return "http://" + h + ":" + std::to_string(port) + base_path;
}

Result<Url> parse_url(std::string_view text) {
  std::string_view t = text;
  if (t.substr(0, 7) != "http://")
    return invalid_argument("URL \"" + std::string(text) + "\" must start with http://");
  t.remove_prefix(7);
  size_t slash = t.find('/');
  std::string_view hostport = t.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view() : t.substr(slash);
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  Url u;
  // An IPv6 literal is bracketed: http://[::1]:7400; Url::host keeps it without brackets.
  bool ipv6 = !hostport.empty() && hostport.front() == '[';
  std::string_view port_part;
  bool has_port = false;
  if (ipv6) {
    size_t close = hostport.find(']');
    if (close == std::string_view::npos)
      return invalid_argument("URL \"" + std::string(text) + "\" has a bad host");
    u.host = std::string(hostport.substr(1, close - 1));
    std::string_view rest = hostport.substr(close + 1);
    if (!rest.empty() && rest.front() != ':')
      return invalid_argument("URL \"" + std::string(text) + "\" has a bad host");
    has_port = !rest.empty();
    if (has_port) port_part = rest.substr(1);
  } else {
    size_t colon = hostport.rfind(':');
    u.host = std::string(hostport.substr(0, colon));
    has_port = colon != std::string_view::npos;
    if (has_port) port_part = hostport.substr(colon + 1);
  }
  if (has_port) {
    std::string_view p = port_part;
    unsigned port = 0;
    auto [ptr, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
    if (p.empty() || ec != std::errc() || ptr != p.data() + p.size() || port == 0 || port > 65535)
      return invalid_argument("URL \"" + std::string(text) + "\" has a bad port");
    u.port = static_cast<uint16_t>(port);
  }
  if (u.host.empty()) return invalid_argument("URL \"" + std::string(text) + "\" has no host");
  for (char c : u.host)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ||
          (ipv6 && c == ':')))
      return invalid_argument("URL \"" + std::string(text) + "\" has a bad host");
  for (char c : path)
    if (c == '?' || c == '#' || c == ' ')
      return invalid_argument("URL \"" + std::string(text) + "\" must not carry a query");
  u.base_path = std::string(path);
  return u;
}

std::vector<std::string_view> split_path(std::string_view path) {
  std::vector<std::string_view> parts;
  while (!path.empty()) {
    if (path[0] == '/') {
      path.remove_prefix(1);
      continue;
    }
    size_t slash = path.find('/');
    parts.push_back(path.substr(0, slash));
    path = slash == std::string_view::npos ? std::string_view() : path.substr(slash);
  }
  return parts;
}

bool has_bearer_token(const HttpRequest& req, std::string_view token) {
  std::string_view got = req.header("authorization");
  constexpr std::string_view kBearer = "Bearer ";
  if (got.size() != kBearer.size() + token.size() || !got.starts_with(kBearer)) return false;
  got.remove_prefix(kBearer.size());
  unsigned char diff = 0;
  for (size_t i = 0; i < token.size(); ++i) diff |= static_cast<unsigned char>(got[i] ^ token[i]);
  return diff == 0;
}

}  // namespace tpc
