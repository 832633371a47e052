// Overlapped passes on CUDA: the worker launches a pass while the one before is still on the device (its outputs
// on their way back into pinned memory), and completes that one afterwards. Passes of two layers that share the
// graphs' static buffers run back to back this way, so this checks that every answer is still the layer's own:
// each session's outputs against the stateless layer over the session's whole input. Skipped without CUDA.
#include <gtest/gtest.h>

#include <future>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "engine_test_util.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Floats;
using ::mqa::testing::RelativeError;

// dim 4096 in bf16: the passes' copies are large enough (a few hundred KiB) that they are still under way when
// the next pass is launched.
ModelConfig WideModel() {
  ModelConfig m = SmallModel("wide", /*layers=*/2, /*max_tokens=*/64);
  m.options.dim = 4096;
  m.options.heads = 32;
  m.options.device = "cuda";
  m.options.dtype = DType::kBFloat16;
  m.options.attn_impl = AttnImpl::kTriton;
  return m;
}

std::vector<float> Normal(size_t n, std::mt19937* rng) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(*rng);
  return v;
}

// Submits the requests as one batch and waits for every answer.
std::vector<StatusOr<StepResult>> Batch(Engine& e, std::vector<StepRequest> requests) {
  auto done = std::make_shared<std::promise<std::vector<StatusOr<StepResult>>>>();
  auto f = done->get_future();
  e.SubmitSteps(std::move(requests), [done](std::vector<StatusOr<StepResult>> r) { done->set_value(std::move(r)); });
  return f.get();
}

TEST(EngineOverlap, PassesOfTwoLayersOverlapAndEveryAnswerIsTheLayers) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  constexpr int kSessions = 48, kLayers = 2, kDecode = 6;
  const ModelConfig model = WideModel();
  const int64_t dim = model.options.dim;
  EngineOptions o;
  o.models = {model};
  o.kv_cache.budget_bytes = int64_t{256} << 20;
  auto e = MakeEngine(std::move(o));
  std::mt19937 rng(11);
  std::vector<SessionInfo> sessions;
  SessionConfig config;
  config.model = model.name;
  for (int i = 0; i < kSessions; ++i) sessions.push_back(Create(*e, config));
  // inputs[i][l]: every row session i's layer l was given, in order (bf16-rounded by the tensor it went in).
  std::vector<std::vector<std::vector<float>>> inputs(kSessions, std::vector<std::vector<float>>(kLayers));
  std::vector<std::vector<std::vector<float>>> outputs = inputs;
  auto step = [&](int i, int layer, int64_t tokens) {
    std::vector<float> x = Normal(static_cast<size_t>(tokens * dim), &rng);
    Tensor t = Unwrap(Tensor::FromFloats(DType::kBFloat16, {1, tokens, dim}, x));
    std::vector<float> rounded = Floats(t);
    inputs[i][layer].insert(inputs[i][layer].end(), rounded.begin(), rounded.end());
    return MakeStep(sessions[static_cast<size_t>(i)].id, layer, std::move(t));
  };
  auto record = [&](const std::vector<StatusOr<StepResult>>& answers, const std::vector<std::pair<int, int>>& who) {
    ASSERT_EQ(answers.size(), who.size());
    for (size_t k = 0; k < answers.size(); ++k) {
      ASSERT_TRUE(answers[k].ok()) << answers[k].status().ToString();
      std::vector<float> y = Floats(answers[k]->out);
      auto& out = outputs[who[k].first][who[k].second];
      out.insert(out.end(), y.begin(), y.end());
    }
  };
  // Prefills of different lengths (block tables of different widths), then decode tokens: each round one batch
  // of every session's step at both layers, so the layer-1 pass is launched while the layer-0 pass runs.
  for (int round = -1; round < kDecode; ++round) {
    std::vector<StepRequest> requests;
    std::vector<std::pair<int, int>> who;
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int i = 0; i < kSessions; ++i) {
        requests.push_back(step(i, layer, round < 0 ? 3 + i % 29 : 1));
        who.emplace_back(i, layer);
      }
    }
    record(Batch(*e, std::move(requests)), who);
  }
  const EngineStats st = e->stats();
  EXPECT_GT(st.passes_overlapped, 0u) << "no pass was launched behind another";
  ASSERT_EQ(st.execution.size(), 1u);
  EXPECT_EQ(st.execution[0].graph_failures, 0u);
  EXPECT_GT(st.execution[0].graph_replays, 0u);

  auto stack = Unwrap(MqaStack::Create(model.options, kLayers));
  for (int i = 0; i < kSessions; ++i) {
    for (int layer = 0; layer < kLayers; ++layer) {
      const auto& x = inputs[i][layer];
      const int64_t tokens = static_cast<int64_t>(x.size()) / dim;
      ForwardArgs args;
      args.x = Unwrap(Unwrap(Tensor::FromFloats(DType::kBFloat16, {1, tokens, dim}, x)).To("cuda"));
      const std::vector<float> want = Floats(Unwrap(stack->layer(layer).Forward(args)).out);
      EXPECT_LT(RelativeError(outputs[i][layer], want), 2e-2) << "session " << i << " layer " << layer;
    }
  }
}

}  // namespace
}  // namespace mqa::core
