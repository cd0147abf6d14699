// HttpClient: an asynchronous HTTP/1.1 client with a keep-alive connection pool per host.
//
// Thread-safe. At most connections_per_host_max requests are in flight per host; further ones
// wait in a queue of queue_per_host_max, past which send() fails at once with unavailable.
// Every request has a deadline that covers connect, write and read. A request that fails on a
// reused keep-alive connection before any byte of the answer came back is retried once on a
// fresh connection when it is marked idempotent.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/event_loop.h"
#include "common/http.h"
#include "common/status.h"

namespace tpc {

struct HttpClientOptions {
  size_t connections_per_host_max = 64;
  size_t queue_per_host_max = 100'000;
  size_t hosts_max = 4'096;  // distinct host:port pools; a request to one more fails at once
  size_t response_body_max_bytes = 8 << 20;
  int64_t idle_timeout_ms = 30'000;  // a pooled connection idle longer is closed
};

struct HttpResult {
  // ok when an HTTP answer arrived (any status); unavailable when the peer could not be
  // reached or closed the connection; timeout when the deadline passed.
  Status status;
  int http_status = 0;
  std::string body;
  Headers headers;  // names lower-case

  std::string_view header(std::string_view name) const;
};

struct SendOptions {
  int64_t timeout_ms = 5'000;  // counted from send(): time waiting in the queue counts too
  bool idempotent = true;
};

class HttpClient {
 public:
  // `loop` must outlive the client.
  HttpClient(EventLoop& loop, HttpClientOptions opts = {});
  ~HttpClient();  // closes pooled connections; pending callbacks get unavailable

  // Sends `req` to url (url.base_path is prepended to req.target). `done` is called exactly
  // once, on a loop thread (or inline with unavailable when the queue is full).
  void send(const Url& url, HttpRequest req, SendOptions opts,
            std::function<void(HttpResult)> done);

  // Requests in flight or queued, over all hosts.
  size_t pending() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// One blocking request on a private io_context; for tools and tests, not for services.
HttpResult http_call(const Url& url, HttpRequest req, int64_t timeout_ms);
// Convenience: method + path + body (JSON) to a base URL, with an optional bearer token.
HttpResult http_call(const Url& url, std::string method, std::string target, std::string body,
                     int64_t timeout_ms, const std::string& bearer_token = "");

}  // namespace tpc
