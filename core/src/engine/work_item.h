// What waits in a worker's queue: a step on its way through the passes, or any other request (run alone).
// Private to core.
#ifndef MQA_CORE_SRC_ENGINE_WORK_ITEM_H_
#define MQA_CORE_SRC_ENGINE_WORK_ITEM_H_

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "engine/session.h"
#include "mqa/core/engine.h"

namespace mqa::core {

struct Replica;

// A step on its way through the worker: a long causal prefill runs as several chunks, each in some pass.
struct StepJob {
  std::shared_ptr<Session> session;
  const Replica* replica = nullptr;  // the session's; batching groups steps by (replica, layer)
  StepRequest request;
  at::Tensor x;                  // request.x on the CPU, contiguous, caller's dtype [1, s, dim]; set at admission
  int64_t start = -1;            // the layer's position before the step; -1 until admitted
  int64_t done = 0;              // tokens already computed
  std::vector<at::Tensor> outs;  // their outputs
  Clock::time_point started;
  StepCallback finish;  // the step's one completion (the item's fail routes failures here too)
  uint64_t x_hash = 0;  // InputHash(request.x): recognises a retry of this step (StepRequest)
  int64_t tokens() const { return request.x.size(1); }
  int64_t remaining() const { return tokens() - done; }
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

// A pass launched on its device and not yet completed: the worker launches pass k + 1 before it completes pass k,
// so the host's work for one (forming it, completing the other) runs while the device computes. The pass's steps
// are owned here until it completes. What the device still holds (the copy of the outputs on its way back, the
// event that says it arrived) belongs to the subclass that launched it (batch_pass.cc).
class LaunchedPass {
 public:
  virtual ~LaunchedPass() = default;
  // Whether its device work is done (its outputs have arrived); never blocks.
  virtual bool device_done() const { return true; }
  std::vector<WorkItem> items;  // the pass's steps, in the policy's order; those refused at launch already failed
  bool on_device = false;       // device work may still be running: the worker may launch another pass first
};

// A 64-bit digest of a step's input (dtype, shape and bytes), to recognise a retry of an applied step without
// keeping its input. Not cryptographic: a caller can only collide with its own steps, in its own session.
uint64_t InputHash(const Tensor& x);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_WORK_ITEM_H_
