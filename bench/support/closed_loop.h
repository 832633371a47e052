// The closed loop of layer steps that mqa-bench-engine (the engine in process) and mqa-cli bench (the client
// library over gRPC) both drive; they differ only in how one step is sent and how its answer comes back.
// Header-only and templated on the tensor and status types, so it depends on neither core nor the client library.
#ifndef MQA_BENCH_SUPPORT_CLOSED_LOOP_H_
#define MQA_BENCH_SUPPORT_CLOSED_LOOP_H_

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace mqa::bench {

// N sessions each run `rounds` rounds of one step per layer (`step_tokens` tokens each). Layer 0 of round r of
// session i takes inputs[(i + r) % inputs.size()]; layer l > 0 takes layer l - 1's output. A session's next step
// is sent from its current step's completion (Done), so each session has one step in flight and only its own
// chain of callbacks touches its state. Run blocks until every session has finished or failed.
template <typename TensorT, typename StatusT>
class ClosedLoop {
 public:
  using Clock = std::chrono::steady_clock;

  // What one phase measured.
  struct Phase {
    double seconds = 0.0;
    std::vector<double> latency_ms;         // client side: send to completion, every step
    std::vector<double> server_queue_ms;    // the server's queue time of each step
    std::vector<double> server_compute_ms;  // the server's compute time of each step
    int64_t failed = 0;
    std::optional<StatusT> first_error;
  };

  // Sends session i's step of `layer` at `position` with input x. Its completion must call Done(i, ...) or
  // Fail(status), once; so must a send that fails at once.
  using SendFn = std::function<void(size_t i, int64_t layer, int64_t position, TensorT x)>;

  ClosedLoop(size_t sessions, int64_t layers, const std::vector<TensorT>* inputs)
      : n_(sessions), layers_(layers), inputs_(inputs) {}

  Phase Run(int64_t start_position, int64_t step_tokens, int64_t rounds, SendFn send) {
    send_ = std::move(send);
    start_position_ = start_position;
    step_tokens_ = step_tokens;
    rounds_ = rounds;
    sessions_.assign(n_, SessionState());
    result_ = Phase();
    finished_ = 0;
    for (SessionState& s : sessions_) {
      s.latency_ms.reserve(static_cast<size_t>(rounds * layers_));
      s.queue_ms.reserve(static_cast<size_t>(rounds * layers_));
      s.compute_ms.reserve(static_cast<size_t>(rounds * layers_));
    }
    const auto start = Clock::now();
    end_ = start;
    if (rounds > 0) {
      for (size_t i = 0; i < n_; ++i) Submit(i);
    } else {
      finished_ = n_;
    }
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return finished_ == n_; });
    }
    result_.seconds = std::chrono::duration<double>(end_ - start).count();
    for (const SessionState& s : sessions_) {
      result_.latency_ms.insert(result_.latency_ms.end(), s.latency_ms.begin(), s.latency_ms.end());
      result_.server_queue_ms.insert(result_.server_queue_ms.end(), s.queue_ms.begin(), s.queue_ms.end());
      result_.server_compute_ms.insert(result_.server_compute_ms.end(), s.compute_ms.begin(), s.compute_ms.end());
    }
    return std::move(result_);
  }

  // Session i's step completed with `out` and the server's times (ms); sends its next step, if any.
  void Done(size_t i, double server_queue_ms, double server_compute_ms, TensorT out) {
    SessionState& s = sessions_[i];
    const auto now = Clock::now();
    s.latency_ms.push_back(std::chrono::duration<double, std::milli>(now - s.sent).count());
    s.queue_ms.push_back(server_queue_ms);
    s.compute_ms.push_back(server_compute_ms);
    s.next_input = std::move(out);
    if (++s.layer == layers_) {
      s.layer = 0;
      s.next_input = TensorT();
      ++s.round;
    }
    if (s.round < rounds_) {
      Submit(i);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(now);
  }

  // A session's step failed: the session stops; the first error is kept.
  void Fail(const StatusT& status) {
    std::lock_guard<std::mutex> lock(mu_);
    ++result_.failed;
    if (!result_.first_error) result_.first_error = status;
    FinishLocked(Clock::now());
  }

 private:
  struct SessionState {
    int64_t layer = 0;
    int64_t round = 0;
    TensorT next_input;  // the previous layer's output within a round
    Clock::time_point sent;
    std::vector<double> latency_ms, queue_ms, compute_ms;
  };

  void Submit(size_t i) {
    SessionState& s = sessions_[i];
    TensorT x =
        s.layer == 0 ? (*inputs_)[(i + static_cast<size_t>(s.round)) % inputs_->size()] : std::move(s.next_input);
    s.sent = Clock::now();
    send_(i, s.layer, start_position_ + s.round * step_tokens_, std::move(x));
  }

  void FinishLocked(Clock::time_point now) {
    end_ = std::max(end_, now);
    if (++finished_ == n_) cv_.notify_all();
  }

  const size_t n_;
  const int64_t layers_;
  const std::vector<TensorT>* inputs_;
  SendFn send_;
  int64_t start_position_ = 0;
  int64_t step_tokens_ = 1;
  int64_t rounds_ = 0;
  std::vector<SessionState> sessions_;

  std::mutex mu_;
  std::condition_variable cv_;
  size_t finished_ = 0;
  Clock::time_point end_{};
  Phase result_;
};

}  // namespace mqa::bench

#endif  // MQA_BENCH_SUPPORT_CLOSED_LOOP_H_
