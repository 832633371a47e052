// Conversions between the public, protobuf-free types and mqa.v1 messages. Private to libmqa_client.
#ifndef MQA_CLIENT_SRC_CONVERT_H_
#define MQA_CLIENT_SRC_CONVERT_H_

#include <grpcpp/support/status.h>

#include <chrono>

#include "mqa/client/client.h"
#include "mqa/v1/mqa_service.pb.h"

namespace mqa::client::internal {

// Code and message unchanged.
Status FromGrpc(const grpc::Status& status);

// A streamed or batched step's status: OK for code 0, else the code and message.
Status StatusFromProto(const v1::StepStatus& proto);

void TensorToProto(const HostTensor& tensor, v1::Tensor* proto);
HostTensor TensorFromProto(const v1::Tensor& proto);

void DurationToProto(std::chrono::milliseconds duration, google::protobuf::Duration* proto);

LayerConfig LayerConfigFromProto(const v1::LayerConfig& proto);
ModelInfo ModelInfoFromProto(const v1::ModelInfo& proto);
SessionInfo SessionInfoFromProto(const v1::Session& proto);
StepOutput StepOutputFromProto(const v1::StepResult& proto);

// Fills everything but `sequence`. INVALID_ARGUMENT when x is malformed.
Status StepInputToProto(const std::string& session_id, int32_t layer, const HostTensor& x,
                        std::optional<int64_t> position, std::optional<std::chrono::milliseconds> timeout,
                        v1::StepInput* proto);

// Fills everything but `sequence`. INVALID_ARGUMENT when x is malformed or positions is neither empty nor B
// long (checked here, so a malformed batch is never sent).
Status StepBatchInputToProto(const StepBatchInput& batch, v1::StepBatchInput* proto);
StepBatchOutput StepBatchOutputFromProto(const v1::StepBatchResult& proto);

// INVALID_ARGUMENT when a tensor is malformed.
Status ForwardInputToProto(const ForwardInput& input, v1::ForwardRequest* proto);
ForwardOutput ForwardOutputFromProto(const v1::ForwardResponse& proto);

}  // namespace mqa::client::internal

#endif  // MQA_CLIENT_SRC_CONVERT_H_
