// Compares the C++ layer against expected outputs computed by the references (Zeta's published module, or the
// Python reference of the spec), read from the case files of tests/reference/make_cases.py (format:
// tests/reference/CASES.md). One GoogleTest case per (case file, device, attn_impl), through the layer's Forward;
// cases that are one growing sequence (an empty cache, then calls chained on it, without bias or mask) also run
// as session steps through the engine's paged pass (variants named *_session), one session per batch row.
//
// Usage: mqa_reference_test <cases-dir> [gtest flags]
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/safetensors.h"
#include "test_util.h"

namespace mqa::testing {
namespace {

using core::DType;
using core::Tensor;
using nlohmann::json;

struct Variant {
  std::string device;
  core::AttnImpl impl;
  bool session = false;  // the calls as session steps through the engine (the paged pass), not Forward
};

// The calls are one growing sequence per batch row, as a session sees it: an empty cache first, then calls on
// the returned cache, none with a bias or mask, all of one causality.
bool SessionShaped(const json& calls) {
  if (calls.empty() || calls[0].at("past").get<std::string>() != "empty") return false;
  for (size_t i = 0; i < calls.size(); ++i) {
    const json& c = calls[i];
    if (i > 0 && c.at("past").get<std::string>() != "chain") return false;
    if (c.at("has_bias").get<bool>() || c.at("has_mask").get<bool>()) return false;
    if (c.at("causal").get<bool>() != calls[0].at("causal").get<bool>()) return false;
  }
  return true;
}

core::MqaOptions OptionsFrom(const json& cfg) {
  core::MqaOptions o;
  o.dim = cfg.at("dim").get<int64_t>();
  o.heads = cfg.at("heads").get<int64_t>();
  if (!cfg.at("clip_qkv").is_null()) o.clip_qkv = cfg.at("clip_qkv").get<double>();
  o.qk_ln = cfg.at("qk_ln").get<bool>();
  if (!cfg.at("softmax_scale").is_null()) o.softmax_scale = cfg.at("softmax_scale").get<double>();
  o.norm_type = Unwrap(core::ParseNormType(cfg.at("norm_type").get<std::string>()), "norm_type");
  o.dtype = Unwrap(core::ParseDType(cfg.at("dtype").get<std::string>()), "dtype");
  o.attn_pdrop = cfg.value("attn_pdrop", 0.0);
  return o;
}

Tensor On(const Tensor& t, const std::string& device) { return Unwrap(t.To(device), "To"); }

// Compares got against want: same shape and dtype class, and relative error within tol. NaN never passes,
// except where the case expects NaN rows: then NaN must sit in exactly the same elements.
void ExpectClose(const std::string& what, const Tensor& got, const Tensor& want, double tol, bool nan_rows) {
  ASSERT_TRUE(got.defined()) << what << " missing";
  ASSERT_EQ(got.shape(), want.shape()) << what << " shape";
  const std::vector<float> g = Floats(got), w = Floats(want);
  if (nan_rows) {
    std::vector<float> gf, wf;
    size_t nan_count = 0;
    for (size_t i = 0; i < w.size(); ++i) {
      ASSERT_EQ(std::isnan(g[i]), std::isnan(w[i])) << what << ": NaN pattern differs at element " << i;
      if (std::isnan(w[i])) {
        ++nan_count;
        continue;
      }
      gf.push_back(g[i]);
      wf.push_back(w[i]);
    }
    EXPECT_GT(nan_count, 0u) << what << ": the reference was expected to produce NaN rows";
    EXPECT_LE(RelativeError(gf, wf), tol) << what << " (finite part)";
    return;
  }
  ASSERT_FALSE(HasNaN(w)) << what << ": the reference itself has NaN";
  ASSERT_FALSE(HasNaN(g)) << what << ": NaN in the C++ output";
  const double err = RelativeError(g, w);
  EXPECT_LE(err, tol) << what << ": relative error " << err << " > " << tol;
}

class ReferenceCase : public ::testing::Test {
 public:
  ReferenceCase(std::string path, Variant v) : path_(std::move(path)), v_(std::move(v)) {}

  void TestBody() override {
    core::SafetensorsFile file = Unwrap(core::ReadSafetensors(path_), "ReadSafetensors");
    const json cfg = json::parse(file.metadata.at("config"));
    const json calls = json::parse(file.metadata.at("calls"));
    core::MqaOptions o = OptionsFrom(cfg);
    o.device = v_.device;
    o.attn_impl = v_.impl;
    const double tol = cfg.at("tolerance").get<double>();
    const bool nan_rows = cfg.value("expect", "") == "nan_rows";

    core::TensorMap weights;
    for (const auto& [name, t] : file.tensors) {
      if (name.rfind("call", 0) != 0) weights[name] = t;
    }
    if (cfg.contains("init_seed") && !cfg.at("init_seed").is_null()) {
      // Initialisation from a seed must reproduce the reference's nn.Linear draws exactly (fp32, CPU).
      core::MqaOptions io = o;
      io.device = "cpu";
      io.dtype = DType::kFloat32;
      io.seed = cfg.at("init_seed").get<uint64_t>();
      auto fresh = Unwrap(core::MultiQueryAttention::Create(io), "Create(seed)");
      const core::TensorMap sd = fresh->StateDict();
      ASSERT_EQ(sd.size(), weights.size());
      for (const auto& [name, t] : weights) {
        ASSERT_TRUE(sd.count(name)) << name;
        EXPECT_EQ(Floats(sd.at(name)), Floats(t)) << "init from seed " << io.seed << " differs in " << name;
      }
    }

    if (v_.session) return RunAsSessions(file, o, weights, calls, tol);

    auto layer = Unwrap(core::MultiQueryAttention::Create(o), "Create");
    core::Status st = layer->LoadStateDict(weights);
    ASSERT_TRUE(st.ok()) << st.ToString();

    std::optional<core::KvCache> previous;
    for (size_t i = 0; i < calls.size(); ++i) {
      const json& c = calls[i];
      const std::string p = "call" + std::to_string(i) + ".";
      SCOPED_TRACE("call " + std::to_string(i));
      core::ForwardArgs args;
      args.x = On(file.tensors.at(p + "x"), v_.device);
      const std::string past = c.at("past").get<std::string>();
      if (past == "empty") {
        args.past_key_value = core::KvCache{};
      } else if (past == "given") {
        args.past_key_value =
            core::KvCache{On(file.tensors.at(p + "past_k"), v_.device), On(file.tensors.at(p + "past_v"), v_.device)};
      } else if (past == "chain") {
        ASSERT_TRUE(previous.has_value()) << "chain call without a previous cache";
        args.past_key_value = previous;
      }
      if (c.at("has_bias").get<bool>()) args.bias = On(file.tensors.at(p + "bias"), v_.device);
      if (c.at("has_mask").get<bool>()) args.mask = On(file.tensors.at(p + "mask"), v_.device);
      args.causal = c.at("causal").get<bool>();
      args.needs_weights = c.at("needs_weights").get<bool>();

      core::StatusOr<core::ForwardResult> r = layer->Forward(args);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ExpectClose("out", r->out, file.tensors.at(p + "out"), tol, nan_rows);
      EXPECT_EQ(r->out.dtype(), file.tensors.at(p + "out").dtype());
      if (args.needs_weights) {
        ASSERT_TRUE(r->weights.defined());
        ExpectClose("weights", r->weights, file.tensors.at(p + "weights"), tol, nan_rows);
        EXPECT_EQ(r->weights.dtype(), file.tensors.at(p + "weights").dtype()) << "weights dtype";
      } else {
        EXPECT_FALSE(r->weights.defined());
      }
      if (past == "none") {
        EXPECT_FALSE(r->cache.has_value());
      } else {
        ASSERT_TRUE(r->cache.has_value());
        ExpectClose("k_cache", r->cache->k, file.tensors.at(p + "k_cache"), tol, false);
        ExpectClose("v_cache", r->cache->v, file.tensors.at(p + "v_cache"), tol, false);
      }
      previous = r->cache;
    }
  }

 private:
  // One engine hosting the case's layer (weights through a safetensors file, as a server loads them), one session
  // per batch row; call i is one step of every session, whose outputs together must equal the reference's.
  void RunAsSessions(const core::SafetensorsFile& file, const core::MqaOptions& o, const core::TensorMap& weights,
                     const json& calls, double tol) {
    namespace fs = std::filesystem;
    core::TensorMap stack;
    for (const auto& [name, t] : weights) stack[core::MqaStack::LayerPrefix(0) + name] = t;
    const fs::path dir = fs::temp_directory_path() / ("mqa_reference_" + std::to_string(NextSeed()));
    fs::create_directories(dir);
    const std::string weights_path = (dir / "layer.safetensors").string();
    core::Status written = core::WriteSafetensors(weights_path, stack);
    ASSERT_TRUE(written.ok()) << written.ToString();
    core::EngineOptions eo;
    core::ModelConfig m;
    m.name = "case";
    m.options = o;
    m.weights_path = weights_path;
    eo.models.push_back(m);
    eo.kv_cache.budget_bytes = int64_t{16} << 20;
    auto engine = Unwrap(core::Engine::Create(std::move(eo)), "Engine::Create");
    fs::remove_all(dir);

    const std::vector<int64_t> shape0 = file.tensors.at("call0.x").shape();
    const int64_t b = shape0[0], dim = shape0[2];
    std::vector<std::string> ids;
    for (int64_t i = 0; i < b; ++i) {
      core::SessionConfig sc;
      sc.model = "case";
      sc.causal = calls[0].at("causal").get<bool>();
      ids.push_back(Unwrap(engine->CreateSession(sc), "CreateSession").id);
    }
    for (size_t c = 0; c < calls.size(); ++c) {
      SCOPED_TRACE("call " + std::to_string(c) + " as session steps");
      const std::string p = "call" + std::to_string(c) + ".";
      const Tensor& x = file.tensors.at(p + "x");
      const int64_t s = x.shape()[1];
      const std::vector<float> xs = Floats(x);
      std::vector<float> got;
      for (int64_t i = 0; i < b; ++i) {
        const std::vector<float> row(xs.begin() + i * s * dim, xs.begin() + (i + 1) * s * dim);
        core::StepRequest req;
        req.session_id = ids[static_cast<size_t>(i)];
        req.x = Unwrap(Tensor::FromFloats(x.dtype(), {1, s, dim}, row), "FromFloats");
        std::promise<core::StatusOr<core::StepResult>> done;
        engine->SubmitStep(std::move(req),
                           [&done](core::StatusOr<core::StepResult> r) { done.set_value(std::move(r)); });
        core::StatusOr<core::StepResult> r = done.get_future().get();
        ASSERT_TRUE(r.ok()) << r.status().ToString();
        const std::vector<float> out = Floats(r->out);
        got.insert(got.end(), out.begin(), out.end());
      }
      const Tensor& want = file.tensors.at(p + "out");
      ExpectClose("out", Unwrap(Tensor::FromFloats(want.dtype(), want.shape(), got), "FromFloats"), want, tol, false);
    }
  }

  std::string path_;
  Variant v_;
};

}  // namespace
}  // namespace mqa::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc < 2) {
    std::cerr << "usage: mqa_reference_test <cases-dir>\n";
    return 2;
  }
  namespace fs = std::filesystem;
  const fs::path dir = argv[1];
  std::ifstream idx(dir / "index.json");
  if (!idx) {
    std::cerr << "no index.json in " << dir << " (run tests/reference/make_cases.py --out " << dir << ")\n";
    return 2;
  }
  const nlohmann::json index = nlohmann::json::parse(idx);
  std::cout << "[mqa-reference] cases from " << dir << ", generator seed=" << index.at("seed") << "\n";
  // The paged pass of torch and flash is the same code (flash's fused kernels serve the stateless Forward only);
  // triton's is the project's kernels on CUDA in 16 bits (its stateless Forward uses flash's kernels there).
  std::vector<mqa::testing::Variant> variants = {{"cpu", mqa::core::AttnImpl::kTorch},
                                                 {"cpu", mqa::core::AttnImpl::kFlash},
                                                 {"cpu", mqa::core::AttnImpl::kTorch, true}};
  if (mqa::core::CudaAvailable()) {
    variants.push_back({"cuda", mqa::core::AttnImpl::kTorch});
    variants.push_back({"cuda", mqa::core::AttnImpl::kFlash});
    variants.push_back({"cuda", mqa::core::AttnImpl::kTriton});
    variants.push_back({"cuda", mqa::core::AttnImpl::kTriton, true});
  } else {
    std::cout << "[mqa-reference] no CUDA device: CUDA variants are not registered (they run on the GPU machine)\n";
  }
  for (const auto& name : index.at("cases")) {
    const std::string case_name = name.get<std::string>();
    const std::string path = (dir / (case_name + ".safetensors")).string();
    auto file = mqa::core::ReadSafetensors(path);
    const bool session_shaped =
        file.ok() && mqa::testing::SessionShaped(nlohmann::json::parse(file->metadata.at("calls")));
    for (const auto& v : variants) {
      if (v.session && !session_shaped) continue;
      const std::string suite = "Reference_" + case_name;
      const std::string test =
          v.device + "_" + std::string(mqa::core::AttnImplName(v.impl)) + (v.session ? "_session" : "");
      ::testing::RegisterTest(
          suite.c_str(), test.c_str(), nullptr, nullptr, __FILE__, __LINE__,
          [=]() -> mqa::testing::ReferenceCase* { return new mqa::testing::ReferenceCase(path, v); });
    }
  }
  return RUN_ALL_TESTS();
}
