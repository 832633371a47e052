// Server configuration: defaults < config file (YAML or JSON) < MQA_* environment variables < command-line
// flags. With no model configured, the server hosts the embedded default model (random weights from a seed; on
// the first GPU when there is one, else on the CPU).
//
// Every setting, with its flag, variable, config-file key, default and check, is a row of one table
// (settings.h); `mqa-server --help` prints it, `mqa-server --help-markdown` is the settings section of
// docs/operations.md, and deploy/config/example.yaml shows every key with its default (tests hold both to the
// table). The file's "models" are described in config_file.h and the example.
//
// Loading is two steps: ParseConfig (config_parse.h) reads the sources into plain settings without asking the
// machine anything; ResolveConfig (config_devices.h) asks a DeviceProbe which devices exist, decides every model's
// devices and the defaults that follow from them (dtype, attn_impl), and validates the models.
//
// Environment variables with an empty value count as unset. MQA_DEFAULT_DEVICE and --device only concern the
// embedded default model: the variable is ignored when the file defines models, the flag is an error then (set
// each model's device in the file instead). MQA_DEVICES and --devices ("all" or a comma list, "cuda:0,cuda:1")
// replace every model's device(s), the default model's included; where --device or MQA_DEFAULT_DEVICE is given
// too, the flag beats the variable, and two flags (or two variables) are an error.
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

// The initialisers serve code that builds a ServerConfig itself (tests); LoadConfig starts from the table's
// defaults (settings.cc), and a test holds the two equal.
struct ServerConfig {
  std::string listen = "0.0.0.0:50051";                     // host:port; port 0 picks a free port (printed at start-up)
  std::string port_file;                                    // when set, the bound port is written there once serving
  std::string metrics_listen = "0.0.0.0:9400";              // HTTP GET /metrics (Prometheus text); "" = no endpoint
  std::string metrics_port_file;                            // when set, the bound metrics port is written there
  size_t metrics_max_connections = 64;                      // /metrics connections at once; more are refused (503)
  std::chrono::milliseconds metrics_request_timeout{5000};  // one HTTP request, first byte to last answered
  std::chrono::milliseconds metrics_idle_timeout{5000};     // a kept-alive connection's wait for its next one
  std::string health_listen;               // extra plaintext gRPC address of the same server; "" = none
  std::string health_port_file;            // when set, health_listen's bound port is written there
  size_t max_message_bytes = 64u << 20;    // both directions
  size_t stream_max_pending_steps = 1024;  // per StreamSteps stream: see ServiceOptions
  size_t stream_max_pending_bytes = 32u << 20;
  std::chrono::milliseconds drain_timeout{std::chrono::seconds(30)};  // SIGTERM: most time spent draining
  std::string log_level = "info";                                     // trace, debug, info, warn, error, critical, off
  std::string log_format = "text";   // "text" (key=value) or "json" (one object per line)
  core::EngineOptions engine;        // models, limits, TTLs, batching, KV cache
  bool default_model = true;         // engine.models came from the embedded default
  std::string config_path;           // the file it was read from ("" = none)
  bool show_help = false;            // --help was given: print ConfigHelp() and exit 0
  bool show_help_markdown = false;   // --help-markdown: print SettingsMarkdown() and exit 0
  bool show_version = false;         // --version: print the version and exit 0
  std::vector<std::string> notices;  // worth a line in the log at start-up (e.g. devices 'all' meant
                                     // the CPU because no GPU is visible)
};

// The embedded default model: "mqa-default", 2 layers, dim 512, heads 8, seed 0, 4096 tokens per session; on
// cuda:0 in bf16 with triton attention when a GPU is present, else on the CPU in fp32 with torch attention.
core::ModelConfig DefaultModel();
// The same model on `device` ("cpu", "cuda", "cuda:N"; "auto" or "" = as above), with that device's defaults
// (ApplyDeviceDefaults in config_devices.h). The device string is not checked here (LoadConfig validates it).
core::ModelConfig DefaultModel(std::string_view device);

// Builds the configuration from argv (flags), env (the process environment, "MQA_*" names) and the file named
// by --config / MQA_CONFIG. INVALID_ARGUMENT with the offending key and what was expected; NOT_FOUND for a
// missing file. With --help, --help-markdown or --version anywhere, returns a config with show_help,
// show_help_markdown or show_version set (nothing else is validated). Flags take "--flag value" or
// "--flag=value"; a repeated flag's last value wins. ParseConfig, then ResolveConfig with SystemDevices().
core::StatusOr<ServerConfig> LoadConfig(int argc, const char* const* argv,
                                        const std::map<std::string, std::string>& env);

// The process environment's "MQA_*" variables, for LoadConfig's env argument.
std::map<std::string, std::string> ProcessEnvironment();

// Text for --help: every flag, its environment variable and its config-file key (SettingsHelp()).
std::string ConfigHelp();

// Text for --version: "mqa-server 0.1.0\n", the version of mqa/version.h (the project() of CMakeLists.txt).
std::string VersionText();

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_H_
