// Engine's private state, shared by the facade (engine.cc), the batch pass (batch_pass.cc) and the stateless
// forward (forward.cc). Private to core.
#ifndef MQA_CORE_SRC_ENGINE_ENGINE_IMPL_H_
#define MQA_CORE_SRC_ENGINE_ENGINE_IMPL_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/batch_policy.h"
#include "engine/pass_buffers.h"
#include "engine/replica.h"
#include "engine/session_registry.h"
#include "engine/work_item.h"
#include "engine/worker.h"
#include "mqa/core/engine.h"

namespace mqa::core {

// INVALID_ARGUMENT naming the model's layers when layer is not one of them.
Status CheckLayer(const ModelInfo& model, int layer);

struct Engine::Impl {
  EngineOptions options;
  // Destroyed in reverse order: the sessions (returning their blocks) before the workers and the pools.
  std::map<std::string, std::unique_ptr<Model>> models;
  std::vector<Replica*> replicas;                                    // all models' replicas, by Replica::index
  std::map<std::string, std::unique_ptr<Worker>> workers;            // by device
  std::map<std::string, std::unique_ptr<PassBuffers>> pass_buffers;  // by CUDA device: its worker's alone
  std::unique_ptr<SessionRegistry> sessions;

  mutable std::mutex mu;  // guards counters and batch_histogram
  EngineStats counters;   // the event counters; the gauges are read when stats() is asked
  std::vector<uint64_t> batch_histogram = std::vector<uint64_t>(10, 0);
  std::atomic<int64_t> replay_bytes{0};  // answers kept for retries, all sessions (Session::KeepAnswerLocked)

  void CountDrop(const Status& status);
  template <typename F>
  void Count(F&& f) {
    std::lock_guard<std::mutex> lock(mu);
    f(counters);
  }

  // Queues run on the device's worker; fail gets the refusal when the queue will not take it.
  void Enqueue(const std::string& device, Clock::time_point deadline, std::shared_ptr<const CancelFlag> cancel,
               std::function<void(Clock::time_point)> run, std::function<void(Status)> fail,
               std::shared_ptr<InFlight> in_flight, std::shared_ptr<StepJob> job = nullptr);

  // SubmitStep's checks and the work item they make. A request refused there has had done called (inline) and
  // gives nullopt; otherwise the item's fail and its job's finish complete it exactly once.
  std::optional<WorkItem> PrepareStep(StepRequest request, StepCallback done);

  // The worker's hooks (Worker::Hooks): answers a step the policy settled without running it, and runs one
  // pass in two halves: LaunchPass admits the next chunk of every step in pass (all of one replica and layer),
  // gathers their rows and launches the layer and the copy back; FinishPass waits for that copy if it is still on
  // its way, completes the finished steps and hands those with prefill left to *unfinished.
  void Settle(WorkItem& item, const Decision& decision);
  std::unique_ptr<LaunchedPass> LaunchPass(std::vector<WorkItem> pass, const std::vector<Decision>& plan);
  void FinishPass(LaunchedPass& pass, std::vector<WorkItem>* unfinished);
  std::vector<PoolView> Pools() const;

  void RunForward(const Replica& replica, const ForwardRequest& req, const ForwardCallback& done);
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_ENGINE_IMPL_H_
