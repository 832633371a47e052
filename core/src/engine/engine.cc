// The engine's facade: building the models and their replicas, the session calls, queuing steps, and the
// statistics. The parts it wires together live beside it: worker.cc (the device threads), batch_policy.cc (what
// runs next), batch_pass.cc (running a pass), session_registry.cc, kv_pools.cc, placement.cc, forward.cc.
#include "mqa/core/engine.h"

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/completer.h"
#include "engine/engine_impl.h"
#include "engine/kv_pools.h"
#include "engine/placement.h"
#include "mqa/core/block_pool.h"
#include "mqa/core/logging.h"

namespace mqa::core {

Status CheckLayer(const ModelInfo& model, int layer) {
  if (layer >= 0 && layer < model.num_layers) return Status();
  return InvalidArgumentError("layer " + std::to_string(layer) + " is out of range: model " + model.name +
                              " has layers 0.." + std::to_string(model.num_layers - 1));
}

void Engine::Impl::CountDrop(const Status& status) {
  Count([&status](EngineStats& c) {
    if (status.code() == StatusCode::kCancelled) ++c.dropped_cancelled;
    if (status.code() == StatusCode::kDeadlineExceeded) ++c.dropped_deadline;
  });
}

void Engine::Impl::Enqueue(const std::string& device, Clock::time_point deadline,
                           std::shared_ptr<const CancelFlag> cancel, std::function<void(Clock::time_point)> run,
                           std::function<void(Status)> fail, std::shared_ptr<InFlight> in_flight,
                           std::shared_ptr<StepJob> job) {
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

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Engine::~Engine() {
  // The reaper first (it touches sessions the workers may be stepping), then the workers: what is still queued
  // fails with UNAVAILABLE. The sessions, and with them their blocks, go when impl_ does.
  impl_->sessions->StopReaper();
  for (auto& [device, worker] : impl_->workers) worker->Stop();
}

namespace {

Status CheckEngineOptions(const EngineOptions& options) {
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
  return Status();
}

// One model: its layers on every device it names (identical weights: the same seed or the same file; seeded
// initialisation draws on the CPU whatever the device).
StatusOr<std::unique_ptr<Model>> BuildModel(const ModelConfig& mc) {
  const std::string where = "model \"" + mc.name + "\": ";
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
  for (const std::string& device : devices) {
    MqaOptions od = o;
    od.device = device;
    StatusOr<std::unique_ptr<MqaStack>> stack = mc.weights_path.empty()
                                                    ? MqaStack::Create(od, mc.num_layers)
                                                    : MqaStack::Load(mc.weights_path, od, std::max(mc.num_layers, 0));
    if (!stack.ok()) {
      return Status(
          stack.status().code(),
          where + (devices.size() > 1 ? "replica on " + device + ": " : std::string()) + stack.status().message());
    }
    auto replica = std::make_unique<Replica>();
    replica->model = model.get();
    replica->device = device;
    replica->stack = std::move(stack).value();
    model->replicas.push_back(std::move(replica));
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
    Log(LogLevel::kWarning, "model " + mc.name +
                                " has replicas on the CPU and on GPUs: sessions placed on the "
                                "CPU replica run much slower than the others");
  }
  return model;
}

}  // namespace

StatusOr<std::unique_ptr<Engine>> Engine::Create(EngineOptions options) {
  MQA_RETURN_IF_ERROR(CheckEngineOptions(options));
  auto impl = std::make_unique<Impl>();
  for (const ModelConfig& mc : options.models) {
    if (mc.name.empty()) return InvalidArgumentError("every model needs a non-empty name");
    if (impl->models.count(mc.name)) return InvalidArgumentError("duplicate model name \"" + mc.name + "\"");
    MQA_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, BuildModel(mc));
    for (auto& r : model->replicas) {
      r->index = static_cast<int>(impl->replicas.size());
      impl->replicas.push_back(r.get());
      if (!impl->workers.count(r->device)) {
        impl->workers[r->device] = std::make_unique<Worker>(r->device, options.max_queue, options.batching);
        if (r->device.rfind("cuda", 0) == 0) impl->pass_buffers[r->device] = std::make_unique<PassBuffers>();
      }
    }
    impl->models[mc.name] = std::move(model);
  }
  MQA_RETURN_IF_ERROR(SizeKvPools(options, impl->models));
  impl->sessions = std::make_unique<SessionRegistry>(options.max_sessions, options.reap_interval);
  impl->options = std::move(options);
  Impl* raw = impl.get();
  Worker::Hooks hooks;
  hooks.drop = [raw](WorkItem& item, Status status) {
    raw->CountDrop(status);
    item.fail(std::move(status));
  };
  hooks.settle = [raw](WorkItem& item, const Decision& d) { raw->Settle(item, d); };
  hooks.launch_pass = [raw](std::vector<WorkItem> pass, const std::vector<Decision>& plan, bool behind) {
    if (behind) raw->Count([](EngineStats& c) { ++c.passes_overlapped; });
    return raw->LaunchPass(std::move(pass), plan);
  };
  hooks.finish_pass = [raw](LaunchedPass& pass, std::vector<WorkItem>* unfinished) {
    raw->FinishPass(pass, unfinished);
  };
  hooks.pools = [raw] { return raw->Pools(); };
  for (auto& [device, worker] : impl->workers) worker->Start(hooks);
  impl->sessions->StartReaper();
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
  MQA_ASSIGN_OR_RETURN(std::string id, SessionRegistry::NewId());
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
      impl_->Count([](EngineStats& c) { ++c.kv_exhausted; });
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
  // A refusal drops s, whose table's destructor returns any reserved blocks.
  MQA_RETURN_IF_ERROR(impl_->sessions->Add(s));
  return s->Info();
}

StatusOr<SessionInfo> Engine::GetSession(const std::string& id) const {
  MQA_ASSIGN_OR_RETURN(auto s, impl_->sessions->Find(id));
  return s->Info();
}

StatusOr<SessionInfo> Engine::CloseSession(const std::string& id) {
  MQA_ASSIGN_OR_RETURN(std::shared_ptr<Session> s, impl_->sessions->Remove(id));
  SessionInfo info = s->Info();
  {
    std::lock_guard<std::mutex> slock(s->mu);
    s->closed = true;
    s->ReleaseBlocksIfIdleLocked();
  }
  return info;
}

std::optional<WorkItem> Engine::Impl::PrepareStep(StepRequest request, StepCallback done) {
  auto fail_now = [this, &done](Status status) -> std::optional<WorkItem> {
    Count([](EngineStats& c) { ++c.steps_failed; });
    done(std::move(status));
    return std::nullopt;
  };
  auto found = sessions->Find(request.session_id);
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
    const bool ok = result.ok();
    Count([ok](EngineStats& c) { ++(ok ? c.steps_completed : c.steps_failed); });
    // The caller's callback off the worker thread when a worker completes it (Completer), else here.
    auto answer = std::make_shared<StatusOr<StepResult>>(std::move(result));
    Completer::Complete([shared_done, answer] { (*shared_done)(std::move(*answer)); });
  };
  WorkItem item;
  item.in_flight = std::move(in_flight);
  item.enqueued = Clock::now();
  item.deadline = request.deadline;
  item.cancel = request.cancel;
  item.fail = finish;
  auto job = std::make_shared<StepJob>();
  job->session = session;
  job->replica = session->replica;
  job->x_hash = request.position ? InputHash(request.x) : 0;  // only steps that name a position can be retried
  job->request = std::move(request);
  job->finish = std::move(finish);
  item.job = std::move(job);
  return item;
}

void Engine::SubmitStep(StepRequest request, StepCallback done) {
  std::optional<WorkItem> item = impl_->PrepareStep(std::move(request), std::move(done));
  if (!item) return;
  Worker& worker = *impl_->workers.at(item->job->replica->device);
  std::function<void(Status)> fail = item->fail;
  if (Status queued = worker.Enqueue(std::move(*item)); !queued.ok()) fail(queued);
}

void Engine::SubmitSteps(std::vector<StepRequest> requests, StepBatchCallback done) {
  // One answer slot per request; the last entry to complete delivers them all.
  struct Answers {
    std::mutex mu;
    std::vector<StatusOr<StepResult>> results;
    size_t left = 0;
    StepBatchCallback done;
  };
  auto answers = std::make_shared<Answers>();
  answers->results.assign(requests.size(), StatusOr<StepResult>(Status(StatusCode::kUnknown, "not answered")));
  answers->left = requests.size() + 1;  // + 1: held until every entry is queued or refused
  answers->done = std::move(done);
  // One arrival: entry i's answer, or (result null) the submitter's own hold released.
  auto arrive = [answers](size_t i, StatusOr<StepResult>* result) {
    bool last;
    {
      std::lock_guard<std::mutex> lock(answers->mu);
      if (result != nullptr) answers->results[i] = std::move(*result);
      last = --answers->left == 0;
    }
    if (last) answers->done(std::move(answers->results));
  };
  // Entries are queued per device in one hand-over each, next to each other in request order, so the policy finds
  // those of one replica and layer together and runs them in one pass (within the batching limits).
  std::map<std::string, std::vector<WorkItem>> by_device;
  for (size_t i = 0; i < requests.size(); ++i) {
    std::optional<WorkItem> item =
        impl_->PrepareStep(std::move(requests[i]), [arrive, i](StatusOr<StepResult> result) { arrive(i, &result); });
    if (item) by_device[item->job->replica->device].push_back(std::move(*item));
  }
  for (auto& [device, items] : by_device) impl_->workers.at(device)->EnqueueAll(items);
  arrive(requests.size(), nullptr);
}

void Engine::StopAcceptingSessions() { impl_->sessions->StopAccepting(); }

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
    s.batch_size_histogram = impl_->batch_histogram;
  }
  s.replay_bytes = impl_->replay_bytes.load();
  const SessionRegistry::Counts sessions = impl_->sessions->counts();
  s.sessions_open = sessions.open;
  s.sessions_active = sessions.active;
  s.sessions_idle = sessions.idle;
  s.sessions_created = sessions.created;
  s.sessions_closed = sessions.closed;
  s.sessions_expired = sessions.expired;
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
  for (const Replica* r : impl_->replicas) {
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
  for (auto& [device, d] : per_device) s.devices.push_back(std::move(d));
  for (const auto& [name, model] : impl_->models) {
    for (const auto& r : model->replicas) {
      ExecutionStats e;
      e.model = name;
      e.device = r->device;
      e.attn_impl = std::string(AttnImplName(model->info.options.attn_impl));
      for (int i = 0; i < r->stack->num_layers(); ++i) {
        for (const auto& [why, n] : r->stack->layer(i).counters().fallbacks) e.forward_fallbacks[why] += n;
      }
      for (const auto& paged : r->paged) {
        const PagedCounters c = paged->counters();
        for (const auto& [why, n] : c.fallbacks) e.paged_fallbacks[why] += n;
        e.paged_passes += c.passes;
        e.graph_captures += c.graph_captures;
        e.graph_replays += c.graph_replays;
        e.graph_failures += c.graph_failures;
      }
      s.execution.push_back(std::move(e));
    }
  }
  std::stable_sort(s.devices.begin(), s.devices.end(), [](const DeviceStats& a, const DeviceStats& b) {
    return DeviceOrdinal(a.device) < DeviceOrdinal(b.device);
  });
  return s;
}

}  // namespace mqa::core
