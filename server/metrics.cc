#include "server/metrics.h"

// The one file that includes cpp-httplib: it pulls in OpenSSL, zlib and brotli headers (Debian builds the
// library with them, and the declarations must match that build), which no other translation unit needs.
#include <httplib.h>
#include <netdb.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "server/logging.h"
#include "server/metrics_engine.h"
#include "server/metrics_text.h"

namespace mqa::server {
namespace {

constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

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
  w.SampleDouble(
      "mqa_kv_cache_usage_ratio", "",
      st.kv_blocks_total > 0
          ? std::clamp(static_cast<double>(st.kv_blocks_used) / static_cast<double>(st.kv_blocks_total), 0.0, 1.0)
          : 0.0);
  w.Gauge("mqa_kv_cache_block_size_tokens", "Tokens per KV-cache block.", st.kv_block_size);
  w.Gauge("mqa_kv_cache_blocks", "Allocatable KV-cache blocks, all devices and models.", st.kv_blocks_total);
  w.Gauge("mqa_kv_cache_blocks_used", "KV-cache blocks held by sessions, all devices and models.", st.kv_blocks_used);

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
  w.Header("mqa_step_duration_seconds", "histogram", "Server-side time of completed steps: queue wait plus compute.");
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
  RenderExecution(st, w);

  w.Counter("mqa_kv_cache_exhausted_total", "Sessions or steps refused for want of free KV-cache blocks.",
            st.kv_exhausted);
  w.Header("mqa_requests_dropped_total", "counter",
           "Steps and forwards dropped before compute: cancelled by the client or past their deadline.");
  w.Sample("mqa_requests_dropped_total", "reason=\"cancelled\"", st.dropped_cancelled);
  w.Sample("mqa_requests_dropped_total", "reason=\"deadline\"", st.dropped_deadline);
  w.Counter("mqa_steps_replayed_total",
            "Repeats of already applied steps (same session, layer, position and input) answered with the kept "
            "answer instead of being applied twice: clients retrying after a lost answer.",
            st.steps_replayed);
  w.Gauge("mqa_replay_bytes", "Bytes of last step answers kept for such retries (--replay-budget-bytes bounds it).",
          st.replay_bytes);
  w.Gauge("mqa_draining", "1 while the server drains (after SIGTERM), else 0.", draining ? 1 : 0);
  w.Header("mqa_build_info", "gauge", "Always 1; the labels describe the running server.");
  w.Sample("mqa_build_info", std::string("version=\"") + kServerVersion + "\"", int64_t{1});
  return w.Take();
}

// What follows serves /metrics. cpp-httplib (0.11.4 in Debian 12) bounds each read of a request, not the whole
// request, so a client trickling one header byte every few seconds would keep a worker forever; its thread pool
// is fixed, so a few such clients starve every scrape; and its stop() joins that pool, so they also hold the
// process at exit. The library is kept for parsing, routing and writing answers, but its connection handling is
// replaced through its two extension points: the task queue (a thread per connection, up to a limit) and the
// virtual process_and_close_socket (the keep-alive loop over a stream of our own, with a total deadline per
// request and a wake-up from Stop()).
namespace {

using Clock = std::chrono::steady_clock;

// Answers being written when Stop() is called get this long to finish; reads end at once.
constexpr auto kStopWriteGrace = std::chrono::milliseconds(250);
// Requests on one kept-alive connection; Prometheus sends one per scrape interval, and each connection is also
// bounded by the idle and request timeouts.
constexpr size_t kMaxRequestsPerConnection = 100;
// Stop() waits this long at most for the connection threads. They end within kStopWriteGrace of it, so only a
// bug could use it up; then they are left running, with all they use, rather than holding the exit.
constexpr auto kStopWait = std::chrono::seconds(2);

constexpr char kBusyAnswer[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

// Shared by the accept thread, the connection threads (each holds a reference, so that this outlives
// MetricsHttpServer if Stop() stops waiting for them) and Stop().
struct HttpState {
  explicit HttpState(const MetricsHttpOptions& o) : options(o), wake_fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  ~HttpState() {
    if (wake_fd >= 0) close(wake_fd);
  }
  HttpState(const HttpState&) = delete;
  HttpState& operator=(const HttpState&) = delete;

  const MetricsHttpOptions options;
  const int wake_fd;  // readable from Stop() on: wakes every connection's poll()
  std::atomic<bool> stopping{false};
  std::atomic<Clock::rep> stop_at{0};  // Clock time of Stop(); stored before stopping

  std::mutex mu;
  std::condition_variable cv;  // connections or rendering went down, or the listener exited
  size_t connections = 0;      // connection threads running
  size_t rendering = 0;        // render calls in progress
  bool listener_exited = false;
};

// Set while the accept thread runs a connection past the limit: process_and_close_socket only refuses it.
thread_local bool t_refuse = false;

// A socket stream whose reads and writes wait at most until the current request's deadline and return early
// once Stop() is called (writes get kStopWriteGrace more). Reads are buffered: httplib reads a request line and
// its headers one byte per call.
class DeadlineStream : public httplib::Stream {
 public:
  DeadlineStream(socket_t sock, const HttpState& state) : sock_(sock), state_(state) {}

  void set_deadline(Clock::time_point deadline) { deadline_ = deadline; }
  // True when a byte can be read (or the peer has closed) before limit and before Stop().
  bool WaitReadable(Clock::time_point limit) const { return pos_ < len_ || Wait(POLLIN, limit, false); }

  bool is_readable() const override { return WaitReadable(deadline_); }
  bool is_writable() const override { return Wait(POLLOUT, deadline_, true); }

  ssize_t read(char* ptr, size_t size) override {
    while (pos_ == len_) {
      if (!Wait(POLLIN, deadline_, false)) return -1;
      const ssize_t n = recv(sock_, buf_, sizeof(buf_), MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
      if (n <= 0) return n;
      pos_ = 0;
      len_ = static_cast<size_t>(n);
    }
    const size_t n = std::min(size, len_ - pos_);
    std::memcpy(ptr, buf_ + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    size_t done = 0;
    while (done < size) {
      if (!Wait(POLLOUT, deadline_, true)) return -1;
      const ssize_t n = send(sock_, ptr + done, size - done, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
      if (n < 0) return -1;
      done += static_cast<size_t>(n);
    }
    return static_cast<ssize_t>(size);
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { Address(true, ip, port); }
  void get_local_ip_and_port(std::string& ip, int& port) const override { Address(false, ip, port); }
  socket_t socket() const override { return sock_; }

 private:
  // Waits for events on the socket until limit; false on timeout, error or (for reads) Stop().
  bool Wait(short events, Clock::time_point limit, bool writing) const {
    for (;;) {
      const bool stopping = state_.stopping.load(std::memory_order_acquire);
      if (stopping) {
        if (!writing) return false;
        const Clock::time_point stop_at(Clock::duration(state_.stop_at.load(std::memory_order_relaxed)));
        limit = std::min(limit, stop_at + std::chrono::duration_cast<Clock::duration>(kStopWriteGrace));
      }
      const Clock::time_point now = Clock::now();
      if (now >= limit) return false;
      const int64_t left_ms = std::chrono::ceil<std::chrono::milliseconds>(limit - now).count();
      pollfd fds[2] = {{sock_, events, 0}, {state_.wake_fd, POLLIN, 0}};
      // Once stopping, the wake-up fd stays readable: leave it out or this would spin.
      const int r =
          poll(fds, stopping || state_.wake_fd < 0 ? 1 : 2, static_cast<int>(std::min<int64_t>(left_ms, INT_MAX)));
      if (r < 0 && errno != EINTR) return false;
      // Ready, or an error or hang-up that the following recv or send reports.
      if (r > 0 && fds[0].revents != 0) return true;
    }
  }

  void Address(bool peer, std::string& ip, int& port) const {
    ip.clear();
    port = 0;
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    auto* a = reinterpret_cast<sockaddr*>(&addr);
    if ((peer ? getpeername(sock_, a, &len) : getsockname(sock_, a, &len)) != 0) return;
    char host[NI_MAXHOST];
    char serv[NI_MAXSERV];
    if (getnameinfo(a, len, host, sizeof(host), serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV) != 0) return;
    ip = host;
    port = std::atoi(serv);
  }

  const socket_t sock_;
  const HttpState& state_;
  Clock::time_point deadline_;
  char buf_[4096];
  size_t pos_ = 0;
  size_t len_ = 0;
};

// Runs each connection on a thread of its own, up to options.max_connections, so that a slow client holds only
// its own thread and can delay nobody else's scrape. A connection past the limit runs on the accept thread with
// t_refuse set, which answers 503 without reading and closes it.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(std::shared_ptr<HttpState> state) : state_(std::move(state)) {}

  void enqueue(std::function<void()> fn) override {
    bool admitted = false;
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      admitted = state_->connections < state_->options.max_connections;
      if (admitted) ++state_->connections;
    }
    if (admitted) {
      try {
        // Detached: Stop() waits for `connections` to reach 0, with a bound, instead of joining.
        std::thread([state = state_, fn] {
          fn();
          {
            std::lock_guard<std::mutex> lock(state->mu);
            --state->connections;
          }
          state->cv.notify_all();
        }).detach();
        return;
      } catch (const std::system_error&) {  // no thread to be had: refuse this one
        std::lock_guard<std::mutex> lock(state_->mu);
        --state_->connections;
      }
    }
    t_refuse = true;
    fn();
    t_refuse = false;
  }

  // httplib calls this when its accept loop ends, and ThreadPool's joined the workers there, without a bound.
  // Stop() does the waiting instead.
  void shutdown() override {}

 private:
  std::shared_ptr<HttpState> state_;
};

class MetricsHttpd : public httplib::Server {
 public:
  explicit MetricsHttpd(std::shared_ptr<HttpState> state) : state_(std::move(state)) {}

  // httplib listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, fixed when Debian built it). A burst of more
  // connections than that, before the accept thread runs, overflows it, and Linux then drops the next SYNs:
  // those clients connect only after their SYN is resent, 1 s later and more. Listening again changes the
  // backlog of the bound socket.
  bool WidenBacklog() { return ::listen(svr_sock_, SOMAXCONN) == 0; }

 private:
  // Replaces httplib's keep-alive loop, which reads through its own per-read-timeout stream.
  bool process_and_close_socket(socket_t sock) override {
    bool ok = false;
    if (t_refuse) {
      // Best effort and never blocking: this runs on the accept thread.
      (void)send(sock, kBusyAnswer, sizeof(kBusyAnswer) - 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    } else {
      const MetricsHttpOptions& o = state_->options;
      DeadlineStream stream(sock, *state_);
      stream.set_deadline(Clock::now() + o.request_timeout);  // a new connection's first request: from its accept
      for (size_t n = 0; n < kMaxRequestsPerConnection; ++n) {
        if (n > 0) {
          if (!stream.WaitReadable(Clock::now() + o.idle_timeout)) break;
          stream.set_deadline(Clock::now() + o.request_timeout);
        }
        const bool last = n + 1 == kMaxRequestsPerConnection || state_->stopping.load(std::memory_order_acquire);
        bool closed = false;
        ok = process_request(stream, last, closed, nullptr);
        if (!ok || closed) break;
      }
    }
    ::shutdown(sock, SHUT_RDWR);
    close(sock);
    return ok;
  }

  std::shared_ptr<HttpState> state_;
};

}  // namespace

struct MetricsHttpServer::Impl {
  explicit Impl(const MetricsHttpOptions& options) : state(std::make_shared<HttpState>(options)), http(state) {}

  std::shared_ptr<HttpState> state;
  MetricsHttpd http;
  std::thread thread;
  std::atomic<bool> exited{false};
  bool stopped = false;
};

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl, int port) : impl_(std::move(impl)), port_(port) {}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

core::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const std::string& listen,
                                                                            std::function<std::string()> render,
                                                                            const MetricsHttpOptions& options) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(listen, &host, &port)) {
    return core::InvalidArgumentError("metrics: expected host:port, got '" + listen + "'");
  }
  if (options.max_connections == 0) return core::InvalidArgumentError("metrics: max_connections must be >= 1");
  auto impl = std::make_unique<Impl>(options);
  if (impl->state->wake_fd < 0) return core::UnavailableError("metrics: eventfd failed");
  httplib::Server& http = impl->http;
  http.new_task_queue = [state = impl->state] { return new ConnectionThreads(state); };
  // httplib's default socket options add SO_REUSEPORT, which would let a second server bind the same port and
  // silently split the scrapes; SO_REUSEADDR alone still allows a quick restart.
  http.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  http.Get("/metrics",
           [state = impl->state, render = std::move(render)](const httplib::Request&, httplib::Response& res) {
             // render reads the engine and the service, which the owner destroys once Stop() returns: Stop() waits for
             // the renders in progress (they depend on no client) and none starts after it.
             {
               std::lock_guard<std::mutex> lock(state->mu);
               if (state->stopping.load(std::memory_order_relaxed)) {
                 res.status = 503;
                 return;
               }
               ++state->rendering;
             }
             struct Done {
               HttpState& s;
               ~Done() {
                 {
                   std::lock_guard<std::mutex> lock(s.mu);
                   --s.rendering;
                 }
                 s.cv.notify_all();
               }
             } done{*state};
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
  if (!impl->http.WidenBacklog()) return core::UnavailableError("metrics: listen() on " + listen + " failed");
  Impl* raw = impl.get();
  raw->thread = std::thread([raw] {
    raw->http.listen_after_bind();
    raw->exited.store(true);
    {
      std::lock_guard<std::mutex> lock(raw->state->mu);
      raw->state->listener_exited = true;
    }
    raw->state->cv.notify_all();
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
  HttpState& st = *impl_->state;
  {
    std::unique_lock<std::mutex> lock(st.mu);
    st.stop_at.store(Clock::now().time_since_epoch().count(), std::memory_order_relaxed);
    st.stopping.store(true, std::memory_order_release);
    st.cv.wait(lock, [&] { return st.rendering == 0; });
  }
  // Fails only on a bug; connections would then notice at their deadlines, and the bounded wait below holds.
  const uint64_t one = 1;
  [[maybe_unused]] const ssize_t woken = write(st.wake_fd, &one, sizeof(one));
  impl_->http.stop();
  bool done = false;
  size_t left = 0;
  {
    std::unique_lock<std::mutex> lock(st.mu);
    done = st.cv.wait_for(lock, kStopWait, [&] { return st.connections == 0 && st.listener_exited; });
    left = st.connections;
  }
  if (done) {
    impl_->thread.join();
    return;
  }
  // The threads still use the httplib server and the state: leave them (and it) be; the process is on its way
  // out, and exiting on time matters more than this memory.
  LogWarn("metrics_stop_timeout", {{"connections_left", static_cast<uint64_t>(left)}});
  impl_->thread.detach();
  (void)impl_.release();
}

}  // namespace mqa::server
