#include "engine/worker.h"

#include <c10/core/InferenceMode.h>

#include <pthread.h>

#include <optional>
#include <utility>

#include "engine/replica.h"
#include "mqa/core/device.h"
#include "tensor_impl.h"

#ifdef MQA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mqa::core {

Worker::Worker(std::string device, size_t max_queue, BatchingOptions batching)
    : device_(std::move(device)), max_queue_(max_queue), batching_(batching) {}

Worker::~Worker() { Stop(); }

void Worker::Start(Hooks hooks) {
  hooks_ = std::move(hooks);
  thread_ = std::thread([this] { Loop(); });
}

void Worker::Stop() {
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
  completer_.Stop();
}

Status Worker::RefusalLocked() const {
  if (stopping_) return UnavailableError("the server is shutting down");
  if (queue_.size() >= max_queue_) {
    return ResourceExhaustedError("the queue of " + device_ + " is full (" + std::to_string(max_queue_) +
                                  " requests waiting); retry later");
  }
  return Status();
}

Status Worker::Enqueue(WorkItem item) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    MQA_RETURN_IF_ERROR(RefusalLocked());
    queue_.push_back(std::move(item));
  }
  cv_.notify_one();
  return Status();
}

void Worker::EnqueueAll(std::vector<WorkItem>& items) {
  size_t taken = 0;
  Status refused;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (; taken < items.size() && (refused = RefusalLocked()).ok(); ++taken) queue_.push_back(std::move(items[taken]));
  }
  if (taken > 0) cv_.notify_one();
  for (size_t i = taken; i < items.size(); ++i) items[i].fail(refused);
}

size_t Worker::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

bool Worker::idle() const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!queue_.empty() || busy_) return false;
  }
  return completer_.idle();  // a round posts its completions before it stops being busy
}

SchedulerInput Worker::SnapshotLocked(const LaunchedPass* running) const {
  SchedulerInput in;
  if (running != nullptr) {
    for (const WorkItem& item : running->items) {
      if (item.job)
        in.running.emplace_back(reinterpret_cast<uintptr_t>(item.job->session.get()), item.job->request.layer);
    }
  }
  in.pools = hooks_.pools();
  in.limits.max_batch_sessions = batching_.max_batch_sessions;
  in.limits.max_batch_tokens = batching_.max_batch_tokens;
  in.limits.max_prefill_chunk = batching_.max_prefill_chunk;
  in.queue.reserve(queue_.size());
  for (const WorkItem& item : queue_) {
    QueuedWork w;
    w.enqueued = item.enqueued;
    w.deadline = item.deadline;
    w.cancelled = item.cancel && item.cancel->cancelled();
    w.expired = item.cancel && item.cancel->expired();
    w.is_step = item.job != nullptr;
    if (w.is_step) {
      const StepJob& job = *item.job;
      const Session& s = *job.session;
      const auto layer = static_cast<size_t>(job.request.layer);
      w.replica = job.replica->index;
      w.layer = job.request.layer;
      w.session = reinterpret_cast<uintptr_t>(&s);
      w.session_id = s.id;
      w.causal = s.causal;
      w.tokens = job.tokens();
      w.done = job.done;
      w.position = job.request.position;
      w.max_tokens = s.max_tokens;
      if (job.done == 0) {
        std::lock_guard<std::mutex> slock(s.mu);
        w.blocks_held = static_cast<int64_t>(s.table->blocks().size());
        w.closed = s.closed;
        w.layer_position = s.positions[layer];
        const LastStep& last = s.last[layer];
        w.last_position = last.position;
        w.last_tokens = last.tokens;
        w.same_input_as_last = last.dtype == job.request.x.dtype() && last.x_hash == job.x_hash;
        w.last_answer_kept = last.out.has_value();
      }
    }
    in.queue.push_back(w);
  }
  return in;
}

void Worker::Loop() {
  pthread_setname_np(pthread_self(), "mqa-worker");  // top -H, perf, gdb: which thread is the device's
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
    if (device.ok()) stream_guard.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device->index()));
  }
#endif
  // The pass launched last round whose device work may still run; completed after this round's launch.
  std::unique_ptr<LaunchedPass> running;
  auto leave = [](std::vector<WorkItem>& items) {
    for (WorkItem& item : items) {
      if (item.in_flight) item.in_flight->Leave();
    }
  };
  for (;;) {
    PassPlan plan;
    std::vector<WorkItem> pass;
    std::vector<WorkItem> settled;
    std::optional<WorkItem> alone;
    // While the device is still busy with the running pass, waiting costs nothing: let the completions of the
    // pass before reach their callbacks (a caller's next steps, submitted from them, then join the next pass rather
    // than trickle into small ones), until they have or the device is done. Bounded, so a callback that blocks
    // only costs overlap.
    const auto wait_until = Clock::now() + std::chrono::milliseconds(2);
    while (running && !running->device_done() && Clock::now() < wait_until &&
           !completer_.WaitIdleFor(std::chrono::microseconds(20))) {
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!running) {
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_) return;
        if (batching_.max_queue_delay.count() > 0 && batching_.max_batch_sessions > 1) {
          // Let a pass fill up to its session limit for at most max_queue_delay.
          cv_.wait_for(lock, batching_.max_queue_delay, [this] {
            return stopping_ || static_cast<int64_t>(queue_.size()) >= batching_.max_batch_sessions;
          });
          if (stopping_) return;
        }
      }
      if (!stopping_) {
        SchedulerInput in = SnapshotLocked(running.get());
        in.now = Clock::now();
        plan = SchedulePass(in);
        std::vector<bool> taken(queue_.size(), false);
        for (const Decision& d : plan.pass) {
          taken[d.index] = true;
          pass.push_back(std::move(queue_[d.index]));
        }
        for (const Decision& d : plan.settled) {
          taken[d.index] = true;
          settled.push_back(std::move(queue_[d.index]));
        }
        if (plan.alone) {
          taken[*plan.alone] = true;
          alone = std::move(queue_[*plan.alone]);
        }
        std::deque<WorkItem> rest;
        for (size_t i = 0; i < queue_.size(); ++i) {
          if (!taken[i]) rest.push_back(std::move(queue_[i]));
        }
        queue_.swap(rest);
      }
      busy_ = running || !pass.empty() || !settled.empty() || alone.has_value();
      for (WorkItem& item : pass) {
        if (item.in_flight) item.in_flight->counter.store(&running_);
      }
      if (alone && alone->in_flight) alone->in_flight->counter.store(&running_);
      running_.fetch_add(pass.size() + (alone ? 1 : 0));
    }
    std::vector<WorkItem> unfinished;
    {
      // The round's step completions go to the completer in one hand-over when this block ends, before the
      // round stops being busy (so idle() never misses them).
      Completer::Batch completions(&completer_);
      for (size_t i = 0; i < settled.size(); ++i) {
        const Decision& d = plan.settled[i];
        if (d.verdict == Verdict::kDrop) {
          hooks_.drop(settled[i], d.status);
        } else {
          hooks_.settle(settled[i], d);
        }
      }
      auto complete = [&](std::unique_ptr<LaunchedPass> done) {
        hooks_.finish_pass(*done, &unfinished);
        // Replies are on their way; unfinished prefills are queued again, not running.
        leave(done->items);
      };
      if (alone) {
        if (running) complete(std::move(running));  // a request run alone runs after the pass ahead of it
        alone->run(alone->enqueued);
        if (alone->in_flight) alone->in_flight->Leave();
      }
      std::unique_ptr<LaunchedPass> launched;
      if (!pass.empty()) launched = hooks_.launch_pass(std::move(pass), plan.pass, running != nullptr);
      if (running) complete(std::move(running));
      if (launched && launched->on_device) {
        running = std::move(launched);
      } else if (launched) {
        complete(std::move(launched));
      }
      leave(unfinished);
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Unfinished prefills go back to the front, in order, ahead of later steps of their sessions.
    for (auto it = unfinished.rbegin(); it != unfinished.rend(); ++it) queue_.push_front(std::move(*it));
    busy_ = running != nullptr;
    if (stopping_ && !running) return;
  }
}

}  // namespace mqa::core
