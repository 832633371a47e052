// The second of LoadConfig's two steps: deciding every model's devices, and the defaults that follow from them,
// once the machine has been asked which devices it has. The asking goes through a DeviceProbe, so that this
// step can be tested for machines it does not run on (a test passes a probe with two GPUs).
#ifndef MQA_SERVER_CONFIG_DEVICES_H_
#define MQA_SERVER_CONFIG_DEVICES_H_

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "config.h"
#include "config_parse.h"
#include "mqa/core/engine.h"
#include "mqa/core/mqa_layer.h"
#include "mqa/core/status.h"

namespace mqa::server {

// What the machine has. Asked only when a configuration needs it ("auto", "all", a device to check).
struct DeviceProbe {
  // Every CUDA device, in order ({"cuda:0", "cuda:1"}); empty without a GPU.
  std::function<std::vector<std::string>()> cuda_devices;
  // INVALID_ARGUMENT for a malformed device string, UNAVAILABLE for a device this machine does not have.
  std::function<core::Status(std::string_view device)> check;
};

// This machine, as torch sees it (core::AllCudaDevices, core::ValidateDevice).
const DeviceProbe& SystemDevices();

// "auto" or "": cuda:0 when the probe finds a GPU, else cpu; any other string unchanged.
std::string ResolveAutoDevice(std::string_view device, const DeviceProbe& probe);

bool IsCudaDevice(std::string_view device);

// The defaults that follow a model's device, in one place, for the embedded default model and the file's models
// alike: on CUDA bfloat16 and attn_impl triton (the project's fused kernels), on the CPU float32 and the torch
// math. `device` is the model's (its first, with several). What the user set (dtype_set, attn_impl_set) stays.
void ApplyDeviceDefaults(std::string_view device, bool dtype_set, bool attn_impl_set, core::MqaOptions& options);

// The embedded default model ("mqa-default", DefaultModel() in config.h) on `device` ("auto" resolved by the
// probe). The device is not checked here.
core::ModelConfig DefaultModelOn(std::string_view device, const DeviceProbe& probe);

// core::ValidateOptions but for its device check (which asks the machine): every option that does not depend on
// where the model runs. Errors get `prefix`.
core::Status ValidateOptionsButDevice(const core::MqaOptions& options, const std::string& prefix);

// Step two of LoadConfig: every device request of `parsed` resolved against `probe` ("all", "auto", each device
// checked), the models built (the file's, or the embedded default model), their device defaults applied and
// their options validated. UNAVAILABLE for a device the probe does not have; the notices say what is worth a line
// in the log (e.g. "all" meant the CPU).
core::StatusOr<ServerConfig> ResolveConfig(ParsedConfig parsed, const DeviceProbe& probe);

}  // namespace mqa::server

#endif  // MQA_SERVER_CONFIG_DEVICES_H_
