// The batch scheduler's policy: which queued work runs in the next pass, and which leaves the queue without
// running (dropped, refused, answered from a kept answer). A pure function of a snapshot of the queue, the
// sessions' positions and the KV pools' free blocks: no locks, no tensors, no clock of its own, so it is tested
// with a table of queue states (tests/cpp/batch_policy_test.cc) and the worker that executes it stays a loop.
//
// Private to core (torch-free: the C++ standard library and core's Status only).
#ifndef MQA_CORE_SRC_ENGINE_BATCH_POLICY_H_
#define MQA_CORE_SRC_ENGINE_BATCH_POLICY_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "mqa/core/status.h"

namespace mqa::core {

// One queued item as the policy sees it. The worker fills it under its queue lock; views point into the item
// and its session, which outlive the call.
struct QueuedWork {
  using TimePoint = std::chrono::steady_clock::time_point;

  bool is_step = true;  // false: any other request (a stateless Forward): it runs alone, in queue order
  TimePoint enqueued{};
  TimePoint deadline = TimePoint::max();
  bool cancelled = false;  // its CancelFlag was set (for a deadline or otherwise)
  bool expired = false;    // ... because the caller's deadline passed (CancelFlag::Expire)

  // Steps only. Steps of one (replica, layer) share passes; `session` identifies the session (any unique key).
  int replica = 0;  // index into SchedulerInput::pools
  int layer = 0;
  uintptr_t session = 0;
  std::string_view session_id;
  bool causal = true;  // a causal step may run in chunks; a non-causal one runs whole
  int64_t tokens = 0;  // the step's new tokens (s)
  int64_t done = 0;    // tokens computed in earlier passes; > 0: admitted, the rest of a chunked prefill

  // Admission (a step's first chunk): the session's state for this layer when the snapshot was taken.
  std::optional<int64_t> position;  // the position the step names, if it names one
  int64_t layer_position = 0;       // tokens the layer holds
  int64_t max_tokens = 0;           // the session's limit
  int64_t blocks_held = 0;          // KV blocks the session's table holds (shared by its layers)
  bool closed = false;              // the session was closed
  // The layer's last applied step, to recognise a retry of it (StepRequest's exactly-once contract).
  int64_t last_position = -1;  // where it started; -1: none
  int64_t last_tokens = 0;
  bool same_input_as_last = false;  // x's dtype and digest equal the last step's
  bool last_answer_kept = false;    // its answer is still held within the replay budget
};

// One replica's KV pool.
struct PoolView {
  int64_t free_blocks = 0;
  int64_t capacity = 0;  // allocatable blocks
  int32_t block_size = 16;
};

struct SchedulerLimits {
  int64_t max_batch_sessions = 256;  // steps per pass (values < 1 count as 1)
  int64_t max_batch_tokens = 4096;   // tokens per pass; the pass's first step is taken whatever its size
  int64_t max_prefill_chunk = 512;   // a causal step's tokens per pass (values < 1 count as 1)
  // Decode first (vLLM's chunked prefill): a step of at most this many tokens that has not started is a decode
  // step. The pass forms around the oldest decode step, the decode steps of its layer join first, and prefill
  // chunks fill the token budget left (a causal chunk shrinks to fit it). So a decode step waits for at most one
  // pass of its layer, not behind every prefill queued ahead of it. < 1: no decode steps (queue order alone).
  int64_t decode_max_tokens = 16;
  // ... unless the oldest queued item has waited this long: then it leads the pass whatever it is, so neither a
  // prefill nor a stateless Forward can be starved by a steady stream of decode steps.
  std::chrono::microseconds max_wait_behind_decode{std::chrono::milliseconds(100)};
};

struct SchedulerInput {
  std::vector<QueuedWork> queue;  // queue order
  // (session, layer) keys of the steps in the pass the device is still running (the worker launches a pass before
  // it completes the one before, so the GPU never waits for the host): their queued steps wait for it, since the
  // layer's position moves only when that pass completes. Any order; QueuedWork::session values.
  std::vector<std::pair<uintptr_t, int>> running;
  std::vector<PoolView> pools;  // by QueuedWork::replica
  SchedulerLimits limits;
  QueuedWork::TimePoint now{};
};

enum class Verdict {
  kRun,     // in the pass: `chunk` tokens of it
  kDrop,    // cancelled or past its deadline before it started: status says which; nothing computed
  kRefuse,  // admission refused: status says why; the session is unchanged
  kReplay,  // a retry of the layer's last applied step: answered from the kept answer, not recomputed
  kEmpty,   // an admitted step of no tokens: an empty answer, nothing appended
};

struct Decision {
  size_t index = 0;  // into SchedulerInput::queue
  Verdict verdict = Verdict::kRun;
  Status status;              // kDrop, kRefuse
  int64_t chunk = 0;          // kRun: tokens of this pass
  int64_t start = 0;          // kRun (first chunk), kEmpty: the layer's position the step starts at
  int64_t new_blocks = 0;     // kRun (first chunk): blocks the pass must add to the session's table
  bool kv_exhausted = false;  // kRefuse for want of free KV blocks (counted apart)
};

struct PassPlan {
  // Steps of one (replica, layer), in queue order. Each (session, layer) at most once, and never ahead of an
  // earlier queued step of the same (session, layer).
  std::vector<Decision> pass;
  std::optional<size_t> alone;    // or: one non-step item, run alone
  std::vector<Decision> settled;  // leave the queue without running, in queue order
};

// The next pass. Items cancelled or past their deadline anywhere in the queue are dropped. The front is the
// oldest decode step that is the first of its (session, layer), queued ahead of any stateless request, and is
// admitted; without one (or when the oldest
// item has waited max_wait_behind_decode), the first item that is neither dropped nor refused. Steps of the
// front's (replica, layer) join while the session and token limits allow: decode steps first, then the others
// (prefill chunks), each in queue order and admitted against its session's state and the free blocks left by the
// members before it. Items of other (replica, layer)s are left queued, as is every step of a (session, layer)
// behind one that stays queued. Steps of a running key (SchedulerInput::running) are left queued, neither
// admitted nor settled (a retry of a step in that pass is recognised once it completes); only drops reach them.
// A step that has started (done > 0) is never dropped or re-admitted: it
// continues.
PassPlan SchedulePass(const SchedulerInput& in);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_BATCH_POLICY_H_
