// The table of settings (settings.h says who reads it). A row gives a setting's names, its type and default, its
// help text, and how a value is checked and stored into ParsedConfig.
#include "settings.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <iterator>
#include <utility>

#include "config_parse.h"
#include "settings_values.h"

namespace mqa::server {
namespace {

using core::InvalidArgumentError;
using core::Status;

constexpr IntegerRange kCount{1, INT64_MAX, ""};
constexpr IntegerRange kMillis{1, kOneYearMs, "milliseconds"};

Setting Text(std::string_view name, std::string_view flag, std::string_view env, std::string_view key,
             std::string_view value_name, std::string_view default_value, bool default_applied, std::string_view help,
             Setting::ApplyText apply) {
  Setting s;
  s.name = name;
  s.flag = flag;
  s.env = env;
  s.key = key;
  s.type = SettingType::kText;
  s.value_name = value_name;
  s.default_value = default_value;
  s.default_applied = default_applied;
  s.help = help;
  s.apply_text = apply;
  return s;
}

Setting Number(std::string_view name, std::string_view flag, std::string_view env, std::string_view key,
               std::string_view value_name, std::string_view default_value, std::string_view help,
               Setting::ApplyText apply) {
  Setting s = Text(name, flag, env, key, value_name, default_value, true, help, apply);
  s.type = SettingType::kNumber;
  return s;
}

// Integers always start from their default: the table, not a struct's initialiser, decides it.
Setting Integer(std::string_view name, std::string_view flag, std::string_view env, std::string_view key,
                std::string_view value_name, std::string_view default_value, IntegerRange range, std::string_view help,
                Setting::ApplyInteger apply) {
  Setting s = Text(name, flag, env, key, value_name, default_value, true, help, nullptr);
  s.type = SettingType::kInteger;
  s.range = range;
  s.apply_integer = apply;
  return s;
}

Setting Action(std::string_view name, std::string_view flag, std::string_view alias, std::string_view help) {
  Setting s = Text(name, flag, "", "", "", "", false, help, nullptr);
  s.type = SettingType::kAction;
  s.alias = alias;
  return s;
}

bool FromFlag(const std::string& origin) { return origin.rfind("--", 0) == 0; }

Status ListenAddress(std::string& out, std::string_view v, const std::string& origin) {
  if (!ValidListenAddress(v)) {
    return InvalidArgumentError(origin +
                                ": expected host:port (port 0..65535, IPv6 host in brackets) or "
                                "unix:PATH, got " +
                                Quoted(v));
  }
  out = std::string(v);
  return Status::Ok();
}

constexpr std::string_view kLogLevels[] = {"trace", "debug", "info", "warn", "warning", "error", "critical", "off"};

std::vector<Setting> MakeTable() {
  using Ms = std::chrono::milliseconds;
  return {
      Text("config", "--config", "MQA_CONFIG", "", "PATH", "", false, "YAML or JSON config file",
           [](ParsedConfig& p, std::string_view v, const std::string&) {
             p.config.config_path = std::string(v);
             return Status::Ok();
           }),
      Text("listen", "--listen", "MQA_LISTEN", "listen", "ADDR", "0.0.0.0:50051", true,
           "host:port to serve on ([::]:PORT for IPv6, port 0 = any free port) or unix:PATH",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             return ListenAddress(p.config.listen, v, origin);
           }),
      Text("port_file", "--port-file", "MQA_PORT_FILE", "", "PATH", "", true,
           "write the bound port there once serving (useful with port 0)",
           [](ParsedConfig& p, std::string_view v, const std::string&) {
             p.config.port_file = std::string(v);
             return Status::Ok();
           }),
      Text("metrics_listen", "--metrics-listen", "MQA_METRICS_LISTEN", "metrics_listen", "ADDR", "0.0.0.0:9400", true,
           "host:port for the Prometheus /metrics endpoint (HTTP; port 0 = any free port); '' = no endpoint",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             // Plain HTTP over TCP only: the scraper speaks nothing else, so unix: is refused here.
             if (!v.empty() && (v.rfind("unix:", 0) == 0 || !ValidListenAddress(v))) {
               return InvalidArgumentError(origin +
                                           ": expected host:port (port 0..65535, IPv6 host in brackets) "
                                           "or '' to disable, got " +
                                           Quoted(v));
             }
             p.config.metrics_listen = std::string(v);
             return Status::Ok();
           }),
      Text("metrics_port_file", "--metrics-port-file", "MQA_METRICS_PORT_FILE", "", "PATH", "", true,
           "write the bound metrics port there once serving (useful with port 0)",
           [](ParsedConfig& p, std::string_view v, const std::string&) {
             p.config.metrics_port_file = std::string(v);
             return Status::Ok();
           }),
      Text("health_listen", "--health-listen", "MQA_HEALTH_LISTEN", "health_listen", "ADDR", "", true,
           "an extra plaintext gRPC address of the same server (host:port or unix:PATH), e.g. for Kubernetes' "
           "gRPC probes; '' = none",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             if (!v.empty() && !ValidListenAddress(v)) {
               return InvalidArgumentError(origin +
                                           ": expected host:port (port 0..65535, IPv6 host in brackets), "
                                           "unix:PATH or '' for none, got " +
                                           Quoted(v));
             }
             p.config.health_listen = std::string(v);
             return Status::Ok();
           }),
      Text("health_port_file", "--health-port-file", "MQA_HEALTH_PORT_FILE", "", "PATH", "", true,
           "write the bound --health-listen port there once serving",
           [](ParsedConfig& p, std::string_view v, const std::string&) {
             p.config.health_port_file = std::string(v);
             return Status::Ok();
           }),
      // gRPC takes the message limit as an int.
      Integer("max_message_bytes", "--max-message-bytes", "MQA_MAX_MESSAGE_BYTES", "max_message_bytes", "N", "67108864",
              {1, INT_MAX, "bytes"}, "largest gRPC message accepted or sent (64 MiB)",
              [](ParsedConfig& p, int64_t v) { p.config.max_message_bytes = static_cast<size_t>(v); }),
      Integer("metrics_max_connections", "--metrics-max-connections", "MQA_METRICS_MAX_CONNECTIONS",
              "metrics_max_connections", "N", "64", kCount,
              "HTTP connections to /metrics served at once, each on its own thread; more are answered 503 and "
              "closed",
              [](ParsedConfig& p, int64_t v) { p.config.metrics_max_connections = static_cast<size_t>(v); }),
      Integer("metrics_request_timeout_ms", "--metrics-request-timeout-ms", "MQA_METRICS_REQUEST_TIMEOUT_MS",
              "metrics_request_timeout_ms", "MS", "5000", kMillis,
              "the most time one /metrics request may take, from its first byte (or the connection's accept) to "
              "the end of its answer; slower clients are cut",
              [](ParsedConfig& p, int64_t v) { p.config.metrics_request_timeout = Ms(v); }),
      Integer("metrics_idle_timeout_ms", "--metrics-idle-timeout-ms", "MQA_METRICS_IDLE_TIMEOUT_MS",
              "metrics_idle_timeout_ms", "MS", "5000", kMillis,
              "how long a kept-alive /metrics connection may wait for its next request",
              [](ParsedConfig& p, int64_t v) { p.config.metrics_idle_timeout = Ms(v); }),
      Integer("drain_timeout_ms", "--drain-timeout-ms", "MQA_DRAIN_TIMEOUT_MS", "drain_timeout_ms", "MS", "30000",
              {0, kOneYearMs, "milliseconds"}, "on SIGTERM, the most time spent finishing in-flight work",
              [](ParsedConfig& p, int64_t v) { p.config.drain_timeout = Ms(v); }),
      Text("log_level", "--log-level", "MQA_LOG_LEVEL", "log_level", "LEVEL", "info", true,
           "trace, debug, info, warn, error, critical or off",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             if (std::find(std::begin(kLogLevels), std::end(kLogLevels), v) == std::end(kLogLevels)) {
               return InvalidArgumentError(origin +
                                           ": expected one of trace, debug, info, warn, error, critical, "
                                           "off; got " +
                                           Quoted(v));
             }
             p.config.log_level = std::string(v);
             return Status::Ok();
           }),
      Text("log_format", "--log-format", "MQA_LOG_FORMAT", "log_format", "FORMAT", "text", true,
           "text (key=value per line) or json (one object per line)",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             if (v != "text" && v != "json") {
               return InvalidArgumentError(origin + ": expected text or json, got " + Quoted(v));
             }
             p.config.log_format = std::string(v);
             return Status::Ok();
           }),
      Integer("max_sessions", "--max-sessions", "MQA_MAX_SESSIONS", "max_sessions", "N", "1024", kCount,
              "open sessions at most; more are refused with RESOURCE_EXHAUSTED",
              [](ParsedConfig& p, int64_t v) { p.config.engine.max_sessions = static_cast<size_t>(v); }),
      Integer("stream_max_pending_steps", "--stream-max-pending-steps", "MQA_STREAM_MAX_PENDING_STEPS",
              "stream_max_pending_steps", "N", "1024", kCount,
              "a StreamSteps stream stops reading requests while this many of its steps are unanswered or their "
              "answers not yet read by the client (flow control; nothing is dropped)",
              [](ParsedConfig& p, int64_t v) { p.config.stream_max_pending_steps = static_cast<size_t>(v); }),
      Integer("stream_max_pending_bytes", "--stream-max-pending-bytes", "MQA_STREAM_MAX_PENDING_BYTES",
              "stream_max_pending_bytes", "N", "33554432", kCount,
              "... or while its unread answers (and the answers of its unanswered steps) reach this many bytes "
              "(32 MiB)",
              [](ParsedConfig& p, int64_t v) { p.config.stream_max_pending_bytes = static_cast<size_t>(v); }),
      Integer("replay_budget_bytes", "--replay-budget-bytes", "MQA_REPLAY_BUDGET_BYTES", "replay_budget_bytes", "N",
              "268435456", {0, INT64_MAX, "bytes"},
              "bytes of last step answers kept, all sessions, so that a retried step (same position and input) "
              "gets its answer again instead of being applied twice (256 MiB); 0 = keep none",
              [](ParsedConfig& p, int64_t v) { p.config.engine.replay_budget_bytes = v; }),
      Integer("max_queue", "--max-queue", "MQA_MAX_QUEUE", "max_queue", "N", "4096", kCount,
              "queued requests per device at most; more are refused with RESOURCE_EXHAUSTED",
              [](ParsedConfig& p, int64_t v) { p.config.engine.max_queue = static_cast<size_t>(v); }),
      Integer("max_forward_scores", "--max-forward-scores", "MQA_MAX_FORWARD_SCORES", "max_forward_scores", "N",
              "268435456", kCount,
              "work limit of one Forward: b * H * s * s_k attention scores (2^28); more is refused with "
              "RESOURCE_EXHAUSTED before any work. Its time grows with this figure, its memory linearly in s",
              [](ParsedConfig& p, int64_t v) { p.config.engine.max_forward_scores = v; }),
      Integer("default_idle_ttl_ms", "--default-idle-ttl-ms", "MQA_DEFAULT_IDLE_TTL_MS", "default_idle_ttl_ms", "MS",
              "300000", kMillis, "idle time after which a session is closed, unless it asks for another",
              [](ParsedConfig& p, int64_t v) { p.config.engine.default_idle_ttl = Ms(v); }),
      Integer("max_idle_ttl_ms", "--max-idle-ttl-ms", "MQA_MAX_IDLE_TTL_MS", "max_idle_ttl_ms", "MS", "3600000",
              kMillis, "longest idle TTL a session may ask for (>= default_idle_ttl_ms)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.max_idle_ttl = Ms(v); }),
      Integer("reap_interval_ms", "--reap-interval-ms", "MQA_REAP_INTERVAL_MS", "reap_interval_ms", "MS", "200",
              kMillis, "how often idle sessions are looked for",
              [](ParsedConfig& p, int64_t v) { p.config.engine.reap_interval = Ms(v); }),
      Integer("max_batch_tokens", "--max-batch-tokens", "MQA_MAX_BATCH_TOKENS", "max_batch_tokens", "N", "4096", kCount,
              "new tokens per batched pass at most (decode tokens plus prefill chunk tokens)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.batching.max_batch_tokens = v; }),
      Integer("max_batch_sessions", "--max-batch-sessions", "MQA_MAX_BATCH_SESSIONS", "max_batch_sessions", "N", "256",
              kCount, "steps per batched pass at most; 1 = unbatched (one step per pass)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.batching.max_batch_sessions = v; }),
      Integer(
          "max_queue_delay_us", "--max-queue-delay-us", "MQA_MAX_QUEUE_DELAY_US", "max_queue_delay_us", "US", "0",
          {0, kMaxQueueDelayUs, "microseconds"},
          "how long a pass may wait for more steps to fill it (0 = run at once; at most one second)",
          [](ParsedConfig& p, int64_t v) { p.config.engine.batching.max_queue_delay = std::chrono::microseconds(v); }),
      Integer("max_prefill_chunk", "--max-prefill-chunk", "MQA_MAX_PREFILL_CHUNK", "max_prefill_chunk", "N", "512",
              kCount,
              "longer causal steps run in chunks of this many tokens, interleaved with other passes (non-causal "
              "steps run whole)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.batching.max_prefill_chunk = v; }),
      Integer("kv_block_size", "--kv-block-size", "MQA_KV_BLOCK_SIZE", "kv_block_size", "N", "16",
              {1, kMaxKvBlockSize, ""}, "tokens per KV-cache block (1 .. 1024)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.kv_cache.block_size = static_cast<int32_t>(v); }),
      Integer("kv_cache_bytes", "--kv-cache-bytes", "MQA_KV_CACHE_BYTES", "kv_cache_bytes", "N", "0",
              {0, INT64_MAX, "bytes"},
              "KV-cache bytes per device, all its models; 0 = --kv-gpu-memory-fraction on CUDA, "
              "--kv-cpu-budget-bytes on the CPU",
              [](ParsedConfig& p, int64_t v) { p.config.engine.kv_cache.budget_bytes = v; }),
      Number("kv_gpu_memory_fraction", "--kv-gpu-memory-fraction", "MQA_KV_GPU_MEMORY_FRACTION",
             "kv_gpu_memory_fraction", "F", "0.9",
             "with kv_cache_bytes 0: this fraction of a GPU's memory free after loading the weights, in (0, 1]",
             [](ParsedConfig& p, std::string_view v, const std::string& origin) {
               MQA_ASSIGN_OR_RETURN(double f, ParseNumber(v, origin));
               if (!(f > 0 && f <= 1)) {
                 return InvalidArgumentError(origin + ": expected a number in (0, 1], got " + Quoted(v));
               }
               p.config.engine.kv_cache.gpu_memory_fraction = f;
               return Status::Ok();
             }),
      Integer("kv_cpu_budget_bytes", "--kv-cpu-budget-bytes", "MQA_KV_CPU_BUDGET_BYTES", "kv_cpu_budget_bytes", "N",
              "1073741824", {1, INT64_MAX, "bytes"}, "with kv_cache_bytes 0: KV-cache bytes for the CPU (1 GiB)",
              [](ParsedConfig& p, int64_t v) { p.config.engine.kv_cache.cpu_budget_bytes = v; }),
      // The two device settings are decided once the machine's devices are known (ResolveConfig): their
      // defaults are descriptions, not values.
      Text("device", "--device", "MQA_DEFAULT_DEVICE", "", "DEVICE", "auto", false,
           "the default model's device: cpu, cuda[:N] or auto (cuda:0 if there is a GPU); bf16 and triton "
           "attention on CUDA, else fp32 and torch attention",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             p.default_device = std::string(v);
             p.device_origin = origin;
             p.device_flag = FromFlag(origin);
             return Status::Ok();
           }),
      Text("devices", "--devices", "MQA_DEVICES", "", "LIST", "(each model's)", false,
           "run every model on these devices, one replica each: all (every GPU here; the CPU when there is none) "
           "or a comma list (cuda:0,cuda:1); replaces the models' device and devices keys and --device; a new "
           "session goes to the device with the most free KV-cache blocks. dtype and attn_impl the file leaves "
           "out follow the first device",
           [](ParsedConfig& p, std::string_view v, const std::string& origin) {
             MQA_ASSIGN_OR_RETURN(DeviceRequest request, ParseDeviceList(v, origin));
             p.devices = std::move(request);
             p.devices_flag = FromFlag(origin);
             return Status::Ok();
           }),
      Action("help", "--help", "-h", "print this text and exit"),
      Action("help_markdown", "--help-markdown", "",
             "print the settings as a Markdown table (docs/operations.md's settings section) and exit"),
      Action("version", "--version", "", "print the version and exit"),
  };
}

}  // namespace

const std::vector<Setting>& SettingTable() {
  static const std::vector<Setting> table = MakeTable();
  return table;
}

const Setting* FindFlag(std::string_view flag) {
  for (const Setting& s : SettingTable()) {
    if (s.flag == flag || (!s.alias.empty() && s.alias == flag)) return &s;
  }
  return nullptr;
}

const Setting* FindEnv(std::string_view env) {
  if (env.empty()) return nullptr;
  for (const Setting& s : SettingTable()) {
    if (s.env == env) return &s;
  }
  return nullptr;
}

const Setting* FindKey(std::string_view key) {
  if (key.empty()) return nullptr;
  for (const Setting& s : SettingTable()) {
    if (s.key == key) return &s;
  }
  return nullptr;
}

Status ApplySetting(const Setting& setting, ParsedConfig& parsed, std::string_view value, const std::string& origin) {
  switch (setting.type) {
    case SettingType::kInteger: {
      MQA_ASSIGN_OR_RETURN(int64_t v,
                           ParseInteger(value, setting.range.min, setting.range.max, origin, setting.range.unit));
      setting.apply_integer(parsed, v);
      return Status::Ok();
    }
    case SettingType::kText:
    case SettingType::kNumber: return setting.apply_text(parsed, value, origin);
    case SettingType::kAction: break;
  }
  return InvalidArgumentError(std::string(setting.flag) + " takes no value");
}

}  // namespace mqa::server
