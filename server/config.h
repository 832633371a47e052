// Server configuration: defaults < config file (YAML or JSON) < MQA_* environment variables < command-line
// flags. With no model configured, the server hosts the embedded default model (random weights from a seed; on
// the first GPU when there is one, else on the CPU).
#ifndef MQA_SERVER_CONFIG_H_
#define MQA_SERVER_CONFIG_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "mqa/core/engine.h"
#include "mqa/core/status.h"

namespace mqa::server {

struct ServerConfig {
  std::string listen = "0.0.0.0:50051";        // host:port; port 0 picks a free port (printed at start-up)
  std::string port_file;                       // when set, the bound port is written there once serving
  size_t max_message_bytes = 64u << 20;        // both directions
  std::chrono::milliseconds drain_timeout{std::chrono::seconds(30)};  // SIGTERM: most time spent draining
  std::string log_level = "info";              // trace, debug, info, warn, error, critical, off
  std::string log_format = "text";             // "text" (key=value) or "json" (one object per line)
  core::EngineOptions engine;                  // models, limits, TTLs
  bool default_model = true;                   // engine.models came from the embedded default
  std::string config_path;                     // the file it was read from ("" = none)
  bool show_help = false;                      // --help was given: print ConfigHelp() and exit 0
};

// The embedded default model: "mqa-default", 2 layers, dim 512, heads 8, seed 0, fp32 on the CPU or bf16 on
// cuda:0 when a GPU is present (torch attention), 4096 tokens per session.
core::ModelConfig DefaultModel();

// Builds the configuration from argv (flags), env (the process environment, "MQA_*" names) and the file named
// by --config / MQA_CONFIG. INVALID_ARGUMENT with the offending key and what was expected; NOT_FOUND for a
// missing file. With --help, returns a config with show_help set (nothing else is validated).
core::StatusOr<ServerConfig> LoadConfig(int argc, const char* const* argv,
                                        const std::map<std::string, std::string>& env);

// Text for --help: every flag, its environment variable and its config-file key.
std::string ConfigHelp();

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_H_
