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

#include "batch_policy_rows.h"

namespace mqa::core::policy_rows {
namespace {

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
}  // namespace mqa::core::policy_rows
