#include "convert.h"

#include <string>

namespace mqa::client::internal {
namespace {

std::chrono::system_clock::time_point TimeFromProto(const google::protobuf::Timestamp& ts) {
  const auto since_epoch = std::chrono::seconds(ts.seconds()) + std::chrono::nanoseconds(ts.nanos());
  return std::chrono::system_clock::time_point(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(since_epoch));
}

std::chrono::milliseconds DurationFromProto(const google::protobuf::Duration& d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::seconds(d.seconds()) +
                                                               std::chrono::nanoseconds(d.nanos()));
}

PositionBias PositionBiasFromProto(v1::PositionBias bias) {
  return bias == v1::POSITION_BIAS_ALIBI ? PositionBias::kAlibi : PositionBias::kNone;
}

Admission AdmissionFromProto(v1::Admission admission) {
  return admission == v1::ADMISSION_GUARANTEED ? Admission::kGuaranteed : Admission::kBestEffort;
}

// Names the offending field, since the server would only say "x" or "bias" after a round trip.
Status CheckTensor(const HostTensor& tensor, const char* what) {
  Status s = tensor.Validate();
  if (s.ok()) return s;
  return Status(s.code(), std::string(what) + ": " + s.message());
}

}  // namespace

Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return Status::Ok();
  return Status(StatusCodeFromInt(static_cast<int>(status.error_code())), status.error_message());
}

Status StatusFromProto(const v1::StepStatus& proto) {
  if (proto.code() == 0) return Status::Ok();
  return Status(StatusCodeFromInt(proto.code()), proto.message());
}

void TensorToProto(const HostTensor& tensor, v1::Tensor* proto) {
  proto->set_dtype(static_cast<v1::DataType>(static_cast<int>(tensor.dtype)));
  proto->mutable_shape()->Assign(tensor.shape.begin(), tensor.shape.end());
  proto->set_data(reinterpret_cast<const char*>(tensor.data.data()), tensor.data.size());
}

HostTensor TensorFromProto(const v1::Tensor& proto) {
  HostTensor t;
  const int dtype = static_cast<int>(proto.dtype());
  // Unknown enum values from a newer server stay visible as kUnspecified rather than aliasing a real type.
  t.dtype = (dtype >= 0 && dtype <= static_cast<int>(DataType::kUInt8)) ? static_cast<DataType>(dtype)
                                                                        : DataType::kUnspecified;
  t.shape.assign(proto.shape().begin(), proto.shape().end());
  t.data.assign(proto.data().begin(), proto.data().end());
  return t;
}

void DurationToProto(std::chrono::milliseconds duration, google::protobuf::Duration* proto) {
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(duration);
  proto->set_seconds(seconds.count());
  proto->set_nanos(static_cast<int32_t>(std::chrono::nanoseconds(duration - seconds).count()));
}

LayerConfig LayerConfigFromProto(const v1::LayerConfig& proto) {
  LayerConfig c;
  c.dim = proto.dim();
  c.heads = proto.heads();
  c.head_dim = proto.head_dim();
  c.attn_impl = proto.attn_impl();
  if (proto.has_clip_qkv()) c.clip_qkv = proto.clip_qkv();
  c.qk_ln = proto.qk_ln();
  if (proto.has_softmax_scale()) c.softmax_scale = proto.softmax_scale();
  c.attn_pdrop = proto.attn_pdrop();
  c.norm_type = proto.norm_type();
  c.fc_type = proto.fc_type();
  const int dtype = static_cast<int>(proto.dtype());
  c.dtype = (dtype >= 0 && dtype <= static_cast<int>(DataType::kUInt8)) ? static_cast<DataType>(dtype)
                                                                        : DataType::kUnspecified;
  c.device = proto.device();
  return c;
}

ModelInfo ModelInfoFromProto(const v1::ModelInfo& proto) {
  ModelInfo m;
  m.name = proto.name();
  m.num_layers = proto.num_layers();
  for (const auto& layer : proto.layers()) m.layers.push_back(LayerConfigFromProto(layer));
  m.max_tokens_per_session = proto.max_tokens_per_session();
  m.description = proto.description();
  m.devices.assign(proto.devices().begin(), proto.devices().end());
  return m;
}

SessionInfo SessionInfoFromProto(const v1::Session& proto) {
  SessionInfo s;
  s.session_id = proto.session_id();
  s.model = proto.model();
  s.max_tokens = proto.max_tokens();
  s.layer_positions.assign(proto.layer_positions().begin(), proto.layer_positions().end());
  s.idle_ttl = DurationFromProto(proto.idle_ttl());
  s.expire_time = TimeFromProto(proto.expire_time());
  s.create_time = TimeFromProto(proto.create_time());
  s.causal = proto.causal();
  s.position_bias = PositionBiasFromProto(proto.position_bias());
  s.admission = AdmissionFromProto(proto.admission());
  s.cache_bytes = proto.cache_bytes();
  s.device = proto.device();
  return s;
}

StepOutput StepOutputFromProto(const v1::StepResult& proto) {
  StepOutput o;
  o.session_id = proto.session_id();
  o.layer = proto.layer();
  o.sequence = proto.sequence();
  o.position = proto.position();
  o.num_tokens = proto.num_tokens();
  o.out = TensorFromProto(proto.out());
  o.queue_time = std::chrono::microseconds(proto.timing().queue_us());
  o.compute_time = std::chrono::microseconds(proto.timing().compute_us());
  return o;
}

Status StepInputToProto(const std::string& session_id, int32_t layer, const HostTensor& x,
                        std::optional<int64_t> position, std::optional<std::chrono::milliseconds> timeout,
                        v1::StepInput* proto) {
  Status s = CheckTensor(x, "x");
  if (!s.ok()) return s;
  proto->set_session_id(session_id);
  proto->set_layer(layer);
  TensorToProto(x, proto->mutable_x());
  if (position) proto->set_position(*position);
  if (timeout && timeout->count() > 0) DurationToProto(*timeout, proto->mutable_timeout());
  return Status::Ok();
}

Status StepBatchInputToProto(const StepBatchInput& batch, v1::StepBatchInput* proto) {
  Status s = CheckTensor(batch.x, "x");
  if (!s.ok()) return s;
  const size_t b = batch.session_ids.size();
  if (b == 0) return Status(StatusCode::kInvalidArgument, "session_ids: at least one session, got none");
  if (batch.x.shape.size() != 3 || batch.x.shape[0] != static_cast<int64_t>(b)) {
    return Status(StatusCode::kInvalidArgument, "x: expected [B, s, dim] with B = " + std::to_string(b) +
                                                    " (one row per session), got " +
                                                    std::to_string(batch.x.shape.size()) + " dimensions");
  }
  if (!batch.positions.empty() && batch.positions.size() != b) {
    return Status(StatusCode::kInvalidArgument, "positions: expected none or one per session (" + std::to_string(b) +
                                                    "), got " + std::to_string(batch.positions.size()));
  }
  proto->set_layer(batch.layer);
  for (const std::string& id : batch.session_ids) proto->add_session_ids(id);
  TensorToProto(batch.x, proto->mutable_x());
  for (const std::optional<int64_t>& p : batch.positions) proto->add_positions(p.value_or(-1));
  if (batch.timeout && batch.timeout->count() > 0) DurationToProto(*batch.timeout, proto->mutable_timeout());
  return Status::Ok();
}

StepBatchOutput StepBatchOutputFromProto(const v1::StepBatchResult& proto) {
  StepBatchOutput o;
  o.layer = proto.layer();
  o.sequence = proto.sequence();
  for (const v1::StepStatus& st : proto.statuses()) o.statuses.push_back(StatusFromProto(st));
  o.positions.assign(proto.positions().begin(), proto.positions().end());
  o.out = TensorFromProto(proto.out());
  for (const v1::StepTiming& t : proto.timings()) {
    o.queue_times.emplace_back(t.queue_us());
    o.compute_times.emplace_back(t.compute_us());
  }
  return o;
}

Status ForwardInputToProto(const ForwardInput& input, v1::ForwardRequest* proto) {
  Status s = CheckTensor(input.x, "x");
  if (s.ok() && input.past_key_value) s = CheckTensor(input.past_key_value->key, "past_key_value.key");
  if (s.ok() && input.past_key_value) s = CheckTensor(input.past_key_value->value, "past_key_value.value");
  if (s.ok() && input.bias) s = CheckTensor(*input.bias, "bias");
  if (s.ok() && input.mask) s = CheckTensor(*input.mask, "mask");
  if (!s.ok()) return s;
  proto->set_model(input.model);
  proto->set_layer(input.layer);
  TensorToProto(input.x, proto->mutable_x());
  if (input.past_key_value) {
    TensorToProto(input.past_key_value->key, proto->mutable_past_key_value()->mutable_key());
    TensorToProto(input.past_key_value->value, proto->mutable_past_key_value()->mutable_value());
  }
  proto->set_return_cache(input.return_cache);
  if (input.bias) TensorToProto(*input.bias, proto->mutable_bias());
  if (input.mask) TensorToProto(*input.mask, proto->mutable_mask());
  if (input.causal) proto->set_causal(*input.causal);
  proto->set_needs_weights(input.needs_weights);
  return Status::Ok();
}

ForwardOutput ForwardOutputFromProto(const v1::ForwardResponse& proto) {
  ForwardOutput o;
  o.out = TensorFromProto(proto.out());
  if (proto.has_weights()) o.weights = TensorFromProto(proto.weights());
  if (proto.has_cache())
    o.cache = KvCache{TensorFromProto(proto.cache().key()), TensorFromProto(proto.cache().value())};
  return o;
}

}  // namespace mqa::client::internal
