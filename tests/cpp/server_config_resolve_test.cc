// Server configuration's two steps (server/config_parse.h, server/config_devices.h): the parser gives plain
// settings without asking the machine anything; ResolveConfig asks a DeviceProbe. The probes here describe
// machines this one is not (two GPUs, one), so the CUDA paths of the resolution are tested without a GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "config.h"
#include "config_devices.h"
#include "config_parse.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/tensor.h"
#include "server_config_test_util.h"

namespace mqa::server {
namespace {

using config_test::Argv;
using config_test::Env;
using config_test::ExpectError;
using config_test::TempDir;
using core::AttnImpl;
using core::DType;
using core::StatusCode;

// A machine with `gpus` CUDA devices; counts how often it is asked for them.
struct FakeMachine {
  explicit FakeMachine(int gpus) : gpus(gpus) {}

  DeviceProbe Probe() {
    return {[this] {
              ++cuda_asked;
              std::vector<std::string> all;
              for (int i = 0; i < gpus; ++i) all.push_back("cuda:" + std::to_string(i));
              return all;
            },
            [this](std::string_view device) {
              if (device == "cpu") return core::Status::Ok();
              const std::string d = device == "cuda" ? "cuda:0" : std::string(device);
              for (int i = 0; i < gpus; ++i) {
                if (d == "cuda:" + std::to_string(i)) return core::Status::Ok();
              }
              if (d.rfind("cuda:", 0) == 0) return core::UnavailableError("device '" + d + "' is not here");
              return core::InvalidArgumentError("malformed device '" + d + "'");
            }};
  }

  int gpus;
  int cuda_asked = 0;
};

core::StatusOr<ParsedConfig> Parse(std::vector<std::string> args, const Env& env = {}) {
  const Argv a(std::move(args));
  return ParseConfig(a.argc(), a.argv(), env);
}

core::StatusOr<ServerConfig> LoadOn(FakeMachine& machine, std::vector<std::string> args, const Env& env = {}) {
  MQA_ASSIGN_OR_RETURN(ParsedConfig parsed, Parse(std::move(args), env));
  return ResolveConfig(std::move(parsed), machine.Probe());
}

constexpr char kCpuModels[] = R"(models:
  - name: plain
    device: cpu
  - name: chosen
    device: cpu
    attn_impl: torch
    dtype: float16
)";

// --devices on models whose file says `device: cpu`: the GPU defaults (bf16, triton, as the embedded default
// model has on CUDA) replace the CPU's, except where the file chose. The torch math on the GPUs was the bug.
TEST(ConfigResolveTest, DevicesFlagGivesCpuModelsTheGpuDefaults) {
  TempDir dir;
  const std::string path = dir.Write("cpu.yaml", kCpuModels);
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--config", path, "--devices", "cuda:0,cuda:1"}, {"--config", path, "--devices=all"}}) {
    FakeMachine two(2);
    auto c = LoadOn(two, args);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_EQ(c->engine.models.size(), 2u);
    const core::ModelConfig& plain = c->engine.models[0];
    EXPECT_EQ(plain.devices, (std::vector<std::string>{"cuda:0", "cuda:1"}));
    EXPECT_EQ(plain.options.device, "cuda:0");
    EXPECT_EQ(plain.options.attn_impl, AttnImpl::kTriton);
    EXPECT_EQ(plain.options.dtype, DType::kBFloat16);
    const core::ModelConfig& chosen = c->engine.models[1];
    EXPECT_EQ(chosen.options.device, "cuda:0");
    EXPECT_EQ(chosen.options.attn_impl, AttnImpl::kTorch);  // set in the file: kept
    EXPECT_EQ(chosen.options.dtype, DType::kFloat16);
    EXPECT_TRUE(c->notices.empty());
  }
  FakeMachine two(2);
  auto env = LoadOn(two, {"--config", path}, {{"MQA_DEVICES", "cuda:1"}});
  ASSERT_TRUE(env.ok()) << env.status().ToString();
  EXPECT_EQ(env->engine.models[0].options.attn_impl, AttnImpl::kTriton);
  EXPECT_EQ(env->engine.models[0].devices, (std::vector<std::string>{"cuda:1"}));
}

// The other way round: models written for a GPU, moved to the CPU by --devices, get the CPU's defaults.
TEST(ConfigResolveTest, DevicesFlagGivesGpuModelsTheCpuDefaults) {
  TempDir dir;
  const std::string path = dir.Write("gpu.yaml", "models:\n  - name: g\n    device: cuda:0\n");
  FakeMachine one(1);
  auto on_gpu = LoadOn(one, {"--config", path});
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status().ToString();
  EXPECT_EQ(on_gpu->engine.models[0].options.attn_impl, AttnImpl::kTriton);
  EXPECT_EQ(on_gpu->engine.models[0].options.dtype, DType::kBFloat16);
  auto moved = LoadOn(one, {"--config", path, "--devices", "cpu"});
  ASSERT_TRUE(moved.ok()) << moved.status().ToString();
  EXPECT_EQ(moved->engine.models[0].options.device, "cpu");
  EXPECT_EQ(moved->engine.models[0].options.attn_impl, AttnImpl::kTorch);
  EXPECT_EQ(moved->engine.models[0].options.dtype, DType::kFloat32);
}

// The embedded default model and a file model without a device key pick the same device and defaults.
TEST(ConfigResolveTest, AutoIsTheFirstGpuWithItsDefaults) {
  TempDir dir;
  const std::string path = dir.Write("auto.yaml", "models:\n  - name: a\n");
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{{}, {"--config", path}}) {
    FakeMachine two(2);
    auto c = LoadOn(two, args);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    const core::ModelConfig& m = c->engine.models.at(0);
    EXPECT_EQ(m.options.device, "cuda:0");
    EXPECT_EQ(m.options.attn_impl, AttnImpl::kTriton);
    EXPECT_EQ(m.options.dtype, DType::kBFloat16);
    EXPECT_TRUE(m.devices.empty());
  }
  FakeMachine none(0);
  auto cpu = LoadOn(none, {"--config", path});
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  EXPECT_EQ(cpu->engine.models[0].options.device, "cpu");
  EXPECT_EQ(cpu->engine.models[0].options.attn_impl, AttnImpl::kTorch);
}

TEST(ConfigResolveTest, DevicesAreCheckedAgainstTheProbe) {
  FakeMachine two(2);
  auto second = LoadOn(two, {"--device", "cuda:1"});
  ASSERT_TRUE(second.ok()) << second.status().ToString();
  EXPECT_EQ(second->engine.models[0].options.device, "cuda:1");
  EXPECT_EQ(second->engine.models[0].options.attn_impl, AttnImpl::kTriton);
  FakeMachine one(1);
  ExpectError(LoadOn(one, {"--device", "cuda:1"}), StatusCode::kUnavailable,
              {"--device: default model (mqa-default): ", "cuda:1"});
  ExpectError(LoadOn(one, {"--devices", "cuda:0,cuda:1"}), StatusCode::kUnavailable, {"--devices: ", "cuda:1"});
  FakeMachine none(0);
  auto all = LoadOn(none, {}, {{"MQA_DEVICES", "all"}});
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(all->engine.models[0].devices, (std::vector<std::string>{"cpu"}));
  EXPECT_EQ(all->notices, (std::vector<std::string>{"MQA_DEVICES: 'all' found no CUDA device here, so it means "
                                                    "the CPU"}));
}

// The parser's result is plain: "all" and "auto" as written, the same result resolving differently on
// different machines, and a configuration that names only the CPU never asks for the GPUs.
TEST(ConfigResolveTest, ParsingAsksTheMachineNothing) {
  TempDir dir;
  const std::string path = dir.Write("m.yaml", "models:\n  - name: a\n  - name: b\n    devices: all\n");
  auto parsed = Parse({"--config", path, "--devices", "all"});
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  ASSERT_TRUE(parsed->devices.has_value());
  EXPECT_TRUE(parsed->devices->all);
  ASSERT_EQ(parsed->file_models.size(), 2u);
  EXPECT_EQ(parsed->file_models[0].device, "auto");
  EXPECT_FALSE(parsed->file_models[0].devices.has_value());
  EXPECT_TRUE(parsed->file_models[1].devices->all);
  EXPECT_FALSE(parsed->file_models[0].attn_impl_set);

  FakeMachine two(2), none(0);
  auto on_two = ResolveConfig(*parsed, two.Probe());
  auto on_none = ResolveConfig(*parsed, none.Probe());
  ASSERT_TRUE(on_two.ok()) << on_two.status().ToString();
  ASSERT_TRUE(on_none.ok()) << on_none.status().ToString();
  EXPECT_EQ(on_two->engine.models[1].devices, (std::vector<std::string>{"cuda:0", "cuda:1"}));
  EXPECT_EQ(on_none->engine.models[1].devices, (std::vector<std::string>{"cpu"}));

  const std::string cpu = dir.Write("cpu.yaml", kCpuModels);
  FakeMachine asked(2);
  auto cpu_only = LoadOn(asked, {"--config", cpu});
  ASSERT_TRUE(cpu_only.ok()) << cpu_only.status().ToString();
  EXPECT_EQ(asked.cuda_asked, 0);
}

// Errors that do not depend on the device are the parser's, in file order, before any device is looked at.
TEST(ConfigResolveTest, DeviceIndependentErrorsComeFromTheParser) {
  TempDir dir;
  const std::string path = dir.Write("odd.yaml",
                                     "models:\n  - name: odd\n    dim: 100\n    heads: 3\n"
                                     "    device: cuda:7\n");
  ExpectError(Parse({"--config", path}), StatusCode::kInvalidArgument,
              {path + ":2:5: models[0] (odd): dim (100) must be divisible by heads (3)"});
  const std::string gpu = dir.Write("gpu.yaml", "models:\n  - name: g\n    device: cuda:7\n");
  EXPECT_TRUE(Parse({"--config", gpu}).ok());
  FakeMachine one(1);
  ExpectError(LoadOn(one, {"--config", gpu}), StatusCode::kUnavailable, {"models[0] (g): ", "cuda:7"});
}

TEST(ConfigResolveTest, DeviceDefaultsInOnePlace) {
  core::MqaOptions o;
  ApplyDeviceDefaults("cuda:3", false, false, o);
  EXPECT_EQ(o.attn_impl, AttnImpl::kTriton);
  EXPECT_EQ(o.dtype, DType::kBFloat16);
  ApplyDeviceDefaults("cpu", false, false, o);
  EXPECT_EQ(o.attn_impl, AttnImpl::kTorch);
  EXPECT_EQ(o.dtype, DType::kFloat32);
  o.attn_impl = AttnImpl::kFlash;
  o.dtype = DType::kFloat16;
  ApplyDeviceDefaults("cuda", true, true, o);
  EXPECT_EQ(o.attn_impl, AttnImpl::kFlash);
  EXPECT_EQ(o.dtype, DType::kFloat16);
  FakeMachine two(2);
  const core::ModelConfig m = DefaultModelOn("auto", two.Probe());
  EXPECT_EQ(m.options.device, "cuda:0");
  EXPECT_EQ(m.options.attn_impl, AttnImpl::kTriton);
}

}  // namespace
}  // namespace mqa::server
