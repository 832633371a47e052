#include "engine/caller_tensors.h"

#include <string>

namespace mqa::core {

StatusOr<Tensor> ToLayer(const Tensor& t, const MqaOptions& o, bool floating) {
  if (!t.defined()) return t;
  Tensor cur = t;
  if (floating && cur.dtype() != o.dtype) {
    if (!IsFloatingPoint(cur.dtype())) {
      return InvalidArgumentError(std::string("expected a floating dtype (float32, bfloat16 or float16), got ") +
                                  std::string(DTypeName(cur.dtype())));
    }
    MQA_ASSIGN_OR_RETURN(cur, cur.ToDType(o.dtype));
  }
  return cur.To(o.device);
}

StatusOr<Tensor> ToCaller(const Tensor& t, DType dtype) {
  if (!t.defined()) return t;
  MQA_ASSIGN_OR_RETURN(Tensor cpu, t.To("cpu"));
  if (cpu.dtype() == dtype) return cpu;
  return cpu.ToDType(dtype);
}

}  // namespace mqa::core
