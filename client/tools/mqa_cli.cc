// mqa-cli: a command-line client of mqaserve, built only on the public client API (mqa/client/client.h).
//
//   mqa-cli [common flags] health [--service NAME]
//   mqa-cli [common flags] models
//   mqa-cli [common flags] forward [--layer L] [--tokens S] [--batch B] [--dtype T] [--in FILE] [--out FILE]
//   mqa-cli [common flags] session-demo [--tokens N] [--prefill P] [--sessions K] [--window W] [--dtype T]
//   mqa-cli [common flags] bench [--sessions 1,8,64,256] [--prefill P] [--tokens T] [--warmup W] [--streams S]
//                                [--dtype T] [--json FILE]
//
// Exit status: 0 on success, 1 on an error (printed as "error: CODE: message"), 2 on bad usage.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_report.h"
#include "closed_loop.h"
#include "mqa/client/client.h"
#include "safetensors_io.h"

namespace mqa::client {
namespace {

using Clock = std::chrono::steady_clock;
using mqa::bench::JsonNumber;
using mqa::bench::JsonString;
using mqa::bench::Percentile;

constexpr char kUsage[] =
    "usage: mqa-cli [--target HOST:PORT] [--timeout-ms MS] [--model NAME] COMMAND [flags]\n"
    "\n"
    "commands:\n"
    "  health        [--service NAME]            grpc.health.v1 check; exit 0 only when SERVING\n"
    "  models                                    list the hosted models and their layers\n"
    "  forward       [--layer L] [--tokens S] [--batch B] [--dtype float32|bfloat16|float16] [--seed N]\n"
    "                [--in FILE.safetensors (x, optional bias, mask)] [--out FILE.safetensors]\n"
    "                [--no-causal] [--weights]  one stateless forward of one layer\n"
    "  session-demo  [--tokens N=64] [--prefill P=0] [--sessions K=1] [--window W] [--dtype T] [--seed N]\n"
    "                stream N tokens through every layer of K sessions on one multiplexed stream\n"
    "  bench         [--sessions 1,8,64,256] [--prefill P=128] [--tokens T=64] [--warmup W=4] [--streams S=4]\n"
    "                [--dtype T (default: the model's)] [--seed N] [--json FILE]\n"
    "                decode tokens/s and step latency for N sessions, each a closed loop (one step in flight\n"
    "                per session) through every layer, multiplexed on S streams\n"
    "\n"
    "common flags:\n"
    "  --target HOST:PORT   default $MQA_TARGET, else 127.0.0.1:50051\n"
    "  --timeout-ms MS      per-call deadline (default 30000)\n"
    "  --model NAME         default: the first model the server lists\n";

// Usage errors exit 2 without a status line, unlike errors from the server.
struct UsageError {
  std::string message;
};

// "--name value", "--name=value" and boolean "--name"; everything else is positional.
class Args {
 public:
  Args(int argc, char** argv, const std::set<std::string>& boolean_flags) {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg.rfind("--", 0) != 0 || arg.size() == 2) {
        positional_.push_back(arg);
        continue;
      }
      std::string name = arg.substr(2);
      const size_t eq = name.find('=');
      if (eq != std::string::npos) {
        flags_[name.substr(0, eq)] = name.substr(eq + 1);
      } else if (boolean_flags.count(name)) {
        flags_[name] = "1";
      } else if (i + 1 < argc) {
        flags_[name] = argv[++i];
      } else {
        throw UsageError{"flag --" + name + " needs a value"};
      }
    }
  }

  const std::vector<std::string>& positional() const { return positional_; }
  bool Has(const std::string& name) {
    used_.insert(name);
    return flags_.count(name) > 0;
  }
  std::string Str(const std::string& name, const std::string& fallback) {
    used_.insert(name);
    auto it = flags_.find(name);
    return it == flags_.end() ? fallback : it->second;
  }
  int64_t Int(const std::string& name, int64_t fallback, int64_t min_value) {
    const std::string text = Str(name, "");
    if (text.empty()) return fallback;
    char* end = nullptr;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (end == text.c_str() || *end != '\0' || v < min_value) {
      throw UsageError{"--" + name + " needs an integer >= " + std::to_string(min_value) + ", got '" + text + "'"};
    }
    return v;
  }
  // Flags given that no command looked at are typos; better to stop than to ignore them.
  void CheckAllUsed() const {
    for (const auto& entry : flags_) {
      if (!used_.count(entry.first)) throw UsageError{"unknown flag --" + entry.first};
    }
  }

 private:
  std::vector<std::string> positional_;
  std::map<std::string, std::string> flags_;
  std::set<std::string> used_;
};

int Fail(const Status& status) {
  std::fprintf(stderr, "error: %s\n", status.ToString().c_str());
  return 1;
}

DataType DtypeFlag(Args& args) {
  const std::string name = args.Str("dtype", "float32");
  std::optional<DataType> dtype = ParseDataType(name);
  if (!dtype || DataTypeSize(*dtype) == 0 || *dtype == DataType::kBool || *dtype == DataType::kUInt8) {
    throw UsageError{"--dtype must be float32, bfloat16 or float16, got '" + name + "'"};
  }
  return *dtype;
}

StatusOr<HostTensor> RandomTensor(std::vector<int64_t> shape, DataType dtype, std::mt19937_64& rng) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(static_cast<size_t>(n));
  for (float& v : values) v = normal(rng);
  return HostTensor::FromFloats(std::move(shape), values, dtype);
}

StatusOr<ModelInfo> PickModel(Client& client, const std::string& requested) {
  if (!requested.empty()) return client.GetModel(requested);
  StatusOr<std::vector<ModelInfo>> models = client.ListModels();
  if (!models.ok()) return models.status();
  if (models->empty()) return Status(StatusCode::kNotFound, "the server hosts no models");
  return models->front();
}

std::string FormatOptional(const std::optional<double>& v) {
  if (!v) return "-";
  std::ostringstream os;
  os << *v;
  return os.str();
}

// ---- health / models ------------------------------------------------------------------------------------

int RunHealth(Client& client, Args& args) {
  const std::string service = args.Str("service", "");
  args.CheckAllUsed();
  StatusOr<HealthStatus> health = client.Health(service);
  if (!health.ok()) return Fail(health.status());
  std::printf("%s\n", HealthStatusName(*health).c_str());
  return *health == HealthStatus::kServing ? 0 : 1;
}

int RunModels(Client& client, Args& args) {
  args.CheckAllUsed();
  StatusOr<std::vector<ModelInfo>> models = client.ListModels();
  if (!models.ok()) return Fail(models.status());
  if (models->empty()) std::printf("(no models)\n");
  for (const ModelInfo& m : *models) {
    std::string on;
    for (const std::string& d : m.devices) on += (on.empty() ? "" : ", ") + d;
    std::printf("model %s: %d layers, max_tokens_per_session %" PRId64 "%s%s%s%s\n", m.name.c_str(), m.num_layers,
                m.max_tokens_per_session, on.empty() ? "" : ", on ", on.c_str(), m.description.empty() ? "" : ", ",
                m.description.c_str());
    std::printf("  %5s %6s %5s %8s %-6s %-9s %-8s %-5s %-22s %8s %8s %6s\n", "layer", "dim", "heads", "head_dim",
                "impl", "dtype", "device", "qk_ln", "norm", "clip_qkv", "scale", "pdrop");
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const LayerConfig& c = m.layers[i];
      std::printf("  %5zu %6" PRId64 " %5" PRId64 " %8" PRId64 " %-6s %-9s %-8s %-5s %-22s %8s %8s %6g\n", i, c.dim,
                  c.heads, c.head_dim, c.attn_impl.c_str(), DataTypeName(c.dtype).c_str(), c.device.c_str(),
                  c.qk_ln ? "yes" : "no", c.norm_type.c_str(), FormatOptional(c.clip_qkv).c_str(),
                  FormatOptional(c.softmax_scale).c_str(), c.attn_pdrop);
    }
  }
  return 0;
}

// ---- forward --------------------------------------------------------------------------------------------

void PrintTensorSummary(const char* name, const HostTensor& t) {
  StatusOr<std::vector<float>> values = t.ToFloats();
  if (!values.ok()) {
    std::printf("%s: %s %s (unreadable: %s)\n", name, DataTypeName(t.dtype).c_str(), t.ShapeString().c_str(),
                values.status().ToString().c_str());
    return;
  }
  double sum = 0.0, abs_sum = 0.0;
  for (float v : *values) {
    sum += v;
    abs_sum += std::fabs(v);
  }
  std::printf("%s: %s %s sum %.6g sum|.| %.6g first:", name, DataTypeName(t.dtype).c_str(),
              t.ShapeString().c_str(), sum, abs_sum);
  for (size_t i = 0; i < std::min<size_t>(8, values->size()); ++i) std::printf(" %.6g", (*values)[i]);
  std::printf("\n");
}

int RunForward(Client& client, Args& args, const std::string& model_flag) {
  const int64_t layer = args.Int("layer", 0, 0);
  const int64_t tokens = args.Int("tokens", 8, 0);
  const int64_t batch = args.Int("batch", 1, 1);
  const uint64_t seed = static_cast<uint64_t>(args.Int("seed", 0, 0));
  const DataType dtype = DtypeFlag(args);
  const std::string in_path = args.Str("in", "");
  const std::string out_path = args.Str("out", "");
  const bool no_causal = args.Has("no-causal");
  const bool weights = args.Has("weights");
  args.CheckAllUsed();

  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  if (layer >= static_cast<int64_t>(model->layers.size())) {
    return Fail(Status(StatusCode::kInvalidArgument, "model " + model->name + " has " +
                                                         std::to_string(model->layers.size()) + " layers"));
  }
  ForwardInput input;
  input.model = model->name;
  input.layer = static_cast<int32_t>(layer);
  input.needs_weights = weights;
  if (no_causal) input.causal = false;
  if (!in_path.empty()) {
    StatusOr<tools::SafetensorsFile> file = tools::ReadSafetensors(in_path);
    if (!file.ok()) return Fail(file.status());
    auto x = file->tensors.find("x");
    if (x == file->tensors.end()) return Fail(Status(StatusCode::kInvalidArgument, in_path + " holds no tensor 'x'"));
    input.x = x->second;
    if (auto bias = file->tensors.find("bias"); bias != file->tensors.end()) input.bias = bias->second;
    if (auto mask = file->tensors.find("mask"); mask != file->tensors.end()) input.mask = mask->second;
  } else {
    std::mt19937_64 rng(seed);
    StatusOr<HostTensor> x = RandomTensor({batch, tokens, model->layers[static_cast<size_t>(layer)].dim}, dtype, rng);
    if (!x.ok()) return Fail(x.status());
    input.x = std::move(*x);
  }
  const auto start = Clock::now();
  StatusOr<ForwardOutput> output = client.Forward(input);
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  if (!output.ok()) return Fail(output.status());
  std::printf("model %s layer %" PRId64 ": x %s -> %.3f ms\n", model->name.c_str(), layer,
              input.x.ShapeString().c_str(), ms);
  PrintTensorSummary("out", output->out);
  if (output->weights) PrintTensorSummary("weights", *output->weights);
  if (!out_path.empty()) {
    tools::SafetensorsFile file;
    file.tensors["out"] = output->out;
    if (output->weights) file.tensors["weights"] = *output->weights;
    file.metadata["model"] = model->name;
    file.metadata["layer"] = std::to_string(layer);
    Status written = tools::WriteSafetensors(out_path, file);
    if (!written.ok()) return Fail(written);
    std::printf("wrote %s\n", out_path.c_str());
  }
  return 0;
}

// ---- session-demo ---------------------------------------------------------------------------------------

// Progress on stderr: a redrawn bar on a terminal, a plain line every couple of seconds otherwise (logs).
class Progress {
 public:
  explicit Progress(int64_t total) : total_(total), tty_(isatty(STDERR_FILENO) == 1), start_(Clock::now()) {}

  void Update(int64_t done, bool force = false) {
    const auto now = Clock::now();
    const auto interval = tty_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(2000);
    if (!force && now - last_ < interval) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double fraction = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
    if (tty_) {
      constexpr int kWidth = 30;
      const int filled = static_cast<int>(fraction * kWidth);
      std::fprintf(stderr, "\r[%s%s] %3d%% %" PRId64 "/%" PRId64 " steps %.1fs", std::string(filled, '#').c_str(),
                   std::string(kWidth - filled, ' ').c_str(), static_cast<int>(fraction * 100), done, total_,
                   seconds);
      if (force) std::fprintf(stderr, "\n");
    } else {
      std::fprintf(stderr, "progress: %" PRId64 "/%" PRId64 " steps (%d%%) after %.1fs\n", done, total_,
                   static_cast<int>(fraction * 100), seconds);
    }
    std::fflush(stderr);
  }

 private:
  int64_t total_;
  bool tty_;
  Clock::time_point start_;
  Clock::time_point last_{};
};

// Completion bookkeeping shared with the stream's callbacks (gRPC threads).
struct DemoState {
  std::mutex mu;
  std::condition_variable cv;
  int64_t in_flight = 0;
  int64_t completed = 0;
  std::vector<double> prefill_ms;
  std::vector<double> decode_ms;
  std::vector<double> server_compute_ms;
  std::vector<double> server_queue_ms;
  std::optional<Status> first_error;
};

int RunSessionDemo(Client& client, Args& args, const std::string& model_flag) {
  const int64_t tokens = args.Int("tokens", 64, 0);
  const int64_t prefill = args.Int("prefill", 0, 0);
  const int64_t num_sessions = args.Int("sessions", 1, 1);
  const uint64_t seed = static_cast<uint64_t>(args.Int("seed", 0, 0));
  const DataType dtype = DtypeFlag(args);

  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  const int64_t layers = static_cast<int64_t>(model->layers.size());
  if (layers == 0) return Fail(Status(StatusCode::kFailedPrecondition, "model " + model->name + " has no layers"));
  // Enough steps in flight for one token of every session through every layer twice over, so the server
  // always has the next batch queued while it computes the current one.
  const int64_t window = args.Int("window", 2 * layers * num_sessions, 1);
  args.CheckAllUsed();

  // The demo may run longer than one call's deadline; the stream gets none, and each step carries the call
  // timeout as its queueing limit instead.
  StreamOptions stream_options;
  stream_options.deadline = std::chrono::milliseconds(0);
  StatusOr<std::unique_ptr<StepStream>> opened = client.OpenStream(stream_options);
  if (!opened.ok()) return Fail(opened.status());
  StepStream& stream = **opened;

  // Every session shares the stream's routing key: behind a proxy that hashes on it, the sessions and the
  // stream that steps them all land on the same replica.
  std::vector<Session> sessions;
  for (int64_t i = 0; i < num_sessions; ++i) {
    SessionOptions options;
    options.model = model->name;
    options.max_tokens = prefill + tokens;
    options.routing_key = stream.routing_key();
    StatusOr<Session> session = client.CreateSession(options);
    if (!session.ok()) return Fail(session.status());
    sessions.push_back(std::move(*session));
  }
  std::fprintf(stderr,
               "model %s: %" PRId64 " layers, %" PRId64 " session(s), prefill %" PRId64 ", %" PRId64
               " tokens, window %" PRId64 "\n",
               model->name.c_str(), layers, num_sessions, prefill, tokens, window);

  DemoState state;
  const int64_t total = num_sessions * layers * ((prefill > 0 ? 1 : 0) + tokens);
  Progress progress(total);
  std::mt19937_64 rng(seed);

  // Waits for room in the window, then submits one step; false once any step has failed.
  auto submit = [&](const Session& session, int64_t layer, int64_t position, int64_t length, bool is_prefill) {
    {
      std::unique_lock<std::mutex> lock(state.mu);
      state.cv.wait(lock, [&] { return state.in_flight < window || state.first_error.has_value(); });
      if (state.first_error) return false;
      ++state.in_flight;
    }
    StepRequest request;
    request.layer = static_cast<int32_t>(layer);
    request.position = position;
    request.timeout = client.options().default_timeout;
    StatusOr<HostTensor> x =
        RandomTensor({1, length, model->layers[static_cast<size_t>(layer)].dim}, dtype, rng);
    Status failure;
    if (x.ok()) {
      request.x = std::move(*x);
      const auto sent = Clock::now();
      StatusOr<uint64_t> submitted =
          stream.Submit(session, std::move(request), [&state, sent, is_prefill](StatusOr<StepOutput> out) {
            const double ms = std::chrono::duration<double, std::milli>(Clock::now() - sent).count();
            std::lock_guard<std::mutex> lock(state.mu);
            --state.in_flight;
            ++state.completed;
            if (out.ok()) {
              (is_prefill ? state.prefill_ms : state.decode_ms).push_back(ms);
              state.server_compute_ms.push_back(
                  std::chrono::duration<double, std::milli>(out->compute_time).count());
              state.server_queue_ms.push_back(std::chrono::duration<double, std::milli>(out->queue_time).count());
            } else if (!state.first_error) {
              state.first_error = out.status();
            }
            state.cv.notify_all();
          });
      if (submitted.ok()) return true;
      failure = submitted.status();
    } else {
      failure = x.status();
    }
    std::lock_guard<std::mutex> lock(state.mu);
    --state.in_flight;
    if (!state.first_error) state.first_error = failure;
    return false;
  };
  auto report_progress = [&] {
    int64_t done;
    {
      std::lock_guard<std::mutex> lock(state.mu);
      done = state.completed;
    }
    progress.Update(done);
  };

  const auto start = Clock::now();
  bool ok = true;
  // Token-major, then session, then layer: every session advances together, and the steps of one session
  // and layer go out in position order, which the server preserves.
  if (prefill > 0) {
    for (const Session& session : sessions) {
      for (int64_t layer = 0; ok && layer < layers; ++layer) ok = submit(session, layer, 0, prefill, true);
    }
  }
  for (int64_t t = 0; ok && t < tokens; ++t) {
    for (const Session& session : sessions) {
      for (int64_t layer = 0; ok && layer < layers; ++layer) ok = submit(session, layer, prefill + t, 1, false);
    }
    report_progress();
  }
  if (!ok) stream.Cancel();
  // Finish waits for every answer; keep the progress display alive meanwhile.
  std::atomic<bool> finishing{true};
  std::thread ticker([&] {
    while (finishing.load()) {
      report_progress();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  Status stream_status = stream.Finish();
  finishing.store(false);
  ticker.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  {
    std::lock_guard<std::mutex> lock(state.mu);
    progress.Update(state.completed, /*force=*/true);
    if (state.first_error) return Fail(*state.first_error);
  }
  if (!stream_status.ok()) return Fail(stream_status);

  // The server's own count of tokens per layer confirms that no step was lost or applied twice.
  for (const Session& session : sessions) {
    StatusOr<SessionInfo> info = session.Info();
    if (!info.ok()) return Fail(info.status());
    for (size_t layer = 0; layer < info->layer_positions.size(); ++layer) {
      if (info->layer_positions[layer] != prefill + tokens) {
        return Fail(Status(StatusCode::kInternal,
                           "session " + session.id() + " layer " + std::to_string(layer) + " holds " +
                               std::to_string(info->layer_positions[layer]) + " tokens, expected " +
                               std::to_string(prefill + tokens)));
      }
    }
  }
  for (Session& session : sessions) {
    StatusOr<SessionInfo> closed = session.Close();
    if (!closed.ok()) return Fail(closed.status());
  }

  const double token_count = static_cast<double>(num_sessions * tokens);
  std::printf("model %s: %" PRId64 " session(s) x %" PRId64 " tokens x %" PRId64 " layers in %.3f s\n",
              model->name.c_str(), num_sessions, tokens, layers, seconds);
  if (prefill > 0) {
    std::printf("prefill (%" PRId64 " tokens/step): p50 %.3f ms  p99 %.3f ms\n", prefill,
                Percentile(state.prefill_ms, 50), Percentile(state.prefill_ms, 99));
  }
  std::printf("decode step latency: p50 %.3f ms  p99 %.3f ms  (server: queue p50 %.3f ms, compute p50 %.3f ms)\n",
              Percentile(state.decode_ms, 50), Percentile(state.decode_ms, 99), Percentile(state.server_queue_ms, 50),
              Percentile(state.server_compute_ms, 50));
  std::printf("throughput: %.1f tokens/s (every layer), %.1f steps/s\n", seconds > 0 ? token_count / seconds : 0.0,
              seconds > 0 ? static_cast<double>(total) / seconds : 0.0);
  return 0;
}

// ---- bench ----------------------------------------------------------------------------------------------

using BenchLoop = mqa::bench::ClosedLoop<HostTensor, Status>;
using BenchPhase = BenchLoop::Phase;

// Runs one phase of the closed loop over the streams: session i is stepped on streams[i % streams.size()], and
// its next step goes out from the stream callback of its current one.
BenchPhase RunPhase(const std::vector<std::string>& ids, const std::vector<std::unique_ptr<StepStream>>& streams,
                    int64_t layers, const std::vector<HostTensor>& inputs, std::chrono::milliseconds step_timeout,
                    int64_t start_position, int64_t step_tokens, int64_t rounds) {
  BenchLoop loop(ids.size(), layers, &inputs);
  return loop.Run(start_position, step_tokens, rounds, [&](size_t i, int64_t layer, int64_t position, HostTensor x) {
    StepRequest request;
    request.session_id = ids[i];
    request.layer = static_cast<int32_t>(layer);
    request.position = position;
    request.timeout = step_timeout;
    request.x = std::move(x);
    auto done = [&loop, i](StatusOr<StepOutput> out) {
      if (!out.ok()) return loop.Fail(out.status());
      loop.Done(i, std::chrono::duration<double, std::milli>(out->queue_time).count(),
                std::chrono::duration<double, std::milli>(out->compute_time).count(), std::move(out->out));
    };
    StatusOr<uint64_t> submitted = streams[i % streams.size()]->Submit(std::move(request), std::move(done));
    if (!submitted.ok()) loop.Fail(submitted.status());
  });
}

std::vector<int64_t> IntListFlag(Args& args, const std::string& name, const std::string& fallback) {
  std::vector<int64_t> out;
  std::stringstream ss(args.Str(name, fallback));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (end == item.c_str() || *end != '\0' || v < 1) {
      throw UsageError{"--" + name + " needs a comma-separated list of integers >= 1, got '" + item + "'"};
    }
    out.push_back(v);
  }
  if (out.empty()) throw UsageError{"--" + name + " needs at least one value"};
  return out;
}

struct BenchRow {
  int64_t sessions = 0;
  int64_t streams = 0;
  BenchPhase prefill;
  BenchPhase decode;
};

// One bench point: n sessions through prefill, warm-up and the timed decode phase; closes what it opened.
StatusOr<BenchRow> RunBenchPoint(Client& client, const ModelInfo& model, int64_t n, int64_t num_streams,
                                 int64_t prefill, int64_t warmup, int64_t tokens, DataType dtype, uint64_t seed) {
  BenchRow row;
  row.sessions = n;
  row.streams = std::min(num_streams, n);
  const int64_t layers = model.num_layers;
  const int64_t dim = model.layers.front().dim;
  // The bench may outlast one call's deadline: the streams get none, and each step carries the call timeout as
  // its queueing limit instead.
  std::vector<std::unique_ptr<StepStream>> streams;
  for (int64_t k = 0; k < row.streams; ++k) {
    StreamOptions stream_options;
    stream_options.deadline = std::chrono::milliseconds(0);
    StatusOr<std::unique_ptr<StepStream>> opened = client.OpenStream(stream_options);
    if (!opened.ok()) return opened.status();
    streams.push_back(std::move(*opened));
  }
  // Session i is stepped on streams[i % streams.size()] (RunPhase), so it takes that stream's routing key:
  // behind a proxy that hashes on the key, a stream and its sessions land on the same replica.
  std::vector<Session> sessions;
  std::vector<std::string> ids;
  for (int64_t i = 0; i < n; ++i) {
    SessionOptions options;
    options.model = model.name;
    options.max_tokens = prefill + warmup + tokens;
    options.routing_key = streams[static_cast<size_t>(i) % streams.size()]->routing_key();
    StatusOr<Session> session = client.CreateSession(options);
    if (!session.ok()) return session.status();
    ids.push_back(session->id());
    sessions.push_back(std::move(*session));
  }
  // A few distinct inputs, reused; layer l > 0 is fed layer l - 1's output.
  std::mt19937_64 rng(seed);
  std::vector<HostTensor> prefill_inputs, decode_inputs;
  for (int k = 0; k < 4 && prefill > 0; ++k) {
    StatusOr<HostTensor> x = RandomTensor({1, prefill, dim}, dtype, rng);
    if (!x.ok()) return x.status();
    prefill_inputs.push_back(std::move(*x));
  }
  for (int k = 0; k < 16; ++k) {
    StatusOr<HostTensor> x = RandomTensor({1, 1, dim}, dtype, rng);
    if (!x.ok()) return x.status();
    decode_inputs.push_back(std::move(*x));
  }
  const std::chrono::milliseconds step_timeout = client.options().default_timeout;
  auto phase_error = [&](const BenchPhase& p, const char* phase) {
    return Status(p.first_error->code(), std::string(phase) + " with " + std::to_string(n) + " sessions: " +
                                             std::to_string(p.failed) + " step(s) failed, first: " +
                                             p.first_error->message());
  };
  if (prefill > 0) {
    row.prefill = RunPhase(ids, streams, layers, prefill_inputs, step_timeout, 0, prefill, 1);
    if (row.prefill.first_error) return phase_error(row.prefill, "prefill");
  }
  BenchPhase warm = RunPhase(ids, streams, layers, decode_inputs, step_timeout, prefill, 1, warmup);
  if (warm.first_error) return phase_error(warm, "warm-up");
  row.decode = RunPhase(ids, streams, layers, decode_inputs, step_timeout, prefill + warmup, 1, tokens);
  if (row.decode.first_error) return phase_error(row.decode, "decode");
  for (auto& stream : streams) {
    Status finished = stream->Finish();
    if (!finished.ok()) return finished;
  }
  // The server's own count of tokens per layer confirms that no step was lost or applied twice.
  for (Session& session : sessions) {
    StatusOr<SessionInfo> info = session.Info();
    if (!info.ok()) return info.status();
    for (size_t layer = 0; layer < info->layer_positions.size(); ++layer) {
      if (info->layer_positions[layer] != prefill + warmup + tokens) {
        return Status(StatusCode::kInternal, "session " + session.id() + " layer " + std::to_string(layer) +
                                                 " holds " + std::to_string(info->layer_positions[layer]) +
                                                 " tokens, expected " + std::to_string(prefill + warmup + tokens));
      }
    }
    StatusOr<SessionInfo> closed = session.Close();
    if (!closed.ok()) return closed.status();
  }
  return row;
}

int RunBench(Client& client, Args& args, const std::string& model_flag) {
  const std::vector<int64_t> session_counts = IntListFlag(args, "sessions", "1,8,64,256");
  const int64_t prefill = args.Int("prefill", 128, 0);
  const int64_t tokens = args.Int("tokens", 64, 1);
  const int64_t warmup = args.Int("warmup", 4, 0);
  const int64_t num_streams = args.Int("streams", 4, 1);
  const uint64_t seed = static_cast<uint64_t>(args.Int("seed", 0, 0));
  const bool dtype_given = args.Has("dtype");
  std::optional<DataType> dtype_flag;
  if (dtype_given) dtype_flag = DtypeFlag(args);
  const std::string json_path = args.Str("json", "");
  args.CheckAllUsed();

  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  if (model->layers.empty()) {
    return Fail(Status(StatusCode::kFailedPrecondition, "model " + model->name + " has no layers"));
  }
  const LayerConfig& layer0 = model->layers.front();
  // By default the inputs are in the model's own dtype, so the server converts nothing.
  const DataType dtype = dtype_flag.value_or(layer0.dtype);
  std::printf("mqa-cli bench: %s, model %s: %d layers, dim %" PRId64 ", heads %" PRId64 ", %s on %s, attn_impl %s\n"
              "  per session: prefill %" PRId64 ", warm-up %" PRId64 ", decode %" PRId64
              " tokens (closed loop, one step in flight per session); inputs %s; up to %" PRId64 " streams\n",
              client.options().target.c_str(), model->name.c_str(), model->num_layers, layer0.dim, layer0.heads,
              DataTypeName(layer0.dtype).c_str(), layer0.device.c_str(), layer0.attn_impl.c_str(), prefill, warmup,
              tokens, DataTypeName(dtype).c_str(), num_streams);
  std::fflush(stdout);

  std::vector<BenchRow> rows;
  for (int64_t n : session_counts) {
    StatusOr<BenchRow> row = RunBenchPoint(client, *model, n, num_streams, prefill, warmup, tokens, dtype, seed);
    if (!row.ok()) return Fail(row.status());
    rows.push_back(std::move(*row));
    const BenchRow& r = rows.back();
    std::fprintf(stderr, "  done: N=%" PRId64 ": %.1f tokens/s\n", n,
                 r.decode.seconds > 0 ? static_cast<double>(n * tokens) / r.decode.seconds : 0.0);
  }

  auto tokens_per_s = [&](const BenchRow& r) {
    return r.decode.seconds > 0 ? static_cast<double>(r.sessions * tokens) / r.decode.seconds : 0.0;
  };
  auto prefill_tokens_per_s = [&](const BenchRow& r) {
    return r.prefill.seconds > 0 ? static_cast<double>(r.sessions * prefill) / r.prefill.seconds : 0.0;
  };
  std::printf("\n%5s %7s %12s %10s %10s %12s %14s %11s %10s\n", "N", "streams", "tokens/s", "p50_ms", "p99_ms",
              "srv_queue_ms", "srv_compute_ms", "prefill_s", "prefill/s");
  for (const BenchRow& r : rows) {
    std::printf("%5" PRId64 " %7" PRId64 " %12.1f %10.3f %10.3f %12.3f %14.3f %11.3f %10.0f\n", r.sessions, r.streams,
                tokens_per_s(r), Percentile(r.decode.latency_ms, 50), Percentile(r.decode.latency_ms, 99),
                Percentile(r.decode.server_queue_ms, 50), Percentile(r.decode.server_compute_ms, 50),
                r.prefill.seconds, prefill_tokens_per_s(r));
  }
  std::printf("(tokens/s: decode tokens through all %d layers per wall second; p50/p99: one layer step, submit to "
              "answer; srv_*: the server's queue and compute time per step, p50)\n",
              model->num_layers);

  if (!json_path.empty()) {
    std::ostringstream os;
    os << "{\"bench\":\"service\",\"target\":" << JsonString(client.options().target)
       << ",\"model\":" << JsonString(model->name) << ",\"layers\":" << model->num_layers << ",\"dim\":" << layer0.dim
       << ",\"heads\":" << layer0.heads << ",\"head_dim\":" << layer0.head_dim
       << ",\"dtype\":" << JsonString(DataTypeName(layer0.dtype)) << ",\"input_dtype\":"
       << JsonString(DataTypeName(dtype)) << ",\"device\":" << JsonString(layer0.device)
       << ",\"attn_impl\":" << JsonString(layer0.attn_impl) << ",\"prefill\":" << prefill << ",\"warmup\":" << warmup
       << ",\"tokens\":" << tokens << ",\"streams\":" << num_streams << ",\"seed\":" << seed << ",\"rows\":[";
    for (size_t i = 0; i < rows.size(); ++i) {
      const BenchRow& r = rows[i];
      const double steps = static_cast<double>(r.decode.latency_ms.size());
      os << (i ? ",\n" : "\n") << "{\"sessions\":" << r.sessions << ",\"streams\":" << r.streams
         << ",\"prefill_s\":" << JsonNumber(r.prefill.seconds)
         << ",\"prefill_tokens_per_s\":" << JsonNumber(prefill_tokens_per_s(r))
         << ",\"prefill_step_p50_ms\":" << JsonNumber(Percentile(r.prefill.latency_ms, 50))
         << ",\"prefill_step_p99_ms\":" << JsonNumber(Percentile(r.prefill.latency_ms, 99))
         << ",\"decode_s\":" << JsonNumber(r.decode.seconds) << ",\"tokens_per_s\":" << JsonNumber(tokens_per_s(r))
         << ",\"steps_per_s\":" << JsonNumber(r.decode.seconds > 0 ? steps / r.decode.seconds : 0.0)
         << ",\"decode_steps\":" << r.decode.latency_ms.size()
         << ",\"step_p50_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 50))
         << ",\"step_p90_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 90))
         << ",\"step_p99_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 99))
         << ",\"step_max_ms\":" << JsonNumber(Percentile(r.decode.latency_ms, 100))
         << ",\"server_queue_p50_ms\":" << JsonNumber(Percentile(r.decode.server_queue_ms, 50))
         << ",\"server_compute_p50_ms\":" << JsonNumber(Percentile(r.decode.server_compute_ms, 50)) << "}";
    }
    os << "]}\n";
    std::ofstream out(json_path);
    out << os.str();
    if (!out) return Fail(Status(StatusCode::kInternal, "could not write " + json_path));
    std::printf("wrote %s\n", json_path.c_str());
  }
  return 0;
}

int Main(int argc, char** argv) {
  Args args(argc, argv, {"help", "no-causal", "weights"});
  if (args.Has("help") || args.positional().empty()) {
    std::fputs(kUsage, args.Has("help") ? stdout : stderr);
    return args.Has("help") ? 0 : 2;
  }
  if (args.positional().size() > 1) throw UsageError{"unexpected argument '" + args.positional()[1] + "'"};
  const std::string command = args.positional().front();
  const char* env_target = std::getenv("MQA_TARGET");
  ClientOptions options;
  options.target = args.Str("target", env_target && *env_target ? env_target : "127.0.0.1:50051");
  options.default_timeout = std::chrono::milliseconds(args.Int("timeout-ms", 30000, 1));
  // Fail fast with a clear message when nothing listens, instead of every call retrying.
  options.connect_timeout = std::min(options.default_timeout, std::chrono::milliseconds(10000));
  const std::string model = args.Str("model", "");
  if (command != "health" && command != "models" && command != "forward" && command != "session-demo" &&
      command != "bench") {
    throw UsageError{"unknown command '" + command + "'"};
  }
  StatusOr<std::unique_ptr<Client>> client = Client::Connect(options);
  if (!client.ok()) return Fail(client.status());
  if (command == "health") return RunHealth(**client, args);
  if (command == "models") return RunModels(**client, args);
  if (command == "forward") return RunForward(**client, args, model);
  if (command == "bench") return RunBench(**client, args, model);
  return RunSessionDemo(**client, args, model);
}

}  // namespace
}  // namespace mqa::client

int main(int argc, char** argv) {
  try {
    return mqa::client::Main(argc, argv);
  } catch (const mqa::client::UsageError& e) {
    std::fprintf(stderr, "mqa-cli: %s\n\n%s", e.message.c_str(), mqa::client::kUsage);
    return 2;
  }
}
