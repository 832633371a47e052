// The batch scheduler's policy (SchedulePass) as a table: each row a queue state (the steps waiting, their
// sessions' state, the pools' free blocks, the limits) and the pass and settlements it must produce. Torch-free:
// this test links the policy and core's Status, nothing else.
#include "engine/batch_policy.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace mqa::core {
namespace {

using TimePoint = QueuedWork::TimePoint;
const TimePoint kNow = TimePoint() + std::chrono::hours(1);

// A step of `tokens` new tokens for `session` at `layer`, on replica 0, admitted against a fresh session.
QueuedWork Step(uintptr_t session, int layer, int64_t tokens) {
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

QueuedWork With(QueuedWork w, const std::function<void(QueuedWork&)>& f) {
  f(w);
  return w;
}

QueuedWork Forward() {
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

SchedulerLimits Limits(int64_t sessions, int64_t tokens, int64_t chunk) { return {sessions, tokens, chunk}; }
const SchedulerLimits kDefault = Limits(256, 4096, 512);

// running: the keys of the pass the device is still running (SchedulerInput::running).
void RunRow(const Row& row, const Keys& running = {}) {
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

auto Cancelled = [](QueuedWork& w) { w.cancelled = true; };
auto Expired = [](QueuedWork& w) {
  w.cancelled = true;
  w.expired = true;
};
auto PastDeadline = [](QueuedWork& w) { w.deadline = kNow - std::chrono::milliseconds(1); };
auto Started = [](int64_t done) { return [done](QueuedWork& w) { w.done = done; }; };
auto NonCausal = [](QueuedWork& w) { w.causal = false; };
auto OnReplica = [](int r) { return [r](QueuedWork& w) { w.replica = r; }; };
auto Holding = [](int64_t position, int64_t blocks) {
  return [position, blocks](QueuedWork& w) {
    w.layer_position = position;
    w.blocks_held = blocks;
  };
};
auto Naming = [](int64_t position) { return [position](QueuedWork& w) { w.position = position; }; };

TEST(BatchPolicy, FifoPerSessionAndLayer) {
  const std::vector<Row> rows = {
      {"empty queue", {}, kDefault, {}, {}, {}, std::nullopt},
      {"one session's steps of one layer run one per pass, oldest first",
       {Step(1, 0, 1), Step(1, 0, 1), Step(1, 0, 1)},
       kDefault,
       {},
       {{0, 1}},
       {},
       std::nullopt},
      {"sessions of one layer share the pass in queue order",
       {Step(1, 0, 1), Step(2, 0, 3), Step(3, 0, 1)},
       kDefault,
       {},
       {{0, 1}, {1, 3}, {2, 1}},
       {},
       std::nullopt},
      {"one session's steps of different layers: only the front's layer",
       {Step(1, 0, 1), Step(1, 1, 1), Step(2, 0, 1)},
       kDefault,
       {},
       {{0, 1}, {2, 1}},
       {},
       std::nullopt},
      {"other layers wait, even ahead in the queue of a same-layer step",
       {Step(1, 1, 1), Step(2, 0, 1), Step(3, 1, 1)},
       kDefault,
       {},
       {{0, 1}, {2, 1}},
       {},
       std::nullopt},
      {"other replicas wait",
       {Step(1, 0, 1), With(Step(2, 0, 1), OnReplica(1)), Step(3, 0, 1)},
       kDefault,
       {{1000, 1000, 16}, {1000, 1000, 16}},
       {{0, 1}, {2, 1}},
       {},
       std::nullopt},
      {"a second step of a session in the pass never overtakes its first",
       {Step(1, 0, 1), Step(2, 0, 1), Step(1, 0, 1), Step(2, 0, 1), Step(3, 0, 1)},
       kDefault,
       {},
       {{0, 1}, {1, 1}, {4, 1}},
       {},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

TEST(BatchPolicy, TokenAndSessionCaps) {
  const std::vector<Row> rows = {
      {"the session cap ends the pass",
       {Step(1, 0, 1), Step(2, 0, 1), Step(3, 0, 1)},
       Limits(2, 4096, 512),
       {},
       {{0, 1}, {1, 1}},
       {},
       std::nullopt},
      {"a cap of 1 is the unbatched path",
       {Step(1, 0, 1), Step(2, 0, 1)},
       Limits(1, 4096, 512),
       {},
       {{0, 1}},
       {},
       std::nullopt},
      {"a cap below 1 counts as 1",
       {Step(1, 0, 1), Step(2, 0, 1)},
       Limits(0, 4096, 512),
       {},
       {{0, 1}},
       {},
       std::nullopt},
      {"the token cap: a step that does not fit waits, smaller ones behind it still join",
       {Step(1, 0, 4), Step(2, 0, 4), Step(3, 0, 4), Step(4, 0, 2)},
       Limits(256, 10, 512),
       {},
       {{0, 4}, {1, 4}, {3, 2}},
       {},
       std::nullopt},
      {"the front is taken whatever its size",
       {Step(1, 0, 20), Step(2, 0, 20)},
       Limits(256, 10, 512),
       {},
       {{0, 20}},
       {},
       std::nullopt},
      {"a session whose step waits for tokens keeps its later steps waiting too",
       {Step(1, 0, 1), With(Step(2, 0, 20), NonCausal), Step(2, 0, 1), Step(3, 0, 1)},
       Limits(256, 10, 512),
       {},
       {{0, 1}, {3, 1}},
       {},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

TEST(BatchPolicy, ChunkedPrefillInterleavesWithDecode) {
  const std::vector<Row> rows = {
      {"a long causal prefill runs one chunk, decodes ride along",
       {Step(1, 0, 10), Step(2, 0, 1), Step(3, 0, 1)},
       Limits(256, 4096, 4),
       {},
       {{0, 4}, {1, 1}, {2, 1}},
       {},
       std::nullopt},
      {"its later chunks continue where it stopped",
       {With(Step(1, 0, 10), Started(4)), Step(2, 0, 1)},
       Limits(256, 4096, 4),
       {},
       {{0, 4}, {1, 1}},
       {},
       std::nullopt},
      {"the last chunk is what is left",
       {With(Step(1, 0, 10), Started(8))},
       Limits(256, 4096, 4),
       {},
       {{0, 2}},
       {},
       std::nullopt},
      {"a non-causal step is never split",
       {With(Step(1, 0, 10), NonCausal), Step(2, 0, 1)},
       Limits(256, 4096, 4),
       {},
       {{0, 10}, {1, 1}},
       {},
       std::nullopt},
      {"a chunk below 1 counts as 1", {Step(1, 0, 3)}, Limits(256, 4096, 0), {}, {{0, 1}}, {}, std::nullopt},
      {"chunks count against the token cap",
       {Step(1, 0, 10), Step(2, 0, 10), Step(3, 0, 1)},
       Limits(256, 8, 4),
       {},
       {{0, 4}, {1, 4}},
       {},
       std::nullopt},
      {"two prefills and a decode: each prefill one chunk per pass",
       {Step(1, 0, 100), Step(2, 0, 100), Step(3, 0, 1)},
       Limits(256, 4096, 16),
       {},
       {{0, 16}, {1, 16}, {2, 1}},
       {},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

TEST(BatchPolicy, DecodeFirst) {
  auto Waited = [](std::chrono::milliseconds ms) { return [ms](QueuedWork& w) { w.enqueued = kNow - ms; }; };
  SchedulerLimits fifo = kDefault;
  fifo.decode_max_tokens = 0;
  const std::vector<Row> rows = {
      {"a decode step behind a prefill of its layer leads; the prefill's chunk shrinks to the budget left",
       {Step(1, 0, 100), Step(2, 0, 1)},
       Limits(256, 64, 512),
       {},
       {{0, 63}, {1, 1}},
       {},
       std::nullopt},
      {"a decode step of another layer goes ahead of older prefills",
       {Step(1, 0, 100), Step(2, 1, 1), Step(3, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {},
       std::nullopt},
      {"decode steps join before prefill chunks take the budget",
       {Step(1, 0, 100), Step(2, 0, 100), Step(3, 0, 1), Step(4, 0, 1)},
       Limits(256, 10, 512),
       {},
       {{0, 8}, {2, 1}, {3, 1}},
       {},
       std::nullopt},
      {"a started prefill is not a decode step: it continues in the budget left",
       {With(Step(1, 0, 100), Started(50)), Step(2, 0, 1)},
       Limits(256, 4096, 16),
       {},
       {{0, 16}, {1, 1}},
       {},
       std::nullopt},
      {"a decode step never overtakes an earlier step of its session and layer",
       {Step(1, 0, 100), Step(1, 0, 1), Step(2, 0, 1)},
       kDefault,
       {},
       {{0, 100}, {2, 1}},
       {},
       std::nullopt},
      {"the oldest item, once it has waited max_wait_behind_decode, leads",
       {With(Step(1, 1, 100), Waited(std::chrono::milliseconds(100))), Step(2, 0, 1)},
       kDefault,
       {},
       {{0, 100}},
       {},
       std::nullopt},
      {"... not before",
       {With(Step(1, 1, 100), Waited(std::chrono::milliseconds(99))), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {},
       std::nullopt},
      {"decode_max_tokens < 1: queue order alone",
       {Step(1, 1, 100), Step(2, 0, 1)},
       fifo,
       {},
       {{0, 100}},
       {},
       std::nullopt},
      {"a non-causal prefill is never split: it waits for a pass with room",
       {With(Step(1, 0, 20), NonCausal), Step(2, 0, 1)},
       Limits(256, 10, 512),
       {},
       {{1, 1}},
       {},
       std::nullopt},
      {"a stateless request ahead of the decode steps keeps its turn",
       {Forward(), Step(1, 0, 100), Step(2, 1, 1)},
       kDefault,
       {},
       {},
       {},
       0},
      {"decode steps overtake the prefills ahead of them, not a stateless request",
       {Step(1, 0, 100), Forward(), Step(2, 1, 1)},
       kDefault,
       {},
       {{0, 100}},
       {},
       std::nullopt},
      {"a refused decode step lets the next decode step lead",
       {Step(1, 0, 100), With(Step(2, 1, 1), Naming(9)), Step(3, 2, 1)},
       kDefault,
       {},
       {{2, 1}},
       {{1, Verdict::kRefuse, StatusCode::kFailedPrecondition}},
       std::nullopt},
      {"drops anywhere in the queue are settled in the same round",
       {Step(1, 0, 1), Step(2, 1, 1), With(Step(3, 2, 1), Cancelled)},
       kDefault,
       {},
       {{0, 1}},
       {{2, Verdict::kDrop, StatusCode::kCancelled}},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

// The worker launches a pass before it completes the one before; steps of the (session, layer)s of that running
// pass must wait for it (the layer's position moves only when it completes), whatever else they would be.
TEST(BatchPolicy, StepsOfTheRunningPassWait) {
  const std::vector<std::pair<Row, Keys>> rows = {
      {{"a decode step of a running key waits; the others form the pass",
        {Step(1, 0, 1), Step(2, 0, 1), Step(3, 0, 1)},
        kDefault,
        {},
        {{1, 1}, {2, 1}},
        {},
        std::nullopt},
       Keys{{1, 0}}},
      {{"the same session at another layer runs", {Step(1, 1, 1)}, kDefault, {}, {{0, 1}}, {}, std::nullopt},
       Keys{{1, 0}}},
      {{"a prefill of a running key does not lead in queue order",
        {Step(1, 0, 100), Step(2, 0, 100)},
        kDefault,
        {},
        {{1, 100}},
        {},
        std::nullopt},
       Keys{{1, 0}}},
      {{"a step that would be refused is not settled while its key runs (its position is about to move)",
        {With(Step(1, 0, 1), Naming(3)), With(Step(1, 0, 1), Naming(4))},
        kDefault,
        {},
        {},
        {},
        std::nullopt},
       Keys{{1, 0}}},
      {{"a retry of a step of the running pass is not replayed yet",
        {With(With(Step(1, 0, 1), Naming(7)),
              [](QueuedWork& w) {
                w.layer_position = 8;
                w.last_position = 7;
                w.last_tokens = 1;
                w.same_input_as_last = true;
                w.last_answer_kept = true;
              })},
        kDefault,
        {},
        {},
        {},
        std::nullopt},
       Keys{{1, 0}}},
      {{"a cancelled step of a running key is still dropped",
        {With(Step(1, 0, 1), Cancelled), Step(2, 0, 1)},
        kDefault,
        {},
        {{1, 1}},
        {{0, Verdict::kDrop, StatusCode::kCancelled}},
        std::nullopt},
       Keys{{1, 0}}},
      {{"waiting steps do not hold back a stateless request behind them",
        {Step(1, 0, 1), Forward()},
        kDefault,
        {},
        {},
        {},
        size_t{1}},
       Keys{{1, 0}}},
      {{"a waiting key does not count against the pass's session limit",
        {Step(1, 0, 1), Step(2, 0, 1), Step(3, 0, 1)},
        Limits(2, 4096, 512),
        {},
        {{1, 1}, {2, 1}},
        {},
        std::nullopt},
       Keys{{1, 0}, {9, 0}}},
  };
  for (const auto& [row, running] : rows) RunRow(row, running);
}

TEST(BatchPolicy, AdmissionRefusals) {
  const std::vector<Row> rows = {
      {"a step naming another position is refused; the pass goes on without it",
       {With(Step(1, 0, 1), Naming(3)), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kRefuse, StatusCode::kFailedPrecondition}},
       std::nullopt},
      {"naming the right position runs",
       {With(With(Step(1, 0, 1), Holding(7, 1)), Naming(7))},
       kDefault,
       {},
       {{0, 1}},
       {},
       std::nullopt},
      {"past max_tokens is OUT_OF_RANGE",
       {With(With(Step(1, 0, 2), Holding(4095, 256)), [](QueuedWork&) {}), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kRefuse, StatusCode::kOutOfRange}},
       std::nullopt},
      {"a closed session's step is NOT_FOUND",
       {With(Step(1, 0, 1), [](QueuedWork& w) { w.closed = true; })},
       kDefault,
       {},
       {},
       {{0, Verdict::kRefuse, StatusCode::kNotFound}},
       std::nullopt},
      {"KV blocks: members take them in queue order, the one left without is refused",
       {Step(1, 0, 10), Step(2, 0, 20), Step(3, 0, 1)},
       kDefault,
       {{2, 100, 16}},
       {{0, 10}, {2, 1}},
       {{1, Verdict::kRefuse, StatusCode::kResourceExhausted}},
       std::nullopt},
      {"a step inside the blocks its session holds needs none",
       {With(Step(1, 0, 4), Holding(10, 1)), Step(2, 0, 1)},
       kDefault,
       {{0, 100, 16}},
       {{0, 4}},
       {{1, Verdict::kRefuse, StatusCode::kResourceExhausted}},
       std::nullopt},
      {"a refused front lets the next step lead the pass",
       {With(Step(1, 1, 1), Naming(5)), Step(2, 0, 1), Step(3, 1, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kRefuse, StatusCode::kFailedPrecondition}},
       std::nullopt},
      {"a started chunk is not admitted again",
       {With(With(Step(1, 0, 10), Started(4)), Naming(99))},
       Limits(256, 4096, 4),
       {{0, 100, 16}},
       {{0, 4}},
       {},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);

  // What the pass must do for an admitted first chunk: start at the layer's position, add the missing blocks.
  SchedulerInput in;
  in.queue = {With(Step(1, 0, 30), Holding(10, 1)), Step(2, 0, 1)};
  in.pools = {{5, 100, 16}};
  in.limits = kDefault;
  in.now = kNow;
  const PassPlan plan = SchedulePass(in);
  ASSERT_EQ(plan.pass.size(), 2u);
  EXPECT_EQ(plan.pass[0].start, 10);
  EXPECT_EQ(plan.pass[0].new_blocks, 2);  // 40 tokens: 3 blocks, 1 held
  EXPECT_EQ(plan.pass[1].start, 0);
  EXPECT_EQ(plan.pass[1].new_blocks, 1);
  // The refusal for want of blocks is marked as such (it is counted apart) and says what was missing. The decode
  // step is admitted first (decode first), so it took the one free block.
  in.pools = {{1, 100, 16}};
  const PassPlan short_of_blocks = SchedulePass(in);
  ASSERT_EQ(short_of_blocks.settled.size(), 1u);
  EXPECT_EQ(short_of_blocks.settled[0].index, 0u);
  EXPECT_TRUE(short_of_blocks.settled[0].kv_exhausted);
  EXPECT_NE(short_of_blocks.settled[0].status.message().find("2 blocks of 16 tokens needed, 0 of 100 free"),
            std::string::npos)
      << short_of_blocks.settled[0].status.message();
}

TEST(BatchPolicy, CancelledAndExpiredDrops) {
  const std::vector<Row> rows = {
      {"a cancelled step is dropped unstarted",
       {With(Step(1, 0, 1), Cancelled), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kDrop, StatusCode::kCancelled}},
       std::nullopt},
      {"one withdrawn for its deadline is DEADLINE_EXCEEDED",
       {With(Step(1, 0, 1), Expired), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kDrop, StatusCode::kDeadlineExceeded}},
       std::nullopt},
      {"one whose deadline passed in the queue likewise",
       {Step(1, 0, 1), With(Step(2, 0, 1), PastDeadline)},
       kDefault,
       {},
       {{0, 1}},
       {{1, Verdict::kDrop, StatusCode::kDeadlineExceeded}},
       std::nullopt},
      {"the deadline wins over a plain cancellation",
       {With(With(Step(1, 0, 1), Cancelled), PastDeadline)},
       kDefault,
       {},
       {},
       {{0, Verdict::kDrop, StatusCode::kDeadlineExceeded}},
       std::nullopt},
      {"a started prefill continues though cancelled",
       {With(With(Step(1, 0, 10), Started(4)), Cancelled)},
       Limits(256, 4096, 4),
       {},
       {{0, 4}},
       {},
       std::nullopt},
      {"a cancelled stateless request is dropped too",
       {With(Forward(), Cancelled), Step(1, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kDrop, StatusCode::kCancelled}},
       std::nullopt},
      {"drops behind the front in its layer are settled in the same round",
       {Step(1, 0, 1), With(Step(2, 0, 1), Cancelled), Step(3, 0, 1)},
       kDefault,
       {},
       {{0, 1}, {2, 1}},
       {{1, Verdict::kDrop, StatusCode::kCancelled}},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

TEST(BatchPolicy, RetriesEmptyStepsAndStatelessRequests) {
  // The layer applied a 3-token step at 5 (it now holds 8); a retry names 5 with the same input.
  auto applied = [](bool kept, bool same) {
    return [kept, same](QueuedWork& w) {
      w.layer_position = 8;
      w.blocks_held = 1;
      w.position = 5;
      w.last_position = 5;
      w.last_tokens = 3;
      w.same_input_as_last = same;
      w.last_answer_kept = kept;
    };
  };
  const std::vector<Row> rows = {
      {"a retry of the applied step is answered from the kept answer",
       {With(Step(1, 0, 3), applied(true, true)), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kReplay, StatusCode::kOk}},
       std::nullopt},
      {"... and refused when the answer was not kept",
       {With(Step(1, 0, 3), applied(false, true))},
       kDefault,
       {},
       {},
       {{0, Verdict::kRefuse, StatusCode::kFailedPrecondition}},
       std::nullopt},
      {"other input at that position is a position mismatch",
       {With(Step(1, 0, 3), applied(true, false))},
       kDefault,
       {},
       {},
       {{0, Verdict::kRefuse, StatusCode::kFailedPrecondition}},
       std::nullopt},
      {"an empty step gets an empty answer without running",
       {Step(1, 0, 0), Step(2, 0, 1)},
       kDefault,
       {},
       {{1, 1}},
       {{0, Verdict::kEmpty, StatusCode::kOk}},
       std::nullopt},
      {"a stateless request at the front runs alone", {Forward(), Step(1, 0, 1)}, kDefault, {}, {}, {}, 0},
      {"one behind the front waits for its turn",
       {Step(1, 0, 1), Forward(), Step(2, 0, 1)},
       kDefault,
       {},
       {{0, 1}, {2, 1}},
       {},
       std::nullopt},
  };
  for (const Row& row : rows) RunRow(row);
}

}  // namespace
}  // namespace mqa::core
