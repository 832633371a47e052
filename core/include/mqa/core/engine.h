// Engine: hosted models, sessions with server-side KV caches, and the worker threads that run every
// computation.
//
// One worker thread per device ("cpu", "cuda:0", ...) owns all computation on that device: callers (gRPC
// threads) only enqueue work and receive completions. A model may be replicated on several devices (one copy of
// its weights and one KV block pool per device); each session lives on one replica, picked at creation. Work of one
// session and layer runs in the order it was submitted. Completion callbacks run on the worker thread (or inline in
// Submit* when a request is refused before it is queued), never under an Engine lock: they may call any Engine
// function, but should be quick, since the device waits while they run.
//
// Thread-safety: every public member function may be called from any thread.
#ifndef MQA_CORE_ENGINE_H_
#define MQA_CORE_ENGINE_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

using Clock = std::chrono::steady_clock;

// A hosted model: num_layers layers sharing one set of options.
struct ModelConfig {
  std::string name;
  int num_layers = 1;
  MqaOptions options;  // options.seed initialises layer i with seed + i when weights_path is empty
  // One replica per device (identical weights: the same seed or the same file), each with its own KV block pool
  // on that device's worker. Empty: options.device alone. "cuda" means "cuda:0"; a device listed twice (after
  // that) is INVALID_ARGUMENT. options.device is ignored when this is set.
  std::vector<std::string> devices;
  std::string weights_path;  // safetensors file with "layers.{i}.attn.*"; empty: random from the seed
  int64_t max_tokens_per_session = 4096;
  std::string description;  // free text shown by ListModels
};

// Continuous batching: each device worker collects pending steps of all sessions and runs the steps of one
// (model, layer) as one pass (one QKV GEMM over all their tokens, KV append, attention per session against its
// own blocks, one output GEMM).
struct BatchingOptions {
  int64_t max_batch_tokens = 4096;               // new tokens per pass (decode tokens + prefill chunk tokens)
  int64_t max_batch_sessions = 256;              // steps per pass; 1 = unbatched (one step per pass)
  std::chrono::microseconds max_queue_delay{0};  // wait up to this long for a pass to fill (0: run at once)
  // Longer steps of causal sessions run in chunks of this many tokens, between other passes. A non-causal
  // step is never split: each of its queries must see every key of the step, so it runs whole in one pass.
  int64_t max_prefill_chunk = 512;
};

// The paged KV cache: per device and model, one pool of fixed-size blocks shared by all layers (block i of a
// session holds tokens [i*block_size, (i+1)*block_size) of every layer).
struct KvCacheOptions {
  int32_t block_size = 16;           // tokens per block
  int64_t budget_bytes = 0;          // per device, all its models; 0: from gpu_memory_fraction or cpu_budget
  double gpu_memory_fraction = 0.9;  // CUDA: this fraction of the device memory free after loading the weights
  int64_t cpu_budget_bytes = int64_t{1} << 30;  // CPU, when budget_bytes is 0
};

struct EngineOptions {
  std::vector<ModelConfig> models;
  BatchingOptions batching;
  KvCacheOptions kv_cache;
  size_t max_sessions = 1024;  // CreateSession past it: RESOURCE_EXHAUSTED
  size_t max_queue = 4096;     // queued items per device past it: RESOURCE_EXHAUSTED
  std::chrono::milliseconds default_idle_ttl{std::chrono::minutes(5)};
  std::chrono::milliseconds max_idle_ttl{std::chrono::hours(1)};
  std::chrono::milliseconds reap_interval{std::chrono::milliseconds(200)};  // how often idle sessions are checked
  // The work of one stateless Forward: b * H * s * s_k attention logits (s_k = past + new tokens). A Forward over
  // it is refused before it is queued, RESOURCE_EXHAUSTED naming both figures. Its time grows with this figure;
  // its memory does not (without weights the attention runs in tiles of query rows, linear in s). >= 1.
  int64_t max_forward_scores = int64_t{1} << 28;
  // A needs_weights Forward returns [b, H, s, s_k] weights in x's dtype: refused before it is queued
  // (RESOURCE_EXHAUSTED naming the figures) when they alone take more bytes than this. The server sets it to its
  // message size limit, which such a reply could never pass. 0: no limit.
  int64_t max_forward_weights_bytes = 0;
  // Bytes of last answers kept for retries (StepRequest), all sessions of all devices. A step's answer is kept
  // when it fits next to the others (each (session, layer) keeps only its last); one that does not fit is not
  // kept, and a retry of that step is FAILED_PRECONDITION saying so. 0: no answer is kept.
  int64_t replay_budget_bytes = int64_t{256} << 20;
};

struct ModelInfo {
  std::string name;
  int num_layers = 0;
  MqaOptions options;                // options.device: devices[0]
  std::vector<std::string> devices;  // one replica on each, in the configured order
  int64_t max_tokens_per_session = 0;
  std::string description;
};

enum class PositionBias : int { kNone = 0, kAlibi = 1 };

// How a session gets its KV blocks. Guaranteed: all blocks for max_tokens are reserved at creation (creation
// fails with RESOURCE_EXHAUSTED when they are not free). Best effort: blocks are taken as the session grows; a step
// that finds none free fails with RESOURCE_EXHAUSTED, leaving the session unchanged so the client can retry.
enum class Admission : int { kBestEffort = 0, kGuaranteed = 1 };

struct SessionConfig {
  std::string model;
  Admission admission = Admission::kBestEffort;
  int64_t max_tokens = 0;                 // 0: the model's max_tokens_per_session
  std::chrono::milliseconds idle_ttl{0};  // 0: EngineOptions::default_idle_ttl
  bool causal = true;                     // bottom-right causal mask within prefill chunks
  PositionBias position_bias = PositionBias::kNone;
};

struct SessionInfo {
  std::string id;  // 32 lowercase hex digits, 128 bits from the OS CSPRNG
  std::string model;
  int64_t max_tokens = 0;
  std::vector<int64_t> layer_positions;  // tokens held per layer
  std::chrono::milliseconds idle_ttl{0};
  std::chrono::system_clock::time_point create_time;
  std::chrono::system_clock::time_point expire_time;  // last activity + idle_ttl
  bool causal = true;
  PositionBias position_bias = PositionBias::kNone;
  Admission admission = Admission::kBestEffort;
  int64_t cache_bytes = 0;  // bytes held by the session's caches
  std::string device;       // the replica it lives on ("cpu", "cuda:N"); all its steps run there
};

// Lets a caller withdraw queued work. Work that has not started when cancelled is dropped and never computed;
// work already running completes normally. The drop's status is CANCELLED, or DEADLINE_EXCEEDED when the caller
// withdrew the work because its deadline passed (a gRPC call's deadline firing reaches the server as a
// cancellation: Expire() keeps the two apart, for the caller and for the drop counters).
class CancelFlag {
 public:
  void Cancel() { Set(kCancelled); }
  void Expire() { Set(kExpired); }
  bool cancelled() const { return state_.load(std::memory_order_acquire) != kLive; }
  bool expired() const { return state_.load(std::memory_order_acquire) == kExpired; }

 private:
  enum : int { kLive = 0, kCancelled = 1, kExpired = 2 };
  void Set(int why) {
    int live = kLive;
    state_.compare_exchange_strong(live, why, std::memory_order_acq_rel);  // the first reason sticks
  }
  std::atomic<int> state_{kLive};
};

// A step names the position it expects to start at when the caller needs exactly-once application: the engine
// keeps the answer of the last step of each session and layer (within EngineOptions::replay_budget_bytes), and
// a step that repeats it (same position, same x: dtype, shape and bytes) after it was applied gets that answer
// again instead of FAILED_PRECONDITION. So a caller that lost an answer (DEADLINE_EXCEEDED, CANCELLED,
// UNAVAILABLE, a broken stream) retries the same step and every token is applied exactly once. A repeat with
// other input, or of an older step, is FAILED_PRECONDITION with the layer's current position.
struct StepRequest {
  std::string session_id;
  int layer = 0;
  Tensor x;                                               // [1, s, dim], s >= 0, any floating dtype, on the CPU
  std::optional<int64_t> position;                        // required current length of the layer's cache
  Clock::time_point deadline = Clock::time_point::max();  // not started by then: DEADLINE_EXCEEDED
  std::shared_ptr<const CancelFlag> cancel;               // optional
};

struct StepResult {
  Tensor out;            // [1, s, dim] in x's dtype, on the CPU
  int64_t position = 0;  // first token's position (cache length before the step)
  int64_t num_tokens = 0;
  bool replayed = false;  // the kept answer of an already applied step (see StepRequest)
  int64_t queue_us = 0;
  int64_t compute_us = 0;
};

// Stateless forward of one layer: ForwardArgs on the CPU in any floating dtype (converted to the layer's);
// results come back on the CPU in x's dtype.
struct ForwardRequest {
  std::string model;
  int layer = 0;
  ForwardArgs args;
  Clock::time_point deadline = Clock::time_point::max();
  std::shared_ptr<const CancelFlag> cancel;
};

using StepCallback = std::function<void(StatusOr<StepResult>)>;
// One answer per request of a SubmitSteps, in request order.
using StepBatchCallback = std::function<void(std::vector<StatusOr<StepResult>>)>;
using ForwardCallback = std::function<void(StatusOr<ForwardResult>)>;

// One device's share of EngineStats (every replica on it, all models).
struct DeviceStats {
  std::string device;
  size_t queue_depth = 0;
  size_t running = 0;
  size_t sessions_open = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_free = 0;
};

// What computed one model's layers on one device, summed over its layers: requests for attn_impl's fast path that
// another path served, by where and why, and the CUDA graphs of its paged decode passes.
struct ExecutionStats {
  std::string model;
  std::string device;
  std::string attn_impl;
  // Reason -> count. forward: stateless Forwards ("needs_weights", "unsupported_layer", "stateless_forward");
  // paged: the engine's batched passes ("unsupported_layer", "alibi_prefill"). See AttnImpl.
  std::map<std::string, uint64_t> forward_fallbacks;
  std::map<std::string, uint64_t> paged_fallbacks;
  uint64_t paged_passes = 0;
  uint64_t graph_captures = 0;  // CUDA graphs captured (one per layer, batch bucket and table width in use)
  uint64_t graph_replays = 0;   // paged decode passes served by replaying one
  uint64_t graph_failures = 0;  // failed captures (logged); a layer whose capture failed decodes eagerly from then on
};

// Where the worker's time goes in the batched passes, summed over all passes since start (microseconds of wall
// time on the worker thread). Divided by EngineStats::batches: the mean pass. gather and scatter are host work
// that grows with the sessions in a pass; compute is what the host spends launching the device work (all of it,
// device time included, where the pass synchronises: on the CPU); wait is the time the worker
// blocked for a launched pass's outputs. A CUDA pass is launched before the one ahead of it completes, so the
// device computes while the host gathers and scatters; the four add up to the worker's busy time, not the
// device's.
struct PassTimes {
  uint64_t gather_us = 0;   // admission (blocks taken), inputs joined into one staging buffer
  uint64_t compute_us = 0;  // the copy to the device, the layer's paged pass, the copy back: launched or done
  uint64_t wait_us = 0;     // waiting for the copy back of a pass launched earlier
  uint64_t scatter_us = 0;  // outputs cut per step, converted to the caller's dtype, sessions moved, completions
};

struct EngineStats {
  size_t queue_depth = 0;  // items waiting, all devices
  size_t running = 0;      // steps and forwards being computed now
  size_t sessions_open = 0;
  size_t sessions_active = 0;  // open sessions with steps queued or running
  size_t sessions_idle = 0;    // open sessions with nothing in flight
  uint64_t batches = 0;        // passes run
  uint64_t batched_steps = 0;  // steps (or prefill chunks) in those passes: batched_steps / batches = mean size
  std::vector<uint64_t> batch_size_histogram;  // [i]: passes of size in (2^(i-1), 2^i]; [0]: size 1
  PassTimes pass_times;                        // summed over those passes
  uint64_t passes_overlapped = 0;              // passes launched while the one before was still on the device
  int64_t kv_block_size = 0;                   // tokens per block
  int64_t kv_blocks_total = 0;                 // allocatable blocks, all devices and models
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_free = 0;
  uint64_t kv_exhausted = 0;  // sessions or steps refused for want of free blocks
  uint64_t sessions_created = 0;
  uint64_t sessions_closed = 0;   // evictions by reason: CloseSession
  uint64_t sessions_expired = 0;  // evictions by reason: the idle TTL
  uint64_t steps_completed = 0;
  uint64_t steps_failed = 0;       // refused or failed for any reason, including the two below
  uint64_t dropped_cancelled = 0;  // steps and forwards dropped before compute because they were cancelled
  uint64_t dropped_deadline = 0;   // ... because their deadline had passed
  uint64_t steps_replayed = 0;     // retries of applied steps answered from the kept answer (not recomputed)
  int64_t replay_bytes = 0;        // bytes of answers kept for retries now
  uint64_t forwards_completed = 0;
  std::vector<DeviceStats> devices;       // per device: cpu, cuda:0, cuda:1, ...; the fields above are their totals
  std::vector<ExecutionStats> execution;  // per model and replica, by model name then device order
};

class Engine {
 public:
  // Builds every model's layers (one replica per device) and starts one worker per device. INVALID_ARGUMENT for
  // bad options, duplicate model names or a device listed twice for one model, NOT_FOUND / DATA_LOSS for
  // unreadable weights, UNAVAILABLE for a device that does not exist here.
  static StatusOr<std::unique_ptr<Engine>> Create(EngineOptions options);
  // Stops the workers: queued work completes with UNAVAILABLE. Blocks until the worker threads have exited.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::vector<ModelInfo> ListModels() const;  // sorted by name
  StatusOr<ModelInfo> GetModel(const std::string& name) const;

  // Places the session on the model's replica with the most free KV blocks (then the fewest open sessions, then
  // the lowest device ordinal); a guaranteed session reserves its blocks there, or on the next replica in that
  // order that has them. NOT_FOUND (model),
  // INVALID_ARGUMENT (max_tokens or idle_ttl out of range), RESOURCE_EXHAUSTED (at max_sessions, or no replica
  // with the blocks a guaranteed session needs), UNAVAILABLE (after StopAcceptingSessions).
  StatusOr<SessionInfo> CreateSession(const SessionConfig& config);
  // NOT_FOUND for unknown, closed or expired sessions (the message says which, for recently ended ones).
  StatusOr<SessionInfo> GetSession(const std::string& id) const;
  // Ends the session and frees its caches. Steps of it still queued fail with NOT_FOUND, uncomputed; a step
  // already running finishes first, then its memory is released.
  StatusOr<SessionInfo> CloseSession(const std::string& id);

  // Queues one step. done is called exactly once. Errors: NOT_FOUND (session), INVALID_ARGUMENT (x, or a layer
  // index outside the model), FAILED_PRECONDITION (position mismatch), OUT_OF_RANGE (past max_tokens),
  // RESOURCE_EXHAUSTED (queue full), DEADLINE_EXCEEDED / CANCELLED (dropped before compute), UNAVAILABLE
  // (engine stopping). A failed step leaves the session unchanged.
  void SubmitStep(StepRequest request, StepCallback done);
  // Queues many steps at once (a caller that runs its own model batched: one layer's steps of many sessions).
  // Each request keeps exactly SubmitStep's contract, alone: its own checks, position, errors, retries; one that
  // fails changes nothing for the others, and nothing is computed for it. They are queued together, per device in
  // one hand-over and in request order, so the steps of one replica and layer run in one pass when the batching
  // limits allow; two of the same session and layer run one after the other, in order. done is called exactly
  // once, when every request has its answer (on the thread of the last one), with the answers in request order.
  void SubmitSteps(std::vector<StepRequest> requests, StepBatchCallback done);
  // Queues one stateless forward on the model's replica with the shortest queue; same contract as SubmitStep
  // (minus the session errors), and RESOURCE_EXHAUSTED, before anything is queued, past
  // EngineOptions::max_forward_scores or max_forward_weights_bytes; an allocation that fails while it runs is
  // RESOURCE_EXHAUSTED too.
  void SubmitForward(ForwardRequest request, ForwardCallback done);

  // Refuse new sessions from now on (draining). Existing sessions keep working.
  void StopAcceptingSessions();
  // Waits until no work is queued or running and every completion callback has returned, or the deadline
  // passes. Returns whether the engine was idle.
  bool WaitIdle(Clock::time_point deadline) const;

  EngineStats stats() const;

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mqa::core

#endif  // MQA_CORE_ENGINE_H_
