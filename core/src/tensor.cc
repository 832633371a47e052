#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstring>
#include <limits>
#include <new>
#include <sstream>
#include <string>

#include "mqa/core/tensor.h"
#include "tensor_impl.h"

namespace mqa::core {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kBool: return "bool";
    case DType::kUInt8: return "uint8";
  }
  return "unknown";
}

StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "float32" || name == "fp32" || name == "f32" || name == "float") return DType::kFloat32;
  if (name == "bfloat16" || name == "bf16") return DType::kBFloat16;
  if (name == "float16" || name == "fp16" || name == "f16" || name == "half") return DType::kFloat16;
  if (name == "bool") return DType::kBool;
  if (name == "uint8" || name == "u8") return DType::kUInt8;
  return InvalidArgumentError("unknown dtype '" + std::string(name) +
                              "'; expected one of float32, bfloat16, float16, bool, uint8");
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBFloat16:
    case DType::kFloat16: return 2;
    case DType::kBool:
    case DType::kUInt8: return 1;
  }
  return 0;
}

bool IsFloatingPoint(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

at::ScalarType ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return at::kFloat;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat16: return at::kHalf;
    case DType::kBool: return at::kBool;
    case DType::kUInt8: return at::kByte;
  }
  return at::kFloat;
}

StatusOr<DType> FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kBool: return DType::kBool;
    case at::kByte: return DType::kUInt8;
    default: return InvalidArgumentError(std::string("unsupported tensor dtype ") + c10::toString(type));
  }
}

std::string ShapeOf(const at::Tensor& t) { return ShapeToString(t.sizes().vec()); }

namespace {

std::string FirstLine(std::string msg) {
  if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
  return msg;
}

// LibTorch's CPU allocator reports a refused buffer as a plain c10::Error (CAFFE_ENFORCE in alloc_cpu.cpp):
// "[enforce fail at alloc_cpu.cpp:N] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate
// 123 bytes. Error code 12 (Cannot allocate memory)". Older releases said "not enough memory" instead.
bool IsCpuAllocatorFailure(const std::string& msg) {
  return msg.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
         msg.find("DefaultCPUAllocator: not enough memory") != std::string::npos;
}

Status OutOfMemory(const char* what, const std::string& detail) {
  return ResourceExhaustedError(std::string(what) + ": out of memory: " + detail);
}

}  // namespace

Status StatusFromCurrentException(const char* what) {
  try {
    throw;
  } catch (const c10::OutOfMemoryError& e) {
    // e.g. "CUDA out of memory. Tried to allocate 1024.00 GiB. GPU 0 has a total capacity of ..."
    return OutOfMemory(what, FirstLine(e.what_without_backtrace()));
  } catch (const std::bad_alloc& e) {
    return OutOfMemory(what, std::string("a host buffer could not be allocated (") + e.what() + ")");
  } catch (const c10::Error& e) {
    const std::string msg = FirstLine(e.what_without_backtrace());
    if (IsCpuAllocatorFailure(msg)) {
      // Keep from "DefaultCPUAllocator" on: it names the bytes ("you tried to allocate N bytes") and the errno.
      return OutOfMemory(what, "host memory: " + msg.substr(msg.find("DefaultCPUAllocator")));
    }
    return InternalError(std::string(what) + ": " + msg);
  } catch (const std::exception& e) {
    return InternalError(std::string(what) + ": " + FirstLine(e.what()));
  } catch (...) {
    return InternalError(std::string(what) + ": unknown exception");
  }
}

StatusOr<at::Device> ParseDevice(std::string_view device) {
  if (device == "cpu") return at::Device(at::kCPU);
  int index = 0;
  if (device == "cuda") {
    index = 0;
  } else if (device.rfind("cuda:", 0) == 0 && device.size() > 5) {
    std::string digits(device.substr(5));
    if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 3) {
      return InvalidArgumentError("malformed device '" + std::string(device) + "'; expected cpu, cuda or cuda:N");
    }
    index = std::stoi(digits);
    // c10::DeviceIndex is 8 bits: cuda:200 would wrap to a negative index, which at::Device refuses by throwing
    // (--devices cuda:200 ended mqa-server in std::terminate; tests/fuzz/corpus/config/crash-devices-cuda-200).
    if (index > std::numeric_limits<c10::DeviceIndex>::max()) {
      return InvalidArgumentError("device '" + std::string(device) + "': CUDA device indices go up to " +
                                  std::to_string(std::numeric_limits<c10::DeviceIndex>::max()));
    }
  } else {
    return InvalidArgumentError("malformed device '" + std::string(device) + "'; expected cpu, cuda or cuda:N");
  }
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

Tensor::Tensor() = default;
Tensor::~Tensor() = default;
Tensor::Tensor(const Tensor&) = default;
Tensor& Tensor::operator=(const Tensor&) = default;
Tensor::Tensor(Tensor&&) noexcept = default;
Tensor& Tensor::operator=(Tensor&&) noexcept = default;
Tensor::Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

namespace {

Status CheckShape(const std::vector<int64_t>& shape) {
  for (int64_t s : shape) {
    if (s < 0) return InvalidArgumentError("negative dimension in shape " + ShapeToString(shape));
  }
  return Status::Ok();
}

int64_t Product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

}  // namespace

StatusOr<Tensor> Tensor::FromBytes(DType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes) {
  MQA_RETURN_IF_ERROR(CheckShape(shape));
  const size_t expected = static_cast<size_t>(Product(shape)) * DTypeSize(dtype);
  if (nbytes != expected) {
    return InvalidArgumentError("tensor of dtype " + std::string(DTypeName(dtype)) + " and shape " +
                                ShapeToString(shape) + " needs " + std::to_string(expected) + " bytes, got " +
                                std::to_string(nbytes));
  }
  if (dtype == DType::kBool) {
    // A bool byte other than 0/1 is undefined behaviour for LibTorch, so bytes from the wire are checked first.
    const uint8_t* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < nbytes; ++i) {
      if (p[i] > 1)
        return InvalidArgumentError("bool tensor byte " + std::to_string(i) + " is " + std::to_string(p[i]) +
                                    "; expected 0 or 1");
    }
  }
  return CatchAll("Tensor::FromBytes", [&]() -> StatusOr<Tensor> {
    at::Tensor t = at::empty(shape, at::TensorOptions().dtype(ToScalarType(dtype)));
    if (nbytes > 0) std::memcpy(t.data_ptr(), data, nbytes);
    return Wrap(std::move(t));
  });
}

StatusOr<Tensor> Tensor::Borrow(DType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes,
                                std::shared_ptr<const void> owner) {
  MQA_RETURN_IF_ERROR(CheckShape(shape));
  const size_t expected = static_cast<size_t>(Product(shape)) * DTypeSize(dtype);
  if (nbytes != expected || dtype == DType::kBool) {
    return FromBytes(dtype, shape, data, nbytes);  // its messages (and the bool bytes' check) in one place
  }
  return CatchAll("Tensor::Borrow", [&]() -> StatusOr<Tensor> {
    // from_blob never writes; the deleter holds the owner for as long as the storage lives.
    at::Tensor t = at::from_blob(
        const_cast<void*>(data), shape, [owner = std::move(owner)](void*) mutable { owner.reset(); },
        at::TensorOptions().dtype(ToScalarType(dtype)));
    return Wrap(std::move(t));
  });
}

StatusOr<Tensor> Tensor::FromFloats(DType dtype, const std::vector<int64_t>& shape, const std::vector<float>& values) {
  if (!IsFloatingPoint(dtype)) return InvalidArgumentError("FromFloats needs a floating-point dtype");
  MQA_RETURN_IF_ERROR(CheckShape(shape));
  if (static_cast<int64_t>(values.size()) != Product(shape)) {
    return InvalidArgumentError("shape " + ShapeToString(shape) + " needs " + std::to_string(Product(shape)) +
                                " values, got " + std::to_string(values.size()));
  }
  return CatchAll("Tensor::FromFloats", [&]() -> StatusOr<Tensor> {
    at::Tensor t = at::empty(shape, at::kFloat);
    if (!values.empty()) std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(float));
    return Wrap(t.to(ToScalarType(dtype)));
  });
}

StatusOr<Tensor> Tensor::Randn(DType dtype, const std::vector<int64_t>& shape, uint64_t seed, std::string_view device) {
  if (!IsFloatingPoint(dtype)) return InvalidArgumentError("Randn needs a floating-point dtype");
  MQA_RETURN_IF_ERROR(CheckShape(shape));
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  return CatchAll("Tensor::Randn", [&]() -> StatusOr<Tensor> {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    at::Tensor t = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
    return Wrap(t.to(dev, ToScalarType(dtype)));
  });
}

StatusOr<Tensor> Tensor::Zeros(DType dtype, const std::vector<int64_t>& shape, std::string_view device) {
  MQA_RETURN_IF_ERROR(CheckShape(shape));
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  return CatchAll("Tensor::Zeros", [&]() -> StatusOr<Tensor> {
    return Wrap(at::zeros(shape, at::TensorOptions().dtype(ToScalarType(dtype)).device(dev)));
  });
}

bool Tensor::defined() const { return impl_ != nullptr && impl_->t.defined(); }

DType Tensor::dtype() const {
  if (!defined()) return DType::kFloat32;
  auto d = FromScalarType(impl_->t.scalar_type());
  return d.ok() ? *d : DType::kFloat32;
}

std::vector<int64_t> Tensor::shape() const { return defined() ? impl_->t.sizes().vec() : std::vector<int64_t>{}; }
int64_t Tensor::dim() const { return defined() ? impl_->t.dim() : 0; }
int64_t Tensor::size(int64_t axis) const { return impl_->t.size(axis); }
int64_t Tensor::numel() const { return defined() ? impl_->t.numel() : 0; }
size_t Tensor::nbytes() const { return defined() ? impl_->t.nbytes() : 0; }
std::string Tensor::device() const { return defined() ? impl_->t.device().str() : "cpu"; }

StatusOr<Tensor> Tensor::To(std::string_view device) const {
  if (!defined()) return FailedPreconditionError("Tensor::To on an undefined tensor");
  MQA_ASSIGN_OR_RETURN(at::Device dev, ParseDevice(device));
  return CatchAll("Tensor::To", [&]() -> StatusOr<Tensor> { return Wrap(impl_->t.to(dev)); });
}

StatusOr<Tensor> Tensor::ToDType(DType dtype) const {
  if (!defined()) return FailedPreconditionError("Tensor::ToDType on an undefined tensor");
  return CatchAll("Tensor::ToDType", [&]() -> StatusOr<Tensor> { return Wrap(impl_->t.to(ToScalarType(dtype))); });
}

StatusOr<std::vector<uint8_t>> Tensor::ToBytes() const {
  if (!defined()) return FailedPreconditionError("Tensor::ToBytes on an undefined tensor");
  return CatchAll("Tensor::ToBytes", [&]() -> StatusOr<std::vector<uint8_t>> {
    at::Tensor c = impl_->t.to(at::kCPU).contiguous();
    std::vector<uint8_t> bytes(c.nbytes());
    if (!bytes.empty()) std::memcpy(bytes.data(), c.data_ptr(), bytes.size());
    return bytes;
  });
}

Status Tensor::CopyBytesTo(void* dst, size_t nbytes) const {
  if (!defined()) return FailedPreconditionError("Tensor::CopyBytesTo on an undefined tensor");
  if (nbytes != this->nbytes()) {
    return InvalidArgumentError("Tensor::CopyBytesTo: the tensor has " + std::to_string(this->nbytes()) +
                                " bytes, the destination " + std::to_string(nbytes));
  }
  return CatchAll("Tensor::CopyBytesTo", [&]() -> Status {
    const at::Tensor& t = impl_->t;
    at::Tensor c = t.is_cpu() && t.is_contiguous() ? t : t.to(at::kCPU).contiguous();
    if (nbytes > 0) std::memcpy(dst, c.data_ptr(), nbytes);
    return Status();
  });
}

StatusOr<Tensor> Tensor::Rows(int64_t start, int64_t count) const {
  if (!defined() || dim() == 0) return FailedPreconditionError("Tensor::Rows needs a tensor of at least one dimension");
  const int64_t n = size(0);
  if (start < 0 || count < 0 || start > n || count > n - start) {
    return OutOfRangeError("rows [" + std::to_string(start) + ", " + std::to_string(start) + " + " +
                           std::to_string(count) + ") of a tensor of " + std::to_string(n));
  }
  return CatchAll("Tensor::Rows", [&]() -> StatusOr<Tensor> { return Wrap(impl_->t.narrow(0, start, count)); });
}

StatusOr<std::vector<float>> Tensor::ToFloats() const {
  if (!defined()) return FailedPreconditionError("Tensor::ToFloats on an undefined tensor");
  return CatchAll("Tensor::ToFloats", [&]() -> StatusOr<std::vector<float>> {
    at::Tensor c = impl_->t.to(at::kCPU).to(at::kFloat).contiguous();
    std::vector<float> v(static_cast<size_t>(c.numel()));
    if (!v.empty()) std::memcpy(v.data(), c.data_ptr(), v.size() * sizeof(float));
    return v;
  });
}

}  // namespace mqa::core
