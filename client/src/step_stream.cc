#include <grpcpp/support/client_callback.h>

#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "client_impl.h"
#include "convert.h"
#include "mqa/client/client.h"

namespace mqa::client {
namespace {

// Lives apart from the reactor so that OnDone can still signal after the waiter has destroyed the reactor.
struct DoneSignal {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
};

}  // namespace

// The gRPC callback-API reactor behind a StepStream.
//
// gRPC allows one outstanding write per stream, so accepted steps wait in queue_ and are written one by one
// from OnWriteDone. A hold keeps OnDone from firing while more writes may still be started from outside a
// reaction; it is released once the request side is half-closed or the stream has failed. gRPC calls are
// never made with mu_ held: a reaction may run inline and take mu_ itself.
class StepStream::Reactor final : public grpc::ClientBidiReactor<v1::StreamStepsRequest, v1::StreamStepsResponse> {
 public:
  Reactor(std::shared_ptr<Client::Impl> impl, std::optional<std::chrono::system_clock::time_point> deadline,
          std::string routing_key)
      : impl_(std::move(impl)), routing_key_(std::move(routing_key)), done_signal_(std::make_shared<DoneSignal>()) {
    if (deadline) context_.set_deadline(*deadline);
    internal::SetRoutingKey(&context_, routing_key_);
    impl_->stub->async()->StreamSteps(&context_, this);
    AddHold();
    StartRead(&response_);
    StartCall();
  }

  StatusOr<uint64_t> Submit(StepRequest request, StepCallback done) {
    auto message = std::make_unique<v1::StreamStepsRequest>();
    Status valid = internal::StepInputToProto(request.session_id, request.layer, request.x, request.position,
                                              request.timeout, message->mutable_step());
    if (!valid.ok()) return valid;
    v1::StepInput* step = message->mutable_step();
    return Queue(
        std::move(message), [step](uint64_t sequence) { step->set_sequence(sequence); }, pending_, std::move(done));
  }

  StatusOr<uint64_t> SubmitBatch(StepBatchInput batch, StepBatchCallback done) {
    auto message = std::make_unique<v1::StreamStepsRequest>();
    Status valid = internal::StepBatchInputToProto(batch, message->mutable_batch());
    if (!valid.ok()) return valid;
    v1::StepBatchInput* input = message->mutable_batch();
    return Queue(
        std::move(message), [input](uint64_t sequence) { input->set_sequence(sequence); }, pending_batches_,
        std::move(done));
  }

  Status Finish() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      half_close_requested_ = true;
    }
    Pump();
    WaitDone();
    std::lock_guard<std::mutex> lock(mu_);
    return final_status_;
  }

  void Cancel() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      broken_ = true;
    }
    context_.TryCancel();
    Pump();
  }

  void WaitDone() {
    std::unique_lock<std::mutex> lock(done_signal_->mu);
    done_signal_->cv.wait(lock, [this] { return done_signal_->done; });
  }

  bool finished() const {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_;
  }

  size_t pending() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_.size() + pending_batches_.size();
  }

  const std::string& routing_key() const { return routing_key_; }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      write_in_flight_ = false;
      current_write_.reset();
      // A failed write means the call is over; the steps still queued are failed in OnDone with its status.
      if (!ok) broken_ = true;
    }
    Pump();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // No more answers: either the normal end after half-close, or the server ended the call early.
      {
        std::lock_guard<std::mutex> lock(mu_);
        broken_ = true;
      }
      Pump();
      return;
    }
    const Status status = internal::StatusFromProto(response_.status());
    if (response_.has_batch()) {
      StatusOr<StepBatchOutput> outcome =
          status.ok() ? StatusOr<StepBatchOutput>(internal::StepBatchOutputFromProto(response_.batch()))
                      : StatusOr<StepBatchOutput>(status);
      return Answer(pending_batches_, response_.batch().sequence(), std::move(outcome));
    }
    StatusOr<StepOutput> outcome = status.ok() ? StatusOr<StepOutput>(internal::StepOutputFromProto(response_.result()))
                                               : StatusOr<StepOutput>(status);
    Answer(pending_, response_.result().sequence(), std::move(outcome));
  }

  void OnDone(const grpc::Status& status) override {
    std::vector<StepCallback> orphans;
    std::vector<StepBatchCallback> orphan_batches;
    Status stream_status = internal::FromGrpc(status);
    {
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
      broken_ = true;
      final_status_ = stream_status;
      for (auto& entry : pending_) orphans.push_back(std::move(entry.second));
      for (auto& entry : pending_batches_) orphan_batches.push_back(std::move(entry.second));
      pending_.clear();
      pending_batches_.clear();
      queue_.clear();
    }
    // The server ending the call normally with steps unanswered breaks the protocol; say so rather than OK.
    const Status step_status = stream_status.ok()
                                   ? Status(StatusCode::kInternal, "the stream ended before the step was answered")
                                   : stream_status;
    for (auto& callback : orphans) {
      if (callback) callback(step_status);
    }
    for (auto& callback : orphan_batches) {
      if (callback) callback(step_status);
    }
    std::shared_ptr<DoneSignal> signal = done_signal_;  // the reactor may be gone once done is set
    std::lock_guard<std::mutex> lock(signal->mu);
    signal->done = true;
    signal->cv.notify_all();
  }

 private:
  // Why nothing more can be submitted, if so.
  Status RefusalLocked() const {
    if (finished_) {
      return final_status_.ok() ? Status(StatusCode::kFailedPrecondition, "the step stream has finished")
                                : final_status_;
    }
    if (broken_) return Status(StatusCode::kCancelled, "the step stream was cancelled or has failed");
    if (half_close_requested_) return Status(StatusCode::kFailedPrecondition, "the step stream is finishing");
    return Status::Ok();
  }

  // Queues message under the next sequence number (set_sequence writes it into the message) with done waiting
  // for its answer in pending.
  template <class Callback, class SetSequence>
  StatusOr<uint64_t> Queue(std::unique_ptr<v1::StreamStepsRequest> message, SetSequence set_sequence,
                           std::unordered_map<uint64_t, Callback>& pending, Callback done) {
    uint64_t sequence = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (Status refused = RefusalLocked(); !refused.ok()) return refused;
      sequence = next_sequence_++;
      set_sequence(sequence);
      pending.emplace(sequence, std::move(done));
      queue_.push_back(std::move(message));
    }
    Pump();
    return sequence;
  }

  // Hands the answer for `sequence` to the callback waiting for it in pending, after starting the next read.
  template <class Callback, class Outcome>
  void Answer(std::unordered_map<uint64_t, Callback>& pending, uint64_t sequence, Outcome outcome) {
    Callback callback;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending.find(sequence);
      // An answer for a sequence we never sent (or sent twice) has no one to go to; dropping it is all we can do.
      if (it != pending.end()) {
        callback = std::move(it->second);
        pending.erase(it);
      }
    }
    StartRead(&response_);
    if (callback) callback(std::move(outcome));
  }

  // Decides under mu_ what to start next, then starts it without mu_.
  void Pump() {
    const v1::StreamStepsRequest* to_write = nullptr;
    bool writes_done = false;
    bool remove_hold = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!hold_held_ || write_in_flight_) return;
      if (broken_) {
        hold_held_ = false;
        remove_hold = true;
      } else if (!queue_.empty()) {
        current_write_ = std::move(queue_.front());
        queue_.pop_front();
        write_in_flight_ = true;
        to_write = current_write_.get();
      } else if (half_close_requested_) {
        hold_held_ = false;
        writes_done = true;
        remove_hold = true;
      }
    }
    if (to_write) StartWrite(to_write);
    if (writes_done) StartWritesDone();
    if (remove_hold) RemoveHold();
  }

  std::shared_ptr<Client::Impl> impl_;
  const std::string routing_key_;  // sent once, in the stream's request headers
  grpc::ClientContext context_;
  std::shared_ptr<DoneSignal> done_signal_;
  v1::StreamStepsResponse response_;  // only touched by the read chain

  mutable std::mutex mu_;
  std::deque<std::unique_ptr<v1::StreamStepsRequest>> queue_;        // accepted, not yet written
  std::unique_ptr<v1::StreamStepsRequest> current_write_;            // the outstanding write
  std::unordered_map<uint64_t, StepCallback> pending_;               // accepted, not yet answered
  std::unordered_map<uint64_t, StepBatchCallback> pending_batches_;  // the same for batches (one sequence space)
  uint64_t next_sequence_ = 1;
  bool write_in_flight_ = false;
  bool half_close_requested_ = false;
  bool hold_held_ = true;
  bool broken_ = false;    // no more writes: cancelled, failed, or the server ended the call
  bool finished_ = false;  // OnDone ran
  Status final_status_;
};

StepStream::StepStream(std::unique_ptr<Reactor> reactor) : reactor_(std::move(reactor)) {}

StepStream::~StepStream() {
  if (!reactor_) return;
  if (!reactor_->finished()) reactor_->Cancel();
  reactor_->WaitDone();
}

StatusOr<uint64_t> StepStream::Submit(StepRequest request, StepCallback done) {
  return reactor_->Submit(std::move(request), std::move(done));
}

std::future<StatusOr<StepOutput>> StepStream::Submit(StepRequest request) {
  auto promise = std::make_shared<std::promise<StatusOr<StepOutput>>>();
  std::future<StatusOr<StepOutput>> future = promise->get_future();
  StatusOr<uint64_t> submitted = reactor_->Submit(
      std::move(request), [promise](StatusOr<StepOutput> result) { promise->set_value(std::move(result)); });
  if (!submitted.ok()) promise->set_value(submitted.status());
  return future;
}

namespace {

// OK when a step of `session` may go on a stream opened with `stream_key`; sets the request's session id.
Status PrepareSessionStep(const Session& session, const std::string& stream_key, StepRequest* request) {
  if (session.id().empty()) return Status(StatusCode::kInvalidArgument, "the session is closed or released");
  if (session.routing_key() != stream_key) {
    return Status(StatusCode::kInvalidArgument,
                  "session " + session.id() + " has routing key " + session.routing_key() + " but the stream has " +
                      stream_key + "; create the session with SessionOptions::routing_key = stream->routing_key()");
  }
  request->session_id = session.id();
  return Status();
}

}  // namespace

StatusOr<uint64_t> StepStream::Submit(const Session& session, StepRequest request, StepCallback done) {
  Status ready = PrepareSessionStep(session, reactor_->routing_key(), &request);
  if (!ready.ok()) return ready;
  return Submit(std::move(request), std::move(done));
}

std::future<StatusOr<StepOutput>> StepStream::Submit(const Session& session, StepRequest request) {
  Status ready = PrepareSessionStep(session, reactor_->routing_key(), &request);
  if (!ready.ok()) {
    std::promise<StatusOr<StepOutput>> failed;
    failed.set_value(ready);
    return failed.get_future();
  }
  return Submit(std::move(request));
}

StatusOr<uint64_t> StepStream::SubmitBatch(StepBatchInput batch, StepBatchCallback done) {
  return reactor_->SubmitBatch(std::move(batch), std::move(done));
}

std::future<StatusOr<StepBatchOutput>> StepStream::SubmitBatch(StepBatchInput batch) {
  auto promise = std::make_shared<std::promise<StatusOr<StepBatchOutput>>>();
  std::future<StatusOr<StepBatchOutput>> future = promise->get_future();
  StatusOr<uint64_t> submitted = reactor_->SubmitBatch(
      std::move(batch), [promise](StatusOr<StepBatchOutput> result) { promise->set_value(std::move(result)); });
  if (!submitted.ok()) promise->set_value(submitted.status());
  return future;
}

const std::string& StepStream::routing_key() const { return reactor_->routing_key(); }

Status StepStream::Finish() { return reactor_->Finish(); }

void StepStream::Cancel() { reactor_->Cancel(); }

size_t StepStream::pending() const { return reactor_->pending(); }

StatusOr<std::unique_ptr<StepStream>> Client::OpenStream(StreamOptions options) {
  std::optional<std::chrono::system_clock::time_point> deadline;
  const auto length = options.deadline.value_or(impl_->options.default_timeout);
  if (length.count() > 0) deadline = std::chrono::system_clock::now() + length;
  std::string routing_key = options.routing_key.empty() ? NewRoutingKey() : std::move(options.routing_key);
  Status valid_key = internal::ValidateRoutingKey(routing_key, "StreamOptions.routing_key");
  if (!valid_key.ok()) return valid_key;
  auto reactor = std::make_unique<StepStream::Reactor>(impl_, deadline, std::move(routing_key));
  return std::unique_ptr<StepStream>(new StepStream(std::move(reactor)));
}

}  // namespace mqa::client
