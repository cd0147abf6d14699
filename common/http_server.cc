// HttpServer: the Beast implementation behind common/http_server.h.
//
// Shape (after Beast's advanced_server.cpp): a listener accepts on its own strand and starts
// one Session per connection on a fresh strand. A session reads one request at a time into a
// fresh request_parser (body and header limits), hands it to the handler as a tpc::HttpRequest
// and writes the answer when the Responder fires, then reads the next request (keep-alive).
//
// Deadlines (beast::basic_stream::expires_*): a new connection has header_timeout_ms from the
// accept to the end of its first request's headers, a kept-alive one idle_timeout_ms to send a
// request's first byte and header_timeout_ms from then to the end of its headers; once a
// request's first byte arrived, the whole request must arrive within read_timeout_ms. Writing
// an answer also has read_timeout_ms. On a deadline the connection closes without an answer.
//
// Limits: a connection is counted (connections_open) while fewer than connections_max are
// open and fewer than connections_per_client_max from its address. Any other is an
// over-limit session, at most connections_max of them: it reads one request and hands it to
// the handler only if its path is unlimited_path (else 503), then closes. Past that too, a
// connection is answered 503 without being read.
//
// Errors that end a connection (413, 431, 400, 503) are answered, then the session shuts its
// sending side down and drains what the client still sends for a moment before closing, so
// the client reads the answer instead of a connection reset.
#include "common/http_server.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/status.hpp>
#include <boost/beast/http/string_body.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "common/assert.h"

namespace tpc {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Strand = asio::strand<asio::io_context::executor_type>;
using Stream = beast::basic_stream<tcp, Strand>;
using Socket = tcp::socket::rebind_executor<Strand>::other;
using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;

constexpr size_t kReadChunkBytes = 16 << 10;
constexpr int64_t kLingerMsMax = 2'000;  // draining a connection we are closing
constexpr int64_t kAcceptRetryMs = 50;   // after an accept error such as EMFILE

void append_json_escaped(std::string& out, std::string_view s) {
  for (char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
}

HttpResponse error_answer(int status, std::string_view code, std::string_view message) {
  HttpResponse r;
  r.status = status;
  r.body.reserve(48 + message.size());
  r.body += R"({"error":{"code":")";
  r.body += code;
  r.body += R"(","message":")";
  append_json_escaped(r.body, message);
  r.body += "\"}}";
  return r;
}

void append_number(std::string& out, uint64_t v) {
  char buf[24];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  TPC_ASSERT(ec == std::errc());
  out.append(buf, end);
}

bool header_text_ok(std::string_view s) {
  for (char c : s)
    if (c == '\r' || c == '\n' || c == '\0') return false;
  return true;
}

std::string host_port(const std::string& host, uint16_t port) {
  std::string s = host.find(':') == std::string::npos ? host : "[" + host + "]";
  s += ':';
  s += std::to_string(port);
  return s;
}

class Session;

// Everything the listener and the sessions share; owned by HttpServer and by every session.
struct ServerState : std::enable_shared_from_this<ServerState> {
  ServerState(asio::io_context& io_, const HttpServerOptions& opts_, HttpHandler handler_)
      : io(io_),
        opts(opts_),
        handler(std::move(handler_)),
        accept_strand(asio::make_strand(io_)),
        acceptor(accept_strand),
        retry_timer(accept_strand) {}

  void do_accept();
  void on_accept(const boost::system::error_code& ec, Socket socket);
  // Decides the session's Admission and registers it; false once stop() ran.
  bool admit(Session& session);
  void stop();
  void request_started() { in_flight.fetch_add(1); }
  void request_done() {
    if (in_flight.fetch_sub(1) == 1) {
      std::lock_guard lock(mu);
      idle_cv.notify_all();
    }
  }

  asio::io_context& io;
  const HttpServerOptions opts;
  const HttpHandler handler;
  Strand accept_strand;
  tcp::acceptor acceptor;          // on accept_strand
  asio::steady_timer retry_timer;  // on accept_strand
  uint16_t port = 0;

  std::atomic<uint64_t> accepted{0};
  std::atomic<size_t> open{0};
  std::atomic<size_t> in_flight{0};
  std::atomic<size_t> over_limit{0};

  std::mutex mu;
  std::condition_variable idle_cv;                                // in_flight reached 0
  bool stopping_locked = false;                                   // under mu
  std::atomic<bool> stopping{false};                              // set together with it
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions;  // under mu
  std::unordered_map<std::string, size_t> per_client;             // under mu: counted ones
};

// One connection. Every member function runs on the session's strand, except respond()
// which the Responder calls from any thread.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(std::shared_ptr<ServerState> server, Socket socket, std::string client)
      : server_(std::move(server)), stream_(std::move(socket)), client_(std::move(client)) {}
  ~Session();

  enum class Admission { counted, over_limit, refused };
  // counted: in connections_open and per_client; over_limit: reads one request for
  // unlimited_path; refused: answers 503 at once. Both of the first are registered for stop().
  void admit(Admission a) { admission_ = a; }
  const std::string& client() const { return client_; }

  Strand executor() { return stream_.get_executor(); }
  void start();
  void close_if_idle() {
    if (phase_ == Phase::idle) do_close();
  }
  // From any thread, exactly once per request (the Responder guarantees it).
  void respond(HttpResponse res);

 private:
  enum class Phase { idle, reading, handling, writing, closing, closed };

  const HttpServerOptions& opts() const { return server_->opts; }
  void begin_message();
  void first_byte_arrived();
  void parse_buffered();
  void read_more();
  void on_read(const boost::system::error_code& ec, size_t n);
  void on_parse_error(const boost::system::error_code& ec);
  bool expects_continue() const;
  void write_continue();
  void on_request();
  void write_response(HttpResponse res);
  void on_write(const boost::system::error_code& ec);
  void end_request();
  void linger_close();
  void drain();
  void do_close();

  std::shared_ptr<ServerState> server_;
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::string head_;  // the answer's status line and headers while it is written
  std::string body_;  // the answer's body while it is written
  std::string client_;  // the peer's address
  Clock::time_point request_deadline_;
  Clock::time_point header_deadline_;
  std::shared_ptr<Session> self_hold_;  // keeps the session alive while a handler holds it
  Phase phase_ = Phase::idle;
  Admission admission_ = Admission::refused;
  bool first_request_ = true;
  bool keep_alive_ = false;
  bool http10_ = false;
  bool head_request_ = false;
  bool continue_sent_ = false;
  bool in_flight_ = false;
};

Session::~Session() {
  end_request();  // only when the io_context went away with the answer still queued
  if (admission_ == Admission::refused) return;
  (admission_ == Admission::counted ? server_->open : server_->over_limit).fetch_sub(1);
  std::lock_guard lock(server_->mu);
  server_->sessions.erase(this);
  if (admission_ == Admission::counted) {
    auto it = server_->per_client.find(client_);
    if (it != server_->per_client.end() && --it->second == 0) server_->per_client.erase(it);
  }
}

void Session::start() {
  if (admission_ == Admission::refused) {
    keep_alive_ = false;
    HttpResponse r = error_answer(503, "unavailable", "too many connections");
    r.headers.emplace_back("retry-after", "1");
    write_response(std::move(r));
    return;
  }
  header_deadline_ = Clock::now() + Millis(opts().header_timeout_ms);
  begin_message();
}

void Session::begin_message() {
  parser_.emplace();
  parser_->eager(true);
  parser_->body_limit(opts().body_max_bytes);
  parser_->header_limit(
      static_cast<uint32_t>(std::min<size_t>(opts().header_max_bytes, UINT32_MAX)));
  continue_sent_ = false;
  head_request_ = false;
  http10_ = false;
  if (buffer_.size() > 0) first_byte_arrived();
  parse_buffered();
}

void Session::parse_buffered() {
  while (buffer_.size() > 0) {
    boost::system::error_code ec;
    size_t n = parser_->put(buffer_.data(), ec);
    buffer_.consume(n);
    if (ec == http::error::need_more) break;
    if (ec) return on_parse_error(ec);
    if (parser_->is_done()) return on_request();
    if (n == 0) break;
  }
  if (parser_->is_header_done() && !continue_sent_ && expects_continue()) return write_continue();
  read_more();
}

void Session::read_more() {
  bool started = parser_->got_some() || buffer_.size() > 0;
  if (!started) {
    if (server_->stopping.load()) return do_close();
    phase_ = Phase::idle;
    if (first_request_)
      stream_.expires_at(std::min(header_deadline_, Clock::now() + Millis(opts().read_timeout_ms)));
    else
      stream_.expires_after(Millis(opts().idle_timeout_ms));
  } else {
    phase_ = Phase::reading;
    stream_.expires_at(parser_->is_header_done() ? request_deadline_
                                                 : std::min(request_deadline_, header_deadline_));
  }
  stream_.async_read_some(buffer_.prepare(kReadChunkBytes),
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      size_t n) { self->on_read(ec, n); });
}

void Session::on_read(const boost::system::error_code& ec, size_t n) {
  if (phase_ == Phase::closed) return;
  // End of stream, deadline, reset or stop(): there is nobody or nothing to answer.
  if (ec) return do_close();
  buffer_.commit(n);
  if (phase_ == Phase::idle) first_byte_arrived();
  phase_ = Phase::reading;
  parse_buffered();
}

void Session::first_byte_arrived() {
  Clock::time_point now = Clock::now();
  request_deadline_ = now + Millis(opts().read_timeout_ms);
  if (!first_request_) header_deadline_ = now + Millis(opts().header_timeout_ms);
}

void Session::on_parse_error(const boost::system::error_code& ec) {
  keep_alive_ = false;
  if (ec == http::error::body_limit) {
    write_response(error_answer(
        413, "too_large",
        "the request body exceeds " + std::to_string(opts().body_max_bytes) + " bytes"));
  } else if (ec == http::error::header_limit) {
    write_response(error_answer(
        431, "too_large",
        "the request header exceeds " + std::to_string(opts().header_max_bytes) + " bytes"));
  } else {
    write_response(
        error_answer(400, "invalid_argument", "malformed HTTP request: " + ec.message()));
  }
}

bool Session::expects_continue() const {
  const auto& h = parser_->get();
  auto it = h.find(http::field::expect);
  return it != h.end() && beast::iequals(it->value(), "100-continue");
}

void Session::write_continue() {
  static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
  continue_sent_ = true;
  phase_ = Phase::reading;
  stream_.expires_at(request_deadline_);
  asio::async_write(stream_, asio::buffer(kContinue.data(), kContinue.size()),
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      if (ec) return self->do_close();
                      self->read_more();
                    });
}

void Session::on_request() {
  auto& m = parser_->get();
  HttpRequest req;
  req.method = std::string(m.method_string());
  for (char& c : req.method)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  req.target = std::string(m.target());
  for (const auto& f : m) {
    std::string name(f.name_string());
    for (char& c : name)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    req.headers.emplace_back(std::move(name), std::string(f.value()));
  }
  req.body = std::move(m.body());
  req.client = client_;
  keep_alive_ = m.keep_alive() && admission_ == Admission::counted;
  http10_ = m.version() < 11;
  head_request_ = m.method() == http::verb::head;
  parser_.reset();
  first_request_ = false;
  in_flight_ = true;
  server_->request_started();
  phase_ = Phase::handling;
  if (server_->stopping.load()) {
    keep_alive_ = false;
    HttpResponse r = error_answer(503, "unavailable", "the server is stopping");
    r.headers.emplace_back("retry-after", "1");
    return write_response(std::move(r));
  }
  if (admission_ == Admission::over_limit && req.path() != opts().unlimited_path) {
    HttpResponse r = error_answer(503, "unavailable", "too many connections");
    r.headers.emplace_back("retry-after", "1");
    return write_response(std::move(r));
  }
  // The Responder's function holds a plain pointer (so it fits std::function's inline
  // storage); self_hold_ keeps the session alive until the Responder fires, which it does
  // exactly once, at the latest when its last copy is dropped (then with a 500).
  self_hold_ = shared_from_this();
  Session* s = this;
  Responder respond([s](HttpResponse res) { s->respond(std::move(res)); });
  // Nothing below the handler call may touch the session: the handler may have answered
  // inline, and the answer may already be on its way.
  try {
    server_->handler(std::move(req), std::move(respond));
  } catch (...) {
    // A throwing handler is a bug in it; its Responder was dropped, so the client gets 500.
  }
}

void Session::respond(HttpResponse res) {
  std::shared_ptr<Session> self = std::move(self_hold_);
  TPC_ASSERT(self != nullptr);
  asio::dispatch(stream_.get_executor(), [self = std::move(self), res = std::move(res)]() mutable {
    self->write_response(std::move(res));
  });
}

void Session::write_response(HttpResponse res) {
  if (phase_ == Phase::closed) return end_request();
  phase_ = Phase::writing;
  if (server_->stopping.load()) keep_alive_ = false;
  int status = res.status >= 100 && res.status <= 999 ? res.status : 500;
  bool own_content_type = false;
  for (const auto& [k, v] : res.headers)
    if (beast::iequals(k, "content-type")) own_content_type = true;

  head_.clear();
  head_ += "HTTP/1.1 ";
  append_number(head_, static_cast<uint64_t>(status));
  head_ += ' ';
  head_ += http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  head_ += "\r\n";
  if (!own_content_type && !res.content_type.empty() && header_text_ok(res.content_type)) {
    head_ += "Content-Type: ";
    head_ += res.content_type;
    head_ += "\r\n";
  }
  head_ += "Content-Length: ";
  append_number(head_, res.body.size());
  head_ += "\r\n";
  for (const auto& [k, v] : res.headers) {
    // The framing headers are the server's; a value that could split the header is dropped.
    if (k.empty() || !header_text_ok(k) || !header_text_ok(v) || k.find(':') != std::string::npos ||
        beast::iequals(k, "content-length") || beast::iequals(k, "connection") ||
        beast::iequals(k, "transfer-encoding"))
      continue;
    head_ += k;
    head_ += ": ";
    head_ += v;
    head_ += "\r\n";
  }
  if (!keep_alive_)
    head_ += "Connection: close\r\n";
  else if (http10_)
    head_ += "Connection: keep-alive\r\n";
  head_ += "\r\n";
  body_ = std::move(res.body);

  stream_.expires_after(Millis(opts().read_timeout_ms));
  std::array<asio::const_buffer, 2> bufs{
      asio::buffer(head_), asio::buffer(body_.data(), head_request_ ? 0 : body_.size())};
  asio::async_write(stream_, bufs,
                    [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                      self->on_write(ec);
                    });
}

void Session::on_write(const boost::system::error_code& ec) {
  end_request();
  if (body_.capacity() > kReadChunkBytes)
    std::string().swap(body_);
  else
    body_.clear();
  if (ec || phase_ == Phase::closed) return do_close();
  if (!keep_alive_ || server_->stopping.load()) return linger_close();
  begin_message();
}

void Session::end_request() {
  if (!in_flight_) return;
  in_flight_ = false;
  server_->request_done();
}

void Session::linger_close() {
  phase_ = Phase::closing;
  boost::system::error_code ec;
  stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  stream_.expires_after(Millis(std::min(opts().read_timeout_ms, kLingerMsMax)));
  drain();
}

void Session::drain() {
  buffer_.clear();
  stream_.async_read_some(buffer_.prepare(kReadChunkBytes),
                          [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                            if (ec || self->phase_ == Phase::closed) return self->do_close();
                            self->drain();
                          });
}

void Session::do_close() {
  if (phase_ == Phase::closed) return;
  phase_ = Phase::closed;
  stream_.close();  // a pending read completes with operation_aborted
}

void ServerState::do_accept() {
  acceptor.async_accept(
      asio::make_strand(io),
      [self = shared_from_this()](const boost::system::error_code& ec, Socket socket) {
        self->on_accept(ec, std::move(socket));
      });
}

void ServerState::on_accept(const boost::system::error_code& ec, Socket socket) {
  if (ec == asio::error::operation_aborted || stopping.load()) return;
  if (ec) {
    // Out of descriptors or a connection that died in the backlog: try again shortly.
    retry_timer.expires_after(Millis(kAcceptRetryMs));
    retry_timer.async_wait([self = shared_from_this()](const boost::system::error_code& e) {
      if (!e && !self->stopping.load()) self->do_accept();
    });
    return;
  }
  accepted.fetch_add(1);
  boost::system::error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);
  tcp::endpoint peer = socket.remote_endpoint(ignored);
  std::string client = ignored ? std::string() : peer.address().to_string();
  auto session = std::make_shared<Session>(shared_from_this(), std::move(socket), std::move(client));
  if (!admit(*session)) return;  // stop() ran meanwhile; the socket closes unanswered
  asio::post(session->executor(), [session] { session->start(); });
  do_accept();
}

bool ServerState::admit(Session& session) {
  std::lock_guard lock(mu);
  if (stopping_locked) return false;
  size_t& from_client = per_client[session.client()];
  if (open.load() < opts.connections_max && from_client < opts.connections_per_client_max) {
    session.admit(Session::Admission::counted);
    ++from_client;
    open.fetch_add(1);
  } else {
    if (from_client == 0) per_client.erase(session.client());
    if (over_limit.load() >= opts.connections_max) return true;  // refused: 503 unread
    session.admit(Session::Admission::over_limit);
    over_limit.fetch_add(1);
  }
  sessions.emplace(&session, session.weak_from_this());
  return true;
}

void ServerState::stop() {
  std::vector<std::shared_ptr<Session>> live;
  {
    std::lock_guard lock(mu);
    if (stopping_locked) return;
    stopping_locked = true;
    stopping.store(true);
    live.reserve(sessions.size());
    for (auto& [ptr, weak] : sessions)
      if (auto s = weak.lock()) live.push_back(std::move(s));
  }
  asio::post(accept_strand, [self = shared_from_this()] {
    boost::system::error_code ec;
    self->acceptor.close(ec);
    self->retry_timer.cancel();
  });
  for (auto& s : live) asio::post(s->executor(), [s] { s->close_if_idle(); });
}

}  // namespace

struct HttpServer::Impl : ServerState {
  using ServerState::ServerState;
};

Result<std::unique_ptr<HttpServer>> HttpServer::start(EventLoop& loop,
                                                      const HttpServerOptions& opts,
                                                      HttpHandler handler) {
  TPC_ASSERT(handler != nullptr);
  auto& io = *static_cast<asio::io_context*>(loop.native());
  std::string where = host_port(opts.host, opts.port);
  if (opts.body_max_bytes == 0 || opts.header_max_bytes == 0 || opts.read_timeout_ms <= 0 ||
      opts.header_timeout_ms <= 0 || opts.idle_timeout_ms <= 0 || opts.connections_max == 0 ||
      opts.connections_per_client_max == 0)
    return invalid_argument("cannot listen on " + where +
                            ": body/header limits, timeouts and connection limits must be > 0");
  boost::system::error_code ec;
  asio::ip::address addr;
  if (opts.host == "localhost")
    addr = asio::ip::address_v4::loopback();
  else
    addr = asio::ip::make_address(opts.host, ec);
  if (ec)
    return invalid_argument("cannot listen on " + where +
                            ": the host must be an IPv4 or IPv6 address or localhost");

  auto impl = std::make_shared<Impl>(io, opts, std::move(handler));
  tcp::endpoint endpoint(addr, opts.port);
  tcp::acceptor& acceptor = impl->acceptor;
  if (acceptor.open(endpoint.protocol(), ec); ec)
    return io_error("cannot listen on " + where + ": " + ec.message());
  if (acceptor.set_option(asio::socket_base::reuse_address(true), ec); ec)
    return io_error("cannot listen on " + where + ": " + ec.message());
  if (acceptor.bind(endpoint, ec); ec)
    return io_error("cannot listen on " + where + ": " + ec.message());
  if (acceptor.listen(asio::socket_base::max_listen_connections, ec); ec)
    return io_error("cannot listen on " + where + ": " + ec.message());
  tcp::endpoint local = acceptor.local_endpoint(ec);
  if (ec) return io_error("cannot listen on " + where + ": " + ec.message());
  impl->port = local.port();
  impl->do_accept();
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

HttpServer::HttpServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  impl_->stop();
}

uint16_t HttpServer::port() const {
  return impl_->port;
}

void HttpServer::stop() {
  impl_->stop();
}

bool HttpServer::wait_idle(int64_t timeout_ms) {
  std::unique_lock lock(impl_->mu);
  return impl_->idle_cv.wait_for(lock, Millis(timeout_ms < 0 ? 0 : timeout_ms),
                                 [&] { return impl_->in_flight.load() == 0; });
}

uint64_t HttpServer::connections_accepted() const {
  return impl_->accepted.load();
}

size_t HttpServer::connections_open() const {
  return impl_->open.load();
}

size_t HttpServer::connections_over_limit() const {
  return impl_->over_limit.load();
}

size_t HttpServer::requests_in_flight() const {
  return impl_->in_flight.load();
}

}  // namespace tpc
