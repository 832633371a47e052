// A step's kept answer (the one a retry of that step is given back) holds its own bytes, not a view of its pass's
// whole output: the replay budget counts the answer's bytes, so a view would let idle sessions pin up to a pass's
// worth of host memory each, uncounted. Looks at the storage behind the tensor, so it sees core's private side.
#include <gtest/gtest.h>

#include <future>
#include <string>
#include <vector>

#include "engine_test_util.h"
#include "tensor_impl.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Randn;

TEST(KeptAnswer, OwnsItsBytesWhenItsPassHadOtherSessions) {
  constexpr int kSessions = 8;
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.batching.max_batch_sessions = kSessions;
  o.batching.max_queue_delay = std::chrono::milliseconds(500);  // the pass waits for all eight
  auto e = MakeEngine(std::move(o));
  std::vector<SessionInfo> sessions;
  std::vector<Tensor> inputs;
  for (int i = 0; i < kSessions; ++i) {
    sessions.push_back(Create(*e));
    inputs.push_back(Randn(DType::kFloat32, {1, 1, 64}));
  }
  auto step = [&](int i) {
    StepRequest r = MakeStep(sessions[static_cast<size_t>(i)].id, 0, inputs[static_cast<size_t>(i)]);
    r.position = 0;
    return r;
  };
  std::vector<std::future<StatusOr<StepResult>>> first;
  for (int i = 0; i < kSessions; ++i) first.push_back(StepAsync(*e, step(i)));
  for (auto& f : first) ASSERT_TRUE(f.get().ok());
  ASSERT_EQ(e->stats().batches, 1u) << "the eight steps were meant to share one pass";

  // A retry of session 0's step is answered with the kept answer.
  auto retry = StepSync(*e, step(0));
  ASSERT_TRUE(retry.ok()) << retry.status().ToString();
  ASSERT_TRUE(retry->replayed);
  const at::Tensor kept = Unwrap(retry->out);
  EXPECT_EQ(kept.storage().nbytes(), kept.nbytes()) << "the kept answer is a view of a larger buffer";
  EXPECT_EQ(e->stats().replay_bytes, static_cast<int64_t>(kSessions * 64 * sizeof(float)));
}

}  // namespace
}  // namespace mqa::core
