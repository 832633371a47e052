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

bool IsDecode(const QueuedWork& w, const SchedulerLimits& limits) {
  return w.is_step && w.done == 0 && w.tokens <= limits.decode_max_tokens;
}

using Key = std::pair<uintptr_t, int>;  // (session, layer)

}  // namespace

PassPlan SchedulePass(const SchedulerInput& in) {
  PassPlan plan;
  const SchedulerLimits& limits = in.limits;
  const size_t n = in.queue.size();
  std::vector<int64_t> free_blocks;
  for (const PoolView& p : in.pools) free_blocks.push_back(p.free_blocks);
  std::vector<bool> gone(n, false);  // settled: leaves the queue without running
  auto settle = [&](Decision d) {
    gone[d.index] = true;
    plan.settled.push_back(std::move(d));
  };
  auto admit = [&](size_t i, int64_t chunk) {
    const QueuedWork& w = in.queue[i];
    const auto r = static_cast<size_t>(w.replica);
    return Admit(i, w, chunk, in.pools[r], free_blocks[r]);
  };
  auto take = [&](Decision d) {
    free_blocks[static_cast<size_t>(in.queue[d.index].replica)] -= d.new_blocks;
    plan.pass.push_back(std::move(d));
  };

  const std::set<Key> running(in.running.begin(), in.running.end());
  auto waits = [&](const QueuedWork& w) { return w.is_step && running.count({w.session, w.layer}) > 0; };

  // Drops first, anywhere in the queue: nothing waits behind them and nothing is computed for them.
  for (size_t i = 0; i < n; ++i) {
    if (std::optional<Decision> drop = Dropped(i, in.queue[i], in.now)) settle(std::move(*drop));
  }

  // The front. Decode first: the oldest decode step that is the first of its (session, layer), unless the oldest
  // item has waited too long behind decode steps; refused candidates are settled and the next one is tried.
  std::optional<size_t> front;
  size_t oldest = 0;
  while (oldest < n && gone[oldest]) ++oldest;
  const bool starved = oldest < n && in.now - in.queue[oldest].enqueued >= limits.max_wait_behind_decode;
  if (!starved) {
    std::set<Key> seen;  // keys with an item still queued ahead
    for (size_t i = 0; i < n && !front; ++i) {
      const QueuedWork& w = in.queue[i];
      if (gone[i]) continue;
      if (!w.is_step) break;  // decode steps overtake prefills, not a stateless request: it keeps its turn
      const Key key = {w.session, w.layer};
      if (!IsDecode(w, limits) || seen.count(key) || waits(w)) {
        seen.insert(key);
        continue;
      }
      Decision d = admit(i, NextChunk(w, limits));
      if (d.verdict != Verdict::kRun) {
        settle(std::move(d));
        continue;
      }
      front = i;
      take(std::move(d));
    }
  }
  for (size_t i = 0; i < n && !front && !plan.alone; ++i) {  // queue order
    if (gone[i]) continue;
    const QueuedWork& w = in.queue[i];
    if (waits(w)) continue;
    if (!w.is_step) {
      plan.alone = i;
      break;
    }
    Decision d = admit(i, NextChunk(w, limits));
    if (d.verdict != Verdict::kRun) {
      settle(std::move(d));
      continue;
    }
    front = i;
    take(std::move(d));
  }
  if (front) {
    // The rest of the pass: steps of the front's (replica, layer), decode steps first, then prefill chunks.
    const QueuedWork& lead = in.queue[*front];
    const int64_t max_sessions = std::max<int64_t>(1, limits.max_batch_sessions);
    const int64_t max_tokens = std::max<int64_t>(1, limits.max_batch_tokens);
    int64_t tokens = plan.pass[0].chunk;
    std::set<Key> blocked = running;  // in the pass, running, or one of them stays queued ahead
    blocked.insert({lead.session, lead.layer});
    std::vector<size_t> prefills;  // the first queued step of their key, in queue order
    auto full = [&] { return static_cast<int64_t>(plan.pass.size()) >= max_sessions; };
    for (size_t i = 0; i < n && !full(); ++i) {
      const QueuedWork& w = in.queue[i];
      if (gone[i] || i == *front || !w.is_step || w.replica != lead.replica || w.layer != lead.layer) continue;
      const Key key = {w.session, w.layer};
      if (!blocked.insert(key).second) continue;
      if (!IsDecode(w, limits)) {
        prefills.push_back(i);
        continue;
      }
      const int64_t chunk = NextChunk(w, limits);
      if (tokens + chunk > max_tokens) continue;  // waits for a later pass, and so does its key
      Decision d = admit(i, chunk);
      if (d.verdict != Verdict::kRun) {
        settle(std::move(d));
        blocked.erase(key);  // a later step of the session may still join
        continue;
      }
      tokens += chunk;
      take(std::move(d));
    }
    for (size_t i : prefills) {
      if (full() || tokens >= max_tokens) break;
      const QueuedWork& w = in.queue[i];
      int64_t chunk = NextChunk(w, limits);
      if (tokens + chunk > max_tokens) {
        if (!w.causal) continue;  // never split: waits for a pass with room for all of it
        chunk = max_tokens - tokens;
      }
      Decision d = admit(i, chunk);
      if (d.verdict != Verdict::kRun) {
        settle(std::move(d));
        continue;
      }
      tokens += chunk;
      take(std::move(d));
    }
    std::sort(plan.pass.begin(), plan.pass.end(),
              [](const Decision& a, const Decision& b) { return a.index < b.index; });
  }
  std::sort(plan.settled.begin(), plan.settled.end(),
            [](const Decision& a, const Decision& b) { return a.index < b.index; });
  return plan;
}

}  // namespace mqa::core
