// mqa-cli session-demo: N tokens streamed through every layer of K sessions on one multiplexed stream, with a
// progress display, step latency p50/p99 and tokens/s; the server's own token counts confirm that no step was lost
// or applied twice.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "bench_report.h"
#include "command_line.h"
#include "commands.h"
#include "common.h"

namespace mqa::client::cli {
namespace {

using mqa::bench::Percentile;

struct DemoFlags {
  int64_t tokens = 64;
  int64_t prefill = 0;
  int64_t sessions = 1;
  int64_t window = 0;  // 0: two tokens of every session through every layer (set from the model)
  int64_t seed = 0;
  std::string dtype = "float32";
};

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
                   std::string(kWidth - filled, ' ').c_str(), static_cast<int>(fraction * 100), done, total_, seconds);
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
  std::optional<Clock::time_point> first_decode_sent;  // the decode span runs from here to last_decode_done
  Clock::time_point last_prefill_done{}, last_decode_done{};
  std::optional<Status> first_error;
};

double SecondsBetween(Clock::time_point from, Clock::time_point to) {
  return to > from ? std::chrono::duration<double>(to - from).count() : 0.0;
}

double PerSecond(double count, double seconds) { return seconds > 0 ? count / seconds : 0.0; }

int RunSessionDemo(Client& client, const DemoFlags& flags, const std::string& model_flag) {
  const int64_t tokens = flags.tokens;
  const int64_t prefill = flags.prefill;
  const int64_t num_sessions = flags.sessions;
  const uint64_t seed = static_cast<uint64_t>(flags.seed);
  const DataType dtype = DtypeOf(flags.dtype);

  StatusOr<ModelInfo> model = PickModel(client, model_flag);
  if (!model.ok()) return Fail(model.status());
  const int64_t layers = static_cast<int64_t>(model->layers.size());
  if (layers == 0) return Fail(Status(StatusCode::kFailedPrecondition, "model " + model->name + " has no layers"));
  // Enough steps in flight for one token of every session through every layer twice over, so the server
  // always has the next batch queued while it computes the current one.
  const int64_t window = flags.window > 0 ? flags.window : 2 * layers * num_sessions;

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
      if (!is_prefill && !state.first_decode_sent) state.first_decode_sent = Clock::now();
    }
    StepRequest request;
    request.layer = static_cast<int32_t>(layer);
    request.position = position;
    request.timeout = client.options().default_timeout;
    StatusOr<HostTensor> x = RandomTensor({1, length, model->layers[static_cast<size_t>(layer)].dim}, dtype, rng);
    Status failure;
    if (x.ok()) {
      request.x = std::move(*x);
      const auto sent = Clock::now();
      StatusOr<uint64_t> submitted =
          stream.Submit(session, std::move(request), [&state, sent, is_prefill](StatusOr<StepOutput> out) {
            const auto done = Clock::now();
            const double ms = std::chrono::duration<double, std::milli>(done - sent).count();
            std::lock_guard<std::mutex> lock(state.mu);
            --state.in_flight;
            ++state.completed;
            if (out.ok()) {
              (is_prefill ? state.prefill_ms : state.decode_ms).push_back(ms);
              Clock::time_point& last = is_prefill ? state.last_prefill_done : state.last_decode_done;
              last = std::max(last, done);
              state.server_compute_ms.push_back(std::chrono::duration<double, std::milli>(out->compute_time).count());
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
        return Fail(Status(StatusCode::kInternal, "session " + session.id() + " layer " + std::to_string(layer) +
                                                      " holds " + std::to_string(info->layer_positions[layer]) +
                                                      " tokens, expected " + std::to_string(prefill + tokens)));
      }
    }
  }
  for (Session& session : sessions) {
    StatusOr<SessionInfo> closed = session.Close();
    if (!closed.ok()) return Fail(closed.status());
  }

  // Prefill and decode separately: each phase's tokens (through every layer) over its own span. The phases
  // overlap (one session decodes while another's prefill runs), so the two spans may too; decode latencies
  // include waiting behind other sessions' prefill chunks, as they would in serving.
  const double prefill_seconds = SecondsBetween(start, state.last_prefill_done);
  const double decode_seconds =
      state.first_decode_sent ? SecondsBetween(*state.first_decode_sent, state.last_decode_done) : 0.0;
  const double prefill_tokens = static_cast<double>(num_sessions * prefill);
  const double decode_tokens = static_cast<double>(num_sessions * tokens);
  std::printf("model %s: %" PRId64 " session(s), prefill %" PRId64 " + %" PRId64 " tokens, %" PRId64
              " layers, in %.3f s\n",
              model->name.c_str(), num_sessions, prefill, tokens, layers, seconds);
  if (prefill > 0) {
    std::printf("prefill: %.0f tokens in %.3f s, %.1f tokens/s (every layer); step p50 %.3f ms  p99 %.3f ms\n",
                prefill_tokens, prefill_seconds, PerSecond(prefill_tokens, prefill_seconds),
                Percentile(state.prefill_ms, 50), Percentile(state.prefill_ms, 99));
  }
  std::printf(
      "decode: %.0f tokens in %.3f s, %.1f tokens/s (every layer); step p50 %.3f ms  p99 %.3f ms  (server: "
      "queue p50 %.3f ms, compute p50 %.3f ms)\n",
      decode_tokens, decode_seconds, PerSecond(decode_tokens, decode_seconds), Percentile(state.decode_ms, 50),
      Percentile(state.decode_ms, 99), Percentile(state.server_queue_ms, 50), Percentile(state.server_compute_ms, 50));
  std::printf("throughput: %.1f tokens/s (decode, every layer), %.1f steps/s (all steps over %.3f s)\n",
              PerSecond(decode_tokens, decode_seconds), PerSecond(static_cast<double>(total), seconds), seconds);
  return 0;
}

}  // namespace

Command AddSessionDemo(CLI::App& app) {
  auto flags = std::make_shared<DemoFlags>();
  CLI::App* sub =
      app.add_subcommand("session-demo", "stream N tokens through every layer of K sessions on one multiplexed stream");
  mqa::command_line::AddInt(*sub, "--tokens", &flags->tokens, 0, "decode tokens per session")->capture_default_str();
  mqa::command_line::AddInt(*sub, "--prefill", &flags->prefill, 0, "prefill tokens per session, one step per layer")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--sessions", &flags->sessions, 1, "sessions, all on the one stream")
      ->capture_default_str();
  mqa::command_line::AddInt(*sub, "--window", &flags->window, 1,
                            "steps in flight at most (default: 2 x layers x sessions)");
  mqa::command_line::AddInt(*sub, "--seed", &flags->seed, 0, "seed of the random inputs")->capture_default_str();
  AddDtypeFlag(*sub, &flags->dtype, "dtype of the inputs")->capture_default_str();
  return Command{
      sub, [flags](Client& client, const CommonFlags& common) { return RunSessionDemo(client, *flags, common.model); }};
}

}  // namespace mqa::client::cli
