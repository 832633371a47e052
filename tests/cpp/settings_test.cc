// The table of settings (server/settings.h) and everything written from it: the flags, --help, --help-markdown
// and the settings section of docs/operations.md, and deploy/config/example.yaml. Also the refusal of malformed
// numbers from every source, checked for every numeric setting of the table.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "config.h"
#include "config_parse.h"
#include "server_config_test_util.h"
#include "settings.h"

namespace mqa::server {
namespace {

using config_test::Env;
using config_test::ExpectError;
using config_test::Load;
using config_test::TempDir;
using core::StatusCode;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string ReadSource(const std::string& relative) {
  std::ifstream in(std::string(MQA_SOURCE_DIR) + "/" + relative);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// ---- Help and actions ----

TEST(ServerConfigTest, Help) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--help"}, {"-h"}, {"--max-sessions=oops", "--help"}, {"--help", "--no-such-flag"}}) {
    auto c = Load(args, {{"MQA_CONFIG", "/nonexistent.yaml"}});
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_TRUE(c->show_help);
  }
  const std::string help = ConfigHelp();
  for (const char* s : {"--listen ADDR",
                        "MQA_LISTEN",
                        "--port-file PATH",
                        "MQA_PORT_FILE",
                        "--config PATH",
                        "--metrics-listen ADDR",
                        "MQA_METRICS_LISTEN",
                        "metrics_listen",
                        "0.0.0.0:9400",
                        "--metrics-port-file PATH",
                        "MQA_METRICS_PORT_FILE",
                        "--health-listen ADDR",
                        "MQA_HEALTH_LISTEN",
                        "health_listen",
                        "--health-port-file PATH",
                        "MQA_HEALTH_PORT_FILE",
                        "MQA_CONFIG",
                        "--max-message-bytes",
                        "max_message_bytes",
                        "67108864",
                        "--drain-timeout-ms",
                        "MQA_DRAIN_TIMEOUT_MS",
                        "--log-level",
                        "MQA_LOG_LEVEL",
                        "--log-format",
                        "MQA_LOG_FORMAT",
                        "--max-sessions",
                        "MQA_MAX_SESSIONS",
                        "--max-queue",
                        "MQA_MAX_QUEUE",
                        "--default-idle-ttl-ms",
                        "MQA_DEFAULT_IDLE_TTL_MS",
                        "--max-idle-ttl-ms",
                        "MQA_MAX_IDLE_TTL_MS",
                        "--reap-interval-ms",
                        "MQA_REAP_INTERVAL_MS",
                        "--device DEVICE",
                        "MQA_DEFAULT_DEVICE",
                        "--help, -h",
                        "mqa-default",
                        "models",
                        "--max-batch-tokens N",
                        "MQA_MAX_BATCH_TOKENS",
                        "max_batch_tokens",
                        "--max-batch-sessions N",
                        "MQA_MAX_BATCH_SESSIONS",
                        "max_batch_sessions",
                        "--max-queue-delay-us US",
                        "MQA_MAX_QUEUE_DELAY_US",
                        "max_queue_delay_us",
                        "--max-prefill-chunk N",
                        "MQA_MAX_PREFILL_CHUNK",
                        "max_prefill_chunk",
                        "--kv-block-size N",
                        "MQA_KV_BLOCK_SIZE",
                        "kv_block_size",
                        "--kv-cache-bytes N",
                        "MQA_KV_CACHE_BYTES",
                        "kv_cache_bytes",
                        "--kv-gpu-memory-fraction F",
                        "MQA_KV_GPU_MEMORY_FRACTION",
                        "kv_gpu_memory_fraction",
                        "--kv-cpu-budget-bytes N",
                        "MQA_KV_CPU_BUDGET_BYTES",
                        "kv_cpu_budget_bytes",
                        "1073741824",
                        "--devices LIST",
                        "MQA_DEVICES",
                        "--devices all"}) {
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

TEST(SettingsTest, HelpShowsEveryRowOfTheTable) {
  const std::string help = ConfigHelp();
  for (const Setting& s : SettingTable()) {
    SCOPED_TRACE(std::string(s.name));
    EXPECT_THAT(help, HasSubstr(std::string(s.flag)));
    if (!s.env.empty()) {
      EXPECT_THAT(help, HasSubstr(std::string(s.env)));
    }
    if (!s.key.empty()) {
      EXPECT_THAT(help, HasSubstr(std::string(s.key)));
    }
    EXPECT_THAT(help, HasSubstr(std::string(s.help)));
  }
}

TEST(SettingsTest, VersionAndMarkdownAreActionsLikeHelp) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"--version"}, {"--max-sessions=oops", "--version"}, {"--version", "--no-such-flag"}}) {
    auto c = Load(args, {{"MQA_CONFIG", "/nonexistent.yaml"}});
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    EXPECT_TRUE(c->show_version);
    EXPECT_FALSE(c->show_help);
  }
  auto markdown = Load({"--help-markdown"});
  ASSERT_TRUE(markdown.ok()) << markdown.status().ToString();
  EXPECT_TRUE(markdown->show_help_markdown);
  ExpectError(Load({"--version=yes"}), StatusCode::kInvalidArgument, {"--version takes no value"});
  ExpectError(Load({"--versoin"}), StatusCode::kInvalidArgument, {"did you mean --version?"});
}

// ---- The table itself ----

std::string Dashed(std::string_view name) {
  std::string out(name);
  for (char& c : out) c = c == '_' ? '-' : c;
  return out;
}

std::string Upper(std::string_view name) {
  std::string out(name);
  for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

// One name per setting: its flag, variable and key are spellings of it, with the exceptions listed here, so that
// a new row cannot get a flag that says one thing and a variable that says another.
TEST(SettingsTest, FlagVariableAndKeyAreSpellingsOfTheName) {
  const std::set<std::string> flag_and_env_only = {"config",           "port_file", "metrics_port_file",
                                                   "health_port_file", "device",    "devices"};
  std::set<std::string> names, flags, envs, keys, without_key;
  for (const Setting& s : SettingTable()) {
    SCOPED_TRACE(std::string(s.name));
    EXPECT_TRUE(names.insert(std::string(s.name)).second) << "name twice";
    EXPECT_TRUE(flags.insert(std::string(s.flag)).second) << "flag twice";
    EXPECT_EQ(s.flag, "--" + Dashed(s.name));
    EXPECT_FALSE(s.help.empty());
    if (s.type == SettingType::kAction) {
      EXPECT_TRUE(s.env.empty());
      EXPECT_TRUE(s.key.empty());
      continue;
    }
    EXPECT_FALSE(s.value_name.empty());
    EXPECT_TRUE(envs.insert(std::string(s.env)).second) << "variable twice";
    // The embedded default model's device: MQA_DEVICE would read as every model's.
    EXPECT_EQ(s.env, s.name == "device" ? "MQA_DEFAULT_DEVICE" : "MQA_" + Upper(s.name));
    if (s.key.empty()) {
      without_key.insert(std::string(s.name));
    } else {
      EXPECT_EQ(s.key, s.name);
    }
    EXPECT_EQ(s.type == SettingType::kInteger, s.apply_integer != nullptr);
    EXPECT_EQ(s.type != SettingType::kInteger, s.apply_text != nullptr);
    if (s.type == SettingType::kInteger) {
      EXPECT_LE(s.range.min, s.range.max);
    }
  }
  EXPECT_EQ(without_key, flag_and_env_only);
  for (const Setting& s : SettingTable()) {
    EXPECT_EQ(FindFlag(s.flag), &s);
    if (!s.env.empty()) {
      EXPECT_EQ(FindEnv(s.env), &s);
    }
    if (!s.key.empty()) {
      EXPECT_EQ(FindKey(s.key), &s);
    }
  }
  EXPECT_EQ(FindFlag("-h"), FindFlag("--help"));
}

// LoadConfig starts from the table's defaults; ServerConfig's initialisers (what code that builds a config itself
// gets) must say the same.
TEST(SettingsTest, TableDefaultsAreServerConfigDefaults) {
  auto loaded = Load({});
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const ServerConfig& c = *loaded;
  const ServerConfig d;
  EXPECT_EQ(c.listen, d.listen);
  EXPECT_EQ(c.port_file, d.port_file);
  EXPECT_EQ(c.metrics_listen, d.metrics_listen);
  EXPECT_EQ(c.metrics_port_file, d.metrics_port_file);
  EXPECT_EQ(c.metrics_max_connections, d.metrics_max_connections);
  EXPECT_EQ(c.metrics_request_timeout, d.metrics_request_timeout);
  EXPECT_EQ(c.metrics_idle_timeout, d.metrics_idle_timeout);
  EXPECT_EQ(c.health_listen, d.health_listen);
  EXPECT_EQ(c.health_port_file, d.health_port_file);
  EXPECT_EQ(c.max_message_bytes, d.max_message_bytes);
  EXPECT_EQ(c.stream_max_pending_steps, d.stream_max_pending_steps);
  EXPECT_EQ(c.stream_max_pending_bytes, d.stream_max_pending_bytes);
  EXPECT_EQ(c.drain_timeout, d.drain_timeout);
  EXPECT_EQ(c.log_level, d.log_level);
  EXPECT_EQ(c.log_format, d.log_format);
  EXPECT_EQ(c.engine.max_sessions, d.engine.max_sessions);
  EXPECT_EQ(c.engine.max_queue, d.engine.max_queue);
  EXPECT_EQ(c.engine.max_forward_scores, d.engine.max_forward_scores);
  EXPECT_EQ(c.engine.replay_budget_bytes, d.engine.replay_budget_bytes);
  EXPECT_EQ(c.engine.default_idle_ttl, d.engine.default_idle_ttl);
  EXPECT_EQ(c.engine.max_idle_ttl, d.engine.max_idle_ttl);
  EXPECT_EQ(c.engine.reap_interval, d.engine.reap_interval);
  EXPECT_EQ(c.engine.batching.max_batch_tokens, d.engine.batching.max_batch_tokens);
  EXPECT_EQ(c.engine.batching.max_batch_sessions, d.engine.batching.max_batch_sessions);
  EXPECT_EQ(c.engine.batching.max_queue_delay, d.engine.batching.max_queue_delay);
  EXPECT_EQ(c.engine.batching.max_prefill_chunk, d.engine.batching.max_prefill_chunk);
  EXPECT_EQ(c.engine.kv_cache.block_size, d.engine.kv_cache.block_size);
  EXPECT_EQ(c.engine.kv_cache.budget_bytes, d.engine.kv_cache.budget_bytes);
  EXPECT_DOUBLE_EQ(c.engine.kv_cache.gpu_memory_fraction, d.engine.kv_cache.gpu_memory_fraction);
  EXPECT_EQ(c.engine.kv_cache.cpu_budget_bytes, d.engine.kv_cache.cpu_budget_bytes);
}

// ---- Malformed numbers, from every source ----

// Every integer setting of the table refuses these from a flag, a variable and the file, naming where the value
// came from and what was expected: never an exception, never a half-read number.
TEST(SettingsTest, MalformedIntegersAreRefusedFromEverySource) {
  TempDir dir;
  const std::vector<std::string> bad = {
      "abc", "1e99", "99999999999999999999", "-99999999999999999999", "12abc", "0x10", "+5",
      "1.5", "--",   "9223372036854775808"};
  for (const Setting& s : SettingTable()) {
    if (s.type != SettingType::kInteger) continue;
    const std::string expected = ": expected an integer ";
    for (const std::string& v : bad) {
      SCOPED_TRACE(std::string(s.flag) + " " + v);
      ExpectError(Load({std::string(s.flag) + "=" + v}), StatusCode::kInvalidArgument,
                  {std::string(s.flag) + expected, "got '" + v + "'"});
      ExpectError(Load({}, {{std::string(s.env), v}}), StatusCode::kInvalidArgument,
                  {std::string(s.env) + expected, "got '" + v + "'"});
      if (v == "--") continue;  // not a YAML scalar on its own
      const std::string file = dir.Write("bad.yaml", std::string(s.key) + ": " + v + "\n");
      ExpectError(Load({"--config", file}), StatusCode::kInvalidArgument,
                  {file + ":1:1: " + std::string(s.key) + expected, "got '" + v + "'"});
    }
    ExpectError(Load({std::string(s.flag) + "="}), StatusCode::kInvalidArgument,
                {std::string(s.flag) + expected, "got ''"});
  }
}

TEST(SettingsTest, MalformedNumbersAreRefusedFromEverySource) {
  for (const Setting& s : SettingTable()) {
    if (s.type != SettingType::kNumber) continue;
    for (const std::string v : {"abc", "1e999", "-1e999", "nan", "inf", "0.5x", "0,5", ""}) {
      SCOPED_TRACE(std::string(s.flag) + " " + v);
      ExpectError(Load({std::string(s.flag) + "=" + v}), StatusCode::kInvalidArgument,
                  {std::string(s.flag) + ": expected a finite number, got '" + v + "'"});
      if (v.empty()) continue;  // an empty variable is unset
      ExpectError(Load({}, {{std::string(s.env), v}}), StatusCode::kInvalidArgument,
                  {std::string(s.env) + ": expected a finite number, got '" + v + "'"});
    }
  }
}

TEST(SettingsTest, TheCasesOfTheBrief) {
  ExpectError(Load({"--max-sessions", "1e99"}), StatusCode::kInvalidArgument,
              {"--max-sessions: expected an integer >= 1, got '1e99'"});
  ExpectError(Load({"--port", "abc"}), StatusCode::kInvalidArgument, {"unknown flag '--port'", "see --help"});
  ExpectError(Load({"--listen", "0.0.0.0:abc"}), StatusCode::kInvalidArgument,
              {"--listen: expected host:port (port 0..65535", "got '0.0.0.0:abc'"});
  ExpectError(Load({"--listen", "0.0.0.0:-1"}), StatusCode::kInvalidArgument, {"--listen: expected host:port"});
  ExpectError(Load({}, {{"MQA_MAX_SESSIONS", "garbage"}}), StatusCode::kInvalidArgument,
              {"MQA_MAX_SESSIONS: expected an integer >= 1, got 'garbage'"});
  ExpectError(Load({}, {{"MQA_DRAIN_TIMEOUT_MS", "30s"}}), StatusCode::kInvalidArgument,
              {"MQA_DRAIN_TIMEOUT_MS: expected an integer (milliseconds) between 0 and 31536000000 (one year), got "
               "'30s'"});
}

// ---- What is written from the table ----

constexpr char kDocPath[] = "docs/operations.md";
constexpr char kBegin[] = "<!-- settings:begin";
constexpr char kEnd[] = "<!-- settings:end -->";

// The settings section of docs/operations.md is `mqa-server --help-markdown`, byte for byte. On a difference
// the test writes the doc as it should be, for copying over.
TEST(SettingsTest, DocsSettingsSectionIsTheTable) {
  const std::string doc = ReadSource(kDocPath);
  const size_t begin = doc.find(kBegin);
  ASSERT_NE(begin, std::string::npos) << kDocPath << " has no " << kBegin << " marker";
  const size_t body = doc.find('\n', begin) + 1;
  const size_t end = doc.find(kEnd, body);
  ASSERT_NE(end, std::string::npos) << kDocPath << " has no " << kEnd << " marker";
  const std::string section = doc.substr(body, end - body);
  if (section != SettingsMarkdown()) {
    const std::filesystem::path fixed = std::filesystem::temp_directory_path() / "operations.md";
    std::ofstream(fixed) << doc.substr(0, body) << SettingsMarkdown() << doc.substr(end);
    ADD_FAILURE() << kDocPath << "'s settings section differs from the table of settings (server/settings.cc); "
                  << "the regenerated doc is at " << fixed.string() << " (or paste `mqa-server --help-markdown` "
                  << "between the markers)";
  }
}

// The hand-written tuning table and prose of docs/operations.md quote defaults: each must be the table's.
TEST(SettingsTest, DefaultsQuotedInTheDocsAreTheTable) {
  const std::string doc = ReadSource(kDocPath);
  const std::regex row(R"(\n\| `(--[a-z-]+)` \| ([^ |]+))");  // | `--flag` | default ...
  const std::regex prose(R"(`(--[a-z-]+)` \((\d+)\))");       // `--flag` (64)
  int quoted = 0;
  for (const std::regex& re : {row, prose}) {
    for (auto it = std::sregex_iterator(doc.begin(), doc.end(), re); it != std::sregex_iterator(); ++it) {
      const std::string flag = (*it)[1];
      const Setting* s = FindFlag(flag);
      ASSERT_NE(s, nullptr) << kDocPath << " quotes " << flag << ", which is no setting";
      EXPECT_EQ((*it)[2].str(), s->default_value) << kDocPath << " quotes another default of " << flag;
      ++quoted;
    }
  }
  EXPECT_GE(quoted, 10) << "the patterns no longer find the tuning table";
}

// deploy/config/example.yaml shows every top-level key of the table with its default (and no other key but
// models), so that it documents the file completely. ShippedExampleLoads checks that it loads.
TEST(SettingsTest, ExampleConfigShowsEveryKeyWithItsDefault) {
  std::istringstream example(ReadSource("deploy/config/example.yaml"));
  const std::regex top_level(R"(^([a-z_]+):\s*(.*)$)");
  std::map<std::string, std::string> shown;
  for (std::string line; std::getline(example, line);) {
    std::smatch m;
    if (!std::regex_match(line, m, top_level)) continue;
    std::string value = m[2];
    if (const size_t comment = value.find(" #"); comment != std::string::npos) value.resize(comment);
    while (!value.empty() && value.back() == ' ') value.pop_back();
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') value = value.substr(1, value.size() - 2);
    EXPECT_TRUE(shown.emplace(m[1], value).second) << m[1] << " twice";
  }
  ASSERT_EQ(shown.count("models"), 1u);
  shown.erase("models");
  std::map<std::string, std::string> table;
  for (const Setting& s : SettingTable()) {
    if (!s.key.empty()) table.emplace(std::string(s.key), std::string(s.default_value));
  }
  EXPECT_EQ(shown, table) << "deploy/config/example.yaml must show each key of the table with its default";
}

}  // namespace
}  // namespace mqa::server
