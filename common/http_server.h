// HttpServer: an asynchronous HTTP/1.1 server on an EventLoop (Beast: a listener plus one
// session per connection on its own strand, keep-alive, a fresh parser with a body limit per
// message, a deadline before every read).
//
// Requests past body_max_bytes get 413, a read past its deadline closes the connection (the
// request head has its own, shorter header_timeout_ms). A connection past connections_max, or
// past connections_per_client_max from one client address, is still read: a request for
// unlimited_path (/healthz) is handed to the handler, any other is answered 503; either way
// the connection then closes. Past connections_max such connections too, new ones are answered
// 503 at once. Every request carries its client's address (HttpRequest::client). The handler runs on a loop
// thread; see HttpHandler. A Responder may be called or dropped from any thread, but not after
// the EventLoop is destroyed. After stop(), a handler already running may still answer; call
// wait_idle() before destroying what the handler uses.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/event_loop.h"
#include "common/http.h"
#include "common/status.h"

namespace tpc {

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 0;                // 0 picks a free port; see HttpServer::port()
  size_t body_max_bytes = 1 << 20;  // larger bodies are answered 413
  size_t header_max_bytes = 16 << 10;
  int64_t read_timeout_ms = 30'000;  // for one whole request once its first byte arrived
  // For a request's head: from the accept (first request) or from the request's first byte
  // (later requests) to the end of its headers.
  int64_t header_timeout_ms = 5'000;
  int64_t idle_timeout_ms = 60'000;  // keep-alive connection with no request
  size_t connections_max = 1024;
  size_t connections_per_client_max = 256;  // open connections from one client address
  // Answered even past the connection limits (one request, then the connection closes).
  std::string unlimited_path = "/healthz";
};

class HttpServer {
 public:
  // Binds and starts accepting on `loop`. `loop` must outlive the server.
  static Result<std::unique_ptr<HttpServer>> start(EventLoop& loop, const HttpServerOptions& opts,
                                                   HttpHandler handler);
  ~HttpServer();

  uint16_t port() const;
  // Stops accepting; idle keep-alive connections close; requests in flight are answered and
  // their connections then close. Returns at once; see wait_idle().
  void stop();
  // Blocks until no request is in flight or timeout_ms passed. True if idle.
  bool wait_idle(int64_t timeout_ms);

  // Connections accepted since start, those answered 503 included; for tests and metrics.
  uint64_t connections_accepted() const;
  // Connections open now, not counting those past the limits (see connections_over_limit).
  size_t connections_open() const;
  // Connections past a limit still being read for a /healthz request.
  size_t connections_over_limit() const;
  // Requests read whose answer has not been written yet.
  size_t requests_in_flight() const;

 private:
  struct Impl;
  explicit HttpServer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace tpc
