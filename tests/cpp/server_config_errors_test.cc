// Server configuration (server/config.h): what is refused, and how the refusal says so.
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
  ExpectError(
      Load({"--config", model}), StatusCode::kInvalidArgument,
      {model + ":5:5: models[1].hedas: unknown key; expected one of name, num_layers, dim, heads", "description"});
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
      {"models:\n  - name: " + std::string(129, 'n') + "\n",
       {"models[0].name: expected a non-empty name of at most 128"}},
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

  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--metrics-listen", "localhost:1", "--metrics-port-file", "/tmp/m",
                                              "--health-listen", "0.0.0.0:2", "--health-port-file", "/tmp/h"},
                                             {"--metrics-listen=localhost:1", "--metrics-port-file=/tmp/m",
                                              "--health-listen=0.0.0.0:2", "--health-port-file=/tmp/h"}}) {
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
  ExpectError(Load({"--config", dir.Write("c.yaml", "metrics_port_file: /tmp/x\n")}), StatusCode::kInvalidArgument,
              {"metrics_port_file: unknown key"});
}

}  // namespace
}  // namespace mqa::server
