// Status and Result<T>: errors as values across module boundaries.
//
// A Status is either ok or a Code with a human-readable message. Result<T> holds a T or a
// non-ok Status. Both are cheap to move and safe to pass between threads by value.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/assert.h"

namespace tpc {

enum class Code {
  ok,
  invalid_argument,   // malformed or out-of-range input (HTTP 400)
  unauthorized,       // missing or wrong token (401)
  not_found,          // unknown gid, path or record (404)
  conflict,           // the object is in the wrong state for the request (409)
  too_large,          // a body or a list past its limit (413)
  sql_error,          // PostgreSQL reported an error for a statement (422)
  unavailable,        // overloaded, not ready, or a peer cannot be reached (503)
  timeout,            // a deadline passed
  io_error,           // the operating system reported an error
  corruption,         // stored data failed its checksum or could not be decoded
  internal,           // a bug: reported rather than hidden
};

std::string_view code_name(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return Status(); }

  bool ok() const { return code_ == Code::ok; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "conflict: branch is prepared" (or "ok").
  std::string to_string() const;

 private:
  Code code_ = Code::ok;
  std::string message_;
};

inline Status ok_status() { return Status(); }
inline Status invalid_argument(std::string m) { return Status(Code::invalid_argument, std::move(m)); }
inline Status not_found(std::string m) { return Status(Code::not_found, std::move(m)); }
inline Status conflict(std::string m) { return Status(Code::conflict, std::move(m)); }
inline Status unavailable(std::string m) { return Status(Code::unavailable, std::move(m)); }
inline Status io_error(std::string m) { return Status(Code::io_error, std::move(m)); }
inline Status corruption(std::string m) { return Status(Code::corruption, std::move(m)); }
inline Status internal_error(std::string m) { return Status(Code::internal, std::move(m)); }
inline Status timeout_error(std::string m) { return Status(Code::timeout, std::move(m)); }

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    TPC_ASSERT(!std::get<Status>(v_).ok());
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & {
    TPC_ASSERT(ok());
    return std::get<T>(v_);
  }
  const T& value() const& {
    TPC_ASSERT(ok());
    return std::get<T>(v_);
  }
  T&& value() && {
    TPC_ASSERT(ok());
    return std::get<T>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace tpc

// Returns early with the Status of an expression that is not ok.
#define TPC_RETURN_IF_ERROR(expr)        \
  do {                                   \
    ::tpc::Status tpc_status_ = (expr);  \
    if (!tpc_status_.ok()) return tpc_status_; \
  } while (0)
