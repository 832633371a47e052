#include "mqa/core/engine.h"

#include <sys/random.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include <c10/core/InferenceMode.h>

#include "mqa/core/block_pool.h"
#include "mqa/core/device.h"
#include "mqa/core/logging.h"
#include "paged_attention.h"
#include "tensor_impl.h"

#ifdef MQA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace mqa::core {
namespace {

int64_t MicrosBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count();
}

std::string FormatMillis(std::chrono::milliseconds ms) {
  if (ms.count() % 1000 == 0) return std::to_string(ms.count() / 1000) + " s";
  return std::to_string(ms.count()) + " ms";
}

// 128 bits from the kernel's CSPRNG. getrandom() only fails here if the kernel lacks it (pre-3.17) or the
// pool is not initialised yet at boot; both are worth refusing the session for rather than falling back to a
// guessable generator.
StatusOr<std::string> NewSessionId() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return UnavailableError("cannot draw a session id from the OS random source (getrandom failed)");
    }
    got += static_cast<size_t>(n);
  }
  static const char kHex[] = "0123456789abcdef";
  std::string id(32, '0');
  for (size_t i = 0; i < sizeof(bytes); ++i) {
    id[2 * i] = kHex[bytes[i] >> 4];
    id[2 * i + 1] = kHex[bytes[i] & 0xf];
  }
  return id;
}

Status CheckLayer(const ModelInfo& model, int layer) {
  if (layer >= 0 && layer < model.num_layers) return Status();
  return InvalidArgumentError("layer " + std::to_string(layer) + " is out of range: model " + model.name +
                              " has layers 0.." + std::to_string(model.num_layers - 1));
}

// Converts an optional caller tensor to the layer's dtype (floating tensors only) and device.
StatusOr<Tensor> ToLayer(const Tensor& t, const MqaOptions& o, bool floating) {
  if (!t.defined()) return t;
  Tensor cur = t;
  if (floating && cur.dtype() != o.dtype) {
    if (!IsFloatingPoint(cur.dtype())) {
      return InvalidArgumentError(std::string("expected a floating dtype (float32, bfloat16 or float16), got ") +
                                  std::string(DTypeName(cur.dtype())));
    }
    MQA_ASSIGN_OR_RETURN(cur, cur.ToDType(o.dtype));
  }
  return cur.To(o.device);
}

// A 64-bit digest of a step's input (dtype, shape and bytes), to recognise a retry of an applied step without
// keeping its input. Not cryptographic: a caller can only collide with its own steps, in its own session.
uint64_t InputHash(const Tensor& x) {
  uint64_t h = 0x9e3779b97f4a7c15ull ^ static_cast<uint64_t>(x.dtype());
  auto mix = [&h](uint64_t w) {
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 33;
  };
  for (int64_t n : x.shape()) mix(static_cast<uint64_t>(n));
  const at::Tensor t = Unwrap(x).contiguous();
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const size_t n = t.nbytes();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    mix(w);
  }
  uint64_t tail = 0;
  // An empty tensor's data pointer is null, and memcpy from null is undefined even for 0 bytes (UBSan).
  if (n > i) std::memcpy(&tail, p + i, n - i);
  mix(tail ^ (static_cast<uint64_t>(n) << 56));
  return h;
}

StatusOr<Tensor> ToCaller(const Tensor& t, DType dtype) {
  if (!t.defined()) return t;
  MQA_ASSIGN_OR_RETURN(Tensor cpu, t.To("cpu"));
  if (cpu.dtype() == dtype) return cpu;
  return cpu.ToDType(dtype);
}

}  // namespace

struct Session;
struct Model;
struct Replica;

// A step on its way through the worker: a long prefill runs as several chunks, each in some pass.
struct StepJob {
  std::shared_ptr<Session> session;
  const Replica* replica = nullptr;  // the session's; batching groups steps by (replica, layer)
  StepRequest request;
  at::Tensor x;                    // the layer's dtype and device, set when the first chunk runs
  int64_t start = -1;              // the layer's position before the step; -1 until the first chunk runs
  int64_t done = 0;                // tokens already computed
  std::vector<at::Tensor> outs;    // their outputs
  Clock::time_point started;
  StepCallback finish;             // the step's one completion (item.fail routes failures here too)
  uint64_t x_hash = 0;             // InputHash(request.x): recognises a retry of this step (StepRequest)
  int64_t remaining() const { return request.x.size(1) - done; }
  // Tokens of the step's next pass. A causal step is split into chunks of max_chunk: the keys a query sees end
  // at its own position, so the chunks compose exactly. A non-causal step's queries see all of its keys,
  // including those of later chunks, so it runs whole.
  int64_t NextChunk(int64_t max_chunk) const;
};

// The last applied step of one (session, layer) and its answer, kept so that a retry of it gets the same answer
// instead of being applied twice (StepRequest's contract).
struct LastStep {
  int64_t position = -1;           // where it started; -1: none
  int64_t tokens = 0;
  DType dtype = DType::kFloat32;   // x's
  uint64_t x_hash = 0;
  std::optional<Tensor> out;       // its answer, when it fitted the replay budget
};

// Counts a taken item as running until its reply goes out, so a client that has its reply never sees its request
// still counted in the running gauge. Leave() is idempotent: a reply, a requeue and the worker's sweep may all
// call it.
struct InFlight {
  std::atomic<std::atomic<size_t>*> counter{nullptr};
  void Leave() {
    if (std::atomic<size_t>* c = counter.exchange(nullptr)) c->fetch_sub(1);
  }
};

// One queued computation: a step (job set: batched by the worker) or anything else (run alone). Exactly one of
// run/fail is called for a non-step item; a step's completion goes through its job's finish instead.
struct WorkItem {
  std::shared_ptr<InFlight> in_flight;  // shared with the completion callback, which calls Leave() first
  Clock::time_point enqueued;
  Clock::time_point deadline;
  std::shared_ptr<const CancelFlag> cancel;
  std::function<void(Clock::time_point enqueued)> run;
  std::function<void(Status)> fail;
  std::shared_ptr<StepJob> job;
};

// One copy of a model on one device: its layers and its paged KV cache. Every step of a session placed here runs
// on this device's worker, against this pool.
struct Replica {
  const Model* model = nullptr;
  std::string device;
  std::unique_ptr<MqaStack> stack;
  // The paged KV cache: one block pool shared by the layers; per layer k and v [num_blocks * block_size, d].
  std::unique_ptr<BlockPool> pool;
  std::vector<at::Tensor> k_cache, v_cache;
  int64_t block_bytes = 0;           // all layers' k and v for one block
  std::atomic<size_t> sessions{0};   // open sessions placed here (placement's tie-break)
};

struct Model {
  ModelInfo info;
  std::vector<std::unique_ptr<Replica>> replicas;  // one per device, in info.devices order
};

struct Session {
  std::string id;
  const Model* model = nullptr;
  Replica* replica = nullptr;  // where it lives: set at creation, never changes
  int64_t max_tokens = 0;
  std::chrono::milliseconds idle_ttl{0};
  bool causal = true;
  PositionBias position_bias = PositionBias::kNone;
  std::chrono::system_clock::time_point create_time;

  Admission admission = Admission::kBestEffort;
  // Touched only by the worker of the replica's device (after creation), and by the destructor of the last
  // reference, which returns the blocks: a step still running keeps them alive until it ends.
  std::unique_ptr<BlockTable> table;

  mutable std::mutex mu;  // guards the fields below
  std::vector<int64_t> positions;
  std::vector<LastStep> last;  // per layer: the last applied step (retries of it are answered from here)
  int64_t cache_bytes = 0;
  Clock::time_point last_active;
  std::chrono::system_clock::time_point last_active_wall;
  int pending = 0;  // queued or running steps: a session with work in flight is never reaped
  bool closed = false;

  SessionInfo Info() const {
    std::lock_guard<std::mutex> lock(mu);
    SessionInfo s;
    s.id = id;
    s.model = model->info.name;
    s.max_tokens = max_tokens;
    s.layer_positions = positions;
    s.idle_ttl = idle_ttl;
    s.create_time = create_time;
    s.expire_time = last_active_wall + idle_ttl;
    s.causal = causal;
    s.position_bias = position_bias;
    s.admission = admission;
    s.cache_bytes = cache_bytes;
    s.device = replica->device;
    return s;
  }

  // A closed session's blocks go back to the pool as soon as no step of it is queued or running (the worker
  // touches the table only for queued or running steps, so nothing reads it after this).
  void ReleaseBlocksIfIdleLocked() {
    if (closed && pending == 0 && table) {
      table->Release();
      cache_bytes = 0;
    }
    if (closed) {
      for (LastStep& l : last) KeepAnswerLocked(l, std::nullopt);
    }
  }

  // Replaces the answer kept in l by out (or by none), within the engine's replay budget: an answer that does
  // not fit next to the others is not kept.
  void KeepAnswerLocked(LastStep& l, std::optional<Tensor> out) {
    if (l.out) replay_bytes->fetch_sub(static_cast<int64_t>(l.out->nbytes()));
    l.out.reset();
    // A closed session's answers are let go (ReleaseBlocksIfIdleLocked, again when its last step finishes); one
    // finishing after the close is not kept at all, so nobody's budget holds it even for a moment.
    if (!out || closed) return;
    const auto n = static_cast<int64_t>(out->nbytes());
    int64_t used = replay_bytes->load();
    while (used + n <= replay_budget) {
      if (replay_bytes->compare_exchange_weak(used, used + n)) {
        l.out = std::move(out);
        return;
      }
    }
  }
  std::atomic<int64_t>* replay_bytes = nullptr;  // the engine's; outlives every session
  int64_t replay_budget = 0;

  bool busy() const {
    std::lock_guard<std::mutex> lock(mu);
    return pending > 0;
  }
};

// Session::causal never changes after creation, so the worker reads it without the session's lock.
int64_t StepJob::NextChunk(int64_t max_chunk) const {
  return session->causal ? std::min(remaining(), std::max<int64_t>(1, max_chunk)) : remaining();
}

// A worker: one thread that runs everything for one device. Steps of one (model, layer) waiting together run as
// one pass (continuous batching); everything else runs alone, in queue order.
class Worker {
 public:
  using BatchRunner = std::function<void(std::vector<WorkItem>& batch, std::vector<WorkItem>* unfinished)>;

  Worker(std::string device, size_t max_queue, BatchingOptions batching)
      : device_(std::move(device)), max_queue_(max_queue), batching_(batching) {}

  void Start(std::function<void(const WorkItem&, Status)> on_drop, BatchRunner run_batch) {
    on_drop_ = std::move(on_drop);
    run_batch_ = std::move(run_batch);
    thread_ = std::thread([this] { Loop(); });
  }

  ~Worker() { Stop(); }

  void Stop() {
    std::deque<WorkItem> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_ && !thread_.joinable()) return;
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    {
      std::lock_guard<std::mutex> lock(mu_);
      left.swap(queue_);
    }
    for (auto& item : left) item.fail(UnavailableError("the server is shutting down; the request was not run"));
  }

  Status Enqueue(WorkItem item) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return UnavailableError("the server is shutting down");
      if (queue_.size() >= max_queue_) {
        return ResourceExhaustedError("the queue of " + device_ + " is full (" + std::to_string(max_queue_) +
                                      " requests waiting); retry later");
      }
      queue_.push_back(std::move(item));
    }
    cv_.notify_one();
    return Status();
  }

  size_t queued() const {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.size();
  }
  size_t running() const { return running_.load(); }
  // Nothing queued and nothing taken whose completion callbacks have not all returned.
  bool idle() const {
    std::lock_guard<std::mutex> lock(mu_);
    return queue_.empty() && !busy_;
  }

 private:
  // Why an item leaves the queue without running, if it does.
  Status DropReason(const WorkItem& item) const {
    // The deadline first: a gRPC deadline reaches the server both as the call's deadline and as a cancellation.
    if (Clock::now() > item.deadline || (item.cancel && item.cancel->expired())) {
      return Status(StatusCode::kDeadlineExceeded, "the deadline passed while the request waited in the queue (" +
                                                       std::to_string(MicrosBetween(item.enqueued, Clock::now()) / 1000) +
                                                       " ms); nothing was computed");
    }
    if (item.cancel && item.cancel->cancelled()) {
      return Status(StatusCode::kCancelled, "the request was cancelled before it ran; nothing was computed");
    }
    return Status();
  }


  // Takes, under mu_, the front item and (when it is a step) the queued steps that can share its pass: same
  // model and layer, each (session, layer) at most once and never ahead of an earlier step of the same
  // (session, layer), within the token and session limits. Dropped items go to *dropped.
  std::vector<WorkItem> TakeBatchLocked(std::vector<std::pair<WorkItem, Status>>* dropped) {
    std::vector<WorkItem> batch;
    while (!queue_.empty() && batch.empty()) {
      WorkItem front = std::move(queue_.front());
      queue_.pop_front();
      Status why = DropReason(front);
      if (!why.ok() && (!front.job || front.job->done == 0)) {
        dropped->emplace_back(std::move(front), std::move(why));
        continue;
      }
      batch.push_back(std::move(front));
    }
    if (batch.empty() || !batch[0].job) return batch;
    const StepJob& first = *batch[0].job;
    const int64_t max_sessions = std::max<int64_t>(1, batching_.max_batch_sessions);
    int64_t tokens = first.NextChunk(batching_.max_prefill_chunk);
    std::set<std::pair<const void*, int>> seen = {{first.session.get(), first.request.layer}};
    for (auto it = queue_.begin(); it != queue_.end() && static_cast<int64_t>(batch.size()) < max_sessions;) {
      if (!it->job) {
        ++it;
        continue;
      }
      const StepJob& job = *it->job;
      const std::pair<const void*, int> key = {job.session.get(), job.request.layer};
      if (seen.count(key)) {  // later steps of a (session, layer) in the pass already wait for the next one
        ++it;
        continue;
      }
      seen.insert(key);
      if (job.replica != first.replica || job.request.layer != first.request.layer) {
        ++it;
        continue;
      }
      Status why = DropReason(*it);
      if (!why.ok() && job.done == 0) {
        dropped->emplace_back(std::move(*it), std::move(why));
        it = queue_.erase(it);
        continue;
      }
      const int64_t t = job.NextChunk(batching_.max_prefill_chunk);
      if (tokens + t > std::max<int64_t>(1, batching_.max_batch_tokens)) {
        ++it;
        continue;
      }
      tokens += t;
      batch.push_back(std::move(*it));
      it = queue_.erase(it);
    }
    return batch;
  }

  void Loop() {
    // No gradients are ever taken here: inference mode skips LibTorch's autograd and view-tracking dispatch,
    // which is much of the host time of the small per-step operators (slicing a pass's rows per session,
    // dtype conversions) and caps a pass's throughput when the GPU work is short. Tensors made here are
    // inference tensors: callers read them, and copy before any in-place change (Tensor's API has none).
    c10::InferenceMode inference_mode;
#ifdef MQA_WITH_CUDA
    // The worker owns one stream per device: everything it launches is ordered on that stream, and nothing
    // else in the process launches on it.
    std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
    if (device_.rfind("cuda", 0) == 0) {
      auto device = ParseDevice(device_);
      if (device.ok()) {
        stream_guard.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device->index()));
      }
    }
#endif
    for (;;) {
      std::vector<WorkItem> batch;
      std::vector<std::pair<WorkItem, Status>> dropped;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        if (batching_.max_queue_delay.count() > 0 && batching_.max_batch_sessions > 1) {
          // Let a pass fill up to its session limit for at most max_queue_delay.
          cv_.wait_for(lock, batching_.max_queue_delay, [this] {
            return stopping_ || static_cast<int64_t>(queue_.size()) >= batching_.max_batch_sessions;
          });
          if (stopping_) return;
        }
        batch = TakeBatchLocked(&dropped);
        busy_ = !batch.empty() || !dropped.empty();
        for (WorkItem& item : batch) {
          if (item.in_flight) item.in_flight->counter.store(&running_);
        }
        running_.fetch_add(batch.size());
      }
      for (auto& [item, why] : dropped) on_drop_(item, std::move(why));
      std::vector<WorkItem> unfinished;
      if (!batch.empty()) {
        if (batch[0].job) {
          run_batch_(batch, &unfinished);
        } else {
          batch[0].run(batch[0].enqueued);
        }
        // Replies already left them; unfinished prefills are queued again, not running.
        for (WorkItem& item : batch) {
          if (item.in_flight) item.in_flight->Leave();
        }
        for (WorkItem& item : unfinished) {
          if (item.in_flight) item.in_flight->Leave();
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      // Unfinished prefills go back to the front, in order, ahead of later steps of their sessions.
      for (auto it = unfinished.rbegin(); it != unfinished.rend(); ++it) queue_.push_front(std::move(*it));
      busy_ = false;
    }
  }

  const std::string device_;
  const size_t max_queue_;
  const BatchingOptions batching_;
  std::function<void(const WorkItem&, Status)> on_drop_;
  BatchRunner run_batch_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WorkItem> queue_;
  std::atomic<size_t> running_{0};  // taken items whose reply has not gone out
  bool busy_ = false;  // a pass or drops taken from the queue and not yet completed (callbacks included)
  bool stopping_ = false;
  std::thread thread_;
};

struct Engine::Impl {
  EngineOptions options;
  std::map<std::string, std::unique_ptr<Model>> models;
  std::map<std::string, std::unique_ptr<Worker>> workers;  // by device

  mutable std::mutex mu;  // guards sessions, ended, counters, accepting
  std::map<std::string, std::shared_ptr<Session>> sessions;
  // Recently ended sessions, so NOT_FOUND can say why (bounded: oldest forgotten first).
  std::map<std::string, std::string> ended;
  std::deque<std::string> ended_order;
  static constexpr size_t kEndedMemory = 16384;
  EngineStats counters;
  bool accepting = true;
  std::atomic<int64_t> replay_bytes{0};  // answers kept for retries, all sessions (Session::KeepAnswerLocked)
  std::vector<uint64_t> batch_histogram = std::vector<uint64_t>(10, 0);

  std::mutex reaper_mu;
  std::condition_variable reaper_cv;
  bool reaper_stop = false;
  std::thread reaper;

  void RememberEnded(const std::string& id, std::string why) {
    ended[id] = std::move(why);
    ended_order.push_back(id);
    if (ended_order.size() > kEndedMemory) {
      ended.erase(ended_order.front());
      ended_order.pop_front();
    }
  }

  Status SessionNotFound(const std::string& id) const {
    auto it = ended.find(id);
    if (it != ended.end()) return NotFoundError("session " + id + " " + it->second);
    return NotFoundError("session " + id + " does not exist (never created, or ended long ago)");
  }

  StatusOr<std::shared_ptr<Session>> FindSession(const std::string& id) const {
    std::lock_guard<std::mutex> lock(mu);
    auto it = sessions.find(id);
    if (it == sessions.end()) return SessionNotFound(id);
    return it->second;
  }

  void CountDrop(const Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    if (status.code() == StatusCode::kCancelled) ++counters.dropped_cancelled;
    if (status.code() == StatusCode::kDeadlineExceeded) ++counters.dropped_deadline;
  }

  void ReapLoop() {
    std::unique_lock<std::mutex> lock(reaper_mu);
    while (!reaper_cv.wait_for(lock, options.reap_interval, [this] { return reaper_stop; })) {
      ReapExpired();
    }
  }

  void ReapExpired() {
    auto now = Clock::now();
    std::vector<std::shared_ptr<Session>> expired;  // released outside the lock
    {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = sessions.begin(); it != sessions.end();) {
        Session& s = *it->second;
        bool idle;
        {
          std::lock_guard<std::mutex> slock(s.mu);
          idle = s.pending == 0 && now - s.last_active >= s.idle_ttl;
          if (idle) {
            s.closed = true;
            s.ReleaseBlocksIfIdleLocked();
          }
        }
        if (idle) {
          RememberEnded(s.id, "expired after " + FormatMillis(s.idle_ttl) + " idle (its idle TTL)");
          ++counters.sessions_expired;
          s.replica->sessions.fetch_sub(1, std::memory_order_relaxed);
          expired.push_back(std::move(it->second));
          it = sessions.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& s : expired) {
      Log(LogLevel::kInfo, "session " + s->id + " expired after " + FormatMillis(s->idle_ttl) + " idle");
    }
  }

  // Queues run on the device's worker; fail gets the refusal when the queue will not take it.
  void Enqueue(const std::string& device, Clock::time_point deadline, std::shared_ptr<const CancelFlag> cancel,
               std::function<void(Clock::time_point)> run, std::function<void(Status)> fail,
               std::shared_ptr<InFlight> in_flight, std::shared_ptr<StepJob> job = nullptr) {
    WorkItem item;
    item.in_flight = std::move(in_flight);
    item.enqueued = Clock::now();
    item.deadline = deadline;
    item.cancel = std::move(cancel);
    item.run = std::move(run);
    item.fail = fail;
    item.job = std::move(job);
    Status queued = workers.at(device)->Enqueue(std::move(item));
    if (!queued.ok()) fail(queued);
  }

  // Runs one pass: the next chunk of every step in batch (all of one replica and layer). Finished steps are
  // completed; steps with prefill left go to *unfinished.
  void RunBatch(std::vector<WorkItem>& batch, std::vector<WorkItem>* unfinished);
  void RunForward(const Replica& replica, const ForwardRequest& req, Clock::time_point enqueued,
                  const ForwardCallback& done);
};

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(impl_->reaper_mu);
    impl_->reaper_stop = true;
  }
  impl_->reaper_cv.notify_all();
  if (impl_->reaper.joinable()) impl_->reaper.join();
  for (auto& [device, worker] : impl_->workers) worker->Stop();
}

namespace {

// Bytes the KV cache of one device may take: the explicit budget, else a fraction of the device memory still
// free after the weights were loaded (CUDA), else the CPU default.
StatusOr<int64_t> DeviceKvBudget(const KvCacheOptions& kv, const std::string& device) {
  if (kv.budget_bytes > 0) return kv.budget_bytes;
  if (device.rfind("cuda", 0) != 0) return kv.cpu_budget_bytes;
#ifdef MQA_WITH_CUDA
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  c10::cuda::CUDAGuard guard(dev.index());
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    return UnavailableError("cannot read the free memory of " + device);
  }
  return static_cast<int64_t>(kv.gpu_memory_fraction * static_cast<double>(free_bytes));
#else
  return UnavailableError(device + " is not available in this build");
#endif
}

// Gives every replica a block pool and per-layer k/v storage, splitting each device's budget evenly among the
// replicas on it (of all models). Every device's budget is read before anything is allocated, so replicas on one
// GPU share the memory that was free after all weights were loaded. Refuses (with the numbers) a share that
// cannot hold one session of the model's longest length.
Status SizeKvPools(const EngineOptions& options, std::map<std::string, std::unique_ptr<Model>>& models) {
  const KvCacheOptions& kv = options.kv_cache;
  if (kv.block_size < 1) return InvalidArgumentError("kv_cache.block_size must be >= 1, got " + std::to_string(kv.block_size));
  if (kv.gpu_memory_fraction <= 0 || kv.gpu_memory_fraction > 1) {
    return InvalidArgumentError("kv_cache.gpu_memory_fraction must be in (0, 1], got " +
                                std::to_string(kv.gpu_memory_fraction));
  }
  std::map<std::string, int> per_device;
  for (const auto& [name, m] : models) {
    for (const auto& r : m->replicas) ++per_device[r->device];
  }
  std::map<std::string, int64_t> budgets;
  for (const auto& [device, n] : per_device) {
    MQA_ASSIGN_OR_RETURN(budgets[device], DeviceKvBudget(kv, device));
  }
  for (auto& [name, m] : models) {
    for (auto& r : m->replicas) {
      const int64_t share = budgets[r->device] / per_device[r->device];
      const MqaOptions& o = m->info.options;
      const int64_t d = o.head_dim();
      r->block_bytes = static_cast<int64_t>(m->info.num_layers) * 2 * kv.block_size * d *
                       static_cast<int64_t>(DTypeSize(o.dtype));
      const int64_t blocks = std::min<int64_t>(share / r->block_bytes, std::numeric_limits<int32_t>::max());
      const int64_t need = BlockPool::BlocksFor(m->info.max_tokens_per_session, kv.block_size);
      if (blocks - 1 < need) {
        return ResourceExhaustedError(
            "model \"" + name + "\": its KV cache share of " + std::to_string(share) + " bytes on " + r->device +
            " holds " + std::to_string(std::max<int64_t>(blocks - 1, 0)) + " blocks of " +
            std::to_string(kv.block_size) + " tokens (" + std::to_string(r->block_bytes) +
            " bytes each), fewer than the " + std::to_string(need) + " one session of max_tokens_per_session " +
            std::to_string(m->info.max_tokens_per_session) + " needs; raise the KV cache budget or lower max_tokens");
      }
      r->pool = std::make_unique<BlockPool>(static_cast<int32_t>(blocks), kv.block_size);
      Status st = CatchAll("allocating the KV cache", [&]() -> Status {
        MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(r->device));
        const auto opts = at::TensorOptions().dtype(ToScalarType(o.dtype)).device(dev);
        for (int i = 0; i < m->info.num_layers; ++i) {
          r->k_cache.push_back(at::empty({blocks * kv.block_size, d}, opts));
          r->v_cache.push_back(at::empty({blocks * kv.block_size, d}, opts));
          // Block 0 is the padding target of batched attention: it must read as zeros, never as stale data.
          r->k_cache.back().narrow(0, 0, kv.block_size).zero_();
          r->v_cache.back().narrow(0, 0, kv.block_size).zero_();
        }
        return Status();
      });
      if (!st.ok()) return Status(st.code(), "model \"" + name + "\" on " + r->device + ": " + st.message());
      Log(LogLevel::kInfo, "KV cache of model " + name + " on " + r->device + ": " + std::to_string(blocks - 1) +
                               " blocks of " + std::to_string(kv.block_size) + " tokens (" +
                               std::to_string((blocks - 1) * kv.block_size) + " tokens, " +
                               std::to_string(blocks * r->block_bytes >> 20) + " MiB)");
    }
  }
  return Status();
}

// The model's devices, normalised ("cuda" -> "cuda:0"), in the configured order; a device named twice is refused.
StatusOr<std::vector<std::string>> ReplicaDevices(const ModelConfig& mc) {
  const std::string where = "model \"" + mc.name + "\": ";
  std::vector<std::string> devices;
  std::vector<std::string> spelled;  // as given, for the message
  for (const std::string& d : mc.devices.empty() ? std::vector<std::string>{mc.options.device} : mc.devices) {
    const std::string device = NormaliseDevice(d);
    const auto seen = std::find(devices.begin(), devices.end(), device);
    if (seen != devices.end()) {
      const std::string& first = spelled[static_cast<size_t>(seen - devices.begin())];
      const bool aliased = first != device || d != device;
      return InvalidArgumentError(where + "device " + device + " is listed twice" +
                                  (aliased ? " (\"cuda\" means \"cuda:0\")" : std::string()) +
                                  "; a model has at most one replica per device (two on one device would only "
                                  "split its KV cache and its batches)");
    }
    devices.push_back(device);
    spelled.push_back(d);
  }
  return devices;
}

}  // namespace

int DeviceOrdinal(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() <= 14 &&
      std::all_of(device.begin() + 5, device.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    const long long n = std::stoll(device.substr(5));
    if (n < INT_MAX) return static_cast<int>(n);
  }
  return INT_MAX;
}

std::vector<size_t> RankReplicas(const std::vector<ReplicaLoad>& replicas) {
  std::vector<size_t> order(replicas.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const ReplicaLoad& x = replicas[a];
    const ReplicaLoad& y = replicas[b];
    if (x.free_blocks != y.free_blocks) return x.free_blocks > y.free_blocks;
    if (x.sessions != y.sessions) return x.sessions < y.sessions;
    return x.device_ordinal < y.device_ordinal;  // equal: stable, so the lower index first
  });
  return order;
}

StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options) {
  if (options.models.empty()) return InvalidArgumentError("the engine needs at least one model");
  if (options.max_sessions == 0) return InvalidArgumentError("max_sessions must be positive");
  if (options.max_queue == 0) return InvalidArgumentError("max_queue must be positive");
  if (options.default_idle_ttl.count() <= 0 || options.max_idle_ttl < options.default_idle_ttl) {
    return InvalidArgumentError("idle TTLs: expected 0 < default_idle_ttl <= max_idle_ttl, got " +
                                FormatMillis(options.default_idle_ttl) + " and " + FormatMillis(options.max_idle_ttl));
  }
  if (options.reap_interval.count() <= 0) return InvalidArgumentError("reap_interval must be positive");
  if (options.max_forward_scores < 1) return InvalidArgumentError("max_forward_scores must be positive");
  if (options.max_forward_weights_bytes < 0) return InvalidArgumentError("max_forward_weights_bytes must be >= 0");

  auto impl = std::make_unique<Impl>();
  for (const ModelConfig& mc : options.models) {
    const std::string where = "model \"" + mc.name + "\": ";
    if (mc.name.empty()) return InvalidArgumentError("every model needs a non-empty name");
    if (impl->models.count(mc.name)) return InvalidArgumentError("duplicate model name \"" + mc.name + "\"");
    if (mc.num_layers <= 0 && mc.weights_path.empty()) {
      return InvalidArgumentError(where + "num_layers must be positive, got " + std::to_string(mc.num_layers));
    }
    if (mc.max_tokens_per_session <= 0) {
      return InvalidArgumentError(where + "max_tokens_per_session must be positive, got " +
                                  std::to_string(mc.max_tokens_per_session));
    }
    MQA_ASSIGN_OR_RETURN(std::vector<std::string> devices, ReplicaDevices(mc));
    auto model = std::make_unique<Model>();
    MqaOptions o = mc.options;
    o.device = devices[0];
    // The same seed or the same file on every device: the replicas hold identical weights (seeded
    // initialisation draws on the CPU whatever the device).
    for (const std::string& device : devices) {
      MqaOptions od = o;
      od.device = device;
      StatusOr<std::unique_ptr<MqaStack>> stack = mc.weights_path.empty()
                                                      ? MqaStack::Create(od, mc.num_layers)
                                                      : MqaStack::Load(mc.weights_path, od, std::max(mc.num_layers, 0));
      if (!stack.ok()) {
        return Status(stack.status().code(),
                      where + (devices.size() > 1 ? "replica on " + device + ": " : std::string()) +
                          stack.status().message());
      }
      auto replica = std::make_unique<Replica>();
      replica->model = model.get();
      replica->device = device;
      replica->stack = std::move(stack).value();
      model->replicas.push_back(std::move(replica));
      if (!impl->workers.count(device)) {
        impl->workers[device] = std::make_unique<Worker>(device, options.max_queue, options.batching);
      }
    }
    model->info.name = mc.name;
    model->info.num_layers = model->replicas[0]->stack->num_layers();
    model->info.options = o;
    model->info.devices = devices;
    model->info.max_tokens_per_session = mc.max_tokens_per_session;
    model->info.description = mc.description;
    std::string on;
    for (const std::string& d : devices) on += (on.empty() ? "" : ", ") + d;
    Log(LogLevel::kInfo, "loaded model " + mc.name + ": " + std::to_string(model->info.num_layers) + " layers, dim " +
                             std::to_string(o.dim) + ", heads " + std::to_string(o.heads) + ", " +
                             std::string(DTypeName(o.dtype)) + " on " + on + ", attn_impl " +
                             std::string(AttnImplName(o.attn_impl)));
    const bool has_cpu = std::count(devices.begin(), devices.end(), "cpu") > 0;
    if (has_cpu && devices.size() > 1) {
      // It works (each session stays on its replica, and the results agree within the dtype's rounding), but
      // placement looks at free KV blocks only, so some sessions land on the CPU and run far slower.
      Log(LogLevel::kWarning, "model " + mc.name + " has replicas on the CPU and on GPUs: sessions placed on the "
                              "CPU replica run much slower than the others");
    }
    impl->models[mc.name] = std::move(model);
  }
  if (Status pools = SizeKvPools(options, impl->models); !pools.ok()) return pools;
  impl->options = std::move(options);
  Impl* raw = impl.get();
  for (auto& [device, worker] : impl->workers) {
    worker->Start(
        [raw](const WorkItem& item, Status status) {
          raw->CountDrop(status);
          item.fail(std::move(status));
        },
        [raw](std::vector<WorkItem>& batch, std::vector<WorkItem>* unfinished) { raw->RunBatch(batch, unfinished); });
  }
  impl->reaper = std::thread([raw] { raw->ReapLoop(); });
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

std::vector<ModelInfo> Engine::ListModels() const {
  std::vector<ModelInfo> out;
  for (const auto& [name, model] : impl_->models) out.push_back(model->info);
  return out;
}

StatusOr<ModelInfo> Engine::GetModel(const std::string& name) const {
  auto it = impl_->models.find(name);
  if (it == impl_->models.end()) {
    std::string names;
    for (const auto& [n, m] : impl_->models) names += (names.empty() ? "" : ", ") + n;
    return NotFoundError("model \"" + name + "\" is not hosted here; hosted: " + names);
  }
  return it->second->info;
}

StatusOr<SessionInfo> Engine::CreateSession(const SessionConfig& config) {
  auto mit = impl_->models.find(config.model);
  if (mit == impl_->models.end()) return GetModel(config.model).status();
  const Model& model = *mit->second;
  if (config.max_tokens < 0 || config.max_tokens > model.info.max_tokens_per_session) {
    return InvalidArgumentError("max_tokens must be between 1 and " +
                                std::to_string(model.info.max_tokens_per_session) + " for model " + model.info.name +
                                " (0 picks the maximum), got " + std::to_string(config.max_tokens));
  }
  const auto& eo = impl_->options;
  if (config.idle_ttl.count() < 0 || config.idle_ttl > eo.max_idle_ttl) {
    return InvalidArgumentError("idle_ttl must be between 0 (the default, " + FormatMillis(eo.default_idle_ttl) +
                                ") and " + FormatMillis(eo.max_idle_ttl) + ", got " + FormatMillis(config.idle_ttl));
  }
  MQA_ASSIGN_OR_RETURN(std::string id, NewSessionId());
  auto s = std::make_shared<Session>();
  s->id = id;
  s->model = &model;
  s->max_tokens = config.max_tokens > 0 ? config.max_tokens : model.info.max_tokens_per_session;
  s->idle_ttl = config.idle_ttl.count() > 0 ? config.idle_ttl : eo.default_idle_ttl;
  s->causal = config.causal;
  s->position_bias = config.position_bias;
  s->create_time = std::chrono::system_clock::now();
  s->admission = config.admission;
  s->positions.assign(static_cast<size_t>(model.info.num_layers), 0);
  s->last.assign(static_cast<size_t>(model.info.num_layers), LastStep{});
  s->replay_bytes = &impl_->replay_bytes;
  s->replay_budget = eo.replay_budget_bytes;

  // Placement: the replica with the most free blocks (RankReplicas). Concurrent creations may read the same
  // numbers and pick the same replica; the pool's all-or-nothing Allocate keeps reservations exact regardless.
  std::vector<ReplicaLoad> loads;
  for (const auto& r : model.replicas) {
    loads.push_back({r->pool->free_blocks(), r->sessions.load(std::memory_order_relaxed), DeviceOrdinal(r->device)});
  }
  const std::vector<size_t> order = RankReplicas(loads);
  if (config.admission == Admission::kGuaranteed) {
    // Reserved now, so the session can never run out of blocks later: on the best replica, else the next one
    // that has them.
    std::string refusals;
    Status first_refusal;
    for (size_t i : order) {
      Replica* r = model.replicas[i].get();
      auto table = std::make_unique<BlockTable>(r->pool.get());
      Status reserved = table->EnsureCapacity(s->max_tokens);
      if (reserved.ok()) {
        s->replica = r;
        s->table = std::move(table);
        break;
      }
      if (first_refusal.ok()) first_refusal = reserved;
      refusals += (refusals.empty() ? "" : "; ") + r->device + ": " + reserved.message();
    }
    if (s->replica == nullptr) {
      std::lock_guard<std::mutex> lock(impl_->mu);
      ++impl_->counters.kv_exhausted;
      const std::string why = model.replicas.size() == 1
                                  ? first_refusal.message()
                                  : "no device of model " + model.info.name + " has the blocks (" + refusals + ")";
      return Status(first_refusal.code(), why + " for a guaranteed session of " + std::to_string(s->max_tokens) +
                                              " tokens; ask for fewer max_tokens, use best-effort admission, or "
                                              "retry when sessions close");
    }
    s->cache_bytes = static_cast<int64_t>(s->table->blocks().size()) * s->replica->block_bytes;
  } else {
    s->replica = model.replicas[order[0]].get();
    s->table = std::make_unique<BlockTable>(s->replica->pool.get());
  }
  s->last_active = Clock::now();
  s->last_active_wall = s->create_time;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    // A refusal here drops s, whose table's destructor returns any reserved blocks.
    if (!impl_->accepting) return UnavailableError("the server is draining and accepts no new sessions");
    if (impl_->sessions.size() >= eo.max_sessions) {
      return ResourceExhaustedError("the server holds its maximum of " + std::to_string(eo.max_sessions) +
                                    " sessions; close one or retry later");
    }
    impl_->sessions[id] = s;
    s->replica->sessions.fetch_add(1, std::memory_order_relaxed);
    ++impl_->counters.sessions_created;
  }
  return s->Info();
}

StatusOr<SessionInfo> Engine::GetSession(const std::string& id) const {
  MQA_ASSIGN_OR_RETURN(auto s, impl_->FindSession(id));
  return s->Info();
}

StatusOr<SessionInfo> Engine::CloseSession(const std::string& id) {
  std::shared_ptr<Session> s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->sessions.find(id);
    if (it == impl_->sessions.end()) return impl_->SessionNotFound(id);
    s = std::move(it->second);
    impl_->sessions.erase(it);
    s->replica->sessions.fetch_sub(1, std::memory_order_relaxed);
    impl_->RememberEnded(id, "was closed");
    ++impl_->counters.sessions_closed;
  }
  SessionInfo info = s->Info();
  {
    std::lock_guard<std::mutex> slock(s->mu);
    s->closed = true;
    s->ReleaseBlocksIfIdleLocked();
  }
  return info;
}

void Engine::SubmitStep(StepRequest request, StepCallback done) {
  auto fail_now = [this, &done](Status status) {
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      ++impl_->counters.steps_failed;
    }
    done(std::move(status));
  };
  auto found = impl_->FindSession(request.session_id);
  if (!found.ok()) return fail_now(found.status());
  std::shared_ptr<Session> session = std::move(found).value();
  const Model& model = *session->model;
  const MqaOptions& o = model.info.options;
  if (Status layer = CheckLayer(model.info, request.layer); !layer.ok()) return fail_now(layer);
  const Tensor& x = request.x;
  if (!x.defined() || x.dim() != 3 || x.size(0) != 1 || x.size(1) < 0 || x.size(2) != o.dim ||
      !IsFloatingPoint(x.dtype())) {
    return fail_now(InvalidArgumentError(
        "x: expected a floating tensor [1, s, " + std::to_string(o.dim) + "] with s >= 0 (one session, dim " +
        std::to_string(o.dim) + "), got " +
        (x.defined() ? std::string(DTypeName(x.dtype())) + " " + ShapeToString(x.shape()) : "nothing")));
  }
  bool closed;
  {
    std::lock_guard<std::mutex> slock(session->mu);
    closed = session->closed;
    if (!closed) {
      ++session->pending;
      session->last_active = Clock::now();
      session->last_active_wall = std::chrono::system_clock::now();
    }
  }
  if (closed) return fail_now(NotFoundError("session " + session->id + " was closed; nothing was computed"));
  auto shared_done = std::make_shared<StepCallback>(std::move(done));
  auto in_flight = std::make_shared<InFlight>();
  auto finish = [this, session, shared_done, in_flight](StatusOr<StepResult> result) {
    in_flight->Leave();
    {
      std::lock_guard<std::mutex> slock(session->mu);
      --session->pending;
      session->ReleaseBlocksIfIdleLocked();  // closed while this step was in flight: free now, not at the last ref
      session->last_active = Clock::now();
      session->last_active_wall = std::chrono::system_clock::now();
    }
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      if (result.ok()) {
        ++impl_->counters.steps_completed;
      } else {
        ++impl_->counters.steps_failed;
      }
    }
    (*shared_done)(std::move(result));
  };
  const Clock::time_point deadline = request.deadline;
  auto cancel = request.cancel;
  auto job = std::make_shared<StepJob>();
  job->session = session;
  job->replica = session->replica;
  job->x_hash = request.position ? InputHash(request.x) : 0;  // only steps that name a position can be retried
  job->request = std::move(request);
  job->finish = finish;
  impl_->Enqueue(session->replica->device, deadline, std::move(cancel), nullptr, finish, in_flight, std::move(job));
}

void Engine::Impl::RunBatch(std::vector<WorkItem>& batch, std::vector<WorkItem>* unfinished) {
  const Replica& replica = *batch[0].job->replica;
  const MqaOptions& o = replica.model->info.options;
  const int layer = batch[0].job->request.layer;
  const int32_t bs = replica.pool->block_size();
  auto start = Clock::now();
  // First chunks are checked against the session state; refusals leave the session unchanged.
  std::vector<WorkItem*> run;
  for (WorkItem& item : batch) {
    StepJob& job = *item.job;
    Session& session = *job.session;
    const int64_t s_new = job.request.x.size(1);
    if (job.start >= 0) {
      run.push_back(&item);
      continue;
    }
    int64_t pos;
    bool closed;
    bool repeat = false;  // the step repeats the layer's last applied step (a retry)
    std::optional<Tensor> kept;
    {
      std::lock_guard<std::mutex> slock(session.mu);
      closed = session.closed;
      pos = session.positions[static_cast<size_t>(layer)];
      const LastStep& last = session.last[static_cast<size_t>(layer)];
      repeat = job.request.position && *job.request.position != pos && last.position == *job.request.position &&
               last.position + last.tokens == pos && last.tokens == s_new && last.dtype == job.request.x.dtype() &&
               last.x_hash == job.x_hash;
      if (repeat) kept = last.out;
    }
    Status refused;
    if (closed) {
      refused = NotFoundError("session " + session.id + " was closed before this step ran; nothing was computed");
    } else if (repeat && kept) {
      StepResult r;
      r.out = std::move(*kept);
      r.position = *job.request.position;
      r.num_tokens = s_new;
      r.queue_us = MicrosBetween(item.enqueued, start);
      r.replayed = true;
      {
        std::lock_guard<std::mutex> lock(mu);
        ++counters.steps_replayed;
      }
      job.finish(std::move(r));
      continue;
    } else if (repeat) {
      refused = FailedPreconditionError(
          "layer " + std::to_string(layer) + " of session " + session.id + " already applied this step at " +
          std::to_string(*job.request.position) + " (it now holds " + std::to_string(pos) +
          " tokens), but its answer was not kept (the server's replay budget was full); nothing was computed");
    } else if (job.request.position && *job.request.position != pos) {
      refused = FailedPreconditionError("layer " + std::to_string(layer) + " of session " + session.id + " holds " +
                                        std::to_string(pos) + " tokens, but the step says it starts at " +
                                        std::to_string(*job.request.position) + "; nothing was computed");
    } else if (pos + s_new > session.max_tokens) {
      refused = OutOfRangeError("layer " + std::to_string(layer) + " of session " + session.id + " holds " +
                                std::to_string(pos) + " tokens; " + std::to_string(s_new) +
                                " more would pass the session's max_tokens of " + std::to_string(session.max_tokens));
    } else {
      refused = session.table->EnsureCapacity(pos + s_new);
      if (!refused.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        ++counters.kv_exhausted;
        refused = Status(refused.code(), refused.message() + "; session " + session.id +
                                             " is unchanged: retry the step when blocks are free");
      }
    }
    if (refused.ok()) {
      // Converted on the CPU; the pass moves all its chunks to the device in one copy.
      auto x = job.request.x.dtype() == o.dtype ? StatusOr<Tensor>(job.request.x) : job.request.x.ToDType(o.dtype);
      if (x.ok()) {
        job.x = Unwrap(*x).view({s_new, o.dim});
        job.start = pos;
        job.started = start;
      } else {
        refused = x.status();
      }
    }
    if (!refused.ok()) {
      item.fail(refused);
      continue;
    }
    if (s_new == 0) {  // the spec's empty input: an empty output, nothing appended
      StepResult r;
      r.out = job.request.x;
      r.position = pos;
      r.queue_us = MicrosBetween(item.enqueued, start);
      job.finish(std::move(r));
      continue;
    }
    {
      std::lock_guard<std::mutex> slock(session.mu);
      session.cache_bytes = static_cast<int64_t>(session.table->blocks().size()) * replica.block_bytes;
    }
    run.push_back(&item);
  }
  if (run.empty()) return;

  // One pass over the next chunk of every step.
  std::vector<PagedSeq> seqs;
  std::vector<at::Tensor> xs;
  std::vector<int64_t> chunk(run.size());
  int64_t rows = 0;
  for (size_t i = 0; i < run.size(); ++i) {
    StepJob& job = *run[i]->job;
    chunk[i] = job.NextChunk(options.batching.max_prefill_chunk);
    PagedSeq seq;
    seq.row = rows;
    seq.tokens = chunk[i];
    seq.past = job.start + job.done;
    seq.table = job.session->table.get();
    seq.causal = job.session->causal;
    seq.alibi = job.session->position_bias == PositionBias::kAlibi;
    seqs.push_back(seq);
    xs.push_back(job.x.narrow(0, job.done, chunk[i]));
    rows += chunk[i];
  }
  StatusOr<at::Tensor> out = CatchAll("batched pass", [&]() -> StatusOr<at::Tensor> {
    const at::Tensor& cache = replica.k_cache[static_cast<size_t>(layer)];
    const at::Tensor x = (xs.size() == 1 ? xs[0] : at::cat(xs, 0)).to(cache.device());
    MQA_ASSIGN_OR_RETURN(at::Tensor y, PagedForward(replica.stack->layer(layer), x, seqs, bs, cache,
                                                    replica.v_cache[static_cast<size_t>(layer)]));
    // One copy back for the whole pass (one synchronisation), sliced per step on the CPU.
    return y.is_cpu() ? y : y.to(at::kCPU);
  });
  {
    std::lock_guard<std::mutex> lock(mu);
    ++counters.batches;
    counters.batched_steps += run.size();
    size_t bucket = 0;
    while ((size_t{1} << bucket) < run.size() && bucket + 1 < batch_histogram.size()) ++bucket;
    ++batch_histogram[bucket];
  }
  for (size_t i = 0; i < run.size(); ++i) {
    WorkItem& item = *run[i];
    StepJob& job = *item.job;
    if (!out.ok()) {
      item.fail(out.status());
      continue;
    }
    job.outs.push_back(out->narrow(0, seqs[i].row, chunk[i]));
    job.done += chunk[i];
    // The session's position moves only when the whole step is done: a step whose later chunk fails leaves the
    // session where it was (the chunks' keys past that position are overwritten by the next step).
    if (job.remaining() > 0) {
      unfinished->push_back(std::move(item));
      continue;
    }
    StatusOr<Tensor> result = CatchAll("step output", [&]() -> StatusOr<Tensor> {
      at::Tensor all = job.outs.size() == 1 ? job.outs[0] : at::cat(job.outs, 0);
      return ToCaller(Wrap(all.view({1, job.request.x.size(1), o.dim})), job.request.x.dtype());
    });
    if (!result.ok()) {
      item.fail(result.status());
      continue;
    }
    StepResult r;
    r.out = std::move(result).value();
    r.position = job.start;
    r.num_tokens = job.request.x.size(1);
    {
      std::lock_guard<std::mutex> slock(job.session->mu);
      job.session->positions[static_cast<size_t>(layer)] = job.start + job.done;
      LastStep& last = job.session->last[static_cast<size_t>(layer)];
      last.position = job.start;
      last.tokens = r.num_tokens;
      last.dtype = job.request.x.dtype();
      last.x_hash = job.x_hash;
      // Only a step that names its position can be retried, so only its answer is worth keeping.
      job.session->KeepAnswerLocked(last, job.request.position ? std::optional<Tensor>(r.out) : std::nullopt);
    }
    r.queue_us = MicrosBetween(item.enqueued, job.started);
    r.compute_us = MicrosBetween(job.started, Clock::now());
    job.outs.clear();
    job.finish(std::move(r));
  }
}

namespace {

// a * b * c * d, or INT64_MAX when that overflows (the figures come from a client).
int64_t SaturatingProduct(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return INT64_MAX;
  }
  return p;
}

// The per-request limits of a stateless Forward (EngineOptions::max_forward_scores and
// max_forward_weights_bytes), checked from the shapes alone so an oversized request costs nothing. Shapes the
// layer would reject are left to its own messages.
Status CheckForwardWork(const EngineOptions& eo, const ModelInfo& model, const ForwardArgs& args) {
  const std::vector<int64_t> x = args.x.shape();
  if (x.size() != 3) return Status();
  int64_t past = 0;
  if (args.past_key_value && args.past_key_value->v.defined() && args.past_key_value->v.shape().size() == 4) {
    past = args.past_key_value->v.shape()[2];
  }
  const int64_t b = x[0], s = x[1], H = model.options.heads, s_k = past + s;
  const int64_t scores = SaturatingProduct({b, H, s, s_k});
  const std::string figure = "b * H * s * s_k = " + std::to_string(b) + " * " + std::to_string(H) + " * " +
                             std::to_string(s) + " * " + std::to_string(s_k) + " = " + std::to_string(scores);
  if (scores > eo.max_forward_scores) {
    return ResourceExhaustedError("Forward would compute " + figure + " attention scores, more than the limit of " +
                                  std::to_string(eo.max_forward_scores) +
                                  " per request (max_forward_scores, server flag --max-forward-scores); send fewer "
                                  "or shorter sequences, or feed a long one through a session");
  }
  if (args.needs_weights && eo.max_forward_weights_bytes > 0) {
    const int64_t bytes = SaturatingProduct({scores, static_cast<int64_t>(DTypeSize(args.x.dtype()))});
    if (bytes > eo.max_forward_weights_bytes) {
      return ResourceExhaustedError(
          "needs_weights: the weights [" + std::to_string(b) + ", " + std::to_string(H) + ", " + std::to_string(s) +
          ", " + std::to_string(s_k) + "] in " + std::string(DTypeName(args.x.dtype())) + " (" + figure +
          " values) take " + std::to_string(bytes) + " bytes, more than the " +
          std::to_string(eo.max_forward_weights_bytes) +
          " a reply may hold (max_message_bytes, server flag --max-message-bytes); ask for fewer rows, or without "
          "needs_weights");
    }
  }
  return Status();
}

}  // namespace

void Engine::SubmitForward(ForwardRequest request, ForwardCallback done) {
  auto mit = impl_->models.find(request.model);
  if (mit == impl_->models.end()) return done(GetModel(request.model).status());
  const Model& model = *mit->second;
  if (Status layer = CheckLayer(model.info, request.layer); !layer.ok()) return done(layer);
  if (!request.args.x.defined() || !IsFloatingPoint(request.args.x.dtype())) {
    return done(InvalidArgumentError("x: expected a floating tensor [b, s, " +
                                     std::to_string(model.info.options.dim) + "]"));
  }
  if (Status work = CheckForwardWork(impl_->options, model.info, request.args); !work.ok()) return done(work);
  auto shared_done = std::make_shared<ForwardCallback>(std::move(done));
  auto in_flight = std::make_shared<InFlight>();
  auto finish = [this, shared_done, in_flight](StatusOr<ForwardResult> result) {
    in_flight->Leave();
    if (result.ok()) {
      std::lock_guard<std::mutex> lock(impl_->mu);
      ++impl_->counters.forwards_completed;
    }
    (*shared_done)(std::move(result));
  };
  const Clock::time_point deadline = request.deadline;
  auto cancel = request.cancel;
  auto req = std::make_shared<ForwardRequest>(std::move(request));
  // Stateless, so any replica will do: the one whose device has the fewest items queued.
  const Replica* r = model.replicas[0].get();
  size_t least = impl_->workers.at(r->device)->queued();
  for (const auto& candidate : model.replicas) {
    const size_t queued = impl_->workers.at(candidate->device)->queued();
    if (queued < least) {
      least = queued;
      r = candidate.get();
    }
  }
  impl_->Enqueue(r->device, deadline, std::move(cancel),
                 [this, r, req, finish](Clock::time_point enqueued) { impl_->RunForward(*r, *req, enqueued, finish); },
                 finish, in_flight);
}

void Engine::Impl::RunForward(const Replica& replica, const ForwardRequest& req, Clock::time_point /*enqueued*/,
                              const ForwardCallback& done) {
  MqaOptions o = replica.model->info.options;
  o.device = replica.device;  // info.options names the first replica's device
  const DType caller = req.args.x.dtype();
  ForwardArgs args = req.args;
  auto convert = [&](Tensor& t, bool floating, const char* name) -> Status {
    auto c = ToLayer(t, o, floating);
    if (!c.ok()) return Status(c.status().code(), std::string(name) + ": " + c.status().message());
    t = std::move(c).value();
    return Status();
  };
  Status st = convert(args.x, true, "x");
  if (st.ok()) st = convert(args.bias, true, "bias");
  if (st.ok()) st = convert(args.mask, false, "mask");
  if (st.ok() && args.past_key_value) {
    st = convert(args.past_key_value->k, true, "past_key_value.key");
    if (st.ok()) st = convert(args.past_key_value->v, true, "past_key_value.value");
  }
  if (!st.ok()) return done(st);
  args.training = false;
  auto result = replica.stack->layer(req.layer).Forward(args);
  if (!result.ok()) return done(result.status());
  ForwardResult r;
  auto out = ToCaller(result->out, caller);
  if (!out.ok()) return done(out.status());
  r.out = std::move(out).value();
  if (result->weights.defined()) {
    auto w = ToCaller(result->weights, caller);
    if (!w.ok()) return done(w.status());
    r.weights = std::move(w).value();
  }
  if (result->cache) {
    KvCache c;
    auto k = ToCaller(result->cache->k, caller);
    if (!k.ok()) return done(k.status());
    auto v = ToCaller(result->cache->v, caller);
    if (!v.ok()) return done(v.status());
    c.k = std::move(k).value();
    c.v = std::move(v).value();
    r.cache = std::move(c);
  }
  done(std::move(r));
}

void Engine::StopAcceptingSessions() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->accepting = false;
}

bool Engine::WaitIdle(Clock::time_point deadline) const {
  for (;;) {
    // Idle means every callback has returned too (the running gauge drops a request before its reply).
    bool idle = true;
    for (const auto& [device, worker] : impl_->workers) idle = idle && worker->idle();
    if (idle) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    s = impl_->counters;
    s.replay_bytes = impl_->replay_bytes.load();
    s.sessions_open = impl_->sessions.size();
    s.batch_size_histogram = impl_->batch_histogram;
    for (const auto& [id, session] : impl_->sessions) {
      if (session->busy()) {
        ++s.sessions_active;
      } else {
        ++s.sessions_idle;
      }
    }
  }
  s.queue_depth = 0;
  s.running = 0;
  std::map<std::string, DeviceStats> per_device;
  for (const auto& [device, worker] : impl_->workers) {
    DeviceStats& d = per_device[device];
    d.device = device;
    d.queue_depth = worker->queued();
    d.running = worker->running();
    s.queue_depth += d.queue_depth;
    s.running += d.running;
  }
  for (const auto& [name, m] : impl_->models) {
    for (const auto& r : m->replicas) {
      DeviceStats& d = per_device[r->device];
      const int64_t total = r->pool->capacity(), used = r->pool->used_blocks(), avail = r->pool->free_blocks();
      d.kv_blocks_total += total;
      d.kv_blocks_used += used;
      d.kv_blocks_free += avail;
      d.sessions_open += r->sessions.load(std::memory_order_relaxed);
      s.kv_block_size = r->pool->block_size();
      s.kv_blocks_total += total;
      s.kv_blocks_used += used;
      s.kv_blocks_free += avail;
    }
  }
  for (auto& [device, d] : per_device) s.devices.push_back(std::move(d));
  std::stable_sort(s.devices.begin(), s.devices.end(), [](const DeviceStats& a, const DeviceStats& b) {
    return DeviceOrdinal(a.device) < DeviceOrdinal(b.device);
  });
  return s;
}

}  // namespace mqa::core
