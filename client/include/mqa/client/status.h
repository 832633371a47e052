// Status and StatusOr<T> for the mqaserve client library.
//
// The codes are gRPC's canonical codes with their numbers (google.rpc.Code), so a status the server returns
// arrives unchanged: code and message 1:1. Standard library only, so callers need neither gRPC nor protobuf.
#ifndef MQA_CLIENT_STATUS_H_
#define MQA_CLIENT_STATUS_H_

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "mqa/client/export.h"

namespace mqa::client {

// gRPC canonical status codes; the numeric values are the wire values.
enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  kUnauthenticated = 16,
};

// The canonical upper-case name ("INVALID_ARGUMENT"); "UNKNOWN_CODE_<n>" for numbers outside 0..16.
MQA_CLIENT_EXPORT std::string StatusCodeName(StatusCode code);

// Maps a wire number to a code. Numbers outside 0..16 become kUnknown (as gRPC does).
MQA_CLIENT_EXPORT StatusCode StatusCodeFromInt(int code);

// An outcome: a code and, when not OK, a message. Value type; cheap to copy when OK. Not synchronised (like
// any value, it may be read from many threads at once but not written concurrently).
class MQA_CLIENT_EXPORT Status {
 public:
  // OK.
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OK", or "CODE: message" (the form mqa-cli prints after "error: ").
  std::string ToString() const;

  friend bool operator==(const Status& a, const Status& b) { return a.code_ == b.code_ && a.message_ == b.message_; }
  friend bool operator!=(const Status& a, const Status& b) { return !(a == b); }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

MQA_CLIENT_EXPORT std::ostream& operator<<(std::ostream& os, const Status& status);

// Either a value of T or a non-OK Status. Accessing the value of a StatusOr that holds an error is a
// programming error: it prints the status to stderr and aborts.
template <typename T>
class StatusOr {
  static_assert(!std::is_same_v<std::decay_t<T>, Status>, "StatusOr<Status> is not allowed");

 public:
  // Holds an error. An OK status here is a bug in the caller; it is turned into kInternal so that ok() stays
  // consistent with having a value.
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (status_.ok()) status_ = Status(StatusCode::kInternal, "StatusOr constructed from an OK status");
  }
  StatusOr(const T& value) : value_(value) {}        // NOLINT(google-explicit-constructor)
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  // Converting construction, e.g. StatusOr<std::unique_ptr<Base>> from std::unique_ptr<Derived>.
  template <typename U, typename = std::enable_if_t<
                            std::is_constructible_v<T, U&&> && !std::is_same_v<std::decay_t<U>, T> &&
                            !std::is_same_v<std::decay_t<U>, Status> && !std::is_same_v<std::decay_t<U>, StatusOr<T>>>>
  StatusOr(U&& value) : value_(T(std::forward<U>(value))) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return value_.has_value(); }
  // OK when a value is held.
  const Status& status() const { return status_; }

  T& value() & {
    CheckOk();
    return *value_;
  }
  const T& value() const& {
    CheckOk();
    return *value_;
  }
  T&& value() && {
    CheckOk();
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void CheckOk() const {
    if (!value_.has_value()) {
      std::fprintf(stderr, "mqa::client::StatusOr::value() on an error: %s\n", status_.ToString().c_str());
      std::abort();
    }
  }

  Status status_;
  std::optional<T> value_;
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_STATUS_H_
