// mqa-dev-stream-check: a developer tool, not the service and not built by default
// (cmake --build <dir> --target mqa-dev-stream-check). The service's demo is mqa-server with
// mqa-cli session-demo (scripts/demo.sh).
//
// In process, on core's public API: builds a stack of MQA layers with weights drawn from a seed (CUDA when
// present), or loads one from safetensors, then runs one session: a prefill, then decode steps through every layer
// with each layer's KV cache, printing per-step latency and tokens/s, and finally checks that the streamed outputs
// equal one full causal pass over the same tokens (exit 1 when they do not).
//
// Usage: mqa-dev-stream-check [--tokens 64] [--prefill 8] [--layers 4] [--dim 512] [--heads 8]
//          [--device cpu|cuda] [--dtype float32|bfloat16] [--impl torch|flash] [--weights FILE] [--save FILE]
//          [--seed 0]
//        mqa-dev-stream-check --help | --version
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "command_line.h"
#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"

namespace {

using mqa::core::Tensor;

template <typename T>
T Check(mqa::core::StatusOr<T> s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "mqa-dev-stream-check: %s: %s\n", what, s.status().ToString().c_str());
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
  CLI::App app{
      "mqa-dev-stream-check: a developer tool, not the service (that is mqa-server with mqa-cli "
      "session-demo, scripts/demo.sh). In process: one session streamed through a stack of MQA layers, "
      "per-step latency, and a check that the streamed outputs equal one full causal pass (exit 1 if not).",
      "mqa-dev-stream-check"};
  mqa::command_line::InitApp(app);
  int64_t tokens = 64;
  int64_t prefill = 8;
  int layers = 4;
  mqa::core::MqaOptions o;
  o.dim = 512;
  o.heads = 8;
  std::string device;
  std::string dtype_name = "float32";
  std::string impl_name = "torch";
  std::string weights;
  std::string save;
  using mqa::command_line::AddInt;
  AddInt(app, "--tokens", &tokens, 1, "decode tokens")->capture_default_str();
  AddInt(app, "--prefill", &prefill, 1, "prefill tokens, one step")->capture_default_str();
  AddInt(app, "--layers", &layers, 1, "layers of the seeded stack (a loaded one has the file's)")
      ->capture_default_str();
  AddInt(app, "--dim", &o.dim, 1, "model dimension")->capture_default_str();
  AddInt(app, "--heads", &o.heads, 1, "query heads")->capture_default_str();
  app.add_option("--device", device, "cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)");
  app.add_option("--dtype", dtype_name, "float32 or bfloat16")->capture_default_str();
  app.add_option("--impl", impl_name, "attn_impl: torch, flash or triton")->capture_default_str();
  AddInt(app, "--seed", &o.seed, 0, "seed of the weights and the input")->capture_default_str();
  app.add_option("--weights", weights, "load the stack from this safetensors file instead")->type_name("FILE");
  app.add_option("--save", save, "save the stack to this safetensors file")->type_name("FILE");
  if (std::optional<int> exit_code = mqa::command_line::Parse(app, argc, argv)) return *exit_code;
  o.device = device.empty() ? (mqa::core::CudaAvailable() ? "cuda" : "cpu") : device;
  o.dtype = Check(mqa::core::ParseDType(dtype_name), "dtype");
  o.attn_impl = Check(mqa::core::ParseAttnImpl(impl_name), "impl");

  auto stack = weights.empty() ? Check(mqa::core::MqaStack::Create(o, layers), "create model")
                               : Check(mqa::core::MqaStack::Load(weights, o), "load model");
  if (!save.empty()) {
    auto st = stack->Save(save);
    if (!st.ok()) std::fprintf(stderr, "mqa-dev-stream-check: save: %s\n", st.ToString().c_str());
  }
  std::printf(
      "mqa-dev-stream-check: model %s: %d layers, dim %lld, heads %lld (head_dim %lld), %s, attn_impl %s, "
      "on %s (%s)\n",
      weights.empty() ? "embedded default (seeded)" : weights.c_str(), stack->num_layers(),
      static_cast<long long>(o.dim), static_cast<long long>(o.heads), static_cast<long long>(o.head_dim()),
      std::string(mqa::core::DTypeName(o.dtype)).c_str(), std::string(mqa::core::AttnImplName(o.attn_impl)).c_str(),
      o.device.c_str(), mqa::core::DeviceName(o.device).c_str());

  const int64_t total = prefill + tokens;
  const std::vector<float> x = Check(
      Check(Tensor::Randn(mqa::core::DType::kFloat32, {1, total, o.dim}, o.seed + 99), "input").ToFloats(), "input");
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
      const double d =
          streamed[static_cast<size_t>(t)][static_cast<size_t>(j)] - full[static_cast<size_t>(t * o.dim + j)];
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
