#include "float_bits.h"

#include <cmath>
#include <cstring>

namespace mqa::client {
namespace {

// Shifts `value` right by `shift` bits (1..31), rounding to nearest with ties to even.
uint32_t ShiftRoundNearestEven(uint32_t value, int shift) {
  const uint32_t quotient = value >> shift;
  const uint32_t remainder = value & ((uint32_t{1} << shift) - 1);
  const uint32_t half = uint32_t{1} << (shift - 1);
  if (remainder > half || (remainder == half && (quotient & 1u) != 0)) return quotient + 1;
  return quotient;
}

}  // namespace

uint16_t FloatToBFloat16Bits(float value) {
  const uint32_t bits = FloatBits(value);
  if (std::isnan(value)) {
    // Truncation could clear every payload bit of a NaN and turn it into infinity; force the quiet bit.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  // Adding 0x7FFF plus the lowest kept bit rounds half to even; a carry into the exponent is the correct
  // result, up to and including overflow to infinity.
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

float BFloat16BitsToFloat(uint16_t bits) { return BitsFloat(static_cast<uint32_t>(bits) << 16); }

uint16_t FloatToFloat16Bits(float value) {
  const uint32_t bits = FloatBits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) {
    if (magnitude == 0x7F800000u) return sign | 0x7C00u;
    // Keep the top of the payload, and the quiet bit so that the result cannot read as infinity.
    return static_cast<uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x03FFu));
  }
  const int exponent = static_cast<int>(magnitude >> 23) - 127;  // unbiased
  const uint32_t mantissa = magnitude & 0x007FFFFFu;
  const int half_exponent = exponent + 15;
  if (half_exponent >= 31) return sign | 0x7C00u;
  if (half_exponent <= 0) {
    // Subnormal half: value = m * 2^-24 with m = M * 2^(exponent + 1), M the 24-bit significand (float
    // subnormals are far below half's range and end up here too, rounding to zero).
    const int shift = -exponent - 1;
    if (shift > 24) return sign;
    const uint32_t significand = (magnitude >> 23) == 0 ? mantissa : (mantissa | 0x00800000u);
    // A rounded-up 0x400 is the smallest normal's encoding, so the carry needs no special case.
    return static_cast<uint16_t>(sign | ShiftRoundNearestEven(significand, shift));
  }
  const uint32_t unrounded = (static_cast<uint32_t>(half_exponent) << 23) | mantissa;
  // Rounding the combined exponent|mantissa lets a mantissa carry bump the exponent (to infinity at the top).
  return static_cast<uint16_t>(sign | ShiftRoundNearestEven(unrounded, 13));
}

float Float16BitsToFloat(uint16_t bits) {
  const uint32_t sign = (static_cast<uint32_t>(bits) & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x03FFu;
  if (exponent == 0) {
    // Zero or subnormal: exactly mantissa * 2^-24, which a float represents.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return BitsFloat(sign | 0x7F800000u | (mantissa << 13));
  return BitsFloat(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

}  // namespace mqa::client
