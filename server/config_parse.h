// The first of LoadConfig's two steps: reading the sources (defaults, the config file, MQA_* variables, flags)
// into plain settings. Nothing here asks the machine about its devices: "auto" and "all" stay as written, and a
// device list is only checked for shape and duplicates. The second step, ResolveConfig (config_devices.h), asks a
// DeviceProbe and builds the ServerConfig.
#ifndef MQA_SERVER_CONFIG_PARSE_H_
#define MQA_SERVER_CONFIG_PARSE_H_

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config.h"
#include "mqa/core/engine.h"
#include "mqa/core/status.h"

namespace mqa::server {

// A list of devices as written (--devices, MQA_DEVICES, a model's devices key): "all" kept as such, each entry
// normalised ("cuda" -> "cuda:0") and listed once. Whether the devices exist is ResolveConfig's question.
struct DeviceRequest {
  std::string origin;                  // "--devices", "MQA_DEVICES", "c.yaml:3:5: models[0].devices"
  bool all = false;                    // "all": every GPU here (the CPU when there is none)
  std::vector<std::string> devices;    // normalised
  std::vector<std::string> spellings;  // as given
  std::vector<std::string> origins;    // where each entry came from

  // Adds one entry: not "all", not empty, not "auto", not listed already (so that a duplicate is reported as
  // such on any machine).
  core::Status Add(std::string_view spelled, const std::string& entry_origin);
};

// --devices / MQA_DEVICES: "all", or devices separated by commas ("cuda:0,cuda:1").
core::StatusOr<DeviceRequest> ParseDeviceList(std::string_view value, const std::string& origin);

// One entry of the file's models, as written: its device fields are unresolved.
struct ModelSpec {
  core::ModelConfig model;               // all but options.device and devices; dtype and attn_impl when set
  std::string device = "auto";           // the device key ("auto" when absent)
  std::optional<DeviceRequest> devices;  // the devices key, instead of device
  bool dtype_set = false;                // else dtype follows the device (ApplyDeviceDefaults)
  bool attn_impl_set = false;            // else attn_impl follows the device
  std::string origin;                    // "c.yaml:4:5: models[1]", for whole-model errors
};

// Everything the sources said, checked but not resolved against the machine.
struct ParsedConfig {
  ServerConfig config;                  // all but engine.models, default_model and notices (ResolveConfig's)
  std::string default_device = "auto";  // --device / MQA_DEFAULT_DEVICE: the embedded default model's device
  std::string device_origin;            // where default_device came from ("" = the built-in auto)
  bool device_flag = false;
  std::optional<DeviceRequest> devices;  // --devices / MQA_DEVICES: every model's devices
  bool devices_flag = false;
  std::vector<ModelSpec> file_models;  // empty: the embedded default model
};

// Step one of LoadConfig (same arguments, same errors, bar the devices'). With an action flag (--help,
// --version, --help-markdown) anywhere, returns at once with its show_* set and nothing else read.
core::StatusOr<ParsedConfig> ParseConfig(int argc, const char* const* argv,
                                         const std::map<std::string, std::string>& env);

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_PARSE_H_
