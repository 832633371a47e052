// Client::Impl: the channel and stubs shared by a Client, its Sessions and its StepStreams. Private.
#ifndef MQA_CLIENT_SRC_CLIENT_IMPL_H_
#define MQA_CLIENT_SRC_CLIENT_IMPL_H_

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "grpc/health/v1/health.grpc.pb.h"
#include "mqa/client/client.h"
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
    return CallWithRetries(timeout, std::chrono::milliseconds(0), /*retry_lost_answers=*/false, call);
  }

  // For steps that name their position (the server answers a repeat of an applied step with its kept answer
  // and never applies it twice): also retries an attempt whose answer was lost on the way, CANCELLED, or
  // DEADLINE_EXCEEDED of an attempt cut short by options.step_attempt_timeout, within the call's deadline.
  template <typename Call>
  grpc::Status CallStep(Timeout timeout, Call&& call) const {
    return CallWithRetries(timeout, options.step_attempt_timeout, /*retry_lost_answers=*/true, call);
  }

  // Up to options.max_retries more attempts, each with at most attempt_timeout (0: the whole deadline) of the
  // call's one deadline. UNAVAILABLE is retried after a doubling backoff; with retry_lost_answers, CANCELLED too,
  // and a cut-short attempt's DEADLINE_EXCEEDED at once (it has waited already).
  template <typename Call>
  grpc::Status CallWithRetries(Timeout timeout, std::chrono::milliseconds attempt_timeout, bool retry_lost_answers,
                               Call& call) const {
    const auto deadline = Deadline(timeout);
    auto backoff = options.retry_backoff;
    for (int attempt = 0;; ++attempt) {
      grpc::ClientContext context;
      auto attempt_deadline = deadline;
      if (attempt_timeout.count() > 0) {
        attempt_deadline = std::min(deadline, std::chrono::system_clock::now() + attempt_timeout);
      }
      context.set_deadline(attempt_deadline);
      grpc::Status status = call(&context);
      const grpc::StatusCode code = status.error_code();
      const bool cut_short = code == grpc::StatusCode::DEADLINE_EXCEEDED && attempt_deadline < deadline;
      const bool retry = code == grpc::StatusCode::UNAVAILABLE ||
                         (retry_lost_answers && (code == grpc::StatusCode::CANCELLED || cut_short));
      if (!retry || attempt >= options.max_retries) return status;
      if (cut_short) continue;
      if (std::chrono::system_clock::now() + backoff >= deadline) return status;
      std::this_thread::sleep_for(backoff);
      backoff *= 2;
    }
  }
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_SRC_CLIENT_IMPL_H_
