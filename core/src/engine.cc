#include "mqa/core/engine.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "mqa/core/logging.h"
#include "tensor_impl.h"

#ifdef MQA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
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

std::string NormaliseDevice(const std::string& device) { return device == "cuda" ? "cuda:0" : device; }

Status CheckLayer(const ModelInfo& model, int layer) {
  if (layer >= 0 && layer < model.num_layers) return Status();
  return InvalidArgumentError("layer " + std::to_string(layer) + " is out of range: model " + model.name +
                              " has layers 0.." + std::to_string(model.num_layers - 1));
}

int64_t TensorBytes(const Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }

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

StatusOr<Tensor> ToCaller(const Tensor& t, DType dtype) {
  if (!t.defined()) return t;
  MQA_ASSIGN_OR_RETURN(Tensor cpu, t.To("cpu"));
  if (cpu.dtype() == dtype) return cpu;
  return cpu.ToDType(dtype);
}

}  // namespace

// One queued computation. Exactly one of run/fail is called.
struct WorkItem {
  Clock::time_point enqueued;
  Clock::time_point deadline;
  std::shared_ptr<const CancelFlag> cancel;
  std::function<void(Clock::time_point enqueued)> run;
  std::function<void(Status)> fail;
};

struct Model {
  ModelInfo info;
  std::unique_ptr<MqaStack> stack;
  std::string device;
};

struct Session {
  std::string id;
  const Model* model = nullptr;
  int64_t max_tokens = 0;
  std::chrono::milliseconds idle_ttl{0};
  bool causal = true;
  PositionBias position_bias = PositionBias::kNone;
  std::chrono::system_clock::time_point create_time;

  // Touched only by the worker of the model's device (and by the destructor of the last reference).
  std::vector<KvCache> caches;

  mutable std::mutex mu;  // guards the fields below
  std::vector<int64_t> positions;
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
    s.cache_bytes = cache_bytes;
    return s;
  }
};

// A worker: one thread that runs everything for one device, in queue order.
class Worker {
 public:
  Worker(std::string device, size_t max_queue) : device_(std::move(device)), max_queue_(max_queue) {}

  void Start(std::function<void(const WorkItem&, Status)> on_drop) {
    on_drop_ = std::move(on_drop);
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
  size_t running() const {
    std::lock_guard<std::mutex> lock(mu_);
    return running_;
  }

 private:
  void Loop() {
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
      WorkItem item;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        item = std::move(queue_.front());
        queue_.pop_front();
        ++running_;
      }
      // Dropped work is decided at dequeue time, the last moment before compute.
      if (item.cancel && item.cancel->cancelled()) {
        on_drop_(item, Status(StatusCode::kCancelled, "the request was cancelled before it ran; nothing was computed"));
      } else if (Clock::now() > item.deadline) {
        on_drop_(item, Status(StatusCode::kDeadlineExceeded,
                              "the deadline passed while the request waited in the queue (" +
                                  std::to_string(MicrosBetween(item.enqueued, Clock::now()) / 1000) +
                                  " ms); nothing was computed"));
      } else {
        item.run(item.enqueued);
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        --running_;
      }
    }
  }

  const std::string device_;
  const size_t max_queue_;
  std::function<void(const WorkItem&, Status)> on_drop_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WorkItem> queue_;
  size_t running_ = 0;
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
          if (idle) s.closed = true;
        }
        if (idle) {
          RememberEnded(s.id, "expired after " + FormatMillis(s.idle_ttl) + " idle (its idle TTL)");
          ++counters.sessions_expired;
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
               std::function<void(Clock::time_point)> run, std::function<void(Status)> fail) {
    WorkItem item;
    item.enqueued = Clock::now();
    item.deadline = deadline;
    item.cancel = std::move(cancel);
    item.run = std::move(run);
    item.fail = fail;
    Status queued = workers.at(device)->Enqueue(std::move(item));
    if (!queued.ok()) fail(queued);
  }

  void RunStep(const std::shared_ptr<Session>& session, const StepRequest& req, Clock::time_point enqueued,
               const StepCallback& done);
  void RunForward(const Model& model, const ForwardRequest& req, Clock::time_point enqueued,
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

StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options) {
  if (options.models.empty()) return InvalidArgumentError("the engine needs at least one model");
  if (options.max_sessions == 0) return InvalidArgumentError("max_sessions must be positive");
  if (options.max_queue == 0) return InvalidArgumentError("max_queue must be positive");
  if (options.default_idle_ttl.count() <= 0 || options.max_idle_ttl < options.default_idle_ttl) {
    return InvalidArgumentError("idle TTLs: expected 0 < default_idle_ttl <= max_idle_ttl, got " +
                                FormatMillis(options.default_idle_ttl) + " and " + FormatMillis(options.max_idle_ttl));
  }
  if (options.reap_interval.count() <= 0) return InvalidArgumentError("reap_interval must be positive");

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
    auto model = std::make_unique<Model>();
    MqaOptions o = mc.options;
    o.device = NormaliseDevice(o.device);
    StatusOr<std::unique_ptr<MqaStack>> stack = mc.weights_path.empty()
                                                    ? MqaStack::Create(o, mc.num_layers)
                                                    : MqaStack::Load(mc.weights_path, o, std::max(mc.num_layers, 0));
    if (!stack.ok()) return Status(stack.status().code(), where + stack.status().message());
    model->stack = std::move(stack).value();
    model->device = o.device;
    model->info.name = mc.name;
    model->info.num_layers = model->stack->num_layers();
    model->info.options = o;
    model->info.max_tokens_per_session = mc.max_tokens_per_session;
    model->info.description = mc.description;
    if (!impl->workers.count(o.device)) {
      impl->workers[o.device] = std::make_unique<Worker>(o.device, options.max_queue);
    }
    Log(LogLevel::kInfo, "loaded model " + mc.name + ": " + std::to_string(model->info.num_layers) + " layers, dim " +
                             std::to_string(o.dim) + ", heads " + std::to_string(o.heads) + ", " +
                             std::string(DTypeName(o.dtype)) + " on " + o.device + ", attn_impl " +
                             std::string(AttnImplName(o.attn_impl)));
    impl->models[mc.name] = std::move(model);
  }
  impl->options = std::move(options);
  Impl* raw = impl.get();
  for (auto& [device, worker] : impl->workers) {
    worker->Start([raw](const WorkItem& item, Status status) {
      raw->CountDrop(status);
      item.fail(std::move(status));
    });
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
  s->caches.resize(static_cast<size_t>(model.info.num_layers));
  s->positions.assign(static_cast<size_t>(model.info.num_layers), 0);
  s->last_active = Clock::now();
  s->last_active_wall = s->create_time;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->accepting) return UnavailableError("the server is draining and accepts no new sessions");
    if (impl_->sessions.size() >= eo.max_sessions) {
      return ResourceExhaustedError("the server holds its maximum of " + std::to_string(eo.max_sessions) +
                                    " sessions; close one or retry later");
    }
    impl_->sessions[id] = s;
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
    impl_->RememberEnded(id, "was closed");
    ++impl_->counters.sessions_closed;
  }
  {
    std::lock_guard<std::mutex> slock(s->mu);
    s->closed = true;
  }
  // The caches go with the last reference: here, or on the worker after a step it is running.
  return s->Info();
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
  if (!x.defined() || x.dim() != 3 || x.size(0) != 1 || x.size(1) < 1 || x.size(2) != o.dim ||
      !IsFloatingPoint(x.dtype())) {
    return fail_now(InvalidArgumentError(
        "x: expected a floating tensor [1, s, " + std::to_string(o.dim) + "] with s >= 1 (one session, dim " +
        std::to_string(o.dim) + "), got " +
        (x.defined() ? std::string(DTypeName(x.dtype())) + " " + ShapeToString(x.shape()) : "nothing")));
  }
  {
    std::lock_guard<std::mutex> slock(session->mu);
    ++session->pending;
    session->last_active = Clock::now();
    session->last_active_wall = std::chrono::system_clock::now();
  }
  auto shared_done = std::make_shared<StepCallback>(std::move(done));
  auto finish = [this, session, shared_done](StatusOr<StepResult> result) {
    {
      std::lock_guard<std::mutex> slock(session->mu);
      --session->pending;
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
  auto req = std::make_shared<StepRequest>(std::move(request));
  impl_->Enqueue(model.device, deadline, std::move(cancel),
                 [this, session, req, finish](Clock::time_point enqueued) {
                   impl_->RunStep(session, *req, enqueued, finish);
                 },
                 finish);
}

void Engine::Impl::RunStep(const std::shared_ptr<Session>& session, const StepRequest& req,
                           Clock::time_point enqueued, const StepCallback& done) {
  auto start = Clock::now();
  const MqaOptions& o = session->model->info.options;
  const size_t layer = static_cast<size_t>(req.layer);
  const int64_t s_new = req.x.size(1);
  int64_t pos;
  {
    std::lock_guard<std::mutex> slock(session->mu);
    if (session->closed) {
      return done(NotFoundError("session " + session->id + " was closed before this step ran; nothing was computed"));
    }
    pos = session->positions[layer];
  }
  if (req.position && *req.position != pos) {
    return done(FailedPreconditionError("layer " + std::to_string(req.layer) + " of session " + session->id +
                                        " holds " + std::to_string(pos) + " tokens, but the step says it starts at " +
                                        std::to_string(*req.position) + "; nothing was computed"));
  }
  if (pos + s_new > session->max_tokens) {
    return done(OutOfRangeError("layer " + std::to_string(req.layer) + " of session " + session->id + " holds " +
                                std::to_string(pos) + " tokens; " + std::to_string(s_new) +
                                " more would pass the session's max_tokens of " +
                                std::to_string(session->max_tokens)));
  }
  auto x = ToLayer(req.x, o, /*floating=*/true);
  if (!x.ok()) return done(x.status());
  ForwardArgs args;
  args.x = *x;
  args.past_key_value = session->caches[layer];
  args.causal = session->causal;
  if (session->position_bias == PositionBias::kAlibi) {
    // The causal form is relative to the last key; softmax is shift-invariant per row, so it is exact for
    // every row of a causally masked chunk. Non-causal sessions need the symmetric form.
    auto bias = AlibiBias(o.heads, pos + s_new, /*full=*/!session->causal, o.dtype, o.device);
    if (!bias.ok()) return done(bias.status());
    args.bias = *bias;
  }
  auto result = session->model->stack->layer(static_cast<int>(layer)).Forward(args);
  if (!result.ok()) return done(result.status());
  auto out = ToCaller(result->out, req.x.dtype());
  if (!out.ok()) return done(out.status());
  session->caches[layer] = std::move(*result->cache);
  {
    std::lock_guard<std::mutex> slock(session->mu);
    session->positions[layer] = pos + s_new;
    int64_t bytes = 0;
    for (const KvCache& c : session->caches) bytes += TensorBytes(c.k) + TensorBytes(c.v);
    session->cache_bytes = bytes;
  }
  StepResult r;
  r.out = std::move(out).value();
  r.position = pos;
  r.num_tokens = s_new;
  r.queue_us = MicrosBetween(enqueued, start);
  r.compute_us = MicrosBetween(start, Clock::now());
  done(std::move(r));
}

void Engine::SubmitForward(ForwardRequest request, ForwardCallback done) {
  auto mit = impl_->models.find(request.model);
  if (mit == impl_->models.end()) return done(GetModel(request.model).status());
  const Model& model = *mit->second;
  if (Status layer = CheckLayer(model.info, request.layer); !layer.ok()) return done(layer);
  if (!request.args.x.defined() || !IsFloatingPoint(request.args.x.dtype())) {
    return done(InvalidArgumentError("x: expected a floating tensor [b, s, " +
                                     std::to_string(model.info.options.dim) + "]"));
  }
  auto shared_done = std::make_shared<ForwardCallback>(std::move(done));
  auto finish = [this, shared_done](StatusOr<ForwardResult> result) {
    if (result.ok()) {
      std::lock_guard<std::mutex> lock(impl_->mu);
      ++impl_->counters.forwards_completed;
    }
    (*shared_done)(std::move(result));
  };
  const Clock::time_point deadline = request.deadline;
  auto cancel = request.cancel;
  auto req = std::make_shared<ForwardRequest>(std::move(request));
  const Model* m = &model;
  impl_->Enqueue(model.device, deadline, std::move(cancel),
                 [this, m, req, finish](Clock::time_point enqueued) { impl_->RunForward(*m, *req, enqueued, finish); },
                 finish);
}

void Engine::Impl::RunForward(const Model& model, const ForwardRequest& req, Clock::time_point /*enqueued*/,
                              const ForwardCallback& done) {
  const MqaOptions& o = model.info.options;
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
  auto result = model.stack->layer(req.layer).Forward(args);
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
    EngineStats s = stats();
    if (s.queue_depth == 0 && s.running == 0) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    s = impl_->counters;
    s.sessions_open = impl_->sessions.size();
  }
  s.queue_depth = 0;
  s.running = 0;
  for (const auto& [device, worker] : impl_->workers) {
    s.queue_depth += worker->queued();
    s.running += worker->running();
  }
  return s;
}

}  // namespace mqa::core
