// MqaService.StepBatch, and the conversions of a StepBatchInput that it shares with StreamSteps: one layer's
// steps of B sessions in one message and one [B, s, dim] tensor, taken apart into B engine requests (each with
// the contract of its own Step) and put back together into one answer.
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "server/raw_call.h"
#include "server/request_checks.h"
#include "server/service.h"
#include "server/service_internal.h"
#include "server/wire.h"

namespace mqa::server {

using core::Status;
using core::StatusOr;

namespace internal {

StatusOr<PreparedBatch> ToStepBatch(v1::StepBatchInput* in, core::Clock::time_point deadline,
                                    std::shared_ptr<const core::CancelFlag> cancel) {
  const int64_t b = in->session_ids_size();
  if (b == 0) return core::InvalidArgumentError("session_ids: at least one session, got none");
  if (in->positions_size() != 0 && in->positions_size() != b) {
    return core::InvalidArgumentError("positions: expected none or one per session (" + std::to_string(b) + "), got " +
                                      std::to_string(in->positions_size()));
  }
  if (!in->has_x()) return core::InvalidArgumentError("x: required, [B, s, dim] with B = " + std::to_string(b));
  MQA_ASSIGN_OR_RETURN(core::Tensor x, FromWireTaking(in->mutable_x(), "x"));
  if (x.dim() != 3 || x.size(0) != b) {
    return core::InvalidArgumentError("x: expected [B, s, dim] with B = " + std::to_string(b) +
                                      " (one row per session), got " + core::ShapeToString(x.shape()));
  }
  PreparedBatch batch;
  batch.layer = in->layer();
  batch.sequence = in->sequence();
  batch.dtype = x.dtype();
  batch.row_shape = {1, x.size(1), x.size(2)};
  batch.row_bytes = x.nbytes() / static_cast<size_t>(b);
  batch.refused.resize(static_cast<size_t>(b));
  batch.requests.reserve(static_cast<size_t>(b));
  batch.entry_of.reserve(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    const std::string& id = in->session_ids(static_cast<int>(i));
    Status checked = CheckSessionId(id, "session_ids[" + std::to_string(i) + "]");
    if (!checked.ok()) {
      batch.refused[static_cast<size_t>(i)] = std::move(checked);
      continue;
    }
    core::StepRequest req;
    req.session_id = id;
    req.layer = batch.layer;
    MQA_ASSIGN_OR_RETURN(req.x, x.Rows(i, 1));  // a view: the rows share the batch's one buffer
    if (in->positions_size() != 0 && in->positions(static_cast<int>(i)) != -1) {
      req.position = in->positions(static_cast<int>(i));
    }
    req.deadline = deadline;
    req.cancel = cancel;
    batch.requests.push_back(std::move(req));
    batch.entry_of.push_back(static_cast<size_t>(i));
  }
  return batch;
}

void FillBatchResult(const PreparedBatch& batch, std::vector<StatusOr<core::StepResult>> results,
                     ServiceMetrics* metrics, v1::StepBatchResult* out) {
  const size_t b = batch.refused.size();
  out->set_layer(batch.layer);
  out->set_sequence(batch.sequence);
  std::vector<Status> status = batch.refused;
  std::vector<const core::StepResult*> ok(b, nullptr);
  for (size_t i = 0; i < results.size() && i < batch.entry_of.size(); ++i) {
    const size_t e = batch.entry_of[i];
    status[e] = results[i].status();
    if (results[i].ok()) ok[e] = &*results[i];
  }
  v1::Tensor* wire = out->mutable_out();
  wire->set_dtype(ToWireDType(batch.dtype));
  wire->add_shape(static_cast<int64_t>(b));
  wire->add_shape(batch.row_shape[1]);
  wire->add_shape(batch.row_shape[2]);
  std::string* data = wire->mutable_data();
  data->assign(b * batch.row_bytes, '\0');
  for (size_t e = 0; e < b; ++e) {
    if (ok[e] != nullptr) {
      // Every computed row has its input's shape and dtype, so it lands in place; anything else is a bug here.
      Status copied = ok[e]->out.nbytes() == batch.row_bytes && ok[e]->out.dtype() == batch.dtype
                          ? ok[e]->out.CopyBytesTo(data->data() + e * batch.row_bytes, batch.row_bytes)
                          : core::InternalError("the answer's shape or dtype differs from its input's");
      if (!copied.ok()) {
        status[e] = copied;
        ok[e] = nullptr;
      }
    }
    v1::StepStatus* st = out->add_statuses();
    st->set_code(static_cast<int>(status[e].code()));
    st->set_message(status[e].message());
    out->add_positions(ok[e] != nullptr ? ok[e]->position : 0);
    v1::StepTiming* timing = out->add_timings();
    if (ok[e] != nullptr) {
      timing->set_queue_us(ok[e]->queue_us);
      timing->set_compute_us(ok[e]->compute_us);
    }
    if (metrics != nullptr) {
      Count(metrics, status[e]);
      if (ok[e] != nullptr) metrics->RecordStepDuration(ok[e]->queue_us + ok[e]->compute_us);
    }
  }
}

}  // namespace internal

grpc::ServerUnaryReactor* MqaServiceImpl::StepBatch(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw,
                                                    grpc::ByteBuffer* raw_resp) {
  auto* call = new UnaryCall<v1::StepBatchRequest, v1::StepBatchResponse>(ctx, raw, raw_resp, options_.metrics);
  if (!call->ok()) return call;
  auto batch = internal::ToStepBatch(call->request.mutable_batch(), call->steady_deadline(), call->cancel());
  if (!batch.ok()) {
    call->Reply(batch.status());
    return call;
  }
  auto shared = std::make_shared<internal::PreparedBatch>(std::move(batch).value());
  std::vector<core::StepRequest> requests = std::move(shared->requests);
  engine_->SubmitSteps(
      std::move(requests), [call, shared, metrics = options_.metrics](std::vector<StatusOr<core::StepResult>> results) {
        internal::FillBatchResult(*shared, std::move(results), metrics, call->response.mutable_result());
        call->Reply(Status());
      });
  return call;
}

}  // namespace mqa::server
