// Conversions between the wire schema (mqa.v1 protobuf messages) and core's types. Every conversion from the
// wire validates fully: a caller's bytes never reach core unchecked.
#ifndef MQA_SERVER_WIRE_H_
#define MQA_SERVER_WIRE_H_

#include <grpcpp/grpcpp.h>

#include <string>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "mqa/core/tensor.h"
#include "mqa/v1/mqa_service.pb.h"
#include "mqa/v1/tensor.pb.h"

namespace mqa::server {

// Checks dtype, shape (at most 8 dims, sizes >= 0, no overflow) and the byte count, then copies into a CPU
// tensor. name ("x", "bias", ...) starts every error message. INVALID_ARGUMENT on any mismatch.
core::StatusOr<core::Tensor> FromWire(const v1::Tensor& wire, const std::string& name);
// The same checks, without copying the bytes: the tensor takes wire's data (wire->data() is empty afterwards) and
// reads it in place. For step inputs, whose bytes then go from the parsed message straight into the engine's
// staging buffer.
core::StatusOr<core::Tensor> FromWireTaking(v1::Tensor* wire, const std::string& name);
// Contiguous little-endian bytes of t (copied to the CPU if needed), written into wire's data in place.
core::Status ToWire(const core::Tensor& t, v1::Tensor* wire);

v1::DataType ToWireDType(core::DType dtype);

void ToWire(const core::ModelInfo& model, v1::ModelInfo* wire);
void ToWire(const core::SessionInfo& session, v1::Session* wire);

// core::Status and grpc::Status share the canonical codes.
grpc::Status ToGrpc(const core::Status& status);

// The server-side deadline of a call: its client deadline, as a steady-clock time (max() for none).
core::Clock::time_point SteadyDeadline(std::chrono::system_clock::time_point deadline);

}  // namespace mqa::server

#endif  // MQA_SERVER_WIRE_H_
