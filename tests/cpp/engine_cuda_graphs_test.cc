// The engine's decode passes through CUDA graphs: several layers and several models on one device capture and
// replay, and so does an engine made after another one was destroyed (the allocator's graph pool outlives every
// graph on it). Skipped without a CUDA device.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "engine_test_util.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Floats;
using ::mqa::testing::Randn;

ModelConfig GraphModel(const std::string& name, int64_t dim, int64_t heads) {
  ModelConfig m = SmallModel(name, /*layers=*/4, /*max_tokens=*/512);
  m.options.dim = dim;
  m.options.heads = heads;
  m.options.device = "cuda";
  m.options.dtype = DType::kBFloat16;
  m.options.attn_impl = AttnImpl::kTriton;
  return m;
}

EngineOptions GraphOptions(std::vector<ModelConfig> models) {
  EngineOptions o;
  o.models = std::move(models);
  o.kv_cache.budget_bytes = int64_t{256} << 20;
  return o;
}

const ExecutionStats& StatsOf(const EngineStats& st, const std::string& model) {
  for (const ExecutionStats& e : st.execution) {
    if (e.model == model) return e;
  }
  ADD_FAILURE() << "no execution stats for model " << model;
  static const ExecutionStats kNone;
  return kNone;
}

// One session of `model`: a prefill step per layer, then `decode` steps through every layer, one at a time, so
// that every pass is one step: 4 prefill passes and 4 * decode decode passes. Every output is finite.
void Drive(Engine& e, const ModelConfig& model, int decode) {
  SessionConfig c;
  c.model = model.name;
  const SessionInfo s = Unwrap(e.CreateSession(c), "CreateSession");
  const int64_t dim = model.options.dim;
  for (int layer = 0; layer < model.num_layers; ++layer) {
    auto r = StepSync(e, MakeStep(s.id, layer, Randn(DType::kBFloat16, {1, 40, dim})));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
  }
  for (int t = 0; t < decode; ++t) {
    for (int layer = 0; layer < model.num_layers; ++layer) {
      auto r = StepSync(e, MakeStep(s.id, layer, Randn(DType::kBFloat16, {1, 1, dim})));
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      for (float v : Floats(r->out)) ASSERT_TRUE(std::isfinite(v)) << "model " << model.name << " layer " << layer;
    }
  }
}

// Every decode pass of the model went through a graph: captured (the first of its shape per layer) or replayed.
void ExpectGraphs(const Engine& e, const ModelConfig& model, int decode) {
  const ExecutionStats& st = StatsOf(e.stats(), model.name);
  const uint64_t decode_passes = static_cast<uint64_t>(decode * model.num_layers);
  EXPECT_EQ(st.graph_failures, 0u) << model.name;
  EXPECT_EQ(st.paged_passes, decode_passes + static_cast<uint64_t>(model.num_layers)) << model.name;
  EXPECT_GE(st.graph_captures, static_cast<uint64_t>(model.num_layers)) << model.name;  // one per layer at least
  EXPECT_EQ(st.graph_captures + st.graph_replays, decode_passes) << model.name;
  EXPECT_GT(st.graph_replays, st.graph_captures) << model.name;
}

TEST(EngineCudaGraphs, SeveralLayersAndModelsCaptureAndReplay) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  constexpr int kDecode = 12;
  const ModelConfig a = GraphModel("a", 256, 4), b = GraphModel("b", 512, 8);
  auto e = MakeEngine(GraphOptions({a, b}));
  Drive(*e, a, kDecode);
  Drive(*e, b, kDecode);
  ExpectGraphs(*e, a, kDecode);
  ExpectGraphs(*e, b, kDecode);
}

// An engine destroyed takes its graphs with it; the next one on the device captures into the same pool.
TEST(EngineCudaGraphs, AnEngineAfterAnotherStillCaptures) {
  if (!CudaAvailable()) GTEST_SKIP() << "no CUDA device";
  constexpr int kDecode = 6;
  const ModelConfig m = GraphModel("m", 256, 4);
  for (int round = 0; round < 3; ++round) {
    auto e = MakeEngine(GraphOptions({m}));
    Drive(*e, m, kDecode);
    ExpectGraphs(*e, m, kDecode);
  }
}

}  // namespace
}  // namespace mqa::core
