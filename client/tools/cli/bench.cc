// mqa-cli bench: decode tokens/s and step latency for N sessions, each a closed loop (one step in flight per
// session) through every layer, multiplexed on S streams; the same loop as mqa-bench-engine's in process
// (bench/support/closed_loop.h), here over gRPC. Table on stdout, optionally JSON.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench_report.h"
#include "closed_loop.h"
#include "command_line.h"
#include "commands.h"
#include "common.h"

namespace mqa::client::cli {
namespace {

using mqa::bench::JsonNumber;
using mqa::bench::JsonString;
using mqa::bench::Percentile;

struct BenchFlags {
  std::string sessions = "1,8,64,256";
  int64_t prefill = 128;
  int64_t tokens = 64;
  int64_t warmup = 4;
  int64_t streams = 4;
  int64_t seed = 0;
  std::string dtype;  // empty: the model's
  std::string json_path;
  bool batch_rpc = false;  // each stream carries one StepBatchInput per layer step of its sessions
};

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

// The batched mode (--batch-rpc): the sessions of stream g (i % streams == g) form one group, stepped together
// as one StepBatchInput per layer step, as a caller that runs its model batched would. The closed loop runs over
// the groups: a group's next batch goes out from the callback of its current one. inputs[g] holds that group's
// [B_g, s, dim] inputs of layer 0; layer l > 0 takes layer l - 1's output.
BenchPhase RunBatchedPhase(const std::vector<std::vector<std::string>>& groups,
                           const std::vector<std::unique_ptr<StepStream>>& streams, int64_t layers,
                           const std::vector<std::vector<HostTensor>>& inputs, std::chrono::milliseconds step_timeout,
                           int64_t start_position, int64_t step_tokens, int64_t rounds) {
  const std::vector<HostTensor> unused(1);  // layer 0's input is picked per group below
  BenchLoop loop(groups.size(), layers, &unused);
  return loop.Run(start_position, step_tokens, rounds, [&](size_t g, int64_t layer, int64_t position, HostTensor x) {
    StepBatchInput batch;
    batch.layer = static_cast<int32_t>(layer);
    batch.session_ids = groups[g];
    batch.positions.assign(groups[g].size(), position);
    batch.timeout = step_timeout;
    const auto round = static_cast<size_t>((position - start_position) / step_tokens);
    batch.x = layer == 0 ? inputs[g][round % inputs[g].size()] : std::move(x);
    auto done = [&loop, g](StatusOr<StepBatchOutput> out) {
      if (!out.ok()) return loop.Fail(out.status());
      for (const Status& st : out->statuses) {
        if (!st.ok()) return loop.Fail(st);
      }
      loop.Done(g, std::chrono::duration<double, std::milli>(out->queue_times.front()).count(),
                std::chrono::duration<double, std::milli>(out->compute_times.front()).count(), std::move(out->out));
    };
    StatusOr<uint64_t> submitted = streams[g]->SubmitBatch(std::move(batch), std::move(done));
    if (!submitted.ok()) loop.Fail(submitted.status());
  });
}

struct BenchRow {
  int64_t sessions = 0;
  int64_t streams = 0;
  BenchPhase prefill;
  BenchPhase decode;
};

// One bench point: n sessions through prefill, warm-up and the timed decode phase; closes what it opened.
StatusOr<BenchRow> RunBenchPoint(Client& client, const ModelInfo& model, int64_t n, int64_t num_streams,
                                 int64_t prefill, int64_t warmup, int64_t tokens, DataType dtype, uint64_t seed,
                                 bool batch_rpc) {
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
    return Status(p.first_error->code(), std::string(phase) + " with " + std::to_string(n) +
                                             " sessions: " + std::to_string(p.failed) +
                                             " step(s) failed, first: " + p.first_error->message());
  };
  // Prefill is one step per session in both modes: a whole group's prefill may not fit one message.
  if (prefill > 0) {
    row.prefill = RunPhase(ids, streams, layers, prefill_inputs, step_timeout, 0, prefill, 1);
    if (row.prefill.first_error) return phase_error(row.prefill, "prefill");
  }
  std::vector<std::vector<std::string>> groups;  // --batch-rpc: the sessions of each stream, one batch per step
  std::vector<std::vector<HostTensor>> group_decode;
  if (batch_rpc) {
    groups.resize(streams.size());
    for (size_t i = 0; i < ids.size(); ++i) groups[i % streams.size()].push_back(ids[i]);
    group_decode.resize(groups.size());
    for (size_t g = 0; g < groups.size(); ++g) {
      for (int k = 0; k < 4; ++k) {
        StatusOr<HostTensor> x = RandomTensor({static_cast<int64_t>(groups[g].size()), 1, dim}, dtype, rng);
        if (!x.ok()) return x.status();
        group_decode[g].push_back(std::move(*x));
      }
    }
  }
  auto decode_phase = [&](int64_t start, int64_t rounds) {
    return batch_rpc ? RunBatchedPhase(groups, streams, layers, group_decode, step_timeout, start, 1, rounds)
                     : RunPhase(ids, streams, layers, decode_inputs, step_timeout, start, 1, rounds);
  };
  BenchPhase warm = decode_phase(prefill, warmup);
  if (warm.first_error) return phase_error(warm, "warm-up");
  row.decode = decode_phase(prefill + warmup, tokens);
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
        return Status(StatusCode::kInternal, "session " + session.id() + " layer " + std::to_string(layer) + " holds " +
                                                 std::to_string(info->layer_positions[layer]) + " tokens, expected " +
                                                 std::to_string(prefill + warmup + tokens));
      }
    }
    StatusOr<SessionInfo> closed = session.Close();
    if (!closed.ok()) return closed.status();
  }
  return row;
}

int RunBench(Client& client, const BenchFlags& flags, const std::string& model_flag) {
  const std::vector<int64_t> session_counts = mqa::command_line::IntList(flags.sessions);
  const int64_t prefill = flags.prefill;
  const int64_t tokens = flags.tokens;
  const int64_t warmup = flags.warmup;
  const int64_t num_streams = flags.streams;
  const uint64_t seed = static_cast<uint64_t>(flags.seed);
  std::optional<DataType> dtype_flag;
  if (!flags.dtype.empty()) dtype_flag = DtypeOf(flags.dtype);
  const std::string& json_path = flags.json_path;

  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  if (model->layers.empty()) {
    return Fail(Status(StatusCode::kFailedPrecondition, "model " + model->name + " has no layers"));
  }
  const LayerConfig& layer0 = model->layers.front();
  // By default the inputs are in the model's own dtype, so the server converts nothing.
  const DataType dtype = dtype_flag.value_or(layer0.dtype);
  std::printf("mqa-cli bench: %s, model %s: %d layers, dim %" PRId64 ", heads %" PRId64
              ", %s on %s, attn_impl %s\n"
              "  per session: prefill %" PRId64 ", warm-up %" PRId64 ", decode %" PRId64
              " tokens (closed loop, one step in flight per %s); inputs %s; up to %" PRId64 " streams\n",
              client.options().target.c_str(), model->name.c_str(), model->num_layers, layer0.dim, layer0.heads,
              DataTypeName(layer0.dtype).c_str(), layer0.device.c_str(), layer0.attn_impl.c_str(), prefill, warmup,
              tokens, flags.batch_rpc ? "stream: one StepBatch of its sessions per layer step" : "session",
              DataTypeName(dtype).c_str(), num_streams);
  std::fflush(stdout);

  std::vector<BenchRow> rows;
  for (int64_t n : session_counts) {
    StatusOr<BenchRow> row =
        RunBenchPoint(client, *model, n, num_streams, prefill, warmup, tokens, dtype, seed, flags.batch_rpc);
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
                Percentile(r.decode.server_queue_ms, 50), Percentile(r.decode.server_compute_ms, 50), r.prefill.seconds,
                prefill_tokens_per_s(r));
  }
  std::printf(
      "(tokens/s: decode tokens through all %d layers per wall second; p50/p99: one layer step%s, submit to "
      "answer; srv_*: the server's queue and compute time per step, p50)\n",
      model->num_layers, flags.batch_rpc ? " (one StepBatch)" : "");

  if (!json_path.empty()) {
    std::ostringstream os;
    os << "{\"bench\":\"service\",\"target\":" << JsonString(client.options().target)
       << ",\"model\":" << JsonString(model->name) << ",\"layers\":" << model->num_layers << ",\"dim\":" << layer0.dim
       << ",\"heads\":" << layer0.heads << ",\"head_dim\":" << layer0.head_dim
       << ",\"dtype\":" << JsonString(DataTypeName(layer0.dtype))
       << ",\"input_dtype\":" << JsonString(DataTypeName(dtype)) << ",\"device\":" << JsonString(layer0.device)
       << ",\"attn_impl\":" << JsonString(layer0.attn_impl) << ",\"prefill\":" << prefill << ",\"warmup\":" << warmup
       << ",\"tokens\":" << tokens << ",\"streams\":" << num_streams << ",\"seed\":" << seed
       << ",\"mode\":" << JsonString(flags.batch_rpc ? "step_batch" : "stream_steps") << ",\"rows\":[";
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

}  // namespace

Command AddBench(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* sub =
      app.add_subcommand("bench", "decode tokens/s and step latency of N closed-loop sessions on S streams");
  sub->footer(
      "Each session is a closed loop (one step in flight per session) through every layer; the sessions are "
      "multiplexed on the streams. Common flags may come before or after COMMAND.");
  mqa::command_line::AddIntList(*sub, "--sessions", &flags->sessions, 1, "session counts, one run each")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--prefill", &flags->prefill, 0, "prefill tokens per session")->capture_default_str();
  mqa::command_line::AddInt(*sub, "--tokens", &flags->tokens, 1, "timed decode tokens per session")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--warmup", &flags->warmup, 0, "untimed decode tokens per session first")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--streams", &flags->streams, 1, "streams the sessions are spread over")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--seed", &flags->seed, 0, "seed of the random inputs")->capture_default_str();
  AddDtypeFlag(*sub, &flags->dtype, "dtype of the inputs (default: the model's)");
  sub->add_option("--json", flags->json_path, "also write the results as JSON to FILE")->type_name("FILE");
  sub->add_flag("--batch-rpc", flags->batch_rpc,
                "send each stream's sessions as one StepBatch per layer step (a caller running its model batched) "
                "instead of one StepInput per session");
  return Command{sub,
                 [flags](Client& client, const CommonFlags& common) { return RunBench(client, *flags, common.model); }};
}

}  // namespace mqa::client::cli
