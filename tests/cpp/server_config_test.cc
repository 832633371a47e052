// Server configuration (server/config.h) and structured logging (server/logging.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "config.h"
#include "logging.h"
#include "mqa/core/device.h"
#include "mqa/core/logging.h"

namespace mqa::server {
namespace {

namespace fs = std::filesystem;
using core::StatusCode;
using Env = std::map<std::string, std::string>;
using ::testing::HasSubstr;

core::StatusOr<ServerConfig> Load(std::vector<std::string> args, const Env& env = {}) {
  args.insert(args.begin(), "mqa-server");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  return LoadConfig(static_cast<int>(argv.size()), argv.data(), env);
}

std::string AutoDevice() { return core::CudaAvailable() ? "cuda:0" : "cpu"; }

// A fresh directory per test, removed afterwards, so tests never see each other's files.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("mqa_config_test_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& text) const {
    const fs::path p = path_ / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text;
    return p.string();
  }

 private:
  fs::path path_;
};

void ExpectError(const core::StatusOr<ServerConfig>& result, StatusCode code,
                 const std::vector<std::string>& substrings) {
  ASSERT_FALSE(result.ok()) << "expected an error";
  EXPECT_EQ(result.status().code(), code) << result.status().ToString();
  for (const std::string& s : substrings) EXPECT_THAT(result.status().message(), HasSubstr(s));
}

// ---- Defaults ----

TEST(ServerConfigTest, DefaultsWithNothingGiven) {
  auto c = Load({});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->listen, "0.0.0.0:50051");
  EXPECT_EQ(c->port_file, "");
  EXPECT_EQ(c->max_message_bytes, size_t{64} << 20);
  EXPECT_EQ(c->drain_timeout, std::chrono::seconds(30));
  EXPECT_EQ(c->log_level, "info");
  EXPECT_EQ(c->log_format, "text");
  EXPECT_EQ(c->engine.max_sessions, 1024u);
  EXPECT_EQ(c->engine.max_queue, 4096u);
  EXPECT_EQ(c->engine.default_idle_ttl, std::chrono::minutes(5));
  EXPECT_EQ(c->engine.max_idle_ttl, std::chrono::hours(1));
  EXPECT_EQ(c->engine.reap_interval, std::chrono::milliseconds(200));
  EXPECT_EQ(c->engine.batching.max_batch_tokens, 4096);
  EXPECT_EQ(c->engine.batching.max_batch_sessions, 256);
  EXPECT_EQ(c->engine.batching.max_queue_delay, std::chrono::microseconds(0));
  EXPECT_EQ(c->engine.batching.max_prefill_chunk, 512);
  EXPECT_EQ(c->engine.kv_cache.block_size, 16);
  EXPECT_EQ(c->engine.kv_cache.budget_bytes, 0);
  EXPECT_DOUBLE_EQ(c->engine.kv_cache.gpu_memory_fraction, 0.9);
  EXPECT_EQ(c->engine.kv_cache.cpu_budget_bytes, int64_t{1} << 30);
  EXPECT_TRUE(c->default_model);
  EXPECT_EQ(c->config_path, "");
  EXPECT_FALSE(c->show_help);
  ASSERT_EQ(c->engine.models.size(), 1u);
  const core::ModelConfig& m = c->engine.models[0];
  EXPECT_EQ(m.name, "mqa-default");
  EXPECT_EQ(m.num_layers, 2);
  EXPECT_EQ(m.options.dim, 512);
  EXPECT_EQ(m.options.heads, 8);
  EXPECT_EQ(m.options.seed, 0u);
  // The fastest correct path: the fused kernels on a GPU, the torch math on the CPU.
  EXPECT_EQ(m.options.attn_impl, core::CudaAvailable() ? core::AttnImpl::kTriton : core::AttnImpl::kTorch);
  EXPECT_EQ(m.max_tokens_per_session, 4096);
  EXPECT_EQ(m.weights_path, "");
  EXPECT_EQ(m.options.device, AutoDevice());
  EXPECT_EQ(m.options.dtype, core::CudaAvailable() ? core::DType::kBFloat16 : core::DType::kFloat32);
}

TEST(ServerConfigTest, DefaultModelFollowsDevice) {
  EXPECT_EQ(DefaultModel().options.device, AutoDevice());
  const core::ModelConfig cpu = DefaultModel("cpu");
  EXPECT_EQ(cpu.options.device, "cpu");
  EXPECT_EQ(cpu.options.dtype, core::DType::kFloat32);
  EXPECT_EQ(cpu.options.attn_impl, core::AttnImpl::kTorch);
  const core::ModelConfig gpu = DefaultModel("cuda:1");
  EXPECT_EQ(gpu.options.device, "cuda:1");
  EXPECT_EQ(gpu.options.dtype, core::DType::kBFloat16);
  EXPECT_EQ(gpu.options.attn_impl, core::AttnImpl::kTriton);
  EXPECT_EQ(DefaultModel("auto").options.device, AutoDevice());
}

TEST(ServerConfigTest, DefaultDeviceFromEnvAndFlag) {
  auto env = Load({}, {{"MQA_DEFAULT_DEVICE", "cpu"}});
  ASSERT_TRUE(env.ok()) << env.status().ToString();
  EXPECT_EQ(env->engine.models[0].options.device, "cpu");
  EXPECT_EQ(env->engine.models[0].options.dtype, core::DType::kFloat32);
  auto flag = Load({"--device", "cpu"}, {{"MQA_DEFAULT_DEVICE", "auto"}});
  ASSERT_TRUE(flag.ok()) << flag.status().ToString();
  EXPECT_EQ(flag->engine.models[0].options.device, "cpu");
  ExpectError(Load({"--device=tpu"}), StatusCode::kInvalidArgument, {"--device: default model (mqa-default): "});
  if (!core::CudaAvailable()) {
    ExpectError(Load({}, {{"MQA_DEFAULT_DEVICE", "cuda"}}), StatusCode::kUnavailable,
                {"MQA_DEFAULT_DEVICE: default model (mqa-default): ", "no CUDA device"});
  }
}

// ---- Files ----

constexpr char kYaml[] = R"(# a comment
listen: "127.0.0.1:6000"
max_message_bytes: 1048576
drain_timeout_ms: 1500
log_level: debug
log_format: json
max_sessions: 10
max_queue: 20
default_idle_ttl_ms: 1000
max_idle_ttl_ms: 2000
reap_interval_ms: 50
models:
  - name: tiny
    num_layers: 3
    dim: 64
    heads: 4
    attn_impl: flash
    clip_qkv: 8.5
    qk_ln: true
    softmax_scale: 0.25
    attn_pdrop: 0.1
    norm_type: RMSNorm
    fc_type: torch
    device: cpu
    dtype: bf16
    seed: 42
    max_tokens_per_session: 128
    description: "a tiny model"
  - name: second
    device: cpu
)";

TEST(ServerConfigTest, YamlFile) {
  TempDir dir;
  const std::string path = dir.Write("config.yaml", kYaml);
  auto c = Load({"--config", path});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->config_path, path);
  EXPECT_EQ(c->listen, "127.0.0.1:6000");
  EXPECT_EQ(c->max_message_bytes, 1048576u);
  EXPECT_EQ(c->drain_timeout, std::chrono::milliseconds(1500));
  EXPECT_EQ(c->log_level, "debug");
  EXPECT_EQ(c->log_format, "json");
  EXPECT_EQ(c->engine.max_sessions, 10u);
  EXPECT_EQ(c->engine.max_queue, 20u);
  EXPECT_EQ(c->engine.default_idle_ttl, std::chrono::milliseconds(1000));
  EXPECT_EQ(c->engine.max_idle_ttl, std::chrono::milliseconds(2000));
  EXPECT_EQ(c->engine.reap_interval, std::chrono::milliseconds(50));
  EXPECT_FALSE(c->default_model);
  ASSERT_EQ(c->engine.models.size(), 2u);
  const core::ModelConfig& m = c->engine.models[0];
  EXPECT_EQ(m.name, "tiny");
  EXPECT_EQ(m.num_layers, 3);
  EXPECT_EQ(m.options.dim, 64);
  EXPECT_EQ(m.options.heads, 4);
  EXPECT_EQ(m.options.attn_impl, core::AttnImpl::kFlash);
  ASSERT_TRUE(m.options.clip_qkv.has_value());
  EXPECT_DOUBLE_EQ(*m.options.clip_qkv, 8.5);
  EXPECT_TRUE(m.options.qk_ln);
  ASSERT_TRUE(m.options.softmax_scale.has_value());
  EXPECT_DOUBLE_EQ(*m.options.softmax_scale, 0.25);
  EXPECT_DOUBLE_EQ(m.options.attn_pdrop, 0.1);
  EXPECT_EQ(m.options.norm_type, core::NormType::kRmsNorm);
  EXPECT_EQ(m.options.device, "cpu");
  EXPECT_EQ(m.options.dtype, core::DType::kBFloat16);
  EXPECT_EQ(m.options.seed, 42u);
  EXPECT_EQ(m.max_tokens_per_session, 128);
  EXPECT_EQ(m.description, "a tiny model");
  // Unset keys keep ModelConfig's defaults; a CPU model without dtype is fp32.
  const core::ModelConfig& s = c->engine.models[1];
  EXPECT_EQ(s.name, "second");
  EXPECT_EQ(s.num_layers, 1);
  EXPECT_EQ(s.options.dim, 512);
  EXPECT_EQ(s.options.dtype, core::DType::kFloat32);
  EXPECT_FALSE(s.options.clip_qkv.has_value());
  EXPECT_EQ(s.max_tokens_per_session, 4096);
}

TEST(ServerConfigTest, JsonFileFromEnv) {
  TempDir dir;
  const std::string path = dir.Write("config.json", R"({
    "listen": "[::1]:0",
    "max_sessions": 7,
    "log_format": "json",
    "models": [
      {"name": "j", "dim": 32, "heads": 2, "device": "cpu", "clip_qkv": null, "qk_ln": false,
       "softmax_scale": 1, "description": "from JSON"}
    ]
  })");
  auto c = Load({}, {{"MQA_CONFIG", path}});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->config_path, path);
  EXPECT_EQ(c->listen, "[::1]:0");
  EXPECT_EQ(c->engine.max_sessions, 7u);
  EXPECT_EQ(c->log_format, "json");
  ASSERT_EQ(c->engine.models.size(), 1u);
  EXPECT_EQ(c->engine.models[0].name, "j");
  EXPECT_EQ(c->engine.models[0].options.dim, 32);
  EXPECT_DOUBLE_EQ(c->engine.models[0].options.softmax_scale.value_or(-1), 1.0);
  EXPECT_FALSE(c->engine.models[0].options.clip_qkv.has_value());
  EXPECT_EQ(c->engine.models[0].description, "from JSON");
  EXPECT_EQ(c->engine.models[0].options.attn_impl, core::AttnImpl::kTorch);  // unset, on the CPU
}

TEST(ServerConfigTest, EmptyFileAndEmptyModelListMeanDefaults) {
  TempDir dir;
  auto empty = Load({"--config", dir.Write("empty.yaml", "")});
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_TRUE(empty->default_model);
  auto no_models = Load({"--config", dir.Write("none.yaml", "models: []\nmax_queue: 3\n")});
  ASSERT_TRUE(no_models.ok()) << no_models.status().ToString();
  EXPECT_TRUE(no_models->default_model);
  EXPECT_EQ(no_models->engine.max_queue, 3u);
  EXPECT_EQ(no_models->engine.models.at(0).name, "mqa-default");
}

TEST(ServerConfigTest, ShippedExampleLoads) {
  auto c = Load({"--config", std::string(MQA_SOURCE_DIR) + "/deploy/config/example.yaml"});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->engine.models.size(), 2u);
  EXPECT_EQ(c->engine.models[0].name, "mqa-small");
  EXPECT_EQ(c->engine.models[0].options.device, AutoDevice());
  EXPECT_EQ(c->engine.models[1].options.device, "cpu");
}

// ---- Precedence: file < env < flags ----

TEST(ServerConfigTest, EnvOverridesFileAndFlagsOverrideEnv) {
  TempDir dir;
  const std::string path = dir.Write("c.yaml", "listen: 127.0.0.1:1\nmax_sessions: 1\nmax_queue: 1\nlog_level: warn\n");
  const Env env = {{"MQA_CONFIG", path},          {"MQA_LISTEN", "127.0.0.1:2"}, {"MQA_MAX_SESSIONS", "2"},
                   {"MQA_LOG_LEVEL", ""},         {"MQA_PORT_FILE", "/tmp/env-port"},
                   {"MQA_DRAIN_TIMEOUT_MS", "5"}, {"MQA_UNRELATED", "ignored"}};
  auto c = Load({"--listen", "127.0.0.1:3"}, env);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->listen, "127.0.0.1:3");                         // flag > env > file
  EXPECT_EQ(c->engine.max_sessions, 2u);                        // env > file
  EXPECT_EQ(c->engine.max_queue, 1u);                           // file only
  EXPECT_EQ(c->log_level, "warn");                              // an empty env value is unset
  EXPECT_EQ(c->port_file, "/tmp/env-port");
  EXPECT_EQ(c->drain_timeout, std::chrono::milliseconds(5));
}

TEST(ServerConfigTest, BatchingAndKvCacheFromFileEnvAndFlags) {
  TempDir dir;
  const std::string path = dir.Write("c.yaml", R"(max_batch_tokens: 1000
max_batch_sessions: 8
max_queue_delay_us: 250
max_prefill_chunk: 128
kv_block_size: 32
kv_cache_bytes: 1048576
kv_gpu_memory_fraction: 0.5
kv_cpu_budget_bytes: 2048
)");
  auto file = Load({"--config", path});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ(file->engine.batching.max_batch_tokens, 1000);
  EXPECT_EQ(file->engine.batching.max_batch_sessions, 8);
  EXPECT_EQ(file->engine.batching.max_queue_delay, std::chrono::microseconds(250));
  EXPECT_EQ(file->engine.batching.max_prefill_chunk, 128);
  EXPECT_EQ(file->engine.kv_cache.block_size, 32);
  EXPECT_EQ(file->engine.kv_cache.budget_bytes, 1048576);
  EXPECT_DOUBLE_EQ(file->engine.kv_cache.gpu_memory_fraction, 0.5);
  EXPECT_EQ(file->engine.kv_cache.cpu_budget_bytes, 2048);

  const Env env = {{"MQA_MAX_BATCH_SESSIONS", "1"}, {"MQA_KV_BLOCK_SIZE", "64"},
                   {"MQA_MAX_QUEUE_DELAY_US", "0"}, {"MQA_KV_GPU_MEMORY_FRACTION", "1"},
                   {"MQA_KV_CACHE_BYTES", ""}};
  auto c = Load({"--config", path, "--kv-block-size=8", "--kv-cache-bytes", "0"}, env);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->engine.batching.max_batch_sessions, 1);                           // env > file
  EXPECT_EQ(c->engine.batching.max_queue_delay, std::chrono::microseconds(0));  // env > file
  EXPECT_DOUBLE_EQ(c->engine.kv_cache.gpu_memory_fraction, 1.0);                // env > file
  EXPECT_EQ(c->engine.kv_cache.block_size, 8);                                   // flag > env > file
  EXPECT_EQ(c->engine.kv_cache.budget_bytes, 0);                                 // flag > file; empty env unset
  EXPECT_EQ(c->engine.batching.max_batch_tokens, 1000);                          // file only
  EXPECT_EQ(c->engine.kv_cache.cpu_budget_bytes, 2048);                          // file only

  const std::string json = dir.Write("c.json", R"({"max_prefill_chunk": 64, "kv_gpu_memory_fraction": 0.25})");
  auto j = Load({"--config", json});
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ(j->engine.batching.max_prefill_chunk, 64);
  EXPECT_DOUBLE_EQ(j->engine.kv_cache.gpu_memory_fraction, 0.25);
}

TEST(ServerConfigTest, MetricsHttpLimitsFromFileEnvAndFlags) {
  auto defaults = Load({});
  ASSERT_TRUE(defaults.ok()) << defaults.status().ToString();
  EXPECT_EQ(defaults->metrics_max_connections, 64u);
  EXPECT_EQ(defaults->metrics_request_timeout, std::chrono::milliseconds(5000));
  EXPECT_EQ(defaults->metrics_idle_timeout, std::chrono::milliseconds(5000));

  TempDir dir;
  const std::string path = dir.Write(
      "c.yaml", "metrics_max_connections: 3\nmetrics_request_timeout_ms: 250\nmetrics_idle_timeout_ms: 750\n");
  const Env env = {{"MQA_METRICS_REQUEST_TIMEOUT_MS", "400"}, {"MQA_METRICS_IDLE_TIMEOUT_MS", "600"}};
  auto c = Load({"--config", path, "--metrics-idle-timeout-ms=900"}, env);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->metrics_max_connections, 3u);                                // file only
  EXPECT_EQ(c->metrics_request_timeout, std::chrono::milliseconds(400));   // env > file
  EXPECT_EQ(c->metrics_idle_timeout, std::chrono::milliseconds(900));      // flag > env > file

  // A zero limit would refuse every scrape, a zero timeout every request.
  ExpectError(Load({"--metrics-max-connections=0"}), StatusCode::kInvalidArgument,
              {"--metrics-max-connections: expected an integer >= 1, got '0'"});
  ExpectError(Load({"--metrics-request-timeout-ms", "0"}), StatusCode::kInvalidArgument,
              {"--metrics-request-timeout-ms: expected an integer (milliseconds) between 1 and"});
  ExpectError(Load({}, {{"MQA_METRICS_IDLE_TIMEOUT_MS", "5s"}}), StatusCode::kInvalidArgument,
              {"MQA_METRICS_IDLE_TIMEOUT_MS: expected an integer (milliseconds)"});
}

TEST(ServerConfigTest, EveryFlagInBothForms) {
  const std::vector<std::string> separate = {
      "--listen", "localhost:7", "--port-file", "/tmp/p", "--max-message-bytes", "1000", "--drain-timeout-ms", "0",
      "--log-level", "error", "--log-format", "json", "--max-sessions", "3", "--max-queue", "4",
      "--default-idle-ttl-ms", "10", "--max-idle-ttl-ms", "20", "--reap-interval-ms", "5", "--device", "cpu",
      "--max-batch-tokens", "100", "--max-batch-sessions", "6", "--max-queue-delay-us", "7",
      "--max-prefill-chunk", "9", "--kv-block-size", "1024", "--kv-cache-bytes", "4096",
      "--kv-gpu-memory-fraction", "0.75", "--kv-cpu-budget-bytes", "1"};
  std::vector<std::string> joined;
  for (size_t i = 0; i < separate.size(); i += 2) joined.push_back(separate[i] + "=" + separate[i + 1]);
  for (const auto& args : {separate, joined}) {
    auto c = Load(args);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_EQ(c->listen, "localhost:7");
    EXPECT_EQ(c->port_file, "/tmp/p");
    EXPECT_EQ(c->max_message_bytes, 1000u);
    EXPECT_EQ(c->drain_timeout, std::chrono::milliseconds(0));
    EXPECT_EQ(c->log_level, "error");
    EXPECT_EQ(c->log_format, "json");
    EXPECT_EQ(c->engine.max_sessions, 3u);
    EXPECT_EQ(c->engine.max_queue, 4u);
    EXPECT_EQ(c->engine.default_idle_ttl, std::chrono::milliseconds(10));
    EXPECT_EQ(c->engine.max_idle_ttl, std::chrono::milliseconds(20));
    EXPECT_EQ(c->engine.reap_interval, std::chrono::milliseconds(5));
    EXPECT_EQ(c->engine.models.at(0).options.device, "cpu");
    EXPECT_EQ(c->engine.batching.max_batch_tokens, 100);
    EXPECT_EQ(c->engine.batching.max_batch_sessions, 6);
    EXPECT_EQ(c->engine.batching.max_queue_delay, std::chrono::microseconds(7));
    EXPECT_EQ(c->engine.batching.max_prefill_chunk, 9);
    EXPECT_EQ(c->engine.kv_cache.block_size, 1024);
    EXPECT_EQ(c->engine.kv_cache.budget_bytes, 4096);
    EXPECT_DOUBLE_EQ(c->engine.kv_cache.gpu_memory_fraction, 0.75);
    EXPECT_EQ(c->engine.kv_cache.cpu_budget_bytes, 1);
  }
  // The last of a repeated flag wins; a value may contain '='.
  auto last = Load({"--max-queue=1", "--max-queue", "2", "--port-file=/tmp/a=b"});
  ASSERT_TRUE(last.ok()) << last.status().ToString();
  EXPECT_EQ(last->engine.max_queue, 2u);
  EXPECT_EQ(last->port_file, "/tmp/a=b");
}

TEST(ServerConfigTest, ConfigFlagOverridesConfigEnv) {
  TempDir dir;
  const std::string a = dir.Write("a.yaml", "max_queue: 11\n");
  const std::string b = dir.Write("b.yaml", "max_queue: 22\n");
  auto c = Load({"--config=" + b}, {{"MQA_CONFIG", a}});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->engine.max_queue, 22u);
  EXPECT_EQ(c->config_path, b);
}

// ---- Errors ----

TEST(ServerConfigTest, UnknownKeys) {
  TempDir dir;
  const std::string top = dir.Write("top.yaml", "listen: 127.0.0.1:1\nmax_sesions: 3\n");
  ExpectError(Load({"--config", top}), StatusCode::kInvalidArgument,
              {top + ":2:1: max_sesions: unknown key; expected one of listen, metrics_listen, health_listen, "
               "max_message_bytes",
               "reap_interval_ms, max_batch_tokens", "kv_cpu_budget_bytes, models"});
  const std::string model = dir.Write("model.yaml", R"(models:
  - name: a
    device: cpu
  - name: b
    hedas: 4
)");
  ExpectError(Load({"--config", model}), StatusCode::kInvalidArgument,
              {model + ":5:5: models[1].hedas: unknown key; expected one of name, num_layers, dim, heads",
               "description"});
}

TEST(ServerConfigTest, WrongTypes) {
  TempDir dir;
  struct Case {
    std::string yaml;
    std::vector<std::string> expected;
  };
  const std::vector<Case> cases = {
      {"max_sessions: \"12\"\n", {"max_sessions: expected an integer, got the quoted string \"12\""}},
      {"max_sessions: [1, 2]\n", {"max_sessions: expected an integer, got a list"}},
      {"max_sessions: 1.5\n", {"max_sessions: expected an integer >= 1, got '1.5'"}},
      {"max_batch_tokens: \"64\"\n", {"max_batch_tokens: expected an integer, got the quoted string \"64\""}},
      {"kv_gpu_memory_fraction: \"0.5\"\n",
       {"kv_gpu_memory_fraction: expected a number, got the quoted string \"0.5\""}},
      {"kv_gpu_memory_fraction: [0.5]\n", {"kv_gpu_memory_fraction: expected a number, got a list"}},
      {"kv_block_size: 2048\n", {"kv_block_size: expected an integer between 1 and 1024, got '2048'"}},
      {"listen: {host: a}\n", {"listen: expected a string, got a map"}},
      {"log_format: xml\n", {"log_format: expected text or json, got 'xml'"}},
      {"log_level: verbose\n", {"log_level: expected one of trace, debug, info"}},
      {"models: {name: a}\n", {"models: expected a list of models, got a map"}},
      {"models:\n  - tiny\n", {"models[0]: expected a map describing a model, got 'tiny'"}},
      {"models:\n  - name: a\n    qk_ln: yes\n", {"models[0].qk_ln: expected true or false, got 'yes'"}},
      {"models:\n  - name: a\n    dim: \"64\"\n", {"models[0].dim: expected an integer, got the quoted string"}},
      {"models:\n  - name: a\n    clip_qkv: big\n", {"models[0].clip_qkv: expected a finite number, got 'big'"}},
      {"models:\n  - name: a\n    softmax_scale: [1]\n", {"models[0].softmax_scale: expected a number or null"}},
      {"models:\n  - name: a\n    seed: -1\n", {"models[0].seed: expected an integer between 0 and"}},
      {"models:\n  - name: a\n    num_layers: 0\n", {"models[0].num_layers: expected an integer between 1 and"}},
      {"models:\n  - name: a b\n",
       {"models[0].name: expected a non-empty name of at most 128 bytes without whitespace, got 'a b'"}},
      // Requests cannot name a model longer than 128 bytes, so the configuration cannot host one.
      {"models:\n  - name: " + std::string(129, 'n') + "\n", {"models[0].name: expected a non-empty name of at most 128"}},
      {"models:\n  - dim: 64\n", {"models[0]: missing required key 'name'"}},
      {"models:\n  - name: a\n    dim: 64\n    dim: 32\n", {"models[0].dim: duplicate key"}},
      {"[1, 2]\n", {"expected a map of settings at the top level, got a list"}},
      {"listen: [unclosed\n", {"not valid YAML or JSON"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].yaml);
    const std::string path = dir.Write("case" + std::to_string(i) + ".yaml", cases[i].yaml);
    ExpectError(Load({"--config", path}), StatusCode::kInvalidArgument, cases[i].expected);
  }
}

TEST(ServerConfigTest, BadNumbersFromFlagsAndEnv) {
  ExpectError(Load({"--max-sessions", "abc"}), StatusCode::kInvalidArgument,
              {"--max-sessions: expected an integer >= 1, got 'abc'"});
  ExpectError(Load({"--max-sessions=0"}), StatusCode::kInvalidArgument,
              {"--max-sessions: expected an integer >= 1, got '0'"});
  ExpectError(Load({"--max-queue=99999999999999999999"}), StatusCode::kInvalidArgument,
              {"--max-queue: expected an integer >= 1"});
  ExpectError(Load({"--drain-timeout-ms=10s"}), StatusCode::kInvalidArgument,
              {"--drain-timeout-ms: expected an integer (milliseconds) between 0 and 31536000000 (one year), "
               "got '10s'"});
  ExpectError(Load({"--max-message-bytes=4294967296"}), StatusCode::kInvalidArgument,
              {"--max-message-bytes: expected an integer (bytes) between 1 and 2147483647"});
  ExpectError(Load({}, {{"MQA_MAX_QUEUE", "-4"}}), StatusCode::kInvalidArgument,
              {"MQA_MAX_QUEUE: expected an integer >= 1, got '-4'"});
  ExpectError(Load({}, {{"MQA_REAP_INTERVAL_MS", " 5"}}), StatusCode::kInvalidArgument,
              {"MQA_REAP_INTERVAL_MS: expected an integer (milliseconds)"});
  ExpectError(Load({"--listen", "localhost"}), StatusCode::kInvalidArgument,
              {"--listen: expected host:port", "got 'localhost'"});
  ExpectError(Load({"--listen", "0.0.0.0:70000"}), StatusCode::kInvalidArgument, {"--listen: expected host:port"});
  ExpectError(Load({"--log-level", "loud"}), StatusCode::kInvalidArgument, {"--log-level: expected one of"});
  ExpectError(Load({"--default-idle-ttl-ms=5000", "--max-idle-ttl-ms=1000"}), StatusCode::kInvalidArgument,
              {"default_idle_ttl_ms (5000) must not exceed max_idle_ttl_ms (1000)"});
}

TEST(ServerConfigTest, BatchingAndKvCacheRanges) {
  ExpectError(Load({"--max-batch-tokens=0"}), StatusCode::kInvalidArgument,
              {"--max-batch-tokens: expected an integer >= 1, got '0'"});
  ExpectError(Load({"--max-batch-sessions", "0"}), StatusCode::kInvalidArgument,
              {"--max-batch-sessions: expected an integer >= 1, got '0'"});
  ExpectError(Load({}, {{"MQA_MAX_QUEUE_DELAY_US", "-1"}}), StatusCode::kInvalidArgument,
              {"MQA_MAX_QUEUE_DELAY_US: expected an integer (microseconds) between 0 and 1000000 (one second), "
               "got '-1'"});
  ExpectError(Load({"--max-queue-delay-us=1000001"}), StatusCode::kInvalidArgument,
              {"--max-queue-delay-us: expected an integer (microseconds) between 0 and 1000000"});
  ExpectError(Load({"--max-queue-delay-us=5ms"}), StatusCode::kInvalidArgument,
              {"--max-queue-delay-us: expected an integer (microseconds)", "got '5ms'"});
  ExpectError(Load({"--max-prefill-chunk=-3"}), StatusCode::kInvalidArgument,
              {"--max-prefill-chunk: expected an integer >= 1, got '-3'"});
  ExpectError(Load({"--kv-block-size=0"}), StatusCode::kInvalidArgument,
              {"--kv-block-size: expected an integer between 1 and 1024, got '0'"});
  ExpectError(Load({}, {{"MQA_KV_BLOCK_SIZE", "1025"}}), StatusCode::kInvalidArgument,
              {"MQA_KV_BLOCK_SIZE: expected an integer between 1 and 1024, got '1025'"});
  ExpectError(Load({"--kv-cache-bytes=-1"}), StatusCode::kInvalidArgument,
              {"--kv-cache-bytes: expected an integer (bytes) >= 0, got '-1'"});
  ExpectError(Load({"--kv-cache-bytes=1GiB"}), StatusCode::kInvalidArgument,
              {"--kv-cache-bytes: expected an integer (bytes) >= 0, got '1GiB'"});
  ExpectError(Load({"--kv-cpu-budget-bytes=0"}), StatusCode::kInvalidArgument,
              {"--kv-cpu-budget-bytes: expected an integer (bytes) >= 1, got '0'"});
  for (const char* bad : {"0", "-0.5", "1.01", "2"}) {
    ExpectError(Load({"--kv-gpu-memory-fraction", bad}), StatusCode::kInvalidArgument,
                {"--kv-gpu-memory-fraction: expected a number in (0, 1], got '" + std::string(bad) + "'"});
  }
  ExpectError(Load({}, {{"MQA_KV_GPU_MEMORY_FRACTION", "nan"}}), StatusCode::kInvalidArgument,
              {"MQA_KV_GPU_MEMORY_FRACTION: expected a finite number, got 'nan'"});
  ExpectError(Load({}, {{"MQA_KV_GPU_MEMORY_FRACTION", "90%"}}), StatusCode::kInvalidArgument,
              {"MQA_KV_GPU_MEMORY_FRACTION: expected a finite number, got '90%'"});
  TempDir dir;
  const std::string path = dir.Write("c.yaml", "kv_block_size: 16\nmax_batch_sessions: 0\n");
  ExpectError(Load({"--config", path}), StatusCode::kInvalidArgument,
              {path + ":2:1: max_batch_sessions: expected an integer >= 1, got '0'"});
}

TEST(ServerConfigTest, UnknownAndMalformedFlags) {
  ExpectError(Load({"--lisen", "x"}), StatusCode::kInvalidArgument,
              {"unknown flag '--lisen' (did you mean --listen?); see --help"});
  ExpectError(Load({"--frobnicate"}), StatusCode::kInvalidArgument, {"unknown flag '--frobnicate'; see --help"});
  ExpectError(Load({"listen"}), StatusCode::kInvalidArgument, {"unexpected argument 'listen'"});
  ExpectError(Load({"--listen"}), StatusCode::kInvalidArgument, {"--listen: expected a value"});
  ExpectError(Load({"--listen", "--max-queue", "3"}), StatusCode::kInvalidArgument, {"--listen: expected a value"});
  ExpectError(Load({"--help=yes"}), StatusCode::kInvalidArgument, {"--help takes no value"});
}

TEST(ServerConfigTest, DuplicateModelNames) {
  TempDir dir;
  const std::string path = dir.Write("dup.yaml", R"(models:
  - name: same
    device: cpu
  - name: other
    device: cpu
  - name: same
    device: cpu
)");
  ExpectError(Load({"--config", path}), StatusCode::kInvalidArgument,
              {"models[2].name: duplicate model name 'same' (models[0] has it too)"});
}

TEST(ServerConfigTest, BadModelOptions) {
  TempDir dir;
  const std::string path = dir.Write("bad.yaml", R"(models:
  - name: ok
    device: cpu
  - name: odd
    dim: 100
    heads: 3
    device: cpu
)");
  ExpectError(Load({"--config", path}), StatusCode::kInvalidArgument,
              {path + ":4:5: models[1] (odd): dim (100) must be divisible by heads (3)"});
  const struct {
    std::string yaml;
    std::string expected;
  } cases[] = {
      {"models:\n  - name: m\n    attn_impl: fast\n", "models[0].attn_impl: unknown attn_impl 'fast'"},
      {"models:\n  - name: m\n    norm_type: batchnorm\n", "models[0].norm_type: unknown norm_type 'batchnorm'"},
      {"models:\n  - name: m\n    dtype: int8\n", "models[0].dtype: unknown dtype 'int8'"},
      {"models:\n  - name: m\n    device: cpu\n    dtype: bool\n",
       "models[0] (m): layer dtype must be float32, bfloat16 or float16, got bool"},
      {"models:\n  - name: m\n    device: cpu\n    attn_pdrop: 1.5\n", "models[0] (m): attn_pdrop must be in [0, 1)"},
      {"models:\n  - name: m\n    device: cpu\n    fc_type: te\n", "models[0] (m): fc_type 'te' is not supported"},
      {"models:\n  - name: m\n    device: tpu:0\n", "models[0] (m): "},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.yaml);
    ExpectError(Load({"--config", dir.Write("case.yaml", c.yaml)}), StatusCode::kInvalidArgument, {c.expected});
  }
  if (!core::CudaAvailable()) {
    ExpectError(Load({"--config", dir.Write("gpu.yaml", "models:\n  - name: g\n    device: cuda:0\n")}),
                StatusCode::kUnavailable, {"models[0] (g): "});
  }
  // --device only concerns the embedded default model; with models in the file it is a mistake.
  ExpectError(Load({"--config", dir.Write("m.yaml", "models:\n  - name: m\n    device: cpu\n"), "--device=cpu"}),
              StatusCode::kInvalidArgument, {"--device sets the embedded default model's device"});
  auto env_device = Load({"--config", dir.Write("m2.yaml", "models:\n  - name: m\n    device: cpu\n")},
                         {{"MQA_DEFAULT_DEVICE", "cuda:5"}});
  EXPECT_TRUE(env_device.ok()) << env_device.status().ToString();
}

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
      {"models:\n  - name: m\n    devices: [cpu, cuda:99]\n", StatusCode::kUnavailable,
       "models[0].devices[1]: "},
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

TEST(ServerConfigTest, MissingFileIsNotFound) {
  ExpectError(Load({"--config", "/nonexistent/mqa.yaml"}), StatusCode::kNotFound,
              {"config file '/nonexistent/mqa.yaml' not found"});
  ExpectError(Load({}, {{"MQA_CONFIG", "/nonexistent/env.yaml"}}), StatusCode::kNotFound,
              {"config file '/nonexistent/env.yaml' not found"});
}

TEST(ServerConfigTest, WeightsPathsResolveAgainstTheConfigDirectory) {
  TempDir dir;
  dir.Write("weights/w.safetensors", "placeholder");
  dir.Write("abs.safetensors", "placeholder");
  const std::string abs = (dir.path() / "abs.safetensors").string();
  const std::string path = dir.Write("conf/config.yaml", "models:\n"
                                                         "  - name: rel\n    device: cpu\n"
                                                         "    weights: ../weights/w.safetensors\n"
                                                         "  - name: abs\n    device: cpu\n    weights: " + abs + "\n"
                                                         "  - name: none\n    device: cpu\n    weights: null\n");
  // From another working directory, so a cwd-relative resolution would fail.
  const fs::path old_cwd = fs::current_path();
  fs::current_path(fs::temp_directory_path());
  auto c = Load({"--config", path});
  fs::current_path(old_cwd);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->engine.models.size(), 3u);
  EXPECT_EQ(c->engine.models[0].weights_path, (dir.path() / "weights" / "w.safetensors").string());
  EXPECT_TRUE(fs::path(c->engine.models[0].weights_path).is_absolute());
  EXPECT_EQ(c->engine.models[1].weights_path, abs);
  EXPECT_EQ(c->engine.models[2].weights_path, "");

  const std::string missing = dir.Write("conf/missing.yaml", "models:\n  - name: m\n    device: cpu\n"
                                                             "    weights: nope.safetensors\n");
  ExpectError(Load({"--config", missing}), StatusCode::kNotFound,
              {"models[0].weights: weights file '" + (dir.path() / "conf" / "nope.safetensors").string() +
               "' not found"});
}

// ---- Metrics and health endpoints ----

TEST(ServerConfigTest, MetricsAndHealthDefaults) {
  auto c = Load({});
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->metrics_listen, "0.0.0.0:9400");
  EXPECT_EQ(c->metrics_port_file, "");
  EXPECT_EQ(c->health_listen, "");
  EXPECT_EQ(c->health_port_file, "");
}

TEST(ServerConfigTest, MetricsAndHealthFromFileEnvAndFlags) {
  TempDir dir;
  const std::string yaml = dir.Write("c.yaml", "metrics_listen: 127.0.0.1:9500\nhealth_listen: \"[::1]:9600\"\n");
  auto file = Load({"--config", yaml});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ(file->metrics_listen, "127.0.0.1:9500");
  EXPECT_EQ(file->health_listen, "[::1]:9600");

  const Env env = {{"MQA_CONFIG", yaml},
                   {"MQA_METRICS_LISTEN", "127.0.0.1:0"},
                   {"MQA_METRICS_PORT_FILE", "/tmp/env-metrics-port"},
                   {"MQA_HEALTH_LISTEN", "unix:/tmp/health.sock"},
                   {"MQA_HEALTH_PORT_FILE", "/tmp/env-health-port"}};
  auto from_env = Load({}, env);
  ASSERT_TRUE(from_env.ok()) << from_env.status().ToString();
  EXPECT_EQ(from_env->metrics_listen, "127.0.0.1:0");
  EXPECT_EQ(from_env->metrics_port_file, "/tmp/env-metrics-port");
  EXPECT_EQ(from_env->health_listen, "unix:/tmp/health.sock");
  EXPECT_EQ(from_env->health_port_file, "/tmp/env-health-port");

  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--metrics-listen", "localhost:1", "--metrics-port-file", "/tmp/m", "--health-listen", "0.0.0.0:2",
            "--health-port-file", "/tmp/h"},
           {"--metrics-listen=localhost:1", "--metrics-port-file=/tmp/m", "--health-listen=0.0.0.0:2",
            "--health-port-file=/tmp/h"}}) {
    auto c = Load(args, env);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_EQ(c->metrics_listen, "localhost:1");  // flag > env > file
    EXPECT_EQ(c->metrics_port_file, "/tmp/m");
    EXPECT_EQ(c->health_listen, "0.0.0.0:2");
    EXPECT_EQ(c->health_port_file, "/tmp/h");
  }
}

TEST(ServerConfigTest, EmptyMetricsListenDisablesTheEndpoint) {
  TempDir dir;
  auto file = Load({"--config", dir.Write("c.yaml", "metrics_listen: \"\"\nhealth_listen: \"\"\n")});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ(file->metrics_listen, "");
  EXPECT_EQ(file->health_listen, "");
  auto flag = Load({"--metrics-listen="});
  ASSERT_TRUE(flag.ok()) << flag.status().ToString();
  EXPECT_EQ(flag->metrics_listen, "");
  // An empty environment variable counts as unset, as everywhere else: the default stays.
  auto env = Load({}, {{"MQA_METRICS_LISTEN", ""}});
  ASSERT_TRUE(env.ok()) << env.status().ToString();
  EXPECT_EQ(env->metrics_listen, "0.0.0.0:9400");
}

TEST(ServerConfigTest, BadMetricsAndHealthAddresses) {
  ExpectError(Load({"--metrics-listen", "9400"}), StatusCode::kInvalidArgument,
              {"--metrics-listen", "expected host:port", "'9400'"});
  ExpectError(Load({"--metrics-listen", "unix:/tmp/m.sock"}), StatusCode::kInvalidArgument,
              {"--metrics-listen", "'unix:/tmp/m.sock'"});
  ExpectError(Load({}, {{"MQA_METRICS_LISTEN", "0.0.0.0:65536"}}), StatusCode::kInvalidArgument,
              {"MQA_METRICS_LISTEN", "'0.0.0.0:65536'"});
  ExpectError(Load({"--health-listen", "::1:50"}), StatusCode::kInvalidArgument,
              {"--health-listen", "IPv6 host in brackets", "'::1:50'"});
  TempDir dir;
  ExpectError(Load({"--config", dir.Write("a.yaml", "metrics_listen: 9400\n")}), StatusCode::kInvalidArgument,
              {"a.yaml:1:1: metrics_listen", "expected host:port"});
  ExpectError(Load({"--config", dir.Write("b.yaml", "health_listen: [1]\n")}), StatusCode::kInvalidArgument,
              {"b.yaml:1:1: health_listen", "expected a string"});
  // The port files are flags and environment variables only, like --port-file.
  ExpectError(Load({"--config", dir.Write("c.yaml", "metrics_port_file: /tmp/x\n")}),
              StatusCode::kInvalidArgument, {"metrics_port_file: unknown key"});
}

TEST(ServerConfigTest, Help) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"-h"}, {"--max-sessions=oops", "--help"}, {"--help", "--no-such-flag"}}) {
    auto c = Load(args, {{"MQA_CONFIG", "/nonexistent.yaml"}});
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_TRUE(c->show_help);
  }
  const std::string help = ConfigHelp();
  for (const char* s : {"--listen ADDR", "MQA_LISTEN", "--port-file PATH", "MQA_PORT_FILE", "--config PATH",
                        "--metrics-listen ADDR", "MQA_METRICS_LISTEN", "metrics_listen", "0.0.0.0:9400",
                        "--metrics-port-file PATH", "MQA_METRICS_PORT_FILE", "--health-listen ADDR",
                        "MQA_HEALTH_LISTEN", "health_listen", "--health-port-file PATH", "MQA_HEALTH_PORT_FILE",
                        "MQA_CONFIG", "--max-message-bytes", "max_message_bytes", "67108864", "--drain-timeout-ms",
                        "MQA_DRAIN_TIMEOUT_MS", "--log-level", "MQA_LOG_LEVEL", "--log-format", "MQA_LOG_FORMAT",
                        "--max-sessions", "MQA_MAX_SESSIONS", "--max-queue", "MQA_MAX_QUEUE",
                        "--default-idle-ttl-ms", "MQA_DEFAULT_IDLE_TTL_MS", "--max-idle-ttl-ms",
                        "MQA_MAX_IDLE_TTL_MS", "--reap-interval-ms", "MQA_REAP_INTERVAL_MS", "--device DEVICE",
                        "MQA_DEFAULT_DEVICE", "--help, -h", "mqa-default", "models",
                        "--max-batch-tokens N", "MQA_MAX_BATCH_TOKENS", "max_batch_tokens",
                        "--max-batch-sessions N", "MQA_MAX_BATCH_SESSIONS", "max_batch_sessions",
                        "--max-queue-delay-us US", "MQA_MAX_QUEUE_DELAY_US", "max_queue_delay_us",
                        "--max-prefill-chunk N", "MQA_MAX_PREFILL_CHUNK", "max_prefill_chunk",
                        "--kv-block-size N", "MQA_KV_BLOCK_SIZE", "kv_block_size", "--kv-cache-bytes N",
                        "MQA_KV_CACHE_BYTES", "kv_cache_bytes", "--kv-gpu-memory-fraction F",
                        "MQA_KV_GPU_MEMORY_FRACTION", "kv_gpu_memory_fraction", "--kv-cpu-budget-bytes N",
                        "MQA_KV_CPU_BUDGET_BYTES", "kv_cpu_budget_bytes", "1073741824", "--devices LIST",
                        "MQA_DEVICES", "--devices all"}) {
    EXPECT_THAT(help, HasSubstr(s));
  }
}

TEST(ServerConfigTest, ProcessEnvironmentKeepsOnlyMqaVariables) {
  ::setenv("MQA_CONFIG_TEST_VAR", "a=b", 1);
  const auto env = ProcessEnvironment();
  ::unsetenv("MQA_CONFIG_TEST_VAR");
  ASSERT_EQ(env.count("MQA_CONFIG_TEST_VAR"), 1u);
  EXPECT_EQ(env.at("MQA_CONFIG_TEST_VAR"), "a=b");
  for (const auto& [k, v] : env) EXPECT_EQ(k.rfind("MQA_", 0), 0u) << k;
}

// ---- Logging ----

class LoggingTest : public ::testing::Test {
 protected:
  void SetUpSink(const std::string& level, const std::string& format) {
    out_.str("");
    ASSERT_TRUE(SetUpLogging(level, format, std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)).ok());
  }
  void TearDown() override {
    // Later tests must not write into this test's stream.
    core::SetLogSink(nullptr);
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("null"));
  }
  std::vector<std::string> Lines() const {
    std::vector<std::string> lines;
    std::istringstream in(out_.str());
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }

  std::ostringstream out_;
};

TEST_F(LoggingTest, TextFormatOneLinePerEventWithQuoting) {
  SetUpSink("info", "text");
  LogInfo("session_created", {{"session", "abc123"}, {"tokens", 4096}, {"ratio", 0.5}, {"ok", true},
                              {"note", "two words"}, {"tricky", "say \"hi\"\\ and\nbye\x01"}, {"empty", ""},
                              {"eq", "a=b"}, {"u", size_t{7}}, {"neg", -3}});
  LogDebug("hidden", {{"x", 1}});
  LogWarn("second");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  const std::string& l = lines[0];
  // 2026-11-27T21:00:00.123Z
  ASSERT_GE(l.size(), 26u);
  EXPECT_EQ(l[4], '-');
  EXPECT_EQ(l[10], 'T');
  EXPECT_EQ(l[19], '.');
  EXPECT_EQ(l[23], 'Z');
  EXPECT_EQ(l[24], ' ');
  EXPECT_EQ(l.substr(25),
            "level=info event=session_created session=abc123 tokens=4096 ratio=0.5 ok=true note=\"two words\" "
            "tricky=\"say \\\"hi\\\"\\\\ and\\nbye\\u0001\" empty=\"\" eq=\"a=b\" u=7 neg=-3");
  EXPECT_EQ(lines[1].substr(25), "level=warning event=second");
}

TEST_F(LoggingTest, KeysAreSanitisedAndReservedKeysRenamed) {
  SetUpSink("info", "text");
  LogInfo("e v", {{"level", "x"}, {"a key", 1}, {"", 2}});
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].substr(25), "level=info event=\"e v\" _level=x a_key=1 _=2");
}

TEST_F(LoggingTest, JsonFormatParses) {
  SetUpSink("debug", "json");
  LogInfo("step", {{"session", "s\"1\\\n"}, {"n", 3}, {"big", uint64_t{18446744073709551615u}}, {"x", 1.25},
                   {"ok", false}, {"bad_utf8", "a\xff" "b"}, {"utf8", "h\xc3\xa9"}, {"inf", 1.0 / 0.0},
                   {"event", "shadow"}});
  LogDebug("debugged");
  spdlog::info("plain {}", "message");
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 3u) << out_.str();
  const auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j.at("level"), "info");
  EXPECT_EQ(j.at("event"), "step");
  EXPECT_EQ(j.at("session"), "s\"1\\\n");
  EXPECT_EQ(j.at("n"), 3);
  EXPECT_EQ(j.at("big").get<uint64_t>(), 18446744073709551615u);
  EXPECT_DOUBLE_EQ(j.at("x").get<double>(), 1.25);
  EXPECT_EQ(j.at("ok"), false);
  EXPECT_EQ(j.at("bad_utf8"), "a\xef\xbf\xbd" "b");
  EXPECT_EQ(j.at("utf8"), "h\xc3\xa9");
  EXPECT_EQ(j.at("inf"), "inf");
  EXPECT_EQ(j.at("_event"), "shadow");
  const std::string ts = j.at("ts");
  EXPECT_EQ(ts.size(), 24u);
  EXPECT_EQ(ts.back(), 'Z');
  EXPECT_EQ(nlohmann::json::parse(lines[1]).at("level"), "debug");
  const auto plain = nlohmann::json::parse(lines[2]);
  EXPECT_EQ(plain.at("event"), "log");
  EXPECT_EQ(plain.at("msg"), "plain message");
}

TEST_F(LoggingTest, CoreMessagesArriveThroughTheHook) {
  SetUpSink("warn", "text");
  core::Log(core::LogLevel::kInfo, "below the level");
  core::Log(core::LogLevel::kWarning, "fallback to torch, layer 3");
  core::Log(core::LogLevel::kError, "boom");
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  EXPECT_EQ(lines[0].substr(25), "level=warning event=core msg=\"fallback to torch, layer 3\"");
  EXPECT_EQ(lines[1].substr(25), "level=error event=core msg=boom");

  SetUpSink("debug", "json");
  core::Log(core::LogLevel::kDebug, "detail");
  lines = Lines();
  ASSERT_EQ(lines.size(), 1u) << out_.str();
  const auto j = nlohmann::json::parse(lines[0]);
  EXPECT_EQ(j.at("event"), "core");
  EXPECT_EQ(j.at("level"), "debug");
  EXPECT_EQ(j.at("msg"), "detail");
}

TEST_F(LoggingTest, BadLevelOrFormatIsRejected) {
  std::ostringstream unused;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(unused);
  auto st = SetUpLogging("loud", "text", sink);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("unknown log level 'loud'"));
  st = SetUpLogging("info", "xml", sink);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("unknown log format 'xml'; expected text or json"));
}

TEST_F(LoggingTest, LogEnabledFollowsTheLevel) {
  SetUpSink("warn", "text");
  EXPECT_FALSE(LogEnabled(spdlog::level::info));
  EXPECT_TRUE(LogEnabled(spdlog::level::warn));
  SetUpSink("off", "text");
  EXPECT_FALSE(LogEnabled(spdlog::level::critical));
  LogError("nothing");
  EXPECT_TRUE(Lines().empty());
}

}  // namespace
}  // namespace mqa::server
