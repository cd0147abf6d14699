// HttpServer: an asynchronous HTTP/1.1 server on an EventLoop (Beast: a listener plus one
// session per connection on its own strand, keep-alive, a fresh parser with a body limit per
// message, a deadline before every read).
//
// Requests past body_max_bytes get 413, a read past its deadline closes the connection, and
// past connections_max new connections are answered 503 and closed. The handler runs on a loop
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
  int64_t idle_timeout_ms = 60'000;  // keep-alive connection with no request
  size_t connections_max = 1024;
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
  // Connections open now, not counting those being refused with 503.
  size_t connections_open() const;
  // Requests read whose answer has not been written yet.
  size_t requests_in_flight() const;

 private:
  struct Impl;
  explicit HttpServer(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace tpc
