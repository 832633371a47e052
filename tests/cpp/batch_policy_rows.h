// The rows of the batch scheduler's table tests (batch_policy_test.cc, batch_policy_decode_test.cc): a queue state
// built from steps with modifiers, the pass and settlements SchedulePass must produce, and the check of one row.
#ifndef MQA_TESTS_CPP_BATCH_POLICY_ROWS_H_
#define MQA_TESTS_CPP_BATCH_POLICY_ROWS_H_

#include <gtest/gtest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/batch_policy.h"

namespace mqa::core::policy_rows {

using TimePoint = QueuedWork::TimePoint;
inline const TimePoint kNow = TimePoint() + std::chrono::hours(1);

// A step of `tokens` new tokens for `session` at `layer`, on replica 0, admitted against a fresh session.
inline QueuedWork Step(uintptr_t session, int layer, int64_t tokens) {
  static const std::string kIds[] = {"s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"};
  QueuedWork w;
  w.is_step = true;
  w.enqueued = kNow - std::chrono::milliseconds(5);
  w.session = session;
  w.session_id = kIds[session % 8];
  w.layer = layer;
  w.tokens = tokens;
  w.max_tokens = 4096;
  return w;
}

inline QueuedWork With(QueuedWork w, const std::function<void(QueuedWork&)>& f) {
  f(w);
  return w;
}

inline QueuedWork Forward() {
  QueuedWork w;
  w.is_step = false;
  w.enqueued = kNow;
  return w;
}

struct Settled {
  size_t index;
  Verdict verdict;
  StatusCode code;  // kOk for kReplay and kEmpty
};

struct Row {
  std::string name;
  std::vector<QueuedWork> queue;
  SchedulerLimits limits;
  std::vector<PoolView> pools;                   // empty: one pool of 1000 free blocks of 16 tokens
  std::vector<std::pair<size_t, int64_t>> pass;  // (queue index, chunk), in order
  std::vector<Settled> settled;
  std::optional<size_t> alone;
};

using Keys = std::vector<std::pair<uintptr_t, int>>;  // (session, layer)

inline SchedulerLimits Limits(int64_t sessions, int64_t tokens, int64_t chunk) { return {sessions, tokens, chunk}; }
inline const SchedulerLimits kDefault = Limits(256, 4096, 512);

// running: the keys of the pass the device is still running (SchedulerInput::running).
inline void RunRow(const Row& row, const Keys& running = {}) {
  SCOPED_TRACE(row.name);
  SchedulerInput in;
  in.queue = row.queue;
  in.limits = row.limits;
  in.pools = row.pools.empty() ? std::vector<PoolView>{{1000, 1000, 16}} : row.pools;
  in.now = kNow;
  in.running = running;
  const PassPlan plan = SchedulePass(in);
  ASSERT_EQ(plan.pass.size(), row.pass.size());
  for (size_t i = 0; i < row.pass.size(); ++i) {
    EXPECT_EQ(plan.pass[i].index, row.pass[i].first) << "pass member " << i;
    EXPECT_EQ(plan.pass[i].chunk, row.pass[i].second) << "pass member " << i;
    EXPECT_EQ(plan.pass[i].verdict, Verdict::kRun);
  }
  ASSERT_EQ(plan.settled.size(), row.settled.size());
  for (size_t i = 0; i < row.settled.size(); ++i) {
    EXPECT_EQ(plan.settled[i].index, row.settled[i].index) << "settled " << i;
    EXPECT_EQ(plan.settled[i].verdict, row.settled[i].verdict) << "settled " << i;
    EXPECT_EQ(plan.settled[i].status.code(), row.settled[i].code)
        << "settled " << i << ": " << plan.settled[i].status.message();
    if (row.settled[i].code != StatusCode::kOk) {
      EXPECT_FALSE(plan.settled[i].status.message().empty());
    }
  }
  EXPECT_EQ(plan.alone, row.alone);
}

inline const auto Cancelled = [](QueuedWork& w) { w.cancelled = true; };
inline const auto Expired = [](QueuedWork& w) {
  w.cancelled = true;
  w.expired = true;
};
inline const auto PastDeadline = [](QueuedWork& w) { w.deadline = kNow - std::chrono::milliseconds(1); };
inline const auto Started = [](int64_t done) { return [done](QueuedWork& w) { w.done = done; }; };
inline const auto NonCausal = [](QueuedWork& w) { w.causal = false; };
inline const auto OnReplica = [](int r) { return [r](QueuedWork& w) { w.replica = r; }; };
inline const auto Holding = [](int64_t position, int64_t blocks) {
  return [position, blocks](QueuedWork& w) {
    w.layer_position = position;
    w.blocks_held = blocks;
  };
};
inline const auto Naming = [](int64_t position) { return [position](QueuedWork& w) { w.position = position; }; };

}  // namespace mqa::core::policy_rows

#endif  // MQA_TESTS_CPP_BATCH_POLICY_ROWS_H_
