#include "mqa/client/client.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <climits>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "client_impl.h"
#include "convert.h"

namespace mqa::client {
std::string HealthStatusName(HealthStatus status) {
  switch (status) {
    case HealthStatus::kServing: return "SERVING";
    case HealthStatus::kNotServing: return "NOT_SERVING";
    case HealthStatus::kServiceUnknown: return "SERVICE_UNKNOWN";
    case HealthStatus::kUnknown: break;
  }
  return "UNKNOWN";
}

std::string NewRoutingKey() {
  std::random_device device;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string key;
  key.reserve(32);
  // std::random_device yields 32-bit values; four of them make the 128 bits.
  for (int word = 0; word < 4; ++word) {
    const uint32_t bits = static_cast<uint32_t>(device());
    for (int shift = 28; shift >= 0; shift -= 4) key.push_back(kHex[(bits >> shift) & 0xf]);
  }
  return key;
}

namespace internal {

Status ValidateRoutingKey(const std::string& key, const std::string& what) {
  if (key.empty() || key.size() > 128) {
    return Status(StatusCode::kInvalidArgument, what + " must have 1 to 128 characters");
  }
  for (const char c : key) {
    if (c <= ' ' || c > '~') {
      return Status(StatusCode::kInvalidArgument, what + " may hold only printable ASCII characters other than space");
    }
  }
  return Status();
}

}  // namespace internal

// ---- Client -------------------------------------------------------------------------------------------

Client::Client(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

const ClientOptions& Client::options() const { return impl_->options; }

StatusOr<std::unique_ptr<Client>> Client::Connect(ClientOptions options) {
  if (options.target.empty()) return Status(StatusCode::kInvalidArgument, "ClientOptions.target is empty");
  if (options.default_timeout.count() <= 0) {
    return Status(StatusCode::kInvalidArgument, "ClientOptions.default_timeout must be > 0");
  }
  if (options.max_retries < 0) return Status(StatusCode::kInvalidArgument, "ClientOptions.max_retries < 0");
  if (options.max_message_bytes == 0 || options.max_message_bytes > static_cast<size_t>(INT_MAX)) {
    return Status(StatusCode::kInvalidArgument, "ClientOptions.max_message_bytes must be in 1 .. 2^31-1");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  auto impl = std::make_shared<Impl>();
  impl->channel = grpc::CreateCustomChannel(options.target, grpc::InsecureChannelCredentials(), args);
  if (!impl->channel) return Status(StatusCode::kInvalidArgument, "cannot create a channel to " + options.target);
  if (options.connect_timeout.count() > 0) {
    const auto deadline = std::chrono::system_clock::now() + options.connect_timeout;
    if (!impl->channel->WaitForConnected(deadline)) {
      return Status(StatusCode::kUnavailable, "could not connect to " + options.target + " within " +
                                                  std::to_string(options.connect_timeout.count()) + " ms");
    }
  }
  impl->stub = v1::MqaService::NewStub(impl->channel);
  impl->health = grpc::health::v1::Health::NewStub(impl->channel);
  impl->options = std::move(options);
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

StatusOr<HealthStatus> Client::Health(const std::string& service, Timeout timeout) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = impl_->CallIdempotent(
      timeout, [&](grpc::ClientContext* context) { return impl_->health->Check(context, request, &response); });
  if (!status.ok()) return internal::FromGrpc(status);
  const int value = static_cast<int>(response.status());
  if (value < 0 || value > 3) return HealthStatus::kUnknown;
  return static_cast<HealthStatus>(value);
}

StatusOr<std::vector<ModelInfo>> Client::ListModels(Timeout timeout) {
  v1::ListModelsResponse response;
  grpc::Status status = impl_->CallIdempotent(timeout, [&](grpc::ClientContext* context) {
    return impl_->stub->ListModels(context, v1::ListModelsRequest(), &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  std::vector<ModelInfo> models;
  for (const auto& m : response.models()) models.push_back(internal::ModelInfoFromProto(m));
  return models;
}

StatusOr<ModelInfo> Client::GetModel(const std::string& name, Timeout timeout) {
  v1::GetModelRequest request;
  request.set_name(name);
  v1::GetModelResponse response;
  grpc::Status status = impl_->CallIdempotent(
      timeout, [&](grpc::ClientContext* context) { return impl_->stub->GetModel(context, request, &response); });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::ModelInfoFromProto(response.model());
}

StatusOr<ForwardOutput> Client::Forward(const ForwardInput& input, Timeout timeout) {
  v1::ForwardRequest request;
  Status valid = internal::ForwardInputToProto(input, &request);
  if (!valid.ok()) return valid;
  v1::ForwardResponse response;
  grpc::Status status = impl_->CallIdempotent(
      timeout, [&](grpc::ClientContext* context) { return impl_->stub->Forward(context, request, &response); });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::ForwardOutputFromProto(response);
}

StatusOr<SessionInfo> Client::GetSession(const std::string& session_id, Timeout timeout,
                                         const std::string& routing_key) {
  v1::GetSessionRequest request;
  request.set_session_id(session_id);
  v1::GetSessionResponse response;
  grpc::Status status = impl_->CallIdempotent(timeout, [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, routing_key);
    return impl_->stub->GetSession(context, request, &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::SessionInfoFromProto(response.session());
}

StatusOr<SessionInfo> Client::CloseSession(const std::string& session_id, Timeout timeout,
                                           const std::string& routing_key) {
  v1::CloseSessionRequest request;
  request.set_session_id(session_id);
  v1::CloseSessionResponse response;
  grpc::Status status = impl_->CallOnce(timeout, [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, routing_key);
    return impl_->stub->CloseSession(context, request, &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::SessionInfoFromProto(response.session());
}

// ---- Session ------------------------------------------------------------------------------------------

struct Session::State {
  std::shared_ptr<Client::Impl> impl;
  SessionInfo info;
  std::string id;           // empty once closed or released
  std::string routing_key;  // sent with every call of the session
};

StatusOr<Session> Client::CreateSession(const SessionOptions& options, Timeout timeout) {
  const std::string routing_key = options.routing_key.empty() ? NewRoutingKey() : options.routing_key;
  Status valid_key = internal::ValidateRoutingKey(routing_key, "SessionOptions.routing_key");
  if (!valid_key.ok()) return valid_key;
  v1::CreateSessionRequest request;
  request.set_model(options.model);
  request.set_max_tokens(options.max_tokens);
  if (options.idle_ttl.count() > 0) internal::DurationToProto(options.idle_ttl, request.mutable_idle_ttl());
  if (options.causal) request.set_causal(*options.causal);
  request.set_position_bias(options.position_bias == PositionBias::kAlibi ? v1::POSITION_BIAS_ALIBI
                                                                          : v1::POSITION_BIAS_NONE);
  request.set_admission(options.admission == Admission::kGuaranteed ? v1::ADMISSION_GUARANTEED
                                                                    : v1::ADMISSION_BEST_EFFORT);
  v1::CreateSessionResponse response;
  grpc::Status status = impl_->CallOnce(timeout, [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, routing_key);
    return impl_->stub->CreateSession(context, request, &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  auto state = std::make_unique<Session::State>();
  state->impl = impl_;
  state->info = internal::SessionInfoFromProto(response.session());
  state->id = state->info.session_id;
  state->routing_key = routing_key;
  return Session(std::move(state));
}

Session::Session(std::unique_ptr<State> state) : state_(std::move(state)) {}
Session::Session(Session&& other) noexcept = default;

Session& Session::operator=(Session&& other) noexcept {
  if (this != &other) {
    if (state_ && !state_->id.empty()) (void)Close();
    state_ = std::move(other.state_);
  }
  return *this;
}

Session::~Session() {
  // Best effort: the server's idle TTL reclaims the session if this fails, so there is nothing useful to do
  // with an error here.
  if (state_ && !state_->id.empty()) (void)Close();
}

const std::string& Session::id() const {
  static const std::string kEmpty;
  return state_ ? state_->id : kEmpty;
}

const std::string& Session::model() const {
  static const std::string kEmpty;
  return state_ ? state_->info.model : kEmpty;
}

const std::string& Session::routing_key() const {
  static const std::string kEmpty;
  return state_ ? state_->routing_key : kEmpty;
}

const SessionInfo& Session::initial_info() const {
  static const SessionInfo kEmpty;
  return state_ ? state_->info : kEmpty;
}

StatusOr<SessionInfo> Session::Info(Timeout timeout) const {
  if (!state_ || state_->id.empty()) return Status(StatusCode::kFailedPrecondition, "the session is closed");
  v1::GetSessionRequest request;
  request.set_session_id(state_->id);
  v1::GetSessionResponse response;
  grpc::Status status = state_->impl->CallIdempotent(timeout, [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, state_->routing_key);
    return state_->impl->stub->GetSession(context, request, &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::SessionInfoFromProto(response.session());
}

StatusOr<StepOutput> Session::Step(int32_t layer, const HostTensor& x, std::optional<int64_t> position, Timeout timeout,
                                   uint64_t sequence) {
  if (!state_ || state_->id.empty()) return Status(StatusCode::kFailedPrecondition, "the session is closed");
  v1::StepRequest request;
  Status valid = internal::StepInputToProto(state_->id, layer, x, position, std::nullopt, request.mutable_step());
  if (!valid.ok()) return valid;
  request.mutable_step()->set_sequence(sequence);
  v1::StepResponse response;
  auto attempt = [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, state_->routing_key);
    return state_->impl->stub->Step(context, request, &response);
  };
  // Only a step that names its position can be sent again safely (the server recognises the repeat).
  grpc::Status status = position ? state_->impl->CallStep(timeout, attempt) : state_->impl->CallOnce(timeout, attempt);
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::StepOutputFromProto(response.result());
}

StatusOr<StepBatchOutput> Client::StepBatch(const StepBatchInput& batch, Timeout timeout, uint64_t sequence) {
  v1::StepBatchRequest request;
  Status valid = internal::StepBatchInputToProto(batch, request.mutable_batch());
  if (!valid.ok()) return valid;
  request.mutable_batch()->set_sequence(sequence);
  v1::StepBatchResponse response;
  auto attempt = [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, batch.routing_key);
    return impl_->stub->StepBatch(context, request, &response);
  };
  // As Session::Step: sent again only when every step can be recognised as a repeat by the server.
  bool all_named = !batch.positions.empty();
  for (const std::optional<int64_t>& p : batch.positions) all_named = all_named && p.has_value();
  grpc::Status status = all_named ? impl_->CallStep(timeout, attempt) : impl_->CallOnce(timeout, attempt);
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::StepBatchOutputFromProto(response.result());
}

StatusOr<SessionInfo> Session::Close(Timeout timeout) {
  if (!state_ || state_->id.empty()) return Status(StatusCode::kFailedPrecondition, "the session is closed");
  // Forget the id first: whatever the outcome, a second close (the destructor's) would only fail again.
  const std::string id = std::move(state_->id);
  state_->id.clear();
  v1::CloseSessionRequest request;
  request.set_session_id(id);
  v1::CloseSessionResponse response;
  grpc::Status status = state_->impl->CallOnce(timeout, [&](grpc::ClientContext* context) {
    internal::SetRoutingKey(context, state_->routing_key);
    return state_->impl->stub->CloseSession(context, request, &response);
  });
  if (!status.ok()) return internal::FromGrpc(status);
  return internal::SessionInfoFromProto(response.session());
}

std::string Session::Release() {
  if (!state_) return {};
  std::string id = std::move(state_->id);
  state_->id.clear();
  return id;
}

}  // namespace mqa::client
