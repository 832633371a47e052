// Helpers shared by the engine tests (engine_test.cc, engine_exactness_test.cc): a small model, engines made
// from options, and synchronous steps.
#ifndef MQA_TESTS_CPP_ENGINE_TEST_UTIL_H_
#define MQA_TESTS_CPP_ENGINE_TEST_UTIL_H_

#include <future>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mqa/core/engine.h"
#include "test_util.h"

namespace mqa::core {

using ::mqa::testing::Unwrap;

inline ModelConfig SmallModel(const std::string& name = "small", int layers = 2, int64_t max_tokens = 256) {
  ModelConfig m;
  m.name = name;
  m.num_layers = layers;
  m.options.dim = 64;
  m.options.heads = 4;
  m.options.seed = 7;
  m.max_tokens_per_session = max_tokens;
  return m;
}

inline std::unique_ptr<Engine> MakeEngine(EngineOptions o) {
  return Unwrap(Engine::Create(std::move(o)), "Engine::Create");
}

inline std::unique_ptr<Engine> MakeEngine(ModelConfig model = SmallModel()) {
  EngineOptions o;
  o.models.push_back(std::move(model));
  return MakeEngine(std::move(o));
}

// Submits a step; its result arrives through the future.
inline std::future<StatusOr<StepResult>> StepAsync(Engine& e, StepRequest req) {
  auto done = std::make_shared<std::promise<StatusOr<StepResult>>>();
  auto f = done->get_future();
  e.SubmitStep(std::move(req), [done](StatusOr<StepResult> r) { done->set_value(std::move(r)); });
  return f;
}

inline StatusOr<StepResult> StepSync(Engine& e, StepRequest req) { return StepAsync(e, std::move(req)).get(); }

inline StepRequest MakeStep(const std::string& id, int layer, Tensor x) {
  StepRequest r;
  r.session_id = id;
  r.layer = layer;
  r.x = std::move(x);
  return r;
}

inline SessionInfo Create(Engine& e, SessionConfig c = {}) {
  if (c.model.empty()) c.model = "small";
  return Unwrap(e.CreateSession(c), "CreateSession");
}

// A model slow enough that work queued behind one long step is still waiting when it is cancelled or its
// deadline passes.
inline ModelConfig SlowModel() {
  ModelConfig m = SmallModel("slow", 1, 4096);
  m.options.dim = 512;
  m.options.heads = 8;
  return m;
}

// Submits a 2048-token step of SlowModel's session `id`, which keeps the worker busy for a while.
inline std::future<StatusOr<StepResult>> OccupyWorker(Engine& e, const std::string& id) {
  return StepAsync(e, MakeStep(id, 0, ::mqa::testing::Randn(DType::kFloat32, {1, 2048, 512})));
}

// Rows [from, to) of a [1, s, dim] tensor's values.
inline std::vector<float> Rows(const std::vector<float>& v, int64_t dim, int64_t from, int64_t to) {
  return std::vector<float>(v.begin() + from * dim, v.begin() + to * dim);
}

}  // namespace mqa::core

#endif  // MQA_TESTS_CPP_ENGINE_TEST_UTIL_H_
