// Tensor: core's framework-free handle to an n-dimensional array on the CPU or a CUDA device.
//
// Callers outside core (server, client glue, tests, benchmarks) build tensors from raw little-endian bytes,
// move them between devices and read them back, without seeing the framework that stores them. A Tensor is a
// cheap, copyable reference: copies share storage (like std::shared_ptr). Tensors returned by core are
// contiguous and never alias caller-owned memory.
//
// Thread-safety: a Tensor may be read from several threads; writing to shared storage is never done by core
// after a tensor has been returned.
#ifndef MQA_CORE_TENSOR_H_
#define MQA_CORE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/core/status.h"

namespace mqa::core {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kBool = 3, kUInt8 = 4 };

// "float32", "bfloat16", "float16", "bool", "uint8".
std::string_view DTypeName(DType dtype);
// Accepts the names above plus "fp32", "bf16", "fp16", "f32".
StatusOr<DType> ParseDType(std::string_view name);
// Bytes per element.
size_t DTypeSize(DType dtype);
bool IsFloatingPoint(DType dtype);

// "[2, 1, 64, 7]".
std::string ShapeToString(const std::vector<int64_t>& shape);

struct TensorImpl;  // defined in core's private sources

class Tensor {
 public:
  Tensor();  // undefined: defined() is false
  ~Tensor();
  Tensor(const Tensor&);
  Tensor& operator=(const Tensor&);
  Tensor(Tensor&&) noexcept;
  Tensor& operator=(Tensor&&) noexcept;

  // Copies nbytes of row-major little-endian data. nbytes must equal product(shape) * DTypeSize(dtype);
  // a bool tensor takes one byte per element, 0 or 1. Result lives on the CPU.
  static StatusOr<Tensor> FromBytes(DType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes);
  // Float32 values converted to dtype (which must be floating point). Convenience for tests and tools.
  static StatusOr<Tensor> FromFloats(DType dtype, const std::vector<int64_t>& shape, const std::vector<float>& values);
  // Standard normal values from a private generator seeded by seed, on device ("cpu", "cuda", "cuda:N").
  static StatusOr<Tensor> Randn(DType dtype, const std::vector<int64_t>& shape, uint64_t seed,
                                std::string_view device = "cpu");
  static StatusOr<Tensor> Zeros(DType dtype, const std::vector<int64_t>& shape, std::string_view device = "cpu");
  // Like FromBytes, without the copy: the tensor reads data in place (on the CPU) and keeps owner alive until its
  // last reference is gone. The caller must not change the bytes while owner lives; core never writes them. For
  // the server's inputs, whose bytes already sit in a parsed message.
  static StatusOr<Tensor> Borrow(DType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes,
                                 std::shared_ptr<const void> owner);

  bool defined() const;
  DType dtype() const;
  std::vector<int64_t> shape() const;
  int64_t dim() const;
  int64_t size(int64_t axis) const;  // negative axes count from the end
  int64_t numel() const;
  size_t nbytes() const;
  std::string device() const;  // "cpu" or "cuda:N"

  // Copy on another device / in another dtype. A no-op copy is avoided (returns a reference to the same data).
  StatusOr<Tensor> To(std::string_view device) const;
  StatusOr<Tensor> ToDType(DType dtype) const;
  // Row-major little-endian bytes (synchronises with the device).
  StatusOr<std::vector<uint8_t>> ToBytes() const;
  // The same bytes written into dst, which must hold exactly nbytes() (synchronises with the device). For
  // writing a reply's bytes field in place, without ToBytes' intermediate vector.
  Status CopyBytesTo(void* dst, size_t nbytes) const;
  // Values converted to float32 (bool becomes 0/1). Convenience for tests and tools.
  StatusOr<std::vector<float>> ToFloats() const;
  // Rows [start, start + count) of the outermost dimension: a view sharing this tensor's storage (contiguous when
  // this one is). OUT_OF_RANGE unless 0 <= start <= start + count <= size(0); FAILED_PRECONDITION for a scalar.
  StatusOr<Tensor> Rows(int64_t start, int64_t count) const;

  // For core's private sources only.
  const std::shared_ptr<TensorImpl>& impl() const { return impl_; }
  explicit Tensor(std::shared_ptr<TensorImpl> impl);

 private:
  std::shared_ptr<TensorImpl> impl_;
};

// A named set of tensors (a state dict, or the contents of a safetensors file). Ordered by name.
using TensorMap = std::map<std::string, Tensor>;

}  // namespace mqa::core

#endif  // MQA_CORE_TENSOR_H_
