// MqaService.StreamSteps: one reactor per stream.
//
// Steps are submitted as they are read; answers are written as the engine completes them (so out of order
// across sessions), one write outstanding at a time as gRPC requires.
//
// Bounds: the stream holds at most ServiceOptions::max_pending_steps_per_stream steps that are unanswered or
// answered but not yet taken by the client, and about max_pending_bytes_per_stream bytes of their answers (an
// unanswered step counts its input's size, which is its answer's size in the same dtype). Past either, the
// reactor stops reading: HTTP/2 flow control then stops the client's sends. A client that never reads its
// answers stalls only its own stream; no step is dropped or failed for it.
//
// A message that does not parse ends the stream: the steps read before it are answered, then the stream
// finishes with INVALID_ARGUMENT; it and anything after it are never read, so never applied.
//
// Lifetime: gRPC calls OnDone once the call is over, but engine completions may still be on their way; the
// reactor deletes itself only when both have happened (done_ and in_flight_ == 0).
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "server/logging.h"
#include "server/raw_call.h"
#include "server/request_checks.h"
#include "server/service.h"
#include "server/service_internal.h"
#include "server/wire.h"

namespace mqa::server {

using core::Status;
using core::StatusOr;

class MqaServiceImpl::StepStreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StepStreamReactor(MqaServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service),
        stream_deadline_(SteadyDeadline(ctx->deadline())),
        cancel_(std::make_shared<core::CancelFlag>()),
        peer_(ctx->peer()) {
    ++service_->open_streams_;
    StartRead(&request_);
  }

  // read_outstanding_ stays true until request_ is no longer touched here: a completion on another thread
  // must not start the next read into it while it is being parsed.
  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the call broke): answer what is in flight, then finish
      std::lock_guard<std::mutex> lock(mu_);
      reads_done_ = true;
      read_outstanding_ = false;
      MaybeFinishLocked();
      return;
    }
    v1::StreamStepsRequest parsed;
    Status bad = ParseRaw(request_, &parsed, "message " + std::to_string(steps_ + 1) + " of the stream");
    request_.Clear();
    if (!bad.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      reads_done_ = true;
      read_outstanding_ = false;
      end_status_ =
          ToGrpc(core::InvalidArgumentError(
              bad.message() + ": the stream ends here; the steps before it are answered, it and anything sent after "
                              "it were not applied"));
      MaybeFinishLocked();
      return;
    }
    if (parsed.has_batch()) return ReadBatch(&parsed);
    v1::StepInput& input = *parsed.mutable_step();
    // An answer has its input's shape and dtype, so its size is known before it exists.
    const size_t answer_bytes = input.x().data().size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
      ++steps_;
      pending_bytes_ += answer_bytes;
    }
    v1::StepInput echo;  // what every answer repeats, without the input's bytes
    echo.set_session_id(input.session_id().size() <= 64 ? input.session_id() : input.session_id().substr(0, 64));
    echo.set_layer(input.layer());
    echo.set_sequence(input.sequence());
    StatusOr<core::Clock::time_point> deadline = StepDeadline(input.timeout(), stream_deadline_);
    StatusOr<core::StepRequest> step = deadline.ok() ? internal::ToStepRequest(&input, *deadline, cancel_)
                                                     : StatusOr<core::StepRequest>(deadline.status());
    parsed.Clear();  // converted: do not hold the bytes twice while the step waits
    if (!step.ok()) {
      Complete(echo, answer_bytes, step.status());
    } else {
      // The engine may complete inline (refusals): Complete takes mu_, so no lock is held here.
      service_->engine_->SubmitStep(std::move(step).value(),
                                    [this, echo, answer_bytes](StatusOr<core::StepResult> result) {
                                      Complete(echo, answer_bytes, std::move(result));
                                    });
    }
    std::lock_guard<std::mutex> lock(mu_);
    read_outstanding_ = false;
    MaybeReadLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!writes_.empty()) {
      pending_bytes_ -= writes_.front().bytes;
      writes_.pop_front();
    }
    if (!ok) {
      // The client is gone: nothing more can be delivered, so drop what is queued and stop work not yet started.
      broken_ = true;
      DropWritesLocked();
      cancel_->Cancel();
    }
    MaybeWriteLocked();
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnCancel() override {
    cancel_->Cancel();
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    DropWritesLocked();
    MaybeFinishLocked();
  }

  void OnDone() override {
    bool destroy;
    uint64_t steps;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      destroy = in_flight_ == 0;
      steps = steps_;
    }
    --service_->open_streams_;
    LogDebug("stream_closed", {{"peer", peer_}, {"steps", steps}});
    if (destroy) delete this;
  }

 private:
  struct Answer {
    grpc::ByteBuffer message;
    size_t bytes = 0;  // what pending_bytes_ counts for it
  };

  // A batch (StepBatchInput) on the stream: its steps are submitted together and answered in one message. It
  // counts as one pending answer, of its input's size (the size of its answer).
  void ReadBatch(v1::StreamStepsRequest* parsed) {
    v1::StepBatchInput* input = parsed->mutable_batch();
    const size_t answer_bytes = input->x().data().size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
      steps_ += static_cast<uint64_t>(input->session_ids_size());
      pending_bytes_ += answer_bytes;
    }
    const int32_t layer = input->layer();
    const uint64_t sequence = input->sequence();
    StatusOr<internal::PreparedBatch> batch = core::InvalidArgumentError(
        "a StreamStepsRequest carries a step or a batch, not both; nothing of it was applied");
    if (!parsed->has_step()) {
      StatusOr<core::Clock::time_point> deadline = StepDeadline(input->timeout(), stream_deadline_);
      batch = deadline.ok() ? internal::ToStepBatch(input, *deadline, cancel_)
                            : StatusOr<internal::PreparedBatch>(deadline.status());
    }
    parsed->Clear();  // converted: the rows are views of the bytes taken from it
    if (!batch.ok()) {
      v1::StreamStepsResponse resp;
      resp.mutable_batch()->set_layer(layer);
      resp.mutable_batch()->set_sequence(sequence);
      Count(service_->options_.metrics, batch.status());
      resp.mutable_status()->set_code(static_cast<int>(batch.status().code()));
      resp.mutable_status()->set_message(batch.status().message());
      Deliver(std::move(resp), answer_bytes);
    } else {
      auto shared = std::make_shared<internal::PreparedBatch>(std::move(batch).value());
      std::vector<core::StepRequest> requests = std::move(shared->requests);
      service_->engine_->SubmitSteps(
          std::move(requests), [this, shared, answer_bytes](std::vector<StatusOr<core::StepResult>> results) {
            v1::StreamStepsResponse resp;
            internal::FillBatchResult(*shared, std::move(results), service_->options_.metrics, resp.mutable_batch());
            resp.mutable_status()->set_code(0);
            Deliver(std::move(resp), answer_bytes);
          });
    }
    std::lock_guard<std::mutex> lock(mu_);
    read_outstanding_ = false;
    MaybeReadLocked();
  }

  void Complete(const v1::StepInput& echo, size_t answer_bytes, StatusOr<core::StepResult> result) {
    v1::StreamStepsResponse resp;
    internal::FillResult(echo, resp.mutable_result());
    Status st = result.status();
    if (st.ok()) st = internal::FillResult(*result, resp.mutable_result());
    if (!st.ok()) resp.mutable_result()->clear_out();
    internal::CountStep(service_->options_.metrics, st, result);
    resp.mutable_status()->set_code(static_cast<int>(st.code()));
    resp.mutable_status()->set_message(st.message());
    Deliver(std::move(resp), answer_bytes);
  }

  // Queues one answer for writing (it was counted in in_flight_ and pending_bytes_ when its request was read).
  void Deliver(v1::StreamStepsResponse resp, size_t answer_bytes) {
    Answer answer;
    answer.bytes = answer_bytes;
    Status serialized = SerializeRaw(resp, &answer.message);
    if (!serialized.ok()) {  // say so in a small answer rather than lose the step's outcome
      resp.mutable_result()->clear_out();
      if (resp.has_batch()) {
        const int32_t layer = resp.batch().layer();
        const uint64_t sequence = resp.batch().sequence();
        resp.mutable_batch()->Clear();
        resp.mutable_batch()->set_layer(layer);
        resp.mutable_batch()->set_sequence(sequence);
      }
      resp.mutable_status()->set_code(static_cast<int>(serialized.code()));
      resp.mutable_status()->set_message(serialized.message());
      (void)SerializeRaw(resp, &answer.message);
    }
    bool destroy = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --in_flight_;
      if (!finished_ && !broken_ && !cancelled_) {
        writes_.push_back(std::move(answer));
        MaybeWriteLocked();
      } else {
        pending_bytes_ -= answer_bytes;
      }
      MaybeReadLocked();
      MaybeFinishLocked();
      destroy = done_ && in_flight_ == 0;
    }
    if (destroy) delete this;
  }

  // Reads the next request unless the stream is at its bounds (see the file comment), the client half-closed,
  // a read is already outstanding, or the stream is over.
  void MaybeReadLocked() {
    if (read_outstanding_ || reads_done_ || finished_ || broken_ || cancelled_) return;
    const auto& o = service_->options_;
    const bool full = in_flight_ + writes_.size() >= o.max_pending_steps_per_stream ||
                      pending_bytes_ >= o.max_pending_bytes_per_stream;
    if (full) return;  // an answer leaving (OnWriteDone, Complete) calls again
    read_outstanding_ = true;
    StartRead(&request_);
  }

  void DropWritesLocked() {
    // The front one may be in gRPC's hands (writing_): it stays until OnWriteDone.
    while (writes_.size() > (writing_ ? 1u : 0u)) {
      pending_bytes_ -= writes_.back().bytes;
      writes_.pop_back();
    }
  }

  void MaybeWriteLocked() {
    if (writing_ || writes_.empty() || finished_) return;
    writing_ = true;
    StartWrite(&writes_.front().message);
  }

  void MaybeFinishLocked() {
    if (finished_ || writing_) return;
    if (cancelled_ || broken_) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled"));
    } else if (reads_done_ && in_flight_ == 0 && writes_.empty()) {
      finished_ = true;
      Finish(end_status_);
    }
  }

  MqaServiceImpl* const service_;
  const core::Clock::time_point stream_deadline_;
  const std::shared_ptr<core::CancelFlag> cancel_;
  const std::string peer_;
  grpc::ByteBuffer request_;  // the one outstanding read

  std::mutex mu_;
  std::deque<Answer> writes_;  // front() is being written when writing_
  size_t in_flight_ = 0;       // steps read and not yet answered
  size_t pending_bytes_ = 0;   // bytes of the answers of in-flight steps and of writes_
  uint64_t steps_ = 0;
  grpc::Status end_status_;       // how the stream ends once everything is answered (OK, or a bad message)
  bool read_outstanding_ = true;  // a StartRead not yet answered by OnReadDone (the constructor starts one)
  bool writing_ = false;
  bool reads_done_ = false;
  bool finished_ = false;
  bool cancelled_ = false;
  bool broken_ = false;
  bool done_ = false;
};

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* MqaServiceImpl::StreamSteps(
    grpc::CallbackServerContext* ctx) {
  return new StepStreamReactor(this, ctx);
}

}  // namespace mqa::server
