// InputHash, the digest by which the engine recognises a retry of an applied step (same dtype, shape and bytes)
// without keeping its input: equal inputs agree, and any one changed bit, dtype or shape disagrees.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include "engine/work_item.h"
#include "test_util.h"

namespace mqa::core {
namespace {

using ::mqa::testing::Unwrap;

Tensor FromBytes(DType dtype, const std::vector<int64_t>& shape, const std::vector<uint8_t>& bytes) {
  return Unwrap(Tensor::FromBytes(dtype, shape, bytes.data(), bytes.size()));
}

std::vector<uint8_t> Pattern(size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 131 + 7);
  return v;
}

TEST(InputHash, EqualInputsAgreeAndEveryFlippedBitDisagrees) {
  // 996 bytes: 15 whole 64-byte stripes, then whole words, then a 4-byte tail; 74 bytes: 1 stripe, a word, a tail.
  for (const auto& [dtype, shape] : std::vector<std::pair<DType, std::vector<int64_t>>>{
           {DType::kFloat32, {1, 3, 83}}, {DType::kBFloat16, {1, 1, 37}}}) {
    const size_t n = static_cast<size_t>(shape[1] * shape[2]) * DTypeSize(dtype);
    const std::vector<uint8_t> base = Pattern(n);
    const uint64_t h = InputHash(FromBytes(dtype, shape, base));
    EXPECT_EQ(h, InputHash(FromBytes(dtype, shape, base))) << "the same bytes in another tensor";
    std::set<uint64_t> seen = {h};
    for (size_t bit = 0; bit < n * 8; ++bit) {
      std::vector<uint8_t> v = base;
      v[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
      ASSERT_TRUE(seen.insert(InputHash(FromBytes(dtype, shape, v))).second) << "bit " << bit << " of " << n * 8;
    }
  }
}

TEST(InputHash, DtypeAndShapeCount) {
  const std::vector<uint8_t> bytes = Pattern(64);
  const uint64_t f32 = InputHash(FromBytes(DType::kFloat32, {1, 2, 8}, bytes));
  EXPECT_NE(f32, InputHash(FromBytes(DType::kFloat32, {1, 8, 2}, bytes)));
  EXPECT_NE(f32, InputHash(FromBytes(DType::kBFloat16, {1, 4, 8}, bytes)));
  EXPECT_NE(InputHash(FromBytes(DType::kBFloat16, {1, 4, 8}, bytes)),
            InputHash(FromBytes(DType::kFloat16, {1, 4, 8}, bytes)));
  // Empty inputs of different shapes differ too.
  EXPECT_NE(InputHash(FromBytes(DType::kFloat32, {1, 0, 8}, {})), InputHash(FromBytes(DType::kFloat32, {1, 0, 4}, {})));
}

}  // namespace
}  // namespace mqa::core
