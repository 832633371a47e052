// Moving tensors between a caller's form (the CPU, any floating dtype) and a layer's (its dtype and device).
// Private to core.
#ifndef MQA_CORE_SRC_ENGINE_CALLER_TENSORS_H_
#define MQA_CORE_SRC_ENGINE_CALLER_TENSORS_H_

#include <chrono>
#include <cstdint>

#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

// Converts an optional caller tensor to the layer's dtype (floating tensors only) and device.
StatusOr<Tensor> ToLayer(const Tensor& t, const MqaOptions& o, bool floating);
// An optional result back on the CPU, in dtype.
StatusOr<Tensor> ToCaller(const Tensor& t, DType dtype);

inline int64_t MicrosBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count();
}

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_ENGINE_CALLER_TENSORS_H_
