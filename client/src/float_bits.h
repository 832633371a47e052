// The scalar float conversions behind HostTensor (mqa/client/tensor.h): float32 <-> bfloat16 / float16 bit
// patterns. Internal to libmqa_client, which embeds them (static library mqa_client_float_bits); callers convert
// whole tensors with HostTensor::FromFloats and ToFloats. Declared here, out of the public headers, so that
// mqa_client_test can check them bit for bit.
#ifndef MQA_CLIENT_SRC_FLOAT_BITS_H_
#define MQA_CLIENT_SRC_FLOAT_BITS_H_

#include <cstdint>
#include <cstring>

namespace mqa::client {

// A float's IEEE-754 bit pattern and back (memcpy: the defined way to reinterpret).
inline uint32_t FloatBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float BitsFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// Narrowing rounds to nearest, ties to even; overflow gives +-inf; NaN stays NaN (quiet, sign kept); float16
// subnormals are produced and read exactly.
uint16_t FloatToBFloat16Bits(float value);
float BFloat16BitsToFloat(uint16_t bits);
uint16_t FloatToFloat16Bits(float value);
float Float16BitsToFloat(uint16_t bits);

}  // namespace mqa::client

#endif  // MQA_CLIENT_SRC_FLOAT_BITS_H_
