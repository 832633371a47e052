// The mqaserve C++ client: a connection to an MqaService server (gRPC, insecure channel), its unary calls,
// sessions with server-side KV caches, and a multiplexed stream of steps.
//
// Standard library only: gRPC and protobuf are private to the shared library libmqa_client.
//
// Errors: every call returns Status / StatusOr with the server's gRPC code and message unchanged (see
// proto/mqa/v1/mqa_service.proto for what each code means). Errors found before anything is sent (a
// malformed tensor, a missing option) are INVALID_ARGUMENT.
//
// Deadlines: every call carries one: the `timeout` argument when given, else ClientOptions::default_timeout.
// Retries: only idempotent calls (Health, ListModels, GetModel, Forward, GetSession) are retried, only on
// UNAVAILABLE, with exponential backoff, and never past the call's deadline. CreateSession, CloseSession and
// steps are never retried (a retry could create a second session or apply a step twice).
//
// Thread safety: Client is thread-safe (all methods may be called concurrently). Session is not (use one
// from one thread at a time, or guard it). StepStream is thread-safe.
//
// Lifetimes: Sessions and StepStreams keep the connection alive on their own, so they may outlive the Client
// that made them.
#ifndef MQA_CLIENT_CLIENT_H_
#define MQA_CLIENT_CLIENT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mqa/client/export.h"
#include "mqa/client/status.h"
#include "mqa/client/tensor.h"

namespace mqa::client {

// A per-call timeout; nullopt: ClientOptions::default_timeout.
using Timeout = std::optional<std::chrono::milliseconds>;

struct ClientOptions {
  // "host:port" or any gRPC target URI ("dns:///svc:50051", "unix:/path").
  std::string target;
  // Deadline of a call without an explicit timeout. Must be > 0.
  std::chrono::milliseconds default_timeout{std::chrono::seconds(30)};
  // Extra attempts of an idempotent call that failed with UNAVAILABLE (0: no retry).
  int max_retries = 3;
  // Wait before the first retry; doubled for each further one.
  std::chrono::milliseconds retry_backoff{50};
  // Largest message sent or received, in bytes.
  size_t max_message_bytes = size_t{64} << 20;
  // > 0: Connect waits up to this long for the channel to become ready and fails with UNAVAILABLE otherwise.
  // 0: Connect returns at once and the first call connects.
  std::chrono::milliseconds connect_timeout{0};
};

// grpc.health.v1 serving status.
enum class HealthStatus : int { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
// "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN".
MQA_CLIENT_EXPORT std::string HealthStatusName(HealthStatus status);

// One hosted layer's configuration (mqa.v1.LayerConfig).
struct LayerConfig {
  int64_t dim = 0;
  int64_t heads = 0;
  int64_t head_dim = 0;
  std::string attn_impl;              // "torch", "flash" or "triton"
  std::optional<double> clip_qkv;     // absent: no clipping
  bool qk_ln = false;
  std::optional<double> softmax_scale;  // absent: 1/sqrt(head_dim)
  double attn_pdrop = 0.0;
  std::string norm_type;
  std::string fc_type;
  DataType dtype = DataType::kUnspecified;  // parameter and activation type on the server
  std::string device;                       // "cpu" or "cuda:N"
};

// A hosted model (mqa.v1.ModelInfo).
struct ModelInfo {
  std::string name;
  int32_t num_layers = 0;
  std::vector<LayerConfig> layers;  // num_layers entries, in order
  int64_t max_tokens_per_session = 0;
  std::string description;
};

// A key/value cache in the spec's reference layout: key [b, 1, head_dim, s] (transposed), value [b, 1, s,
// head_dim].
struct KvCache {
  HostTensor key;
  HostTensor value;
};

// A stateless forward of one layer (mqa.v1.ForwardRequest). b = batch, s = new tokens.
struct ForwardInput {
  std::string model;
  int32_t layer = 0;
  HostTensor x;                          // [b, s, dim], any floating dtype; outputs come back in x's dtype
  std::optional<KvCache> past_key_value;  // absent: no cache
  bool return_cache = false;             // fill ForwardOutput::cache
  std::optional<HostTensor> bias;        // additive, 4-D, sliced bottom-right
  std::optional<HostTensor> mask;        // [b, s_k] kBool or kUInt8, true = attend
  std::optional<bool> causal;            // absent: true
  bool needs_weights = false;            // fill ForwardOutput::weights
};

struct ForwardOutput {
  HostTensor out;                   // [b, s, dim] in x's dtype
  std::optional<HostTensor> weights;  // [b, H, s, s_k] when asked for
  std::optional<KvCache> cache;       // when return_cache was set
};

enum class PositionBias : int { kNone = 1, kAlibi = 2 };

// How a session gets KV-cache blocks on the server (mqa.v1.Admission). Best effort: blocks are taken as the
// session grows; a step that finds none free fails with RESOURCE_EXHAUSTED and leaves the session unchanged, so
// the same step may be retried. Guaranteed: blocks for max_tokens are reserved at creation (CreateSession fails
// with RESOURCE_EXHAUSTED when they are not free); its steps never fail for want of blocks.
enum class Admission : int { kBestEffort = 1, kGuaranteed = 2 };

// Options of a new session (mqa.v1.CreateSessionRequest).
struct SessionOptions {
  std::string model;
  int64_t max_tokens = 0;                        // 0: the model's max_tokens_per_session
  std::chrono::milliseconds idle_ttl{0};         // 0: the server's default
  std::optional<bool> causal;                    // absent: true
  PositionBias position_bias = PositionBias::kNone;
  Admission admission = Admission::kBestEffort;
};

// A session's state on the server (mqa.v1.Session).
struct SessionInfo {
  std::string session_id;  // 32 lowercase hex digits
  std::string model;
  int64_t max_tokens = 0;
  std::vector<int64_t> layer_positions;  // tokens held by each layer's cache
  std::chrono::milliseconds idle_ttl{0};
  std::chrono::system_clock::time_point expire_time;
  std::chrono::system_clock::time_point create_time;
  bool causal = true;
  PositionBias position_bias = PositionBias::kNone;
  Admission admission = Admission::kBestEffort;
  int64_t cache_bytes = 0;  // bytes of the KV blocks the session holds
};

// The output of one step (mqa.v1.StepResult).
struct StepOutput {
  std::string session_id;
  int32_t layer = 0;
  uint64_t sequence = 0;
  int64_t position = 0;    // the layer's cache length before the step
  int64_t num_tokens = 0;  // tokens the step added
  HostTensor out;          // [1, s, dim] in x's dtype
  std::chrono::microseconds queue_time{0};    // server: arrival to start of compute
  std::chrono::microseconds compute_time{0};  // server: compute including device copies
};

// One step for a StepStream.
struct StepRequest {
  std::string session_id;
  int32_t layer = 0;
  HostTensor x;                     // [1, s, dim]
  std::optional<int64_t> position;  // the layer must hold exactly this many tokens, else FAILED_PRECONDITION
  // Server-side: the step fails with DEADLINE_EXCEEDED, uncomputed, if it has not started this long after
  // the server received it. nullopt: only the stream's deadline applies.
  std::optional<std::chrono::milliseconds> timeout;
};

// Receives a streamed step's outcome. Called exactly once per accepted step, on a gRPC thread: it must not
// block for long and must not throw. It may call StepStream::Submit (but not Finish, Cancel or the
// StepStream's destructor).
using StepCallback = std::function<void(StatusOr<StepOutput>)>;

struct StreamOptions {
  // Deadline of the whole stream. nullopt: ClientOptions::default_timeout. Zero or negative: no deadline.
  Timeout deadline;
};

class Client;

// A server-side session: its KV caches live until Close(), the destructor, or the idle TTL. Move-only. The
// destructor closes the session (best effort, with default_timeout; errors are ignored) unless Close() or
// Release() was called. Not thread-safe.
class MQA_CLIENT_EXPORT Session {
 public:
  Session(Session&& other) noexcept;
  Session& operator=(Session&& other) noexcept;  // closes the session this one held first
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session();

  // Empty after Close(), Release() or a move.
  const std::string& id() const;
  const std::string& model() const;
  // The state returned by CreateSession (every layer at position 0).
  const SessionInfo& initial_info() const;

  // The current state (GetSession; retried on UNAVAILABLE).
  StatusOr<SessionInfo> Info(Timeout timeout = std::nullopt) const;

  // One unary step of `layer` with x [1, s, dim]. `position`: see StepRequest. `sequence` is echoed back.
  // Never retried.
  StatusOr<StepOutput> Step(int32_t layer, const HostTensor& x, std::optional<int64_t> position = std::nullopt,
                            Timeout timeout = std::nullopt, uint64_t sequence = 0);

  // Closes the session on the server; returns its last state. Afterwards id() is empty and the destructor
  // does nothing. FAILED_PRECONDITION when already closed or released.
  StatusOr<SessionInfo> Close(Timeout timeout = std::nullopt);

  // Forgets the session without closing it (the server still holds it until its TTL); returns its id.
  std::string Release();

 private:
  friend class Client;
  struct State;
  explicit Session(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

// A StreamSteps call: many steps of many sessions in flight on one stream. Thread-safe. Steps are written in
// the order Submit accepted them, one write outstanding at a time; answers arrive in any order and are
// matched by the sequence number the stream assigns.
class MQA_CLIENT_EXPORT StepStream {
 public:
  StepStream(const StepStream&) = delete;
  StepStream& operator=(const StepStream&) = delete;
  // Cancels the stream if Finish() was not called, then waits until gRPC is done with it. Every step still
  // pending gets its callback (CANCELLED) before the destructor returns.
  ~StepStream();

  // Queues a step and returns its sequence number. On OK the callback is called exactly once, with the
  // step's result or error (per-step errors from the server, or the stream's status when the stream fails).
  // On an error (the stream is finishing, cancelled or broken; `request.x` is malformed) nothing was queued
  // and the callback is never called.
  StatusOr<uint64_t> Submit(StepRequest request, StepCallback done);

  // The same, with a future. The future holds the submit error if Submit itself fails.
  std::future<StatusOr<StepOutput>> Submit(StepRequest request);

  // Half-closes the stream after every queued step was written, waits for every answer and the end of the
  // call, and returns the stream's final status (OK when the server ended it normally). Idempotent. Must
  // not be called from a StepCallback.
  Status Finish();

  // Cancels the stream: pending steps complete with CANCELLED (unless their answers arrived first).
  // Does not wait; Finish() or the destructor waits.
  void Cancel();

  // Steps accepted and not yet completed.
  size_t pending() const;

 private:
  friend class Client;
  class Reactor;
  explicit StepStream(std::unique_ptr<Reactor> reactor);
  std::unique_ptr<Reactor> reactor_;
};

// A connection to one server. Thread-safe; cheap to share by pointer.
class MQA_CLIENT_EXPORT Client {
 public:
  // Creates the channel (insecure). INVALID_ARGUMENT on bad options; UNAVAILABLE when connect_timeout > 0
  // and the channel did not become ready in time.
  static StatusOr<std::unique_ptr<Client>> Connect(ClientOptions options);

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();

  const ClientOptions& options() const;

  // grpc.health.v1.Health/Check for `service` ("" = the whole server).
  StatusOr<HealthStatus> Health(const std::string& service = "", Timeout timeout = std::nullopt);

  // Every hosted model, sorted by name.
  StatusOr<std::vector<ModelInfo>> ListModels(Timeout timeout = std::nullopt);
  // One model; NOT_FOUND when not hosted.
  StatusOr<ModelInfo> GetModel(const std::string& name, Timeout timeout = std::nullopt);

  // A stateless forward of one layer.
  StatusOr<ForwardOutput> Forward(const ForwardInput& input, Timeout timeout = std::nullopt);

  // Opens a session. Never retried.
  StatusOr<Session> CreateSession(const SessionOptions& options, Timeout timeout = std::nullopt);
  // Any session's state by id.
  StatusOr<SessionInfo> GetSession(const std::string& session_id, Timeout timeout = std::nullopt);
  // Closes any session by id. Never retried.
  StatusOr<SessionInfo> CloseSession(const std::string& session_id, Timeout timeout = std::nullopt);

  // Starts a StreamSteps call. Fails only on bad options; connection errors surface through the steps.
  StatusOr<std::unique_ptr<StepStream>> OpenStream(StreamOptions options = {});

  struct Impl;  // private; public only so that Session and StepStream can share it

 private:
  explicit Client(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_CLIENT_H_
