#include "server/service.h"

#include <google/protobuf/util/time_util.h>

#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "server/logging.h"
#include "server/wire.h"

namespace mqa::server {
namespace {

using core::Status;
using core::StatusOr;

// A unary reactor whose cancellation reaches the engine: work still queued when the client cancels (or its
// deadline passes) is dropped instead of computed. gRPC still requires Finish() after OnCancel, which the
// engine's completion provides.
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall() : cancel_(std::make_shared<core::CancelFlag>()) {}
  void OnCancel() override { cancel_->Cancel(); }
  void OnDone() override { delete this; }
  std::shared_ptr<const core::CancelFlag> cancel() const { return cancel_; }

 private:
  std::shared_ptr<core::CancelFlag> cancel_;
};

// Every status a client sees goes through here, so mqa_step_errors_total counts each failure exactly once.
void Count(ServiceMetrics* metrics, const Status& status) {
  if (metrics != nullptr && !status.ok()) metrics->RecordError(status.code());
}

void CountStep(ServiceMetrics* metrics, const Status& status, const StatusOr<core::StepResult>& result) {
  if (metrics == nullptr) return;
  Count(metrics, status);
  if (status.ok()) metrics->RecordStepDuration(result->queue_us + result->compute_us);
}

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* ctx, ServiceMetrics* metrics,
                                    const Status& status) {
  Count(metrics, status);
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

StatusOr<core::StepRequest> ToStepRequest(const v1::StepInput& in, core::Clock::time_point deadline,
                                          std::shared_ptr<const core::CancelFlag> cancel) {
  core::StepRequest req;
  if (in.session_id().empty()) return core::InvalidArgumentError("session_id: required");
  req.session_id = in.session_id();
  req.layer = in.layer();
  if (!in.has_x()) return core::InvalidArgumentError("x: required, [1, s, dim]");
  MQA_ASSIGN_OR_RETURN(req.x, FromWire(in.x(), "x"));
  if (in.has_position()) req.position = in.position();
  req.deadline = deadline;
  req.cancel = std::move(cancel);
  return req;
}

void FillResult(const v1::StepInput& in, v1::StepResult* r) {
  r->set_session_id(in.session_id());
  r->set_layer(in.layer());
  r->set_sequence(in.sequence());
}

Status FillResult(const core::StepResult& result, v1::StepResult* r) {
  r->set_position(result.position);
  r->set_num_tokens(result.num_tokens);
  r->mutable_timing()->set_queue_us(result.queue_us);
  r->mutable_timing()->set_compute_us(result.compute_us);
  return ToWire(result.out, r->mutable_out());
}

}  // namespace

MqaServiceImpl::MqaServiceImpl(core::Engine* engine, ServiceOptions options)
    : engine_(engine), options_(options) {}

void MqaServiceImpl::StartDraining() {
  draining_.store(true);
  engine_->StopAcceptingSessions();
}

grpc::ServerUnaryReactor* MqaServiceImpl::ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest*,
                                                     v1::ListModelsResponse* resp) {
  for (const core::ModelInfo& m : engine_->ListModels()) ToWire(m, resp->add_models());
  return FinishNow(ctx, options_.metrics, Status());
}

grpc::ServerUnaryReactor* MqaServiceImpl::GetModel(grpc::CallbackServerContext* ctx, const v1::GetModelRequest* req,
                                                   v1::GetModelResponse* resp) {
  auto model = engine_->GetModel(req->name());
  if (model.ok()) ToWire(*model, resp->mutable_model());
  return FinishNow(ctx, options_.metrics, model.status());
}

grpc::ServerUnaryReactor* MqaServiceImpl::Forward(grpc::CallbackServerContext* ctx, const v1::ForwardRequest* req,
                                                  v1::ForwardResponse* resp) {
  core::ForwardRequest fr;
  fr.model = req->model();
  fr.layer = req->layer();
  auto status = [&]() -> Status {
    if (!req->has_x()) return core::InvalidArgumentError("x: required, [b, s, dim]");
    MQA_ASSIGN_OR_RETURN(fr.args.x, FromWire(req->x(), "x"));
    if (req->has_past_key_value()) {
      core::KvCache cache;
      MQA_ASSIGN_OR_RETURN(cache.k, FromWire(req->past_key_value().key(), "past_key_value.key"));
      MQA_ASSIGN_OR_RETURN(cache.v, FromWire(req->past_key_value().value(), "past_key_value.value"));
      fr.args.past_key_value = std::move(cache);
    } else if (req->return_cache()) {
      fr.args.past_key_value = core::KvCache{};  // the spec's empty cache: start one
    }
    if (req->has_bias()) {
      MQA_ASSIGN_OR_RETURN(fr.args.bias, FromWire(req->bias(), "bias"));
    }
    if (req->has_mask()) {
      MQA_ASSIGN_OR_RETURN(fr.args.mask, FromWire(req->mask(), "mask"));
      if (fr.args.mask.dtype() == core::DType::kUInt8) {
        MQA_ASSIGN_OR_RETURN(fr.args.mask, fr.args.mask.ToDType(core::DType::kBool));
      } else if (fr.args.mask.dtype() != core::DType::kBool) {
        return core::InvalidArgumentError("mask: expected DATA_TYPE_BOOL or DATA_TYPE_UINT8, got " +
                                          std::string(core::DTypeName(fr.args.mask.dtype())));
      }
    }
    fr.args.causal = req->has_causal() ? req->causal() : true;
    fr.args.needs_weights = req->needs_weights();
    return Status();
  }();
  if (!status.ok()) return FinishNow(ctx, options_.metrics, status);

  auto* call = new UnaryCall();
  fr.deadline = SteadyDeadline(ctx->deadline());
  fr.cancel = call->cancel();
  const bool return_cache = req->return_cache();
  engine_->SubmitForward(std::move(fr), [call, resp, return_cache, metrics = options_.metrics](
                                            StatusOr<core::ForwardResult> result) {
    Status st = result.status();
    if (st.ok()) st = ToWire(result->out, resp->mutable_out());
    if (st.ok() && result->weights.defined()) st = ToWire(result->weights, resp->mutable_weights());
    if (st.ok() && return_cache && result->cache) {
      st = ToWire(result->cache->k, resp->mutable_cache()->mutable_key());
      if (st.ok()) st = ToWire(result->cache->v, resp->mutable_cache()->mutable_value());
    }
    Count(metrics, st);
    call->Finish(ToGrpc(st));
  });
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::CreateSession(grpc::CallbackServerContext* ctx,
                                                        const v1::CreateSessionRequest* req,
                                                        v1::CreateSessionResponse* resp) {
  if (draining_.load()) {
    return FinishNow(ctx, options_.metrics,
                     core::UnavailableError("the server is draining and accepts no new sessions; "
                                            "create the session on another replica"));
  }
  core::SessionConfig config;
  config.model = req->model();
  config.max_tokens = req->max_tokens();
  if (req->has_idle_ttl()) {
    const auto& d = req->idle_ttl();
    if (d.seconds() < 0 || d.nanos() < 0) {
      return FinishNow(ctx, options_.metrics, core::InvalidArgumentError("idle_ttl: must not be negative"));
    }
    if (d.seconds() > 10LL * 365 * 24 * 3600) {
      return FinishNow(ctx, options_.metrics, core::InvalidArgumentError("idle_ttl: at most 10 years"));
    }
    config.idle_ttl = std::chrono::milliseconds(google::protobuf::util::TimeUtil::DurationToMilliseconds(d));
    if (config.idle_ttl.count() == 0 && (d.seconds() != 0 || d.nanos() != 0)) {
      config.idle_ttl = std::chrono::milliseconds(1);  // sub-millisecond TTLs round up, not to "default"
    }
  }
  config.causal = req->has_causal() ? req->causal() : true;
  switch (req->position_bias()) {
    case v1::POSITION_BIAS_UNSPECIFIED:
    case v1::POSITION_BIAS_NONE: config.position_bias = core::PositionBias::kNone; break;
    case v1::POSITION_BIAS_ALIBI: config.position_bias = core::PositionBias::kAlibi; break;
    default:
      return FinishNow(ctx, options_.metrics,
                       core::InvalidArgumentError("position_bias: expected POSITION_BIAS_NONE or "
                                                  "POSITION_BIAS_ALIBI, got " +
                                                  std::to_string(static_cast<int>(req->position_bias()))));
  }
  switch (req->admission()) {
    case v1::ADMISSION_UNSPECIFIED:
    case v1::ADMISSION_BEST_EFFORT: config.admission = core::Admission::kBestEffort; break;
    case v1::ADMISSION_GUARANTEED: config.admission = core::Admission::kGuaranteed; break;
    default:
      return FinishNow(ctx, options_.metrics,
                       core::InvalidArgumentError("admission: expected ADMISSION_BEST_EFFORT or "
                                                  "ADMISSION_GUARANTEED, got " +
                                                  std::to_string(static_cast<int>(req->admission()))));
  }
  auto session = engine_->CreateSession(config);
  if (!session.ok()) {
    LogWarn("session_refused",
             {{"model", config.model}, {"code", std::string(core::StatusCodeName(session.status().code()))},
              {"reason", session.status().message()}});
    return FinishNow(ctx, options_.metrics, session.status());
  }
  ToWire(*session, resp->mutable_session());
  LogInfo("session_created",
           {{"session", session->id},
            {"model", session->model},
            {"max_tokens", session->max_tokens},
            {"idle_ttl_ms", session->idle_ttl.count()},
            {"admission", session->admission == core::Admission::kGuaranteed ? "guaranteed" : "best_effort"},
            {"cache_bytes", session->cache_bytes},
            {"peer", ctx->peer()}});
  return FinishNow(ctx, options_.metrics, Status());
}

grpc::ServerUnaryReactor* MqaServiceImpl::GetSession(grpc::CallbackServerContext* ctx,
                                                     const v1::GetSessionRequest* req, v1::GetSessionResponse* resp) {
  auto session = engine_->GetSession(req->session_id());
  if (session.ok()) ToWire(*session, resp->mutable_session());
  return FinishNow(ctx, options_.metrics, session.status());
}

grpc::ServerUnaryReactor* MqaServiceImpl::CloseSession(grpc::CallbackServerContext* ctx,
                                                       const v1::CloseSessionRequest* req,
                                                       v1::CloseSessionResponse* resp) {
  auto session = engine_->CloseSession(req->session_id());
  if (session.ok()) {
    ToWire(*session, resp->mutable_session());
    int64_t tokens = 0;
    for (int64_t p : session->layer_positions) tokens = std::max(tokens, p);
    LogInfo("session_closed",
             {{"session", session->id}, {"model", session->model}, {"tokens", tokens}});
  }
  return FinishNow(ctx, options_.metrics, session.status());
}

grpc::ServerUnaryReactor* MqaServiceImpl::Step(grpc::CallbackServerContext* ctx, const v1::StepRequest* req,
                                               v1::StepResponse* resp) {
  FillResult(req->step(), resp->mutable_result());
  auto* call = new UnaryCall();
  auto step = ToStepRequest(req->step(), SteadyDeadline(ctx->deadline()), call->cancel());
  if (!step.ok()) {
    Count(options_.metrics, step.status());
    call->Finish(ToGrpc(step.status()));
    return call;
  }
  engine_->SubmitStep(std::move(step).value(), [call, resp, metrics = options_.metrics](
                                                   StatusOr<core::StepResult> result) {
    Status st = result.status();
    if (st.ok()) st = FillResult(*result, resp->mutable_result());
    CountStep(metrics, st, result);
    call->Finish(ToGrpc(st));
  });
  return call;
}

// One StreamSteps call. Steps are submitted as they are read; answers are written as the engine completes them
// (so out of order across sessions), one write outstanding at a time as gRPC requires.
//
// Lifetime: gRPC calls OnDone once the call is over, but engine completions may still be on their way; the
// reactor deletes itself only when both have happened (done_ and in_flight_ == 0).
class MqaServiceImpl::StepStreamReactor final
    : public grpc::ServerBidiReactor<v1::StreamStepsRequest, v1::StreamStepsResponse> {
 public:
  StepStreamReactor(MqaServiceImpl* service, grpc::CallbackServerContext* ctx)
      : service_(service),
        stream_deadline_(SteadyDeadline(ctx->deadline())),
        cancel_(std::make_shared<core::CancelFlag>()),
        peer_(ctx->peer()) {
    ++service_->open_streams_;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the call broke): answer what is in flight, then finish
      std::lock_guard<std::mutex> lock(mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    const v1::StepInput input = request_.step();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
      ++steps_;
    }
    core::Clock::time_point deadline = stream_deadline_;
    if (input.has_timeout() && (input.timeout().seconds() > 0 || input.timeout().nanos() > 0)) {
      auto ms = google::protobuf::util::TimeUtil::DurationToMicroseconds(input.timeout());
      deadline = std::min(deadline, core::Clock::now() + std::chrono::microseconds(ms));
    }
    auto step = ToStepRequest(input, deadline, cancel_);
    if (!step.ok()) {
      Complete(input, step.status());
    } else {
      // The engine may complete inline (refusals): Complete takes mu_, so no lock is held here.
      service_->engine_->SubmitStep(std::move(step).value(), [this, input](StatusOr<core::StepResult> result) {
        Complete(input, std::move(result));
      });
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (in_flight_ >= service_->options_.max_steps_in_flight_per_stream) {
      read_paused_ = true;  // flow control: resume when answers drain
    } else if (!finished_) {
      StartRead(&request_);
    }
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!writes_.empty()) writes_.pop_front();
    if (!ok) {
      // The client is gone: nothing more can be delivered, so drop what is queued and stop work not yet started.
      broken_ = true;
      writes_.clear();
      cancel_->Cancel();
    }
    MaybeWriteLocked();
    MaybeFinishLocked();
  }

  void OnCancel() override {
    cancel_->Cancel();
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ = true;
    writes_.clear();
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
  void Complete(const v1::StepInput& input, StatusOr<core::StepResult> result) {
    v1::StreamStepsResponse resp;
    FillResult(input, resp.mutable_result());
    Status st = result.status();
    if (st.ok()) st = FillResult(*result, resp.mutable_result());
    if (!st.ok()) resp.mutable_result()->clear_out();
    CountStep(service_->options_.metrics, st, result);
    resp.mutable_status()->set_code(static_cast<int>(st.code()));
    resp.mutable_status()->set_message(st.message());
    bool destroy = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --in_flight_;
      if (!finished_ && !broken_ && !cancelled_) {
        writes_.push_back(std::move(resp));
        MaybeWriteLocked();
      }
      if (read_paused_ && !finished_ && !reads_done_ &&
          in_flight_ < service_->options_.max_steps_in_flight_per_stream) {
        read_paused_ = false;
        StartRead(&request_);
      }
      MaybeFinishLocked();
      destroy = done_ && in_flight_ == 0;
    }
    if (destroy) delete this;
  }

  void MaybeWriteLocked() {
    if (writing_ || writes_.empty() || finished_) return;
    writing_ = true;
    StartWrite(&writes_.front());
  }

  void MaybeFinishLocked() {
    if (finished_ || writing_) return;
    if (cancelled_ || broken_) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream was cancelled"));
    } else if (reads_done_ && in_flight_ == 0 && writes_.empty()) {
      finished_ = true;
      Finish(grpc::Status::OK);
    }
  }

  MqaServiceImpl* const service_;
  const core::Clock::time_point stream_deadline_;
  const std::shared_ptr<core::CancelFlag> cancel_;
  const std::string peer_;
  v1::StreamStepsRequest request_;  // the one outstanding read

  std::mutex mu_;
  std::deque<v1::StreamStepsResponse> writes_;  // front() is being written when writing_
  size_t in_flight_ = 0;
  uint64_t steps_ = 0;
  bool writing_ = false;
  bool reads_done_ = false;
  bool read_paused_ = false;
  bool finished_ = false;
  bool cancelled_ = false;
  bool broken_ = false;
  bool done_ = false;
};

grpc::ServerBidiReactor<v1::StreamStepsRequest, v1::StreamStepsResponse>* MqaServiceImpl::StreamSteps(
    grpc::CallbackServerContext* ctx) {
  return new StepStreamReactor(this, ctx);
}

}  // namespace mqa::server
