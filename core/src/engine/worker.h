// A worker: the one thread that runs everything for one device. It keeps that device's queue; each round it
// snapshots the queue, asks the scheduler policy (SchedulePass) for the next pass, and executes the answer:
// drops, settled steps, then the pass itself (or one non-step item alone). Steps of one (replica, layer)
// waiting together run as one pass (continuous batching). Passes overlap: a round launches its pass, then
// completes the one the round before launched (whose device work ran meanwhile), so the host forms and completes
// passes while the device computes; only a pass whose device work is done in the launch (on the CPU)
// completes in its own round. Private to core.
//
// Thread-safety: Enqueue, queued, running and idle may be called from any thread; Start and Stop from the
// owner. The hooks run on the worker thread, never under the queue lock.
#ifndef MQA_CORE_SRC_ENGINE_WORKER_H_
#define MQA_CORE_SRC_ENGINE_WORKER_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/batch_policy.h"
#include "engine/completer.h"
#include "engine/work_item.h"
#include "mqa/core/engine.h"

namespace mqa::core {

class Worker {
 public:
  struct Hooks {
    // A queued item dropped unstarted (cancelled, past its deadline): counted, then failed with status.
    std::function<void(WorkItem& item, Status status)> drop;
    // A step the policy answered without running it (refused, replayed, empty).
    std::function<void(WorkItem& item, const Decision& decision)> settle;
    // Launches one pass (plan[i] is pass[i]'s decision): steps refused at launch are failed, the rest computed or
    // on their way (LaunchedPass::on_device). behind: another pass is still on the device. Never null.
    std::function<std::unique_ptr<LaunchedPass>(std::vector<WorkItem> pass, const std::vector<Decision>& plan,
                                                bool behind)>
        launch_pass;
    // Completes a launched pass, waiting for its device work if needed. Steps with tokens left go to *unfinished
    // (queued again, at the front, in order).
    std::function<void(LaunchedPass& pass, std::vector<WorkItem>* unfinished)> finish_pass;
    // Every replica's KV pool, by Replica::index, read once per round under the queue lock.
    std::function<std::vector<PoolView>()> pools;
  };

  Worker(std::string device, size_t max_queue, BatchingOptions batching);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void Start(Hooks hooks);
  // Joins the thread; what is still queued fails with UNAVAILABLE. Idempotent.
  void Stop();

  // RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when stopping; the item is not queued then.
  Status Enqueue(WorkItem item);
  // Queues items in order, next to each other, under one lock: as many as the queue takes. Those it does not take
  // are failed (item.fail, after the lock) with Enqueue's refusal.
  void EnqueueAll(std::vector<WorkItem>& items);

  size_t queued() const;
  size_t running() const { return running_.load(); }
  // Nothing queued and nothing taken whose completion callbacks have not all returned (on the worker thread or
  // its completer's).
  bool idle() const;

 private:
  // The policy's view of the queue; under mu_, on the worker thread (the only one that changes positions and
  // block tables, so what it reads stays true until the pass runs).
  SchedulerInput SnapshotLocked(const LaunchedPass* running) const;
  // Why the queue takes no more items now (stopping, full), if so; under mu_.
  Status RefusalLocked() const;
  void Loop();

  const std::string device_;
  const size_t max_queue_;
  const BatchingOptions batching_;
  Hooks hooks_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<WorkItem> queue_;
  std::atomic<size_t> running_{0};  // taken items whose reply has not gone out
  bool busy_ = false;               // work taken from the queue and not yet completed (callbacks included)
  bool stopping_ = false;
  Completer completer_;  // the rounds' completions, off this thread
  std::thread thread_;
};

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_WORKER_H_
