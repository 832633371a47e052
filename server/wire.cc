#include "server/wire.h"

#include <google/protobuf/util/time_util.h>

#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace mqa::server {
namespace {

using core::DType;
using core::InvalidArgumentError;

constexpr int kMaxDims = 8;

core::StatusOr<DType> FromWireDType(v1::DataType dtype, const std::string& name) {
  switch (dtype) {
    case v1::DATA_TYPE_FLOAT32: return DType::kFloat32;
    case v1::DATA_TYPE_BFLOAT16: return DType::kBFloat16;
    case v1::DATA_TYPE_FLOAT16: return DType::kFloat16;
    case v1::DATA_TYPE_BOOL: return DType::kBool;
    case v1::DATA_TYPE_UINT8: return DType::kUInt8;
    default:
      return InvalidArgumentError(name + ": dtype must be set (DATA_TYPE_FLOAT32, DATA_TYPE_BFLOAT16, " +
                                  "DATA_TYPE_FLOAT16, DATA_TYPE_BOOL or DATA_TYPE_UINT8), got " +
                                  std::to_string(static_cast<int>(dtype)));
  }
}

void SetTimestamp(std::chrono::system_clock::time_point t, google::protobuf::Timestamp* ts) {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  *ts = google::protobuf::util::TimeUtil::NanosecondsToTimestamp(ns);
}

// Checks wire's dtype, shape and byte count; the shape comes back in *shape.
core::StatusOr<DType> CheckWire(const v1::Tensor& wire, const std::string& name, std::vector<int64_t>* shape_out) {
  MQA_ASSIGN_OR_RETURN(DType dtype, FromWireDType(wire.dtype(), name));
  if (wire.shape_size() > kMaxDims) {
    return InvalidArgumentError(name + ": at most " + std::to_string(kMaxDims) + " dimensions, got " +
                                std::to_string(wire.shape_size()));
  }
  std::vector<int64_t> shape(wire.shape().begin(), wire.shape().end());
  // Overflow-safe element count: a hostile shape must not wrap around to match a small payload. The bound is on
  // the product of the non-zero sizes, so it holds after a zero too: LibTorch computes strides from every size,
  // and an empty [0, 2^34, 2^34, ...] overflowed there (INTERNAL; found by tests/fuzz/wire_fuzz).
  uint64_t numel = 1;
  uint64_t nonzero = 1;
  for (int64_t d : shape) {
    if (d < 0) return InvalidArgumentError(name + ": sizes must be >= 0, got shape " + core::ShapeToString(shape));
    if (d != 0 && nonzero > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d) / 8) {
      return InvalidArgumentError(name + ": shape " + core::ShapeToString(shape) + " is too large");
    }
    if (d != 0) nonzero *= static_cast<uint64_t>(d);
    numel *= static_cast<uint64_t>(d);
  }
  const uint64_t want = numel * core::DTypeSize(dtype);
  if (wire.data().size() != want) {
    return InvalidArgumentError(name + ": " + std::string(core::DTypeName(dtype)) + " " + core::ShapeToString(shape) +
                                " needs " + std::to_string(want) + " bytes (" + std::to_string(numel) + " elements x " +
                                std::to_string(core::DTypeSize(dtype)) + "), got " +
                                std::to_string(wire.data().size()));
  }
  *shape_out = std::move(shape);
  return dtype;
}

}  // namespace

core::StatusOr<core::Tensor> FromWire(const v1::Tensor& wire, const std::string& name) {
  std::vector<int64_t> shape;
  MQA_ASSIGN_OR_RETURN(DType dtype, CheckWire(wire, name, &shape));
  auto t = core::Tensor::FromBytes(dtype, shape, wire.data().data(), wire.data().size());
  if (!t.ok()) return core::Status(t.status().code(), name + ": " + t.status().message());
  return t;
}

core::StatusOr<core::Tensor> FromWireTaking(v1::Tensor* wire, const std::string& name) {
  std::vector<int64_t> shape;
  MQA_ASSIGN_OR_RETURN(DType dtype, CheckWire(*wire, name, &shape));
  // Moving a std::string hands over its buffer (O(1)); the tensor keeps that string alive.
  auto bytes = std::make_shared<std::string>(std::move(*wire->mutable_data()));
  wire->clear_data();
  const void* data = bytes->data();
  const size_t n = bytes->size();
  auto t = core::Tensor::Borrow(dtype, shape, data, n, std::move(bytes));
  if (!t.ok()) return core::Status(t.status().code(), name + ": " + t.status().message());
  return t;
}

v1::DataType ToWireDType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return v1::DATA_TYPE_FLOAT32;
    case DType::kBFloat16: return v1::DATA_TYPE_BFLOAT16;
    case DType::kFloat16: return v1::DATA_TYPE_FLOAT16;
    case DType::kBool: return v1::DATA_TYPE_BOOL;
    case DType::kUInt8: return v1::DATA_TYPE_UINT8;
  }
  return v1::DATA_TYPE_UNSPECIFIED;
}

core::Status ToWire(const core::Tensor& t, v1::Tensor* wire) {
  std::string* data = wire->mutable_data();
  data->resize(t.nbytes());
  MQA_RETURN_IF_ERROR(t.CopyBytesTo(data->data(), data->size()));
  wire->set_dtype(ToWireDType(t.dtype()));
  wire->clear_shape();
  for (int64_t d : t.shape()) wire->add_shape(d);
  return core::Status();
}

void ToWire(const core::ModelInfo& model, v1::ModelInfo* wire) {
  wire->set_name(model.name);
  wire->set_num_layers(model.num_layers);
  wire->set_max_tokens_per_session(model.max_tokens_per_session);
  wire->set_description(model.description);
  for (const std::string& d : model.devices) wire->add_devices(d);
  const core::MqaOptions& o = model.options;
  for (int i = 0; i < model.num_layers; ++i) {
    v1::LayerConfig* l = wire->add_layers();
    l->set_dim(o.dim);
    l->set_heads(o.heads);
    l->set_head_dim(o.head_dim());
    l->set_attn_impl(std::string(core::AttnImplName(o.attn_impl)));
    if (o.clip_qkv) l->set_clip_qkv(*o.clip_qkv);
    l->set_qk_ln(o.qk_ln);
    if (o.softmax_scale) l->set_softmax_scale(*o.softmax_scale);
    l->set_attn_pdrop(o.attn_pdrop);
    l->set_norm_type(std::string(core::NormTypeName(o.norm_type)));
    l->set_fc_type(o.fc_type);
    l->set_dtype(ToWireDType(o.dtype));
    l->set_device(o.device);
  }
}

void ToWire(const core::SessionInfo& s, v1::Session* wire) {
  wire->set_session_id(s.id);
  wire->set_model(s.model);
  wire->set_max_tokens(s.max_tokens);
  wire->clear_layer_positions();
  for (int64_t p : s.layer_positions) wire->add_layer_positions(p);
  *wire->mutable_idle_ttl() = google::protobuf::util::TimeUtil::MillisecondsToDuration(s.idle_ttl.count());
  SetTimestamp(s.expire_time, wire->mutable_expire_time());
  SetTimestamp(s.create_time, wire->mutable_create_time());
  wire->set_causal(s.causal);
  wire->set_position_bias(s.position_bias == core::PositionBias::kAlibi ? v1::POSITION_BIAS_ALIBI
                                                                        : v1::POSITION_BIAS_NONE);
  wire->set_admission(s.admission == core::Admission::kGuaranteed ? v1::ADMISSION_GUARANTEED
                                                                  : v1::ADMISSION_BEST_EFFORT);
  wire->set_cache_bytes(s.cache_bytes);
  wire->set_device(s.device);
}

grpc::Status ToGrpc(const core::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), status.message());
}

core::Clock::time_point SteadyDeadline(std::chrono::system_clock::time_point deadline) {
  if (deadline == std::chrono::system_clock::time_point::max()) return core::Clock::time_point::max();
  auto left = deadline - std::chrono::system_clock::now();
  // Far-future deadlines (gRPC's "infinite" is close to max) would overflow the steady clock.
  if (left > std::chrono::hours(24 * 365)) return core::Clock::time_point::max();
  return core::Clock::now() + std::chrono::duration_cast<core::Clock::duration>(left);
}

}  // namespace mqa::server
