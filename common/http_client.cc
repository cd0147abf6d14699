// HttpClient: the Beast implementation behind common/http_client.h.
//
// A ClientState (shared by the client and every connection) keeps, per host:port, a pool of
// idle keep-alive connections (LIFO, expired lazily), a count of connections carrying a request
// and a bounded queue of requests waiting for one. A Conn carries one call at a time on its
// own strand: connect (numeric hosts directly, names through a small resolve cache), write the
// request (serialised by hand: one string for the head, the body as is), read the answer with
// a response_parser, then hand the connection to the next queued call or back to the pool.
//
// Every call's `done` is owned under ClientState::mu until it is called, so the destructor can
// take the callbacks of queued and in-flight calls and answer them unavailable itself; it then
// waits for callbacks already running on loop threads, so none runs after it returns.
#include "common/http_client.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <cctype>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "common/assert.h"

namespace tpc {

std::string_view HttpResult::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (k == name) return v;
  return {};
}

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Strand = asio::strand<asio::io_context::executor_type>;
using Stream = beast::basic_stream<tcp, Strand>;
using Clock = std::chrono::steady_clock;
using Millis = std::chrono::milliseconds;
using Done = std::function<void(HttpResult)>;

constexpr uint32_t kResponseHeaderMaxBytes = 64 << 10;
constexpr int64_t kResolveCacheMs = 30'000;
constexpr int64_t kTimeoutMsMax = int64_t{365} * 24 * 3600 * 1000;

std::string host_port(const std::string& host, uint16_t port) {
  std::string s = host.find(':') == std::string::npos ? host : "[" + host + "]";
  s += ':';
  char buf[8];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, port);
  TPC_ASSERT(ec == std::errc());
  s.append(buf, end);
  return s;
}

bool is_token(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (!(std::isalnum(u) || std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos))
      return false;
  }
  return true;
}

bool is_field_value(std::string_view s) {
  for (char c : s)
    if (c == '\r' || c == '\n' || c == '\0') return false;
  return true;
}

// One request, queued or in flight.
struct Call {
  std::string head;  // request line and headers, up to the blank line
  std::string body;
  Done done;  // under ClientState::mu while queued or in flight
  Clock::time_point deadline;
  int64_t timeout_ms = 0;
  bool idempotent = true;
  bool head_method = false;
  bool retried = false;
};

class Conn;

struct HostPool {
  std::string host;
  uint16_t port = 0;
  std::string where;                         // "host:port" for Host and messages
  std::optional<asio::ip::address> numeric;  // set when host is an IP literal
  // All below under ClientState::mu.
  std::vector<tcp::endpoint> resolved;
  Clock::time_point resolved_at;
  std::deque<std::shared_ptr<Conn>> idle;  // back = most recently used
  size_t busy = 0;                         // connections carrying a call
  std::deque<Call> queue;
};

struct ClientState : std::enable_shared_from_this<ClientState> {
  ClientState(asio::io_context& io_, const HttpClientOptions& opts_) : io(io_), opts(opts_) {}

  void submit(Call call, const std::string& host, uint16_t port);
  HostPool& pool_for(const std::string& host, uint16_t port);  // mu held
  std::shared_ptr<Conn> take_idle(HostPool& pool, std::vector<std::shared_ptr<Conn>>& expired);
  void put_idle(HostPool& pool, std::shared_ptr<Conn> conn,
                std::vector<std::shared_ptr<Conn>>& expired);
  std::shared_ptr<Conn> new_conn(HostPool& pool, Call call);  // mu held
  void link(Conn* c);                                         // mu held
  void unlink(Conn* c);                                       // mu held
  // Calls `done` for a call that left the books; `running` was raised under mu.
  void deliver(Done& done, HttpResult result);
  void shutdown();

  asio::io_context& io;
  const HttpClientOptions opts;

  std::mutex mu;
  std::unordered_map<std::string, std::unique_ptr<HostPool>> pools;  // under mu
  Conn* active_head = nullptr;  // conns carrying a call, under mu
  bool closed_locked = false;   // under mu
  std::atomic<bool> closed{false};
  std::atomic<size_t> pending{0};
  std::atomic<size_t> running{0};  // callbacks being called
  std::condition_variable running_cv;
};

thread_local const ClientState* tls_in_callback = nullptr;

class Conn : public std::enable_shared_from_this<Conn> {
 public:
  Conn(std::shared_ptr<ClientState> client, HostPool* pool)
      : client_(std::move(client)), pool_(pool), stream_(asio::make_strand(client_->io)) {}
  ~Conn() {
    std::lock_guard lock(client_->mu);
    if (listed_) client_->unlink(this);
  }

  Strand executor() { return stream_.get_executor(); }
  // On the strand: carries call_ (connect if needed, write, read).
  void run();
  // On the strand: ends whatever the connection is doing; the client is going away.
  void close() {
    aborted_ = true;
    if (resolver_) resolver_->cancel();
    stream_.close();
  }

  // Owned by ClientState under mu.
  Call call_;
  bool has_call_ = false;
  bool listed_ = false;
  Conn* prev_ = nullptr;
  Conn* next_ = nullptr;
  Clock::time_point idle_since_;

 private:
  void connect();
  void connect_to(const std::vector<tcp::endpoint>& endpoints);
  void on_connect(const boost::system::error_code& ec);
  void on_write(const boost::system::error_code& ec);
  void on_read(const boost::system::error_code& ec);
  void fail(const boost::system::error_code& ec, bool before_answer);
  Status error_status(const boost::system::error_code& ec) const;
  void retry();
  void finish(HttpResult result, bool reusable);

  std::shared_ptr<ClientState> client_;
  HostPool* pool_;  // owned by client_, which outlives this
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::string_body>> parser_;
  std::optional<tcp::resolver> resolver_;
  std::optional<asio::steady_timer> resolve_timer_;
  bool resolve_timed_out_ = false;
  bool aborted_ = false;  // close() was called
  bool connected_ = false;
  bool reused_ = false;  // carried a call before this one
};

void Conn::run() {
  if (aborted_) return fail(asio::error::operation_aborted, true);
  if (Clock::now() >= call_.deadline) return fail(beast::error::timeout, true);
  stream_.expires_at(call_.deadline);
  if (connected_) {
    std::array<asio::const_buffer, 2> bufs{asio::buffer(call_.head), asio::buffer(call_.body)};
    asio::async_write(stream_, bufs,
                      [self = shared_from_this()](const boost::system::error_code& ec, size_t) {
                        self->on_write(ec);
                      });
    return;
  }
  connect();
}

void Conn::connect() {
  if (pool_->numeric) {
    stream_.async_connect(
        tcp::endpoint(*pool_->numeric, pool_->port),
        [self = shared_from_this()](const boost::system::error_code& ec) { self->on_connect(ec); });
    return;
  }
  std::vector<tcp::endpoint> cached;
  {
    std::lock_guard lock(client_->mu);
    if (!pool_->resolved.empty() && Clock::now() - pool_->resolved_at < Millis(kResolveCacheMs))
      cached = pool_->resolved;
  }
  if (!cached.empty()) return connect_to(cached);

  // The resolver runs getaddrinfo on a helper thread; a timer bounds it by the deadline.
  resolver_.emplace(stream_.get_executor());
  resolve_timer_.emplace(stream_.get_executor());
  resolve_timed_out_ = false;
  resolve_timer_->expires_at(call_.deadline);
  resolve_timer_->async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (ec) return;
    self->resolve_timed_out_ = true;
    self->resolver_->cancel();
  });
  resolver_->async_resolve(pool_->host, std::to_string(pool_->port),
                           [self = shared_from_this()](const boost::system::error_code& ec,
                                                       const tcp::resolver::results_type& results) {
                             self->resolve_timer_->cancel();
                             if (self->resolve_timed_out_)
                               return self->fail(beast::error::timeout, true);
                             if (ec || self->aborted_)
                               return self->fail(ec ? ec : asio::error::operation_aborted, true);
                             std::vector<tcp::endpoint> endpoints;
                             for (const auto& r : results) endpoints.push_back(r.endpoint());
                             if (endpoints.empty())
                               return self->fail(asio::error::host_not_found, true);
                             {
                               std::lock_guard lock(self->client_->mu);
                               self->pool_->resolved = endpoints;
                               self->pool_->resolved_at = Clock::now();
                             }
                             self->connect_to(endpoints);
                           });
}

void Conn::connect_to(const std::vector<tcp::endpoint>& endpoints) {
  stream_.async_connect(
      endpoints, [self = shared_from_this()](const boost::system::error_code& ec,
                                             const tcp::endpoint&) { self->on_connect(ec); });
}

void Conn::on_connect(const boost::system::error_code& ec) {
  if (ec) return fail(ec, true);
  boost::system::error_code ignored;
  stream_.socket().set_option(tcp::no_delay(true), ignored);
  connected_ = true;
  run();
}

void Conn::on_write(const boost::system::error_code& ec) {
  if (ec) return fail(ec, true);
  parser_.emplace();
  parser_->body_limit(client_->opts.response_body_max_bytes);
  parser_->header_limit(kResponseHeaderMaxBytes);
  if (call_.head_method) parser_->skip(true);
  http::async_read(stream_, buffer_, *parser_,
                   [self = shared_from_this()](const boost::system::error_code& e, size_t) {
                     self->on_read(e);
                   });
}

void Conn::on_read(const boost::system::error_code& ec) {
  if (ec) return fail(ec, !parser_->got_some() && buffer_.size() == 0);
  auto& m = parser_->get();
  HttpResult result;
  result.http_status = static_cast<int>(m.result_int());
  result.body = std::move(m.body());
  for (const auto& f : m) {
    std::string name(f.name_string());
    for (char& c : name)
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    result.headers.emplace_back(std::move(name), std::string(f.value()));
  }
  bool reusable = parser_->keep_alive() && buffer_.size() == 0;
  parser_.reset();
  finish(std::move(result), reusable);
}

Status Conn::error_status(const boost::system::error_code& ec) const {
  if (ec == beast::error::timeout)
    return timeout_error("HTTP request to " + pool_->where + " timed out after " +
                         std::to_string(call_.timeout_ms) + " ms");
  if (ec == http::error::body_limit)
    return Status(Code::too_large, "the answer from " + pool_->where + " exceeds " +
                                       std::to_string(client_->opts.response_body_max_bytes) +
                                       " bytes");
  return unavailable("HTTP request to " + pool_->where + " failed: " + ec.message());
}

void Conn::fail(const boost::system::error_code& ec, bool before_answer) {
  // The server may close a kept-alive connection just as we reuse it; then nothing of the
  // request was processed and an idempotent request is safe to send again.
  bool peer_closed = ec == asio::error::eof || ec == http::error::end_of_stream ||
                     ec == asio::error::connection_reset || ec == asio::error::broken_pipe ||
                     ec == asio::error::connection_aborted;
  if (reused_ && before_answer && peer_closed && call_.idempotent && !call_.retried) return retry();
  HttpResult result;
  result.status = error_status(ec);
  finish(std::move(result), false);
}

void Conn::retry() {
  stream_.close();
  connected_ = false;
  std::shared_ptr<Conn> fresh;
  {
    std::lock_guard lock(client_->mu);
    if (!has_call_) return;  // the client is gone and answered the call itself
    has_call_ = false;
    client_->unlink(this);
    call_.retried = true;
    fresh = client_->new_conn(*pool_, std::move(call_));
  }
  asio::post(fresh->executor(), [fresh] { fresh->run(); });
}

void Conn::finish(HttpResult result, bool reusable) {
  if (!reusable) {
    stream_.close();
    connected_ = false;
  }
  Done done;
  std::shared_ptr<Conn> next;
  std::vector<std::shared_ptr<Conn>> expired;  // destroyed after the lock is released
  {
    std::lock_guard lock(client_->mu);
    if (!has_call_) return;  // the client is gone and answered the call itself
    done = std::move(call_.done);
    has_call_ = false;
    client_->unlink(this);
    HostPool& pool = *pool_;
    if (!pool.queue.empty()) {
      Call call = std::move(pool.queue.front());
      pool.queue.pop_front();
      if (reusable) {
        call_ = std::move(call);
        has_call_ = true;
        client_->link(this);
        next = shared_from_this();
      } else {
        next = client_->new_conn(pool, std::move(call));
      }
    } else {
      TPC_ASSERT(pool.busy > 0);
      --pool.busy;
      if (reusable) client_->put_idle(pool, shared_from_this(), expired);
    }
    client_->running.fetch_add(1);
  }
  if (reusable) reused_ = true;
  // Posted, not run inline: a queue of calls past their deadline must not recurse.
  if (next) asio::post(next->executor(), [next] { next->run(); });
  client_->deliver(done, std::move(result));
}

HostPool& ClientState::pool_for(const std::string& host, uint16_t port) {
  std::string key = host_port(host, port);
  auto it = pools.find(key);
  if (it != pools.end()) return *it->second;
  auto pool = std::make_unique<HostPool>();
  pool->host = host;
  pool->port = port;
  pool->where = key;
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (!ec) pool->numeric = addr;
  return *pools.emplace(std::move(key), std::move(pool)).first->second;
}

std::shared_ptr<Conn> ClientState::take_idle(HostPool& pool,
                                             std::vector<std::shared_ptr<Conn>>& expired) {
  auto now = Clock::now();
  while (!pool.idle.empty()) {
    std::shared_ptr<Conn> c = std::move(pool.idle.back());
    pool.idle.pop_back();
    if (now - c->idle_since_ <= Millis(opts.idle_timeout_ms)) return c;
    expired.push_back(std::move(c));
  }
  return nullptr;
}

void ClientState::put_idle(HostPool& pool, std::shared_ptr<Conn> conn,
                           std::vector<std::shared_ptr<Conn>>& expired) {
  auto now = Clock::now();
  while (!pool.idle.empty() &&
         now - pool.idle.front()->idle_since_ > Millis(opts.idle_timeout_ms)) {
    expired.push_back(std::move(pool.idle.front()));
    pool.idle.pop_front();
  }
  conn->idle_since_ = now;
  pool.idle.push_back(std::move(conn));
}

std::shared_ptr<Conn> ClientState::new_conn(HostPool& pool, Call call) {
  auto c = std::make_shared<Conn>(shared_from_this(), &pool);
  c->call_ = std::move(call);
  c->has_call_ = true;
  link(c.get());
  return c;
}

void ClientState::link(Conn* c) {
  TPC_ASSERT(!c->listed_);
  c->listed_ = true;
  c->prev_ = nullptr;
  c->next_ = active_head;
  if (active_head) active_head->prev_ = c;
  active_head = c;
}

void ClientState::unlink(Conn* c) {
  TPC_ASSERT(c->listed_);
  c->listed_ = false;
  if (c->prev_)
    c->prev_->next_ = c->next_;
  else
    active_head = c->next_;
  if (c->next_) c->next_->prev_ = c->prev_;
  c->prev_ = c->next_ = nullptr;
}

void ClientState::submit(Call call, const std::string& host, uint16_t port) {
  std::shared_ptr<Conn> conn;
  std::vector<std::shared_ptr<Conn>> expired;  // destroyed after the lock is released
  Status refused;
  {
    std::lock_guard lock(mu);
    if (closed_locked) {
      refused = unavailable("the HTTP client is shutting down");
    } else if (pools.size() >= opts.hosts_max && pools.count(host_port(host, port)) == 0) {
      // Hosts come from URLs others name (enlists, peers): their pools must not pile up.
      refused = unavailable("the HTTP client already talks to " + std::to_string(opts.hosts_max) +
                            " hosts (hosts_max)");
    } else {
      HostPool& pool = pool_for(host, port);
      if (pool.busy < opts.connections_per_host_max) {
        ++pool.busy;
        conn = take_idle(pool, expired);
        if (conn) {
          conn->call_ = std::move(call);
          conn->has_call_ = true;
          link(conn.get());
        } else {
          conn = new_conn(pool, std::move(call));
        }
        pending.fetch_add(1);
      } else if (pool.queue.size() < opts.queue_per_host_max) {
        pool.queue.push_back(std::move(call));
        pending.fetch_add(1);
        return;
      } else {
        refused = unavailable("queue full: " + std::to_string(pool.queue.size()) +
                              " requests wait for " + pool.where);
      }
    }
  }
  if (!refused.ok()) {
    HttpResult result;
    result.status = std::move(refused);
    call.done(std::move(result));
    return;
  }
  asio::dispatch(conn->executor(), [conn] { conn->run(); });
}

void ClientState::deliver(Done& done, HttpResult result) {
  pending.fetch_sub(1);
  const ClientState* outer = tls_in_callback;
  tls_in_callback = this;
  done(std::move(result));
  tls_in_callback = outer;
  running.fetch_sub(1);
  if (closed.load()) {
    std::lock_guard lock(mu);
    running_cv.notify_all();
  }
}

void ClientState::shutdown() {
  std::vector<Done> dones;
  std::vector<std::shared_ptr<Conn>> active;
  std::vector<std::shared_ptr<Conn>> idle;
  {
    std::lock_guard lock(mu);
    closed_locked = true;
    closed.store(true);
    for (auto& [key, pool] : pools) {
      for (auto& call : pool->queue) dones.push_back(std::move(call.done));
      pool->queue.clear();
      for (auto& c : pool->idle) idle.push_back(std::move(c));
      pool->idle.clear();
      pool->busy = 0;
    }
    while (active_head) {
      Conn* c = active_head;
      dones.push_back(std::move(c->call_.done));
      c->has_call_ = false;
      unlink(c);
      if (auto sp = c->weak_from_this().lock()) active.push_back(std::move(sp));
    }
  }
  for (auto& c : active) asio::post(c->executor(), [c] { c->close(); });
  active.clear();
  idle.clear();  // no operation is pending on an idle connection; closing is immediate
  for (auto& done : dones) {
    pending.fetch_sub(1);
    HttpResult result;
    result.status = unavailable("the HTTP client was destroyed before the answer arrived");
    done(std::move(result));
  }
  // Callbacks already running on loop threads finish before the client is gone (but not the
  // one this thread may be inside of).
  size_t self = tls_in_callback == this ? 1 : 0;
  std::unique_lock lock(mu);
  running_cv.wait(lock, [&] { return running.load() <= self; });
}

}  // namespace

struct HttpClient::Impl : ClientState {
  using ClientState::ClientState;
};

HttpClient::HttpClient(EventLoop& loop, HttpClientOptions opts)
    : impl_(std::make_shared<Impl>(*static_cast<asio::io_context*>(loop.native()), opts)) {
  TPC_ASSERT(opts.connections_per_host_max > 0);
  TPC_ASSERT(opts.idle_timeout_ms > 0);
}

HttpClient::~HttpClient() {
  impl_->shutdown();
}

void HttpClient::send(const Url& url, HttpRequest req, SendOptions opts,
                      std::function<void(HttpResult)> done) {
  TPC_ASSERT(done != nullptr);
  std::string_view target = req.target.empty() ? std::string_view("/") : req.target;
  Status bad;
  if (!is_token(req.method))
    bad = invalid_argument("bad HTTP method \"" + req.method + "\"");
  else if (target.find_first_of(" \r\n") != std::string_view::npos || target[0] != '/')
    bad = invalid_argument("bad HTTP target \"" + req.target + "\"");
  if (bad.ok()) {
    for (const auto& [k, v] : req.headers) {
      if (!is_token(k) || !is_field_value(v)) {
        bad = invalid_argument("bad HTTP header \"" + k + "\"");
        break;
      }
    }
  }
  if (!bad.ok()) {
    asio::post(impl_->io, [done = std::move(done), bad = std::move(bad)] {
      HttpResult result;
      result.status = bad;
      done(std::move(result));
    });
    return;
  }

  Call call;
  std::string& h = call.head;
  h.reserve(96 + req.method.size() + url.base_path.size() + target.size() + url.host.size());
  h += req.method;
  h += ' ';
  h += url.base_path;
  h += target;
  h += " HTTP/1.1\r\nHost: ";
  if (url.host.find(':') == std::string::npos) {
    h += url.host;
  } else {
    h += '[';
    h += url.host;
    h += ']';
  }
  h += ':';
  char buf[24];
  auto [pend, pec] = std::to_chars(buf, buf + sizeof buf, url.port);
  TPC_ASSERT(pec == std::errc());
  h.append(buf, pend);
  h += "\r\n";
  bool own_content_type = false;
  for (const auto& [k, v] : req.headers) {
    if (beast::iequals(k, "host") || beast::iequals(k, "content-length") ||
        beast::iequals(k, "connection") || beast::iequals(k, "transfer-encoding"))
      continue;
    if (beast::iequals(k, "content-type")) own_content_type = true;
    h += k;
    h += ": ";
    h += v;
    h += "\r\n";
  }
  if (!req.body.empty() && !own_content_type) h += "Content-Type: application/json\r\n";
  if (!req.body.empty() || req.method == "POST" || req.method == "PUT" || req.method == "PATCH") {
    h += "Content-Length: ";
    auto [bend, bec] = std::to_chars(buf, buf + sizeof buf, req.body.size());
    TPC_ASSERT(bec == std::errc());
    h.append(buf, bend);
    h += "\r\n";
  }
  h += "Connection: keep-alive\r\n\r\n";
  call.body = std::move(req.body);
  call.done = std::move(done);
  call.timeout_ms = std::clamp<int64_t>(opts.timeout_ms, 0, kTimeoutMsMax);
  call.deadline = Clock::now() + Millis(call.timeout_ms);
  call.idempotent = opts.idempotent;
  call.head_method = req.method == "HEAD";
  impl_->submit(std::move(call), url.host, url.port);
}

size_t HttpClient::pending() const {
  return impl_->pending.load();
}

HttpResult http_call(const Url& url, HttpRequest req, int64_t timeout_ms) {
  HttpResult out;
  try {
    EventLoop loop(1);  // never started: this thread runs it below
    auto* io = static_cast<asio::io_context*>(loop.native());
    bool finished = false;
    {
      HttpClientOptions opts;
      opts.connections_per_host_max = 1;
      HttpClient client(loop, opts);
      client.send(url, std::move(req), SendOptions{timeout_ms, true}, [&](HttpResult r) {
        out = std::move(r);
        finished = true;
        io->stop();
      });
      if (!finished) io->run();
    }
    if (!finished) out.status = internal_error("http_call returned without an answer");
  } catch (const std::exception& e) {
    out = HttpResult();
    out.status = internal_error(std::string("http_call failed: ") + e.what());
  }
  return out;
}

HttpResult http_call(const Url& url, std::string method, std::string target, std::string body,
                     int64_t timeout_ms, const std::string& bearer_token) {
  HttpRequest req;
  req.method = std::move(method);
  req.target = std::move(target);
  req.body = std::move(body);
  if (!bearer_token.empty()) req.headers.emplace_back("authorization", "Bearer " + bearer_token);
  return http_call(url, std::move(req), timeout_ms);
}

}  // namespace tpc
