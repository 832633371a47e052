// Prometheus metrics: a small registry of the counters only the service sees (failed RPCs and steps by gRPC
// code, step latency), rendered together with a snapshot of the engine's statistics in the Prometheus text
// exposition format 0.0.4; and MetricsHttpServer, which serves that text on GET /metrics.
//
// docs/metrics.md lists every metric. Names follow Prometheus' conventions: an "mqa_" prefix, the unit in the
// name, "_total" for counters, "_seconds" for durations.
//
// Thread-safety: ServiceMetrics' Record* functions and Render may be called from any thread at any time (gRPC
// threads, engine workers, the HTTP thread). MetricsHttpServer's functions are called by its owner only.
#ifndef MQA_SERVER_METRICS_H_
#define MQA_SERVER_METRICS_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"

namespace mqa::server {

inline constexpr char kServerVersion[] = "0.1.0";

class ServiceMetrics {
 public:
  // Upper bounds (seconds) of mqa_step_duration_seconds' buckets, ascending; +Inf is implied.
  static constexpr std::array<double, 14> kStepDurationBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                  0.1,    0.25,  0.5,    1,     2.5,  5,     10};

  // A failed unary RPC or streamed step. OK is ignored; codes outside the canonical 0..16 count as UNKNOWN.
  void RecordError(core::StatusCode code);
  // A completed step's server-side time: queue wait plus compute, in microseconds (negative counts as 0).
  void RecordStepDuration(int64_t micros);

  uint64_t errors(core::StatusCode code) const;

  // The whole exposition: the engine snapshot, `draining` (mqa_draining), build info and this registry.
  std::string Render(const core::EngineStats& stats, bool draining) const;

 private:
  static constexpr int kNumCodes = 17;  // OK .. UNAUTHENTICATED

  std::array<std::atomic<uint64_t>, kNumCodes> errors_{};
  // Non-cumulative per bucket (the last one is +Inf); made cumulative when rendered.
  std::array<std::atomic<uint64_t>, kStepDurationBuckets.size() + 1> step_buckets_{};
  std::atomic<uint64_t> step_count_{0};
  std::atomic<uint64_t> step_sum_us_{0};
};

// Limits of MetricsHttpServer's connections. A scraper sends a few hundred bytes at once, so they only bite on
// clients that are slow or hostile.
struct MetricsHttpOptions {
  // Connections served at once, each on its own thread; one more is answered 503 and closed at once.
  size_t max_connections = 64;
  // The most time one request may take from its first byte (a new connection: from its accept) to the last
  // byte of its answer. A total, so that a client trickling one byte at a time is cut as surely as a silent one.
  std::chrono::milliseconds request_timeout{5000};
  // How long a kept-alive connection may wait for its next request.
  std::chrono::milliseconds idle_timeout{5000};
};

// An HTTP server answering GET /metrics with render()'s text (Content-Type
// "text/plain; version=0.0.4; charset=utf-8"); other paths are 404. It runs on its own threads (one accepting,
// one per connection) until Stop() or destruction.
class MetricsHttpServer {
 public:
  // Binds listen ("host:port", IPv6 hosts in brackets; port 0 = any free port) and starts serving.
  // UNAVAILABLE when the address cannot be bound. render is called on the HTTP threads, once per scrape.
  static core::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& listen,
                                                                  std::function<std::string()> render,
                                                                  const MetricsHttpOptions& options = {});
  ~MetricsHttpServer();  // Stop()s
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  // Closes the listening socket and every connection, in bounded time whatever the clients do: connections
  // still reading a request are closed at once, answers being written get 250 ms more. Waits for the render
  // calls in progress; none starts afterwards. Idempotent.
  void Stop();

 private:
  struct Impl;
  explicit MetricsHttpServer(std::unique_ptr<Impl> impl, int port);

  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace mqa::server

#endif  // MQA_SERVER_METRICS_H_
