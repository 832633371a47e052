// The batch scheduler's policy (SchedulePass) as tables, continued: decode first, and the steps of the pass the
// device is still running. Torch-free, like batch_policy_test.cc.
#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "batch_policy_rows.h"
#include "engine/batch_policy.h"

namespace mqa::core::policy_rows {
namespace {

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

}  // namespace
}  // namespace mqa::core::policy_rows
