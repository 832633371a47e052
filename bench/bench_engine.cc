// mqa-bench-engine: decode throughput and step latency of the in-process Engine with N concurrent sessions,
// batched (continuous batching as configured) against unbatched (max_batch_sessions = 1), both measured in the
// same run on the same device.
//
// For each mode and each N: a fresh engine hosting one model of L layers (KV-cache budget sized for N
// sessions of P + W + T tokens), N sessions, then three phases, each a closed loop per session driven from the
// completion callbacks (no thread per session): a session submits its step for layer 0, submits layer 1 when
// that completes (the output of layer l is the input of layer l + 1), ... and then its next token, so N steps are
// in flight at once, one per session. Mode `waves` is the batched engine driven as a batching client drives it:
// each layer's steps of all N sessions in one SubmitSteps, the next layer's when all are answered.
//   prefill: one step of P tokens per layer and session (timed separately);
//   warm-up: W decode tokens per session (untimed);
//   decode:  T decode tokens per session (timed): tokens/s = N * T / wall seconds (a token has passed every
//            layer), step latency = submit to callback.
//
// Only the public core headers are used, so the benchmark runs unchanged against any engine behind engine.h.
//
// Usage: mqa-bench-engine [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--dim 4096] [--heads 32]
//          [--layers 4] [--sessions 1,8,64,256] [--prefill 128] [--tokens 64] [--warmup 4]
//          [--attn-impl torch|flash|triton] [--max-batch-sessions 256] [--max-batch-tokens 4096]
//          [--max-queue-delay-us 0] [--kv-block-size 16] [--modes batched,unbatched,waves] [--seed 0] [--json FILE]
//        mqa-bench-engine --help | --version
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "bench_report.h"
#include "closed_loop.h"
#include "command_line.h"
#include "mqa/core/device.h"
#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace {

using mqa::bench::JsonNumber;
using mqa::bench::JsonString;
using mqa::bench::Percentile;
using mqa::core::Clock;
using mqa::core::Engine;
using mqa::core::Status;
using mqa::core::StatusOr;
using mqa::core::Tensor;

constexpr char kModelName[] = "bench";

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "mqa-bench-engine: %s\n", what.c_str());
  std::exit(1);
}

template <typename T>
T Check(StatusOr<T> s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.status().ToString());
  return std::move(s).value();
}

void Check(const Status& s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.ToString());
}

[[noreturn]] void UsageError(const std::string& message) {
  std::fprintf(stderr, "mqa-bench-engine: %s\nrun 'mqa-bench-engine --help' for usage\n", message.c_str());
  std::exit(2);
}

double Mean(const std::vector<double>& values) {
  if (values.empty()) return 0.0;
  double sum = 0.0;
  for (double v : values) sum += v;
  return sum / static_cast<double>(values.size());
}

struct BenchConfig {
  std::string device;
  mqa::core::DType dtype = mqa::core::DType::kFloat32;
  int64_t dim = 0;
  int64_t heads = 0;
  int layers = 0;
  mqa::core::AttnImpl attn_impl = mqa::core::AttnImpl::kTorch;
  int64_t prefill = 0;
  int64_t tokens = 0;
  int64_t warmup = 0;
  int64_t max_batch_sessions = 0;
  int64_t max_batch_tokens = 0;
  int64_t max_queue_delay_us = 0;
  int64_t kv_block_size = 0;
  uint64_t seed = 0;

  int64_t head_dim() const { return dim / heads; }
  int64_t max_tokens() const { return prefill + warmup + tokens; }
  // K and V of one token in every layer: the cache bytes a session grows by per token.
  int64_t bytes_per_token() const {
    return static_cast<int64_t>(layers) * 2 * head_dim() * static_cast<int64_t>(mqa::core::DTypeSize(dtype));
  }
};

using ClosedLoop = mqa::bench::ClosedLoop<Tensor, Status>;
using PhaseResult = ClosedLoop::Phase;

// Runs one phase of the closed loop with the engine in process: each session's next step is submitted from the
// engine's completion callback.
PhaseResult RunPhase(Engine& engine, const std::vector<std::string>& ids, int layers, const std::vector<Tensor>& inputs,
                     int64_t start_position, int64_t step_tokens, int64_t rounds) {
  ClosedLoop loop(ids.size(), layers, &inputs);
  return loop.Run(start_position, step_tokens, rounds, [&](size_t i, int64_t layer, int64_t position, Tensor x) {
    mqa::core::StepRequest request;
    request.session_id = ids[i];
    request.layer = static_cast<int>(layer);
    request.position = position;
    request.x = std::move(x);
    engine.SubmitStep(std::move(request), [&loop, i](StatusOr<mqa::core::StepResult> r) {
      if (!r.ok()) return loop.Fail(r.status());
      loop.Done(i, static_cast<double>(r->queue_us) / 1e3, static_cast<double>(r->compute_us) / 1e3, std::move(r->out));
    });
  });
}

// Runs one phase as a batching client would (attention offloading from a model that runs batched): each layer's
// steps of all sessions in one Engine::SubmitSteps, the next layer's when every answer is back (its inputs are
// those answers), round after round. Every step's latency is its wave's.
PhaseResult RunWaves(Engine& engine, const std::vector<std::string>& ids, int layers, const std::vector<Tensor>& inputs,
                     int64_t start_position, int64_t step_tokens, int64_t rounds) {
  PhaseResult result;
  const auto start = Clock::now();
  std::vector<Tensor> x(ids.size());
  for (int64_t round = 0; round < rounds; ++round) {
    for (size_t i = 0; i < ids.size(); ++i) x[i] = inputs[(i + static_cast<size_t>(round)) % inputs.size()];
    for (int layer = 0; layer < layers; ++layer) {
      std::vector<mqa::core::StepRequest> requests(ids.size());
      for (size_t i = 0; i < ids.size(); ++i) {
        requests[i].session_id = ids[i];
        requests[i].layer = layer;
        requests[i].position = start_position + round * step_tokens;
        requests[i].x = std::move(x[i]);
      }
      std::promise<std::vector<StatusOr<mqa::core::StepResult>>> done;
      auto answers = done.get_future();
      const auto sent = Clock::now();
      engine.SubmitSteps(std::move(requests),
                         [&done](std::vector<StatusOr<mqa::core::StepResult>> r) { done.set_value(std::move(r)); });
      std::vector<StatusOr<mqa::core::StepResult>> got = answers.get();
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - sent).count();
      for (size_t i = 0; i < got.size(); ++i) {
        if (!got[i].ok()) {
          ++result.failed;
          if (!result.first_error) result.first_error = got[i].status();
          continue;
        }
        result.latency_ms.push_back(ms);
        result.server_queue_ms.push_back(static_cast<double>(got[i]->queue_us) / 1e3);
        result.server_compute_ms.push_back(static_cast<double>(got[i]->compute_us) / 1e3);
        x[i] = std::move(got[i]->out);
      }
      if (result.first_error) return result;
    }
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

struct Row {
  std::string mode;
  int64_t sessions = 0;
  int64_t max_batch_sessions = 0;
  int64_t kv_budget_bytes = 0;
  double create_s = 0.0;
  PhaseResult prefill;
  PhaseResult decode;
  mqa::core::EngineStats decode_stats_before;
  mqa::core::EngineStats decode_stats_after;
  std::optional<double> speedup;  // batched tokens/s over unbatched tokens/s at the same N

  double tokens_per_s(const BenchConfig& c) const {
    return decode.seconds > 0 ? static_cast<double>(sessions * c.tokens) / decode.seconds : 0.0;
  }
  double prefill_tokens_per_s(const BenchConfig& c) const {
    return prefill.seconds > 0 ? static_cast<double>(sessions * c.prefill) / prefill.seconds : 0.0;
  }
  // Passes run during the decode phase and the steps in them (zeros when the engine does not count passes).
  uint64_t decode_batches() const { return decode_stats_after.batches - decode_stats_before.batches; }
  uint64_t decode_batched_steps() const { return decode_stats_after.batched_steps - decode_stats_before.batched_steps; }
  // The decode phase's mean pass, in microseconds: gather, compute, scatter (PassTimes); 0 without passes.
  double pass_us(uint64_t mqa::core::PassTimes::*field) const {
    const uint64_t n = decode_batches();
    return n > 0 ? static_cast<double>(decode_stats_after.pass_times.*field - decode_stats_before.pass_times.*field) /
                       static_cast<double>(n)
                 : 0.0;
  }
};

// Block-rounded cache bytes for n sessions of max_tokens tokens, with one spare block per session and 1/16
// headroom, so that a paged cache with guaranteed admission can take every session.
int64_t KvBudget(const BenchConfig& c, int64_t n) {
  const int64_t blocks = (c.max_tokens() + c.kv_block_size - 1) / c.kv_block_size + 1;
  const int64_t bytes = n * blocks * c.kv_block_size * c.bytes_per_token();
  return bytes + bytes / 16 + (int64_t{1} << 20);
}

Row RunOne(const BenchConfig& c, const std::string& mode, int64_t n) {
  Row row;
  row.mode = mode;
  row.sessions = n;
  row.max_batch_sessions = mode == "unbatched" ? 1 : c.max_batch_sessions;
  row.kv_budget_bytes = KvBudget(c, n);

  mqa::core::EngineOptions options;
  mqa::core::ModelConfig model;
  model.name = kModelName;
  model.num_layers = c.layers;
  model.options.dim = c.dim;
  model.options.heads = c.heads;
  model.options.attn_impl = c.attn_impl;
  model.options.device = c.device;
  model.options.dtype = c.dtype;
  model.options.seed = c.seed;
  model.max_tokens_per_session = c.max_tokens();
  model.description = "mqa-bench-engine";
  options.models.push_back(model);
  options.batching.max_batch_sessions = row.max_batch_sessions;
  options.batching.max_batch_tokens = c.max_batch_tokens;
  options.batching.max_queue_delay = std::chrono::microseconds(c.max_queue_delay_us);
  options.kv_cache.block_size = static_cast<int32_t>(c.kv_block_size);
  options.kv_cache.budget_bytes = row.kv_budget_bytes;
  options.max_sessions = std::max<size_t>(options.max_sessions, static_cast<size_t>(n));
  options.max_queue = std::max<size_t>(options.max_queue, static_cast<size_t>(4 * n));
  options.default_idle_ttl = std::chrono::minutes(30);

  const auto created = Clock::now();
  std::unique_ptr<Engine> engine = Check(Engine::Create(options), "Engine::Create (" + mode + ")");
  std::vector<std::string> ids;
  for (int64_t i = 0; i < n; ++i) {
    mqa::core::SessionConfig sc;
    sc.model = kModelName;
    sc.admission = mqa::core::Admission::kGuaranteed;
    sc.max_tokens = c.max_tokens();
    ids.push_back(
        Check(engine->CreateSession(sc), "CreateSession " + std::to_string(i + 1) + " of " + std::to_string(n)).id);
  }
  row.create_s = std::chrono::duration<double>(Clock::now() - created).count();

  // Inputs live on the CPU in the model's dtype (what a server hands the engine); a few distinct ones, reused.
  std::vector<Tensor> prefill_inputs, decode_inputs;
  for (uint64_t k = 0; k < 4; ++k) {
    if (c.prefill > 0) {
      prefill_inputs.push_back(Check(Tensor::Randn(c.dtype, {1, c.prefill, c.dim}, c.seed + 100 + k), "x"));
    }
  }
  for (uint64_t k = 0; k < 16; ++k) {
    decode_inputs.push_back(Check(Tensor::Randn(c.dtype, {1, 1, c.dim}, c.seed + 200 + k), "x"));
  }

  auto check_phase = [&](const PhaseResult& p, const char* phase) {
    if (p.first_error) {
      Die(std::string(phase) + " (" + mode + ", " + std::to_string(n) + " sessions): " + std::to_string(p.failed) +
          " step(s) failed, first: " + p.first_error->ToString());
    }
  };
  auto phase = mode == "waves" ? RunWaves : RunPhase;
  if (c.prefill > 0) {
    row.prefill = phase(*engine, ids, c.layers, prefill_inputs, 0, c.prefill, 1);
    check_phase(row.prefill, "prefill");
  }
  check_phase(phase(*engine, ids, c.layers, decode_inputs, c.prefill, 1, c.warmup), "warm-up");
  Check(mqa::core::Synchronize(c.device), "sync");
  row.decode_stats_before = engine->stats();
  row.decode = phase(*engine, ids, c.layers, decode_inputs, c.prefill + c.warmup, 1, c.tokens);
  row.decode_stats_after = engine->stats();
  check_phase(row.decode, "decode");
  // The engine's own positions confirm that every step was applied exactly once.
  for (const std::string& id : ids) {
    mqa::core::SessionInfo info = Check(engine->GetSession(id), "GetSession");
    for (size_t l = 0; l < info.layer_positions.size(); ++l) {
      if (info.layer_positions[l] != c.max_tokens()) {
        Die("session " + id + " layer " + std::to_string(l) + " holds " + std::to_string(info.layer_positions[l]) +
            " tokens, expected " + std::to_string(c.max_tokens()));
      }
    }
    Check(engine->CloseSession(id).status(), "CloseSession");
  }
  return row;
}

std::string HistogramJson(const std::vector<uint64_t>& after, const std::vector<uint64_t>& before) {
  std::string out = "[";
  for (size_t i = 0; i < after.size(); ++i) {
    const uint64_t b = i < before.size() ? before[i] : 0;
    out += (i ? "," : "") + std::to_string(after[i] - b);
  }
  return out + "]";
}

std::string RowJson(const BenchConfig& c, const Row& r) {
  std::ostringstream os;
  const uint64_t batches = r.decode_batches();
  os << "{\"mode\":" << JsonString(r.mode) << ",\"sessions\":" << r.sessions
     << ",\"max_batch_sessions\":" << r.max_batch_sessions << ",\"kv_budget_bytes\":" << r.kv_budget_bytes
     << ",\"setup_s\":" << JsonNumber(r.create_s) << ",\"prefill_s\":" << JsonNumber(r.prefill.seconds)
     << ",\"prefill_tokens_per_s\":" << JsonNumber(r.prefill_tokens_per_s(c))
     << ",\"prefill_step_p50_ms\":" << JsonNumber(Percentile(r.prefill.latency_ms, 50))
     << ",\"prefill_step_p99_ms\":" << JsonNumber(Percentile(r.prefill.latency_ms, 99))
     << ",\"decode_s\":" << JsonNumber(r.decode.seconds) << ",\"tokens_per_s\":" << JsonNumber(r.tokens_per_s(c))
     << ",\"steps_per_s\":"
     << JsonNumber(r.decode.seconds > 0 ? static_cast<double>(r.decode.latency_ms.size()) / r.decode.seconds : 0.0)
     << ",\"decode_steps\":" << r.decode.latency_ms.size()
     << ",\"step_p50_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 50))
     << ",\"step_p90_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 90))
     << ",\"step_p99_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 99))
     << ",\"step_mean_ms\":" << JsonNumber(Mean(r.decode.latency_ms))
     << ",\"step_max_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 100))
     << ",\"engine_queue_p50_ms\":" << JsonNumber(Percentile(r.decode.server_queue_ms, 50))
     << ",\"engine_compute_p50_ms\":" << JsonNumber(Percentile(r.decode.server_compute_ms, 50))
     << ",\"decode_batches\":" << batches << ",\"decode_batched_steps\":" << r.decode_batched_steps()
     << ",\"mean_batch_size\":"
     << (batches > 0 ? JsonNumber(static_cast<double>(r.decode_batched_steps()) / static_cast<double>(batches))
                     : std::string("null"))
     << ",\"batch_size_histogram\":"
     << HistogramJson(r.decode_stats_after.batch_size_histogram, r.decode_stats_before.batch_size_histogram)
     << ",\"pass_gather_us\":" << JsonNumber(r.pass_us(&mqa::core::PassTimes::gather_us))
     << ",\"pass_compute_us\":" << JsonNumber(r.pass_us(&mqa::core::PassTimes::compute_us))
     << ",\"pass_wait_us\":" << JsonNumber(r.pass_us(&mqa::core::PassTimes::wait_us))
     << ",\"pass_scatter_us\":" << JsonNumber(r.pass_us(&mqa::core::PassTimes::scatter_us))
     << ",\"kv_blocks_total\":" << r.decode_stats_after.kv_blocks_total
     << ",\"kv_blocks_used\":" << r.decode_stats_after.kv_blocks_used
     << ",\"speedup_vs_unbatched\":" << (r.speedup ? JsonNumber(*r.speedup) : std::string("null")) << "}";
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "mqa-bench-engine: decode throughput and step latency of the in-process Engine with N sessions, "
      "batched against unbatched (max_batch_sessions 1), in one run",
      "mqa-bench-engine"};
  mqa::command_line::InitApp(app);
  const mqa::core::BatchingOptions batching_defaults;
  const mqa::core::KvCacheOptions kv_defaults;
  BenchConfig c;
  std::string dtype_flag;
  std::string attn_impl_flag;
  std::string sessions_text = "1,8,64,256";
  std::string modes_text = "batched,unbatched";
  std::string json_path;
  c.prefill = 128;
  c.tokens = 64;
  c.warmup = 4;
  c.max_batch_sessions = batching_defaults.max_batch_sessions;
  c.max_batch_tokens = batching_defaults.max_batch_tokens;
  c.max_queue_delay_us = batching_defaults.max_queue_delay.count();
  c.kv_block_size = kv_defaults.block_size;
  using mqa::command_line::AddInt;
  app.add_option("--device", c.device, "cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)");
  app.add_option("--dtype", dtype_flag, "float32, bfloat16 or float16 (default: bfloat16 on cuda, float32 on cpu)");
  CLI::Option* dim_flag = AddInt(app, "--dim", &c.dim, 1, "model dimension (default: 4096 on cuda, 512 on cpu)");
  CLI::Option* heads_flag = AddInt(app, "--heads", &c.heads, 1, "query heads (default: 32 on cuda, 8 on cpu)");
  CLI::Option* layers_flag =
      AddInt(app, "--layers", &c.layers, 1, "layers of the model (default: 4 on cuda, 2 on cpu)");
  mqa::command_line::AddIntList(app, "--sessions", &sessions_text, 1, "session counts, one run each")
      ->capture_default_str();
  AddInt(app, "--prefill", &c.prefill, 0, "prefill tokens per session")->capture_default_str();
  AddInt(app, "--tokens", &c.tokens, 1, "timed decode tokens per session")->capture_default_str();
  AddInt(app, "--warmup", &c.warmup, 0, "untimed decode tokens per session first")->capture_default_str();
  app.add_option("--attn-impl", attn_impl_flag, "torch, flash or triton (default: flash on cuda, torch on cpu)");
  AddInt(app, "--max-batch-sessions", &c.max_batch_sessions, 1, "batched mode's sessions per pass")
      ->capture_default_str();
  AddInt(app, "--max-batch-tokens", &c.max_batch_tokens, 1, "batched mode's tokens per pass")->capture_default_str();
  AddInt(app, "--max-queue-delay-us", &c.max_queue_delay_us, 0, "batched mode's wait for a fuller pass")
      ->capture_default_str();
  AddInt(app, "--kv-block-size", &c.kv_block_size, 1, "tokens per KV-cache block", 1 << 30)->capture_default_str();
  CLI::Validator modes_check(
      [](const std::string& text) -> std::string {
        std::stringstream ss(text);
        int count = 0;
        for (std::string m; std::getline(ss, m, ',');) {
          if (m.empty()) continue;
          if (m != "batched" && m != "unbatched" && m != "waves") {
            return "takes batched, unbatched and/or waves, got '" + m + "'";
          }
          ++count;
        }
        return count > 0 ? std::string() : "needs at least one mode";
      },
      "", "Modes");
  app.add_option("--modes", modes_text, "the modes to run, in order")->check(modes_check)->capture_default_str();
  AddInt(app, "--seed", &c.seed, 0, "seed of the weights and inputs")->capture_default_str();
  app.add_option("--json", json_path, "also write the results as JSON to FILE")->type_name("FILE");
  if (std::optional<int> exit_code = mqa::command_line::Parse(app, argc, argv)) return *exit_code;

  if (c.device.empty()) c.device = mqa::core::CudaAvailable() ? "cuda" : "cpu";
  Check(mqa::core::ValidateDevice(c.device), "--device");
  const bool on_gpu = c.device != "cpu";
  c.dtype =
      Check(mqa::core::ParseDType(dtype_flag.empty() ? (on_gpu ? "bfloat16" : "float32") : dtype_flag), "--dtype");
  if (dim_flag->count() == 0) c.dim = on_gpu ? 4096 : 512;
  if (heads_flag->count() == 0) c.heads = on_gpu ? 32 : 8;
  if (layers_flag->count() == 0) c.layers = on_gpu ? 4 : 2;
  c.attn_impl = Check(mqa::core::ParseAttnImpl(attn_impl_flag.empty() ? (on_gpu ? "flash" : "torch") : attn_impl_flag),
                      "--attn-impl");
  const std::vector<int64_t> session_counts = mqa::command_line::IntList(sessions_text);
  std::vector<std::string> modes;
  {
    std::stringstream ss(modes_text);
    for (std::string m; std::getline(ss, m, ',');) {
      if (!m.empty()) modes.push_back(m);
    }
  }
  if (c.dim % c.heads != 0) UsageError("--dim must be a multiple of --heads");
  Check(mqa::core::ValidateOptions([&] {
          mqa::core::MqaOptions o;
          o.dim = c.dim;
          o.heads = c.heads;
          o.attn_impl = c.attn_impl;
          o.device = c.device;
          o.dtype = c.dtype;
          return o;
        }()),
        "layer options");

  const std::string card = mqa::core::DeviceName(c.device);
  const std::string dtype_name(mqa::core::DTypeName(c.dtype));
  const std::string impl_name(mqa::core::AttnImplName(c.attn_impl));
  std::printf("mqa-bench-engine: %s (%s), %s, dim %" PRId64 ", heads %" PRId64
              ", layers %d, attn_impl %s\n"
              "  per session: prefill %" PRId64 ", warm-up %" PRId64 ", decode %" PRId64
              " tokens (closed loop, one step in flight per session); KV %" PRId64
              " bytes/token\n"
              "  batched: max_batch_sessions %" PRId64 ", max_batch_tokens %" PRId64 ", max_queue_delay %" PRId64
              " us; unbatched: max_batch_sessions 1\n",
              c.device.c_str(), card.c_str(), dtype_name.c_str(), c.dim, c.heads, c.layers, impl_name.c_str(),
              c.prefill, c.warmup, c.tokens, c.bytes_per_token(), c.max_batch_sessions, c.max_batch_tokens,
              c.max_queue_delay_us);
  std::fflush(stdout);

  std::vector<Row> rows;
  for (int64_t n : session_counts) {
    for (const std::string& mode : modes) {
      rows.push_back(RunOne(c, mode, n));
      const Row& r = rows.back();
      std::fprintf(stderr, "  done: %s N=%" PRId64 ": %.1f tokens/s\n", mode.c_str(), n, r.tokens_per_s(c));
    }
  }
  // Speedup of each batched row over the unbatched row of the same N, measured in this run.
  for (Row& r : rows) {
    if (r.mode == "unbatched") continue;
    for (const Row& u : rows) {
      if (u.mode == "unbatched" && u.sessions == r.sessions && u.tokens_per_s(c) > 0) {
        r.speedup = r.tokens_per_s(c) / u.tokens_per_s(c);
      }
    }
  }

  std::printf("\n%-9s %5s %12s %10s %10s %10s %11s %10s %8s %9s %9s %9s %9s %9s\n", "mode", "N", "tokens/s", "p50_ms",
              "p99_ms", "batch", "prefill_s", "prefill/s", "speedup", "gather_us", "launch_us", "wait_us", "scatter_us",
              "host/step");
  for (const Row& r : rows) {
    const uint64_t batches = r.decode_batches();
    char batch[32] = "-";
    if (batches > 0) {
      std::snprintf(batch, sizeof(batch), "%.1f",
                    static_cast<double>(r.decode_batched_steps()) / static_cast<double>(batches));
    }
    char speedup[32] = "-";
    if (r.speedup) std::snprintf(speedup, sizeof(speedup), "%.2fx", *r.speedup);
    const double gather = r.pass_us(&mqa::core::PassTimes::gather_us);
    const double scatter = r.pass_us(&mqa::core::PassTimes::scatter_us);
    const double per_step =
        batches > 0 ? (gather + scatter) * static_cast<double>(batches) / static_cast<double>(r.decode_batched_steps())
                    : 0.0;
    std::printf("%-9s %5" PRId64 " %12.1f %10.3f %10.3f %10s %11.3f %10.0f %8s %9.1f %9.1f %9.1f %9.1f %9.2f\n",
                r.mode.c_str(), r.sessions, r.tokens_per_s(c), Percentile(r.decode.latency_ms, 50),
                Percentile(r.decode.latency_ms, 99), batch, r.prefill.seconds, r.prefill_tokens_per_s(c), speedup,
                gather, r.pass_us(&mqa::core::PassTimes::compute_us), r.pass_us(&mqa::core::PassTimes::wait_us),
                scatter, per_step);
  }
  std::printf(
      "(tokens/s: decode tokens through all %d layers per wall second; p50/p99: one layer step, submit to "
      "callback; batch: mean steps per pass, '-' when the engine does not count passes;\n"
      " gather/launch/wait/scatter_us: the mean decode pass's worker time (inputs joined; copy in, layer and copy "
      "out launched, or run where the pass synchronises; blocked for a launched pass's outputs; outputs cut and "
      "completed); host/step: gather + scatter per step, in us)\n",
      c.layers);

  if (!json_path.empty()) {
    std::ofstream out(json_path);
    char when[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", std::localtime(&now));
    out << "{\"bench\":\"engine\",\"when\":" << JsonString(when) << ",\"device\":" << JsonString(c.device)
        << ",\"card\":" << JsonString(card) << ",\"dtype\":" << JsonString(dtype_name) << ",\"dim\":" << c.dim
        << ",\"heads\":" << c.heads << ",\"head_dim\":" << c.head_dim() << ",\"layers\":" << c.layers
        << ",\"attn_impl\":" << JsonString(impl_name) << ",\"prefill\":" << c.prefill << ",\"warmup\":" << c.warmup
        << ",\"tokens\":" << c.tokens << ",\"kv_bytes_per_token\":" << c.bytes_per_token()
        << ",\"kv_block_size\":" << c.kv_block_size << ",\"max_batch_sessions\":" << c.max_batch_sessions
        << ",\"max_batch_tokens\":" << c.max_batch_tokens << ",\"max_queue_delay_us\":" << c.max_queue_delay_us
        << ",\"seed\":" << c.seed << ",\"modes\":[";
    for (size_t i = 0; i < modes.size(); ++i) out << (i ? "," : "") << JsonString(modes[i]);
    out << "],\"sessions\":[";
    for (size_t i = 0; i < session_counts.size(); ++i) out << (i ? "," : "") << session_counts[i];
    out << "],\"rows\":[";
    for (size_t i = 0; i < rows.size(); ++i) out << (i ? ",\n" : "\n") << RowJson(c, rows[i]);
    out << "]}\n";
    if (!out) Die("could not write " + json_path);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return 0;
}
