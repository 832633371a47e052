#include "engine/batch_policy.h"

#include <algorithm>
#include <optional>
#include <set>
#include <string>
#include <utility>

#include "mqa/core/block_pool.h"

namespace mqa::core {
namespace {

int64_t WaitedMillis(const QueuedWork& w, QueuedWork::TimePoint now) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(now - w.enqueued).count();
}

// Why an item leaves the queue unstarted, if it does. The deadline first: a gRPC deadline reaches the server
// both as the call's deadline and as a cancellation.
Status DropReason(const QueuedWork& w, QueuedWork::TimePoint now) {
  if (w.is_step && w.done > 0) return Status();  // a started step continues
  if (now > w.deadline || w.expired) {
    return Status(StatusCode::kDeadlineExceeded, "the deadline passed while the request waited in the queue (" +
                                                     std::to_string(WaitedMillis(w, now)) +
                                                     " ms); nothing was computed");
  }
  if (w.cancelled)
    return Status(StatusCode::kCancelled, "the request was cancelled before it ran; nothing was computed");
  return Status();
}

// The decision to drop queue item `index`, if it leaves the queue unstarted.
std::optional<Decision> Dropped(size_t index, const QueuedWork& w, QueuedWork::TimePoint now) {
  Status why = DropReason(w, now);
  if (why.ok()) return std::nullopt;
  Decision d;
  d.index = index;
  d.verdict = Verdict::kDrop;
  d.status = std::move(why);
  return d;
}

int64_t NextChunk(const QueuedWork& w, const SchedulerLimits& limits) {
  const int64_t remaining = w.tokens - w.done;
  return w.causal ? std::min(remaining, std::max<int64_t>(1, limits.max_prefill_chunk)) : remaining;
}

// Admission of a step's first chunk against its session's state and the blocks still free in its pool (which
// the caller lowers as members are admitted). A step that continues (done > 0) was admitted before.
Decision Admit(size_t index, const QueuedWork& w, int64_t chunk, const PoolView& pool, int64_t free_blocks) {
  Decision d;
  d.index = index;
  d.chunk = chunk;
  if (w.done > 0) return d;
  const std::string layer = "layer " + std::to_string(w.layer) + " of session " + std::string(w.session_id);
  const int64_t pos = w.layer_position;
  d.start = pos;
  auto refuse = [&d](Status status) {
    d.verdict = Verdict::kRefuse;
    d.status = std::move(status);
    return d;
  };
  if (w.closed) {
    return refuse(NotFoundError("session " + std::string(w.session_id) +
                                " was closed before this step ran; nothing was computed"));
  }
  // A retry of the layer's last applied step: it names that step's position, which the layer has moved past by
  // exactly that step's tokens, and carries the same input.
  const bool repeat = w.position && *w.position != pos && w.last_position == *w.position &&
                      w.last_position + w.last_tokens == pos && w.last_tokens == w.tokens && w.same_input_as_last;
  if (repeat && w.last_answer_kept) {
    d.verdict = Verdict::kReplay;
    d.start = *w.position;
    return d;
  }
  if (repeat) {
    return refuse(
        FailedPreconditionError(layer + " already applied this step at " + std::to_string(*w.position) +
                                " (it now holds " + std::to_string(pos) +
                                " tokens), but its answer was not kept (the server's replay budget was full); nothing "
                                "was computed"));
  }
  if (w.position && *w.position != pos) {
    return refuse(FailedPreconditionError(layer + " holds " + std::to_string(pos) +
                                          " tokens, but the step says it starts at " + std::to_string(*w.position) +
                                          "; nothing was computed"));
  }
  if (pos + w.tokens > w.max_tokens) {
    return refuse(OutOfRangeError(layer + " holds " + std::to_string(pos) + " tokens; " + std::to_string(w.tokens) +
                                  " more would pass the session's max_tokens of " + std::to_string(w.max_tokens)));
  }
  const int64_t need = std::max<int64_t>(0, BlockPool::BlocksFor(pos + w.tokens, pool.block_size) - w.blocks_held);
  if (need > free_blocks) {
    d.kv_exhausted = true;
    return refuse(ResourceExhaustedError(
        "KV cache full: " + std::to_string(need) + " blocks of " + std::to_string(pool.block_size) +
        " tokens needed, " + std::to_string(free_blocks) + " of " + std::to_string(pool.capacity) + " free; session " +
        std::string(w.session_id) + " is unchanged: retry the step when blocks are free"));
  }
  d.new_blocks = need;
  if (w.tokens == 0) d.verdict = Verdict::kEmpty;  // the spec's empty input: an empty output, nothing appended
  return d;
}

}  // namespace

PassPlan SchedulePass(const SchedulerInput& in) {
  PassPlan plan;
  const SchedulerLimits& limits = in.limits;
  std::vector<int64_t> free_blocks;
  for (const PoolView& p : in.pools) free_blocks.push_back(p.free_blocks);
  // (session, layer) pairs that may not run in this pass any more: one is in it, or one stays queued ahead.
  std::set<std::pair<uintptr_t, int>> blocked;

  // The front: the first item that is not dropped, refused or answered without running.
  size_t i = 0;
  for (; i < in.queue.size() && plan.pass.empty() && !plan.alone; ++i) {
    const QueuedWork& w = in.queue[i];
    if (std::optional<Decision> drop = Dropped(i, w, in.now)) {
      plan.settled.push_back(std::move(*drop));
      continue;
    }
    if (!w.is_step) {
      plan.alone = i;
      break;
    }
    Decision d = Admit(i, w, NextChunk(w, limits), in.pools[static_cast<size_t>(w.replica)],
                       free_blocks[static_cast<size_t>(w.replica)]);
    if (d.verdict == Verdict::kRun) {
      free_blocks[static_cast<size_t>(w.replica)] -= d.new_blocks;
      blocked.insert({w.session, w.layer});
      plan.pass.push_back(std::move(d));
    } else {
      plan.settled.push_back(std::move(d));
    }
  }
  if (plan.pass.empty()) return plan;

  // The rest of the pass: steps of the front's (replica, layer), in queue order.
  const QueuedWork& front = in.queue[plan.pass[0].index];
  const int64_t max_sessions = std::max<int64_t>(1, limits.max_batch_sessions);
  const int64_t max_tokens = std::max<int64_t>(1, limits.max_batch_tokens);
  int64_t tokens = plan.pass[0].chunk;
  for (; i < in.queue.size() && static_cast<int64_t>(plan.pass.size()) < max_sessions; ++i) {
    const QueuedWork& w = in.queue[i];
    if (!w.is_step || w.replica != front.replica || w.layer != front.layer) continue;
    const std::pair<uintptr_t, int> key = {w.session, w.layer};
    if (blocked.count(key)) continue;
    if (std::optional<Decision> drop = Dropped(i, w, in.now)) {
      plan.settled.push_back(std::move(*drop));
      continue;
    }
    const int64_t chunk = NextChunk(w, limits);
    if (tokens + chunk > max_tokens) {  // waits for a later pass, and so does everything behind it in its layer
      blocked.insert(key);
      continue;
    }
    Decision d =
        Admit(i, w, chunk, in.pools[static_cast<size_t>(w.replica)], free_blocks[static_cast<size_t>(w.replica)]);
    if (d.verdict != Verdict::kRun) {
      plan.settled.push_back(std::move(d));
      continue;
    }
    free_blocks[static_cast<size_t>(w.replica)] -= d.new_blocks;
    tokens += chunk;
    blocked.insert(key);
    plan.pass.push_back(std::move(d));
  }
  std::sort(plan.settled.begin(), plan.settled.end(),
            [](const Decision& a, const Decision& b) { return a.index < b.index; });
  return plan;
}

}  // namespace mqa::core
