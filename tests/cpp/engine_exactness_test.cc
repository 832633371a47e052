// The engine computes the spec's function however it schedules a step (chunk sizes, batches), and a step is
// applied exactly once however often it is sent. References: the layer's own stateless forward in fp32 on the
// CPU (itself checked against Zeta by the reference tests), never the engine.
#include <gtest/gtest.h>

#include <future>
#include <string>
#include <vector>

#include "engine_test_util.h"
#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "test_util.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Floats;
using ::mqa::testing::Randn;
using ::mqa::testing::RelativeError;

struct Device {
  std::string name;
  DType dtype;
  AttnImpl impl;
  double tolerance;
};

// CPU in fp32 always; on CUDA in bf16 the flash path and the triton kernels too.
std::vector<Device> Devices() {
  std::vector<Device> d = {{"cpu", DType::kFloat32, AttnImpl::kTorch, 1e-5},
                           {"cpu", DType::kFloat32, AttnImpl::kFlash, 1e-5}};
  if (CudaAvailable()) {
    d.push_back({"cuda", DType::kBFloat16, AttnImpl::kFlash, 2e-2});
    d.push_back({"cuda", DType::kBFloat16, AttnImpl::kTriton, 2e-2});
  }
  return d;
}

std::string Name(const Device& d) { return d.name + "/" + std::string(AttnImplName(d.impl)); }

// One engine per chunk size; every (length, causal, alibi) case is a fresh session: an optional prefix of
// `past` tokens as its own step, then one step of `len` tokens, compared with the spec's forward of the same
// two steps (the second with the first's cache).
void CheckChunkingIsInvisible(const Device& dev, std::optional<double> softmax_scale) {
  const int64_t dim = 64;
  for (int64_t chunk : {1, 3, 4, 16}) {
    EngineOptions o;
    o.models.push_back(SmallModel());
    o.models[0].options.device = dev.name;
    o.models[0].options.dtype = dev.dtype;
    o.models[0].options.attn_impl = dev.impl;
    o.models[0].options.softmax_scale = softmax_scale;
    o.batching.max_prefill_chunk = chunk;
    o.kv_cache.budget_bytes = int64_t{16} << 20;
    auto e = MakeEngine(std::move(o));
    MqaOptions ref = SmallModel().options;  // same seed: the same weights, fp32 on the CPU
    ref.softmax_scale = softmax_scale;
    auto stack = Unwrap(MqaStack::Create(ref, 2));
    for (int64_t past : {0, 5}) {
      for (int64_t len : {1, 2, 5, 6, 17}) {
        for (bool causal : {true, false}) {
          for (bool alibi : {false, true}) {
            SCOPED_TRACE(Name(dev) + " chunk " + std::to_string(chunk) + " past " + std::to_string(past) + " len " +
                         std::to_string(len) + (causal ? " causal" : " non-causal") + (alibi ? " alibi" : ""));
            SessionConfig c;
            c.causal = causal;
            c.position_bias = alibi ? PositionBias::kAlibi : PositionBias::kNone;
            SessionInfo s = Create(*e, c);
            Tensor x0 = Randn(DType::kFloat32, {1, past, dim});
            Tensor x1 = Randn(DType::kFloat32, {1, len, dim});
            if (past > 0) {
              ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 1, x0)).ok());
            }
            auto got = StepSync(*e, MakeStep(s.id, 1, x1));
            ASSERT_TRUE(got.ok()) << got.status().ToString();

            ForwardArgs first;
            first.x = x0;
            first.causal = causal;
            first.past_key_value = KvCache{};
            const int64_t total = past + len;
            // ALiBi over absolute positions; the layer keeps the bias's last s_q rows and s_k columns.
            if (alibi) first.bias = Unwrap(AlibiBias(ref.heads, total, /*full=*/!causal, DType::kFloat32));
            auto f0 = Unwrap(stack->layer(1).Forward(first));
            ForwardArgs second = first;
            second.x = x1;
            second.past_key_value = *f0.cache;
            auto want = Floats(Unwrap(stack->layer(1).Forward(second)).out);
            EXPECT_LT(RelativeError(Floats(got->out), want), dev.tolerance);
            EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[1], total);
            ASSERT_TRUE(e->CloseSession(s.id).ok());
          }
        }
      }
    }
  }
}

TEST(Exactness, AStepGivesTheSameResultHoweverTheEngineChunksIt) {
  for (const Device& dev : Devices()) CheckChunkingIsInvisible(dev, std::nullopt);
}

// Non-positive scales make masked logits (-inf) times the scale NaN or +inf inside fused kernels that mask
// after scaling; the spec has none of that.
TEST(Exactness, NonPositiveSoftmaxScalesThroughThePagedPass) {
  for (const Device& dev : Devices()) {
    for (double scale : {0.0, -0.25}) CheckChunkingIsInvisible(dev, scale);
  }
}

// A non-causal step runs whole however long it is; the paged pass's attention then works through it a tile of
// query rows at a time (memory linear in the step's length). 700 rows against 700+ keys and 4 heads is two tiles.
TEST(Exactness, ALongNonCausalStepIsExactAcrossQueryTiles) {
  EngineOptions o;
  o.models.push_back(SmallModel("small", 2, 2048));
  o.batching.max_prefill_chunk = 64;
  auto e = MakeEngine(std::move(o));
  auto stack = Unwrap(MqaStack::Create(SmallModel().options, 2));
  for (bool causal : {false, true}) {
    for (bool alibi : {false, true}) {
      SCOPED_TRACE(std::string(causal ? "causal" : "non-causal") + (alibi ? " alibi" : ""));
      SessionConfig c;
      c.model = "small";
      c.causal = causal;
      c.position_bias = alibi ? PositionBias::kAlibi : PositionBias::kNone;
      SessionInfo s = Create(*e, c);
      Tensor x0 = Randn(DType::kFloat32, {1, 30, 64});
      Tensor x1 = Randn(DType::kFloat32, {1, 700, 64});
      ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, x0)).ok());
      auto got = Unwrap(StepSync(*e, MakeStep(s.id, 0, x1)));
      ForwardArgs first;
      first.x = x0;
      first.causal = causal;
      first.past_key_value = KvCache{};
      if (alibi) first.bias = Unwrap(AlibiBias(4, 730, /*full=*/!causal, DType::kFloat32));
      ForwardArgs second = first;
      second.x = x1;
      second.past_key_value = *Unwrap(stack->layer(0).Forward(first)).cache;
      EXPECT_LT(RelativeError(Floats(got.out), Floats(Unwrap(stack->layer(0).Forward(second)).out)), 1e-5);
    }
  }
}

TEST(Exactness, AnEmptyStepGivesAnEmptyOutputAndChangesNothing) {
  for (bool causal : {true, false}) {
    auto e = MakeEngine();
    SessionConfig c;
    c.causal = causal;
    SessionInfo s = Create(*e, c);
    ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 3, 64}))).ok());
    auto step = MakeStep(s.id, 0, Randn(DType::kFloat16, {1, 0, 64}));
    step.position = 3;
    auto r = StepSync(*e, step);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->out.shape(), (std::vector<int64_t>{1, 0, 64}));
    EXPECT_EQ(r->out.dtype(), DType::kFloat16);
    EXPECT_EQ(r->position, 3);
    EXPECT_EQ(r->num_tokens, 0);
    EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions, (std::vector<int64_t>{3, 0}));
    step.position = 2;  // the position is still checked
    EXPECT_EQ(StepSync(*e, step).status().code(), StatusCode::kFailedPrecondition);
  }
}

TEST(Exactness, ARetriedStepIsAnsweredAgainAndAppliedOnce) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  Tensor x0 = Randn(DType::kFloat32, {1, 4, 64});
  Tensor x1 = Randn(DType::kFloat32, {1, 1, 64});
  auto first = MakeStep(s.id, 0, x0);
  first.position = 0;
  auto a = Unwrap(StepSync(*e, first));
  auto again = Unwrap(StepSync(*e, first));  // the caller never saw a: it sends the same step again
  EXPECT_EQ(Floats(again.out), Floats(a.out));
  EXPECT_TRUE(again.replayed);
  EXPECT_EQ(again.position, 0);
  EXPECT_EQ(again.num_tokens, 4);
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 4);  // applied once

  auto other = MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 4, 64}));  // same position, other input
  other.position = 0;
  auto refused = StepSync(*e, other);
  EXPECT_EQ(refused.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("holds 4 tokens"), std::string::npos) << refused.status().message();

  auto next = MakeStep(s.id, 0, x1);
  next.position = 4;
  ASSERT_TRUE(StepSync(*e, next).ok());
  // Only the last step is kept: the first one is history now.
  EXPECT_EQ(StepSync(*e, first).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Unwrap(StepSync(*e, next)).replayed);
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 5);
  EXPECT_EQ(e->stats().steps_replayed, 2u);
  EXPECT_GT(e->stats().replay_bytes, 0);
  ASSERT_TRUE(e->CloseSession(s.id).ok());
  EXPECT_EQ(e->stats().replay_bytes, 0);  // a closed session's answers are let go

  // The same answer on the other layer is another step: layers keep their own.
  SessionInfo t = Create(*e);
  auto l1 = MakeStep(t.id, 1, x0);
  l1.position = 0;
  ASSERT_TRUE(StepSync(*e, l1).ok());
  auto l0 = MakeStep(t.id, 0, x0);
  l0.position = 0;
  EXPECT_FALSE(Unwrap(StepSync(*e, l0)).replayed);
}

// Session b is closed by a's completion, in the same pass, after b's step was computed: b's answer must not stay
// kept (nobody can retry it, and its bytes would count against everyone's budget).
TEST(Exactness, AStepFinishingAfterItsSessionClosedKeepsNoAnswer) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.batching.max_batch_sessions = 2;
  o.batching.max_queue_delay = std::chrono::seconds(5);  // both steps in one pass
  auto e = MakeEngine(std::move(o));
  SessionInfo a = Create(*e), b = Create(*e);
  std::promise<StatusOr<StepResult>> a_done;
  auto sa = MakeStep(a.id, 0, Randn(DType::kFloat32, {1, 1, 64}));
  sa.position = 0;
  e->SubmitStep(sa, [&](StatusOr<StepResult> r) {
    EXPECT_TRUE(e->CloseSession(b.id).ok());
    a_done.set_value(std::move(r));
  });
  auto sb = MakeStep(b.id, 0, Randn(DType::kFloat32, {1, 1, 64}));
  sb.position = 0;
  auto b_done = StepAsync(*e, sb);
  ASSERT_TRUE(a_done.get_future().get().ok());
  ASSERT_TRUE(b_done.get().ok());              // computed before the close: its answer was delivered
  EXPECT_EQ(e->stats().replay_bytes, 64 * 4);  // a's only
  ASSERT_TRUE(e->CloseSession(a.id).ok());
  EXPECT_EQ(e->stats().replay_bytes, 0);
}

TEST(Exactness, AnAnswerOverTheReplayBudgetIsNotKeptAndTheRetrySaysSo) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.replay_budget_bytes = 64 * 4 * 2;  // two decode answers of dim 64 in fp32
  auto e = MakeEngine(std::move(o));
  SessionInfo s = Create(*e);
  auto big = MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 3, 64}));
  big.position = 0;
  ASSERT_TRUE(StepSync(*e, big).ok());
  auto retry = StepSync(*e, big);
  EXPECT_EQ(retry.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(retry.status().message().find("not kept"), std::string::npos) << retry.status().message();
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 3);
  auto small = MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64}));
  small.position = 3;
  ASSERT_TRUE(StepSync(*e, small).ok());
  EXPECT_TRUE(Unwrap(StepSync(*e, small)).replayed);
  EXPECT_EQ(e->stats().replay_bytes, 64 * 4);
}

TEST(Exactness, AnExpiredCancellationCountsAsADeadlineDrop) {
  auto e = MakeEngine(SlowModel());
  SessionConfig c;
  c.model = "slow";
  SessionInfo busy = Create(*e, c);
  SessionInfo victim = Create(*e, c);
  auto long_done = OccupyWorker(*e, busy.id);
  // What the service does when a call's deadline fires: the cancellation says it was the deadline.
  auto flag = std::make_shared<CancelFlag>();
  auto step = MakeStep(victim.id, 0, Randn(DType::kFloat32, {1, 1, 512}));
  step.cancel = flag;
  auto done = StepAsync(*e, step);
  flag->Expire();
  flag->Cancel();  // the first reason sticks
  EXPECT_TRUE(long_done.get().ok());
  EXPECT_EQ(done.get().status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(e->stats().dropped_deadline, 1u);
  EXPECT_EQ(e->stats().dropped_cancelled, 0u);
}

}  // namespace
}  // namespace mqa::core
