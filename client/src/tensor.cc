#include "mqa/client/tensor.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "float_bits.h"

namespace mqa::client {
namespace {

bool IsFloating(DataType dtype) {
  return dtype == DataType::kFloat32 || dtype == DataType::kBFloat16 || dtype == DataType::kFloat16;
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t size : shape) {
    if (size < 0) return -1;
    if (size != 0 && n > std::numeric_limits<int64_t>::max() / size) return -1;
    n *= size;
  }
  return n;
}

}  // namespace

size_t DataTypeSize(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return 4;
    case DataType::kBFloat16:
    case DataType::kFloat16: return 2;
    case DataType::kBool:
    case DataType::kUInt8: return 1;
    case DataType::kUnspecified: break;
  }
  return 0;
}

std::string DataTypeName(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32: return "float32";
    case DataType::kBFloat16: return "bfloat16";
    case DataType::kFloat16: return "float16";
    case DataType::kBool: return "bool";
    case DataType::kUInt8: return "uint8";
    case DataType::kUnspecified: break;
  }
  return "unspecified";
}

std::optional<DataType> ParseDataType(std::string_view name) {
  if (name == "float32" || name == "f32" || name == "fp32") return DataType::kFloat32;
  if (name == "bfloat16" || name == "bf16") return DataType::kBFloat16;
  if (name == "float16" || name == "f16" || name == "fp16" || name == "half") return DataType::kFloat16;
  if (name == "bool") return DataType::kBool;
  if (name == "uint8" || name == "u8") return DataType::kUInt8;
  return std::nullopt;
}

int64_t HostTensor::num_elements() const { return ElementCount(shape); }

std::string HostTensor::ShapeString() const { return ShapeToString(shape); }

Status HostTensor::Validate() const {
  if (DataTypeSize(dtype) == 0) return Status(StatusCode::kInvalidArgument, "tensor dtype is not set");
  const int64_t n = num_elements();
  if (n < 0) {
    return Status(StatusCode::kInvalidArgument,
                  "tensor shape " + ShapeString() + " has a negative size or too many elements");
  }
  const uint64_t expected = static_cast<uint64_t>(n) * DataTypeSize(dtype);
  if (data.size() != expected) {
    return Status(StatusCode::kInvalidArgument, "tensor of shape " + ShapeString() + " and dtype " +
                                                    DataTypeName(dtype) + " needs " + std::to_string(expected) +
                                                    " bytes, got " + std::to_string(data.size()));
  }
  return Status::Ok();
}

StatusOr<HostTensor> HostTensor::FromFloats(std::vector<int64_t> shape, const std::vector<float>& values,
                                            DataType dtype) {
  if (!IsFloating(dtype)) {
    return Status(StatusCode::kInvalidArgument,
                  "FromFloats needs float32, bfloat16 or float16, got " + DataTypeName(dtype));
  }
  const int64_t n = ElementCount(shape);
  if (n < 0 || static_cast<uint64_t>(n) != values.size()) {
    return Status(StatusCode::kInvalidArgument, "shape " + ShapeToString(shape) + " needs " + std::to_string(n) +
                                                    " values, got " + std::to_string(values.size()));
  }
  HostTensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.resize(values.size() * DataTypeSize(dtype));
  uint8_t* out = t.data.data();
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DataType::kFloat32) {
      const uint32_t bits = FloatBits(values[i]);
      for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<uint8_t>(bits >> (8 * b));
    } else {
      const uint16_t half =
          dtype == DataType::kBFloat16 ? FloatToBFloat16Bits(values[i]) : FloatToFloat16Bits(values[i]);
      // Little-endian on the wire regardless of the host.
      out[2 * i] = static_cast<uint8_t>(half & 0xFF);
      out[2 * i + 1] = static_cast<uint8_t>(half >> 8);
    }
  }
  return t;
}

StatusOr<HostTensor> HostTensor::FromBools(std::vector<int64_t> shape, const std::vector<bool>& values) {
  const int64_t n = ElementCount(shape);
  if (n < 0 || static_cast<uint64_t>(n) != values.size()) {
    return Status(StatusCode::kInvalidArgument, "shape " + ShapeToString(shape) + " needs " + std::to_string(n) +
                                                    " values, got " + std::to_string(values.size()));
  }
  HostTensor t;
  t.dtype = DataType::kBool;
  t.shape = std::move(shape);
  t.data.reserve(values.size());
  for (bool v : values) t.data.push_back(v ? 1 : 0);
  return t;
}

StatusOr<std::vector<float>> HostTensor::ToFloats() const {
  Status valid = Validate();
  if (!valid.ok()) return valid;
  const size_t n = static_cast<size_t>(num_elements());
  std::vector<float> values(n);
  const uint8_t* in = data.data();
  for (size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DataType::kFloat32: {
        const uint32_t bits = uint32_t{in[4 * i]} | uint32_t{in[4 * i + 1]} << 8 | uint32_t{in[4 * i + 2]} << 16 |
                              uint32_t{in[4 * i + 3]} << 24;
        values[i] = BitsFloat(bits);
        break;
      }
      case DataType::kBFloat16:
      case DataType::kFloat16: {
        const uint16_t bits = static_cast<uint16_t>(in[2 * i] | in[2 * i + 1] << 8);
        values[i] = dtype == DataType::kBFloat16 ? BFloat16BitsToFloat(bits) : Float16BitsToFloat(bits);
        break;
      }
      case DataType::kBool:
      case DataType::kUInt8: values[i] = static_cast<float>(in[i]); break;
      case DataType::kUnspecified: break;  // Validate() rejected it
    }
  }
  return values;
}

}  // namespace mqa::client
