// Pieces of the service shared by its unary methods (service.cc) and its stream (step_stream_reactor.cc).
#ifndef MQA_SERVER_SERVICE_INTERNAL_H_
#define MQA_SERVER_SERVICE_INTERNAL_H_

#include <memory>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "mqa/v1/mqa_service.pb.h"
#include "server/metrics.h"

namespace mqa::server::internal {

// Validates a step from the wire (session id, x) and converts it. INVALID_ARGUMENT saying what was expected.
core::StatusOr<core::StepRequest> ToStepRequest(const v1::StepInput& in, core::Clock::time_point deadline,
                                                std::shared_ptr<const core::CancelFlag> cancel);
// The fields every answer echoes: session id, layer and sequence.
void FillResult(const v1::StepInput& in, v1::StepResult* r);
// Position, count, timing and output of a computed step.
core::Status FillResult(const core::StepResult& result, v1::StepResult* r);
// Counts a failed step by code, or observes a completed step's queue + compute time.
void CountStep(ServiceMetrics* metrics, const core::Status& status, const core::StatusOr<core::StepResult>& result);

}  // namespace mqa::server::internal

#endif  // MQA_SERVER_SERVICE_INTERNAL_H_
