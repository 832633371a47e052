// mqa-demo: the main job until the gRPC server exists (issue "gRPC service" replaces it with server + client).
// Builds the embedded default model (a stack of MQA layers with weights drawn from a seed; CUDA when present),
// or loads one from safetensors, then runs one session: a prefill, then decode steps through every layer with
// each layer's KV cache, printing per-step latency and tokens/s, and finally checks that the streamed outputs
// equal one full causal pass over the same tokens.
//
// Usage: mqa-demo [--tokens 64] [--prefill 8] [--layers 4] [--dim 512] [--heads 8] [--device cpu|cuda]
//                 [--dtype float32|bfloat16] [--impl torch|flash] [--weights FILE] [--save FILE] [--seed 0]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"

namespace {

using mqa::core::Tensor;

std::string Arg(int argc, char** argv, const std::string& name, const std::string& def) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (argv[i] == name) return argv[i + 1];
  }
  return def;
}

template <typename T>
T Check(mqa::core::StatusOr<T> s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "mqa-demo: %s: %s\n", what, s.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(s).value();
}

// Rows [from, from + n) of a [1, s, dim] float tensor, as a new tensor in dtype on device.
Tensor Rows(const std::vector<float>& all, int64_t from, int64_t n, int64_t dim, mqa::core::DType dtype,
            const std::string& device) {
  std::vector<float> v(all.begin() + from * dim, all.begin() + (from + n) * dim);
  return Check(Check(Tensor::FromFloats(dtype, {1, n, dim}, v), "rows").To(device), "to device");
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t tokens = std::stoll(Arg(argc, argv, "--tokens", "64"));
  const int64_t prefill = std::stoll(Arg(argc, argv, "--prefill", "8"));
  mqa::core::MqaOptions o;
  o.dim = std::stoll(Arg(argc, argv, "--dim", "512"));
  o.heads = std::stoll(Arg(argc, argv, "--heads", "8"));
  o.device = Arg(argc, argv, "--device", mqa::core::CudaAvailable() ? "cuda" : "cpu");
  o.dtype = Check(mqa::core::ParseDType(Arg(argc, argv, "--dtype", "float32")), "dtype");
  o.attn_impl = Check(mqa::core::ParseAttnImpl(Arg(argc, argv, "--impl", "torch")), "impl");
  o.seed = std::stoull(Arg(argc, argv, "--seed", "0"));
  const int layers = std::stoi(Arg(argc, argv, "--layers", "4"));
  const std::string weights = Arg(argc, argv, "--weights", "");
  if (tokens < 1 || prefill < 1) {
    std::fprintf(stderr, "mqa-demo: --tokens and --prefill must be >= 1\n");
    return 2;
  }

  auto stack = weights.empty() ? Check(mqa::core::MqaStack::Create(o, layers), "create model")
                               : Check(mqa::core::MqaStack::Load(weights, o), "load model");
  const std::string save = Arg(argc, argv, "--save", "");
  if (!save.empty()) {
    auto st = stack->Save(save);
    if (!st.ok()) std::fprintf(stderr, "mqa-demo: save: %s\n", st.ToString().c_str());
  }
  std::printf("mqa-demo: model %s: %d layers, dim %lld, heads %lld (head_dim %lld), %s, attn_impl %s, on %s (%s)\n",
              weights.empty() ? "embedded default (seeded)" : weights.c_str(), stack->num_layers(),
              static_cast<long long>(o.dim), static_cast<long long>(o.heads), static_cast<long long>(o.head_dim()),
              std::string(mqa::core::DTypeName(o.dtype)).c_str(),
              std::string(mqa::core::AttnImplName(o.attn_impl)).c_str(), o.device.c_str(),
              mqa::core::DeviceName(o.device).c_str());

  const int64_t total = prefill + tokens;
  const std::vector<float> x = Check(Check(Tensor::Randn(mqa::core::DType::kFloat32, {1, total, o.dim}, o.seed + 99),
                                           "input").ToFloats(), "input");
  std::vector<mqa::core::KvCache> caches(static_cast<size_t>(stack->num_layers()));
  std::vector<std::vector<float>> streamed;  // final-layer output per position
  auto run_chunk = [&](int64_t from, int64_t n) {
    Tensor h = Rows(x, from, n, o.dim, o.dtype, o.device);
    for (int l = 0; l < stack->num_layers(); ++l) {
      mqa::core::ForwardArgs a;
      a.x = h;
      a.past_key_value = caches[static_cast<size_t>(l)];
      auto r = Check(stack->layer(l).Forward(a), "forward");
      caches[static_cast<size_t>(l)] = *r.cache;
      h = r.out;
    }
    auto out = Check(h.ToFloats(), "read output");  // reading back also waits for the device
    for (int64_t i = 0; i < n; ++i) streamed.emplace_back(out.begin() + i * o.dim, out.begin() + (i + 1) * o.dim);
  };

  auto t0 = std::chrono::steady_clock::now();
  run_chunk(0, prefill);
  const double prefill_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("prefill: %lld tokens through %d layers in %.2f ms\n", static_cast<long long>(prefill),
              stack->num_layers(), prefill_ms);
  std::vector<double> step_ms;
  for (int64_t t = prefill; t < total; ++t) {
    auto s0 = std::chrono::steady_clock::now();
    run_chunk(t, 1);
    step_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count());
    const int width = 30;
    const int done = static_cast<int>(width * (t - prefill + 1) / tokens);
    std::printf("\rdecode [%s%s] %lld/%lld  step %.2f ms", std::string(static_cast<size_t>(done), '#').c_str(),
                std::string(static_cast<size_t>(width - done), '.').c_str(), static_cast<long long>(t - prefill + 1),
                static_cast<long long>(tokens), step_ms.back());
    std::fflush(stdout);
  }
  std::printf("\n");
  std::vector<double> sorted = step_ms;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0;
  for (double v : step_ms) sum += v;
  std::printf("decode: %lld steps, p50 %.2f ms, p99 %.2f ms, %.1f tokens/s (one session, %d layers per token)\n",
              static_cast<long long>(tokens), sorted[sorted.size() / 2],
              sorted[std::min(sorted.size() - 1, sorted.size() * 99 / 100)], 1e3 * static_cast<double>(tokens) / sum,
              stack->num_layers());

  // The same tokens in one causal pass per layer must give the same outputs as the streamed session.
  Tensor h = Rows(x, 0, total, o.dim, o.dtype, o.device);
  for (int l = 0; l < stack->num_layers(); ++l) {
    mqa::core::ForwardArgs a;
    a.x = h;
    h = Check(stack->layer(l).Forward(a), "full pass").out;
  }
  const std::vector<float> full = Check(h.ToFloats(), "read full pass");
  double num = 0, den = 0;
  for (int64_t t = 0; t < total; ++t) {
    for (int64_t j = 0; j < o.dim; ++j) {
      const double d = streamed[static_cast<size_t>(t)][static_cast<size_t>(j)] - full[static_cast<size_t>(t * o.dim + j)];
      num += d * d;
      den += static_cast<double>(full[static_cast<size_t>(t * o.dim + j)]) * full[static_cast<size_t>(t * o.dim + j)];
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  const double tol = o.dtype == mqa::core::DType::kFloat32 ? 1e-5 : 5e-2;
  std::printf("check: streamed session vs one causal pass over %lld tokens: relative error %.2e (%s, limit %.0e)\n",
              static_cast<long long>(total), rel, rel <= tol ? "ok" : "MISMATCH", tol);
  return rel <= tol ? 0 : 1;
}
