// mqa-bench-layer: times the layer's forward through core's public API, per attn_impl, for decode
// (s = 1 against a KV cache) and prefill, and compares each time with the memory floor measured in the same run:
// the fewest bytes a forward must move (weights once, the past K/V once, the new K/V and activations) divided by
// the device-to-device copy bandwidth of this device, measured by core's own copy kernel (memcpy on the CPU).
//
// Usage: mqa-bench-layer [--device cpu|cuda] [--dtype float32|bfloat16] [--dim 4096] [--heads 32]
//                        [--repeats N] [--json FILE] [--quick]
//        mqa-bench-layer --help | --version
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "command_line.h"
#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"

namespace {

using mqa::core::AttnImpl;
using mqa::core::DType;
using mqa::core::Tensor;

struct Config {
  std::string kind;  // "decode" or "prefill"
  int64_t batch, s, cache;
};

template <typename T>
T Check(mqa::core::StatusOr<T> s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(s).value();
}

void Check(const mqa::core::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mqa-bench-layer: the layer's forward per attn_impl, decode and prefill, against the memory floor",
               "mqa-bench-layer"};
  mqa::command_line::InitApp(app);
  std::string device;
  std::string dtype_name;
  int64_t dim = 4096;
  int64_t heads = 32;
  int repeats = 0;
  std::string json_path;
  bool quick = false;
  app.add_option("--device", device, "cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)");
  app.add_option("--dtype", dtype_name, "float32 or bfloat16 (default: bfloat16 on a GPU, float32 on the CPU)");
  mqa::command_line::AddInt(app, "--dim", &dim, 1, "model dimension")->capture_default_str();
  mqa::command_line::AddInt(app, "--heads", &heads, 1, "query heads; --dim must be a multiple")->capture_default_str();
  CLI::Option* repeats_flag = mqa::command_line::AddInt(
      app, "--repeats", &repeats, 1, "timed forwards per case (default: 200 on a GPU, 5 on the CPU)");
  app.add_option("--json", json_path, "also write the results as JSON to FILE")->type_name("FILE");
  app.add_flag("--quick", quick, "small shapes, for a smoke run");
  if (std::optional<int> exit_code = mqa::command_line::Parse(app, argc, argv)) return *exit_code;
  if (device.empty()) device = mqa::core::CudaAvailable() ? "cuda" : "cpu";
  const bool on_gpu = device != "cpu";
  if (dtype_name.empty()) dtype_name = on_gpu ? "bfloat16" : "float32";
  const DType dtype = Check(mqa::core::ParseDType(dtype_name), "dtype");
  if (repeats_flag->count() == 0) repeats = on_gpu ? 200 : 5;
  const int64_t d = dim / heads;
  const size_t elem = mqa::core::DTypeSize(dtype);

  Check(mqa::core::ValidateDevice(device), "device");
  const std::string card = mqa::core::DeviceName(device);
  const double copy_gbps =
      Check(mqa::core::MeasureCopyBandwidth(device, on_gpu ? (size_t{1} << 30) : (size_t{256} << 20), on_gpu ? 20 : 5),
            "copy bandwidth");
  std::printf("mqa-bench-layer: %s (%s), dtype %s, dim %lld, heads %lld, measured copy bandwidth %.1f GB/s\n",
              device.c_str(), card.c_str(), std::string(mqa::core::DTypeName(dtype)).c_str(),
              static_cast<long long>(dim), static_cast<long long>(heads), copy_gbps);

  std::vector<Config> configs = {{"decode", 1, 1, 1024},
                                 {"decode", 1, 1, 8192},
                                 {"decode", 64, 1, 1024},
                                 {"decode", 64, 1, 8192},
                                 {"prefill", 1, 512, 0}};
  if (quick) configs = {{"decode", 1, 1, 128}, {"decode", 4, 1, 256}, {"prefill", 1, 64, 0}};

  std::vector<std::string> rows;
  std::printf("\n%-8s %5s %4s %6s %-6s %11s %11s %12s %10s %8s\n", "kind", "batch", "s", "cache", "impl", "median_ms",
              "p90_ms", "tokens/s", "floor_ms", "x_floor");
  for (const Config& c : configs) {
    // Inputs are shared by the impls so that they compute the same thing.
    Tensor x = Check(Tensor::Randn(dtype, {c.batch, c.s, dim}, 11, device), "x");
    Tensor pk, pv;
    if (c.cache > 0) {
      pk = Check(Tensor::Randn(dtype, {c.batch, 1, d, c.cache}, 12, device), "past k");
      pv = Check(Tensor::Randn(dtype, {c.batch, 1, c.cache, d}, 13, device), "past v");
    }
    const double weight_bytes = static_cast<double>((dim + 2 * d) * dim + dim * dim + (dim + 2 * d) + dim) * elem;
    const double kv_bytes = 2.0 * c.batch * c.cache * d * elem;  // past K/V read once
    const double new_bytes = 2.0 * c.batch * c.s * d * elem;     // new K/V written
    const double act_bytes = 2.0 * c.batch * c.s * dim * elem;   // x in, out out
    const double floor_ms = (weight_bytes + kv_bytes + new_bytes + act_bytes) / (copy_gbps * 1e9) * 1e3;
    for (AttnImpl impl : {AttnImpl::kTorch, AttnImpl::kFlash, AttnImpl::kTriton}) {
      mqa::core::MqaOptions o;
      o.dim = dim;
      o.heads = heads;
      o.attn_impl = impl;
      o.device = device;
      o.dtype = dtype;
      o.seed = 7;
      auto layer_or = mqa::core::MultiQueryAttention::Create(o);
      const std::string impl_name(mqa::core::AttnImplName(impl));
      if (!layer_or.ok()) {
        std::printf("%-8s %5lld %4lld %6lld %-6s   n/a: %s\n", c.kind.c_str(), static_cast<long long>(c.batch),
                    static_cast<long long>(c.s), static_cast<long long>(c.cache), impl_name.c_str(),
                    std::string(mqa::core::StatusCodeName(layer_or.status().code())).c_str());
        continue;
      }
      auto layer = std::move(layer_or).value();
      mqa::core::ForwardArgs a;
      a.x = x;
      a.past_key_value = mqa::core::KvCache{pk, pv};  // empty KvCache when cache == 0 (prefill starts a cache)
      std::vector<double> ms;
      const int warmup = on_gpu ? 20 : 1;
      for (int r = -warmup; r < repeats; ++r) {
        Check(mqa::core::Synchronize(device), "sync");
        auto t0 = std::chrono::steady_clock::now();
        auto res = layer->Forward(a);
        Check(mqa::core::Synchronize(device), "sync");
        auto t1 = std::chrono::steady_clock::now();
        Check(res.status(), "forward");
        if (r >= 0) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      const double p90 = ms[std::min(ms.size() - 1, ms.size() * 9 / 10)];
      const double tps = static_cast<double>(c.batch * c.s) / (med / 1e3);
      std::printf("%-8s %5lld %4lld %6lld %-6s %11.3f %11.3f %12.1f %10.3f %8.2f\n", c.kind.c_str(),
                  static_cast<long long>(c.batch), static_cast<long long>(c.s), static_cast<long long>(c.cache),
                  impl_name.c_str(), med, p90, tps, floor_ms, med / floor_ms);
      char buf[512];
      std::snprintf(buf, sizeof(buf),
                    "{\"kind\":\"%s\",\"batch\":%lld,\"s\":%lld,\"cache\":%lld,\"impl\":\"%s\",\"median_ms\":%.6f,"
                    "\"p90_ms\":%.6f,\"tokens_per_s\":%.3f,\"floor_ms\":%.6f,\"repeats\":%d}",
                    c.kind.c_str(), static_cast<long long>(c.batch), static_cast<long long>(c.s),
                    static_cast<long long>(c.cache), impl_name.c_str(), med, p90, tps, floor_ms, repeats);
      rows.emplace_back(buf);
    }
  }
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\"bench\":\"layer\",\"device\":\"" << device << "\",\"card\":\"" << card << "\",\"dtype\":\""
        << mqa::core::DTypeName(dtype) << "\",\"dim\":" << dim << ",\"heads\":" << heads
        << ",\"copy_gbps\":" << copy_gbps << ",\"rows\":[";
    for (size_t i = 0; i < rows.size(); ++i) out << (i ? "," : "") << rows[i];
    out << "]}\n";
    std::printf("\nwrote %s\n", json_path.c_str());
  }
  return 0;
}
