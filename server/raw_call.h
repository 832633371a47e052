// Raw-bytes plumbing of the service (see service.h for why every method is raw): parsing a request from its
// grpc::ByteBuffer, serializing an answer into one, and the reactor of a unary call.
#ifndef MQA_SERVER_RAW_CALL_H_
#define MQA_SERVER_RAW_CALL_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <chrono>
#include <memory>
#include <string>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "server/metrics.h"
#include "server/wire.h"

namespace mqa::server {

// Parses in as a Message. INVALID_ARGUMENT naming the message type and the byte count when it does not parse.
template <class Message>
core::Status ParseRaw(const grpc::ByteBuffer& in, Message* out, const std::string& what) {
  grpc::ByteBuffer copy(in);  // Deserialize consumes its buffer; the copy shares in's slices
  const size_t bytes = copy.Length();
  if (grpc::SerializationTraits<Message>::Deserialize(&copy, out).ok()) return core::Status();
  return core::InvalidArgumentError(what + " (" + std::to_string(bytes) + " bytes) does not parse as " +
                                    out->GetTypeName() + "; nothing was done");
}

// Serializes m into *out. INTERNAL if protobuf refuses (it does for messages over 2 GiB).
template <class Message>
core::Status SerializeRaw(const Message& m, grpc::ByteBuffer* out) {
  bool own = false;
  if (grpc::SerializationTraits<Message>::Serialize(m, out, &own).ok()) return core::Status();
  return core::InternalError("the answer (" + m.GetTypeName() + ") could not be serialized");
}

// Every status a client sees goes through here, so mqa_step_errors_total counts each failure exactly once.
inline void Count(ServiceMetrics* metrics, const core::Status& status) {
  if (metrics != nullptr && !status.ok()) metrics->RecordError(status.code());
}

// One unary call: its parsed request, its answer, and a cancellation that reaches the engine. Work still queued
// when the client cancels (or its deadline passes) is dropped instead of computed; gRPC still requires Finish()
// after OnCancel, which Reply (from the engine's completion) gives. Deletes itself when gRPC is done with it.
template <class Request, class Response>
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  // Parses raw_request; when it does not parse, the call is already finished with INVALID_ARGUMENT and ok()
  // is false: return it to gRPC without touching it again.
  UnaryCall(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_request, grpc::ByteBuffer* raw_response,
            ServiceMetrics* metrics)
      : deadline_(ctx->deadline()),
        raw_response_(raw_response),
        metrics_(metrics),
        cancel_(std::make_shared<core::CancelFlag>()) {
    core::Status parsed = ParseRaw(*raw_request, &request, "the request");
    ok_ = parsed.ok();
    if (!ok_) Reply(parsed);
  }

  bool ok() const { return ok_; }
  std::shared_ptr<const core::CancelFlag> cancel() const { return cancel_; }
  core::Clock::time_point steady_deadline() const { return SteadyDeadline(deadline_); }

  // Finishes the call with status (and the answer in response when it is OK). Call exactly once.
  void Reply(core::Status status) {
    if (status.ok()) status = SerializeRaw(response, raw_response_);
    Count(metrics_, status);
    Finish(ToGrpc(status));
  }

  void OnCancel() override {
    // A deadline reaches the server as a cancellation: tell the two apart, so the drop says DEADLINE_EXCEEDED.
    // The client's own timer fires first and its cancellation arrives a network latency ahead of the server's
    // copy of the deadline, hence the slack.
    constexpr auto kSlack = std::chrono::milliseconds(50);
    if (deadline_ != std::chrono::system_clock::time_point::max() &&
        std::chrono::system_clock::now() + kSlack >= deadline_) {
      cancel_->Expire();
    } else {
      cancel_->Cancel();
    }
  }
  void OnDone() override { delete this; }

  Request request;
  Response response;

 private:
  const std::chrono::system_clock::time_point deadline_;
  grpc::ByteBuffer* const raw_response_;
  ServiceMetrics* const metrics_;
  const std::shared_ptr<core::CancelFlag> cancel_;
  bool ok_ = false;
};

}  // namespace mqa::server

#endif  // MQA_SERVER_RAW_CALL_H_
