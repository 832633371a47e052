// Server configuration (server/config.h): defaults, files, precedence, paths.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <string>
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
  const Env env = {{"MQA_CONFIG", path},        {"MQA_LISTEN", "127.0.0.1:2"},      {"MQA_MAX_SESSIONS", "2"},
                   {"MQA_LOG_LEVEL", ""},       {"MQA_PORT_FILE", "/tmp/env-port"}, {"MQA_DRAIN_TIMEOUT_MS", "5"},
                   {"MQA_UNRELATED", "ignored"}};
  auto c = Load({"--listen", "127.0.0.1:3"}, env);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->listen, "127.0.0.1:3");    // flag > env > file
  EXPECT_EQ(c->engine.max_sessions, 2u);  // env > file
  EXPECT_EQ(c->engine.max_queue, 1u);     // file only
  EXPECT_EQ(c->log_level, "warn");        // an empty env value is unset
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

  const Env env = {{"MQA_MAX_BATCH_SESSIONS", "1"},
                   {"MQA_KV_BLOCK_SIZE", "64"},
                   {"MQA_MAX_QUEUE_DELAY_US", "0"},
                   {"MQA_KV_GPU_MEMORY_FRACTION", "1"},
                   {"MQA_KV_CACHE_BYTES", ""}};
  auto c = Load({"--config", path, "--kv-block-size=8", "--kv-cache-bytes", "0"}, env);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->engine.batching.max_batch_sessions, 1);                          // env > file
  EXPECT_EQ(c->engine.batching.max_queue_delay, std::chrono::microseconds(0));  // env > file
  EXPECT_DOUBLE_EQ(c->engine.kv_cache.gpu_memory_fraction, 1.0);                // env > file
  EXPECT_EQ(c->engine.kv_cache.block_size, 8);                                  // flag > env > file
  EXPECT_EQ(c->engine.kv_cache.budget_bytes, 0);                                // flag > file; empty env unset
  EXPECT_EQ(c->engine.batching.max_batch_tokens, 1000);                         // file only
  EXPECT_EQ(c->engine.kv_cache.cpu_budget_bytes, 2048);                         // file only

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
  EXPECT_EQ(c->metrics_max_connections, 3u);                              // file only
  EXPECT_EQ(c->metrics_request_timeout, std::chrono::milliseconds(400));  // env > file
  EXPECT_EQ(c->metrics_idle_timeout, std::chrono::milliseconds(900));     // flag > env > file

  // A zero limit would refuse every scrape, a zero timeout every request.
  ExpectError(Load({"--metrics-max-connections=0"}), StatusCode::kInvalidArgument,
              {"--metrics-max-connections: expected an integer >= 1, got '0'"});
  ExpectError(Load({"--metrics-request-timeout-ms", "0"}), StatusCode::kInvalidArgument,
              {"--metrics-request-timeout-ms: expected an integer (milliseconds) between 1 and"});
  ExpectError(Load({}, {{"MQA_METRICS_IDLE_TIMEOUT_MS", "5s"}}), StatusCode::kInvalidArgument,
              {"MQA_METRICS_IDLE_TIMEOUT_MS: expected an integer (milliseconds)"});
}

TEST(ServerConfigTest, EveryFlagInBothForms) {
  const std::vector<std::string> separate = {"--listen",
                                             "localhost:7",
                                             "--port-file",
                                             "/tmp/p",
                                             "--max-message-bytes",
                                             "1000",
                                             "--drain-timeout-ms",
                                             "0",
                                             "--log-level",
                                             "error",
                                             "--log-format",
                                             "json",
                                             "--max-sessions",
                                             "3",
                                             "--max-queue",
                                             "4",
                                             "--default-idle-ttl-ms",
                                             "10",
                                             "--max-idle-ttl-ms",
                                             "20",
                                             "--reap-interval-ms",
                                             "5",
                                             "--device",
                                             "cpu",
                                             "--max-batch-tokens",
                                             "100",
                                             "--max-batch-sessions",
                                             "6",
                                             "--max-queue-delay-us",
                                             "7",
                                             "--max-prefill-chunk",
                                             "9",
                                             "--kv-block-size",
                                             "1024",
                                             "--kv-cache-bytes",
                                             "4096",
                                             "--kv-gpu-memory-fraction",
                                             "0.75",
                                             "--kv-cpu-budget-bytes",
                                             "1"};
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
  const std::string path = dir.Write("conf/config.yaml",
                                     "models:\n"
                                     "  - name: rel\n    device: cpu\n"
                                     "    weights: ../weights/w.safetensors\n"
                                     "  - name: abs\n    device: cpu\n    weights: " +
                                         abs +
                                         "\n"
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

  const std::string missing = dir.Write("conf/missing.yaml",
                                        "models:\n  - name: m\n    device: cpu\n"
                                        "    weights: nope.safetensors\n");
  ExpectError(
      Load({"--config", missing}), StatusCode::kNotFound,
      {"models[0].weights: weights file '" + (dir.path() / "conf" / "nope.safetensors").string() + "' not found"});
}

}  // namespace
}  // namespace mqa::server
