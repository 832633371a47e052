// HostTensor and the float32 <-> bfloat16 / float16 conversions, against hand-computed IEEE-754 bit patterns
// and an independent double-precision rounding model.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "float_bits.h"  // the scalar conversions, internal to libmqa_client
#include "mqa/client/tensor.h"

namespace mqa::client {
namespace {

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint32_t ToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

TEST(BFloat16, KnownBitPatterns) {
  EXPECT_EQ(FloatToBFloat16Bits(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBFloat16Bits(-2.0f), 0xC000);
  EXPECT_EQ(FloatToBFloat16Bits(0.0f), 0x0000);
  EXPECT_EQ(FloatToBFloat16Bits(-0.0f), 0x8000);
  // 1 + 2^-8 lies exactly between 0x3F80 and 0x3F81: ties go to the even 0x3F80.
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x3F808000)), 0x3F80);
  // 0x3F818000 lies between 0x3F81 and 0x3F82: the even one is 0x3F82.
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x3F818000)), 0x3F82);
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x3F808001)), 0x3F81);  // just above the tie
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x3F807FFF)), 0x3F80);  // just below
  EXPECT_EQ(FloatToBFloat16Bits(3.14159265f), 0x4049);           // pi = 0x40490FDB
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(FloatToBFloat16Bits(-std::numeric_limits<float>::infinity()), 0xFF80);
  // FLT_MAX rounds up past the largest bfloat16 (0x7F7F) to infinity.
  EXPECT_EQ(FloatToBFloat16Bits(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x7F7F7FFF)), 0x7F7F);
  // The smallest float subnormal keeps its (zero) upper half.
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x00000001)), 0x0000);
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x00008000)), 0x0000);  // tie to even
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0x00018000)), 0x0002);
}

TEST(BFloat16, NaNStaysNaN) {
  // A NaN whose payload lives only in the low half must not truncate to infinity.
  const float low_payload_nan = FromBits(0x7F800001);
  ASSERT_TRUE(std::isnan(low_payload_nan));
  EXPECT_TRUE(std::isnan(BFloat16BitsToFloat(FloatToBFloat16Bits(low_payload_nan))));
  EXPECT_TRUE(std::isnan(BFloat16BitsToFloat(FloatToBFloat16Bits(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(FloatToBFloat16Bits(FromBits(0xFFC00000)) & 0x8000, 0x8000);  // sign kept
}

TEST(BFloat16, EveryPatternRoundTrips) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const float f = BFloat16BitsToFloat(static_cast<uint16_t>(b));
    EXPECT_EQ(ToBits(f), b << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(BFloat16BitsToFloat(FloatToBFloat16Bits(f))));
    } else {
      EXPECT_EQ(FloatToBFloat16Bits(f), b) << std::hex << b;
    }
  }
}

TEST(Float16, KnownBitPatterns) {
  EXPECT_EQ(FloatToFloat16Bits(1.0f), 0x3C00);
  EXPECT_EQ(FloatToFloat16Bits(-2.0f), 0xC000);
  EXPECT_EQ(FloatToFloat16Bits(0.5f), 0x3800);
  EXPECT_EQ(FloatToFloat16Bits(0.1f), 0x2E66);
  EXPECT_EQ(FloatToFloat16Bits(1.0f / 3.0f), 0x3555);
  EXPECT_EQ(FloatToFloat16Bits(-0.0f), 0x8000);
  EXPECT_EQ(FloatToFloat16Bits(65504.0f), 0x7BFF);  // largest finite half
  EXPECT_EQ(FloatToFloat16Bits(65519.0f), 0x7BFF);  // below the midpoint to 65536
  EXPECT_EQ(FloatToFloat16Bits(65520.0f), 0x7C00);  // the midpoint: ties to the even "65536" = infinity
  EXPECT_EQ(FloatToFloat16Bits(1e10f), 0x7C00);
  EXPECT_EQ(FloatToFloat16Bits(-1e10f), 0xFC00);
  EXPECT_EQ(FloatToFloat16Bits(std::numeric_limits<float>::infinity()), 0x7C00);
  // 1 + 2^-11 is the tie between 0x3C00 and 0x3C01: even 0x3C00. 1 + 3*2^-11 ties to 0x3C02.
  EXPECT_EQ(FloatToFloat16Bits(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(FloatToFloat16Bits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(FloatToFloat16Bits(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3C01);
  // 2047.5 ... carries into the exponent: 2047 + 0.5 ties between 2047 (0x67FF) and 2048 (0x6800, even).
  EXPECT_EQ(FloatToFloat16Bits(2047.5f), 0x6800);
  // Subnormals: 2^-14 is the smallest normal, 2^-24 the smallest subnormal.
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1.0f, -14)), 0x0400);
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1.0f, -25)), 0x0000);     // tie to even zero
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1.5f, -25)), 0x0001);     // above the tie
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 * 2^-24 ties to even 2
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1023.0f, -24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(FloatToFloat16Bits(-std::ldexp(1.0f, -24)), 0x8001);
  EXPECT_EQ(FloatToFloat16Bits(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(FloatToFloat16Bits(FromBits(0x00000001)), 0x0000);  // float subnormal
}

TEST(Float16, NaNStaysNaN) {
  EXPECT_TRUE(std::isnan(Float16BitsToFloat(FloatToFloat16Bits(FromBits(0x7F800001)))));
  EXPECT_TRUE(std::isnan(Float16BitsToFloat(FloatToFloat16Bits(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(FloatToFloat16Bits(FromBits(0xFFC00000)) & 0x8000, 0x8000);
}

// An independent model of round-to-nearest-even into binary16, in double arithmetic: scale into the
// integer grid of the value's binade and let nearbyint (default rounding mode: ties to even) round.
uint16_t ReferenceHalf(float f) {
  const double v = f;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const double a = std::fabs(v);
  if (a == 0.0) return sign;
  int e;
  std::frexp(a, &e);                          // a = m * 2^e, m in [0.5, 1)
  const int exponent = std::max(e - 1, -14);  // binade [2^exponent, 2^(exponent+1)); subnormals share -14
  const double steps = std::nearbyint(std::ldexp(a, 10 - exponent));  // units of 2^(exponent-10)
  const double rounded = std::ldexp(steps, exponent - 10);
  if (rounded >= 65536.0) return sign | 0x7C00;
  if (rounded < std::ldexp(1.0, -14)) return sign | static_cast<uint16_t>(std::ldexp(rounded, 24));
  int re;
  const double m = std::frexp(rounded, &re);  // rounded = m * 2^re
  const uint16_t biased = static_cast<uint16_t>(re - 1 + 15);
  const uint16_t mantissa = static_cast<uint16_t>(std::ldexp(m * 2.0 - 1.0, 10));
  return sign | static_cast<uint16_t>(biased << 10) | mantissa;
}

TEST(Float16, EveryPatternRoundTripsAndMatchesTheReferenceModel) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const float f = Float16BitsToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Float16BitsToFloat(FloatToFloat16Bits(f))));
      continue;
    }
    ASSERT_EQ(FloatToFloat16Bits(f), b) << std::hex << b;
    if (std::isinf(f)) continue;
    ASSERT_EQ(ReferenceHalf(f), b) << std::hex << b;
  }
  // Every float between consecutive halves, midpoints included: sample a dense sweep of float patterns.
  for (uint32_t bits = 0x33000000; bits < 0x47800000; bits += 0x1F3) {
    const float f = FromBits(bits);
    ASSERT_EQ(FloatToFloat16Bits(f), ReferenceHalf(f)) << std::hex << bits << " " << f;
    ASSERT_EQ(FloatToFloat16Bits(-f), ReferenceHalf(-f)) << std::hex << bits;
  }
  // Exact midpoints of every adjacent pair of finite positive halves.
  for (uint32_t b = 0; b < 0x7BFF; ++b) {
    const double mid = (static_cast<double>(Float16BitsToFloat(static_cast<uint16_t>(b))) +
                        Float16BitsToFloat(static_cast<uint16_t>(b + 1))) /
                       2.0;
    const float f = static_cast<float>(mid);  // exact: a half midpoint needs at most 12 significant bits
    ASSERT_EQ(static_cast<double>(f), mid);
    ASSERT_EQ(FloatToFloat16Bits(f), (b & 1) ? b + 1 : b) << std::hex << b;
  }
}

TEST(HostTensor, FromFloatsLittleEndianBytes) {
  auto t = HostTensor::FromFloats({2}, {1.0f, -2.0f}, DataType::kBFloat16);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->data, (std::vector<uint8_t>{0x80, 0x3F, 0x00, 0xC0}));
  auto h = HostTensor::FromFloats({1}, {1.0f}, DataType::kFloat16);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->data, (std::vector<uint8_t>{0x00, 0x3C}));
  auto f = HostTensor::FromFloats({1}, {1.0f}, DataType::kFloat32);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->data, (std::vector<uint8_t>{0x00, 0x00, 0x80, 0x3F}));
}

TEST(HostTensor, RoundTripEveryFloatingDtype) {
  const std::vector<float> values = {0.0f, 1.0f, -1.5f, 0.25f, 1024.0f, -3.0f};
  for (DataType dtype : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16}) {
    auto t = HostTensor::FromFloats({2, 3}, values, dtype);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->num_elements(), 6);
    EXPECT_EQ(t->data.size(), 6 * DataTypeSize(dtype));
    EXPECT_TRUE(t->Validate().ok());
    auto back = t->ToFloats();
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, values) << DataTypeName(dtype);  // all exactly representable
  }
}

TEST(HostTensor, Errors) {
  auto wrong_count = HostTensor::FromFloats({2, 2}, {1.0f}, DataType::kFloat32);
  ASSERT_FALSE(wrong_count.ok());
  EXPECT_EQ(wrong_count.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_count.status().message().find("[2, 2]"), std::string::npos);
  EXPECT_EQ(HostTensor::FromFloats({1}, {1.0f}, DataType::kBool).status().code(), StatusCode::kInvalidArgument);

  HostTensor bad;
  EXPECT_EQ(bad.Validate().code(), StatusCode::kInvalidArgument);  // no dtype
  bad.dtype = DataType::kFloat32;
  bad.shape = {3};
  bad.data.resize(8);
  Status s = bad.Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("needs 12 bytes, got 8"), std::string::npos) << s;
  EXPECT_FALSE(bad.ToFloats().ok());
  bad.shape = {-1};
  EXPECT_EQ(bad.Validate().code(), StatusCode::kInvalidArgument);
}

TEST(HostTensor, ScalarAndEmpty) {
  auto scalar = HostTensor::FromFloats({}, {2.0f});
  ASSERT_TRUE(scalar.ok());
  EXPECT_EQ(scalar->num_elements(), 1);
  EXPECT_EQ(scalar->ShapeString(), "[]");
  auto empty = HostTensor::FromFloats({0, 4}, {});
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->num_elements(), 0);
  EXPECT_TRUE(empty->data.empty());
}

TEST(HostTensor, FromBools) {
  auto mask = HostTensor::FromBools({1, 3}, {true, false, true});
  ASSERT_TRUE(mask.ok());
  EXPECT_EQ(mask->dtype, DataType::kBool);
  EXPECT_EQ(mask->data, (std::vector<uint8_t>{1, 0, 1}));
  EXPECT_EQ(*mask->ToFloats(), (std::vector<float>{1.0f, 0.0f, 1.0f}));
}

TEST(DataTypeNames, ParseAndName) {
  EXPECT_EQ(ParseDataType("bf16"), DataType::kBFloat16);
  EXPECT_EQ(ParseDataType("float16"), DataType::kFloat16);
  EXPECT_EQ(ParseDataType("float64"), std::nullopt);
  for (DataType d : {DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16, DataType::kBool, DataType::kUInt8}) {
    EXPECT_EQ(ParseDataType(DataTypeName(d)), d);
  }
}

TEST(StatusTest, CodesAndNames) {
  EXPECT_EQ(static_cast<int>(StatusCode::kUnavailable), 14);
  EXPECT_EQ(StatusCodeName(StatusCode::kFailedPrecondition), "FAILED_PRECONDITION");
  EXPECT_EQ(StatusCodeFromInt(16), StatusCode::kUnauthenticated);
  EXPECT_EQ(StatusCodeFromInt(99), StatusCode::kUnknown);
  EXPECT_EQ(Status(StatusCode::kNotFound, "no model x").ToString(), "NOT_FOUND: no model x");
  EXPECT_EQ(Status().ToString(), "OK");
  StatusOr<int> from_ok_status{Status::Ok()};
  EXPECT_FALSE(from_ok_status.ok());
  EXPECT_EQ(from_ok_status.status().code(), StatusCode::kInternal);
  StatusOr<std::unique_ptr<int>> moved(std::make_unique<int>(3));
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(**moved, 3);
}

}  // namespace
}  // namespace mqa::client
