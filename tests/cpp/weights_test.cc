// Safetensors I/O and the state-dict contract: names, shapes and dtypes, for one layer and for a stack.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "mqa/core/mqa_layer.h"
#include "mqa/core/safetensors.h"
#include "mqa/core/testing/safetensors.h"
#include "test_util.h"

namespace mqa::testing {
namespace {

using core::DType;
using core::MqaOptions;
using core::MultiQueryAttention;
using core::StatusCode;
using core::Tensor;

class TempDir {
 public:
  TempDir() {
    path_ = std::filesystem::temp_directory_path() / ("mqa-weights-" + std::to_string(NextSeed()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string File(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

MqaOptions Small(bool qk_ln = false, core::NormType norm = core::NormType::kLowPrecisionLayerNorm) {
  MqaOptions o;
  o.dim = 64;
  o.heads = 4;
  o.qk_ln = qk_ln;
  o.norm_type = norm;
  o.seed = NextSeed();
  return o;
}

TEST(Safetensors, RoundTripKeepsBytesDtypesShapesAndMetadata) {
  TempDir dir;
  core::TensorMap m;
  m["a"] = Randn(DType::kFloat32, {3, 4});
  m["b"] = Randn(DType::kBFloat16, {2, 1, 5});
  m["c"] = Randn(DType::kFloat16, {7});
  const uint8_t bits[] = {1, 0, 1};
  m["d"] = Unwrap(Tensor::FromBytes(DType::kBool, {3}, bits, 3));
  m["e"] = Randn(DType::kFloat32, {0, 4});
  ASSERT_TRUE(core::WriteSafetensors(dir.File("x.safetensors"), m, {{"k", "v"}}).ok());
  auto f = Unwrap(core::ReadSafetensors(dir.File("x.safetensors")));
  EXPECT_EQ(f.metadata.at("k"), "v");
  ASSERT_EQ(f.tensors.size(), m.size());
  for (const auto& [name, t] : m) {
    EXPECT_EQ(f.tensors.at(name).dtype(), t.dtype()) << name;
    EXPECT_EQ(f.tensors.at(name).shape(), t.shape()) << name;
    EXPECT_EQ(*f.tensors.at(name).ToBytes(), *t.ToBytes()) << name;
  }
}

TEST(Tensor, BoolBytesOtherThanZeroOrOneAreRejected) {
  const uint8_t bits[] = {1, 0, 2};
  auto t = Tensor::FromBytes(DType::kBool, {3}, bits, 3);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("byte 2 is 2; expected 0 or 1"), std::string::npos) << t.status().message();
  EXPECT_EQ(Tensor::FromBytes(DType::kFloat32, {3}, bits, 3).status().code(), StatusCode::kInvalidArgument)
      << "3 bytes cannot hold 3 float32 values";
}

TEST(Safetensors, CorruptFilesAreDataLossNotCrashes) {
  TempDir dir;
  core::TensorMap m;
  m["w"] = Randn(DType::kFloat32, {4, 4});
  ASSERT_TRUE(core::WriteSafetensors(dir.File("ok.safetensors"), m).ok());
  std::ifstream in(dir.File("ok.safetensors"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(core::ParseSafetensors(bytes.substr(0, bytes.size() - 3)).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(core::ParseSafetensors(bytes.substr(0, 5)).status().code(), StatusCode::kDataLoss);
  std::string huge = bytes;
  huge[6] = '\x7f';  // header length far beyond the file
  EXPECT_EQ(core::ParseSafetensors(huge).status().code(), StatusCode::kDataLoss);
  std::string garbled = bytes;
  garbled[9] = '!';
  EXPECT_EQ(core::ParseSafetensors(garbled).status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(core::ReadSafetensors(dir.File("missing.safetensors")).status().code(), StatusCode::kNotFound);
}

// A header in the format's own layout: 8-byte little-endian length, then the JSON.
std::string SafetensorsImage(const std::string& header) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return bytes + header;
}

// A crash of tests/fuzz/safetensors_fuzz (corpus/safetensors/crash-shape-*): the element count was multiplied in 64
// bits unchecked, so 2^32 x 2^32 wrapped to 0 and matched an empty byte range, and Tensor::FromBytes then overflowed
// int64 on the same shape (undefined behaviour; LibTorch was asked for 2^64 elements). Zeros do not excuse a partial
// product that overflows: FromBytes multiplies in order.
TEST(Safetensors, ShapesWhoseElementCountOverflowsAreDataLoss) {
  for (const std::string shape : {"[4294967296,4294967296]", "[1099511627776,1099511627776,0]",
                                  "[2305843009213693952,4]", "[9223372036854775807]"}) {
    const std::string header = R"({"x":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,0]}})";
    auto f = core::ParseSafetensors(SafetensorsImage(header), "big.safetensors");
    ASSERT_FALSE(f.ok()) << shape;
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss) << shape;
    EXPECT_NE(f.status().message().find("big.safetensors: tensor 'x'"), std::string::npos) << f.status().message();
  }
  // Zero elements with large sizes after the zero stay readable: no product of the non-zero sizes overflows.
  auto empty = core::ParseSafetensors(
      SafetensorsImage(R"({"x":{"dtype":"F32","shape":[0,1099511627776,1024],"data_offsets":[0,0]}})"));
  ASSERT_TRUE(empty.ok()) << empty.status().message();
  EXPECT_EQ(empty->tensors.at("x").numel(), 0);
}

// Found by tests/fuzz/safetensors_fuzz (corpus/safetensors/crash-shape-beyond-uint64-is-a-float): sizes and offsets
// were read with nlohmann's get<int64_t>/<uint64_t>, which converts floats too; an integer beyond uint64 (stored as
// a float by the JSON parser) or 1e30 converted with undefined behaviour, 2.5 was truncated and -1 wrapped around.
// The format has integers >= 0 only.
TEST(Safetensors, ShapesAndOffsetsMustBeIntegers) {
  for (const std::string bad :
       {R"("shape":[31844674407370955161],"data_offsets":[0,0])", R"("shape":[1e30],"data_offsets":[0,0])",
        R"("shape":[2.5],"data_offsets":[0,8])", R"("shape":[-1],"data_offsets":[0,0])",
        R"("shape":"2","data_offsets":[0,8])", R"("shape":[2],"data_offsets":[0,8.0])",
        R"("shape":[2],"data_offsets":[-8,0])", R"("shape":[2],"data_offsets":[0,1e300])"}) {
    const std::string header = R"({"x":{"dtype":"F32",)" + bad + "}}";
    auto f = core::ParseSafetensors(SafetensorsImage(header) + std::string(8, '\0'), "f.safetensors");
    ASSERT_FALSE(f.ok()) << bad;
    EXPECT_EQ(f.status().code(), StatusCode::kDataLoss) << bad;
    EXPECT_EQ(f.status().message().rfind("f.safetensors: tensor 'x' has ", 0), 0u) << f.status().message();
  }
}

// Found by tests/fuzz/safetensors_fuzz on its seed corpus/safetensors/bad_dtype: an unknown dtype was the one
// refusal that named neither the file nor the entry (the header's contract: the message names both).
TEST(Safetensors, UnsupportedDtypeNamesTheFileAndTheEntry) {
  auto f = core::ParseSafetensors(
      SafetensorsImage(R"({"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})") + std::string(8, '\0'),
      "model.safetensors");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kDataLoss);
  EXPECT_EQ(f.status().message().rfind("model.safetensors: tensor 'w': unsupported safetensors dtype 'I64'", 0), 0u)
      << f.status().message();
}

TEST(StateDict, UsesTheSpecNamesAndShapes) {
  auto layer = Unwrap(MultiQueryAttention::Create(Small(true)));
  const auto sd = layer->StateDict("layers.0.attn.");
  std::vector<std::string> names;
  for (const auto& [n, t] : sd) names.push_back(n);
  const std::vector<std::string> want = {"layers.0.attn.Wqkv.bias",     "layers.0.attn.Wqkv.weight",
                                         "layers.0.attn.k_ln.bias",     "layers.0.attn.k_ln.weight",
                                         "layers.0.attn.out_proj.bias", "layers.0.attn.out_proj.weight",
                                         "layers.0.attn.q_ln.bias",     "layers.0.attn.q_ln.weight"};
  EXPECT_EQ(names, want);
  EXPECT_EQ(sd.at("layers.0.attn.k_ln.weight").shape(), (std::vector<int64_t>{16}));
  EXPECT_EQ(sd.at("layers.0.attn.q_ln.weight").shape(), (std::vector<int64_t>{64}));
  auto rms = Unwrap(MultiQueryAttention::Create(Small(true, core::NormType::kRmsNorm)));
  EXPECT_EQ(rms->StateDict().count("q_ln.bias"), 0u) << "RMS norms have a weight and no bias";
}

TEST(StateDict, MismatchedNamesShapesAndDtypesAreRejectedClearly) {
  auto layer = Unwrap(MultiQueryAttention::Create(Small()));
  core::TensorMap sd = layer->StateDict();
  core::TensorMap missing = sd;
  missing.erase("out_proj.bias");
  auto st = layer->LoadStateDict(missing);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("missing 'out_proj.bias' [64]"), std::string::npos) << st.message();

  core::TensorMap shaped = sd;
  shaped["Wqkv.weight"] = Randn(DType::kFloat32, {192, 64});  // a multi-head (3*dim) layout, not MQA's dim + 2d
  st = layer->LoadStateDict(shaped);
  EXPECT_NE(st.message().find("'Wqkv.weight' has shape [192, 64], expected [96, 64]"), std::string::npos)
      << st.message();

  core::TensorMap typed = sd;
  typed["out_proj.weight"] = Unwrap(sd.at("out_proj.weight").ToDType(DType::kBFloat16));
  st = layer->LoadStateDict(typed);
  EXPECT_NE(st.message().find("has dtype bfloat16, expected float32"), std::string::npos) << st.message();

  core::TensorMap extra = sd;
  extra["q_ln.weight"] = Randn(DType::kFloat32, {64});
  st = layer->LoadStateDict(extra);
  EXPECT_NE(st.message().find("unexpected tensor 'q_ln.weight'"), std::string::npos) << st.message();

  // A failed load leaves the layer as it was.
  EXPECT_EQ(Floats(layer->StateDict().at("Wqkv.weight")), Floats(sd.at("Wqkv.weight")));
}

TEST(Stack, SaveLoadRoundTripGivesIdenticalOutputs) {
  TempDir dir;
  MqaOptions o = Small(true, core::NormType::kLowPrecisionRmsNorm);
  auto stack = Unwrap(core::MqaStack::Create(o, 3));
  ASSERT_TRUE(stack->Save(dir.File("m.safetensors")).ok());
  auto f = Unwrap(core::ReadSafetensors(dir.File("m.safetensors")));
  EXPECT_EQ(f.tensors.count("layers.2.attn.Wqkv.weight"), 1u);
  EXPECT_EQ(f.tensors.size(), 3u * 6u);
  auto loaded = Unwrap(core::MqaStack::Load(dir.File("m.safetensors"), o));
  ASSERT_EQ(loaded->num_layers(), 3);
  core::ForwardArgs a;
  a.x = Randn(DType::kFloat32, {2, 5, 64});
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(Floats(stack->layer(i).Forward(a)->out), Floats(loaded->layer(i).Forward(a)->out)) << "layer " << i;
  }
  EXPECT_NE(Floats(stack->layer(0).Forward(a)->out), Floats(stack->layer(1).Forward(a)->out))
      << "layers must be initialised from different seeds";
}

TEST(Stack, FilesThatDoNotFitTheModelAreRejected) {
  TempDir dir;
  MqaOptions o = Small();
  auto stack = Unwrap(core::MqaStack::Create(o, 2));
  ASSERT_TRUE(stack->Save(dir.File("m.safetensors")).ok());
  auto wrong_count = core::MqaStack::Load(dir.File("m.safetensors"), o, 4);
  EXPECT_NE(wrong_count.status().message().find("holds 2 layers, the model expects 4"), std::string::npos);
  MqaOptions wider = o;
  wider.dim = 128;
  auto wrong_dim = core::MqaStack::Load(dir.File("m.safetensors"), wider);
  EXPECT_EQ(wrong_dim.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_dim.status().message().find("layers.0.attn.Wqkv.weight' has shape [96, 64], expected [192, 128]"),
            std::string::npos)
      << wrong_dim.status().message();

  auto f = Unwrap(core::ReadSafetensors(dir.File("m.safetensors")));
  core::TensorMap gap;
  for (auto& [n, t] : f.tensors) gap[n.rfind("layers.0.", 0) == 0 ? "layers.5." + n.substr(9) : n] = t;
  ASSERT_TRUE(core::WriteSafetensors(dir.File("gap.safetensors"), gap).ok());
  EXPECT_NE(core::MqaStack::Load(dir.File("gap.safetensors"), o).status().message().find("without gaps"),
            std::string::npos);
  core::TensorMap stray = f.tensors;
  stray["lm_head.weight"] = Randn(DType::kFloat32, {2, 2});
  ASSERT_TRUE(core::WriteSafetensors(dir.File("stray.safetensors"), stray).ok());
  EXPECT_NE(core::MqaStack::Load(dir.File("stray.safetensors"), o)
                .status()
                .message()
                .find("unexpected tensor 'lm_head.weight'"),
            std::string::npos);
}

}  // namespace
}  // namespace mqa::testing
