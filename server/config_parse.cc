#include "config_parse.h"

#include <algorithm>
#include <utility>

#include "config_file.h"
#include "mqa/core/device.h"
#include "settings.h"
#include "settings_values.h"

namespace mqa::server {
namespace {

using core::InvalidArgumentError;
using core::Status;
using core::StatusOr;

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
  for (const Setting& s : SettingTable()) {
    const size_t d = EditDistance(flag, s.flag);
    if (d < best_distance) {
      best = &s;
      best_distance = d;
    }
  }
  if (best != nullptr) msg += " (did you mean " + std::string(best->flag) + "?)";
  return InvalidArgumentError(msg + "; see --help");
}

struct FlagValue {
  const Setting* setting;
  std::string value;
};

// The command line, split into the flags' values (in order) and the actions asked for. Splitting goes on past
// an error so that --help anywhere still just shows the help.
struct CommandLine {
  std::vector<FlagValue> flags;
  Status error;
  bool help = false;
  bool help_markdown = false;
  bool version = false;
};

CommandLine SplitCommandLine(int argc, const char* const* argv) {
  CommandLine cl;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i] != nullptr ? argv[i] : "";
    const Setting* s = FindFlag(arg);
    if (s != nullptr && s->type == SettingType::kAction) {
      cl.help |= s->name == "help";
      cl.help_markdown |= s->name == "help_markdown";
      cl.version |= s->name == "version";
      continue;
    }
    if (!cl.error.ok()) continue;
    if (arg.size() < 3 || arg.substr(0, 2) != "--") {
      cl.error =
          InvalidArgumentError("unexpected argument " + Quoted(arg) + "; every setting is a --flag (see --help)");
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string_view name = arg.substr(0, eq);
    s = FindFlag(name);
    if (s == nullptr) {
      cl.error = UnknownFlag(name);
    } else if (s->type == SettingType::kAction) {
      cl.error = InvalidArgumentError(std::string(name) + " takes no value");
    } else if (eq != std::string_view::npos) {
      cl.flags.push_back({s, std::string(arg.substr(eq + 1))});
    } else if (i + 1 < argc && argv[i + 1] != nullptr && std::string_view(argv[i + 1]).rfind("--", 0) != 0) {
      cl.flags.push_back({s, argv[++i]});
    } else {
      const std::string flag(name);
      const std::string value(s->value_name);
      cl.error =
          InvalidArgumentError(flag + ": expected a value (" + flag + " " + value + " or " + flag + "=" + value + ")");
    }
  }
  return cl;
}

bool IsConfigSetting(const Setting& s) { return s.name == "config"; }

}  // namespace

Status DeviceRequest::Add(std::string_view spelled, const std::string& entry_origin) {
  if (spelled == "all") {
    return InvalidArgumentError(entry_origin + ": 'all' stands alone (every GPU here), it cannot be one of a list");
  }
  if (spelled.empty() || spelled == "auto") {
    return InvalidArgumentError(entry_origin + ": expected cpu, cuda or cuda:N, got " + Quoted(spelled));
  }
  const std::string device = core::NormaliseDevice(spelled);
  const auto seen = std::find(devices.begin(), devices.end(), device);
  if (seen != devices.end()) {
    const std::string& first = spellings[static_cast<size_t>(seen - devices.begin())];
    return InvalidArgumentError(entry_origin + ": " + device + " is listed twice" +
                                (first != spelled ? " (\"cuda\" means \"cuda:0\")" : "") +
                                "; a model has at most one replica per device");
  }
  devices.push_back(device);
  spellings.push_back(std::string(spelled));
  origins.push_back(entry_origin);
  return Status::Ok();
}

StatusOr<DeviceRequest> ParseDeviceList(std::string_view value, const std::string& origin) {
  DeviceRequest request;
  request.origin = origin;
  if (value == "all") {
    request.all = true;
    return request;
  }
  size_t start = 0;
  for (;;) {
    const size_t comma = value.find(',', start);
    const std::string_view item = value.substr(start, comma == std::string_view::npos ? comma : comma - start);
    if (item.empty()) {
      return InvalidArgumentError(origin +
                                  ": expected all or a comma-separated list of devices (cpu, cuda, "
                                  "cuda:N), got " +
                                  Quoted(value) + " (an empty entry)");
    }
    MQA_RETURN_IF_ERROR(request.Add(item, origin));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return request;
}

StatusOr<ParsedConfig> ParseConfig(int argc, const char* const* argv, const std::map<std::string, std::string>& env) {
  // Flags are read first (the config path may come from them) but applied last, so they win.
  CommandLine cl = SplitCommandLine(argc, argv);
  ParsedConfig parsed;
  if (cl.help || cl.help_markdown || cl.version) {
    parsed.config.show_help = cl.help;
    parsed.config.show_help_markdown = cl.help_markdown;
    parsed.config.show_version = cl.version;
    return parsed;
  }
  MQA_RETURN_IF_ERROR(cl.error);

  // The table's defaults first: whatever a source leaves unset is the table's value.
  for (const Setting& s : SettingTable()) {
    if (!s.default_applied) continue;
    if (Status st = ApplySetting(s, parsed, s.default_value, std::string(s.flag)); !st.ok()) {
      return core::InternalError("the default of " + std::string(s.name) +
                                 " is refused by its own check: " + st.message());
    }
  }

  std::string config_path;
  if (auto it = env.find("MQA_CONFIG"); it != env.end()) config_path = it->second;
  for (const FlagValue& f : cl.flags) {
    if (IsConfigSetting(*f.setting)) config_path = f.value;
  }
  if (!config_path.empty()) MQA_RETURN_IF_ERROR(LoadConfigFile(config_path, parsed));

  for (const Setting& s : SettingTable()) {
    if (s.env.empty() || IsConfigSetting(s)) continue;
    auto it = env.find(std::string(s.env));
    if (it == env.end() || it->second.empty()) continue;
    MQA_RETURN_IF_ERROR(ApplySetting(s, parsed, it->second, std::string(s.env)));
  }
  for (const FlagValue& f : cl.flags) {
    if (IsConfigSetting(*f.setting)) continue;
    MQA_RETURN_IF_ERROR(ApplySetting(*f.setting, parsed, f.value, std::string(f.setting->flag)));
  }
  parsed.config.config_path = config_path;

  const core::EngineOptions& e = parsed.config.engine;
  if (e.default_idle_ttl > e.max_idle_ttl) {
    return InvalidArgumentError("default_idle_ttl_ms (" + std::to_string(e.default_idle_ttl.count()) +
                                ") must not exceed max_idle_ttl_ms (" + std::to_string(e.max_idle_ttl.count()) + ")");
  }
  return parsed;
}

}  // namespace mqa::server
