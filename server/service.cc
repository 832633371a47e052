#include "server/service.h"

#include <google/protobuf/util/time_util.h>

#include <algorithm>
#include <memory>
#include <string>
#include <utility>

#include "server/logging.h"
#include "server/raw_call.h"
#include "server/request_checks.h"
#include "server/service_internal.h"
#include "server/wire.h"

namespace mqa::server {

using core::Status;
using core::StatusOr;

namespace internal {

StatusOr<core::StepRequest> ToStepRequest(v1::StepInput* in, core::Clock::time_point deadline,
                                          std::shared_ptr<const core::CancelFlag> cancel) {
  core::StepRequest req;
  MQA_RETURN_IF_ERROR(CheckSessionId(in->session_id()));
  req.session_id = in->session_id();
  req.layer = in->layer();
  if (!in->has_x()) return core::InvalidArgumentError("x: required, [1, s, dim]");
  MQA_ASSIGN_OR_RETURN(req.x, FromWireTaking(in->mutable_x(), "x"));
  if (in->has_position()) req.position = in->position();
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

void CountStep(ServiceMetrics* metrics, const Status& status, const StatusOr<core::StepResult>& result) {
  if (metrics == nullptr) return;
  Count(metrics, status);
  if (status.ok()) metrics->RecordStepDuration(result->queue_us + result->compute_us);
}

}  // namespace internal

using internal::FillResult;
using internal::ToStepRequest;

MqaServiceImpl::MqaServiceImpl(core::Engine* engine, ServiceOptions options) : engine_(engine), options_(options) {}

void MqaServiceImpl::StartDraining() {
  draining_.store(true);
  engine_->StopAcceptingSessions();
}

grpc::ServerUnaryReactor* MqaServiceImpl::ListModels(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                                     grpc::ByteBuffer* resp) {
  auto* call = new UnaryCall<v1::ListModelsRequest, v1::ListModelsResponse>(ctx, req, resp, options_.metrics);
  if (!call->ok()) return call;
  for (const core::ModelInfo& m : engine_->ListModels()) ToWire(m, call->response.add_models());
  call->Reply(Status());
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::GetModel(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req,
                                                   grpc::ByteBuffer* resp) {
  auto* call = new UnaryCall<v1::GetModelRequest, v1::GetModelResponse>(ctx, req, resp, options_.metrics);
  if (!call->ok()) return call;
  Status st = CheckModelName(call->request.name(), "name");
  if (st.ok()) {
    auto model = engine_->GetModel(call->request.name());
    if (model.ok()) ToWire(*model, call->response.mutable_model());
    st = model.status();
  }
  call->Reply(st);
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::Forward(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                  grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::ForwardRequest, v1::ForwardResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  const v1::ForwardRequest* req = &call->request;
  core::ForwardRequest fr;
  fr.model = req->model();
  fr.layer = req->layer();
  auto status = [&]() -> Status {
    MQA_RETURN_IF_ERROR(CheckModelName(req->model()));
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
  if (!status.ok()) {
    call->Reply(status);
    return call;
  }
  fr.deadline = call->steady_deadline();
  fr.cancel = call->cancel();
  const bool return_cache = req->return_cache();
  engine_->SubmitForward(std::move(fr), [call, return_cache](StatusOr<core::ForwardResult> result) {
    v1::ForwardResponse* resp = &call->response;
    Status st = result.status();
    if (st.ok()) st = ToWire(result->out, resp->mutable_out());
    if (st.ok() && result->weights.defined()) st = ToWire(result->weights, resp->mutable_weights());
    if (st.ok() && return_cache && result->cache) {
      st = ToWire(result->cache->k, resp->mutable_cache()->mutable_key());
      if (st.ok()) st = ToWire(result->cache->v, resp->mutable_cache()->mutable_value());
    }
    call->Reply(st);
  });
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::CreateSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                        grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::CreateSessionRequest, v1::CreateSessionResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  const v1::CreateSessionRequest* req = &call->request;
  auto fail = [call](Status st) {
    call->Reply(std::move(st));
    return call;
  };
  if (draining_.load()) {
    return fail(
        core::UnavailableError("the server is draining and accepts no new sessions; "
                               "create the session on another replica"));
  }
  if (Status st = CheckModelName(req->model()); !st.ok()) return fail(st);
  core::SessionConfig config;
  config.model = req->model();
  config.max_tokens = req->max_tokens();
  if (req->has_idle_ttl()) {
    const auto& d = req->idle_ttl();
    if (d.seconds() < 0 || d.nanos() < 0) return fail(core::InvalidArgumentError("idle_ttl: must not be negative"));
    if (d.seconds() > 10LL * 365 * 24 * 3600) return fail(core::InvalidArgumentError("idle_ttl: at most 10 years"));
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
      return fail(core::InvalidArgumentError("position_bias: expected POSITION_BIAS_NONE or POSITION_BIAS_ALIBI, got " +
                                             std::to_string(static_cast<int>(req->position_bias()))));
  }
  switch (req->admission()) {
    case v1::ADMISSION_UNSPECIFIED:
    case v1::ADMISSION_BEST_EFFORT: config.admission = core::Admission::kBestEffort; break;
    case v1::ADMISSION_GUARANTEED: config.admission = core::Admission::kGuaranteed; break;
    default:
      return fail(core::InvalidArgumentError("admission: expected ADMISSION_BEST_EFFORT or ADMISSION_GUARANTEED, got " +
                                             std::to_string(static_cast<int>(req->admission()))));
  }
  auto session = engine_->CreateSession(config);
  if (!session.ok()) {
    LogWarn("session_refused", {{"model", config.model},
                                {"code", std::string(core::StatusCodeName(session.status().code()))},
                                {"reason", session.status().message()}});
    return fail(session.status());
  }
  ToWire(*session, call->response.mutable_session());
  LogInfo("session_created",
          {{"session", session->id},
           {"model", session->model},
           {"max_tokens", session->max_tokens},
           {"idle_ttl_ms", session->idle_ttl.count()},
           {"admission", session->admission == core::Admission::kGuaranteed ? "guaranteed" : "best_effort"},
           {"cache_bytes", session->cache_bytes},
           {"peer", ctx->peer()}});
  call->Reply(Status());
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::GetSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                     grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::GetSessionRequest, v1::GetSessionResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  Status st = CheckSessionId(call->request.session_id());
  if (st.ok()) {
    auto session = engine_->GetSession(call->request.session_id());
    if (session.ok()) ToWire(*session, call->response.mutable_session());
    st = session.status();
  }
  call->Reply(st);
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::CloseSession(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                       grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::CloseSessionRequest, v1::CloseSessionResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  Status st = CheckSessionId(call->request.session_id());
  if (st.ok()) {
    auto session = engine_->CloseSession(call->request.session_id());
    if (session.ok()) {
      ToWire(*session, call->response.mutable_session());
      int64_t tokens = 0;
      for (int64_t p : session->layer_positions) tokens = std::max(tokens, p);
      LogInfo("session_closed", {{"session", session->id}, {"model", session->model}, {"tokens", tokens}});
    }
    st = session.status();
  }
  call->Reply(st);
  return call;
}

grpc::ServerUnaryReactor* MqaServiceImpl::Step(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                               grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::StepRequest, v1::StepResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  FillResult(call->request.step(), call->response.mutable_result());
  auto step = ToStepRequest(call->request.mutable_step(), call->steady_deadline(), call->cancel());
  if (!step.ok()) {
    call->Reply(step.status());
    return call;
  }
  engine_->SubmitStep(std::move(step).value(), [call, metrics = options_.metrics](StatusOr<core::StepResult> result) {
    Status st = result.status();
    if (st.ok()) st = FillResult(*result, call->response.mutable_result());
    if (st.ok() && metrics != nullptr) metrics->RecordStepDuration(result->queue_us + result->compute_us);
    call->Reply(st);
  });
  return call;
}

}  // namespace mqa::server
