#include "server/metrics.h"

// The one file that includes cpp-httplib: it pulls in OpenSSL, zlib and brotli headers (Debian builds the
// library with them, and the declarations must match that build), which no other translation unit needs.
#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <thread>
#include <utility>

namespace mqa::server {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

// Appends lines of the text exposition format. Values are integers or finite doubles, label values are fixed
// words from this file or device names ("cpu", "cuda:N"), so nothing needs escaping.
class Writer {
 public:
  void Header(const char* name, const char* type, const char* help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  void Sample(const std::string& name, const std::string& labels, uint64_t value) {
    Line(name, labels, std::to_string(value));
  }
  void Sample(const std::string& name, const std::string& labels, int64_t value) {
    Line(name, labels, std::to_string(value));
  }
  void SampleDouble(const std::string& name, const std::string& labels, double value) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.17g", value);  // round-trips: a scrape loses no precision
    Line(name, labels, buf);
  }
  // Scalars for the common unlabelled case.
  void Gauge(const char* name, const char* help, int64_t value) {
    Header(name, "gauge", help);
    Sample(name, "", value);
  }
  void Counter(const char* name, const char* help, uint64_t value) {
    Header(name, "counter", help);
    Sample(name, "", value);
  }
  std::string Take() { return std::move(out_); }

 private:
  void Line(const std::string& name, const std::string& labels, const std::string& value) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      out_ += labels;
      out_ += '}';
    }
    out_ += ' ';
    out_ += value;
    out_ += '\n';
  }

  std::string out_;
};

std::string Le(double bound) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "le=\"%g\"", bound);
  return buf;
}

void RenderBatchSizes(const core::EngineStats& st, Writer& w) {
  // EngineStats counts passes per power-of-two range: [0] is size 1, [i] is size in (2^(i-1), 2^i]. The sum
  // of [0..i] is therefore exactly the number of passes with size <= 2^i, which is Prometheus' cumulative le
  // bucket. Sizes above the last bound shown only reach +Inf.
  constexpr size_t kBuckets = 10;  // le = 1, 2, 4, ..., 512
  const char* name = "mqa_batch_size";
  w.Header(name, "histogram", "Steps (or prefill chunks) per batched pass, one observation per pass.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    if (i < st.batch_size_histogram.size()) cumulative += st.batch_size_histogram[i];
    w.Sample("mqa_batch_size_bucket", Le(static_cast<double>(uint64_t{1} << i)), cumulative);
  }
  for (size_t i = kBuckets; i < st.batch_size_histogram.size(); ++i) cumulative += st.batch_size_histogram[i];
  w.Sample("mqa_batch_size_bucket", "le=\"+Inf\"", cumulative);
  w.Sample("mqa_batch_size_sum", "", st.batched_steps);
  // The count is the +Inf bucket by definition; taking it from the same array keeps the two equal even when a
  // pass completes between the engine's updates of `batches` and of the histogram.
  w.Sample("mqa_batch_size_count", "", cumulative);
}

// The same numbers per device (label device="cpu" or "cuda:N"; each device's worker, pools and sessions). The
// unlabelled gauges above are their sums, so dashboards that ignore devices keep working.
void RenderDevices(const core::EngineStats& st, Writer& w) {
  struct Gauge {
    const char* name;
    const char* help;
    int64_t (*value)(const core::DeviceStats&);
  };
  static constexpr Gauge kGauges[] = {
      {"mqa_device_queued_requests", "Steps and forwards waiting in one device's queue.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.queue_depth); }},
      {"mqa_device_running_requests", "Steps and forwards being computed now on one device.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.running); }},
      {"mqa_device_sessions", "Open sessions whose model replica lives on one device.",
       [](const core::DeviceStats& d) { return static_cast<int64_t>(d.sessions_open); }},
      {"mqa_device_kv_cache_blocks", "Allocatable KV-cache blocks on one device, all its models.",
       [](const core::DeviceStats& d) { return d.kv_blocks_total; }},
      {"mqa_device_kv_cache_blocks_used", "KV-cache blocks held by sessions on one device, all its models.",
       [](const core::DeviceStats& d) { return d.kv_blocks_used; }},
  };
  for (const Gauge& g : kGauges) {
    w.Header(g.name, "gauge", g.help);
    for (const core::DeviceStats& d : st.devices) w.Sample(g.name, "device=\"" + d.device + "\"", g.value(d));
  }
}

// "host:port" or "[v6]:port" (validated by LoadConfig) into the host getaddrinfo wants and the port.
bool SplitHostPort(const std::string& listen, std::string* host, int* port) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 >= listen.size()) return false;
  std::string h = listen.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  const std::string p = listen.substr(colon + 1);
  if (!std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; }) || p.size() > 5) return false;
  *port = std::stoi(p);
  *host = std::move(h);
  return *port <= 65535;
}

}  // namespace

void ServiceMetrics::RecordError(core::StatusCode code) {
  int i = static_cast<int>(code);
  if (i == 0) return;
  if (i < 0 || i >= kNumCodes) i = static_cast<int>(core::StatusCode::kUnknown);
  errors_[i].fetch_add(1, std::memory_order_relaxed);
}

void ServiceMetrics::RecordStepDuration(int64_t micros) {
  const uint64_t us = micros > 0 ? static_cast<uint64_t>(micros) : 0;
  const double seconds = static_cast<double>(us) / 1e6;
  const auto it = std::lower_bound(kStepDurationBuckets.begin(), kStepDurationBuckets.end(), seconds);
  step_buckets_[static_cast<size_t>(it - kStepDurationBuckets.begin())].fetch_add(1, std::memory_order_relaxed);
  step_sum_us_.fetch_add(us, std::memory_order_relaxed);
  step_count_.fetch_add(1, std::memory_order_relaxed);
}

uint64_t ServiceMetrics::errors(core::StatusCode code) const {
  const int i = static_cast<int>(code);
  if (i <= 0 || i >= kNumCodes) return 0;
  return errors_[i].load(std::memory_order_relaxed);
}

std::string ServiceMetrics::Render(const core::EngineStats& st, bool draining) const {
  Writer w;
  // The gauges the Gateway API Inference Extension's endpoint picker reads from a model server.
  w.Gauge("mqa_queued_requests", "Steps and forwards waiting in the engine's queues, all devices.",
          static_cast<int64_t>(st.queue_depth));
  w.Gauge("mqa_running_requests", "Steps and forwards being computed now, all devices.",
          static_cast<int64_t>(st.running));
  w.Header("mqa_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache blocks in use (0 to 1), all devices.");
  w.SampleDouble("mqa_kv_cache_usage_ratio", "",
                 st.kv_blocks_total > 0
                     ? std::clamp(static_cast<double>(st.kv_blocks_used) / static_cast<double>(st.kv_blocks_total),
                                  0.0, 1.0)
                     : 0.0);
  w.Gauge("mqa_kv_cache_block_size_tokens", "Tokens per KV-cache block.", st.kv_block_size);
  w.Gauge("mqa_kv_cache_blocks", "Allocatable KV-cache blocks, all devices and models.", st.kv_blocks_total);
  w.Gauge("mqa_kv_cache_blocks_used", "KV-cache blocks held by sessions, all devices and models.",
          st.kv_blocks_used);

  w.Header("mqa_sessions", "gauge",
           "Open sessions: active ones have steps queued or running, idle ones have nothing in flight.");
  w.Sample("mqa_sessions", "state=\"active\"", static_cast<int64_t>(st.sessions_active));
  w.Sample("mqa_sessions", "state=\"idle\"", static_cast<int64_t>(st.sessions_idle));
  w.Counter("mqa_sessions_created_total", "Sessions created.", st.sessions_created);
  w.Header("mqa_sessions_evicted_total", "counter",
           "Sessions ended, by reason: closed by CloseSession or expired after their idle TTL.");
  w.Sample("mqa_sessions_evicted_total", "reason=\"closed\"", st.sessions_closed);
  w.Sample("mqa_sessions_evicted_total", "reason=\"expired\"", st.sessions_expired);

  w.Counter("mqa_steps_total", "Steps completed successfully.", st.steps_completed);
  w.Header("mqa_step_errors_total", "counter",
           "Failed RPCs (unary calls) and failed streamed steps, by gRPC status code.");
  for (int i = 1; i < kNumCodes; ++i) {
    const auto code = static_cast<core::StatusCode>(i);
    w.Sample("mqa_step_errors_total", "code=\"" + std::string(core::StatusCodeName(code)) + "\"",
             errors_[i].load(std::memory_order_relaxed));
  }

  // Bucket counts are read one by one while steps complete; the count is taken as their sum so that a scrape
  // is always self-consistent (+Inf == _count), at the price of _sum perhaps being one step ahead.
  w.Header("mqa_step_duration_seconds", "histogram",
           "Server-side time of completed steps: queue wait plus compute.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kStepDurationBuckets.size(); ++i) {
    cumulative += step_buckets_[i].load(std::memory_order_relaxed);
    w.Sample("mqa_step_duration_seconds_bucket", Le(kStepDurationBuckets[i]), cumulative);
  }
  cumulative += step_buckets_.back().load(std::memory_order_relaxed);
  w.Sample("mqa_step_duration_seconds_bucket", "le=\"+Inf\"", cumulative);
  w.SampleDouble("mqa_step_duration_seconds_sum", "",
                 static_cast<double>(step_sum_us_.load(std::memory_order_relaxed)) / 1e6);
  w.Sample("mqa_step_duration_seconds_count", "", cumulative);

  RenderBatchSizes(st, w);
  RenderDevices(st, w);

  w.Counter("mqa_kv_cache_exhausted_total", "Sessions or steps refused for want of free KV-cache blocks.",
            st.kv_exhausted);
  w.Header("mqa_requests_dropped_total", "counter",
           "Steps and forwards dropped before compute: cancelled by the client or past their deadline.");
  w.Sample("mqa_requests_dropped_total", "reason=\"cancelled\"", st.dropped_cancelled);
  w.Sample("mqa_requests_dropped_total", "reason=\"deadline\"", st.dropped_deadline);
  w.Gauge("mqa_draining", "1 while the server drains (after SIGTERM), else 0.", draining ? 1 : 0);
  w.Header("mqa_build_info", "gauge", "Always 1; the labels describe the running server.");
  w.Sample("mqa_build_info", std::string("version=\"") + kServerVersion + "\"", int64_t{1});
  return w.Take();
}

struct MetricsHttpServer::Impl {
  httplib::Server http;
  std::thread thread;
  std::atomic<bool> exited{false};
  bool stopped = false;
};

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl, int port) : impl_(std::move(impl)), port_(port) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

core::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& listen,
                                                                            std::function<std::string()> render) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(listen, &host, &port)) {
    return core::InvalidArgumentError("metrics: expected host:port, got '" + listen + "'");
  }
  auto impl = std::make_unique<Impl>();
  httplib::Server& http = impl->http;
  // Scrapes are rare and cheap: two threads are plenty, and httplib's default (one per core) is not needed.
  http.new_task_queue = [] { return new httplib::ThreadPool(2); };
  // httplib's default socket options add SO_REUSEPORT, which would let a second server bind the same port and
  // silently split the scrapes; SO_REUSEADDR alone still allows a quick restart.
  http.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  // A kept-alive connection holds a worker until its timeout, and Stop() waits for the workers: keep it short.
  // Prometheus scrapes every few seconds at most, so little reuse is lost.
  http.set_keep_alive_timeout(1);
  http.Get("/metrics", [render = std::move(render)](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), kContentType);
  });

  if (port == 0) {
    port = http.bind_to_any_port(host);
    if (port < 0) port = 0;
  } else if (!http.bind_to_port(host, port)) {
    port = 0;
  }
  if (port <= 0) {
    return core::UnavailableError("metrics: cannot listen on " + listen + " (address in use or not valid?)");
  }
  Impl* raw = impl.get();
  raw->thread = std::thread([raw] {
    raw->http.listen_after_bind();
    raw->exited.store(true);
  });
  // httplib's stop() does nothing until the accept loop has started, so wait for it; otherwise an early
  // Stop() would leave the thread accepting forever.
  while (!raw->http.is_running() && !raw->exited.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!raw->http.is_running()) {
    raw->thread.join();
    return core::UnavailableError("metrics: the HTTP server on " + listen + " stopped at once");
  }
  return std::unique_ptr<MetricsHttpServer>(new MetricsHttpServer(std::move(impl), port));
}

void MetricsHttpServer::Stop() {
  if (!impl_ || impl_->stopped) return;
  impl_->stopped = true;
  impl_->http.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

}  // namespace mqa::server
