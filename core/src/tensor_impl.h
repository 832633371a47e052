// Private to core: the LibTorch side of mqa::core::Tensor, and helpers shared by core's torch sources.
// Never include from outside core/src (the include firewall test enforces it).
#ifndef MQA_CORE_SRC_TENSOR_IMPL_H_
#define MQA_CORE_SRC_TENSOR_IMPL_H_

#include <ATen/ATen.h>

#include <exception>
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

// Runs f, turning any exception from LibTorch into a Status (exceptions never leave core).
template <typename F>
auto CatchAll(const char* what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    std::string msg = e.what();
    // c10 errors append a C++ backtrace after the first line; keep only what a caller can act on.
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
    return Status(StatusCode::kInternal, std::string(what) + ": " + msg);
  } catch (...) {
    return Status(StatusCode::kInternal, std::string(what) + ": unknown exception");
  }
}

}  // namespace mqa::core

#endif  // MQA_CORE_SRC_TENSOR_IMPL_H_
