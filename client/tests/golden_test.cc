// Cross-checks against PyTorch (an independent implementation), through files:
//   make_golden.py  writes golden.safetensors with PyTorch: "f32" values and PyTorch's "bf16"/"f16" of them;
//   this test       reads it with our reader, checks FromFloats bit for bit, and writes ours.safetensors;
//   make_golden.py --verify  reads ours.safetensors with the safetensors package and compares.
// The directory comes from MQA_CLIENT_GOLDEN_DIR.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "safetensors_io.h"

namespace mqa::client::tools {
namespace {

std::string GoldenDir() {
  const char* dir = std::getenv("MQA_CLIENT_GOLDEN_DIR");
  return dir ? dir : "";
}

void CheckAgainst(const HostTensor& f32, const HostTensor& expected, DataType dtype) {
  ASSERT_EQ(expected.dtype, dtype);
  ASSERT_EQ(expected.shape, f32.shape);
  const std::vector<float> values = *f32.ToFloats();
  auto ours = HostTensor::FromFloats(f32.shape, values, dtype);
  ASSERT_TRUE(ours.ok()) << ours.status();
  const std::vector<float> theirs_values = *expected.ToFloats();
  int mismatches = 0;
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t a = static_cast<uint16_t>(ours->data[2 * i] | ours->data[2 * i + 1] << 8);
    const uint16_t b = static_cast<uint16_t>(expected.data[2 * i] | expected.data[2 * i + 1] << 8);
    if (std::isnan(values[i])) {
      // NaN payloads are not part of the contract, only NaN-ness.
      EXPECT_TRUE(std::isnan(theirs_values[i]));
      continue;
    }
    if (a != b && ++mismatches <= 10) {
      ADD_FAILURE() << DataTypeName(dtype) << " element " << i << " value " << values[i] << ": ours 0x" << std::hex << a
                    << ", PyTorch 0x" << b;
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(Golden, ConversionsMatchPyTorch) {
  ASSERT_FALSE(GoldenDir().empty()) << "set MQA_CLIENT_GOLDEN_DIR (make_golden.py writes it)";
  auto file = ReadSafetensors(GoldenDir() + "/golden.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const HostTensor& f32 = file->tensors.at("f32");
  ASSERT_EQ(f32.dtype, DataType::kFloat32);
  ASSERT_GT(f32.num_elements(), 1000);
  CheckAgainst(f32, file->tensors.at("bf16"), DataType::kBFloat16);
  CheckAgainst(f32, file->tensors.at("f16"), DataType::kFloat16);
  // And the way back: PyTorch's float32 of its own bf16/f16 values equals our widening.
  const std::vector<float> widened = *file->tensors.at("f16").ToFloats();
  const std::vector<float> torch_widened = *file->tensors.at("f16_as_f32").ToFloats();
  ASSERT_EQ(widened.size(), torch_widened.size());
  for (size_t i = 0; i < widened.size(); ++i) {
    if (std::isnan(widened[i])) continue;
    ASSERT_EQ(widened[i], torch_widened[i]) << i;
  }
}

TEST(Golden, WriteForPythonToRead) {
  ASSERT_FALSE(GoldenDir().empty());
  SafetensorsFile file;
  std::vector<float> values;
  for (int i = 0; i < 24; ++i) values.push_back(static_cast<float>(i) * 0.37f - 3.0f);
  file.tensors["a_f32"] = *HostTensor::FromFloats({2, 3, 4}, values, DataType::kFloat32);
  file.tensors["b_bf16"] = *HostTensor::FromFloats({4, 6}, values, DataType::kBFloat16);
  file.tensors["c_f16"] = *HostTensor::FromFloats({24}, values, DataType::kFloat16);
  file.tensors["d_mask"] = *HostTensor::FromBools({2, 2}, {true, false, false, true});
  file.metadata["writer"] = "mqa_client_golden_test";
  ASSERT_TRUE(WriteSafetensors(GoldenDir() + "/ours.safetensors", file).ok());
}

}  // namespace
}  // namespace mqa::client::tools
