// The safetensors reader/writer of mqa-cli: round trips and rejection of malformed files.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "safetensors_io.h"

namespace mqa::client::tools {
namespace {

std::vector<uint8_t> WithHeader(const std::string& json, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(static_cast<uint64_t>(json.size()) >> (8 * i)));
  out.insert(out.end(), json.begin(), json.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

SafetensorsFile Sample() {
  SafetensorsFile file;
  file.tensors["x"] = *HostTensor::FromFloats({1, 2, 3}, {1, 2, 3, 4, 5, 6}, DataType::kFloat32);
  file.tensors["bias"] = *HostTensor::FromFloats({1, 1, 2, 2}, {0.5f, -1, 0, 2}, DataType::kBFloat16);
  file.tensors["half"] = *HostTensor::FromFloats({3}, {0.25f, 8, -4}, DataType::kFloat16);
  file.tensors["mask"] = *HostTensor::FromBools({1, 2}, {true, false});
  file.tensors["empty"] = *HostTensor::FromFloats({0, 5}, {}, DataType::kFloat32);
  file.metadata["format"] = "pt";
  return file;
}

void ExpectSame(const SafetensorsFile& a, const SafetensorsFile& b) {
  EXPECT_EQ(a.metadata, b.metadata);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [name, t] : a.tensors) {
    auto it = b.tensors.find(name);
    ASSERT_NE(it, b.tensors.end()) << name;
    EXPECT_EQ(t.dtype, it->second.dtype) << name;
    EXPECT_EQ(t.shape, it->second.shape) << name;
    EXPECT_EQ(t.data, it->second.data) << name;
  }
}

TEST(Safetensors, SerializeParseRoundTrip) {
  SafetensorsFile file = Sample();
  auto bytes = SerializeSafetensors(file);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | (*bytes)[static_cast<size_t>(i)];
  EXPECT_EQ(header_len % 8, 0u);  // data section 8-byte aligned
  auto parsed = ParseSafetensors(*bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ExpectSame(file, *parsed);
}

TEST(Safetensors, FileRoundTrip) {
  const std::string path = ::testing::TempDir() + "mqa_client_safetensors_test.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, Sample()).ok());
  auto read = ReadSafetensors(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSame(Sample(), *read);
  std::remove(path.c_str());
  EXPECT_EQ(ReadSafetensors(path).status().code(), StatusCode::kNotFound);
}

TEST(Safetensors, ReadsAHandWrittenFile) {
  // Two F32 elements (1.0, -2.0) named "x", with the data offset written out by hand.
  auto parsed = ParseSafetensors(
      WithHeader(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", {0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0}));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(*parsed->tensors.at("x").ToFloats(), (std::vector<float>{1.0f, -2.0f}));
}

TEST(Safetensors, RejectsMalformedFiles) {
  auto code = [](const std::vector<uint8_t>& bytes) { return ParseSafetensors(bytes).status().code(); };
  const auto kInvalid = StatusCode::kInvalidArgument;
  EXPECT_EQ(code({1, 2, 3}), kInvalid);                              // shorter than 8 bytes
  EXPECT_EQ(code({0xFF, 0, 0, 0, 0, 0, 0, 0, '{', '}'}), kInvalid);  // header past the end
  EXPECT_EQ(code(WithHeader("not json", {})), kInvalid);
  EXPECT_EQ(code(WithHeader("[]", {})), kInvalid);
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", std::vector<uint8_t>(8))),
            kInvalid);  // unsupported dtype
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", std::vector<uint8_t>(4))),
            kInvalid);  // byte count does not match the shape
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", std::vector<uint8_t>(2))),
            kInvalid);  // past the data section
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", std::vector<uint8_t>(4))),
            kInvalid);  // reversed offsets
  EXPECT_EQ(code(WithHeader(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                            R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                            std::vector<uint8_t>(8))),
            kInvalid);  // overlapping
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", {})), kInvalid);
  EXPECT_EQ(code(WithHeader(R"({"x":{"dtype":"F32"}})", {})), kInvalid);
  EXPECT_EQ(code(WithHeader(R"({"__metadata__":{"a":1}})", {})), kInvalid);
}

TEST(Safetensors, WriterRejectsMalformedTensors) {
  SafetensorsFile file;
  HostTensor bad;
  bad.dtype = DataType::kFloat32;
  bad.shape = {2};
  file.tensors["bad"] = bad;
  EXPECT_EQ(SerializeSafetensors(file).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mqa::client::tools
