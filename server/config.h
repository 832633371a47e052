// Server configuration: defaults < config file (YAML or JSON) < MQA_* environment variables < command-line
// flags. With no model configured, the server hosts the embedded default model (random weights from a seed; on
// the first GPU when there is one, else on the CPU).
//
// Config file (YAML; JSON is read as YAML). Every key is optional; unknown keys are errors. The path comes from
// --config or MQA_CONFIG. deploy/config/example.yaml is a complete, commented example.
//
//   listen: "0.0.0.0:50051"        # host:port ("[::]:50051", port 0 = any free port) or "unix:/path"
//   max_message_bytes: 67108864    # 1 .. 2147483647, both directions
//   metrics_listen: "0.0.0.0:9400" # host:port of the HTTP /metrics endpoint (port 0 = any); "" = none
//   metrics_max_connections: 64    # >= 1: HTTP connections served at once; more are answered 503 and closed
//   metrics_request_timeout_ms: 5000  # 1 .. one year: one request's whole time, first byte to its answer
//   metrics_idle_timeout_ms: 5000  # 1 .. one year: a kept-alive connection's wait for its next request
//   health_listen: ""              # extra plaintext gRPC address (host:port or unix:/path), e.g. for
//                                  # Kubernetes' grpc probes; "" = none
//   drain_timeout_ms: 30000        # 0 .. one year
//   log_level: info                # trace, debug, info, warn (or warning), error, critical, off
//   log_format: text               # text or json
//   max_sessions: 1024             # >= 1
//   max_queue: 4096                # >= 1, per device
//   max_forward_scores: 268435456  # >= 1: b * H * s * s_k attention scores per Forward; more: RESOURCE_EXHAUSTED
//   stream_max_pending_steps: 1024 # >= 1: a stream stops reading while this many steps are unanswered/unread
//   stream_max_pending_bytes: 33554432  # >= 1: ... or while their answers hold this many bytes
//   replay_budget_bytes: 268435456 # >= 0: last answers kept for retried steps, all sessions; 0 = none
//   default_idle_ttl_ms: 300000    # 1 .. one year, <= max_idle_ttl_ms
//   max_idle_ttl_ms: 3600000       # 1 .. one year
//   reap_interval_ms: 200          # 1 .. one year
//   max_batch_tokens: 4096         # >= 1: new tokens per batched pass (decode + prefill chunk tokens)
//   max_batch_sessions: 256        # >= 1: steps per pass; 1 = unbatched
//   max_queue_delay_us: 0          # 0 .. 1000000: how long a pass may wait to fill; 0 = run at once
//   max_prefill_chunk: 512         # >= 1: longer causal steps run in chunks of this many tokens (non-causal
//                                  # steps run whole)
//   kv_block_size: 16              # 1 .. 1024: tokens per KV-cache block
//   kv_cache_bytes: 0              # >= 0: KV-cache bytes per device, all its models; 0 = from the two below
//   kv_gpu_memory_fraction: 0.9    # (0, 1]: CUDA, of the memory free after loading the weights
//   kv_cpu_budget_bytes: 1073741824  # >= 1: CPU
//   models:                        # absent or empty: the embedded default model (DefaultModel())
//     - name: mqa-7b               # required, unique, no whitespace
//       num_layers: 32             # >= 1 (default 1)
//       dim: 4096                  # (default 512)
//       heads: 32                  # dim % heads == 0 (default 8)
//       attn_impl: flash           # torch, flash, triton (default: triton on CUDA, torch on the CPU)
//       clip_qkv: null             # number >= 0 or null (default null: no clipping); < 0 stops the server
//       qk_ln: false               # true or false
//       softmax_scale: null        # number or null (default null: 1/sqrt(head_dim))
//       attn_pdrop: 0.0            # [0, 1), >= 1 stops the server; only training-mode calls use it
//       norm_type: low_precision_layernorm   # or layernorm (alias layernornm), rmsnorm, low_precision_rmsnorm
//       fc_type: torch             # only torch
//       device: cuda:0             # cpu, cuda, cuda:N or auto (default auto: cuda:0 when a GPU exists, else cpu)
//       devices: [cuda:0, cuda:1]  # instead of device: one replica per device (same weights), sessions placed
//                                  # on the device with the most free KV blocks; or "all" (every GPU here, the
//                                  # CPU when there is none). Each listed once ("cuda" = "cuda:0") and present
//                                  # here. cpu may join GPUs (it works, but its sessions run far slower)
//       dtype: bfloat16            # float32/fp32, bfloat16/bf16, float16/fp16 (default bf16 on CUDA, fp32 on CPU;
//                                  # with several devices, as for the first)
//       seed: 0                    # layer i is initialised with seed + i when there are no weights
//       weights: weights/7b.safetensors  # safetensors with layers.{i}.attn.*; relative to the config file's
//                                        # directory; must exist. Absent or "": random weights from seed
//       max_tokens_per_session: 4096     # >= 1
//       description: "free text"
//
// Types are strict in the file: numbers and booleans must not be quoted, lists and maps must not appear where a
// scalar is expected. Environment variables with an empty value count as unset. MQA_DEFAULT_DEVICE and --device
// only concern the embedded default model: the variable is ignored when the file defines models, the flag is an
// error then (set each model's device in the file instead). MQA_DEVICES and --devices ("all" or a comma list,
// "cuda:0,cuda:1") replace every model's device(s), the default model's included; where --device or
// MQA_DEFAULT_DEVICE is given too, the flag beats the variable, and two flags (or two variables) are an error.
// ConfigHelp() lists every flag and variable.
//
// Errors: INVALID_ARGUMENT naming where the bad value came from ("--max-sessions: ...", "MQA_MAX_QUEUE: ...",
// "config.yaml:7:5: models[1].hedas: unknown key; expected one of ...") and what was expected; NOT_FOUND for a
// missing config file or weights file; UNAVAILABLE for a model on a CUDA device this machine does not have.
#ifndef MQA_SERVER_CONFIG_H_
#define MQA_SERVER_CONFIG_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"

namespace mqa::server {

struct ServerConfig {
  std::string listen = "0.0.0.0:50051";        // host:port; port 0 picks a free port (printed at start-up)
  std::string port_file;                       // when set, the bound port is written there once serving
  std::string metrics_listen = "0.0.0.0:9400";  // HTTP GET /metrics (Prometheus text); "" = no endpoint
  std::string metrics_port_file;               // when set, the bound metrics port is written there
  size_t metrics_max_connections = 64;         // /metrics connections at once; more are refused (503)
  std::chrono::milliseconds metrics_request_timeout{5000};  // one HTTP request, first byte to last answered
  std::chrono::milliseconds metrics_idle_timeout{5000};     // a kept-alive connection's wait for its next one
  std::string health_listen;                   // extra plaintext gRPC address of the same server; "" = none
  std::string health_port_file;                // when set, health_listen's bound port is written there
  size_t max_message_bytes = 64u << 20;        // both directions
  size_t stream_max_pending_steps = 1024;      // per StreamSteps stream: see ServiceOptions
  size_t stream_max_pending_bytes = 32u << 20;
  std::chrono::milliseconds drain_timeout{std::chrono::seconds(30)};  // SIGTERM: most time spent draining
  std::string log_level = "info";              // trace, debug, info, warn, error, critical, off
  std::string log_format = "text";             // "text" (key=value) or "json" (one object per line)
  core::EngineOptions engine;                  // models, limits, TTLs, batching, KV cache
  bool default_model = true;                   // engine.models came from the embedded default
  std::string config_path;                     // the file it was read from ("" = none)
  bool show_help = false;                      // --help was given: print ConfigHelp() and exit 0
  std::vector<std::string> notices;            // worth a line in the log at start-up (e.g. devices 'all' meant
                                               // the CPU because no GPU is visible)
};

// The embedded default model: "mqa-default", 2 layers, dim 512, heads 8, seed 0, fp32 on the CPU or bf16 on
// cuda:0 when a GPU is present (torch attention), 4096 tokens per session.
core::ModelConfig DefaultModel();
// The same model on `device` ("cpu", "cuda", "cuda:N"; "auto" or "" = as above): bf16 on a CUDA device, fp32 on
// the CPU. The device string is not checked here (LoadConfig validates it).
core::ModelConfig DefaultModel(std::string_view device);

// Builds the configuration from argv (flags), env (the process environment, "MQA_*" names) and the file named
// by --config / MQA_CONFIG. INVALID_ARGUMENT with the offending key and what was expected; NOT_FOUND for a
// missing file. With --help, returns a config with show_help set (nothing else is validated).
// Flags take "--flag value" or "--flag=value"; a repeated flag's last value wins.
core::StatusOr<ServerConfig> LoadConfig(int argc, const char* const* argv,
                                        const std::map<std::string, std::string>& env);

// The process environment's "MQA_*" variables, for LoadConfig's env argument.
std::map<std::string, std::string> ProcessEnvironment();

// Text for --help: every flag, its environment variable and its config-file key.
std::string ConfigHelp();

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_H_
