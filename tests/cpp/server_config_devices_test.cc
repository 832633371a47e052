// Server configuration (server/config.h): devices, through LoadConfig on this machine.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <tuple>
#include <vector>

#include "config.h"
#include "mqa/core/device.h"
#include "server_config_test_util.h"

namespace mqa::server {
namespace {

namespace fs = std::filesystem;
using config_test::AutoDevice;
using config_test::Env;
using config_test::ExpectError;
using config_test::Load;
using config_test::TempDir;
using core::StatusCode;
using ::testing::HasSubstr;

// ---- Several devices ----

// What "all" means here: every CUDA device, or the CPU on a machine without one.
std::vector<std::string> AllHere() {
  std::vector<std::string> all = core::AllCudaDevices();
  return all.empty() ? std::vector<std::string>{"cpu"} : all;
}

bool MentionsNoGpu(const ServerConfig& c, const std::string& origin) {
  for (const std::string& n : c.notices) {
    if (n == origin + ": 'all' found no CUDA device here, so it means the CPU") return true;
  }
  return false;
}

TEST(ServerConfigTest, DevicesAllFromFlagAndEnv) {
  for (const auto& [args, env, origin] : std::vector<std::tuple<std::vector<std::string>, Env, std::string>>{
           {{"--devices", "all"}, {}, "--devices"},
           {{"--devices=all"}, {}, "--devices"},
           {{}, {{"MQA_DEVICES", "all"}}, "MQA_DEVICES"}}) {
    auto c = Load(args, env);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    ASSERT_EQ(c->engine.models.size(), 1u);
    const core::ModelConfig& m = c->engine.models[0];
    EXPECT_EQ(m.name, "mqa-default");
    EXPECT_EQ(m.devices, AllHere());
    EXPECT_EQ(m.options.device, AllHere()[0]);
    EXPECT_EQ(m.options.dtype, core::CudaAvailable() ? core::DType::kBFloat16 : core::DType::kFloat32);
    // Without a GPU, "all" is the CPU, and the server says so in its log.
    EXPECT_EQ(MentionsNoGpu(*c, origin), !core::CudaAvailable());
    if (!core::CudaAvailable()) {
      EXPECT_EQ(c->notices.size(), 1u);
    }
  }
  auto none = Load({});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->engine.models[0].devices.empty());
  EXPECT_TRUE(none->notices.empty());
}

TEST(ServerConfigTest, DevicesListsAreCheckedEntryByEntry) {
  auto cpu = Load({"--devices", "cpu"});
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  EXPECT_EQ(cpu->engine.models[0].devices, (std::vector<std::string>{"cpu"}));
  EXPECT_EQ(cpu->engine.models[0].options.dtype, core::DType::kFloat32);
  EXPECT_TRUE(cpu->notices.empty());
  // Duplicates are found before the devices are looked for, so these hold on any machine.
  ExpectError(Load({"--devices", "cpu,cpu"}), StatusCode::kInvalidArgument,
              {"--devices: cpu is listed twice; a model has at most one replica per device"});
  ExpectError(Load({"--devices=cuda,cuda:1,cuda:0"}), StatusCode::kInvalidArgument,
              {"--devices: cuda:0 is listed twice (\"cuda\" means \"cuda:0\")"});
  ExpectError(Load({}, {{"MQA_DEVICES", "cuda:0,cuda"}}), StatusCode::kInvalidArgument,
              {"MQA_DEVICES: cuda:0 is listed twice"});
  for (const char* bad : {"cpu,", ",cpu", "cpu,,cuda:0", ""}) {
    ExpectError(Load({std::string("--devices=") + bad}), StatusCode::kInvalidArgument,
                {"--devices: expected all or a comma-separated list of devices", "(an empty entry)"});
  }
  ExpectError(Load({"--devices", "all,cpu"}), StatusCode::kInvalidArgument, {"--devices: 'all' stands alone"});
  ExpectError(Load({"--devices", "auto"}), StatusCode::kInvalidArgument,
              {"--devices: expected cpu, cuda or cuda:N, got 'auto'"});
  ExpectError(Load({"--devices", "cpu, cuda:0"}), StatusCode::kInvalidArgument, {"--devices: "});
  ExpectError(Load({"--devices", "tpu"}), StatusCode::kInvalidArgument, {"--devices: "});
  ExpectError(Load({"--devices", "cpu,cuda:99"}), StatusCode::kUnavailable, {"--devices: ", "cuda:99"});
}

TEST(ServerConfigTest, DevicesAndDeviceForTheDefaultModel) {
  // The flag beats the variable, whichever of the two settings each is.
  auto device_flag = Load({"--device", "cpu"}, {{"MQA_DEVICES", "all"}});
  ASSERT_TRUE(device_flag.ok()) << device_flag.status().ToString();
  EXPECT_TRUE(device_flag->engine.models[0].devices.empty());
  EXPECT_EQ(device_flag->engine.models[0].options.device, "cpu");
  EXPECT_TRUE(device_flag->notices.empty());  // MQA_DEVICES was not used
  auto devices_flag = Load({"--devices", "cpu"}, {{"MQA_DEFAULT_DEVICE", "cuda:7"}});
  ASSERT_TRUE(devices_flag.ok()) << devices_flag.status().ToString();
  EXPECT_EQ(devices_flag->engine.models[0].devices, (std::vector<std::string>{"cpu"}));
  // Two of a kind contradict each other.
  ExpectError(Load({"--device", "cpu", "--devices", "all"}), StatusCode::kInvalidArgument,
              {"--device and --devices both set the default model's device; give one of them"});
  ExpectError(Load({}, {{"MQA_DEFAULT_DEVICE", "cpu"}, {"MQA_DEVICES", "cpu"}}), StatusCode::kInvalidArgument,
              {"MQA_DEFAULT_DEVICE and MQA_DEVICES both set the default model's device"});
}

TEST(ServerConfigTest, DevicesInTheFile) {
  TempDir dir;
  const std::string path = dir.Write("devices.yaml", R"(models:
  - name: listed
    devices: [cpu]
  - name: all
    devices: all
    dtype: bf16
  - name: single
    device: cpu
)");
  auto c = Load({"--config", path});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->engine.models.size(), 3u);
  EXPECT_EQ(c->engine.models[0].devices, (std::vector<std::string>{"cpu"}));
  EXPECT_EQ(c->engine.models[0].options.device, "cpu");
  EXPECT_EQ(c->engine.models[0].options.dtype, core::DType::kFloat32);
  EXPECT_EQ(c->engine.models[1].devices, AllHere());
  EXPECT_EQ(c->engine.models[1].options.device, AllHere()[0]);
  EXPECT_EQ(c->engine.models[1].options.dtype, core::DType::kBFloat16);
  EXPECT_TRUE(c->engine.models[2].devices.empty());
  EXPECT_EQ(MentionsNoGpu(*c, path + ":5:5: models[1].devices"), !core::CudaAvailable());

  // --devices and MQA_DEVICES beat the file: every model gets them, and a dtype the file left to its default
  // follows the first device.
  auto flag = Load({"--config", path, "--devices", "cpu"});
  ASSERT_TRUE(flag.ok()) << flag.status().ToString();
  for (const core::ModelConfig& m : flag->engine.models) {
    EXPECT_EQ(m.devices, (std::vector<std::string>{"cpu"})) << m.name;
    EXPECT_EQ(m.options.device, "cpu") << m.name;
  }
  EXPECT_EQ(flag->engine.models[1].options.dtype, core::DType::kBFloat16);  // given in the file
  EXPECT_EQ(flag->engine.models[2].options.dtype, core::DType::kFloat32);
  auto env = Load({"--config", path}, {{"MQA_DEVICES", "all"}});
  ASSERT_TRUE(env.ok()) << env.status().ToString();
  for (const core::ModelConfig& m : env->engine.models) EXPECT_EQ(m.devices, AllHere()) << m.name;
  EXPECT_EQ(env->engine.models[2].options.dtype,
            core::CudaAvailable() ? core::DType::kBFloat16 : core::DType::kFloat32);
  EXPECT_EQ(MentionsNoGpu(*env, "MQA_DEVICES"), !core::CudaAvailable());
}

TEST(ServerConfigTest, BadDevicesInTheFile) {
  TempDir dir;
  const struct {
    std::string yaml;
    StatusCode code;
    std::string expected;
  } cases[] = {
      {"models:\n  - name: m\n    devices: [cpu, cpu]\n", StatusCode::kInvalidArgument,
       ":3:20: models[0].devices[1]: cpu is listed twice; a model has at most one replica per device"},
      {"models:\n  - name: m\n    devices:\n      - cuda\n      - cuda:0\n", StatusCode::kInvalidArgument,
       ":5:9: models[0].devices[1]: cuda:0 is listed twice (\"cuda\" means \"cuda:0\")"},
      {"models:\n  - name: m\n    devices: []\n", StatusCode::kInvalidArgument,
       ":3:5: models[0].devices: expected all or a non-empty list of devices"},
      {"models:\n  - name: m\n    devices: cpu\n", StatusCode::kInvalidArgument,
       "models[0].devices: expected all or a non-empty list of devices ([cuda:0, cuda:1]; device: takes a single "
       "one), got 'cpu'"},
      {"models:\n  - name: m\n    devices: [all]\n", StatusCode::kInvalidArgument,
       "models[0].devices[0]: 'all' stands alone"},
      {"models:\n  - name: m\n    devices: [[cpu]]\n", StatusCode::kInvalidArgument,
       "models[0].devices[0]: expected a string, got a list"},
      {"models:\n  - name: m\n    devices: [tpu]\n", StatusCode::kInvalidArgument, "models[0].devices[0]: "},
      {"models:\n  - name: m\n    devices: [cpu, cuda:99]\n", StatusCode::kUnavailable, "models[0].devices[1]: "},
      {"models:\n  - name: m\n    device: cpu\n    devices: [cpu]\n", StatusCode::kInvalidArgument,
       ":4:5: models[0].devices: give device (one) or devices (several), not both (models[0].device is set too)"},
      {"models:\n  - name: m\n    devices: [cpu]\n    device: cpu\n", StatusCode::kInvalidArgument,
       "models[0].device: give device (one) or devices (several), not both (models[0].devices is set too)"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.yaml);
    ExpectError(Load({"--config", dir.Write("case.yaml", c.yaml)}), c.code, {c.expected});
  }
}

// A crash of tests/fuzz/config_fuzz (corpus/config/crash-*): CUDA device indices past 127 (c10::DeviceIndex is 8
// bits) wrapped to a negative index that at::Device refuses by throwing, so --devices cuda:200 ended mqa-server in
// std::terminate. Every way of naming a device now gets INVALID_ARGUMENT naming where it came from.
TEST(ServerConfigTest, CudaIndicesBeyondEightBitsAreInvalidNotACrash) {
  ExpectError(Load({"--devices", "cuda:200"}), StatusCode::kInvalidArgument,
              {"--devices: ", "cuda:200", "go up to 127"});
  ExpectError(Load({"--device", "cuda:128"}), StatusCode::kInvalidArgument, {"--device: ", "cuda:128"});
  ExpectError(Load({}, {{"MQA_DEFAULT_DEVICE", "cuda:999"}}), StatusCode::kInvalidArgument,
              {"MQA_DEFAULT_DEVICE: ", "cuda:999"});
  TempDir dir;
  ExpectError(Load({"--config", dir.Write("a.yaml", "models:\n  - name: m\n    device: cuda:255\n")}),
              StatusCode::kInvalidArgument, {"models[0] (m): ", "cuda:255"});
  ExpectError(Load({"--config", dir.Write("b.yaml", "models:\n  - name: m\n    devices: [cpu, cuda:130]\n")}),
              StatusCode::kInvalidArgument, {"models[0].devices[1]", "cuda:130"});
}

}  // namespace
}  // namespace mqa::server
