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
};

struct SchedulerInput {
  std::vector<QueuedWork> queue;  // queue order
  std::vector<PoolView> pools;    // by QueuedWork::replica
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
  // Steps of one (replica, layer), queue order; the first is the pass's front. Each (session, layer) at most
  // once, and never ahead of an earlier queued step of the same (session, layer).
  std::vector<Decision> pass;
  std::optional<size_t> alone;    // or: one non-step item, run alone
  std::vector<Decision> settled;  // leave the queue without running, in queue order
};

// The next pass. The front is the first item that is neither dropped nor refused; steps of its (replica,
// layer) behind it join while the session and token limits allow, each admitted against its session's state
// and the free blocks left by the members before it. Items of other (replica, layer)s are left queued, as is
// every step of a (session, layer) behind one that stays queued. A step that has started (done > 0) is never
// dropped or re-admitted: it continues.
PassPlan SchedulePass(const SchedulerInput& in);

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_BATCH_POLICY_H_
