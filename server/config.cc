#include "config.h"
#include "name_limits.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include "mqa/core/device.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/tensor.h"

extern char** environ;  // POSIX; declared here because no standard header is required to

namespace mqa::server {
namespace {

namespace fs = std::filesystem;
using core::InvalidArgumentError;
using core::NotFoundError;
using core::Status;
using core::StatusCode;
using core::StatusOr;

constexpr int64_t kOneYearMs = int64_t{365} * 24 * 3600 * 1000;
constexpr int64_t kMaxQueueDelayUs = 1000 * 1000;  // a pass never waits longer than a second to fill
constexpr int64_t kMaxKvBlockSize = 1024;
constexpr std::string_view kDefaultModelName = "mqa-default";

// What LoadConfig gathers before it decides on the models: the default model's device only matters when the
// file defines none, which is known only after every source has been read.
struct LoadState {
  ServerConfig config;
  std::string default_device = "auto";
  std::string device_origin;  // where default_device came from ("" = the built-in "auto")
  bool device_flag = false;
  // --devices / MQA_DEVICES: every model's devices, resolved ("all" expanded, "cuda" -> "cuda:0"); empty = unset.
  std::vector<std::string> devices;
  std::string devices_origin;
  bool devices_flag = false;
  std::vector<std::string> devices_notices;  // what resolving them is worth telling the log
  std::vector<core::ModelConfig> file_models;
  std::vector<bool> file_model_dtype_set;  // per file model: dtype given (else it follows the first device)
  std::vector<std::string> file_notices;
};

enum class Kind { kString, kInteger, kNumber, kNone };

struct Setting {
  std::string_view flag;        // "--listen"
  std::string_view env;         // "MQA_LISTEN"; "" = none
  std::string_view key;         // config-file key; "" = not in the file
  std::string_view value_name;  // placeholder in --help
  Kind kind;
  std::string_view default_text;
  std::string_view help;
  Status (*apply)(LoadState& state, std::string_view value, const std::string& origin);
};

std::string Quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

// Strict decimal: no '+', no spaces, no unit suffix, so "10ms" or "5 " fail loudly instead of half-parsing.
StatusOr<int64_t> ParseInteger(std::string_view text, int64_t min, int64_t max, const std::string& origin,
                               std::string_view unit = "") {
  auto expected = [&]() {
    std::string what = "expected an integer";
    if (!unit.empty()) what += " (" + std::string(unit) + ")";
    if (max == INT64_MAX) {
      what += " >= " + std::to_string(min);
    } else {
      what += " between " + std::to_string(min) + " and " + std::to_string(max);
      if (max == kOneYearMs) what += " (one year)";
      if (max == kMaxQueueDelayUs) what += " (one second)";
    }
    return InvalidArgumentError(origin + ": " + what + ", got " + Quoted(text));
  };
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ptr != end || ec == std::errc::invalid_argument) return expected();
  if (ec == std::errc::result_out_of_range || v < min || v > max) return expected();
  return v;
}

StatusOr<uint64_t> ParseUnsigned(std::string_view text, const std::string& origin) {
  uint64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ptr != end || ec != std::errc()) {
    return InvalidArgumentError(origin + ": expected an integer between 0 and " + std::to_string(UINT64_MAX) +
                                ", got " + Quoted(text));
  }
  return v;
}

StatusOr<double> ParseNumber(std::string_view text, const std::string& origin) {
  double v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  // from_chars also reads "inf" and "nan"; no option here means anything sensible with them.
  if (text.empty() || ptr != end || ec != std::errc() || !std::isfinite(v)) {
    return InvalidArgumentError(origin + ": expected a finite number, got " + Quoted(text));
  }
  return v;
}

// host:port (IPv6 hosts in brackets), or unix:PATH. The port is checked here so a typo fails at start-up with
// the offending source named, not deep inside gRPC's bind.
bool ValidListenAddress(std::string_view a) {
  if (a.rfind("unix:", 0) == 0) return a.size() > 5;
  for (char c : a) {
    if (std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c))) return false;
  }
  const size_t colon = a.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  const std::string_view host = a.substr(0, colon);
  const std::string_view port = a.substr(colon + 1);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') return false;
  } else if (host.find(':') != std::string_view::npos) {
    return false;
  }
  if (port.empty() || port.size() > 5) return false;
  if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  return std::stoi(std::string(port)) <= 65535;
}

constexpr std::string_view kLogLevels[] = {"trace", "debug", "info", "warn", "warning", "error", "critical", "off"};

Status ApplyMillis(std::chrono::milliseconds& out, int64_t min, std::string_view v, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(int64_t ms, ParseInteger(v, min, kOneYearMs, origin, "milliseconds"));
  out = std::chrono::milliseconds(ms);
  return Status::Ok();
}

Status ApplyCount(size_t& out, std::string_view v, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(int64_t n, ParseInteger(v, 1, INT64_MAX, origin));
  out = static_cast<size_t>(n);
  return Status::Ok();
}

Status ApplyInteger(int64_t& out, int64_t min, std::string_view v, const std::string& origin,
                    std::string_view unit = "") {
  MQA_ASSIGN_OR_RETURN(out, ParseInteger(v, min, INT64_MAX, origin, unit));
  return Status::Ok();
}

// "all": every CUDA device this process sees, or the CPU when it sees none (which is worth a line in the log).
std::vector<std::string> AllDevices(const std::string& origin, std::vector<std::string>* notices) {
  std::vector<std::string> all = core::AllCudaDevices();
  if (!all.empty()) return all;
  notices->push_back(origin + ": 'all' found no CUDA device here, so it means the CPU");
  return {"cpu"};
}

// A devices list as it is read: each entry as spelled, where it came from, and normalised.
struct DeviceList {
  std::vector<std::string> devices;    // "cuda" -> "cuda:0"
  std::vector<std::string> spellings;  // as given
  std::vector<std::string> origins;

  // Adds one entry: not "all", not empty, not listed already. Whether the device exists is checked by Resolve,
  // once the whole list is known, so that a duplicate is reported as such on any machine.
  Status Add(std::string_view spelled, const std::string& origin);
  // Every device present on this machine: the normalised list, or the first failure (UNAVAILABLE for a GPU this
  // machine lacks, INVALID_ARGUMENT for a malformed name).
  StatusOr<std::vector<std::string>> Resolve() const {
    for (size_t i = 0; i < devices.size(); ++i) {
      if (Status st = core::ValidateDevice(spellings[i]); !st.ok()) {
        return Status(st.code(), origins[i] + ": " + st.message());
      }
    }
    return devices;
  }
};

Status DeviceList::Add(std::string_view spelled, const std::string& origin) {
  if (spelled == "all") {
    return InvalidArgumentError(origin + ": 'all' stands alone (every GPU here), it cannot be one of a list");
  }
  if (spelled.empty() || spelled == "auto") {
    return InvalidArgumentError(origin + ": expected cpu, cuda or cuda:N, got " + Quoted(spelled));
  }
  const std::string device = core::NormaliseDevice(spelled);
  const auto seen = std::find(devices.begin(), devices.end(), device);
  if (seen != devices.end()) {
    const std::string& first = spellings[static_cast<size_t>(seen - devices.begin())];
    return InvalidArgumentError(origin + ": " + device + " is listed twice" +
                                (first != spelled ? " (\"cuda\" means \"cuda:0\")" : "") +
                                "; a model has at most one replica per device");
  }
  devices.push_back(device);
  spellings.push_back(std::string(spelled));
  origins.push_back(origin);
  return Status::Ok();
}

// --devices / MQA_DEVICES: "all", or devices separated by commas ("cuda:0,cuda:1").
StatusOr<std::vector<std::string>> ParseDeviceList(std::string_view v, const std::string& origin,
                                                   std::vector<std::string>* notices) {
  if (v == "all") return AllDevices(origin, notices);
  DeviceList list;
  size_t start = 0;
  for (;;) {
    const size_t comma = v.find(',', start);
    const std::string_view item = v.substr(start, comma == std::string_view::npos ? comma : comma - start);
    if (item.empty()) {
      return InvalidArgumentError(origin + ": expected all or a comma-separated list of devices (cpu, cuda, "
                                  "cuda:N), got " + Quoted(v) + " (an empty entry)");
    }
    MQA_RETURN_IF_ERROR(list.Add(item, origin));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return list.Resolve();
}

// One table drives the flags, the environment, the file's top-level scalars and --help, so they cannot drift
// apart.
const std::vector<Setting>& Settings() {
  static const std::vector<Setting> settings = {
      {"--config", "MQA_CONFIG", "", "PATH", Kind::kString, "(none)", "YAML or JSON config file",
       [](LoadState& s, std::string_view v, const std::string&) {
         s.config.config_path = std::string(v);
         return Status::Ok();
       }},
      {"--listen", "MQA_LISTEN", "listen", "ADDR", Kind::kString, "0.0.0.0:50051",
       "host:port to serve on ([::]:PORT for IPv6, port 0 = any free port) or unix:PATH",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         if (!ValidListenAddress(v)) {
           return InvalidArgumentError(origin + ": expected host:port (port 0..65535, IPv6 host in brackets) or "
                                       "unix:PATH, got " + Quoted(v));
         }
         s.config.listen = std::string(v);
         return Status::Ok();
       }},
      {"--port-file", "MQA_PORT_FILE", "", "PATH", Kind::kString, "(none)",
       "write the bound port there once serving (useful with port 0)",
       [](LoadState& s, std::string_view v, const std::string&) {
         s.config.port_file = std::string(v);
         return Status::Ok();
       }},
      {"--metrics-listen", "MQA_METRICS_LISTEN", "metrics_listen", "ADDR", Kind::kString, "0.0.0.0:9400",
       "host:port for the Prometheus /metrics endpoint (HTTP; port 0 = any free port); '' = no endpoint",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         // Plain HTTP over TCP only: the scraper speaks nothing else, so unix: is refused here.
         if (!v.empty() && (v.rfind("unix:", 0) == 0 || !ValidListenAddress(v))) {
           return InvalidArgumentError(origin + ": expected host:port (port 0..65535, IPv6 host in brackets) or "
                                       "'' to disable, got " + Quoted(v));
         }
         s.config.metrics_listen = std::string(v);
         return Status::Ok();
       }},
      {"--metrics-port-file", "MQA_METRICS_PORT_FILE", "", "PATH", Kind::kString, "(none)",
       "write the bound metrics port there once serving (useful with port 0)",
       [](LoadState& s, std::string_view v, const std::string&) {
         s.config.metrics_port_file = std::string(v);
         return Status::Ok();
       }},
      {"--health-listen", "MQA_HEALTH_LISTEN", "health_listen", "ADDR", Kind::kString, "(none)",
       "an extra plaintext gRPC address of the same server (host:port or unix:PATH), e.g. for Kubernetes' "
       "gRPC probes; '' = none",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         if (!v.empty() && !ValidListenAddress(v)) {
           return InvalidArgumentError(origin + ": expected host:port (port 0..65535, IPv6 host in brackets), "
                                       "unix:PATH or '' for none, got " + Quoted(v));
         }
         s.config.health_listen = std::string(v);
         return Status::Ok();
       }},
      {"--health-port-file", "MQA_HEALTH_PORT_FILE", "", "PATH", Kind::kString, "(none)",
       "write the bound --health-listen port there once serving",
       [](LoadState& s, std::string_view v, const std::string&) {
         s.config.health_port_file = std::string(v);
         return Status::Ok();
       }},
      {"--max-message-bytes", "MQA_MAX_MESSAGE_BYTES", "max_message_bytes", "N", Kind::kInteger, "67108864",
       "largest gRPC message accepted or sent (64 MiB)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         // gRPC takes the limit as an int.
         MQA_ASSIGN_OR_RETURN(int64_t n, ParseInteger(v, 1, INT_MAX, origin, "bytes"));
         s.config.max_message_bytes = static_cast<size_t>(n);
         return Status::Ok();
       }},
      {"--metrics-max-connections", "MQA_METRICS_MAX_CONNECTIONS", "metrics_max_connections", "N",
       Kind::kInteger, "64",
       "HTTP connections to /metrics served at once, each on its own thread; more are answered 503 and closed",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyCount(s.config.metrics_max_connections, v, origin);
       }},
      {"--metrics-request-timeout-ms", "MQA_METRICS_REQUEST_TIMEOUT_MS", "metrics_request_timeout_ms", "MS",
       Kind::kInteger, "5000",
       "the most time one /metrics request may take, from its first byte (or the connection's accept) to the end "
       "of its answer; slower clients are cut",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.metrics_request_timeout, 1, v, origin);
       }},
      {"--metrics-idle-timeout-ms", "MQA_METRICS_IDLE_TIMEOUT_MS", "metrics_idle_timeout_ms", "MS", Kind::kInteger,
       "5000", "how long a kept-alive /metrics connection may wait for its next request",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.metrics_idle_timeout, 1, v, origin);
       }},
      {"--drain-timeout-ms", "MQA_DRAIN_TIMEOUT_MS", "drain_timeout_ms", "MS", Kind::kInteger, "30000",
       "on SIGTERM, the most time spent finishing in-flight work",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.drain_timeout, 0, v, origin);
       }},
      {"--log-level", "MQA_LOG_LEVEL", "log_level", "LEVEL", Kind::kString, "info",
       "trace, debug, info, warn, error, critical or off",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         if (std::find(std::begin(kLogLevels), std::end(kLogLevels), v) == std::end(kLogLevels)) {
           return InvalidArgumentError(origin + ": expected one of trace, debug, info, warn, error, critical, off; "
                                       "got " + Quoted(v));
         }
         s.config.log_level = std::string(v);
         return Status::Ok();
       }},
      {"--log-format", "MQA_LOG_FORMAT", "log_format", "FORMAT", Kind::kString, "text",
       "text (key=value per line) or json (one object per line)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         if (v != "text" && v != "json") {
           return InvalidArgumentError(origin + ": expected text or json, got " + Quoted(v));
         }
         s.config.log_format = std::string(v);
         return Status::Ok();
       }},
      {"--max-sessions", "MQA_MAX_SESSIONS", "max_sessions", "N", Kind::kInteger, "1024",
       "open sessions at most; more are refused with RESOURCE_EXHAUSTED",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyCount(s.config.engine.max_sessions, v, origin);
       }},
      {"--stream-max-pending-steps", "MQA_STREAM_MAX_PENDING_STEPS", "stream_max_pending_steps", "N",
       Kind::kInteger, "1024",
       "a StreamSteps stream stops reading requests while this many of its steps are unanswered or their answers "
       "not yet read by the client (flow control; nothing is dropped)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyCount(s.config.stream_max_pending_steps, v, origin);
       }},
      {"--stream-max-pending-bytes", "MQA_STREAM_MAX_PENDING_BYTES", "stream_max_pending_bytes", "N",
       Kind::kInteger, "33554432",
       "... or while its unread answers (and the answers of its unanswered steps) reach this many bytes (32 MiB)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyCount(s.config.stream_max_pending_bytes, v, origin);
       }},
      {"--replay-budget-bytes", "MQA_REPLAY_BUDGET_BYTES", "replay_budget_bytes", "N", Kind::kInteger, "268435456",
       "bytes of last step answers kept, all sessions, so that a retried step (same position and input) gets its "
       "answer again instead of being applied twice (256 MiB); 0 = keep none",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.replay_budget_bytes, 0, v, origin, "bytes");
       }},
      {"--max-queue", "MQA_MAX_QUEUE", "max_queue", "N", Kind::kInteger, "4096",
       "queued requests per device at most; more are refused with RESOURCE_EXHAUSTED",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyCount(s.config.engine.max_queue, v, origin);
       }},
      {"--max-forward-scores", "MQA_MAX_FORWARD_SCORES", "max_forward_scores", "N", Kind::kInteger, "268435456",
       "work limit of one Forward: b * H * s * s_k attention scores (2^28); more is refused with RESOURCE_EXHAUSTED "
       "before any work. Its time grows with this figure, its memory linearly in s",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.max_forward_scores, 1, v, origin);
       }},
      {"--default-idle-ttl-ms", "MQA_DEFAULT_IDLE_TTL_MS", "default_idle_ttl_ms", "MS", Kind::kInteger, "300000",
       "idle time after which a session is closed, unless it asks for another",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.engine.default_idle_ttl, 1, v, origin);
       }},
      {"--max-idle-ttl-ms", "MQA_MAX_IDLE_TTL_MS", "max_idle_ttl_ms", "MS", Kind::kInteger, "3600000",
       "longest idle TTL a session may ask for",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.engine.max_idle_ttl, 1, v, origin);
       }},
      {"--reap-interval-ms", "MQA_REAP_INTERVAL_MS", "reap_interval_ms", "MS", Kind::kInteger, "200",
       "how often idle sessions are looked for",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyMillis(s.config.engine.reap_interval, 1, v, origin);
       }},
      {"--max-batch-tokens", "MQA_MAX_BATCH_TOKENS", "max_batch_tokens", "N", Kind::kInteger, "4096",
       "new tokens per batched pass at most (decode tokens plus prefill chunk tokens)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.batching.max_batch_tokens, 1, v, origin);
       }},
      {"--max-batch-sessions", "MQA_MAX_BATCH_SESSIONS", "max_batch_sessions", "N", Kind::kInteger, "256",
       "steps per batched pass at most; 1 = unbatched (one step per pass)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.batching.max_batch_sessions, 1, v, origin);
       }},
      {"--max-queue-delay-us", "MQA_MAX_QUEUE_DELAY_US", "max_queue_delay_us", "US", Kind::kInteger, "0",
       "how long a pass may wait for more steps to fill it (0 = run at once; at most one second)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         MQA_ASSIGN_OR_RETURN(int64_t us, ParseInteger(v, 0, kMaxQueueDelayUs, origin, "microseconds"));
         s.config.engine.batching.max_queue_delay = std::chrono::microseconds(us);
         return Status::Ok();
       }},
      {"--max-prefill-chunk", "MQA_MAX_PREFILL_CHUNK", "max_prefill_chunk", "N", Kind::kInteger, "512",
       "longer causal steps run in chunks of this many tokens, interleaved with other passes (non-causal steps "
       "run whole)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.batching.max_prefill_chunk, 1, v, origin);
       }},
      {"--kv-block-size", "MQA_KV_BLOCK_SIZE", "kv_block_size", "N", Kind::kInteger, "16",
       "tokens per KV-cache block (1 .. 1024)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         MQA_ASSIGN_OR_RETURN(int64_t n, ParseInteger(v, 1, kMaxKvBlockSize, origin));
         s.config.engine.kv_cache.block_size = static_cast<int32_t>(n);
         return Status::Ok();
       }},
      {"--kv-cache-bytes", "MQA_KV_CACHE_BYTES", "kv_cache_bytes", "N", Kind::kInteger, "0",
       "KV-cache bytes per device, all its models; 0 = --kv-gpu-memory-fraction on CUDA, "
       "--kv-cpu-budget-bytes on the CPU",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.kv_cache.budget_bytes, 0, v, origin, "bytes");
       }},
      {"--kv-gpu-memory-fraction", "MQA_KV_GPU_MEMORY_FRACTION", "kv_gpu_memory_fraction", "F", Kind::kNumber,
       "0.9", "with kv_cache_bytes 0: this fraction of a GPU's memory free after loading the weights, in (0, 1]",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         MQA_ASSIGN_OR_RETURN(double f, ParseNumber(v, origin));
         if (!(f > 0 && f <= 1)) {
           return InvalidArgumentError(origin + ": expected a number in (0, 1], got " + Quoted(v));
         }
         s.config.engine.kv_cache.gpu_memory_fraction = f;
         return Status::Ok();
       }},
      {"--kv-cpu-budget-bytes", "MQA_KV_CPU_BUDGET_BYTES", "kv_cpu_budget_bytes", "N", Kind::kInteger,
       "1073741824", "with kv_cache_bytes 0: KV-cache bytes for the CPU (1 GiB)",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         return ApplyInteger(s.config.engine.kv_cache.cpu_budget_bytes, 1, v, origin, "bytes");
       }},
      {"--device", "MQA_DEFAULT_DEVICE", "", "DEVICE", Kind::kString, "auto",
       "the default model's device: cpu, cuda[:N] or auto (cuda:0 if there is a GPU); bf16 on CUDA, else fp32",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         s.default_device = std::string(v);
         s.device_origin = origin;
         s.device_flag = origin.rfind("--", 0) == 0;
         return Status::Ok();
       }},
      {"--devices", "MQA_DEVICES", "", "LIST", Kind::kString, "(each model's)",
       "run every model on these devices, one replica each: all (every GPU here; the CPU when there is none) or "
       "a comma list (cuda:0,cuda:1); replaces the models' device and devices keys and --device; a new session "
       "goes to the device with the most free KV-cache blocks",
       [](LoadState& s, std::string_view v, const std::string& origin) {
         std::vector<std::string> notices;
         MQA_ASSIGN_OR_RETURN(s.devices, ParseDeviceList(v, origin, &notices));
         s.devices_origin = origin;
         s.devices_flag = origin.rfind("--", 0) == 0;
         s.devices_notices = std::move(notices);
         return Status::Ok();
       }},
      {"--help", "", "", "", Kind::kNone, "", "print this text and exit", nullptr},
  };
  return settings;
}

const Setting* FindFlag(std::string_view flag) {
  for (const Setting& s : Settings()) {
    if (s.flag == flag) return &s;
  }
  return nullptr;
}

const Setting* FindKey(std::string_view key) {
  if (key.empty()) return nullptr;
  for (const Setting& s : Settings()) {
    if (s.key == key) return &s;
  }
  return nullptr;
}

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

Status UnknownFlag(std::string_view flag) {
  std::string msg = "unknown flag " + Quoted(flag);
  const Setting* best = nullptr;
  size_t best_distance = 3;  // only suggest near misses; a far "suggestion" is noise
  for (const Setting& s : Settings()) {
    const size_t d = EditDistance(flag, s.flag);
    if (d < best_distance) {
      best = &s;
      best_distance = d;
    }
  }
  if (best != nullptr) msg += " (did you mean " + std::string(best->flag) + "?)";
  return InvalidArgumentError(msg + "; see --help");
}

// ---- The config file ----

std::string Where(const std::string& file, const YAML::Mark& mark) {
  if (mark.is_null()) return file + ": ";
  return file + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1) + ": ";
}

std::string Describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    case YAML::NodeType::Scalar:
      return node.Tag() == "!" ? "the quoted string \"" + node.Scalar() + "\"" : Quoted(node.Scalar());
    case YAML::NodeType::Undefined: break;
  }
  return "nothing";
}

bool IsQuoted(const YAML::Node& node) { return node.IsScalar() && node.Tag() == "!"; }

// Every typed read of a file value goes through these, so a wrong type always says what was expected.
StatusOr<std::string> FileString(const YAML::Node& node, const std::string& origin) {
  if (!node.IsScalar()) return InvalidArgumentError(origin + ": expected a string, got " + Describe(node));
  return node.Scalar();
}

StatusOr<std::string> FileNumberText(const YAML::Node& node, const std::string& origin, std::string_view what) {
  // A quoted number is a string in YAML and JSON alike; accepting it would hide a mistake in the file.
  if (!node.IsScalar() || IsQuoted(node)) {
    return InvalidArgumentError(origin + ": expected " + std::string(what) + ", got " + Describe(node));
  }
  return node.Scalar();
}

StatusOr<int64_t> FileInteger(const YAML::Node& node, int64_t min, int64_t max, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "an integer"));
  return ParseInteger(text, min, max, origin);
}

StatusOr<double> FileNumber(const YAML::Node& node, const std::string& origin) {
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "a number"));
  return ParseNumber(text, origin);
}

StatusOr<std::optional<double>> FileOptionalNumber(const YAML::Node& node, const std::string& origin) {
  if (node.IsNull()) return std::optional<double>();
  MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(node, origin, "a number or null"));
  MQA_ASSIGN_OR_RETURN(double v, ParseNumber(text, origin));
  return std::optional<double>(v);
}

StatusOr<bool> FileBool(const YAML::Node& node, const std::string& origin) {
  if (node.IsScalar() && !IsQuoted(node)) {
    // YAML 1.2's core schema; YAML 1.1's yes/no/on/off are refused because JSON and newer parsers disagree.
    const std::string& s = node.Scalar();
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
  }
  return InvalidArgumentError(origin + ": expected true or false, got " + Describe(node));
}

Status WithPrefix(const Status& status, const std::string& prefix) {
  if (status.ok()) return status;
  return Status(status.code(), prefix + status.message());
}

template <typename T>
StatusOr<T> WithPrefix(StatusOr<T> result, const std::string& prefix) {
  if (result.ok()) return result;
  return WithPrefix(result.status(), prefix);
}

std::string Join(const std::vector<std::string_view>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    out += items[i];
  }
  return out;
}

const std::vector<std::string_view>& ModelKeys() {
  static const std::vector<std::string_view> keys = {
      "name",   "num_layers", "dim",    "heads",   "attn_impl", "clip_qkv", "qk_ln",
      "softmax_scale", "attn_pdrop", "norm_type", "fc_type", "device", "devices", "dtype", "seed",
      "weights", "max_tokens_per_session", "description"};
  return keys;
}

std::vector<std::string_view> TopLevelKeys() {
  std::vector<std::string_view> keys;
  for (const Setting& s : Settings()) {
    if (!s.key.empty()) keys.push_back(s.key);
  }
  keys.push_back("models");
  return keys;
}

bool IsCudaDevice(std::string_view device) { return device.rfind("cuda", 0) == 0; }

std::string ResolveDevice(std::string_view device) {
  if (device.empty() || device == "auto") return core::CudaAvailable() ? "cuda:0" : "cpu";
  return std::string(device);
}

// Reads one entry of `models`. Field errors name the field's path ("models[1].heads"); whole-model errors
// (ValidateOptions) name the model ("models[1] (mqa-7b): ").
// A model's devices key: the string all, or a list of device strings.
StatusOr<std::vector<std::string>> FileDevices(const YAML::Node& node, const std::string& origin,
                                               const std::string& file, const std::string& path,
                                               std::vector<std::string>* notices) {
  if (node.IsScalar() && node.Scalar() == "all") return AllDevices(origin, notices);
  if (!node.IsSequence() || node.size() == 0) {
    return InvalidArgumentError(origin + ": expected all or a non-empty list of devices ([cuda:0, cuda:1]; "
                                "device: takes a single one), got " + Describe(node));
  }
  DeviceList list;
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node d = node[i];
    const std::string at = Where(file, d.Mark()) + path + ".devices[" + std::to_string(i) + "]";
    MQA_ASSIGN_OR_RETURN(std::string spelled, FileString(d, at));
    MQA_RETURN_IF_ERROR(list.Add(spelled, at));
  }
  return list.Resolve();
}

StatusOr<core::ModelConfig> ParseModel(const YAML::Node& node, size_t index, const std::string& file,
                                       const fs::path& base_dir, bool* dtype_set,
                                       std::vector<std::string>* notices) {
  const std::string path = "models[" + std::to_string(index) + "]";
  if (!node.IsMap()) {
    return InvalidArgumentError(Where(file, node.Mark()) + path + ": expected a map describing a model, got " +
                                Describe(node));
  }
  core::ModelConfig m;
  m.options.device = "";  // "" until set: resolved to auto below
  bool have_name = false;
  bool have_dtype = false;
  std::string device_key;  // origin of the device or devices key, whichever came first
  std::set<std::string> seen;
  for (auto it = node.begin(); it != node.end(); ++it) {
    const YAML::Node k = it->first;  // copies: it-> returns a proxy that dies with the statement
    const YAML::Node v = it->second;
    if (!k.IsScalar()) {
      return InvalidArgumentError(Where(file, k.Mark()) + path + ": keys must be strings, got " + Describe(k));
    }
    const std::string key = k.Scalar();
    const std::string origin = Where(file, k.Mark()) + path + "." + key;
    if (!seen.insert(key).second) return InvalidArgumentError(origin + ": duplicate key");
    core::MqaOptions& o = m.options;
    if (key == "name") {
      MQA_ASSIGN_OR_RETURN(m.name, FileString(v, origin));
      // Requests naming a model are refused past kMaxModelNameBytes (request_checks.h), so a longer name could
      // never be reached.
      const bool bad = m.name.empty() || m.name.size() > kMaxModelNameBytes ||
                       std::any_of(m.name.begin(), m.name.end(), [](char c) {
                         return std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c));
                       });
      if (bad) {
        return InvalidArgumentError(origin + ": expected a non-empty name of at most " +
                                    std::to_string(kMaxModelNameBytes) + " bytes without whitespace, got " +
                                    Quoted(m.name.substr(0, 160)));
      }
      have_name = true;
    } else if (key == "num_layers") {
      MQA_ASSIGN_OR_RETURN(int64_t n, FileInteger(v, 1, INT_MAX, origin));
      m.num_layers = static_cast<int>(n);
    } else if (key == "dim") {
      MQA_ASSIGN_OR_RETURN(o.dim, FileInteger(v, INT64_MIN, INT64_MAX, origin));
    } else if (key == "heads") {
      MQA_ASSIGN_OR_RETURN(o.heads, FileInteger(v, INT64_MIN, INT64_MAX, origin));
    } else if (key == "attn_impl") {
      MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
      MQA_ASSIGN_OR_RETURN(o.attn_impl, WithPrefix(core::ParseAttnImpl(s), origin + ": "));
    } else if (key == "clip_qkv") {
      MQA_ASSIGN_OR_RETURN(o.clip_qkv, FileOptionalNumber(v, origin));
    } else if (key == "qk_ln") {
      MQA_ASSIGN_OR_RETURN(o.qk_ln, FileBool(v, origin));
    } else if (key == "softmax_scale") {
      MQA_ASSIGN_OR_RETURN(o.softmax_scale, FileOptionalNumber(v, origin));
    } else if (key == "attn_pdrop") {
      MQA_ASSIGN_OR_RETURN(o.attn_pdrop, FileNumber(v, origin));
    } else if (key == "norm_type") {
      MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
      MQA_ASSIGN_OR_RETURN(o.norm_type, WithPrefix(core::ParseNormType(s), origin + ": "));
    } else if (key == "fc_type") {
      MQA_ASSIGN_OR_RETURN(o.fc_type, FileString(v, origin));
    } else if (key == "device" || key == "devices") {
      if (!device_key.empty()) {
        return InvalidArgumentError(origin + ": give device (one) or devices (several), not both (" + device_key +
                                    " is set too)");
      }
      device_key = path + "." + key;
      if (key == "device") {
        MQA_ASSIGN_OR_RETURN(o.device, FileString(v, origin));
        if (o.device.empty()) return InvalidArgumentError(origin + ": expected cpu, cuda, cuda:N or auto, got ''");
      } else {
        MQA_ASSIGN_OR_RETURN(m.devices, FileDevices(v, origin, file, path, notices));
      }
    } else if (key == "dtype") {
      MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
      MQA_ASSIGN_OR_RETURN(o.dtype, WithPrefix(core::ParseDType(s), origin + ": "));
      have_dtype = true;
    } else if (key == "seed") {
      MQA_ASSIGN_OR_RETURN(std::string text, FileNumberText(v, origin, "an integer"));
      MQA_ASSIGN_OR_RETURN(o.seed, ParseUnsigned(text, origin));
    } else if (key == "weights") {
      if (v.IsNull()) continue;
      MQA_ASSIGN_OR_RETURN(std::string s, FileString(v, origin));
      if (s.empty()) continue;
      fs::path p(s);
      // Relative to the file, not the working directory, so a config and its weights can move together.
      if (p.is_relative()) p = base_dir / p;
      p = p.lexically_normal();
      std::error_code ec;
      const fs::file_status st = fs::status(p, ec);
      if (!fs::exists(st)) return NotFoundError(origin + ": weights file '" + p.string() + "' not found");
      if (fs::is_directory(st)) {
        return InvalidArgumentError(origin + ": weights '" + p.string() + "' is a directory, expected a file");
      }
      m.weights_path = p.string();
    } else if (key == "max_tokens_per_session") {
      MQA_ASSIGN_OR_RETURN(m.max_tokens_per_session, FileInteger(v, 1, INT64_MAX, origin));
    } else if (key == "description") {
      if (!v.IsNull()) {
        MQA_ASSIGN_OR_RETURN(m.description, FileString(v, origin));
      }
    } else {
      return InvalidArgumentError(origin + ": unknown key; expected one of " + Join(ModelKeys()));
    }
  }
  if (!have_name) return InvalidArgumentError(Where(file, node.Mark()) + path + ": missing required key 'name'");
  m.options.device = m.devices.empty() ? ResolveDevice(m.options.device) : m.devices[0];
  *dtype_set = have_dtype;
  if (!have_dtype) m.options.dtype = IsCudaDevice(m.options.device) ? core::DType::kBFloat16 : core::DType::kFloat32;
  if (!seen.count("attn_impl")) {
    m.options.attn_impl = IsCudaDevice(m.options.device) ? core::AttnImpl::kTriton : core::AttnImpl::kTorch;
  }
  MQA_RETURN_IF_ERROR(
      WithPrefix(core::ValidateOptions(m.options), Where(file, node.Mark()) + path + " (" + m.name + "): "));
  return m;
}

Status ParseModels(const YAML::Node& node, const std::string& origin, const std::string& file,
                   const fs::path& base_dir, LoadState& state) {
  if (node.IsNull()) return Status::Ok();
  if (!node.IsSequence()) {
    return InvalidArgumentError(origin + ": expected a list of models, got " + Describe(node));
  }
  std::map<std::string, size_t> names;
  for (size_t i = 0; i < node.size(); ++i) {
    bool dtype_set = false;
    MQA_ASSIGN_OR_RETURN(core::ModelConfig m,
                         ParseModel(node[i], i, file, base_dir, &dtype_set, &state.file_notices));
    auto [it, inserted] = names.emplace(m.name, i);
    if (!inserted) {
      return InvalidArgumentError(Where(file, node[i].Mark()) + "models[" + std::to_string(i) +
                                  "].name: duplicate model name " + Quoted(m.name) + " (models[" +
                                  std::to_string(it->second) + "] has it too)");
    }
    state.file_models.push_back(std::move(m));
    state.file_model_dtype_set.push_back(dtype_set);
  }
  return Status::Ok();
}

Status ApplyFileRoot(const YAML::Node& root, const std::string& file, const fs::path& base_dir, LoadState& state) {
  if (root.IsNull()) return Status::Ok();  // an empty file: all defaults
  if (!root.IsMap()) {
    return InvalidArgumentError(Where(file, root.Mark()) + "expected a map of settings at the top level, got " +
                                Describe(root));
  }
  std::set<std::string> seen;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const YAML::Node k = it->first;  // copies: it-> returns a proxy that dies with the statement
    const YAML::Node v = it->second;
    if (!k.IsScalar()) return InvalidArgumentError(Where(file, k.Mark()) + "keys must be strings, got " + Describe(k));
    const std::string key = k.Scalar();
    const std::string origin = Where(file, k.Mark()) + key;
    if (!seen.insert(key).second) return InvalidArgumentError(origin + ": duplicate key");
    if (key == "models") {
      MQA_RETURN_IF_ERROR(ParseModels(v, origin, file, base_dir, state));
      continue;
    }
    const Setting* s = FindKey(key);
    if (s == nullptr) return InvalidArgumentError(origin + ": unknown key; expected one of " + Join(TopLevelKeys()));
    std::string text;
    if (s->kind == Kind::kInteger) {
      MQA_ASSIGN_OR_RETURN(text, FileNumberText(v, origin, "an integer"));
    } else if (s->kind == Kind::kNumber) {
      MQA_ASSIGN_OR_RETURN(text, FileNumberText(v, origin, "a number"));
    } else {
      MQA_ASSIGN_OR_RETURN(text, FileString(v, origin));
    }
    MQA_RETURN_IF_ERROR(s->apply(state, text, origin));
  }
  return Status::Ok();
}

Status LoadFile(const std::string& file, LoadState& state) {
  std::error_code ec;
  const fs::file_status st = fs::status(file, ec);
  if (!fs::exists(st)) return NotFoundError("config file '" + file + "' not found");
  if (fs::is_directory(st)) return InvalidArgumentError("config file '" + file + "' is a directory");
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    return Status(StatusCode::kPermissionDenied,
                  "cannot read config file '" + file + "': " + std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  const fs::path base_dir = fs::absolute(fs::path(file), ec).parent_path();
  try {
    YAML::Node root;
    try {
      root = YAML::Load(text.str());
    } catch (const YAML::ParserException& e) {
      return InvalidArgumentError(Where(file, e.mark) + "not valid YAML or JSON: " + e.msg);
    }
    state.config.config_path = file;
    return ApplyFileRoot(root, file, base_dir, state);
  } catch (const YAML::Exception& e) {
    // yaml-cpp reports some malformed documents only when the tree is walked.
    return InvalidArgumentError(Where(file, e.mark) + e.msg);
  } catch (const std::exception& e) {
    return core::InternalError("reading config file '" + file + "': " + e.what());
  }
}

struct FlagValue {
  const Setting* setting;
  std::string value;
};

}  // namespace

core::ModelConfig DefaultModel() { return DefaultModel("auto"); }

core::ModelConfig DefaultModel(std::string_view device) {
  core::ModelConfig m;
  m.name = std::string(kDefaultModelName);
  m.num_layers = 2;
  m.options.dim = 512;
  m.options.heads = 8;
  m.options.seed = 0;
  m.options.device = ResolveDevice(device);
  // The fastest correct path: the project's fused kernels on a GPU, the torch math on the CPU.
  m.options.attn_impl = IsCudaDevice(m.options.device) ? core::AttnImpl::kTriton : core::AttnImpl::kTorch;
  m.options.dtype = IsCudaDevice(m.options.device) ? core::DType::kBFloat16 : core::DType::kFloat32;
  m.max_tokens_per_session = 4096;
  m.description = "embedded default model: random weights from seed 0";
  return m;
}

core::StatusOr<ServerConfig> LoadConfig(int argc, const char* const* argv,
                                        const std::map<std::string, std::string>& env) {
  // Flags are read first (the config path may come from them) but applied last, so they win. Reading goes on
  // past an error so that --help anywhere still just shows the help.
  std::vector<FlagValue> flags;
  Status flag_error;
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i] != nullptr ? argv[i] : "";
    if (arg == "--help" || arg == "-h") {
      help = true;
      continue;
    }
    if (!flag_error.ok()) continue;
    if (arg.size() < 3 || arg.substr(0, 2) != "--") {
      flag_error = InvalidArgumentError("unexpected argument " + Quoted(arg) + "; every setting is a --flag (see --help)");
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string_view name = arg.substr(0, eq);
    const Setting* s = FindFlag(name);
    if (s == nullptr) {
      flag_error = UnknownFlag(name);
      continue;
    }
    if (s->kind == Kind::kNone) {
      flag_error = InvalidArgumentError(std::string(name) + " takes no value");
      continue;
    }
    if (eq != std::string_view::npos) {
      flags.push_back({s, std::string(arg.substr(eq + 1))});
    } else if (i + 1 < argc && argv[i + 1] != nullptr && std::string_view(argv[i + 1]).rfind("--", 0) != 0) {
      flags.push_back({s, argv[++i]});
    } else {
      flag_error = InvalidArgumentError(std::string(name) + ": expected a value (" + std::string(name) + " " +
                                        std::string(s->value_name) + " or " + std::string(name) + "=" +
                                        std::string(s->value_name) + ")");
    }
  }
  if (help) {
    ServerConfig config;
    config.show_help = true;
    return config;
  }
  MQA_RETURN_IF_ERROR(flag_error);

  LoadState state;
  std::string config_path;
  if (auto it = env.find("MQA_CONFIG"); it != env.end()) config_path = it->second;
  for (const FlagValue& f : flags) {
    if (f.setting->flag == "--config") config_path = f.value;
  }
  if (!config_path.empty()) MQA_RETURN_IF_ERROR(LoadFile(config_path, state));

  for (const Setting& s : Settings()) {
    if (s.env.empty() || s.env == "MQA_CONFIG") continue;
    auto it = env.find(std::string(s.env));
    if (it == env.end() || it->second.empty()) continue;
    MQA_RETURN_IF_ERROR(s.apply(state, it->second, std::string(s.env)));
  }
  for (const FlagValue& f : flags) {
    if (f.setting->flag == "--config") continue;
    MQA_RETURN_IF_ERROR(f.setting->apply(state, f.value, std::string(f.setting->flag)));
  }

  ServerConfig config = std::move(state.config);
  config.config_path = config_path;
  config.notices = std::move(state.file_notices);
  const bool use_devices = !state.devices.empty();
  if (state.file_models.empty()) {
    // --device and --devices both name the default model's devices: the later source wins (flags over the
    // environment); two of the same source contradict each other.
    const bool have_device = !state.device_origin.empty();
    if (use_devices && have_device && state.device_flag == state.devices_flag) {
      return InvalidArgumentError(state.device_origin + " and " + state.devices_origin +
                                  " both set the default model's device; give one of them");
    }
    const bool by_devices = use_devices && !(have_device && state.device_flag);
    core::ModelConfig m = DefaultModel(by_devices ? state.devices[0] : state.default_device);
    std::string where = state.device_origin.empty() ? "" : state.device_origin + ": ";
    if (by_devices) {
      m.devices = state.devices;
      where = state.devices_origin + ": ";
      config.notices.insert(config.notices.end(), state.devices_notices.begin(), state.devices_notices.end());
    }
    MQA_RETURN_IF_ERROR(
        WithPrefix(core::ValidateOptions(m.options), where + "default model (" + m.name + "): "));
    config.engine.models = {std::move(m)};
    config.default_model = true;
  } else {
    if (state.device_flag) {
      return InvalidArgumentError("--device sets the embedded default model's device, but " + config_path +
                                  " defines models; set each model's device in the file instead (or every "
                                  "model's with --devices)");
    }
    if (use_devices) {
      // Higher precedence than the file: every model gets these devices, and a dtype the file left to the
      // default follows the first of them.
      for (size_t i = 0; i < state.file_models.size(); ++i) {
        core::ModelConfig& m = state.file_models[i];
        m.devices = state.devices;
        m.options.device = state.devices[0];
        if (!state.file_model_dtype_set[i]) {
          m.options.dtype = IsCudaDevice(m.options.device) ? core::DType::kBFloat16 : core::DType::kFloat32;
        }
        MQA_RETURN_IF_ERROR(WithPrefix(core::ValidateOptions(m.options),
                                       state.devices_origin + ": models[" + std::to_string(i) + "] (" + m.name +
                                           "): "));
      }
      config.notices.insert(config.notices.end(), state.devices_notices.begin(), state.devices_notices.end());
    }
    config.engine.models = std::move(state.file_models);
    config.default_model = false;
  }
  if (config.engine.default_idle_ttl > config.engine.max_idle_ttl) {
    return InvalidArgumentError("default_idle_ttl_ms (" + std::to_string(config.engine.default_idle_ttl.count()) +
                                ") must not exceed max_idle_ttl_ms (" +
                                std::to_string(config.engine.max_idle_ttl.count()) + ")");
  }
  return config;
}

std::map<std::string, std::string> ProcessEnvironment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    if (entry.rfind("MQA_", 0) != 0) continue;
    const size_t eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    env.emplace(std::string(entry.substr(0, eq)), std::string(entry.substr(eq + 1)));
  }
  return env;
}

std::string ConfigHelp() {
  struct Row {
    std::string flag, env, key, def, help;
  };
  std::vector<Row> rows;
  rows.push_back({"flag", "environment", "config key", "default", ""});
  for (const Setting& s : Settings()) {
    std::string flag(s.flag);
    if (!s.value_name.empty()) flag += " " + std::string(s.value_name);
    if (s.flag == "--help") flag += ", -h";
    rows.push_back({flag, s.env.empty() ? "-" : std::string(s.env), s.key.empty() ? "-" : std::string(s.key),
                    s.default_text.empty() ? "-" : std::string(s.default_text), std::string(s.help)});
  }
  size_t w_flag = 0, w_env = 0, w_key = 0;
  for (const Row& r : rows) {
    w_flag = std::max(w_flag, r.flag.size());
    w_env = std::max(w_env, r.env.size());
    w_key = std::max(w_key, r.key.size());
  }
  auto pad = [](const std::string& s, size_t w) { return s + std::string(w + 2 - s.size(), ' '); };
  std::string out =
      "Usage: mqa-server [--flag VALUE | --flag=VALUE]...\n"
      "\n"
      "Serves Multi-Query Attention layers over gRPC, keeping each session's KV cache on the server.\n"
      "Each setting comes from, lowest precedence first: its default, the config file (YAML or JSON),\n"
      "the environment (empty values count as unset), the command line.\n"
      "\n";
  for (const Row& r : rows) {
    out += "  " + pad(r.flag, w_flag) + pad(r.env, w_env) + pad(r.key, w_key) + r.def + "\n";
    if (!r.help.empty()) out += "      " + r.help + "\n";
  }
  out +=
      "\n"
      "Models are configured in the file only, under \"models\" (a list; see deploy/config/example.yaml for\n"
      "every key). Without any, the server hosts the embedded default model \"mqa-default\": 2 layers, dim 512,\n"
      "8 heads, random weights from seed 0, torch attention, 4096 tokens per session; on cuda:0 in bfloat16\n"
      "when a GPU is present, else on the CPU in float32 (--device / MQA_DEFAULT_DEVICE choose).\n"
      "--devices all (or a list: --devices cuda:0,cuda:1) replicates every model on those devices, one engine\n"
      "each (weights, KV-cache pool, worker); each new session goes to the device with the most free blocks.\n";
  return out;
}

}  // namespace mqa::server
