// The engine in-process: sessions, per-layer caches, limits and the fate of dropped work. Results are checked
// against the layer's own full forward (itself checked against Zeta by the reference tests).
#include "mqa/core/engine.h"

#include <gtest/gtest.h>

#include <atomic>
#include <climits>
#include <future>
#include <map>
#include <set>
#include <thread>
#include <utility>

#include "engine_test_util.h"
#include "test_util.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Floats;
using ::mqa::testing::Randn;
using ::mqa::testing::RelativeError;
using ::mqa::testing::Unwrap;

TEST(Engine, SessionIdsAre128RandomBitsInHex) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.max_sessions = 5000;
  auto e = MakeEngine(std::move(o));
  std::set<std::string> ids;
  for (int i = 0; i < 2000; ++i) {
    SessionInfo s = Create(*e);
    ASSERT_EQ(s.id.size(), 32u);
    ASSERT_EQ(s.id.find_first_not_of("0123456789abcdef"), std::string::npos) << s.id;
    ids.insert(s.id);
  }
  EXPECT_EQ(ids.size(), 2000u);
  EXPECT_EQ(e->stats().sessions_open, 2000u);
}

// Prefill chunk + one-token decode steps through the session equals one causal pass over all tokens.
void CheckIncrementalEqualsFullPass(PositionBias bias, bool causal) {
  auto e = MakeEngine();
  SessionConfig c;
  c.position_bias = bias;
  c.causal = causal;
  SessionInfo s = Create(*e, c);
  const int64_t dim = 64, total = 12, prefill = 5;
  Tensor all = Randn(DType::kFloat32, {1, total, dim});
  std::vector<float> all_v = Floats(all);
  std::vector<float> got;
  auto chunk = [&](int64_t from, int64_t to) {
    return Unwrap(Tensor::FromFloats(DType::kFloat32, {1, to - from, dim}, Rows(all_v, dim, from, to)));
  };
  auto r = Unwrap(StepSync(*e, MakeStep(s.id, 1, chunk(0, prefill))));
  EXPECT_EQ(r.position, 0);
  EXPECT_EQ(r.num_tokens, prefill);
  got = Floats(r.out);
  for (int64_t t = prefill; t < total; ++t) {
    auto step = MakeStep(s.id, 1, chunk(t, t + 1));
    step.position = t;
    auto rt = Unwrap(StepSync(*e, step));
    EXPECT_EQ(rt.position, t);
    auto v = Floats(rt.out);
    got.insert(got.end(), v.begin(), v.end());
  }
  // The same layer (same seed: layer 1 = seed + 1), one full pass.
  MqaOptions o = SmallModel().options;
  auto stack = Unwrap(MqaStack::Create(o, 2));
  ForwardArgs args;
  args.x = all;
  args.causal = causal;
  if (bias == PositionBias::kAlibi) args.bias = Unwrap(AlibiBias(o.heads, total, /*full=*/!causal, DType::kFloat32));
  auto full = Unwrap(stack->layer(1).Forward(args));
  if (causal) {
    EXPECT_LT(RelativeError(got, Floats(full.out)), 1e-5);
  } else {
    // Without a causal mask a chunk sees every key up to its own end: a decode token t sees 0..t exactly as
    // in a causal pass, and the prefill chunk is a non-causal pass of its own.
    ForwardArgs causal_args = args;
    causal_args.causal = true;
    if (bias == PositionBias::kAlibi) causal_args.bias = Unwrap(AlibiBias(o.heads, total, false, DType::kFloat32));
    auto causal_full = Floats(Unwrap(stack->layer(1).Forward(causal_args)).out);
    EXPECT_LT(RelativeError(Rows(got, dim, prefill, total), Rows(causal_full, dim, prefill, total)), 1e-5);
    ForwardArgs pre;
    pre.x = chunk(0, prefill);
    pre.causal = false;
    if (bias == PositionBias::kAlibi) pre.bias = Unwrap(AlibiBias(o.heads, prefill, true, DType::kFloat32));
    auto pre_out = Floats(Unwrap(stack->layer(1).Forward(pre)).out);
    EXPECT_LT(RelativeError(Rows(got, dim, 0, prefill), pre_out), 1e-5);
  }
  SessionInfo after = Unwrap(e->GetSession(s.id));
  EXPECT_EQ(after.layer_positions, (std::vector<int64_t>{0, total}));  // layer 0 never stepped
  // One block of 16 tokens holds all 12, for both layers: k and v, head_dim 16, fp32.
  EXPECT_EQ(after.cache_bytes, 1 * 2 * 2 * 16 * 16 * 4);
}

TEST(Engine, IncrementalDecodeEqualsOneFullPass) { CheckIncrementalEqualsFullPass(PositionBias::kNone, true); }
TEST(Engine, IncrementalDecodeWithAlibiEqualsOneFullPass) {
  CheckIncrementalEqualsFullPass(PositionBias::kAlibi, true);
}
TEST(Engine, NonCausalAlibiSessionChunksMatchTheLayer) { CheckIncrementalEqualsFullPass(PositionBias::kAlibi, false); }

TEST(Engine, WrongPositionIsRefusedAndNothingChanges) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 3, 64}))).ok());
  auto step = MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64}));
  step.position = 2;
  auto r = StepSync(*e, step);
  ASSERT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("holds 3 tokens, but the step says it starts at 2"), std::string::npos)
      << r.status().message();
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 3);
}

TEST(Engine, MaxTokensIsOutOfRangeAndTheSessionStaysUsable) {
  auto e = MakeEngine();
  SessionConfig c;
  c.max_tokens = 4;
  SessionInfo s = Create(*e, c);
  ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 3, 64}))).ok());
  auto r = StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 2, 64})));
  ASSERT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(r.status().message().find("max_tokens of 4"), std::string::npos) << r.status().message();
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 3);
  EXPECT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64}))).ok());  // exactly the maximum
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 4);
}

TEST(Engine, BadRequestsGetPreciseCodes) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  auto bad_shape = StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 2, 32})));
  EXPECT_EQ(bad_shape.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_shape.status().message().find("expected a floating tensor [1, s, 64]"), std::string::npos);
  auto two_sessions = StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {2, 1, 64})));
  EXPECT_EQ(two_sessions.status().code(), StatusCode::kInvalidArgument);
  auto bad_layer = StepSync(*e, MakeStep(s.id, 2, Randn(DType::kFloat32, {1, 1, 64})));
  EXPECT_EQ(bad_layer.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad_layer.status().message().find("has layers 0..1"), std::string::npos);
  auto unknown = StepSync(*e, MakeStep("00000000000000000000000000000000", 0, Randn(DType::kFloat32, {1, 1, 64})));
  EXPECT_EQ(unknown.status().code(), StatusCode::kNotFound);
  SessionConfig c;
  c.model = "nope";
  EXPECT_EQ(e->CreateSession(c).status().code(), StatusCode::kNotFound);
  c.model = "small";
  c.max_tokens = 257;
  EXPECT_EQ(e->CreateSession(c).status().code(), StatusCode::kInvalidArgument);
  c.max_tokens = 0;
  c.idle_ttl = std::chrono::hours(2);
  EXPECT_EQ(e->CreateSession(c).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions, (std::vector<int64_t>{0, 0}));
}

TEST(Engine, OtherDtypesAreConvertedAndAnsweredInKind) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  auto r = Unwrap(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kBFloat16, {1, 2, 64}))));
  EXPECT_EQ(r.out.dtype(), DType::kBFloat16);
  EXPECT_EQ(r.out.shape(), (std::vector<int64_t>{1, 2, 64}));
}

TEST(Engine, MaxSessionsIsResourceExhaustedUntilOneCloses) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.max_sessions = 3;
  auto e = MakeEngine(std::move(o));
  std::vector<SessionInfo> s;
  for (int i = 0; i < 3; ++i) s.push_back(Create(*e));
  SessionConfig c;
  c.model = "small";
  auto refused = e->CreateSession(c);
  ASSERT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("maximum of 3 sessions"), std::string::npos);
  ASSERT_TRUE(e->CloseSession(s[0].id).ok());
  EXPECT_TRUE(e->CreateSession(c).ok());
}

TEST(Engine, ClosedSessionsAreNotFoundAndSaySo) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 4, 64}))).ok());
  ASSERT_TRUE(e->CloseSession(s.id).ok());
  auto again = e->CloseSession(s.id);
  EXPECT_EQ(again.status().code(), StatusCode::kNotFound);
  EXPECT_NE(again.status().message().find("was closed"), std::string::npos);
  auto step = StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64})));
  EXPECT_EQ(step.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(e->stats().sessions_open, 0u);
  EXPECT_EQ(e->stats().sessions_closed, 1u);
}

TEST(Engine, IdleSessionsExpireAndActiveOnesStay) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.reap_interval = std::chrono::milliseconds(10);
  auto e = MakeEngine(std::move(o));
  SessionConfig c;
  c.idle_ttl = std::chrono::milliseconds(150);
  SessionInfo idle = Create(*e, c);
  SessionInfo busy = Create(*e, c);
  for (int i = 0; i < 8; ++i) {  // ~400 ms of activity, a step every 50 ms
    ASSERT_TRUE(StepSync(*e, MakeStep(busy.id, 0, Randn(DType::kFloat32, {1, 1, 64}))).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto gone = e->GetSession(idle.id);
  ASSERT_EQ(gone.status().code(), StatusCode::kNotFound);
  EXPECT_NE(gone.status().message().find("expired after 150 ms idle"), std::string::npos) << gone.status().message();
  EXPECT_TRUE(e->GetSession(busy.id).ok());
  EXPECT_EQ(e->stats().sessions_expired, 1u);
}

TEST(Engine, CancelledAndExpiredStepsAreDroppedUncomputed) {
  // The long step runs as one pass (no chunk boundary where a victim could join it), and it holds the device
  // before the victims are queued: otherwise whether they wait is a race with the worker.
  EngineOptions o;
  o.models.push_back(SlowModel());
  o.batching.max_prefill_chunk = 4096;
  auto e = MakeEngine(std::move(o));
  SessionConfig c;
  c.model = "slow";
  SessionInfo busy = Create(*e, c);
  SessionInfo victim = Create(*e, c);
  auto long_done = OccupyWorker(*e, busy.id);
  for (int i = 0; i < 3000 && e->stats().running == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(e->stats().running, 1u);

  auto cancel = std::make_shared<CancelFlag>();
  auto cancelled_step = MakeStep(victim.id, 0, Randn(DType::kFloat32, {1, 1, 512}));
  cancelled_step.cancel = cancel;
  auto cancelled_done = StepAsync(*e, cancelled_step);
  cancel->Cancel();

  auto late_step = MakeStep(victim.id, 0, Randn(DType::kFloat32, {1, 1, 512}));
  late_step.deadline = Clock::now() + std::chrono::milliseconds(1);
  auto late = StepSync(*e, late_step);

  EXPECT_TRUE(long_done.get().ok());
  EXPECT_EQ(cancelled_done.get().status().code(), StatusCode::kCancelled);
  EXPECT_EQ(late.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(Unwrap(e->GetSession(victim.id)).layer_positions[0], 0);  // neither was computed
  EngineStats st = e->stats();
  EXPECT_EQ(st.dropped_cancelled, 1u);
  EXPECT_EQ(st.dropped_deadline, 1u);
  EXPECT_EQ(st.steps_completed, 1u);
}

TEST(Engine, FullQueueIsResourceExhaustedForThatStepOnly) {
  EngineOptions o;
  o.models.push_back(SlowModel());
  o.max_queue = 2;
  auto e = MakeEngine(std::move(o));
  SessionConfig c;
  c.model = "slow";
  SessionInfo s = Create(*e, c);
  std::vector<std::future<StatusOr<StepResult>>> results;
  for (int i = 0; i < 5; ++i) {
    const int64_t tokens = i == 0 ? 2048 : 1;
    results.push_back(StepAsync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, tokens, 512}))));
  }
  int ok = 0, exhausted = 0;
  for (auto& f : results) {
    auto r = f.get();
    if (r.ok()) ++ok;
    if (r.status().code() == StatusCode::kResourceExhausted) {
      ++exhausted;
      EXPECT_NE(r.status().message().find("queue of cpu is full (2 requests waiting)"), std::string::npos);
    }
  }
  EXPECT_EQ(ok + exhausted, 5);
  EXPECT_GE(exhausted, 2);  // the long step runs while at most 2 wait
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).layer_positions[0], 2048 + ok - 1);
  // Another session is untouched by the overflow and carries on.
  SessionInfo other = Create(*e, c);
  Tensor x = Randn(DType::kFloat32, {1, 3, 512});
  auto r = Unwrap(StepSync(*e, MakeStep(other.id, 0, x)));
  ForwardArgs args;
  args.x = x;
  auto stack = Unwrap(MqaStack::Create(SlowModel().options, 1));
  EXPECT_LT(RelativeError(Floats(r.out), Floats(Unwrap(stack->layer(0).Forward(args)).out)), 1e-5);
}

TEST(Engine, DrainingRefusesNewSessionsButServesOldOnes) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  e->StopAcceptingSessions();
  SessionConfig c;
  c.model = "small";
  EXPECT_EQ(e->CreateSession(c).status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64}))).ok());
  EXPECT_TRUE(e->WaitIdle(Clock::now() + std::chrono::seconds(5)));
}

TEST(Engine, NaNInOneSessionLeavesAnotherUntouched) {
  auto e = MakeEngine();
  SessionInfo a = Create(*e), b = Create(*e);
  Tensor xb = Randn(DType::kFloat32, {1, 3, 64});
  auto alone = Floats(Unwrap(StepSync(*e, MakeStep(b.id, 0, xb))).out);
  SessionInfo b2 = Create(*e);
  std::vector<float> nan(3 * 64, std::nanf(""));
  ASSERT_TRUE(StepSync(*e, MakeStep(a.id, 0, Unwrap(Tensor::FromFloats(DType::kFloat32, {1, 3, 64}, nan)))).ok());
  auto after = Floats(Unwrap(StepSync(*e, MakeStep(b2.id, 0, xb))).out);
  EXPECT_EQ(after, alone);
}

TEST(Engine, StatelessForwardReturnsTheCacheInTheCallersDtype) {
  auto e = MakeEngine();
  ForwardRequest f;
  f.model = "small";
  f.layer = 0;
  f.args.x = Randn(DType::kFloat16, {2, 3, 64});
  f.args.past_key_value = KvCache{};
  std::promise<StatusOr<ForwardResult>> p;
  e->SubmitForward(f, [&](StatusOr<ForwardResult> r) { p.set_value(std::move(r)); });
  auto r = Unwrap(p.get_future().get());
  EXPECT_EQ(r.out.dtype(), DType::kFloat16);
  ASSERT_TRUE(r.cache.has_value());
  EXPECT_EQ(r.cache->k.shape(), (std::vector<int64_t>{2, 1, 16, 3}));
  EXPECT_EQ(r.cache->v.dtype(), DType::kFloat16);
}

// The running gauge drops a request before its reply goes out: a caller holding its reply (and a scrape after it)
// never sees it still counted. Read from inside the callbacks, on the worker thread, after the pass.
TEST(Engine, ARepliedRequestIsNoLongerCountedAsRunning) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  std::promise<size_t> step_running, forward_running, refused_running;
  e->SubmitStep(MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 5, 64})), [&](StatusOr<StepResult> r) {
    EXPECT_TRUE(r.ok()) << r.status().message();
    step_running.set_value(e->stats().running);
  });
  EXPECT_EQ(step_running.get_future().get(), 0u);
  StepRequest wrong = MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 1, 64}));
  wrong.position = 0;  // the layer holds 5 tokens: refused in the pass, before computing
  e->SubmitStep(std::move(wrong), [&](StatusOr<StepResult> r) {
    EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
    refused_running.set_value(e->stats().running);
  });
  EXPECT_EQ(refused_running.get_future().get(), 0u);
  ForwardRequest f;
  f.model = "small";
  f.args.x = Randn(DType::kFloat32, {1, 3, 64});
  e->SubmitForward(f, [&](StatusOr<ForwardResult> r) {
    EXPECT_TRUE(r.ok()) << r.status().message();
    forward_running.set_value(e->stats().running);
  });
  EXPECT_EQ(forward_running.get_future().get(), 0u);
  EXPECT_EQ(e->stats().running, 0u);
}

// WaitIdle waits for the callbacks too: the running gauge drops a request before its reply, but a drain that
// returns while a reply is still being delivered would cut it off.
TEST(Engine, WaitIdleWaitsForCallbacksToReturn) {
  auto e = MakeEngine();
  SessionInfo s = Create(*e);
  std::atomic<bool> started{false}, finished{false};
  e->SubmitStep(MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 2, 64})), [&](StatusOr<StepResult> r) {
    EXPECT_TRUE(r.ok()) << r.status().message();
    started = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    finished = true;
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(e->stats().running, 0u);  // its reply is out
  ASSERT_TRUE(e->WaitIdle(Clock::now() + std::chrono::seconds(10)));
  EXPECT_TRUE(finished.load());
}

// ---- Paged KV cache and continuous batching ----
namespace batching {

EngineOptions Options(int64_t max_batch_sessions, int64_t kv_budget_bytes = 0) {
  EngineOptions o;
  o.models.push_back(SmallModel("small", 2, 256));
  o.batching.max_batch_sessions = max_batch_sessions;
  o.batching.max_prefill_chunk = 8;  // small, so prefills run in several chunks between decode steps
  o.kv_cache.block_size = 4;
  if (kv_budget_bytes > 0) o.kv_cache.budget_bytes = kv_budget_bytes;
  return o;
}

// Per-token bytes of SmallModel's KV: 2 layers x (k + v) x head_dim 16 x fp32.
constexpr int64_t kBlockBytes = 2 * 2 * 4 * 16 * 4;  // one block of 4 tokens

// Drives n sessions through a mixed schedule (prefills of different lengths, then decode tokens), submitting
// every session's next step at once so that they queue together. Returns each session's outputs per layer.
std::vector<std::vector<float>> RunSchedule(Engine& e, const std::vector<std::vector<Tensor>>& inputs, int layers) {
  const size_t n = inputs.size();
  std::vector<SessionInfo> sessions;
  for (size_t i = 0; i < n; ++i) sessions.push_back(Create(e));
  std::vector<std::vector<float>> outs(n * static_cast<size_t>(layers));
  for (size_t t = 0; t < inputs[0].size(); ++t) {
    for (int layer = 0; layer < layers; ++layer) {
      std::vector<std::promise<StatusOr<StepResult>>> done(n);
      for (size_t i = 0; i < n; ++i) {
        e.SubmitStep(MakeStep(sessions[i].id, layer, inputs[i][t]),
                     [&done, i](StatusOr<StepResult> r) { done[i].set_value(std::move(r)); });
      }
      for (size_t i = 0; i < n; ++i) {
        auto r = Unwrap(done[i].get_future().get(), "step");
        auto v = Floats(r.out);
        auto& o = outs[i * static_cast<size_t>(layers) + static_cast<size_t>(layer)];
        o.insert(o.end(), v.begin(), v.end());
      }
    }
  }
  for (auto& s : sessions) EXPECT_TRUE(e.CloseSession(s.id).ok());
  return outs;
}

// One session's chunks as one [1, S, 64] fp32 tensor (for a full pass of the layer).
Tensor Concat(const std::vector<Tensor>& chunks) {
  std::vector<float> all;
  for (const auto& x : chunks) {
    auto v = Floats(x);
    all.insert(all.end(), v.begin(), v.end());
  }
  return Unwrap(Tensor::FromFloats(DType::kFloat32, {1, static_cast<int64_t>(all.size() / 64), 64}, all));
}

std::vector<std::vector<Tensor>> MixedInputs(size_t n) {
  std::vector<std::vector<Tensor>> in(n);
  for (size_t i = 0; i < n; ++i) {
    in[i].push_back(Randn(DType::kFloat32, {1, static_cast<int64_t>(1 + 7 * i % 23), 64}));  // prefill 1..23
    for (int t = 0; t < 6; ++t) in[i].push_back(Randn(DType::kFloat32, {1, 1, 64}));
  }
  return in;
}

TEST(Batching, BatchedEqualsSoloAndEqualsTheLayer) {
  auto inputs = MixedInputs(12);
  auto batched_engine = MakeEngine(Options(64));
  auto batched = RunSchedule(*batched_engine, inputs, 2);
  EngineStats st = batched_engine->stats();
  EXPECT_LT(st.batches, st.batched_steps);  // steps really shared passes
  auto solo_engine = MakeEngine(Options(1));
  auto solo = RunSchedule(*solo_engine, inputs, 2);
  EXPECT_EQ(solo_engine->stats().batches, solo_engine->stats().batched_steps);  // one step (chunk) per pass
  auto stack = Unwrap(MqaStack::Create(SmallModel().options, 2));
  for (size_t i = 0; i < inputs.size(); ++i) {
    ForwardArgs args;
    args.x = Concat(inputs[i]);
    for (int layer = 0; layer < 2; ++layer) {
      const size_t k = i * 2 + static_cast<size_t>(layer);
      EXPECT_LT(RelativeError(batched[k], solo[k]), 1e-6) << "session " << i << " layer " << layer;
      EXPECT_LT(RelativeError(batched[k], Floats(Unwrap(stack->layer(layer).Forward(args)).out)), 1e-5)
          << "session " << i << " layer " << layer;
    }
  }
  EXPECT_EQ(batched_engine->stats().kv_blocks_used, 0);  // every block came back
}

TEST(Batching, BatchedEqualsSoloOnCudaInBf16) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  auto cuda_options = [](int64_t max_batch_sessions) {
    EngineOptions o = Options(max_batch_sessions);
    o.models[0].options.device = "cuda";
    o.models[0].options.dtype = DType::kBFloat16;
    o.kv_cache.budget_bytes = int64_t{64} << 20;
    return o;
  };
  auto inputs = MixedInputs(12);
  auto batched_engine = MakeEngine(cuda_options(64));
  auto batched = RunSchedule(*batched_engine, inputs, 2);
  EXPECT_LT(batched_engine->stats().batches, batched_engine->stats().batched_steps);
  auto solo_engine = MakeEngine(cuda_options(1));
  auto solo = RunSchedule(*solo_engine, inputs, 2);
  MqaOptions ref = SmallModel().options;  // the same weights in fp32 on the CPU: the reference
  auto stack = Unwrap(MqaStack::Create(ref, 2));
  for (size_t i = 0; i < inputs.size(); ++i) {
    ForwardArgs args;
    args.x = Concat(inputs[i]);
    for (int layer = 0; layer < 2; ++layer) {
      const size_t k = i * 2 + static_cast<size_t>(layer);
      auto want = Floats(Unwrap(stack->layer(layer).Forward(args)).out);
      EXPECT_LT(RelativeError(batched[k], want), 2e-2) << "session " << i << " layer " << layer;
      EXPECT_LT(RelativeError(solo[k], want), 2e-2) << "session " << i << " layer " << layer;
      EXPECT_LT(RelativeError(batched[k], solo[k]), 2e-2) << "session " << i << " layer " << layer;
    }
  }
}

TEST(Batching, NaNInOneSessionOfAPassLeavesTheOthersBitForBit) {
  auto run = [](bool poison) {
    // Every pass waits for all three steps, so both runs have the same pass compositions (row counts change
    // GEMM blocking, hence the last bits).
    EngineOptions o = Options(3);
    o.batching.max_queue_delay = std::chrono::seconds(5);
    auto e = MakeEngine(std::move(o));
    std::vector<SessionInfo> s = {Create(*e), Create(*e), Create(*e)};
    // Same inputs every run (fixed seeds), so the two runs differ only in session 0's values.
    std::vector<std::vector<float>> outs(3);
    for (int t = 0; t < 5; ++t) {
      std::vector<std::promise<StatusOr<StepResult>>> done(3);
      for (size_t i = 0; i < 3; ++i) {
        Tensor x = Unwrap(Tensor::Randn(DType::kFloat32, {1, t == 0 ? 5 : 1, 64}, 100 * t + i));
        if (poison && i == 0) {
          std::vector<float> nan(static_cast<size_t>(x.numel()), std::nanf(""));
          x = Unwrap(Tensor::FromFloats(DType::kFloat32, x.shape(), nan));
        }
        e->SubmitStep(MakeStep(s[i].id, 0, x), [&done, i](StatusOr<StepResult> r) { done[i].set_value(std::move(r)); });
      }
      for (size_t i = 0; i < 3; ++i) {
        auto v = Floats(Unwrap(done[i].get_future().get()).out);
        outs[i].insert(outs[i].end(), v.begin(), v.end());
      }
    }
    return outs;
  };
  auto clean = run(false);
  auto poisoned = run(true);
  EXPECT_TRUE(::mqa::testing::HasNaN(poisoned[0]));
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_FALSE(::mqa::testing::HasNaN(poisoned[i]));
    EXPECT_EQ(poisoned[i], clean[i]) << "session " << i;
  }
}

TEST(Batching, BudgetTooSmallForOneSessionIsRefusedAtStart) {
  // 256 tokens need 64 blocks of 4; give room for 10 (+ the reserved block).
  auto refused = Engine::Create(Options(64, 11 * kBlockBytes));
  ASSERT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("fewer than the 64 one session of max_tokens_per_session 256 needs"),
            std::string::npos)
      << refused.status().message();
}

TEST(Batching, ExhaustionRefusesNewGuaranteedSessionsAndGrowingStepsOnly) {
  auto e = MakeEngine(Options(64, 65 * kBlockBytes));  // 64 usable blocks = 256 tokens
  SessionConfig guaranteed;
  guaranteed.model = "small";
  guaranteed.admission = Admission::kGuaranteed;
  guaranteed.max_tokens = 200;  // 50 blocks reserved up front
  SessionInfo g = Create(*e, guaranteed);
  EXPECT_EQ(e->stats().kv_blocks_used, 50);
  auto second = e->CreateSession(guaranteed);
  ASSERT_EQ(second.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(second.status().message().find("guaranteed session of 200 tokens"), std::string::npos);

  SessionInfo a = Create(*e), b = Create(*e);                                              // best effort: no blocks yet
  ASSERT_TRUE(StepSync(*e, MakeStep(a.id, 0, Randn(DType::kFloat32, {1, 40, 64}))).ok());  // 10 blocks
  auto b_before = StepSync(*e, MakeStep(b.id, 0, Randn(DType::kFloat32, {1, 8, 64})));     // 2 blocks
  ASSERT_TRUE(b_before.ok());
  auto grow = StepSync(*e, MakeStep(b.id, 0, Randn(DType::kFloat32, {1, 12, 64})));  // needs 3 more: 2 free
  ASSERT_EQ(grow.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(grow.status().message().find("is unchanged: retry"), std::string::npos) << grow.status().message();
  EXPECT_EQ(Unwrap(e->GetSession(b.id)).layer_positions[0], 8);
  // The guaranteed session never runs short, whatever the others do.
  ASSERT_TRUE(StepSync(*e, MakeStep(g.id, 1, Randn(DType::kFloat32, {1, 200, 64}))).ok());
  // Closing a frees its blocks; b's retry then succeeds and continues where it was.
  ASSERT_TRUE(e->CloseSession(a.id).ok());
  auto retry = StepSync(*e, MakeStep(b.id, 0, Randn(DType::kFloat32, {1, 12, 64})));
  ASSERT_TRUE(retry.ok()) << retry.status().ToString();
  EXPECT_EQ(retry->position, 8);
  EXPECT_GE(e->stats().kv_exhausted, 2u);
  ASSERT_TRUE(e->CloseSession(b.id).ok());
  ASSERT_TRUE(e->CloseSession(g.id).ok());
  EXPECT_EQ(e->stats().kv_blocks_used, 0);
}

TEST(Batching, TtlExpiryReturnsBlocks) {
  EngineOptions o = Options(64);
  o.reap_interval = std::chrono::milliseconds(10);
  auto e = MakeEngine(std::move(o));
  SessionConfig c;
  c.model = "small";
  c.idle_ttl = std::chrono::milliseconds(50);
  SessionInfo s = Create(*e, c);
  ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 30, 64}))).ok());
  EXPECT_EQ(e->stats().kv_blocks_used, 8);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(e->stats().kv_blocks_used, 0);
  EXPECT_EQ(e->stats().sessions_expired, 1u);
}

}  // namespace batching

// ---- Several devices: one replica of a model per device, sessions placed by free KV blocks ----
namespace multi_device {

using batching::Concat;
using batching::kBlockBytes;
using batching::MixedInputs;

TEST(Devices, AllCudaDevicesListsWhatTorchSees) {
  const std::vector<std::string> all = AllCudaDevices();
  ASSERT_EQ(all.size(), CudaAvailable() ? static_cast<size_t>(CudaDeviceCount()) : 0u);
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i], "cuda:" + std::to_string(i));
  EXPECT_EQ(NormaliseDevice("cuda"), "cuda:0");
  EXPECT_EQ(NormaliseDevice("cuda:1"), "cuda:1");
  EXPECT_EQ(NormaliseDevice("cpu"), "cpu");
}

TEST(Replicas, ADeviceListedTwiceIsRefused) {
  for (const auto& [devices, says] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"cpu", "cpu"}, "device cpu is listed twice"},
           // Refused before any device is touched, so this holds without a GPU too.
           {{"cuda", "cuda:1", "cuda:0"}, "device cuda:0 is listed twice (\"cuda\" means \"cuda:0\")"}}) {
    EngineOptions o;
    o.models.push_back(SmallModel());
    o.models[0].devices = devices;
    auto e = Engine::Create(std::move(o));
    ASSERT_EQ(e.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(e.status().message().find("model \"small\": " + says), std::string::npos) << e.status().message();
  }
}

TEST(Replicas, AMissingDeviceIsUnavailableAndNamed) {
  EngineOptions o;
  o.models.push_back(SmallModel());
  o.models[0].devices = {"cpu", "cuda:99"};
  auto e = Engine::Create(std::move(o));
  ASSERT_EQ(e.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(e.status().message().find("model \"small\": replica on cuda:99: "), std::string::npos)
      << e.status().message();
}

TEST(Replicas, OneListedDeviceReplacesOptionsDeviceAndIsReported) {
  EngineOptions o = batching::Options(64, 65 * kBlockBytes);
  o.models[0].options.device = "cuda:99";  // ignored: devices is set
  o.models[0].devices = {"cpu"};
  auto e = MakeEngine(std::move(o));
  ModelInfo m = Unwrap(e->GetModel("small"));
  EXPECT_EQ(m.devices, (std::vector<std::string>{"cpu"}));
  EXPECT_EQ(m.options.device, "cpu");
  SessionInfo s = Create(*e);
  EXPECT_EQ(s.device, "cpu");
  ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, 10, 64}))).ok());
  EXPECT_EQ(Unwrap(e->GetSession(s.id)).device, "cpu");
  EngineStats st = e->stats();
  ASSERT_EQ(st.devices.size(), 1u);
  EXPECT_EQ(st.devices[0].device, "cpu");
  EXPECT_EQ(st.devices[0].kv_blocks_total, 64);
  EXPECT_EQ(st.devices[0].kv_blocks_used, 3);
  EXPECT_EQ(st.devices[0].kv_blocks_free, 61);
  EXPECT_EQ(st.devices[0].sessions_open, 1u);
  EXPECT_EQ(st.devices[0].queue_depth, 0u);
  EXPECT_EQ(st.kv_blocks_used, 3);
  ASSERT_TRUE(e->CloseSession(s.id).ok());
  st = e->stats();
  EXPECT_EQ(st.devices[0].kv_blocks_used, 0);
  EXPECT_EQ(st.devices[0].sessions_open, 0u);
}

TEST(Replicas, TwoModelsOnOneDeviceSplitItsBudgetAndItsStats) {
  EngineOptions o = batching::Options(64, 130 * kBlockBytes);
  o.models.push_back(SmallModel("other", 2, 256));
  auto e = MakeEngine(std::move(o));
  EngineStats st = e->stats();
  ASSERT_EQ(st.devices.size(), 1u);
  EXPECT_EQ(st.devices[0].kv_blocks_total, 2 * 64);  // 65 blocks each (one reserved): half the budget
  EXPECT_EQ(st.kv_blocks_total, 2 * 64);
}

// The rest needs GPUs: two for the replicas on cuda:0 and cuda:1, one for a CPU + GPU model.
bool HasCudaDevices(int n) { return CudaAvailable() && CudaDeviceCount() >= n; }

// SmallModel in fp32 (so the CPU reference holds to 1e-4), blocks of 4 tokens, 64 usable blocks per device.
EngineOptions ReplicatedOptions(std::vector<std::string> devices, int64_t blocks_per_device = 64) {
  EngineOptions o = batching::Options(64, (blocks_per_device + 1) * kBlockBytes);
  o.models[0].devices = std::move(devices);
  return o;
}

const DeviceStats& On(const EngineStats& st, const std::string& device) {
  for (const DeviceStats& d : st.devices) {
    if (d.device == device) return d;
  }
  ADD_FAILURE() << "no stats for " << device;
  static const DeviceStats none;
  return none;
}

TEST(MultiDevice, PlacementFollowsFreeBlocksAndClosingFreesTheRightDevice) {
  if (!HasCudaDevices(2)) GTEST_SKIP() << "needs two CUDA devices, found " << CudaDeviceCount();
  auto e = MakeEngine(ReplicatedOptions({"cuda", "cuda:1"}));
  ModelInfo m = Unwrap(e->GetModel("small"));
  EXPECT_EQ(m.devices, (std::vector<std::string>{"cuda:0", "cuda:1"}));  // "cuda" normalised
  EXPECT_EQ(m.options.device, "cuda:0");
  auto step = [&](const SessionInfo& s, int64_t tokens) {
    ASSERT_TRUE(StepSync(*e, MakeStep(s.id, 0, Randn(DType::kFloat32, {1, tokens, 64}))).ok());
  };
  // Equal free blocks and sessions: the lower device; then the one with fewer sessions.
  SessionInfo a = Create(*e);
  EXPECT_EQ(a.device, "cuda:0");
  SessionInfo b = Create(*e);
  EXPECT_EQ(b.device, "cuda:1");
  // a's long prefill takes 10 of cuda:0's blocks: new sessions go to cuda:1 even as its session count grows.
  step(a, 40);
  SessionInfo c = Create(*e), d = Create(*e);
  EXPECT_EQ(c.device, "cuda:1");
  EXPECT_EQ(d.device, "cuda:1");
  // Prefills on cuda:1's three sessions take 15 blocks there: 49 free against cuda:0's 54.
  step(b, 20);
  step(c, 20);
  step(d, 20);
  SessionInfo f = Create(*e);
  EXPECT_EQ(f.device, "cuda:0");
  EXPECT_EQ(Unwrap(e->GetSession(c.id)).device, "cuda:1");
  EngineStats st = e->stats();
  ASSERT_EQ(st.devices.size(), 2u);
  EXPECT_EQ(st.devices[0].device, "cuda:0");
  EXPECT_EQ(st.devices[1].device, "cuda:1");
  EXPECT_EQ(On(st, "cuda:0").kv_blocks_used, 10);
  EXPECT_EQ(On(st, "cuda:1").kv_blocks_used, 15);
  EXPECT_EQ(On(st, "cuda:0").sessions_open, 2u);
  EXPECT_EQ(On(st, "cuda:1").sessions_open, 3u);
  EXPECT_EQ(st.kv_blocks_total, 128);
  EXPECT_EQ(st.kv_blocks_used, 25);
  EXPECT_EQ(st.sessions_open, 5u);

  // Closing b and c frees their blocks on cuda:1 only.
  ASSERT_TRUE(e->CloseSession(b.id).ok());
  ASSERT_TRUE(e->CloseSession(c.id).ok());
  st = e->stats();
  EXPECT_EQ(On(st, "cuda:0").kv_blocks_used, 10);
  EXPECT_EQ(On(st, "cuda:1").kv_blocks_used, 5);
  EXPECT_EQ(On(st, "cuda:1").sessions_open, 1u);

  // Guaranteed sessions reserve on the device with the most free blocks: cuda:1 (59 free), then cuda:0 (54);
  // a third fits on neither.
  SessionConfig guaranteed;
  guaranteed.model = "small";
  guaranteed.admission = Admission::kGuaranteed;
  guaranteed.max_tokens = 200;  // 50 blocks
  SessionInfo g1 = Create(*e, guaranteed);
  EXPECT_EQ(g1.device, "cuda:1");
  SessionInfo g2 = Create(*e, guaranteed);
  EXPECT_EQ(g2.device, "cuda:0");
  auto refused = e->CreateSession(guaranteed);
  ASSERT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  // Tried in placement order: cuda:1 (9 free), then cuda:0 (4 free).
  EXPECT_NE(refused.status().message().find("no device of model small has the blocks (cuda:1: KV cache full: 50"),
            std::string::npos)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find("; cuda:0: KV cache full: 50"), std::string::npos);
  EXPECT_NE(refused.status().message().find("guaranteed session of 200 tokens"), std::string::npos);
  st = e->stats();
  EXPECT_EQ(On(st, "cuda:0").kv_blocks_used, 60);
  EXPECT_EQ(On(st, "cuda:1").kv_blocks_used, 55);
  EXPECT_GE(st.kv_exhausted, 1u);
  // The guaranteed session steps on its own device and never runs short.
  step(g1, 200);
  EXPECT_EQ(Unwrap(e->GetSession(g1.id)).layer_positions[0], 200);

  for (const SessionInfo& s : {a, d, f, g1, g2}) ASSERT_TRUE(e->CloseSession(s.id).ok());
  st = e->stats();
  EXPECT_EQ(On(st, "cuda:0").kv_blocks_used, 0);
  EXPECT_EQ(On(st, "cuda:1").kv_blocks_used, 0);
  EXPECT_EQ(On(st, "cuda:0").sessions_open + On(st, "cuda:1").sessions_open, 0u);
}

// Runs every session through a prefill then decode steps on both layers, all sessions' steps submitted together
// (so both devices' workers run at once), and checks each session against one full pass of the same layer on
// its own device and on the CPU.
void CheckSessionsMatchTheLayer(const std::vector<std::string>& devices, size_t n) {
  auto e = MakeEngine(ReplicatedOptions(devices, 256));
  auto inputs = MixedInputs(n);
  std::vector<SessionInfo> sessions;
  std::map<std::string, int> per_device;
  for (size_t i = 0; i < n; ++i) {
    sessions.push_back(Create(*e));
    ++per_device[sessions.back().device];
  }
  ASSERT_EQ(per_device.size(), devices.size()) << "every device gets sessions";
  for (const auto& [device, count] : per_device) EXPECT_EQ(count, static_cast<int>(n / devices.size())) << device;
  std::vector<std::vector<float>> outs(n * 2);
  for (size_t t = 0; t < inputs[0].size(); ++t) {
    for (int layer = 0; layer < 2; ++layer) {
      std::vector<std::promise<StatusOr<StepResult>>> done(n);
      for (size_t i = 0; i < n; ++i) {
        auto req = MakeStep(sessions[i].id, layer, inputs[i][t]);
        req.position = Unwrap(e->GetSession(sessions[i].id)).layer_positions[static_cast<size_t>(layer)];
        e->SubmitStep(std::move(req), [&done, i](StatusOr<StepResult> r) { done[i].set_value(std::move(r)); });
      }
      for (size_t i = 0; i < n; ++i) {
        auto v = Floats(Unwrap(done[i].get_future().get(), "step").out);
        auto& o = outs[i * 2 + static_cast<size_t>(layer)];
        o.insert(o.end(), v.begin(), v.end());
      }
    }
  }
  EXPECT_GT(e->stats().batched_steps, e->stats().batches);     // sessions of a device shared passes
  std::map<std::string, std::unique_ptr<MqaStack>> reference;  // same seed: the replicas' weights
  for (const std::string& d : std::vector<std::string>{"cpu", devices[0], devices[1]}) {
    if (reference.count(d)) continue;
    MqaOptions ro = SmallModel().options;
    ro.device = d;
    reference[d] = Unwrap(MqaStack::Create(ro, 2));
  }
  for (size_t i = 0; i < n; ++i) {
    const std::string& d = sessions[i].device;
    Tensor x = Concat(inputs[i]);
    for (int layer = 0; layer < 2; ++layer) {
      const auto& got = outs[i * 2 + static_cast<size_t>(layer)];
      ForwardArgs on_device;
      on_device.x = Unwrap(x.To(d));
      EXPECT_LT(RelativeError(got, Floats(Unwrap(reference[d]->layer(layer).Forward(on_device)).out)), 1e-4)
          << "session " << i << " on " << d << ", layer " << layer;
      ForwardArgs on_cpu;
      on_cpu.x = x;
      EXPECT_LT(RelativeError(got, Floats(Unwrap(reference["cpu"]->layer(layer).Forward(on_cpu)).out)), 1e-4)
          << "session " << i << " on " << d << ", layer " << layer << " (CPU reference)";
    }
  }
  // Stateless forwards go to either replica and agree with the layer too.
  for (int k = 0; k < 4; ++k) {
    ForwardRequest f;
    f.model = "small";
    f.layer = 1;
    f.args.x = Randn(DType::kFloat32, {2, 5, 64});
    std::promise<StatusOr<ForwardResult>> p;
    e->SubmitForward(f, [&](StatusOr<ForwardResult> r) { p.set_value(std::move(r)); });
    ForwardArgs args;
    args.x = f.args.x;
    EXPECT_LT(RelativeError(Floats(Unwrap(p.get_future().get()).out),
                            Floats(Unwrap(reference["cpu"]->layer(1).Forward(args)).out)),
              1e-4);
  }
  for (const SessionInfo& s : sessions) ASSERT_TRUE(e->CloseSession(s.id).ok());
  EngineStats st = e->stats();
  EXPECT_EQ(st.kv_blocks_used, 0);
  for (const DeviceStats& d : st.devices) EXPECT_EQ(d.kv_blocks_used, 0) << d.device;
}

TEST(MultiDevice, EverySessionMatchesTheSingleDeviceLayer) {
  if (!HasCudaDevices(2)) GTEST_SKIP() << "needs two CUDA devices, found " << CudaDeviceCount();
  CheckSessionsMatchTheLayer({"cuda:0", "cuda:1"}, 16);
}

TEST(MultiDevice, CpuAndCudaReplicasServeOneModel) {
  if (!HasCudaDevices(1)) GTEST_SKIP() << "needs a CUDA device";
  CheckSessionsMatchTheLayer({"cpu", "cuda:0"}, 6);
}

}  // namespace multi_device
}  // namespace
}  // namespace mqa::core
