// Client::Impl: the channel and stubs shared by a Client, its Sessions and its StepStreams. Private.
#ifndef MQA_CLIENT_SRC_CLIENT_IMPL_H_
#define MQA_CLIENT_SRC_CLIENT_IMPL_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "mqa/client/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "mqa/v1/mqa_service.grpc.pb.h"

namespace mqa::client {
namespace internal {

// INVALID_ARGUMENT unless `key` is 1 to 128 printable ASCII characters other than space (a valid header value
// for gRPC, and nothing a proxy would trim or fold). `what` names the option in the message.
Status ValidateRoutingKey(const std::string& key, const std::string& what);

// Adds the routing-key header to a call; does nothing for an empty key.
inline void SetRoutingKey(grpc::ClientContext* context, const std::string& key) {
  if (!key.empty()) context->AddMetadata(kRoutingKeyHeader, key);
}

}  // namespace internal

// Immutable after construction, so every method is safe to call from many threads (the stubs are).
struct Client::Impl {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::MqaService::Stub> stub;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;

  std::chrono::system_clock::time_point Deadline(Timeout timeout) const {
    return std::chrono::system_clock::now() + timeout.value_or(options.default_timeout);
  }

  // One attempt with the call's deadline. `call(grpc::ClientContext*) -> grpc::Status`.
  template <typename Call>
  grpc::Status CallOnce(Timeout timeout, Call&& call) const {
    grpc::ClientContext context;
    context.set_deadline(Deadline(timeout));
    return call(&context);
  }

  // For idempotent calls: retries UNAVAILABLE with exponential backoff. All attempts share one deadline, so
  // the caller's timeout bounds the whole call, not each attempt.
  template <typename Call>
  grpc::Status CallIdempotent(Timeout timeout, Call&& call) const {
    const auto deadline = Deadline(timeout);
    auto backoff = options.retry_backoff;
    for (int attempt = 0;; ++attempt) {
      grpc::ClientContext context;
      context.set_deadline(deadline);
      grpc::Status status = call(&context);
      if (status.error_code() != grpc::StatusCode::UNAVAILABLE || attempt >= options.max_retries) return status;
      if (std::chrono::system_clock::now() + backoff >= deadline) return status;
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    }
  }

  // For steps that name their position (the server answers a repeat of an applied step with its kept answer
  // and never applies it twice): retries an attempt whose answer was lost on the way, UNAVAILABLE, CANCELLED,
  // or DEADLINE_EXCEEDED of an attempt cut short by options.step_attempt_timeout, within the call's deadline.
  template <typename Call>
  grpc::Status CallStep(Timeout timeout, Call&& call) const {
    const auto deadline = Deadline(timeout);
    auto backoff = options.retry_backoff;
    for (int attempt = 0;; ++attempt) {
      grpc::ClientContext context;
      auto attempt_deadline = deadline;
      if (options.step_attempt_timeout.count() > 0) {
        attempt_deadline = std::min(deadline, std::chrono::system_clock::now() + options.step_attempt_timeout);
      }
      context.set_deadline(attempt_deadline);
      grpc::Status status = call(&context);
      const grpc::StatusCode code = status.error_code();
      const bool lost = code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::CANCELLED ||
                        (code == grpc::StatusCode::DEADLINE_EXCEEDED && attempt_deadline < deadline);
      if (!lost || attempt >= options.max_retries) return status;
      if (code != grpc::StatusCode::DEADLINE_EXCEEDED) {  // a cut-short attempt has waited already
        if (std::chrono::system_clock::now() + backoff >= deadline) return status;
        std::this_thread::sleep_for(backoff);
        backoff *= 2;
      }
    }
  }
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_SRC_CLIENT_IMPL_H_
