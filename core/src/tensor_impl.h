// Private to core: the LibTorch side of mqa::core::Tensor, and helpers shared by core's torch sources.
// Never include from outside core/src (the include firewall test enforces it).
#ifndef MQA_CORE_SRC_TENSOR_IMPL_H_
#define MQA_CORE_SRC_TENSOR_IMPL_H_

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "mqa/core/status.h"
#include "mqa/core/tensor.h"

namespace mqa::core {

struct TensorImpl {
  at::Tensor t;
};

inline Tensor Wrap(at::Tensor t) { return Tensor(std::make_shared<TensorImpl>(TensorImpl{std::move(t)})); }
// Undefined Tensor -> undefined at::Tensor.
inline at::Tensor Unwrap(const Tensor& t) { return t.defined() ? t.impl()->t : at::Tensor(); }

at::ScalarType ToScalarType(DType dtype);
StatusOr<DType> FromScalarType(at::ScalarType type);
StatusOr<at::Device> ParseDevice(std::string_view device);
std::string ShapeOf(const at::Tensor& t);  // "[2, 1, 64, 7]"

// The Status for the exception being handled; call it only from inside a catch block. Running out of memory is
// RESOURCE_EXHAUSTED, since the same request may succeed later or smaller: c10::OutOfMemoryError (the CUDA caching
// allocator), std::bad_alloc, and LibTorch's CPU allocator refusing a buffer (a plain c10::Error whose message
// starts "DefaultCPUAllocator: can't allocate memory"). The message says what could not be allocated. Anything
// else is INTERNAL. Messages are "<what>: <first line of the exception's message>" (c10 appends a backtrace).
Status StatusFromCurrentException(const char* what);

// Runs f, turning any exception from LibTorch into a Status (exceptions never leave core).
template <typename F>
auto CatchAll(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    return StatusFromCurrentException(what);
  }
}

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_TENSOR_IMPL_H_
