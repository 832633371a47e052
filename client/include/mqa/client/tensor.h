// Host-side tensors for the mqaserve client: plain bytes with a dtype and a shape, and the float conversions
// (float32 <-> bfloat16 / float16) callers need to build inputs and read outputs. Standard library only.
#ifndef MQA_CLIENT_TENSOR_H_
#define MQA_CLIENT_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/client/export.h"
#include "mqa/client/status.h"

namespace mqa::client {

// Element types; the numeric values are mqa.v1.DataType's.
enum class DataType : int {
  kUnspecified = 0,
  kFloat32 = 1,   // IEEE-754 binary32
  kBFloat16 = 2,  // upper half of a binary32
  kFloat16 = 3,   // IEEE-754 binary16
  kBool = 4,      // one byte, 0 or 1
  kUInt8 = 5,
};

// Bytes per element; 0 for kUnspecified.
MQA_CLIENT_EXPORT size_t DataTypeSize(DataType dtype);
// "float32", "bfloat16", "float16", "bool", "uint8", "unspecified".
MQA_CLIENT_EXPORT std::string DataTypeName(DataType dtype);
// Inverse of DataTypeName; also accepts "f32", "bf16", "f16", "fp32", "fp16", "u8". nullopt when unknown.
MQA_CLIENT_EXPORT std::optional<DataType> ParseDataType(std::string_view name);

// A dense row-major (C order) tensor in host memory: `data` holds product(shape) * DataTypeSize(dtype) bytes,
// little-endian (the wire format of mqa.v1.Tensor). An empty shape is a scalar. A plain value type: copying
// copies the bytes; no synchronisation.
struct MQA_CLIENT_EXPORT HostTensor {
  DataType dtype = DataType::kUnspecified;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;

  // product(shape); 1 for a scalar. -1 when a size is negative or the product overflows int64.
  int64_t num_elements() const;

  // OK when dtype is set, every size >= 0 and data.size() matches; INVALID_ARGUMENT (saying what was expected)
  // otherwise.
  Status Validate() const;

  // "[2, 3, 4]".
  std::string ShapeString() const;

  // Builds a tensor of `dtype` (kFloat32, kBFloat16 or kFloat16) from float values. Narrowing rounds to nearest,
  // ties to even; overflow gives +-inf; NaN stays NaN (quiet, sign kept); float16 subnormals are produced exactly.
  // INVALID_ARGUMENT when values.size() != product(shape) or dtype is not a floating type.
  static StatusOr<HostTensor> FromFloats(std::vector<int64_t> shape, const std::vector<float>& values,
                                         DataType dtype = DataType::kFloat32);

  // A kBool tensor (masks): one byte per element, 1 = true. INVALID_ARGUMENT on a size mismatch.
  static StatusOr<HostTensor> FromBools(std::vector<int64_t> shape, const std::vector<bool>& values);

  // The elements as floats (exact for every floating dtype; 0/1 for kBool, 0..255 for kUInt8).
  // INVALID_ARGUMENT when Validate() fails.
  StatusOr<std::vector<float>> ToFloats() const;
};

}  // namespace mqa::client

#endif  // MQA_CLIENT_TENSOR_H_
