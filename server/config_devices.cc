#include "config_devices.h"

#include <utility>

#include "mqa/core/device.h"
#include "mqa/core/tensor.h"

namespace mqa::server {
namespace {

using core::InvalidArgumentError;
using core::Status;
using core::StatusOr;

constexpr std::string_view kDefaultModelName = "mqa-default";

Status WithPrefix(const Status& status, const std::string& prefix) {
  if (status.ok()) return status;
  return Status(status.code(), prefix + status.message());
}

// Every option, the device included (the probe's question).
Status ValidateModel(const core::MqaOptions& options, const DeviceProbe& probe, const std::string& prefix) {
  MQA_RETURN_IF_ERROR(ValidateOptionsButDevice(options, prefix));
  return WithPrefix(probe.check(options.device), prefix);
}

// "all" becomes every GPU here, or the CPU when there is none (which is worth a line in the log); each listed
// device must exist.
StatusOr<std::vector<std::string>> Resolve(const DeviceRequest& request, const DeviceProbe& probe,
                                           std::vector<std::string>* notices) {
  if (request.all) {
    std::vector<std::string> all = probe.cuda_devices();
    if (!all.empty()) return all;
    notices->push_back(request.origin + ": 'all' found no CUDA device here, so it means the CPU");
    return std::vector<std::string>{"cpu"};
  }
  for (size_t i = 0; i < request.devices.size(); ++i) {
    MQA_RETURN_IF_ERROR(WithPrefix(probe.check(request.spellings[i]), request.origins[i] + ": "));
  }
  return request.devices;
}

// A model of the file on the devices its own keys name.
StatusOr<core::ModelConfig> ResolveFileModel(const ModelSpec& spec, const DeviceProbe& probe,
                                             std::vector<std::string>* notices) {
  core::ModelConfig m = spec.model;
  if (spec.devices) {
    MQA_ASSIGN_OR_RETURN(m.devices, Resolve(*spec.devices, probe, notices));
    m.options.device = m.devices[0];
  } else {
    m.options.device = ResolveAutoDevice(spec.device, probe);
  }
  ApplyDeviceDefaults(m.options.device, spec.dtype_set, spec.attn_impl_set, m.options);
  MQA_RETURN_IF_ERROR(ValidateModel(m.options, probe, spec.origin + " (" + m.name + "): "));
  return m;
}

// The embedded default model: --device and --devices both name its devices. The later source wins (flags over
// the environment); two of the same source contradict each other.
StatusOr<core::ModelConfig> ResolveDefaultModel(const ParsedConfig& parsed, const std::vector<std::string>& devices,
                                                const DeviceProbe& probe) {
  const bool use_devices = parsed.devices.has_value();
  const bool have_device = !parsed.device_origin.empty();
  if (use_devices && have_device && parsed.device_flag == parsed.devices_flag) {
    return InvalidArgumentError(parsed.device_origin + " and " + parsed.devices->origin +
                                " both set the default model's device; give one of them");
  }
  const bool by_devices = use_devices && !(have_device && parsed.device_flag);
  core::ModelConfig m = DefaultModelOn(by_devices ? devices[0] : parsed.default_device, probe);
  std::string where = have_device ? parsed.device_origin + ": " : "";
  if (by_devices) {
    m.devices = devices;
    where = parsed.devices->origin + ": ";
  }
  MQA_RETURN_IF_ERROR(ValidateModel(m.options, probe, where + "default model (" + m.name + "): "));
  return m;
}

}  // namespace

const DeviceProbe& SystemDevices() {
  static const DeviceProbe probe = {[] { return core::AllCudaDevices(); },
                                    [](std::string_view device) { return core::ValidateDevice(device); }};
  return probe;
}

std::string ResolveAutoDevice(std::string_view device, const DeviceProbe& probe) {
  if (device.empty() || device == "auto") return probe.cuda_devices().empty() ? "cpu" : "cuda:0";
  return std::string(device);
}

bool IsCudaDevice(std::string_view device) { return device.rfind("cuda", 0) == 0; }

void ApplyDeviceDefaults(std::string_view device, bool dtype_set, bool attn_impl_set, core::MqaOptions& options) {
  const bool cuda = IsCudaDevice(device);
  if (!dtype_set) options.dtype = cuda ? core::DType::kBFloat16 : core::DType::kFloat32;
  // The fastest correct path: the project's fused kernels on a GPU, the torch math on the CPU.
  if (!attn_impl_set) options.attn_impl = cuda ? core::AttnImpl::kTriton : core::AttnImpl::kTorch;
}

core::ModelConfig DefaultModelOn(std::string_view device, const DeviceProbe& probe) {
  core::ModelConfig m;
  m.name = std::string(kDefaultModelName);
  m.num_layers = 2;
  m.options.dim = 512;
  m.options.heads = 8;
  m.options.seed = 0;
  m.options.device = ResolveAutoDevice(device, probe);
  ApplyDeviceDefaults(m.options.device, /*dtype_set=*/false, /*attn_impl_set=*/false, m.options);
  m.max_tokens_per_session = 4096;
  m.description = "embedded default model: random weights from seed 0";
  return m;
}

Status ValidateOptionsButDevice(const core::MqaOptions& options, const std::string& prefix) {
  // core::ValidateOptions checks the device last, so on the CPU it checks exactly everything else.
  core::MqaOptions on_cpu = options;
  on_cpu.device = "cpu";
  return WithPrefix(core::ValidateOptions(on_cpu), prefix);
}

StatusOr<ServerConfig> ResolveConfig(ParsedConfig parsed, const DeviceProbe& probe) {
  ServerConfig config = std::move(parsed.config);
  if (config.show_help || config.show_help_markdown || config.show_version) return config;

  std::vector<core::ModelConfig> models;
  for (const ModelSpec& spec : parsed.file_models) {
    MQA_ASSIGN_OR_RETURN(core::ModelConfig m, ResolveFileModel(spec, probe, &config.notices));
    models.push_back(std::move(m));
  }
  // --devices / MQA_DEVICES is resolved even where --device wins over it, so that a bad list is always an error;
  // its notices are kept only where it is used.
  std::vector<std::string> devices;
  std::vector<std::string> devices_notices;
  if (parsed.devices) {
    MQA_ASSIGN_OR_RETURN(devices, Resolve(*parsed.devices, probe, &devices_notices));
  }

  if (parsed.file_models.empty()) {
    MQA_ASSIGN_OR_RETURN(core::ModelConfig m, ResolveDefaultModel(parsed, devices, probe));
    const bool by_devices = !m.devices.empty();
    if (by_devices) config.notices.insert(config.notices.end(), devices_notices.begin(), devices_notices.end());
    config.engine.models = {std::move(m)};
    config.default_model = true;
    return config;
  }
  if (parsed.device_flag) {
    return InvalidArgumentError("--device sets the embedded default model's device, but " + config.config_path +
                                " defines models; set each model's device in the file instead (or every "
                                "model's with --devices)");
  }
  if (parsed.devices) {
    // Higher precedence than the file: every model gets these devices, and the dtype and attn_impl the file left
    // to their defaults follow the first of them.
    for (size_t i = 0; i < models.size(); ++i) {
      core::ModelConfig& m = models[i];
      const ModelSpec& spec = parsed.file_models[i];
      m.devices = devices;
      m.options.device = devices[0];
      ApplyDeviceDefaults(m.options.device, spec.dtype_set, spec.attn_impl_set, m.options);
      MQA_RETURN_IF_ERROR(ValidateModel(
          m.options, probe, parsed.devices->origin + ": models[" + std::to_string(i) + "] (" + m.name + "): "));
    }
    config.notices.insert(config.notices.end(), devices_notices.begin(), devices_notices.end());
  }
  config.engine.models = std::move(models);
  config.default_model = false;
  return config;
}

}  // namespace mqa::server
