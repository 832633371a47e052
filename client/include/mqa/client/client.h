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
// UNAVAILABLE, with exponential backoff, and never past the call's deadline. Steps that name their position are
// retried when their answer was lost (Session::Step): the server recognises the repeat and answers it again
// without applying it twice. CreateSession, CloseSession and steps without a position are never retried (a
// retry could create a second session or apply a step twice).
//
// Thread safety: Client is thread-safe (all methods may be called concurrently). Session is not (use one
// from one thread at a time, or guard it). StepStream is thread-safe.
//
// Lifetimes: Sessions and StepStreams keep the connection alive on their own, so they may outlive the Client
// that made them.
//
// Session affinity (docs/affinity.md): a session lives in the memory of the one replica that created it. So
// that a proxy in front of several replicas (nginx, Envoy) sends every call of a session to that replica, each
// session has a routing key, chosen when it is created (SessionOptions::routing_key, else a random one), and
// every call of the session (CreateSession, Step, GetSession, CloseSession) carries it in the request header
// kRoutingKeyHeader. The proxy hashes on that header; the server ignores it.
//
// A StepStream is one HTTP/2 stream, which a proxy routes as a whole to one replica, so a stream has one
// routing key too (StreamOptions::routing_key, else a random one) and can carry only sessions created with
// that key. Open the stream first, then create its sessions with its key:
//
//   auto stream = client->OpenStream();
//   SessionOptions options;
//   options.model = "mqa-default";
//   options.routing_key = (*stream)->routing_key();
//   auto session = client->CreateSession(options);
//
// (or pick the key first with NewRoutingKey() and give it to both). A step of a session with another key
// would reach a replica that does not hold the session and fail with NOT_FOUND. StepStream::Submit(session,
// ...) checks the keys before sending; Submit(StepRequest) only has a session id and cannot check.
// Without a proxy (one server) the keys change nothing.
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

// The request header that carries a session's (or a stream's) routing key; proxies hash on it.
inline constexpr char kRoutingKeyHeader[] = "x-mqa-session-key";

// A new random routing key: 128 bits from std::random_device as 32 lowercase hex digits.
MQA_CLIENT_EXPORT std::string NewRoutingKey();

// A per-call timeout; nullopt: ClientOptions::default_timeout.
using Timeout = std::optional<std::chrono::milliseconds>;

struct ClientOptions {
  // "host:port" or any gRPC target URI ("dns:///svc:50051", "unix:/path").
  std::string target;
  // Deadline of a call without an explicit timeout. Must be > 0.
  std::chrono::milliseconds default_timeout{std::chrono::seconds(30)};
  // Extra attempts of an idempotent call that failed with UNAVAILABLE (0: no retry), and of a step that names
  // its position whose answer was lost (see Session::Step).
  int max_retries = 3;
  // > 0: each attempt of a step that names its position gets at most this long (within the call's timeout);
  // one that runs out is sent again. 0: one attempt has the whole timeout.
  std::chrono::milliseconds step_attempt_timeout{0};
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
  std::string attn_impl;           // "torch", "flash" or "triton"
  std::optional<double> clip_qkv;  // absent: no clipping
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
  std::vector<std::string> devices;  // one replica of the model on each; a session lives on one of them
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
  HostTensor x;                           // [b, s, dim], any floating dtype; outputs come back in x's dtype
  std::optional<KvCache> past_key_value;  // absent: no cache
  bool return_cache = false;              // fill ForwardOutput::cache
  std::optional<HostTensor> bias;         // additive, 4-D, sliced bottom-right
  std::optional<HostTensor> mask;         // [b, s_k] kBool or kUInt8, true = attend
  std::optional<bool> causal;             // absent: true
  bool needs_weights = false;             // fill ForwardOutput::weights
};

struct ForwardOutput {
  HostTensor out;                     // [b, s, dim] in x's dtype
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
  int64_t max_tokens = 0;                 // 0: the model's max_tokens_per_session
  std::chrono::milliseconds idle_ttl{0};  // 0: the server's default
  std::optional<bool> causal;             // absent: true
  PositionBias position_bias = PositionBias::kNone;
  Admission admission = Admission::kBestEffort;
  // Sent in kRoutingKeyHeader with every call of the session. Empty: a new NewRoutingKey(). Give a session
  // that will be stepped on a StepStream that stream's routing_key(). At most 128 characters, each a printable
  // ASCII character other than space (else CreateSession fails with INVALID_ARGUMENT, nothing sent).
  std::string routing_key;
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
  std::string device;       // the device whose replica holds it ("cpu", "cuda:N")
};

// The output of one step (mqa.v1.StepResult).
struct StepOutput {
  std::string session_id;
  int32_t layer = 0;
  uint64_t sequence = 0;
  int64_t position = 0;                       // the layer's cache length before the step
  int64_t num_tokens = 0;                     // tokens the step added
  HostTensor out;                             // [1, s, dim] in x's dtype
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

// One layer's steps of many sessions in one message (mqa.v1.StepBatchInput), for a caller that runs its model
// batched: each session's step means exactly what its own Step would (its own position check and errors), and
// the server runs them in one pass when its batching limits allow.
struct StepBatchInput {
  int32_t layer = 0;
  std::vector<std::string> session_ids;           // B >= 1; a session listed twice has its steps applied in order
  HostTensor x;                                   // [B, s, dim]: row b is session_ids[b]'s x
  std::vector<std::optional<int64_t>> positions;  // empty (no checks) or B entries, as StepRequest::position
  // Server-side, StepStream only: as StepRequest::timeout, for every step of the batch.
  std::optional<std::chrono::milliseconds> timeout;
  // Client::StepBatch only: sent in kRoutingKeyHeader (the sessions' shared key; empty: none). Behind a proxy
  // every session of the batch must have been created with it. StepStream sends its own key instead.
  std::string routing_key;
};
// The answers to a StepBatchInput (mqa.v1.StepBatchResult), entry b for session_ids[b].
struct StepBatchOutput {
  int32_t layer = 0;
  uint64_t sequence = 0;
  std::vector<Status> statuses;                          // per session: OK or why its step failed (nothing applied)
  std::vector<int64_t> positions;                        // per session: the layer's cache length before its step
  HostTensor out;                                        // [B, s, dim] in x's dtype; a failed session's row is zeros
  std::vector<std::chrono::microseconds> queue_times;    // per session, as StepOutput::queue_time
  std::vector<std::chrono::microseconds> compute_times;  // per session, as StepOutput::compute_time
};
// Receives a streamed batch's answers, as StepCallback does a step's. Not OK only when the batch as a whole
// failed (unreadable, or the stream's status when the stream failed): then no step of it was applied by the
// server's answer, or (for a stream that broke) the outcome is unknown, as for a step.
using StepBatchCallback = std::function<void(StatusOr<StepBatchOutput>)>;

// Receives a streamed step's outcome. Called exactly once per accepted step, on a gRPC thread: it must not
// block for long and must not throw. It may call StepStream::Submit (but not Finish, Cancel or the
// StepStream's destructor).
using StepCallback = std::function<void(StatusOr<StepOutput>)>;

struct StreamOptions {
  // Deadline of the whole stream. nullopt: ClientOptions::default_timeout. Zero or negative: no deadline.
  Timeout deadline;
  // Sent in kRoutingKeyHeader when the stream opens; a proxy routes the whole stream by it, so every session
  // stepped on the stream must have been created with this key. Empty: a new NewRoutingKey(). Same rules as
  // SessionOptions::routing_key.
  std::string routing_key;
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
  // The routing key sent with every call of this session (kept after Close() and Release(); empty after a
  // move).
  const std::string& routing_key() const;
  // The state returned by CreateSession (every layer at position 0).
  const SessionInfo& initial_info() const;

  // The current state (GetSession; retried on UNAVAILABLE).
  StatusOr<SessionInfo> Info(Timeout timeout = std::nullopt) const;

  // One unary step of `layer` with x [1, s, dim]. `position`: see StepRequest. `sequence` is echoed back.
  // With a position, a step whose answer was lost (UNAVAILABLE, CANCELLED, or an attempt cut short by
  // ClientOptions::step_attempt_timeout) is sent again, up to max_retries times within the timeout: the server
  // answers a repeat of a step it already applied with the same output, so the step is applied exactly once.
  // Without a position it is never retried.
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

  // A step of `session`: sets request.session_id to session.id() and fails with INVALID_ARGUMENT, nothing
  // queued, when the session is closed or its routing key is not this stream's (behind a proxy the step would
  // reach a replica that does not hold the session). Otherwise as Submit(request, done).
  StatusOr<uint64_t> Submit(const Session& session, StepRequest request, StepCallback done);
  std::future<StatusOr<StepOutput>> Submit(const Session& session, StepRequest request);

  // Queues a batch of one layer's steps of many sessions (StepBatchInput; its routing_key is ignored: the
  // stream's applies). As Submit: on OK the callback is called exactly once; a batch counts as one pending entry.
  StatusOr<uint64_t> SubmitBatch(StepBatchInput batch, StepBatchCallback done);
  std::future<StatusOr<StepBatchOutput>> SubmitBatch(StepBatchInput batch);
  // The routing key this stream was opened with (StreamOptions::routing_key or a random one).
  const std::string& routing_key() const;

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
  // Any session's state by id. Behind a proxy, pass the session's routing key (Session::routing_key()) so
  // that the call reaches the replica that holds it; empty: no header is sent.
  StatusOr<SessionInfo> GetSession(const std::string& session_id, Timeout timeout = std::nullopt,
                                   const std::string& routing_key = std::string());
  // Closes any session by id. Never retried. `routing_key`: as for GetSession.
  StatusOr<SessionInfo> CloseSession(const std::string& session_id, Timeout timeout = std::nullopt,
                                     const std::string& routing_key = std::string());

  // One layer's steps of many sessions in one call (mqa.v1.StepBatch). The call's status is not OK only when
  // the batch as a whole is malformed (INVALID_ARGUMENT, nothing applied) or the call failed; each session's
  // outcome is in StepBatchOutput::statuses. When every session names its position, a batch whose answer was
  // lost is sent again as Session::Step is (the server answers the repeats from their kept answers); otherwise it
  // is never retried.
  StatusOr<StepBatchOutput> StepBatch(const StepBatchInput& batch, Timeout timeout = std::nullopt,
                                      uint64_t sequence = 0);

  // Starts a StreamSteps call. Fails only on bad options (INVALID_ARGUMENT for a malformed routing key);
  // connection errors surface through the steps.
  StatusOr<std::unique_ptr<StepStream>> OpenStream(StreamOptions options = {});

  struct Impl;  // private; public only so that Session and StepStream can share it

 private:
  explicit Client(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_CLIENT_H_
