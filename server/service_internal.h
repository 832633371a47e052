// Pieces of the service shared by its unary methods (service.cc) and its stream (step_stream_reactor.cc).
#ifndef MQA_SERVER_SERVICE_INTERNAL_H_
#define MQA_SERVER_SERVICE_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"
#include "mqa/v1/mqa_service.pb.h"
#include "server/metrics.h"

namespace mqa::server::internal {

// Validates a step from the wire (session id, x) and converts it, taking x's bytes out of *in (the tensor reads
// them in place). INVALID_ARGUMENT saying what was expected.
core::StatusOr<core::StepRequest> ToStepRequest(v1::StepInput* in, core::Clock::time_point deadline,
                                                std::shared_ptr<const core::CancelFlag> cancel);

// A StepBatchInput taken apart: one engine request per entry that passed the wire checks, x's rows as views of
// the one batch tensor (its bytes taken from the message, not copied).
struct PreparedBatch {
  std::vector<core::StepRequest> requests;  // requests[i] is entry entry_of[i]
  std::vector<size_t> entry_of;
  std::vector<core::Status> refused;  // per entry (B): OK, or why its wire check failed (nothing sent for it)
  core::DType dtype = core::DType::kFloat32;
  std::vector<int64_t> row_shape;  // [1, s, dim]
  size_t row_bytes = 0;
  int32_t layer = 0;
  uint64_t sequence = 0;
};
// INVALID_ARGUMENT (saying what was expected) when the batch as a whole cannot be read: no sessions, x missing,
// not [B, s, dim] with B the number of sessions, positions neither empty nor B long. Per-entry problems (a
// malformed session id) are in refused instead.
core::StatusOr<PreparedBatch> ToStepBatch(v1::StepBatchInput* in, core::Clock::time_point deadline,
                                          std::shared_ptr<const core::CancelFlag> cancel);
// The answers (results[i] for batch.requests[i]) as a StepBatchResult: statuses, positions, timings and the
// [B, s, dim] output (zero rows for failed entries), each entry counted in metrics as a streamed step is.
void FillBatchResult(const PreparedBatch& batch, std::vector<core::StatusOr<core::StepResult>> results,
                     ServiceMetrics* metrics, v1::StepBatchResult* out);
// The fields every answer echoes: session id, layer and sequence.
void FillResult(const v1::StepInput& in, v1::StepResult* r);
// Position, count, timing and output of a computed step.
core::Status FillResult(const core::StepResult& result, v1::StepResult* r);
// Counts a failed step by code, or observes a completed step's queue + compute time.
void CountStep(ServiceMetrics* metrics, const core::Status& status, const core::StatusOr<core::StepResult>& result);

}  // namespace mqa::server::internal

#endif  // MQA_SERVER_SERVICE_INTERNAL_H_
